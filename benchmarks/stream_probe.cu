/*
 * stream_probe.cu - the memory floor of a chain of kernels: each call streams `bytes` of its own
 * buffer once (16-byte loads, 8 in flight per thread) and writes one word per block, launched
 * back to back like the layers of a decode step (optionally with programmatic dependent launch).
 * What a weight-streaming kernel can reach at best, kernel boundaries included.
 * Built and driven by benchmarks/stream_probe.py; not part of the extension.
 */
#include <cuda_runtime.h>
#include <stdint.h>

__global__ void __launch_bounds__(256) stream_kernel(const uint4 *__restrict__ w, int64_t n16, uint32_t *out) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    const int64_t per = (n16 + gridDim.x - 1) / gridDim.x;
    const int64_t b0 = (int64_t)blockIdx.x * per, b1 = b0 + per < n16 ? b0 + per : n16;
    uint32_t acc = 0;
    for (int64_t i = b0 + threadIdx.x; i < b1; i += 256 * 8) {
        uint4 v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int64_t k = i + 256 * j;
            v[j] = k < b1 ? __ldcs(w + k) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    acc = __reduce_xor_sync(0xffffffffu, acc);
    if ((threadIdx.x & 31) == 0) atomicXor(out + blockIdx.x, acc);
}

extern "C" int probe_launch(const void *w, int64_t bytes, int blocks, uint32_t *out, int pdl, void *stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)blocks, 1, 1);
    cfg.blockDim = dim3(256, 1, 1);
    cfg.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, stream_kernel, static_cast<const uint4 *>(w), bytes / 16, out) == cudaSuccess ? 0 : 1;
}

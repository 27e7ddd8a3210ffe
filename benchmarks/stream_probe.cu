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

/* The access pattern of a column-tiled weight stream: block (tile, split) reads the rows of its
 * split (row_bytes apart), seg_bytes at tile * seg_bytes in each, DEPTH 16-byte loads in flight
 * per thread. Tiles start tile_bytes apart: seg_bytes for the GPTQ layout [K/8, N], rows * seg_bytes
 * for a tile-major one (row_bytes == seg_bytes: each tile's rows contiguous). */
template <int DEPTH>
__global__ void __launch_bounds__(256) tiled_kernel(const uint4 *__restrict__ w, int64_t rows, int64_t row16,
                                                    int seg16, int64_t tile16, uint32_t *out) {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
    const int tile = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
    const int64_t per = (rows + nsplit - 1) / nsplit;
    const int64_t r0 = split * per, r1 = r0 + per < rows ? r0 + per : rows;
    const int64_t n = (r1 - r0) * seg16; /* 16-byte chunks of this block */
    const uint4 *base = w + (int64_t)tile * tile16;
    uint32_t acc = 0;
    for (int64_t i = threadIdx.x; i < n; i += 256 * DEPTH) {
        uint4 v[DEPTH];
#pragma unroll
        for (int j = 0; j < DEPTH; ++j) {
            const int64_t k = i + 256 * j;
            const int64_t r = r0 + k / seg16, c = k % seg16;
            v[j] = k < n ? __ldcs(base + r * row16 + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int j = 0; j < DEPTH; ++j) acc ^= v[j].x ^ v[j].y ^ v[j].z ^ v[j].w;
    }
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
    acc = __reduce_xor_sync(0xffffffffu, acc);
    if ((threadIdx.x & 31) == 0) atomicXor(out + blockIdx.x * gridDim.y + blockIdx.y, acc);
}

/* tiles x nsplit blocks over a [rows, row_bytes] buffer, tiles * seg_bytes <= row_bytes; cluster:
 * launch the splits of a tile as one thread-block cluster (as the w4a16 split-K does) */
extern "C" int probe_tiled(const void *w, int64_t rows, int64_t row_bytes, int seg_bytes, int64_t tile_bytes, int tiles, int nsplit,
                           int depth, int cluster, uint32_t *out, void *stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)tiles, (unsigned)nsplit, 1);
    cfg.blockDim = dim3(256, 1, 1);
    cfg.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[2];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    attr[1].id = cudaLaunchAttributeClusterDimension;
    attr[1].val.clusterDim.x = 1;
    attr[1].val.clusterDim.y = (unsigned)nsplit;
    attr[1].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = cluster ? 2 : 1;
    const uint4 *wp = static_cast<const uint4 *>(w);
    cudaError_t e = depth == 16 ? cudaLaunchKernelEx(&cfg, tiled_kernel<16>, wp, rows, row_bytes / 16, seg_bytes / 16, tile_bytes / 16, out)
                                : cudaLaunchKernelEx(&cfg, tiled_kernel<8>, wp, rows, row_bytes / 16, seg_bytes / 16, tile_bytes / 16, out);
    return e == cudaSuccess ? 0 : 1;
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

// ops_cuda.cpp - CUDA side of the binding: device guard, current stream, launcher status.
// Compiled only when the extension is built with CUDA (setup.py); ops.cpp does every check.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "../cuda/tops_cuda.h"
#include "ops.h"

namespace torch_ops {
namespace cuda {
namespace {
void *stream_of(const at::Tensor &t) {
    return (void *)at::cuda::getCurrentCUDAStream(t.device().index()).stream();
}
}  // namespace

bool is_capturing(const at::Tensor &t) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    check_status(cudaStreamIsCapturing((cudaStream_t)stream_of(t), &status) == cudaSuccess
                     ? TOPS_OK
                     : TOPS_ERR_CUDA,
                 "cudaStreamIsCapturing");
    return status != cudaStreamCaptureStatusNone;
}

void pack(const at::Tensor &dst, const at::Tensor &src, int64_t outer, int64_t len, int64_t inner,
          int bits, int word_bytes, int order) {
    c10::cuda::CUDAGuard guard(src.device());
    check_status(tops_cuda_pack(dst.data_ptr(), src.data_ptr<uint8_t>(), outer, len, inner, bits,
                                word_bytes, order, stream_of(src)),
                 "pack");
}

void unpack(const at::Tensor &dst, const at::Tensor &src, int64_t outer, int64_t nwords,
            int64_t inner, int bits, int word_bytes, int order) {
    c10::cuda::CUDAGuard guard(src.device());
    check_status(tops_cuda_unpack(dst.data_ptr<uint8_t>(), src.data_ptr(), outer, nwords, inner,
                                  bits, word_bytes, order, stream_of(src)),
                 "unpack");
}

void awq_to_gptq(const at::Tensor &qweight_out, const at::Tensor &qzeros_out,
                 const at::Tensor &qweight, const at::Tensor &qzeros, int64_t K, int64_t N,
                 int zero_format) {
    c10::cuda::CUDAGuard guard(qweight.device());
    void *s = stream_of(qweight);
    check_status(tops_cuda_awq_to_gptq_qweight(qweight_out.data_ptr<int32_t>(),
                                               qweight.data_ptr<int32_t>(), K, N, s),
                 "awq_to_gptq");
    check_status(tops_cuda_awq_to_gptq_qzeros(qzeros_out.data_ptr<int32_t>(),
                                              qzeros.data_ptr<int32_t>(), qzeros.numel(),
                                              zero_format, s),
                 "awq_to_gptq");
}

void gptq_to_awq(const at::Tensor &qweight_out, const at::Tensor &qzeros_out,
                 const at::Tensor &qweight, const at::Tensor &qzeros, int64_t K, int64_t N,
                 int zero_format) {
    c10::cuda::CUDAGuard guard(qweight.device());
    void *s = stream_of(qweight);
    check_status(tops_cuda_gptq_to_awq_qweight(qweight_out.data_ptr<int32_t>(),
                                               qweight.data_ptr<int32_t>(), K, N, s),
                 "gptq_to_awq");
    check_status(tops_cuda_gptq_to_awq_qzeros(qzeros_out.data_ptr<int32_t>(),
                                              qzeros.data_ptr<int32_t>(), qzeros.numel(),
                                              zero_format, s),
                 "gptq_to_awq");
}

void convert_gptq_zeros(const at::Tensor &dst, const at::Tensor &src, int bits, int delta) {
    c10::cuda::CUDAGuard guard(src.device());
    check_status(tops_cuda_convert_gptq_zeros(dst.data_ptr<int32_t>(), src.data_ptr<int32_t>(),
                                              src.size(0), src.size(1), bits, delta,
                                              stream_of(src)),
                 "convert_gptq_zeros");
}

void pack_v2(const at::Tensor &dst, const at::Tensor &src, const at::Tensor &out_of_range) {
    c10::cuda::CUDAGuard guard(src.device());
    int32_t *flag = out_of_range.defined() ? out_of_range.data_ptr<int32_t>() : nullptr;
    check_status(tops_cuda_pack_v2(dst.data_ptr<int16_t>(), src.data_ptr<uint8_t>(), src.size(0),
                                   src.size(1), flag, stream_of(src)),
                 "pack_v2");
}

void unpack_v2(const at::Tensor &dst, const at::Tensor &src) {
    c10::cuda::CUDAGuard guard(src.device());
    check_status(tops_cuda_unpack_v2(dst.data_ptr<uint8_t>(), src.data_ptr<int16_t>(),
                                     dst.size(0), dst.size(1), stream_of(src)),
                 "unpack_v2");
}

void prepack_w4a16(const at::Tensor &dst, const at::Tensor &src, bool inverse) {
    c10::cuda::CUDAGuard guard(src.device());
    const int64_t N = src.size(-1), K = src.numel() / std::max<int64_t>(1, N) * 8;
    check_status(tops_cuda_prepack_w4a16(dst.data_ptr<int32_t>(), src.data_ptr<int32_t>(), K, N,
                                         inverse ? 1 : 0, stream_of(src)),
                 inverse ? "unprepack_w4a16" : "prepack_w4a16");
}

void dequantize(const tops_dequant_args &args, const at::Tensor &like) {
    c10::cuda::CUDAGuard guard(like.device());
    check_status(tops_cuda_dequantize(&args, stream_of(like)), "dequantize");
}

namespace {
// The dense route of w4a16_linear (large batches, fp32 x): the weights dequantised `cols` columns
// at a time into a [K, cols] scratch, each chunk multiplied by cuBLAS (through torch) straight
// into its columns of out (row stride N). With several chunks, a second stream dequantises chunk
// i + 1 (into the other of two scratch buffers) while chunk i multiplies; events order the two
// streams (also inside CUDA graph capture: the side stream forks from and joins the current one).
void dense_linear(const tops_w4a16_args &args, int64_t cols, const at::Tensor &x,
                  const at::Tensor &out, const at::Tensor &bias, const at::Tensor &perm,
                  bool perm_is_permutation) {
    const int64_t K = args.K, N = args.N, chunks = (N + cols - 1) / cols;
    const c10::cuda::CUDAStream main = at::cuda::getCurrentCUDAStream(x.device().index());
    // perm: a permutation moves the weights to the activations they multiply (row perm[k] of each
    // chunk), so x is multiplied as it is; other index vectors (repeats) need x[:, perm], by the
    // fused route's gather kernel
    tops_w4a16_args a = args;
    at::Tensor xp = x;
    if (perm.defined() && perm_is_permutation) {
        a.perm = perm.data_ptr<int32_t>();
    } else if (perm.defined()) {
        xp = at::empty_like(x);
        tops_w4a16_args g = args;
        g.perm = perm.data_ptr<int32_t>();
        check_status(tops_cuda_w4a16_gather_x(&g, xp.data_ptr(), main.stream()), "w4a16_linear");
    }
    const c10::cuda::CUDAStream side =
        chunks > 1 ? at::cuda::getStreamFromPool(false, x.device().index()) : main;
    at::Tensor scratch[2] = {at::empty({K * cols}, x.options()),
                             chunks > 1 ? at::empty({K * cols}, x.options()) : at::Tensor()};
    std::vector<at::cuda::CUDAEvent> dequantised(chunks), multiplied(chunks);
    if (chunks > 1) {  // the side stream starts after everything queued so far on the main one
        at::cuda::CUDAEvent fork;
        fork.record(main);
        fork.block(side);
    }
    for (int64_t i = 0; i < chunks; ++i) {
        const int64_t n0 = i * cols, n = std::min(cols, N - n0);
        at::Tensor w = scratch[i & 1].narrow(0, 0, K * n).view({K, n});
        if (i >= 2) multiplied[i - 2].block(side);  // the GEMM that read this buffer is done
        check_status(tops_cuda_w4a16_dequant_kn(&a, n0, n, w.data_ptr(), side.stream()),
                     "w4a16_linear");
        if (chunks > 1) {
            dequantised[i].record(side);
            dequantised[i].block(main);  // the last of these joins the side stream back
        }
        at::Tensor o = out.narrow(1, n0, n);
        if (bias.defined()) at::addmm_out(o, bias.narrow(0, n0, n), xp, w);
        else at::mm_out(o, xp, w);
        if (chunks > 1 && i + 2 < chunks) multiplied[i].record(main);
    }
}
}  // namespace

void w4a16_linear(const tops_w4a16_args &args, const at::Tensor &x, const at::Tensor &out,
                  const at::Tensor &bias, const at::Tensor &perm, bool perm_is_permutation) {
    c10::cuda::CUDAGuard guard(x.device());
    void *s = stream_of(x);
    if (const int64_t cols = tops_cuda_w4a16_dense_cols(&args)) {
        dense_linear(args, cols, x, out, bias, perm, perm_is_permutation);
        return;
    }
    tops_w4a16_args a = args;
    a.perm = perm.defined() ? perm.data_ptr<int32_t>() : nullptr;
    size_t bytes = tops_cuda_w4a16_workspace_bytes(&a);
    // from the caching allocator: no cudaMalloc on the hot path, and legal inside graph capture
    at::Tensor workspace = at::empty({(int64_t)std::max<size_t>(bytes, 1)},
                                     x.options().dtype(at::kByte));
    check_status(tops_cuda_w4a16_linear(&a, workspace.data_ptr(), bytes, s), "w4a16_linear");
}

}  // namespace cuda
}  // namespace torch_ops

// ops_cuda.cpp - CUDA side of the binding: device guard, current stream, launcher status.
// Compiled only when the extension is built with CUDA (setup.py); ops.cpp does every check.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

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

void dequantize(const tops_dequant_args &args, const at::Tensor &like) {
    c10::cuda::CUDAGuard guard(like.device());
    check_status(tops_cuda_dequantize(&args, stream_of(like)), "dequantize");
}

void w4a16_linear(const tops_w4a16_args &args, const at::Tensor &like) {
    c10::cuda::CUDAGuard guard(like.device());
    size_t bytes = tops_cuda_w4a16_workspace_bytes(&args);
    // from the caching allocator: no cudaMalloc on the hot path, and legal inside graph capture
    at::Tensor workspace = at::empty({(int64_t)std::max<size_t>(bytes, 1)},
                                     like.options().dtype(at::kByte));
    check_status(tops_cuda_w4a16_linear(&args, workspace.data_ptr(), bytes, stream_of(like)),
                 "w4a16_linear");
}

}  // namespace cuda
}  // namespace torch_ops

// ops.h - what the op registry (ops.cpp) needs from the CUDA wrappers (ops_cuda.cpp).
// Each wrapper runs one launcher of ../cuda/tops_cuda.h on tensors already checked, made
// contiguous and allocated by ops.cpp: device guard, current stream, status check.
#pragma once

#include <ATen/ATen.h>

#include "../core/tops.h"

namespace torch_ops {

// Turns a core/launcher status into an error that names the op.
void check_status(int status, const char *op);

#ifdef TOPS_WITH_CUDA
namespace cuda {
// true while the current stream of t's device is capturing a CUDA graph
bool is_capturing(const at::Tensor &t);
void pack(const at::Tensor &dst, const at::Tensor &src, int64_t outer, int64_t len, int64_t inner,
          int bits, int word_bytes, int order);
void unpack(const at::Tensor &dst, const at::Tensor &src, int64_t outer, int64_t nwords,
            int64_t inner, int bits, int word_bytes, int order);
void awq_to_gptq(const at::Tensor &qweight_out, const at::Tensor &qzeros_out,
                 const at::Tensor &qweight, const at::Tensor &qzeros, int64_t K, int64_t N,
                 int zero_format);
void gptq_to_awq(const at::Tensor &qweight_out, const at::Tensor &qzeros_out,
                 const at::Tensor &qweight, const at::Tensor &qzeros, int64_t K, int64_t N,
                 int zero_format);
void convert_gptq_zeros(const at::Tensor &dst, const at::Tensor &src, int bits, int delta);
// out_of_range: a zeroed int32 [1] the kernel sets when a value is > 15, or undefined (no check)
void pack_v2(const at::Tensor &dst, const at::Tensor &src, const at::Tensor &out_of_range);
void unpack_v2(const at::Tensor &dst, const at::Tensor &src);
void prepack_w4a16(const at::Tensor &dst, const at::Tensor &src, bool inverse);
void dequantize(const tops_dequant_args &args, const at::Tensor &like);
// x [M, K] (not gathered: perm, if defined, is int32 [K], 16-byte aligned, and
// perm_is_permutation says it is known to be a permutation), out [M, N], bias [N] or undefined
void w4a16_linear(const tops_w4a16_args &args, const at::Tensor &x, const at::Tensor &out,
                  const at::Tensor &bias, const at::Tensor &perm, bool perm_is_permutation);
}  // namespace cuda
#endif

}  // namespace torch_ops

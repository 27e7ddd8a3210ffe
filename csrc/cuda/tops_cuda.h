/*
 * tops_cuda.h - C-callable launchers of the CUDA kernels (no torch headers, so every .cu file
 * compiles with a bare nvcc). Pointers are device pointers; `stream` is a cudaStream_t passed as
 * void*. Each launcher checks its sizes, launches on `stream`, checks the launch and returns a
 * tops_status (TOPS_ERR_CUDA when a CUDA call failed). None synchronises the host, none allocates:
 * all of them are safe to capture in a CUDA graph.
 *
 * The semantics (layouts, ranges, orders, zero formats) are exactly those of the matching CPU
 * function in ../core/tops.h; the CPU and CUDA results must be bit-identical for the integer ops.
 * Input value ranges (values < 2**bits, g_idx in [0, G)) are validated by the caller.
 */
#ifndef TOPS_CUDA_H
#define TOPS_CUDA_H

#include "../core/tops.h"

#ifdef __cplusplus
extern "C" {
#endif

int tops_cuda_pack(void *dst, const uint8_t *src, int64_t outer, int64_t len, int64_t inner,
                   int bits, int word_bytes, int order, void *stream);
int tops_cuda_unpack(uint8_t *dst, const void *src, int64_t outer, int64_t nwords, int64_t inner,
                     int bits, int word_bytes, int order, void *stream);

int tops_cuda_awq_to_gptq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                                  void *stream);
int tops_cuda_gptq_to_awq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                                  void *stream);
int tops_cuda_awq_to_gptq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords,
                                 int zero_format, void *stream);
int tops_cuda_gptq_to_awq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords,
                                 int zero_format, void *stream);
int tops_cuda_convert_gptq_zeros(int32_t *dst, const int32_t *src, int64_t rows,
                                 int64_t row_words, int bits, int delta, void *stream);

/* out_of_range: NULL, or a device int32 the caller zeroes; set non-zero when an input value is
 * > 15 (checked in the same pass, so validating costs no extra read of the input) */
int tops_cuda_pack_v2(int16_t *dst, const uint8_t *src, int64_t N, int64_t K,
                      int32_t *out_of_range, void *stream);
int tops_cuda_unpack_v2(uint8_t *dst, const int16_t *src, int64_t N, int64_t K, void *stream);

/* tops_prepack_w4a16 (k-interleaved qweight, or its inverse), whole matrix; dst != src */
int tops_cuda_prepack_w4a16(int32_t *dst, const int32_t *src, int64_t K, int64_t N, int inverse,
                            void *stream);

/* whole output, [N, K] */
int tops_cuda_dequantize(const tops_dequant_args *a, void *stream);

/* w4a16 linear on CUDA. Supported: x_dtype F16 with scales F16, BF16 with BF16, F32 with F32
 * (the caller converts scales to the activation dtype); out_dtype == x_dtype; bias (optional) in
 * x_dtype; x contiguous (x_row_stride == K). Any N % 8 == 0 and K % 8 == 0; without g_idx
 * K % group_size == 0 (with g_idx group_size is not read: a row shard of an act-order layer).
 * perm (optional): x is gathered along K into the workspace first, by a kernel of its own.
 * kinterleaved: every kernel reads the k-interleaved words natively (no gather).
 * The workspace (with perm, the gathered x first; then, on sm_90 at M <= 128, fp32 split-K
 * partials) is allocated by the caller with tops_cuda_w4a16_workspace_bytes(a) bytes; its content
 * on entry is arbitrary. A smaller one (without perm: or none; with perm: at least the gathered
 * x) is accepted: K is then split through thread-block clusters instead (slower at M <= 128
 * where K is long). */
size_t tops_cuda_w4a16_workspace_bytes(const tops_w4a16_args *a);
int tops_cuda_w4a16_linear(const tops_w4a16_args *a, void *workspace, size_t workspace_bytes,
                           void *stream);

/* Large batches (and fp32 activations): the caller multiplies x by dequantised weights with a
 * dense GEMM instead. tops_cuda_w4a16_dense_cols returns 0 where the fused launcher above is
 * the faster (or the only) way, else the width of the column chunks to dequantise at a time (a
 * multiple of 256, or N; where there are several, dequantising chunk i + 1 on a second stream
 * while chunk i multiplies hides some of it). tops_cuda_w4a16_dequant_kn writes columns
 * [n0, n0 + n) of the weights, s * (q - z) in the activation dtype, as a row-major [K, n] matrix w
 * (16-byte aligned): row k is the weight of x's k-th activation. With a->perm (16-byte aligned),
 * which must then be a permutation of [0, K) (the caller checks), weight row k is written as row
 * perm[k], so that x @ w == x[:, perm] @ W and x needs no gather. An index vector that is no
 * permutation (repeats) needs x[:, perm] (tops_cuda_w4a16_gather_x: a->perm into dst, [M, K])
 * times the weights dequantised without perm. */
int64_t tops_cuda_w4a16_dense_cols(const tops_w4a16_args *a);
int tops_cuda_w4a16_dequant_kn(const tops_w4a16_args *a, int64_t n0, int64_t n, void *w, void *stream);
int tops_cuda_w4a16_gather_x(const tops_w4a16_args *a, void *dst, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* TOPS_CUDA_H */

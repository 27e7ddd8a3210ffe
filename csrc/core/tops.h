/*
 * tops.h - the C core of torch_ops: bit packing, AWQ <-> GPTQ repacking, quanto pack_v2,
 * dequantization and the CPU w4a16 linear.
 *
 * Plain C11, no torch: raw pointers, int64_t sizes, destination first, every function returns a
 * tops_status (TOPS_OK == 0). Names and layouts follow ../shared/FORMATS.md:
 *   - all packing is least-significant-bits first: value j of a word sits at bits [b*j, b*j+b);
 *     a packed run is one little-endian bit stream cut into words (this is what makes 3-bit work:
 *     32 values fill 3 int32 words, 8 values fill 3 bytes);
 *   - AWQ order: nibble i of an AWQ int32 holds logical column 8c + TOPS_AWQ_ORDER[i];
 *   - GPTQ v1 qzeros store (z - 1) & mask per field, v2 store z.
 *
 * Threading: the bulk functions take a [begin, end) range over their outermost independent axis
 * (documented per function) so the caller (the torch binding, with at::parallel_for) can split
 * the work; a caller that wants it all passes 0 and the count.
 */
#ifndef TOPS_H
#define TOPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status ------------------------------------------------------------------------------ */
typedef enum {
    TOPS_OK = 0,
    TOPS_ERR_ARG = 1,         /* a size, a bit width or an enum value is invalid */
    TOPS_ERR_RANGE = 2,       /* an input value does not fit in `bits` (pack), or g_idx out of range */
    TOPS_ERR_UNSUPPORTED = 3, /* valid but not implemented for this combination */
    TOPS_ERR_CUDA = 4,        /* a CUDA launch or runtime call failed */
    TOPS_ERR_NOMEM = 5        /* a scratch allocation failed */
} tops_status;

const char *tops_status_name(int status);

/* ---- element types of float tensors (activations, scales, outputs) ------------------------ */
typedef enum { TOPS_F32 = 0, TOPS_F16 = 1, TOPS_BF16 = 2 } tops_dtype;

/* ---- orders and formats -------------------------------------------------------------------- */
enum { TOPS_ORDER_SEQUENTIAL = 0, TOPS_ORDER_AWQ = 1 };
enum { TOPS_ZEROS_V1 = 1, TOPS_ZEROS_V2 = 2 };
enum { TOPS_FORMAT_GPTQ = 0, TOPS_FORMAT_AWQ = 1 };

/* nibble i of an AWQ word holds logical column TOPS_AWQ_ORDER[i]; logical column j is in nibble
 * TOPS_AWQ_REVERSE[j] */
#define TOPS_AWQ_ORDER_INIT {0, 2, 4, 6, 1, 3, 5, 7}
#define TOPS_AWQ_REVERSE_INIT {0, 4, 1, 5, 2, 6, 3, 7}

/* ---- generic pack / unpack -----------------------------------------------------------------
 * Values are viewed as a row-major [outer, len, inner] array and packed along the middle axis.
 * word_bytes is 4 (int32 words) or 1 (uint8 words); bits is 1, 2, 3, 4 or 8.
 * Packed: [outer, nwords, inner] words with nwords = len * bits / (8 * word_bytes).
 * len must be a multiple of tops_pack_group(bits, word_bytes): the number of values that fill a
 * whole number of words (8 for 4-bit int32, 32 for 3-bit int32, 8 for 3-bit uint8, 1 for 8-bit uint8).
 * order TOPS_ORDER_AWQ is valid only for bits 4 and word_bytes 4.
 * tops_pack returns TOPS_ERR_RANGE when a value is >= 2**bits (dst content is then unspecified).
 * Work range: [outer_begin, outer_end) of the outer axis. */
int64_t tops_pack_group(int bits, int word_bytes); /* 0 when (bits, word_bytes) is not supported */
int tops_pack(void *dst, const uint8_t *src, int64_t outer, int64_t len, int64_t inner, int bits,
              int word_bytes, int order, int64_t outer_begin, int64_t outer_end);
/* nwords must be a multiple of tops_pack_group(bits, word_bytes) * bits / (8 * word_bytes)
 * (3 for 3-bit, 1 otherwise). dst is [outer, nwords * 8 * word_bytes / bits, inner]. */
int tops_unpack(uint8_t *dst, const void *src, int64_t outer, int64_t nwords, int64_t inner,
                int bits, int word_bytes, int order, int64_t outer_begin, int64_t outer_end);

/* ---- AWQ <-> GPTQ (4-bit) ------------------------------------------------------------------
 * qweight: AWQ [K, N/8] (along N, AWQ order)  <->  GPTQ [K/8, N] (along K, sequential).
 * K % 8 == 0, N % 8 == 0, dst != src (not in place: TOPS_ERR_ARG). Work range: [kb_begin,
 * kb_end) over the K/8 blocks of 8 rows. */
int tops_awq_to_gptq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                             int64_t kb_begin, int64_t kb_end);
int tops_gptq_to_awq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                             int64_t kb_begin, int64_t kb_end);
/* qzeros: AWQ [G, N/8] (AWQ order, z as is)  <->  GPTQ [G, N/8] (sequential; v1 stores (z-1)&15,
 * v2 stores z). Word-wise: nwords = G * N / 8. zero_format is TOPS_ZEROS_V1 or TOPS_ZEROS_V2. */
int tops_awq_to_gptq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords, int zero_format);
int tops_gptq_to_awq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords, int zero_format);

/* GPTQ qzeros v1 <-> v2 for bits 2, 3, 4, 8: every field f of every row becomes (f + delta) & mask
 * with delta = +1 (v1 -> v2) or -1 (v2 -> v1); no carry or borrow between fields. qzeros is
 * [rows, row_words] int32; each row is one bit stream of floor(row_words * 32 / bits) fields
 * (3-bit rows straddle words); leftover padding bits are copied unchanged. */
int tops_convert_gptq_zeros(int32_t *dst, const int32_t *src, int64_t rows, int64_t row_words,
                            int bits, int delta);

/* ---- k-interleaved 4-bit qweight (the w4a16 kernels' prepacked layout) ---------------------
 * GPTQ qweight [K/8, N] -> [K/32, 4, N] int32 (K % 32 == 0): word (b, t, n) holds in nibble
 * i = 2 jj + h + 4 e the value of k = 32 b + 16 jj + 8 h + 2 t + e (jj, h, e in {0, 1}), i.e. the
 * four values of k-slots 2t, 2t+1, 2t+8, 2t+9 of an m16n8k16 fragment row for both k16 steps of
 * the 32-k block, each pair (nibbles j, j + 4) one mask away. Bytewise: byte t of GPTQ word
 * 4 b + r (k 32 b + 8 r + 2 t, +1) goes to nibbles r (low) and r + 4 (high) of word (b, t).
 * inverse = 1 undoes it. Work range: [b_begin, b_end) over the K/32 blocks. */
int tops_prepack_w4a16(int32_t *dst, const int32_t *src, int64_t K, int64_t N, int inverse,
                       int64_t b_begin, int64_t b_end);
/* the real k of nibble e of k-word kw (row kw of the [K/8, N] view) in that layout */
#define TOPS_KIL_REAL_K(kw, e) \
    (32 * ((kw) >> 2) + 16 * (((e) >> 1) & 1) + 8 * ((e) & 1) + 2 * ((kw) & 3) + ((e) >> 2))

/* ---- quanto pack_v2 (seed 001) -------------------------------------------------------------
 * unpacked uint8 [N, K] (values 0..15) -> int16 [N/4, K]; N % 4 == 0, K % 64 == 0.
 * Bit-identical to seed 001: per 32 K-values reorder [0,8,16,24,1,9,17,25, 2,10,...], then
 * interleave 4 rows in 64-wide K chunks, 4 nibbles per int16 (p0 | p1<<4 | p2<<8 | p3<<12).
 * tops_pack_v2 returns TOPS_ERR_RANGE for a value > 15. Work range over the N/4 output rows. */
int tops_pack_v2(int16_t *dst, const uint8_t *src, int64_t N, int64_t K, int64_t r_begin,
                 int64_t r_end);
int tops_unpack_v2(uint8_t *dst, const int16_t *src, int64_t N, int64_t K, int64_t r_begin,
                   int64_t r_end);

/* ---- dequantize ------------------------------------------------------------------------------
 * out[n, k] (nn.Linear orientation [N, K], row-major) = s[g, n] * (q[k, n] - z[g, n]), computed in
 * fp32 and rounded once to out_dtype.
 *   GPTQ: qweight [ceil(K*bits/32), N] along K; qzeros [G, ceil(N*bits/32)] along N (NULL means
 *         symmetric: z = 2**(bits-1)); v1 zeros read back as (field + 1) & mask; g = g_idx[k]
 *         (g_idx NULL: g = k / group_size). bits 2, 3, 4, 8.
 *   AWQ:  qweight [K, N/8] AWQ order; qzeros [G, N/8] AWQ order, z as is; g = k / group_size; bits 4.
 * scales [G, N] in scales_dtype. Work range: [n_begin, n_end) of output rows. g_idx values must
 * be in [0, G): TOPS_ERR_RANGE otherwise. */
typedef struct {
    int format; /* TOPS_FORMAT_GPTQ or TOPS_FORMAT_AWQ */
    int bits;
    int64_t K, N, groups, group_size; /* group_size > 0 (the caller resolves -1 to K) */
    const int32_t *qweight;
    const int32_t *qzeros; /* NULL: symmetric */
    int zero_format;       /* TOPS_ZEROS_V1 / TOPS_ZEROS_V2 (GPTQ only) */
    const void *scales;
    int scales_dtype;
    const int32_t *g_idx; /* NULL: k / group_size */
    void *out;
    int out_dtype;
} tops_dequant_args;
int tops_dequantize(const tops_dequant_args *a, int64_t n_begin, int64_t n_end);

/* ---- w4a16 linear (CPU) ------------------------------------------------------------------------
 * out[m, n] = sum_k x[m, k] * s[g(k), n] * (q[k, n] - z[g(k), n]) + bias[n], accumulated in fp32,
 * rounded once to out_dtype. GPTQ layout, 4-bit: qweight [K/8, N] int32, scales [G, N],
 * qzeros [G, N/8] (v1 or v2; NULL = symmetric, z = 8), g_idx [K] (NULL = k / group_size).
 * x rows are x_row_stride elements apart (elements contiguous within a row); out is [M, N]
 * contiguous. Work range: [n_begin, n_end) of output columns, n_begin and n_end multiples of 8
 * (or n_end == N); each range writes only its own columns, so ranges run in parallel. */
typedef struct {
    int64_t M, K, N, groups, group_size; /* group_size > 0; without g_idx K % group_size == 0 */
    const void *x;
    int x_dtype;
    int64_t x_row_stride;
    const int32_t *qweight;
    const void *scales;
    int scales_dtype;
    const int32_t *qzeros; /* NULL: symmetric */
    int zero_format;
    const int32_t *g_idx; /* NULL: k / group_size */
    const void *bias;     /* NULL: none; else [N] in bias_dtype */
    int bias_dtype;
    void *out;
    int out_dtype;
    /* NULL: none; else [K] indices into a row of x: the product uses x[m, perm[k]] as its k-th
     * activation (act-order weights whose rows were sorted by group, act_order_prepack).
     * CUDA only: the CPU binding gathers x itself. */
    const int32_t *perm;
    /* 1: qweight is k-interleaved (tops_prepack_w4a16), same [K/8, N] words: stored k 8 r + i
     * of word row r = 4 b + t is real k 32 b + 16 ((i >> 1) & 1) + 8 (i & 1) + 2 t + (i >> 2).
     * K % 32 == 0, plain groups (no g_idx); with perm, real k r multiplies x[m, perm[r]]. CUDA
     * only: the CPU binding gathers x in that order and passes the words as GPTQ ones. */
    int kinterleaved;
    /* CUDA only: 1 where qweight, scales, qzeros, g_idx, perm or bias was written by the kernel
     * just before this call's in the stream (a conversion the binding made): the kernels then
     * start after it, not by programmatic dependent launch, under which they read the weights
     * before waiting for the kernel before them */
    int weights_fresh;
} tops_w4a16_args;
int tops_w4a16_linear(const tops_w4a16_args *a, int64_t n_begin, int64_t n_end);
/* AMX tiles for bf16 x (the blocked path's full blocks of 16 rows), used where the CPU and the OS
 * have them: 0 turns them off, 1 back on (where available), -1 restores the detected choice.
 * Returns the choice now in force. */
int tops_w4a16_amx_set(int mode);

/* ---- CPU instruction set used by the vectorised paths -----------------------------------------
 * Detected at run time; tops_cpu_isa_set lowers it (tests run every path the machine has).
 * Returns the level now in force. */
enum { TOPS_ISA_SCALAR = 0, TOPS_ISA_AVX2 = 1, TOPS_ISA_AVX512 = 2 };
int tops_cpu_isa_detected(void);
int tops_cpu_isa(void);
int tops_cpu_isa_set(int level); /* clamps to what the machine supports; -1 restores detected */

#ifdef __cplusplus
}
#endif
#endif /* TOPS_H */

/*
 * dequant.c - packed GPTQ / AWQ weights -> dense out[N, K] (nn.Linear orientation).
 *
 *   out[n, k] = s[g, n] * (q[k, n] - z[g, n]), the difference exact in int, one fp32 multiply,
 *   then one rounding to out_dtype (tops_store).
 *
 * Bit layouts read here (FORMATS.md sections 2 and 3; LSB-first streams, nibble i = bits [4i, 4i+4)):
 *   GPTQ qweight [ceil(K*b/32), N] int32: column n is one stream along K, q[k, n] = stream bits
 *        [b*k, b*k + b), i.e. word (b*k)/32 at bit (b*k)%32; for b = 3 a value may straddle into
 *        the next row's word (values 10, 21, ... of each 32).
 *   GPTQ qzeros [G, ceil(N*b/32)] int32: row g is one stream along N, field n at bits [b*n, b*n+b);
 *        v1 stores (z - 1) & mask and is read back as (field + 1) & mask (the masked add is what
 *        makes a stored 15 read back as z = 0, FORMATS.md "z = 0 in v1"); v2 stores z;
 *        NULL means symmetric, z = 2**(b-1).
 *   AWQ qweight [K, N/8], qzeros [G, N/8]: logical column n is nibble AWQ_REVERSE[n % 8] of word
 *        n / 8; z as is (NULL: 8).
 *   g = g_idx[k] (GPTQ; act-order makes it non-monotonic) or k / group_size.
 *
 * Every g_idx value is checked against [0, groups) before anything is written, so a bad g_idx
 * never reads out of bounds and never leaves a half-written output. Work range: output rows
 * [n_begin, n_end); each row is written only by the range that owns it.
 * Loop order: n outer, k inner, so the output is written sequentially; the qweight column read
 * (stride N words) stays in cache across the 16 neighbouring n that share its cache lines.
 */
#include "common.h"

static const int awq_reverse[8] = TOPS_AWQ_REVERSE_INIT;

/* field of `bits` bits at stream bit position p of the words w[0], w[stride], w[2*stride], ... */
static inline uint32_t stream_field(const int32_t *w, int64_t stride, int64_t p, int bits) {
    const int64_t i = p >> 5;
    const int sh = (int)(p & 31);
    uint32_t v = (uint32_t)w[i * stride] >> sh;
    if (sh + bits > 32) v |= (uint32_t)w[(i + 1) * stride] << (32 - sh);
    return v & ((1u << bits) - 1u);
}

static int check_args(const tops_dequant_args *a, int64_t n_begin, int64_t n_end) {
    if (!a) return TOPS_ERR_ARG;
    if (a->format == TOPS_FORMAT_GPTQ) {
        if (a->bits != 2 && a->bits != 3 && a->bits != 4 && a->bits != 8) return TOPS_ERR_ARG;
        if (a->qzeros && a->zero_format != TOPS_ZEROS_V1 && a->zero_format != TOPS_ZEROS_V2)
            return TOPS_ERR_ARG;
    } else if (a->format == TOPS_FORMAT_AWQ) {
        if (a->bits != 4 || a->N % 8) return TOPS_ERR_ARG;
    } else {
        return TOPS_ERR_ARG;
    }
    if (a->K < 0 || a->N < 0 || a->groups < 0 || a->group_size <= 0) return TOPS_ERR_ARG;
    /* sizes whose element counts (and bit positions, 8 * K) must fit in int64 */
    if (a->K > INT64_MAX / 64 || a->N > INT64_MAX / 64) return TOPS_ERR_ARG;
    if (a->N && (a->K > INT64_MAX / a->N || a->groups > INT64_MAX / a->N)) return TOPS_ERR_ARG;
    if (!tops_dtype_valid(a->scales_dtype) || !tops_dtype_valid(a->out_dtype)) return TOPS_ERR_ARG;
    if (n_begin < 0 || n_end < n_begin || n_end > a->N) return TOPS_ERR_ARG;
    const int use_gidx = a->format == TOPS_FORMAT_GPTQ && a->g_idx;
    /* with k / group_size every group index must exist */
    if (!use_gidx && a->K > 0 && (a->K - 1) / a->group_size >= a->groups) return TOPS_ERR_ARG;
    if (a->K > 0 && a->N > 0 && (!a->qweight || !a->scales || !a->out)) return TOPS_ERR_ARG;
    return TOPS_OK;
}

int tops_dequantize(const tops_dequant_args *a, int64_t n_begin, int64_t n_end) {
    int st = check_args(a, n_begin, n_end);
    if (st != TOPS_OK) return st;
    const int64_t K = a->K, N = a->N, gs = a->group_size;
    const int bits = a->bits;
    const int32_t *gidx = a->format == TOPS_FORMAT_GPTQ ? a->g_idx : NULL;
    if (gidx)
        for (int64_t k = 0; k < K; k++)
            if (gidx[k] < 0 || gidx[k] >= a->groups) return TOPS_ERR_RANGE;
    if (K == 0 || n_end == n_begin) return TOPS_OK;

    const uint32_t mask = (1u << bits) - 1u;
    const int v1 = a->qzeros && a->zero_format == TOPS_ZEROS_V1;
    const int sym_zero = 1 << (bits - 1);
    const int64_t zrow = (N * bits + 31) / 32; /* GPTQ qzeros words per row */
    const int64_t nw = N / 8;                  /* AWQ words per row */

    for (int64_t n = n_begin; n < n_end; n++) {
        int64_t gprev = -1;
        float s = 0.0f;
        int z = 0;
        const int64_t orow = n * K;
        if (a->format == TOPS_FORMAT_GPTQ) {
            const int32_t *col = a->qweight + n; /* column n, words N apart */
            for (int64_t k = 0; k < K; k++) {
                const int64_t g = gidx ? gidx[k] : k / gs;
                if (g != gprev) {
                    gprev = g;
                    s = tops_load(a->scales, a->scales_dtype, g * N + n);
                    if (!a->qzeros) {
                        z = sym_zero;
                    } else {
                        uint32_t f = stream_field(a->qzeros + g * zrow, 1, n * bits, bits);
                        z = (int)(v1 ? (f + 1u) & mask : f);
                    }
                }
                const int q = (int)stream_field(col, N, k * bits, bits);
                tops_store(a->out, a->out_dtype, orow + k, s * (float)(q - z));
            }
        } else {
            const int sh = 4 * awq_reverse[n % 8];
            const int32_t *col = a->qweight + n / 8; /* words N/8 apart */
            for (int64_t k = 0; k < K; k++) {
                const int64_t g = k / gs;
                if (g != gprev) {
                    gprev = g;
                    s = tops_load(a->scales, a->scales_dtype, g * N + n);
                    z = a->qzeros ? (int)(((uint32_t)a->qzeros[g * nw + n / 8] >> sh) & 15u) : 8;
                }
                const int q = (int)(((uint32_t)col[k * nw] >> sh) & 15u);
                tops_store(a->out, a->out_dtype, orow + k, s * (float)(q - z));
            }
        }
    }
    return TOPS_OK;
}

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
 * Loop order: blocks of output rows that share qweight cache lines, K in chunks (see below).
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

    /* Blocks of NB output rows (columns n of qweight) x chunks of KT k, through stack buffers:
     *   1. unpack q for the whole block, reading each qweight row once per block: a cache line
     *      holds 16 GPTQ columns or 128 AWQ columns, so NB is 16 or 128. (Going one n at a time
     *      walks qweight with a power-of-two stride, every line lands in the same few cache sets
     *      and is evicted before the neighbouring n comes back for it: 10x slower.)
     *   2. per row: s * (q - z) in fp32, s and z fetched once per run of one group;
     *   3. per row: one conversion loop per out dtype (no dtype switch per element).
     * KT is a multiple of 32, so chunks start on a word boundary for every bit width. */
    enum { QBUF = 8192 };
    const int64_t NB = a->format == TOPS_FORMAT_AWQ ? 128 : 16;
    const int KT = (int)(QBUF / NB); /* 64 or 512 */
    uint8_t qb[QBUF];
    float fb[512];
    for (int64_t n0 = n_begin; n0 < n_end; n0 += NB) {
        const int nb = (int)(n_end - n0 < NB ? n_end - n0 : NB);
        for (int64_t k0 = 0; k0 < K; k0 += KT) {
            const int kn = (int)(K - k0 < KT ? K - k0 : KT);
            /* 1. qb[c * KT + t] = q[k0 + t, n0 + c] */
            if (a->format == TOPS_FORMAT_AWQ) {
                int wofs[128], shs[128]; /* word and nibble shift of each column of the block */
                for (int c = 0; c < nb; c++) {
                    wofs[c] = (int)((n0 + c) / 8 - n0 / 8);
                    shs[c] = 4 * awq_reverse[(n0 + c) % 8];
                }
                for (int t = 0; t < kn; t++) {
                    const int32_t *row = a->qweight + (k0 + t) * nw + n0 / 8;
                    for (int c = 0; c < nb; c++)
                        qb[c * KT + t] = (uint8_t)(((uint32_t)row[wofs[c]] >> shs[c]) & 15u);
                }
            } else if (bits == 3) {
                for (int t = 0; t < kn; t++)
                    for (int c = 0; c < nb; c++)
                        qb[c * KT + t] = (uint8_t)stream_field(a->qweight + n0 + c, N, (k0 + t) * 3, 3);
            } else { /* whole words of pf = 32 / bits values */
                const int pf = 32 / bits;
                for (int t0 = 0; t0 < kn; t0 += pf) {
                    const int32_t *row = a->qweight + ((k0 + t0) / pf) * N + n0;
                    const int m = kn - t0 < pf ? kn - t0 : pf;
                    for (int c = 0; c < nb; c++) {
                        const uint32_t w = (uint32_t)row[c];
                        for (int j = 0; j < m; j++) qb[c * KT + t0 + j] = (uint8_t)((w >> (bits * j)) & mask);
                    }
                }
            }
            for (int c = 0; c < nb; c++) {
                const int64_t n = n0 + c;
                const uint8_t *q = qb + c * KT;
                const int sh = 4 * awq_reverse[n % 8];
                /* 2. s * (q - z), the difference exact */
                for (int t = 0; t < kn;) {
                    const int64_t k = k0 + t;
                    const int64_t g = gidx ? gidx[k] : k / gs;
                    int end;
                    if (gidx) {
                        end = t + 1;
                        while (end < kn && gidx[k0 + end] == g) end++;
                    } else {
                        const int64_t e = (g + 1) * gs - k0;
                        end = e < kn ? (int)e : kn;
                    }
                    const float s = tops_load(a->scales, a->scales_dtype, g * N + n);
                    int z;
                    if (a->format == TOPS_FORMAT_AWQ) {
                        z = a->qzeros ? (int)(((uint32_t)a->qzeros[g * nw + n / 8] >> sh) & 15u) : 8;
                    } else if (!a->qzeros) {
                        z = sym_zero;
                    } else {
                        const uint32_t f = stream_field(a->qzeros + g * zrow, 1, n * bits, bits);
                        z = (int)(v1 ? (f + 1u) & mask : f);
                    }
                    for (; t < end; t++) fb[t] = s * (float)((int)q[t] - z);
                }
                /* 3. one rounding to out_dtype */
                const int64_t o = n * K + k0;
                switch (a->out_dtype) {
                case TOPS_F16: {
                    uint16_t *out = (uint16_t *)a->out + o;
                    for (int t = 0; t < kn; t++) out[t] = tops_f32_to_f16(fb[t]);
                    break;
                }
                case TOPS_BF16: {
                    uint16_t *out = (uint16_t *)a->out + o;
                    for (int t = 0; t < kn; t++) out[t] = tops_f32_to_bf16(fb[t]);
                    break;
                }
                default: memcpy((float *)a->out + o, fb, (size_t)kn * sizeof(float)); break;
                }
            }
        }
    }
    return TOPS_OK;
}

/*
 * repack.c - lossless AWQ <-> GPTQ reshuffles of 4-bit qweight and qzeros, and GPTQ qzeros
 * v1 <-> v2 conversion.
 *
 * Layouts (FORMATS.md sections 2-4), nibble i = bits [4i, 4i+4) of an int32:
 *   AWQ qweight  [K, N/8]: nibble i of word (k, c) = q[k, 8c + ORDER[i]],  ORDER = {0,2,4,6,1,3,5,7}
 *   GPTQ qweight [K/8, N]: nibble r of word (kb, n) = q[8kb + r, n]
 * So for one 8 x 8 block (rows 8kb..8kb+7, columns 8c..8c+7) the 8 AWQ words a[r] = (8kb + r, c)
 * and the 8 GPTQ words g[n] = (kb, 8c + n) are the same 8 x 8 nibble matrix transposed, with the
 * columns permuted by ORDER:  g[ORDER[i]] = transpose(a)[i].
 *
 * The transpose is three delta-swap stages on 8 words (swap the off-diagonal 4x4, then 2x2, then
 * 1x1 nibble blocks: distances 16, 8, 4 bits between words 4, 2, 1 apart). It is written as a plain
 * loop over the packed column c with the 8 words in scalars, so the compiler vectorises across c
 * (each stage becomes shifts/xors/ands on vectors of columns; the ORDER scatter of the 8 results
 * becomes an 8 x 8 word transpose in registers). GPTQ -> AWQ writes 8 AWQ rows, so its results
 * go through an 8 x 16-word stack tile (512 bytes) before the row stores (see g2a_cols). Each
 * input word is read once and each output word written once; no other intermediate.
 *
 * The hot loops are compiled three times (scalar default, AVX2, AVX-512 via target attributes, the
 * same source inlined into each) and picked at run time with tops_cpu_isa(); all variants compute
 * the same permutation, so they are bit-identical.
 *
 * qzeros keep their shape [G, N/8]; only the nibbles inside each word move (and v1 stores z - 1):
 *   AWQ word nibble i = z[8c + ORDER[i]]  ->  GPTQ word nibble j = z[8c + j]  (v1: (z - 1) & 15).
 * The within-word permutation is a perfect shuffle of the two 4-nibble halves, done with two
 * delta swaps (bytes 1<->2, then nibbles 1<->2 and 5<->6). The +-1 per field is done on the even
 * and odd fields separately, each field having an empty field of headroom above it, so no carry or
 * borrow ever crosses a field (FORMATS.md: the z = 0 trap, 0 - 1 must become 15, not borrow).
 */
#include "common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TOPS_HAVE_X86_VARIANTS 1
#define TOPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TOPS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif
#define TOPS_INLINE static inline __attribute__((always_inline))

/* columns handled per inner loop: a fixed trip count lets gcc vectorise even at -O2 */
#define CTILE 16

/* one delta swap: exchange the bits of a selected by (m << sh) with the bits of b selected by m */
#define DELTA_SWAP(a, b, sh, m)             \
    do {                                    \
        uint32_t t_ = (((a) >> (sh)) ^ (b)) & (m); \
        (b) ^= t_;                          \
        (a) ^= t_ << (sh);                  \
    } while (0)

/* 8 x 8 nibble transpose: afterwards nibble j of x_i = nibble i of the old x_j */
#define TRANSPOSE8(x0, x1, x2, x3, x4, x5, x6, x7)  \
    do {                                             \
        DELTA_SWAP(x0, x4, 16, 0x0000FFFFu);         \
        DELTA_SWAP(x1, x5, 16, 0x0000FFFFu);         \
        DELTA_SWAP(x2, x6, 16, 0x0000FFFFu);         \
        DELTA_SWAP(x3, x7, 16, 0x0000FFFFu);         \
        DELTA_SWAP(x0, x2, 8, 0x00FF00FFu);          \
        DELTA_SWAP(x1, x3, 8, 0x00FF00FFu);          \
        DELTA_SWAP(x4, x6, 8, 0x00FF00FFu);          \
        DELTA_SWAP(x5, x7, 8, 0x00FF00FFu);          \
        DELTA_SWAP(x0, x1, 4, 0x0F0F0F0Fu);          \
        DELTA_SWAP(x2, x3, 4, 0x0F0F0F0Fu);          \
        DELTA_SWAP(x4, x5, 4, 0x0F0F0F0Fu);          \
        DELTA_SWAP(x6, x7, 4, 0x0F0F0F0Fu);          \
    } while (0)

/* AWQ rows 8kb..8kb+7 (s points at row 8kb, rows nw words apart) -> GPTQ row kb (d), columns
 * [c0, c0 + nc) */
TOPS_INLINE void a2g_cols(uint32_t *restrict d, const uint32_t *restrict s, int64_t nw, int64_t c0,
                          int64_t nc) {
    for (int64_t c = c0; c < c0 + nc; c++) {
        uint32_t x0 = s[c], x1 = s[nw + c], x2 = s[2 * nw + c], x3 = s[3 * nw + c];
        uint32_t x4 = s[4 * nw + c], x5 = s[5 * nw + c], x6 = s[6 * nw + c], x7 = s[7 * nw + c];
        TRANSPOSE8(x0, x1, x2, x3, x4, x5, x6, x7);
        uint32_t *o = d + 8 * c; /* o[ORDER[i]] = x_i */
        o[0] = x0;
        o[2] = x1;
        o[4] = x2;
        o[6] = x3;
        o[1] = x4;
        o[3] = x5;
        o[5] = x6;
        o[7] = x7;
    }
}

/* GPTQ row kb (s) -> AWQ rows 8kb..8kb+7 (d, rows nw words apart), columns [c0, c0 + nc),
 * nc <= CTILE. The results go through a small stack tile and are then copied row by row: with 8
 * stores per iteration at unknown distance nw apart the compiler would have to assume they
 * overlap and would not vectorise. */
TOPS_INLINE void g2a_cols(uint32_t *restrict d, const uint32_t *restrict s, int64_t nw, int64_t c0,
                          int64_t nc) {
    uint32_t t[8][CTILE];
    for (int64_t c = 0; c < nc; c++) {
        const uint32_t *g = s + 8 * (c0 + c); /* x_i = g[ORDER[i]] */
        uint32_t x0 = g[0], x1 = g[2], x2 = g[4], x3 = g[6];
        uint32_t x4 = g[1], x5 = g[3], x6 = g[5], x7 = g[7];
        TRANSPOSE8(x0, x1, x2, x3, x4, x5, x6, x7);
        t[0][c] = x0;
        t[1][c] = x1;
        t[2][c] = x2;
        t[3][c] = x3;
        t[4][c] = x4;
        t[5][c] = x5;
        t[6][c] = x6;
        t[7][c] = x7;
    }
    for (int r = 0; r < 8; r++)
        for (int64_t c = 0; c < nc; c++) d[r * nw + c0 + c] = t[r][c];
}

TOPS_INLINE void a2g_body(uint32_t *restrict dst, const uint32_t *restrict src, int64_t N,
                          int64_t kb0, int64_t kb1) {
    const int64_t nw = N / 8;
    const int64_t full = nw - nw % CTILE;
    for (int64_t kb = kb0; kb < kb1; kb++) {
        uint32_t *d = dst + kb * N;
        const uint32_t *s = src + kb * 8 * nw;
        for (int64_t c = 0; c < full; c += CTILE) a2g_cols(d, s, nw, c, CTILE);
        a2g_cols(d, s, nw, full, nw - full);
    }
}

TOPS_INLINE void g2a_body(uint32_t *restrict dst, const uint32_t *restrict src, int64_t N,
                          int64_t kb0, int64_t kb1) {
    const int64_t nw = N / 8;
    const int64_t full = nw - nw % CTILE;
    for (int64_t kb = kb0; kb < kb1; kb++) {
        uint32_t *d = dst + kb * 8 * nw;
        const uint32_t *s = src + kb * N;
        for (int64_t c = 0; c < full; c += CTILE) g2a_cols(d, s, nw, c, CTILE);
        g2a_cols(d, s, nw, full, nw - full);
    }
}

typedef void (*repack_fn)(uint32_t *restrict, const uint32_t *restrict, int64_t, int64_t, int64_t);

static void a2g_scalar(uint32_t *restrict d, const uint32_t *restrict s, int64_t N, int64_t b0,
                       int64_t b1) {
    a2g_body(d, s, N, b0, b1);
}
static void g2a_scalar(uint32_t *restrict d, const uint32_t *restrict s, int64_t N, int64_t b0,
                       int64_t b1) {
    g2a_body(d, s, N, b0, b1);
}
#ifdef TOPS_HAVE_X86_VARIANTS
TOPS_TARGET_AVX2 static void a2g_avx2(uint32_t *restrict d, const uint32_t *restrict s, int64_t N,
                                      int64_t b0, int64_t b1) {
    a2g_body(d, s, N, b0, b1);
}
TOPS_TARGET_AVX2 static void g2a_avx2(uint32_t *restrict d, const uint32_t *restrict s, int64_t N,
                                      int64_t b0, int64_t b1) {
    g2a_body(d, s, N, b0, b1);
}
TOPS_TARGET_AVX512 static void a2g_avx512(uint32_t *restrict d, const uint32_t *restrict s,
                                          int64_t N, int64_t b0, int64_t b1) {
    a2g_body(d, s, N, b0, b1);
}
TOPS_TARGET_AVX512 static void g2a_avx512(uint32_t *restrict d, const uint32_t *restrict s,
                                          int64_t N, int64_t b0, int64_t b1) {
    g2a_body(d, s, N, b0, b1);
}
#endif

static repack_fn pick(repack_fn scalar, repack_fn avx2, repack_fn avx512) {
    (void)avx2;
    (void)avx512;
#ifdef TOPS_HAVE_X86_VARIANTS
    switch (tops_cpu_isa()) {
    case TOPS_ISA_AVX512: return avx512;
    case TOPS_ISA_AVX2: return avx2;
    default: break;
    }
#endif
    return scalar;
}

static int check_qweight(const int32_t *dst, const int32_t *src, int64_t K, int64_t N, int64_t kb0,
                         int64_t kb1) {
    if (K < 0 || N < 0 || K % 8 || N % 8) return TOPS_ERR_ARG;
    if (N && K > INT64_MAX / N) return TOPS_ERR_ARG;
    if (kb0 < 0 || kb1 < kb0 || kb1 > K / 8) return TOPS_ERR_ARG;
    /* (not in place: a block's words are read across its 8 rows while they are written) */
    if (kb1 > kb0 && N > 0 && (!dst || !src || dst == src)) return TOPS_ERR_ARG;
    return TOPS_OK;
}

int tops_awq_to_gptq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                             int64_t kb_begin, int64_t kb_end) {
    int st = check_qweight(dst, src, K, N, kb_begin, kb_end);
    if (st != TOPS_OK || kb_end == kb_begin || N == 0) return st;
#ifdef TOPS_HAVE_X86_VARIANTS
    repack_fn f = pick(a2g_scalar, a2g_avx2, a2g_avx512);
#else
    repack_fn f = pick(a2g_scalar, a2g_scalar, a2g_scalar);
#endif
    f((uint32_t *)dst, (const uint32_t *)src, N, kb_begin, kb_end);
    return TOPS_OK;
}

int tops_gptq_to_awq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                             int64_t kb_begin, int64_t kb_end) {
    int st = check_qweight(dst, src, K, N, kb_begin, kb_end);
    if (st != TOPS_OK || kb_end == kb_begin || N == 0) return st;
#ifdef TOPS_HAVE_X86_VARIANTS
    repack_fn f = pick(g2a_scalar, g2a_avx2, g2a_avx512);
#else
    repack_fn f = pick(g2a_scalar, g2a_scalar, g2a_scalar);
#endif
    f((uint32_t *)dst, (const uint32_t *)src, N, kb_begin, kb_end);
    return TOPS_OK;
}

/* ---- qzeros ------------------------------------------------------------------------------- */

/* AWQ nibble order -> sequential: nibbles [a0 a1 a2 a3 b0 b1 b2 b3] -> [a0 b0 a1 b1 a2 b2 a3 b3] */
static inline uint32_t awq_to_seq_word(uint32_t x) {
    uint32_t t = (x ^ (x >> 8)) & 0x0000FF00u; /* swap bytes 1 and 2 */
    x ^= t ^ (t << 8);
    t = (x ^ (x >> 4)) & 0x00F000F0u; /* swap nibbles 1<->2 and 5<->6 */
    x ^= t ^ (t << 4);
    return x;
}

/* the inverse: the same two involutions in the other order */
static inline uint32_t seq_to_awq_word(uint32_t x) {
    uint32_t t = (x ^ (x >> 4)) & 0x00F000F0u;
    x ^= t ^ (t << 4);
    t = (x ^ (x >> 8)) & 0x0000FF00u;
    x ^= t ^ (t << 8);
    return x;
}

/* Add +1 or -1 to every `bits`-wide field of x (bits 2, 4 or 8: fields never straddle), modulo
 * 2**bits. Even and odd fields are handled apart so that each has an empty field above it: +1
 * carries into that gap and is masked off; for -1 a sentinel bit is set in the gap first so the
 * borrow stops there. */
static inline uint32_t fields_add(uint32_t x, int bits, int delta) {
    uint32_t m, one;
    switch (bits) {
    case 2: m = 0x33333333u; one = 0x11111111u; break;
    case 4: m = 0x0F0F0F0Fu; one = 0x01010101u; break;
    default: m = 0x00FF00FFu; one = 0x00010001u; break;
    }
    uint32_t e = x & m, o = (x >> bits) & m;
    if (delta > 0) {
        e = (e + one) & m;
        o = (o + one) & m;
    } else {
        const uint32_t sentinel = one << bits;
        e = ((e | sentinel) - one) & m;
        o = ((o | sentinel) - one) & m;
    }
    return e | (o << bits);
}

static int check_qzeros(const int32_t *dst, const int32_t *src, int64_t nwords, int zero_format) {
    if (nwords < 0) return TOPS_ERR_ARG;
    if (zero_format != TOPS_ZEROS_V1 && zero_format != TOPS_ZEROS_V2) return TOPS_ERR_ARG;
    if (nwords > 0 && (!dst || !src)) return TOPS_ERR_ARG;
    return TOPS_OK;
}

/* dst may equal src: each word is read before it is written */
int tops_awq_to_gptq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords, int zero_format) {
    int st = check_qzeros(dst, src, nwords, zero_format);
    if (st != TOPS_OK) return st;
    for (int64_t i = 0; i < nwords; i++) {
        uint32_t x = awq_to_seq_word((uint32_t)src[i]);
        if (zero_format == TOPS_ZEROS_V1) x = fields_add(x, 4, -1);
        dst[i] = (int32_t)x;
    }
    return TOPS_OK;
}

int tops_gptq_to_awq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords, int zero_format) {
    int st = check_qzeros(dst, src, nwords, zero_format);
    if (st != TOPS_OK) return st;
    for (int64_t i = 0; i < nwords; i++) {
        uint32_t x = (uint32_t)src[i];
        if (zero_format == TOPS_ZEROS_V1) x = fields_add(x, 4, +1);
        dst[i] = (int32_t)seq_to_awq_word(x);
    }
    return TOPS_OK;
}

/* 3-bit rows: one LSB-first stream of floor(row_words * 32 / 3) fields, some straddling two words;
 * done field by field through a 64-bit window (qzeros are small: G x N*3/32 words). */
static void convert3_row(uint32_t *d, const uint32_t *s, int64_t row_words, int delta) {
    const int64_t nfields = row_words * 32 / 3;
    /* copy first so the padding bits past the last field come through unchanged; fields are then
     * rewritten from s, which still holds the original bits even when d == s because each field's
     * bits are read before they are written and no two fields share bits */
    for (int64_t w = 0; w < row_words; w++) d[w] = s[w];
    for (int64_t f = 0; f < nfields; f++) {
        const int64_t p = 3 * f, w = p >> 5;
        const int sh = (int)(p & 31);
        uint64_t win = s[w];
        if (sh > 29) win |= (uint64_t)s[w + 1] << 32;
        const uint64_t v = (win >> sh) & 7u;
        const uint64_t nv = (v + (uint64_t)(delta > 0 ? 1 : 7)) & 7u; /* -1 == +7 mod 8 */
        uint64_t out = d[w];
        if (sh > 29) out |= (uint64_t)d[w + 1] << 32;
        out = (out & ~((uint64_t)7u << sh)) | (nv << sh);
        d[w] = (uint32_t)out;
        if (sh > 29) d[w + 1] = (uint32_t)(out >> 32);
    }
}

int tops_convert_gptq_zeros(int32_t *dst, const int32_t *src, int64_t rows, int64_t row_words,
                            int bits, int delta) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return TOPS_ERR_ARG;
    if (delta != 1 && delta != -1) return TOPS_ERR_ARG;
    if (rows < 0 || row_words < 0) return TOPS_ERR_ARG;
    if (row_words && rows > INT64_MAX / row_words) return TOPS_ERR_ARG;
    const int64_t n = rows * row_words;
    if (n > 0 && (!dst || !src)) return TOPS_ERR_ARG;
    if (bits == 3) {
        for (int64_t r = 0; r < rows; r++)
            convert3_row((uint32_t *)dst + r * row_words, (const uint32_t *)src + r * row_words,
                         row_words, delta);
        return TOPS_OK;
    }
    /* bits 2, 4, 8 divide 32: fields never straddle words and rows carry no padding */
    for (int64_t i = 0; i < n; i++) dst[i] = (int32_t)fields_add((uint32_t)src[i], bits, delta);
    return TOPS_OK;
}

/* ---- k-interleaved qweight (see tops.h): bytes of GPTQ words 4b..4b+3 transposed to nibbles ---- */
int tops_prepack_w4a16(int32_t *dst, const int32_t *src, int64_t K, int64_t N, int inverse,
                       int64_t b_begin, int64_t b_end) {
    if (K < 0 || N < 0 || K % 32 != 0 || b_begin < 0 || b_end > K / 32 || b_begin > b_end) return TOPS_ERR_ARG;
    if (b_end > b_begin && N > 0 && (!dst || !src || dst == src)) return TOPS_ERR_ARG;
    for (int64_t b = b_begin; b < b_end; b++) {
        const uint32_t *s = (const uint32_t *)src + 4 * b * N;
        uint32_t *d = (uint32_t *)dst + 4 * b * N;
        for (int64_t n = 0; n < N; n++) {
            uint32_t w[4] = {s[n], s[N + n], s[2 * N + n], s[3 * N + n]}, o[4] = {0, 0, 0, 0};
            for (int t = 0; t < 4; t++)
                for (int r = 0; r < 4; r++) {
                    if (!inverse) { /* byte t of GPTQ word r -> nibbles r, r + 4 of word t */
                        const uint32_t by = (w[r] >> (8 * t)) & 0xFFu;
                        o[t] |= (by & 15u) << (4 * r) | (by >> 4) << (4 * (r + 4));
                    } else { /* nibbles r, r + 4 of word t -> byte t of GPTQ word r */
                        const uint32_t lo = (w[t] >> (4 * r)) & 15u, hi = (w[t] >> (4 * (r + 4))) & 15u;
                        o[r] |= (lo | hi << 4) << (8 * t);
                    }
                }
            for (int r = 0; r < 4; r++) d[r * N + n] = o[r];
        }
    }
    return TOPS_OK;
}

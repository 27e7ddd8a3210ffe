/*
 * pack_v2.c - quanto / AutoAWQ "gemv_fast" pack_v2 and its inverse (seed 001, FORMATS.md section 5).
 *
 * unpacked uint8 U [N, K] (values 0..15)  <->  int16 out [N/4, K];  N % 4 == 0, K % 64 == 0.
 *
 * The seed builds it with reshapes and permutes:
 *   1+2. per 32 K-values, (4,4,2) -> swap the 4s -> swap the last two axes: permuted position
 *        p = 8x + 4e + y (x, y < 4, e < 2) takes U position 8y + 2x + e, i.e. per 8
 *        [0, 8, 16, 24, 1, 9, 17, 25];  call the result P [N, K];
 *   3.   P viewed (N/4, 4, K/64, 64) -> permute to (N/4, K/64, 4, 64) -> *reshape* (not permute)
 *        to (N/4, K/64, 64, 4): int16 (r, 64c + s) takes the 4 consecutive values 4s + j,
 *        j = 0..3, of the 4 x 64 block, i.e. P[4r + (4s+j)/64, 64c + (4s+j)%64];
 *   4.   nibble j of that int16 is value j: p0 | p1<<4 | p2<<8 | p3<<12.
 * Composing the three index maps, with s = 16i + 8h + l (i < 4, h < 2, l < 8):
 *
 *     out[r, 64c + 16i + 8h + l]  nibble j  =  U[4r + i, 64c + 32h + 8j + l]
 *
 * So each 64-wide chunk of one input row i fills 16 consecutive int16 of the output row, and each
 * of those gathers 4 bytes 8 apart: two plain loops over l with fixed trip counts, which the
 * compiler vectorises (zero-extend, shift, or). No intermediate tensor, each byte read once.
 * The test transcribes the seed's reshapes literally and compares bit for bit.
 *
 * Hot loops are compiled as scalar default, AVX2 and AVX-512 variants (target attributes, same
 * source inlined), chosen at run time by tops_cpu_isa(); all bit-identical.
 */
#include "common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TOPS_HAVE_X86_VARIANTS 1
#define TOPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TOPS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#endif
#define TOPS_INLINE static inline __attribute__((always_inline))

/* rows [r0, r1) of the output; returns the OR of every input byte (for the range check) */
TOPS_INLINE unsigned pack_body(uint16_t *restrict dst, const uint8_t *restrict src, int64_t K,
                               int64_t r0, int64_t r1) {
    unsigned seen = 0;
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = dst + r * K;
        for (int64_t i = 0; i < 4; i++) {
            const uint8_t *u = src + (4 * r + i) * K;
            uint8_t acc = 0;
            for (int64_t c = 0; c < K; c += 64) {
                const uint8_t *uc = u + c;
                uint16_t *oc = o + c + 16 * i;
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ub = uc + 32 * h;
                    uint16_t *ob = oc + 8 * h;
                    for (int l = 0; l < 8; l++) {
                        const uint8_t v0 = ub[l], v1 = ub[l + 8], v2 = ub[l + 16], v3 = ub[l + 24];
                        acc |= (uint8_t)(v0 | v1 | v2 | v3);
                        ob[l] = (uint16_t)(v0 | (v1 << 4) | (v2 << 8) | (v3 << 12));
                    }
                }
            }
            seen |= acc;
        }
    }
    return seen;
}

TOPS_INLINE void unpack_body(uint8_t *restrict dst, const uint16_t *restrict src, int64_t K,
                             int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *o = src + r * K;
        for (int64_t i = 0; i < 4; i++) {
            uint8_t *u = dst + (4 * r + i) * K;
            for (int64_t c = 0; c < K; c += 64) {
                uint8_t *uc = u + c;
                const uint16_t *oc = o + c + 16 * i;
                for (int h = 0; h < 2; h++) {
                    uint8_t *ub = uc + 32 * h;
                    const uint16_t *ob = oc + 8 * h;
                    for (int l = 0; l < 8; l++) {
                        const uint16_t w = ob[l];
                        ub[l] = (uint8_t)(w & 15u);
                        ub[l + 8] = (uint8_t)((w >> 4) & 15u);
                        ub[l + 16] = (uint8_t)((w >> 8) & 15u);
                        ub[l + 24] = (uint8_t)(w >> 12);
                    }
                }
            }
        }
    }
}

typedef unsigned (*pack_fn)(uint16_t *restrict, const uint8_t *restrict, int64_t, int64_t, int64_t);
typedef void (*unpack_fn)(uint8_t *restrict, const uint16_t *restrict, int64_t, int64_t, int64_t);

static unsigned pack_scalar(uint16_t *restrict d, const uint8_t *restrict s, int64_t K, int64_t r0,
                            int64_t r1) {
    return pack_body(d, s, K, r0, r1);
}
static void unpack_scalar(uint8_t *restrict d, const uint16_t *restrict s, int64_t K, int64_t r0,
                          int64_t r1) {
    unpack_body(d, s, K, r0, r1);
}
#ifdef TOPS_HAVE_X86_VARIANTS
TOPS_TARGET_AVX2 static unsigned pack_avx2(uint16_t *restrict d, const uint8_t *restrict s,
                                           int64_t K, int64_t r0, int64_t r1) {
    return pack_body(d, s, K, r0, r1);
}
TOPS_TARGET_AVX2 static void unpack_avx2(uint8_t *restrict d, const uint16_t *restrict s,
                                         int64_t K, int64_t r0, int64_t r1) {
    unpack_body(d, s, K, r0, r1);
}
TOPS_TARGET_AVX512 static unsigned pack_avx512(uint16_t *restrict d, const uint8_t *restrict s,
                                               int64_t K, int64_t r0, int64_t r1) {
    return pack_body(d, s, K, r0, r1);
}
TOPS_TARGET_AVX512 static void unpack_avx512(uint8_t *restrict d, const uint16_t *restrict s,
                                             int64_t K, int64_t r0, int64_t r1) {
    unpack_body(d, s, K, r0, r1);
}
#endif

static int check_args(const void *dst, const void *src, int64_t N, int64_t K, int64_t r0,
                      int64_t r1) {
    if (N < 0 || K < 0 || N % 4 || K % 64) return TOPS_ERR_ARG;
    if (K && N > INT64_MAX / K) return TOPS_ERR_ARG;
    if (r0 < 0 || r1 < r0 || r1 > N / 4) return TOPS_ERR_ARG;
    if (r1 > r0 && K > 0 && (!dst || !src)) return TOPS_ERR_ARG;
    return TOPS_OK;
}

int tops_pack_v2(int16_t *dst, const uint8_t *src, int64_t N, int64_t K, int64_t r_begin,
                 int64_t r_end) {
    int st = check_args(dst, src, N, K, r_begin, r_end);
    if (st != TOPS_OK || r_end == r_begin || K == 0) return st;
    pack_fn f = pack_scalar;
#ifdef TOPS_HAVE_X86_VARIANTS
    switch (tops_cpu_isa()) {
    case TOPS_ISA_AVX512: f = pack_avx512; break;
    case TOPS_ISA_AVX2: f = pack_avx2; break;
    default: break;
    }
#endif
    /* the range check rides along in the same pass; dst is unspecified on TOPS_ERR_RANGE */
    unsigned seen = f((uint16_t *)dst, src, K, r_begin, r_end);
    return seen > 15u ? TOPS_ERR_RANGE : TOPS_OK;
}

int tops_unpack_v2(uint8_t *dst, const int16_t *src, int64_t N, int64_t K, int64_t r_begin,
                   int64_t r_end) {
    int st = check_args(dst, src, N, K, r_begin, r_end);
    if (st != TOPS_OK || r_end == r_begin || K == 0) return st;
    unpack_fn f = unpack_scalar;
#ifdef TOPS_HAVE_X86_VARIANTS
    switch (tops_cpu_isa()) {
    case TOPS_ISA_AVX512: f = unpack_avx512; break;
    case TOPS_ISA_AVX2: f = unpack_avx2; break;
    default: break;
    }
#endif
    f(dst, (const uint16_t *)src, K, r_begin, r_end);
    return TOPS_OK;
}

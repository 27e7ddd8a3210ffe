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
 * of those gathers 4 bytes 8 apart. One pass, no intermediate tensor, each byte read once and
 * each int16 written once. The test transcribes the seed's reshapes literally and compares bit
 * for bit.
 *
 * Variants (picked at run time by tops_cpu_isa(), all bit-identical, all run by the tests): a
 * portable one (64-bit SWAR), and AVX2 / AVX-512 ones (target attributes, 256-bit intrinsics).
 */
#include "common.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define TOPS_HAVE_X86_VARIANTS 1
#define TOPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define TOPS_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl")))
#endif
#define TOPS_INLINE static inline __attribute__((always_inline))

/* ---- portable variant ------------------------------------------------------------------------
 * On little-endian machines 8 bytes are handled at once in a uint64 (SWAR): values are < 16, so
 * a | b << 4 never carries between bytes; the two bytes of each int16 are then interleaved by
 * spreading 4 bytes into 4 16-bit slots. This does not depend on the auto-vectoriser, whose
 * results on the byte/int16 mix varied a lot between -O2 and -O3. Big-endian: plain loops. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TOPS_V2_SWAR 1
static inline uint64_t ld64(const void *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static inline void st64(void *p, uint64_t v) { memcpy(p, &v, 8); }
/* bytes 0..3 of x -> 16-bit slots 0..3 (high bytes zero) */
static inline uint64_t spread4(uint64_t x) {
    x &= 0xFFFFFFFFu;
    x = (x | (x << 16)) & 0x0000FFFF0000FFFFull;
    return (x | (x << 8)) & 0x00FF00FF00FF00FFull;
}
/* low bytes of the 4 16-bit slots of x -> bytes 0..3 */
static inline uint64_t compact4(uint64_t x) {
    x &= 0x00FF00FF00FF00FFull;
    x = (x | (x >> 8)) & 0x0000FFFF0000FFFFull;
    return (x | (x >> 16)) & 0xFFFFFFFFu;
}
#endif

/* rows [r0, r1) of the output; returns nonzero when some input value is > 15 */
static unsigned pack_scalar(uint16_t *restrict dst, const uint8_t *restrict src, int64_t K,
                            int64_t r0, int64_t r1) {
    uint64_t seen = 0;
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = dst + r * K;
        for (int64_t i = 0; i < 4; i++) {
            const uint8_t *u = src + (4 * r + i) * K;
            for (int64_t c = 0; c < K; c += 64) {
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ub = u + c + 32 * h; /* U[.., 64c + 32h + 8j + l] */
                    uint16_t *ob = o + c + 16 * i + 8 * h;  /* out[.., 64c + 16i + 8h + l] */
#ifdef TOPS_V2_SWAR
                    const uint64_t a = ld64(ub), b = ld64(ub + 8), e = ld64(ub + 16), f = ld64(ub + 24);
                    seen |= a | b | e | f;
                    const uint64_t lo = a | (b << 4), hi = e | (f << 4); /* bytes: j=0,1 and j=2,3 */
                    st64(ob, spread4(lo) | (spread4(hi) << 8));
                    st64(ob + 4, spread4(lo >> 32) | (spread4(hi >> 32) << 8));
#else
                    for (int l = 0; l < 8; l++) {
                        const unsigned v0 = ub[l], v1 = ub[l + 8], v2 = ub[l + 16], v3 = ub[l + 24];
                        seen |= v0 | v1 | v2 | v3;
                        ob[l] = (uint16_t)(v0 | (v1 << 4) | (v2 << 8) | (v3 << 12));
                    }
#endif
                }
            }
        }
    }
    return (seen & 0xF0F0F0F0F0F0F0F0ull) != 0;
}

static void unpack_scalar(uint8_t *restrict dst, const uint16_t *restrict src, int64_t K,
                          int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *o = src + r * K;
        for (int64_t i = 0; i < 4; i++) {
            uint8_t *u = dst + (4 * r + i) * K;
            for (int64_t c = 0; c < K; c += 64) {
                for (int h = 0; h < 2; h++) {
                    uint8_t *ub = u + c + 32 * h;
                    const uint16_t *ob = o + c + 16 * i + 8 * h;
#ifdef TOPS_V2_SWAR
                    const uint64_t w0 = ld64(ob), w1 = ld64(ob + 4);
                    const uint64_t lo = compact4(w0) | (compact4(w1) << 32);
                    const uint64_t hi = compact4(w0 >> 8) | (compact4(w1 >> 8) << 32);
                    st64(ub, lo & 0x0F0F0F0F0F0F0F0Full);
                    st64(ub + 8, (lo >> 4) & 0x0F0F0F0F0F0F0F0Full);
                    st64(ub + 16, hi & 0x0F0F0F0F0F0F0F0Full);
                    st64(ub + 24, (hi >> 4) & 0x0F0F0F0F0F0F0F0Full);
#else
                    for (int l = 0; l < 8; l++) {
                        const unsigned w = ob[l];
                        ub[l] = (uint8_t)(w & 15u);
                        ub[l + 8] = (uint8_t)((w >> 4) & 15u);
                        ub[l + 16] = (uint8_t)((w >> 8) & 15u);
                        ub[l + 24] = (uint8_t)(w >> 12);
                    }
#endif
                }
            }
        }
    }
}

/* ---- x86 variants ------------------------------------------------------------------------------
 * One 64-byte chunk of an input row <-> 16 int16 (32 bytes) per step, in 256-bit registers:
 *   X = U[64c .. +31] (h = 0), Y = U[64c+32 .. +63] (h = 1); per 128-bit lane, x | (x >> 8 bytes)
 *   << 4 puts a | b<<4 in the low 8 bytes: lane 0 -> lo_h (nibbles j = 0, 1), lane 1 -> hi_h
 *   (j = 2, 3); unpacklo_epi64(X', Y') + permute4x64(0,2,1,3) -> [lo0, hi0 | lo1, hi1]; a
 *   per-lane byte shuffle interleaves lo/hi into int16. Unpack runs the same steps backwards.
 * The AVX-512 variant compiles the same 256-bit code with AVX-512 enabled: the kernel is bound by
 * memory bandwidth, and wider registers would not move more bytes. */
#ifdef TOPS_HAVE_X86_VARIANTS
#include <immintrin.h>

TOPS_TARGET_AVX2 TOPS_INLINE unsigned pack_x86(uint16_t *restrict dst, const uint8_t *restrict src,
                                               int64_t K, int64_t r0, int64_t r1) {
    const __m256i il = _mm256_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15, 0, 8,
                                        1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
    __m256i seen = _mm256_setzero_si256();
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *o = dst + r * K;
        for (int64_t i = 0; i < 4; i++) {
            const uint8_t *u = src + (4 * r + i) * K;
            for (int64_t c = 0; c < K; c += 64) {
                const __m256i x = _mm256_loadu_si256((const __m256i *)(u + c));
                const __m256i y = _mm256_loadu_si256((const __m256i *)(u + c + 32));
                seen = _mm256_or_si256(seen, _mm256_or_si256(x, y));
                const __m256i tx = _mm256_or_si256(x, _mm256_slli_epi16(_mm256_srli_si256(x, 8), 4));
                const __m256i ty = _mm256_or_si256(y, _mm256_slli_epi16(_mm256_srli_si256(y, 8), 4));
                const __m256i w = _mm256_permute4x64_epi64(_mm256_unpacklo_epi64(tx, ty), 0xD8);
                _mm256_storeu_si256((__m256i *)(o + c + 16 * i), _mm256_shuffle_epi8(w, il));
            }
        }
    }
    return !_mm256_testz_si256(seen, _mm256_set1_epi8((char)0xF0));
}

TOPS_TARGET_AVX2 TOPS_INLINE void unpack_x86(uint8_t *restrict dst, const uint16_t *restrict src,
                                             int64_t K, int64_t r0, int64_t r1) {
    const __m256i dl = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2,
                                        4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *o = src + r * K;
        for (int64_t i = 0; i < 4; i++) {
            uint8_t *u = dst + (4 * r + i) * K;
            for (int64_t c = 0; c < K; c += 64) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(o + c + 16 * i));
                /* [lo0, hi0 | lo1, hi1] -> [lo0, lo1 | hi0, hi1] */
                const __m256i v = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p, dl), 0xD8);
                const __m256i lo = _mm256_and_si256(v, m4);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                _mm256_storeu_si256((__m256i *)(u + c), _mm256_unpacklo_epi64(lo, hi));
                _mm256_storeu_si256((__m256i *)(u + c + 32), _mm256_unpackhi_epi64(lo, hi));
            }
        }
    }
}

TOPS_TARGET_AVX2 static unsigned pack_avx2(uint16_t *restrict d, const uint8_t *restrict s,
                                           int64_t K, int64_t r0, int64_t r1) {
    return pack_x86(d, s, K, r0, r1);
}
TOPS_TARGET_AVX2 static void unpack_avx2(uint8_t *restrict d, const uint16_t *restrict s,
                                         int64_t K, int64_t r0, int64_t r1) {
    unpack_x86(d, s, K, r0, r1);
}
TOPS_TARGET_AVX512 static unsigned pack_avx512(uint16_t *restrict d, const uint8_t *restrict s,
                                               int64_t K, int64_t r0, int64_t r1) {
    return pack_x86(d, s, K, r0, r1);
}
TOPS_TARGET_AVX512 static void unpack_avx512(uint8_t *restrict d, const uint16_t *restrict s,
                                             int64_t K, int64_t r0, int64_t r1) {
    unpack_x86(d, s, K, r0, r1);
}
#endif

typedef unsigned (*pack_fn)(uint16_t *restrict, const uint8_t *restrict, int64_t, int64_t, int64_t);
typedef void (*unpack_fn)(uint8_t *restrict, const uint16_t *restrict, int64_t, int64_t, int64_t);

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
    return f((uint16_t *)dst, src, K, r_begin, r_end) ? TOPS_ERR_RANGE : TOPS_OK;
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

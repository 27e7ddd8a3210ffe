/*
 * pack.c - generic bit packing and unpacking (tops_pack_group, tops_pack, tops_unpack).
 *
 * Layout (FORMATS.md section 1). Values form a row-major [outer, len, inner] uint8 array and are
 * packed along the middle axis into [outer, nwords, inner] words (int32 or uint8). Along that axis
 * each packed column (fixed outer and inner index) is one least-significant-bit-first stream cut
 * into words: value t sits at stream bits [bits*t, bits*t + bits), i.e. word (bits*t) / W at bit
 * (bits*t) % W with W = 32 or 8, and a value may straddle two words (3-bit: value 10 of an int32
 * group occupies bits 30..32, value 21 bits 63..65; in bytes value 2 bits 6..8, value 5 bits 15..17).
 *
 * A "group" is the number of values that fill a whole number of words: W / gcd(bits, W) values in
 * bits / gcd(bits, W) words (32 values in 3 int32 words for 3-bit, 8 values in 3 bytes, otherwise
 * one word). Groups are independent, so the code works a group at a time with the group's bits held
 * in up to three uint32 pieces of the stream.
 *
 * AWQ order (4-bit int32 only): value j of a group of 8 goes to nibble TOPS_AWQ_REVERSE[j]
 * (equivalently nibble i holds value TOPS_AWQ_ORDER[i]): 0..7 -> 0x75316420.
 *
 * inner > 1 ("along rows") is handled by working on a tile of up to TILE inner columns at once,
 * so the loads of one value row are contiguous and the accumulators stay on the stack.
 * 4-bit int32 with inner == 1 (AWQ qweight, qzeros) has a 64-bit SWAR path, 8 values per step.
 */
#include "common.h"

#define TILE 64 /* inner columns per step: 3 * 64 uint32 accumulators = 768 bytes of stack */

static const int awq_reverse[8] = TOPS_AWQ_REVERSE_INIT;

static int64_t gcd64(int64_t a, int64_t b) {
    while (b) {
        int64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

int64_t tops_pack_group(int bits, int word_bytes) {
    if (word_bytes != 1 && word_bytes != 4) return 0;
    if (bits != 1 && bits != 2 && bits != 3 && bits != 4 && bits != 8) return 0;
    int64_t w = 8 * (int64_t)word_bytes;
    return w / gcd64(bits, w);
}

/* words per group: 3 for 3-bit, 1 otherwise */
static int64_t group_words(int bits, int word_bytes) {
    return bits / gcd64(bits, 8 * (int64_t)word_bytes);
}

/* a * b * c without overflow (all >= 0); -1 when it would not fit in int64_t */
static int64_t mul3(int64_t a, int64_t b, int64_t c) {
    if (a < 0 || b < 0 || c < 0) return -1;
    if (a && b > INT64_MAX / a) return -1;
    int64_t ab = a * b;
    if (ab && c > INT64_MAX / ab) return -1;
    return ab * c;
}

/* Common argument checks of pack and unpack. */
static int check_common(const void *dst, const void *src, int64_t outer, int64_t len, int64_t inner,
                        int bits, int word_bytes, int order, int64_t ob, int64_t oe) {
    if (tops_pack_group(bits, word_bytes) == 0) return TOPS_ERR_ARG;
    if (order != TOPS_ORDER_SEQUENTIAL && order != TOPS_ORDER_AWQ) return TOPS_ERR_ARG;
    if (order == TOPS_ORDER_AWQ && (bits != 4 || word_bytes != 4)) return TOPS_ERR_ARG;
    if (outer < 0 || len < 0 || inner < 0) return TOPS_ERR_ARG;
    if (ob < 0 || oe < ob || oe > outer) return TOPS_ERR_ARG;
    if (mul3(outer, len, inner) < 0) return TOPS_ERR_ARG;
    /* the packed side is never larger than the unpacked one, so len * inner * outer bounds both */
    if (oe > ob && len > 0 && inner > 0 && (!dst || !src)) return TOPS_ERR_ARG;
    return TOPS_OK;
}

/* stream bit position of value j within its group */
static inline int value_pos(int j, int bits, int order) {
    return order == TOPS_ORDER_AWQ ? 4 * awq_reverse[j] : bits * j;
}

#define TOPS_INLINE static inline __attribute__((always_inline))

/* ---- general path: one group x a tile of ni inner columns --------------------------------------
 * The tile helpers are always inlined and called with ni == TILE (a constant trip count the
 * compiler vectorises even at -O2) or with the ragged tail. */
TOPS_INLINE unsigned pack_tile(uint32_t acc[3][TILE], const uint8_t *in, int64_t inner, int64_t ni,
                               int64_t group, int64_t gw, int bits, int order) {
    unsigned seen = 0; /* OR of every value: one test for the range check */
    for (int64_t w = 0; w < gw; w++)
        for (int64_t i = 0; i < ni; i++) acc[w][i] = 0;
    for (int64_t j = 0; j < group; j++) {
        const int p = value_pos((int)j, bits, order);
        const int w = p >> 5, s = p & 31;
        const uint8_t *row = in + j * inner;
        if (s + bits <= 32) {
            for (int64_t i = 0; i < ni; i++) {
                seen |= row[i];
                acc[w][i] |= (uint32_t)row[i] << s;
            }
        } else { /* straddles into the next piece (3-bit int32 only) */
            for (int64_t i = 0; i < ni; i++) {
                seen |= row[i];
                acc[w][i] |= (uint32_t)row[i] << s;
                acc[w + 1][i] |= (uint32_t)row[i] >> (32 - s);
            }
        }
    }
    return seen;
}

TOPS_INLINE void store_tile(void *dst, int64_t base, int64_t inner, int64_t ni, int64_t gw,
                            int word_bytes, uint32_t acc[3][TILE]) {
    if (word_bytes == 4) {
        uint32_t *d = (uint32_t *)dst + base;
        for (int64_t w = 0; w < gw; w++)
            for (int64_t i = 0; i < ni; i++) d[w * inner + i] = acc[w][i];
    } else { /* bytes: the group's <= 24 bits are all in piece 0 */
        uint8_t *d = (uint8_t *)dst + base;
        for (int64_t w = 0; w < gw; w++)
            for (int64_t i = 0; i < ni; i++) d[w * inner + i] = (uint8_t)(acc[0][i] >> (8 * w));
    }
}

TOPS_INLINE void load_tile(uint32_t acc[3][TILE], const void *src, int64_t base, int64_t inner,
                           int64_t ni, int64_t gw, int word_bytes) {
    if (word_bytes == 4) {
        const uint32_t *s = (const uint32_t *)src + base;
        for (int64_t w = 0; w < gw; w++)
            for (int64_t i = 0; i < ni; i++) acc[w][i] = s[w * inner + i];
    } else {
        const uint8_t *s = (const uint8_t *)src + base;
        for (int64_t i = 0; i < ni; i++) acc[0][i] = 0;
        for (int64_t w = 0; w < gw; w++)
            for (int64_t i = 0; i < ni; i++) acc[0][i] |= (uint32_t)s[w * inner + i] << (8 * w);
    }
}

TOPS_INLINE void unpack_tile(uint8_t *out, int64_t inner, int64_t ni, int64_t group, int bits,
                             int order, uint32_t acc[3][TILE]) {
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t j = 0; j < group; j++) {
        const int p = value_pos((int)j, bits, order);
        const int w = p >> 5, s = p & 31;
        uint8_t *row = out + j * inner;
        if (s + bits <= 32) {
            for (int64_t i = 0; i < ni; i++) row[i] = (uint8_t)((acc[w][i] >> s) & mask);
        } else {
            for (int64_t i = 0; i < ni; i++)
                row[i] = (uint8_t)(((acc[w][i] >> s) | (acc[w + 1][i] << (32 - s))) & mask);
        }
    }
}

/* ---- 4-bit int32 words, inner == 1 (AWQ qweight / qzeros along N): 8 values at a time in a
 * uint64 (little-endian only). Byte i of x | x >> 4 is v_i | v_(i+1) << 4 (values < 16), so
 * three fold steps compress 8 bytes to 8 nibbles; unpacking spreads them back. The AWQ order is
 * then a within-word perfect shuffle of the two nibble halves (two delta swaps). */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define TOPS_PACK_SWAR 1
static inline uint32_t seq_to_awq(uint32_t x) { /* [a0 b0 a1 b1 ..] -> [a0 a1 a2 a3 b0 ..] */
    uint32_t t = (x ^ (x >> 4)) & 0x00F000F0u;
    x ^= t ^ (t << 4);
    t = (x ^ (x >> 8)) & 0x0000FF00u;
    return x ^ t ^ (t << 8);
}
static inline uint32_t awq_to_seq(uint32_t x) {
    uint32_t t = (x ^ (x >> 8)) & 0x0000FF00u;
    x ^= t ^ (t << 8);
    t = (x ^ (x >> 4)) & 0x00F000F0u;
    return x ^ t ^ (t << 4);
}
static int pack4_rows(uint32_t *d, const uint8_t *s, int64_t n8, int awq) {
    uint64_t seen = 0;
    for (int64_t g = 0; g < n8; g++) {
        uint64_t x;
        memcpy(&x, s + 8 * g, 8);
        seen |= x;
        x = (x | (x >> 4)) & 0x00FF00FF00FF00FFull;
        x = (x | (x >> 8)) & 0x0000FFFF0000FFFFull;
        x = (x | (x >> 16)) & 0xFFFFFFFFull;
        d[g] = awq ? seq_to_awq((uint32_t)x) : (uint32_t)x;
    }
    return (seen & 0xF0F0F0F0F0F0F0F0ull) ? TOPS_ERR_RANGE : TOPS_OK;
}
static void unpack4_rows(uint8_t *d, const uint32_t *s, int64_t n8, int awq) {
    for (int64_t g = 0; g < n8; g++) {
        uint64_t x = awq ? awq_to_seq(s[g]) : s[g];
        x = (x | (x << 16)) & 0x0000FFFF0000FFFFull;
        x = (x | (x << 8)) & 0x00FF00FF00FF00FFull;
        x = (x | (x << 4)) & 0x0F0F0F0F0F0F0F0Full;
        memcpy(d + 8 * g, &x, 8);
    }
}
#endif

int tops_pack(void *dst, const uint8_t *src, int64_t outer, int64_t len, int64_t inner, int bits,
              int word_bytes, int order, int64_t outer_begin, int64_t outer_end) {
    int st = check_common(dst, src, outer, len, inner, bits, word_bytes, order, outer_begin,
                          outer_end);
    if (st != TOPS_OK) return st;
    const int64_t group = tops_pack_group(bits, word_bytes);
    if (len % group) return TOPS_ERR_ARG;
    const int64_t gw = group_words(bits, word_bytes);
    const int64_t ngroups = len / group;
    const int64_t nwords = ngroups * gw;
    if (outer_end == outer_begin || len == 0 || inner == 0) return TOPS_OK; /* dst may be NULL */
#ifdef TOPS_PACK_SWAR
    if (bits == 4 && word_bytes == 4 && inner == 1) /* rows are contiguous: one flat run */
        return pack4_rows((uint32_t *)dst + outer_begin * nwords, src + outer_begin * len,
                          (outer_end - outer_begin) * ngroups, order == TOPS_ORDER_AWQ);
#endif
    for (int64_t o = outer_begin; o < outer_end; o++) {
        for (int64_t g = 0; g < ngroups; g++) {
            const uint8_t *in = src + (o * len + g * group) * inner;
            const int64_t out_base = (o * nwords + g * gw) * inner;
            for (int64_t i0 = 0; i0 < inner; i0 += TILE) {
                uint32_t acc[3][TILE];
                unsigned seen;
                if (inner - i0 >= TILE) {
                    seen = pack_tile(acc, in + i0, inner, TILE, group, gw, bits, order);
                    store_tile(dst, out_base + i0, inner, TILE, gw, word_bytes, acc);
                } else {
                    seen = pack_tile(acc, in + i0, inner, inner - i0, group, gw, bits, order);
                    store_tile(dst, out_base + i0, inner, inner - i0, gw, word_bytes, acc);
                }
                if (seen >> bits) return TOPS_ERR_RANGE;
            }
        }
    }
    return TOPS_OK;
}

int tops_unpack(uint8_t *dst, const void *src, int64_t outer, int64_t nwords, int64_t inner,
                int bits, int word_bytes, int order, int64_t outer_begin, int64_t outer_end) {
    if (tops_pack_group(bits, word_bytes) == 0) return TOPS_ERR_ARG;
    const int64_t group = tops_pack_group(bits, word_bytes);
    const int64_t gw = group_words(bits, word_bytes);
    if (nwords < 0 || nwords % gw) return TOPS_ERR_ARG;
    const int64_t ngroups = nwords / gw;
    if (ngroups > INT64_MAX / group) return TOPS_ERR_ARG;
    const int64_t len = ngroups * group;
    int st = check_common(dst, src, outer, len, inner, bits, word_bytes, order, outer_begin,
                          outer_end);
    if (st != TOPS_OK) return st;
    if (outer_end == outer_begin || len == 0 || inner == 0) return TOPS_OK; /* dst may be NULL */
#ifdef TOPS_PACK_SWAR
    if (bits == 4 && word_bytes == 4 && inner == 1) {
        unpack4_rows(dst + outer_begin * len, (const uint32_t *)src + outer_begin * nwords,
                     (outer_end - outer_begin) * ngroups, order == TOPS_ORDER_AWQ);
        return TOPS_OK;
    }
#endif
    for (int64_t o = outer_begin; o < outer_end; o++) {
        for (int64_t g = 0; g < ngroups; g++) {
            uint8_t *out = dst + (o * len + g * group) * inner;
            const int64_t in_base = (o * nwords + g * gw) * inner;
            for (int64_t i0 = 0; i0 < inner; i0 += TILE) {
                uint32_t acc[3][TILE];
                if (inner - i0 >= TILE) {
                    load_tile(acc, src, in_base + i0, inner, TILE, gw, word_bytes);
                    unpack_tile(out + i0, inner, TILE, group, bits, order, acc);
                } else {
                    load_tile(acc, src, in_base + i0, inner, inner - i0, gw, word_bytes);
                    unpack_tile(out + i0, inner, inner - i0, group, bits, order, acc);
                }
            }
        }
    }
    return TOPS_OK;
}

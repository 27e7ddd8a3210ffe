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
    uint32_t *d32 = (uint32_t *)dst;
    uint8_t *d8 = (uint8_t *)dst;

    for (int64_t o = outer_begin; o < outer_end; o++) {
        for (int64_t g = 0; g < ngroups; g++) {
            const uint8_t *in = src + (o * len + g * group) * inner;
            const int64_t out_base = (o * nwords + g * gw) * inner;
            for (int64_t i0 = 0; i0 < inner; i0 += TILE) {
                const int64_t ni = inner - i0 < TILE ? inner - i0 : TILE;
                uint32_t acc[3][TILE];
                unsigned seen = 0; /* OR of every value: one test for the range check */
                memset(acc, 0, sizeof acc);
                for (int64_t j = 0; j < group; j++) {
                    const int p = value_pos((int)j, bits, order);
                    const int w = p >> 5, s = p & 31;
                    const uint8_t *row = in + j * inner + i0;
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
                if (seen >> bits) return TOPS_ERR_RANGE;
                if (word_bytes == 4) {
                    for (int64_t w = 0; w < gw; w++)
                        for (int64_t i = 0; i < ni; i++) d32[out_base + w * inner + i0 + i] = acc[w][i];
                } else { /* bytes: the group's <= 24 bits are all in piece 0 */
                    for (int64_t w = 0; w < gw; w++)
                        for (int64_t i = 0; i < ni; i++)
                            d8[out_base + w * inner + i0 + i] = (uint8_t)(acc[0][i] >> (8 * w));
                }
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
    const uint32_t *s32 = (const uint32_t *)src;
    const uint8_t *s8 = (const uint8_t *)src;
    const uint32_t mask = (1u << bits) - 1u;

    for (int64_t o = outer_begin; o < outer_end; o++) {
        for (int64_t g = 0; g < ngroups; g++) {
            uint8_t *out = dst + (o * len + g * group) * inner;
            const int64_t in_base = (o * nwords + g * gw) * inner;
            for (int64_t i0 = 0; i0 < inner; i0 += TILE) {
                const int64_t ni = inner - i0 < TILE ? inner - i0 : TILE;
                uint32_t acc[3][TILE];
                if (word_bytes == 4) {
                    for (int64_t w = 0; w < gw; w++)
                        for (int64_t i = 0; i < ni; i++) acc[w][i] = s32[in_base + w * inner + i0 + i];
                } else {
                    for (int64_t i = 0; i < ni; i++) acc[0][i] = 0;
                    for (int64_t w = 0; w < gw; w++)
                        for (int64_t i = 0; i < ni; i++)
                            acc[0][i] |= (uint32_t)s8[in_base + w * inner + i0 + i] << (8 * w);
                }
                for (int64_t j = 0; j < group; j++) {
                    const int p = value_pos((int)j, bits, order);
                    const int w = p >> 5, s = p & 31;
                    uint8_t *row = out + j * inner + i0;
                    if (s + bits <= 32) {
                        for (int64_t i = 0; i < ni; i++) row[i] = (uint8_t)((acc[w][i] >> s) & mask);
                    } else {
                        for (int64_t i = 0; i < ni; i++)
                            row[i] = (uint8_t)(((acc[w][i] >> s) | (acc[w + 1][i] << (32 - s))) & mask);
                    }
                }
            }
        }
    }
    return TOPS_OK;
}

/*
 * common.h - internal helpers of the C core (not part of the public API): float16 / bfloat16
 * conversions done on the bit patterns, so the core needs no compiler half type, and loads and
 * stores of the three float element types.
 */
#ifndef TOPS_COMMON_H
#define TOPS_COMMON_H

#include <string.h>

#include "tops.h"

static inline uint32_t tops_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float tops_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* IEEE binary16 -> binary32, exact (subnormals, inf and NaN included). */
static inline float tops_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return tops_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        /* zero or subnormal: man * 2**-24, exact in fp32 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    return tops_bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

/* binary32 -> binary16, round to nearest even; overflow gives inf, NaN stays NaN. */
static inline uint16_t tops_f32_to_f16(float f) {
    uint32_t u = tops_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* inf or NaN */
        return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (abs < 0x38800000u) {                                     /* below 2**-14: subnormal */
        if (abs < 0x33000000u) return sign;                      /* under half the least subnormal */
        uint32_t e = abs >> 23;
        uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24 */
        uint32_t r = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (r & 1u))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = abs - 0x38000000u; /* rebias 127 -> 15 */
    uint32_t lsb = (r >> 13) & 1u;
    r += 0xfffu + lsb;
    return (uint16_t)(sign | (r >> 13));
}

static inline float tops_bf16_to_f32(uint16_t b) { return tops_bits_f32((uint32_t)b << 16); }

/* binary32 -> bfloat16, round to nearest even; NaN stays NaN. */
static inline uint16_t tops_f32_to_bf16(float f) {
    uint32_t u = tops_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* element i of a float tensor of type dtype, as fp32 */
static inline float tops_load(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case TOPS_F16: return tops_f16_to_f32(((const uint16_t *)p)[i]);
    case TOPS_BF16: return tops_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* store fp32 v as element i of a float tensor of type dtype, rounding once */
static inline void tops_store(void *p, int dtype, int64_t i, float v) {
    switch (dtype) {
    case TOPS_F16: ((uint16_t *)p)[i] = tops_f32_to_f16(v); break;
    case TOPS_BF16: ((uint16_t *)p)[i] = tops_f32_to_bf16(v); break;
    default: ((float *)p)[i] = v; break;
    }
}

static inline int tops_dtype_valid(int dtype) {
    return dtype == TOPS_F32 || dtype == TOPS_F16 || dtype == TOPS_BF16;
}

#endif /* TOPS_COMMON_H */

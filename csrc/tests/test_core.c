/*
 * test_core.c - unit tests of pack.c, repack.c, pack_v2.c and dequant.c.
 *
 * Every fast path is compared with a naive reference written here from FORMATS.md / the seeds
 * (bit-by-bit stream packing, a literal transcription of seed 001's reshapes and permutes, a
 * per-element dequantization), on odd shapes, at every CPU ISA level the machine has, with guard
 * bytes around each destination to prove exactly the output is written.
 *
 *   bin/test_core            run the tests
 *   bin/test_core --bench    time the repack and pack_v2 kernels on 8192 x 8192 (build with SAN=
 *                            for meaningful numbers)
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "tops.h"
#include "testutil.h"

static const int ORDER[8] = TOPS_AWQ_ORDER_INIT;
static const int REVERSE[8] = TOPS_AWQ_REVERSE_INIT;

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return p;
}

/* ---- guarded buffers: GUARD bytes of 0xA5 on both sides, body pre-filled with `fill` ------- */
#define GUARD 64
typedef struct {
    uint8_t *base;
    void *p;
    size_t n;
} gbuf;

static gbuf gb_new(size_t n, int fill) {
    gbuf g;
    g.base = xmalloc(n + 2 * GUARD);
    memset(g.base, 0xA5, n + 2 * GUARD);
    memset(g.base + GUARD, fill, n);
    g.p = g.base + GUARD;
    g.n = n;
    return g;
}
static int gb_guards_ok(const gbuf *g) {
    for (size_t i = 0; i < GUARD; i++)
        if (g->base[i] != 0xA5 || g->base[GUARD + g->n + i] != 0xA5) return 0;
    return 1;
}
static void gb_free(gbuf *g) { free(g->base); }

static void fill_random(void *p, size_t n) {
    uint8_t *b = p;
    for (size_t i = 0; i < n; i++) b[i] = (uint8_t)tu_rand();
}

/* ---- naive bit-stream reference (FORMATS.md 1): one bit at a time ------------------------- */
static int get_bit(const void *w, int wb, int64_t word, int bit) {
    if (wb == 4) return (int)((((const uint32_t *)w)[word] >> bit) & 1u);
    return (((const uint8_t *)w)[word] >> bit) & 1;
}
static void set_bit(void *w, int wb, int64_t word, int bit, int v) {
    if (wb == 4) {
        uint32_t *p = (uint32_t *)w + word;
        *p = (*p & ~(1u << bit)) | ((uint32_t)v << bit);
    } else {
        uint8_t *p = (uint8_t *)w + word;
        *p = (uint8_t)((*p & ~(1u << bit)) | (v << bit));
    }
}
/* stream bit position of value t: groups of G values fill whole words, AWQ permutes slots */
static int64_t ref_pos(int64_t t, int bits, int wb, int order) {
    if (order == TOPS_ORDER_AWQ) return (t / 8) * 32 + 4 * REVERSE[t % 8];
    (void)wb;
    return t * bits;
}
/* [outer, len, inner] values -> [outer, nwords, inner] words, nwords given (any len works) */
static void ref_pack(void *dst, const uint8_t *src, int64_t outer, int64_t len, int64_t inner,
                     int64_t nwords, int bits, int wb, int order) {
    memset(dst, 0, (size_t)(outer * nwords * inner * wb));
    const int W = 8 * wb;
    for (int64_t o = 0; o < outer; o++)
        for (int64_t t = 0; t < len; t++)
            for (int64_t i = 0; i < inner; i++) {
                const int v = src[(o * len + t) * inner + i];
                const int64_t p = ref_pos(t, bits, wb, order);
                for (int b = 0; b < bits; b++) {
                    const int64_t sb = p + b;
                    set_bit(dst, wb, (o * nwords + sb / W) * inner + i, (int)(sb % W), (v >> b) & 1);
                }
            }
}
static void ref_unpack(uint8_t *dst, const void *src, int64_t outer, int64_t len, int64_t inner,
                       int64_t nwords, int bits, int wb, int order) {
    const int W = 8 * wb;
    for (int64_t o = 0; o < outer; o++)
        for (int64_t t = 0; t < len; t++)
            for (int64_t i = 0; i < inner; i++) {
                const int64_t p = ref_pos(t, bits, wb, order);
                int v = 0;
                for (int b = 0; b < bits; b++) {
                    const int64_t sb = p + b;
                    v |= get_bit(src, wb, (o * nwords + sb / W) * inner + i, (int)(sb % W)) << b;
                }
                dst[(o * len + t) * inner + i] = (uint8_t)v;
            }
}

static int isa_levels(void) { return tops_cpu_isa_detected() + 1; }

/* ============================================================================================ */
static void test_pack_group(void) {
    CHECK(tops_pack_group(4, 4) == 8);
    CHECK(tops_pack_group(3, 4) == 32);
    CHECK(tops_pack_group(3, 1) == 8);
    CHECK(tops_pack_group(8, 1) == 1);
    CHECK(tops_pack_group(8, 4) == 4);
    CHECK(tops_pack_group(2, 1) == 4);
    CHECK(tops_pack_group(1, 4) == 32);
    CHECK(tops_pack_group(1, 1) == 8);
    CHECK(tops_pack_group(5, 4) == 0);
    CHECK(tops_pack_group(4, 2) == 0);
    CHECK(tops_pack_group(0, 4) == 0);
    CHECK(tops_pack_group(16, 4) == 0);
}

static void test_pack_literals(void) {
    uint8_t v[8], back[8];
    uint32_t w;
    for (int i = 0; i < 8; i++) v[i] = (uint8_t)i;
    CHECK(tops_pack(&w, v, 1, 8, 1, 4, 4, TOPS_ORDER_AWQ, 0, 1) == TOPS_OK);
    CHECK_EQ_U32(w, 0x75316420u);
    CHECK(tops_unpack(back, &w, 1, 1, 1, 4, 4, TOPS_ORDER_AWQ, 0, 1) == TOPS_OK);
    CHECK(memcmp(back, v, 8) == 0);
    CHECK(tops_pack(&w, v, 1, 8, 1, 4, 4, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK_EQ_U32(w, 0x76543210u);
    for (int i = 0; i < 8; i++) v[i] = (uint8_t)(i + 1);
    CHECK(tops_pack(&w, v, 1, 8, 1, 4, 4, TOPS_ORDER_AWQ, 0, 1) == TOPS_OK);
    CHECK_EQ_U32(w, 0x86427531u);
    CHECK((int32_t)w < 0);
    CHECK(tops_unpack(back, &w, 1, 1, 1, 4, 4, TOPS_ORDER_AWQ, 0, 1) == TOPS_OK);
    CHECK(memcmp(back, v, 8) == 0);
    CHECK(tops_pack(&w, v, 1, 8, 1, 4, 4, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK_EQ_U32(w, 0x87654321u);
    CHECK(tops_unpack(back, &w, 1, 1, 1, 4, 4, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK(memcmp(back, v, 8) == 0);

    /* seed 002: 2-bit in uint8 */
    const uint8_t s2[8] = {1, 0, 3, 2, 3, 3, 3, 3};
    uint8_t b2[2];
    CHECK(tops_pack(b2, s2, 1, 8, 1, 2, 1, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK(b2[0] == 177 && b2[1] == 255);
    const uint8_t p2[2] = {177, 255};
    CHECK(tops_unpack(back, p2, 1, 2, 1, 2, 1, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK(memcmp(back, s2, 8) == 0);

    /* 3-bit int32 stream: value 10 sits at bits 30..32, value 21 at bits 63..65 */
    uint8_t v3[32];
    uint32_t w3[3];
    uint8_t u3[32];
    memset(v3, 0, sizeof v3);
    v3[10] = 7;
    v3[21] = 5;
    CHECK(tops_pack(w3, v3, 1, 32, 1, 3, 4, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK_EQ_U32(w3[0], 0xC0000000u);
    CHECK_EQ_U32(w3[1], 0x80000001u);
    CHECK_EQ_U32(w3[2], 0x00000002u);
    CHECK(tops_unpack(u3, w3, 1, 3, 1, 3, 4, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK(memcmp(u3, v3, 32) == 0);
    /* all values: compare with S = w0 | w1<<32 | w2<<64, q_i = (S >> 3i) & 7 */
    for (int i = 0; i < 32; i++) v3[i] = (uint8_t)((i * 5 + 3) & 7);
    CHECK(tops_pack(w3, v3, 1, 32, 1, 3, 4, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    for (int i = 0; i < 32; i++) {
        const int p = 3 * i;
        int q = 0;
        for (int b = 0; b < 3; b++) q |= (int)((w3[(p + b) / 32] >> ((p + b) % 32)) & 1u) << b;
        CHECK(q == v3[i]);
    }
    /* 3-bit in bytes: value 2 at bits 6..8, value 5 at bits 15..17 */
    uint8_t v8[8] = {0, 0, 7, 0, 0, 5, 0, 0}, b3[3], u8[8];
    CHECK(tops_pack(b3, v8, 1, 8, 1, 3, 1, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK(b3[0] == 0xC0 && b3[1] == 0x81 && b3[2] == 0x02);
    CHECK(tops_unpack(u8, b3, 1, 3, 1, 3, 1, TOPS_ORDER_SEQUENTIAL, 0, 1) == TOPS_OK);
    CHECK(memcmp(u8, v8, 8) == 0);
}

static void test_pack_roundtrip(void) {
    const int bitss[] = {1, 2, 3, 4, 8};
    const int64_t outers[] = {1, 3};
    const int64_t inners[] = {1, 5, 67, 130};
    const int64_t mults[] = {1, 3};
    for (int bi = 0; bi < 5; bi++)
        for (int wb = 1; wb <= 4; wb += 3)
            for (int order = 0; order < 2; order++) {
                const int bits = bitss[bi];
                if (order == TOPS_ORDER_AWQ && (bits != 4 || wb != 4)) continue;
                const int64_t G = tops_pack_group(bits, wb);
                const int64_t gwords = G * bits / (8 * wb);
                for (int oi = 0; oi < 2; oi++)
                    for (int ii = 0; ii < 4; ii++)
                        for (int mi = 0; mi < 2; mi++) {
                            const int64_t outer = outers[oi], inner = inners[ii];
                            const int64_t len = G * mults[mi], nwords = mults[mi] * gwords;
                            const size_t nv = (size_t)(outer * len * inner);
                            const size_t np = (size_t)(outer * nwords * inner * wb);
                            uint8_t *v = xmalloc(nv), *expect = xmalloc(np);
                            for (size_t i = 0; i < nv; i++)
                                v[i] = (uint8_t)(tu_rand() & ((1u << bits) - 1u));
                            ref_pack(expect, v, outer, len, inner, nwords, bits, wb, order);

                            gbuf d = gb_new(np, 0xA5);
                            CHECK(tops_pack(d.p, v, outer, len, inner, bits, wb, order, 0, outer) == TOPS_OK);
                            CHECK(memcmp(d.p, expect, np) == 0);
                            CHECK(gb_guards_ok(&d));

                            /* the same via split ranges; a range writes only its outer slices */
                            gbuf e = gb_new(np, 0x5A);
                            CHECK(tops_pack(e.p, v, outer, len, inner, bits, wb, order, outer - 1, outer) == TOPS_OK);
                            const size_t slice = (size_t)(nwords * inner * wb);
                            int untouched = 1;
                            for (size_t i = 0; i < np - slice; i++) untouched &= ((uint8_t *)e.p)[i] == 0x5A;
                            CHECK(untouched);
                            CHECK(tops_pack(e.p, v, outer, len, inner, bits, wb, order, 0, outer - 1) == TOPS_OK);
                            CHECK(memcmp(e.p, expect, np) == 0);
                            CHECK(gb_guards_ok(&e));

                            gbuf u = gb_new(nv, 0xEE);
                            CHECK(tops_unpack(u.p, expect, outer, nwords, inner, bits, wb, order, 0, outer) == TOPS_OK);
                            CHECK(memcmp(u.p, v, nv) == 0);
                            CHECK(gb_guards_ok(&u));
                            /* reference unpack agrees too (checks the reference against itself) */
                            uint8_t *r = xmalloc(nv);
                            ref_unpack(r, expect, outer, len, inner, nwords, bits, wb, order);
                            CHECK(memcmp(r, v, nv) == 0);
                            free(r);

                            /* out-of-range value -> TOPS_ERR_RANGE */
                            if (bits < 8) {
                                v[nv / 2] = (uint8_t)(1u << bits);
                                CHECK(tops_pack(d.p, v, outer, len, inner, bits, wb, order, 0, outer) == TOPS_ERR_RANGE);
                                v[nv / 2] = 255;
                                CHECK(tops_pack(d.p, v, outer, len, inner, bits, wb, order, 0, outer) == TOPS_ERR_RANGE);
                                CHECK(gb_guards_ok(&d));
                            }
                            gb_free(&d);
                            gb_free(&e);
                            gb_free(&u);
                            free(v);
                            free(expect);
                        }
            }
}

static void test_pack_errors(void) {
    uint8_t v[64] = {0};
    uint32_t w[16];
    uint8_t u[64];
    CHECK(tops_pack(w, v, 1, 8, 1, 5, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 8, 1, 0, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 8, 1, 16, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 8, 1, 4, 2, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 7, 1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);  /* len % 8 */
    CHECK(tops_pack(w, v, 1, 16, 1, 3, 4, 0, 0, 1) == TOPS_ERR_ARG); /* 3-bit int32 needs 32 */
    CHECK(tops_pack(w, v, 1, 4, 1, 3, 1, 0, 0, 1) == TOPS_ERR_ARG);  /* 3-bit bytes need 8 */
    CHECK(tops_pack(w, v, 1, 8, 1, 4, 4, 2, 0, 1) == TOPS_ERR_ARG);  /* order */
    CHECK(tops_pack(w, v, 1, 16, 1, 2, 4, TOPS_ORDER_AWQ, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 8, 1, 4, 1, TOPS_ORDER_AWQ, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, -1, 8, 1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 8, -1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, 1, 8, 1, 4, 4, 0, 0, 2) == TOPS_ERR_ARG);  /* end > outer */
    CHECK(tops_pack(w, v, 2, 8, 1, 4, 4, 0, 1, 0) == TOPS_ERR_ARG);  /* begin > end */
    CHECK(tops_pack(w, v, 2, 8, 1, 4, 4, 0, -1, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(NULL, v, 1, 8, 1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, NULL, 1, 8, 1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack(w, v, INT64_MAX / 2, 8, 8, 4, 4, 0, 0, 0) == TOPS_ERR_ARG); /* size overflow */
    CHECK(tops_pack(w, v, 1, 8, 1, 4, 4, 0, 0, 0) == TOPS_OK);                  /* empty range */
    CHECK(tops_unpack(u, w, 1, 1, 1, 5, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack(u, w, 1, 2, 1, 3, 4, 0, 0, 1) == TOPS_ERR_ARG); /* 3-bit needs 3 words */
    CHECK(tops_unpack(u, w, 1, 1, 1, 2, 4, TOPS_ORDER_AWQ, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack(u, w, 1, -1, 1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack(u, w, 1, 1, 1, 4, 4, 0, 0, 2) == TOPS_ERR_ARG);
    CHECK(tops_unpack(NULL, w, 1, 1, 1, 4, 4, 0, 0, 1) == TOPS_ERR_ARG);
}

/* ---- qzeros ---------------------------------------------------------------------------------- */
static uint32_t ref_seq_from_awq(uint32_t x) { /* nibble j = nibble REVERSE[j] */
    uint32_t r = 0;
    for (int j = 0; j < 8; j++) r |= ((x >> (4 * REVERSE[j])) & 15u) << (4 * j);
    return r;
}

static void test_qzeros(void) {
    const uint8_t z[8] = {0, 5, 3, 9, 15, 1, 8, 2};
    uint32_t awq = 0;
    for (int j = 0; j < 8; j++) awq |= (uint32_t)z[j] << (4 * REVERSE[j]);
    int32_t src = (int32_t)awq, out, back;
    CHECK(tops_awq_to_gptq_qzeros(&out, &src, 1, TOPS_ZEROS_V1) == TOPS_OK);
    CHECK_EQ_U32(out, 0x170E824Fu);
    CHECK(tops_gptq_to_awq_qzeros(&back, &out, 1, TOPS_ZEROS_V1) == TOPS_OK);
    CHECK_EQ_U32(back, awq);
    CHECK(tops_awq_to_gptq_qzeros(&out, &src, 1, TOPS_ZEROS_V2) == TOPS_OK);
    CHECK_EQ_U32(out, 0x281F9350u);
    CHECK(tops_gptq_to_awq_qzeros(&back, &out, 1, TOPS_ZEROS_V2) == TOPS_OK);
    CHECK_EQ_U32(back, awq);
    /* the v1 word reads back exactly: (field + 1) & 15 */
    for (int j = 0; j < 8; j++) CHECK(((((uint32_t)0x170E824Fu >> (4 * j)) + 1u) & 15u) == z[j]);

    /* random words against a nibble-by-nibble reference, both formats, in place too */
    enum { NW = 1000 };
    int32_t *a = xmalloc(NW * 4), *g = xmalloc(NW * 4), *r = xmalloc(NW * 4), *ip = xmalloc(NW * 4);
    fill_random(a, NW * 4);
    for (int fmt = TOPS_ZEROS_V1; fmt <= TOPS_ZEROS_V2; fmt++) {
        CHECK(tops_awq_to_gptq_qzeros(g, a, NW, fmt) == TOPS_OK);
        int ok = 1;
        for (int i = 0; i < NW; i++) {
            uint32_t s = ref_seq_from_awq((uint32_t)a[i]), e = 0;
            for (int j = 0; j < 8; j++) {
                uint32_t f = (s >> (4 * j)) & 15u;
                if (fmt == TOPS_ZEROS_V1) f = (f + 15u) & 15u;
                e |= f << (4 * j);
            }
            ok &= (uint32_t)g[i] == e;
        }
        CHECK(ok);
        CHECK(tops_gptq_to_awq_qzeros(r, g, NW, fmt) == TOPS_OK);
        CHECK(memcmp(r, a, NW * 4) == 0);
        memcpy(ip, a, NW * 4);
        CHECK(tops_awq_to_gptq_qzeros(ip, ip, NW, fmt) == TOPS_OK);
        CHECK(memcmp(ip, g, NW * 4) == 0);
        CHECK(tops_gptq_to_awq_qzeros(ip, ip, NW, fmt) == TOPS_OK);
        CHECK(memcmp(ip, a, NW * 4) == 0);
    }
    free(a);
    free(g);
    free(r);
    free(ip);
    CHECK(tops_awq_to_gptq_qzeros(&out, &src, 1, 0) == TOPS_ERR_ARG);
    CHECK(tops_awq_to_gptq_qzeros(&out, &src, 1, 3) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qzeros(&out, &src, -1, TOPS_ZEROS_V1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qzeros(NULL, &src, 1, TOPS_ZEROS_V1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qzeros(NULL, NULL, 0, TOPS_ZEROS_V1) == TOPS_OK);
}

static void ref_convert(uint32_t *d, const uint32_t *s, int64_t rows, int64_t rw, int bits,
                        int delta) {
    memcpy(d, s, (size_t)(rows * rw * 4));
    const int64_t nf = rw * 32 / bits;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t f = 0; f < nf; f++) {
            int v = 0;
            for (int b = 0; b < bits; b++) {
                const int64_t p = f * bits + b;
                v |= get_bit(s, 4, r * rw + p / 32, (int)(p % 32)) << b;
            }
            v = (v + delta) & ((1 << bits) - 1);
            for (int b = 0; b < bits; b++) {
                const int64_t p = f * bits + b;
                set_bit(d, 4, r * rw + p / 32, (int)(p % 32), (v >> b) & 1);
            }
        }
}

static void test_convert_zeros(void) {
    struct {
        int bits;
        uint32_t v1, v2;
    } sym[] = {{4, 0x77777777u, 0x88888888u}, {2, 0x55555555u, 0xAAAAAAAAu}, {8, 0x7F7F7F7Fu, 0x80808080u}};
    for (int i = 0; i < 3; i++) {
        int32_t a = (int32_t)sym[i].v1, b;
        CHECK(tops_convert_gptq_zeros(&b, &a, 1, 1, sym[i].bits, +1) == TOPS_OK);
        CHECK_EQ_U32(b, sym[i].v2);
        CHECK(tops_convert_gptq_zeros(&a, &b, 1, 1, sym[i].bits, -1) == TOPS_OK);
        CHECK_EQ_U32(a, sym[i].v1);
    }
    /* 3-bit symmetric: every field 3 (v1) <-> 4 (v2), 32 fields in 3 words */
    uint8_t f3[32], f4[32];
    memset(f3, 3, 32);
    memset(f4, 4, 32);
    uint32_t w3[3], w4[3], o[3];
    ref_pack(w3, f3, 1, 32, 1, 3, 3, 4, 0);
    ref_pack(w4, f4, 1, 32, 1, 3, 3, 4, 0);
    CHECK(tops_convert_gptq_zeros((int32_t *)o, (const int32_t *)w3, 1, 3, 3, +1) == TOPS_OK);
    CHECK(memcmp(o, w4, 12) == 0);
    CHECK(tops_convert_gptq_zeros((int32_t *)o, (const int32_t *)w4, 1, 3, 3, -1) == TOPS_OK);
    CHECK(memcmp(o, w3, 12) == 0);
    /* wrap-around without borrow or carry: 0 - 1 = mask, mask + 1 = 0 */
    int32_t zero = 0, ones = -1, r;
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, 1, 4, -1) == TOPS_OK);
    CHECK_EQ_U32(r, 0xFFFFFFFFu);
    CHECK(tops_convert_gptq_zeros(&r, &ones, 1, 1, 4, +1) == TOPS_OK);
    CHECK_EQ_U32(r, 0u);
    /* 3-bit, one word: 10 fields + 2 padding bits that must come through unchanged */
    CHECK(tops_convert_gptq_zeros(&r, &ones, 1, 1, 3, +1) == TOPS_OK);
    CHECK_EQ_U32(r, 0xC0000000u);
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, 1, 3, -1) == TOPS_OK);
    CHECK_EQ_U32(r, 0x3FFFFFFFu);

    const int bitss[] = {2, 3, 4, 8};
    for (int bi = 0; bi < 4; bi++)
        for (int64_t rw = 1; rw <= 7; rw++)
            for (int delta = -1; delta <= 1; delta += 2) {
                const int64_t rows = 3, n = rows * rw;
                uint32_t *s = xmalloc((size_t)n * 4), *e = xmalloc((size_t)n * 4);
                fill_random(s, (size_t)n * 4);
                ref_convert(e, s, rows, rw, bitss[bi], delta);
                gbuf d = gb_new((size_t)n * 4, 0);
                CHECK(tops_convert_gptq_zeros(d.p, (const int32_t *)s, rows, rw, bitss[bi], delta) == TOPS_OK);
                CHECK(memcmp(d.p, e, (size_t)n * 4) == 0);
                CHECK(gb_guards_ok(&d));
                CHECK(tops_convert_gptq_zeros((int32_t *)s, (const int32_t *)s, rows, rw, bitss[bi], delta) == TOPS_OK);
                CHECK(memcmp(s, e, (size_t)n * 4) == 0); /* in place */
                gb_free(&d);
                free(s);
                free(e);
            }
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, 1, 1, 1) == TOPS_ERR_ARG);
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, 1, 5, 1) == TOPS_ERR_ARG);
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, 1, 4, 0) == TOPS_ERR_ARG);
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, 1, 4, 2) == TOPS_ERR_ARG);
    CHECK(tops_convert_gptq_zeros(&r, &zero, -1, 1, 4, 1) == TOPS_ERR_ARG);
    CHECK(tops_convert_gptq_zeros(&r, &zero, 1, -1, 4, 1) == TOPS_ERR_ARG);
    CHECK(tops_convert_gptq_zeros(NULL, &zero, 1, 1, 4, 1) == TOPS_ERR_ARG);
}

/* ---- AWQ <-> GPTQ qweight ------------------------------------------------------------------- */
/* seed 003's recipe: unpack with the reverse order, repack along K sequentially */
static void ref_awq_to_gptq(uint32_t *d, const uint32_t *s, int64_t K, int64_t N) {
    uint8_t *q = xmalloc((size_t)(K * N));
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < N; n++)
            q[k * N + n] = (uint8_t)((s[k * (N / 8) + n / 8] >> (4 * REVERSE[n % 8])) & 15u);
    memset(d, 0, (size_t)(K / 8 * N * 4));
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < N; n++) d[(k / 8) * N + n] |= (uint32_t)q[k * N + n] << (4 * (k % 8));
    free(q);
}

static void test_awq_gptq_qweight(void) {
    const int64_t shapes[][2] = {{8, 8}, {16, 24}, {64, 128}, {40, 296}, {24, 264}, {128, 552}, {8, 1024}};
    for (int si = 0; si < 7; si++) {
        const int64_t K = shapes[si][0], N = shapes[si][1], n = K * N / 8;
        const size_t bytes = (size_t)n * 4;
        uint32_t *awq = xmalloc(bytes), *expect = xmalloc(bytes);
        fill_random(awq, bytes);
        ref_awq_to_gptq(expect, awq, K, N);
        for (int lvl = 0; lvl < isa_levels(); lvl++) {
            CHECK(tops_cpu_isa_set(lvl) == lvl);
            gbuf d = gb_new(bytes, 0xA5);
            CHECK(tops_awq_to_gptq_qweight(d.p, (const int32_t *)awq, K, N, 0, K / 8) == TOPS_OK);
            CHECK(memcmp(d.p, expect, bytes) == 0);
            CHECK(gb_guards_ok(&d));
            gbuf b = gb_new(bytes, 0xA5);
            CHECK(tops_gptq_to_awq_qweight(b.p, d.p, K, N, 0, K / 8) == TOPS_OK);
            CHECK(memcmp(b.p, awq, bytes) == 0);
            CHECK(gb_guards_ok(&b));

            /* split ranges; the middle range alone writes only its own rows */
            if (K >= 24) {
                gbuf e = gb_new(bytes, 0x5A), f = gb_new(bytes, 0x5A);
                CHECK(tops_awq_to_gptq_qweight(e.p, (const int32_t *)awq, K, N, 1, 2) == TOPS_OK);
                CHECK(tops_gptq_to_awq_qweight(f.p, (const int32_t *)expect, K, N, 1, 2) == TOPS_OK);
                int ok = 1;
                for (size_t i = 0; i < bytes; i++) {
                    const int in_e = i >= (size_t)N * 4 && i < (size_t)N * 8; /* GPTQ row 1 */
                    const int in_f = i >= (size_t)N * 4 && i < (size_t)N * 8; /* AWQ rows 8..15 */
                    if (!in_e) ok &= ((uint8_t *)e.p)[i] == 0x5A;
                    if (!in_f) ok &= ((uint8_t *)f.p)[i] == 0x5A;
                }
                CHECK(ok);
                CHECK(tops_awq_to_gptq_qweight(e.p, (const int32_t *)awq, K, N, 0, 1) == TOPS_OK);
                CHECK(tops_awq_to_gptq_qweight(e.p, (const int32_t *)awq, K, N, 2, K / 8) == TOPS_OK);
                CHECK(memcmp(e.p, expect, bytes) == 0);
                CHECK(tops_gptq_to_awq_qweight(f.p, (const int32_t *)expect, K, N, 0, 1) == TOPS_OK);
                CHECK(tops_gptq_to_awq_qweight(f.p, (const int32_t *)expect, K, N, 2, K / 8) == TOPS_OK);
                CHECK(memcmp(f.p, awq, bytes) == 0);
                CHECK(gb_guards_ok(&e) && gb_guards_ok(&f));
                gb_free(&e);
                gb_free(&f);
            }
            gb_free(&d);
            gb_free(&b);
        }
        tops_cpu_isa_set(-1);
        free(awq);
        free(expect);
    }
    /* literal: AWQ rows of 0..7 (AWQ order) become GPTQ words holding column n in every nibble */
    int32_t a8[8], g8[8];
    for (int r = 0; r < 8; r++) a8[r] = (int32_t)0x75316420u;
    CHECK(tops_awq_to_gptq_qweight(g8, a8, 8, 8, 0, 1) == TOPS_OK);
    for (int c = 0; c < 8; c++) CHECK_EQ_U32(g8[c], 0x11111111u * (uint32_t)c);
    /* in place is refused (it gave wrong words: a block is read across rows as it is written) */
    CHECK(tops_awq_to_gptq_qweight(a8, a8, 8, 8, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qweight(g8, g8, 8, 8, 0, 1) == TOPS_ERR_ARG);
    CHECK_EQ_U32(a8[0], 0x75316420u);
    (void)ORDER;

    int32_t w[64];
    CHECK(tops_awq_to_gptq_qweight(w, w, 12, 8, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_awq_to_gptq_qweight(w, w, 8, 12, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_awq_to_gptq_qweight(w, w, 8, 8, 0, 2) == TOPS_ERR_ARG);
    CHECK(tops_awq_to_gptq_qweight(w, w, 8, 8, -1, 1) == TOPS_ERR_ARG);
    CHECK(tops_awq_to_gptq_qweight(w, w, -8, 8, 0, 0) == TOPS_ERR_ARG);
    CHECK(tops_awq_to_gptq_qweight(NULL, w, 8, 8, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qweight(w, w, 12, 8, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qweight(w, w, 8, 4, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qweight(w, w, 8, 8, 1, 0) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qweight(w, NULL, 8, 8, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_gptq_to_awq_qweight(w, w, INT64_MAX - 7, 8 * 1024, 0, 0) == TOPS_ERR_ARG);
}

/* ---- pack_v2: seed 001 transcribed literally, one reshape/permute at a time --------------------- */
static void ref_pack_v2(uint16_t *out, const uint8_t *U, int64_t N, int64_t K) {
    const int64_t nb = K / 32;
    uint8_t *B = xmalloc((size_t)(N * K)), *P = xmalloc((size_t)(N * K)), *F = xmalloc((size_t)(N * K));
    /* packed = unpacked.reshape(N, K//32, 4, 4, 2).permute(0, 1, 3, 2, 4): B[n,b,x,y,e] = A[n,b,y,x,e] */
#define I5(n, b, i3, i4, i5) (((((n) * nb + (b)) * 4 + (i3)) * 4 + (i4)) * 2 + (i5))
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++)
            for (int x = 0; x < 4; x++)
                for (int y = 0; y < 4; y++)
                    for (int e = 0; e < 2; e++) B[I5(n, b, x, y, e)] = U[I5(n, b, y, x, e)];
    /* packed.permute(0, 1, 2, 4, 3).reshape(N, K): C[n,b,x,e,y] = B[n,b,x,y,e], stored contiguous */
    for (int64_t n = 0; n < N; n++)
        for (int64_t b = 0; b < nb; b++)
            for (int x = 0; x < 4; x++)
                for (int e = 0; e < 2; e++)
                    for (int y = 0; y < 4; y++)
                        P[(((n * nb + b) * 4 + x) * 2 + e) * 4 + y] = B[I5(n, b, x, y, e)];
#undef I5
    /* reshape (N//4, 4, K//64, 64), permute(0, 2, 1, 3) -> E[r,c,i,s] = D[r,i,c,s], contiguous F */
    const int64_t nc = K / 64;
    for (int64_t r = 0; r < N / 4; r++)
        for (int64_t c = 0; c < nc; c++)
            for (int i = 0; i < 4; i++)
                for (int s = 0; s < 64; s++)
                    F[((r * nc + c) * 4 + i) * 64 + s] = P[((r * 4 + i) * nc + c) * 64 + s];
    /* reshape (N//4, K//64, 64, 4) is a reinterpretation of F; pack the last axis */
    for (int64_t r = 0; r < N / 4; r++)
        for (int64_t c = 0; c < nc; c++)
            for (int s = 0; s < 64; s++) {
                const uint8_t *f = F + ((r * nc + c) * 64 + s) * 4;
                out[(r * nc + c) * 64 + s] = (uint16_t)(f[0] | (f[1] << 4) | (f[2] << 8) | (f[3] << 12));
            }
    free(B);
    free(P);
    free(F);
}

static void test_pack_v2(void) {
    const int64_t shapes[][2] = {{4, 64}, {8, 128}, {12, 192}, {20, 320}, {4, 640}, {16, 64}};
    for (int si = 0; si < 6; si++) {
        const int64_t N = shapes[si][0], K = shapes[si][1];
        const size_t nu = (size_t)(N * K), np = (size_t)(N / 4 * K) * 2;
        uint8_t *U = xmalloc(nu);
        uint16_t *expect = xmalloc(np);
        for (size_t i = 0; i < nu; i++) U[i] = (uint8_t)(tu_rand() & 15u);
        ref_pack_v2(expect, U, N, K);
        for (int lvl = 0; lvl < isa_levels(); lvl++) {
            tops_cpu_isa_set(lvl);
            gbuf d = gb_new(np, 0xA5);
            CHECK(tops_pack_v2(d.p, U, N, K, 0, N / 4) == TOPS_OK);
            CHECK(memcmp(d.p, expect, np) == 0);
            CHECK(gb_guards_ok(&d));
            gbuf u = gb_new(nu, 0xA5);
            CHECK(tops_unpack_v2(u.p, d.p, N, K, 0, N / 4) == TOPS_OK);
            CHECK(memcmp(u.p, U, nu) == 0);
            CHECK(gb_guards_ok(&u));
            if (N >= 12) { /* middle range alone, then the rest */
                gbuf e = gb_new(np, 0x5A), f = gb_new(nu, 0x5A);
                CHECK(tops_pack_v2(e.p, U, N, K, 1, 2) == TOPS_OK);
                CHECK(tops_unpack_v2(f.p, (const int16_t *)expect, N, K, 1, 2) == TOPS_OK);
                int ok = 1;
                for (size_t i = 0; i < np; i++)
                    if (i < (size_t)K * 2 || i >= (size_t)K * 4) ok &= ((uint8_t *)e.p)[i] == 0x5A;
                for (size_t i = 0; i < nu; i++)
                    if (i < (size_t)K * 4 || i >= (size_t)K * 8) ok &= ((uint8_t *)f.p)[i] == 0x5A;
                CHECK(ok);
                CHECK(tops_pack_v2(e.p, U, N, K, 0, 1) == TOPS_OK);
                CHECK(tops_pack_v2(e.p, U, N, K, 2, N / 4) == TOPS_OK);
                CHECK(memcmp(e.p, expect, np) == 0);
                CHECK(tops_unpack_v2(f.p, (const int16_t *)expect, N, K, 0, 1) == TOPS_OK);
                CHECK(tops_unpack_v2(f.p, (const int16_t *)expect, N, K, 2, N / 4) == TOPS_OK);
                CHECK(memcmp(f.p, U, nu) == 0);
                CHECK(gb_guards_ok(&e) && gb_guards_ok(&f));
                gb_free(&e);
                gb_free(&f);
            }
            /* out of range value, at the very end and at the start */
            const uint8_t first = U[0], last = U[nu - 1];
            U[nu - 1] = 16;
            CHECK(tops_pack_v2(d.p, U, N, K, 0, N / 4) == TOPS_ERR_RANGE);
            U[nu - 1] = last;
            U[0] = 255;
            CHECK(tops_pack_v2(d.p, U, N, K, 0, N / 4) == TOPS_ERR_RANGE);
            U[0] = first;
            CHECK((expect[0] & 15u) == first); /* nibble 0 of out[0, 0] is U[0, 0] */
            CHECK(gb_guards_ok(&d));
            gb_free(&d);
            gb_free(&u);
        }
        tops_cpu_isa_set(-1);
        free(U);
        free(expect);
    }
    /* one literal value: U[0, 8] = 1 lands in nibble 1 of out[0, 0] */
    uint8_t u1[4 * 64];
    int16_t p1[64];
    memset(u1, 0, sizeof u1);
    u1[8] = 1;
    u1[64 + 33] = 15; /* row 1, h = 1, j = 0, l = 1 -> out[0, 16 + 8 + 1] nibble 0 */
    CHECK(tops_pack_v2(p1, u1, 4, 64, 0, 1) == TOPS_OK);
    CHECK(p1[0] == 0x10 && p1[25] == 0xF);

    int16_t w[64];
    uint8_t u[256];
    CHECK(tops_pack_v2(w, u, 6, 64, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack_v2(w, u, 4, 32, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_pack_v2(w, u, 4, 64, 0, 2) == TOPS_ERR_ARG);
    CHECK(tops_pack_v2(w, u, 4, 64, 1, 0) == TOPS_ERR_ARG);
    CHECK(tops_pack_v2(w, u, -4, 64, 0, 0) == TOPS_ERR_ARG);
    CHECK(tops_pack_v2(NULL, u, 4, 64, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack_v2(u, w, 4, 96, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack_v2(u, w, 5, 64, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack_v2(u, NULL, 4, 64, 0, 1) == TOPS_ERR_ARG);
    CHECK(tops_unpack_v2(u, w, 4, 64, 0, 0) == TOPS_OK);
}

/* ---- dequantize ------------------------------------------------------------------------------ */
static uint16_t enc(float f, int dtype) {
    return dtype == TOPS_F16 ? tops_f32_to_f16(f) : tops_f32_to_bf16(f);
}

static void run_dequant_case(int format, int bits, int64_t K, int64_t N, int64_t gs, int zmode,
                             int scatter, int sdt, int odt) {
    const int64_t G = (K + gs - 1) / gs;
    const uint32_t mask = (1u << bits) - 1u;
    uint8_t *q = xmalloc((size_t)(K * N)), *z = xmalloc((size_t)(G * N)), *zs = xmalloc((size_t)(G * N));
    float *s = xmalloc((size_t)(G * N) * 4);
    void *sc = xmalloc((size_t)(G * N) * 4);
    int32_t *gidx = xmalloc((size_t)K * 4);
    int64_t *perm = xmalloc((size_t)K * 8);
    for (int64_t i = 0; i < K * N; i++) q[i] = (uint8_t)(tu_rand() & mask);
    for (int64_t i = 0; i < G * N; i++) {
        z[i] = (uint8_t)(tu_rand() & mask);
        if (i % 7 == 0) z[i] = 0; /* the v1 trap */
        /* scales exact in the scale dtype: f32 gets any float, f16/bf16 small dyadic values */
        float f = sdt == TOPS_F32 ? ((float)(tu_rand() % 100000) - 50000.0f) * 1.2345e-5f
                                  : ((float)(tu_rand() % 256) - 128.0f) / 64.0f;
        s[i] = f;
        if (sdt == TOPS_F32) ((float *)sc)[i] = f;
        else ((uint16_t *)sc)[i] = enc(f, sdt);
    }
    /* act-order: group of row k is rank(k) / gs for a random rank */
    for (int64_t k = 0; k < K; k++) perm[k] = k;
    if (scatter)
        for (int64_t k = K - 1; k > 0; k--) {
            int64_t j = (int64_t)(tu_rand() % (unsigned)(k + 1)), t = perm[k];
            perm[k] = perm[j];
            perm[j] = t;
        }
    for (int64_t r = 0; r < K; r++) gidx[perm[r]] = (int32_t)(r / gs);

    /* pack with the reference packer */
    int32_t *qw, *qz = NULL;
    int64_t qw_words;
    if (format == TOPS_FORMAT_GPTQ) {
        const int64_t rows = (K * bits + 31) / 32, zw = (N * bits + 31) / 32;
        qw_words = rows * N;
        qw = xmalloc((size_t)qw_words * 4);
        ref_pack(qw, q, 1, K, N, rows, bits, 4, TOPS_ORDER_SEQUENTIAL);
        for (int64_t i = 0; i < G * N; i++) zs[i] = zmode == TOPS_ZEROS_V1 ? (uint8_t)((z[i] - 1u) & mask) : z[i];
        if (zmode) {
            qz = xmalloc((size_t)(G * zw) * 4);
            ref_pack(qz, zs, G, N, 1, zw, bits, 4, TOPS_ORDER_SEQUENTIAL);
        }
    } else {
        qw_words = K * N / 8;
        qw = xmalloc((size_t)qw_words * 4);
        ref_pack(qw, q, K, N, 1, N / 8, 4, 4, TOPS_ORDER_AWQ);
        if (zmode) {
            qz = xmalloc((size_t)(G * N / 8) * 4);
            ref_pack(qz, z, G, N, 1, N / 8, 4, 4, TOPS_ORDER_AWQ);
        }
    }
    const int use_gidx = format == TOPS_FORMAT_GPTQ && scatter;

    const size_t esz = odt == TOPS_F32 ? 4 : 2;
    void *expect = xmalloc((size_t)(N * K) * esz);
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t g = use_gidx ? gidx[k] : k / gs;
            const int zz = zmode ? z[g * N + n] : (1 << (bits - 1));
            tops_store(expect, odt, n * K + k, s[g * N + n] * (float)(q[k * N + n] - zz));
        }

    tops_dequant_args a;
    memset(&a, 0, sizeof a);
    a.format = format;
    a.bits = bits;
    a.K = K;
    a.N = N;
    a.groups = G;
    a.group_size = gs;
    a.qweight = qw;
    a.qzeros = qz;
    a.zero_format = zmode ? zmode : TOPS_ZEROS_V2;
    a.scales = sc;
    a.scales_dtype = sdt;
    a.g_idx = use_gidx ? gidx : NULL;
    a.out_dtype = odt;
    gbuf o = gb_new((size_t)(N * K) * esz, 0xA5);
    a.out = o.p;
    const int64_t mid = N / 3;
    CHECK(tops_dequantize(&a, mid, N) == TOPS_OK);
    int untouched = 1;
    for (size_t i = 0; i < (size_t)(mid * K) * esz; i++) untouched &= ((uint8_t *)o.p)[i] == 0xA5;
    CHECK(untouched);
    CHECK(tops_dequantize(&a, 0, mid) == TOPS_OK);
    int same = memcmp(o.p, expect, (size_t)(N * K) * esz) == 0;
    CHECK(same);
    if (!same)
        fprintf(stderr, "  dequant mismatch: format %d bits %d K %lld N %lld gs %lld zmode %d scatter %d sdt %d odt %d\n",
                format, bits, (long long)K, (long long)N, (long long)gs, zmode, scatter, sdt, odt);
    CHECK(gb_guards_ok(&o));

    if (use_gidx) { /* g_idx out of range: TOPS_ERR_RANGE, nothing written */
        gbuf o2 = gb_new((size_t)(N * K) * esz, 0x3C);
        a.out = o2.p;
        const int32_t keep = gidx[K / 2];
        gidx[K / 2] = (int32_t)G;
        CHECK(tops_dequantize(&a, 0, N) == TOPS_ERR_RANGE);
        gidx[K / 2] = -1;
        CHECK(tops_dequantize(&a, 0, N) == TOPS_ERR_RANGE);
        gidx[K / 2] = keep;
        int clean = 1;
        for (size_t i = 0; i < o2.n; i++) clean &= ((uint8_t *)o2.p)[i] == 0x3C;
        CHECK(clean);
        gb_free(&o2);
    }
    gb_free(&o);
    free(expect);
    free(qw);
    free(qz);
    free(q);
    free(z);
    free(zs);
    free(s);
    free(sc);
    free(gidx);
    free(perm);
}

static void test_dequant(void) {
    const int bitss[] = {2, 3, 4, 8};
    const int64_t Ks[] = {40, 64, 20, 96};
    const int64_t Ns[] = {13, 16, 8, 24};
    int dt = 0;
    for (int bi = 0; bi < 4; bi++)
        for (int si = 0; si < 4; si++)
            for (int zmode = 0; zmode <= 2; zmode++) /* 0 = symmetric (NULL qzeros) */
                for (int scatter = 0; scatter < 2; scatter++)
                    for (int odt = 0; odt < 3; odt++, dt++) {
                        const int64_t K = Ks[si], gs = si == 1 ? 64 : (si == 3 ? 32 : 8 + 4 * si);
                        run_dequant_case(TOPS_FORMAT_GPTQ, bitss[bi], K, Ns[si], gs, zmode, scatter, dt % 3, odt);
                    }
    for (int si = 0; si < 3; si++)
        for (int zmode = 0; zmode <= 1; zmode++)
            for (int odt = 0; odt < 3; odt++)
                for (int sdt = 0; sdt < 3; sdt++) {
                    const int64_t K = si == 0 ? 64 : (si == 1 ? 40 : 128), N = si == 0 ? 8 : (si == 1 ? 24 : 72);
                    run_dequant_case(TOPS_FORMAT_AWQ, 4, K, N, si == 2 ? 128 : 16, zmode ? TOPS_ZEROS_V2 : 0, 0, sdt, odt);
                }

    /* bigger blocks: several K chunks, a full AWQ column block of 128 plus a ragged one */
    run_dequant_case(TOPS_FORMAT_AWQ, 4, 96, 264, 32, TOPS_ZEROS_V2, 0, TOPS_F16, TOPS_BF16);
    run_dequant_case(TOPS_FORMAT_GPTQ, 4, 1100, 40, 128, TOPS_ZEROS_V1, 1, TOPS_BF16, TOPS_F16);
    run_dequant_case(TOPS_FORMAT_GPTQ, 3, 1100, 40, 100, TOPS_ZEROS_V2, 0, TOPS_F32, TOPS_F32);
    run_dequant_case(TOPS_FORMAT_GPTQ, 2, 1100, 17, 64, TOPS_ZEROS_V1, 0, TOPS_F16, TOPS_F32);

    /* argument errors */
    int32_t qw[64] = {0}, qz[8] = {0};
    uint16_t sc[64] = {0};
    float out[512];
    tops_dequant_args a;
    memset(&a, 0, sizeof a);
    a.format = TOPS_FORMAT_GPTQ;
    a.bits = 4;
    a.K = 16;
    a.N = 8;
    a.groups = 2;
    a.group_size = 8;
    a.qweight = qw;
    a.qzeros = qz;
    a.zero_format = TOPS_ZEROS_V1;
    a.scales = sc;
    a.scales_dtype = TOPS_F16;
    a.out = out;
    a.out_dtype = TOPS_F32;
    CHECK(tops_dequantize(&a, 0, 8) == TOPS_OK);
    tops_dequant_args b = a;
    b.bits = 5;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.bits = 1;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.format = 7;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.format = TOPS_FORMAT_AWQ;
    b.bits = 2;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.format = TOPS_FORMAT_AWQ;
    b.N = 4;
    CHECK(tops_dequantize(&b, 0, 4) == TOPS_ERR_ARG);
    b = a;
    b.group_size = 0;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.groups = 1; /* k / 8 reaches group 1 */
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.zero_format = 0;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.scales_dtype = 9;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.out_dtype = -1;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    CHECK(tops_dequantize(&a, 0, 9) == TOPS_ERR_ARG);
    CHECK(tops_dequantize(&a, 5, 4) == TOPS_ERR_ARG);
    CHECK(tops_dequantize(&a, -1, 4) == TOPS_ERR_ARG);
    CHECK(tops_dequantize(NULL, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.qweight = NULL;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    b = a;
    b.K = -8;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_ARG);
    int32_t gi[16] = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 2};
    b = a;
    b.g_idx = gi;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_ERR_RANGE);
    gi[15] = 1;
    CHECK(tops_dequantize(&b, 0, 8) == TOPS_OK);
}

/* ---- bench ----------------------------------------------------------------------------------- */
static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct {
    int which;
    void *dst;
    const void *src;
    int64_t a, b, begin, end;
} bench_job;

static void *bench_run(void *p) {
    bench_job *j = p;
    switch (j->which) {
    case 0: tops_awq_to_gptq_qweight(j->dst, j->src, j->a, j->b, j->begin, j->end); break;
    case 1: tops_gptq_to_awq_qweight(j->dst, j->src, j->a, j->b, j->begin, j->end); break;
    case 2: tops_pack_v2(j->dst, j->src, j->a, j->b, j->begin, j->end); break;
    case 3: tops_unpack_v2(j->dst, j->src, j->a, j->b, j->begin, j->end); break;
    case 4: /* AWQ qweight from unpacked [K, N]: pack along the last axis */
        tops_pack(j->dst, j->src, j->a, j->b, 1, 4, 4, TOPS_ORDER_AWQ, j->begin, j->end);
        break;
    case 5: /* GPTQ qweight from unpacked [K, N]: viewed as [K/8, 8, N], pack along the 8 */
        tops_pack(j->dst, j->src, j->a / 8, 8, j->b, 4, 4, TOPS_ORDER_SEQUENTIAL, j->begin, j->end);
        break;
    default: tops_dequantize(j->src, j->begin, j->end); break;
    }
    return NULL;
}

static double bench_one(int which, void *dst, const void *src, int64_t a, int64_t b, int64_t count,
                        int threads) {
    double best = 1e30;
    for (int it = 0; it < 7; it++) {
        bench_job jobs[2];
        pthread_t th[2];
        const double t0 = now_s();
        for (int t = 0; t < threads; t++) {
            jobs[t] = (bench_job){which, dst, src, a, b, count * t / threads, count * (t + 1) / threads};
            if (t) pthread_create(&th[t], NULL, bench_run, &jobs[t]);
        }
        bench_run(&jobs[0]);
        for (int t = 1; t < threads; t++) pthread_join(th[t], NULL);
        const double dt = now_s() - t0;
        if (dt < best) best = dt;
    }
    return best;
}

static void bench(void) {
    const int64_t K = 8192, N = 8192;
    const size_t qbytes = (size_t)(K * N / 2), ubytes = (size_t)(K * N);
    uint8_t *a = xmalloc(qbytes), *b = xmalloc(qbytes), *u = xmalloc(ubytes), *p = xmalloc(qbytes);
    fill_random(a, qbytes);
    for (size_t i = 0; i < ubytes; i++) u[i] = (uint8_t)(tu_rand() & 15u);
    memset(b, 0, qbytes);
    memset(p, 0, qbytes);
    static const char *names[] = {"awq_to_gptq_qweight", "gptq_to_awq_qweight", "pack_v2", "unpack_v2"};
    static const char *isas[] = {"scalar", "avx2", "avx512"};
    printf("8192 x 8192, GB/s = (bytes read + bytes written) / best of 7\n");
    for (int lvl = 0; lvl < isa_levels(); lvl++) {
        tops_cpu_isa_set(lvl);
        for (int w = 0; w < 4; w++)
            for (int threads = 1; threads <= 2; threads++) {
                double t;
                size_t bytes;
                if (w == 0) t = bench_one(0, b, a, K, N, K / 8, threads), bytes = 2 * qbytes;
                else if (w == 1) t = bench_one(1, a, b, K, N, K / 8, threads), bytes = 2 * qbytes;
                else if (w == 2) t = bench_one(2, p, u, N, K, N / 4, threads), bytes = qbytes + ubytes;
                else t = bench_one(3, u, p, N, K, N / 4, threads), bytes = qbytes + ubytes;
                printf("  %-7s %-20s %d thread%s %8.3f ms %7.2f GB/s\n", isas[lvl], names[w], threads,
                       threads > 1 ? "s" : " ", t * 1e3, (double)bytes / t / 1e9);
            }
    }
    tops_cpu_isa_set(-1);
    /* not vectorised per ISA; for information */
    for (int threads = 1; threads <= 2; threads++) {
        double t = bench_one(4, a, u, K, N, K, threads);
        printf("  %-7s %-20s %d thread%s %8.3f ms %7.2f GB/s\n", "-", "pack 4b AWQ (N)", threads,
               threads > 1 ? "s" : " ", t * 1e3, (double)(qbytes + ubytes) / t / 1e9);
        t = bench_one(5, a, u, K, N, K / 8, threads);
        printf("  %-7s %-20s %d thread%s %8.3f ms %7.2f GB/s\n", "-", "pack 4b GPTQ (K)", threads,
               threads > 1 ? "s" : " ", t * 1e3, (double)(qbytes + ubytes) / t / 1e9);
    }
    {
        const int64_t gs = 128, G = K / gs;
        uint16_t *sc = xmalloc((size_t)(G * N) * 2), *out = xmalloc((size_t)(N * K) * 2);
        int32_t *qz = xmalloc((size_t)(G * N / 8) * 4);
        for (int64_t i = 0; i < G * N; i++) sc[i] = tops_f32_to_f16(0.01f);
        fill_random(qz, (size_t)(G * N / 8) * 4);
        memset(out, 0, (size_t)(N * K) * 2);
        tops_dequant_args da;
        memset(&da, 0, sizeof da);
        da.format = TOPS_FORMAT_GPTQ;
        da.bits = 4;
        da.K = K;
        da.N = N;
        da.groups = G;
        da.group_size = gs;
        da.qweight = (const int32_t *)a;
        da.qzeros = qz;
        da.zero_format = TOPS_ZEROS_V2;
        da.scales = sc;
        da.scales_dtype = TOPS_F16;
        da.out = out;
        da.out_dtype = TOPS_F16;
        for (int threads = 1; threads <= 2; threads++) {
            double t = bench_one(6, NULL, &da, 0, 0, N, threads);
            printf("  %-7s %-20s %d thread%s %8.3f ms %7.2f GB/s\n", "-", "dequant gptq4 f16", threads,
                   threads > 1 ? "s" : " ", t * 1e3, (double)(qbytes + (size_t)(N * K) * 2) / t / 1e9);
        }
        free(sc);
        free(out);
        free(qz);
    }
    tops_cpu_isa_set(-1);
    free(a);
    free(b);
    free(u);
    free(p);
}

/* k-interleaved qweight: a literal block, the index formula on random words, round trip, errors */
static void test_prepack_w4a16(void) {
    /* K = 32, N = 1, q[k] = k % 16: GPTQ words 0x76543210, 0xFEDCBA98 twice; word t holds k
     * 2t, 2t+8, 2t+16, 2t+24 in nibbles 0..3 and k + 1 of each in nibbles 4..7 */
    const int32_t gptq[4] = {0x76543210, (int32_t)0xFEDCBA98u, 0x76543210, (int32_t)0xFEDCBA98u};
    int32_t kil[4], back[4];
    CHECK(tops_prepack_w4a16(kil, gptq, 32, 1, 0, 0, 1) == TOPS_OK);
    CHECK_EQ_U32(kil[0], 0x91918080u);
    CHECK_EQ_U32(kil[1], 0xB3B3A2A2u);
    CHECK_EQ_U32(kil[2], 0xD5D5C4C4u);
    CHECK_EQ_U32(kil[3], 0xF7F7E6E6u);
    CHECK(tops_prepack_w4a16(back, kil, 32, 1, 1, 0, 1) == TOPS_OK);
    CHECK(memcmp(back, gptq, sizeof gptq) == 0);

    enum { K = 96, N = 24 };
    int32_t *src = malloc(sizeof(int32_t) * K / 8 * N), *dst = malloc(sizeof(int32_t) * K / 8 * N),
            *inv = malloc(sizeof(int32_t) * K / 8 * N);
    for (int i = 0; i < K / 8 * N; i++) src[i] = (int32_t)tu_rand() ^ (int32_t)(tu_rand() << 16);
    /* in two ranges of blocks, as threads would */
    CHECK(tops_prepack_w4a16(dst, src, K, N, 0, 0, 1) == TOPS_OK);
    CHECK(tops_prepack_w4a16(dst, src, K, N, 0, 1, K / 32) == TOPS_OK);
    int bad = 0;
    for (int kw = 0; kw < K / 8; kw++)
        for (int n = 0; n < N; n++)
            for (int e = 0; e < 8; e++) {
                const int64_t k = TOPS_KIL_REAL_K((int64_t)kw, e);
                const uint32_t want = ((uint32_t)src[(k / 8) * N + n] >> (4 * (k % 8))) & 15u;
                bad += (((uint32_t)dst[kw * N + n] >> (4 * e)) & 15u) != want;
            }
    CHECK(bad == 0);
    CHECK(tops_prepack_w4a16(inv, dst, K, N, 1, 0, K / 32) == TOPS_OK);
    CHECK(memcmp(inv, src, sizeof(int32_t) * K / 8 * N) == 0);
    CHECK(tops_prepack_w4a16(dst, src, 40, N, 0, 0, 1) == TOPS_ERR_ARG);     /* K % 32 */
    CHECK(tops_prepack_w4a16(dst, src, K, N, 0, 0, K / 32 + 1) == TOPS_ERR_ARG); /* range */
    CHECK(tops_prepack_w4a16(src, src, K, N, 0, 0, 1) == TOPS_ERR_ARG);      /* in place */
    CHECK(tops_prepack_w4a16(NULL, src, K, N, 0, 0, 1) == TOPS_ERR_ARG);
    free(src);
    free(dst);
    free(inv);
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) {
        bench();
        return 0;
    }
    printf("ISA detected: %d (testing levels 0..%d)\n", tops_cpu_isa_detected(), tops_cpu_isa_detected());
    test_pack_group();
    test_pack_literals();
    test_pack_roundtrip();
    test_pack_errors();
    test_qzeros();
    test_convert_zeros();
    test_awq_gptq_qweight();
    test_pack_v2();
    test_dequant();
    test_prepack_w4a16();
    return tu_report("test_core");
}

/* test_w4a16.c - tests of tops_w4a16_linear against a float64 reference, on every instruction set
 * level the machine has; `test_w4a16 --bench` times it (build with `make SAN= bin/test_w4a16`). */
#define _POSIX_C_SOURCE 200809L
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common.h"
#include "testutil.h"
#include "tops.h"

#if defined(__x86_64__)
#include <pmmintrin.h>
#endif

/* w4a16.c: force the GEMV's subnormal unpack on (1) or off (0), -1: by CPU (not in tops.h) */
int tops_w4a16_subnormal_set(int mode);
/* w4a16.c: bf16 x through vdpbf16ps off (0) or on (1, where the CPU has AVX512_BF16), -1: by CPU */
int tops_w4a16_bf16dot_set(int mode);
/* (tops_w4a16_amx_set: available also in a build with -DW4_AMX_EMULATE, on a C model of the tiles) */

static int g_xpos; /* w4_make: x >= 0 (every product term of one sign: the largest partial sums) */

static float frand(float lo, float hi) { return lo + (hi - lo) * (float)(tu_rand() & 0xffffff) / 16777216.0f; }

static size_t dsize(int dtype) { return dtype == TOPS_F32 ? 4 : 2; }

/* a float tensor of n elements in dtype, values uniform in [lo, hi), rounded to dtype */
static void *rand_tensor(int64_t n, int dtype, float lo, float hi) {
    void *p = malloc((size_t)n * dsize(dtype) + 1);
    for (int64_t i = 0; i < n; i++) tops_store(p, dtype, i, frand(lo, hi));
    return p;
}

typedef struct {
    int64_t M, K, N, gs;
    int act;      /* g_idx: 0 none, 1 act-order permutation, 2 explicit k / gs, 3 sorted, runs of
                   * random whole words (groups of uneven sizes, each word in one) */
    int zf;       /* 0: NULL (symmetric), 1: v1, 2: v2 */
    int zfill;    /* -1 random zeros, else every zero equals this */
    int xd, sd, od, bd; /* bd < 0: no bias */
    int64_t xpad; /* x_row_stride = K + xpad */
    float xscale; /* |x| < xscale (0: 1); row 1 of x: below xscale / 100 */
} w4case;

typedef struct {
    w4case c;
    int64_t G;
    uint8_t *q, *z; /* q[K][N], z[G][N] */
    int32_t *qweight, *qzeros, *g_idx;
    void *x, *scales, *bias;
    double *ref, *bound;
} w4data;

static void w4_make(w4data *d, const w4case *c) {
    memset(d, 0, sizeof *d);
    d->c = *c;
    const int64_t M = c->M, K = c->K, N = c->N, G = K / c->gs;
    d->G = G;
    d->q = malloc((size_t)(K * N));
    d->z = malloc((size_t)(G * N));
    for (int64_t i = 0; i < K * N; i++) d->q[i] = (uint8_t)(tu_rand() & 15);
    for (int64_t i = 0; i < G * N; i++) d->z[i] = (uint8_t)(c->zfill >= 0 ? c->zfill : (int)(tu_rand() & 15));
    if (c->zf == 0)
        for (int64_t i = 0; i < G * N; i++) d->z[i] = 8;
    d->qweight = calloc((size_t)(K / 8 * N), 4);
    for (int64_t k = 0; k < K; k++)
        for (int64_t n = 0; n < N; n++)
            d->qweight[(k / 8) * N + n] =
                (int32_t)((uint32_t)d->qweight[(k / 8) * N + n] | ((uint32_t)d->q[k * N + n] << (4 * (k % 8))));
    if (c->zf) {
        d->qzeros = calloc((size_t)(G * N / 8), 4);
        for (int64_t g = 0; g < G; g++)
            for (int64_t n = 0; n < N; n++) {
                uint32_t f = c->zf == 1 ? (uint32_t)(d->z[g * N + n] - 1) & 15u : d->z[g * N + n];
                uint32_t *w = (uint32_t *)&d->qzeros[g * (N / 8) + n / 8];
                *w |= f << (4 * (n % 8));
            }
    }
    if (c->act) {
        d->g_idx = malloc((size_t)K * 4);
        for (int64_t k = 0; k < K; k++) d->g_idx[k] = (int32_t)(k / c->gs);
        if (c->act == 3) /* a group ends after a word with probability 1/4, while groups are left */
            for (int64_t k = 0, g = 0; k < K; k += 8) {
                for (int i = 0; i < 8; i++) d->g_idx[k + i] = (int32_t)g;
                if (g + 1 < K / c->gs && tu_rand() % 4 == 0) g++;
            }
        if (c->act == 1) /* random permutation of k // gs */
            for (int64_t k = K - 1; k > 0; k--) {
                int64_t j = (int64_t)(tu_rand() % (unsigned)(k + 1));
                int32_t t = d->g_idx[k];
                d->g_idx[k] = d->g_idx[j];
                d->g_idx[j] = t;
            }
    }
    const int64_t ldx = K + c->xpad;
    const float xs = c->xscale > 0 ? c->xscale : 1.0f;
    d->x = rand_tensor(M * ldx, c->xd, -xs, xs);
    if (g_xpos)
        for (int64_t i = 0; i < M * ldx; i++) tops_store(d->x, c->xd, i, fabsf(tops_load(d->x, c->xd, i)));
    if (M > 1 && c->xscale > 0)
        for (int64_t k = 0; k < K; k++) tops_store(d->x, c->xd, ldx + k, frand(-xs, xs) * 1e-2f);
    d->scales = rand_tensor(G * N, c->sd, 0.002f, 0.02f);
    if (c->bd >= 0) d->bias = rand_tensor(N, c->bd, -1.0f, 1.0f);
    d->ref = malloc((size_t)(M * N) * sizeof(double));
    d->bound = malloc((size_t)(M * N) * sizeof(double));
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            double acc = 0.0, mag = 0.0;
            for (int64_t k = 0; k < K; k++) {
                int64_t g = d->g_idx ? d->g_idx[k] : k / c->gs;
                double xv = tops_load(d->x, c->xd, m * ldx + k);
                double sv = tops_load(d->scales, c->sd, g * N + n);
                acc += xv * sv * ((double)d->q[k * N + n] - (double)d->z[g * N + n]);
                mag += fabs(xv * sv) * 16.0;
            }
            if (d->bias) {
                double b = tops_load(d->bias, c->bd, n);
                acc += b;
                mag += fabs(b);
            }
            d->ref[m * N + n] = acc;
            d->bound[m * N + n] = mag + 1e-300;
        }
}

static void w4_free(w4data *d) {
    free(d->q);
    free(d->z);
    free(d->qweight);
    free(d->qzeros);
    free(d->g_idx);
    free(d->x);
    free(d->scales);
    free(d->bias);
    free(d->ref);
    free(d->bound);
}

static tops_w4a16_args w4_args(const w4data *d, void *out) {
    tops_w4a16_args a;
    memset(&a, 0, sizeof a);
    a.M = d->c.M;
    a.K = d->c.K;
    a.N = d->c.N;
    a.groups = d->G;
    a.group_size = d->c.gs;
    a.x = d->x;
    a.x_dtype = d->c.xd;
    a.x_row_stride = d->c.K + d->c.xpad;
    a.qweight = d->qweight;
    a.scales = d->scales;
    a.scales_dtype = d->c.sd;
    a.qzeros = d->qzeros;
    a.zero_format = d->c.zf ? d->c.zf : TOPS_ZEROS_V1;
    a.g_idx = d->g_idx;
    a.bias = d->bias;
    a.bias_dtype = d->c.bd >= 0 ? d->c.bd : TOPS_F32;
    a.out = out;
    a.out_dtype = d->c.od;
    return a;
}

static double w4_tol(int od) { return od == TOPS_F32 ? 1e-5 : od == TOPS_F16 ? 2e-3 : 1e-2; }

static double g_worst[3];

/* run over the column ranges splits[0..nsplit] and compare; columns outside [splits[0],
 * splits[nsplit]) must keep their sentinel. Returns the number of bad elements. */
static int w4_run_check(const w4data *d, const int64_t *splits, int nsplit, const char *what) {
    const int64_t M = d->c.M, N = d->c.N;
    size_t es = dsize(d->c.od);
    unsigned char *out = malloc((size_t)(M * N) * es + 1);
    memset(out, 0x5a, (size_t)(M * N) * es);
    tops_w4a16_args a = w4_args(d, out);
    for (int i = 0; i < nsplit; i++) {
        int st = tops_w4a16_linear(&a, splits[i], splits[i + 1]);
        CHECK(st == TOPS_OK);
    }
    int bad = 0;
    double tol = w4_tol(d->c.od), worst = 0.0;
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            if (n < splits[0] || n >= splits[nsplit]) {
                for (size_t b = 0; b < es; b++)
                    if (out[(m * N + n) * es + b] != 0x5a) bad++;
                continue;
            }
            double v = tops_load(out, d->c.od, m * N + n);
            double e = fabs(v - d->ref[m * N + n]) / d->bound[m * N + n];
            if (!(e <= tol)) {
                if (bad < 3)
                    fprintf(stderr, "  %s m=%lld n=%lld got %.9g ref %.9g (err %.3g)\n", what, (long long)m,
                            (long long)n, v, d->ref[m * N + n], e);
                bad++;
            }
            if (e > worst) worst = e;
        }
    if (worst > g_worst[d->c.od]) g_worst[d->c.od] = worst;
    free(out);
    tu_checks++;
    if (bad) {
        tu_failures++;
        fprintf(stderr,
                "FAIL %s: isa=%d M=%lld K=%lld N=%lld gs=%lld act=%d zf=%d zfill=%d x=%d s=%d out=%d bias=%d "
                "xpad=%lld: %d bad\n",
                what, tops_cpu_isa(), (long long)M, (long long)d->c.K, (long long)N, (long long)d->c.gs,
                d->c.act, d->c.zf, d->c.zfill, d->c.xd, d->c.sd, d->c.od, d->c.bd, (long long)d->c.xpad, bad);
    }
    return bad;
}

/* the case on every ISA level (for the vectorised GEMV, with and without the subnormal unpack, and
 * for bf16 x with and without vdpbf16ps, GEMV and blocked), whole range and split ranges */
static void w4_case(const w4case *c) {
    w4data d;
    w4_make(&d, c);
    const int64_t N = c->N;
    int top = tops_cpu_isa_detected();
    for (int isa = 0; isa <= top; isa++)
        for (int sub = 0; sub <= (isa > 0 && c->M <= 24); sub++) /* 24: the AVX2 GEMV's limit */
        for (int bfd = 0; bfd <= (isa >= TOPS_ISA_AVX512 && c->xd == TOPS_BF16 &&
                                  tops_w4a16_bf16dot_set(1)); bfd++) {
            tops_cpu_isa_set(isa);
            tops_w4a16_subnormal_set(sub);
            tops_w4a16_bf16dot_set(bfd);
            int64_t whole[2] = {0, N};
            w4_run_check(&d, whole, 1, "whole");
            if (N > 8) {
                int64_t s2[3] = {0, 8, N};
                w4_run_check(&d, s2, 2, "split8");
                int64_t cut = 8 * (int64_t)(1 + tu_rand() % (unsigned)(N / 8 - 1));
                int64_t s3[4] = {0, cut, cut, N}; /* includes an empty range */
                w4_run_check(&d, s3, 3, "split");
            }
            if (N > 16) {
                int64_t mid[2] = {8, N - 8}; /* sentinels on both sides */
                w4_run_check(&d, mid, 1, "middle");
            }
        }
    tops_cpu_isa_set(-1);
    tops_w4a16_subnormal_set(-1);
    tops_w4a16_bf16dot_set(-1);
    w4_free(&d);
}

static w4case w4_random_case(int64_t M, int64_t K, int64_t N, int64_t gs) {
    w4case c;
    c.M = M;
    c.K = K;
    c.N = N;
    c.gs = gs;
    c.act = (int)(tu_rand() % 3);
    c.zf = (int)(tu_rand() % 3);
    c.zfill = tu_rand() % 4 == 0 ? (tu_rand() % 2 ? 15 : 0) : -1;
    c.xd = (int)(tu_rand() % 3);
    c.sd = (int)(tu_rand() % 3);
    c.od = (int)(tu_rand() % 3);
    c.bd = (int)(tu_rand() % 4) - 1;
    c.xpad = tu_rand() % 2 ? 0 : 8 * (int64_t)(tu_rand() % 3) + (tu_rand() % 2);
    c.xscale = 0;
    return c;
}

/* the bf16-pair GEMV (vdpbf16ps) forced on, at the top ISA level: every x dtype (f32 and f16 x must
 * keep their fp32 products), M = 1..8, N with an 8-column tail, group sizes 32 / 64 / 128 / K and
 * act-order, symmetric and both zero formats, whole and split ranges; then x >= 0 (the 128 offset of
 * the bf16 weights makes the partial sums largest there). Skipped without AVX512_BF16. */
static void test_bf16dot(void) {
    if (tops_cpu_isa_detected() < TOPS_ISA_AVX512 || !tops_w4a16_bf16dot_set(1)) {
        printf("bf16dot: no AVX512_BF16 here, not tested\n");
        tops_w4a16_bf16dot_set(-1);
        return;
    }
    static const int64_t Ns[] = {8, 24, 40, 272};
    static const int64_t Gs[] = {32, 64, 128, 0, -1}; /* 0: K (one group), -1: act-order by 32 */
    int cases = 0;
    for (int pos = 0; pos < 2; pos++)
        for (int xd = 0; xd < 3; xd++)
            for (int64_t M = 1; M <= 8; M++)
                for (int ni = 0; ni < 4; ni++)
                    for (int gi = 0; gi < 5; gi++)
                        for (int zf = 0; zf < 3; zf++) {
                            if (pos && (xd != TOPS_BF16 || ni % 2)) continue;
                            const int64_t K = 256, gs = Gs[gi] > 0 ? Gs[gi] : Gs[gi] == 0 ? K : 32;
                            w4case c = {M, K, Ns[ni], gs, Gs[gi] < 0, zf, -1, xd, (int)(tu_rand() % 3),
                                        (int)(tu_rand() % 3), (int)(tu_rand() % 4) - 1, (int64_t)(M % 3), 0};
                            g_xpos = pos;
                            w4data d;
                            w4_make(&d, &c);
                            g_xpos = 0;
                            tops_cpu_isa_set(TOPS_ISA_AVX512);
                            tops_w4a16_bf16dot_set(1);
                            const int64_t N = c.N, cut = N > 16 ? 16 : 8;
                            int64_t whole[2] = {0, N}, s2[3] = {0, cut, N};
                            w4_run_check(&d, whole, 1, "bf16dot whole");
                            if (N > 8) w4_run_check(&d, s2, 2, "bf16dot split");
                            tops_w4a16_bf16dot_set(-1);
                            tops_cpu_isa_set(-1);
                            w4_free(&d);
                            cases++;
                        }
    printf("bf16dot: %d cases\n", cases);
}

/* the blocked bf16-pair path (vdpbf16ps, M > 8), with and without AMX tiles where they are available,
 * against the reference and against the fp32 blocked path (bf16dot off): M = 9..100 (uneven row
 * blocks; 16, 17, 64, 100 give the tiles full blocks and rows left over), group sizes 32 / 64 / 128
 * / K (K = 264 once: a run of one word, which the tiles leave to vdpbf16ps), g_idx k / gs
 * (plain groups given explicitly), sorted g_idx of uneven runs, and act-order (falls back to fp32), symmetric and both zero
 * formats, bias, N with an 8-column tail (the AVX2 path), strided x rows (odd strides too), K not a
 * multiple of 16 or of the k tile, x >= 0, split column ranges. Skipped without AVX512_BF16. */
static void test_bf16_blocked(void) {
    if (tops_cpu_isa_detected() < TOPS_ISA_AVX512 || !tops_w4a16_bf16dot_set(1)) {
        printf("bf16 blocked: no AVX512_BF16 here, not tested\n");
        tops_w4a16_bf16dot_set(-1);
        return;
    }
    static const int64_t Ms[] = {9, 16, 17, 64, 100};
    static const int64_t Ns[] = {72, 200, 48, 400};
    static const int64_t Gs[] = {32, 64, 128, 0}; /* 0: K (one group) */
    const int amx = tops_w4a16_amx_set(1);
    tops_w4a16_amx_set(-1);
    int cases = 0;
    double worst_diff = 0.0;
    for (int mi = 0; mi < 5; mi++)
        for (int gi = 0; gi < 4; gi++)
            for (int zf = 0; zf < 3; zf++) {
                const int64_t M = Ms[mi], N = Ns[(mi + gi + zf) % 4];
                const int64_t K = gi == 3 && zf == 1 ? 264 : (gi + zf) % 3 == 0 ? 1152 : (gi + zf) % 3 == 1 ? 256 : 640;
                const int64_t gs = Gs[gi] ? Gs[gi] : K;
                /* a few g_idx cases: act-order, k / gs, and runs of uneven length (the tiles take
                 * those of a multiple of 4 words, vdpbf16ps the others, in one k tile) */
                const int act = (mi + zf) % 5 == 4 ? 2 : (mi + gi) % 7 == 6 ? 1 : (mi + gi + zf) % 4 == 1 ? 3 : 0;
                w4case c = {M, K, N, gs, act, zf, -1, TOPS_BF16, (int)(tu_rand() % 3), (int)(tu_rand() % 3),
                            (int)(tu_rand() % 4) - 1, (mi + gi) % 3 == 0 ? 0 : (int64_t)(8 * (gi % 2) + zf % 2), 0};
                g_xpos = (mi + gi + zf) % 4 == 3;
                w4data d;
                w4_make(&d, &c);
                g_xpos = 0;
                const size_t es = dsize(c.od);
                unsigned char *o[3];
                tops_cpu_isa_set(TOPS_ISA_AVX512);
                static const char *names[3][2] = {{"fp32 blocked whole", "fp32 blocked split"},
                                                  {"bf16 blocked whole", "bf16 blocked split"},
                                                  {"bf16 blocked amx whole", "bf16 blocked amx split"}};
                for (int mode = 0; mode < 2 + amx; mode++) { /* fp32, bf16 pairs, bf16 pairs on tiles */
                    tops_w4a16_bf16dot_set(mode > 0);
                    tops_w4a16_amx_set(mode == 2);
                    int64_t whole[2] = {0, N}, s3[4] = {0, 16, N - 8, N};
                    w4_run_check(&d, whole, 1, names[mode][0]);
                    w4_run_check(&d, s3, 3, names[mode][1]);
                    o[mode] = malloc((size_t)(M * N) * es);
                    tops_w4a16_args a = w4_args(&d, o[mode]);
                    CHECK(tops_w4a16_linear(&a, 0, N) == TOPS_OK);
                }
                /* the bf16 paths agree with the fp32 one within the tolerance of the output dtype */
                for (int mode = 1; mode < 2 + amx; mode++) {
                    double diff = 0.0;
                    for (int64_t i = 0; i < M * N; i++) {
                        double e = fabs((double)tops_load(o[0], c.od, i) - tops_load(o[mode], c.od, i)) / d.bound[i];
                        if (e > diff) diff = e;
                    }
                    CHECK(diff <= w4_tol(c.od));
                    if (c.od == TOPS_F32 && diff > worst_diff) worst_diff = diff;
                }
                for (int mode = 0; mode < 2 + amx; mode++) free(o[mode]);
                tops_w4a16_amx_set(-1);
                tops_w4a16_bf16dot_set(-1);
                tops_cpu_isa_set(-1);
                w4_free(&d);
                cases++;
            }
    printf("bf16 blocked: %d cases%s, largest difference to the fp32 blocked path / bound (f32 out) %.3g\n", cases,
           amx ? " (each with AMX tiles too)" : " (no AMX tiles here)", worst_diff);
}

/* M around each path's limit: the GEMV takes up to 24 rows with AVX2, 20 with AVX-512 (11 for
 * bf16 x through vdpbf16ps), 8 for act-order, the blocked path the rest */
static void test_sweep(void) {
    static const int64_t Ms[] = {1, 2, 3, 7, 9, 11, 12, 20, 21, 24, 25, 64};
    static const int64_t Ns[] = {8, 24, 200, 264};
    static const int64_t Ks[] = {32, 128, 384};
    static const int64_t Gs[] = {32, 64, 128, 0};
    for (int mi = 0; mi < (int)(sizeof Ms / sizeof Ms[0]); mi++)
        for (int ni = 0; ni < 4; ni++)
            for (int ki = 0; ki < 3; ki++)
                for (int gi = 0; gi < 4; gi++) {
                    int64_t gs = Gs[gi] ? Gs[gi] : Ks[ki];
                    if (Ks[ki] % gs) continue;
                    w4case c = w4_random_case(Ms[mi], Ks[ki], Ns[ni], gs);
                    w4_case(&c);
                }
}

/* every (x, scales, out) dtype combination, GEMV and blocked, each bias dtype */
static void test_dtypes(void) {
    static const int64_t Ms[] = {2, 9, 30};
    for (int xd = 0; xd < 3; xd++)
        for (int sd = 0; sd < 3; sd++)
            for (int od = 0; od < 3; od++)
                for (int mi = 0; mi < 3; mi++) {
                    w4case c = {Ms[mi], 256, 72, 64, 0, 1, -1, xd, sd, od, (xd + sd + od) % 4 - 1, 3, 0};
                    w4_case(&c);
                }
}

/* the zero-point edge cases: z = 0 and z = 15 everywhere, v1 and v2, plain and act-order */
static void test_zero_edges(void) {
    for (int zf = 1; zf <= 2; zf++)
        for (int zv = 0; zv < 2; zv++)
            for (int act = 0; act < 2; act++)
                for (int mi = 0; mi < 2; mi++) {
                    w4case c = {mi ? 20 : 1, 128, 40, 32, act, zf, zv ? 15 : 0, TOPS_F32, TOPS_F32, TOPS_F32, -1, 0, 0};
                    w4_case(&c);
                }
    /* v1 nibble trap literal: zeros [0,5,3,9,15,1,8,2] pack to 0x170E824F */
    {
        w4case c = {1, 8, 8, 8, 0, 1, -1, TOPS_F32, TOPS_F32, TOPS_F32, -1, 0, 0};
        w4data d;
        w4_make(&d, &c);
        static const uint8_t zz[8] = {0, 5, 3, 9, 15, 1, 8, 2};
        memcpy(d.z, zz, 8);
        d.qzeros[0] = (int32_t)0x170E824Fu;
        for (int64_t n = 0; n < 8; n++) { /* recompute the reference with these zeros */
            double acc = 0.0;
            for (int64_t k = 0; k < 8; k++)
                acc += (double)tops_load(d.x, c.xd, k) * tops_load(d.scales, c.sd, n) * ((double)d.q[k * 8 + n] - zz[n]);
            d.ref[n] = acc;
        }
        int top = tops_cpu_isa_detected();
        for (int isa = 0; isa <= top; isa++) {
            tops_cpu_isa_set(isa);
            int64_t whole[2] = {0, 8};
            w4_run_check(&d, whole, 1, "v1-literal");
        }
        tops_cpu_isa_set(-1);
        w4_free(&d);
    }
}

/* group sizes that split a word of 8 k (not a multiple of 8), odd shapes, larger K and N; M = 1
 * reads a group of 8, 24 or 40 k (1, 3, 5 rows) in passes of up to 4 rows */
static void test_odd(void) {
    static const int64_t gss[] = {1, 2, 4, 8, 24, 40};
    static const int64_t ms[] = {3, 11, 1};
    for (int i = 0; i < 6; i++)
        for (int mi = 0; mi < 3; mi++) {
            w4case c = w4_random_case(ms[mi], 120, mi == 2 ? 200 : 48, gss[i]);
            w4_case(&c);
        }
    w4case big[] = {
        {1, 1024, 520, 128, 0, 2, -1, TOPS_F16, TOPS_F16, TOPS_F16, TOPS_F16, 0, 0},
        {4, 2048, 136, 128, 1, 1, -1, TOPS_BF16, TOPS_BF16, TOPS_BF16, -1, 0, 0},
        {17, 1032, 200, 8, 0, 1, -1, TOPS_F16, TOPS_F32, TOPS_F32, TOPS_F32, 5, 0},
        {300, 520, 40, 40, 1, 2, -1, TOPS_F32, TOPS_F16, TOPS_F16, -1, 8, 0},
        {5, 4096, 16, 4096, 0, 0, -1, TOPS_F32, TOPS_F32, TOPS_F32, -1, 0, 0},
    };
    for (size_t i = 0; i < sizeof big / sizeof big[0]; i++) w4_case(&big[i]);
    /* tiny and huge activations (the GEMV path pre-scales x by 2^-4j) */
    static const float scales[] = {1e-20f, 1e-37f, 1e15f};
    for (int i = 0; i < 3; i++)
        for (int xd = 0; xd < 3; xd += 2)
            for (int act = 0; act < 2; act++)
                for (int mi = 0; mi < 3; mi++) {
                    w4case c = {ms[mi], 256, 40, 64, act, 1, -1, xd, TOPS_F32, TOPS_F32, -1, 0, scales[i]};
                    w4_case(&c);
                }
}

/* a caller's DAZ (denormals are zero) and FTZ modes: the subnormal unpack still reads its operands
 * as they are, and both modes are as the caller left them afterwards */
static void test_daz(void) {
#if defined(__x86_64__)
    const unsigned csr = _mm_getcsr();
    _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);
    _MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON);
    for (int mi = 0; mi < 2; mi++) {
        w4case c = {mi ? 5 : 1, 256, 72, 64, 0, 1, -1, TOPS_F32, TOPS_F16, TOPS_F32, -1, 0, 0};
        w4_case(&c);
    }
    CHECK(_MM_GET_DENORMALS_ZERO_MODE() == _MM_DENORMALS_ZERO_ON);
    CHECK(_MM_GET_FLUSH_ZERO_MODE() == _MM_FLUSH_ZERO_ON);
    _mm_setcsr(csr);
#endif
}

static void test_errors(void) {
    w4case c = {2, 64, 32, 32, 1, 1, -1, TOPS_F32, TOPS_F16, TOPS_F32, TOPS_F32, 0, 0};
    w4data d;
    w4_make(&d, &c);
    float out[64];
    tops_w4a16_args a0 = w4_args(&d, out), a;
#define EXPECT(expr_setup, n0, n1, code)               \
    do {                                               \
        a = a0;                                        \
        expr_setup;                                    \
        CHECK(tops_w4a16_linear(&a, n0, n1) == (code)); \
    } while (0)
    EXPECT((void)0, 0, 32, TOPS_OK);
    CHECK(tops_w4a16_linear(NULL, 0, 32) == TOPS_ERR_ARG);
    EXPECT(a.K = 60, 0, 32, TOPS_ERR_ARG);           /* K % 8 */
    EXPECT(a.N = 36, 0, 32, TOPS_ERR_ARG);           /* N % 8 */
    EXPECT((a.g_idx = NULL, a.group_size = 24), 0, 32, TOPS_ERR_ARG); /* K % group_size */
    EXPECT(a.group_size = 0, 0, 32, TOPS_ERR_ARG);
    EXPECT((a.g_idx = NULL, a.groups = 3), 0, 32, TOPS_ERR_ARG); /* groups != K / group_size */
    EXPECT(a.groups = 0, 0, 32, TOPS_ERR_ARG);
    EXPECT((void)0, 4, 32, TOPS_ERR_ARG); /* range not a multiple of 8 */
    EXPECT((void)0, 0, 28, TOPS_ERR_ARG);
    EXPECT((void)0, 0, 40, TOPS_ERR_ARG); /* past N */
    EXPECT((void)0, 16, 8, TOPS_ERR_ARG);
    EXPECT((void)0, -8, 8, TOPS_ERR_ARG);
    EXPECT(a.x_dtype = 3, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.scales_dtype = -1, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.out_dtype = 7, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.bias_dtype = 9, 0, 32, TOPS_ERR_ARG);
    EXPECT((a.bias = NULL, a.bias_dtype = 9), 0, 32, TOPS_OK); /* no bias: its dtype is unused */
    EXPECT(a.zero_format = 0, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.qweight = NULL, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.x_row_stride = 63, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.M = -1, 0, 32, TOPS_ERR_ARG);
    EXPECT(a.M = 0, 0, 32, TOPS_OK);
    EXPECT((void)0, 8, 8, TOPS_OK);
    int32_t bad[64];
    memcpy(bad, d.g_idx, sizeof bad);
    bad[17] = 2; /* groups = 2 */
    EXPECT(a.g_idx = bad, 0, 32, TOPS_ERR_RANGE);
    bad[17] = -1;
    EXPECT(a.g_idx = bad, 0, 32, TOPS_ERR_RANGE);
    bad[17] = 1;
    EXPECT(a.g_idx = bad, 0, 32, TOPS_OK);
    /* with g_idx group_size is not read, so K need not be a multiple of it (a row shard of an
     * act-order layer): the same output whatever it is */
    float want[64], got[64];
    a = a0;
    a.out = want;
    CHECK(tops_w4a16_linear(&a, 0, 32) == TOPS_OK);
    for (int i = 0; i < 2; i++) {
        a = a0;
        a.out = got;
        a.group_size = i ? 24 : 128;
        memset(got, 0xff, sizeof got);
        CHECK(tops_w4a16_linear(&a, 0, 32) == TOPS_OK && !memcmp(got, want, sizeof got));
    }
#undef EXPECT
    w4_free(&d);
}

/* ================================== benchmark ======================================= */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    const uint64_t *p;
    size_t n;
    uint64_t sum;
} rd_job;

static void *rd_thread(void *arg) {
    rd_job *j = arg;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= j->n; i += 4) {
        s0 += j->p[i];
        s1 += j->p[i + 1];
        s2 += j->p[i + 2];
        s3 += j->p[i + 3];
    }
    j->sum = s0 + s1 + s2 + s3;
    return NULL;
}

static double read_bw(int threads) {
    const size_t bytes = (size_t)256 << 20, n = bytes / 8;
    uint64_t *buf = malloc(bytes);
    for (size_t i = 0; i < n; i++) buf[i] = i;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        rd_job jobs[2];
        pthread_t th[2];
        double t0 = now_s();
        for (int t = 0; t < threads; t++) {
            jobs[t].p = buf + n / threads * t;
            jobs[t].n = n / threads;
            if (threads > 1) pthread_create(&th[t], NULL, rd_thread, &jobs[t]);
            else rd_thread(&jobs[t]);
        }
        if (threads > 1)
            for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
        double dt = now_s() - t0;
        if (jobs[0].sum == 42) printf(" ");
        if (bytes / dt > best) best = bytes / dt;
    }
    free(buf);
    return best / 1e9;
}

typedef struct {
    tops_w4a16_args a;
    int64_t n0, n1;
} lin_job;

static void *lin_thread(void *arg) {
    lin_job *j = arg;
    if (tops_w4a16_linear(&j->a, j->n0, j->n1) != TOPS_OK) abort();
    return NULL;
}

/* median seconds per call over rotating weight copies (total > last-level cache) */
static double bench_linear(tops_w4a16_args *as, int ncopies, int threads, double budget) {
    double times[64];
    int reps = 0;
    double t_start = now_s();
    while (reps < 64 && (reps < 5 || now_s() - t_start < budget)) {
        tops_w4a16_args a = as[reps % ncopies];
        double t0 = now_s();
        if (threads == 1) {
            if (tops_w4a16_linear(&a, 0, a.N) != TOPS_OK) abort();
        } else {
            lin_job jobs[2] = {{a, 0, a.N / 16 * 8}, {a, a.N / 16 * 8, a.N}};
            pthread_t th;
            pthread_create(&th, NULL, lin_thread, &jobs[1]);
            lin_thread(&jobs[0]);
            pthread_join(th, NULL);
        }
        times[reps++] = now_s() - t0;
    }
    for (int i = 1; i < reps; i++) /* insertion sort */
        for (int j = i; j > 0 && times[j] < times[j - 1]; j--) {
            double t = times[j];
            times[j] = times[j - 1];
            times[j - 1] = t;
        }
    return times[reps / 2];
}

static int bench(const char *mlist) {
    static const char *isaname[] = {"scalar", "avx2", "avx512"};
    printf("w4a16 bench: isa %s, fp16 x / scales / out, v1 zeros, group 128, rotating weights > LLC\n",
           isaname[tops_cpu_isa()]);
    double bw1 = read_bw(1), bw2 = read_bw(2);
    printf("streaming read bandwidth (256 MB): 1 thread %.1f GB/s, 2 threads %.1f GB/s\n", bw1, bw2);
    static const int64_t sizes[][2] = {{4096, 4096}, {8192, 8192}};
    int64_t Ms[16] = {1, 4, 16, 64};
    int nm = 4;
    if (mlist) { /* --bench 1,8,64 */
        nm = 0;
        for (const char *p = mlist; *p && nm < 16;) {
            Ms[nm++] = strtoll(p, NULL, 10);
            while (*p && *p != ',') p++;
            if (*p == ',') p++;
        }
    }
    for (int si = 0; si < 2; si++) {
        const int64_t K = sizes[si][0], N = sizes[si][1], G = K / 128;
        const size_t qbytes = (size_t)(K / 8 * N) * 4;
        int ncopies = (int)(((size_t)160 << 20) / qbytes);
        if (ncopies < 2) ncopies = 2;
        int32_t *qw[64];
        void *sc[64];
        int32_t *qz[64];
        for (int c = 0; c < ncopies; c++) {
            qw[c] = malloc(qbytes);
            for (size_t i = 0; i < qbytes / 4; i++) qw[c][i] = (int32_t)(tu_rand() * 2654435761u);
            sc[c] = rand_tensor(G * N, TOPS_F16, 0.002f, 0.02f);
            qz[c] = malloc((size_t)(G * N / 8) * 4);
            for (int64_t i = 0; i < G * N / 8; i++) qz[c][i] = (int32_t)(tu_rand() * 2654435761u);
        }
        int64_t maxm = 1;
        for (int mi = 0; mi < nm; mi++)
            if (Ms[mi] > maxm) maxm = Ms[mi];
        void *x = rand_tensor(maxm * K, TOPS_F16, -1.0f, 1.0f);
        void *out = malloc((size_t)(maxm * N) * 2);
        int32_t *gidx = malloc((size_t)K * 4); /* act-order: a random permutation of k / 128 */
        for (int64_t k = 0; k < K; k++) gidx[k] = (int32_t)(k / 128);
        for (int64_t k = K - 1; k > 0; k--) {
            int64_t j = (int64_t)(tu_rand() % (unsigned)(k + 1));
            int32_t t = gidx[k];
            gidx[k] = gidx[j];
            gidx[j] = t;
        }
        for (int mi = 0; mi < nm + 2; mi++) { /* the last two: act-order at M = 1 and M = 16 */
            const int act = mi >= nm;
            const int64_t M = act ? (mi == nm ? 1 : 16) : Ms[mi];
            if (act && M > maxm) continue;
            tops_w4a16_args as[64];
            for (int c = 0; c < ncopies; c++) {
                tops_w4a16_args a;
                memset(&a, 0, sizeof a);
                a.M = M;
                a.K = K;
                a.N = N;
                a.groups = G;
                a.group_size = 128;
                a.x = x;
                a.x_dtype = TOPS_F16;
                a.x_row_stride = K;
                a.qweight = qw[c];
                a.scales = sc[c];
                a.scales_dtype = TOPS_F16;
                a.qzeros = qz[c];
                a.zero_format = TOPS_ZEROS_V1;
                a.out = out;
                a.out_dtype = TOPS_F16;
                a.g_idx = act ? gidx : NULL;
                as[c] = a;
            }
            for (int th = 1; th <= 2; th++) {
                double t = bench_linear(as, ncopies, th, M >= 16 ? 3.0 : 1.5);
                double gbs = (double)qbytes / t / 1e9;
                printf("K=%5lld N=%5lld M=%3lld%s threads=%d: %9.3f ms  %6.2f GB/s int4 (%3.0f%% of read bw)  "
                       "%7.1f GFLOP/s\n",
                       (long long)K, (long long)N, (long long)M, act ? " act-order" : "", th, t * 1e3, gbs,
                       100.0 * gbs / (th == 1 ? bw1 : bw2), 2.0 * (double)(M * K * N) / t / 1e9);
            }
        }
        for (int c = 0; c < ncopies; c++) {
            free(qw[c]);
            free(sc[c]);
            free(qz[c]);
        }
        free(gidx);
        free(x);
        free(out);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--bench") == 0) return bench(argc > 2 ? argv[2] : NULL);
    printf("isa levels tested: 0..%d\n", tops_cpu_isa_detected());
    test_errors();
    test_zero_edges();
    test_dtypes();
    test_odd();
    test_daz();
    test_bf16dot();
    test_bf16_blocked();
    test_sweep();
    printf("worst error / bound: f32 %.3g, f16 %.3g, bf16 %.3g\n", g_worst[0], g_worst[1], g_worst[2]);
    return tu_report("test_w4a16");
}

/*
 * test_threads.c - the C core called from several threads at once, as the torch binding calls it
 * (at::parallel_for hands each thread a [begin, end) range of one call; Python threads run whole
 * calls side by side): every range split run in parallel must equal the same split run serially,
 * and the ISA override must hold against a thread's first (lazy) detection.
 *
 * Under `make` (ASan/UBSan) this checks results and bounds; `make tsan` builds it with
 * ThreadSanitizer, which reports the core's unsynchronised globals (the ISA level, w4a16.c's cached
 * CPU detections) deterministically: before they were atomics it failed there.
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tops.h"
#include "testutil.h"

/* ---- 1. a thread's first tops_cpu_isa() racing with tops_cpu_isa_set on another ------------ */
static void *first_isa_read(void *p) {
    (void)p;
    (void)tops_cpu_isa();
    return NULL;
}
static void *isa_override(void *p) {
    (void)p;
    tops_cpu_isa_set(TOPS_ISA_SCALAR);
    return NULL;
}
/* must run before anything else in the process reads the ISA level */
static void test_isa_override_vs_first_use(void) {
    pthread_t r, s;
    pthread_create(&r, NULL, first_isa_read, NULL);
    pthread_create(&s, NULL, isa_override, NULL);
    pthread_join(r, NULL);
    pthread_join(s, NULL);
    /* the override ran, so it is in force whatever the order (the lazy detection once stored the
     * detected level over it) */
    CHECK(tops_cpu_isa() == TOPS_ISA_SCALAR);
    tops_cpu_isa_set(-1);
}

/* ---- 2. ranges of one call on parallel threads == the same ranges serially ------------------ */
enum { K = 256, N = 40, M = 30, GS = 64, NT = 3, PV_N = 64, PV_K = 128, PK_OUTER = 12 };
static int32_t qw[K / 8 * N], qz[K / GS * N / 8], aw[K * N / 8];
static uint16_t sc[K / GS * N], xh[M * K];
static uint8_t un[PV_N * PV_K], vals[PK_OUTER * 64];

typedef struct {
    int64_t m;
    int x_dtype;
    uint16_t *lin;   /* [M, N] */
    int16_t *pv;     /* [PV_N / 4, PV_K] */
    int32_t *gq;     /* [K / 8, N] */
    uint16_t *deq;   /* [N, K] f16 */
    uint8_t *pk;     /* [PK_OUTER, 24] 3-bit bytes */
    int status;
} outs;

static int64_t split(int64_t n, int t) { return n * t / NT; }

static void run_range(outs *o, int t) {
    /* w4a16 ranges: multiples of 8 columns, of different widths (8, 16, 16: the AVX-512 path takes
     * 16 at a time, an 8-column range goes to AVX2) */
    static const int64_t cut[NT + 1] = {0, 8, 24, 40};
    tops_w4a16_args a;
    memset(&a, 0, sizeof a);
    a.M = o->m, a.K = K, a.N = N, a.groups = K / GS, a.group_size = GS;
    a.x = xh, a.x_dtype = o->x_dtype, a.x_row_stride = K;
    a.qweight = qw, a.scales = sc, a.scales_dtype = TOPS_F16, a.qzeros = qz;
    a.zero_format = TOPS_ZEROS_V1, a.out = o->lin, a.out_dtype = o->x_dtype;
    int st = tops_w4a16_linear(&a, cut[t], cut[t + 1]);
    if (!st) st = tops_pack_v2(o->pv, un, PV_N, PV_K, split(PV_N / 4, t), split(PV_N / 4, t + 1));
    if (!st) st = tops_awq_to_gptq_qweight(o->gq, aw, K, N, split(K / 8, t), split(K / 8, t + 1));
    tops_dequant_args d;
    memset(&d, 0, sizeof d);
    d.format = TOPS_FORMAT_GPTQ, d.bits = 4, d.K = K, d.N = N, d.groups = K / GS, d.group_size = GS;
    d.qweight = qw, d.qzeros = qz, d.zero_format = TOPS_ZEROS_V1, d.scales = sc;
    d.scales_dtype = TOPS_F16, d.out = o->deq, d.out_dtype = TOPS_F16;
    if (!st) st = tops_dequantize(&d, split(N, t), split(N, t + 1));
    if (!st) st = tops_pack(o->pk, vals, PK_OUTER, 64, 1, 3, 1, TOPS_ORDER_SEQUENTIAL, split(PK_OUTER, t),
                            split(PK_OUTER, t + 1));
    if (st) o->status = st;
}

typedef struct {
    outs *o;
    int t;
} job;
static void *range_job(void *p) {
    job *j = (job *)p;
    run_range(j->o, j->t);
    return NULL;
}

static outs outs_new(int64_t m, int x_dtype) {
    outs o = {m, x_dtype, calloc(M * N, 2), calloc(PV_N / 4 * PV_K, 2), calloc(K / 8 * N, 4),
              calloc(N * K, 2), calloc(PK_OUTER * 24, 1), TOPS_OK};
    if (!o.lin || !o.pv || !o.gq || !o.deq || !o.pk) abort();
    return o;
}
static void outs_free(outs *o) {
    free(o->lin), free(o->pv), free(o->gq), free(o->deq), free(o->pk);
}
static int outs_equal(const outs *a, const outs *b) {
    return !memcmp(a->lin, b->lin, (size_t)(a->m * N) * 2) && !memcmp(a->pv, b->pv, PV_N / 4 * PV_K * 2) &&
           !memcmp(a->gq, b->gq, K / 8 * N * 4) && !memcmp(a->deq, b->deq, N * K * 2) &&
           !memcmp(a->pk, b->pk, PK_OUTER * 24);
}

static void test_ranges_in_parallel(void) {
    for (size_t i = 0; i < sizeof qw / 4; i++) qw[i] = (int32_t)(tu_rand() ^ (tu_rand() << 16));
    for (size_t i = 0; i < sizeof qz / 4; i++) qz[i] = (int32_t)(tu_rand() ^ (tu_rand() << 16));
    for (size_t i = 0; i < sizeof aw / 4; i++) aw[i] = (int32_t)(tu_rand() ^ (tu_rand() << 16));
    for (size_t i = 0; i < sizeof sc / 2; i++) sc[i] = (uint16_t)(0x2000 + tu_rand() % 0x400);
    /* f16 and bf16 bit patterns of magnitude near 1, either sign (the bf16 ones reach vdpbf16ps) */
    for (size_t i = 0; i < sizeof xh / 2; i++) xh[i] = (uint16_t)(0x3800 + tu_rand() % 0x800) | (tu_rand() & 0x8000u);
    for (size_t i = 0; i < sizeof un; i++) un[i] = tu_rand() & 15;
    for (size_t i = 0; i < sizeof vals; i++) vals[i] = tu_rand() & 7;
    for (int lvl = 0; lvl <= tops_cpu_isa_detected(); lvl++) {
        tops_cpu_isa_set(lvl);
        for (int dt = 0; dt < 2; dt++)
            for (int64_t m = 1; m <= M; m += 7) {
                const int x_dtype = dt ? TOPS_BF16 : TOPS_F16;
                outs par = outs_new(m, x_dtype), ser = outs_new(m, x_dtype);
                pthread_t th[NT];
                job jobs[NT];
                for (int t = 0; t < NT; t++) {
                    jobs[t] = (job){&par, t};
                    pthread_create(&th[t], NULL, range_job, &jobs[t]);
                }
                for (int t = 0; t < NT; t++) pthread_join(th[t], NULL);
                for (int t = 0; t < NT; t++) run_range(&ser, t);
                CHECK(par.status == TOPS_OK && ser.status == TOPS_OK);
                CHECK(outs_equal(&par, &ser));
                outs_free(&par);
                outs_free(&ser);
            }
    }
    tops_cpu_isa_set(-1);
}

int main(void) {
    test_isa_override_vs_first_use();
    test_ranges_in_parallel();
    return tu_report("test_threads");
}

/*
 * w4a16.c - the CPU fused w4a16 linear: out = x @ dequant(GPTQ 4-bit weight) + bias.
 *
 *   out[m, n] = sum_k x[m, k] * s[g(k), n] * (q[k, n] - z[g(k), n]) + bias[n]
 *
 * fp32 accumulation, one rounding to out_dtype at the end. GPTQ layout (FORMATS.md section 3):
 * q[k, n] = (qweight[k / 8, n] >> 4 * (k % 8)) & 15, so one int32 of a qweight row holds 8
 * consecutive k of one column and a row of qweight is contiguous along N: every path below
 * vectorises across N (8 columns per AVX2 vector, 16 per AVX-512 vector).
 *
 * Two algorithms, chosen by M:
 *
 * - Small M ("GEMV": M <= W4_GEMV_M_AVX2 = 24 with AVX2, W4_GEMV_M_AVX512 = 20 with AVX-512 (11
 *   for bf16 x through vdpbf16ps), W4_GEMV_M_ACT = 8 for act-order): the weight is never
 *   materialised. For every K-chunk that lies in one group the zero point is factored out,
 *       y[m, n] += s[g, n] * (sum_k q[k, n] * x[m, k]  -  z[g, n] * sum_k x[m, k]),
 *   so the inner loop is unpack + FMA only. The unpack of nibble j avoids the shift: the word is
 *   masked in place (q << 4j, exact as an int -> float conversion) and multiplied by x[k] * 2^-4j,
 *   pre-scaled once per call (nibble 7 uses a logical shift by 28, which also drops the sign bit).
 *   That is 3 vector operations per 8 (AVX2) / 16 (AVX-512) weights and row of x. On AMD Zen the
 *   conversion goes too: the masked word read as a float is the subnormal q * 2^(4j - 149), which
 *   Zen multiplies at full speed, so x is pre-scaled by 2^(127 - 4j) instead (w4_unpack_sub;
 *   nibbles 6 and 7 take a shift): 17 operations per 8 nibble slots instead of 24, off the
 *   conversion pipes that were the limit; with two accumulator sets the M = 1 GEMV runs 1.3x
 *   faster from L2 on Zen 3. Intel documents microcode assists for subnormal operands (not measured
 *   here): other CPUs keep the conversion. Loop order:
 *   K-chunk (up to W4_CHUNK_ROWS words, one group) outside; inside, passes of W4_PASS_ROWS rows
 *   over the columns, column blocks innermost, the sums of a chunk kept in a [M][ncols] buffer
 *   between its passes. Few rows at once because rows N * 4 bytes apart share L1 sets (N a multiple
 *   of 1024, as usual): 16 rows read together evict each other's lines, prefetched ones included.
 *   Each row is a stream, prefetched ahead and on into the next pass (AVX-512: into L2 4 KB ahead,
 *   into L1 512 B ahead, w4_prefetch_stream; AVX2: into L1 1 KB ahead). bf16 x on CPUs with AVX512_BF16 skips the float unpack altogether: a
 *   nibble pair plus a magic exponent is a bf16 pair, and vdpbf16ps does two exact products per
 *   lane (w4_bf16_kern: 11 vector operations per 8 nibble slots instead of 17).
 *   Act-order (g_idx whose groups change inside a word of 8 k, or group_size % 8 != 0) cannot
 *   factor per chunk: a chunk x block loop runs inside column super-blocks whose scales are
 *   converted once into an fp32 table [G][super-block] (~128 KB), the per-k scale is gathered from
 *   it (one multiply more per vector), and the zero term sum_g s z sum_{g(k)=g} x starts y.
 *   Why 24 rows with AVX2: the GEMV unpacks a word once per 4 rows of x (the registers hold 4 x 2
 *   accumulators), 2 operations per 8 weights next to 4 FMAs, so it stays FMA-bound at any M; the
 *   blocked path's dequantised tile pays off only over more rows. One Zen 3 thread, 4096 x 4096,
 *   fp32 x, ms, blocked -> GEMV: M = 9 5.88 -> 4.20, 12 6.86 -> 5.18, 16 7.92 -> 7.03, 20 9.88 ->
 *   8.82, 24 10.62 -> 10.42, 32 14.20 -> 13.96 (even). Act-order's GEMV (a scale per k) lost above
 *   8 rows (M = 16: 8.0 blocked, 12.3 GEMV). AVX-512 was tuned at 8 on Zen 4 and not re-measured
 *   (there a range's last N % 16 columns run the AVX2 code, so at M = 9..24 they take its GEMV:
 *   the same sums, another order).
 *
 * - Larger M ("blocked"): per tile of W4_KT (AVX-512: W4_KT / 2) x NT weights, dequantize once into
 *   an fp32 buffer laid out as panels of 2 vectors (16 KB each), then a register-blocked
 *   6 x (2 vectors) micro-kernel runs each panel against every row of x (up to W4_MC rows per pass);
 *   C accumulates in an fp32 [rows, NT] buffer. Scales and -z*s of the column tile are converted
 *   once per tile into a [G][NT] table, gathered per k, which also serves act-order.
 *   bf16 x with AVX512_BF16 and every word of 8 k in one group (plain groups of any size, g_idx
 *   included; not act-order) takes w4b_blocked instead: the weights as exact bf16 pairs
 *   (q_j - z, q_{j+4} - z) (a 32-entry vpermw table), dequantized panel by panel (48 columns x
 *   128 pairs, 24 KB: L1) and read by an 8 x (3 vectors) vdpbf16ps micro-kernel (24
 *   accumulators) against x packed once into scaled bf16 pairs; vdpbf16ps does 32 products per
 *   instruction where the fp32
 *   FMA does 16 (2x at M = 16..64 here). The products are exact and summed in fp32 per run of one
 *   group, then C += s * sum (the scale applied in fp32, not rounded into bf16 weights); no zero
 *   term is factored out of a sum, so none cancels. The first row block unpacks each panel while it
 *   multiplies it (the weight loads overlap its dot products), and the next tile's words are
 *   prefetched during the kernels of this one. Where the CPU has AMX (AMX-TILE, AMX-BF16) and
 *   Linux grants its state, full blocks of 16 rows take the panel's pairs as TDPBF16PS tiles
 *   instead (w4a_kern: the same exact products, 16 x 16 x 32 per instruction).
 *
 * Instruction sets: the AVX2 (+FMA, F16C) and AVX-512 variants are one template (the second half
 * of this file, included twice with different vector primitives), compiled with per-function
 * target attributes and picked at run time with tops_cpu_isa(); the AVX512_BF16 kernels (bf16 x,
 * GEMV and blocked, plain groups) are AVX-512 only and picked by cpuid (w4_bf16dot, which the tests
 * turn off to compare); the scalar path is independent
 * plain C (direct dequantization, no factoring; the only path off x86 or with -DW4_NO_SIMD).
 * Tests hold every path to a float64 reference.
 * The AVX-512 path takes multiples of 16 columns; an 8-column tail goes to the AVX2 path.
 *
 * Memory: one malloc per call (x in fp32, per-call tables and accumulators), freed before return;
 * TOPS_ERR_NOMEM if it fails.
 * Numerics: the GEMV scales each row of x by a power of two (exact) so that its largest |x| lies
 * in [1, 2): x * 2^-4j stays a normal float and x * 2^(127 - 4j) finite; its results are scaled
 * back at the end.
 */
#ifndef W4_TEMPLATE_PASS

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* syscall() under -std=c11 */
#endif
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(W4_NO_SIMD)
#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h> /* arch_prctl: permission for AMX state */
#include <unistd.h>
#endif
#define W4_X86 1
#else
#define W4_X86 0
#endif

/* ---- tuning ------------------------------------------------------------------------------------ */
#ifndef W4_PF_LOCALITY
#define W4_PF_LOCALITY 3 /* __builtin_prefetch locality: 3 = T0 */
#endif
#ifndef W4_GEMV_M_AVX2
#define W4_GEMV_M_AVX2 24 /* AVX2: M up to this takes the GEMV, above it the blocked path */
#endif
/* AVX-512: the same, and for bf16 x where vdpbf16ps gives it a blocked path of its own (whose
 * 8-row micro-kernels run part-empty just above 8 rows: M = 9 takes blocks of 5 and 4). Zen 4,
 * 2 threads, 4096^2 and 8192^2, us, limit 24 / 8 (thirty-fourth session): fp32 x M = 9 1,631 /
 * 1,983 and 6,503 / 7,955, M = 16 2,788 / 3,011 and 11,314 / 12,212, M = 20 3,534 / 3,595 and
 * 14,088 / 14,496, M = 24 equal; bf16 x M = 9 882 / 915 and 3,445 / 4,537, but M = 16 1,448 /
 * 1,410 and 5,977 / 5,805, M = 24 2,149 / 2,017 and 8,932 / 8,109 */
#ifndef W4_GEMV_M_AVX512
#define W4_GEMV_M_AVX512 20
#endif
#ifndef W4_GEMV_M_AVX512_BF16
#define W4_GEMV_M_AVX512_BF16 11
#endif
#ifndef W4_GEMV_M_ACT
#define W4_GEMV_M_ACT 8   /* act-order (groups changing inside a word of 8 k): the same, any ISA */
#endif
/* KN(w4_gemv)'s answer to an x holding +-inf (its zero-point factoring would give NaN), and its and
 * w4b_blocked's to a scale of +-inf (s times a sum gives +-inf where F.linear of the dequantized
 * weight has NaN: s (q - z) is NaN where q = z): take the fp32 path that multiplies every weight.
 * Not a tops_status: it never leaves w4_run. */
#define W4_INFINITE_X (-1)

/* whether a scale of columns [nb, ne) (of any group) is +-inf or NaN */
static int w4_scales_nonfinite(const tops_w4a16_args *a, int64_t nb, int64_t ne) {
    for (int64_t g = 0; g < a->groups; g++)
        for (int64_t n = nb; n < ne; n++)
            if (!isfinite(tops_load(a->scales, a->scales_dtype, g * a->N + n))) return 1;
    return 0;
}
/* the largest GEMV M of any instruction set (sizes the GEMV's per-row arrays) */
#define W4_MAX2(a, b) ((a) > (b) ? (a) : (b))
#define W4_GEMV_MAX_M \
    W4_MAX2(W4_MAX2(W4_GEMV_M_AVX2, W4_GEMV_M_AVX512), W4_MAX2(W4_GEMV_M_AVX512_BF16, W4_GEMV_M_ACT))
#ifndef W4_CHUNK_ROWS
#define W4_CHUNK_ROWS 16  /* qweight rows (8 k each) per K-chunk in the GEMV path */
#endif
#ifndef W4_PASS_ROWS
#define W4_PASS_ROWS 4    /* GEMV: qweight rows read together in one pass over the columns */
#endif
#ifndef W4_PF_STREAM
#define W4_PF_STREAM 1024 /* GEMV, AVX2: prefetch (T0) this many bytes ahead in the stream of each row */
#endif
#ifndef W4_PF_STREAM512
#define W4_PF_STREAM512 4096 /* GEMV, AVX-512: the same into L2 (T1, w4_prefetch_stream) ... */
#endif
#ifndef W4_PF_NEAR512
#define W4_PF_NEAR512 512 /* ... and into L1 (T0) this many bytes ahead */
#endif
#ifndef W4_PF_ROWS
#define W4_PF_ROWS 16     /* dequant: prefetch this many qweight rows ahead */
#endif
#ifndef W4_KT
#define W4_KT 256         /* blocked: k per dequantized tile for AVX2 (AVX-512: half; multiple of 16) */
#endif
#ifndef W4_MC
#define W4_MC 256         /* blocked: rows of x per pass */
#endif

/* ---- shared helpers ---------------------------------------------------------------------------- */
static inline int64_t w4_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* zero point of (group g, column n), as a float */
static inline float w4_zero(const tops_w4a16_args *a, int64_t g, int64_t n) {
    if (!a->qzeros) return 8.0f;
    uint32_t w = (uint32_t)a->qzeros[g * (a->N / 8) + n / 8];
    uint32_t f = (w >> (4 * (n % 8))) & 15u;
    if (a->zero_format == TOPS_ZEROS_V1) f = (f + 1u) & 15u;
    return (float)f;
}

/* group of every k into gk[K]; returns 1 when each word of 8 k lies in one group */
static int w4_groups(const tops_w4a16_args *a, int32_t *gk) {
    const int64_t K = a->K;
    if (a->g_idx) {
        memcpy(gk, a->g_idx, (size_t)K * sizeof(int32_t));
    } else {
        for (int64_t g = 0, k = 0; k < K; g++)
            for (int64_t e = k + a->group_size; k < e; k++) gk[k] = (int32_t)g;
    }
    for (int64_t k = 0; k < K; k += 8)
        for (int64_t j = 1; j < 8; j++)
            if (gk[k + j] != gk[k]) return 0;
    return 1;
}

static size_t w4_align(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

static int w4_check(const tops_w4a16_args *a, int64_t n_begin, int64_t n_end) {
    if (!a) return TOPS_ERR_ARG;
    if (a->M < 0 || a->K <= 0 || a->N <= 0 || a->K % 8 || a->N % 8) return TOPS_ERR_ARG;
    if (a->group_size <= 0 || a->groups <= 0) return TOPS_ERR_ARG;
    /* with g_idx group_size is not read: K need not be a multiple of it (a row shard of an
     * act-order layer holds any rows of it) */
    if (!a->g_idx && (a->K % a->group_size || a->groups != a->K / a->group_size)) return TOPS_ERR_ARG;
    if (a->groups > INT32_MAX) return TOPS_ERR_ARG;
    if (!tops_dtype_valid(a->x_dtype) || !tops_dtype_valid(a->scales_dtype) ||
        !tops_dtype_valid(a->out_dtype))
        return TOPS_ERR_ARG;
    if (a->bias && !tops_dtype_valid(a->bias_dtype)) return TOPS_ERR_ARG;
    if (a->qzeros && a->zero_format != TOPS_ZEROS_V1 && a->zero_format != TOPS_ZEROS_V2)
        return TOPS_ERR_ARG;
    if (!a->qweight || !a->scales || (a->M > 0 && (!a->x || !a->out))) return TOPS_ERR_ARG;
    if (a->M > 1 && a->x_row_stride < a->K) return TOPS_ERR_ARG;
    if (n_begin < 0 || n_end > a->N || n_begin > n_end) return TOPS_ERR_ARG;
    if (n_begin % 8 || (n_end % 8 && n_end != a->N)) return TOPS_ERR_ARG;
    if (a->g_idx)
        for (int64_t k = 0; k < a->K; k++)
            if (a->g_idx[k] < 0 || a->g_idx[k] >= a->groups) return TOPS_ERR_RANGE;
    return TOPS_OK;
}

static inline void w4_store_out(const tops_w4a16_args *a, int64_t m, int64_t n, float v) {
    if (a->bias) v += tops_load(a->bias, a->bias_dtype, n);
    tops_store(a->out, a->out_dtype, m * a->N + n, v);
}

/* Whether the GEMV may use the subnormal unpack (w4_unpack_sub), which feeds subnormal operands to
 * FMAs: at full speed on AMD Zen (family 17h on; measured on Zen 3: the same throughput as normal
 * operands); Intel documents microcode assists for them. Decided by the CPU vendor and family;
 * tops_w4a16_subnormal_set (not in tops.h: for the tests) forces it on (1) or off (0), -1 restores
 * the detected choice. Returns the choice now in force. */
int tops_w4a16_subnormal_set(int mode);
/* This flag, w4_bfd_forced and the two cached detections below are read by every thread running a
 * kernel: atomics (relaxed: they guard no other data), as plain ints they were data races
 * (ThreadSanitizer, csrc/tests/test_threads.c). */
static _Atomic int w4_sub_forced = -1;

static int w4_subnormal_detected(void) {
#if W4_X86
    static _Atomic int zen_cached = -1;
    int zen = atomic_load_explicit(&zen_cached, memory_order_relaxed);
    if (zen < 0) {
        unsigned eax, ebx, ecx, edx;
        int amd = __get_cpuid(0, &eax, &ebx, &ecx, &edx) && ebx == 0x68747541u && edx == 0x69746e65u &&
                  ecx == 0x444d4163u; /* "AuthenticAMD" */
        unsigned fam = 0;
        if (amd && __get_cpuid(1, &eax, &ebx, &ecx, &edx)) {
            fam = (eax >> 8) & 15u;
            if (fam == 15u) fam += (eax >> 20) & 255u;
        }
        zen = fam >= 0x17u;
        atomic_store_explicit(&zen_cached, zen, memory_order_relaxed); /* (every thread finds the same) */
    }
    return zen;
#else
    return 0;
#endif
}

static int w4_subnormal_fast(void) {
    const int forced = atomic_load_explicit(&w4_sub_forced, memory_order_relaxed);
    return forced >= 0 ? forced : w4_subnormal_detected();
}

int tops_w4a16_subnormal_set(int mode) {
    atomic_store_explicit(&w4_sub_forced, mode < 0 ? -1 : mode != 0, memory_order_relaxed);
    return w4_subnormal_fast();
}

/* Whether the GEMV and the blocked path may take bf16 activations through AVX512_BF16's vdpbf16ps
 * (w4_bf16_kern, w4b_blocked): two products per fp32 lane per instruction, each exact (a bf16 x
 * times an integer below 2^8 fits fp32's 24 bits) and accumulated in fp32. Detected with cpuid (leaf 7, subleaf 1, EAX bit 5);
 * tops_w4a16_bf16dot_set (not in tops.h: for the tests) turns it off (0) or on (1, where the CPU has
 * it), -1 restores the detected choice. Returns the choice now in force. */
int tops_w4a16_bf16dot_set(int mode);
static _Atomic int w4_bfd_forced = -1;

static int w4_bf16dot_detected(void) {
#if W4_X86
    static _Atomic int has_cached = -1;
    int has = atomic_load_explicit(&has_cached, memory_order_relaxed);
    if (has < 0) {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        has = __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && (eax >> 5 & 1u);
        atomic_store_explicit(&has_cached, has, memory_order_relaxed);
    }
    return has;
#else
    return 0;
#endif
}

/* a CPU feature the tests can turn off: in force where detected, unless forced off (forced: -1 as
 * detected, 0 off, 1 on where detected) */
static int w4_feature(_Atomic int *forced, int (*detected)(void)) {
    return atomic_load_explicit(forced, memory_order_relaxed) != 0 && detected();
}

static int w4_feature_set(_Atomic int *forced, int (*detected)(void), int mode) {
    atomic_store_explicit(forced, mode < 0 ? -1 : mode != 0, memory_order_relaxed);
    return w4_feature(forced, detected);
}

static int w4_bf16dot(void) { return w4_feature(&w4_bfd_forced, w4_bf16dot_detected); }

int tops_w4a16_bf16dot_set(int mode) { return w4_feature_set(&w4_bfd_forced, w4_bf16dot_detected, mode); }

/* AMX tiles in w4b_blocked (below): built where the compiler has the tile intrinsics and Linux can
 * grant the state; W4_AMX_EMULATE (the C tests' second build) models the tile instructions in C */
#if W4_X86 && (defined(W4_AMX_EMULATE) ||                                                           \
               (defined(__linux__) && (defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)))
#define W4_AMX 1
#else
#define W4_AMX 0
#endif

/* Whether w4b_blocked runs its full row blocks on AMX tiles: cpuid (leaf 7: EDX bit 24 AMX-TILE, bit
 * 22 AMX-BF16), the OS's XCR0 tile state (bits 17, 18), and Linux's permission, asked for once.
 * tops_w4a16_amx_set (the tests' and the benchmark's switch) turns it off (0) or on (1, where
 * available), -1 restores the detected choice; returns the choice now in force. */
static _Atomic int w4_amx_forced = -1;

static int w4_amx_detected(void) {
#if W4_AMX && defined(W4_AMX_EMULATE)
    return 1;
#elif W4_AMX
    static _Atomic int has_cached = -1;
    int has = atomic_load_explicit(&has_cached, memory_order_relaxed);
    if (has < 0) {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0, xlo = 0, xhi = 0;
        has = __get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) && (edx >> 24 & 1u) && (edx >> 22 & 1u) &&
              __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx >> 27 & 1u); /* OSXSAVE: xgetbv */
        if (has) {
            __asm__ volatile("xgetbv" : "=a"(xlo), "=d"(xhi) : "c"(0));
            has = (xlo >> 17 & 3u) == 3u;
        }
        /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18): idempotent, process-wide */
        if (has) has = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
        atomic_store_explicit(&has_cached, has, memory_order_relaxed);
    }
    return has;
#else
    return 0;
#endif
}

static int w4_amx(void) { return w4_feature(&w4_amx_forced, w4_amx_detected); }

int tops_w4a16_amx_set(int mode) { return w4_feature_set(&w4_amx_forced, w4_amx_detected, mode); }

/* ---- scalar path: direct dequantization, 8 columns (one qzeros word) x up to 64 rows at a time -- */
static int w4_scalar(const tops_w4a16_args *a, int64_t nb, int64_t ne) {
    const int64_t M = a->M, K = a->K, N = a->N, MB = w4_min(M, 64);
    size_t bytes = w4_align((size_t)(MB * K) * sizeof(float)) + w4_align((size_t)(MB * 8) * sizeof(float)) +
                   w4_align((size_t)K * sizeof(int32_t));
    char *ws = (char *)malloc(bytes);
    if (!ws) return TOPS_ERR_NOMEM;
    float *xf = (float *)ws;
    float *y = (float *)(ws + w4_align((size_t)(MB * K) * sizeof(float)));
    int32_t *gk = (int32_t *)((char *)y + w4_align((size_t)(MB * 8) * sizeof(float)));
    w4_groups(a, gk);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = w4_min(MB, M - m0);
        for (int64_t m = 0; m < mb; m++)
            for (int64_t k = 0; k < K; k++)
                xf[m * K + k] = tops_load(a->x, a->x_dtype, (m0 + m) * a->x_row_stride + k);
        for (int64_t n0 = nb; n0 < ne; n0 += 8) {
            float s[8], z[8], w[8];
            int64_t gprev = -1;
            memset(y, 0, (size_t)(mb * 8) * sizeof(float));
            for (int64_t k = 0; k < K; k++) {
                const int64_t g = gk[k];
                if (g != gprev) {
                    for (int c = 0; c < 8; c++) {
                        s[c] = tops_load(a->scales, a->scales_dtype, g * N + n0 + c);
                        z[c] = w4_zero(a, g, n0 + c);
                    }
                    gprev = g;
                }
                const int32_t *row = a->qweight + (k / 8) * N + n0;
                for (int c = 0; c < 8; c++) {
                    uint32_t q = ((uint32_t)row[c] >> (4 * (k % 8))) & 15u;
                    w[c] = s[c] * ((float)q - z[c]);
                }
                for (int64_t m = 0; m < mb; m++) {
                    const float xv = xf[m * K + k];
                    for (int c = 0; c < 8; c++) y[m * 8 + c] += xv * w[c];
                }
            }
            for (int64_t m = 0; m < mb; m++)
                for (int c = 0; c < 8; c++) w4_store_out(a, m0 + m, n0 + c, y[m * 8 + c]);
        }
    }
    free(ws);
    return TOPS_OK;
}

#if W4_X86
#define W4_CAT2(a, b) a##_##b
#define W4_CAT(a, b) W4_CAT2(a, b)
#define KN(name) W4_CAT(name, W4_ISA)
#define W4_INLINE inline __attribute__((always_inline))

/* prefetch p + off bytes (possibly past the array: a prefetch never faults) */
#define w4_prefetch(p, off) __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)(off)), 0, W4_PF_LOCALITY)
/* The GEMV's row streams, AVX-512 path: each line prefetched into L2 only (prefetcht1) 4 KB ahead,
 * then into L1 512 B ahead. A T0 prefetch holds an L1 miss buffer until its line arrives from DRAM,
 * and with a few dozen of those per core, T0 alone 1 KB ahead capped the M = 1 GEMV at 2 threads
 * (Zen 4, weights streamed from DRAM: T1 4 KB ahead took 0.82x the time, 2-8 KB alike, 16 KB
 * 0.88x); the near T0 keeps weights that sit in L3 as fast as before (T1 alone: 1.02-1.08x there).
 * The AVX2 path keeps T0 1 KB ahead (tuned on Zen 3; not re-measured on an AVX2-only CPU). */
#define w4_prefetch_stream(p, off) __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)(off)), 0, 2)

/* ================================ AVX2 + FMA + F16C primitives ================================== */
#define W4_ISA avx2
#define KATTR __attribute__((target("avx2,fma,f16c")))
#define VW 8
#define VF __m256
#define VI __m256i
#define vf_zero() _mm256_setzero_ps()
#define vf_set1(f) _mm256_set1_ps(f)
#define vf_bcast(p) _mm256_broadcast_ss(p)
#define vf_load(p) _mm256_loadu_ps(p)
#define vf_store(p, v) _mm256_storeu_ps(p, v)
#define vf_add(a, b) _mm256_add_ps(a, b)
#define vf_sub(a, b) _mm256_sub_ps(a, b)
#define vf_mul(a, b) _mm256_mul_ps(a, b)
#define vf_fma(a, b, c) _mm256_fmadd_ps(a, b, c)   /* a * b + c */
#define vf_fnma(a, b, c) _mm256_fnmadd_ps(a, b, c) /* c - a * b */
#define vf_max(a, b) _mm256_max_ps(a, b)
#define vf_abs(a) _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a)
#define vi_load(p) _mm256_loadu_si256((const __m256i *)(const void *)(p))
#define vi_set1(i) _mm256_set1_epi32(i)
#define vi_and(a, b) _mm256_and_si256(a, b)
#define vi_srli(a, c) _mm256_srli_epi32(a, c)
#define vi_cvt(a) _mm256_cvtepi32_ps(a)
#define vf_cast(a) _mm256_castsi256_ps(a) /* the same bits as floats */

static KATTR W4_INLINE VF w4_load_avx2(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case TOPS_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    case TOPS_BF16:
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    default: return _mm256_loadu_ps((const float *)p + i);
    }
}

/* zero points of columns n .. n+7 of group g (n a multiple of 8: one qzeros word) */
static KATTR W4_INLINE VF w4_zeros_avx2(const tops_w4a16_args *a, int64_t g, int64_t n) {
    if (!a->qzeros) return _mm256_set1_ps(8.0f);
    __m256i w = _mm256_set1_epi32(a->qzeros[g * (a->N / 8) + n / 8]);
    __m256i f = _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28)),
                                 _mm256_set1_epi32(15));
    if (a->zero_format == TOPS_ZEROS_V1)
        f = _mm256_and_si256(_mm256_add_epi32(f, _mm256_set1_epi32(1)), _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(f);
}

/* round v to bfloat16 (nearest even, NaN kept quiet) as 32-bit lanes holding the 16-bit result */
static KATTR W4_INLINE __m256i w4_bf16_bits_avx2(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i r = _mm256_add_epi32(
        u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                            _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                     _mm256_set1_epi32(0x7f800000));
    __m256i qn = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(r, qn, nan);
}

static KATTR W4_INLINE void w4_store_avx2(void *p, int dtype, int64_t i, __m256 v) {
    switch (dtype) {
    case TOPS_F16:
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        break;
    case TOPS_BF16: {
        __m256i r = w4_bf16_bits_avx2(v);
        r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
        _mm_storeu_si128((__m128i *)((uint16_t *)p + i), _mm256_castsi256_si128(r));
        break;
    }
    default: _mm256_storeu_ps((float *)p + i, v); break;
    }
}

#define W4_BF16DOT 0
#define W4_GEMV_M W4_GEMV_M_AVX2
#define W4_PF_FAR W4_PF_STREAM /* GEMV stream prefetch: bytes ahead, T0 */
#define W4_PF_FAR_T1 0
#define W4_PF_NEAR 0
#define vf_loadt(p, dtype, i) w4_load_avx2(p, dtype, i)
#define vf_storet(p, dtype, i, v) w4_store_avx2(p, dtype, i, v)
#define vf_zeros(a, g, n) w4_zeros_avx2(a, g, n)

#define W4_TEMPLATE_PASS 1
#include "w4a16.c"
#undef W4_TEMPLATE_PASS

#undef W4_ISA
#undef KATTR
#undef VW
#undef VF
#undef VI
#undef vf_zero
#undef vf_set1
#undef vf_bcast
#undef vf_load
#undef vf_store
#undef vf_add
#undef vf_sub
#undef vf_mul
#undef vf_fma
#undef vf_fnma
#undef vf_max
#undef vf_abs
#undef vi_load
#undef vi_set1
#undef vi_and
#undef vi_srli
#undef vi_cvt
#undef vf_cast
#undef vf_loadt
#undef vf_storet
#undef vf_zeros
#undef W4_BF16DOT
#undef W4_GEMV_M
#undef W4_PF_FAR
#undef W4_PF_FAR_T1
#undef W4_PF_NEAR

/* ===================== AVX-512 (F, BW, VL) primitives: the same code, 16 lanes ===================== */
#define W4_ISA avx512
#define KATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
#define VW 16
#define VF __m512
#define VI __m512i
#define vf_zero() _mm512_setzero_ps()
#define vf_set1(f) _mm512_set1_ps(f)
#define vf_bcast(p) _mm512_set1_ps(*(p))
#define vf_load(p) _mm512_loadu_ps(p)
#define vf_store(p, v) _mm512_storeu_ps(p, v)
#define vf_add(a, b) _mm512_add_ps(a, b)
#define vf_sub(a, b) _mm512_sub_ps(a, b)
#define vf_mul(a, b) _mm512_mul_ps(a, b)
#define vf_fma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vf_fnma(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define vf_max(a, b) _mm512_max_ps(a, b)
#define vf_abs(a) _mm512_abs_ps(a)
#define vi_load(p) _mm512_loadu_si512((const void *)(p))
#define vi_set1(i) _mm512_set1_epi32(i)
#define vi_and(a, b) _mm512_and_si512(a, b)
#define vi_srli(a, c) _mm512_srli_epi32(a, c)
#define vi_cvt(a) _mm512_cvtepi32_ps(a)
#define vf_cast(a) _mm512_castsi512_ps(a)

static KATTR W4_INLINE __m512 w4_load_avx512(const void *p, int dtype, int64_t i) {
    switch (dtype) {
    case TOPS_F16:
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i)));
    case TOPS_BF16:
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    default: return _mm512_loadu_ps((const float *)p + i);
    }
}

/* zero points of columns n .. n+15 of group g (two qzeros words) */
static KATTR W4_INLINE __m512 w4_zeros_avx512(const tops_w4a16_args *a, int64_t g, int64_t n) {
    if (!a->qzeros) return _mm512_set1_ps(8.0f);
    const int32_t *p = a->qzeros + g * (a->N / 8) + n / 8;
    __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(p[0])),
                                   _mm256_set1_epi32(p[1]), 1);
    __m512i f = _mm512_and_si512(
        _mm512_srlv_epi32(w, _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28)),
        _mm512_set1_epi32(15));
    if (a->zero_format == TOPS_ZEROS_V1)
        f = _mm512_and_si512(_mm512_add_epi32(f, _mm512_set1_epi32(1)), _mm512_set1_epi32(15));
    return _mm512_cvtepi32_ps(f);
}

static KATTR W4_INLINE void w4_store_avx512(void *p, int dtype, int64_t i, __m512 v) {
    switch (dtype) {
    case TOPS_F16:
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        break;
    case TOPS_BF16: {
        __m512i u = _mm512_castps_si512(v);
        __m512i r = _mm512_add_epi32(
            u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
        r = _mm512_srli_epi32(r, 16);
        __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
        r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
        _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), _mm512_cvtepi32_epi16(r));
        break;
    }
    default: _mm512_storeu_ps((float *)p + i, v); break;
    }
}

/* ---- bf16 activations through vdpbf16ps (AVX512_BF16) ---------------------------------------------
 * A nibble pair becomes a bf16 pair without a conversion: (w >> 4j) & 0x000F000F | 0x43004300 (one
 * vpternlogd after the shift) holds the bf16 values 128 + q_j (low half) and 128 + q_{j+4} (high
 * half), exactly (bf16 128 has an ulp of 1). vdpbf16ps multiplies them by the bf16 pair
 * (x[8r + j], x[8r + j + 4]) of xq (x scaled as in the GEMV, exact for bf16 x) and adds both products
 * to the fp32 lane: 4 shifts-or-not + 4 vpternlogd + 4 vdpbf16ps per 8 nibble slots where the
 * subnormal unpack takes 9 + 8. The 128 goes with the zero point: y += s (acc - (z + 128) xc). The
 * instruction reads denormal inputs as zero and flushes denormal results: the magic exponent keeps
 * the weights normal, and x (its largest |x| scaled into [1, 2)) loses only values below 2^-126 of
 * its largest. Same loop structure and arguments as w4_gemv_kern, xq in place of xp (ldx in
 * pairs, 4 per row of qweight). Up to 4 rows x 4 vectors: the 32 AVX-512 registers hold them. */
#define W4B_SETS(n) ((n) >= 8 ? 1 : (n) >= 4 ? 2 : 4)
#define BATTR __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))

/* the bf16 pairs (128 + q_j, 128 + q_{j+4}) of 16 words, exact: nibbles j and j + 4 of each word
 * under the 0x4300 exponent (mask 0x000F000F, magic 0x43004300) */
static BATTR W4_INLINE __m512i w4_bf16_pairs(__m512i w, const int j, __m512i mask, __m512i magic) {
    return _mm512_ternarylogic_epi32(j ? _mm512_srli_epi32(w, 4 * j) : w, mask, magic, 0xEA);
}

static BATTR W4_INLINE void w4_bf16_kern(const int MR, const int NV, int first, int last,
                                         const tops_w4a16_args *a, int64_t g, int64_t n, int64_t nblk,
                                         const int32_t *qw, int64_t nrows, int64_t pfn, int64_t rem,
                                         int64_t wrap, const uint32_t *xq, int64_t ldx, const float *xc,
                                         float *part, float *y, int64_t ldy) {
    const int64_t ldq = a->N;
    const int S = W4B_SETS(MR * NV);
    const __m512i mask = _mm512_set1_epi32(0x000F000F), magic = _mm512_set1_epi32(0x43004300);
    for (int64_t o = 0; o < nblk * NV * 16; o += NV * 16) {
        const int64_t pf = 4 * (pfn < rem - o ? pfn : pfn + wrap); /* bytes */
        const int64_t pn = pfn < W4_PF_NEAR512 / 4 ? pfn : W4_PF_NEAR512 / 4;
        const int64_t pfl = 4 * (pn < rem - o ? pn : pn + wrap);
        __m512 acc[4][4][4];
#pragma GCC unroll 4
        for (int i = 0; i < S; i++)
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++)
                    acc[i][m][v] = first || i ? _mm512_setzero_ps() : _mm512_loadu_ps(part + m * ldy + o + v * 16);
        for (int64_t r = 0; r < nrows; r++) {
            const int32_t *row = qw + r * ldq + o;
#pragma GCC unroll 4
            for (int l = 0; l < NV; l++) {
                w4_prefetch_stream(row + l * 16, pf);
                w4_prefetch(row + l * 16, pfl);
            }
            __m512i w[4];
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) w[v] = _mm512_loadu_si512((const void *)(row + v * 16));
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m512i xb[4];
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) xb[m] = _mm512_set1_epi32((int)xq[m * ldx + 4 * r + j]);
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) {
                    const __m512i t = w4_bf16_pairs(w[v], j, mask, magic);
#pragma GCC unroll 4
                    for (int m = 0; m < MR; m++)
                        acc[j % S][m][v] = _mm512_dpbf16_ps(acc[j % S][m][v], (__m512bh)t, (__m512bh)xb[m]);
                }
            }
        }
        /* the S sets (1, 2 or 4) summed pairwise; a loop for any S, h from S down, was unrolled
         * by a newer GCC into dead iterations it warned would read acc[5] and acc[7] */
#pragma GCC unroll 2
        for (int h = S / 2; h >= 1; h /= 2)
#pragma GCC unroll 2
            for (int k = 0; k < h; k++)
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
                    for (int v = 0; v < NV; v++)
                        acc[k][m][v] = _mm512_add_ps(acc[k][m][v], acc[k + h][m][v]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            const int64_t c = o + v * 16;
            if (!last) {
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) _mm512_storeu_ps(part + m * ldy + c, acc[0][m][v]);
                continue;
            }
            const __m512 sv = w4_load_avx512(a->scales, a->scales_dtype, g * ldq + n + c);
            const __m512 zv = _mm512_add_ps(w4_zeros_avx512(a, g, n + c), _mm512_set1_ps(128.0f));
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) {
                float *yp = y + m * ldy + c;
                _mm512_storeu_ps(yp, _mm512_fmadd_ps(sv, _mm512_fnmadd_ps(zv, _mm512_set1_ps(xc[m]), acc[0][m][v]),
                                                     _mm512_loadu_ps(yp)));
            }
        }
    }
}

static BATTR void w4_gemv_bf16_call(int mr, int nv, int first, int last, const tops_w4a16_args *a,
                                    int64_t g, int64_t n, int64_t nblk, const int32_t *qw, int64_t nrows,
                                    int64_t pfn, int64_t rem, int64_t wrap, const uint32_t *xq, int64_t ldx,
                                    const float *xc, float *part, float *y, int64_t ldy) {
#define W4_BC(MR, NV)                                                                              \
    case MR * 8 + NV:                                                                              \
        w4_bf16_kern(MR, NV, first, last, a, g, n, nblk, qw, nrows, pfn, rem, wrap, xq, ldx, xc, part, \
                     y, ldy);                                                                      \
        break;
    switch (mr * 8 + nv) {
        W4_BC(1, 1) W4_BC(1, 2) W4_BC(1, 4) W4_BC(2, 1) W4_BC(2, 2) W4_BC(2, 4)
        W4_BC(3, 1) W4_BC(3, 2) W4_BC(3, 4) W4_BC(4, 1) W4_BC(4, 2) W4_BC(4, 4)
    default: break;
    }
#undef W4_BC
}

/* ---- blocked path for bf16 x through vdpbf16ps (AVX512_BF16; M > W4_GEMV_M_AVX512, each word of 8 k in
 * one group) ----------------------------------------------------------------------------------------
 * Per k tile (W4B_KT) of a column tile (W4B_NT), panel by panel (W4B_PW columns), the weights become
 * bf16 pairs once: ((w >> 4j) & 0x000F000F) + (15 - z) in each half indexes a 32-entry vpermw table
 * of bf16(i - 15), giving (q_j - z, q_{j+4} - z) exactly, 4 operations per 16 columns x 2 k (a fp32
 * dequantization + rounding takes ~9), by the first row block's kernels into an L1-sized buffer
 * [pair][W4B_PW] that the other row blocks read. x is
 * packed once per call into rows of bf16 pairs (x_j, x_{j+4}), each row scaled by a power of two
 * (exact) so that its largest |x| lies in [1, 2): vdpbf16ps reads denormals as zero. A W4B_MR x
 * W4B_NV micro-kernel (24 fp32 accumulators + 3 weight vectors + a broadcast in the 32 registers)
 * sums the exact products over a run of words of one group, then C += s * acc in fp32: the scale
 * is applied exactly, once per run, not rounded into bf16 weights. (The GEMV's 128 + q, with
 * s (z + 128) sum x taken off C, cancelled: up to 0.17 relative error where most weights sit at
 * their zero point and x has one sign.) */
#define W4B_MR 8           /* rows of x per micro-kernel */
#define W4B_NV 3           /* vectors of 16 columns per micro-kernel = panel */
#define W4B_PW (W4B_NV * 16)
#define W4B_NT (4 * W4B_PW) /* columns per tile */
#ifndef W4B_KT
#define W4B_KT 256          /* k per tile (multiple of 8): W4B_KT / 2 pairs x 48 columns, 24 KB (L1) */
#endif

/* one pair of every row: acc[m][v] += b[v] * (the pair xq[m * ldx]) */
static BATTR W4_INLINE void w4b_step(const int MR, const int NV, __m512 acc[W4B_MR][W4B_NV], const __m512i *b,
                                     const uint32_t *xq, int64_t ldx) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++) {
        const __m512i xb = _mm512_set1_epi32((int)xq[m * ldx]);
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)b[v], (__m512bh)xb);
    }
}

/* C[MR][NV vectors] (ldc apart) += s * sum over np pairs of B[p] * x[m][p]; xq: MR rows of pairs, ldx
 * apart; bq: the panel at the first pair, W4B_PW apart; s: the scales of the panel's columns, and
 * W4B_NT floats on, their 15 - z in both halves of each lane (as int32).
 * FILL (a panel's first row block): B is made from the words of qweight (qw, ldq apart; np / 4 rows)
 * as it is used and stored into bq for the other row blocks, so the weight loads overlap this
 * block's dot products; prefetches pfl lines of each row W4_PF_ROWS rows ahead. A separate unpack
 * pass before the row blocks, waiting on the weights, was 4-18% slower (M = 64 .. 9, 2-core Zen 4). */
static BATTR W4_INLINE void w4b_kern(const int MR, const int NV, const int FILL, const uint32_t *xq,
                                     int64_t ldx, uint32_t *bq, int64_t np, const float *s, float *c,
                                     int64_t ldc, const int32_t *qw, int64_t ldq, int pfl) {
    __m512 acc[W4B_MR][W4B_NV];
#pragma GCC unroll 8
    for (int m = 0; m < MR; m++)
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) acc[m][v] = _mm512_setzero_ps();
    if (FILL) {
        /* bf16(i - 15) for i = 0 .. 30 */
        static const uint16_t lut[32] = {0xC170, 0xC160, 0xC150, 0xC140, 0xC130, 0xC120, 0xC110,
                                         0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000,
                                         0xBF80, 0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0,
                                         0x40C0, 0x40E0, 0x4100, 0x4110, 0x4120, 0x4130, 0x4140,
                                         0x4150, 0x4160, 0x4170, 0x0000};
        const __m512i mask = _mm512_set1_epi32(0x000F000F);
        const __m512i table = _mm512_loadu_si512((const void *)lut);
        __m512i zo[W4B_NV];
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) zo[v] = _mm512_loadu_si512((const void *)(s + W4B_NT + v * 16));
        const int64_t pf = (int64_t)W4_PF_ROWS * ldq * 4;
        for (int64_t r = 0; r < np / 4; r++) {
            const int32_t *row = qw + r * ldq;
            for (int l = 0; l < pfl; l++) w4_prefetch(row + l * 16, pf);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const int64_t p = 4 * r + j;
                __m512i b[W4B_NV];
#pragma GCC unroll 3
                for (int v = 0; v < NV; v++) {
                    const __m512i w = _mm512_loadu_si512((const void *)(row + v * 16));
                    const __m512i q = _mm512_and_si512(j ? _mm512_srli_epi32(w, 4 * j) : w, mask);
                    b[v] = _mm512_permutexvar_epi16(_mm512_add_epi32(q, zo[v]), table);
                    _mm512_storeu_si512((void *)(bq + p * W4B_PW + v * 16), b[v]);
                }
                w4b_step(MR, NV, acc, b, xq + p, ldx);
            }
        }
    } else {
#pragma GCC unroll 2
        for (int64_t p = 0; p < np; p++) {
            __m512i b[W4B_NV];
#pragma GCC unroll 3
            for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_si512((const void *)(bq + p * W4B_PW + v * 16));
            w4b_step(MR, NV, acc, b, xq + p, ldx);
        }
    }
#pragma GCC unroll 3
    for (int v = 0; v < NV; v++) {
        const __m512 sv = _mm512_loadu_ps(s + v * 16);
#pragma GCC unroll 8
        for (int m = 0; m < MR; m++) {
            float *cp = c + m * ldc + v * 16;
            _mm512_storeu_ps(cp, _mm512_fmadd_ps(sv, acc[m][v], _mm512_loadu_ps(cp)));
        }
    }
}

static BATTR void w4b_kern_call(int mr, int nv, const uint32_t *xq, int64_t ldx, uint32_t *bq, int64_t np,
                                const float *s, float *c, int64_t ldc, const int32_t *qw, int64_t ldq, int pfl) {
#define W4B_KC(MR, NV)                                                                             \
    case MR * 4 + NV:                                                                              \
        if (qw) w4b_kern(MR, NV, 1, xq, ldx, bq, np, s, c, ldc, qw, ldq, pfl);                     \
        else w4b_kern(MR, NV, 0, xq, ldx, bq, np, s, c, ldc, NULL, 0, 0);                          \
        break;
#define W4B_KC3(MR) W4B_KC(MR, 1) W4B_KC(MR, 2) W4B_KC(MR, 3)
    switch (mr * 4 + nv) {
        W4B_KC3(0) W4B_KC3(1) W4B_KC3(2) W4B_KC3(3) W4B_KC3(4) W4B_KC3(5) W4B_KC3(6) W4B_KC3(7) W4B_KC3(8)
    default: break;
    }
#undef W4B_KC3
#undef W4B_KC
}


/* ---- AMX tiles for w4b_blocked's full blocks of 16 rows (AMX-TILE + AMX-BF16) ----------------------
 * The panel buffer bq is already what a TDPBF16PS B tile reads: row p holds pair p of 16 columns as
 * bf16 pairs (q_j - z, q_{j+4} - z), W4B_PW * 4 bytes apart; and xq's rows hold x as the matching
 * pairs (x_j, x_{j+4}): 16 pairs of 16 rows are an A tile. One tile instruction does 16 x 16 x 32
 * products (the AVX-512 kernel's 8 x 48 x 2 per 24 instructions), exact as vdpbf16ps's and summed
 * in fp32, so the panel's dequantisation and the weight reads are what is left. Tiles 0-2
 * accumulate a row block's 16 x 48 sums over a run of one group, tile 3 holds x, tiles 4-6 the
 * panel's pairs; the sums go through a small buffer to C += s * sum, as the AVX-512 kernel's do.
 * Runs of a pair count that is not a multiple of 16 (K not a multiple of 32 in the group, group
 * sizes below 32) and the rows after the last full block take the AVX-512 kernel.
 * Linux asks for AMX state per process (arch_prctl ARCH_REQ_XCOMP_PERM); without it (another OS,
 * an old kernel) the AVX-512 kernels run. W4_AMX_EMULATE (the C tests' second build) runs the same
 * code on a scalar model of the tile instructions, so the indexing is tested on any CPU. */
#if W4_AMX && defined(W4_AMX_EMULATE)
#define AATTR BATTR
static _Thread_local uint8_t w4a_tmm[8][16 * 64]; /* 16 rows of 64 bytes */
static void w4a_tile_load(int t, const void *p, int64_t stride) {
    for (int r = 0; r < 16; r++) memcpy(w4a_tmm[t] + 64 * r, (const char *)p + r * stride, 64);
}
static void w4a_tile_store(int t, void *p, int64_t stride) {
    for (int r = 0; r < 16; r++) memcpy((char *)p + r * stride, w4a_tmm[t] + 64 * r, 64);
}
static float w4a_bf16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return tops_bf16_to_f32(h);
}
/* C[m][n] += sum over pairs k of A[m][k].lo * B[k][n].lo + A[m][k].hi * B[k][n].hi */
static void w4a_tile_dp(int c, int a, int b) {
    for (int m = 0; m < 16; m++)
        for (int n = 0; n < 16; n++) {
            float acc;
            memcpy(&acc, w4a_tmm[c] + 64 * m + 4 * n, 4);
            for (int k = 0; k < 16; k++)
                acc += w4a_bf16(w4a_tmm[a] + 64 * m + 4 * k) * w4a_bf16(w4a_tmm[b] + 64 * k + 4 * n) +
                       w4a_bf16(w4a_tmm[a] + 64 * m + 4 * k + 2) * w4a_bf16(w4a_tmm[b] + 64 * k + 4 * n + 2);
            memcpy(w4a_tmm[c] + 64 * m + 4 * n, &acc, 4);
        }
}
static void w4a_config(void) {}
static void w4a_release(void) { memset(w4a_tmm, 0, sizeof w4a_tmm); }
#define W4A_ZERO(t) memset(w4a_tmm[t], 0, sizeof w4a_tmm[t])
#define W4A_LOAD(t, p, stride) w4a_tile_load(t, p, stride)
#define W4A_STORE(t, p, stride) w4a_tile_store(t, p, stride)
#define W4A_DP(c, a, b) w4a_tile_dp(c, a, b)
#elif W4_AMX
#define AATTR __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c")))
/* palette 1, every tile 16 rows x 64 bytes */
static AATTR void w4a_config(void) {
    uint8_t cfg[64] = {0};
    cfg[0] = 1;
    for (int t = 0; t < 8; t++) {
        cfg[16 + 2 * t] = 64; /* colsb, little-endian uint16 */
        cfg[48 + t] = 16;     /* rows */
    }
    _tile_loadconfig(cfg);
}
static AATTR void w4a_release(void) { _tile_release(); }
#define W4A_ZERO(t) _tile_zero(t)
#define W4A_LOAD(t, p, stride) _tile_loadd(t, p, stride)
#define W4A_STORE(t, p, stride) _tile_stored(t, p, stride)
#define W4A_DP(c, a, b) _tile_dpbf16ps(c, a, b)
#endif

#if W4_AMX
/* C[16 rows][nv vectors] (ldc apart) += s * sum over np pairs (a multiple of 16) of the x pairs of 16
 * rows (xq, ldx apart) times the panel's pairs (bq, W4B_PW apart); the tiles configured */
static AATTR void w4a_kern(int nv, const uint32_t *xq, int64_t ldx, const uint32_t *bq, int64_t np,
                           const float *s, float *c, int64_t ldc) {
    float sums[16 * W4B_PW] __attribute__((aligned(64)));
    W4A_ZERO(0);
    W4A_ZERO(1);
    W4A_ZERO(2);
    for (int64_t p = 0; p < np; p += 16) {
        const uint32_t *b = bq + p * W4B_PW;
        W4A_LOAD(3, xq + p, ldx * 4);
        W4A_LOAD(4, b, W4B_PW * 4);
        W4A_DP(0, 3, 4);
        if (nv > 1) {
            W4A_LOAD(5, b + 16, W4B_PW * 4);
            W4A_DP(1, 3, 5);
        }
        if (nv > 2) {
            W4A_LOAD(6, b + 32, W4B_PW * 4);
            W4A_DP(2, 3, 6);
        }
    }
    W4A_STORE(0, sums, W4B_PW * 4);
    if (nv > 1) W4A_STORE(1, sums + 16, W4B_PW * 4);
    if (nv > 2) W4A_STORE(2, sums + 32, W4B_PW * 4);
    for (int v = 0; v < nv; v++) {
        const __m512 sv = _mm512_loadu_ps(s + v * 16);
        for (int m = 0; m < 16; m++) {
            float *cp = c + m * ldc + v * 16;
            _mm512_storeu_ps(cp, _mm512_fmadd_ps(sv, _mm512_loadu_ps(sums + m * W4B_PW + v * 16), _mm512_loadu_ps(cp)));
        }
    }
}
#endif

/* workspace of w4b_blocked: x pairs [mce][ldx], row exponents, the scale and zero table, one weight
 * panel, C [mce][W4B_NT], runs of the tile */
static int64_t w4b_ldx(int64_t K) { return K / 2 + 16; /* rows 64 B off one L1 set from the next */ }
static size_t w4b_bytes(const tops_w4a16_args *a) {
    const int64_t mce = w4_min(a->M, W4_MC);
    return w4_align((size_t)(mce * w4b_ldx(a->K)) * 4) + w4_align((size_t)mce * 4) + w4_align((size_t)(2 * a->groups * W4B_NT) * 4) +
           w4_align((size_t)(W4B_KT / 2 * W4B_PW) * 4) + w4_align((size_t)(mce * W4B_NT) * 4) +
           w4_align((size_t)(W4B_KT / 8) * 2 * 4);
}

/* rows [m0, m0 + mc) of x -> scaled bf16 pairs xq[m][ldx] (pair 4 r + j = (x[8r + j], x[8r + j + 4])),
 * the exponents ex[m] */
static BATTR void w4b_pack_x(const tops_w4a16_args *a, int64_t m0, int64_t mc, uint32_t *xq,
                             int64_t ldx, int32_t *ex) {
    const int64_t K = a->K;
    /* word i of 16 fp32 lanes: the high half of lane (i / 8) * 8 + i / 2 % 4 + (i % 2) * 4 */
    static const short pidx[32] = {1,  9,  3,  11, 5,  13, 7,  15, 17, 25, 19, 27, 21, 29, 23, 31,
                                   1,  9,  3,  11, 5,  13, 7,  15, 17, 25, 19, 27, 21, 29, 23, 31};
    const __m512i perm = _mm512_loadu_si512((const void *)pidx);
    /* scaling in fp32: the caller's denormals-are-zero would read bf16 denormals of x as zeros */
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr & ~0x8040u);
    for (int64_t m = 0; m < mc; m++) {
        const uint16_t *src = (const uint16_t *)a->x + (m0 + m) * a->x_row_stride;
        uint32_t *dst = xq + m * ldx;
        __m512i mxv = _mm512_setzero_si512();
        for (int64_t k = 0; k < K; k += 32) {
            const __mmask32 mk = K - k >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (K - k)) - 1);
            mxv = _mm512_max_epu16(mxv, _mm512_and_si512(_mm512_maskz_loadu_epi16(mk, src + k),
                                                         _mm512_set1_epi16(0x7fff)));
        }
        uint16_t mw[32];
        _mm512_storeu_si512((void *)mw, mxv);
        uint16_t mb = 0;
        for (int i = 0; i < 32; i++) mb = mw[i] > mb ? mw[i] : mb;
        const int e = mb && mb < 0x7f80 ? ilogbf(tops_bf16_to_f32(mb)) : 0;
        ex[m] = e;
        const __m512 f1 = _mm512_set1_ps(ldexpf(1.0f, -e / 2)), f2 = _mm512_set1_ps(ldexpf(1.0f, -e - -e / 2));
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mk = K - k >= 16 ? 0xffff : 0x00ff; /* K % 8 == 0 */
            __m512 v = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, src + k)), 16));
            v = _mm512_mul_ps(_mm512_mul_ps(v, f1), f2);
            __m512i p = _mm512_permutexvar_epi16(perm, _mm512_castps_si512(v));
            _mm256_mask_storeu_epi32(dst + k / 2, (__mmask8)(mk == 0xffff ? 0xff : 0x0f), _mm512_castsi512_si256(p));
        }
    }
    _mm_setcsr(csr);
}

/* the next tile's words pr .. pe - 1 of nrows, nlines lines of each (see w4b_blocked_run) */
static inline void w4b_prefetch_rows(const int32_t *nq, int64_t N, int64_t nlines, int64_t *pr, int64_t pstep,
                                     int64_t nrows) {
    for (int64_t pe = w4_min(*pr + pstep, nrows); *pr < pe; ++*pr)
        for (int64_t l = 0; l < nlines; l++) w4_prefetch(nq + *pr * N + l * 16, 0);
}

static BATTR int w4b_blocked_run(const tops_w4a16_args *a, int64_t nb, int64_t ne, char *ws, const int32_t *gk,
                                 int amx) {
    const int64_t M = a->M, K = a->K, N = a->N, G = a->groups, mce = w4_min(M, W4_MC), ldx = w4b_ldx(K);
    uint32_t *xq = (uint32_t *)ws;
    ws += w4_align((size_t)(mce * ldx) * 4);
    int32_t *ex = (int32_t *)ws;
    ws += w4_align((size_t)mce * 4);
    float *tab = (float *)ws; /* [G][2][W4B_NT]: s, then 15 - z in both halves of an int32 */
    ws += w4_align((size_t)(2 * G * W4B_NT) * 4);
    uint32_t *bq = (uint32_t *)ws; /* one panel of one k tile: [W4B_KT / 2][W4B_PW] */
    ws += w4_align((size_t)(W4B_KT / 2 * W4B_PW) * 4);
    float *cbuf = (float *)ws; /* [mc][W4B_NT] */
    ws += w4_align((size_t)(mce * W4B_NT) * 4);
    int32_t *runs = (int32_t *)ws; /* [runs of the tile][2]: group, words */

    for (int64_t m0 = 0; m0 < M; m0 += W4_MC) {
        const int64_t mc = w4_min(W4_MC, M - m0);
        w4b_pack_x(a, m0, mc, xq, ldx, ex);
        /* amx: rows [0, arows) in full blocks of 16 on tiles; the others in row blocks of at most
         * W4B_MR rows, as even as possible (M = 9: 5 + 4, not 8 + 1) */
        const int64_t arows = amx ? mc / 16 * 16 : 0, vrows = mc - arows;
        const int64_t nblk = (vrows + W4B_MR - 1) / W4B_MR;
        const int64_t mbase = nblk ? vrows / nblk : 0, mext = nblk ? vrows % nblk : 0;
        for (int64_t n0 = nb; n0 < ne; n0 += W4B_NT) {
            const int ntv = (int)(w4_min(W4B_NT, ne - n0) / 16);
            for (int64_t g = 0; g < G; g++)
                for (int v = 0; v < W4B_NT / 16; v++) {
                    __m512 s = _mm512_setzero_ps();
                    __m512i zo = _mm512_setzero_si512();
                    if (v < ntv) {
                        s = w4_load_avx512(a->scales, a->scales_dtype, g * N + n0 + v * 16);
                        /* +-inf (or NaN) scale: s times a sum is +-inf where s (q - z) is NaN
                         * (q = z); the fp32 blocked path recomputes the whole range */
                        if (_mm512_cmp_ps_mask(_mm512_abs_ps(s), _mm512_set1_ps(INFINITY), _CMP_NLT_UQ))
                            return W4_INFINITE_X;
                        zo = _mm512_sub_epi32(_mm512_set1_epi32(15),
                                              _mm512_cvtps_epi32(w4_zeros_avx512(a, g, n0 + v * 16)));
                        zo = _mm512_or_si512(zo, _mm512_slli_epi32(zo, 16));
                    }
                    _mm512_storeu_ps(tab + 2 * g * W4B_NT + v * 16, s);
                    _mm512_storeu_si512((void *)(tab + (2 * g + 1) * W4B_NT + v * 16), zo);
                }
            memset(cbuf, 0, (size_t)(mc * W4B_NT) * sizeof(float));
            for (int64_t k0 = 0; k0 < K; k0 += W4B_KT) {
                const int64_t r0 = k0 / 8, rows = w4_min(W4B_KT, K - k0) / 8;
                int nruns = 0;
                for (int64_t r = r0; r < r0 + rows;) {
                    const int32_t g = gk[8 * r];
                    int64_t re = r + 1;
                    while (re < r0 + rows && gk[8 * re] == g) re++;
                    runs[2 * nruns] = g;
                    runs[2 * nruns + 1] = (int32_t)(re - r);
                    nruns++;
                    r = re;
                }
                /* the next tile's words (the next k tile, else the first of the next column tile),
                 * a row or so per row-block pass: the dequantization alone runs at memory latency,
                 * its own prefetch 16 rows ahead finds no compute to overlap */
                const int32_t *nq = NULL;
                int64_t nrows = 0, nlines = 0, pr = 0;
                if (k0 + W4B_KT < K) {
                    nq = a->qweight + (r0 + rows) * N + n0;
                    nrows = w4_min(W4B_KT, K - k0 - W4B_KT) / 8;
                    nlines = ntv;
                } else if (n0 + W4B_NT < ne) {
                    nq = a->qweight + n0 + W4B_NT;
                    nrows = w4_min(W4B_KT, K) / 8;
                    nlines = w4_min(W4B_NT, ne - n0 - W4B_NT) / 16;
                }
                const int64_t npass = (ntv + W4B_NV - 1) / W4B_NV * ((nblk ? nblk : 1) + arows / 16);
                const int64_t pstep = (nrows + npass - 1) / npass;
                /* panel by panel: the first row block unpacks the panel into the L1-sized buffer as
                 * its kernels use it (with every row on tiles, a pass of its own: mr = 0), the other
                 * row blocks and the tiles read it there */
                for (int p = 0; p * W4B_NV < ntv; p++) {
                    const int nv = (int)w4_min(W4B_NV, ntv - p * W4B_NV);
                    const int32_t *pq = a->qweight + r0 * N + n0 + p * W4B_PW;
                    /* the first row block also prefetches the words of the tile's later panels */
                    const int pfl = p ? nv : ntv - p * W4B_NV;
                    for (int64_t b = 0, mb = arows; b < (nblk ? nblk : 1); b++) {
                        const int mr = nblk ? (int)(mbase + (b < mext)) : 0;
                        w4b_prefetch_rows(nq, N, nlines, &pr, pstep, nrows);
                        for (int i = 0, w = 0; i < nruns; w += runs[2 * i + 1], i++)
                            w4b_kern_call(mr, nv, xq + mb * ldx + 4 * (r0 + w), ldx, bq + 4 * w * W4B_PW,
                                          4 * (int64_t)runs[2 * i + 1],
                                          tab + 2 * (int64_t)runs[2 * i] * W4B_NT + p * W4B_PW,
                                          cbuf + mb * W4B_NT + p * W4B_PW, W4B_NT,
                                          b == 0 ? pq + (int64_t)w * N : NULL, N, pfl);
                        mb += mr;
                    }
#if W4_AMX
                    for (int64_t mb = 0; mb < arows; mb += 16) {
                        w4b_prefetch_rows(nq, N, nlines, &pr, pstep, nrows);
                        for (int i = 0, w = 0; i < nruns; w += runs[2 * i + 1], i++) {
                            const int64_t np = 4 * (int64_t)runs[2 * i + 1];
                            const float *sp = tab + 2 * (int64_t)runs[2 * i] * W4B_NT + p * W4B_PW;
                            if (np % 16 == 0) {
                                w4a_kern(nv, xq + mb * ldx + 4 * (r0 + w), ldx, bq + 4 * w * W4B_PW, np, sp,
                                         cbuf + mb * W4B_NT + p * W4B_PW, W4B_NT);
                                continue;
                            }
                            for (int64_t h = mb; h < mb + 16; h += 8)
                                w4b_kern_call(8, nv, xq + h * ldx + 4 * (r0 + w), ldx, bq + 4 * w * W4B_PW, np, sp,
                                              cbuf + h * W4B_NT + p * W4B_PW, W4B_NT, NULL, N, 0);
                        }
                    }
#endif
                }
            }
            for (int64_t m = 0; m < mc; m++) {
                /* 2^ex[m] in two factors (|ex| <= 133): no spurious overflow */
                const __m512 d1 = _mm512_set1_ps(ldexpf(1.0f, ex[m] / 2));
                const __m512 d2 = _mm512_set1_ps(ldexpf(1.0f, ex[m] - ex[m] / 2));
                for (int v = 0; v < ntv; v++) {
                    __m512 o = _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(cbuf + m * W4B_NT + v * 16), d1), d2);
                    if (a->bias) o = _mm512_add_ps(o, w4_load_avx512(a->bias, a->bias_dtype, n0 + v * 16));
                    w4_store_avx512(a->out, a->out_dtype, (m0 + m) * N + n0 + v * 16, o);
                }
            }
        }
    }
    return TOPS_OK;
}

/* w4b_blocked_run with the tiles configured for it where AMX is in force and M has a full block */
static BATTR int w4b_blocked(const tops_w4a16_args *a, int64_t nb, int64_t ne, char *ws, const int32_t *gk) {
#if W4_AMX
    const int amx = a->M >= 16 && w4_amx();
    if (amx) w4a_config();
    const int st = w4b_blocked_run(a, nb, ne, ws, gk, amx);
    if (amx) w4a_release();
    return st;
#else
    return w4b_blocked_run(a, nb, ne, ws, gk, 0);
#endif
}
#undef W4B_SETS
#undef BATTR
#define W4_BF16DOT 1
#define W4_GEMV_M W4_GEMV_M_AVX512
#define W4_PF_FAR W4_PF_STREAM512 /* GEMV stream prefetch: bytes ahead, T1, then W4_PF_NEAR ahead, T0 */
#define W4_PF_FAR_T1 1
#define W4_PF_NEAR W4_PF_NEAR512

#define vf_loadt(p, dtype, i) w4_load_avx512(p, dtype, i)
#define vf_storet(p, dtype, i, v) w4_store_avx512(p, dtype, i, v)
#define vf_zeros(a, g, n) w4_zeros_avx512(a, g, n)

#define W4_TEMPLATE_PASS 1
#include "w4a16.c"
#undef W4_TEMPLATE_PASS
#endif /* W4_X86 */

int tops_w4a16_linear(const tops_w4a16_args *a, int64_t n_begin, int64_t n_end) {
    int st = w4_check(a, n_begin, n_end);
    if (st != TOPS_OK) return st;
    if (a->M == 0 || n_begin == n_end) return TOPS_OK;
#if W4_X86
    int isa = tops_cpu_isa();
    if (isa >= TOPS_ISA_AVX512) {
        int64_t mid = n_begin + (n_end - n_begin) / 16 * 16;
        if (mid > n_begin && (st = w4_run_avx512(a, n_begin, mid)) != TOPS_OK) return st;
        return mid < n_end ? w4_run_avx2(a, mid, n_end) : TOPS_OK;
    }
    if (isa >= TOPS_ISA_AVX2) return w4_run_avx2(a, n_begin, n_end);
#endif
    return w4_scalar(a, n_begin, n_end);
}

#else /* W4_TEMPLATE_PASS: the vectorised paths, instantiated once per instruction set ============= */

#define W4_NVMAX 4            /* GEMV: vectors per column block */
#define W4_BW (W4_NVMAX * VW) /* GEMV: columns per block (act-order table row) */
#define W4_PW (2 * VW)        /* blocked: panel width */
#define W4_NT (4 * W4_PW)     /* blocked: columns per tile */
#define W4_KTI (W4_KT * 8 / VW) /* blocked: k per tile (a panel of W4_KTI x W4_PW floats: 16 KB) */

/* slot j of a word as q * 2^(4j) (j < 7) or q (j == 7), exact in fp32; pairs with x * 2^-4j */
static KATTR W4_INLINE VF KN(w4_unpack_scaled)(VI w, const int j) {
    if (j == 7) return vi_cvt(vi_srli(w, 28));
    return vi_cvt(vi_and(w, vi_set1(15 << (4 * j))));
}

/* slot j of a word as the float whose bits are the word masked to that nibble: q * 2^(4j - 149), no
 * conversion instruction. Bits below 2^24 read as a float are i * 2^-149 exactly (subnormals, and
 * on through the first binade of normals), which covers slots 0 to 5; slots 6 and 7 reach further
 * into the exponent and are shifted down first (q * 2^-149). Pairs with x * 2^(127 - 4j) (j < 6)
 * or x * 2^127 (j = 6, 7): every product is x q 2^-22. */
static KATTR W4_INLINE VF KN(w4_unpack_sub)(VI w, const int j) {
    if (j == 7) return vf_cast(vi_srli(w, 28));
    if (j == 6) return vf_cast(vi_and(vi_srli(w, 24), vi_set1(15)));
    return vf_cast(vi_and(w, vi_set1(15 << (4 * j))));
}

/* slot j of a word as q */
static KATTR W4_INLINE VF KN(w4_unpack)(VI w, const int j) {
    if (j == 0) return vi_cvt(vi_and(w, vi_set1(15)));
    if (j == 7) return vi_cvt(vi_srli(w, 28));
    return vi_cvt(vi_and(vi_srli(w, 4 * j), vi_set1(15)));
}

/* x rows [m0, m0 + rows) -> fp32 dst[rows][K] */
static KATTR void KN(w4_convert_x)(const tops_w4a16_args *a, int64_t m0, int64_t rows, float *dst) {
    const int64_t K = a->K;
    for (int64_t m = 0; m < rows; m++) {
        int64_t src = (m0 + m) * a->x_row_stride;
        float *d = dst + m * K;
        int64_t k = 0;
        for (; k + VW <= K; k += VW) vf_store(d + k, vf_loadt(a->x, a->x_dtype, src + k));
        for (; k < K; k++) d[k] = tops_load(a->x, a->x_dtype, src + k);
    }
}

/* out[m, n .. n+VW) = src + bias */
static KATTR W4_INLINE void KN(w4_out)(const tops_w4a16_args *a, int64_t m, int64_t n, VF v) {
    if (a->bias) v = vf_add(v, vf_loadt(a->bias, a->bias_dtype, n));
    vf_storet(a->out, a->out_dtype, m * a->N + n, v);
}

/* ---- GEMV kernels --------------------------------------------------------------------------------
 * Plain groups: one pass of nrows rows of a chunk over nblk column blocks of NV vectors (block b
 * starts at column n + b * NV * VW, word qw + b * NV * VW). Per block,
 *   acc[MR][NV] = (first ? 0 : part) + sum over the rows of unpack(q) * xp,
 * then part = acc, or on the last pass of the chunk y[m] += s * (acc - z * xc[m]) with s, z of
 * group g. SUB picks the unpack: w4_unpack_sub, else w4_unpack_scaled (xp and xc are scaled to
 * match). With SUB, slot j of a word adds into accumulator set j % W4_SETS(MR * NV), summed at
 * the end of the block, so that at least 6 chains of FMAs (latency 4, two per cycle) are in
 * flight where MR * NV accumulators alone are fewer, within 16 vector registers (M = 1: 4 vectors
 * x 2 sets, 15% less time than 1 set on Zen 3; 3 or 4 sets spill and are slower). The conversion
 * unpack is slower with sets (its conversions, not the FMA chains, are the limit) and has one.
 * qw: first word (row of the pass, column n), ldq = N; xp: pre-scaled x at the first row of the
 * pass, ldx apart; part and y: MR rows ldy apart, column n at [0]. Each row is a stream: prefetch
 * pfn words ahead while that stays before the end of the column range (rem: columns from n to
 * it), else wrap words further, which is the same row of the next pass. */
#define W4_SETS(n) ((n) >= 6 ? 1 : (n) >= 3 ? 2 : (n) == 2 ? 4 : 8)

static KATTR W4_INLINE void KN(w4_gemv_kern)(const int SUB, const int MR, const int NV, int first,
                                             int last, const tops_w4a16_args *a, int64_t g,
                                             int64_t n, int64_t nblk, const int32_t *qw,
                                             int64_t nrows, int64_t pfn, int64_t rem, int64_t wrap,
                                             const float *xp, int64_t ldx, const float *xc,
                                             float *part, float *y, int64_t ldy) {
    const int64_t ldq = a->N;
    const int S = SUB ? W4_SETS(MR * NV) : 1;
    for (int64_t o = 0; o < nblk * NV * VW; o += NV * VW) {
        const int64_t pf = 4 * (pfn < rem - o ? pfn : pfn + wrap); /* bytes */
        const int64_t pn = pfn < W4_PF_NEAR / 4 ? pfn : W4_PF_NEAR / 4;
        const int64_t pfl = 4 * (pn < rem - o ? pn : pn + wrap);
        VF acc[8][4][W4_NVMAX];
#pragma GCC unroll 8
        for (int i = 0; i < S; i++)
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++)
                    acc[i][m][v] = first || i ? vf_zero() : vf_load(part + m * ldy + o + v * VW);
        for (int64_t r = 0; r < nrows; r++) {
            const int32_t *row = qw + r * ldq + o;
#pragma GCC unroll 4
            for (int l = 0; l < (NV * VW * 4 + 63) / 64; l++) {
                if (W4_PF_FAR_T1) w4_prefetch_stream(row + l * 16, pf);
                else w4_prefetch(row + l * 16, pf);
                if (W4_PF_NEAR) w4_prefetch(row + l * 16, pfl);
            }
            VI w[W4_NVMAX];
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) w[v] = vi_load(row + v * VW);
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                VF xb[4];
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) xb[m] = vf_bcast(xp + m * ldx + 8 * r + j);
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) {
                    const VF t = SUB ? KN(w4_unpack_sub)(w[v], j) : KN(w4_unpack_scaled)(w[v], j);
#pragma GCC unroll 4
                    for (int m = 0; m < MR; m++)
                        acc[j % S][m][v] = vf_fma(t, xb[m], acc[j % S][m][v]);
                }
            }
        }
#pragma GCC unroll 4
        for (int h = S; h > 1; h = (h + 1) / 2) /* pairwise: the upper half of h sets onto the lower */
#pragma GCC unroll 4
            for (int k = 0; k < h / 2; k++)
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
                    for (int v = 0; v < NV; v++)
                        acc[k][m][v] = vf_add(acc[k][m][v], acc[k + (h + 1) / 2][m][v]);
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) {
            const int64_t c = o + v * VW;
            if (!last) {
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) vf_store(part + m * ldy + c, acc[0][m][v]);
                continue;
            }
            const VF sv = vf_loadt(a->scales, a->scales_dtype, g * ldq + n + c);
            const VF zv = vf_zeros(a, g, n + c);
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) {
                float *yp = y + m * ldy + c;
                vf_store(yp, vf_fma(sv, vf_fnma(zv, vf_set1(xc[m]), acc[0][m][v]), vf_load(yp)));
            }
        }
    }
}

/* Act-order: for each of nblk column blocks of NV vectors (as above),
 *   y[m] += sum over nrows rows of unpack(q) * s(k) * xp,
 * the scale of every k read from stab[gk[k] * lds + column] (stab and gk start at this block and
 * chunk). Prefetches qw + pf bytes (the same columns, W4_CHUNK_ROWS rows on). y starts at minus the
 * zero-point term of all K, as large as the sum of every chunk, which the result cancels: each
 * chunk is added with its rounding error kept in cy (same layout as y; Fast2Sum), or the error of
 * those additions grew with sqrt(K) (RTN weights, x of one sign, K = 14336: 6e-5 relative). */
static KATTR W4_INLINE void KN(w4_gemv_act_kern)(const int MR, const int NV, const tops_w4a16_args *a,
                                                 int64_t nblk, const int32_t *qw, int64_t nrows,
                                                 int64_t pf, const float *xp, int64_t ldx,
                                                 const float *stab, int64_t lds, const int32_t *gk,
                                                 float *y, float *cy, int64_t ldy) {
    const int64_t ldq = a->N;
    for (int64_t b = 0; b < nblk; b++, qw += NV * VW, y += NV * VW, cy += NV * VW, stab += NV * VW) {
        VF acc[4][W4_NVMAX];
#pragma GCC unroll 4
        for (int m = 0; m < MR; m++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[m][v] = vf_zero();
        for (int64_t r = 0; r < nrows; r++) {
            const int32_t *row = qw + r * ldq;
#pragma GCC unroll 4
            for (int l = 0; l < (NV * VW * 4 + 63) / 64; l++) w4_prefetch(row + l * 16, pf);
            VI w[W4_NVMAX];
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) w[v] = vi_load(row + v * VW);
            const float *xr = xp + 8 * r;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                VF xb[4];
#pragma GCC unroll 4
                for (int m = 0; m < MR; m++) xb[m] = vf_bcast(xr + m * ldx + j);
                const float *srow = stab + (int64_t)gk[8 * r + j] * lds;
#pragma GCC unroll 4
                for (int v = 0; v < NV; v++) {
                    const VF t = vf_mul(KN(w4_unpack_scaled)(w[v], j), vf_load(srow + v * VW));
#pragma GCC unroll 4
                    for (int m = 0; m < MR; m++) acc[m][v] = vf_fma(t, xb[m], acc[m][v]);
                }
            }
        }
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++)
#pragma GCC unroll 4
            for (int m = 0; m < MR; m++) {
                float *yp = y + m * ldy + v * VW, *cp = cy + m * ldy + v * VW;
                /* Fast2Sum: exact while |y| >= |acc| (y starts at the whole zero-point term); where
                 * y has come down near the result, its error is of the order of acc's own */
                const VF yv = vf_load(yp), sv = vf_add(yv, acc[m][v]);
                vf_store(yp, sv);
                vf_store(cp, vf_add(vf_load(cp), vf_sub(acc[m][v], vf_sub(sv, yv))));
            }
    }
}

/* the kernels for (mr, nv): mr <= 2 with nv in {1, 2, 4}, mr <= 4 with nv in {1, 2} (MR * NV
 * accumulators + NV words fit in 16 registers) */
#define W4_GEMV_CASES(C) \
    C(1, 1) C(1, 2) C(1, 4) C(2, 1) C(2, 2) C(2, 4) C(3, 1) C(3, 2) C(4, 1) C(4, 2)

static KATTR void KN(w4_gemv_call)(int sub, int mr, int nv, int first, int last,
                                   const tops_w4a16_args *a, int64_t g, int64_t n, int64_t nblk,
                                   const int32_t *qw, int64_t nrows, int64_t pfn, int64_t rem,
                                   int64_t wrap, const float *xp, int64_t ldx, const float *xc,
                                   float *part, float *y, int64_t ldy) {
#define W4_GC(MR, NV)                                                                              \
    case MR * 8 + NV:                                                                              \
        KN(w4_gemv_kern)(0, MR, NV, first, last, a, g, n, nblk, qw, nrows, pfn, rem, wrap, xp,    \
                         ldx, xc, part, y, ldy);                                                   \
        break;                                                                                     \
    case 64 + MR * 8 + NV:                                                                         \
        KN(w4_gemv_kern)(1, MR, NV, first, last, a, g, n, nblk, qw, nrows, pfn, rem, wrap, xp,    \
                         ldx, xc, part, y, ldy);                                                   \
        break;
    switch (64 * sub + mr * 8 + nv) {
        W4_GEMV_CASES(W4_GC)
    default: break;
    }
#undef W4_GC
}

static KATTR void KN(w4_gemv_act_call)(int mr, int nv, const tops_w4a16_args *a, int64_t nblk,
                                       const int32_t *qw, int64_t nrows, int64_t pf,
                                       const float *xp, int64_t ldx, const float *stab, int64_t lds,
                                       const int32_t *gk, float *y, float *cy, int64_t ldy) {
#define W4_GC(MR, NV)                                                                              \
    case MR * 8 + NV:                                                                              \
        KN(w4_gemv_act_kern)(MR, NV, a, nblk, qw, nrows, pf, xp, ldx, stab, lds, gk, y, cy, ldy);  \
        break;
    switch (mr * 8 + nv) {
        W4_GEMV_CASES(W4_GC)
    default: break;
    }
#undef W4_GC
}
#undef W4_GEMV_CASES

/* widest supported vector count <= min(rem, nvb) among {4, 2, 1} */
static inline int KN(w4_pick_nv)(int64_t rem, int nvb) {
    int64_t lim = rem < nvb ? rem : nvb;
    return lim >= 4 ? 4 : lim >= 2 ? 2 : 1;
}

/* act-order GEMV: columns per super-block, so that its fp32 scale table [G][sb] stays near 128 KB */
static inline int64_t KN(w4_act_sb)(int64_t G) {
    int64_t nb = (32768 / W4_BW) / (G > 0 ? G : 1);
    return (nb < 1 ? 1 : nb > 8 ? 8 : nb) * W4_BW;
}

static KATTR int KN(w4_gemv)(const tops_w4a16_args *a, int64_t nb, int64_t ne, char *ws,
                             const int32_t *gk, int uniform) {
    const int64_t M = a->M, K = a->K, N = a->N, G = a->groups, ncols = ne - nb, R = K / 8;
    /* bf16 x through vdpbf16ps (AVX-512 with AVX512_BF16, plain groups) */
    const int bfd = W4_BF16DOT && uniform && a->x_dtype == TOPS_BF16 && w4_bf16dot();
    /* keeps the accumulators + NV words in 16 registers (the bf16 kernel: 32) */
    const int nvb = M <= 2 || bfd ? 4 : 2;
    float *xf = (float *)ws;
    ws += w4_align((size_t)(M * K) * sizeof(float));
    float *xp = (float *)ws;
    ws += w4_align((size_t)(M * K) * sizeof(float));
    float *y = (float *)ws;
    ws += w4_align((size_t)(M * ncols) * sizeof(float));
    float *mv = (float *)ws; /* VW floats of scratch (not a local array: ASan's fake stack does not
                              * honour the 64-byte alignment GCC may assume for it) */
    ws += w4_align(64 * sizeof(float));
    float *part = (float *)ws; /* [M][ncols] sums of a chunk between its passes */
    ws += w4_align((size_t)(M * ncols) * sizeof(float));
    /* the subnormal unpack where subnormal operands cost nothing; act-order keeps the conversion (its
     * kernel multiplies by a gathered scale anyway) */
    const int sub = uniform && !bfd && w4_subnormal_fast();
    /* x * 2^(127 - 4j) / 2^-4j per slot j, for w4_unpack_sub / w4_unpack_scaled (K % 8 == 0) */
    static const float ps_sub[16] = {0x1p127f, 0x1p123f, 0x1p119f, 0x1p115f, 0x1p111f, 0x1p107f,
                                     0x1p127f, 0x1p127f, 0x1p127f, 0x1p123f, 0x1p119f, 0x1p115f,
                                     0x1p111f, 0x1p107f, 0x1p127f, 0x1p127f};
    static const float ps_cvt[16] = {1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f,
                                     1.0f, 0x1p-4f, 0x1p-8f, 0x1p-12f, 0x1p-16f, 0x1p-20f, 0x1p-24f, 1.0f};
    const float *ps = sub ? ps_sub : ps_cvt;
    int back[W4_GEMV_MAX_M]; /* y of row m is scaled by 2^back[m] at the end */
    KN(w4_convert_x)(a, 0, M, xf);
    for (int64_t m = 0; m < M; m++) {
        /* each row is scaled by 2^-e (exact), e = ilogb of its largest |x|, so that its largest |x|
         * lies in [1, 2): x * 2^-24 stays normal and x * 2^127 finite. The subnormal unpack's
         * products carry 2^-22 more (xc too), so y is scaled back by 2^(e + 22) there, else 2^e. */
        float *xr = xf + m * K, *xq = xp + m * K, mx = 0.0f;
        VF mxv = vf_zero();
        int64_t k = 0;
        for (; k + VW <= K; k += VW) mxv = vf_max(mxv, vf_abs(vf_load(xr + k)));
        for (; k < K; k++) mx = fabsf(xr[k]) > mx ? fabsf(xr[k]) : mx;
        vf_store(mv, mxv);
        for (int i = 0; i < VW; i++) mx = mv[i] > mx ? mv[i] : mx;
        /* an infinite x: the factored zero point below would compute inf - inf = NaN where the
         * product is +-inf, so the caller takes a path that multiplies every weight (nothing
         * written yet). (A NaN in x gives NaN rows either way.) */
        if (isinf(mx)) return W4_INFINITE_X;
        const int e = mx > 0.0f && isfinite(mx) ? ilogbf(mx) : 0;
        back[m] = e + (sub ? 22 : 0);
        /* 2^-e in two factors: e ranges over [-149, 127] */
        const float f1 = ldexpf(1.0f, -e / 2), f2 = ldexpf(1.0f, -e - -e / 2);
        const VF f1v = vf_set1(f1), f2v = vf_set1(f2), psv = vf_load(ps);
        for (k = 0; k + VW <= K; k += VW) {
            const VF v = vf_mul(vf_mul(vf_load(xr + k), f1v), f2v);
            vf_store(xr + k, v);
            if (!bfd) vf_store(xq + k, vf_mul(v, psv));
        }
        for (; k < K; k++) {
            xr[k] = xr[k] * f1 * f2;
            xq[k] = xr[k] * ps[k & 7];
        }
        if (bfd) { /* bf16 pairs (x[8r + j], x[8r + j + 4]), j < 4, of the scaled row: exact for bf16 x */
            uint32_t *x2 = (uint32_t *)(void *)xp + m * (K / 2);
            for (k = 0; k < K; k += 8)
                for (int j = 0; j < 4; j++) {
                    uint32_t lo, hi;
                    memcpy(&lo, xr + k + j, 4);
                    memcpy(&hi, xr + k + j + 4, 4);
                    x2[k / 2 + j] = (lo >> 16) | (hi & 0xffff0000u);
                }
        }
    }
    /* the subnormal unpack needs its operands read as they are, not as zeros */
    const int daz = sub && _MM_GET_DENORMALS_ZERO_MODE() == _MM_DENORMALS_ZERO_ON;
    if (daz) _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_OFF);

    if (uniform) {
        /* K-chunks inside one group; passes of a few rows; columns inside; zero point factored per
         * chunk */
        float xc[W4_GEMV_MAX_M];
        /* at most one pass ahead: a narrow range prefetches the same columns of the next pass */
        const int64_t pfn = w4_min(W4_PF_FAR / 4, ncols);
        memset(y, 0, (size_t)(M * ncols) * sizeof(float));
        for (int64_t r0 = 0; r0 < R;) {
            const int64_t g = gk[8 * r0];
            int64_t r1 = r0 + 1;
            while (r1 < R && r1 - r0 < W4_CHUNK_ROWS && gk[8 * r1] == g) r1++;
            for (int64_t m = 0; m < M; m++) {
                float p0 = 0, p1 = 0, p2 = 0, p3 = 0; /* 4 partial sums: the chain is 4x shorter */
                for (const float *xk = xf + m * K + 8 * r0, *xe = xf + m * K + 8 * r1; xk < xe; xk += 4) {
                    p0 += xk[0];
                    p1 += xk[1];
                    p2 += xk[2];
                    p3 += xk[3];
                }
                xc[m] = ((p0 + p1) + (p2 + p3)) * (sub ? 0x1p-22f : 1.0f);
            }
            for (int64_t p = r0; p < r1; p += W4_PASS_ROWS) {
                const int64_t np = w4_min(W4_PASS_ROWS, r1 - p);
                for (int64_t n0 = 0; n0 < ncols;) {
                    /* full blocks of nvb vectors in one call, then the narrower tail blocks */
                    const int nv = KN(w4_pick_nv)((ncols - n0) / VW, nvb);
                    const int64_t nblk = nv == nvb ? (ncols - n0) / (nv * VW) : 1;
                    for (int64_t m0 = 0; m0 < M; m0 += 4)
#if W4_BF16DOT
                        if (bfd)
                            w4_gemv_bf16_call((int)w4_min(4, M - m0), nv, p == r0, p + np == r1, a, g,
                                              nb + n0, nblk, a->qweight + p * N + nb + n0, np, pfn,
                                              ncols - n0, np * N - ncols,
                                              (const uint32_t *)(const void *)xp + m0 * (K / 2) + 4 * p,
                                              K / 2, xc + m0, part + m0 * ncols + n0,
                                              y + m0 * ncols + n0, ncols);
                        else
#endif
                        KN(w4_gemv_call)(sub, (int)w4_min(4, M - m0), nv, p == r0, p + np == r1, a,
                                         g, nb + n0, nblk, a->qweight + p * N + nb + n0, np,
                                         pfn, ncols - n0, np * N - ncols,
                                         xp + m0 * K + 8 * p, K, xc + m0, part + m0 * ncols + n0,
                                         y + m0 * ncols + n0, ncols);
                    n0 += nblk * nv * VW;
                }
            }
            r0 = r1;
        }
    } else {
        /* act-order: super-blocks of sb columns outside; inside, K-chunks of W4_CHUNK_ROWS rows x
         * column blocks, with the scale of every k gathered from an fp32 table stab[G][sb] of the
         * super-block, and y started at minus the zero-point term sum_g s z sum_{g(k) = g} x. A
         * super-block reads short runs of each row, so the prefetch targets the same columns of the
         * next chunk. */
        double *xg = (double *)ws; /* [M][G] sums of x per group (exact enough to split in two floats) */
        ws += w4_align((size_t)(M * G) * sizeof(double));
        float *cy = part; /* [M][ncols] rounding errors of y's additions (TwoSum), added at the end */
        float *stab = (float *)ws;
        const int64_t sb = KN(w4_act_sb)(G);
        memset(xg, 0, (size_t)(M * G) * sizeof(double));
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) xg[m * G + gk[k]] += xf[m * K + k];
        memset(y, 0, (size_t)(M * ncols) * sizeof(float));
        memset(cy, 0, (size_t)(M * ncols) * sizeof(float));
        for (int64_t s0 = 0; s0 < ncols; s0 += sb) {
            const int64_t sw = w4_min(sb, ncols - s0);
            for (int64_t g = 0; g < G; g++) {
                /* y -= s z (hi + lo): the product's error (FMA) and the sum's (TwoSum) into cy */
                float hi[W4_GEMV_MAX_M], lo[W4_GEMV_MAX_M];
                for (int64_t m = 0; m < M; m++) {
                    hi[m] = (float)xg[m * G + g];
                    lo[m] = (float)(xg[m * G + g] - (double)hi[m]);
                }
                for (int64_t c = 0; c < sw; c += VW) {
                    VF s = vf_loadt(a->scales, a->scales_dtype, g * N + nb + s0 + c);
                    vf_store(stab + g * sb + c, s);
                    VF sz = vf_mul(s, vf_zeros(a, g, nb + s0 + c));
                    for (int64_t m = 0; m < M; m++) {
                        float *yp = y + m * ncols + s0 + c, *cp = cy + m * ncols + s0 + c;
                        const VF h = vf_set1(hi[m]), p = vf_mul(sz, h);
                        const VF pe = vf_fma(sz, h, vf_sub(vf_zero(), p)); /* sz h - p, exact */
                        const VF yv = vf_load(yp), sv = vf_sub(yv, p), bv = vf_sub(sv, yv);
                        const VF e = vf_sub(vf_sub(yv, vf_sub(sv, bv)), vf_add(p, bv)); /* yv - p - sv */
                        vf_store(yp, sv);
                        vf_store(cp, vf_fnma(sz, vf_set1(lo[m]), vf_sub(vf_add(vf_load(cp), e), pe)));
                    }
                }
            }
            for (int64_t r0 = 0; r0 < R; r0 += W4_CHUNK_ROWS) {
                const int64_t nr = w4_min(W4_CHUNK_ROWS, R - r0);
                for (int64_t n0 = s0; n0 < s0 + sw;) {
                    const int nv = KN(w4_pick_nv)((s0 + sw - n0) / VW, nvb);
                    const int64_t nblk = nv == nvb ? (s0 + sw - n0) / (nv * VW) : 1;
                    for (int64_t m0 = 0; m0 < M; m0 += 4)
                        KN(w4_gemv_act_call)((int)w4_min(4, M - m0), nv, a, nblk,
                                             a->qweight + r0 * N + nb + n0, nr,
                                             (int64_t)W4_CHUNK_ROWS * N * 4, xp + m0 * K + 8 * r0, K,
                                             stab + (n0 - s0), sb, gk + 8 * r0, y + m0 * ncols + n0,
                                             cy + m0 * ncols + n0, ncols);
                    n0 += nblk * nv * VW;
                }
            }
        }
    }
    if (!uniform) /* act-order: the additions' rounding errors */
        for (int64_t i = 0; i < M * ncols; i += VW) vf_store(y + i, vf_add(vf_load(y + i), vf_load(part + i)));
    if (daz) _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);
    /* a non-finite y (NaN x, an overflow, or a scale of +-inf) is checked for an infinite scale:
     * s (sum q x - z sum x) is +-inf where F.linear of s (q - z) has NaN (q = z), so such a call
     * goes to the blocked path (nothing written yet). v * 0 is NaN exactly where v is not finite. */
    {
        VF nf = vf_zero();
        for (int64_t i = 0; i < M * ncols; i += VW) nf = vf_fma(vf_load(y + i), vf_zero(), nf);
        vf_store(mv, nf);
        int bad = 0;
        for (int i = 0; i < VW; i++) bad |= mv[i] != mv[i];
        if (bad && w4_scales_nonfinite(a, nb, ne)) return W4_INFINITE_X;
    }
    for (int64_t m = 0; m < M; m++) {
        /* 2^back[m] in two factors of the same sign (|back| <= 149): no spurious overflow */
        const VF d1 = vf_set1(ldexpf(1.0f, back[m] / 2));
        const VF d2 = vf_set1(ldexpf(1.0f, back[m] - back[m] / 2));
        for (int64_t n0 = 0; n0 < ncols; n0 += VW)
            KN(w4_out)(a, m, nb + n0, vf_mul(vf_mul(vf_load(y + m * ncols + n0), d1), d2));
    }
    return TOPS_OK;
}

/* ---- blocked path --------------------------------------------------------------------------------- */

/* dequantize rows (8 k each) x ntv vectors of qweight (first word qw) into panels
 * dq[p][kk][W4_PW] (p = v / 2), kk = 8 r + j; tab[2 g][W4_NT] = s, tab[2 g + 1][W4_NT] = z.
 * Each weight is s (q - z), rounded once as dequantize() gives it (q s - z s by one FMA was an ulp
 * of z s off: a weight at its zero point came out nonzero, and inf x times it +-inf, not NaN). */
static KATTR void KN(w4_dequant)(const int32_t *qw, int64_t ldq, int64_t rows, int ntv,
                                 const int32_t *gk, const float *tab, float *dq) {
    const int64_t pf = (int64_t)W4_PF_ROWS * ldq * 4;
    for (int64_t r = 0; r < rows; r++) {
        const int32_t *row = qw + r * ldq;
        for (int l = 0; l < (ntv * VW * 4 + 63) / 64; l++) w4_prefetch(row + l * 16, pf);
        const int32_t *g8 = gk + 8 * r;
        for (int v = 0; v < ntv; v++) {
            VI w = vi_load(row + v * VW);
            float *d = dq + (int64_t)(v / 2) * W4_KTI * W4_PW + 8 * r * W4_PW + (v % 2) * VW;
            const float *tv = tab + v * VW;
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const float *t = tv + (int64_t)g8[j] * 2 * W4_NT;
                vf_store(d + j * W4_PW, vf_mul(vf_sub(KN(w4_unpack)(w, j), vf_load(t + W4_NT)), vf_load(t)));
            }
        }
        if (ntv % 2) {
            float *d = dq + (int64_t)(ntv / 2) * W4_KTI * W4_PW + 8 * r * W4_PW + VW;
            for (int j = 0; j < 8; j++) vf_store(d + j * W4_PW, vf_zero());
        }
    }
}

/* C[MR][2 vectors] (ldc apart) += A[MR][kt] (lda apart) * B[kt][W4_PW] */
static KATTR W4_INLINE void KN(w4_micro)(const int MR, const float *A, int64_t lda, const float *B,
                                         int64_t kt, float *C, int64_t ldc) {
    VF c0[6], c1[6];
    const float *ap[6];
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        c0[i] = vf_load(C + i * ldc);
        c1[i] = vf_load(C + i * ldc + VW);
        ap[i] = A + i * lda;
    }
#pragma GCC unroll 2
    for (int64_t k = 0; k < kt; k++) {
        VF b0 = vf_load(B + k * W4_PW), b1 = vf_load(B + k * W4_PW + VW);
#pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            VF av = vf_bcast(ap[i] + k);
            c0[i] = vf_fma(av, b0, c0[i]);
            c1[i] = vf_fma(av, b1, c1[i]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        vf_store(C + i * ldc, c0[i]);
        vf_store(C + i * ldc + VW, c1[i]);
    }
}

static KATTR void KN(w4_micro_call)(int mr, const float *A, int64_t lda, const float *B, int64_t kt,
                                    float *C, int64_t ldc) {
    switch (mr) {
    case 1: KN(w4_micro)(1, A, lda, B, kt, C, ldc); break;
    case 2: KN(w4_micro)(2, A, lda, B, kt, C, ldc); break;
    case 3: KN(w4_micro)(3, A, lda, B, kt, C, ldc); break;
    case 4: KN(w4_micro)(4, A, lda, B, kt, C, ldc); break;
    case 5: KN(w4_micro)(5, A, lda, B, kt, C, ldc); break;
    default: KN(w4_micro)(6, A, lda, B, kt, C, ldc); break;
    }
}

static KATTR int KN(w4_blocked)(const tops_w4a16_args *a, int64_t nb, int64_t ne, char *ws,
                                const int32_t *gk) {
    const int64_t M = a->M, K = a->K, N = a->N, G = a->groups, mce = w4_min(M, W4_MC);
    float *xbuf = NULL;
    if (a->x_dtype != TOPS_F32) {
        xbuf = (float *)ws;
        ws += w4_align((size_t)(mce * K) * sizeof(float));
    }
    float *tab = (float *)ws;
    ws += w4_align((size_t)(2 * G * W4_NT) * sizeof(float));
    float *dq = (float *)ws;
    ws += w4_align((size_t)(W4_KTI * W4_NT) * sizeof(float));
    float *cbuf = (float *)ws;

    for (int64_t m0 = 0; m0 < M; m0 += W4_MC) {
        const int64_t mc = w4_min(W4_MC, M - m0);
        const float *A;
        int64_t lda;
        if (xbuf) {
            KN(w4_convert_x)(a, m0, mc, xbuf);
            A = xbuf;
            lda = K;
        } else {
            A = (const float *)a->x + m0 * a->x_row_stride;
            lda = a->x_row_stride;
        }
        for (int64_t n0 = nb; n0 < ne; n0 += W4_NT) {
            const int ntv = (int)(w4_min(W4_NT, ne - n0) / VW);
            const int npan = (ntv + 1) / 2;
            for (int64_t g = 0; g < G; g++)
                for (int v = 0; v < ntv; v++) {
                    VF s = vf_loadt(a->scales, a->scales_dtype, g * N + n0 + v * VW);
                    VF z = vf_zeros(a, g, n0 + v * VW);
                    vf_store(tab + 2 * g * W4_NT + v * VW, s);
                    vf_store(tab + (2 * g + 1) * W4_NT + v * VW, z);
                }
            memset(cbuf, 0, (size_t)(mc * W4_NT) * sizeof(float));
            for (int64_t k0 = 0; k0 < K; k0 += W4_KTI) {
                const int64_t kt = w4_min(W4_KTI, K - k0);
                KN(w4_dequant)(a->qweight + (k0 / 8) * N + n0, N, kt / 8, ntv, gk + k0, tab, dq);
                for (int p = 0; p < npan; p++)
                    for (int64_t mb = 0; mb < mc; mb += 6)
                        KN(w4_micro_call)((int)w4_min(6, mc - mb), A + mb * lda + k0, lda,
                                          dq + (int64_t)p * W4_KTI * W4_PW, kt,
                                          cbuf + mb * W4_NT + p * W4_PW, W4_NT);
            }
            for (int64_t m = 0; m < mc; m++)
                for (int v = 0; v < ntv; v++)
                    KN(w4_out)(a, m0 + m, n0 + v * VW, vf_load(cbuf + m * W4_NT + v * VW));
        }
    }
    return TOPS_OK;
}

static KATTR int KN(w4_run)(const tops_w4a16_args *a, int64_t nb, int64_t ne) {
    const int64_t M = a->M, K = a->K, G = a->groups, ncols = ne - nb;
    /* which path: known once w4_groups has read g_idx (act-order keeps the GEMV to fewer rows), so
     * the workspace holds the larger of the two where M leaves both open */
#if W4_BF16DOT
    /* read once: the workspace below is sized for w4b_blocked on this answer; read again at the
     * call, a tops_w4a16_bf16dot_set on another thread in between could hand w4b_blocked a
     * workspace sized without w4b_bytes (not seen in a probe: the window is narrow) */
    const int bfd = a->x_dtype == TOPS_BF16 && w4_bf16dot();
    const int gemv_m = bfd ? W4_GEMV_M_AVX512_BF16 : W4_GEMV_M;
#else
    const int gemv_m = W4_GEMV_M;
#endif
    const int gemv_plain = M <= gemv_m, gemv_act = M <= W4_GEMV_M_ACT;
    size_t gemv_bytes = 0, blocked_bytes = 0;
    /* (the blocked path's room always: the GEMV hands an infinite x over to it) */
    if (gemv_plain || gemv_act)
        gemv_bytes = 2 * w4_align((size_t)(M * K) * sizeof(float)) +
                     2 * w4_align((size_t)(M * ncols) * sizeof(float)) + w4_align(64 * sizeof(float)) +
                     w4_align((size_t)(M * G) * sizeof(double)) +
                     w4_align((size_t)(G * KN(w4_act_sb)(G)) * sizeof(float));
    {
        const int64_t mce = w4_min(M, W4_MC);
        if (a->x_dtype != TOPS_F32) blocked_bytes += w4_align((size_t)(mce * K) * sizeof(float));
        blocked_bytes += w4_align((size_t)(2 * G * W4_NT) * sizeof(float)) +
                         w4_align((size_t)(W4_KTI * W4_NT) * sizeof(float)) +
                         w4_align((size_t)(mce * W4_NT) * sizeof(float));
#if W4_BF16DOT
        /* bf16 x: room for w4b_blocked too (taken if every word of 8 k lies in one group) */
        if (bfd && w4b_bytes(a) > blocked_bytes)
            blocked_bytes = w4b_bytes(a);
#endif
    }
    const size_t bytes = w4_align((size_t)K * sizeof(int32_t)) +
                         (gemv_bytes > blocked_bytes ? gemv_bytes : blocked_bytes);
    char *raw = (char *)malloc(bytes + 64);
    if (!raw) return TOPS_ERR_NOMEM;
    char *ws = (char *)(((uintptr_t)raw + 63) & ~(uintptr_t)63);
    int32_t *gk = (int32_t *)ws;
    ws += w4_align((size_t)K * sizeof(int32_t));
    int uniform = w4_groups(a, gk);
    int st = W4_INFINITE_X;
    if (uniform ? gemv_plain : gemv_act) st = KN(w4_gemv)(a, nb, ne, ws, gk, uniform);
    if (st == W4_INFINITE_X) {
#if W4_BF16DOT
        if (uniform && bfd) st = w4b_blocked(a, nb, ne, ws, gk);
        if (st == W4_INFINITE_X) /* (w4b_blocked's answer to an infinite scale too) */
#endif
            st = KN(w4_blocked)(a, nb, ne, ws, gk);
    }
    free(raw);
    return st;
}

#undef W4_SETS
#undef W4_NVMAX
#undef W4_BW
#undef W4_PW
#undef W4_NT
#undef W4_KTI
#endif /* W4_TEMPLATE_PASS */

/* core.c - status names and run-time CPU feature detection of the C core. */
#include <stdatomic.h>

#include "tops.h"

const char *tops_status_name(int status) {
    switch (status) {
    case TOPS_OK: return "ok";
    case TOPS_ERR_ARG: return "invalid argument";
    case TOPS_ERR_RANGE: return "value out of range";
    case TOPS_ERR_UNSUPPORTED: return "unsupported";
    case TOPS_ERR_CUDA: return "CUDA error";
    case TOPS_ERR_NOMEM: return "out of memory";
    default: return "unknown status";
    }
}

/* The vectorised paths are compiled with per-function target attributes, so one build runs on any
 * x86-64 machine; the level below picks among them at run time. */
int tops_cpu_isa_detected(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    /* (the AVX-512 level also runs the AVX2 code: its 8-column tails, its fma and f16c; a VM may
     * expose AVX-512 and hide one of those) */
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                     __builtin_cpu_supports("f16c");
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl"))
        return TOPS_ISA_AVX512;
    if (avx2)
        return TOPS_ISA_AVX2;
#endif
    return TOPS_ISA_SCALAR;
}

/* Atomic: tops_cpu_isa runs on every thread that calls a kernel and tops_cpu_isa_set may run on
 * another meanwhile. As plain ints this was a data race, and a thread's first (lazy) detection
 * could store the detected level over a tops_cpu_isa_set that ran between its test and its store,
 * so the override was lost; the detection now installs its level only over "not yet detected".
 * Relaxed ordering: the level guards no other data. */
static _Atomic int g_isa = -1; /* -1: not yet detected */

int tops_cpu_isa(void) {
    int isa = atomic_load_explicit(&g_isa, memory_order_relaxed);
    if (isa < 0) {
        int expected = -1, detected = tops_cpu_isa_detected();
        /* on failure, expected holds the level another thread set meanwhile */
        isa = atomic_compare_exchange_strong_explicit(&g_isa, &expected, detected, memory_order_relaxed,
                                                      memory_order_relaxed)
                  ? detected
                  : expected;
    }
    return isa;
}

int tops_cpu_isa_set(int level) {
    int detected = tops_cpu_isa_detected();
    if (level < 0 || level > detected) level = detected;
    atomic_store_explicit(&g_isa, level, memory_order_relaxed);
    return level;
}

/* testutil.h - a tiny assertion harness for the C core's unit tests. */
#ifndef TOPS_TESTUTIL_H
#define TOPS_TESTUTIL_H
#include <stdio.h>
#include <stdlib.h>

static int tu_failures = 0;
static int tu_checks = 0;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        tu_checks++;                                                                \
        if (!(cond)) {                                                              \
            tu_failures++;                                                          \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
        }                                                                           \
    } while (0)

#define CHECK_EQ_U32(a, b)                                                                   \
    do {                                                                                     \
        unsigned long long _a = (unsigned long long)(uint32_t)(a), _b = (unsigned long long)(uint32_t)(b); \
        tu_checks++;                                                                         \
        if (_a != _b) {                                                                      \
            tu_failures++;                                                                   \
            fprintf(stderr, "%s:%d: %s = 0x%08llx, expected 0x%08llx\n", __FILE__, __LINE__, #a, _a, _b); \
        }                                                                                    \
    } while (0)

/* deterministic xorshift so failures reproduce */
static unsigned long long tu_rng = 0x9E3779B97F4A7C15ull;
static inline unsigned tu_rand(void) {
    tu_rng ^= tu_rng << 13;
    tu_rng ^= tu_rng >> 7;
    tu_rng ^= tu_rng << 17;
    return (unsigned)(tu_rng >> 11);
}

static inline int tu_report(const char *name) {
    printf("%s: %d checks, %d failures\n", name, tu_checks, tu_failures);
    return tu_failures ? 1 : 0;
}
#endif

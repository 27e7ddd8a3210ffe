/*
 * w4a16_wgmma.cu - the Hopper path of the w4a16 linear for batches above 16 (sm_90a: wgmma).
 *
 * Same computation as w4a16_kernels.cu (see there), as out^T = W^T x^T with wgmma.m64nNk16:
 *  - A (64 output columns x 16 k per warpgroup) is the dequantised weight tile, built in registers
 *    (wgmma's register-A fragment is the mma.m16n8k16 one, per warp): natural k order here, so a
 *    thread needs byte t of two k-words per row and k16 step; one byte_perm places that byte in
 *    both half lanes and one lop3 with the 0x6400 magic yields (1024 + q_lo, 1024 + 16 q_hi)
 *    (fp16) or, from w and w >> 4, (128 + q_lo, 128 + q_hi) (bf16).
 *    A fragment row g is output column 2g, row g + 8 column 2g + 1 (of the warp's 16), so one
 *    8-byte shared load gives both rows' words and the epilogue stores column pairs.
 *  - B (16 k x BM rows of x) is read by the tensor cores straight from shared memory: x tiles of
 *    64 k are copied with cp.async into the canonical 128-byte-swizzled K-major layout.
 *  - 2 warpgroups x WNT x 64 columns per block, BM in {64, 128, 256} rows, KSUB x 64 k per stage;
 *    a cp.async pipeline of STAGES stages. Either each stage's wgmmas are waited for within the
 *    stage (issued QB k16 steps at a time, so the tensor cores start on a stage's first steps
 *    while the warpgroup dequantises its next ones), or (OVL) the A fragments are double-buffered
 *    and waited for one stage later, so the dequantisation of stage s+1 overlaps the tensor cores'
 *    work on stage s (see the comments at the waits: register-A wgmmas and what the compiler may
 *    do to those registers).
 *  - Split-K across a cluster and the epilogue as in w4a16_kernels.cu.
 * Built for sm_90a only; other targets get an empty kernel, which the host detects (its register
 * count) and then uses the mma.sync kernels instead.
 */
#include <type_traits>

#include "w4a16_common.cuh"

namespace tops_w4 {

/* BM rows of x (the wgmma N), 2 warpgroups x WNT m64 column tiles = BN = 128 WNT columns,
 * KSUB 64-k sub-tiles per stage (BK = 64 KSUB) */
template <int BM_, int WNT_, int KSUB_, int STAGES_, bool ACT_, bool OVL_ = false, int QB_ = 0, bool MB_ = false,
          bool KP_ = false>
struct WCfg {
    /* KP (plain groups): qweight in the k-interleaved layout (tops_cuda.h): k-word 4b + t of a
     * column holds k 2t, 2t+1, 2t+8, 2t+9 of the k16 steps 2b and 2b+1, so that one word is a
     * thread's four values of a fragment row for two steps, each pair one lop3 away. The qweight
     * tile's 16-byte chunks are swizzled by the k-word's parity (two threads t reading one bank
     * otherwise) */
    static constexpr bool KP = KP_ && !ACT_;
    /* OVL: A fragments double-buffered and each stage's wgmmas waited for one stage later
     * (wait_group 1), so a warpgroup dequantises stage s+1 while its stage-s wgmmas run; the
     * loop is unrolled by two in straight-line code so that the compiler never merges the two
     * buffers' computations (which would rewrite registers an in-flight wgmma reads) */
    static constexpr bool OVL = OVL_;
    /* MB (plain groups, without OVL): no block barrier per stage. A stage's copies are counted
     * on its slot's "full" mbarrier (cp.async arrivals, one per thread) and each warp waits for
     * that; each warp arrives on the slot's "empty" mbarrier once its wgmmas are done with it, and
     * a slot is refilled two iterations after its use (one stage fewer in flight), so a warp
     * waits for the others only when they are more than a stage behind */
    static constexpr bool MB = MB_ && !ACT_ && !OVL_;
    static constexpr int AHEAD = OVL_ || MB ? STAGES_ - 2 : STAGES_ - 1; /* stages in flight */
    static constexpr int BM = BM_, WNT = WNT_, KSUB = KSUB_, BN = 128 * WNT_, BK = 64 * KSUB_, KW = BK / 8;
    static constexpr int STAGES = STAGES_, NSTEP = 4 * KSUB_; /* k16 steps per stage */
    /* QB: k16 steps per batch of wgmmas (0: the whole stage). Without OVL a stage's steps are
     * dequantised and their wgmmas issued a batch at a time, so the tensor cores work on one batch
     * while the warpgroup dequantises the next; all batches are waited for at the stage's end */
    static constexpr int QB = QB_ ? QB_ : NSTEP;
    static_assert(NSTEP % QB == 0 && (!OVL_ || QB == NSTEP), "QB");
    static constexpr bool ACT = ACT_;
    static constexpr int NG = ACT ? 0 : BK / 32;    /* scale rows per stage (group >= 32) */
    static constexpr int XSUB_BYTES = BM * 128;     /* one [BM][64] half tile, 128-byte swizzle */
    static constexpr int X_BYTES = KSUB * XSUB_BYTES;
    static constexpr int W_BYTES = KW * BN * 4;     /* [KW][BN] words */
    static constexpr int S_BYTES = NG * BN * 2;
    static constexpr int Z_BYTES = NG * (BN / 8) * 4;
    static constexpr int GI_BYTES = ACT ? BK * 4 : 0;
    static constexpr int STAGE_RAW = X_BYTES + W_BYTES + S_BYTES + Z_BYTES + GI_BYTES;
    static constexpr int STAGE_BYTES = (STAGE_RAW + 1023) / 1024 * 1024; /* swizzle atoms: 1 KB */
    static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
    static constexpr int OUT_BYTES = BM * BN * 4;
    /* may split K through the caller's workspace (the 64-row tile, which serves small batches,
     * and the 128 x 256 one) */
    static constexpr bool GLOBAL = BM_ == 64 || (BM_ == 128 && !OVL_);
    static_assert(BM % 64 == 0 && BM <= 256, "BM");
    static_assert(STAGES >= (OVL ? 3 : 2), "stages");
    static_assert((KW * BN / 4) % 256 == 0 && NG * (BN / 8) <= 256, "copy split");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || !defined(__CUDA_ARCH__)
template <int N, class T> struct Wgmma;
/* wgmma.m64nNk16 with A from registers, B from a shared-memory descriptor, fp32 accumulators
 * d (N / 2 per thread): DOPS / AOPS / DESC / PRED the placeholders of d, a, the descriptor and the
 * scale-d predicate in the operand list, then the accumulators' constraints */
#define TOPS_WGMMA(N, TR, TY, DOPS, AOPS, DESC, PRED, ...)                                          \
    template <> struct Wgmma<N, TR> {                                                                \
        __device__ static __forceinline__ void run(float *d, const uint32_t *a, uint64_t desc) {    \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" PRED ", 0;\n"                         \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY " "            \
                         "{" DOPS "}, {" AOPS "}, %" DESC ", p, 1, 1, 0;\n}\n"                    \
                         : __VA_ARGS__                                                               \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));          \
        }                                                                                            \
    };
/* (through TOPS_WGMMA_, so that the operand macros expand into their arguments first) */
#define TOPS_WGMMA_(...) TOPS_WGMMA(__VA_ARGS__)
#define TOPS_D4(o) "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3])
#define TOPS_D16(o) TOPS_D4(o), TOPS_D4(o + 4), TOPS_D4(o + 8), TOPS_D4(o + 12)
#define TOPS_D64(o) TOPS_D16(o), TOPS_D16(o + 16), TOPS_D16(o + 32), TOPS_D16(o + 48)
#define TOPS_W64_OPS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31", \
    "%32, %33, %34, %35", "36", "37"
#define TOPS_W128_OPS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63", \
    "%64, %65, %66, %67", "68", "69"
#define TOPS_W256_OPS \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127", \
    "%128, %129, %130, %131", "132", "133"
TOPS_WGMMA_(64, F16, "f16", TOPS_W64_OPS, TOPS_D16(0), TOPS_D16(16))
TOPS_WGMMA_(64, BF16, "bf16", TOPS_W64_OPS, TOPS_D16(0), TOPS_D16(16))
TOPS_WGMMA_(128, F16, "f16", TOPS_W128_OPS, TOPS_D64(0))
TOPS_WGMMA_(128, BF16, "bf16", TOPS_W128_OPS, TOPS_D64(0))
TOPS_WGMMA_(256, F16, "f16", TOPS_W256_OPS, TOPS_D64(0), TOPS_D64(64))
TOPS_WGMMA_(256, BF16, "bf16", TOPS_W256_OPS, TOPS_D64(0), TOPS_D64(64))
#undef TOPS_W256_OPS
#undef TOPS_W128_OPS
#undef TOPS_W64_OPS
#undef TOPS_D64
#undef TOPS_D16
#undef TOPS_D4
#undef TOPS_WGMMA_
#undef TOPS_WGMMA
#endif

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wg_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
/* shared-memory mbarriers of the MB pipeline */
__device__ __forceinline__ void mb_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mb_arrive(uint32_t bar) {
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar) : "memory");
}
/* one arrival on bar once this thread's cp.async copies so far have landed */
__device__ __forceinline__ void mb_cp_arrive(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mb_wait(uint32_t bar, uint32_t parity) {
    asm volatile("{\n.reg .pred P;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P, [%0], %1;\n@!P bra WAIT;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}
__device__ __forceinline__ void keep_f(float &r) { asm volatile("" : "+f"(r)::"memory"); }
__device__ __forceinline__ void keep_u(uint32_t &r) { asm volatile("" : "+r"(r)::"memory"); }

/* the 64-row tile runs two blocks per SM (its shared memory allows it): the bound keeps it
 * within 128 registers, which it exceeds otherwise (160 with the lean loads) */
template <class C, class T>
__global__ void __launch_bounds__(256, C::BM == 64 ? 2 : 1) w4a16_wgmma_kernel(const LinParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int BM = C::BM, BN = C::BN, BK = C::BK, KW = C::KW, STAGES = C::STAGES;
    constexpr int WNT = C::WNT, NSTEP = C::NSTEP;
    constexpr bool FAST = T::FAST && !C::ACT;
    constexpr int NACC = BM / 2; /* m64 x nBM fp32 accumulator: BM/2 registers per thread */
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const uint32_t raw = smem_u32(smem_raw);
    const uint32_t base = (raw + 1023u) & ~1023u; /* swizzled tiles need 1 KB alignment */
    unsigned char *smem = smem_raw + (base - raw);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wg = warp >> 2, wq = warp & 3;
    int mt_i, nt_i;
    tile_coords(blockIdx.x, p.m_tiles, p.n_tiles, mt_i, nt_i);
    const int m0 = mt_i * BM, n0 = nt_i * BN;
    const int split = blockIdx.y, nsplit = gridDim.y;
    const int kt_begin = split * p.kt_per_split;
    const int kt_end = min(p.KT, kt_begin + p.kt_per_split);
    const int nkt = max(0, kt_end - kt_begin);
    const int pipe_bytes =
        (nsplit > 1 && !(C::GLOBAL && p.locks != nullptr) && C::OUT_BYTES > C::PIPE_BYTES) ? C::OUT_BYTES : C::PIPE_BYTES;
    uint32_t *tab = reinterpret_cast<uint32_t *>(smem + pipe_bytes); /* ACT: [G][BN] (s, -(magic+z)) */
    const int N8 = p.N >> 3;
    /* local column of A row g of column tile nt; row g + 8 is the next column */
    auto rcol = [&](int nt) { return (wg * WNT + nt) * 64 + wq * 16 + 2 * g; };

    /* ---- static copy assignments ---- */
    constexpr int X_J = BM / 32;                /* per 64-k sub-tile: BM rows x 8 chunks */
    const int x_r0 = tid >> 3, x_c = tid & 7;
    const uint32_t x_dst0 = (uint32_t)(x_r0 * 128 + ((x_c ^ (x_r0 & 7)) << 4));
    const uint16_t *x_src0 = p.x + (int64_t)(m0 + x_r0) * p.K + 8 * x_c;
    constexpr int W_J = KW * BN / 4 / 256, W_CPR = BN / 4; /* 16-byte chunks per qweight row */
    const int w_c = tid % W_CPR, w_r0 = tid / W_CPR;
    constexpr int W_RS = 256 / W_CPR;
    const bool w_colv = n0 + 4 * w_c < p.N;
    const uint32_t w_dst0 = (uint32_t)(C::X_BYTES + w_r0 * (BN * 4) + (C::KP ? w_c ^ ((w_r0 & 1) << 2) : w_c) * 16);
    const int32_t *w_src0 = p.qw + (int64_t)w_r0 * p.N + n0 + 4 * w_c;

    auto load_stage = [&](int buf, int kt) {
        const uint32_t st = base + (uint32_t)(buf * C::STAGE_BYTES);
#pragma unroll
        for (int ks = 0; ks < C::KSUB; ++ks) {
            const bool kv = kt * KW + ks * 8 + x_c < p.K8;
#pragma unroll
            for (int j = 0; j < X_J; ++j) {
                const bool v = kv && m0 + x_r0 + 32 * j < p.M;
                const uint16_t *src = x_src0 + (int64_t)(32 * j) * p.K + kt * BK + ks * 64;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                 st + ks * C::XSUB_BYTES + x_dst0 + j * 32 * 128),
                             "l"(v ? src : p.x), "r"(v ? 16 : 0));
            }
        }
#pragma unroll
        for (int j = 0; j < W_J; ++j) {
            const int r = w_r0 + j * W_RS;
            const bool v = w_colv && kt * KW + r < p.K8;
            const int32_t *src = w_src0 + (int64_t)(kt * KW + j * W_RS) * p.N;
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(st + w_dst0 + j * W_RS * BN * 4),
                         "l"(v ? src : p.qw), "r"(v ? 16 : 0));
        }
        if constexpr (!C::ACT) {
            if (tid < C::NG * (BN / 8)) {
                const int sr = tid / (BN / 8), sc = tid % (BN / 8);
                const int k0 = kt * BK;
                const int gg = (k0 >> p.gshift) + sr;
                const int glast = (min(k0 + BK, p.K) - 1) >> p.gshift;
                const bool v = gg <= glast && n0 + 8 * sc < p.N;
                const uint16_t *src = p.sc + (int64_t)gg * p.N + n0 + 8 * sc;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                 st + C::X_BYTES + C::W_BYTES + sr * (BN * 2) + sc * 16),
                             "l"(v ? src : p.sc), "r"(v ? 16 : 0));
                if (p.zmode != 0) {
                    const bool vz = gg <= glast && (n0 >> 3) + sc < N8;
                    const int32_t *zsrc = p.qz + (int64_t)gg * N8 + (n0 >> 3) + sc;
                    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                                     st + C::X_BYTES + C::W_BYTES + C::S_BYTES + sr * (BN / 2) + sc * 4),
                                 "l"(vz ? zsrc : p.qz), "r"(vz ? 4 : 0));
                }
            }
        } else {
            int32_t *sG = reinterpret_cast<int32_t *>(smem + buf * C::STAGE_BYTES + C::X_BYTES + C::W_BYTES);
            const int k0 = kt * BK;
            if (p.gidx != nullptr) {
                if (tid < BK / 4) {
                    const int k = k0 + 4 * tid;
                    cp_async16(sG + 4 * tid, k < p.K ? p.gidx + k : p.gidx, k < p.K);
                }
            } else if (tid < BK) {
                const int k = k0 + tid;
                sG[tid] = k < p.K ? k / p.gsize : 0;
            }
        }
    };

    /* Lean loads of interior stages (every k of the stage inside K, plain groups), the main
     * loop's common case, as in w4a16_kernels.cu: each thread's copies are the same rows,
     * columns and validity every stage, so they run from running pointers that advance by one
     * stage, with no bounds arithmetic (the general load_stage spent ~130 of a stage's ~310
     * instructions per thread at M = 64). Out-of-matrix chunks keep a valid address, size 0. */
    const int kt_lean0 = kt_begin + C::AHEAD; /* the first stage the main loop loads */
    /* x rows past M copy nothing (size 0) from row m0, which exists, so that every pointer
     * advances by the same BK. XONE (tiles of 128 and 256 rows): one running pointer (row m0, the
     * thread's chunk, the stage's k) and each copy's row at a fixed 32-bit offset from it (rows <
     * 256 x K < 2^31: launch_wgmma's caller checks K), one IMAD.WIDE per copy. H100, 8192 x 8192
     * M = 256: a pointer per row took ~32 of a stage's ~197 instructions per thread (the 64-bit
     * adds, selects for the rows past M, moves into aligned register pairs). The 64-row tile
     * keeps its two pointers (one offset more spilled at its 128-register cap) */
    constexpr bool XONE = X_J >= 4;
    uint32_t xl_sz[X_J];
    int32_t xl_off[X_J];
    const uint16_t *xl_next[XONE ? 1 : X_J];
#pragma unroll
    for (int j = 0; j < X_J; ++j) {
        const bool v = m0 + x_r0 + 32 * j < p.M;
        xl_sz[j] = v ? 16u : 0u;
        xl_off[j] = v ? (x_r0 + 32 * j) * p.K : 0;
    }
#pragma unroll
    for (int q = 0; q < (XONE ? 1 : X_J); ++q)
        xl_next[q] = p.x + (int64_t)m0 * p.K + 8 * x_c + (XONE ? 0 : xl_off[q]) + (int64_t)kt_lean0 * BK;
    const uint32_t wl_sz = w_colv ? 16u : 0u; /* (columns past N: from column n0, size 0) */
    const int64_t wl_kstep = (int64_t)KW * p.N;
    const int32_t *wl_next[W_J];
#pragma unroll
    for (int j = 0; j < W_J; ++j)
        wl_next[j] = (w_colv ? w_src0 : w_src0 - 4 * w_c) + (int64_t)(j * W_RS) * p.N + (int64_t)kt_lean0 * wl_kstep;
    /* scale / zero rows of an interior stage: one group, or BK / group of them */
    const int sl_rows = (1 << min(p.gshift, 30)) >= BK ? 1 : BK >> p.gshift;
    const int sl_r = tid / (BN / 8), sl_c = tid % (BN / 8);
    const bool sl_v = tid < C::NG * (BN / 8) && sl_r < sl_rows && n0 + 8 * sl_c < p.N;
    const bool zl_v = sl_v && p.zmode != 0 && (n0 >> 3) + sl_c < N8;
    const uint32_t sl_sz = sl_v ? 16u : 0u, zl_sz = zl_v ? 4u : 0u;
    const uint32_t sl_gstride = sl_v ? (uint32_t)p.N : 0u, zl_gstride = zl_v ? (uint32_t)N8 : 0u;
    const uint16_t *sl_base = sl_v ? p.sc + (int64_t)sl_r * p.N + n0 + 8 * sl_c : p.sc;
    const int32_t *zl_base = zl_v ? p.qz + (int64_t)sl_r * N8 + (n0 >> 3) + sl_c : p.qz;
    auto load_lean = [&](int buf, int kt) {
        const uint32_t st = base + (uint32_t)(buf * C::STAGE_BYTES);
#pragma unroll
        for (int ks = 0; ks < C::KSUB; ++ks)
#pragma unroll
            for (int j = 0; j < X_J; ++j)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                 st + ks * C::XSUB_BYTES + x_dst0 + j * 32 * 128),
                             "l"((XONE ? xl_next[0] + xl_off[j] : xl_next[j]) + ks * 64), "r"(xl_sz[j]));
#pragma unroll
        for (int j = 0; j < W_J; ++j)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(st + w_dst0 + j * W_RS * BN * 4),
                         "l"(wl_next[j]), "r"(wl_sz));
        if (tid < C::NG * (BN / 8)) {
            const uint32_t g0 = (uint32_t)((kt * BK) >> p.gshift);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                             st + C::X_BYTES + C::W_BYTES + sl_r * (BN * 2) + sl_c * 16),
                         "l"(sl_base + (uint64_t)g0 * sl_gstride), "r"(sl_sz));
            if (p.zmode != 0)
                asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                                 st + C::X_BYTES + C::W_BYTES + C::S_BYTES + sl_r * (BN / 2) + sl_c * 4),
                             "l"(zl_base + (uint64_t)g0 * zl_gstride), "r"(zl_sz));
        }
    };
    /* after each main-loop load, lean or not: the pointers move to the next stage */
    auto advance_lean = [&]() {
#pragma unroll
        for (int j = 0; j < W_J; ++j) wl_next[j] += wl_kstep;
#pragma unroll
        for (int q = 0; q < (XONE ? 1 : X_J); ++q) xl_next[q] += BK;
    };

    /* prologue: AHEAD stages in flight (without OVL each stage's wgmmas complete within its
     * iteration; with OVL one iteration later, so a buffer is refilled one stage later) */
    /* (static shared memory: the split epilogue reuses the dynamic region, mbarriers included) */
    __shared__ __align__(8) uint64_t mbar[C::MB ? 2 * STAGES : 1];
    const uint32_t mb_full = smem_u32(mbar), mb_empty = mb_full + 8u * STAGES;
    (void)mb_empty;
    if constexpr (C::MB) {
        if (tid == 0) {
#pragma unroll
            for (int s = 0; s < STAGES; ++s) {
                mb_init(mb_full + 8u * s, 256);
                mb_init(mb_empty + 8u * s, 8);
            }
        }
        __syncthreads();
    }
    if constexpr (C::ACT) build_group_table<T, BN>(p, tab, n0, tid);
    grid_dependency_wait(); /* launched with PDL (launch_split): x may still be being written */
#pragma unroll
    for (int s = 0; s < C::AHEAD; ++s) {
        if (s < nkt) {
            load_stage(s, kt_begin + s);
            if constexpr (C::MB) mb_cp_arrive(mb_full + 8u * s);
        }
        cp_async_commit();
    }
    grid_dependents_launch();

    float acc[WNT][NACC];
#pragma unroll
    for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
        for (int i = 0; i < NACC; ++i) acc[nt][i] = 0.f;
    uint32_t A[C::OVL ? 2 : 1][WNT][NSTEP][4]; /* [buffer][column tile][k16 step][reg] */
#pragma unroll
    for (int b = 0; b < (C::OVL ? 2 : 1); ++b)
#pragma unroll
        for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
            for (int j = 0; j < NSTEP; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) A[b][nt][j][r] = 0u;

    const uint32_t magic = T::MAGIC;
    const uint32_t sel_fast = (uint32_t)(t | (t << 8));           /* byte t -> bytes 0 and 2 */
    const uint32_t sel_shift = (uint32_t)(t | ((t + 4) << 8));    /* byte t of w, of w >> 4 */
    int cur_g = -1;
    uint32_t nz[WNT][2], sd[WNT][2]; /* per column tile and row (r, r+1): zero offsets, scale */
    uint32_t nzh[WNT][2];            /* KP, fp16: the zero offsets of the x 16 values */
#pragma unroll
    for (int nt = 0; nt < WNT; ++nt) nz[nt][0] = nz[nt][1] = sd[nt][0] = sd[nt][1] = nzh[nt][0] = nzh[nt][1] = 0u;
    const uint64_t desc_base = (uint64_t)(((base & 0x3FFFFu) >> 4) & 0x3FFFu) | (1ull << 16) | (64ull << 32) | (1ull << 62);

    auto deq = [&](uint32_t w, uint32_t nzr, uint32_t sdr) -> uint32_t {
        if constexpr (FAST) {
            const uint32_t q = and_or<0x00F0000Fu>(__byte_perm(w, w, sel_fast), magic);
            return T::fma2(T::fma2(q, 0x2C003C00u, nzr), sdr, NEG_ZERO2); /* (1, 1/16) */
        } else {
            const uint32_t q = and_or<0x000F000Fu>(__byte_perm(w, w >> 4, sel_shift), magic);
            return T::fma2(T::fma2(q, T::ONE2, nzr), sdr, NEG_ZERO2);
        }
    };
    /* KP: the fragment of step 2b + s from the words (wc0, wc1) of columns r0, r0 + 1: nibbles
     * (2s, 2s + 4) are k (2t, 2t + 1), (2s + 1, 2s + 5) k (2t + 8, 2t + 9) */
    auto deq_kp = [&](uint2 wv, int s, uint32_t *a, int nt) {
        const uint32_t wc[2] = {wv.x >> (8 * s), wv.y >> (8 * s)};
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            a[r] = T::fma2(T::fma2(and_or<0x000F000Fu>(wc[r], magic), T::ONE2, nz[nt][r]), sd[nt][r], NEG_ZERO2);
            if constexpr (FAST) /* high nibbles in place (1024 + 16 q) x 1/16 - (64 + z) */
                a[2 + r] = T::fma2(T::fma2(and_or<0x00F000F0u>(wc[r], magic), 0x2C002C00u, nzh[nt][r]), sd[nt][r], NEG_ZERO2);
            else
                a[2 + r] = T::fma2(T::fma2(and_or<0x000F000Fu>(wc[r] >> 4, magic), T::ONE2, nz[nt][r]), sd[nt][r], NEG_ZERO2);
        }
    };
    auto load_group = [&](const unsigned char *st, int gl) {
        const uint16_t *sS = reinterpret_cast<const uint16_t *>(st + C::X_BYTES + C::W_BYTES);
        const uint32_t *sZ = reinterpret_cast<const uint32_t *>(st + C::X_BYTES + C::W_BYTES + C::S_BYTES);
#pragma unroll
        for (int nt = 0; nt < WNT; ++nt) {
            const int r0 = rcol(nt);
            const uint32_t s2 = *reinterpret_cast<const uint32_t *>(sS + gl * BN + r0); /* rows r0, r0+1 */
            uint32_t zz = 0;
            if (p.zmode != 0) zz = sZ[gl * (BN / 8) + (r0 >> 3)] >> ((r0 & 7) * 4);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const uint32_t z = zero_of((zz >> (4 * r)) & 15u, p.zmode);
                const uint32_t sh = r ? (s2 >> 16) : (s2 & 0xFFFFu);
                sd[nt][r] = sh * 0x10001u;
                if constexpr (FAST && C::KP) { /* x 1 and x 16 values, each in both halves */
                    nz[nt][r] = (T::NEGMAG | z) * 0x10001u;
                    nzh[nt][r] = (0xD400u + (z << 4)) * 0x10001u;
                } else if constexpr (FAST) nz[nt][r] = (T::NEGMAG | z) | ((0xD400u + (z << 4)) << 16); /* -(1024+z), -(64+z) */
                else nz[nt][r] = (T::NEGMAG | z) * 0x10001u;
            }
        }
    };

    const bool ps = !C::ACT && (1 << min(p.gshift, 30)) >= BK; /* a stage within one group */
    auto stage = [&](int it, auto bufc, auto psc) {
        constexpr bool PS = decltype(psc)::value; /* whole stage in one group */
        constexpr int B = decltype(bufc)::value;  /* A buffer (always 0 without OVL) */
        (void)psc;
        (void)bufc;
        const int kt = kt_begin + it;
        (void)kt;
        const unsigned char *st = smem + (it % STAGES) * C::STAGE_BYTES;
        const uint32_t *sW = reinterpret_cast<const uint32_t *>(st + C::X_BYTES);
        uint2 wkp[C::KP ? WNT : 1]; /* KP: the words of columns r0, r0 + 1 for two k16 steps */
        (void)wkp;
#pragma unroll
        for (int j0 = 0; j0 < NSTEP; j0 += C::QB) {
#pragma unroll
            for (int j = j0; j < j0 + C::QB; ++j) {
                if constexpr (!C::ACT) {
                    /* plain groups are powers of two >= 32: one can start at an even k16 step
                     * only, and after a stage's first step only where groups are shorter than a
                     * stage (a block-uniform test; OVL runs one loop for both, PS = false) */
                    if ((j & 1) == 0 && (j == 0 || (!PS && !ps))) {
                        const int gabs = (kt * BK + 16 * j) >> p.gshift;
                        if (gabs != cur_g) {
                            cur_g = gabs;
                            load_group(st, gabs - ((kt * BK) >> p.gshift));
                        }
                    }
                }
#pragma unroll
                for (int nt = 0; nt < WNT; ++nt) {
                    const int r0 = rcol(nt);
                    if constexpr (C::KP) {
                        /* k-word 4 b + t of columns r0, r0 + 1 (chunks swizzled by the word's
                         * parity, see WCfg), loaded once for the steps 2 b and 2 b + 1 */
                        if ((j & 1) == 0)
                            wkp[nt] = *reinterpret_cast<const uint2 *>(sW + (2 * j + t) * BN + (r0 ^ ((t & 1) << 4)));
                        deq_kp(wkp[nt], j & 1, A[B][nt][j], nt);
                    } else {
                        const uint2 wa = *reinterpret_cast<const uint2 *>(sW + (2 * j) * BN + r0);
                        const uint2 wb = *reinterpret_cast<const uint2 *>(sW + (2 * j + 1) * BN + r0);
                        if constexpr (!C::ACT) {
                            A[B][nt][j][0] = deq(wa.x, nz[nt][0], sd[nt][0]);
                            A[B][nt][j][1] = deq(wa.y, nz[nt][1], sd[nt][1]);
                            A[B][nt][j][2] = deq(wb.x, nz[nt][0], sd[nt][0]);
                            A[B][nt][j][3] = deq(wb.y, nz[nt][1], sd[nt][1]);
                        } else {
                            (void)PS;
                            const int32_t *sG = reinterpret_cast<const int32_t *>(st + C::X_BYTES + C::W_BYTES);
                            const int2 ga = *reinterpret_cast<const int2 *>(sG + 16 * j + 2 * t);
                            const int2 gb = *reinterpret_cast<const int2 *>(sG + 16 * j + 8 + 2 * t);
                            const uint2 ea0 = *reinterpret_cast<const uint2 *>(tab + tab_at<BN>(ga.x, r0));
                            const uint2 ea1 = *reinterpret_cast<const uint2 *>(tab + tab_at<BN>(ga.y, r0));
                            const uint2 eb0 = *reinterpret_cast<const uint2 *>(tab + tab_at<BN>(gb.x, r0));
                            const uint2 eb1 = *reinterpret_cast<const uint2 *>(tab + tab_at<BN>(gb.y, r0));
                            A[B][nt][j][0] = deq(wa.x, __byte_perm(ea0.x, ea1.x, 0x7632), __byte_perm(ea0.x, ea1.x, 0x5410));
                            A[B][nt][j][1] = deq(wa.y, __byte_perm(ea0.y, ea1.y, 0x7632), __byte_perm(ea0.y, ea1.y, 0x5410));
                            A[B][nt][j][2] = deq(wb.x, __byte_perm(eb0.x, eb1.x, 0x7632), __byte_perm(eb0.x, eb1.x, 0x5410));
                            A[B][nt][j][3] = deq(wb.y, __byte_perm(eb0.y, eb1.y, 0x7632), __byte_perm(eb0.y, eb1.y, 0x5410));
                        }
                    }
                }
            }
            wg_fence();
            const uint64_t desc = desc_base + (uint64_t)(((it % STAGES) * C::STAGE_BYTES) >> 4);
#pragma unroll
            for (int j = j0; j < j0 + C::QB; ++j)
#pragma unroll
                for (int nt = 0; nt < WNT; ++nt)
                    Wgmma<BM, T>::run(acc[nt], A[B][nt][j],
                                      desc + (uint64_t)((j >> 2) * (C::XSUB_BYTES >> 4) + 2 * (j & 3)));
            wg_commit(); /* (no register fences on acc here: ptxas serialises wgmmas whose accumulators
                          * another instruction defines while they are in flight) */
        }
        /* The wgmmas read A from registers asynchronously, and the compiler, which does not know
         * that, may reuse (or recompute into) those registers once their last C++ use is issued.
         * Without OVL: wait for all of this stage's batches right here, with every batch's
         * fragments kept alive up to the wait, so nothing written meanwhile (a later batch's
         * dequantisation included) can be a register an in-flight wgmma still reads. With OVL: wait for the previous stage's
         * group and keep the other buffer alive up to that point. */
        if constexpr (C::OVL) {
            wg_wait<1>();
#pragma unroll
            for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
                for (int j = 0; j < NSTEP; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) keep_u(A[1 - B][nt][j][r]);
        } else {
            wg_wait<0>();
#pragma unroll
            for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
                for (int j = 0; j < NSTEP; ++j)
#pragma unroll
                    for (int r = 0; r < 4; ++r) keep_u(A[B][nt][j][r]);
        }
    };

    auto iteration = [&](int it, auto bufc, auto psc) {
        if constexpr (C::MB) {
            mb_wait(mb_full + 8u * (it % STAGES), (uint32_t)(it / STAGES) & 1u);
            const int nx = it + C::AHEAD;
            if (nx < nkt) {
                const int kt = kt_begin + nx, sl = nx % STAGES;
                /* the slot's last use, iteration nx - STAGES = it - 2: every warp done with it */
                if (nx >= STAGES) mb_wait(mb_empty + 8u * sl, (uint32_t)((nx - STAGES) / STAGES) & 1u);
                if ((kt + 1) * KW <= p.K8) load_lean(sl, kt);
                else load_stage(sl, kt);
                advance_lean();
                mb_cp_arrive(mb_full + 8u * sl);
            }
            cp_async_commit();
            stage(it, bufc, psc);
            __syncwarp();
            if (lane == 0) mb_arrive(mb_empty + 8u * (it % STAGES));
            return;
        }
        cp_async_wait<C::AHEAD - 1>();
        __syncthreads();
        {
            const int nx = it + C::AHEAD;
            if (nx < nkt) {
                const int kt = kt_begin + nx;
                if (!C::ACT && (kt + 1) * KW <= p.K8) load_lean(nx % STAGES, kt);
                else load_stage(nx % STAGES, kt);
                if constexpr (!C::ACT) advance_lean();
            }
            cp_async_commit();
        }
        stage(it, bufc, psc);
    };
    auto run = [&](auto psc) {
        using B0 = std::integral_constant<int, 0>;
        using B1 = std::integral_constant<int, C::OVL ? 1 : 0>;
        int it = 0;
        for (; it + 1 < nkt; it += 2) { /* straight-line pairs: buffer 0, then buffer 1 */
            iteration(it, B0{}, psc);
            iteration(it + 1, B1{}, psc);
        }
        if (it < nkt) iteration(it, B0{}, psc);
    };
    if constexpr (C::OVL) {
        run(std::false_type{}); /* one copy of the loop: two would need accumulator moves, which
                                   make ptxas serialise the wgmmas */
    } else {
        if (ps) run(std::true_type{});
        else run(std::false_type{});
    }
    wg_wait<0>();
#pragma unroll
    for (int b = 0; b < (C::OVL ? 2 : 1); ++b)
#pragma unroll
        for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
            for (int j = 0; j < NSTEP; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) keep_u(A[b][nt][j][r]);
#pragma unroll
    for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
        for (int i = 0; i < NACC; ++i) keep_f(acc[nt][i]);

    /* ---- epilogue: acc[nt][4i + e] holds (row g / g+8 -> column rcol / +1, m = 8i + 2t + (e & 1)) ---- */
    if (nsplit == 1) {
#pragma unroll
        for (int nt = 0; nt < WNT; ++nt) {
            const int col = n0 + rcol(nt);
            float b0 = 0.f, b1 = 0.f;
            if (p.bias != nullptr && col < p.N) {
                const uint32_t bb = *reinterpret_cast<const uint32_t *>(p.bias + col);
                b0 = T::to_f((uint16_t)(bb & 0xFFFFu));
                b1 = T::to_f((uint16_t)(bb >> 16));
            }
#pragma unroll
            for (int i = 0; i < BM / 8; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int m = m0 + 8 * i + 2 * t + e;
                    if (m < p.M && col < p.N) {
                        const uint32_t o = (uint32_t)T::from_f(acc[nt][4 * i + e] + b0) |
                                           ((uint32_t)T::from_f(acc[nt][4 * i + 2 + e] + b1) << 16);
                        *reinterpret_cast<uint32_t *>(p.out + (int64_t)m * p.N + col) = o;
                    }
                }
        }
        return;
    }
    /* split-K: f(local row, local column, the fp32 partials of that column and the next) for each
     * of the thread's accumulator pairs */
    auto for_each_out2 = [&](auto f) {
#pragma unroll
        for (int nt = 0; nt < WNT; ++nt)
#pragma unroll
            for (int i = 0; i < BM / 8; ++i)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    f(8 * i + 2 * t + e, rcol(nt), make_float2(acc[nt][4 * i + e], acc[nt][4 * i + 2 + e]));
    };
    if constexpr (C::GLOBAL) {
        if (p.locks != nullptr) { /* through the workspace (see launch_wg) */
            global_reduce_store<T, BM, BN>(p, m0, n0, split, nsplit, tid, nullptr, [&](float *slice) {
                for_each_out2([&](int ml, int lc, float2 v) {
                    if (m0 + ml < p.M && n0 + lc < p.N)
                        __stcg(reinterpret_cast<float2 *>(slice + (int64_t)(m0 + ml) * p.N + n0 + lc), v);
                });
            });
            return;
        }
    }
    cp_async_wait<0>();
    __syncthreads();
    float *sO = reinterpret_cast<float *>(smem); /* [BM][BN] */
    for_each_out2([&](int ml, int lc, float2 v) { *reinterpret_cast<float2 *>(sO + ml * BN + lc) = v; });
    cluster_reduce_store<T, BM, BN>(p, sO, m0, n0, split, nsplit, tid);
#else
    (void)p;
    __trap();
#endif
}

/* this binary holds the sm_90a kernel, not the empty stand-in */
template <class Kern> static bool holds_sm90a(Kern kern) {
    cudaFuncAttributes fa;
    const bool built = cudaFuncGetAttributes(&fa, kern) == cudaSuccess && fa.numRegs >= 64;
    (void)cudaGetLastError();
    return built;
}

/* waves(s) for wide_split of a K split through clusters: the waves of `tiles` clusters of s blocks
 * (each with pipe, or above one block the larger of pipe and out, plus tab bytes of shared memory)
 * counted in the clusters that can be resident at once; 0 where none fit */
template <class Kern>
static auto cluster_waves(Kern kern, int64_t tiles, size_t pipe, size_t out, size_t tab, const DevInfo &di) {
    return [=, &di](int s) -> int64_t {
        if (s == 5 || s == 7) return 0; /* (clusters of 5 and 7 not measured) */
        const int occ = resident(kern, (s > 1 ? std::max(pipe, out) : pipe) + tab, s, di);
        return occ > 0 ? (tiles + occ - 1) / occ : 0;
    };
}

/* The 128 x 256 tile's K split and its estimated time (us): through clusters (waves counted in
 * the clusters of s blocks that can be resident) or, where the caller's workspace holds room >= 2
 * partials, through the workspace and a sum after (waves counted in blocks); ws: the workspace's
 * is the cheaper. The times per wave, fitted on the H200 (CUDA graphs, M = 128, fp16, one wave
 * but where said; estimated / measured, us):
 *  - clusters 9.2 + 0.86 per 64-k step: 5120 x 5120 split 4 26.4 / 26.0, 13824 x 5120 4 55.6 /
 *    55.6, 14336 x 4096 6 41.9 / 42.0, 8192 x 8192 3 46.2 / 46.4, 4096 x 4096 6 18.7 / 18.3,
 *    4096 x 14336 2 36.7 / 38.9, 3584 x 18944 3 (two waves) 51.0 / 50.5;
 *  - the workspace 7.6 + 1.01 per step (more blocks at once, each slower): 5120 x 5120 split 6
 *    21.7 / 21.1, 13824 x 5120 6 44.0 / 45.0, 14336 x 4096 8 35.9 / 37.1, 8192 x 8192 4 39.9 /
 *    42.3, 4096 x 4096 8 15.7 / 16.1, 2048 x 5120 6 13.7 / 13.7, 3584 x 18944 3 (two waves) 53.6
 *    / 53.6.
 * Split by the old count (clusters only), those first four took 26.0, 55.9, 42.2 and 46.4 us. */
template <class Kern>
static int wide_choice(Kern kern, int KT, int64_t tiles, size_t pipe, size_t out, size_t tab, int64_t room,
                       const DevInfo &di, bool &ws, double &cost) {
    double cost_cl = 1e300, cost_ws = 1e300;
    const int sc = wide_split(KT, cluster_waves(kern, tiles, pipe, out, tab, di), 9.2, 0.86, &cost_cl);
    int sw = 1;
    if (room >= 2) {
        const int occ = resident(kern, pipe + tab, 1, di);
        sw = wide_split(
            KT, [&](int s) -> int64_t { return s <= room && occ > 0 ? (tiles * s + occ - 1) / occ : 0; }, 7.6,
            1.01, &cost_ws);
    }
    ws = sw > 1 && cost_ws < cost_cl;
    cost = ws ? cost_ws : cost_cl;
    return ws ? sw : sc;
}

/* the K split: by the general model (choose_split), fill_split or wide_split */
enum class SplitRule { Model, Fill, Wide };
template <class C, class T, SplitRule R = SplitRule::Model>
int launch_wg(const LinParams &base, void *stream) {
    auto kern = w4a16_wgmma_kernel<C, T>;
    static const bool built = holds_sm90a(kern);
    if (!built) return -1;
    int64_t tiles;
    LinParams p = tiled<C>(base, tiles);
    const size_t pipe = (size_t)C::PIPE_BYTES + 1024, out = (size_t)C::OUT_BYTES + 1024,
                 tab = C::ACT ? (size_t)p.G * C::BN * 4 : 0;
    int split = 0;
    if constexpr (R == SplitRule::Fill) split = fill_split(p.KT, tiles);
    if constexpr (R == SplitRule::Wide) {
        const DevInfo di = dev_info();
        if (!allow_dyn_smem((const void *)kern, std::min(std::max(pipe, out) + tab, (size_t)di.optin_smem), di))
            return TOPS_ERR_CUDA;
        const bool ws_on = C::GLOBAL && p.locks != nullptr;
        bool ws = false;
        double cost = 0.0;
        split = wide_choice(kern, p.KT, tiles, pipe, out, tab,
                            ws_on ? p.part_floats / ((int64_t)p.M * p.N) : 0, di, ws, cost);
        if (ws_on && (ws || g_force_split > 0)) /* (a forced split: through the workspace) */
            return launch_split(kern, p, tiles, pipe, pipe, tab, stream, false, split, launch_reduce<T>);
    }
    if (R != SplitRule::Wide && C::GLOBAL && p.locks != nullptr) {
        /* split-K through the workspace (offered for the 64-row tile), split by the general
         * model, where that splits more than clusters would: H200, CUDA graphs, M = 64, against
         * clusters split by fill_split: 8192 x 8192 28.7 us (split 4) against 30.3 (2), 14336 x
         * 4096 26.6 (8) against 29.1 (6), 28672 x 4096 48.4 against 53.4, 4096 x 4096 12.9
         * against 13.5; at the same split 2 (4096 x 14336) 27.3-27.4 against 25.0. No partial
         * tile in shared memory. Where fill_split splits more than 2 ways, the workspace too:
         * clusters of 3 or 6 of two resident blocks per SM were slow (M = 64, clusters / the
         * workspace: 5120 x 5120 split 6 20.2 us / 14.0, 13824 x 5120 split 6 40.4 / 29.4,
         * 3584 x 3584 split 6 11.5 / the model's 4 9.3). */
        const int sg = choose_split(kern, p, tiles, pipe, pipe, tab, false, nullptr,
                                    reduce_after(C::BM)); /* (a forced split: that) */
        if (g_force_split > 0 || sg > split || split > 2)
            return launch_split(kern, p, tiles, pipe, pipe, tab, stream, false, sg,
                                reduce_after(C::BM) ? launch_reduce<T> : nullptr);
    }
    p.locks = nullptr;
    p.part = nullptr;
    return launch_split(kern, p, tiles, pipe, out, tab, stream, false, split);
}

template <class T, bool ACT, bool KP>
int dispatch_wg(const LinParams &p, int cfg, void *stream) {
    switch (cfg) { /* rows x columns, k per stage */
    /* 10 and 11 issue a stage's wgmmas two k16 steps at a time (H200, CUDA graphs, best split
     * each, batches of 2 / 1 / the whole stage: M = 64 4096 x 4096 10.0 / 10.4 / 10.8 us, 4096 x
     * 14336 25.8 / 26.7 / 27.5, 8192 x 28672 86.9 / 87.8 / 88.5, 8192 x 8192 27.0 / 27.3 / 27.0;
     * cfg 11 at M = 128, 2 / whole: 8192 x 28672 135.1 / 142.8, 4096 x 28672 69.7 / 73.2).
     * 11 runs without the block barrier (MB, plain groups; M = 128, best split, MB / barrier: 8192 x 28672
     * 129.2 / 133.8, 4096 x 28672 67.0 / 69.2, 14336 x 4096 42.6 / 45.3); on 10 MB measured equal
     * to 5% slower (one stage of four fewer in flight), on 14 / 16 (OVL) not built. */
    case 10: return launch_wg<WCfg<64, 1, 2, 4, ACT, false, 2, false, KP>, T, SplitRule::Fill>(p, stream); /* 64 x 128, k 128 */
    case 11: return launch_wg<WCfg<128, 2, 1, 5, ACT, false, 2, true, KP>, T, SplitRule::Wide>(p, stream); /* 128 x 256, k 64 */
    case 14: return launch_wg<WCfg<128, 1, 1, 5, ACT, true, 0, false, KP>, T>(p, stream); /* 128 x 128, overlapped */
    case 16: return launch_wg<WCfg<256, 1, 1, 4, ACT, true, 0, false, KP>, T>(p, stream); /* 256 x 128, overlapped */
    default: return -1;
    }
}

/* M = 65..128, plain groups: the 128 x 256 tile (11) unless the 128 x 128 one (14) is estimated
 * faster: 11 as wide_choice splits and estimates it (room: the partials the workspace will hold),
 * 14 by its time per wave fitted on the H200 (CUDA graphs, M = 128), 5.9 + 0.557 us per 64-k step,
 * waves counted in clusters of one block per SM as it was fitted (5120 x 5120 splits 2 / 3
 * estimated 28.2 / 41.8 us, measured 28.0 / 40.6: 40 tiles, 39 clusters of 3 fit). Measured (11 /
 * 14, best split each, us): 3584 x 3584 15.2 / 13.5 (estimated 14.7 / 13.7), 2048 x 5120 13.7 /
 * 14.5, 4096 x 4096 16.1 / 17.8, 5120 x 5120 21.1 / 28.0, 8192 x 8192 42.3 / 45.6 (39.9 / 41.5),
 * 14336 x 4096 37.1 / 47.4, 4096 x 14336 38.9 / 41.0, 13824 x 5120 45.0 / 63.3, 3584 x 18944
 * 50.5 / 63.6, 18944 x 3584 44.4 / 48.6; 8192 x 28672 129.2 / 154.7 (an earlier build). */
bool wgmma_m128_wide(int64_t K, int64_t N, int64_t room) {
    using C11 = WCfg<128, 2, 1, 5, false, false, 2, true>;
    using C14 = WCfg<128, 1, 1, 5, false, true>;
    auto k11 = w4a16_wgmma_kernel<C11, F16>;
    auto k14 = w4a16_wgmma_kernel<C14, F16>;
    const DevInfo di = dev_info();
    if (di.major != 9 || di.minor != 0 || !wgmma_built()) return true; /* (the mma.sync stand-ins) */
    const int KT = (int)((K + 63) / 64);
    const size_t pipe11 = (size_t)C11::PIPE_BYTES + 1024, out11 = (size_t)C11::OUT_BYTES + 1024;
    const size_t one = (size_t)di.sm_smem / 2 + 1024; /* (more than half an SM's: one block each) */
    const size_t smem14 = std::max({(size_t)C14::PIPE_BYTES + 1024, (size_t)C14::OUT_BYTES + 1024, one});
    if (smem14 > (size_t)di.optin_smem || !allow_dyn_smem((const void *)k14, smem14, di) ||
        !allow_dyn_smem((const void *)k11, std::max(pipe11, out11), di)) {
        (void)cudaGetLastError(); /* (not left for the launch's check) */
        return true;
    }
    const int64_t t14 = (N + 127) / 128;
    double c14 = 1e300;
    for (int s : {1, 2, 3, 4, 6, 8}) {
        if (s > 1 && s > KT / 2) break;
        const int occ = resident(k14, smem14, s, di);
        if (occ > 0) c14 = std::min(c14, (double)((t14 + occ - 1) / occ) * (5.9 + 0.557 * (double)((KT + s - 1) / s)));
    }
    bool ws = false;
    double c11 = 0.0;
    wide_choice(k11, KT, (N + 255) / 256, pipe11, out11, 0, room, di, ws, c11);
    return c11 <= c14;
}

/* M = 129..256, plain groups: whether the 128 x 256 tile with its K split through the workspace
 * (room: the partials it holds) is estimated faster than the 256 x 128 one split through clusters,
 * where the 256-row tiles are too few to fill the GPU. 16 by its time per wave on the H200 (CUDA
 * graphs, M = 256, waves counted in clusters that fit), 6.0 + 0.87 us per 64-k step: 4096 x 4096
 * split 3 25.1 estimated / 25.7 measured, 14336 x 4096 split 3 71.3 / 70.4. Automatic choice, 16
 * (main) -> this rule, us, M = 192 / 256: 5120 x 5120 40.7 / 41.6 -> 32.0 / 34.9 (11, split 3),
 * 13824 x 5120 87.6 / 92.1 -> 75.8 / 81.4 (11, 3), 14336 x 4096 66.9 / 70.4 -> 60.9 / 66.0 (11, 4),
 * 4096 x 4096 25.1 / 25.7 -> 22.2 / 24.3 (11, 4); 3584 x 3584 and 4096 x 14336 keep 16 (11's best:
 * 20.2 / 21.3 against 18.7 / 19.5, and 62.3 / 65.6 against 56.5 / 60.8). */
constexpr double kA16 = 6.0, kB16 = 0.87;
bool wgmma_m256_wide(int64_t M, int64_t K, int64_t N, int64_t room) {
    using C11 = WCfg<128, 2, 1, 5, false, false, 2, true>;
    using C16 = WCfg<256, 1, 1, 4, false, true>;
    auto k11 = w4a16_wgmma_kernel<C11, F16>;
    auto k16 = w4a16_wgmma_kernel<C16, F16>;
    const DevInfo di = dev_info();
    if (room < 2 || di.major != 9 || di.minor != 0 || !wgmma_built()) return false;
    const int KT = (int)((K + 63) / 64);
    const size_t pipe11 = (size_t)C11::PIPE_BYTES + 1024, out11 = (size_t)C11::OUT_BYTES + 1024;
    const size_t pipe16 = (size_t)C16::PIPE_BYTES + 1024, out16 = (size_t)C16::OUT_BYTES + 1024;
    if (!allow_dyn_smem((const void *)k11, std::max(pipe11, out11), di) ||
        !allow_dyn_smem((const void *)k16, std::max(pipe16, out16), di)) {
        (void)cudaGetLastError(); /* (not left for the launch's check) */
        return false;
    }
    const int64_t t16 = ((M + 255) / 256) * ((N + 127) / 128);
    double c16 = 1e300;
    wide_split(KT, cluster_waves(k16, t16, pipe16, out16, 0, di), kA16, kB16, &c16);
    bool ws = false;
    double c11 = 0.0;
    wide_choice(k11, KT, ((M + 127) / 128) * ((N + 255) / 256), pipe11, out11, 0, room, di, ws, c11);
    return ws && c11 < c16;
}

bool wgmma_built() {
    static const bool built = holds_sm90a(w4a16_wgmma_kernel<WCfg<256, 1, 1, 4, false, true>, F16>);
    return built;
}

int launch_wgmma(const LinParams &p, bool bf16, bool act, bool kp, int cfg, void *stream) {
    if (kp) return bf16 ? dispatch_wg<BF16, false, true>(p, cfg, stream) : dispatch_wg<F16, false, true>(p, cfg, stream);
    if (bf16) return act ? dispatch_wg<BF16, true, false>(p, cfg, stream) : dispatch_wg<BF16, false, false>(p, cfg, stream);
    return act ? dispatch_wg<F16, true, false>(p, cfg, stream) : dispatch_wg<F16, false, false>(p, cfg, stream);
}

} // namespace tops_w4

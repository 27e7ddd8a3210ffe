/*
 * w4a16_kernels.cu - fused w4a16 linear on CUDA: fp16 / bf16 / fp32 activations times 4-bit GPTQ
 * weights (qweight [K/8, N] int32 packed along K, scales [G, N], qzeros [G, N/8] v1 / v2 / none,
 * optional act-order g_idx), fp32 accumulation, one rounding to the activation dtype.
 *
 * Semantics: exactly tops_w4a16_linear of ../core/tops.h (see tops_cuda.h for the launcher).
 * This file: the mma.sync kernel (every batch size on sm_80+, batches up to 32 on Hopper), the
 * CUDA-core fallback and the launcher. w4a16_wgmma.cu: the Hopper wgmma kernel (batches above 32,
 * needs an sm_90a build). w4a16_common.cuh: shared helpers and the split / cluster launch.
 *
 * Design of the mma.sync kernel:
 *
 *  - "Swap A and B" tensor-core GEMM: we compute out^T = W^T x^T with mma.sync.m16n8k16, the
 *    dequantised weights being the 16-row A operand (16 output columns n) and the activations the
 *    8-wide B operand (8 rows m of x). Small batches then waste at most 7/8 of a cheap mma instead of
 *    15/16, and the same code is a normal tiled GEMM for large M.
 *
 *  - k permutation instead of a weight repack. A thread (g = lane/4, t = lane%4) owns the k slots
 *    {2t, 2t+1, 2t+8, 2t+9} of an m16n8k16 in both A and B, so any bijection between slots and real
 *    k that is applied to both operands leaves the product unchanged. Over 32 k (two mmas) thread t
 *    takes k-word t of the GPTQ layout (8 consecutive k of one column): nibbles (0,4) fill slots
 *    (2t,2t+1) of the first mma, (1,5) slots (2t+8,2t+9), (2,6) and (3,7) those of the second one.
 *    Those nibble pairs are exactly what the magic-number trick yields in one lop3:
 *    ((w >> 4i) & 0x000F000F) | 0x64006400 is the half2 (1024 + q_i, 1024 + q_{i+4}) (bf16: 0x4300,
 *    128 + q); fp16 also takes pairs (1,5) and (3,7) unshifted as 1024 + 16 q and scales by 1/16 in
 *    the same fma. The activations are permuted to match with 4 byte-permutes of a 16-byte load
 *    (x0,x4) (x1,x5) (x2,x6) (x3,x7): by every warp after its fragment load, or (XREG, the lean
 *    small-batch tiles) once per chunk, by the thread that brings it into shared memory.
 *
 *  - Columns: a 16-byte load of qweight gives 4 consecutive columns of one k-word. They become the
 *    rows g and g+8 of two n16 mma tiles, so a warp covers 32 columns per 16-byte load, and each
 *    thread ends up owning 4 consecutive output columns (8-byte stores).
 *
 *  - Dequant: q - z exactly (small integers) in one fma per pair; for small batches (FACT) the
 *    mma accumulates sum (q - z) x per group and the fp32 scale multiplies that partial sum when
 *    the group ends; otherwise one more fma multiplies each weight by its half2 scale. Zero points
 *    and scales are unpacked once per group, not per weight.
 *
 *  - Pipeline: weights, activations and the scales / zeros of the stage's groups are copied with
 *    cp.async (16-byte, zero-filled outside the matrix) into STAGES shared-memory stages; every
 *    thread reads its fragments back with 16-byte shared loads (XOR-swizzled, conflict-free).
 *
 *  - Split-K: when the output tiles alone cannot fill the GPU (small M), up to 8 blocks split K and
 *    form a thread-block cluster (sm_90); their fp32 partial tiles are reduced through distributed
 *    shared memory by one launch, no workspace, no atomics, deterministic. The small-batch tiles
 *    (PUSH) send each part of their partial tile to the block that owns it (st.async, counted by
 *    the owner's mbarrier), so a block waits only for its own part and nobody for the readers.
 *    The split is chosen from the occupancy (clusters that can be resident) and the balance of
 *    blocks over the SMs. On sm_90 the tiles of up to 32 rows here and the 64-row wgmma tile may
 *    split K through the caller's workspace instead (global_reduce_store), where clusters would
 *    leave SMs idle: the last block of each 8- or 16-row tile sums its partials, a kernel after
 *    the GEMM (reduce_partials_kernel) those of the larger tiles.
 *
 *  - Act-order (g_idx, or a group size that is not a power of two >= 32): the block first builds a
 *    table (scale, -(magic + zero)) for every group and each of its columns in shared memory; each
 *    k then looks its group up (g_idx staged with the stage).
 *
 *  - fp32 activations, unaligned pointers or an act-order table too large for shared memory: a
 *    simple CUDA-core kernel (correct, not fast).
 */
#include <map>
#include <tuple>
#include <type_traits>

#include "w4a16_common.cuh"

namespace tops_w4 {

/* ---- the tensor-core kernel ----------------------------------------------------------------
 * Block tile: BN output columns x BM rows of x, BK k per pipeline stage; 8 warps laid out
 * WARPS_N x WARPS_M, a warp owning WTN = BN/WARPS_N columns (CN chunks of 32) and WTM = BM/WARPS_M
 * rows (MT m8 tiles). blockIdx.x: output tile (grouped raster), blockIdx.y: K split (cluster rank).
 * FACT (small MT, plain groups): the mma accumulates sum (q - z) x for one group at a time and the
 * fp32 scale is applied to that partial sum when the group ends, so the weights need no multiply.
 */
template <int BN_, int BM_, int WARPS_N_, int BK_, int STAGES_, bool ACT_, bool PUSH_ = false, int MINB_ = 0,
          bool LEAN_ = false, bool KP_ = false, bool PG_ = false, bool PB_ = false>
struct Cfg {
    /* KP (plain groups): qweight in the k-interleaved layout (tops_cuda.h), whose nibble pairs are
     * already in the fragments' k order: x stays in its natural order and the B fragments come
     * from ldmatrix (x chunk c of row r at c ^ (r & 7), conflict-free for it) */
    static constexpr bool KP = KP_ && !ACT_;
    static constexpr int BN = BN_, BM = BM_, WARPS_N = WARPS_N_, BK = BK_, STAGES = STAGES_;
    static constexpr int MINB = MINB_ ? MINB_ : ((BM_ * BN_ >= 128 * 256) ? 1 : 2); /* blocks per SM */
    static constexpr bool ACT = ACT_;
    static constexpr int WARPS = 8, WARPS_M = WARPS / WARPS_N;
    static constexpr int WTN = BN / WARPS_N, CN = WTN / 32;
    static constexpr int WTM = BM / WARPS_M, MT = WTM / 8;
    static constexpr bool FACT = !ACT && MT <= 2;
    static constexpr int KW = BK / 8;   /* k-words (rows of qweight) per stage */
    static constexpr int NSUB = BK / 32;
    static constexpr int NG = ACT ? 0 : BK / 32; /* scale rows per stage (group >= 32) */
    static constexpr int W_BYTES = KW * BN * 4;
    /* PB (the small-batch tiles, plain groups): x[:, perm] of the block's whole K range is
     * gathered by the block into shared memory after the pipeline (gather_in_block), so the
     * stages carry no x */
    static constexpr bool PB = PB_ && PUSH_ && !ACT_ && !PG_;
    static constexpr int X_BYTES = PB ? 0 : BM * BK * 2;
    static constexpr int SLICE_PER_KT = PB ? BM * BK * 2 : 0; /* the gathered x, per k-tile */
    static constexpr int S_BYTES = NG * BN * 2;
    static constexpr int Z_BYTES = NG * (BN / 8) * 4;
    static constexpr int GI_BYTES = ACT ? BK * 4 : 0;
    static constexpr int STAGE_BYTES = W_BYTES + X_BYTES + S_BYTES + Z_BYTES + GI_BYTES;
    static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
    static constexpr int OUT_BYTES = BM * BN * 4; /* fp32 partial tile for the split-K reduction */
    /* PUSH: split-K partials pushed into the owning block's receive area (its own region after
     * the pipeline, [split][ceil(tile / nsplit)] float4) instead of read from every block */
    static constexpr bool PUSH = PUSH_;
    static constexpr int RECV_BYTES = PUSH ? OUT_BYTES + 8 * 16 : 0;
    static constexpr int PUSH_BYTES = PIPE_BYTES + RECV_BYTES + 16; /* + the mbarrier */
    /* GLOBAL: may split K through the caller's workspace instead (the tiles of up to 32 rows;
     * the larger ones stand in for the wgmma tiles, and the code would cost them registers) */
    static constexpr bool GLOBAL = BM_ <= 32;
    /* LEAN (small-batch tiles, plain groups): interior stages load from running pointers, with
     * no bounds arithmetic (see the kernel) */
    static constexpr bool LEAN = LEAN_ && PUSH_ && !ACT_;
    /* XREG (lean small-batch tiles, one x chunk per thread and stage at most): x goes through a
     * register instead of cp.async and is stored already in the fragments' k order (see the
     * kernel), which saves the 4 byte-permutes per m8 tile and 32 k of every warp. Measured on
     * the H200 (w4a16_cuda_dev.py --sweep, three runs): 8192 x 8192 M = 16 18.7-19.1 -> 18.1-18.3
     * us, 8192 x 28672 M = 1 37.3-37.9 -> 36.3-36.9, bf16 8192 x 8192 M = 1 16.2-16.3 -> 15.6-15.7;
     * in the M <= 8 build that runs one block per SM (no lean loads) it lost 2-4% (14336 x 4096
     * M = 1 14.8-15.1 -> 15.2-15.3, 4096 x 4096 5.6 -> 5.7-5.9), so that one keeps cp.async */
    static constexpr bool XREG = LEAN_ && BM_ * KW <= 256 && !KP && !PB;
    /* PG (the small-batch tiles, plain groups): x[:, perm] is gathered by the grid itself
     * (gather_in_grid), not by a kernel before it */
    static constexpr bool PG = PG_ && PUSH_ && !ACT_;
    static_assert(WARPS_N * WARPS_M == WARPS, "warp layout");
    static_assert(!XREG || STAGES >= 3, "XREG stores a stage one iteration after loading it");
    static_assert(CN >= 1 && WTN % 32 == 0, "warp columns");
    static_assert(MT >= 1 && WTM % 8 == 0, "warp rows");
    static_assert(BK >= 64 && BK % 32 == 0 && KW <= 256 && 256 % KW == 0, "BK");
    static_assert(BN >= 32 && BN <= 1024 && 256 % (BN / 8) == 0, "BN");
    static_assert(W_BYTES % 16 == 0 && X_BYTES % 16 == 0 && S_BYTES % 16 == 0 && Z_BYTES % 16 == 0,
                  "16-byte aligned sections");
};

/* ---- x[:, perm] gathered by the GEMM's own grid (C::PG) --------------------------------------
 * The small-batch tiles, split K through the workspace: the blocks of each K range gather that
 * range of x[:, perm] (groups of 8 k, 16-byte stores) into the workspace before the partials, a
 * share each, count themselves on the range's word after the tile locks, and wait (one thread
 * polling with acquire loads) until all have; their weights stream meanwhile. Only where the
 * whole grid can be resident (launch_split), and the wait is bounded as shared_sum's: past
 * kShareSpin cycles a block gathers the x it reads itself (the same values the others write).
 * The last block to leave puts the words back to 0.
 * It replaces the gather kernel only where that one has to signal the GEMM late (few column
 * tiles, M > 4, x large: see late_gather_pays); elsewhere the barrier's chain (the slowest
 * block's start, its loads and stores, the count, the poll) cost more than the kernel's
 * hand-over. H200, CUDA graphs, k-interleaved, us, grid / best gather kernel (plain): 14336 x
 * 4096 M = 8 15.6 / 17.5 (12.8), M = 16 18.3 / 19.8 (14.9), 4096 x 4096 M = 16 9.5 / 10.0 (7.4);
 * but 8192 x 8192 M = 1 15.4 / 14.0 (12.6), M = 16 18.7 / 18.1 (15.6), 4096 x 4096 M = 8 8.3 /
 * 7.1 (6.1). One word for the whole grid was up to 0.6 us slower, one block gathering each range
 * for the others up to 12 us (8192 x 8192 M = 16 26.7). */
constexpr int kLocks = 16384; /* tile locks per launch at most (the gather's two words follow) */
/* where the split-K partials start in the workspace: after x[:, perm] of `esize`-byte elements
 * (none without a perm), 256-byte aligned */
__host__ __device__ inline size_t partials_off(int64_t M, int64_t K, int esize) {
    return ((size_t)M * (size_t)K * (size_t)esize + 255) & ~(size_t)255;
}
/* row[a.x], row[a.y], ..., row[b.w]: 8 elements of an x row at perm words (a, b), one 16-byte vector */
__device__ __forceinline__ uint4 gather8(const uint16_t *row, int4 a, int4 b) {
    return make_uint4((uint32_t)row[a.x] | ((uint32_t)row[a.y] << 16), (uint32_t)row[a.z] | ((uint32_t)row[a.w] << 16),
                      (uint32_t)row[b.x] | ((uint32_t)row[b.y] << 16), (uint32_t)row[b.z] | ((uint32_t)row[b.w] << 16));
}
/* x[m, perm[k .. k+7]] into dst for the groups of 8 k numbered i in [i0, i1), group i being
 * m = i / len, k = 8 (kw0 + i % len) (a row's k-words kw0 .. kw0 + len - 1): p.x is x, p.gidx
 * the perm */
__device__ __forceinline__ void gather_groups(const LinParams &p, uint16_t *dst, int64_t i0, int64_t i1, int len,
                                              int kw0, int tid) {
    for (int64_t i = i0 + tid; i < i1; i += 256) {
        const int64_t m = i / len;
        const int k = (kw0 + (int)(i - m * len)) * 8;
        const int4 a = __ldg(reinterpret_cast<const int4 *>(p.gidx + k));
        const int4 b = __ldg(reinterpret_cast<const int4 *>(p.gidx + k + 4));
        *reinterpret_cast<uint4 *>(dst + m * p.K + k) = gather8(p.x + m * p.K, a, b);
    }
}
/* after the PDL wait; rows [m0, m0 + BM) and k-words [kw0, kw1): what this block reads */
template <int BM>
__device__ __forceinline__ void gather_in_grid(const LinParams &p, uint16_t *dst, int m0, int kw0, int kw1, int tid) {
    /* the blocks of one K range (gridDim.x of them) gather its k-words for every row, a share
     * each, and count themselves on that range's two words: [0] arrived, [1] left */
    const int len = max(0, min(kw1, p.K8) - kw0);
    const int64_t total = (int64_t)p.M * len, per = (total + gridDim.x - 1) / gridDim.x;
    gather_groups(p, dst, blockIdx.x * per, min(total, (blockIdx.x + 1) * per), len, kw0, tid);
    /* the block's stores are ordered before its count by the barrier and the count's release
     * (cumulative at gpu scope), the other blocks' before this block's loads by the acquire and
     * the barrier after it */
    __syncthreads();
    bool late = false;
    if (tid == 0) {
        uint32_t *word = reinterpret_cast<uint32_t *>(p.locks + kLocks) + 2 * blockIdx.y;
        const uint32_t n = gridDim.x;
        uint32_t v;
        asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(word) : "memory");
        const long long t0 = clock64();
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(word) : "memory");
        } while (v < n && clock64() - t0 < kShareSpin);
        late = v < n;
        /* (acq_rel: every block's last read of word[0] comes before the last one's reset) */
        asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], 1;\n" : "=r"(v) : "l"(word + 1) : "memory");
        if (v == n - 1) {
            word[0] = 0u;
            word[1] = 0u;
        }
    }
    if (!__syncthreads_or(late)) return;
    /* waited too long: this block's own rows of its K range, whoever else gathers them */
    gather_groups(p, dst, (int64_t)m0 * len, (int64_t)min(m0 + BM, p.M) * len, len, kw0, tid);
    __threadfence();
    __syncthreads();
}

/* ---- x[:, perm] gathered by each block (C::PB) -----------------------------------------------
 * The 8-row tile at M = 1, K split through the workspace, where the grid has a block per SM at
 * most (block_gather_pays, with the measurements): each block gathers its own K range of
 * x[:, perm] into shared memory after the pipeline, in the layout of a stage's x tile, k-tile
 * after k-tile (8 k per thread and step; the perm words of a thread's first kPbPre steps fetched
 * before the PDL wait), and its stages then carry weights only. No hand-over between kernels or
 * blocks; but every column tile gathers the same elements (a 32-byte sector each), so it pays
 * only where the tiles are few and the rows short (two rows or more: slower or equal but at
 * 14336 x 4096 M = 2, 15.0-15.2 us against 15.9-16.0). Clusters of 2..8 column tiles sharing one
 * gather through distributed shared memory were slower still: a cluster needs its free slots in
 * one GPC (H100, 8192 x 8192 M = 1 22.1 us in clusters of 8, 14336 x 4096 25.0, against 15.3 and
 * 16.0 for the gather kernel). */
constexpr int kPbPre = 2;
struct PbPerm {
    int4 a[kPbPre], b[kPbPre];
};
template <class C>
__device__ __forceinline__ void pb_prefetch(const LinParams &p, PbPerm &pp, int m0, int kt_begin, int nkt, int tid) {
    const int kr8 = nkt * C::KW, live = min(C::BM, p.M - m0);
#pragma unroll
    for (int u = 0; u < kPbPre; ++u) {
        const int i = tid + 256 * u;
        pp.a[u] = pp.b[u] = make_int4(0, 0, 0, 0);
        if (i < live * kr8) { /* (a block of an empty K range, kr8 = 0, loads nothing) */
            const int k = kt_begin * C::BK + 8 * (i % kr8);
            if (k < p.K) {
                pp.a[u] = __ldg(reinterpret_cast<const int4 *>(p.gidx + k));
                pp.b[u] = __ldg(reinterpret_cast<const int4 *>(p.gidx + k + 4));
            }
        }
    }
}
/* after the PDL wait; slice: [nkt][BM][BK], each k-tile as a stage's x tile (read after the main
 * loop's first barrier) */
template <class C>
__device__ __forceinline__ void gather_in_block(const LinParams &p, const PbPerm &pp, uint16_t *slice, int m0,
                                                int kt_begin, int nkt, int tid) {
    constexpr int BM = C::BM, BK = C::BK, KW = C::KW;
    const int kr8 = nkt * KW, live = min(BM, p.M - m0);
    /* chunk j of row r: k-tile j / KW, chunk c = j % KW of its x tile, at c ^ (the copy's swizzle) */
    auto at = [&](int r, int j) -> int {
        const int c = j % KW;
        return (j / KW) * BM * BK + r * BK + ((c ^ (C::KP ? r & 7 : (r & 1) << 2)) << 3);
    };
    for (int i = live * kr8 + tid; i < BM * kr8; i += 256) /* rows past M */
        *reinterpret_cast<uint4 *>(slice + at(i / kr8, i % kr8)) = make_uint4(0u, 0u, 0u, 0u);
    auto put = [&](int i, int4 a, int4 b) {
        const int r = i / kr8, j = i % kr8, k = kt_begin * BK + 8 * j;
        *reinterpret_cast<uint4 *>(slice + at(r, j)) =
            k < p.K ? gather8(p.x + (int64_t)(m0 + r) * p.K, a, b) : make_uint4(0u, 0u, 0u, 0u);
    };
#pragma unroll
    for (int u = 0; u < kPbPre; ++u)
        if (tid + 256 * u < live * kr8) put(tid + 256 * u, pp.a[u], pp.b[u]);
    for (int i = tid + 256 * kPbPre; i < live * kr8; i += 256) {
        const int k = min(kt_begin * BK + 8 * (i % kr8), p.K - 8);
        put(i, __ldg(reinterpret_cast<const int4 *>(p.gidx + k)), __ldg(reinterpret_cast<const int4 *>(p.gidx + k + 4)));
    }
}

template <class C, class T>
__global__ void __launch_bounds__(256, C::MINB) w4a16_tc_kernel(const LinParams p) {
    constexpr int BN = C::BN, BM = C::BM, BK = C::BK, STAGES = C::STAGES, KW = C::KW;
    constexpr int CN = C::CN, MT = C::MT, NSUB = C::NSUB, NG = C::NG;
    constexpr bool FAST = T::FAST && !C::ACT; /* fp16 lo/hi nibble trick (one shift per word) */
    extern __shared__ __align__(16) unsigned char smem[];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int wn = warp % C::WARPS_N, wm = warp / C::WARPS_N;

    /* tile coordinates: grouped raster so that concurrently running blocks share x and weights */
    int mt_i, nt_i;
    tile_coords(blockIdx.x, p.m_tiles, p.n_tiles, mt_i, nt_i);
    const int m0 = mt_i * BM, n0 = nt_i * BN;
    const int split = blockIdx.y, nsplit = gridDim.y;
    const int kt_begin = split * p.kt_per_split;
    const int kt_end = min(p.KT, kt_begin + p.kt_per_split);
    const int nkt = max(0, kt_end - kt_begin);

    /* global: split-K through the workspace (the tiles of up to 32 rows, see pick_reduction) */
    const bool global = C::GLOBAL && p.locks != nullptr;
    const int pipe_bytes = nsplit == 1 || global ? C::PIPE_BYTES
                           : C::PUSH ? C::PUSH_BYTES
                                     : (C::OUT_BYTES > C::PIPE_BYTES ? C::OUT_BYTES : C::PIPE_BYTES);
    uint32_t *tab = reinterpret_cast<uint32_t *>(smem + pipe_bytes); /* ACT only: [G][BN] */
    const uint32_t smem_base = smem_u32(smem);
    const int N8 = p.N >> 3;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    /* PUSH: this block's receive barrier expects nsplit copies of its share of the tile's rows
     * that exist (M = 1 in an 8-row tile: one eighth of the pushes and sums) */
    constexpr int TOT4 = BM * (BN / 4); /* float4 of a partial tile */
    const int live4 = min(BM, p.M - m0) * (BN / 4);
    const uint32_t push_bar = smem_base + C::PIPE_BYTES + C::RECV_BYTES;
    if (C::PUSH && nsplit > 1 && !global) {
        if (tid == 0) push_barrier_init(push_bar, (uint32_t)(nsplit * ((live4 - split + nsplit - 1) / nsplit) * 16));
        cluster_arrive_relaxed();
    }
#endif

    /* ---- static copy assignments (the same for every stage) ---- */
    /* weights: KW rows x BN/4 16-byte chunks; chunk c of row r lands at c ^ 2(r&3) */
    constexpr int W_CH = KW * (BN / 4), W_J = (W_CH + 255) / 256, W_RS = 256 / (BN / 4);
    const int w_c = tid % (BN / 4), w_r0 = tid / (BN / 4);
    const bool w_colv = n0 + 4 * w_c < p.N;
    const int32_t *w_src0 = p.qw + (int64_t)w_r0 * p.N + n0 + 4 * w_c;
    const int64_t w_rstep = (int64_t)W_RS * p.N;
    const uint32_t w_dst0 = (uint32_t)((w_r0 * BN + ((w_c ^ ((w_r0 & 3) << 1)) << 2)) * 4);
    /* activations: BM rows x KW chunks of 8; chunk c of row r lands at c ^ 4(r&1) */
    constexpr int X_CH = BM * KW, X_J = (X_CH + 255) / 256, X_RS = 256 / KW;
    const int x_c = tid % KW, x_r0 = tid / KW;
    /* PG: x[:, perm] in the workspace, before the partials (p.x is x) */
    const uint16_t *const xin =
        C::PG ? reinterpret_cast<const uint16_t *>(reinterpret_cast<const char *>(p.part) - partials_off(p.M, p.K, 2))
              : p.x;
    const uint16_t *x_src0 = xin + (int64_t)(m0 + x_r0) * p.K + 8 * x_c;
    const uint32_t x_dst0 =
        (uint32_t)(C::W_BYTES + (x_r0 * BK + ((x_c ^ (C::KP ? x_r0 & 7 : (x_r0 & 1) << 2)) << 3)) * 2);
    /* scales / zeros: NG rows x BN/8 chunks (16 bytes of scales, one word of zeros) */
    constexpr int S_CH = NG * (BN / 8), S_J = (S_CH + 255) / 256, S_RS = 256 / (BN / 8);
    const int s_c = tid % (BN / 8), s_r0 = tid / (BN / 8);
    const bool s_colv = n0 + 8 * s_c < p.N;

    /* what: LOAD_W = the layer's own tensors (weights, scales, zeros, g_idx), LOAD_X = the
     * activations, which the previous kernel may still be writing (programmatic dependent launch) */
    auto load_stage = [&](int buf, int kt, int what) {
        const uint32_t st = smem_base + (uint32_t)(buf * C::STAGE_BYTES);
        if (what & LOAD_W) {
            const int32_t *src = w_src0 + (int64_t)kt * KW * p.N;
#pragma unroll
            for (int j = 0; j < W_J; ++j) {
                const int r = w_r0 + j * W_RS;
                if (W_CH % 256 == 0 || r < KW) {
                    const bool v = w_colv && kt * KW + r < p.K8;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(st + w_dst0 + j * W_RS * BN * 4),
                                 "l"(v ? src : p.qw), "r"(v ? 16 : 0));
                }
                src += w_rstep;
            }
        }
#pragma unroll
        for (int j = 0; j < X_J; ++j) {
            const int r = x_r0 + j * X_RS;
            if (!C::XREG && !C::PB && (what & LOAD_X) && (X_CH % 256 == 0 || r < BM)) {
                const bool v = m0 + r < p.M && kt * KW + x_c < p.K8;
                const uint16_t *src = x_src0 + (int64_t)j * X_RS * p.K + kt * BK;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(st + x_dst0 + j * X_RS * BK * 2),
                             "l"(v ? src : xin), "r"(v ? 16 : 0));
            }
        }
        if (!(what & LOAD_W)) return;
        if constexpr (!C::ACT) {
            const int k0 = kt * BK;
            const int g0 = k0 >> p.gshift;
            const int glast = (min(k0 + BK, p.K) - 1) >> p.gshift;
#pragma unroll
            for (int j = 0; j < S_J; ++j) {
                const int r = s_r0 + j * S_RS;
                if (S_CH % 256 == 0 || r < NG) {
                    const int gg = g0 + r;
                    const bool v = s_colv && gg <= glast;
                    const uint16_t *src = p.sc + (int64_t)gg * p.N + n0 + 8 * s_c;
                    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                     st + C::W_BYTES + C::X_BYTES + (r * BN + 8 * s_c) * 2),
                                 "l"(v ? src : p.sc), "r"(v ? 16 : 0));
                    if (p.zmode != 0) {
                        const int32_t *zsrc = p.qz + (int64_t)gg * N8 + (n0 >> 3) + s_c;
                        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                                         st + C::W_BYTES + C::X_BYTES + C::S_BYTES + (r * (BN / 8) + s_c) * 4),
                                     "l"(v ? zsrc : p.qz), "r"(v ? 4 : 0));
                    }
                }
            }
        } else {
            int32_t *sG = reinterpret_cast<int32_t *>(smem + buf * C::STAGE_BYTES + C::W_BYTES + C::X_BYTES);
            const int k0 = kt * BK;
            if (p.gidx != nullptr) {
                if (tid < BK / 4) {
                    const int k = k0 + 4 * tid;
                    cp_async16(sG + 4 * tid, k < p.K ? p.gidx + k : p.gidx, k < p.K);
                }
            } else {
                for (int i = tid; i < BK; i += 256) {
                    const int k = k0 + i;
                    sG[i] = k < p.K ? k / p.gsize : 0;
                }
            }
        }
    };

    /* Lean loads of interior stages (every k of the stage inside K, plain groups), the main
     * loop's common case: each thread's copies are fixed per block (the same rows, columns and
     * validity every stage), so they run from running pointers that advance by one stage, with
     * no bounds arithmetic. Out-of-matrix chunks keep a valid address, size 0 (zero fill). */
    constexpr bool LEAN = C::LEAN;
    const int kt_lean0 = kt_begin + STAGES - 1; /* the first stage the main loop loads */
    const uint32_t w_sz = w_colv ? 16u : 0u;
    const int64_t w_kstep = w_colv ? (int64_t)KW * p.N : 0;
    /* (filled by init_lean, called by the prologue after it has issued its weight copies: set
     * up here, these ~150 instructions per thread came before the block's first copy; H100 ncu,
     * 8192 x 8192 M = 16. Without LEAN they stay unset and unused) */
    const int32_t *w_next[W_J];
    uint32_t x_sz[X_J];
    const uint16_t *x_next[X_J];
    /* (an invalid chunk: group stride 0, so its address stays the tensor's first element) */
    constexpr int SJ1 = S_J > 0 ? S_J : 1;
    uint32_t s_sz[SJ1], s_gstride[SJ1], z_gstride[SJ1];
    const uint16_t *s_base[SJ1];
    const int32_t *z_base[SJ1];
    auto init_lean = [&]() {
#pragma unroll
        for (int j = 0; j < W_J; ++j)
            w_next[j] = w_colv ? w_src0 + (int64_t)j * w_rstep + (int64_t)kt_lean0 * w_kstep : p.qw;
#pragma unroll
        for (int j = 0; j < X_J; ++j) {
            const int r = x_r0 + j * X_RS;
            const bool v = (X_CH % 256 == 0 || r < BM) && m0 + r < p.M;
            x_sz[j] = v ? 16u : 0u;
            x_next[j] = v ? x_src0 + (int64_t)j * X_RS * p.K + (int64_t)kt_lean0 * BK : xin;
        }
        /* scale / zero rows per interior stage: one group, or BK / group of them */
        const int s_rows = (1 << min(p.gshift, 30)) >= BK ? 1 : BK >> p.gshift;
#pragma unroll
        for (int j = 0; j < S_J; ++j) {
            const int r = s_r0 + j * S_RS;
            const bool v = (S_CH % 256 == 0 || r < NG) && s_colv && r < s_rows;
            const bool vz = v && p.zmode != 0;
            s_sz[j] = v ? 16u : 0u;
            s_gstride[j] = v ? (uint32_t)p.N : 0u;
            z_gstride[j] = vz ? (uint32_t)N8 : 0u;
            s_base[j] = v ? p.sc + (int64_t)r * p.N + n0 + 8 * s_c : p.sc;
            z_base[j] = vz ? p.qz + (int64_t)r * N8 + (n0 >> 3) + s_c : p.qz;
        }
    };
    auto load_lean = [&](int buf, int kt) {
        const uint32_t st = smem_base + (uint32_t)(buf * C::STAGE_BYTES);
#pragma unroll
        for (int j = 0; j < W_J; ++j)
            if (W_CH % 256 == 0 || w_r0 + j * W_RS < KW)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(st + w_dst0 + j * W_RS * BN * 4),
                             "l"(w_next[j]), "r"(w_sz));
#pragma unroll
        for (int j = 0; j < X_J; ++j)
            if (!C::XREG && !C::PB && (X_CH % 256 == 0 || x_r0 + j * X_RS < BM))
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(st + x_dst0 + j * X_RS * BK * 2),
                             "l"(x_next[j]), "r"(x_sz[j]));
        const uint32_t g0 = (uint32_t)((kt * BK) >> p.gshift);
#pragma unroll
        for (int j = 0; j < S_J; ++j) {
            const int r = s_r0 + j * S_RS;
            if (S_CH % 256 == 0 || r < NG) {
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                                 st + C::W_BYTES + C::X_BYTES + (r * BN + 8 * s_c) * 2),
                             "l"(s_base[j] + (uint64_t)g0 * s_gstride[j]), "r"(s_sz[j]));
                if (p.zmode != 0)
                    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(
                                     st + C::W_BYTES + C::X_BYTES + C::S_BYTES + (r * (BN / 8) + s_c) * 4),
                                 "l"(z_base[j] + (uint64_t)g0 * z_gstride[j]), "r"(s_sz[j] >> 2));
            }
        }
    };
    /* after each main-loop load, lean or not: the pointers move to the next stage */
    auto advance_lean = [&]() {
#pragma unroll
        for (int j = 0; j < W_J; ++j) w_next[j] += w_kstep;
#pragma unroll
        for (int j = 0; j < X_J; ++j) x_next[j] += x_sz[j] ? BK : 0;
    };

    /* XREG: this thread's x chunk (8 consecutive k of one row) is loaded into a register one
     * iteration before it is stored to its stage, in the order the fragments take it: (x0, x4)
     * (x1, x5) (x2, x6) (x3, x7) (see "k permutation" above), at the chunk's usual place. The
     * store of stage s happens in the iteration after its load, at least one barrier before
     * stage s is read (STAGES >= 3), and after the barrier that ends the reads of the buffer's
     * previous stage. Rows outside the matrix and k beyond K are stored as zeros. */
    const bool x_mine = C::XREG && x_r0 < BM;
    auto x_load = [&](int kt) -> uint4 {
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (x_mine && m0 + x_r0 < p.M && kt * KW + x_c < p.K8)
            v = __ldcg(reinterpret_cast<const uint4 *>(x_src0 + (int64_t)kt * BK));
        return v;
    };
    auto x_store = [&](int buf, uint4 v) {
        if (x_mine)
            *reinterpret_cast<uint4 *>(smem + buf * C::STAGE_BYTES + x_dst0) =
                make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632), __byte_perm(v.y, v.w, 0x5410),
                           __byte_perm(v.y, v.w, 0x7632));
    };

    /* prologue: start the first STAGES-1 stages, then (act-order) build the group table while
     * they are in flight. The weights of those stages and the table are loaded before waiting
     * for the previous kernel (PDL: it may still be running and writing x); the first commit
     * group then holds all those weights, which keeps "stage s is in group <= s". */
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s)
        if (s < nkt) load_stage(s, kt_begin + s, LOAD_W);
    if constexpr (LEAN) init_lean();
    if constexpr (C::ACT) build_group_table<T, BN>(p, tab, n0, tid);
    PbPerm pb_perm;
    if constexpr (C::PB) pb_prefetch<C>(p, pb_perm, m0, kt_begin, nkt, tid);
    grid_dependency_wait();
    if constexpr (C::PG) gather_in_grid<BM>(p, const_cast<uint16_t *>(xin), m0, kt_begin * KW, kt_end * KW, tid);
    if constexpr (C::PB) gather_in_block<C>(p, pb_perm, reinterpret_cast<uint16_t *>(tab), m0, kt_begin, nkt, tid);
    uint4 x_pro[C::XREG ? STAGES - 1 : 1]; /* XREG: the prologue's x, stored once the next kernel is
                                            * signalled */
    if constexpr (C::XREG) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) x_pro[s] = s < nkt ? x_load(kt_begin + s) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < nkt) load_stage(s, kt_begin + s, LOAD_X);
        cp_async_commit();
    }
    /* the next kernel may start its own prologue as soon as every block of this one is here */
    grid_dependents_launch();
    if constexpr (C::XREG) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s)
            if (s < nkt) x_store(s, x_pro[s]);
    }

    float acc[MT][2 * CN][4];
    float pacc[C::FACT ? MT : 1][2 * CN][4]; /* FACT: partial sums of the current group */
#pragma unroll
    for (int a = 0; a < MT; ++a)
#pragma unroll
        for (int b = 0; b < 2 * CN; ++b)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[a][b][r] = 0.f;
#pragma unroll
    for (int a = 0; a < (C::FACT ? MT : 1); ++a)
#pragma unroll
        for (int b = 0; b < 2 * CN; ++b)
#pragma unroll
            for (int r = 0; r < 4; ++r) pacc[a][b][r] = 0.f;

    /* per-group constants of this thread's 4 CN columns (plain groups): zero offsets as half2,
     * scales as half2 (per-weight scaling) or fp32 (FACT) */
    int cur_g = -1;
    uint32_t nzlo[CN][4], nzhi[CN][4], sdup[CN][4];
    float sf[CN][4];
#pragma unroll
    for (int c = 0; c < CN; ++c)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            nzlo[c][j] = nzhi[c][j] = sdup[c][j] = 0u;
            sf[c][j] = 0.f;
        }
    auto flush = [&]() { /* FACT: acc += s * partial; partial = 0 */
#pragma unroll
        for (int a = 0; a < (C::FACT ? MT : 1); ++a)
#pragma unroll
            for (int c = 0; c < CN; ++c)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int r = 0; r < 4; ++r) {
                        acc[a][2 * c + h][r] = fmaf(pacc[a][2 * c + h][r], sf[c][2 * h + (r >> 1)], acc[a][2 * c + h][r]);
                        pacc[a][2 * c + h][r] = 0.f;
                    }
    };

    const uint32_t magic = T::MAGIC; /* in a register: lop3 takes one immediate */
    /* this thread's fragment offsets in a stage for sub-step 0, chunk 0, m8 tile 0 (words of sW,
     * elements of sX; see stage_body for the others). For the small-batch tiles they are opaque
     * to the compiler, which otherwise rebuilt them from the thread index every stage (about 25
     * instructions of ~350). */
    static_assert((BK & (BK - 1)) == 0 && C::WTN % 32 == 0 && C::WTM % 8 == 0, "fragment offsets");
    uint32_t w_frag = (uint32_t)(t * BN + (((wn * C::WTN / 4 + g) ^ (t << 1)) << 2));
    /* (KP: the ldmatrix row address of this lane: row l & 7 of 8 x chunk l >> 3 of the sub-step) */
    uint32_t x_frag = C::KP ? (uint32_t)((wm * C::WTM + (lane & 7)) * BK + (((lane >> 3) ^ (lane & 7)) << 3))
                            : (uint32_t)((wm * C::WTM + g) * BK + ((((g & 1) << 2) | t) << 3));
    if constexpr (C::PUSH) asm volatile("" : "+r"(w_frag), "+r"(x_frag)); /* (larger tiles: spills) */
    /* one pipeline stage; PS: the whole stage lies in one group (group >= BK), so the group is
     * checked once per stage and the unrolled sub-steps are branch-free */
    auto stage_body = [&](int it, auto ps) {
        constexpr bool PS = decltype(ps)::value;
        (void)ps;
        const int kt = kt_begin + it;
        (void)PS;
        (void)kt;
        const unsigned char *st = smem + (it % STAGES) * C::STAGE_BYTES;
        const uint32_t *sW = reinterpret_cast<const uint32_t *>(st);
        /* (PB: x from the gathered K range after the pipeline, where tab would be) */
        const uint16_t *sX = C::PB ? reinterpret_cast<const uint16_t *>(tab) + it * (BM * BK)
                                   : reinterpret_cast<const uint16_t *>(st + C::W_BYTES);

#pragma unroll
        for (int sub = 0; sub < NSUB; ++sub) {
            if constexpr (!C::ACT) {
                /* group of this sub-step (32 k, never straddles a group): warp-uniform */
                const int gabs = (kt * BK + sub * 32) >> p.gshift;
                if ((!PS || sub == 0) && gabs != cur_g) {
                    if constexpr (C::FACT) {
                        if (cur_g >= 0) flush();
                    }
                    cur_g = gabs;
                    const int gl = gabs - ((kt * BK) >> p.gshift);
                    const uint16_t *sS = reinterpret_cast<const uint16_t *>(st + C::W_BYTES + C::X_BYTES);
                    const uint32_t *sZ = reinterpret_cast<const uint32_t *>(st + C::W_BYTES + C::X_BYTES + C::S_BYTES);
#pragma unroll
                    for (int c = 0; c < CN; ++c) {
                        const int lc = wn * C::WTN + 32 * c + 4 * g;
                        const uint2 s4 = *reinterpret_cast<const uint2 *>(sS + gl * BN + lc);
                        uint32_t zz = 0;
                        if (p.zmode != 0) zz = sZ[gl * (BN / 8) + (lc >> 3)] >> ((lc & 4) * 4);
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const uint32_t z = zero_of((zz >> (4 * j)) & 15u, p.zmode);
                            nzlo[c][j] = (T::NEGMAG | z) * 0x10001u;
                            if constexpr (FAST) nzhi[c][j] = (0xD400u + (z << 4)) * 0x10001u; /* -(64 + z) */
                            const uint32_t sh = (j & 1) ? ((j < 2 ? s4.x : s4.y) >> 16) : ((j < 2 ? s4.x : s4.y) & 0xFFFFu);
                            if constexpr (C::FACT) sf[c][j] = T::to_f((uint16_t)sh);
                            else sdup[c][j] = sh * 0x10001u;
                        }
                    }
                }
            }
            uint32_t af[CN][2][2][4]; /* [chunk][n16 tile in chunk][k16][reg] */
#pragma unroll
            for (int c = 0; c < CN; ++c) {
                /* k-word 4 sub + t, column chunk (lc >> 2) ^ 2t of lc = wn WTN + 32 c + 4 g (the
                 * copy's swizzle: 8 c leaves the low bits alone) */
                const uint4 wv = *reinterpret_cast<const uint4 *>(sW + w_frag + sub * 4 * BN + 32 * c);
                const uint32_t w[4] = {wv.x, wv.y, wv.z, wv.w};
                uint32_t d[4][4]; /* [column j][nibble pair i]: pair i = nibbles (i, i+4) */
                if constexpr (!C::ACT) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        if constexpr (FAST) {
                            /* (1024+q0, 1024+q4), (1024+16q1, 1024+16q5), then the same from w >> 8 */
                            const uint32_t w8 = w[j] >> 8;
                            d[j][0] = T::fma2(and_or<0x000F000Fu>(w[j], magic), T::ONE2, nzlo[c][j]);
                            d[j][1] = T::fma2(and_or<0x00F000F0u>(w[j], magic), 0x2C002C00u, nzhi[c][j]);
                            d[j][2] = T::fma2(and_or<0x000F000Fu>(w8, magic), T::ONE2, nzlo[c][j]);
                            d[j][3] = T::fma2(and_or<0x00F000F0u>(w8, magic), 0x2C002C00u, nzhi[c][j]);
                        } else {
#pragma unroll
                            for (int i = 0; i < 4; ++i)
                                d[j][i] = T::fma2(and_or<0x000F000Fu>(w[j] >> (4 * i), magic), T::ONE2, nzlo[c][j]);
                        }
                        if constexpr (!C::FACT) {
#pragma unroll
                            for (int i = 0; i < 4; ++i) d[j][i] = T::fma2(d[j][i], sdup[c][j], NEG_ZERO2);
                        }
                    }
                } else {
                    const int32_t *sG = reinterpret_cast<const int32_t *>(st + C::W_BYTES + C::X_BYTES);
                    const int kwl = sub * 4 + t;                /* this thread's k-word in the stage */
                    const int lc = wn * C::WTN + 32 * c + 4 * g; /* local column of word 0 */
                    const int4 ga = *reinterpret_cast<const int4 *>(sG + kwl * 8);
                    const int4 gb = *reinterpret_cast<const int4 *>(sG + kwl * 8 + 4);
                    const int gi[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        const uint4 ta = *reinterpret_cast<const uint4 *>(tab + tab_at<BN>(gi[i], lc));
                        const uint4 tb = *reinterpret_cast<const uint4 *>(tab + tab_at<BN>(gi[i + 4], lc));
                        const uint32_t TA[4] = {ta.x, ta.y, ta.z, ta.w}, TB[4] = {tb.x, tb.y, tb.z, tb.w};
#pragma unroll
                        for (int j = 0; j < 4; ++j) {
                            const uint32_t sp = __byte_perm(TA[j], TB[j], 0x5410);
                            const uint32_t zp = __byte_perm(TA[j], TB[j], 0x7632);
                            const uint32_t q = and_or<0x000F000Fu>(w[j] >> (4 * i), magic);
                            d[j][i] = T::fma2(T::fma2(q, T::ONE2, zp), sp, NEG_ZERO2);
                        }
                    }
                }
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int kk = 0; kk < 2; ++kk) {
                        af[c][h][kk][0] = d[2 * h][2 * kk];
                        af[c][h][kk][1] = d[2 * h + 1][2 * kk];
                        af[c][h][kk][2] = d[2 * h][2 * kk + 1];
                        af[c][h][kk][3] = d[2 * h + 1][2 * kk + 1];
                    }
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                /* row * BK + ((kwl ^ 4 (row & 1)) << 3), row = wm WTM + 8 mt + g, kwl = 4 sub + t */
                uint32_t b00, b01, b10, b11;
                if constexpr (C::KP) {
                    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                                 : "=r"(b00), "=r"(b01), "=r"(b10), "=r"(b11)
                                 : "r"(smem_u32(sX + ((x_frag ^ (sub << 5)) + mt * 8 * BK))));
                } else {
                    const uint4 xv = *reinterpret_cast<const uint4 *>(sX + ((x_frag ^ (sub << 5)) + mt * 8 * BK));
                    b00 = C::XREG ? xv.x : __byte_perm(xv.x, xv.z, 0x5410);
                    b01 = C::XREG ? xv.y : __byte_perm(xv.x, xv.z, 0x7632);
                    b10 = C::XREG ? xv.z : __byte_perm(xv.y, xv.w, 0x5410);
                    b11 = C::XREG ? xv.w : __byte_perm(xv.y, xv.w, 0x7632);
                }
#pragma unroll
                for (int c = 0; c < CN; ++c)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        float *a = C::FACT ? pacc[C::FACT ? mt : 0][2 * c + h] : acc[mt][2 * c + h];
                        T::mma(a, af[c][h][0], b00, b01);
                        T::mma(a, af[c][h][1], b10, b11);
                    }
            }
        }
    };
    const bool stage_group = !C::ACT && (1 << min(p.gshift, 30)) >= BK;
    uint4 x_last = make_uint4(0u, 0u, 0u, 0u); /* XREG: the x chunk loaded in the last iteration */
    for (int it = 0; it < nkt; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        {
            const int nx = it + STAGES - 1;
            if constexpr (C::XREG) {
                /* (storing two iterations after the load instead measured the same) */
                if (it > 0 && nx - 1 < nkt) x_store((nx - 1) % STAGES, x_last);
                if (nx < nkt) x_last = x_load(kt_begin + nx);
            }
            if (nx < nkt) {
                const int kt = kt_begin + nx;
                if (LEAN && (kt + 1) * KW <= p.K8) load_lean(nx % STAGES, kt);
                else load_stage(nx % STAGES, kt, LOAD_W | LOAD_X);
                if constexpr (LEAN) advance_lean();
            }
            cp_async_commit();
        }
        if (stage_group) stage_body(it, std::true_type{});
        else stage_body(it, std::false_type{});
    }
    if constexpr (C::FACT) {
        if (cur_g >= 0) flush();
    }

    /* ---- epilogue ---- */
    /* f(local row, local column, the 4 consecutive columns there) for each of this thread's
     * accumulator fragments */
    auto for_each_out4 = [&](auto f) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int c = 0; c < CN; ++c)
#pragma unroll
                for (int e = 0; e < 2; ++e)
                    f(wm * C::WTM + mt * 8 + 2 * t + e, wn * C::WTN + 32 * c + 4 * g,
                      make_float4(acc[mt][2 * c][e], acc[mt][2 * c][2 + e], acc[mt][2 * c + 1][e],
                                  acc[mt][2 * c + 1][2 + e]));
    };
    if (nsplit == 1) {
        for_each_out4([&](int ml, int lc, float4 v) {
            if (m0 + ml < p.M && n0 + lc < p.N) store4<T>(p, m0 + ml, n0 + lc, v);
        });
        return;
    }
    if constexpr (C::GLOBAL) {
        if (global) {
            /* (the pipeline's shared memory is free by now: shared_sum broadcasts in its first two words) */
            global_reduce_store<T, BM, BN>(p, m0, n0, split, nsplit, tid, reinterpret_cast<uint32_t *>(smem),
                                           [&](float *slice) {
                for_each_out4([&](int ml, int lc, float4 v) {
                    if (m0 + ml < p.M && n0 + lc < p.N)
                        __stcg(reinterpret_cast<float4 *>(slice + (int64_t)(m0 + ml) * p.N + n0 + lc), v);
                });
            });
            return;
        }
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (C::PUSH) {
        cluster_wait(); /* every block's receive barrier is initialised */
        const int per = (TOT4 + nsplit - 1) / nsplit;
        const uint32_t recv = smem_base + C::PIPE_BYTES;
        for_each_out4([&](int ml, int lc, float4 v) {
            const int idx = ml * (BN / 4) + (lc >> 2);
            if (idx < live4)
                push_float4(recv + (uint32_t)((split * per + idx / nsplit) * 16), push_bar, idx % nsplit, v);
        });
        mbarrier_wait_phase0(push_bar);
        push_reduce_store<T, BM, BN>(p, reinterpret_cast<const float *>(smem + C::PIPE_BYTES), m0, n0, split, nsplit,
                                     live4, tid);
        return;
    }
    /* split-K: fp32 partial tile in shared memory, reduced across the cluster */
    cp_async_wait<0>();
    __syncthreads();
    float *sO = reinterpret_cast<float *>(smem);
    for_each_out4([&](int ml, int lc, float4 v) { *reinterpret_cast<float4 *>(sO + ml * BN + lc) = v; });
    cluster_reduce_store<T, BM, BN>(p, sO, m0, n0, split, nsplit, tid);
#endif
}

/* ---- generic CUDA-core kernel (fp32, and fallbacks) ------------------------------------------
 * One thread per output column and MB rows; k-word loop with coalesced qweight rows. */
template <typename E> struct Elt;
template <> struct Elt<float> {
    __device__ static __forceinline__ float ld(const float *p, int64_t i) { return p[i]; }
    __device__ static __forceinline__ void st(float *p, int64_t i, float v) { p[i] = v; }
};
template <> struct Elt<__half> {
    __device__ static __forceinline__ float ld(const __half *p, int64_t i) { return __half2float(p[i]); }
    __device__ static __forceinline__ void st(__half *p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <> struct Elt<__nv_bfloat16> {
    __device__ static __forceinline__ float ld(const __nv_bfloat16 *p, int64_t i) { return __bfloat162float(p[i]); }
    __device__ static __forceinline__ void st(__nv_bfloat16 *p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

struct GenParams {
    const void *x;
    const int32_t *qw;
    const void *sc;
    const int32_t *qz;
    const int32_t *gidx;
    const void *bias;
    void *out;
    int64_t M, K, N, gsize;
    int zmode;
    int kp; /* qweight k-interleaved */
};

template <typename E, int MB>
__global__ void __launch_bounds__(128) w4a16_generic_kernel(const GenParams p) {
    const int64_t n = (int64_t)blockIdx.x * 128 + threadIdx.x;
    const int64_t m0 = (int64_t)blockIdx.y * MB;
    if (n >= p.N) return;
    const E *x = static_cast<const E *>(p.x);
    const E *sc = static_cast<const E *>(p.sc);
    const int64_t N8 = p.N >> 3;
    float acc[MB];
#pragma unroll
    for (int i = 0; i < MB; ++i) acc[i] = 0.f;
    const int64_t K8 = p.K >> 3;
    for (int64_t kw = 0; kw < K8; ++kw) {
        const uint32_t w = (uint32_t)p.qw[kw * p.N + n];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int64_t k = p.kp ? kp_real_k(kw, e) : kw * 8 + e;
            const int64_t gg = p.gidx ? (int64_t)p.gidx[k] : k / p.gsize;
            const float s = Elt<E>::ld(sc, gg * p.N + n);
            uint32_t f = 0;
            if (p.zmode != 0) f = ((uint32_t)p.qz[gg * N8 + (n >> 3)] >> (4 * (n & 7))) & 15u;
            const float z = (float)zero_of(f, p.zmode);
            const float wv = s * ((float)((w >> (4 * e)) & 15u) - z);
#pragma unroll
            for (int i = 0; i < MB; ++i)
                if (m0 + i < p.M) acc[i] = fmaf(Elt<E>::ld(x, (m0 + i) * p.K + k), wv, acc[i]);
        }
    }
    const float b = p.bias ? Elt<E>::ld(static_cast<const E *>(p.bias), n) : 0.f;
#pragma unroll
    for (int i = 0; i < MB; ++i)
        if (m0 + i < p.M) Elt<E>::st(static_cast<E *>(p.out), (m0 + i) * p.N + n, acc[i] + b);
}

/* ---- perm: x gathered along K -------------------------------------------------------------
 * dst[m, k] = x[m, perm[k]]. Two kernels:
 *  - by element (small M, on the critical path between two layers): 8 consecutive k per thread
 *    (16-byte stores); the thread's first perm words are fetched before the PDL wait (perm is the
 *    layer's own), so only the x loads follow the previous kernel.
 *  - by row (larger M, where scattered 2-byte loads would each pull a 32-byte sector from L2, 4x
 *    the row): a block copies whole rows of x into shared memory with 16-byte loads, then gathers
 *    from there; x is read once and written once.
 * The GEMM launched next may start at once (PDL) and stream its first weights while these run,
 * except after a LATE element gather, which signals it only after its stores (launch_gather_t
 * says when that pays). */
template <typename E, bool LATE>
__global__ void __launch_bounds__(256) gather_x_kernel(const E *__restrict__ x, const int32_t *__restrict__ perm,
                                                       E *__restrict__ dst, int64_t M, int64_t K) {
    if (!LATE) grid_dependents_launch();
    const int64_t K8 = K >> 3;
    const int64_t total = M * K8, stride = (int64_t)gridDim.x * 256;
    int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x;
    int4 pa = make_int4(0, 0, 0, 0), pb = pa;
    if (i < total) {
        const int64_t k = (i % K8) * 8;
        pa = __ldg(reinterpret_cast<const int4 *>(perm + k));
        pb = __ldg(reinterpret_cast<const int4 *>(perm + k + 4));
    }
    grid_dependency_wait(); /* x may still be being written by the previous kernel */
    for (; i < total; i += stride) {
        const int64_t m = i / K8, k = (i - m * K8) * 8;
        const int idx[8] = {pa.x, pa.y, pa.z, pa.w, pb.x, pb.y, pb.z, pb.w};
        const E *row = x + m * K;
        alignas(16) E v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = row[idx[j]];
        if (i + stride < total) {
            const int64_t kn = ((i + stride) % K8) * 8;
            pa = __ldg(reinterpret_cast<const int4 *>(perm + kn));
            pb = __ldg(reinterpret_cast<const int4 *>(perm + kn + 4));
        }
#pragma unroll
        for (int j = 0; j < (int)sizeof(E) / 2; ++j)
            reinterpret_cast<uint4 *>(dst + m * K + k)[j] = reinterpret_cast<const uint4 *>(v)[j];
    }
    if (LATE) grid_dependents_launch();
}

/* by row: blockDim.x threads (at most 1024, as many as K has groups of 8 k) own PR such groups
 * each; their perm words are loaded once, before the PDL wait, and the next row's x is loaded
 * while this row is gathered */
template <typename E, int PR>
__global__ void __launch_bounds__(1024) gather_rows_kernel(const E *__restrict__ x, const int32_t *__restrict__ perm,
                                                           E *__restrict__ dst, int64_t M, int64_t K) {
    extern __shared__ __align__(16) unsigned char smem[];
    const E *srow = reinterpret_cast<const E *>(smem);
    constexpr int VW = (int)sizeof(E) / 2; /* 16-byte vectors per 8 elements */
    const int K8 = (int)(K >> 3), tid = threadIdx.x, T = blockDim.x;
    int4 pa[PR], pb[PR];
#pragma unroll
    for (int j = 0; j < PR; ++j) {
        const int c = tid + j * T;
        pa[j] = pb[j] = make_int4(0, 0, 0, 0);
        if (c < K8) {
            pa[j] = __ldg(reinterpret_cast<const int4 *>(perm + 8 * c));
            pb[j] = __ldg(reinterpret_cast<const int4 *>(perm + 8 * c + 4));
        }
    }
    grid_dependents_launch();
    grid_dependency_wait(); /* x may still be being written by the previous kernel */
    uint4 r[PR][VW];
    auto load_row = [&](int64_t m) {
        const uint4 *src = reinterpret_cast<const uint4 *>(x + m * K);
#pragma unroll
        for (int j = 0; j < PR; ++j)
#pragma unroll
            for (int w = 0; w < VW; ++w)
                if (tid + j * T < K8) r[j][w] = src[(tid + j * T) * VW + w];
    };
    int64_t m = blockIdx.x;
    if (m < M) load_row(m);
    for (; m < M; m += gridDim.x) {
        __syncthreads(); /* the previous row's gathers are done with the shared row */
#pragma unroll
        for (int j = 0; j < PR; ++j)
#pragma unroll
            for (int w = 0; w < VW; ++w)
                if (tid + j * T < K8) reinterpret_cast<uint4 *>(smem)[(tid + j * T) * VW + w] = r[j][w];
        __syncthreads();
        if (m + gridDim.x < M) load_row(m + gridDim.x);
#pragma unroll
        for (int j = 0; j < PR; ++j) {
            const int c = tid + j * T;
            if (c >= K8) continue;
            alignas(16) E v[8] = {srow[pa[j].x], srow[pa[j].y], srow[pa[j].z], srow[pa[j].w],
                                  srow[pb[j].x], srow[pb[j].y], srow[pb[j].z], srow[pb[j].w]};
#pragma unroll
            for (int w = 0; w < VW; ++w)
                reinterpret_cast<uint4 *>(dst + m * K + 8 * c)[w] = reinterpret_cast<const uint4 *>(v)[w];
        }
    }
}

/* dev hook: 0 automatic, 1 by element, 2 by element signalling late, 3 by row, 4 by the GEMM's
 * grid (gather_in_grid), 5 by each of its blocks (gather_in_block; 4, 5: automatic where they
 * cannot) */
inline int g_gather_mode = 0;
constexpr int64_t kGatherRowsMinM = 32; /* by row from this many rows */

template <typename E, int PR>
int launch_gather_rows(const tops_w4a16_args *a, E *dst, cudaLaunchConfig_t cfg, const DevInfo &di) {
    const size_t row_bytes = (size_t)a->K * sizeof(E);
    const void *kern = (const void *)gather_rows_kernel<E, PR>;
    if (!allow_dyn_smem(kern, row_bytes, di)) return TOPS_ERR_CUDA;
    /* as many threads as groups of 8 k, rounded to warps (several blocks per SM for short rows) */
    const int threads = (int)std::min<int64_t>(1024, ((a->K >> 3) + 31) / 32 * 32);
    const int occ = std::max(resident(gather_rows_kernel<E, PR>, row_bytes, 1, di, threads), di.sms);
    cfg.blockDim = dim3((unsigned)threads, 1, 1);
    cfg.gridDim = dim3((unsigned)std::min<int64_t>(a->M, occ), 1, 1);
    cfg.dynamicSmemBytes = row_bytes;
    return cudaLaunchKernelEx(&cfg, gather_rows_kernel<E, PR>, static_cast<const E *>(a->x), a->perm, dst, a->M,
                              a->K) == cudaSuccess
               ? TOPS_OK
               : TOPS_ERR_CUDA;
}

/* behind a GEMM that may split K through the workspace: where its blocks leave SMs idle at
 * M = 5..32 with x large enough, the element gather signalling late (below) beats the row
 * gather, and at M <= 16 the GEMM's own grid gathering x beats both (gather_in_grid) */
inline bool late_gather_pays(const tops_w4a16_args *a, const DevInfo &di) {
    const bool idle = (a->N + 255) / 256 * 6 < di.sms;
    return idle && a->M > 4 && a->M <= 32 && a->M * a->K >= 49152;
}
/* M = 1 on the k-interleaved layout with at most sms / 8 column tiles (a block per SM at a split
 * of 8): each block gathers its own K range of x[:, perm] (gather_in_block), where that measured
 * faster than the gather kernel (H100, CUDA graphs, fp16, us, by the block / the kernel / plain,
 * N = 4096 unless named): K = 4096 6.0-6.1 / 6.9-7.7 / 5.5 (N = 2048 5.3 / 5.5 / 4.4, N = 1024
 * 4.9 / 5.2 / 4.2), 11008 11.8 / 12.9 / 11.7, 14336 14.1-14.3 / 16.0-16.2 / 14.0, 28672 25.2 /
 * 27.5 / 23.9; equal at 8192..10240 (N = 2048 7.9 / 8.1); slower at 5120..7168 (7.6-7.8 / 7.3-7.5,
 * 8.6 / 7.9, 9.7 / 8.3), which no change of occupancy explained (a build whose blocks never
 * shared an SM: 4096 7.0, 5120 7.7, 7168 9.1), and below 4096 equal or slower by 0.1-0.2 */
inline bool block_gather_pays(const tops_w4a16_args *a, const DevInfo &di) {
    return a->M == 1 && a->kinterleaved && (a->K == 4096 || a->K >= 8192) && (a->N + 255) / 256 * 8 <= di.sms;
}

template <typename E>
int launch_gather_t(const tops_w4a16_args *a, void *dst, cudaLaunchConfig_t cfg, bool ws_split) {
    const E *x = static_cast<const E *>(a->x);
    E *d = static_cast<E *>(dst);
    const int64_t K8 = a->K >> 3;
    const DevInfo di = dev_info();
    /* by row: a row of x in shared memory, at most 4 groups of 8 k per thread (K <= 32768) */
    const bool rows_ok = K8 <= 4 * 1024 && (size_t)a->K * sizeof(E) <= (size_t)di.optin_smem &&
                         (reinterpret_cast<uintptr_t>(a->x) & 15) == 0;
    int mode = g_gather_mode >= 4 ? 0 : g_gather_mode;
    if (mode == 0 && ws_split && a->M <= 64) {
        /* The GEMM may split K through the workspace (M <= 64, sm_90): by row, except where its
         * blocks leave SMs idle at M = 5..32 with x large enough (by element, signalling late).
         * H200, CUDA graphs, k-interleaved qweight, by element / late / by row (plain), us:
         * 14336 x 4096 M = 1 18.8 / 15.7 / 14.3 (12.1), M = 4 19.5 / 17.3 / 14.4 (12.4), M = 8
         * 19.9 / 17.5 / 20.2 (12.9), M = 16 23.8 / 19.8 / 23.7 (15.7), M = 32 34.3 / 23.4 / 34.2
         * (19.8); 4096 x 4096 M = 8 9.1 / 8.9 / 7.2 (6.1), M = 16 11.5 / 10.2 / 11.1 (7.5), M = 64
         * 12.8 / 13.7 / 11.8 (10.1); 8192 x 8192 M = 4 16.3 / 17.6 / 15.2 (13.4), M = 16 20.2 /
         * 21.9 / 18.4 (15.7), M = 64 30.2 / 31.1 / 27.2 (25.2); M = 1 at 4096 x 4096, 8192 x 8192
         * and 8192 x 28672 within 0.1 us of by element. */
        mode = late_gather_pays(a, di) ? 2 : rows_ok ? 3 : 1;
    }
    if (mode == 0) {
        /* (through thread-block clusters, or no split) */
        /* Measured on an H100 (CUDA graphs): by row from 32 rows (14336 x 4096: M = 1024 280 ->
         * 237 us, M = 256 90 -> 78, M = 64 37.7 -> 34.8; plain 226 / 72 / 32), except short rows at
         * large M, whose scattered loads stay in L1 (4096 x 4096 M = 4096: 296 us by element, 336
         * by row, plain 268). Below, by element, signalling the GEMM late when x is large and the
         * GEMM's blocks (at most 6 splits of 256 columns) leave SMs idle, where an early-started
         * GEMM slowed the gather (14336 x 4096 M = 4: 25.7 us early, 18.8 late, plain 15.8; M =
         * 16 34.0 / 24.0; 4096 x 4096 M = 16 13.0 / 10.6; why is not understood: requesting fewer
         * weight stages before the GEMM's PDL wait did not help); elsewhere the early start wins
         * (8192 x 8192 M = 16 22.9 / 26.2; M = 1 17.1 / 20.7). Where the GEMM leaves SMs idle
         * and K is long, the row gather beats both at M = 2..8 (H200, --perm-small, by element /
         * late / by row: 8192 x 4096 M = 4 15.6 / 12.5 / 11.1; 14336 x 4096 M = 4 26.1 / 18.5 /
         * 17.5, M = 8 27.3 / 19.4 / 18.1; 28672 x 4096 M = 8 51.3 / 35.2 / 33.1; 14336 x 5120 M
         * = 8 27.3 / 30.0 / 27.0; plain 9.6, 15.6, 16.0, 29.9, 25.0); at M = 1 the element gather
         * stays best (14336 x 4096 16.7 / 18.4 / 17.3). */
        const bool idle = (a->N + 255) / 256 * 6 < di.sms;
        /* M = 33..64 on sm_90 runs on 64 x 128 tiles split by fill_split; where that grid is one
         * block per SM at most, an early start beside the gather packed it two per SM on half
         * the SMs (H200, 8192 x 8192 M = 64: by row 49.5 us, by element 50.7, by element
         * signalling late 34.4; plain 30.9), so the gather signals late there */
        const int64_t ftiles = (a->N + 127) / 128;
        const bool one_wave = di.major == 9 && ftiles * fill_split((int)((a->K + 127) / 128), ftiles) <= di.sms;
        if (a->M > 32 && a->M <= 64 && one_wave) mode = 2;
        else if (a->M >= kGatherRowsMinM && rows_ok && !(a->K <= 4096 && a->M > 1024)) mode = 3;
        else if (idle && rows_ok && a->M >= 2 && a->M <= 8 && a->K >= 8192 && a->M * a->K >= 32768) mode = 3;
        else mode = a->M * a->K >= 49152 && idle ? 2 : 1;
    }
    if (mode == 3 && !rows_ok) mode = 1;
    if (mode == 3) {
        if (K8 <= 1024) return launch_gather_rows<E, 1>(a, d, cfg, di);
        if (K8 <= 2048) return launch_gather_rows<E, 2>(a, d, cfg, di);
        return launch_gather_rows<E, 4>(a, d, cfg, di);
    }
    const int64_t total = a->M * K8;
    cfg.gridDim = dim3((unsigned)std::min<int64_t>((total + 255) / 256, 65535LL * 8), 1, 1);
    const cudaError_t e = mode == 2 ? cudaLaunchKernelEx(&cfg, gather_x_kernel<E, true>, x, a->perm, d, a->M, a->K)
                                    : cudaLaunchKernelEx(&cfg, gather_x_kernel<E, false>, x, a->perm, d, a->M, a->K);
    return e == cudaSuccess ? TOPS_OK : TOPS_ERR_CUDA;
}

/* a launch of `threads`-thread blocks on `stream`, after the previous kernel by programmatic
 * dependent launch where that is on (sm_90+); attr: its one attribute */
static cudaLaunchConfig_t pdl_launch(cudaLaunchAttribute *attr, unsigned threads, void *stream) {
    cudaLaunchConfig_t cfg = {};
    cfg.blockDim = dim3(threads, 1, 1);
    cfg.stream = static_cast<cudaStream_t>(stream);
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl_on(dev_info()) ? 1 : 0;
    return cfg;
}

/* ws_split: the GEMM after may split K through the workspace (the choice of gather differs) */
int launch_gather(const tops_w4a16_args *a, void *dst, void *stream, bool ws_split = false) {
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg = pdl_launch(attr, 256, stream);
    return a->x_dtype == TOPS_F32 ? launch_gather_t<float>(a, dst, cfg, ws_split)
                                  : launch_gather_t<uint16_t>(a, dst, cfg, ws_split);
}

/* ---- the workspace partials, summed after the GEMM (tiles of reduce_after(BM) rows) ----
 * One thread per 4 outputs, all SMs: the GEMM's blocks only store their partials, where otherwise
 * the last block of each tile reads all of them on one SM. Launched with PDL: its blocks wait
 * for the GEMM's partials, and signal the next kernel at once (its weights stream meanwhile). */
template <class T>
__global__ void __launch_bounds__(128) reduce_partials_kernel(const LinParams p, int nsplit) {
    grid_dependents_launch();
    const int64_t N4 = p.N >> 2, i = (int64_t)blockIdx.x * 128 + threadIdx.x;
    grid_dependency_wait(); /* the GEMM's partials */
    if (i >= (int64_t)p.M * N4) return;
    const int m = (int)(i / N4), col = (int)(i - (int64_t)m * N4) * 4;
    const int64_t slice = (int64_t)p.M * p.N;
    float4 r[8];
#pragma unroll
    for (int q = 0; q < 8; ++q)
        if (q < nsplit) r[q] = __ldcg(reinterpret_cast<const float4 *>(p.part + q * slice + (int64_t)m * p.N + col));
    sum_store4<T>(p, m, col, r, 1, nsplit);
}

template <class T> int launch_reduce(const LinParams &p, int split, void *stream) {
    const int64_t n4 = (int64_t)p.M * (p.N >> 2);
    cudaLaunchAttribute attr[1];
    cudaLaunchConfig_t cfg = pdl_launch(attr, 128, stream);
    cfg.gridDim = dim3((unsigned)((n4 + 127) / 128), 1, 1);
    if (cudaLaunchKernelEx(&cfg, reduce_partials_kernel<T>, p, split) != cudaSuccess) return TOPS_ERR_CUDA;
    return cudaGetLastError() == cudaSuccess ? TOPS_OK : TOPS_ERR_CUDA;
}
template int launch_reduce<F16>(const LinParams &, int, void *);
template int launch_reduce<BF16>(const LinParams &, int, void *);

/* ---- host side ------------------------------------------------------------------------------ */

/* a tile offered the workspace (p.locks): its K split through the workspace or through a
 * cluster, whichever the split model prefers (the 32-row tile: the workspace); split: the K
 * split of that choice (0 where launch_split is to choose it). The 32-row tile (H200, CUDA
 * graphs, M = 32, against clusters):
 * 8192 x 8192 24.8 us (split 8) against 29.3 (6), 14336 x 4096 24.1 against 27.0, 28672 x 4096
 * 41.5 against 50.5; 8192 x 28672 equal; 4096 x 4096 since its partials are summed by the
 * kernel after: see kReduceAfter. */
template <class C, class T>
LinParams pick_reduction(const LinParams &p, int64_t tiles, int &split) {
    split = 0;
    LinParams c = p;
    c.locks = nullptr;
    c.part = nullptr;
    if (!C::GLOBAL) return c;
    if (p.locks == nullptr || g_force_split > 0) return p;
    if (C::PG || C::PB) { /* (the grid's gather needs the workspace; both are small-batch paths) */
        split = choose_split(w4a16_tc_kernel<C, T>, p, tiles, C::PIPE_BYTES, C::PIPE_BYTES, 0, true);
        return p;
    }
    const size_t tab = C::ACT ? (size_t)p.G * C::BN * 4 : 0;
    if constexpr (reduce_after(C::BM)) {
        /* The 32-row tile: always through the workspace (clusters were slower or equal, above),
         * split by the general model, not the streaming one: two of its blocks on an SM take
         * longer than one (H200, CUDA graphs, M = 32, split 8 with 28 SMs holding two blocks
         * against 6 with one each: 5120 x 5120 14.4 us against 12.2, 13824 x 5120 34.2 against
         * 26.1; where every SM holds two, as 8192 x 8192 at split 8, the model still splits 8;
         * 8192 x 28672, which clusters had split 2 too, 0.3-1.2 us slower of 73-77) */
        split = choose_split(w4a16_tc_kernel<C, T>, p, tiles, C::PIPE_BYTES, C::PIPE_BYTES, tab, false, nullptr, true);
        return p;
    }
    double cost_g = 0.0, cost_c = 0.0; /* (the 8- and 16-row tiles: the streaming model) */
    const int sg = choose_split(w4a16_tc_kernel<C, T>, p, tiles, C::PIPE_BYTES, C::PIPE_BYTES, tab, true, &cost_g);
    const int sc = choose_split(w4a16_tc_kernel<C, T>, c, tiles, C::PIPE_BYTES, C::PUSH ? C::PUSH_BYTES : C::OUT_BYTES,
                                tab, true, &cost_c);
    if (sg > 0 && (sc <= 0 || cost_g < cost_c)) {
        split = sg;
        return p;
    }
    split = sc;
    return c;
}

/* split: as launch_split's. The 32-row tile's blocks never share an SM where the grid has one for
 * each (launch_split's spread): two of them on one SM run ~1.5x slower, and a grid launched by
 * PDL while the previous call's blocks and its reduce kernel's still held the SMs was at times
 * placed that way, by M and shape, call after call (H200, CUDA graphs, fp16, us, shared / spread:
 * M = 17 4096 x 4096 11.5 / 8.4, 14336 x 4096 33.1 / 20.7, 28672 x 4096 62.6 / 37.8, 11008 x 4096
 * 26.4 / 16.8; 3584 x 3584 M = 20 / 24 / 32 11.6 / 11.9 / 12.0 against 8.0 / 8.2 / 8.5; elsewhere
 * within 0.2) */
template <class C, class T>
int launch_tc(const LinParams &base, void *stream, int split = 0) {
    int64_t tiles;
    LinParams p = tiled<C>(base, tiles);
    if (split == 0) p = pick_reduction<C, T>(p, tiles, split);
    /* (split-K through global memory needs no receive area or partial tile in shared memory) */
    const size_t out = p.locks != nullptr ? (size_t)C::PIPE_BYTES : C::PUSH ? C::PUSH_BYTES : C::OUT_BYTES;
    if ((C::PG || C::PB) && p.locks == nullptr) return kNoGridGather;
    return launch_split(w4a16_tc_kernel<C, T>, p, tiles, C::PIPE_BYTES, out,
                        C::ACT ? (size_t)p.G * C::BN * 4 : 0, stream, C::BM <= 32, split,
                        reduce_after(C::BM) ? launch_reduce<T> : nullptr, C::PG, C::GLOBAL && reduce_after(C::BM),
                        C::SLICE_PER_KT);
}

/* tile configurations, by batch size */
template <bool ACT, bool LEAN = false, bool KP = false, bool PG = false, bool PB = false>
using CfgA = Cfg<256, 8, 8, 128, 5, ACT, true, 0, LEAN, KP, PG, PB>; /* M <= 8 */
template <bool ACT, bool KP = false, bool PG = false>
using CfgB = Cfg<256, 16, 8, 128, 4, ACT, true, 0, true, KP, PG>; /* M <= 16 */
template <bool ACT, bool KP = false> using CfgC = Cfg<256, 32, 8, 128, 3, ACT, false, 0, false, KP>; /* M <= 32 */
template <bool ACT, bool KP = false> using CfgD = Cfg<256, 64, 8, 64, 4, ACT, false, 0, false, KP>;   /* M <= 64 */
template <bool ACT, bool KP = false> using CfgE = Cfg<128, 128, 4, 64, 4, ACT, false, 0, false, KP>;  /* mid M */
template <bool ACT, bool KP = false> using CfgF = Cfg<256, 128, 4, 128, 3, ACT, false, 0, false, KP>; /* large M */

/* The M <= 8 tile comes in two builds. Lean loads (H200, CUDA graphs) made it 1-3% faster where
 * the grid has more blocks than SMs (8192 x 8192 M = 1 15.1 us against 15.3, 8192 x 28672 40.0
 * against 41.3) and 2-3% slower where each SM holds one block (28672 x 4096 M = 1: 29.6 against
 * 28.8), so the split is chosen for the plain build and the grid picks the build. */
template <class T, bool ACT, bool KP = false, bool PG = false>
int launch_tc_a(const LinParams &base, void *stream) {
    using C = CfgA<ACT, false, KP, PG>;
    if constexpr (ACT) {
        return launch_tc<C, T>(base, stream);
    } else {
        int64_t tiles;
        int split = 0;
        LinParams p = tiled<C>(base, tiles);
        p = pick_reduction<C, T>(p, tiles, split);
        if (split == 0)
            split = choose_split(w4a16_tc_kernel<C, T>, p, tiles, C::PIPE_BYTES,
                                 p.locks != nullptr ? C::PIPE_BYTES : C::PUSH_BYTES, 0, true);
        if (split <= 0) return TOPS_ERR_CUDA;
        if (tiles * split > dev_info().sms) return launch_tc<CfgA<ACT, true, KP, PG>, T>(p, stream, split);
        return launch_tc<C, T>(p, stream, split);
    }
}

template <class T, bool ACT, bool KP = false>
int dispatch_tc(const LinParams &p, int cfg, void *stream) {
    switch (cfg) {
    case 0: return launch_tc_a<T, ACT, KP>(p, stream);
    case 1: return launch_tc<CfgB<ACT, KP>, T>(p, stream);
    case 2: return launch_tc<CfgC<ACT, KP>, T>(p, stream);
    case 3: return launch_tc<CfgD<ACT, KP>, T>(p, stream);
    case 4: return launch_tc<CfgE<ACT, KP>, T>(p, stream);
    default: return launch_tc<CfgF<ACT, KP>, T>(p, stream);
    }
}
/* the small-batch tiles that gather x[:, perm] themselves (plain groups): by the grid, else
 * kNoGridGather */
template <class T, bool KP>
int dispatch_tc_pg(const LinParams &p, int cfg, void *stream) {
    if (cfg == 0) return launch_tc_a<T, false, KP, true>(p, stream);
    if (cfg == 1) return launch_tc<CfgB<false, KP, true>, T>(p, stream);
    return kNoGridGather;
}
/* by each block: the 8-row tile on the k-interleaved layout (block_gather_pays), else kNoGridGather */
template <class T>
int dispatch_tc_pb(const LinParams &p, int cfg, void *stream) {
    return cfg == 0 ? launch_tc<CfgA<false, false, true, false, true>, T>(p, stream) : kNoGridGather;
}

/* Tile configuration by batch size (measured on an H100, see benchmarks/w4a16_cuda_dev.py):
 *   mma.sync (any sm_80+): 0 (M <= 8), 1 (M <= 16), 2 (M <= 32); 3, 4, 5 stand in for the wgmma
 *   ones without sm_90a (128-column twins of 0 / 1 with two k warps per column were dropped: never
 *   more than 2% faster once the split choice below was right, up to 20% slower);
 *   wgmma (sm_90a, rows x columns): 10 (64 x 128, M <= 64; on the H200 up to 13% faster than the
 *   64 x 256 one it replaced, with the split of fill_split: 8192 x 8192 M = 64 31.2 us against
 *   35.8), 11 (128 x 256, M <= 128 where m128_wide prefers it, M <= 256 where wgmma_m256_wide
 *   does), 14 (128 x 128, M <= 128 and odd sizes above), 16 (256 x 128, M > 128); 14 / 16 overlap
 *   the dequantisation of one stage with the previous stage's wgmmas. */

static int g_global_split = 1; /* dev hook: 0 = through clusters only */
static int64_t global_split_room(int64_t M, int64_t N, const DevInfo &di);

/* M = 65..128: the 128 x 256 tiles (11, half the x traffic per weight, no block barrier, K split
 * through clusters or the workspace) against the 128 x 128 ones (14, twice the blocks to fill the
 * GPU with, a lower fixed cost), by wgmma_m128_wide's estimates. Act-order (11 without MB, not
 * refitted): 11 where N >= 16384 (8192 x 28672: 146 us against 168 on an H100). */
static bool m128_wide(int64_t K, int64_t N, bool act) {
    if (act) return N >= 16384;
    return wgmma_m128_wide(K, N, g_global_split ? global_split_room(128, N, dev_info()) : 0);
}

int choose_cfg(int64_t M, int64_t K, int64_t N, bool act) {
    if (g_force_cfg >= 0) return g_force_cfg;
    if (M <= 8) return 0;
    if (M <= 16) return 1;
    if (M <= 32) return 2;
    if (M <= 64) return 10;
    if (M <= 128) return m128_wide(K, N, act) ? 11 : 14;
    if (M <= 256 && !act && g_global_split && wgmma_m256_wide(M, K, N, global_split_room(M, N, dev_info())))
        return 11;
    /* 256-row tiles unless their padding costs more than the 128-row tiles' lower efficiency */
    const int64_t pad256 = (M + 255) / 256 * 256, pad128 = (M + 127) / 128 * 128;
    return (double)pad256 <= (double)pad128 * 1.15 ? 16 : 14;
}

/* the mma.sync configuration that stands in for a wgmma one (no sm_90a build, or no fit) */
int mma_fallback(int cfg, int64_t M, int64_t N, int sms) {
    if (cfg < 10) return cfg;
    if (M <= 32) return 2;
    if (M <= 64) return 3;
    const int64_t tilesF = ((M + 127) / 128) * ((N + 255) / 256);
    return tilesF >= sms ? 5 : 4;
}

template <typename E>
int launch_generic(const tops_w4a16_args *a, int zmode, void *stream) {
    GenParams p;
    p.x = a->x;
    p.qw = a->qweight;
    p.sc = a->scales;
    p.qz = a->qzeros;
    p.gidx = a->g_idx;
    p.bias = a->bias;
    p.out = a->out;
    p.M = a->M;
    p.K = a->K;
    p.N = a->N;
    p.gsize = a->group_size;
    p.zmode = zmode;
    p.kp = a->kinterleaved;
    constexpr int MB = 4;
    const int64_t gy = (a->M + MB - 1) / MB;
    if (gy > 65535) {
        /* very large M: several launches over row blocks */
        for (int64_t m = 0; m < a->M; m += 65535LL * MB) {
            GenParams q = p;
            const int64_t rows = (a->M - m < 65535LL * MB) ? a->M - m : 65535LL * MB;
            q.M = rows;
            q.x = static_cast<const E *>(p.x) + m * a->K;
            q.out = static_cast<E *>(p.out) + m * a->N;
            w4a16_generic_kernel<E, MB><<<dim3((unsigned)((a->N + 127) / 128), (unsigned)((rows + MB - 1) / MB)),
                                          128, 0, static_cast<cudaStream_t>(stream)>>>(q);
            if (cudaGetLastError() != cudaSuccess) return TOPS_ERR_CUDA;
        }
        return TOPS_OK;
    }
    w4a16_generic_kernel<E, MB><<<dim3((unsigned)((a->N + 127) / 128), (unsigned)gy), 128, 0,
                                  static_cast<cudaStream_t>(stream)>>>(p);
    return cudaGetLastError() == cudaSuccess ? TOPS_OK : TOPS_ERR_CUDA;
}

bool aligned(const void *p, uintptr_t a) { return (reinterpret_cast<uintptr_t>(p) & (a - 1)) == 0; }

/* ---- split-K through global memory (batches up to 128 on sm_90) ----
 * Partials go to the caller's workspace (no perm: nothing else there): [split][M][N] fp32, room for the
 * largest split that can run in one wave (two blocks per SM; one of the 128 x 256 tile). The locks (one per tile) must be
 * zero when a launch starts; every launch leaves them zero, so they live outside the workspace:
 * one buffer per device and stream, or capture sequence (launches on one stream run in order, and
 * PDL launches reach their locks only after waiting for the previous kernel), zeroed once
 * (split_locks). */
constexpr int kGlobalSplitMax = 8;
/* (behind a perm gather too: the partials follow the gathered x in the workspace) */
static bool global_split_on(const tops_w4a16_args *a, const DevInfo &di) {
    /* M = 33..256: only the wgmma tiles take it (their mma.sync stand-ins do not) */
    return g_global_split && a->x_dtype != TOPS_F32 && di.major == 9 &&
           (a->M <= 32 || (a->M <= 256 && di.minor == 0 && wgmma_built()));
}
/* partials the workspace holds: as many as blocks fit in one wave, two per SM (one of the 128 x 256
 * tile above M = 64), over the tiles of the batch's configuration (256 columns up to M = 32, 128
 * up to 64, 128 x 256 above) */
static int64_t global_split_room(int64_t M, int64_t N, const DevInfo &di) {
    if (M > 64) /* the 128 x 256 tile, one block per SM */
        return std::max<int64_t>(1, std::min<int64_t>(kGlobalSplitMax, di.sms / (((M + 127) / 128) * ((N + 255) / 256))));
    const int64_t tiles = M > 32 ? (N + 127) / 128 : (N + 255) / 256;
    return std::max<int64_t>(1, std::min<int64_t>(kGlobalSplitMax, 2 * di.sms / tiles));
}
static size_t gather_bytes(const tops_w4a16_args *a) {
    if (a->perm == nullptr || a->M <= 0 || a->K <= 0) return 0;
    return (size_t)a->M * (size_t)a->K * (a->x_dtype == TOPS_F32 ? 4 : 2);
}
static size_t partials_offset(const tops_w4a16_args *a) {
    return a->perm == nullptr ? 0 : partials_off(a->M, a->K, a->x_dtype == TOPS_F32 ? 4 : 2);
}
/* The split-K lock words of launches on `stream` of the current device, zero between launches
 * (each launch puts them back), allocated on first use, also during a stream capture (the
 * allocation is no stream operation: the thread's capture mode is relaxed for it). One buffer per
 * (device, stream) for eager launches, and one per (device, stream, capture sequence) for captured
 * ones: a graph keeps the pointer it was captured with, and graphs captured one after another on
 * one stream (torch.cuda.graph's shared default capture stream) may be replayed at the same time
 * on different streams. Buffers live as long as the process (a graph may be replayed at any
 * time), 66 KB each; past kCaptureLockBuffers captures, a capture shares its stream's buffer (as
 * every capture did before: correct unless those graphs replay at the same time). */
constexpr int kCaptureLockBuffers = 1024;
static int32_t *new_lock_buffer() {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    if (cudaThreadExchangeStreamCaptureMode(&mode) != cudaSuccess) return nullptr;
    int32_t *ptr = nullptr;
    cudaStream_t z = nullptr;
    const size_t bytes = (size_t)(kLocks + 2 * kGlobalSplitMax) * sizeof(int32_t); /* + gather_in_grid's */
    bool ok = cudaMalloc(&ptr, bytes) == cudaSuccess && cudaStreamCreateWithFlags(&z, cudaStreamNonBlocking) == cudaSuccess &&
              cudaMemsetAsync(ptr, 0, bytes, z) == cudaSuccess && cudaStreamSynchronize(z) == cudaSuccess;
    if (z != nullptr) cudaStreamDestroy(z);
    if (!ok && ptr != nullptr) cudaFree(ptr);
    cudaThreadExchangeStreamCaptureMode(&mode);
    (void)cudaGetLastError();
    return ok ? ptr : nullptr;
}
static int32_t *split_locks(void *stream) {
    using Key = std::tuple<int, void *, unsigned long long>; /* device, stream, capture id (0: eager) */
    static std::map<Key, int32_t *> tab;
    static int captures = 0;
    static std::mutex mu;
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return nullptr;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    unsigned long long capture = 0;
    if (cudaStreamGetCaptureInfo(static_cast<cudaStream_t>(stream), &cs, &capture) != cudaSuccess) {
        (void)cudaGetLastError();
        return nullptr;
    }
    if (cs != cudaStreamCaptureStatusActive) capture = 0;
    std::lock_guard<std::mutex> lock(mu);
    auto it = tab.find(Key{dev, stream, capture});
    if (it != tab.end()) return it->second;
    if (capture != 0 && captures >= kCaptureLockBuffers) {
        capture = 0;
        it = tab.find(Key{dev, stream, capture});
        if (it != tab.end()) return it->second;
    }
    int32_t *ptr = new_lock_buffer();
    if (ptr == nullptr) return nullptr;
    tab.emplace(Key{dev, stream, capture}, ptr);
    if (capture != 0) ++captures;
    return ptr;
}

static int gather_checked(const tops_w4a16_args *a, void *dst, void *stream, bool ws_split) {
    if (a == nullptr || a->perm == nullptr || a->x == nullptr || a->M <= 0 || (a->K & 7) != 0 ||
        a->x_row_stride != a->K || !aligned(a->perm, 16) || !aligned(dst, 16))
        return TOPS_ERR_ARG;
    return launch_gather(a, dst, stream, ws_split);
}

static __global__ void arch_probe_kernel() {}

int device_code_version() {
    cudaFuncAttributes fa;
    const int v = cudaFuncGetAttributes(&fa, arch_probe_kernel) == cudaSuccess ? fa.ptxVersion : 0;
    (void)cudaGetLastError(); /* (not left for a launch's check) */
    return v;
}

} // namespace tops_w4

using namespace tops_w4;

extern "C" {

/* development hooks, not part of tops_cuda.h: force the tile config (0..5, -1 = automatic) and
 * the K split (0 = automatic). Used by benchmarks/w4a16_cuda_dev.py. */
void tops_cuda_w4a16_dev_force(int cfg, int split) {
    g_force_cfg = cfg;
    g_force_split = split;
}
/* the x gather of perm: 0 automatic, 1 by element, 2 by element signalling late, 3 by row, 4 by
 * the GEMM's own grid, 5 by each of its blocks, where they can */
void tops_cuda_w4a16_dev_gather(int mode) { g_gather_mode = mode; }
/* split-K through the workspace where it pays (1, the default; M <= 128 on sm_90) or through
 * clusters only (0) */
void tops_cuda_w4a16_dev_global_split(int on) { g_global_split = on; }
/* bit 0: the last call split K through the workspace (else through clusters, or not at all);
 * bit 1: its grid gathered x[:, perm] itself; bit 2: each of its blocks did */
int tops_cuda_w4a16_dev_last_workspace(void) {
    return (g_last_workspace ? 1 : 0) | (g_last_grid_gather == 1 ? 2 : 0) | (g_last_grid_gather == 2 ? 4 : 0);
}
/* programmatic dependent launch on (1, the default) or off (0) */
void tops_cuda_w4a16_dev_pdl(int on) { g_pdl = on != 0; }
/* cluster scheduling policy of split-K launches: 0 default, 1 spread, 2 load balancing */
void tops_cuda_w4a16_dev_cluster_policy(int policy) { g_cluster_policy = policy; }
/* the tile config (-1: generic kernel) and K split of the last call */
void tops_cuda_w4a16_dev_last(int *cfg, int *split) {
    *cfg = g_last_cfg;
    *split = g_last_split;
}

size_t tops_cuda_w4a16_workspace_bytes(const tops_w4a16_args *a) {
    /* the gathered x (perm), or the split-K partials of batches up to 128 (above 64: those of
     * the 128 x 256 tile only) */
    if (a == nullptr || a->M <= 0 || a->K <= 0 || a->N <= 0) return 0;
    const size_t gx = gather_bytes(a);
    const DevInfo di = dev_info();
    if (!global_split_on(a, di)) return gx;
    if (a->M > 64 && choose_cfg(a->M, a->K, a->N, !plain_groups(a)) != 11) return gx;
    const int64_t room = global_split_room(a->M, a->N, di);
    return room < 2 ? gx : partials_offset(a) + (size_t)room * (size_t)a->M * (size_t)a->N * sizeof(float);
}

int tops_cuda_w4a16_gather_x(const tops_w4a16_args *a, void *dst, void *stream) {
    if (a == nullptr) return TOPS_ERR_ARG;
    const NoPdlScope no_pdl(a->weights_fresh != 0);
    return gather_checked(a, dst, stream, false);
}

/* the product with a's x as it is; pg (a->perm set): the small-batch tiles gather x[:, perm]
 * themselves, by the grid into the workspace's first partials_offset bytes, which workspace
 * follows (1), or each block into its shared memory (2); kNoGridGather, nothing launched, where
 * they cannot */
static int linear_on(const tops_w4a16_args *a, void *workspace, size_t workspace_bytes, void *stream, int pg) {
    const int64_t M = a->M, K = a->K, N = a->N;
    if (M < 0 || K <= 0 || N <= 0 || (K & 7) != 0 || (N & 7) != 0) return TOPS_ERR_ARG;
    if (a->group_size <= 0 || a->groups <= 0) return TOPS_ERR_ARG;
    if (!kil_args_ok(a)) return TOPS_ERR_ARG;
    /* with g_idx (the act-order tiles) group_size is not read: K need not be a multiple of it */
    if (a->g_idx == nullptr && (K % a->group_size != 0 || a->groups != K / a->group_size)) return TOPS_ERR_ARG;
    if (a->x_dtype != TOPS_F32 && a->x_dtype != TOPS_F16 && a->x_dtype != TOPS_BF16) return TOPS_ERR_ARG;
    if (a->scales_dtype != a->x_dtype || a->out_dtype != a->x_dtype) return TOPS_ERR_ARG;
    if (a->bias != nullptr && a->bias_dtype != a->x_dtype) return TOPS_ERR_ARG;
    if (a->x_row_stride != K) return TOPS_ERR_ARG;
    if (a->qweight == nullptr || a->scales == nullptr || a->out == nullptr) return TOPS_ERR_ARG;
    if (M > 0 && a->x == nullptr) return TOPS_ERR_ARG;
    int zmode = 0;
    if (a->qzeros != nullptr) {
        if (a->zero_format == TOPS_ZEROS_V1) zmode = 1;
        else if (a->zero_format == TOPS_ZEROS_V2) zmode = 2;
        else return TOPS_ERR_ARG;
    }
    if (M == 0) return TOPS_OK;
    /* The tensor-core tiles hold sizes in int (LinParams) and round M, N and K up to whole tiles
     * (of at most 256) in int: K = 2**31 - 8 overflowed the k-tile count. Sizes past that take
     * the generic kernel, whose indices are 64-bit (they were refused as invalid arguments). */
    constexpr int64_t kTileMax = 0x7fffffffLL - 256;
    const bool int_sizes = M <= kTileMax && K <= kTileMax && N <= kTileMax && a->groups <= 0x7fffffffLL;

    const DevInfo di = dev_info();
    const int64_t gs = a->group_size;
    const bool act = !plain_groups(a);
    if (pg && (a->x_dtype == TOPS_F32 || act || !int_sizes || choose_cfg(M, K, N, act) > 1)) return kNoGridGather;
    g_last_cfg = -1;
    g_last_split = 0;
    g_last_workspace = false;
    if (a->x_dtype == TOPS_F32) return launch_generic<float>(a, zmode, stream);

    /* (read by the plain-group tiles only, where gs <= K < 2**31; with g_idx gs may be any size,
     * and unbounded this loop shifted past 63 bits and never ended for one past 2**62) */
    int gshift = 31;
    if (gs != K) {
        gshift = 0;
        while (gshift < 31 && (1LL << gshift) < gs) ++gshift;
    }
    const bool ok_align = aligned(a->x, 16) && aligned(a->qweight, 16) && aligned(a->scales, 16) &&
                          aligned(a->qzeros, 4) && aligned(a->g_idx, 16) && aligned(a->bias, 8) &&
                          aligned(a->out, 8);
    if (pg && !ok_align) return kNoGridGather;
    /* The tensor-core tiles read a k-interleaved qweight with plain groups only: their group of k
     * is k >> gshift, which a group of 96 or 160 (a multiple of 32, so a valid prepack) would
     * round up to 128 or 256; the act-order tiles, which divide, do not read that layout. */
    const bool kp = a->kinterleaved != 0;
    if (ok_align && int_sizes && !(kp && act)) {
        LinParams p;
        p.x = static_cast<const uint16_t *>(a->x);
        p.qw = a->qweight;
        p.sc = static_cast<const uint16_t *>(a->scales);
        p.qz = a->qzeros;
        p.gidx = pg ? a->perm : a->g_idx; /* (PG tiles: no g_idx, plain groups) */
        p.part = nullptr;
        p.locks = nullptr;
        p.part_floats = 0;
        p.share = 1;
        p.bias = static_cast<const uint16_t *>(a->bias);
        p.out = static_cast<uint16_t *>(a->out);
        p.M = (int)M;
        p.K = (int)K;
        p.N = (int)N;
        p.K8 = (int)(K >> 3);
        p.G = (int)a->groups;
        p.gsize = (int)gs;
        p.gshift = gshift;
        p.zmode = zmode;
        p.m_tiles = p.n_tiles = p.KT = p.kt_per_split = 0;
        int cfg = choose_cfg(M, K, N, act);
        const bool bf16 = a->x_dtype == TOPS_BF16;
        /* the tiles of up to 64 rows and the 128 x 256 one (Cfg / WCfg GLOBAL) may split K through
         * the workspace where it has room (else through a cluster); the others ignore it */
        if (global_split_on(a, di) && workspace != nullptr &&
            workspace_bytes >= 2 * (size_t)M * (size_t)N * sizeof(float) && aligned(workspace, 16) &&
            ((M + 7) / 8) * ((N + 255) / 256) <= kLocks) {
            p.locks = split_locks(stream);
            if (p.locks != nullptr) {
                p.part = static_cast<float *>(workspace);
                p.part_floats = (int)std::min<int64_t>((int64_t)(workspace_bytes / sizeof(float)), INT32_MAX);
            }
        }
        int st = -1;
        g_last_cfg = cfg;
        if (pg) {
            if (p.locks != nullptr && pg == 2 && kp)
                st = bf16 ? dispatch_tc_pb<BF16>(p, cfg, stream) : dispatch_tc_pb<F16>(p, cfg, stream);
            else if (p.locks != nullptr && pg == 1)
                st = kp ? (bf16 ? dispatch_tc_pg<BF16, true>(p, cfg, stream) : dispatch_tc_pg<F16, true>(p, cfg, stream))
                        : (bf16 ? dispatch_tc_pg<BF16, false>(p, cfg, stream) : dispatch_tc_pg<F16, false>(p, cfg, stream));
            return st >= 0 ? st : kNoGridGather;
        }
        /* (the wgmma tiles address x rows by 32-bit offsets of up to 256 K) */
        if (cfg >= 10 && di.major == 9 && di.minor == 0 && K < (1 << 23))
            st = launch_wgmma(p, bf16, act, kp, cfg, stream);
        if (st < 0) {
            cfg = mma_fallback(cfg, M, N, di.sms);
            g_last_cfg = cfg;
            if (kp)
                st = bf16 ? dispatch_tc<BF16, false, true>(p, cfg, stream) : dispatch_tc<F16, false, true>(p, cfg, stream);
            else if (!bf16)
                st = act ? dispatch_tc<F16, true>(p, cfg, stream) : dispatch_tc<F16, false>(p, cfg, stream);
            else
                st = act ? dispatch_tc<BF16, true>(p, cfg, stream) : dispatch_tc<BF16, false>(p, cfg, stream);
        }
        if (st >= 0) return st;
        /* st < 0: the configuration does not fit (act-order table too large): generic path */
        g_last_cfg = -1;
        g_last_split = 0;
    }
    if (a->x_dtype == TOPS_F16) return launch_generic<__half>(a, zmode, stream);
    return launch_generic<__nv_bfloat16>(a, zmode, stream);
}

int tops_cuda_w4a16_linear(const tops_w4a16_args *a, void *workspace, size_t workspace_bytes, void *stream) {
    if (a == nullptr) return TOPS_ERR_ARG;
    const NoPdlScope no_pdl(a->weights_fresh != 0);
    g_last_grid_gather = 0;
    if (a->perm == nullptr || a->M <= 0) return linear_on(a, workspace, workspace_bytes, stream, 0);
    /* x[:, perm] into the workspace, then the plain product on it, with the rest of the workspace
     * (split-K partials) */
    if (workspace == nullptr || workspace_bytes < gather_bytes(a)) return TOPS_ERR_ARG;
    const size_t off = partials_offset(a);
    void *rest = workspace_bytes > off ? static_cast<unsigned char *>(workspace) + off : nullptr;
    const size_t rest_bytes = workspace_bytes > off ? workspace_bytes - off : 0;
    const DevInfo di = dev_info();
    const bool ws_split = global_split_on(a, di) && rest_bytes >= 2 * (size_t)a->M * (size_t)a->N * sizeof(float);
    /* by the GEMM's own blocks or grid where that pays and they can (the small-batch tiles),
     * else by a kernel first */
    const int pg = g_gather_mode == 5 || (g_gather_mode == 0 && block_gather_pays(a, di))   ? 2 /* each block */
                   : g_gather_mode == 4 || (g_gather_mode == 0 && late_gather_pays(a, di)) ? 1 /* the grid */
                                                                                            : 0;
    if (ws_split && pg && (a->K & 7) == 0 && a->x_row_stride == a->K && aligned(a->perm, 16) &&
        aligned(workspace, 16)) {
        const int st = linear_on(a, rest, rest_bytes, stream, pg);
        g_last_grid_gather = st != kNoGridGather ? pg : 0;
        if (g_last_grid_gather) return st;
    }
    const int st = gather_checked(a, workspace, stream, ws_split);
    if (st != TOPS_OK) return st;
    tops_w4a16_args gathered = *a;
    gathered.x = workspace;
    gathered.perm = nullptr;
    return linear_on(&gathered, rest, rest_bytes, stream, 0);
}

} /* extern "C" */

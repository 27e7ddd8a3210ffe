/*
 * w4a16_common.cuh - shared pieces of the CUDA w4a16 linear (w4a16_kernels.cu, w4a16_wgmma.cu):
 * cp.async / lop3 helpers, the fp16 / bf16 traits, the kernel parameters, and the host-side
 * launch helper that picks the K split (a thread-block cluster) from the occupancy.
 * Internal: nothing here is part of the C API (tops_cuda.h).
 */
#ifndef TOPS_W4A16_COMMON_CUH
#define TOPS_W4A16_COMMON_CUH

#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include <algorithm>
#include <cmath>
#include <mutex>

#include "tops_cuda.h"

namespace tops_w4 {

/* ---- small device helpers ----------------------------------------------------------------- */

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Programmatic dependent launch (sm_90): a kernel launched with the PDL attribute may start while
 * the previous kernel in the stream finishes; it must call grid_dependency_wait() before touching
 * anything that kernel writes (for us: x), and calls grid_dependents_launch() once the next kernel
 * may start. Both are no-ops without the attribute and before sm_90. */
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
enum { LOAD_W = 1, LOAD_X = 2 };

/* element-type traits: bit patterns only (uint16_t storage) */
struct F16 {
    static constexpr uint32_t MAGIC = 0x64006400u;  /* half2 (1024, 1024) */
    static constexpr uint32_t NEGMAG = 0xE400u;     /* -(1024) as fp16 bits, | z gives -(1024 + z) */
    static constexpr uint32_t ONE2 = 0x3C003C00u;   /* half2 (1, 1) */
    static constexpr bool FAST = true;              /* 1024 + 16 q is exact: lo/hi nibble trick */
    __device__ static __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
        uint32_t d;
        asm("fma.rn.f16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
        return d;
    }
    __device__ static __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ static __forceinline__ float to_f(uint16_t v) { return __half2float(__ushort_as_half(v)); }
    __device__ static __forceinline__ uint16_t from_f(float v) { return __half_as_ushort(__float2half_rn(v)); }
};
struct BF16 {
    static constexpr uint32_t MAGIC = 0x43004300u;  /* bf16x2 (128, 128) */
    static constexpr uint32_t NEGMAG = 0xC300u;
    static constexpr uint32_t ONE2 = 0x3F803F80u;
    static constexpr bool FAST = false;             /* 128 + 16 q would reach the exponent */
    __device__ static __forceinline__ uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
        uint32_t d;
        asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
        return d;
    }
    __device__ static __forceinline__ void mma(float *c, const uint32_t *a, uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ static __forceinline__ float to_f(uint16_t v) {
        return __bfloat162float(__ushort_as_bfloat16(v));
    }
    __device__ static __forceinline__ uint16_t from_f(float v) {
        return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    }
};
/* (a & MASK) | c in one lop3 (the compiler splits two immediates into two instructions) */
template <uint32_t MASK> __device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(MASK), "r"(c));
    return d;
}
static constexpr uint32_t NEG_ZERO2 = 0x80008000u; /* (-0, -0): x * s + (-0) == x * s exactly */

/* the real k of nibble e of k-word kw in the k-interleaved layout (tops_prepack_w4a16) */
__host__ __device__ __forceinline__ int64_t kp_real_k(int64_t kw, int e) { return TOPS_KIL_REAL_K(kw, (int64_t)e); }
/* a k-interleaved qweight is read in whole 32-k blocks, each inside one group, with no g_idx
 * (every launcher that takes one checks this) */
inline bool kil_args_ok(const tops_w4a16_args *a) {
    return !a->kinterleaved ||
           ((a->K & 31) == 0 && a->g_idx == nullptr && (a->group_size % 32 == 0 || a->group_size == a->K));
}
/* zero point of field f (4 bits) for zmode 0 (symmetric: 8), 1 (v1: f + 1), 2 (v2: f) */
__device__ __forceinline__ uint32_t zero_of(uint32_t f, int zmode) {
    return zmode == 0 ? 8u : (zmode == 1 ? ((f + 1u) & 15u) : (f & 15u));
}

struct LinParams {
    const uint16_t *x;
    const int32_t *qw;
    const uint16_t *sc;
    const int32_t *qz;
    const int32_t *gidx;
    const uint16_t *bias;
    uint16_t *out;
    /* split-K through global memory (batches up to 64, see global_reduce_store): fp32
     * partials [split][M][N] and one lock per tile; null: through the cluster */
    float *part;
    int32_t *locks;
    int part_floats; /* room in part (host only) */
    /* up to how many blocks may share a tile's sum (shared_sum): 1 unless the whole grid can be
     * resident at once, since its summing blocks wait for the tile's other blocks */
    int share; /* (two ints where an int64 was: a larger struct changed every kernel's code) */
    int M, K, N, K8, G, gsize, gshift, zmode;
    int m_tiles, n_tiles, KT, kt_per_split;
};


/* out[m, col .. col+3] = v + bias, rounded once to the activation dtype (8-byte store) */
template <class T>
__device__ __forceinline__ void store4(const LinParams &p, int m, int col, float4 v) {
    if (p.bias != nullptr) {
        const uint2 b = *reinterpret_cast<const uint2 *>(p.bias + col);
        v.x += T::to_f((uint16_t)(b.x & 0xFFFFu));
        v.y += T::to_f((uint16_t)(b.x >> 16));
        v.z += T::to_f((uint16_t)(b.y & 0xFFFFu));
        v.w += T::to_f((uint16_t)(b.y >> 16));
    }
    uint2 o;
    o.x = (uint32_t)T::from_f(v.x) | ((uint32_t)T::from_f(v.y) << 16);
    o.y = (uint32_t)T::from_f(v.z) | ((uint32_t)T::from_f(v.w) << 16);
    *reinterpret_cast<uint2 *>(p.out + (int64_t)m * p.N + col) = o;
}

/* one float4 of a split-K output: the sum of parts[q * stride], q < nsplit (<= 8), in rank order
 * (deterministic whatever the arrival order), stored */
template <class T>
__device__ __forceinline__ void sum_store4(const LinParams &p, int m, int col, const float4 *parts, int stride,
                                           int nsplit) {
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int q = 0; q < 8; ++q)
        if (q < nsplit) {
            const float4 r = parts[q * stride];
            v.x += r.x;
            v.y += r.y;
            v.z += r.z;
            v.w += r.w;
        }
    store4<T>(p, m, col, v);
}

/* Act-order group table of a block's BN columns: tab[g][c] = scale | -(magic + zero) << 16 for
 * every group g. Column c of row g sits at c ^ 8(g & 3): the lanes that look up different groups
 * at the same columns (different k of one quarter warp in both kernels) then hit different banks
 * more often than not, where unswizzled rows (a multiple of 128 bytes apart) always collide.
 * Built before the PDL wait (scales and zeros are the layer's own), loads batched U per thread:
 * a loop of one dependent load per iteration cost ~10 us at K = 8192 (64 groups x 64 chunks over
 * 256 threads). */
template <int BN>
__device__ __forceinline__ int tab_at(int gg, int col) {
    static_assert(BN % 32 == 0, "the swizzle moves columns by up to 24");
    return gg * BN + (col ^ ((gg & 3) << 3));
}
template <class T, int BN>
__device__ __forceinline__ void build_group_table(const LinParams &p, uint32_t *tab, int n0, int tid) {
    constexpr int C4 = BN / 4, U = 8;
    const int total = p.G * C4, N8 = p.N >> 3;
    for (int i0 = 0; i0 < total; i0 += 256 * U) {
        uint2 s4[U];
        uint32_t zz[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * 256 + tid, gg = i / C4, col = n0 + 4 * (i % C4);
            s4[u] = make_uint2(0u, 0u);
            zz[u] = 0u;
            if (i < total && col < p.N) {
                s4[u] = __ldg(reinterpret_cast<const uint2 *>(p.sc + (int64_t)gg * p.N + col));
                if (p.zmode != 0) zz[u] = (uint32_t)__ldg(p.qz + (int64_t)gg * N8 + (col >> 3)) >> ((col & 4) * 4);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * 256 + tid, gg = i / C4;
            if (i >= total) break;
            uint4 e;
            e.x = (s4[u].x & 0xFFFFu) | ((T::NEGMAG | zero_of(zz[u] & 15u, p.zmode)) << 16);
            e.y = (s4[u].x >> 16) | ((T::NEGMAG | zero_of((zz[u] >> 4) & 15u, p.zmode)) << 16);
            e.z = (s4[u].y & 0xFFFFu) | ((T::NEGMAG | zero_of((zz[u] >> 8) & 15u, p.zmode)) << 16);
            e.w = (s4[u].y >> 16) | ((T::NEGMAG | zero_of((zz[u] >> 12) & 15u, p.zmode)) << 16);
            *reinterpret_cast<uint4 *>(tab + tab_at<BN>(gg, 4 * (i % C4))) = e;
        }
    }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* Split-K epilogue (both kernels): every block of the cluster has written its fp32 partial
 * [BM][BN] tile to sO in its shared memory; rank `split` sums a 1/nsplit slice of the tile over
 * the cluster (distributed shared memory) and stores it. No workspace, no atomics, deterministic. */
template <class T, int BM, int BN>
__device__ __forceinline__ void cluster_reduce_store(const LinParams &p, const float *sO, int m0, int n0,
                                                     int split, int nsplit, int tid) {
    cooperative_groups::cluster_group cluster = cooperative_groups::this_cluster();
    cluster.sync();
    for (int idx = split * 256 + tid; idx < BM * (BN / 4); idx += nsplit * 256) {
        const int ml = idx / (BN / 4), c4 = idx % (BN / 4);
        const int m = m0 + ml, col = n0 + 4 * c4;
        if (m < p.M && col < p.N) {
            /* all remote loads first, then the sums (in rank order, as before): one round trip to
             * distributed shared memory instead of nsplit dependent ones */
            float4 r[8];
#pragma unroll
            for (int q = 0; q < 8; ++q)
                if (q < nsplit) r[q] = *reinterpret_cast<const float4 *>(cluster.map_shared_rank(sO, q) + 4 * idx);
            sum_store4<T>(p, m, col, r, 1, nsplit);
        }
    }
    cluster.sync(); /* keep this block's shared memory alive until every rank has read it */
}
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
/* Split-K by pushing (the mma.sync kernel's small tiles): every block sends each float4 of its
 * partial tile to the block that owns it (float4 i belongs to rank i % nsplit) with st.async into
 * the owner's receive area [rank][ceil(tile / nsplit)], counted by the owner's mbarrier; an owner
 * waits for its bytes, sums in rank order and stores. Blocks never read each other's memory, so
 * nothing waits for the slowest reader before exiting, and the only cluster barrier (are the
 * mbarriers initialised?) is arrived at in the prologue. Needs the receive area outside the
 * pipeline: blocks still in their main loop receive. */
__device__ __forceinline__ void push_barrier_init(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
    asm volatile("{\n.reg .b64 st;\nmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar), "r"(bytes)
                 : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_arrive_relaxed() { asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory"); }
/* v into rank's shared memory at (its copy of) local address addr, counted on rank's bar */
__device__ __forceinline__ void push_float4(uint32_t addr, uint32_t bar, int rank, float4 v) {
    uint32_t ra, rb;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(addr), "r"(rank));
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(rb) : "r"(bar), "r"(rank));
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, [%5];\n" ::"r"(ra),
                 "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(rb)
                 : "memory");
}
__device__ __forceinline__ void mbarrier_wait_phase0(uint32_t bar) {
    asm volatile("{\n.reg .pred P;\nWAIT:\nmbarrier.try_wait.parity.shared::cta.b64 P, [%0], 0;\n@!P bra WAIT;\n}\n" ::"r"(
                     bar)
                 : "memory");
}
/* the owner's part: float4 j of its receive rows is tile float4 j * nsplit + split, for the tile's
 * first live4 float4 (its rows that exist) */
template <class T, int BM, int BN>
__device__ __forceinline__ void push_reduce_store(const LinParams &p, const float *recv, int m0, int n0, int split,
                                                  int nsplit, int live4, int tid) {
    constexpr int TOT4 = BM * (BN / 4);
    const int per = (TOT4 + nsplit - 1) / nsplit, mine = (live4 - split + nsplit - 1) / nsplit;
    for (int j = tid; j < mine; j += 256) {
        const int idx = j * nsplit + split;
        const int ml = idx / (BN / 4), c4 = idx % (BN / 4);
        const int m = m0 + ml, col = n0 + 4 * c4;
        if (m < p.M && col < p.N) {
            sum_store4<T>(p, m, col, reinterpret_cast<const float4 *>(recv) + j, per, nsplit);
        }
    }
}
#endif

/* Split K through the workspace, tiles of BM rows: whether a kernel after the GEMM sums the
 * partials (reduce_partials_kernel, over every SM) or the last block of each tile does. H200,
 * CUDA graphs, last block / kernel after: M = 32 14336 x 4096 25.2 / 22.4 us, 28672 x 4096
 * 43.3 / 40.4; M = 64 4096 x 4096 12.8 / 10.7. The 8- and 16-row tiles keep the last block: the
 * kernel after's waiting blocks hold registers the next layer's blocks would take while this one
 * drains (M = 16, 28672 x 4096: 39.7 us against 28.1). */
__host__ __device__ constexpr bool reduce_after(int BM) { return BM >= 32; }

/* The sum of a tile's partials shared by the last `share` blocks to arrive (2..4: a slice of at
 * most 256 float4 each, one per thread), where one block loading them all is bound by its SM's
 * bandwidth from L2 (H200, M = 16 at split 8, 7 x 16 KB: a diagnostic build loading one partial
 * was 0.6-1.1 us faster). The tile's lock holds the ranks that arrived (bits 0-7), the slices
 * summed (8-15) and the slices given up (16-23).
 * - The last to arrive never waits: it sums its slice and those given up before it came.
 * - The others load the partials of the ranks their own count saw, wait (one thread polling
 *   with acquire loads) for the rest, then load those and sum. The wait is bounded: launch_split
 *   offers sharing only where the whole grid can be resident, but where fewer SMs are available
 *   (MPS, another kernel) the missing blocks might need a waiting block's slot. Past
 *   kShareSpin cycles the block gives its slice up (an atomic OR; if that shows every rank
 *   arrived after all, it sums as usual) and leaves it to the last.
 * Every slice is summed in rank order, so the result is the same whoever sums. The block that
 * completes the count of summed slices puts the lock back to 0. bc: two words of shared memory
 * for the block's broadcasts. */
#ifndef TOPS_SHARE_SPIN /* (dev builds set 0 to test the give-up path) */
#define TOPS_SHARE_SPIN (1ll << 21)
#endif
constexpr long long kShareSpin = TOPS_SHARE_SPIN;
template <class T, int BM, int BN>
__device__ __forceinline__ void shared_sum(const LinParams &p, int m0, int n0, int split, int nsplit, int share,
                                           int live4, int tid, uint32_t *bc) {
    uint32_t *lock = reinterpret_cast<uint32_t *>(p.locks + blockIdx.x);
    if (tid == 0) {
        uint32_t old;
        asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;\n" : "=r"(old) : "l"(lock), "r"(1u << split) : "memory");
        bc[0] = old;
    }
    __syncthreads();
    const uint32_t old = bc[0], full = (1u << nsplit) - 1u, have = (old & 0xFFu) | (1u << split);
    const int arrival = __popc(old & 0xFFu), first = nsplit - share;
    if (arrival < first) return;
    const int per = (live4 + share - 1) / share;
    const int64_t slice = (int64_t)p.M * p.N;
    /* this thread's float4 of slice s: whether it exists, and its partials' address */
    auto at = [&](int s, int &m, int &col) {
        const int idx = s * per + tid;
        m = m0 + idx / (BN / 4);
        col = n0 + 4 * (idx % (BN / 4));
        return tid < per && idx < live4 && col < p.N;
    };
    auto count_summed = [&](int n) {
        if (tid == 0) {
            uint32_t o;
            asm volatile("atom.add.relaxed.gpu.global.u32 %0, [%1], %2;\n" : "=r"(o) : "l"(lock), "r"((uint32_t)n << 8) : "memory");
            if ((int)((o >> 8) & 0xFFu) + n == share) *lock = 0u;
        }
    };
    float4 r[8];
    if (have == full) { /* the last to arrive */
        const uint32_t take = (1u << (share - 1)) | ((old >> 16) & ((1u << share) - 1u));
        for (int s = 0; s < share; ++s) {
            int m, col;
            if (((take >> s) & 1u) && at(s, m, col)) {
                const float *src = p.part + (int64_t)m * p.N + col;
#pragma unroll
                for (int q = 0; q < 8; ++q)
                    if (q < nsplit) r[q] = __ldcg(reinterpret_cast<const float4 *>(src + q * slice));
                sum_store4<T>(p, m, col, r, 1, nsplit);
            }
        }
        count_summed(__popc(take));
        return;
    }
    const int s = arrival - first;
    int m, col;
    const bool mine = at(s, m, col);
    const float *src = p.part + (int64_t)m * p.N + col;
#pragma unroll
    for (int q = 0; q < 8; ++q)
        if (mine && q < nsplit && ((have >> q) & 1u)) r[q] = __ldcg(reinterpret_cast<const float4 *>(src + q * slice));
    if (tid == 0) {
        uint32_t v;
        const long long t0 = clock64();
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(lock) : "memory");
        } while ((v & full) != full && clock64() - t0 < kShareSpin);
        if ((v & full) != full)
            asm volatile("atom.or.acq_rel.gpu.global.b32 %0, [%1], %2;\n" : "=r"(v) : "l"(lock), "r"(1u << (16 + s)) : "memory");
        bc[1] = (v & full) == full;
    }
    __syncthreads();
    if (!bc[1]) return; /* given up: the last to arrive sums it */
#pragma unroll
    for (int q = 0; q < 8; ++q)
        if (mine && q < nsplit && !((have >> q) & 1u)) r[q] = __ldcg(reinterpret_cast<const float4 *>(src + q * slice));
    if (mine) sum_store4<T>(p, m, col, r, 1, nsplit);
    count_summed(1);
}

/* Split-K through global memory, without a cluster: every block stores its fp32 partial (the
 * tile's rows and columns that exist) to part[split], then counts itself on the tile's lock; the
 * last to arrive sums the nsplit partials in rank order (the same result whatever the arrival
 * order), stores, and puts the lock back to 0 for the next launch. Clusters pack their blocks
 * two to an SM where two fit, which left SMs idle (H200, 8192 x 8192 M = 16: split 4 23.8 us
 * through clusters, 14.9 without any reduction) and capped the split at 6.
 * write(slice) stores the thread's outputs that exist to slice[m * N + col] (global rows and
 * columns; __stcg: the partials are read once, from L2, by the last block). Tiles of
 * reduce_after(BM) rows only store their partial: reduce_partials_kernel sums them after the GEMM
 * (a choice at compile time: a run-time one cost the 64-row wgmma tile's bf16 build 20 bytes of
 * spills and ~6% at M = 64, H200). */
template <class T, int BM, int BN, class Write>
__device__ __forceinline__ void global_reduce_store(const LinParams &p, int m0, int n0, int split, int nsplit,
                                                    int tid, uint32_t *bcast, Write write) {
    const int64_t slice = (int64_t)p.M * p.N;
    write(p.part + split * slice);
    if constexpr (reduce_after(BM)) return;
    /* the block's partial is ordered before its count by the barrier and the count's release
     * (cumulative at gpu scope); the last block's acquire, then its barrier, order the other
     * partials before its loads. One fence-and-atomic by one thread instead of a fence by every
     * thread, an atomic and another fence: H200, M <= 16 at split 8, 0.2-0.7 us faster (8192 x
     * 8192 M = 1 13.3 us against 13.8, 28672 x 4096 22.4 against 23.1) */
    __syncthreads();
    const int live4 = min(BM, p.M - m0) * (BN / 4);
    /* the 16-row tile's sum shared by its last arrivals, a slice of 256 float4 each (see
     * shared_sum). The 8-row tile keeps the last block (its sums are small): a build with this
     * compiled in for it too, never taken (and a larger LinParams), had its lean build 0.8-1.9 us
     * slower at M = 1 (H200: 8192 x 8192 12.6 -> 13.4, 8192 x 28672 35.5 -> 37.4) */
    if constexpr (!reduce_after(BM) && BM * (BN / 4) >= 1024) {
        const int need = (live4 + 255) / 256;
        if (need > 1 && nsplit >= 4 && nsplit >= need && p.share >= need) {
            shared_sum<T, BM, BN>(p, m0, n0, split, nsplit, need, live4, tid, bcast);
            return;
        }
    }
    (void)bcast;
    int last = 0;
    if (tid == 0) {
        int old;
        asm volatile("atom.add.acq_rel.gpu.global.s32 %0, [%1], 1;\n" : "=r"(old) : "l"(p.locks + blockIdx.x) : "memory");
        last = old == nsplit - 1;
    }
    if (!__syncthreads_or(last)) return;
    /* the tile's float4 that exist, R per thread at a time with all their loads in flight first
     * (one round trip to L2 per R, not one per float4) */
    constexpr int R = BM * (BN / 4) >= 512 ? 2 : 1;
    for (int i0 = tid; i0 < live4; i0 += R * 256) {
        float4 r[R][8];
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int idx = i0 + j * 256;
            const int m = m0 + idx / (BN / 4), col = n0 + 4 * (idx % (BN / 4));
            if (idx < live4 && col < p.N) {
#pragma unroll
                for (int q = 0; q < 8; ++q)
                    if (q < nsplit)
                        r[j][q] = __ldcg(reinterpret_cast<const float4 *>(p.part + q * slice + (int64_t)m * p.N + col));
            }
        }
#pragma unroll
        for (int j = 0; j < R; ++j) {
            const int idx = i0 + j * 256;
            const int m = m0 + idx / (BN / 4), col = n0 + 4 * (idx % (BN / 4));
            if (idx < live4 && col < p.N) sum_store4<T>(p, m, col, r[j], 1, nsplit);
        }
    }
    if (tid == 0) p.locks[blockIdx.x] = 0;
}

/* ---- host side -------------------------------------------------------------------------------- */

/* development overrides (benchmarks/w4a16_cuda_dev.py): force a tile config / K split */
inline int g_force_cfg = -1;
inline int g_force_split = 0;
inline int g_last_cfg = -1; /* what the last call ran (reported to the benchmark) */
inline int g_last_split = 0;
inline bool g_last_workspace = false; /* the last call split K through the workspace */
inline int g_last_grid_gather = 0; /* x[:, perm] gathered by its grid (1) or each block (2) */
inline bool g_pdl = true; /* launch with programmatic dependent launch on sm_90+ */
/* this call's weights (qweight, scales, qzeros, g_idx, perm, bias) were written by the kernel just
 * before it in the stream (the binding's conversion of fp16 scales for bf16 x, an int64 perm, a
 * non-contiguous qweight): no programmatic dependent launch, whose kernels read the weights
 * before their grid_dependency_wait (they are the layer's own otherwise, written long before).
 * Set for one call by NoPdlScope. */
inline thread_local bool t_weights_fresh = false;
struct NoPdlScope {
    bool old;
    explicit NoPdlScope(bool fresh) : old(t_weights_fresh) { t_weights_fresh = old || fresh; }
    ~NoPdlScope() { t_weights_fresh = old; }
};
/* cluster scheduling policy preference of split-K launches (cudaClusterSchedulingPolicy: 0 the
 * default, 1 spread the blocks of a cluster over SMs, 2 load balancing) */
inline int g_cluster_policy = 0;

/* The virtual architecture (__CUDA_ARCH__ / 10) of the device code the current device runs: below
 * the device's where a build holds only older code (TORCH_CUDA_ARCH_LIST="8.0+PTX" on an H100:
 * compute_80 PTX, JIT-compiled); 0 where it cannot be read. (w4a16_kernels.cu; every CUDA source
 * of the extension is built for the same targets.) */
int device_code_version();

struct DevInfo {
    int dev = 0, sms = 0, major = 0, minor = 0, optin_smem = 0, sm_smem = 0;
    /* the device is sm_90+ and the code it runs was built for sm_90+: the split-K reduction
     * through a thread block cluster, its push epilogue and the programmatic dependent launch's
     * wait exist only there (__CUDA_ARCH__ >= 900). Chosen by the device's major alone, an sm_80
     * build on an H100 took a cluster split whose epilogue its code lacks: out never written */
    bool sm90_code = false;
};
inline DevInfo dev_info() {
    static DevInfo cache[64];
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0) dev = 0;
    if (dev >= 64) dev = 63;
    DevInfo &d = cache[dev];
    if (d.sms == 0) {
        DevInfo n;
        n.dev = dev;
        cudaDeviceGetAttribute(&n.major, cudaDevAttrComputeCapabilityMajor, dev);
        cudaDeviceGetAttribute(&n.minor, cudaDevAttrComputeCapabilityMinor, dev);
        cudaDeviceGetAttribute(&n.optin_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
        cudaDeviceGetAttribute(&n.sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
        cudaDeviceGetAttribute(&n.sms, cudaDevAttrMultiProcessorCount, dev);
        if (n.sms <= 0) n.sms = 1;
        n.sm90_code = n.major >= 9 && device_code_version() >= 90;
        d = n;
    }
    return d;
}

/* launch with programmatic dependent launch (see g_pdl, t_weights_fresh) */
inline bool pdl_on(const DevInfo &di) { return g_pdl && di.sm90_code && !t_weights_fresh; }

/* raise a kernel's dynamic shared memory limit to `bytes` (once per kernel and device) */
inline bool allow_dyn_smem(const void *kern, size_t bytes, const DevInfo &di) {
    if (bytes <= 48 * 1024) return true;
    struct E {
        const void *f;
        int dev, bytes;
    };
    static E done[128];
    static int n = 0;
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    int i = 0;
    while (i < n && !(done[i].f == kern && done[i].dev == di.dev)) ++i;
    if (i < n && done[i].bytes >= (int)bytes) return true;
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes) != cudaSuccess) return false;
    if (i == n && n < 128) ++n;
    if (i < 128) done[i] = E{kern, di.dev, (int)bytes};
    return true;
}

/* Blocks (split == 1) or clusters of `split` blocks (split > 1) of `threads` threads that can be
 * resident at once on the GPU, cached per kernel, shared memory size, split, block size and device.
 * 0 when it cannot run. */
template <class Kern>
inline int resident(Kern kern, size_t smem, int split, const DevInfo &di, int threads = 256) {
    struct E {
        const void *f;
        size_t smem;
        int split, threads, dev, val, policy;
    };
    static E cache[128];
    static int n = 0;
    static std::mutex mu;
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < n; ++i)
        if (cache[i].f == (const void *)kern && cache[i].smem == smem && cache[i].split == split &&
            cache[i].threads == threads && cache[i].dev == di.dev && cache[i].policy == g_cluster_policy)
            return cache[i].val;
    int v = 0;
    if (split == 1) {
        int nb = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&nb, kern, threads, smem) == cudaSuccess) v = nb * di.sms;
    } else {
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(1, (unsigned)split, 1);
        cfg.blockDim = dim3((unsigned)threads, 1, 1);
        cfg.dynamicSmemBytes = smem;
        cudaLaunchAttribute attr[2];
        attr[0].id = cudaLaunchAttributeClusterDimension;
        attr[0].val.clusterDim.x = 1;
        attr[0].val.clusterDim.y = (unsigned)split;
        attr[0].val.clusterDim.z = 1;
        attr[1].id = cudaLaunchAttributeClusterSchedulingPolicyPreference;
        attr[1].val.clusterSchedulingPolicyPreference = (cudaClusterSchedulingPolicy)g_cluster_policy;
        cfg.attrs = attr;
        cfg.numAttrs = g_cluster_policy ? 2 : 1;
        int nc = 0;
        if (cudaOccupancyMaxActiveClusters(&nc, kern, &cfg) == cudaSuccess) v = nc;
    }
    (void)cudaGetLastError();
    if (n < 128) cache[n++] = E{(const void *)kern, smem, split, threads, di.dev, v, g_cluster_policy};
    return v;
}

/* Launch `kern` over `tiles` output tiles, choosing the K split (1..8, a cluster along gridDim.y on
 * sm_90+) that minimises the estimated time: waves x (k-tiles per block) x (blocks per SM) /
 * sqrt(blocks per SM) (two resident blocks hide latency better than one, not twice as well).
 * streaming (the small-batch tiles, which only stream weights): a block's time does not depend on
 * how many share its SM (measured: a k-tile takes as long alone as beside another block), so the
 * cost is waves x (k-tiles per block), and the split stops at 6 (clusters of 7 or 8 ran slower
 * than 6 at every shape measured). On an H100 (CUDA graphs, M = 1) this picks split 6 where the
 * general model picked 7-8 or the 128-column tiles: 28672 x 4096 45.8 -> 30.1 us, 4096 x 4096
 * 6.6 -> 6.2; and M = 16 8192 x 8192 22.3 -> 20.8.
 * pipe: shared memory of the pipeline; out: of the fp32 partial tile (split > 1); tab: extra.
 * Returns -1 when even one block does not fit (the caller falls back). */
constexpr double kFill = 4.0;
/* split-K through global memory (p.locks): the reduction's extra cost over the cluster's, in
 * k-tiles. 3 until the sixteen-row tile's sum was shared (shared_sum): then (H200, CUDA graphs,
 * M = 1 / 16, k-interleaved fp16, split 8 through the workspace against 6 through clusters, which
 * 3 chose at 32..63 k-tiles with one wave) 4096 x 4096 5.2 / 7.2 us against 5.6 / 7.5, 5120 x
 * 5120 7.3 / 10.0 against 8.8 / 11.5, 6144 x 4096 6.4 / 8.7 against 6.9 / 8.9 (bf16 and the
 * GPTQ layout alike; 4096 x 4096 had been equal at M = 1 and 0.4 us slower at M = 16). 1 would
 * take the workspace from 16 k-tiles too, which lost at 2048^2 and 3072^2 (M = 1 3.0 / 4.1 us
 * against 3.4 / 4.3) and gained 0-0.2 us at 2048 x 5632 / 8192. Also measured before: 0-1.1 us
 * faster at 8192 x 8192 (8 against 11 k-tiles per block), 1.5-6.4 us faster at 14336 / 28672 x
 * 4096 (14 / 28 against 19 / 38), 0.5-1.3 us slower at the same split 2 (8192 x 28672) */
constexpr double kGlobalReduce = 2.0;
/* the same for tiles whose partials the kernel after sums (reduce_after): their blocks only store
 * (H200, CUDA graphs, M = 32, 4096 x 4096: split 8 through the workspace 8.9 us, 4 k-tiles per
 * block, against 10.7 through clusters of 6, 6 k-tiles, which the constant above, then 3, chose) */
constexpr double kReduceAfter = 1.0;

/* the split of the model above, or 0 when the kernel's shared memory cannot be granted; after:
 * the kernel's tiles leave their workspace partials to the kernel after (reduce_after) */
template <class Kern>
inline int choose_split(Kern kern, const LinParams &p, int64_t tiles, size_t pipe, size_t out, size_t tab,
                        bool streaming = false, double *best_cost = nullptr, bool after = false) {
    const DevInfo di = dev_info();
    const size_t smem_max = std::max(pipe, out) + tab;
    if (!allow_dyn_smem((const void *)kern, std::min(smem_max, (size_t)di.optin_smem), di)) return 0;
    const bool global = p.locks != nullptr; /* (else split-K reduces through a cluster: sm_90+) */
    if (!di.sm90_code && !global) return 1;
    /* global: at most as many partials as part holds */
    const int64_t room = global ? std::max<int64_t>(1, p.part_floats / ((int64_t)p.M * p.N)) : 8;
    if (g_force_split > 0) return (int)std::min<int64_t>(std::min(g_force_split, 8), room);
    int split = 1;
    double best = 1e300;
    /* clusters of 7 or 8 ran slower than 6 (streaming); without clusters 8 is measured best */
    const int smax = (int)std::min<int64_t>(std::min(streaming && !global ? 6 : 8, std::max(1, p.KT / 2)), room);
    for (int s = 1; s <= smax; ++s) {
        const size_t smem = (s > 1 ? std::max(pipe, out) : pipe) + tab;
        if (smem > (size_t)di.optin_smem) continue;
        /* global: blocks that fit at once, in units of s (one "cluster" is s blocks) */
        const int occ = global ? resident(kern, smem, 1, di) / s : resident(kern, smem, s, di);
        if (occ <= 0) continue;
        const double waves = (double)((tiles + occ - 1) / occ);
        const double blocks = (double)std::min<int64_t>(tiles, occ) * s;
        const double per_sm = std::max(1.0, std::ceil(blocks / di.sms));
        /* + kFill: a block's fixed cost (pipeline fill, epilogue) in k-tiles; without it
         * a wave-quantised grid (8192 x 28672, M = 256: 224 tiles on 132 SMs) looked
         * cheaper split 8 ways, and measured 1.3x slower than unsplit */
        const double cost =
            waves * ((double)((p.KT + s - 1) / s) + kFill) * (streaming ? 1.0 : per_sm / std::sqrt(per_sm)) +
            (s > 1 ? (global ? (after ? kReduceAfter : kGlobalReduce) : 0.5) : 0.0);
        if (cost < best - 1e-9) {
            best = cost;
            split = s;
        }
    }
    if (best_cost != nullptr) *best_cost = best;
    return split;
}

/* the smallest split of 1, 2, 3, 6 whose grid has a block for (nearly) every SM, else the largest
 * allowed (at most KT / 2 k-tiles per block): for tiles whose time per k-tile does not fall when
 * two share an SM, where the model above overrates splitting (clusters of 4 were a cliff at
 * 8192 x 8192 and 14336 x 4096 for every 64-row tile) */
inline int fill_split(int KT, int64_t tiles) {
    const int sms = dev_info().sms;
    int split = 1;
    for (int s : {1, 2, 3, 6}) {
        if (s > 1 && s > KT / 2) break;
        split = s;
        if (tiles * s >= sms - sms / 32) break;
    }
    return split;
}

/* The K split, 1..8 (at most KT / 2 k-tiles per block), of tiles of which one block fills an SM
 * (128 x 256), by a time per wave of `fixed` + `per_step` per 64-k step (us): waves(s) waves, 0
 * where split s is not possible; best_cost: the estimate. The waves are counted in what can be
 * resident at once: in clusters of s blocks, on an H200 17 of 6 (102 blocks) and 15 of 8, not 22
 * and 16 (the GPCs' SM counts). By SM counts, 13824 x 5120 (20 tiles) took split 6 in two waves,
 * 80.6 us against 55.8 at 4; 18944 x 3584 (14 tiles) 53.0 at 6 against 44.1 at 8; 3584 x 18944
 * (74 tiles) 53.9 unsplit against 50.7 at 3 in two waves. */
template <class Waves>
inline int wide_split(int KT, Waves waves, double fixed, double per_step, double *best_cost = nullptr) {
    int split = 1;
    double best = 1e300;
    for (int s = 1; s <= 8; ++s) {
        if (s > 1 && s > KT / 2) break;
        const int64_t w = waves(s);
        if (w <= 0) continue;
        const double cost = (double)w * (fixed + per_step * (double)((KT + s - 1) / s));
        if (cost < best - 1e-9) {
            best = cost;
            split = s;
        }
    }
    if (best_cost != nullptr) *best_cost = best;
    return split;
}

/* p with the tile counts of configuration C (BM x BN tiles, BK k per stage); tiles: m x n tiles */
template <class C>
inline LinParams tiled(const LinParams &base, int64_t &tiles) {
    LinParams p = base;
    p.m_tiles = (p.M + C::BM - 1) / C::BM;
    p.n_tiles = (p.N + C::BN - 1) / C::BN;
    p.KT = (p.K + C::BK - 1) / C::BK;
    tiles = (int64_t)p.m_tiles * p.n_tiles;
    return p;
}

/* the sum of the workspace partials of a launch split `split` ways, launched after it
 * (w4a16_kernels.cu) */
template <class T> int launch_reduce(const LinParams &p, int split, void *stream);
using ReduceFn = int (*)(const LinParams &, int, void *);

/* what a launcher returns, launching nothing, where a grid that gathers x[:, perm] itself (PG,
 * PB) cannot run: the caller gathers x by a kernel first */
constexpr int kNoGridGather = -2;

/* split: the K split (0: choose_split's; g_force_split, a dev hook, overrides both); reduce:
 * launch_reduce of the activation type for tiles of reduce_after(BM) rows, else null; pg: the
 * kernel gathers x[:, perm] itself, its blocks waiting for each other (only through the
 * workspace, and where the whole grid can be resident: else kNoGridGather); spread: where the
 * grid has a block for each SM at most, no two blocks share an SM (see launch_tc); slice_per_kt:
 * shared memory per k-tile of a block's K range after the rest (the blocks that gather their own
 * x[:, perm], PB; kNoGridGather where that does not fit) */
template <class Kern>
inline int launch_split(Kern kern, LinParams p, int64_t tiles, size_t pipe, size_t out, size_t tab, void *stream,
                        bool streaming = false, int split = 0, ReduceFn reduce = nullptr, bool pg = false,
                        bool spread = false, size_t slice_per_kt = 0) {
    const DevInfo di = dev_info();
    if (tiles <= 0 || tiles > 0x7fffffffLL) return TOPS_ERR_ARG;
    if (split <= 0 || g_force_split > 0 || !di.sm90_code) {
        split = choose_split(kern, p, tiles, pipe, out, tab, streaming);
    } else if (!allow_dyn_smem((const void *)kern, std::min(std::max(pipe, out) + tab, (size_t)di.optin_smem), di)) {
        split = 0;
    }
    if (split <= 0) return TOPS_ERR_CUDA;
    p.kt_per_split = (p.KT + split - 1) / split;
    size_t smem = (split > 1 ? std::max(pipe, out) : pipe) + tab + slice_per_kt * (size_t)p.kt_per_split;
    if (slice_per_kt > 0 && (smem > (size_t)di.optin_smem || !allow_dyn_smem((const void *)kern, smem, di)))
        return kNoGridGather;
    const bool whole = p.locks != nullptr && tiles * split <= resident(kern, smem, 1, di);
    if (pg && !whole) return kNoGridGather;
    p.share = split > 1 && whole ? 4 : 1;
    if (spread && tiles * split <= di.sms) {
        /* more than half an SM's shared memory (each block also reserves 1 KB) */
        const size_t one = (size_t)di.sm_smem / 2 + 1024;
        if (one > smem && one <= (size_t)di.optin_smem && allow_dyn_smem((const void *)kern, one, di)) smem = one;
    }
    g_last_split = split;
    g_last_workspace = split > 1 && p.locks != nullptr;
    if (smem > (size_t)di.optin_smem) return -1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)tiles, (unsigned)split, 1);
    cfg.blockDim = dim3(256, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = static_cast<cudaStream_t>(stream);
    cudaLaunchAttribute attr[3];
    unsigned na = 0;
    if (split > 1 && p.locks == nullptr) {
        attr[na].id = cudaLaunchAttributeClusterDimension;
        attr[na].val.clusterDim.x = 1;
        attr[na].val.clusterDim.y = (unsigned)split;
        attr[na].val.clusterDim.z = 1;
        ++na;
        if (g_cluster_policy) {
            attr[na].id = cudaLaunchAttributeClusterSchedulingPolicyPreference;
            attr[na].val.clusterSchedulingPolicyPreference = (cudaClusterSchedulingPolicy)g_cluster_policy;
            ++na;
        }
    }
    if (pdl_on(di)) {
        /* the weights of the first stages stream in while the previous kernel drains */
        attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[na].val.programmaticStreamSerializationAllowed = 1;
        ++na;
    }
    cfg.attrs = attr;
    cfg.numAttrs = na;
    if (cudaLaunchKernelEx(&cfg, kern, p) != cudaSuccess) return TOPS_ERR_CUDA;
    if (cudaGetLastError() != cudaSuccess) return TOPS_ERR_CUDA;
    if (split > 1 && p.locks != nullptr && reduce != nullptr) return reduce(p, split, stream);
    return TOPS_OK;
}

/* tile raster: groups of 8 m-tiles walk the n-tiles together, so blocks running at the same time
 * share both their x rows and their weight columns in L2 */
__device__ __forceinline__ void tile_coords(int pid, int m_tiles, int n_tiles, int &mt, int &nt) {
    /* one row of tiles (every small batch): no divisions, which sit before the first copy */
    if (m_tiles == 1) {
        mt = 0;
        nt = pid;
        return;
    }
    const int GROUP_M = 8;
    const int in_group = GROUP_M * n_tiles;
    const int first_m = (pid / in_group) * GROUP_M;
    const int gsz = min(m_tiles - first_m, GROUP_M);
    mt = first_m + (pid % in_group) % gsz;
    nt = (pid % in_group) / gsz;
}

/* plain groups: no g_idx, and a group of the whole K or a power of two >= 32 (a group never
 * straddles the kernels' 32-k sub-steps); anything else takes the act-order kernels */
inline bool plain_groups(const tops_w4a16_args *a) {
    const int64_t gs = a->group_size;
    return a->g_idx == nullptr && (gs == a->K || (gs >= 32 && (gs & (gs - 1)) == 0));
}

/* the wgmma path (w4a16_wgmma.cu): returns -1 when it is not built for sm_90a or does not fit */
/* kp: qweight k-interleaved (plain groups only) */
int launch_wgmma(const LinParams &p, bool bf16, bool act, bool kp, int cfg, void *stream);
/* whether this binary holds the sm_90a wgmma kernels (the device must still be sm_90) */
bool wgmma_built();
/* M = 65..128, plain groups: whether the 128 x 256 wgmma tile is estimated faster than the
 * 128 x 128 one; room: the split-K partials the workspace will hold (0: none) */
bool wgmma_m128_wide(int64_t K, int64_t N, int64_t room);
/* M = 129..256, plain groups: whether the 128 x 256 tile, K split through the workspace (room
 * partials), is estimated faster than the 256 x 128 one */
bool wgmma_m256_wide(int64_t M, int64_t K, int64_t N, int64_t room);

} // namespace tops_w4

#endif /* TOPS_W4A16_COMMON_CUH */

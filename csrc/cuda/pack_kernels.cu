/*
 * pack_kernels.cu - CUDA launchers of the integer packing ops of tops_cuda.h: generic pack /
 * unpack, AWQ <-> GPTQ qweight and qzeros, GPTQ zeros v1 <-> v2, quanto pack_v2 / unpack_v2, and
 * dequantize. Semantics, layouts and argument checks are those of the CPU functions in
 * ../core/tops.h; results are bit-identical to them.
 *
 * All launchers: validate sizes (TOPS_ERR_ARG), return TOPS_OK without launching for empty
 * tensors, launch on the given stream, check the launch (TOPS_ERR_CUDA). No host synchronisation,
 * no allocation (graph-capturable). Every kernel walks its work with a 64-bit grid-stride loop, so
 * any grid size is correct; grids are 1-D (no gridDim.y limit).
 *
 * Design of the bandwidth-bound ones:
 *   - AWQ <-> GPTQ qweight: one thread owns 4 adjacent 8x8 nibble blocks (4 AWQ columns x 8 rows):
 *     8 int4 loads/stores on the AWQ side (a warp covers 512 contiguous bytes per row), 3 delta-swap
 *     stages in registers (two byte_perm stages, one nibble stage), AWQ order folded into register
 *     renaming; the GPTQ side (32 contiguous words per thread) goes through a per-warp, XOR-swizzled
 *     shared-memory buffer so that its int4 accesses are fully coalesced and bank-conflict free.
 *     Fallback (N % 32 != 0 or unaligned pointers): one thread per 8x8 block, 32-bit accesses.
 *   - pack_v2 / unpack_v2: one thread per 16-byte int16x8 output (input) vector, built from 32
 *     bytes of one source row (two int4); consecutive threads write consecutive 16 bytes.
 */
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "tops_cuda.h"

#ifndef TOPS_EMU
/* launch a kernel through its pointer and report the launch status (a host-side emulation used to
 * test the index maps without a GPU defines TOPS_EMU and its own tops_launch) */
template <typename... KArgs, typename... Args>
static cudaError_t tops_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, cudaStream_t stream,
                               Args... args) {
    kernel<<<grid, block, 0, stream>>>(args...);
    return cudaGetLastError();
}
#endif

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1 << 20; /* grid-stride loops cover the rest */

/* TOPS_AWQ_REVERSE = {0,4,1,5,2,6,3,7} and TOPS_AWQ_ORDER = {0,2,4,6,1,3,5,7} as nibble tables */
__host__ __device__ constexpr int awq_reverse(int j) { return (int)((0x73625140u >> (4 * j)) & 0xFu); }
__host__ __device__ constexpr int awq_order(int i) { return (int)((0x75316420u >> (4 * i)) & 0xFu); }

inline unsigned grid_for(int64_t work, int64_t per_block) {
    int64_t b = (work + per_block - 1) / per_block;
    if (b < 1) b = 1;
    if (b > kMaxBlocks) b = kMaxBlocks;
    return (unsigned)b;
}

inline bool aligned(const void *p, uintptr_t a) { return ((uintptr_t)p & (a - 1)) == 0; }

inline int status_of(cudaError_t e) { return e == cudaSuccess ? TOPS_OK : TOPS_ERR_CUDA; }

/* a / b and a % b for non-negative a, positive b; 32-bit path when both fit */
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t &rem) {
    if ((((uint64_t)a | (uint64_t)b) >> 32) == 0) {
        const uint32_t q = (uint32_t)a / (uint32_t)b;
        rem = (int64_t)((uint32_t)a - q * (uint32_t)b);
        return (int64_t)q;
    }
    const int64_t q = a / b;
    rem = a - q * b;
    return q;
}

__device__ __forceinline__ int64_t grid_start() {
    return (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return (int64_t)gridDim.x * blockDim.x; }

/* ================================================================================================
 * 8x8 nibble transpose: w[r] nibble c  ->  w[c] nibble r.  Three delta-swap stages, one per index
 * bit (they commute): 16-bit halves between words r and r+4, bytes between r and r+2, nibbles
 * between r and r+1.
 * ============================================================================================== */
__device__ __forceinline__ void transpose8x8(uint32_t (&w)[8]) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const uint32_t x = w[r], y = w[r + 4];
        w[r] = __byte_perm(x, y, 0x5410);     /* x.lo16 | y.lo16 << 16 */
        w[r + 4] = __byte_perm(x, y, 0x7632); /* x.hi16 | y.hi16 << 16 */
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int r = (q & 1) + ((q >> 1) << 2); /* 0, 1, 4, 5 */
        const uint32_t x = w[r], y = w[r + 2];
        w[r] = __byte_perm(x, y, 0x6240);     /* bytes x0 y0 x2 y2 */
        w[r + 2] = __byte_perm(x, y, 0x7351); /* bytes x1 y1 x3 y3 */
    }
#pragma unroll
    for (int r = 0; r < 8; r += 2) {
        const uint32_t x = w[r], y = w[r + 1];
        w[r] = (x & 0x0F0F0F0Fu) | ((y << 4) & 0xF0F0F0F0u);
        w[r + 1] = ((x >> 4) & 0x0F0F0F0Fu) | (y & 0xF0F0F0F0u);
    }
}

__device__ __forceinline__ uint32_t comp(const uint4 &v, int b) {
    return b == 0 ? v.x : b == 1 ? v.y : b == 2 ? v.z : v.w;
}

/* ================================================================================================
 * AWQ <-> GPTQ qweight, vector path: N % 32 == 0, src and dst 16-byte aligned.
 * AWQ src [K, N/8] words = [K, nc4] uint4 with nc4 = N/32; GPTQ [K/8, N] = [K/8, 8*nc4] uint4.
 * Warp item (kb, cw): rows 8kb..8kb+7, AWQ uint4 columns c4 = 32cw + lane (lane < nvalid).
 * Lane's GPTQ words: row kb, columns 32*c4 .. 32*c4+31 = 8 uint4 "chunks", chunk 2b+h holding
 * output words 4h..4h+3 of 8x8 block b (AWQ column 4*c4 + b). Chunk i of lane t is kept at
 * smem slot t*8 + (i ^ (t & 7)).
 * ============================================================================================== */
constexpr int kRepackWarps = kThreads / 32;

__device__ __forceinline__ int swz(int owner, int i) { return owner * 8 + (i ^ (owner & 7)); }

__global__ void __launch_bounds__(kThreads, 4) awq_to_gptq_vec_kernel(uint4 *__restrict__ dst,
                                                                   const uint4 *__restrict__ src,
                                                                   int64_t kblocks, int64_t nc4) {
    __shared__ uint4 smem[kRepackWarps][256];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint4 *sw = smem[warp];
    const int64_t nchunk = (nc4 + 31) >> 5;
    const int64_t items = kblocks * nchunk;
    for (int64_t it = (int64_t)blockIdx.x * kRepackWarps + warp; it < items;
         it += (int64_t)gridDim.x * kRepackWarps) {
        int64_t cw;
        const int64_t kb = divmod(it, nchunk, cw);
        const int64_t left = nc4 - cw * 32;
        const int nvalid = left < 32 ? (int)left : 32;
        if (lane < nvalid) {
            const uint4 *s = src + kb * 8 * nc4 + cw * 32 + lane;
            uint4 in[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) in[j] = s[j * nc4];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                uint32_t w[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) w[j] = comp(in[j], b);
                transpose8x8(w); /* w[i] nibble j = AWQ row j nibble i = column awq_order(i) */
                /* GPTQ word m = column m = w[awq_reverse(m)] */
                sw[swz(lane, 2 * b)] = make_uint4(w[0], w[4], w[1], w[5]);
                sw[swz(lane, 2 * b + 1)] = make_uint4(w[2], w[6], w[3], w[7]);
            }
        }
        __syncwarp();
        uint4 *d = dst + kb * 8 * nc4 + cw * 256;
#pragma unroll
        for (int r = 0; r < 8; ++r) {
            const int p = r * 32 + lane, owner = p >> 3;
            if (owner < nvalid) d[p] = sw[swz(owner, p & 7)];
        }
        __syncwarp();
    }
}

__global__ void __launch_bounds__(kThreads, 3) gptq_to_awq_vec_kernel(uint4 *__restrict__ dst,
                                                                   const uint4 *__restrict__ src,
                                                                   int64_t kblocks, int64_t nc4) {
    __shared__ uint4 smem[kRepackWarps][256];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint4 *sw = smem[warp];
    const int64_t nchunk = (nc4 + 31) >> 5;
    const int64_t items = kblocks * nchunk;
    for (int64_t it = (int64_t)blockIdx.x * kRepackWarps + warp; it < items;
         it += (int64_t)gridDim.x * kRepackWarps) {
        int64_t cw;
        const int64_t kb = divmod(it, nchunk, cw);
        const int64_t left = nc4 - cw * 32;
        const int nvalid = left < 32 ? (int)left : 32;
        {
            const uint4 *s = src + kb * 8 * nc4 + cw * 256;
            uint4 v[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const int p = r * 32 + lane;
                if ((p >> 3) < nvalid) v[r] = s[p];
            }
#pragma unroll
            for (int r = 0; r < 8; ++r) {
                const int p = r * 32 + lane, owner = p >> 3;
                if (owner < nvalid) sw[swz(owner, p & 7)] = v[r];
            }
        }
        __syncwarp();
        if (lane < nvalid) {
            uint32_t out[8][4]; /* [AWQ row j][block b] */
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const uint4 lo = sw[swz(lane, 2 * b)], hi = sw[swz(lane, 2 * b + 1)];
                /* GPTQ words d0..d7 = lo.x lo.y lo.z lo.w hi.x hi.y hi.z hi.w; t_i = d_{awq_order(i)} */
                uint32_t w[8] = {lo.x, lo.z, hi.x, hi.z, lo.y, lo.w, hi.y, hi.w};
                transpose8x8(w); /* w[j] nibble i = t_i nibble j = GPTQ column awq_order(i), row j */
#pragma unroll
                for (int j = 0; j < 8; ++j) out[j][b] = w[j];
            }
            uint4 *d = dst + kb * 8 * nc4 + cw * 32 + lane;
#pragma unroll
            for (int j = 0; j < 8; ++j)
                d[j * nc4] = make_uint4(out[j][0], out[j][1], out[j][2], out[j][3]);
        }
        __syncwarp();
    }
}

/* scalar fallback: one thread per 8x8 block (kb, c), c in [0, N/8) */
template <bool TO_GPTQ>
__global__ void __launch_bounds__(kThreads) repack_scalar_kernel(uint32_t *__restrict__ dst,
                                                                 const uint32_t *__restrict__ src,
                                                                 int64_t kblocks, int64_t nc) {
    const int64_t total = kblocks * nc;
    const int64_t N = nc * 8;
    for (int64_t item = grid_start(); item < total; item += grid_stride()) {
        int64_t c;
        const int64_t kb = divmod(item, nc, c);
        uint32_t w[8];
        if (TO_GPTQ) {
#pragma unroll
            for (int j = 0; j < 8; ++j) w[j] = src[(kb * 8 + j) * nc + c];
            transpose8x8(w);
#pragma unroll
            for (int m = 0; m < 8; ++m) dst[kb * N + c * 8 + m] = w[awq_reverse(m)];
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) w[i] = src[kb * N + c * 8 + awq_order(i)];
            transpose8x8(w);
#pragma unroll
            for (int j = 0; j < 8; ++j) dst[(kb * 8 + j) * nc + c] = w[j];
        }
    }
}

/* k-interleaved qweight (tops_prepack_w4a16): one thread per 32-k block and column, four words
 * in, four out (consecutive threads: consecutive columns of each row) */
template <bool INVERSE>
__global__ void __launch_bounds__(kThreads) prepack_w4a16_kernel(uint32_t *__restrict__ dst,
                                                                 const uint32_t *__restrict__ src,
                                                                 int64_t blocks, int64_t N) {
    for (int64_t item = grid_start(); item < blocks * N; item += grid_stride()) {
        int64_t n;
        const int64_t b = divmod(item, N, n);
        const int64_t o = 4 * b * N + n;
        const uint32_t w[4] = {src[o], src[o + N], src[o + 2 * N], src[o + 3 * N]};
        uint32_t r4[4] = {0u, 0u, 0u, 0u};
#pragma unroll
        for (int t = 0; t < 4; ++t)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                if (!INVERSE) { /* byte t of GPTQ word r -> nibbles r, r + 4 of word t */
                    const uint32_t by = (w[r] >> (8 * t)) & 0xFFu;
                    r4[t] |= (by & 15u) << (4 * r) | (by >> 4) << (4 * (r + 4));
                } else {
                    const uint32_t lo = (w[t] >> (4 * r)) & 15u, hi = (w[t] >> (4 * (r + 4))) & 15u;
                    r4[r] |= (lo | hi << 4) << (8 * t);
                }
            }
#pragma unroll
        for (int r = 0; r < 4; ++r) dst[o + r * N] = r4[r];
    }
}

int launch_repack(bool to_gptq, int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                  void *stream) {
    if (K < 0 || N < 0 || K % 8 != 0 || N % 8 != 0) return TOPS_ERR_ARG;
    if (K == 0 || N == 0) return TOPS_OK;
    if (!dst || !src) return TOPS_ERR_ARG;
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t kblocks = K / 8;
    cudaError_t e;
    if (N % 32 == 0 && aligned(dst, 16) && aligned(src, 16)) {
        const int64_t nc4 = N / 32;
        const int64_t items = kblocks * ((nc4 + 31) / 32);
        const unsigned grid = grid_for(items, kRepackWarps);
        if (to_gptq)
            e = tops_launch(awq_to_gptq_vec_kernel, dim3(grid), dim3(kThreads), s, (uint4 *)dst,
                            (const uint4 *)src, kblocks, nc4);
        else
            e = tops_launch(gptq_to_awq_vec_kernel, dim3(grid), dim3(kThreads), s, (uint4 *)dst,
                            (const uint4 *)src, kblocks, nc4);
    } else {
        const int64_t nc = N / 8;
        const unsigned grid = grid_for(kblocks * nc, kThreads);
        if (to_gptq)
            e = tops_launch(repack_scalar_kernel<true>, dim3(grid), dim3(kThreads), s,
                            (uint32_t *)dst, (const uint32_t *)src, kblocks, nc);
        else
            e = tops_launch(repack_scalar_kernel<false>, dim3(grid), dim3(kThreads), s,
                            (uint32_t *)dst, (const uint32_t *)src, kblocks, nc);
    }
    return status_of(e);
}

/* ================================================================================================
 * Word-wise ops (qzeros AWQ <-> GPTQ, GPTQ zeros v1 <-> v2 for bits dividing 32)
 * ============================================================================================== */
/* nibble m of the result = nibble awq_reverse(m) of x (AWQ order -> sequential) */
__device__ __forceinline__ uint32_t awq_unshuffle(uint32_t x) {
    uint32_t r = 0;
#pragma unroll
    for (int m = 0; m < 8; ++m) r |= ((x >> (4 * awq_reverse(m))) & 0xFu) << (4 * m);
    return r;
}
/* nibble i of the result = nibble awq_order(i) of x (sequential -> AWQ order) */
__device__ __forceinline__ uint32_t awq_shuffle(uint32_t x) {
    uint32_t r = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) r |= ((x >> (4 * awq_order(i))) & 0xFu) << (4 * i);
    return r;
}

/* every BITS-wide field f (BITS divides 32) becomes (f + 1) & mask or (f - 1) & mask, no carries */
template <int BITS>
struct FieldMasks {
    static constexpr uint32_t ones = BITS == 2 ? 0x55555555u : BITS == 4 ? 0x11111111u : 0x01010101u;
    static constexpr uint32_t high = ones << (BITS - 1);
};
template <int BITS>
__device__ __forceinline__ uint32_t fields_inc(uint32_t x) {
    constexpr uint32_t H = FieldMasks<BITS>::high, O = FieldMasks<BITS>::ones;
    return ((x & ~H) + O) ^ (x & H);
}
template <int BITS>
__device__ __forceinline__ uint32_t fields_dec(uint32_t x) {
    constexpr uint32_t H = FieldMasks<BITS>::high, O = FieldMasks<BITS>::ones;
    return ((x | H) - O) ^ (~x & H);
}

struct OpAwqToGptqZeros {
    bool v1;
    __device__ __forceinline__ uint32_t operator()(uint32_t x) const {
        const uint32_t s = awq_unshuffle(x);
        return v1 ? fields_dec<4>(s) : s;
    }
};
struct OpGptqToAwqZeros {
    bool v1;
    __device__ __forceinline__ uint32_t operator()(uint32_t x) const {
        return awq_shuffle(v1 ? fields_inc<4>(x) : x);
    }
};
template <int BITS>
struct OpFieldAdd {
    bool inc;
    __device__ __forceinline__ uint32_t operator()(uint32_t x) const {
        return inc ? fields_inc<BITS>(x) : fields_dec<BITS>(x);
    }
};

/* dst[i] = op(src[i]) for i < n; VEC: both 16-byte aligned, uint4 body + scalar tail */
template <class Op, bool VEC>
__global__ void __launch_bounds__(kThreads) wordwise_kernel(uint32_t *__restrict__ dst,
                                                            const uint32_t *__restrict__ src,
                                                            int64_t n, Op op) {
    int64_t done = 0;
    if (VEC) {
        const int64_t n4 = n >> 2;
        const uint4 *s4 = (const uint4 *)src;
        uint4 *d4 = (uint4 *)dst;
        for (int64_t i = grid_start(); i < n4; i += grid_stride()) {
            const uint4 v = s4[i];
            d4[i] = make_uint4(op(v.x), op(v.y), op(v.z), op(v.w));
        }
        done = n4 << 2;
    }
    for (int64_t i = done + grid_start(); i < n; i += grid_stride()) dst[i] = op(src[i]);
}

template <class Op>
int launch_wordwise(uint32_t *dst, const uint32_t *src, int64_t n, Op op, cudaStream_t s) {
    cudaError_t e;
    if (aligned(dst, 16) && aligned(src, 16))
        e = tops_launch(wordwise_kernel<Op, true>, dim3(grid_for((n + 3) / 4, kThreads)),
                        dim3(kThreads), s, dst, src, n, op);
    else
        e = tops_launch(wordwise_kernel<Op, false>, dim3(grid_for(n, kThreads)), dim3(kThreads), s,
                        dst, src, n, op);
    return status_of(e);
}

/* 3-bit GPTQ zeros: one thread per (row, word triple); a triple holds fields 32t .. 32t+31 of the
 * row's stream; a partial last triple (1 or 2 words) holds floor(nw * 32 / 3) fields, its padding
 * bits are copied unchanged */
__global__ void __launch_bounds__(kThreads) zeros3_kernel(uint32_t *__restrict__ dst,
                                                          const uint32_t *__restrict__ src,
                                                          int64_t rows, int64_t row_words,
                                                          uint32_t delta) {
    const int64_t ntrip = (row_words + 2) / 3;
    const int64_t total = rows * ntrip;
    for (int64_t item = grid_start(); item < total; item += grid_stride()) {
        int64_t t;
        const int64_t row = divmod(item, ntrip, t);
        const int64_t base = row * row_words + t * 3;
        const int64_t left = row_words - t * 3;
        const int nw = left < 3 ? (int)left : 3;
        const int nf = (nw * 32) / 3; /* 10, 21 or 32 */
        uint32_t w[3];
#pragma unroll
        for (int x = 0; x < 3; ++x) w[x] = x < nw ? src[base + x] : 0u;
#pragma unroll
        for (int f = 0; f < 32; ++f) {
            if (f < nf) {
                const int p = 3 * f, x = p >> 5, off = p & 31;
                uint32_t v = w[x] >> off;
                if (off > 29) v |= w[x + 1] << (32 - off);
                v = (v + delta) & 7u;
                if (off > 29) {
                    w[x] = (w[x] & ((1u << off) - 1u)) | (v << off);
                    const uint32_t hm = (1u << (off - 29)) - 1u; /* bits of the field in w[x+1] */
                    w[x + 1] = (w[x + 1] & ~hm) | (v >> (32 - off));
                } else {
                    w[x] = (w[x] & ~(7u << off)) | (v << off);
                }
            }
        }
#pragma unroll
        for (int x = 0; x < 3; ++x)
            if (x < nw) dst[base + x] = w[x];
    }
}

/* ================================================================================================
 * Generic pack / unpack. Values [outer, len, inner] (uint8) <-> words [outer, nwords, inner].
 * A "group" is GV values filling GW whole words (W = 8*WB bits each); group t = o*ngroups + g
 * starts at value t*GV*inner and word t*GW*inner (+ i along inner).
 * Modes: SCALAR one thread per (t, i), strided byte/word accesses;
 *        INNER1 inner == 1: one thread per t, the GV bytes loaded / stored with vectors;
 *        IV4    inner % 4 == 0: one thread per (t, 4 consecutive i), uint32 byte-quads and
 *               uint4 (WB 4) / uint32 (WB 1) word-quads.
 * ============================================================================================== */
enum { MODE_SCALAR = 0, MODE_INNER1 = 1, MODE_IV4 = 2 };

template <int BITS, int WB, bool AWQ>
struct PackGeom {
    static constexpr int W = 8 * WB;
    static constexpr int GV = (W % BITS == 0) ? W / BITS : W; /* 3-bit: W values in 3 words */
    static constexpr int GW = GV * BITS / W;
    static constexpr uint32_t MASK = (1u << BITS) - 1u;
    __host__ __device__ static constexpr int pos(int j) { return AWQ ? 4 * awq_reverse(j) : BITS * j; }
};

template <int BITS, int WB, bool AWQ>
__device__ __forceinline__ void pack_group(const uint32_t (&v)[PackGeom<BITS, WB, AWQ>::GV],
                                           uint32_t (&acc)[PackGeom<BITS, WB, AWQ>::GW]) {
    using G = PackGeom<BITS, WB, AWQ>;
#pragma unroll
    for (int x = 0; x < G::GW; ++x) acc[x] = 0;
#pragma unroll
    for (int j = 0; j < G::GV; ++j) {
        const uint32_t val = v[j] & G::MASK;
        const int p = G::pos(j), x = p / G::W, off = p % G::W;
        acc[x] |= val << off;
        if (off + BITS > G::W) acc[x + 1] |= val >> (G::W - off);
    }
}

template <int BITS, int WB, bool AWQ>
__device__ __forceinline__ void unpack_group(const uint32_t (&acc)[PackGeom<BITS, WB, AWQ>::GW],
                                             uint32_t (&v)[PackGeom<BITS, WB, AWQ>::GV]) {
    using G = PackGeom<BITS, WB, AWQ>;
#pragma unroll
    for (int j = 0; j < G::GV; ++j) {
        const int p = G::pos(j), x = p / G::W, off = p % G::W;
        uint32_t val = acc[x] >> off;
        if (off + BITS > G::W) val |= acc[x + 1] << (G::W - off);
        v[j] = val & G::MASK;
    }
}

/* NB contiguous bytes at p (aligned to min(NB, 16)) into little-endian words */
template <int NB>
__device__ __forceinline__ void load_bytes(const uint8_t *p, uint32_t (&w)[(NB + 3) / 4]) {
    if constexpr (NB >= 16) {
#pragma unroll
        for (int q = 0; q < NB / 16; ++q) {
            const uint4 v = ((const uint4 *)p)[q];
            w[4 * q] = v.x, w[4 * q + 1] = v.y, w[4 * q + 2] = v.z, w[4 * q + 3] = v.w;
        }
    } else if constexpr (NB == 8) {
        const uint2 v = *(const uint2 *)p;
        w[0] = v.x, w[1] = v.y;
    } else if constexpr (NB == 4) {
        w[0] = *(const uint32_t *)p;
    } else {
        w[0] = 0;
#pragma unroll
        for (int b = 0; b < NB; ++b) w[0] |= (uint32_t)p[b] << (8 * b);
    }
}
template <int NB>
__device__ __forceinline__ void store_bytes(uint8_t *p, const uint32_t (&w)[(NB + 3) / 4]) {
    if constexpr (NB >= 16) {
#pragma unroll
        for (int q = 0; q < NB / 16; ++q)
            ((uint4 *)p)[q] = make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
    } else if constexpr (NB == 8) {
        *(uint2 *)p = make_uint2(w[0], w[1]);
    } else if constexpr (NB == 4) {
        *(uint32_t *)p = w[0];
    } else {
#pragma unroll
        for (int b = 0; b < NB; ++b) p[b] = (uint8_t)(w[0] >> (8 * b));
    }
}

template <int WB>
__device__ __forceinline__ uint32_t load_word(const void *p, int64_t i) {
    if constexpr (WB == 4) return ((const uint32_t *)p)[i];
    else return ((const uint8_t *)p)[i];
}
template <int WB>
__device__ __forceinline__ void store_word(void *p, int64_t i, uint32_t v) {
    if constexpr (WB == 4) ((uint32_t *)p)[i] = v;
    else ((uint8_t *)p)[i] = (uint8_t)v;
}

/* pack: total = groups_total * inner_units, inner_units = inner (SCALAR), 1 (INNER1), inner/4 (IV4) */
template <int BITS, int WB, bool AWQ, int MODE>
__global__ void __launch_bounds__(kThreads) pack_kernel(void *__restrict__ dst,
                                                        const uint8_t *__restrict__ src,
                                                        int64_t total, int64_t inner, int64_t units) {
    using G = PackGeom<BITS, WB, AWQ>;
    for (int64_t item = grid_start(); item < total; item += grid_stride()) {
        if constexpr (MODE == MODE_INNER1) {
            uint32_t raw[(G::GV + 3) / 4];
            load_bytes<G::GV>(src + item * G::GV, raw);
            uint32_t v[G::GV], acc[G::GW];
#pragma unroll
            for (int j = 0; j < G::GV; ++j) v[j] = (raw[j >> 2] >> (8 * (j & 3))) & 0xFFu;
            pack_group<BITS, WB, AWQ>(v, acc);
#pragma unroll
            for (int x = 0; x < G::GW; ++x) store_word<WB>(dst, item * G::GW + x, acc[x]);
        } else if constexpr (MODE == MODE_SCALAR) {
            int64_t i;
            const int64_t t = divmod(item, units, i);
            const uint8_t *s = src + t * G::GV * inner + i;
            uint32_t v[G::GV], acc[G::GW];
#pragma unroll
            for (int j = 0; j < G::GV; ++j) v[j] = s[j * inner];
            pack_group<BITS, WB, AWQ>(v, acc);
#pragma unroll
            for (int x = 0; x < G::GW; ++x) store_word<WB>(dst, (t * G::GW + x) * inner + i, acc[x]);
        } else { /* IV4 */
            int64_t i4;
            const int64_t t = divmod(item, units, i4);
            const int64_t i = i4 * 4;
            const uint8_t *s = src + t * G::GV * inner + i;
            uint32_t quad[G::GV];
#pragma unroll
            for (int j = 0; j < G::GV; ++j) quad[j] = *(const uint32_t *)(s + j * inner);
            uint32_t acc[4][G::GW];
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                uint32_t v[G::GV];
#pragma unroll
                for (int j = 0; j < G::GV; ++j) v[j] = (quad[j] >> (8 * b)) & 0xFFu;
                pack_group<BITS, WB, AWQ>(v, acc[b]);
            }
#pragma unroll
            for (int x = 0; x < G::GW; ++x) {
                const int64_t o = (t * G::GW + x) * inner + i;
                if constexpr (WB == 4)
                    *(uint4 *)((uint32_t *)dst + o) = make_uint4(acc[0][x], acc[1][x], acc[2][x], acc[3][x]);
                else
                    *(uint32_t *)((uint8_t *)dst + o) = (acc[0][x] & 0xFFu) | ((acc[1][x] & 0xFFu) << 8) |
                                                       ((acc[2][x] & 0xFFu) << 16) | (acc[3][x] << 24);
            }
        }
    }
}

template <int BITS, int WB, bool AWQ, int MODE>
__global__ void __launch_bounds__(kThreads) unpack_kernel(uint8_t *__restrict__ dst,
                                                          const void *__restrict__ src,
                                                          int64_t total, int64_t inner, int64_t units) {
    using G = PackGeom<BITS, WB, AWQ>;
    for (int64_t item = grid_start(); item < total; item += grid_stride()) {
        if constexpr (MODE == MODE_INNER1) {
            uint32_t acc[G::GW], v[G::GV];
#pragma unroll
            for (int x = 0; x < G::GW; ++x) acc[x] = load_word<WB>(src, item * G::GW + x);
            unpack_group<BITS, WB, AWQ>(acc, v);
            uint32_t raw[(G::GV + 3) / 4];
#pragma unroll
            for (int q = 0; q < (G::GV + 3) / 4; ++q) raw[q] = 0;
#pragma unroll
            for (int j = 0; j < G::GV; ++j) raw[j >> 2] |= v[j] << (8 * (j & 3));
            store_bytes<G::GV>(dst + item * G::GV, raw);
        } else if constexpr (MODE == MODE_SCALAR) {
            int64_t i;
            const int64_t t = divmod(item, units, i);
            uint32_t acc[G::GW], v[G::GV];
#pragma unroll
            for (int x = 0; x < G::GW; ++x) acc[x] = load_word<WB>(src, (t * G::GW + x) * inner + i);
            unpack_group<BITS, WB, AWQ>(acc, v);
            uint8_t *d = dst + t * G::GV * inner + i;
#pragma unroll
            for (int j = 0; j < G::GV; ++j) d[j * inner] = (uint8_t)v[j];
        } else { /* IV4 */
            int64_t i4;
            const int64_t t = divmod(item, units, i4);
            const int64_t i = i4 * 4;
            uint32_t acc[4][G::GW];
#pragma unroll
            for (int x = 0; x < G::GW; ++x) {
                const int64_t o = (t * G::GW + x) * inner + i;
                if constexpr (WB == 4) {
                    const uint4 q = *(const uint4 *)((const uint32_t *)src + o);
                    acc[0][x] = q.x, acc[1][x] = q.y, acc[2][x] = q.z, acc[3][x] = q.w;
                } else {
                    const uint32_t q = *(const uint32_t *)((const uint8_t *)src + o);
#pragma unroll
                    for (int b = 0; b < 4; ++b) acc[b][x] = (q >> (8 * b)) & 0xFFu;
                }
            }
            uint32_t quad[G::GV];
#pragma unroll
            for (int j = 0; j < G::GV; ++j) quad[j] = 0;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                uint32_t v[G::GV];
                unpack_group<BITS, WB, AWQ>(acc[b], v);
#pragma unroll
                for (int j = 0; j < G::GV; ++j) quad[j] |= v[j] << (8 * b);
            }
            uint8_t *d = dst + t * G::GV * inner + i;
#pragma unroll
            for (int j = 0; j < G::GV; ++j) *(uint32_t *)(d + j * inner) = quad[j];
        }
    }
}

template <int BITS, int WB, bool AWQ>
int launch_pack_t(bool pack, void *words, uint8_t *values, int64_t groups_total, int64_t inner,
                  cudaStream_t s) {
    using G = PackGeom<BITS, WB, AWQ>;
    constexpr uintptr_t vec_align = G::GV < 16 ? G::GV : 16;
    cudaError_t e;
    if (inner == 1 && aligned(values, vec_align)) {
        const int64_t total = groups_total;
        const unsigned grid = grid_for(total, kThreads);
        if (pack)
            e = tops_launch(pack_kernel<BITS, WB, AWQ, MODE_INNER1>, dim3(grid), dim3(kThreads), s,
                            words, (const uint8_t *)values, total, inner, (int64_t)1);
        else
            e = tops_launch(unpack_kernel<BITS, WB, AWQ, MODE_INNER1>, dim3(grid), dim3(kThreads), s,
                            values, (const void *)words, total, inner, (int64_t)1);
    } else if (inner % 4 == 0 && aligned(values, 4) && aligned(words, WB == 4 ? 16 : 4)) {
        const int64_t units = inner / 4, total = groups_total * units;
        const unsigned grid = grid_for(total, kThreads);
        if (pack)
            e = tops_launch(pack_kernel<BITS, WB, AWQ, MODE_IV4>, dim3(grid), dim3(kThreads), s,
                            words, (const uint8_t *)values, total, inner, units);
        else
            e = tops_launch(unpack_kernel<BITS, WB, AWQ, MODE_IV4>, dim3(grid), dim3(kThreads), s,
                            values, (const void *)words, total, inner, units);
    } else {
        const int64_t total = groups_total * inner;
        const unsigned grid = grid_for(total, kThreads);
        if (pack)
            e = tops_launch(pack_kernel<BITS, WB, AWQ, MODE_SCALAR>, dim3(grid), dim3(kThreads), s,
                            words, (const uint8_t *)values, total, inner, inner);
        else
            e = tops_launch(unpack_kernel<BITS, WB, AWQ, MODE_SCALAR>, dim3(grid), dim3(kThreads), s,
                            values, (const void *)words, total, inner, inner);
    }
    return status_of(e);
}

template <int WB>
int launch_pack_bits(bool pack, void *words, uint8_t *values, int64_t groups_total, int64_t inner,
                     int bits, bool awq, cudaStream_t s) {
    switch (bits) {
    case 1: return launch_pack_t<1, WB, false>(pack, words, values, groups_total, inner, s);
    case 2: return launch_pack_t<2, WB, false>(pack, words, values, groups_total, inner, s);
    case 3: return launch_pack_t<3, WB, false>(pack, words, values, groups_total, inner, s);
    case 4:
        if constexpr (WB == 4) {
            if (awq) return launch_pack_t<4, 4, true>(pack, words, values, groups_total, inner, s);
        }
        return launch_pack_t<4, WB, false>(pack, words, values, groups_total, inner, s);
    case 8: return launch_pack_t<8, WB, false>(pack, words, values, groups_total, inner, s);
    default: return TOPS_ERR_ARG;
    }
}

/* values per group (whole words), words per group; 0 when (bits, word_bytes) is unsupported */
inline int64_t group_values(int bits, int word_bytes) {
    if (word_bytes != 1 && word_bytes != 4) return 0;
    if (bits != 1 && bits != 2 && bits != 3 && bits != 4 && bits != 8) return 0;
    const int W = 8 * word_bytes;
    return W % bits == 0 ? W / bits : W;
}
inline bool order_valid(int order, int bits, int word_bytes) {
    if (order == TOPS_ORDER_SEQUENTIAL) return true;
    return order == TOPS_ORDER_AWQ && bits == 4 && word_bytes == 4;
}

/* ================================================================================================
 * quanto pack_v2 / unpack_v2. Derived from seed 001: with U the uint8 [N, K] input and D the int16
 * [N/4, K] output, for r < N/4, kc < K/64, i < 4, h < 2, j < 8:
 *   D[r, 64kc + 16i + 8h + j] = sum_{e<4} U[4r + i, 64kc + 32h + 8e + j] << 4e
 * One thread per 8 consecutive int16 of D (index q = r*K/8 + 8kc + 2i + h): 32 source bytes.
 * ============================================================================================== */
__device__ __forceinline__ int64_t v2_src_offset(int64_t q, int64_t k8, int64_t K) {
    int64_t rem;
    const int64_t r = divmod(q, k8, rem);
    const int64_t kc = rem >> 3;
    const int64_t i = (rem >> 1) & 3, h = rem & 1;
    return (4 * r + i) * K + 64 * kc + 32 * h;
}

/* 32 source bytes as words w[0..7] -> 8 int16 as words o[0..3] */
__device__ __forceinline__ void v2_pack8(const uint32_t (&w)[8], uint32_t (&o)[4]) {
    const uint32_t M = 0x0F0F0F0Fu;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const uint32_t lo = (w[half] & M) | ((w[2 + half] & M) << 4);     /* bytes j: e=0 | e=1 */
        const uint32_t hi = (w[4 + half] & M) | ((w[6 + half] & M) << 4); /* bytes j: e=2 | e=3 */
        o[2 * half] = __byte_perm(lo, hi, 0x5140);
        o[2 * half + 1] = __byte_perm(lo, hi, 0x7362);
    }
}
__device__ __forceinline__ void v2_unpack8(const uint32_t (&o)[4], uint32_t (&w)[8]) {
    const uint32_t M = 0x0F0F0F0Fu;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const uint32_t lo = __byte_perm(o[2 * half], o[2 * half + 1], 0x6420);
        const uint32_t hi = __byte_perm(o[2 * half], o[2 * half + 1], 0x7531);
        w[half] = lo & M;
        w[2 + half] = (lo >> 4) & M;
        w[4 + half] = hi & M;
        w[6 + half] = (hi >> 4) & M;
    }
}

constexpr int kV2Unroll = 2;

template <bool VEC>
__global__ void __launch_bounds__(kThreads) pack_v2_kernel(uint16_t *__restrict__ dst,
                                                           const uint8_t *__restrict__ src,
                                                           int64_t total, int64_t K,
                                                           int32_t *__restrict__ out_of_range) {
    const int64_t k8 = K >> 3;
    uint32_t seen = 0; /* OR of every input byte: a high nibble set means a value > 15 */
    const int64_t step = (int64_t)gridDim.x * kThreads * kV2Unroll;
    for (int64_t base = (int64_t)blockIdx.x * kThreads * kV2Unroll + threadIdx.x; base < total;
         base += step) {
        uint32_t w[kV2Unroll][8];
#pragma unroll
        for (int u = 0; u < kV2Unroll; ++u) {
            const int64_t q = base + u * kThreads;
            if (q < total) {
                const uint8_t *s = src + v2_src_offset(q, k8, K);
                if (VEC) {
                    const uint4 a = ((const uint4 *)s)[0], b = ((const uint4 *)s)[1];
                    w[u][0] = a.x, w[u][1] = a.y, w[u][2] = a.z, w[u][3] = a.w;
                    w[u][4] = b.x, w[u][5] = b.y, w[u][6] = b.z, w[u][7] = b.w;
                } else {
#pragma unroll
                    for (int x = 0; x < 8; ++x)
                        w[u][x] = (uint32_t)s[4 * x] | ((uint32_t)s[4 * x + 1] << 8) |
                                  ((uint32_t)s[4 * x + 2] << 16) | ((uint32_t)s[4 * x + 3] << 24);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kV2Unroll; ++u) {
            const int64_t q = base + u * kThreads;
            if (q < total) {
                uint32_t o[4];
#pragma unroll
                for (int x = 0; x < 8; ++x) seen |= w[u][x];
                v2_pack8(w[u], o);
                if (VEC) {
                    ((uint4 *)dst)[q] = make_uint4(o[0], o[1], o[2], o[3]);
                } else {
#pragma unroll
                    for (int x = 0; x < 4; ++x) {
                        dst[8 * q + 2 * x] = (uint16_t)o[x];
                        dst[8 * q + 2 * x + 1] = (uint16_t)(o[x] >> 16);
                    }
                }
            }
        }
    }
    /* checked in the same pass as the packing: no extra read of the input */
    if (out_of_range && (seen & 0xF0F0F0F0u)) atomicOr(out_of_range, 1);
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) unpack_v2_kernel(uint8_t *__restrict__ dst,
                                                             const uint16_t *__restrict__ src,
                                                             int64_t total, int64_t K) {
    const int64_t k8 = K >> 3;
    const int64_t step = (int64_t)gridDim.x * kThreads * kV2Unroll;
    for (int64_t base = (int64_t)blockIdx.x * kThreads * kV2Unroll + threadIdx.x; base < total;
         base += step) {
        uint32_t o[kV2Unroll][4];
#pragma unroll
        for (int u = 0; u < kV2Unroll; ++u) {
            const int64_t q = base + u * kThreads;
            if (q < total) {
                if (VEC) {
                    const uint4 a = ((const uint4 *)src)[q];
                    o[u][0] = a.x, o[u][1] = a.y, o[u][2] = a.z, o[u][3] = a.w;
                } else {
#pragma unroll
                    for (int x = 0; x < 4; ++x)
                        o[u][x] = (uint32_t)src[8 * q + 2 * x] | ((uint32_t)src[8 * q + 2 * x + 1] << 16);
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kV2Unroll; ++u) {
            const int64_t q = base + u * kThreads;
            if (q < total) {
                uint32_t w[8];
                v2_unpack8(o[u], w);
                uint8_t *d = dst + v2_src_offset(q, k8, K);
                if (VEC) {
                    ((uint4 *)d)[0] = make_uint4(w[0], w[1], w[2], w[3]);
                    ((uint4 *)d)[1] = make_uint4(w[4], w[5], w[6], w[7]);
                } else {
#pragma unroll
                    for (int x = 0; x < 32; ++x) d[x] = (uint8_t)(w[x >> 2] >> (8 * (x & 3)));
                }
            }
        }
    }
}

int launch_v2(bool pack, int16_t *packed, uint8_t *unpacked, int64_t N, int64_t K,
              int32_t *out_of_range, void *stream) {
    if (N < 0 || K < 0 || N % 4 != 0 || K % 64 != 0) return TOPS_ERR_ARG;
    if (N == 0 || K == 0) return TOPS_OK;
    if (!packed || !unpacked) return TOPS_ERR_ARG;
    cudaStream_t s = (cudaStream_t)stream;
    const int64_t total = (N / 4) * (K / 8);
    const unsigned grid = grid_for(total, (int64_t)kThreads * kV2Unroll);
    const bool vec = aligned(packed, 16) && aligned(unpacked, 16);
    cudaError_t e;
    if (pack)
        e = vec ? tops_launch(pack_v2_kernel<true>, dim3(grid), dim3(kThreads), s, (uint16_t *)packed,
                              (const uint8_t *)unpacked, total, K, out_of_range)
                : tops_launch(pack_v2_kernel<false>, dim3(grid), dim3(kThreads), s,
                              (uint16_t *)packed, (const uint8_t *)unpacked, total, K,
                              out_of_range);
    else
        e = vec ? tops_launch(unpack_v2_kernel<true>, dim3(grid), dim3(kThreads), s, unpacked,
                              (const uint16_t *)packed, total, K)
                : tops_launch(unpack_v2_kernel<false>, dim3(grid), dim3(kThreads), s, unpacked,
                              (const uint16_t *)packed, total, K);
    return status_of(e);
}

/* ================================================================================================
 * dequantize: out [N, K] row-major. One thread per (n, 32 consecutive k): consecutive threads take
 * consecutive n, so qweight / scales / zeros loads are coalesced; each thread writes 32 contiguous
 * outputs (64 or 128 bytes, int4 stores when aligned).
 *   GPTQ: the 32 values are BITS whole words of column n (rows kc*BITS ..).
 *   AWQ:  one word per k (qweight[k, n/8]), nibble awq_reverse(n % 8).
 * ============================================================================================== */
struct DqParams {
    const uint32_t *qweight;
    const uint32_t *qzeros; /* NULL: symmetric */
    const void *scales;
    const int32_t *g_idx; /* NULL: k / group_size (always NULL for AWQ) */
    void *out;
    int64_t K, N, group_size;
    int64_t qrows;     /* GPTQ qweight rows: ceil(K*bits/32) */
    int64_t zrow_words; /* words per qzeros row */
    int scales_dtype;
    int zero_v1;
    int vec; /* out 16-byte aligned and rows a multiple of 16 bytes */
};

__device__ __forceinline__ float load_scale(const void *p, int dtype, int64_t i) {
    if (dtype == TOPS_F16) return __half2float(__ushort_as_half(((const unsigned short *)p)[i]));
    if (dtype == TOPS_BF16)
        return __bfloat162float(__ushort_as_bfloat16(((const unsigned short *)p)[i]));
    return ((const float *)p)[i];
}

template <int OUT>
__device__ __forceinline__ uint32_t out_bits(float v) {
    if constexpr (OUT == TOPS_F16) return __half_as_ushort(__float2half_rn(v));
    else if constexpr (OUT == TOPS_BF16) return __bfloat16_as_ushort(__float2bfloat16_rn(v));
    else return __float_as_uint(v);
}

/* scale and zero point of (group g, column n); out of line: called only when the group changes */
template <int BITS, bool AWQ>
__device__ __noinline__ float2 fetch_scale_zero(const void *scales, int scales_dtype,
                                                 const uint32_t *qzeros, int64_t zrow_words,
                                                 int zero_v1, int64_t N, int64_t g, int64_t n) {
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    const float s = load_scale(scales, scales_dtype, g * N + n);
    int z;
    if (!qzeros) {
        z = 1 << (BITS - 1);
    } else if constexpr (AWQ) {
        const uint32_t zw = qzeros[g * zrow_words + (n >> 3)];
        z = (int)((zw >> (4 * awq_reverse((int)(n & 7)))) & 0xFu);
    } else {
        const int64_t bit = n * BITS;
        const int64_t wi = g * zrow_words + (bit >> 5);
        const int off = (int)(bit & 31);
        uint32_t f = qzeros[wi] >> off;
        if (BITS == 3 && off > 29) f |= qzeros[wi + 1] << (32 - off);
        f &= MASK;
        if (zero_v1) f = (f + 1u) & MASK;
        z = (int)f;
    }
    return make_float2(s, (float)z);
}

/* BITS 2/3/4/8 with AWQ false: GPTQ; BITS 4 with AWQ true: AWQ */
template <int BITS, bool AWQ, int OUT>
__global__ void __launch_bounds__(kThreads) dequant_kernel(DqParams p) {
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    constexpr int OB = OUT == TOPS_F32 ? 4 : 2; /* output bytes */
    const int64_t nkc = (p.K + 31) >> 5;
    const int64_t total = nkc * p.N;
    for (int64_t item = grid_start(); item < total; item += grid_stride()) {
        int64_t n;
        const int64_t kc = divmod(item, p.N, n);
        const int64_t k0 = kc * 32;
        const int64_t kleft = p.K - k0;
        const int kn = kleft < 32 ? (int)kleft : 32;

        uint32_t q[32];
        if constexpr (AWQ) {
            const int64_t nc = p.N >> 3;
            const uint32_t *src = p.qweight + k0 * nc + (n >> 3);
            const int sh = 4 * awq_reverse((int)(n & 7));
#pragma unroll
            for (int i = 0; i < 32; ++i) q[i] = i < kn ? (src[i * nc] >> sh) & 0xFu : 0u;
        } else {
            uint32_t w[BITS];
#pragma unroll
            for (int r = 0; r < BITS; ++r) {
                const int64_t row = kc * BITS + r;
                w[r] = row < p.qrows ? p.qweight[row * p.N + n] : 0u;
            }
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int b = BITS * i, x = b >> 5, off = b & 31;
                uint32_t v = w[x] >> off;
                if (off + BITS > 32) v |= w[x + 1] << (32 - off);
                q[i] = v & MASK;
            }
        }

        /* group of each k: g_idx[k], or k / group_size tracked incrementally */
        int64_t gcur = 0, gnext = 0;
        if (!p.g_idx) {
            gcur = k0 / p.group_size;
            gnext = (gcur + 1) * p.group_size;
        }
        int64_t g = -1;
        float2 sz = make_float2(0.f, 0.f);
        uint32_t ow[OB == 2 ? 16 : 32];
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            if (i < kn) {
                const int64_t k = k0 + i;
                int64_t gk;
                if (p.g_idx) {
                    gk = p.g_idx[k];
                } else {
                    if (k >= gnext) {
                        ++gcur;
                        gnext += p.group_size;
                    }
                    gk = gcur;
                }
                if (gk != g) {
                    g = gk;
                    sz = fetch_scale_zero<BITS, AWQ>(p.scales, p.scales_dtype, p.qzeros, p.zrow_words,
                                                     p.zero_v1, p.N, g, n);
                }
                /* (q - z) is a small integer, exact in fp32: the product is s * (float)(q - z) */
                const float v = sz.x * ((float)q[i] - sz.y);
                const uint32_t bits = out_bits<OUT>(v);
                if constexpr (OB == 2) {
                    if (i & 1) ow[i >> 1] |= bits << 16;
                    else ow[i >> 1] = bits;
                } else {
                    ow[i] = bits;
                }
            }
        }

        if (p.vec && kn == 32) {
            uint4 *d = (uint4 *)((uint8_t *)p.out + (n * p.K + k0) * OB);
#pragma unroll
            for (int x = 0; x < (OB == 2 ? 4 : 8); ++x)
                d[x] = make_uint4(ow[4 * x], ow[4 * x + 1], ow[4 * x + 2], ow[4 * x + 3]);
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                if (i < kn) {
                    const int64_t o = n * p.K + k0 + i;
                    if constexpr (OB == 2)
                        ((unsigned short *)p.out)[o] = (unsigned short)(ow[i >> 1] >> (16 * (i & 1)));
                    else
                        ((uint32_t *)p.out)[o] = ow[i];
                }
            }
        }
    }
}

template <int BITS, bool AWQ>
int launch_dequant_t(const DqParams &p, int out_dtype, cudaStream_t s) {
    const int64_t total = ((p.K + 31) / 32) * p.N;
    const unsigned grid = grid_for(total, kThreads);
    cudaError_t e;
    switch (out_dtype) {
    case TOPS_F16:
        e = tops_launch(dequant_kernel<BITS, AWQ, TOPS_F16>, dim3(grid), dim3(kThreads), s, p);
        break;
    case TOPS_BF16:
        e = tops_launch(dequant_kernel<BITS, AWQ, TOPS_BF16>, dim3(grid), dim3(kThreads), s, p);
        break;
    default:
        e = tops_launch(dequant_kernel<BITS, AWQ, TOPS_F32>, dim3(grid), dim3(kThreads), s, p);
        break;
    }
    return status_of(e);
}

inline bool dtype_valid(int d) { return d == TOPS_F32 || d == TOPS_F16 || d == TOPS_BF16; }

} // namespace

/* ================================================================================================
 * launchers
 * ============================================================================================== */
extern "C" {

int tops_cuda_pack(void *dst, const uint8_t *src, int64_t outer, int64_t len, int64_t inner,
                   int bits, int word_bytes, int order, void *stream) {
    const int64_t gv = group_values(bits, word_bytes);
    if (gv == 0 || !order_valid(order, bits, word_bytes)) return TOPS_ERR_ARG;
    if (outer < 0 || len < 0 || inner < 0 || len % gv != 0) return TOPS_ERR_ARG;
    if (outer == 0 || len == 0 || inner == 0) return TOPS_OK;
    if (!dst || !src) return TOPS_ERR_ARG;
    const int64_t groups_total = outer * (len / gv);
    cudaStream_t s = (cudaStream_t)stream;
    const bool awq = order == TOPS_ORDER_AWQ;
    if (word_bytes == 4)
        return launch_pack_bits<4>(true, dst, (uint8_t *)src, groups_total, inner, bits, awq, s);
    return launch_pack_bits<1>(true, dst, (uint8_t *)src, groups_total, inner, bits, awq, s);
}

int tops_cuda_unpack(uint8_t *dst, const void *src, int64_t outer, int64_t nwords, int64_t inner,
                     int bits, int word_bytes, int order, void *stream) {
    const int64_t gv = group_values(bits, word_bytes);
    if (gv == 0 || !order_valid(order, bits, word_bytes)) return TOPS_ERR_ARG;
    const int64_t gw = gv * bits / (8 * word_bytes); /* 3 for 3-bit, 1 otherwise */
    if (outer < 0 || nwords < 0 || inner < 0 || nwords % gw != 0) return TOPS_ERR_ARG;
    if (outer == 0 || nwords == 0 || inner == 0) return TOPS_OK;
    if (!dst || !src) return TOPS_ERR_ARG;
    const int64_t groups_total = outer * (nwords / gw);
    cudaStream_t s = (cudaStream_t)stream;
    const bool awq = order == TOPS_ORDER_AWQ;
    if (word_bytes == 4)
        return launch_pack_bits<4>(false, (void *)src, dst, groups_total, inner, bits, awq, s);
    return launch_pack_bits<1>(false, (void *)src, dst, groups_total, inner, bits, awq, s);
}

int tops_cuda_awq_to_gptq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                                  void *stream) {
    return launch_repack(true, dst, src, K, N, stream);
}

int tops_cuda_gptq_to_awq_qweight(int32_t *dst, const int32_t *src, int64_t K, int64_t N,
                                  void *stream) {
    return launch_repack(false, dst, src, K, N, stream);
}

int tops_cuda_awq_to_gptq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords,
                                 int zero_format, void *stream) {
    if (nwords < 0 || (zero_format != TOPS_ZEROS_V1 && zero_format != TOPS_ZEROS_V2))
        return TOPS_ERR_ARG;
    if (nwords == 0) return TOPS_OK;
    if (!dst || !src) return TOPS_ERR_ARG;
    return launch_wordwise((uint32_t *)dst, (const uint32_t *)src, nwords,
                           OpAwqToGptqZeros{zero_format == TOPS_ZEROS_V1}, (cudaStream_t)stream);
}

int tops_cuda_gptq_to_awq_qzeros(int32_t *dst, const int32_t *src, int64_t nwords,
                                 int zero_format, void *stream) {
    if (nwords < 0 || (zero_format != TOPS_ZEROS_V1 && zero_format != TOPS_ZEROS_V2))
        return TOPS_ERR_ARG;
    if (nwords == 0) return TOPS_OK;
    if (!dst || !src) return TOPS_ERR_ARG;
    return launch_wordwise((uint32_t *)dst, (const uint32_t *)src, nwords,
                           OpGptqToAwqZeros{zero_format == TOPS_ZEROS_V1}, (cudaStream_t)stream);
}

int tops_cuda_convert_gptq_zeros(int32_t *dst, const int32_t *src, int64_t rows,
                                 int64_t row_words, int bits, int delta, void *stream) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return TOPS_ERR_ARG;
    if (delta != 1 && delta != -1) return TOPS_ERR_ARG;
    if (rows < 0 || row_words < 0) return TOPS_ERR_ARG;
    if (rows == 0 || row_words == 0) return TOPS_OK;
    if (!dst || !src) return TOPS_ERR_ARG;
    cudaStream_t s = (cudaStream_t)stream;
    uint32_t *d = (uint32_t *)dst;
    const uint32_t *sr = (const uint32_t *)src;
    const int64_t n = rows * row_words;
    const bool inc = delta == 1;
    switch (bits) {
    case 2: return launch_wordwise(d, sr, n, OpFieldAdd<2>{inc}, s);
    case 4: return launch_wordwise(d, sr, n, OpFieldAdd<4>{inc}, s);
    case 8: return launch_wordwise(d, sr, n, OpFieldAdd<8>{inc}, s);
    default: {
        const int64_t total = rows * ((row_words + 2) / 3);
        return status_of(tops_launch(zeros3_kernel, dim3(grid_for(total, kThreads)), dim3(kThreads),
                                     s, d, sr, rows, row_words, (uint32_t)delta));
    }
    }
}

int tops_cuda_pack_v2(int16_t *dst, const uint8_t *src, int64_t N, int64_t K,
                      int32_t *out_of_range, void *stream) {
    return launch_v2(true, dst, (uint8_t *)src, N, K, out_of_range, stream);
}

int tops_cuda_unpack_v2(uint8_t *dst, const int16_t *src, int64_t N, int64_t K, void *stream) {
    return launch_v2(false, (int16_t *)src, dst, N, K, nullptr, stream);
}

int tops_cuda_prepack_w4a16(int32_t *dst, const int32_t *src, int64_t K, int64_t N, int inverse,
                            void *stream) {
    if (K < 0 || N < 0 || K % 32 != 0) return TOPS_ERR_ARG;
    if (K == 0 || N == 0) return TOPS_OK;
    if (!dst || !src || dst == src) return TOPS_ERR_ARG;
    const int64_t blocks = K / 32;
    const cudaStream_t s = (cudaStream_t)stream;
    const unsigned grid = grid_for(blocks * N, kThreads);
    const cudaError_t e =
        inverse ? tops_launch(prepack_w4a16_kernel<true>, dim3(grid), dim3(kThreads), s, (uint32_t *)dst,
                              (const uint32_t *)src, blocks, N)
                : tops_launch(prepack_w4a16_kernel<false>, dim3(grid), dim3(kThreads), s, (uint32_t *)dst,
                              (const uint32_t *)src, blocks, N);
    return status_of(e);
}

int tops_cuda_dequantize(const tops_dequant_args *a, void *stream) {
    if (!a) return TOPS_ERR_ARG;
    const bool awq = a->format == TOPS_FORMAT_AWQ;
    if (a->format != TOPS_FORMAT_GPTQ && !awq) return TOPS_ERR_ARG;
    if (awq ? a->bits != 4 : (a->bits != 2 && a->bits != 3 && a->bits != 4 && a->bits != 8))
        return TOPS_ERR_ARG;
    if (a->K < 0 || a->N < 0 || a->groups < 0 || a->group_size <= 0) return TOPS_ERR_ARG;
    if (awq && a->N % 8 != 0) return TOPS_ERR_ARG;
    if (!dtype_valid(a->scales_dtype) || !dtype_valid(a->out_dtype)) return TOPS_ERR_ARG;
    if (!awq && a->qzeros && a->zero_format != TOPS_ZEROS_V1 && a->zero_format != TOPS_ZEROS_V2)
        return TOPS_ERR_ARG;
    if (a->K == 0 || a->N == 0) return TOPS_OK;
    /* groups computed as k / group_size must exist */
    const bool computed_g = awq || !a->g_idx;
    if (a->groups < 1 || (computed_g && (a->K - 1) / a->group_size >= a->groups)) return TOPS_ERR_ARG;
    if (!a->qweight || !a->scales || !a->out) return TOPS_ERR_ARG;

    DqParams p;
    p.qweight = (const uint32_t *)a->qweight;
    p.qzeros = (const uint32_t *)a->qzeros;
    p.scales = a->scales;
    p.g_idx = awq ? nullptr : a->g_idx;
    p.out = a->out;
    p.K = a->K;
    p.N = a->N;
    p.group_size = a->group_size;
    p.qrows = awq ? a->K : (a->K * a->bits + 31) / 32;
    p.zrow_words = awq ? a->N / 8 : (a->N * a->bits + 31) / 32;
    p.scales_dtype = a->scales_dtype;
    p.zero_v1 = (!awq && a->zero_format == TOPS_ZEROS_V1) ? 1 : 0;
    const int64_t ob = a->out_dtype == TOPS_F32 ? 4 : 2;
    p.vec = (aligned(a->out, 16) && (a->K * ob) % 16 == 0) ? 1 : 0;

    cudaStream_t s = (cudaStream_t)stream;
    if (awq) return launch_dequant_t<4, true>(p, a->out_dtype, s);
    switch (a->bits) {
    case 2: return launch_dequant_t<2, false>(p, a->out_dtype, s);
    case 3: return launch_dequant_t<3, false>(p, a->out_dtype, s);
    case 4: return launch_dequant_t<4, false>(p, a->out_dtype, s);
    default: return launch_dequant_t<8, false>(p, a->out_dtype, s);
    }
}

} /* extern "C" */

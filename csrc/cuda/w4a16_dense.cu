/*
 * w4a16_dense.cu - the large-batch route of the w4a16 linear: the weights of a chunk of output
 * columns are dequantised into a dense [K, n] matrix in the activation dtype, and the caller
 * multiplies x by it with the dense GEMM (cuBLAS, through torch: ../bindings/ops_cuda.cpp).
 *
 * Why: from M of a few thousand the product is bound by the tensor cores, where cuBLAS's GEMM is
 * ahead of the fused kernels (H100, 8192 x 8192, M = 4096: 858 us against 1,050), and the
 * dequantisation costs only K N (2.5 bytes of traffic) once per call, a few percent of the GEMM.
 * fp32 activations have no fused tensor-core kernel at all (w4a16_kernels.cu's CUDA-core
 * fallback), so they take this route from small M: dequantised fp32 weights and an fp32 GEMM
 * (TF32 only where torch allows it for matmuls).
 *
 * Numerics: each weight is s * (q - z) in fp32, rounded once to the activation dtype (what the
 * fused large-M kernels compute in their half2 fma), then an fp32-accumulating GEMM.
 */
#include <stdint.h>

#include <algorithm>

#include "w4a16_common.cuh"

namespace tops_w4 {

inline int g_dense_mode = -1; /* dev hook: -1 automatic, 0 never, 1 always */

/* When (the rule for other GPUs and for act-order; Hopper's plain groups: below): measured on an
 * H200 (graph timing, fifth session: bench_linear.py --dense-sweep), fused / dense / cuBLAS
 * alone, us:
 *   8192 x 8192    M = 1024 261 / 257 / 215,  M = 2048 529 / 472 / 419,  M = 4096 1,067 / 912 / 861
 *   4096 x 14336   M = 1024 269 / 239 / 194,  M = 2048 468 / 430 / 374,  M = 4096   940 / 786 / 741
 *   14336 x 4096   M = 1024 226 / 244 / 189,  M = 2048 462 / 420 / 360,  M = 4096   922 / 849 / 744
 * and at M = 512 the fused kernels were 11-29% ahead. fp32 x: the CUDA-core fallback is 9-17x
 * slower than the dense route at every M (8192 x 8192 M = 1: 1,495 against 161 us).
 * How: as few chunks as the scratch bound allows, of equal width. Splitting further, so that
 * more of the dequantisation overlaps a GEMM, was as often slower as faster (narrower GEMMs),
 * M = 4096, 4 chunks against 2: 14336 x 4096 765 / 849 us, 4096 x 14336 869 / 786,
 * 8192 x 8192 886 / 912. */
constexpr int64_t kDenseMinM = 2048, kDenseMinM_WideN = 1024; /* the latter where N >= K */
/* With the sm_90a wgmma kernels and plain groups (twelfth session, H200, --dense-sweep), M = 1024,
 * fused / dense / cuBLAS alone, us: 8192 x 8192 248 / 269 / 221, 4096 x 4096 64 / 69 / 58,
 * 8192 x 28672 869 / 923 / 790, 14336 x 4096 213 / 250 / 196, but 4096 x 14336 257 / 244 / 210,
 * whose 448 tiles of 256 x 128 make 3.4 waves on 132 SMs; at M = 2048 the dense route won on all
 * five (by 0.4-8%). So there: the dense route from M = 2048, and from M = 1024 only where the
 * fused grid's waves are less than 90% full (tiles / (waves x SMs)). */
constexpr int64_t kDenseMinM_Ragged = 1024;
constexpr double kFusedMinWaveFill = 0.9;

/* the fused kernel's tiles of M x N fill their waves to at least kFusedMinWaveFill (the 256 x 128
 * tiles the wgmma launcher takes from M = 256: w4a16_kernels.cu, choose_cfg) */
static bool fused_waves_full(int64_t M, int64_t N, int sms) {
    const int64_t tiles = ((M + 255) / 256) * ((N + 127) / 128);
    const int64_t waves = (tiles + sms - 1) / sms;
    return (double)tiles >= kFusedMinWaveFill * (double)(waves * sms);
}
constexpr int64_t kScratchBytes = 64ll << 20; /* a dequantised chunk at most this (or 256 columns) */
inline int64_t g_dense_scratch = kScratchBytes; /* dev hook: the bound above, to measure others */

struct DqKnParams {
    const int32_t *qw;   /* [K/8, N] */
    const void *sc;      /* [G, N], activation dtype */
    const int32_t *qz;   /* [G, N/8] or null */
    const int32_t *gidx; /* [K] or null */
    const int32_t *perm; /* [K] or null: a permutation, weight row k goes to row perm[k] of w */
    void *w;             /* [K, n] */
    int64_t K8, N, n0, n, gsize;
    int zmode;
    int kp; /* qweight k-interleaved: weight row k goes to its real k */
};

/* 4 consecutive elements <-> float4: fp16 / bf16 (bit patterns) through the traits of
 * w4a16_common.cuh, fp32 as is */
struct F32 {};
template <class T> struct Vec4 {
    using E = uint16_t;
    __device__ static float4 load(const uint16_t *p) {
        const uint2 v = *reinterpret_cast<const uint2 *>(p);
        return make_float4(T::to_f((uint16_t)v.x), T::to_f((uint16_t)(v.x >> 16)), T::to_f((uint16_t)v.y),
                           T::to_f((uint16_t)(v.y >> 16)));
    }
    __device__ static void store(uint16_t *p, float4 f) {
        *reinterpret_cast<uint2 *>(p) = make_uint2(T::from_f(f.x) | (uint32_t)T::from_f(f.y) << 16,
                                                   T::from_f(f.z) | (uint32_t)T::from_f(f.w) << 16);
    }
};
template <> struct Vec4<F32> {
    using E = float;
    __device__ static float4 load(const float *p) { return *reinterpret_cast<const float4 *>(p); }
    __device__ static void store(float *p, float4 f) { *reinterpret_cast<float4 *>(p) = f; }
};

/* One thread: one k-word (8 k) of 4 consecutive columns; a warp writes 128 columns of a row with
 * one store per thread (8 or 16 bytes), rows of the chunk n elements apart (with perm, row
 * perm[k]: the weights move to the activations they multiply, so x needs no gather; k-interleaved:
 * row perm[real k]). */
template <class T>
__global__ void __launch_bounds__(256) dequant_kn_kernel(const DqKnParams p) {
    using E = typename Vec4<T>::E;
    const int64_t quads = p.n >> 2;
    const int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= quads) return;
    const int64_t col = p.n0 + 4 * j; /* column in the layer */
    const E *sc = static_cast<const E *>(p.sc);
    E *w = static_cast<E *>(p.w);
    for (int64_t kw = blockIdx.y; kw < p.K8; kw += gridDim.y) {
        const int4 q = __ldg(reinterpret_cast<const int4 *>(p.qw + kw * p.N + col));
        const uint32_t qv[4] = {(uint32_t)q.x, (uint32_t)q.y, (uint32_t)q.z, (uint32_t)q.w};
        int4 rows[2] = {make_int4(0, 0, 0, 0), make_int4(0, 0, 0, 0)};
        if (p.perm && !p.kp) {
            rows[0] = __ldg(reinterpret_cast<const int4 *>(p.perm + kw * 8));
            rows[1] = __ldg(reinterpret_cast<const int4 *>(p.perm + kw * 8 + 4));
        }
        const int32_t prow[8] = {rows[0].x, rows[0].y, rows[0].z, rows[0].w, rows[1].x, rows[1].y, rows[1].z, rows[1].w};
        int64_t g_prev = -1;
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            const int64_t k = kw * 8 + i;
            const int64_t g = p.gidx ? (int64_t)__ldg(p.gidx + k) : k / p.gsize;
            if (g != g_prev) { /* once per k-word for groups of 8 and more */
                g_prev = g;
                s = Vec4<T>::load(sc + g * p.N + col);
                const uint32_t zw =
                    p.zmode ? (uint32_t)__ldg(p.qz + g * (p.N >> 3) + (col >> 3)) >> ((col & 4) * 4) : 0u;
                z = make_float4((float)zero_of(zw & 15u, p.zmode), (float)zero_of((zw >> 4) & 15u, p.zmode),
                                (float)zero_of((zw >> 8) & 15u, p.zmode), (float)zero_of((zw >> 12) & 15u, p.zmode));
            }
            const float4 v = make_float4(s.x * ((float)((qv[0] >> (4 * i)) & 15u) - z.x),
                                         s.y * ((float)((qv[1] >> (4 * i)) & 15u) - z.y),
                                         s.z * ((float)((qv[2] >> (4 * i)) & 15u) - z.z),
                                         s.w * ((float)((qv[3] >> (4 * i)) & 15u) - z.w));
            /* the weight's row: its k (k-interleaved: the real one), through perm if any */
            const int64_t kr = p.kp ? kp_real_k(kw, i) : k;
            const int64_t row = !p.perm ? kr : p.kp ? (int64_t)__ldg(p.perm + kr) : (int64_t)prow[i];
            Vec4<T>::store(w + row * p.n + 4 * j, v);
        }
    }
}

} // namespace tops_w4

using namespace tops_w4;

extern "C" {

/* development hook, not part of tops_cuda.h: the dense route -1 automatic, 0 never, 1 always
 * (where it applies). Used by benchmarks/w4a16_cuda_dev.py and the tests. */
void tops_cuda_w4a16_dev_dense(int mode) { g_dense_mode = mode < 0 ? -1 : (mode ? 1 : 0); }
/* development hook: the dense route's bound on a dequantised chunk, in bytes (<= 0: the default) */
void tops_cuda_w4a16_dev_dense_scratch(int64_t bytes) { g_dense_scratch = bytes > 0 ? bytes : kScratchBytes; }

int64_t tops_cuda_w4a16_dense_cols(const tops_w4a16_args *a) {
    if (a == nullptr || a->M <= 0 || a->K <= 0 || a->N <= 0 || (a->N & 7) || (a->K & 7)) return 0;
    if (g_dense_mode == 0) return 0;
    if (a->scales_dtype != a->x_dtype || a->out_dtype != a->x_dtype) return 0;
    if (a->x_dtype != TOPS_F32 && a->x_dtype != TOPS_F16 && a->x_dtype != TOPS_BF16) return 0;
    const int64_t esz = a->x_dtype == TOPS_F32 ? 4 : 2;
    /* the kernel's vector loads */
    if ((reinterpret_cast<uintptr_t>(a->qweight) & 15) || (reinterpret_cast<uintptr_t>(a->scales) & (4 * esz - 1)))
        return 0;
    if (g_dense_mode < 0 && a->x_dtype != TOPS_F32) {
        const DevInfo di = dev_info();
        if (di.major == 9 && di.minor == 0 && plain_groups(a) && wgmma_built()) {
            if (a->M < kDenseMinM && (a->M < kDenseMinM_Ragged || fused_waves_full(a->M, a->N, di.sms)))
                return 0;
        } else if (a->M < (a->N >= a->K ? kDenseMinM_WideN : kDenseMinM)) {
            return 0;
        }
    }
    const int64_t widest =
        std::min(a->N, std::max<int64_t>(256, g_dense_scratch / (a->K * esz) / 256 * 256));
    /* as many chunks as the bound needs, of equal width (a multiple of 256, so at most `widest`):
     * a narrow last chunk is a less efficient GEMM (14336 x 4096: 2,048 + 2,048 columns, not
     * 2,304 + 1,792) */
    const int64_t chunks = (a->N + widest - 1) / widest;
    return std::min(widest, ((a->N + chunks - 1) / chunks + 255) / 256 * 256);
}

int tops_cuda_w4a16_dequant_kn(const tops_w4a16_args *a, int64_t n0, int64_t n, void *w, void *stream) {
    if (a == nullptr || w == nullptr || n <= 0 || (n & 7) || (n0 & 7) || n0 < 0 || n0 + n > a->N) return TOPS_ERR_ARG;
    if ((a->K & 7) || a->group_size <= 0 || (reinterpret_cast<uintptr_t>(w) & 15)) return TOPS_ERR_ARG;
    if (reinterpret_cast<uintptr_t>(a->perm) & 15) return TOPS_ERR_ARG; /* read in 16-byte words */
    int zmode = 0;
    if (a->qzeros != nullptr) zmode = a->zero_format == TOPS_ZEROS_V1 ? 1 : 2;
    if (!kil_args_ok(a)) return TOPS_ERR_ARG;
    DqKnParams p{a->qweight, a->scales, a->qzeros, a->g_idx, a->perm, w, a->K >> 3, a->N, n0, n, a->group_size, zmode,
                 a->kinterleaved};
    const int64_t quads = n >> 2;
    const dim3 block(256), grid((unsigned)((quads + 255) / 256), (unsigned)std::min<int64_t>(p.K8, 65535));
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    switch (a->x_dtype) {
    case TOPS_F16: dequant_kn_kernel<F16><<<grid, block, 0, s>>>(p); break;
    case TOPS_BF16: dequant_kn_kernel<BF16><<<grid, block, 0, s>>>(p); break;
    case TOPS_F32: dequant_kn_kernel<F32><<<grid, block, 0, s>>>(p); break;
    default: return TOPS_ERR_ARG;
    }
    return cudaGetLastError() == cudaSuccess ? TOPS_OK : TOPS_ERR_CUDA;
}

} /* extern "C" */

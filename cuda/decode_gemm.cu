// decode_gemm.cu -- the decoding step's projections as skinny tensor-core GEMMs (batches of 2..256 rows), for
// bytemamba. Same semantics and options as gemv_step in decode_step.cu (bytemamba/ops/gemm.py holds the
// launcher; bytemamba/ops/step.py's gemv_fn is the reference of the options):
//
//   gemm_step: y[r, j] = sum_k W[j, k] * in[r, k] (+ bias[j])   for r < b, j < N
//     W (N, K) in_t contiguous: the mma "A" operand (16 output features x 16 k), streamed from HBM once per
//     batch tile; the batch rows are the mma "n" dimension (8 per n-tile, NT n-tiles = BN = 8 * NT rows per
//     tile, -DNT), accumulated in float32 by mma.sync.aligned.m16n8k16 (bf16 or fp16 inputs, -DIN_DTYPE 1 / 2;
//     float32 models keep the GEMV / cuBLAS paths: the launcher refuses them, and IN_DTYPE 0 compiles as bf16).
//   in:  x (b, K) rows (row stride xs), or NORM: in[r, k] = in_t(res[r, k] * inv_r * nw[k]),
//        inv_r = rsqrt(sum_p partial_in[r, p] / K + eps)  (the rounding of add_rmsnorm's output)
//   flags: 1 NORM (above); 2 CONV (in_proj: j < e: out = silu(conv step of channel j on in_t(y)), conv state
//          updated; j >= e: out = y); 4 RESID res[r, j] += y in place, partial_out[r, blockIdx.x] = the sum of
//          res[r, j]^2 over the cluster's output rows (one partial per row block); 8 F32 out is float32.
//
// Shapes and how it is launched (grid from bytemamba/ops/gemm.py, on PyTorch's current stream):
//   grid (ceil(N / MT), S, ceil(b / BN)), MT = 16 * WM output rows per CTA; a cluster of S CTAs (1, S, 1)
//   (launch attribute, S in 1, 2, 4, 8) splits K in S slices of kK = K / S; a CTA has WM x WK warps (runtime):
//   warp (wm, wk) owns output rows 16 wm .. 16 wm + 15 of the CTA and kw = kK / WK of its k slice, in passes of
//   up to 256 k held in registers. K must be a multiple of 32 * S * WK.
//   Per CTA: (1) every lane loads its weights of the first pass (16-byte loads, rows g and g + 8 of its warp's
//   16) BEFORE griddepcontrol.wait, so with programmatic dependent launch they stream while the previous kernel
//   drains; (2) the CTA stages its batch tile of the input slice, BN x kK in_t, in shared memory (NORM:
//   normalised from the float32 residual; else cp.async); (3) mma from registers (A) and shared memory (B);
//   (4) each CTA of the cluster owns R = MT / S of the tile's output rows: every warp pushes its float32
//   fragments into the owner's shared memory (remote stores, -DEPI=1, default; EPI 0: the tiles meet in the
//   CTA's own memory and the owners load them remotely), then the owner sums its rows over the S CTAs and WK
//   warps in a fixed order (deterministic) and runs the epilogue, EU outputs a thread with their loads in flight.
//   k order: inside each 32-wide k block, lane (g, t) (g = lane / 4, t = lane % 4) holds the 8 contiguous
//   elements 8t .. 8t + 7 of its two weight rows; mma k-step s of the block takes elements 8t + 4s .. 8t + 4s + 3
//   as the fragment's k = 2t, 2t + 1, 2t + 8, 2t + 9. The B fragments (batch row g of the n-tile) take the
//   same elements of the input row, so the product sums every k once (a permutation of k inside the block).
//   dynamic shared memory: BN x ldx in_t + WM * WK * 16 * (BN + 1) float (EPI 0: the max of the two, aliased)
//   (+ MT / S x BN float with RESID),
//   ldx = kK (+ 32 when kK % 64 == 0: rows 64 bytes apart modulo 128, conflict-free 16-byte fragment loads).

#if IN_DTYPE == 2
#include <cuda_fp16.h>
typedef __half in_t;
__device__ __forceinline__ float to_f(in_t v) { return __half2float(v); }
__device__ __forceinline__ in_t from_f(float v) { return __float2half(v); }
#define MMA_TYPE "f16"
#else
#include <cuda_bf16.h>
typedef __nv_bfloat16 in_t;
__device__ __forceinline__ float to_f(in_t v) { return __bfloat162float(v); }
__device__ __forceinline__ in_t from_f(float v) { return __float2bfloat16(v); }
#define MMA_TYPE "bf16"
#endif

#ifndef NT
#define NT 8                    // n-tiles of 8 batch rows per CTA: BN = 8 * NT rows
#endif
#define BN (8 * NT)
#define LDR (BN + 1)            // row stride of the float32 tiles in shared memory (odd: conflict-free reads)
#define UB 8                    // 32-wide k blocks a lane holds in registers per pass (256 k)
#define EU 4                    // epilogue outputs a thread handles at a time (their loads in flight together)
#ifndef EPI
#define EPI 1                   // cluster exchange: 1 push (remote stores into the owner), 0 pull (remote loads)
#endif

__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }

// One channel's causal-conv step, the arithmetic and order of conv_update in decode_step.cu.
__device__ __forceinline__ float conv_update(float* st, const float* wc, float bias, float xi, int k) {
    float acc = bias;
    for (int j = 0; j < k - 1; ++j) acc = fmaf(wc[j], st[j], acc);
    acc = fmaf(wc[k - 1], xi, acc);
    for (int j = 0; j + 1 < k - 1; ++j) st[j] = st[j + 1];
    st[k - 2] = xi;
    return acc;
}

__device__ __forceinline__ void grid_dep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void grid_dep_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// ---- cluster helpers (sm_90; with S == 1 none of them runs) --------------------------------------------
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
#endif
    return r;
}
__device__ __forceinline__ unsigned remote(const void* p, unsigned rank) {
    unsigned r = (unsigned)__cvta_generic_to_shared(p);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %0, %1;" : "+r"(r) : "r"(rank));
#endif
    return r;
}
__device__ __forceinline__ float ld_remote(unsigned addr) {
    float v = 0.f;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(addr) : "memory");
#endif
    return v;
}
__device__ __forceinline__ void st_remote(unsigned addr, float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
#endif
}
__device__ __forceinline__ void cluster_arrive(bool release) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (release) asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
    else asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// ---- tensor-core and async-copy primitives --------------------------------------------------------------
__device__ __forceinline__ void mma16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}
// 16 bytes global -> shared, zero-filled when !ok
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
    const unsigned d = (unsigned)__cvta_generic_to_shared(dst);
    const int n = ok ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;" ::: "memory");
}
__device__ __forceinline__ uint4 ldg_stream(const in_t* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

extern "C" __global__ void __launch_bounds__(256, 1) gemm_step(
    const in_t* __restrict__ W, const float* __restrict__ wbias, int N, int K,
    const in_t* __restrict__ x, long long xs,
    const float* __restrict__ res_in, const float* __restrict__ partial_in, int P_in,
    const float* __restrict__ nw, float eps,
    void* __restrict__ out, long long os,
    float* __restrict__ conv_state, const float* __restrict__ conv_w, const float* __restrict__ conv_b,
    int e, int kc,
    float* __restrict__ res_out, float* __restrict__ partial_out, int P_out,
    int b, int WM, int WK, int S, int ldx, int flags)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    in_t* xin = reinterpret_cast<in_t*>(smem_raw);           // (BN, ldx) input tile (k slice of this CTA)
    __shared__ float inv_s[BN];
    __shared__ float sq_in[8][BN];                            // RESID: the cluster's partial sums, per rank
    const int nthr = blockDim.x;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const int wm = warp % WM, wk = warp / WM;
    const int MT = 16 * WM;
    const unsigned rank = S > 1 ? cluster_rank() : 0u;
    const int kK = K / S, kw = kK / WK;
    const int kc0 = (int)rank * kK;                           // this CTA's k slice
    const int kwl = wk * kw;                                   // the warp's k range inside the slice
    const int row0 = blockIdx.x * MT + wm * 16;                // the warp's first output row
    const int n0 = blockIdx.z * BN;                            // the tile's first batch row
    const bool rA = row0 + g < N, rB = row0 + g + 8 < N;
    const in_t* wa = W + (long long)(rA ? row0 + g : 0) * K + kc0 + kwl + 8 * t4;
    const in_t* wb = W + (long long)(rB ? row0 + g + 8 : 0) * K + kc0 + kwl + 8 * t4;

    uint4 wr[UB][2];
    auto load_w = [&](int k0, int nb) {                        // blocks k0 / 32 .. of the warp's range
#pragma unroll
        for (int u = 0; u < UB; ++u) {
            const uint4 z = make_uint4(0u, 0u, 0u, 0u);
            wr[u][0] = (u < nb && rA) ? ldg_stream(wa + k0 + 32 * u) : z;
            wr[u][1] = (u < nb && rB) ? ldg_stream(wb + k0 + 32 * u) : z;
        }
    };
    load_w(0, min(UB, kw / 32));                               // weights: independent of the previous kernel
#if EPI == 1
    if (S > 1) cluster_arrive(false);                          // "started"; waited for before the first push
#endif
    grid_dep_wait();
    grid_dep_launch();
#if EPI == 1
    // RESID: the old residual of this thread's first EU epilogue outputs (see the epilogue's mapping), loaded now
    // with the input: it does not depend on the product, so the epilogue does not wait a round trip for it
    float res_pre[EU];
#pragma unroll
    for (int u = 0; u < EU; ++u) {
        const int Rp = MT / S, i = threadIdx.x + u * nthr;
        const int j = blockIdx.x * MT + (int)rank * Rp + i % Rp, nn = n0 + i / Rp;
        res_pre[u] = ((flags & 4) && i < Rp * BN && j < N && nn < b) ? res_out[(long long)nn * N + j] : 0.f;
    }
#endif

    // ---- the input tile: rows n0 .. n0 + BN - 1, k slice kc0 .. kc0 + kK - 1 -> xin (BN, ldx) ----------
    if (flags & 1) {
        // the residual rows: the first eight float4 a thread are loaded before the partial sums are read
        const int q4 = kK / 4, total = BN * q4;
        float4 v[8];
        auto load8 = [&](int i0) {
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = i0 + u * nthr, r = i / q4, k = kc0 + 4 * (i - r * q4);
                v[u] = (i < total && n0 + r < b)
                           ? __ldg(reinterpret_cast<const float4*>(res_in + (long long)(n0 + r) * K + k))
                           : make_float4(0.f, 0.f, 0.f, 0.f);
            }
        };
        load8(threadIdx.x);
        // inv rms of every row from its partial sums: a thread a row, all rows' loads in flight together (v2 had a
        // warp walk its rows one after another: a serial chain of loads behind the weights, ~8-30 us measured)
        for (int r = threadIdx.x; r < BN; r += nthr) {
            float s = 0.f;
            if (n0 + r < b) {
                const float* pp = partial_in + (long long)(n0 + r) * P_in;
#pragma unroll 8
                for (int p = 0; p < P_in; ++p) s += pp[p];
            }
            inv_s[r] = rsqrtf(s / (float)K + eps);
        }
        __syncthreads();
        for (int i0 = threadIdx.x; i0 < total; i0 += 8 * nthr) {
            if (i0 != (int)threadIdx.x) load8(i0);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = i0 + u * nthr, r = i / q4, kl = 4 * (i - r * q4);
                if (i < total) {
                    const float4 nv = __ldg(reinterpret_cast<const float4*>(nw + kc0 + kl));
                    const float inv = inv_s[r];
                    in_t* d = xin + r * ldx + kl;
                    d[0] = from_f(v[u].x * inv * nv.x); d[1] = from_f(v[u].y * inv * nv.y);
                    d[2] = from_f(v[u].z * inv * nv.z); d[3] = from_f(v[u].w * inv * nv.w);
                }
            }
        }
    } else {
        const int q8 = kK / 8, total = BN * q8;
        for (int i = threadIdx.x; i < total; i += nthr) {
            const int r = i / q8, kl = 8 * (i - r * q8);
            const bool ok = n0 + r < b;
            cp_async16(xin + r * ldx + kl, x + (ok ? (long long)(n0 + r) * xs + kc0 + kl : 0), ok);
        }
        cp_async_wait_all();
    }
    __syncthreads();

    // ---- mma: acc[nt] = the warp's 16 rows x batch rows 8 nt .. 8 nt + 7 --------------------------------
    float acc[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
    const in_t* xb = xin + g * ldx + kwl + 8 * t4;
    for (int k0 = 0; k0 < kw; k0 += 32 * UB) {
        const int nb = min(UB, (kw - k0) / 32);
        if (k0 > 0) load_w(k0, nb);
#pragma unroll
        for (int u = 0; u < UB; ++u) {
            if (u < nb) {
                const uint4 a = wr[u][0], c = wr[u][1];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    const uint4 bv = *reinterpret_cast<const uint4*>(xb + nt * 8 * ldx + k0 + 32 * u);
                    mma16816(acc[nt], a.x, c.x, a.y, c.y, bv.x, bv.y);
                    mma16816(acc[nt], a.z, c.z, a.w, c.w, bv.z, bv.w);
                }
            }
        }
    }
#if EPI == 1
    // ---- push: every warp's float32 fragments go to the CTA of the cluster that owns their rows (R = MT / S
    // rows each), into its recv (S, WK, R, LDR) at [this rank][wk]: remote stores, no round trips ------------
    const int R = MT / S;
    float* recv = reinterpret_cast<float*>(smem_raw + (size_t)BN * ldx * sizeof(in_t));
    {
        const int jA = wm * 16 + g, jB = jA + 8;
        const int oA = jA / R, oB = jB / R;
        const size_t offA = (((size_t)rank * WK + wk) * R + (jA - oA * R)) * LDR;
        const size_t offB = (((size_t)rank * WK + wk) * R + (jB - oB * R)) * LDR;
        if (S > 1) {
            cluster_wait();                                    // every CTA of the cluster has started
            const unsigned aA = remote(recv + offA, oA), aB = remote(recv + offB, oB);
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const unsigned c = 4u * (nt * 8 + 2 * t4);
                st_remote(aA + c, acc[nt][0]); st_remote(aA + c + 4, acc[nt][1]);
                st_remote(aB + c, acc[nt][2]); st_remote(aB + c + 4, acc[nt][3]);
            }
            cluster_arrive(true);                              // released: the owners may read them
            cluster_wait();
        } else {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int c = nt * 8 + 2 * t4;
                recv[offA + c] = acc[nt][0]; recv[offA + c + 1] = acc[nt][1];
                recv[offB + c] = acc[nt][2]; recv[offB + c + 1] = acc[nt][3];
            }
            __syncthreads();
        }
    }

    // ---- epilogue: this CTA's R rows x BN batch rows, EU outputs a thread at a time (loads batched) -------
    const int cnt = R * BN, jbase = (int)rank * R;
    float* vres = recv + (size_t)S * WK * R * LDR;            // RESID: the new residual values (cnt)
    const bool resid = flags & 4;
    for (int i0 = threadIdx.x; i0 < cnt; i0 += EU * nthr) {
        float y[EU];
        int jj[EU], nn[EU];
        bool ok[EU];
#pragma unroll
        for (int u = 0; u < EU; ++u) {
            const int i = i0 + u * nthr, jl = i % R, n = i / R;   // consecutive threads: consecutive outputs
            float sum = 0.f;
            if (i < cnt) {
                const float* p = recv + (size_t)jl * LDR + n;
                for (int q = 0; q < S * WK; ++q) sum += p[(size_t)q * R * LDR];   // ranks, then warps: fixed
            }
            jj[u] = blockIdx.x * MT + jbase + jl;
            nn[u] = n0 + n;
            ok[u] = i < cnt && jj[u] < N && nn[u] < b;
            y[u] = sum + ((ok[u] && wbias) ? wbias[jj[u]] : 0.f);
        }
        if (resid) {
            float old[EU];
#pragma unroll
            for (int u = 0; u < EU; ++u)
                old[u] = i0 == (int)threadIdx.x ? res_pre[u] : ok[u] ? res_out[(long long)nn[u] * N + jj[u]] : 0.f;
#pragma unroll
            for (int u = 0; u < EU; ++u)
                if (i0 + u * nthr < cnt) vres[i0 + u * nthr] = ok[u] ? old[u] + y[u] : 0.f;
            continue;
        }
        if (flags & 8) {
#pragma unroll
            for (int u = 0; u < EU; ++u)
                if (ok[u]) reinterpret_cast<float*>(out)[nn[u] * os + jj[u]] = y[u];
            continue;
        }
        in_t* o = reinterpret_cast<in_t*>(out);
        if ((flags & 2) && kc <= 4) {                          // conv step, d_conv <= 4: loads batched
            float st[EU][3], wc[EU][4], cbv[EU];
#pragma unroll
            for (int u = 0; u < EU; ++u) {
                const bool cv = ok[u] && jj[u] < e;
                const float* sp = conv_state + ((long long)nn[u] * e + jj[u]) * (kc - 1);
#pragma unroll
                for (int q = 0; q < 3; ++q) st[u][q] = (cv && q < kc - 1) ? sp[q] : 0.f;
#pragma unroll
                for (int q = 0; q < 4; ++q) wc[u][q] = (cv && q < kc) ? conv_w[(long long)jj[u] * kc + q] : 0.f;
                cbv[u] = (cv && conv_b) ? conv_b[jj[u]] : 0.f;
            }
#pragma unroll
            for (int u = 0; u < EU; ++u) {
                if (!ok[u]) continue;
                if (jj[u] >= e) { o[nn[u] * os + jj[u]] = from_f(y[u]); continue; }
                const float xi = to_f(from_f(y[u]));          // the conv input as stored in the unfused path
                float a = cbv[u];                             // conv_update's arithmetic and order
#pragma unroll
                for (int q = 0; q < 4; ++q) {
                    if (q < kc - 1) a = fmaf(wc[u][q], st[u][q], a);
                    else if (q == kc - 1) a = fmaf(wc[u][q], xi, a);
                }
                float* sp = conv_state + ((long long)nn[u] * e + jj[u]) * (kc - 1);
#pragma unroll
                for (int q = 0; q < 3; ++q)
                    if (q < kc - 1) sp[q] = q + 1 < kc - 1 ? st[u][q + 1] : xi;
                o[nn[u] * os + jj[u]] = from_f(silu_f(a));
            }
            continue;
        }
#pragma unroll
        for (int u = 0; u < EU; ++u) {
            if (!ok[u]) continue;
            if ((flags & 2) && jj[u] < e) {
                const float xi = to_f(from_f(y[u]));
                const float c = conv_update(conv_state + ((long long)nn[u] * e + jj[u]) * (kc - 1),
                                            conv_w + (long long)jj[u] * kc, conv_b ? conv_b[jj[u]] : 0.f, xi, kc);
                o[nn[u] * os + jj[u]] = from_f(silu_f(c));
            } else {
                o[nn[u] * os + jj[u]] = from_f(y[u]);
            }
        }
    }
    if (!resid) return;                                        // nobody reads this CTA's memory any more
    // RESID: per batch row, this CTA's sum of squares (its R rows, in order) -> rank 0's sq_in[rank]
    __syncthreads();
    for (int n = threadIdx.x; n < BN; n += nthr) {
        float sum = 0.f;
        for (int q = 0; q < R; ++q) { const float v = vres[n * R + q]; sum = fmaf(v, v, sum); }
        if (S > 1) st_remote(remote(&sq_in[rank][n], 0), sum);
        else sq_in[0][n] = sum;
    }
    if (S > 1) cluster_arrive(true);                          // the pushes are released; stores overlap the wait
    for (int i = threadIdx.x; i < cnt; i += nthr) {
        const int j = blockIdx.x * MT + jbase + i % R, nn_ = n0 + i / R;
        if (j < N && nn_ < b) res_out[(long long)nn_ * N + j] = vres[i];
    }
    if (S > 1) cluster_wait();
    else __syncthreads();
    if (rank == 0) {
        for (int n = threadIdx.x; n < BN; n += nthr) {
            float sum = 0.f;
            for (int r = 0; r < S; ++r) sum += sq_in[r][n];
            if (n0 + n < b) partial_out[(long long)(n0 + n) * P_out + blockIdx.x] = sum;
        }
    }
#else
    __syncthreads();                                           // xin is read by every warp: then reuse it
    float* red = reinterpret_cast<float*>(smem_raw);          // (warps, 16, LDR) after the mma (aliases xin)

    // ---- the warps' tiles -> shared memory, summed over the WK warps of a row group (into wk = 0) -------
    {
        float* rw = red + (size_t)warp * 16 * LDR;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const int c = nt * 8 + 2 * t4;
            rw[g * LDR + c] = acc[nt][0];
            rw[g * LDR + c + 1] = acc[nt][1];
            rw[(g + 8) * LDR + c] = acc[nt][2];
            rw[(g + 8) * LDR + c + 1] = acc[nt][3];
        }
    }
    if (WK > 1) {
        __syncthreads();
        for (int i = threadIdx.x; i < MT * BN; i += nthr) {
            const int jl = i / BN, n = i - jl * BN;
            float* d = red + ((size_t)(jl >> 4) * 16 + (jl & 15)) * LDR + n;
            float s = *d;
            for (int q = 1; q < WK; ++q) s += d[(size_t)q * WM * 16 * LDR];
            *d = s;
        }
    }
    if (S > 1) { cluster_arrive(true); cluster_wait(); }       // every CTA's tile complete, cluster-wide
    else __syncthreads();

    // ---- epilogue: this CTA's R = MT / S rows of the tile, summed over the cluster's S tiles -------------
    const int R = MT / S, cnt = R * BN;
    const int jbase = (int)rank * R;
    float* vres = reinterpret_cast<float*>(smem_raw + (size_t)max(BN * ldx * (int)sizeof(in_t),
                                                                   WM * WK * 16 * LDR * (int)sizeof(float)));
    const bool resid = flags & 4;
    for (int i = threadIdx.x; i < cnt; i += nthr) {
        const int jl = jbase + i % R, n = i / R;              // consecutive threads: consecutive outputs
        const float* src = red + ((size_t)(jl >> 4) * 16 + (jl & 15)) * LDR + n;
        float y = 0.f;
        if (S > 1) {
            float part[8];
#pragma unroll
            for (int r = 0; r < 8; ++r) part[r] = r < S ? ld_remote(remote(src, r)) : 0.f;
#pragma unroll
            for (int r = 0; r < 8; ++r) y += part[r];
        } else {
            y = *src;
        }
        const int j = blockIdx.x * MT + jl, nn = n0 + n;
        const bool mine = j < N && nn < b;
        if (mine && wbias) y += wbias[j];
        if (resid) {                                          // the new residual, stored after the exchange
            vres[i] = mine ? res_out[(long long)nn * N + j] + y : 0.f;
            continue;
        }
        if (!mine) continue;
        if (flags & 8) { reinterpret_cast<float*>(out)[nn * os + j] = y; continue; }
        in_t* o = reinterpret_cast<in_t*>(out);
        if ((flags & 2) && j < e) {
            const float xi = to_f(from_f(y));                 // the conv input as stored in the unfused path
            const float c = conv_update(conv_state + ((long long)nn * e + j) * (kc - 1), conv_w + (long long)j * kc,
                                        conv_b ? conv_b[j] : 0.f, xi, kc);
            o[nn * os + j] = from_f(silu_f(c));
            continue;
        }
        o[nn * os + j] = from_f(y);
    }
    if (!resid) {
        if (S > 1) { cluster_arrive(false); cluster_wait(); }  // keep this CTA's tile alive for the readers
        return;
    }
    // RESID: per batch row, this CTA's sum of squares (its R rows, in order) -> rank 0's sq_in[rank]
    __syncthreads();
    for (int n = threadIdx.x; n < BN; n += nthr) {
        float s = 0.f;
        for (int q = 0; q < R; ++q) { const float v = vres[n * R + q]; s = fmaf(v, v, s); }
        if (S > 1) st_remote(remote(&sq_in[rank][n], 0), s);
        else sq_in[0][n] = s;
    }
    if (S > 1) cluster_arrive(true);                          // the pushes are released; stores overlap the wait
    for (int i = threadIdx.x; i < cnt; i += nthr) {
        const int j = blockIdx.x * MT + jbase + i % R, nn = n0 + i / R;
        if (j < N && nn < b) res_out[(long long)nn * N + j] = vres[i];
    }
    if (S > 1) cluster_wait();
    else __syncthreads();
    if (rank == 0) {
        for (int n = threadIdx.x; n < BN; n += nthr) {
            float s = 0.f;
            for (int r = 0; r < S; ++r) s += sq_in[r][n];
            if (n0 + n < b) partial_out[(long long)(n0 + n) * P_out + blockIdx.x] = s;
        }
    }
#endif
}

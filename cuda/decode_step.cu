// decode_step.cu -- one decoding step of the Mamba mixer (one symbol per sequence), for bytemamba.
//
// What it computes (bytemamba/ops/step.py holds the PyTorch references of the same signatures):
//   conv_step    the depthwise causal conv's state update:  window = [state, x];  out = <window, w> + bias,
//                optional SiLU;  state <- window[1:]                              (state updated in place)
//   ssm_step     the selective state update (S6, ZOH for A):
//                  dt = dt_in (+ W_dt @ dt_low when the low-rank form is used) + dt_bias, optional softplus
//                  s  = exp(dt * A) * s + dt * x * B ;  y = <s, C> + D * x ;  y *= silu(z)
//                                                                                 (state updated in place)
//   add_rmsnorm  the residual stream between layers: residual (+= delta | = embedding[ids]);
//                out = residual * rsqrt(mean(residual^2) + eps) * w               (residual updated in place)
//
// Shapes (the Python wrapper owns layout; rows may be strided, the last dimension is contiguous):
//   x, z, dt, y, conv out: (b, e) rows of in_t, row strides given;  B, C: (b, n) in_t, row strides given
//   conv state (b, e, k-1) float32; ssm state (b, e, n) float32; conv w (e, k), bias (e); A (e, n);
//   D, dt_bias (e); W_dt (e, r): all float32 and contiguous.  residual (b, d) float32; delta, out (b, d)
//   in_t; embedding (256, d) float32; ids (b) int64; norm w (d) float32.
// Arithmetic is float32 throughout; in_t (-DIN_DTYPE: 0 float32, 1 bfloat16, 2 float16) is only storage.
//
// How it is launched (grids from bytemamba/ops/step.py, on PyTorch's current stream, so graph-capturable):
//   conv_step    one thread per (row, channel), 256 per block.
//   ssm_step_r<ROWS> (ROWS = 1, 2, 4 batch rows a block, chosen by the launcher per shape): LPC = NPADS/4
//                adjacent lanes per (row, channel), each owning 4 of its NSTATE states (-DNSTATE, padded to
//                NPADS, a power of two >= 4); the low-rank dt dot and <s, C> are reduce-scattered across the LPC
//                lanes with shuffles; 128 threads per block = 128 / LPC channels x ROWS batch rows (grid
//                ceil(e / (128 / LPC)) x ceil(b / ROWS)); dynamic shared memory ROWS x rp floats.
//   add_rmsnorm  one block of 256 threads per row.
//   gemv_step, embed_rows, sample_rows: see their sections below.
// Every kernel calls grid_dep_wait() before it reads activations or writes anything, so the launcher may use
// programmatic dependent launch (bytemamba/ops/step.py: by default for batches <= 8).

#if IN_DTYPE == 1
#include <cuda_bf16.h>
typedef __nv_bfloat16 in_t;
__device__ __forceinline__ float to_f(in_t v) { return __bfloat162float(v); }
__device__ __forceinline__ in_t from_f(float v) { return __float2bfloat16(v); }
#elif IN_DTYPE == 2
#include <cuda_fp16.h>
typedef __half in_t;
__device__ __forceinline__ float to_f(in_t v) { return __half2float(v); }
__device__ __forceinline__ in_t from_f(float v) { return __float2half(v); }
#else
typedef float in_t;
__device__ __forceinline__ float to_f(in_t v) { return v; }
__device__ __forceinline__ in_t from_f(float v) { return v; }
#endif

#ifndef NSTATE
#define NSTATE 16
#endif
// states padded to a power of two >= 4 so that a channel's lanes are a power of two dividing 32
#define NPADS (NSTATE <= 4 ? 4 : NSTATE <= 8 ? 8 : NSTATE <= 16 ? 16 : NSTATE <= 32 ? 32 : NSTATE <= 64 ? 64 : 128)
#define LPC (NPADS / 4)

__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }

// One channel's causal-conv step: window = [state (k-1 floats), x]; returns <window, w> + bias and shifts x
// into the state. Shared by conv_step and gemv_step's conv epilogue (same arithmetic, same order).
__device__ __forceinline__ float conv_update(float* st, const float* wc, float bias, float xi, int k) {
    float acc = bias;
    for (int j = 0; j < k - 1; ++j) acc = fmaf(wc[j], st[j], acc);
    acc = fmaf(wc[k - 1], xi, acc);
    for (int j = 0; j + 1 < k - 1; ++j) st[j] = st[j + 1];
    st[k - 2] = xi;
    return acc;
}

// Programmatic dependent launch (sm_90+): when the launcher sets the attribute (BYTEMAMBA_STEP_PDL), a kernel
// may start while the previous one finishes; it reads its weights first, then waits here for the previous
// grid's results. Without the attribute both are no-ops. Every kernel below waits in every thread before it
// reads activations or writes anything, so completion stays ordered along the stream.
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

// ------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) conv_step(
    const in_t* __restrict__ x, long long x_stride, float* __restrict__ state, const float* __restrict__ w,
    const float* __restrict__ bias, in_t* __restrict__ out, int b, int e, int k, int silu)
{
    grid_dep_wait();
    grid_dep_launch();
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)b * e) return;
    const int row = (int)(i / e), c = (int)(i % e);
    const float xi = to_f(x[row * x_stride + c]);
    const float acc = conv_update(state + i * (k - 1), w + (long long)c * k, bias ? bias[c] : 0.f, xi, k);
    out[row * (long long)e + c] = from_f(silu ? silu_f(acc) : acc);
}

// ------------------------------------------------------------------------------------------------
// ssm_step (v4): a block of SSM_T = 128 threads owns CPB = 128 / LPC adjacent channels (LPC lanes each, lane q
// holding states 4q .. 4q+3) and ROWS batch rows, ROWS a template parameter: kernels ssm_step_r1, _r2, _r4
// (the launcher picks one per (batch, channels)); grid ceil(e / CPB) x ceil(b / ROWS); dynamic shared memory
// ROWS x rp floats, rp = the rank r rounded up to chunks of 4 * LPC ranks (0 without the low-rank form).
// The order of work puts one memory latency, not a chain of them, before the arithmetic:
//   1. before the grid dependency wait: the lane's W_dt slice (ranks 4 LPC k + 4q .. +3 of chunks k < WCH:
//      16 floats), its 4 entries of A, dt_bias and D (none used before the states are loaded, so their
//      latency overlaps the states'; exp(dt A) is one ex2.approx of (dt log2 e) A);
//   2. after it: every row's 16-byte state slice (ROWS loads in flight a lane), then the block's rows of x, z
//      (or the full-rank dt), B, C and the low-rank dt, all loaded before any is stored into shared memory;
//   3. the dt dot of every row (W_dt from registers, dt_low as 16-byte shared loads), summed across the LPC
//      lanes by a reduce-scatter (each lane ends with the sums of ROWS / LPC rows), so + dt_bias and the
//      softplus run once per (row, channel), not once per lane; the results are gathered back by shuffles;
//   4. per row the update s = ex2(dt log2(e) A) s + dt x B, the state stored back (16 bytes a lane); <s, C>
//      reduce-scattered the same way: the lane owning a row adds D x, applies the z gate and writes y.
// Measured on the H200 (docs/PERF.md, "ssm_step v4"): 1 row a block is fastest while that gives <= 4 blocks an
// SM, 2 rows beyond (more rows: more registers, fewer warps, slower; states through shared memory by cp.async
// with up to 16 rows in flight a block: no faster).
// Ranks beyond WCH chunks (r > 16 LPC) read their W_dt from global memory inside the dot (general, slower).
#define SSM_T 128
#define CPB (SSM_T / LPC)
#define WCH 4
#define VEC4 (NSTATE % 4 == 0)
#define LOG2E_F 1.4426950408889634f

__device__ __forceinline__ float ex2_approx(float v) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
    return r;
}

__device__ __forceinline__ float4 zero4() { return make_float4(0.f, 0.f, 0.f, 0.f); }

// ranks j .. j+3 of a W_dt row, zero from r on (one 16-byte load when r % 4 == 0)
__device__ __forceinline__ float4 wdt4(const float* __restrict__ wrow, int j, int r, bool ok) {
    if (!ok || j >= r) return zero4();
    if ((r & 3) == 0) return __ldg(reinterpret_cast<const float4*>(wrow + j));
    return make_float4(wrow[j], j + 1 < r ? wrow[j + 1] : 0.f, j + 2 < r ? wrow[j + 2] : 0.f,
                       j + 3 < r ? wrow[j + 3] : 0.f);
}

// a lane's 4 states (zero in the padding past NSTATE)
__device__ __forceinline__ float4 state4_load(const float* p, int j, bool ok) {
    if (VEC4) return (ok && j < NSTATE) ? *reinterpret_cast<const float4*>(p) : zero4();
    return make_float4(ok && j < NSTATE ? p[0] : 0.f, ok && j + 1 < NSTATE ? p[1] : 0.f,
                       ok && j + 2 < NSTATE ? p[2] : 0.f, ok && j + 3 < NSTATE ? p[3] : 0.f);
}
__device__ __forceinline__ void state4_store(float* p, int j, bool ok, float4 v) {
    if (!ok || j >= NSTATE) return;
    if (VEC4) { *reinterpret_cast<float4*>(p) = v; return; }
    p[0] = v.x;
    if (j + 1 < NSTATE) p[1] = v.y;
    if (j + 2 < NSTATE) p[2] = v.z;
    if (j + 3 < NSTATE) p[3] = v.w;
}

// Sums v[0 .. ROWS) over the LPC lanes of a channel. Afterwards lane q holds in v[0 .. M) the sums of rows
// (q / G) M .. (q / G) M + M - 1, M = max(ROWS / LPC, 1), G = max(LPC / ROWS, 1) (G lanes hold each row).
template <int M, int O>
__device__ __forceinline__ void reduce_scatter(float* v, int q) {
    if constexpr (O > 0) {
        if constexpr (M > 1) {
            const bool hi = (q & O) != 0;
#pragma unroll
            for (int i = 0; i < M / 2; ++i) {
                const float send = hi ? v[i] : v[i + M / 2];
                const float keep = hi ? v[i + M / 2] : v[i];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, O, LPC);
            }
            reduce_scatter<M / 2, O / 2>(v, q);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], O, LPC);
            reduce_scatter<1, O / 2>(v, q);
        }
    }
}

template <int ROWS>
__device__ __forceinline__ void ssm_rows(
    float* __restrict__ state, const in_t* __restrict__ x, long long xs,
    const in_t* __restrict__ dt, long long dts, const float* __restrict__ wdt, int r,
    const float* __restrict__ dt_bias, const float* __restrict__ A,
    const in_t* __restrict__ B, long long bs, const in_t* __restrict__ C, long long cs,
    const float* __restrict__ D, const in_t* __restrict__ z, long long zs,
    in_t* __restrict__ y, int b, int e, int flags)
{
    constexpr int M = ROWS >= LPC ? ROWS / LPC : 1;      // rows a lane owns after the dt reduce-scatter
    constexpr int G = ROWS >= LPC ? 1 : LPC / ROWS;      // lanes that hold the same row
    constexpr int CH = 4 * LPC;                          // ranks per chunk (4 a lane)
    constexpr int NX = (ROWS * CPB + SSM_T - 1) / SSM_T; // staging trips: x / z / dt rows
    constexpr int NBC = (ROWS * NPADS + SSM_T - 1) / SSM_T;
    constexpr int NDT = (ROWS * WCH * CH + SSM_T - 1) / SSM_T;
    extern __shared__ float4 ssm_dyn_s[];
    float* dtl_s = reinterpret_cast<float*>(ssm_dyn_s);  // ROWS x rp: the rows' low-rank dt
    __shared__ __align__(16) float B_s[ROWS][NPADS];
    __shared__ __align__(16) float C_s[ROWS][NPADS];
    __shared__ float x_s[ROWS][CPB], z_s[ROWS][CPB], d_s[ROWS][CPB];
    const int cl = threadIdx.x / LPC, q = threadIdx.x % LPC;
    const int c0 = blockIdx.x * CPB, c = c0 + cl;
    const int row0 = blockIdx.y * ROWS;
    const int nrows = min(ROWS, b - row0);
    const bool valid = c < e;
    const int rp = wdt ? (r + CH - 1) / CH * CH : 0;
    const int nch = rp / CH;
    const float* wrow = wdt + (wdt ? (size_t)c * r : 0);

    // 1. parameters (not written by the previous kernels)
    float4 w[WCH];
#pragma unroll
    for (int k = 0; k < WCH; ++k) w[k] = wdt4(wrow, k * CH + 4 * q, r, wdt != nullptr && valid);
    const float4 a = state4_load(A + (size_t)c * NSTATE + 4 * q, 4 * q, valid);   // used only after the states
    const float bias = (dt_bias && valid) ? dt_bias[c] : 0.f;
    const float Dc = (D && valid) ? D[c] : 0.f;
    grid_dep_wait();
    grid_dep_launch();

    // 2. every row's states, then the block's inputs: all loads issued before the first shared store
    const size_t rstride = (size_t)e * NSTATE;
    float* sp = state + ((size_t)row0 * e + c) * NSTATE + 4 * q;
    float4 s[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) s[rr] = state4_load(sp + rr * rstride, 4 * q, valid && rr < nrows);
    float tx[NX], tz[NX], td[NX], tb[NBC], tc[NBC], tl[NDT];
#pragma unroll
    for (int t = 0; t < NX; ++t) {
        const int i = threadIdx.x + t * SSM_T, rr = i / CPB, cc = c0 + i % CPB;
        const bool ok = i < ROWS * CPB && rr < nrows && cc < e;
        const size_t row = row0 + rr;
        tx[t] = ok ? to_f(x[row * xs + cc]) : 0.f;
        tz[t] = (ok && z) ? to_f(z[row * zs + cc]) : 0.f;
        td[t] = (ok && !wdt) ? to_f(dt[row * dts + cc]) : 0.f;
    }
#pragma unroll
    for (int t = 0; t < NBC; ++t) {
        const int i = threadIdx.x + t * SSM_T, rr = i / NPADS, j = i % NPADS;
        const bool ok = i < ROWS * NPADS && rr < nrows && j < NSTATE;
        tb[t] = ok ? to_f(B[(row0 + rr) * bs + j]) : 0.f;
        tc[t] = ok ? to_f(C[(row0 + rr) * cs + j]) : 0.f;
    }
    const int ndl = ROWS * rp;
#pragma unroll
    for (int t = 0; t < NDT; ++t) {
        const int i = threadIdx.x + t * SSM_T, rr = rp ? i / rp : 0, j = i - rr * rp;
        tl[t] = (i < ndl && rr < nrows && j < r) ? to_f(dt[(row0 + rr) * dts + j]) : 0.f;
    }
#pragma unroll
    for (int t = 0; t < NX; ++t) {
        const int i = threadIdx.x + t * SSM_T;
        if (i < ROWS * CPB) {
            x_s[i / CPB][i % CPB] = tx[t];
            z_s[i / CPB][i % CPB] = tz[t];
            d_s[i / CPB][i % CPB] = td[t];
        }
    }
#pragma unroll
    for (int t = 0; t < NBC; ++t) {
        const int i = threadIdx.x + t * SSM_T;
        if (i < ROWS * NPADS) {
            B_s[i / NPADS][i % NPADS] = tb[t];
            C_s[i / NPADS][i % NPADS] = tc[t];
        }
    }
#pragma unroll
    for (int t = 0; t < NDT; ++t) {
        const int i = threadIdx.x + t * SSM_T;
        if (i < ndl) dtl_s[i] = tl[t];
    }
    for (int i = threadIdx.x + NDT * SSM_T; i < ndl; i += SSM_T) {   // ranks past the register chunks
        const int rr = i / rp, j = i - rr * rp;
        dtl_s[i] = (rr < nrows && j < r) ? to_f(dt[(row0 + rr) * dts + j]) : 0.f;
    }
    __syncthreads();

    // 3. dt of every row: the lane's part of the dot, reduce-scattered, + dt_bias and softplus once per
    //    (row, channel)
    float v[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) v[rr] = 0.f;
    if (wdt) {
        const float* dr = dtl_s + 4 * q;
#pragma unroll
        for (int k = 0; k < WCH; ++k) {
            if (k < nch) {
#pragma unroll
                for (int rr = 0; rr < ROWS; ++rr) {
                    const float4 u = *reinterpret_cast<const float4*>(dr + rr * rp + k * CH);
                    v[rr] = fmaf(w[k].x, u.x, v[rr]);
                    v[rr] = fmaf(w[k].y, u.y, v[rr]);
                    v[rr] = fmaf(w[k].z, u.z, v[rr]);
                    v[rr] = fmaf(w[k].w, u.w, v[rr]);
                }
            }
        }
        for (int k = WCH; k < nch; ++k) {
            const float4 wk = wdt4(wrow, k * CH + 4 * q, r, valid);
#pragma unroll
            for (int rr = 0; rr < ROWS; ++rr) {
                const float4 u = *reinterpret_cast<const float4*>(dr + rr * rp + k * CH);
                v[rr] = fmaf(wk.x, u.x, v[rr]);
                v[rr] = fmaf(wk.y, u.y, v[rr]);
                v[rr] = fmaf(wk.z, u.z, v[rr]);
                v[rr] = fmaf(wk.w, u.w, v[rr]);
            }
        }
    } else if (q == 0) {
#pragma unroll
        for (int rr = 0; rr < ROWS; ++rr) v[rr] = d_s[rr][cl];
    }
    reduce_scatter<ROWS, LPC / 2>(v, q);
#pragma unroll
    for (int i = 0; i < M; ++i) {
        float dv = v[i] + bias;
        if (flags & 1) dv = dv <= 20.f ? log1pf(__expf(dv)) : dv;   // softplus, PyTorch's threshold
        v[i] = dv;
    }

    // 4. the update row by row, dt gathered from its owning lane; <s, C> reduce-scattered the same way, the
    //    owning lane adds D x, gates by z, writes y
    float acc[ROWS];
#pragma unroll
    for (int rr = 0; rr < ROWS; ++rr) {
        const float d = __shfl_sync(0xffffffffu, v[rr % M], (rr / M) * G, LPC);
        const float dx = d * x_s[rr][cl], d2 = d * LOG2E_F;      // exp(d A) = ex2(d log2(e) A)
        const float4 Bv = *reinterpret_cast<const float4*>(&B_s[rr][4 * q]);
        const float4 Cv = *reinterpret_cast<const float4*>(&C_s[rr][4 * q]);
        float4 u = s[rr];
        u.x = fmaf(ex2_approx(d2 * a.x), u.x, dx * Bv.x);
        u.y = fmaf(ex2_approx(d2 * a.y), u.y, dx * Bv.y);
        u.z = fmaf(ex2_approx(d2 * a.z), u.z, dx * Bv.z);
        u.w = fmaf(ex2_approx(d2 * a.w), u.w, dx * Bv.w);
        state4_store(sp + rr * rstride, 4 * q, valid && rr < nrows, u);
        float t = u.x * Cv.x;
        t = fmaf(u.y, Cv.y, t);
        t = fmaf(u.z, Cv.z, t);
        acc[rr] = fmaf(u.w, Cv.w, t);
    }
    reduce_scatter<ROWS, LPC / 2>(acc, q);
    if (valid && q % G == 0) {
#pragma unroll
        for (int i = 0; i < M; ++i) {
            const int rr = (q / G) * M + i;
            if (rr < nrows) {
                const float xv = x_s[rr][cl];
                float out = acc[i] + (D ? Dc * xv : 0.f);
                if (z) out *= silu_f(z_s[rr][cl]);
                y[(size_t)(row0 + rr) * e + c] = from_f(out);
            }
        }
    }
}

#define SSM_PARAMS float* __restrict__ state, const in_t* __restrict__ x, long long xs, \
    const in_t* __restrict__ dt, long long dts, const float* __restrict__ wdt, int r, \
    const float* __restrict__ dt_bias, const float* __restrict__ A, \
    const in_t* __restrict__ B, long long bs, const in_t* __restrict__ C, long long cs, \
    const float* __restrict__ D, const in_t* __restrict__ z, long long zs, in_t* __restrict__ y, int b, int e, int flags
#define SSM_ARGS state, x, xs, dt, dts, wdt, r, dt_bias, A, B, bs, C, cs, D, z, zs, y, b, e, flags
extern "C" __global__ void __launch_bounds__(SSM_T) ssm_step_r1(SSM_PARAMS) { ssm_rows<1>(SSM_ARGS); }
extern "C" __global__ void __launch_bounds__(SSM_T) ssm_step_r2(SSM_PARAMS) { ssm_rows<2>(SSM_ARGS); }
extern "C" __global__ void __launch_bounds__(SSM_T) ssm_step_r4(SSM_PARAMS) { ssm_rows<4>(SSM_ARGS); }

// ------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) add_rmsnorm(
    float* __restrict__ residual, const in_t* __restrict__ delta, const long long* __restrict__ ids,
    const float* __restrict__ emb, const float* __restrict__ w, in_t* __restrict__ out, int d, float eps)
{
    __shared__ float red[32];
    grid_dep_wait();
    grid_dep_launch();
    const int row = blockIdx.x;
    float* res = residual + (long long)row * d;
    const float* src = ids ? emb + ids[row] * (long long)d : nullptr;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = src ? src[i] : res[i];
        if (delta) v += to_f(delta[(long long)row * d + i]);
        if (src || delta) res[i] = v;
        ss = fmaf(v, v, ss);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
        if (threadIdx.x == 0) red[0] = t;
    }
    __syncthreads();
    const float inv = rsqrtf(red[0] / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        out[(long long)row * d + i] = from_f(res[i] * inv * w[i]);
}

// ------------------------------------------------------------------------------------------------
// The projections as fused GEMVs on CUDA cores, so that a layer is 4 launches (in_proj [+RMSNorm in, conv+SiLU
// out], x_proj, ssm_step, out_proj [+residual add, norm partials]); batch rows in tiles of GB <= 8 (compile-time),
// one tile per blockIdx.y (the weights of a block are re-read from L2 by the other tiles).
//
//   gemv_step: y[r, j] = sum_k W[j, k] * in[r, k] (+ bias[j]) for r < b, j < N;  W (N, K) in_t contiguous,
//   K a multiple of kw * VEC (16-byte chunks). A block of 8 warps owns 8 / kw groups of RPW output rows; the kw
//   warps of a group split K in equal slices. Each lane first loads RPW x UK 16-byte chunks of W (the whole
//   slice when it fits: K / kw <= 32 * VEC * UK), and only then waits for the previous kernel, reads the
//   input rows into shared memory once per block (GB x K in_t, normalised there when NORM), and does the
//   FMAs from registers and shared memory; partial sums of the kw warps meet in shared memory.
//   flags: 1 NORM  in[r, k] = in_t(res[r, k] * inv_r * nw[k]), inv_r = rsqrt(sum_p partial_in[r, p] / K + eps)
//                  (the rounding of add_rmsnorm's output)
//          2 CONV  (in_proj) j < e: out[r, j] = silu(conv step of channel j with input y), state updated;
//                  j >= e: out[r, j] = y  (out is (b, 2e): the x and z halves)
//          4 RESID res[r, j] += y; partial_out[r, blockIdx.x] = this block's sum of res[r, j]^2
//          8 F32   out is float32 (the head's logits)
//   grid: ceil(N / (RPW * 8 / kw)) x ceil(b / GB) blocks of 256 threads, GB * K * sizeof(in_t) bytes of
//   dynamic shared memory.
//   embed_rows: res[r] = emb[ids[r]], partial_out[r, 0] = sum res[r]^2 (one block per row).
#ifndef GB
#define GB 1
#endif
#ifndef RPW
#define RPW 2
#endif
#ifndef UK
#define UK 4
#endif
#define VEC (16 / (int)sizeof(in_t))

__device__ __forceinline__ void unpack(const uint4& raw, float* v) {
    const in_t* e = reinterpret_cast<const in_t*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_f(e[i]);
}

extern "C" __global__ void __launch_bounds__(256) gemv_step(
    const in_t* __restrict__ W, const float* __restrict__ wbias, int N, int K,
    const in_t* __restrict__ x, long long xs,
    const float* __restrict__ res_in, const float* __restrict__ partial_in, int P_in,
    const float* __restrict__ nw, float eps,
    void* __restrict__ out, long long os,
    float* __restrict__ conv_state, const float* __restrict__ conv_w, const float* __restrict__ conv_b,
    int e, int kc,
    float* __restrict__ res_out, float* __restrict__ partial_out, int P_out,
    int b, int kw, int flags)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    in_t* xin = reinterpret_cast<in_t*>(smem_raw);          // (GB, K) input rows of this batch tile
    const int n0 = blockIdx.y * GB;                         // its first batch row
    __shared__ float inv_s[GB];
    __shared__ float red[8][RPW][GB];
    __shared__ float sq[8 * RPW][GB];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int groups = 8 / kw, grp = warp / kw, part = warp % kw;
    const int rows_blk = groups * RPW;
    const int row0 = blockIdx.x * rows_blk + grp * RPW;
    const int klen = K / kw, k_lo = part * klen, k_hi = k_lo + klen;
    const int step = 32 * VEC * UK;
    const int trips = (klen + step - 1) / step;

    uint4 wv[RPW][UK];
    auto load_w = [&](int t) {
#pragma unroll
        for (int u = 0; u < UK; ++u) {
            const int k = k_lo + t * step + (u * 32 + lane) * VEC;
#pragma unroll
            for (int i = 0; i < RPW; ++i) {
                const int j = row0 + i;
                wv[i][u] = (k < k_hi && j < N) ? __ldg(reinterpret_cast<const uint4*>(W + (long long)j * K + k))
                                               : make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    load_w(0);                                         // weights: independent of the previous kernel
    grid_dep_wait();
    grid_dep_launch();

    if (flags & 1) {                                   // inv rms of row r from the partial sums (warp r)
        if (warp < GB) {
            float t = 0.f;
            if (n0 + warp < b)
                for (int p = lane; p < P_in; p += 32) t += partial_in[(n0 + warp) * P_in + p];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
            if (lane == 0) inv_s[warp] = rsqrtf(t / (float)K + eps);
        }
        __syncthreads();
        for (int i = threadIdx.x * 4; i < GB * K; i += 256 * 4) {
            const int r = i / K, k = i - r * K;
            const float4 v = n0 + r < b ? *reinterpret_cast<const float4*>(res_in + (long long)(n0 + r) * K + k)
                                        : make_float4(0.f, 0.f, 0.f, 0.f);
            const float4 n = *reinterpret_cast<const float4*>(nw + k);
            const float inv = inv_s[r];
            in_t* d = xin + i;
            d[0] = from_f(v.x * inv * n.x); d[1] = from_f(v.y * inv * n.y);
            d[2] = from_f(v.z * inv * n.z); d[3] = from_f(v.w * inv * n.w);
        }
    } else {
        for (int i = threadIdx.x * VEC; i < GB * K; i += 256 * VEC) {
            const int r = i / K, k = i - r * K;
            *reinterpret_cast<uint4*>(xin + i) = n0 + r < b ? *reinterpret_cast<const uint4*>(x + (n0 + r) * xs + k)
                                                            : make_uint4(0u, 0u, 0u, 0u);
        }
    }
    __syncthreads();

    float acc[RPW][GB];
#pragma unroll
    for (int i = 0; i < RPW; ++i)
#pragma unroll
        for (int r = 0; r < GB; ++r) acc[i][r] = 0.f;
    for (int t = 0; t < trips; ++t) {
        if (t > 0) load_w(t);
#pragma unroll
        for (int u = 0; u < UK; ++u) {
            const int k = k_lo + t * step + (u * 32 + lane) * VEC;
            if (k >= k_hi) break;
            float w[RPW][VEC];
#pragma unroll
            for (int i = 0; i < RPW; ++i) unpack(wv[i][u], w[i]);
#pragma unroll
            for (int r = 0; r < GB; ++r) {
                float xv[VEC];
                unpack(*reinterpret_cast<const uint4*>(xin + r * K + k), xv);
#pragma unroll
                for (int i = 0; i < RPW; ++i) {
                    float s = 0.f;
#pragma unroll
                    for (int q = 0; q < VEC; ++q) s = fmaf(xv[q], w[i][q], s);
                    acc[i][r] += s;
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < RPW; ++i)
#pragma unroll
        for (int r = 0; r < GB; ++r) {
            float v = acc[i][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) red[warp][i][r] = v;
        }
    __syncthreads();

    // epilogue: thread t < rows_blk * GB owns (local output row lr, batch row n of this tile)
    const int t = threadIdx.x;
    const int lr = t / GB, n = n0 + t % GB;                 // local output row, batch row
    const int j = blockIdx.x * rows_blk + lr;
    const bool mine = t < rows_blk * GB && j < N && n < b;
    float y = 0.f;
    if (mine) {
        const int g = lr / RPW, i = lr % RPW;
        for (int p = 0; p < kw; ++p) y += red[g * kw + p][i][t % GB];
        y += wbias ? wbias[j] : 0.f;
    }
    if (flags & 4) {                                   // residual add + this block's partial sums of squares
        float v = 0.f;
        if (mine) {
            v = res_out[(long long)n * N + j] + y;
            res_out[(long long)n * N + j] = v;
        }
        if (t < rows_blk * GB) sq[lr][t % GB] = v * v;
        __syncthreads();
        if (t < GB && n0 + t < b) {
            float s = 0.f;
            for (int q = 0; q < rows_blk; ++q) s += sq[q][t];
            partial_out[(n0 + t) * P_out + blockIdx.x] = s;
        }
        return;
    }
    if (!mine) return;
    if (flags & 8) { reinterpret_cast<float*>(out)[n * os + j] = y; return; }
    in_t* o = reinterpret_cast<in_t*>(out);
    if ((flags & 2) && j < e) {
        const float xi = to_f(from_f(y));              // the conv input as stored in the unfused path
        const float c = conv_update(conv_state + ((long long)n * e + j) * (kc - 1), conv_w + (long long)j * kc,
                                    conv_b ? conv_b[j] : 0.f, xi, kc);
        o[n * os + j] = from_f(silu_f(c));
        return;
    }
    o[n * os + j] = from_f(y);
}

extern "C" __global__ void __launch_bounds__(256) embed_rows(
    const long long* __restrict__ ids, const float* __restrict__ emb, float* __restrict__ res,
    float* __restrict__ partial_out, int d)
{
    __shared__ float red[32];
    grid_dep_wait();
    grid_dep_launch();
    const int row = blockIdx.x;
    const float* src = emb + ids[row] * (long long)d;
    float ss = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = src[i];
        res[(long long)row * d + i] = v;
        ss = fmaf(v, v, ss);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += red[w];
        partial_out[row] = t;
    }
}

// ------------------------------------------------------------------------------------------------
// sample_rows (opt-in v2 sampler): one block of 256 threads per row of logits (V <= 1024 symbols).
//   temperature 0: the first index of the largest logit. Otherwise p = softmax(logits / T), then, as
//   bytemamba.generate.filter_probs: top-k keeps p_v with #{u: p_u > p_v} < k; top-p keeps p_v whose mass of
//   more likely symbols (ties broken by index) is < top_p * kept mass; min-p keeps p_v >= min_p * max p.
//   The draw is an exponential race over the kept symbols, argmax p_v / E_v, E_v = -log U_v, with U_v from a
//   counter-based hash of (seed, counter, row, v): no generator state, so a captured graph replays it with
//   the counter tensor advanced outside. Writes sym[row] and adds log_softmax(logits)[sym] to logp[row].
#define SV 1024
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__device__ float block_sum(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = 0.f;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += red[w];
    return t;
}

__device__ float block_max(float v, float* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
    __syncthreads();
    float t = red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) t = fmaxf(t, red[w]);
    return t;
}

// (value, index) argmax, ties to the smaller index
__device__ int block_argmax(float v, int i, float* redv, int* redi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) { redv[threadIdx.x >> 5] = v; redi[threadIdx.x >> 5] = i; }
    __syncthreads();
    float bv = redv[0];
    int bi = redi[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
        if (redv[w] > bv || (redv[w] == bv && redi[w] < bi)) { bv = redv[w]; bi = redi[w]; }
    return bi;
}

extern "C" __global__ void __launch_bounds__(256) sample_rows(
    const float* __restrict__ logits, int V, float temperature, int top_k, float top_p, float min_p,
    const long long* __restrict__ seed, const long long* __restrict__ counter,
    long long* __restrict__ sym, double* __restrict__ logp)
{
    __shared__ float p_s[SV];
    __shared__ float red[32];
    __shared__ int redi[32];
    grid_dep_wait();
    grid_dep_launch();
    const int row = blockIdx.x;
    const float* lg = logits + (long long)row * V;
    float m = -__int_as_float(0x7f800000);
    for (int v = threadIdx.x; v < V; v += blockDim.x) m = fmaxf(m, lg[v]);
    m = block_max(m, red);
    float z1 = 0.f;
    for (int v = threadIdx.x; v < V; v += blockDim.x) z1 += __expf(lg[v] - m);
    const float lse = m + __logf(block_sum(z1, red));
    int choice;
    if (temperature <= 0.f) {
        float bv = -__int_as_float(0x7f800000);
        int bi = 0x7fffffff;
        for (int v = threadIdx.x; v < V; v += blockDim.x)
            if (lg[v] > bv) { bv = lg[v]; bi = v; }
        choice = block_argmax(bv, bi, red, redi);
    } else {
        const float invT = 1.f / temperature;
        float zt = 0.f;
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            const float p = __expf((lg[v] - m) * invT);
            p_s[v] = p;
            zt += p;
        }
        zt = block_sum(zt, red);              // (block_sum syncs, so p_s is complete below)
        const bool use_k = top_k > 0 && top_k < V;
        float keepmass = 0.f;
        // pass 1: top-k (rank by strictly larger probabilities)
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            const float pv = p_s[v];
            bool keep = true;
            if (use_k) {
                int greater = 0;
                for (int u = 0; u < V; ++u) greater += p_s[u] > pv;
                keep = greater < top_k;
            }
            if (keep) keepmass += pv;
        }
        keepmass = block_sum(keepmass, red);
        float bkey = -1.f;
        int bidx = 0x7fffffff;
        const unsigned long long sd = (unsigned long long)seed[0], ct = (unsigned long long)counter[0];
        for (int v = threadIdx.x; v < V; v += blockDim.x) {
            const float pv = p_s[v];
            int greater = 0;
            float before = 0.f;
            if (use_k || top_p < 1.f) {
                for (int u = 0; u < V; ++u) {
                    const float pu = p_s[u];
                    const bool ahead = pu > pv || (pu == pv && u < v);
                    greater += pu > pv;
                    before += ahead ? pu : 0.f;
                }
            }
            bool keep = !use_k || greater < top_k;
            if (top_p < 1.f) keep = keep && before < top_p * keepmass;
            // p_s holds exp((logit - max) / T): the largest is exactly 1, so min-p is pv >= min_p * 1
            if (min_p > 0.f) keep = keep && pv >= min_p;
            if (keep && pv > 0.f) {
                const unsigned long long h = mix64(sd ^ mix64((ct << 24) ^ ((unsigned long long)row << 11) ^ (unsigned long long)v));
                const double uu = ((double)(h >> 11) + 0.5) * (1.0 / 9007199254740992.0);   // (0, 1)
                const float key = pv / (float)(-log(uu));
                if (key > bkey) { bkey = key; bidx = v; }
            }
        }
        choice = block_argmax(bkey, bidx, red, redi);
    }
    if (threadIdx.x == 0) {
        sym[row] = choice;
        logp[row] += (double)(lg[choice] - lse);
    }
}

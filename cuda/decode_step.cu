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
//   ssm_step     LPC = NPADS/4 adjacent lanes per (row, channel), each owning 4 of its NSTATE states
//                (-DNSTATE, padded to NPADS, a power of two >= 4); the low-rank dt dot and <s, C> are reduced
//                across the LPC lanes with shuffles; 128 threads per block.
//   add_rmsnorm  one block of 256 threads per row.

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

// ------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) conv_step(
    const in_t* __restrict__ x, long long x_stride, float* __restrict__ state, const float* __restrict__ w,
    const float* __restrict__ bias, in_t* __restrict__ out, int b, int e, int k, int silu)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)b * e) return;
    const int row = (int)(i / e), c = (int)(i % e);
    const float xi = to_f(x[row * x_stride + c]);
    float* st = state + i * (k - 1);
    const float* wc = w + (long long)c * k;
    float acc = bias ? bias[c] : 0.f;
    for (int j = 0; j < k - 1; ++j) acc = fmaf(wc[j], st[j], acc);
    acc = fmaf(wc[k - 1], xi, acc);
    for (int j = 0; j + 1 < k - 1; ++j) st[j] = st[j + 1];
    st[k - 2] = xi;
    out[row * (long long)e + c] = from_f(silu ? silu_f(acc) : acc);
}

// ------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(128) ssm_step(
    float* __restrict__ state, const in_t* __restrict__ x, long long xs,
    const in_t* __restrict__ dt, long long dts, const float* __restrict__ wdt, int r,
    const float* __restrict__ dt_bias, const float* __restrict__ A,
    const in_t* __restrict__ B, long long bs, const in_t* __restrict__ C, long long cs,
    const float* __restrict__ D, const in_t* __restrict__ z, long long zs,
    in_t* __restrict__ y, int b, int e, int flags)
{
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long ch = g / LPC;                 // (row, channel), row-major
    const int lane = (int)(g % LPC);
    const bool valid = ch < (long long)b * e;
    const int row = valid ? (int)(ch / e) : 0, c = valid ? (int)(ch % e) : 0;

    // dt: the full-rank input, or the low-rank dot W_dt[c] . dt_low[row] spread over the channel's lanes
    float d = 0.f;
    if (wdt) {
        if (valid)
            for (int j = lane; j < r; j += LPC) d = fmaf(wdt[(long long)c * r + j], to_f(dt[row * dts + j]), d);
#pragma unroll
        for (int o = LPC / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o, LPC);
    } else if (valid) {
        d = to_f(dt[row * dts + c]);
    }
    if (dt_bias && valid) d += dt_bias[c];
    if (flags & 1) d = d <= 20.f ? log1pf(__expf(d)) : d;   // softplus, PyTorch's threshold

    const float xv = valid ? to_f(x[row * xs + c]) : 0.f;
    const float dx = d * xv;
    float acc = 0.f;
    if (valid) {
        float* s = state + ch * NSTATE;
        const float* a = A + (long long)c * NSTATE;
        const in_t* Br = B + row * bs;
        const in_t* Cr = C + row * cs;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int j = lane * 4 + q;
            if (NPADS == NSTATE || j < NSTATE) {
                const float sj = fmaf(__expf(d * a[j]), s[j], dx * to_f(Br[j]));
                s[j] = sj;
                acc = fmaf(sj, to_f(Cr[j]), acc);
            }
        }
    }
#pragma unroll
    for (int o = LPC / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o, LPC);
    if (!valid || lane != 0) return;
    float out = acc + (D ? D[c] * xv : 0.f);
    if (z) out *= silu_f(to_f(z[row * zs + c]));
    y[row * (long long)e + c] = from_f(out);
}

// ------------------------------------------------------------------------------------------------
// ssm_step_rows (opt-in v2 for larger batches): the same arithmetic, in the same order, as ssm_step, but
// each lane group walks SSM_ROWS batch rows of one channel, so W_dt (up to WREG*LPC ranks), A, dt_bias and
// D are read once per group instead of once per row. grid: ceil(b / SSM_ROWS) * e * LPC threads.
#ifndef SSM_ROWS
#define SSM_ROWS 4
#endif
#define WREG 16
extern "C" __global__ void __launch_bounds__(128) ssm_step_rows(
    float* __restrict__ state, const in_t* __restrict__ x, long long xs,
    const in_t* __restrict__ dt, long long dts, const float* __restrict__ wdt, int r,
    const float* __restrict__ dt_bias, const float* __restrict__ A,
    const in_t* __restrict__ B, long long bs, const in_t* __restrict__ C, long long cs,
    const float* __restrict__ D, const in_t* __restrict__ z, long long zs,
    in_t* __restrict__ y, int b, int e, int flags)
{
    const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long ch = g / LPC;                 // (row group, channel)
    const int lane = (int)(g % LPC);
    const int ngroups = (b + SSM_ROWS - 1) / SSM_ROWS;
    const bool valid = ch < (long long)ngroups * e;
    const int rg = valid ? (int)(ch / e) : 0, c = valid ? (int)(ch % e) : 0;
    const bool wreg = wdt && r <= WREG * LPC;
    float wv[WREG];
#pragma unroll
    for (int t = 0; t < WREG; ++t) {
        const int j = lane + t * LPC;
        wv[t] = (wreg && valid && j < r) ? wdt[(long long)c * r + j] : 0.f;
    }
    float a4[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const int j = lane * 4 + q;
        a4[q] = (valid && j < NSTATE) ? A[(long long)c * NSTATE + j] : 0.f;
    }
    const float bias = (dt_bias && valid) ? dt_bias[c] : 0.f;
    const float Dc = (D && valid) ? D[c] : 0.f;
    for (int rr = 0; rr < SSM_ROWS; ++rr) {
        const int row = rg * SSM_ROWS + rr;
        const bool ok = valid && row < b;
        float d = 0.f;
        if (wdt) {
            if (ok) {
                if (wreg) {
#pragma unroll
                    for (int t = 0; t < WREG; ++t) {
                        const int j = lane + t * LPC;
                        if (j < r) d = fmaf(wv[t], to_f(dt[row * dts + j]), d);
                    }
                } else {
                    for (int j = lane; j < r; j += LPC) d = fmaf(wdt[(long long)c * r + j], to_f(dt[row * dts + j]), d);
                }
            }
#pragma unroll
            for (int o = LPC / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o, LPC);
        } else if (ok) {
            d = to_f(dt[row * dts + c]);
        }
        if (dt_bias && ok) d += bias;
        if (flags & 1) d = d <= 20.f ? log1pf(__expf(d)) : d;
        const float xv = ok ? to_f(x[row * xs + c]) : 0.f;
        const float dx = d * xv;
        float acc = 0.f;
        if (ok) {
            float* s = state + ((long long)row * e + c) * NSTATE;
            const in_t* Br = B + row * bs;
            const in_t* Cr = C + row * cs;
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int j = lane * 4 + q;
                if (NPADS == NSTATE || j < NSTATE) {
                    const float sj = fmaf(__expf(d * a4[q]), s[j], dx * to_f(Br[j]));
                    s[j] = sj;
                    acc = fmaf(sj, to_f(Cr[j]), acc);
                }
            }
        }
#pragma unroll
        for (int o = LPC / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o, LPC);
        if (ok && lane == 0) {
            float out = acc + (D ? Dc * xv : 0.f);
            if (z) out *= silu_f(to_f(z[row * zs + c]));
            y[row * (long long)e + c] = from_f(out);
        }
    }
}

// ------------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(256) add_rmsnorm(
    float* __restrict__ residual, const in_t* __restrict__ delta, const long long* __restrict__ ids,
    const float* __restrict__ emb, const float* __restrict__ w, in_t* __restrict__ out, int d, float eps)
{
    __shared__ float red[32];
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
// Small batches (b <= MAXB): the projections as fused GEMVs, so that a layer is 4 launches
// (in_proj [+RMSNorm in, conv+SiLU out], x_proj, ssm_step, out_proj [+residual add, norm partial sums]).
//
//   gemv_step: y[r, j] = sum_k W[j, k] * in[r, k] (+ bias[j]) for r < b, j < N;  W (N, K) in_t contiguous,
//   K a multiple of VEC (16-byte rows). One warp per output j (8 per block, grid ceil(N/8)); each lane
//   reads 16 bytes of W per step and the same columns of every batch row (L1/L2-resident).
//   flags: 1 NORM  in[r, k] = res[r, k] * inv_r * nw[k], inv_r = rsqrt(sum_p partial_in[r, p] / K + eps)
//          2 CONV  (in_proj) j < e: out[r, j] = silu(conv step of channel j with input y), state updated;
//                  j >= e: out[r, j] = y  (out is (b, 2e): the x and z halves)
//          4 RESID res[r, j] += y; partial_out[r, blockIdx.x] = this block's sum of res[r, j]^2
//          8 F32   out is float32 (the head's logits)
//   embed_rows: res[r] = emb[ids[r]], partial_out[r, 0] = sum res[r]^2 (one block per row).
#ifndef MAXB
#define MAXB 8
#endif
#ifndef GEMV_UNR
#define GEMV_UNR 1
#endif
#define VEC (16 / (int)sizeof(in_t))

__device__ __forceinline__ void load_vec(const in_t* p, float* v) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
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
    int b, int flags)
{
    __shared__ float inv_s[MAXB];
    __shared__ float ss_s[8][MAXB];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int j = blockIdx.x * 8 + warp;
    if (flags & 1) {
        if (threadIdx.x < b) {
            float t = 0.f;
            for (int p = 0; p < P_in; ++p) t += partial_in[threadIdx.x * P_in + p];
            inv_s[threadIdx.x] = rsqrtf(t / (float)K + eps);
        }
        __syncthreads();
    }
    float acc[MAXB];
#pragma unroll
    for (int r = 0; r < MAXB; ++r) acc[r] = 0.f;
    if (j < N) {
        const in_t* wr = W + (long long)j * K;
#if GEMV_UNR > 1
        // v2 (opt-in, -DGEMV_UNR=U): U 16-byte weight loads per lane in flight before the first FMA
        for (int k0 = 0; k0 < K; k0 += 32 * VEC * GEMV_UNR) {
            uint4 wraw[GEMV_UNR];
#pragma unroll
            for (int u = 0; u < GEMV_UNR; ++u) {
                const int k = k0 + (u * 32 + lane) * VEC;
                wraw[u] = k < K ? *reinterpret_cast<const uint4*>(wr + k) : make_uint4(0u, 0u, 0u, 0u);
            }
#pragma unroll
            for (int u = 0; u < GEMV_UNR; ++u) {
                const int k = k0 + (u * 32 + lane) * VEC;
                if (k >= K) break;
                float w[VEC];
                const in_t* we = reinterpret_cast<const in_t*>(&wraw[u]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) w[i] = to_f(we[i]);
                float nwv[VEC];
                if (flags & 1) {
#pragma unroll
                    for (int i = 0; i < VEC; i += 4) {
                        const float4 n4 = *reinterpret_cast<const float4*>(nw + k + i);
                        nwv[i] = n4.x * w[i]; nwv[i + 1] = n4.y * w[i + 1];
                        nwv[i + 2] = n4.z * w[i + 2]; nwv[i + 3] = n4.w * w[i + 3];
                    }
                }
#pragma unroll
                for (int r = 0; r < MAXB; ++r) {
                    if (r < b) {
                        float s = 0.f;
                        if (flags & 1) {
                            const float* rr = res_in + (long long)r * K + k;
#pragma unroll
                            for (int i = 0; i < VEC; i += 4) {
                                const float4 v4 = *reinterpret_cast<const float4*>(rr + i);
                                s = fmaf(v4.x, nwv[i], s); s = fmaf(v4.y, nwv[i + 1], s);
                                s = fmaf(v4.z, nwv[i + 2], s); s = fmaf(v4.w, nwv[i + 3], s);
                            }
                            s *= inv_s[r];
                        } else {
                            float xv[VEC];
                            load_vec(x + r * xs + k, xv);
#pragma unroll
                            for (int i = 0; i < VEC; ++i) s = fmaf(xv[i], w[i], s);
                        }
                        acc[r] += s;
                    }
                }
            }
        }
#else
        for (int k = lane * VEC; k < K; k += 32 * VEC) {
            float w[VEC];
            load_vec(wr + k, w);
            float nwv[VEC];
            if (flags & 1) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) nwv[i] = nw[k + i] * w[i];
            }
#pragma unroll
            for (int r = 0; r < MAXB; ++r) {
                if (r < b) {
                    float s = 0.f;
                    if (flags & 1) {
                        const float* rr = res_in + (long long)r * K + k;
#pragma unroll
                        for (int i = 0; i < VEC; ++i) s = fmaf(rr[i], nwv[i], s);
                        s *= inv_s[r];
                    } else {
                        float xv[VEC];
                        load_vec(x + r * xs + k, xv);
#pragma unroll
                        for (int i = 0; i < VEC; ++i) s = fmaf(xv[i], w[i], s);
                    }
                    acc[r] += s;
                }
            }
        }
#endif
    }
#pragma unroll
    for (int r = 0; r < MAXB; ++r) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (flags & 4) {                                   // residual add + this block's partial sums of squares
        if (lane == 0) {
#pragma unroll
            for (int r = 0; r < MAXB; ++r) {
                float v = 0.f;
                if (r < b && j < N) {
                    const float y = acc[r] + (wbias ? wbias[j] : 0.f);
                    v = res_out[(long long)r * N + j] + y;
                    res_out[(long long)r * N + j] = v;
                }
                ss_s[warp][r] = v * v;
            }
        }
        __syncthreads();
        if (threadIdx.x < b) {
            float t = 0.f;
#pragma unroll
            for (int w = 0; w < 8; ++w) t += ss_s[w][threadIdx.x];
            partial_out[threadIdx.x * P_out + blockIdx.x] = t;
        }
        return;
    }
    if (j >= N || lane >= MAXB || lane >= b) return;
    // lane r writes batch row r (acc[] is indexed with compile-time constants only)
    float y = 0.f;
#pragma unroll
    for (int r = 0; r < MAXB; ++r) if (r == lane) y = acc[r];
    y += wbias ? wbias[j] : 0.f;
    const int r = lane;
    if (flags & 8) { reinterpret_cast<float*>(out)[r * os + j] = y; return; }
    in_t* o = reinterpret_cast<in_t*>(out);
    if ((flags & 2) && j < e) {
        const float xi = to_f(from_f(y));              // the conv input as stored in the unfused path
        float* st = conv_state + ((long long)r * e + j) * (kc - 1);
        const float* wc = conv_w + (long long)j * kc;
        float c = conv_b ? conv_b[j] : 0.f;
        for (int i = 0; i < kc - 1; ++i) c = fmaf(wc[i], st[i], c);
        c = fmaf(wc[kc - 1], xi, c);
        for (int i = 0; i + 1 < kc - 1; ++i) st[i] = st[i + 1];
        st[kc - 2] = xi;
        o[r * os + j] = from_f(silu_f(c));
        return;
    }
    o[r * os + j] = from_f(y);
}

extern "C" __global__ void __launch_bounds__(256) embed_rows(
    const long long* __restrict__ ids, const float* __restrict__ emb, float* __restrict__ res,
    float* __restrict__ partial_out, int d)
{
    __shared__ float red[32];
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

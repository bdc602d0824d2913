// selective_scan.cu -- the Mamba-1 selective scan (S6), forward and backward, for bytemamba.
//
// What it computes (see bytemamba/ops/scan.py, selective_scan_ref, the definition):
//     dl_t  = softplus(delta_t + delta_bias)            (bias, softplus optional)
//     x_t   = exp(dl_t * A) * x_{t-1} + dl_t * u_t * B_t  (x_{t-1} := 0 where reset_t; x_{-1} = initial state)
//     y_t   = <C_t, x_t> + D * u_t ;  out_t = y_t * silu(z_t)   (D, z optional)
// per channel (batch b, dim d), over n states (n <= 64, padded to NPAD in {16,32,64}).
//
// Shapes (the Python wrapper, bytemamba/ops/scan_cuda.py, owns layout and makes everything contiguous):
//     u, delta, z, out, du, ddelta, dz : (batch, dim, L)  in_t (float32, bfloat16 or float16)
//     B, C                             : (batch, n, L)    in_t
//     A (dim, n); D, delta_bias (dim); states (batch, dim, n): float32. reset (batch, L) uint8.
//     ckpt  : (batch*dim, ntiles, NPAD) float32, the state before each tile of TL positions
//             (written by the forward, read by the backward: memory batch*dim*n*L/TL).
// Arithmetic is float32 throughout.
//
// How it is launched: 128 threads per block. A channel is owned by NT = NPAD/4 adjacent lanes, each
// holding 4 of its states in registers; a block holds CPB = 128/NT channels of one batch row
// (grid.x = batch * ceil(dim/CPB), channels past dim are masked). Each block walks its positions in
// tiles of TL = 64, staging coalesced tiles of the inputs through shared memory.
//   ss_fwd_agg  (grid.y = nseg-1)  per L-segment: the segment's end state from zero and its decay
//                                  product, so that segments can run in parallel (long L, few channels).
//   ss_fwd      (grid.y = nseg)    folds the aggregates of earlier segments into its start state, then
//                                  scans its segment: out, checkpoints, final state.
//   ss_bwd      (grid.y = 1)       walks tiles in reverse; per tile it rescans forward from the
//                                  checkpoint (saving the state every SB positions in shared memory),
//                                  then per sub-block of SB it recomputes the SB states in registers and
//                                  runs the adjoint recurrence backwards. dB, dC are summed over the
//                                  block's channels in shared memory, then added atomically (default) or
//                                  written as per-block partials (deterministic mode).
// Compile-time knobs (-D): IN_DTYPE (0 f32, 1 bf16, 2 f16), NPAD, HAS_Z, HAS_RESET, POLY_J (bit mask of
// the per-thread states j in 0..3 whose exp2 is a polynomial on the FMA pipes instead of MUFU.EX2).

#ifndef IN_DTYPE
#define IN_DTYPE 1
#endif
#ifndef NPAD
#define NPAD 16
#endif
#ifndef HAS_Z
#define HAS_Z 1
#endif
#ifndef HAS_RESET
#define HAS_RESET 0
#endif
#ifndef POLY_J
#define POLY_J 0
#endif

#define NTHREADS 128
#define NT (NPAD / 4)              // lanes per channel
#define CPB (NTHREADS / NT)        // channels per block
#define TL 64                      // tile length = checkpoint interval
#define EPT (TL / NT)              // staged elements per thread (one row, EPT consecutive positions)
#define SB 8                       // backward sub-block
#define RS (TL + 4)                // padded row stride of per-(channel, position) tiles
#define BS (NPAD + 4)              // padded row stride of the B / C tiles ([t][n])
#define UNR ((NT > 4) ? NT : 4)    // forward inner unroll (a multiple of NT)

#define F_SOFTPLUS 1
#define F_ALIGNED 2
#define F_ATOMIC 4

typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

extern __shared__ float4 smem_raw[];

#if IN_DTYPE == 0
typedef float in_t;
#else
typedef u16 in_t;
#endif

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(u16 v) {
#if IN_DTYPE == 1
  return __uint_as_float(((unsigned)v) << 16);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
#endif
}
__device__ __forceinline__ void from_f(float f, float& o) { o = f; }
__device__ __forceinline__ void from_f(float f, u16& o) {
#if IN_DTYPE == 1
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(o) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(o) : "f"(f));
#endif
}

__device__ __forceinline__ float ex2_mufu(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 2^x on the FMA pipes: round-to-nearest split x = i + f, f in [-1/2, 1/2], a degree-5 minimax
// polynomial for 2^f (relative error ~2e-7, like MUFU.EX2), then i added into the exponent field.
__device__ __forceinline__ float ex2_poly(float x) {
  x = fminf(fmaxf(x, -125.0f), 127.0f);
  float t = x + 12582912.0f;             // 1.5 * 2^23: the integer part lands in the low mantissa bits
  float f = x - (t - 12582912.0f);
  float p = 1.3264727313e-3f;
  p = fmaf(p, f, 9.6715129912e-3f);
  p = fmaf(p, f, 5.5507335812e-2f);
  p = fmaf(p, f, 2.4022242427e-1f);
  p = fmaf(p, f, 6.9314700365e-1f);
  p = fmaf(p, f, 1.0f);
  return __int_as_float(__float_as_int(p) + (__float_as_int(t) << 23));
}

template <int J>
__device__ __forceinline__ float ex2_j(float x) {
  if ((POLY_J >> J) & 1) return ex2_poly(x);
  return ex2_mufu(x);
}

__device__ __forceinline__ float softplus_f(float x) { return x > 20.0f ? x : log1pf(__expf(x)); }
__device__ __forceinline__ float sigmoid_f(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }

// Load EPT consecutive elements of one row (p points at the first; avail = how many exist there).
__device__ __forceinline__ void load_row(const in_t* __restrict__ p, i64 avail, bool vec, float (&v)[EPT]) {
  if (vec && avail >= EPT) {
    constexpr int BYTES = EPT * (int)sizeof(in_t);
    if constexpr (BYTES % 16 == 0) {
      const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
      for (int k = 0; k < BYTES / 16; ++k) {
        uint4 w = q[k];
        const in_t* e = reinterpret_cast<const in_t*>(&w);
#pragma unroll
        for (int i = 0; i < 16 / (int)sizeof(in_t); ++i) v[k * (16 / (int)sizeof(in_t)) + i] = to_f(e[i]);
      }
      return;
    } else if constexpr (BYTES % 8 == 0) {
      const uint2* q = reinterpret_cast<const uint2*>(p);
#pragma unroll
      for (int k = 0; k < BYTES / 8; ++k) {
        uint2 w = q[k];
        const in_t* e = reinterpret_cast<const in_t*>(&w);
#pragma unroll
        for (int i = 0; i < 8 / (int)sizeof(in_t); ++i) v[k * (8 / (int)sizeof(in_t)) + i] = to_f(e[i]);
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < EPT; ++i) v[i] = (i < avail) ? to_f(p[i]) : 0.0f;
}

__device__ __forceinline__ void store_row(in_t* __restrict__ p, i64 avail, bool vec, const float (&v)[EPT]) {
  constexpr int BYTES = EPT * (int)sizeof(in_t);
  if (vec && avail >= EPT) {
    if constexpr (BYTES % 16 == 0) {
      uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
      for (int k = 0; k < BYTES / 16; ++k) {
        uint4 w;
        in_t* e = reinterpret_cast<in_t*>(&w);
#pragma unroll
        for (int i = 0; i < 16 / (int)sizeof(in_t); ++i) from_f(v[k * (16 / (int)sizeof(in_t)) + i], e[i]);
        q[k] = w;
      }
      return;
    } else if constexpr (BYTES % 8 == 0) {
      uint2* q = reinterpret_cast<uint2*>(p);
#pragma unroll
      for (int k = 0; k < BYTES / 8; ++k) {
        uint2 w;
        in_t* e = reinterpret_cast<in_t*>(&w);
#pragma unroll
        for (int i = 0; i < 8 / (int)sizeof(in_t); ++i) from_f(v[k * (8 / (int)sizeof(in_t)) + i], e[i]);
        q[k] = w;
      }
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < EPT; ++i)
    if (i < avail) from_f(v[i], p[i]);
}

// Reduce-scatter over the NT lanes of a channel: v holds K values (K/NT groups of NT); afterwards
// v[g] (g < K/NT) holds the channel-wide sum of element (lane % NT) of group g. K must be a multiple of NT.
template <int K>
__device__ __forceinline__ void reduce_scatter(float (&v)[K], int lane) {
#pragma unroll
  for (int m = NT / 2; m >= 1; m >>= 1) {
    const bool hi = (lane & m) != 0;
#pragma unroll
    for (int g = 0; g < K / NT; ++g) {
#pragma unroll
      for (int i = 0; i < m; ++i) {
        float lo_v = v[g * NT + i], hi_v = v[g * NT + i + m];
        float send = hi ? lo_v : hi_v;
        float keep = hi ? hi_v : lo_v;
        v[g * NT + i] = keep + __shfl_xor_sync(0xffffffffu, send, m);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < K / NT; ++g) v[g] = v[g * NT];
}

// Shared memory of one block of the forward kernels (floats).
struct FwdSmem {
  float dl[CPB * RS];
  float du[CPB * RS];
  float y[CPB * RS];
  float B[TL * BS];
  float C[TL * BS];
  float m[TL];
};

__device__ __forceinline__ void stage_BC(float* sB, const in_t* __restrict__ M, int bi, int n, i64 L, i64 l0) {
  for (int idx = threadIdx.x; idx < TL * NPAD; idx += NTHREADS) {
    int nn = idx / TL, t = idx % TL;
    float v = 0.0f;
    if (nn < n && l0 + t < L) v = to_f(M[((i64)bi * n + nn) * L + l0 + t]);
    sB[t * BS + nn] = v;
  }
}

__device__ __forceinline__ void stage_reset(float* sm, const u8* __restrict__ reset, int bi, i64 L, i64 l0) {
#if HAS_RESET
  for (int t = threadIdx.x; t < TL; t += NTHREADS)
    sm[t] = (l0 + t < L && reset[(i64)bi * L + l0 + t]) ? 0.0f : 1.0f;
#endif
}

// One forward tile of a thread's 4 states. AGG: no outputs (sum of dl and reset seen are tracked).
template <bool AGG>
__device__ __forceinline__ void fwd_tile_scan(const FwdSmem& s, int c, int sg, int lane, const float (&A2)[4],
                                              float (&x)[4], float& sumdl, float& keep, float* ysm) {
#pragma unroll 1
  for (int t0 = 0; t0 < TL; t0 += UNR) {
    float yv[UNR];
#pragma unroll
    for (int tt = 0; tt < UNR; tt += 4) {
      float4 dl4 = *reinterpret_cast<const float4*>(&s.dl[c * RS + t0 + tt]);
      float4 du4 = *reinterpret_cast<const float4*>(&s.du[c * RS + t0 + tt]);
      float dls[4] = {dl4.x, dl4.y, dl4.z, dl4.w};
      float dus[4] = {du4.x, du4.y, du4.z, du4.w};
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int t = t0 + tt + q;
        float4 b4 = *reinterpret_cast<const float4*>(&s.B[t * BS + sg * 4]);
        float bb[4] = {b4.x, b4.y, b4.z, b4.w};
        float dl = dls[q], du = dus[q];
#if HAS_RESET
        float mk = s.m[t];
        if (AGG) keep *= mk;
#endif
        float a[4];
        a[0] = ex2_j<0>(dl * A2[0]);
        a[1] = ex2_j<1>(dl * A2[1]);
        a[2] = ex2_j<2>(dl * A2[2]);
        a[3] = ex2_j<3>(dl * A2[3]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#if HAS_RESET
          a[j] *= mk;
#endif
          x[j] = fmaf(a[j], x[j], du * bb[j]);
        }
        if (AGG) {
          sumdl += dl;
          yv[tt + q] = 0.0f;
        } else {
          float4 c4 = *reinterpret_cast<const float4*>(&s.C[t * BS + sg * 4]);
          yv[tt + q] = fmaf(c4.w, x[3], fmaf(c4.z, x[2], fmaf(c4.y, x[1], c4.x * x[0])));
        }
      }
    }
    if (!AGG) {
      reduce_scatter<UNR>(yv, lane);
#pragma unroll
      for (int g = 0; g < UNR / NT; ++g) ysm[c * RS + t0 + g * NT + sg] = yv[g];
    }
  }
}

template <bool AGG>
__device__ __forceinline__ void fwd_body(
    const in_t* __restrict__ u, const in_t* __restrict__ delta, const in_t* __restrict__ z,
    const in_t* __restrict__ Bm, const in_t* __restrict__ Cm, const float* __restrict__ A,
    const float* __restrict__ Dv, const float* __restrict__ bias, const float* __restrict__ init,
    const u8* __restrict__ reset, in_t* __restrict__ out, float* __restrict__ ckpt,
    float* __restrict__ final_state, float* __restrict__ agg, int batch, int dim, i64 L, int n,
    int ntiles, int seg_tiles, int nseg, int flags) {
  FwdSmem& s = *reinterpret_cast<FwdSmem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31;
  const int c = tid / NT, sg = tid % NT;
  const int dblocks = (dim + CPB - 1) / CPB;
  const int bi = blockIdx.x / dblocks, db = blockIdx.x % dblocks;
  const int d = db * CPB + c;
  const bool valid = d < dim;
  const i64 ch = (i64)bi * dim + (valid ? d : 0);
  const int seg = blockIdx.y;
  const bool softplus = flags & F_SOFTPLUS, aligned = flags & F_ALIGNED;
  const float LOG2E = 1.4426950408889634f;

  float A2[4], x[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int nn = sg * 4 + j;
    A2[j] = (valid && nn < n) ? A[(i64)d * n + nn] * LOG2E : 0.0f;
    x[j] = 0.0f;
  }
  const float bias_d = (valid && bias) ? bias[d] : 0.0f;
  const float D_d = (valid && Dv) ? Dv[d] : 0.0f;
  if (!AGG) {
    if (init && valid) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (sg * 4 + j < n) x[j] = init[ch * n + sg * 4 + j];
    }
    for (int k = 0; k < seg; ++k) {      // fold the aggregates of the segments before this one
      const float* ag = agg + (ch * (nseg - 1) + k) * 2 * NPAD;
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = fmaf(ag[sg * 4 + j], x[j], ag[NPAD + sg * 4 + j]);
    }
  }
  float sumdl = 0.0f, keep = 1.0f;
  const int k0 = seg * seg_tiles, k1 = min(ntiles, k0 + seg_tiles);

  for (int k = k0; k < k1; ++k) {
    const i64 l0 = (i64)k * TL;
    const i64 p0 = l0 + sg * EPT;
    const i64 avail = valid ? L - p0 : 0;
    const bool vec = aligned;
    float uv[EPT], dv[EPT];
    load_row(u + ch * L + p0, avail, vec, uv);
    load_row(delta + ch * L + p0, avail, vec, dv);
#pragma unroll
    for (int e = 0; e < EPT; e += 4) {
      float4 dl4, du4;
      float* dlp = &dl4.x;
      float* dup = &du4.x;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        float xv = dv[e + q] + bias_d;
        float dl = softplus ? softplus_f(xv) : xv;
        dl = (e + q < avail) ? dl : 0.0f;
        dlp[q] = dl;
        dup[q] = dl * uv[e + q];
      }
      *reinterpret_cast<float4*>(&s.dl[c * RS + sg * EPT + e]) = dl4;
      *reinterpret_cast<float4*>(&s.du[c * RS + sg * EPT + e]) = du4;
    }
    stage_BC(s.B, Bm, bi, n, L, l0);
    if (!AGG) stage_BC(s.C, Cm, bi, n, L, l0);
    stage_reset(s.m, reset, bi, L, l0);
    __syncthreads();
    if (!AGG && valid) {
      float4 xs = make_float4(x[0], x[1], x[2], x[3]);
      *reinterpret_cast<float4*>(&ckpt[(ch * ntiles + k) * NPAD + sg * 4]) = xs;
    }
    fwd_tile_scan<AGG>(s, c, sg, lane, A2, x, sumdl, keep, s.y);
    if (!AGG) {
      __syncthreads();
      float zv[EPT], ov[EPT];
#if HAS_Z
      load_row(z + ch * L + p0, avail, vec, zv);
#endif
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        float yv = s.y[c * RS + sg * EPT + e] + D_d * uv[e];
#if HAS_Z
        float zz = zv[e];
        yv *= zz * sigmoid_f(zz);
#endif
        ov[e] = yv;
      }
      (void)zv;
      store_row(out + ch * L + p0, avail, vec, ov);
    }
    __syncthreads();
  }
  if (AGG) {
    if (valid) {
      float* ag = agg + (ch * (nseg - 1) + seg) * 2 * NPAD;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        ag[sg * 4 + j] = keep * ex2_mufu(A2[j] * sumdl);
        ag[NPAD + sg * 4 + j] = x[j];
      }
    }
  } else if (final_state && valid && seg == nseg - 1) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (sg * 4 + j < n) final_state[ch * n + sg * 4 + j] = x[j];
  }
}

#define FWD_PARAMS                                                                                     \
  const in_t *__restrict__ u, const in_t *__restrict__ delta, const in_t *__restrict__ z,            \
      const in_t *__restrict__ Bm, const in_t *__restrict__ Cm, const float *__restrict__ A,         \
      const float *__restrict__ Dv, const float *__restrict__ bias, const float *__restrict__ init,   \
      const u8 *__restrict__ reset, in_t *__restrict__ out, float *__restrict__ ckpt,                \
      float *__restrict__ final_state, float *__restrict__ agg, int batch, int dim, long long L,     \
      int n, int ntiles, int seg_tiles, int nseg, int flags
#define FWD_ARGS \
  u, delta, z, Bm, Cm, A, Dv, bias, init, reset, out, ckpt, final_state, agg, batch, dim, L, n, ntiles, seg_tiles, nseg, flags

extern "C" __global__ void __launch_bounds__(NTHREADS) ss_fwd(FWD_PARAMS) { fwd_body<false>(FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(NTHREADS) ss_fwd_agg(FWD_PARAMS) { fwd_body<true>(FWD_ARGS); }

// ------------------------------------------------------------------------------------------------
// Backward.

struct BwdSmem {
  float dl[CPB * RS];               // softplus(delta + bias)
  float du[CPB * RS];               // dl * u
  float dy[CPB * RS];               // dout * silu(z)  (the gradient of y + D u)
  float s1[CPB * RS];               // sum_n g B
  float s2[CPB * RS];               // sum_n g A a x_{t-1}
  float yy[CPB * RS];               // y = <C, x> (recomputed, for dz)
  float B[TL * BS];
  float C[TL * BS];
  float m[TL];
  float xck[(TL / SB) * 4 * NTHREADS];        // state at each sub-block start, [sb][j][tid]
  float bc[CPB * (SB * 2 * NPAD + 4 * NT)];        // per-channel dB (first NPAD) and dC per sub-block position
};

extern "C" __global__ void __launch_bounds__(NTHREADS) ss_bwd(
    const in_t* __restrict__ u, const in_t* __restrict__ delta, const in_t* __restrict__ z,
    const in_t* __restrict__ Bm, const in_t* __restrict__ Cm, const float* __restrict__ A,
    const float* __restrict__ Dv, const float* __restrict__ bias, const u8* __restrict__ reset,
    const in_t* __restrict__ dout, const float* __restrict__ ckpt, const float* __restrict__ dfinal,
    in_t* __restrict__ du_o, in_t* __restrict__ ddelta_o, in_t* __restrict__ dz_o,
    float* __restrict__ dB_o, float* __restrict__ dC_o, float* __restrict__ dA_p,
    float* __restrict__ dD_p, float* __restrict__ dbias_p, float* __restrict__ dinit,
    int batch, int dim, long long L, int n, int ntiles, int flags) {
  BwdSmem& s = *reinterpret_cast<BwdSmem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31;
  const int c = tid / NT, sg = tid % NT;
  const int dblocks = (dim + CPB - 1) / CPB;
  const int bi = blockIdx.x / dblocks, db = blockIdx.x % dblocks;
  const int d = db * CPB + c;
  const bool valid = d < dim;
  const i64 ch = (i64)bi * dim + (valid ? d : 0);
  const bool softplus = flags & F_SOFTPLUS, aligned = flags & F_ALIGNED, atomic = flags & F_ATOMIC;
  const float LOG2E = 1.4426950408889634f;
  constexpr int BCS = SB * 2 * NPAD + 4 * NT;

  float A2[4], Aj[4], h[4], dAacc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int nn = sg * 4 + j;
    Aj[j] = (valid && nn < n) ? A[(i64)d * n + nn] : 0.0f;
    A2[j] = Aj[j] * LOG2E;
    h[j] = (dfinal && valid && nn < n) ? dfinal[ch * n + nn] : 0.0f;
    dAacc[j] = 0.0f;
  }
  const float bias_d = (valid && bias) ? bias[d] : 0.0f;
  const float D_d = (valid && Dv) ? Dv[d] : 0.0f;
  float dDacc = 0.0f, dbacc = 0.0f;

  for (int k = ntiles - 1; k >= 0; --k) {
    const i64 l0 = (i64)k * TL;
    const i64 p0 = l0 + sg * EPT;
    const i64 avail = valid ? L - p0 : 0;
    const bool vec = aligned;
    {
      float uv[EPT], dv[EPT], gv[EPT];
      load_row(u + ch * L + p0, avail, vec, uv);
      load_row(delta + ch * L + p0, avail, vec, dv);
      load_row(dout + ch * L + p0, avail, vec, gv);
#if HAS_Z
      float zv[EPT];
      load_row(z + ch * L + p0, avail, vec, zv);
#endif
#pragma unroll
      for (int e = 0; e < EPT; e += 4) {
        float4 dl4, du4, dy4;
        float* dlp = &dl4.x;
        float* dup = &du4.x;
        float* dyp = &dy4.x;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          float xv = dv[e + q] + bias_d;
          float dl = softplus ? softplus_f(xv) : xv;
          const bool in = e + q < avail;
          dl = in ? dl : 0.0f;
          dlp[q] = dl;
          dup[q] = dl * uv[e + q];
          float g = gv[e + q];
#if HAS_Z
          float zz = zv[e + q];
          g *= zz * sigmoid_f(zz);
#endif
          dyp[q] = in ? g : 0.0f;
        }
        *reinterpret_cast<float4*>(&s.dl[c * RS + sg * EPT + e]) = dl4;
        *reinterpret_cast<float4*>(&s.du[c * RS + sg * EPT + e]) = du4;
        *reinterpret_cast<float4*>(&s.dy[c * RS + sg * EPT + e]) = dy4;
      }
    }
    stage_BC(s.B, Bm, bi, n, L, l0);
    stage_BC(s.C, Cm, bi, n, L, l0);
    stage_reset(s.m, reset, bi, L, l0);
    __syncthreads();

    // Pass 1: rescan the tile forward from its checkpoint, keeping the state at each sub-block start.
    float x[4];
    {
      float4 x4 = valid ? *reinterpret_cast<const float4*>(&ckpt[(ch * ntiles + k) * NPAD + sg * 4])
                        : make_float4(0.f, 0.f, 0.f, 0.f);
      x[0] = x4.x; x[1] = x4.y; x[2] = x4.z; x[3] = x4.w;
    }
#pragma unroll 1
    for (int sb = 0; sb < TL / SB; ++sb) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s.xck[(sb * 4 + j) * NTHREADS + tid] = x[j];
#pragma unroll
      for (int q = 0; q < SB; ++q) {
        const int t = sb * SB + q;
        float dl = s.dl[c * RS + t], dup = s.du[c * RS + t];
        float4 b4 = *reinterpret_cast<const float4*>(&s.B[t * BS + sg * 4]);
        float bb[4] = {b4.x, b4.y, b4.z, b4.w};
        float a[4];
        a[0] = ex2_j<0>(dl * A2[0]);
        a[1] = ex2_j<1>(dl * A2[1]);
        a[2] = ex2_j<2>(dl * A2[2]);
        a[3] = ex2_j<3>(dl * A2[3]);
#if HAS_RESET
        const float mk = s.m[t];
#endif
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#if HAS_RESET
          a[j] *= mk;
#endif
          x[j] = fmaf(a[j], x[j], dup * bb[j]);
        }
      }
    }

    // Pass 2: sub-blocks in reverse; recompute SB states in registers, then the adjoint backwards.
#pragma unroll 1
    for (int sb = TL / SB - 1; sb >= 0; --sb) {
      float xs[SB + 1][4], as[SB][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) xs[0][j] = s.xck[(sb * 4 + j) * NTHREADS + tid];
#pragma unroll
      for (int q = 0; q < SB; ++q) {
        const int t = sb * SB + q;
        float dl = s.dl[c * RS + t], dup = s.du[c * RS + t];
        float4 b4 = *reinterpret_cast<const float4*>(&s.B[t * BS + sg * 4]);
        float bb[4] = {b4.x, b4.y, b4.z, b4.w};
        as[q][0] = ex2_j<0>(dl * A2[0]);
        as[q][1] = ex2_j<1>(dl * A2[1]);
        as[q][2] = ex2_j<2>(dl * A2[2]);
        as[q][3] = ex2_j<3>(dl * A2[3]);
#if HAS_RESET
        const float mk = s.m[t];
#endif
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#if HAS_RESET
          as[q][j] *= mk;
#endif
          xs[q + 1][j] = fmaf(as[q][j], xs[q][j], dup * bb[j]);
        }
      }
      float red[3 * SB];   // s1[SB], s2[SB], y[SB]
#pragma unroll
      for (int q = SB - 1; q >= 0; --q) {
        const int t = sb * SB + q;
        const float dl = s.dl[c * RS + t], dup = s.du[c * RS + t], dy = s.dy[c * RS + t];
        float4 b4 = *reinterpret_cast<const float4*>(&s.B[t * BS + sg * 4]);
        float4 c4 = *reinterpret_cast<const float4*>(&s.C[t * BS + sg * 4]);
        float bb[4] = {b4.x, b4.y, b4.z, b4.w};
        float cc[4] = {c4.x, c4.y, c4.z, c4.w};
        float s1 = 0.f, s2 = 0.f, yv = 0.f;
        float dBv[4], dCv[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float g = fmaf(cc[j], dy, h[j]);
          s1 = fmaf(g, bb[j], s1);
          dBv[j] = g * dup;
          float hn = as[q][j] * g;
          float w = hn * xs[q][j];
          s2 = fmaf(Aj[j], w, s2);
          dAacc[j] = fmaf(dl, w, dAacc[j]);
          yv = fmaf(cc[j], xs[q + 1][j], yv);
          dCv[j] = dy * xs[q + 1][j];
          h[j] = hn;
        }
        red[q] = s1;
        red[SB + q] = s2;
        red[2 * SB + q] = yv;
        *reinterpret_cast<float4*>(&s.bc[c * BCS + q * 2 * NPAD + sg * 4]) =
            make_float4(dBv[0], dBv[1], dBv[2], dBv[3]);
        *reinterpret_cast<float4*>(&s.bc[c * BCS + q * 2 * NPAD + NPAD + sg * 4]) =
            make_float4(dCv[0], dCv[1], dCv[2], dCv[3]);
      }
      if constexpr (SB % NT == 0) {
        reduce_scatter<3 * SB>(red, lane);
#pragma unroll
        for (int g = 0; g < 3 * SB / NT; ++g) {
          constexpr int GPW = (SB % NT == 0) ? SB / NT : 1;   // groups per value kind
          const int which = g / GPW, q = (g % GPW) * NT + sg;
          float* dst = which == 0 ? s.s1 : (which == 1 ? s.s2 : s.yy);
          dst[c * RS + sb * SB + q] = red[g];
        }
      } else {
#pragma unroll
        for (int i = 0; i < 3 * SB; ++i) {
#pragma unroll
          for (int m = 1; m < NT; m <<= 1) red[i] += __shfl_xor_sync(0xffffffffu, red[i], m);
        }
        if (sg == 0) {
#pragma unroll
          for (int q = 0; q < SB; ++q) {
            s.s1[c * RS + sb * SB + q] = red[q];
            s.s2[c * RS + sb * SB + q] = red[SB + q];
            s.yy[c * RS + sb * SB + q] = red[2 * SB + q];
          }
        }
      }
      __syncthreads();
      // Sum dB, dC of this sub-block over the block's channels; one value per (position, state, B|C).
      for (int o = tid; o < SB * 2 * NPAD; o += NTHREADS) {
        float acc = 0.0f;
#pragma unroll 8
        for (int cc2 = 0; cc2 < CPB; ++cc2) acc += s.bc[cc2 * BCS + o];
        const int q = o / (2 * NPAD), r = o % (2 * NPAD);
        const int isC = r >= NPAD, nn = r % NPAD;
        const i64 l = l0 + sb * SB + q;
        if (nn < n && l < L) {
          float* dst = isC ? dC_o : dB_o;
          if (atomic) {
            atomicAdd(&dst[((i64)bi * n + nn) * L + l], acc);
          } else {
            dst[(((i64)db * batch + bi) * n + nn) * L + l] = acc;
          }
        }
      }
      __syncthreads();
    }

    // Epilogue for the tile: du, ddelta, dz and the per-channel sums for dD, d(delta_bias).
    {
      float uv[EPT], dv[EPT], gv[EPT], o1[EPT], o2[EPT];
      load_row(u + ch * L + p0, avail, vec, uv);
      load_row(delta + ch * L + p0, avail, vec, dv);
#if HAS_Z
      float zv[EPT], o3[EPT];
      load_row(z + ch * L + p0, avail, vec, zv);
      load_row(dout + ch * L + p0, avail, vec, gv);
#endif
      (void)gv;
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const int t = sg * EPT + e;
        const float s1 = s.s1[c * RS + t], s2 = s.s2[c * RS + t];
        const float dl = s.dl[c * RS + t], dy = s.dy[c * RS + t];
        const float uu = uv[e];
        o1[e] = fmaf(dl, s1, D_d * dy);                      // du
        float dd = fmaf(uu, s1, s2);                         // d dl
        if (softplus) dd *= sigmoid_f(dv[e] + bias_d);
        o2[e] = dd;
        const bool in = e < avail;
        dDacc += in ? dy * uu : 0.0f;
        dbacc += in ? dd : 0.0f;
#if HAS_Z
        const float zz = zv[e], sz = sigmoid_f(zz);
        const float ypre = fmaf(D_d, uu, s.yy[c * RS + t]);
        o3[e] = gv[e] * ypre * sz * fmaf(zz, 1.0f - sz, 1.0f);
#endif
      }
      store_row(du_o + ch * L + p0, avail, vec, o1);
      store_row(ddelta_o + ch * L + p0, avail, vec, o2);
#if HAS_Z
      store_row(dz_o + ch * L + p0, avail, vec, o3);
#endif
    }
    __syncthreads();
  }

#pragma unroll
  for (int m = 1; m < NT; m <<= 1) {
    dDacc += __shfl_xor_sync(0xffffffffu, dDacc, m);
    dbacc += __shfl_xor_sync(0xffffffffu, dbacc, m);
  }
  if (valid) {
    if (sg == 0) {
      dD_p[ch] = dDacc;
      dbias_p[ch] = dbacc;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nn = sg * 4 + j;
      if (nn < n) {
        dA_p[ch * n + nn] = dAacc[j];
        if (dinit) dinit[ch * n + nn] = h[j];
      }
    }
  }
}

// scan_bwd.cu -- the backward of the Mamba-1 selective scan (S6) for bytemamba (kernel version v6).
//
// What it computes: every gradient of bytemamba/ops/scan.py's selective_scan_ref (the definition) from the
// forward's chunk-boundary checkpoints (cuda/selective_scan.cu, ss_fwd):
//     dl_t = softplus(delta_t + delta_bias) (optional),  a_t = exp(dl_t A) (0 where reset_t),
//     x_t  = a_t x_{t-1} + dl_t u_t B_t,   y_t = <C_t, x_t> + D u_t,   out_t = y_t silu(z_t)
// backwards: with dy_t = dout_t silu(z_t) and the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1} (per state),
//     dB_t = sum_channels g_t dl_t u_t      dC_t = sum_channels dy_t x_t
//     du_t = dl_t <g_t, B_t> + D dy_t       ddelta_t = (u_t <g_t, B_t> + <A, a_t g_t x_{t-1}>) softplus'
//     dA  += dl_t a_t g_t x_{t-1}           dz_t = dout_t silu'(z_t) (y_t)      dD, ddelta_bias, dx_{-1}.
//
// Shapes (the launcher, bytemamba/ops/scan_cuda.py, owns layout; everything contiguous):
//     u, delta, z, dout, du, ddelta, dz : (batch, dim, L) in_t (float32, bfloat16 or float16)
//     B, C : (batch, n, L) in_t;  dB, dC : (batch, n, L) float32, or (dim blocks, batch, n, L) partials
//     A (dim, n); D, delta_bias (dim); dfinal, dinit (batch, dim, n); ckpt (batch*dim, ntiles, NPAD):
//     float32. reset (batch, L) uint8. n <= 64, padded to NPAD in {16, 32, 64}; any L >= 1.
//
// How it is launched: 128 threads a block; NT = NPAD/4 adjacent lanes own a channel, 4 states each; a block
// owns CPB = 128/NT channels of one batch row (grid.x = batch * ceil(dim/CPB)), grid.y = L-segments (nseg).
//   scan_bwd_agg (grid.y = nseg-1)  per segment but the first: the adjoint carried out of its start from a
//                                   zero carry at its end, and its decay product (segments run in parallel).
//   scan_bwd     (grid.y = nseg)    folds the later segments' aggregates into its carry, then walks its
//                                   tiles of TL = 64 positions (the checkpoint interval) in reverse:
//     stage      dl, dl*u, dy, silu'-factor as float rows, u raw, B and C as [t][n] rows, reset masks;
//     pass 1     rescan sub-blocks 0..NSB-2 of SB positions (SB = 8: 0..6) from the tile's checkpoint,
//                keeping each one's start state in shared memory (the last sub-block's start stays in
//                registers, so a tile is rescanned over TL - SB positions, not TL);
//     pass 2     per sub-block, last first: recompute its SB states in registers, run the adjoint backwards.
//                s1 = <g, B>, s2 = <A, a g x>, y are summed over a channel's lanes by a shuffle
//                reduce-scatter every NT positions and one lane a position finishes du, ddelta, dz. dB, dC
//                are summed over the warp's channels through a per-warp shared-memory transpose (BWD_DBC=1:
//                2 vector stores, then each lane adds one column) or a shuffle reduce-scatter (BWD_DBC=0),
//                then over the block's warps every FP positions, and added with float32 atomics (default)
//                or stored as per-block partials (deterministic mode: same bits every run).
// Against v5 (selective_scan.cu ss_bwd): dl*u staged once, not formed in each pass; dl, dl*u, dy read 4
// positions per 16-byte load; the last sub-block is not rescanned; s1/s2/y reduced every NT positions (fewer
// live registers); the cross-warp flush with fixed rows per thread; u staged raw.
// Compile-time knobs (-D): IN_DTYPE (0 f32, 1 bf16, 2 f16), NPAD, HAS_Z, HAS_RESET; BWD_DBC (1), BWD_FP
// (positions per cross-warp dB/dC flush, 8), BWD_MINB (blocks per SM the registers allow, 3), BWD_SB (8),
// BWD_PWB (1 or 2 buffers of per-warp dB/dC sums: with 2, one barrier a flush instead of 2), BWD_PF (1:
// cp.async copy of the next tile's raw inputs into shared memory while the current one is computed).
// The launcher compiles two builds and picks one by the blocks an SM the waves leave: 3 an SM
// (BWD_MINB=3, BWD_FP=8, BWD_DBC=0) or 2 (BWD_MINB=2, BWD_FP=16, BWD_DBC=1, BWD_PWB=2, BWD_PF=1, BWD_SB=16).
// docs/PERF.md has the timings.
//
// What it shares with the forward (in_t and its conversions, ex2 / softplus / sigmoid, the vector row load,
// cp.async, the block mapping NT / CPB / TL / EPT / RS, the flags) is in scan_common.cuh.

#include "scan_common.cuh"

#ifndef BWD_DBC
#define BWD_DBC 1
#endif
#ifndef BWD_FP
#define BWD_FP 8
#endif
#ifndef BWD_MINB
#define BWD_MINB 3
#endif

#define CW (32 / NT)               // channels per warp
#ifndef BWD_SB
#define BWD_SB 8
#endif
#ifndef BWD_PWB
#define BWD_PWB 1
#endif
#ifndef BWD_PF
#define BWD_PF 0
#endif
#define SB BWD_SB                  // backward sub-block (positions recomputed in registers at a time)
#define NSB (TL / SB)              // sub-blocks per tile
#define BS (NPAD + 4)              // padded row stride of the B / C tiles ([t][n])
#define FP BWD_FP                  // positions per cross-warp dB / dC flush (a multiple of SB)
#define PWS (2 * NPAD + 1)         // padded row of the per-warp dB | dC sums
#define PWSZ ((NTHREADS / 32) * FP * PWS)   // one flush window of per-warp sums
#define WS (2 * NPAD + 16)         // row of the per-warp transpose buffer (16-byte stores conflict-free)
#define USE_WB (BWD_DBC && NT < 16)

// cp.async prefetch of the next tile (BWD_PF=1) for 2-byte inputs (fp32 would take the shared memory of a
// block an SM) where a thread's row slice is whole 16-byte chunks.
#define IN_BYTES ((IN_DTYPE == 0) ? 4 : 2)
#define PF_ON (BWD_PF && IN_BYTES == 2 && (EPT * IN_BYTES) % 16 == 0)   // bf16 / fp16, n <= 32

// EPT consecutive elements of one row (p points at the first; avail = how many exist there; vec: p aligned).
__device__ __forceinline__ void load_row(const in_t* __restrict__ p, i64 avail, bool vec, float (&v)[EPT]) {
  if (vec && avail >= EPT) {
    load_vec(p, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < EPT; ++i) v[i] = (i < avail) ? to_f(p[i]) : 0.0f;
}

// SB consecutive floats of a staged row (16-byte loads; p 16-byte aligned).
__device__ __forceinline__ void ldsb(const float* p, float (&v)[SB]) {
#pragma unroll
  for (int i = 0; i < SB; i += 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[i / 4];
    v[i] = a.x; v[i + 1] = a.y; v[i + 2] = a.z; v[i + 3] = a.w;
  }
}

// 4 floats of shared memory, loaded afresh (volatile: the compiler may not keep an earlier load of the same
// address live in registers instead, which is what register pressure asks for here).
__device__ __forceinline__ float4 lds4v(const float* p) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"((unsigned)__cvta_generic_to_shared(p)));
  return v;
}

struct BwdSmem {
  float dl[CPB * RS];              // softplus(delta + bias)
  float dup[CPB * RS];             // dl * u
  float dy[CPB * RS];              // dout * silu(z): the gradient of y
  float dzf[CPB * RS];             // dout * silu'(z): dz = dzf * y
  float B[TL * BS];
  float C[TL * BS];
  float m[TL];                     // 0 where reset, else 1
  float xck[(NSB - 1) * 4 * NTHREADS];       // state at the start of sub-blocks 0..NSB-2, [sb][j][tid]
  float pw[BWD_PWB * PWSZ];                  // per-warp dB | dC sums over its channels, per position
#if USE_WB
  alignas(16) float wb[(NTHREADS / 32) * CW * WS];   // per-warp transpose of one position's dB | dC
#endif
  alignas(16) in_t u[CPB * RRS];   // u as given
#if PF_ON
  alignas(16) in_t rraw[4][CPB * RRS];   // the next tile's u, delta, z, dout as given (cp.async)
  alignas(16) in_t rbc[2][NPAD * RRS];   // and its B, C rows
#endif
};

// One position t of the recurrence (passes 1 and 2): the decays a (0 where reset) and the state xout after t
// from the state xin before it.
__device__ __forceinline__ void state_step(const BwdSmem& s, int t, int sg, float dl, float dup, const float (&A2)[4],
                                           const float (&xin)[4], float (&a)[4], float (&xout)[4]) {
  const float4 b4 = *reinterpret_cast<const float4*>(&s.B[t * BS + sg * 4]);
  const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
#if HAS_RESET
  const float mk = s.m[t];
#endif
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    a[j] = ex2_mufu(dl * A2[j]);
#if HAS_RESET
    a[j] *= mk;
#endif
    xout[j] = fmaf(a[j], xin[j], dup * bb[j]);
  }
}

// Stage one tile. AGG (the segment aggregate) needs only dl, dy and C.
template <bool AGG>
__device__ __forceinline__ void bwd_stage(BwdSmem& s, const in_t* __restrict__ u, const in_t* __restrict__ delta,
                                          const in_t* __restrict__ z, const in_t* __restrict__ dout,
                                          const in_t* __restrict__ Bm, const in_t* __restrict__ Cm,
                                          const u8* __restrict__ reset, int c, int sg, i64 ch, int bi, int n,
                                          i64 L, i64 l0, i64 avail, bool vec, float bias_d, bool softplus,
                                          bool pf) {
  const i64 p0 = l0 + sg * EPT;
  float rdv[EPT], rgv[EPT], ruv[EPT];
#if HAS_Z
  float rzv[EPT];
#endif
#if PF_ON
  if (pf) {            // a whole, aligned tile whose raw rows are already in shared memory
    const int so = c * RRS + sg * EPT;
    load_row(&s.rraw[1][so], EPT, true, rdv);
    load_row(&s.rraw[3][so], EPT, true, rgv);
    load_row(&s.rraw[0][so], EPT, true, ruv);
#if HAS_Z
    load_row(&s.rraw[2][so], EPT, true, rzv);
#endif
  } else
#endif
  {
    load_row(delta + ch * L + p0, avail, vec, rdv);
    load_row(dout + ch * L + p0, avail, vec, rgv);
    if (!AGG) load_row(u + ch * L + p0, avail, vec, ruv);
#if HAS_Z
    load_row(z + ch * L + p0, avail, vec, rzv);
#endif
  }
  const int av = (int)max((i64)0, min(avail, (i64)EPT));   // 32-bit compares below
#pragma unroll
  for (int e = 0; e < EPT; e += 4) {
    float4 dl4, dup4, dy4, dz4;
    float* dlp = &dl4.x;
    float* dupp = &dup4.x;
    float* dyp = &dy4.x;
    float* dzp = &dz4.x;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const bool in = e + q < av;
      const float xv = rdv[e + q] + bias_d;
      const float dl = in ? (softplus ? softplus_f(xv) : xv) : 0.0f;
      const float g = rgv[e + q];
      float dy = g, dzf = 0.0f;
#if HAS_Z
      const float zz = rzv[e + q];
      const float sz = sigmoid_f(zz);
      dy = g * zz * sz;
      dzf = g * sz * fmaf(zz, 1.0f - sz, 1.0f);
#endif
      dlp[q] = dl;
      dyp[q] = in ? dy : 0.0f;
      if (!AGG) {
        const float uu = in ? ruv[e + q] : 0.0f;
        dupp[q] = dl * uu;
        dzp[q] = in ? dzf : 0.0f;
        from_f(uu, s.u[c * RRS + sg * EPT + e + q]);
      }
    }
    *reinterpret_cast<float4*>(&s.dl[c * RS + sg * EPT + e]) = dl4;
    *reinterpret_cast<float4*>(&s.dy[c * RS + sg * EPT + e]) = dy4;
    if (!AGG) {
      *reinterpret_cast<float4*>(&s.dup[c * RS + sg * EPT + e]) = dup4;
      *reinterpret_cast<float4*>(&s.dzf[c * RS + sg * EPT + e]) = dz4;
    }
  }
  // Whole aligned tiles as 16-byte loads, thread -> (row nn = idx % NPAD, chunk idx / NPAD).
  if (vec && l0 + TL <= L) {
    constexpr int CHK = 16 / (int)sizeof(in_t), NCH = NPAD * (TL / CHK);
#pragma unroll
    for (int i0 = 0; i0 < NCH; i0 += NTHREADS) {
      const int idx = i0 + (int)threadIdx.x;
      if (NCH % NTHREADS != 0 && idx >= NCH) break;
      const int nn = idx % NPAD, kc = idx / NPAD;
      const bool in = nn < n;
      const i64 off = ((i64)bi * n + (in ? nn : 0)) * L + l0 + kc * CHK;
      uint4 wb = make_uint4(0u, 0u, 0u, 0u), wc = wb;
#if PF_ON
      if (pf) {
        if (in) {
          wb = *reinterpret_cast<const uint4*>(&s.rbc[0][nn * RRS + kc * CHK]);
          wc = *reinterpret_cast<const uint4*>(&s.rbc[1][nn * RRS + kc * CHK]);
        }
      } else
#endif
      if (in) {
        if (!AGG) wb = *reinterpret_cast<const uint4*>(Bm + off);
        wc = *reinterpret_cast<const uint4*>(Cm + off);
      }
      const in_t* eb = reinterpret_cast<const in_t*>(&wb);
      const in_t* ec = reinterpret_cast<const in_t*>(&wc);
#pragma unroll
      for (int i = 0; i < CHK; ++i) {
        if (!AGG) s.B[(kc * CHK + i) * BS + nn] = to_f(eb[i]);
        s.C[(kc * CHK + i) * BS + nn] = to_f(ec[i]);
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < TL * NPAD; idx += NTHREADS) {
      const int nn = idx / TL, t = idx % TL;
      const bool in = nn < n && l0 + t < L;
      const i64 off = ((i64)bi * n + nn) * L + l0 + t;
      if (!AGG) s.B[t * BS + nn] = in ? to_f(Bm[off]) : 0.0f;
      s.C[t * BS + nn] = in ? to_f(Cm[off]) : 0.0f;
    }
  }
#if HAS_RESET
  for (int t = threadIdx.x; t < TL; t += NTHREADS)
    s.m[t] = (l0 + t < L && reset[(i64)bi * L + l0 + t]) ? 0.0f : 1.0f;
#endif
}

#if PF_ON
// Start copying tile l0's raw rows into shared memory: each thread its own channel slice of u, delta, z,
// dout (the slice it stages), and its 16-byte chunks of the B, C rows (rows >= n are never read).
__device__ __forceinline__ void bwd_prefetch(BwdSmem& s, const in_t* __restrict__ u, const in_t* __restrict__ delta,
                                             const in_t* __restrict__ z, const in_t* __restrict__ dout,
                                             const in_t* __restrict__ Bm, const in_t* __restrict__ Cm, int c,
                                             int sg, i64 ch, int bi, int n, i64 L, i64 l0) {
  constexpr int CHK = 16 / (int)sizeof(in_t), NCH = NPAD * (TL / CHK);
  const i64 g = ch * L + l0 + sg * EPT;
  const int so = c * RRS + sg * EPT;
#pragma unroll
  for (int k = 0; k < EPT; k += CHK) {
    cp_async16(&s.rraw[0][so + k], u + g + k);
    cp_async16(&s.rraw[1][so + k], delta + g + k);
#if HAS_Z
    cp_async16(&s.rraw[2][so + k], z + g + k);
#endif
    cp_async16(&s.rraw[3][so + k], dout + g + k);
  }
#pragma unroll
  for (int i0 = 0; i0 < NCH; i0 += NTHREADS) {
    const int idx = i0 + (int)threadIdx.x;
    if (NCH % NTHREADS != 0 && idx >= NCH) break;
    const int nn = idx % NPAD, kc = idx / NPAD;
    if (nn < n) {
      const i64 off = ((i64)bi * n + nn) * L + l0 + kc * CHK;
      cp_async16(&s.rbc[0][nn * RRS + kc * CHK], Bm + off);
      cp_async16(&s.rbc[1][nn * RRS + kc * CHK], Cm + off);
    }
  }
  cp_async_commit();
}
#endif

// A predicated global store of v (converted to in_t) with no branch (ptxas keeps `if (p) store` as a branch, which
// splits the backward's sub-block into separately scheduled blocks).
__device__ __forceinline__ void st_if(bool p, in_t* dst, float v) {
  in_t e;
  from_f(v, e);
#if IN_DTYPE == 0
  asm volatile("{ .reg .pred q; setp.ne.u32 q, %0, 0; @q st.global.f32 [%1], %2; }" ::"r"((unsigned)p), "l"(dst), "f"(e)
               : "memory");
#else
  asm volatile("{ .reg .pred q; setp.ne.u32 q, %0, 0; @q st.global.u16 [%1], %2; }" ::"r"((unsigned)p), "l"(dst),
               "h"(e) : "memory");
#endif
}

#define BWD_PARAMS                                                                                      \
  const in_t *__restrict__ u, const in_t *__restrict__ delta, const in_t *__restrict__ z,             \
      const in_t *__restrict__ Bm, const in_t *__restrict__ Cm, const float *__restrict__ A,          \
      const float *__restrict__ Dv, const float *__restrict__ bias, const u8 *__restrict__ reset,     \
      const in_t *__restrict__ dout, const float *__restrict__ ckpt, const float *__restrict__ dfinal, \
      float *__restrict__ agg, in_t *__restrict__ du_o, in_t *__restrict__ ddelta_o,                  \
      in_t *__restrict__ dz_o, float *__restrict__ dB_o, float *__restrict__ dC_o,                    \
      float *__restrict__ dA_p, float *__restrict__ dD_p, float *__restrict__ dbias_p,                \
      float *__restrict__ dinit, int batch, int dim, long long L, int n, int ntiles, int seg_tiles,   \
      int nseg, int flags

// Per L-segment (all but the first): the adjoint carried out of the segment's start from a zero carry at
// its end, and the segment's decay product.
extern "C" __global__ void __launch_bounds__(NTHREADS) scan_bwd_agg(BWD_PARAMS) {
  BwdSmem& s = *reinterpret_cast<BwdSmem*>(smem_raw);
  const int tid = threadIdx.x;
  const int c = tid / NT, sg = tid % NT;
  const int dblocks = (dim + CPB - 1) / CPB;
  const int bi = blockIdx.x / dblocks, db = blockIdx.x % dblocks;
  const int d = db * CPB + c;
  const bool valid = d < dim;
  const i64 ch = (i64)bi * dim + (valid ? d : 0);
  const int seg = blockIdx.y + 1;
  const bool softplus = flags & F_SOFTPLUS, aligned = flags & F_ALIGNED;
  const float LOG2E = 1.4426950408889634f;
  float A2[4], h[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int nn = sg * 4 + j;
    A2[j] = (valid && nn < n) ? A[(i64)d * n + nn] * LOG2E : 0.0f;
    h[j] = 0.0f;
  }
  const float bias_d = (valid && bias) ? bias[d] : 0.0f;
  float sumdl = 0.0f, keep = 1.0f;
  const int k0 = seg * seg_tiles, k1 = min(ntiles, k0 + seg_tiles);
  for (int k = k1 - 1; k >= k0; --k) {
    const i64 l0 = (i64)k * TL;
    const i64 avail = valid ? L - (l0 + sg * EPT) : 0;
    __syncthreads();
    bwd_stage<true>(s, u, delta, z, dout, Bm, Cm, reset, c, sg, ch, bi, n, L, l0, avail, aligned, bias_d, softplus,
                    false);
    __syncthreads();
#pragma unroll 4
    for (int t = TL - 1; t >= 0; --t) {
      const float dl = s.dl[c * RS + t], dy = s.dy[c * RS + t];
      float4 c4 = *reinterpret_cast<const float4*>(&s.C[t * BS + sg * 4]);
      float cc[4] = {c4.x, c4.y, c4.z, c4.w};
#if HAS_RESET
      const float mk = s.m[t];
      keep *= mk;
#endif
      sumdl += dl;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float a = ex2_mufu(dl * A2[j]);
#if HAS_RESET
        a *= mk;
#endif
        h[j] = a * fmaf(cc[j], dy, h[j]);
      }
    }
  }
  if (valid) {
    float* ag = agg + (ch * (nseg - 1) + (seg - 1)) * 2 * NPAD;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      ag[sg * 4 + j] = keep * ex2_mufu(A2[j] * sumdl);
      ag[NPAD + sg * 4 + j] = h[j];
    }
  }
}

extern "C" __global__ void __launch_bounds__(NTHREADS, BWD_MINB) scan_bwd(BWD_PARAMS) {
  BwdSmem& s = *reinterpret_cast<BwdSmem*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int c = tid / NT, sg = tid % NT;
  const int dblocks = (dim + CPB - 1) / CPB;
  const int bi = blockIdx.x / dblocks, db = blockIdx.x % dblocks;
  const int d = db * CPB + c;
  const bool valid = d < dim;
  const i64 ch = (i64)bi * dim + (valid ? d : 0);
  const int seg = blockIdx.y;
  const bool softplus = flags & F_SOFTPLUS, aligned = flags & F_ALIGNED, atomic = flags & F_ATOMIC;
  const float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

  float A2[4], h[4], dAacc[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int nn = sg * 4 + j;
    A2[j] = (valid && nn < n) ? A[(i64)d * n + nn] * LOG2E : 0.0f;
    h[j] = (dfinal && valid && nn < n) ? dfinal[ch * n + nn] : 0.0f;
    dAacc[j] = 0.0f;
  }
  for (int k = nseg - 1; k > seg; --k) {     // fold the adjoint aggregates of the later segments
    const float* ag = agg + (ch * (nseg - 1) + (k - 1)) * 2 * NPAD;
#pragma unroll
    for (int j = 0; j < 4; ++j) h[j] = fmaf(ag[sg * 4 + j], h[j], ag[NPAD + sg * 4 + j]);
  }
  const float bias_d = (valid && bias) ? bias[d] : 0.0f;
  const float D_d = (valid && Dv) ? Dv[d] : 0.0f;
  float dDacc = 0.0f, dbacc = 0.0f;
  const int k0 = seg * seg_tiles, k1 = min(ntiles, k0 + seg_tiles);
  const float* dlrow = &s.dl[c * RS];
  const float* duprow = &s.dup[c * RS];
  const float* dyrow = &s.dy[c * RS];
  // The dB / dC flush: this thread's window position and first row (rows fl_r0 + i * NTHREADS / FP), and
  // the (batch row, dim block) rows it adds to (atomic) or writes (per-block partials).
  static_assert((FP * 2 * NPAD) % NTHREADS == 0 && FP % SB == 0, "flush window");
  const int fl_p = tid % FP, fl_r0 = tid / FP;
  const i64 prow = (atomic ? (i64)bi : (i64)db * batch + bi) * n * L;
  float* const dB_row = dB_o + prow;
  float* const dC_row = dC_o + prow;
  int pwsel = 0;                       // offset of the current window's per-warp sums (BWD_PWB buffers)
  const bool fullc = dim - db * CPB >= CPB;
  bool pf = false;                     // the current tile's raw rows are in shared memory (BWD_PF)
  (void)fullc;

  for (int k = k1 - 1; k >= k0; --k) {
    const i64 l0 = (i64)k * TL;
    const i64 avail = valid ? L - (l0 + sg * EPT) : 0;
    // The finish's output rows of this tile and the positions of it that exist, worked out once a tile, not a
    // position (session 8: -1% at the shapes of the 3-an-SM build; neutral in the 2-an-SM build).
    in_t* const du_t = du_o + ch * L + l0;
    in_t* const dd_t = ddelta_o + ch * L + l0;
#if HAS_Z
    in_t* const dz_t = dz_o + ch * L + l0;
#endif
    const int tlim = valid ? (int)min((i64)TL, L - l0) : 0;
    // The tile's checkpoint, loaded before the staging so that the two global round trips overlap.
    const float4 x4 = valid ? *reinterpret_cast<const float4*>(&ckpt[(ch * ntiles + k) * NPAD + sg * 4])
                            : make_float4(0.f, 0.f, 0.f, 0.f);
#if PF_ON
    cp_async_wait_all();           // this tile's raw rows (prefetched during the previous tile), if any
#endif
    __syncthreads();
    bwd_stage<false>(s, u, delta, z, dout, Bm, Cm, reset, c, sg, ch, bi, n, L, l0, avail, aligned, bias_d, softplus,
                     pf);
    __syncthreads();
#if PF_ON
    // The next tile (k - 1: whole, as only the last tile can be partial) is copied into shared memory while
    // this one is computed, where its rows are aligned and the block's channels all exist.
    pf = aligned && fullc && k - 1 >= k0;
    if (pf) bwd_prefetch(s, u, delta, z, dout, Bm, Cm, c, sg, ch, bi, n, L, (i64)(k - 1) * TL);
#endif

    // Pass 1: rescan sub-blocks 0..NSB-2 from the checkpoint, keeping each one's start state; x ends as the
    // start state of the last sub-block.
    float x[4] = {x4.x, x4.y, x4.z, x4.w};
#pragma unroll 1
    for (int sb = 0; sb < NSB - 1; ++sb) {
#pragma unroll
      for (int j = 0; j < 4; ++j) s.xck[(sb * 4 + j) * NTHREADS + tid] = x[j];
      float dlv[SB], dupv[SB];
      ldsb(dlrow + sb * SB, dlv);
      ldsb(duprow + sb * SB, dupv);
#pragma unroll
      for (int q = 0; q < SB; ++q) {
        float a[4], xn[4];
        state_step(s, sb * SB + q, sg, dlv[q], dupv[q], A2, x, a, xn);
#pragma unroll
        for (int j = 0; j < 4; ++j) x[j] = xn[j];
      }
    }

    // Pass 2: sub-blocks in reverse; recompute SB states in registers, then the adjoint backwards.
#pragma unroll 1
    for (int sb = NSB - 1; sb >= 0; --sb) {
      float xs[SB + 1][4], as[SB][4];
      if (sb == NSB - 1) {
#pragma unroll
        for (int j = 0; j < 4; ++j) xs[0][j] = x[j];
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) xs[0][j] = s.xck[(sb * 4 + j) * NTHREADS + tid];
      }
      {
        float dlv[SB], dupv[SB];
        ldsb(dlrow + sb * SB, dlv);
        ldsb(duprow + sb * SB, dupv);
#pragma unroll
        for (int q = 0; q < SB; ++q) state_step(s, sb * SB + q, sg, dlv[q], dupv[q], A2, xs[q], as[q], xs[q + 1]);
      }
      float4 dl4, dup4, dy4;       // dl, dl*u, dy of positions (q & ~3) .. +3, loaded afresh
      constexpr int RN = (SB % NT == 0) ? NT : SB;   // positions whose s1, s2, y are reduced together
      float red[3 * RN];   // s1, s2, y of those positions
      const int pbase = (sb * SB) % FP;
      // Position q of the sub-block, once s1, s2, y are summed over the channel's lanes (one lane a position).
      auto finish = [&](int q, float s1, float s2, float yv) {
        const int t = sb * SB + q;
        // No branch: positions past L (last tile) and channels past dim read staged zeros, so all but the stores and
        // the delta_bias sum run unconditionally and the sub-block stays one basic block for the scheduler (a branch
        // here split it in 2 a sub-block; session 8: -2% at the main shape, -0.5..-1.4% at the others).
        const bool in = t < tlim;
        const float dl = dlrow[t], dy = dyrow[t], uu = to_f(s.u[c * RRS + t]);
        const float ser = dl * (1.0f - dl * (0.5f - dl * (1.0f / 6.0f - dl * (1.0f / 24.0f - dl * (1.0f / 120.0f)))));
        const float ex = 1.0f - ex2_mufu(dl * -1.4426950408889634f);
        const float sig = softplus ? (dl < 0.1f ? ser : ex) : 1.0f;
        const float dd = fmaf(uu, s1, s2 * LN2) * sig;
        dDacc = fmaf(dy, uu, dDacc);        // dy = u = 0 past L
        dbacc += in ? dd : 0.0f;
        st_if(in, du_t + t, fmaf(dl, s1, D_d * dy));
        st_if(in, dd_t + t, dd);
#if HAS_Z
        st_if(in, dz_t + t, s.dzf[c * RS + t] * fmaf(D_d, uu, yv));
#endif
      };
#pragma unroll
      for (int q = SB - 1; q >= 0; --q) {
        const int t = sb * SB + q;
        if (q % 4 == 3) {
          dl4 = lds4v(dlrow + t - 3);
          dup4 = lds4v(duprow + t - 3);
          dy4 = lds4v(dyrow + t - 3);
        }
        const float dl = (&dl4.x)[q % 4], dy = (&dy4.x)[q % 4], dup = (&dup4.x)[q % 4];
        const float4 b4 = *reinterpret_cast<const float4*>(&s.B[t * BS + sg * 4]);
        const float4 c4 = *reinterpret_cast<const float4*>(&s.C[t * BS + sg * 4]);
        const float bb[4] = {b4.x, b4.y, b4.z, b4.w};
        const float cc[4] = {c4.x, c4.y, c4.z, c4.w};
        float s1 = 0.f, s2 = 0.f, yv = 0.f;
        float v[8];          // dB_j (j < 4), dC_j of this lane's 4 states
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float g = fmaf(cc[j], dy, h[j]);
          s1 = fmaf(g, bb[j], s1);
          v[j] = g * dup;
          const float hn = as[q][j] * g;
          const float w = hn * xs[q][j];
          s2 = fmaf(A2[j], w, s2);
          dAacc[j] = fmaf(dl, w, dAacc[j]);
          yv = fmaf(cc[j], xs[q + 1][j], yv);
          v[4 + j] = dy * xs[q + 1][j];
          h[j] = hn;
        }
        red[q % RN] = s1;
        red[RN + q % RN] = s2;
        red[2 * RN + q % RN] = yv;
        float* pwrow = &s.pw[pwsel + (warp * FP + pbase + q) * PWS];
#if USE_WB
        // Sum dB, dC over the warp's CW channels: each lane stores its 8 values (two 16-byte stores), then
        // adds up column(s) `lane` of the CW rows.
        float* wbw = &s.wb[warp * CW * WS];
        const int cw = lane / NT;
        *reinterpret_cast<float4*>(&wbw[cw * WS + sg * 4]) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(&wbw[cw * WS + NPAD + sg * 4]) = make_float4(v[4], v[5], v[6], v[7]);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 2 * NPAD / 32; ++i) {
          const int o = lane + 32 * i;
          float acc = wbw[o];
#pragma unroll
          for (int r = 1; r < CW; ++r) acc += wbw[r * WS + o];
          pwrow[o] = acc;
        }
        __syncwarp();
#else
        // Sum dB, dC over the warp's channels (lanes that differ in bits >= NT): reduce-scatter.
        int base = 0;
#pragma unroll
        for (int m = 16, cnt = 8; m >= NT; m >>= 1, cnt >>= 1) {
          const bool hi = (lane & m) != 0;
#pragma unroll
          for (int i = 0; i < cnt / 2; ++i) {
            const float send = hi ? v[i] : v[i + cnt / 2];
            const float kp = hi ? v[i + cnt / 2] : v[i];
            v[i] = kp + __shfl_xor_sync(0xffffffffu, send, m);
          }
          base += hi ? cnt / 2 : 0;
        }
        constexpr int KEPT = (NT >= 16) ? 4 : ((NT == 8) ? 2 : 1);
#pragma unroll
        for (int i = 0; i < KEPT; ++i) {
          const int idx = base + i, which = idx >> 2, j = idx & 3;
          pwrow[which * NPAD + sg * 4 + j] = v[i];
        }
#endif
        if constexpr (SB % NT == 0) {
          if (q % NT == 0) {
            // Positions q .. q+NT-1 done: reduce-scatter s1, s2, y over the NT lanes of the channel
            // (afterwards red[g * NT] holds the sum of element lane % NT of group g), and finish.
#pragma unroll
            for (int m = NT / 2; m >= 1; m >>= 1) {
              const bool hi = (lane & m) != 0;
#pragma unroll
              for (int g = 0; g < 3; ++g) {
#pragma unroll
                for (int i = 0; i < m; ++i) {
                  const float lo_v = red[g * NT + i], hi_v = red[g * NT + i + m];
                  const float send = hi ? lo_v : hi_v;
                  const float kp = hi ? hi_v : lo_v;
                  red[g * NT + i] = kp + __shfl_xor_sync(0xffffffffu, send, m);
                }
              }
            }
            finish(q + sg, red[0], red[NT], red[2 * NT]);
          }
        }
      }
      if constexpr (SB % NT != 0) {
        // NT = 16 > SB: full butterfly sums, then lane q % NT finishes position q.
#pragma unroll
        for (int i = 0; i < 3 * SB; ++i) {
#pragma unroll
          for (int m = 1; m < NT; m <<= 1) red[i] += __shfl_xor_sync(0xffffffffu, red[i], m);
        }
#pragma unroll
        for (int q = 0; q < SB; ++q)
          if (q % NT == sg) finish(q, red[q], red[SB + q], red[2 * SB + q]);
      }
      if ((sb * SB) % FP == 0) {
        // Flush the window [sb*SB, sb*SB + FP): sum the warps' partials, add to dB, dC.
        __syncthreads();
        const i64 l = l0 + sb * SB + fl_p;
#pragma unroll
        for (int i = 0; i < FP * 2 * NPAD / NTHREADS; ++i) {
          const int r = fl_r0 + i * (NTHREADS / FP), nn = r % NPAD;
          float acc = s.pw[pwsel + fl_p * PWS + r];
#pragma unroll
          for (int w = 1; w < NTHREADS / 32; ++w) acc += s.pw[pwsel + (w * FP + fl_p) * PWS + r];
          if (nn < n && l < L) {
            float* dst = (r >= NPAD ? dC_row : dB_row) + (i64)nn * L + l;
            if (atomic) atomicAdd(dst, acc);
            else *dst = acc;
          }
        }
#if BWD_PWB == 2
        pwsel = PWSZ - pwsel;          // the next window goes to the other buffer: no second barrier
#else
        __syncthreads();               // the buffer is rewritten by the next window
#endif
      }
    }
  }

#pragma unroll
  for (int m = 1; m < NT; m <<= 1) {
    dDacc += __shfl_xor_sync(0xffffffffu, dDacc, m);
    dbacc += __shfl_xor_sync(0xffffffffu, dbacc, m);
  }
  if (valid) {
    const i64 sch = (i64)seg * batch * dim + ch;      // per-segment partials, summed by the launcher
    if (sg == 0) {
      dD_p[sch] = dDacc;
      dbias_p[sch] = dbacc;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nn = sg * 4 + j;
      if (nn < n) {
        dA_p[sch * n + nn] = dAacc[j];
        if (dinit && seg == 0) dinit[ch * n + nn] = h[j];
      }
    }
  }
}

// Shared-memory bytes of the backward, read once by the launcher.
extern "C" __global__ void scan_bwd_smem(int* out) { out[0] = (int)sizeof(BwdSmem); }

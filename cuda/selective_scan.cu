// selective_scan.cu -- the forward of the Mamba-1 selective scan (S6) for bytemamba (its backward: scan_bwd.cu).
//
// What it computes (see bytemamba/ops/scan.py, selective_scan_ref, the definition):
//     dl_t  = softplus(delta_t + delta_bias)            (bias, softplus optional)
//     x_t   = exp(dl_t * A) * x_{t-1} + dl_t * u_t * B_t  (x_{t-1} := 0 where reset_t; x_{-1} = initial state)
//     y_t   = <C_t, x_t> + D * u_t ;  out_t = y_t * silu(z_t)   (D, z optional)
// per channel (batch b, dim d), over n states (n <= 64, padded to NPAD in {16,32,64}).
//
// Shapes (the Python wrapper, bytemamba/ops/scan_cuda.py, owns layout and makes everything contiguous):
//     u, delta, z, out : (batch, dim, L)  in_t (float32, bfloat16 or float16)
//     B, C             : (batch, n, L)    in_t
//     A (dim, n); D, delta_bias (dim); states (batch, dim, n): float32. reset (batch, L) uint8.
//     ckpt  : (batch*dim, ntiles, NPAD) float32, the state before each tile of TL positions
//             (written by the forward, read by the backward: memory batch*dim*n*L/TL).
// Arithmetic is float32 throughout.
//
// How it is launched: 128 threads per block (64 in the launcher's second build). A channel is owned by NT = NPAD/4
// adjacent lanes, each holding 4 of its states in registers, for FWD_CPT = 2 channels a thread; a block holds
// FCPB = FWD_CPT * threads / NT channels of one batch row (grid.x = batch * ceil(dim/FCPB), channels past dim are
// masked). Each block walks its positions in tiles of TL = 64, staging coalesced tiles of the inputs through
// shared memory.
//   ss_fwd_agg  (grid.y = nseg-1)  per L-segment: the segment's end state from zero and its decay
//                                  product, so that segments can run in parallel (long L, few channels).
//   ss_fwd      (grid.y = nseg)    folds the aggregates of earlier segments into its start state, then
//                                  scans its segment: out, checkpoints, final state.
// The forward keeps B and C of a tile as float rows, row (n % 4) * NT + n / 4 for state n, so that a lane
// reads one state for 4 positions per 16-byte load and the NT lanes of a channel hit distinct banks; the
// staging of a tile (softplus, dl * u, B/C conversion) is done once per element, branch-free, and u, z
// stay packed in registers until the epilogue (docs/PERF.md "Selective scan" has the instruction counts).
// Compile-time knobs (-D): IN_DTYPE (0 f32, 1 bf16, 2 f16), NPAD, HAS_Z, HAS_RESET, POLY_J (bit mask of
// the per-thread states j in 0..3 whose exp2 is a polynomial on the FMA pipes instead of MUFU.EX2),
// FWD_UNR (forward positions per unrolled step, default 16), FWD_MINB (forward blocks per SM, 3 x 128 / threads),
// FWD_SPP (1, the default: the forward's softplus with one MUFU op, a polynomial log1p; 0: softplus_f),
// FWD_SIG (1, the default: the forward's SiLU gate on one MUFU op, tanh.approx, for bf16 only), FWD_SPL (1, the
// default: the forward's softplus as ln 2 * lg2(1 + e), two MUFU ops and half the instructions, for bf16 / fp16
// only; fp32 keeps FWD_SPP). FWD_SPL + FWD_SIG: 1.049 -> 1.016 ms at the main shape (lead's H200 call, 12:47
// UTC). The v8a mapping (FWD_SPT=2: 2 states a thread, 1.286 ms) was deleted; it is in git at commit 1e19b9e.
// FWD_CPT (channels a thread, default 2 since session 7: one thread's B / C loads serve both; ncu had found the
// single-channel forward bound by its L1 data pipe), FWD_NTHR (threads a block, default 128; the launcher picks a
// 64-thread build where the 128-thread blocks leave an SM's third slot empty in a single wave, the main shape).
// docs/PERF.md "Session 7" has the measurements, and the candidates measured slower and removed (FWD_PAD, FWD_BCH,
// FWD_TU, FWD_AGGP: commit d54d1b1 has the last three).
// What it shares with the backward (in_t and its conversions, ex2 / softplus / sigmoid, cp.async, the block
// mapping, the flags) is in scan_common.cuh.

#define SCAN_CVTA_ASM 1            // cp.async addresses by inline cvta (scan_common.cuh smem_u32)
// FWD_NTHR: threads a forward block (default 128). The launcher's second build, FWD_NTHR=64 (32 channels at n 16 with
// FWD_CPT 2), runs where the 128-thread blocks are one wave at <= 2 an SM (the main shape): the same warps, twice
// the blocks, so a block's barriers hold 2 warps, not 4 (session 7: 0.965 vs 0.984 ms there). The launcher reads the
// block size from ss_fwd_smem.
#ifdef FWD_NTHR
#define NTHREADS FWD_NTHR
#endif
#include "scan_common.cuh"

#ifndef POLY_J
#define POLY_J 0
#endif

#ifndef FWD_CPT
#define FWD_CPT 2                  // channels a forward thread scans (4 states of each): B / C loads serve them all
#endif
#define FCPB (CPB * FWD_CPT)       // forward channels a block; thread (c, sg) scans channels c, c + CPB, ...
#ifndef FWD_UNR
#define FWD_UNR (FWD_CPT > 2 ? 8 : 16)
#endif
#define UNR ((NT > FWD_UNR) ? NT : FWD_UNR)   // forward inner unroll (a multiple of NT)
#ifndef FWD_SPP
#define FWD_SPP 1
#endif
#ifndef FWD_SPL
#define FWD_SPL 1
#endif

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

// ------------------------------------------------------------------------------------------------
// Asynchronous staging of raw tiles (cp.async, 16-byte chunks) into shared memory.

// nrows rows of TL elements (row r at g + r*L + l0) into raw[r*TL + t]; rows >= nvalid and positions
// >= L read as zero. 16-byte copies when the whole tile is in range and aligned, else element by element.
template <typename T>
__device__ __forceinline__ void load_rows(T* raw, const T* __restrict__ g, int nrows, int nvalid, i64 L, i64 l0,
                                          bool vec) {
  constexpr int CH = 16 / (int)sizeof(T);
  constexpr int RS_ = TL + 16 / (int)sizeof(T);
  if (vec && l0 + TL <= L) {
    for (int idx = threadIdx.x; idx < nrows * (TL / CH); idx += NTHREADS) {
      const int r = idx / (TL / CH), k = idx % (TL / CH);
      if (r < nvalid) cp_async16(&raw[r * RS_ + k * CH], g + (i64)r * L + l0 + k * CH);
      else *reinterpret_cast<uint4*>(&raw[r * RS_ + k * CH]) = make_uint4(0u, 0u, 0u, 0u);
    }
  } else {
    for (int idx = threadIdx.x; idx < nrows * TL; idx += NTHREADS) {
      const int r = idx / TL, t = idx % TL;
      raw[r * RS_ + t] = (r < nvalid && l0 + t < L) ? g[(i64)r * L + l0 + t] : (T)0;
    }
  }
}

// A thread's EPT raw elements of one staged row kept packed in 32-bit words (half the registers
// of floats in bf16/fp16), and element e of them.
constexpr int RW = EPT * (int)sizeof(in_t) / 4;
__device__ __forceinline__ void raw_words(const in_t* p, unsigned (&w)[RW]) {
  if constexpr (RW % 4 == 0) {
#pragma unroll
    for (int k = 0; k < RW / 4; ++k) {
      const uint4 v = reinterpret_cast<const uint4*>(p)[k];
      w[4 * k] = v.x; w[4 * k + 1] = v.y; w[4 * k + 2] = v.z; w[4 * k + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < RW / 2; ++k) {
      const uint2 v = reinterpret_cast<const uint2*>(p)[k];
      w[2 * k] = v.x; w[2 * k + 1] = v.y;
    }
  }
}
__device__ __forceinline__ float word_f(const unsigned (&w)[RW], int e) {
#if IN_DTYPE == 0
  return __uint_as_float(w[e]);
#else
  return to_f((u16)((e & 1) ? (w[e >> 1] >> 16) : (w[e >> 1] & 0xffffu)));
#endif
}

// The forward's softplus with one MUFU op instead of two (FWD_SPP=1, the default): log1p(e) = e * P(e) for
// e = exp(-|x|) in (0, 1], P a degree-9 polynomial fitted to log1p(e)/e on [0, 1] (relative error <= 1.7e-7
// evaluated in float32, checked on 4e6 points), so no division. Above x = 20 (torch returns x) e * P(e) < 2.1e-9 is below
// half an ulp of x, so x + e * P(e) rounds to x: no select needed.
__device__ __forceinline__ float softplus_fwd(float x) {
#if FWD_SPL && IN_DTYPE != 0
  // FWD_SPL=1, bf16 / fp16 inputs only: log1p(e) = ln 2 * lg2(1 + e) on MUFU.LG2, 2 MUFU ops and ~7 instructions
  // instead of 1 and ~14. 1 + e is rounded: relative error <= 9e-6 for x > -5, 7e-5 at x = -7, 1.3e-3 at x = -10
  // (float32 emulation against float64, lg2 taken exact; lg2.approx adds ~1e-7 absolute): below what the 2-byte
  // delta's own rounding does to softplus there (half an ulp of x at |x| = 10 moves it by ~3%).
  // Above x ~ 16.6, 1 + e rounds to 1: x exactly (torch returns x above 20).
  const float e = ex2_mufu(fabsf(x) * -1.4426950408889634f);
  float l;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(1.0f + e));
  return fmaf(l, 0.6931471805599453f, fmaxf(x, 0.0f));
#elif FWD_SPP
  const float e = ex2_mufu(fabsf(x) * -1.4426950408889634f);
  float p = -3.243850777e-03f;
  p = fmaf(p, e, 1.985067688e-02f);
  p = fmaf(p, e, -5.695805699e-02f);
  p = fmaf(p, e, 1.060350537e-01f);
  p = fmaf(p, e, -1.530550420e-01f);
  p = fmaf(p, e, 1.967590898e-01f);
  p = fmaf(p, e, -2.495412827e-01f);
  p = fmaf(p, e, 3.332996070e-01f);
  p = fmaf(p, e, -4.999990165e-01f);
  p = fmaf(p, e, 1.0f);
  return fmaf(e, p, fmaxf(x, 0.0f));
#else
  return softplus_f(x);
#endif
}

// The forward's gate: sigmoid_f (two MUFU ops), or with FWD_SIG=1 and bf16 inputs 0.5 + 0.5 tanh(x / 2) on
// tanh.approx (one MUFU op; relative error of tanh <= 2^-10.99, so the gate is off by <= 2.5e-4, under half
// a bf16 ulp of the output; fp16 / fp32 keep sigmoid_f).
#ifndef FWD_SIG
#define FWD_SIG 1
#endif
__device__ __forceinline__ float sigmoid_fwd(float x) {
#if FWD_SIG && IN_DTYPE == 1
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.5f * x));
  return fmaf(0.5f, t, 0.5f);
#else
  return sigmoid_f(x);
#endif
}

// ------------------------------------------------------------------------------------------------
// Forward.

struct FwdSmem {
  float dl[FCPB * RS];         // softplus(delta + bias)
  float du[FCPB * RS];         // dl * u; overwritten by y = <C, x> as the scan passes
  float B[NPAD * RS];          // state n in row (n % 4) * NT + n / 4
  float C[NPAD * RS];
  float m[TL];                 // 0 where reset, else 1
  alignas(16) in_t ru[FCPB * RRS];  // raw next tile (cp.async destinations)
  alignas(16) in_t rd[FCPB * RRS];
  alignas(16) in_t rz[FCPB * RRS];
  alignas(16) in_t rB[NPAD * RRS];
  alignas(16) in_t rC[NPAD * RRS];
  alignas(16) u8 rr[TL + 16];
};

// A group of 4 positions of a thread's scan inputs: dl, dl * u of its channels, B and C of its 4 states.
struct FwdGrp {
  float dl[FWD_CPT][4], du[FWD_CPT][4];
  float b[4][4], c[4][4];  // [state j][position q]: one 16-byte load per state and 4 positions
};

template <bool AGG>
__device__ __forceinline__ void fwd_load_grp(const FwdSmem& s, int c, int sg, int t, FwdGrp& g) {
#pragma unroll
  for (int k = 0; k < FWD_CPT; ++k) {
    float4 dl4 = *reinterpret_cast<const float4*>(&s.dl[(c + k * CPB) * RS + t]);
    float4 du4 = *reinterpret_cast<const float4*>(&s.du[(c + k * CPB) * RS + t]);
    g.dl[k][0] = dl4.x; g.dl[k][1] = dl4.y; g.dl[k][2] = dl4.z; g.dl[k][3] = dl4.w;
    g.du[k][0] = du4.x; g.du[k][1] = du4.y; g.du[k][2] = du4.z; g.du[k][3] = du4.w;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float4 b4 = *reinterpret_cast<const float4*>(&s.B[(j * NT + sg) * RS + t]);
    g.b[j][0] = b4.x; g.b[j][1] = b4.y; g.b[j][2] = b4.z; g.b[j][3] = b4.w;
    if (!AGG) {
      float4 c4 = *reinterpret_cast<const float4*>(&s.C[(j * NT + sg) * RS + t]);
      g.c[j][0] = c4.x; g.c[j][1] = c4.y; g.c[j][2] = c4.z; g.c[j][3] = c4.w;
    }
  }
}

// The scan over one group (positions t0 + tt .. + 3 of the tile); y partials into yv[k][tt + q].
template <bool AGG>
__device__ __forceinline__ void fwd_step_grp(const FwdSmem& s, const FwdGrp& g, int t0, int tt,
                                             const float (&A2)[FWD_CPT][4], float (&x)[FWD_CPT][4],
                                             float (&sumdl)[FWD_CPT], float& keep, float (&yv)[FWD_CPT][UNR]) {
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int t = t0 + tt + q;
    (void)t;
#if HAS_RESET
    float mk = s.m[t];
    if (AGG) keep *= mk;
#endif
#pragma unroll
    for (int k = 0; k < FWD_CPT; ++k) {
      float dl = g.dl[k][q], du = g.du[k][q];
      float a[4];
      a[0] = ex2_j<0>(dl * A2[k][0]);
      a[1] = ex2_j<1>(dl * A2[k][1]);
      a[2] = ex2_j<2>(dl * A2[k][2]);
      a[3] = ex2_j<3>(dl * A2[k][3]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#if HAS_RESET
        a[j] *= mk;
#endif
        x[k][j] = fmaf(a[j], x[k][j], du * g.b[j][q]);
      }
      if (AGG) {
        sumdl[k] += dl;
        yv[k][tt + q] = 0.0f;
      } else {
        yv[k][tt + q] = fmaf(g.c[3][q], x[k][3], fmaf(g.c[2][q], x[k][2], fmaf(g.c[1][q], x[k][1], g.c[0][q] * x[k][0])));
      }
    }
  }
}

// One forward tile of a thread's channels (4 states each). AGG: no outputs (sum of dl and reset seen are tracked).
template <bool AGG>
__device__ __forceinline__ void fwd_tile_scan(const FwdSmem& s, int c, int sg, int lane,
                                              const float (&A2)[FWD_CPT][4], float (&x)[FWD_CPT][4],
                                              float (&sumdl)[FWD_CPT], float& keep, float* ysm) {
#pragma unroll 1
  for (int t0 = 0; t0 < TL; t0 += UNR) {
    float yv[FWD_CPT][UNR];
#pragma unroll
    for (int tt = 0; tt < UNR; tt += 4) {
      FwdGrp g;
      fwd_load_grp<AGG>(s, c, sg, t0 + tt, g);
      fwd_step_grp<AGG>(s, g, t0, tt, A2, x, sumdl, keep, yv);
    }
    if (!AGG) {
#pragma unroll
      for (int k = 0; k < FWD_CPT; ++k) {
        reduce_scatter<UNR>(yv[k], lane);
#pragma unroll
        for (int g = 0; g < UNR / NT; ++g) ysm[(c + k * CPB) * RS + t0 + g * NT + sg] = yv[k][g];
      }
    }
  }
}

template <bool AGG>
__device__ __forceinline__ void fwd_issue(FwdSmem& s, const in_t* __restrict__ u, const in_t* __restrict__ delta,
                                          const in_t* __restrict__ z, const in_t* __restrict__ Bm,
                                          const in_t* __restrict__ Cm, const u8* __restrict__ reset, int bi, int dim,
                                          int db, int n, i64 L, int k, bool aligned, bool raligned) {
  const i64 l0 = (i64)k * TL;
  const i64 row0 = (i64)bi * dim + (i64)db * FCPB;
  const int nvalid = min(FCPB, dim - db * FCPB);
  load_rows(s.ru, u + row0 * L, FCPB, nvalid, L, l0, aligned);
  load_rows(s.rd, delta + row0 * L, FCPB, nvalid, L, l0, aligned);
#if HAS_Z
  if (!AGG) load_rows(s.rz, z + row0 * L, FCPB, nvalid, L, l0, aligned);
#endif
  load_rows(s.rB, Bm + (i64)bi * n * L, NPAD, n, L, l0, aligned);
  if (!AGG) load_rows(s.rC, Cm + (i64)bi * n * L, NPAD, n, L, l0, aligned);
#if HAS_RESET
  load_rows(s.rr, reset + (i64)bi * L, 1, 1, L, l0, raligned);
#endif
  cp_async_commit();
}

// Issue of the next raw tile: where the tile is whole, aligned and the block's channels all exist (the common case), each
// thread copies fixed 16-byte chunks (its row rc and chunk kc, rows rc + i*RSTEP), with no per-chunk
// index arithmetic beyond one 64-bit add; otherwise the general path above. Raw B/C rows >= n are never
// read (convert_BC writes zeros for them), so the fast path skips them.
constexpr int CHK = 16 / (int)sizeof(in_t);     // elements per 16-byte chunk
constexpr int CPR = TL / CHK;                    // chunks per row
constexpr int RSTEP = NTHREADS / CPR;               // rows covered by one pass of the block
template <bool AGG>
__device__ __forceinline__ void fwd_issue5(FwdSmem& s, const in_t* __restrict__ u, const in_t* __restrict__ delta,
                                           const in_t* __restrict__ z, const in_t* __restrict__ Bm,
                                           const in_t* __restrict__ Cm, const u8* __restrict__ reset, int bi,
                                           int dim, int db, int n, i64 L, int k, bool aligned, bool raligned,
                                           bool fullc) {
  const i64 l0 = (i64)k * TL;
  if (aligned && fullc && l0 + TL <= L) {
    const int tid = threadIdx.x, kc = tid % CPR, rc = tid / CPR;
    const i64 g = ((i64)bi * dim + (i64)db * FCPB + rc) * L + l0 + kc * CHK;
#pragma unroll
    for (int r = 0; r < FCPB; r += RSTEP) {
      if (FCPB % RSTEP == 0 || r + rc < FCPB) {
        const i64 o = g + (i64)r * L;
        const int so = (r + rc) * RRS + kc * CHK;
        cp_async16(&s.ru[so], u + o);
        cp_async16(&s.rd[so], delta + o);
#if HAS_Z
        if (!AGG) cp_async16(&s.rz[so], z + o);
#endif
      }
    }
    const i64 gb = ((i64)bi * n + rc) * L + l0 + kc * CHK;
#pragma unroll
    for (int r = 0; r < NPAD; r += RSTEP) {
      if (r + rc < n) {
        const i64 o = gb + (i64)r * L;
        const int so = (r + rc) * RRS + kc * CHK;
        cp_async16(&s.rB[so], Bm + o);
        if (!AGG) cp_async16(&s.rC[so], Cm + o);
      }
    }
#if HAS_RESET
    load_rows(s.rr, reset + (i64)bi * L, 1, 1, L, l0, raligned);
#endif
    cp_async_commit();
  } else {
    fwd_issue<AGG>(s, u, delta, z, Bm, Cm, reset, bi, dim, db, n, L, k, aligned, raligned);
  }
}

// raw B (NPAD x TL, [n][t]) -> float rows (row (n % 4) * NT + n / 4), 16 bytes at a time; rows >= n as zeros.
__device__ __forceinline__ void convert_BC(float* dst, const in_t* raw, int n) {
  constexpr int NCH = NPAD * CPR;
#pragma unroll
  for (int i0 = 0; i0 < NCH; i0 += NTHREADS) {
    const int idx = i0 + (int)threadIdx.x;
    if (NCH % NTHREADS != 0 && idx >= NCH) break;
    const int r = idx / CPR, kc = idx % CPR;
    uint4 w = *reinterpret_cast<const uint4*>(&raw[r * RRS + kc * CHK]);
    if (r >= n) w = make_uint4(0u, 0u, 0u, 0u);
    const in_t* e = reinterpret_cast<const in_t*>(&w);
    float* d = &dst[((r & 3) * NT + (r >> 2)) * RS + kc * CHK];
#pragma unroll
    for (int i = 0; i < CHK; i += 4)
      *reinterpret_cast<float4*>(d + i) = make_float4(to_f(e[i]), to_f(e[i + 1]), to_f(e[i + 2]), to_f(e[i + 3]));
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
  const int dblocks = (dim + FCPB - 1) / FCPB;
  const int bi = blockIdx.x / dblocks, db = blockIdx.x % dblocks;
  int d[FWD_CPT];        // the thread's channels: c, c + CPB, ... of the block
  bool valid[FWD_CPT];
  i64 ch[FWD_CPT];
#pragma unroll
  for (int k = 0; k < FWD_CPT; ++k) {
    d[k] = db * FCPB + k * CPB + c;
    valid[k] = d[k] < dim;
    ch[k] = (i64)bi * dim + (valid[k] ? d[k] : 0);
  }
  const int seg = blockIdx.y;
  const bool softplus = flags & F_SOFTPLUS, aligned = flags & F_ALIGNED, raligned = flags & F_RALIGNED;
  const float LOG2E = 1.4426950408889634f;

  float A2[FWD_CPT][4], x[FWD_CPT][4], bias_d[FWD_CPT], D_d[FWD_CPT];
#pragma unroll
  for (int k = 0; k < FWD_CPT; ++k) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nn = sg * 4 + j;
      A2[k][j] = (valid[k] && nn < n) ? A[(i64)d[k] * n + nn] * LOG2E : 0.0f;
      x[k][j] = 0.0f;
    }
    bias_d[k] = (valid[k] && bias) ? bias[d[k]] : 0.0f;
    D_d[k] = (valid[k] && Dv) ? Dv[d[k]] : 0.0f;
  }
  if (!AGG) {
#pragma unroll
    for (int k = 0; k < FWD_CPT; ++k) {
      if (init && valid[k]) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (sg * 4 + j < n) x[k][j] = init[ch[k] * n + sg * 4 + j];
      }
      for (int sp = 0; sp < seg; ++sp) {   // fold the aggregates of the segments before this one
        const float* ag = agg + (ch[k] * (nseg - 1) + sp) * 2 * NPAD;
#pragma unroll
        for (int j = 0; j < 4; ++j) x[k][j] = fmaf(ag[sg * 4 + j], x[k][j], ag[NPAD + sg * 4 + j]);
      }
    }
  }
  float sumdl[FWD_CPT], keep = 1.0f;
#pragma unroll
  for (int k = 0; k < FWD_CPT; ++k) sumdl[k] = 0.0f;
  const int k0 = seg * seg_tiles, k1 = min(ntiles, k0 + seg_tiles);

  const bool fullc = dim - db * FCPB >= FCPB;
#define FWD_ISSUE(kk) fwd_issue5<AGG>(s, u, delta, z, Bm, Cm, reset, bi, dim, db, n, L, kk, aligned, raligned, fullc)
  FWD_ISSUE(k0);
  for (int kt = k0; kt < k1; ++kt) {
    const i64 l0 = (i64)kt * TL;
    const i64 p0 = l0 + sg * EPT;
    i64 avail[FWD_CPT];
#pragma unroll
    for (int k = 0; k < FWD_CPT; ++k) avail[k] = valid[k] ? L - p0 : 0;
    cp_async_wait_all();
    __syncthreads();                                 // raw tile kt is in; the previous tile is done
    // u and z stay raw (packed) in registers until the epilogue: half the registers in bf16/fp16.
    unsigned uw[FWD_CPT][RW], zw[FWD_CPT][RW];
    (void)zw;
#pragma unroll
    for (int k = 0; k < FWD_CPT; ++k) {
      const int row = c + k * CPB;
      float uv[EPT], dv[EPT];
      raw_words(&s.ru[row * RRS + sg * EPT], uw[k]);
#pragma unroll
      for (int e = 0; e < EPT; ++e) uv[e] = word_f(uw[k], e);
#if HAS_Z
      if (!AGG) raw_words(&s.rz[row * RRS + sg * EPT], zw[k]);
#endif
      load_vec(&s.rd[row * RRS + sg * EPT], dv);
      // Positions past L (last tile only) are masked in a separate branch, with 32-bit compares.
#pragma unroll
      for (int e = 0; e < EPT; ++e) {
        const float xv = dv[e] + bias_d[k];
        dv[e] = softplus ? softplus_fwd(xv) : xv;
      }
      if (avail[k] < EPT) {
        const int av = (int)max(avail[k], (i64)0);
#pragma unroll
        for (int e = 0; e < EPT; ++e) dv[e] = e < av ? dv[e] : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < EPT; e += 4) {
        *reinterpret_cast<float4*>(&s.dl[row * RS + sg * EPT + e]) =
            make_float4(dv[e], dv[e + 1], dv[e + 2], dv[e + 3]);
        *reinterpret_cast<float4*>(&s.du[row * RS + sg * EPT + e]) =
            make_float4(dv[e] * uv[e], dv[e + 1] * uv[e + 1], dv[e + 2] * uv[e + 2], dv[e + 3] * uv[e + 3]);
      }
    }
    convert_BC(s.B, s.rB, n);
    if (!AGG) convert_BC(s.C, s.rC, n);
#if HAS_RESET
    for (int t = tid; t < TL; t += NTHREADS) s.m[t] = s.rr[t] ? 0.0f : 1.0f;
#endif
    __syncthreads();                                 // staged floats ready; the raw buffer is free
    if (kt + 1 < k1) FWD_ISSUE(kt + 1);
    if (!AGG) {
#pragma unroll
      for (int k = 0; k < FWD_CPT; ++k) {
        if (valid[k]) {
          float4 xs = make_float4(x[k][0], x[k][1], x[k][2], x[k][3]);
          *reinterpret_cast<float4*>(&ckpt[(ch[k] * ntiles + kt) * NPAD + sg * 4]) = xs;
        }
      }
    }
    fwd_tile_scan<AGG>(s, c, sg, lane, A2, x, sumdl, keep, s.du);
    if (!AGG) {
      __syncthreads();
#pragma unroll
      for (int k = 0; k < FWD_CPT; ++k) {
        const int row = c + k * CPB;
        float ov[EPT];
#pragma unroll
        for (int e = 0; e < EPT; e += 4) {
          const float4 y4 = *reinterpret_cast<const float4*>(&s.du[row * RS + sg * EPT + e]);
          const float ys[4] = {y4.x, y4.y, y4.z, y4.w};
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            float yv = fmaf(D_d[k], word_f(uw[k], e + q), ys[q]);
#if HAS_Z
            const float zz = word_f(zw[k], e + q);
            yv *= zz * sigmoid_fwd(zz);
#endif
            ov[e + q] = yv;
          }
        }
        store_row(out + ch[k] * L + p0, avail[k], aligned, ov);
      }
    }
  }
#undef FWD_ISSUE
  if (AGG) {
#pragma unroll
    for (int k = 0; k < FWD_CPT; ++k) {
      if (valid[k]) {
        float* ag = agg + (ch[k] * (nseg - 1) + seg) * 2 * NPAD;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          ag[sg * 4 + j] = keep * ex2_mufu(A2[k][j] * sumdl[k]);
          ag[NPAD + sg * 4 + j] = x[k][j];
        }
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < FWD_CPT; ++k) {
      if (final_state && valid[k] && seg == nseg - 1) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (sg * 4 + j < n) final_state[ch[k] * n + sg * 4 + j] = x[k][j];
      }
    }
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

#ifndef FWD_MINB
#define FWD_MINB ((FWD_CPT == 1 ? 4 : FWD_CPT == 2 ? 3 : 2) * 128 / NTHREADS)
#endif
extern "C" __global__ void __launch_bounds__(NTHREADS, FWD_MINB) ss_fwd(FWD_PARAMS) { fwd_body<false>(FWD_ARGS); }
extern "C" __global__ void __launch_bounds__(NTHREADS) ss_fwd_agg(FWD_PARAMS) { fwd_body<true>(FWD_ARGS); }

// Shared-memory bytes of the forward, its channels a block and its threads a block, read once by the launcher.
extern "C" __global__ void ss_fwd_smem(int* out) {
  out[0] = (int)sizeof(FwdSmem);
  out[1] = FCPB;
  out[2] = NTHREADS;
}

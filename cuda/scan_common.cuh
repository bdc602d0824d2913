// scan_common.cuh -- what the selective scan's forward (selective_scan.cu) and backward (scan_bwd.cu) share:
// the specialisation's defaults, the block mapping, the input type in_t with its conversions, ex2 / softplus /
// sigmoid on the MUFU unit, a thread's vector row load, the cp.async wrappers, and the flags word the launcher passes
// (bytemamba/ops/scan_cuda.py). Included by those two files only; bytemamba/ops/_cupy.py read_source pastes it
// into the source NVRTC compiles (nvcc: -I cuda).

#ifndef IN_DTYPE
#define IN_DTYPE 1                 // 0 float32, 1 bfloat16, 2 float16
#endif
#ifndef NPAD
#define NPAD 16                    // n padded to 16, 32 or 64
#endif
#ifndef HAS_Z
#define HAS_Z 1
#endif
#ifndef HAS_RESET
#define HAS_RESET 0
#endif

#ifndef NTHREADS
#define NTHREADS 128               // threads a block (the forward may set FWD_NTHR)
#endif
#define NT (NPAD / 4)              // lanes per channel (4 states each)
#define CPB (NTHREADS / NT)        // channels per block
#define TL 64                      // tile length = checkpoint interval
#define EPT (TL / NT)              // staged elements per thread (one row, EPT consecutive positions)
#define RS (TL + 4)                // padded row stride of per-(channel, position) float tiles

// The flags word (kernel argument `flags`).
#define F_SOFTPLUS 1               // dl = softplus(delta + bias)
#define F_ALIGNED 2                // the (batch, dim, L) / (batch, n, L) rows allow 16-byte loads
#define F_ATOMIC 4                 // backward: dB, dC added with atomics (else per-block partials)
#define F_RALIGNED 8               // forward: the reset rows allow 16-byte loads

typedef unsigned short u16;
typedef unsigned char u8;
typedef long long i64;

#if IN_DTYPE == 0
typedef float in_t;
#else
typedef u16 in_t;
#endif
#define RRS (TL + 16 / (int)sizeof(in_t))   // raw staged row stride (elements): +16 bytes against bank conflicts

extern __shared__ float4 smem_raw[];

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

// softplus as torch computes it (identity above 20), branchless: max(x, 0) + log1p(e), e = exp(-|x|) in
// (0, 1] through ex2.approx directly (its argument is <= 0: no range fix needed), and
// log1p(e) = 2 atanh(s), s = e / (2 + e) <= 1/3, the series cut after s^11 (truncation ~1.4e-7 relative,
// about one float ulp; no cancellation for small e).
__device__ __forceinline__ float softplus_f(float x) {
  const float e = ex2_mufu(fabsf(x) * -1.4426950408889634f);
  const float s = __fdividef(e, 2.0f + e), s2 = s * s;
  float p = 1.0f / 11.0f;
  p = fmaf(p, s2, 1.0f / 9.0f);
  p = fmaf(p, s2, 1.0f / 7.0f);
  p = fmaf(p, s2, 1.0f / 5.0f);
  p = fmaf(p, s2, 1.0f / 3.0f);
  p = fmaf(p, s2, 1.0f);
  const float r = fmaf(s + s, p, fmaxf(x, 0.0f));
  return x > 20.0f ? x : r;
}
// 1 / (1 + 2^(-x log2 e)): ex2 overflows to inf for x < -88, and the approximate division gives 0 there.
__device__ __forceinline__ float sigmoid_f(float x) {
  return __fdividef(1.0f, 1.0f + ex2_mufu(x * -1.4426950408889634f));
}

// EPT consecutive elements of a row as floats, by 16-byte loads (8-byte where EPT elements are 8 bytes); p aligned.
__device__ __forceinline__ void load_vec(const in_t* p, float (&v)[EPT]) {
  constexpr int BYTES = EPT * (int)sizeof(in_t);
  if constexpr (BYTES % 16 == 0) {
#pragma unroll
    for (int k = 0; k < BYTES / 16; ++k) {
      uint4 w = reinterpret_cast<const uint4*>(p)[k];
      const in_t* e = reinterpret_cast<const in_t*>(&w);
#pragma unroll
      for (int i = 0; i < 16 / (int)sizeof(in_t); ++i) v[k * (16 / (int)sizeof(in_t)) + i] = to_f(e[i]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < BYTES / 8; ++k) {
      uint2 w = reinterpret_cast<const uint2*>(p)[k];
      const in_t* e = reinterpret_cast<const in_t*>(&w);
#pragma unroll
      for (int i = 0; i < 8 / (int)sizeof(in_t); ++i) v[k * (8 / (int)sizeof(in_t)) + i] = to_f(e[i]);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Asynchronous copies (cp.async, 16-byte chunks) from global into shared memory.

// The 32-bit shared-memory address of p. Two spellings of the same conversion: the forward defines
// SCAN_CVTA_ASM (inline cvta, the form its builds were timed with), the backward uses the intrinsic. ptxas
// schedules the two kernels differently with the other spelling (checked on the cubins), so unifying them
// is a change to measure, not a clean-up.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
#if SCAN_CVTA_ASM
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
#else
  return (unsigned)__cvta_generic_to_shared(p);
#endif
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

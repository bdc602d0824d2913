// fused_common.cuh -- what the two fused decode-step kernels (decode_fused.cu: a cluster per batch row;
// decode_fused_rows.cu: a cluster per tile of rows) share: the storage type in_t (-DIN_DTYPE: 1 bfloat16,
// 2 float16; anything else compiles as bfloat16, the launchers refuse float32) with its conversions and
// rounding, SiLU, the compiled model shape, and the sm_90 PTX wrappers for thread-block clusters and
// mbarriers.
// Included by those files, and by decode_persistent.cu with FUSED_COMMON_NO_SHAPE defined (the types, their
// conversions, SiLU and the mbarrier wrappers, not the fused kernels' shape); bytemamba/ops/_cupy.py
// read_source pastes it into the source NVRTC compiles.

#ifndef FUSED_COMMON_NO_SHAPE
// The model shape both kernels are compiled for (bytemamba/ops/fused_step.py SHAPE) and the cluster.
#define NCTA 8                  // CTAs a cluster
#define NTHR 512                // threads a CTA
#define DM 256                  // d_model
#define EI 512                  // d_inner
#define EC (EI / NCTA)          // channels per CTA: 64
#define NS 16                   // d_state
#define RK 16                   // dt_rank
#define NX (RK + 2 * NS)        // x_proj rows: 48
#define NV 256                  // vocabulary
#define KC 4                    // conv taps
#endif

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

__device__ __forceinline__ float rnd(float v) { return to_f(from_f(v)); }   // the rounding to in_t, as float
__device__ __forceinline__ float silu_f(float v) { return v / (1.f + __expf(-v)); }
// Shorter forms on the MUFU unit (the persistent step's P3F build): 2^x by ex2.approx.ftz (no denormal fix-up),
// softplus as max(x, 0) + ln 2 * lg2(1 + 2^(-|x| log2 e)) (relative error <= 1e-5 for x > -5, 1.3e-3 at x = -10,
// where softplus is ~4.5e-5 and its share of a state update is as small; exactly x above ~16.6), SiLU with the
// approximate division (x / inf = 0 for x < -88, the limit).
__device__ __forceinline__ float ex2_fast(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
__device__ __forceinline__ float softplus_fast(float x) {
    float l;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(l) : "f"(1.f + ex2_fast(fabsf(x) * -1.4426950408889634f)));
    return fmaf(l, 0.6931471805599453f, fmaxf(x, 0.f));
}
__device__ __forceinline__ float silu_fast(float v) { return __fdividef(v, 1.f + ex2_fast(v * -1.4426950408889634f)); }

// Thread-block clusters and mbarrier transaction counts need sm_90 (the kernels compile to nothing below it).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
__device__ __forceinline__ unsigned sm_addr(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned cluster_id() {
    unsigned r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}
// the address of `p` (this CTA's shared memory) in CTA `rank`'s shared-memory window
__device__ __forceinline__ unsigned remote(const void* p, unsigned rank) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(sm_addr(p)), "r"(rank));
    return r;
}
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(sm_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(sm_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    asm volatile("{\n\t.reg .pred p;\n"
                 "WAIT_%=:\n\t"
                 "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n\t"
                 "@!p bra WAIT_%=;\n}" ::"r"(sm_addr(bar)), "r"(parity) : "memory");
}
#endif

// cuda_emu.h -- just enough of CUDA to run the selective-scan kernels (cuda/selective_scan.cu) on a CPU, for tests
// that check their logic where there is no GPU (tests/helpers/cuda_emu.py builds them with g++).
//
// A launch runs its blocks one after another; a block's threads are std::threads, __syncthreads is a barrier of
// the block, warp shuffles exchange through a per-warp buffer between two barriers of the warp. Shared memory is a
// buffer per block. cp.async copies at once (its waits are no-ops). The PTX the kernels write inline is replaced
// before compiling (cuda_emu.py) by the functions below: ex2 / lg2 / tanh by the C library's (not the MUFU
// approximations: tests compare with tolerances), the 2-byte float conversions round to nearest even.
// Not emulated: anything the scan kernels do not use (async barriers, tensor cores, clusters, most atomics).
#pragma once
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3u {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

template <class T>
inline T min(T a, T b) { return b < a ? b : a; }
template <class T>
inline T max(T a, T b) { return a < b ? b : a; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; std::memcpy(&v, &f, 4); return v; }
inline unsigned __float_as_uint(float f) { unsigned v; std::memcpy(&v, &f, 4); return v; }

namespace emu {

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<float> xchg;              // 32 floats a warp
  std::vector<float4> smem;
  int nthreads = 0;
};

inline thread_local Block* cur = nullptr;
inline thread_local dim3u tid_, bid_;

inline float4* smem() { return cur->smem.data(); }
inline void sync_block() { cur->bar->arrive_and_wait(); }
inline void sync_warp() { cur->warp_bar[tid_.x / 32]->arrive_and_wait(); }
inline float shfl_xor(float v, int m) {
  const int lane = tid_.x % 32, w = tid_.x / 32;
  float* x = &cur->xchg[32 * w];
  x[lane] = v;
  sync_warp();
  const float r = x[lane ^ m];
  sync_warp();
  return r;
}

// Every block of grid (gx, gy) in turn, `nthreads` threads each running `body`.
inline void launch(int gx, int gy, int nthreads, int smem_bytes, const std::function<void()>& body) {
  for (int by = 0; by < gy; ++by)
    for (int bx = 0; bx < gx; ++bx) {
      Block b;
      b.nthreads = nthreads;
      b.bar = std::make_unique<std::barrier<>>(nthreads);
      for (int w = 0; w < (nthreads + 31) / 32; ++w)
        b.warp_bar.push_back(std::make_unique<std::barrier<>>(min(32, nthreads - 32 * w)));
      b.xchg.assign(32 * ((nthreads + 31) / 32), 0.0f);
      b.smem.assign((smem_bytes + 15) / 16, float4{NAN, NAN, NAN, NAN});   // never read before written
      std::vector<std::thread> ts;
      for (int t = 0; t < nthreads; ++t)
        ts.emplace_back([&, t] {
          cur = &b;
          tid_ = {unsigned(t), 0, 0};
          bid_ = {unsigned(bx), unsigned(by), 0};
          body();
        });
      for (auto& t : ts) t.join();
    }
}

// The inline PTX of the kernels, as functions (cuda_emu.py rewrites each asm statement into a call).
inline float ex2(float x) { return std::exp2(x); }
inline float lg2(float x) { return std::log2(x); }
inline float tanh_(float x) { return std::tanh(x); }
inline float h2f(uint16_t h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline uint16_t f2h(float f) { _Float16 v = (_Float16)f; uint16_t h; std::memcpy(&h, &v, 2); return h; }
inline uint16_t f2bf(float f) {                       // round to nearest even (NaN kept quiet)
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float4 lds4(unsigned addr) { return *reinterpret_cast<const float4*>((const char*)cur->smem.data() + addr); }
inline unsigned smem_addr(const void* p) { return unsigned((const char*)p - (const char*)cur->smem.data()); }
inline void cp16(unsigned dst, const void* src) { std::memcpy((char*)cur->smem.data() + dst, src, 16); }

}  // namespace emu

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }

#define threadIdx (emu::tid_)
#define blockIdx (emu::bid_)
#define __syncthreads() emu::sync_block()
#define __syncwarp(...) emu::sync_warp()
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor((v), (m))
#define __cvta_generic_to_shared(p) emu::smem_addr(p)

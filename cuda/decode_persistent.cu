// decode_persistent.cu -- every layer of one decoding step of byte353m-shaped ByteMambaLMs (d_model 1024,
// d_inner 2048, d_state 16, dt_rank 64, d_conv 4; bf16 or fp16 compute: -DIN_DTYPE 1 / 2) for up to 64 batch
// rows, as ONE persistent kernel: 128 CTAs (one per SM, all resident: cooperative launch) in clusters of 2, grid-wide
// barriers between the phases of a layer. For bytemamba.
//
// What it computes: the embedding lookup and, for every layer, RMSNorm, in_proj, conv step + SiLU, x_proj,
// dt_proj + softplus + state update + D skip + z gate, out_proj, residual add; the residual stream (fp32) is
// left in `residual` (the final norm and the head run after it, in PyTorch / cuBLAS). The PyTorch reference is
// bytemamba.ops.fused_step.fused_step_ref (the same roundings to in_t where autocast stores: xz, the conv
// output, x_proj's output, y, out_proj's output). Differences of order only: the norm's 1 / rms multiplies
// in_proj's fp32 output (in_proj(rnd(res * w)) / rms), not its input; dt_proj runs on the tensor cores with W_dt
// split into in_t hi + lo parts (~16 bits of W_dt; dt_low is in_t already); the exps, softplus and the gate's SiLU
// use the MUFU forms of fused_common.cuh (ex2_fast, softplus_fast, silu_fast).
//
// Ownership (CTA c of 128, pair p = c / 2, rank k = c % 2 in its cluster): channels 16c..16c+15 (conv and SSM
// states, dt_proj rows, A, D, x_proj's columns), residual columns 8c..8c+7 (the residual, kept in shared memory).
// A pair splits in_proj and out_proj along K, so each CTA streams half of G and of Y from L2: in_proj's 64 outputs
// of the pair (x / z of CTA 2p, then of 2p+1) over k-steps 32k..32k+31, out_proj's 16 columns of the pair over
// channels 1024k..; each CTA sends the partial sums of its peer's outputs by st.async into the peer's shared memory
// (xz_s, red_s: free then) and adds the peer's to its own. Per layer, phases between grid barriers (4 a layer):
//   P1 in_proj (mma.sync m16n8k16; the normed activations G, 64 x 1024 in mma B-fragment order, written by the
//      column owners, stream from L2 through a ring of 16 KB shared-memory slots by bulk copies; warp w: m-tile
//      w / 2, n-tiles 4 (w % 2)..+3), the exchange, the rows' 1/rms (each CTA of a pair sums the owners' partial
//      sums of squares of one half of the CTAs and sends the 64 half-sums with its in_proj partials); the SSM
//      states come into the ring by 64 bulk copies of 1 KB as soon as the G stream is done; conv step + SiLU (the
//      windows loaded as float4s, staged in the ring before the exchange's CTA barrier, written back after x_proj);
//      x_proj partial sums over the CTA's 16 channels -> global
//   P2 reduce-scatter: CTA c sums 48 of the 6144 x_proj outputs over the 128 partials (fixed order)
//   P3 dt for the CTA's 16 channels by mma (+ softplus) into shared memory; the state update by warp-owned rows
//      (warp w rows 8w..8w+7, two a step: lane / 16 the row, lane % 16 the channel, a channel's float4s in the order
//      (j + channel / 2) % 4 so that 8 lanes hit 8 bank groups), y and the gate; each pair of finished rows written
//      back by its warp with coalesced 16-byte stores; y (64 x 16) -> global Y in mma A-fragment order
//   P4 out_proj (Y streamed through the ring as G in P1; warp w: m-tile w % 4, n-tile w / 4), the exchange,
//      residual add, the next layer's rnd(res * norm weight) -> G and the rows' partial sums of squares
// Weights pre-packed per (layer, CTA) by bytemamba/ops/persistent_step.py (pack_persistent) in fragment order,
// one bulk copy each: in_proj's for the next layer in P4 right after the Y stream's last refill, out_proj's at
// P1's start, x_proj's and the fp32 constants (double-buffered) at P3's start.
//
// How it is launched: grid NCTA_P (128) CTAs x 256 threads, cluster dims (2, 1, 1), PSMEM bytes of dynamic
// shared memory (persistent_smem() reports it and the cluster size), cooperative (every CTA resident: the grid
// barriers spin). Scratch (the launcher owns it): G, Y, the x_proj partials and sums, the partial sums of
// squares, 2 barrier counters that the kernel leaves at zero.
// Measured on an H200 (docs/PERF.md, "byte353m batch 64: persistent step kernel", v5, 2026-11-29 15:00 UTC): 53
// layers, kernel alone, 1073 us at 64 rows (20.2 us a layer), 938 us at 8; the whole step 1.094 ms at b 64.
// Tried and removed (measured slower; git has them): clusters of 2 with multicast G / Y streams and full fences
// in the grid barrier (commit db6e7d7); per-chunk counters instead of two grid barriers (92877aa); the v3 kernel
// without clusters and its v2 alternatives (RED4 / DBL1 / SBULK / STIN8 / DT4 / WI_AT 3, 4), the dt dot on the
// FMA pipes, the update by rows spread over every warp with the write-back after it by bulk copies (commit
// 779a591 has all these behind defines); the weight copies after P1's G stream, the sums of squares or the conv
// states loaded after it, a relaxed spin in the grid barrier, the states by cp.async, the next layer's conv states
// or out_proj copy before the closing barrier, the write-back after all 4 steps or a step late, y in 2 chains, the
// conv's SiLU on MUFU, the states by one 2-D tensor-map copy (commit aa53e14's TMS), L2 cache hints on the state
// traffic (5a3eec9); the PERF section's tables.

#define FUSED_COMMON_NO_SHAPE 1  // in_t (-DIN_DTYPE 1 bf16 / 2 fp16), to_f, from_f, rnd, silu_f, MMA_TYPE, mbarriers
#include "fused_common.cuh"

#define PDM 1024                // d_model
#define PEI 2048                // d_inner
#define PNS 16                  // d_state
#define PRK 64                  // dt_rank
#define PKC 4                   // conv taps
#define PNX (PRK + 2 * PNS)     // x_proj outputs: 96
#define BR 64                   // batch rows (a tile; fewer rows are masked)
#define PCH 16                  // channels a CTA
#define NCTA_P (PEI / PCH)      // 128 CTAs
#define OCOL (PDM / NCTA_P)     // residual columns a CTA: 8
#define PTHR 256                // threads a CTA (8 warps)
#define NWARP (PTHR / 32)
#ifndef NSLOT
#define NSLOT 6                 // ring slots of 16 KB
#endif
#define SLOT_BYTES 16384        // a chunk: 8 k-steps x 64 rows of in_t
#define PCL 2                   // CTAs a cluster (a pair splits in_proj and out_proj along K)
#define G_CHUNKS (PDM / 128 / PCL)   // 4 chunks: half of G
#define Y_CHUNKS (PEI / 128 / PCL)   // 8 chunks: half of Y

// packed sizes per (layer, CTA), elements
#define WI_EL (2 * PCH * PDM)   // in_proj A fragments: [m-tile 4][k-step 32][lane][8] (the pair's rows, half of K)
#define WO_EL (OCOL * PEI)      // out_proj B fragments: [n-tile 2][k-step 64][lane][4] (the pair's rows, half of K)
#define WX_EL (PNX * PCH)       // x_proj A fragments: [m-tile 6][lane][8]
// the fp32 constants of a (layer, CTA), offsets in floats
#define C_WDT 0                         // [PCH][PRK]
#define C_A (C_WDT + PCH * PRK)         // [PCH][PNS]
#define C_CW (C_A + PCH * PNS)          // [PCH][PKC]
#define C_CB (C_CW + PCH * PKC)
#define C_DTB (C_CB + PCH)
#define C_D (C_DTB + PCH)
#define C_NW (C_D + PCH)                // the NEXT norm's weight, columns 8c..8c+7
#define C_EL (C_NW + OCOL + 8)          // 1408 (padded: 16-byte multiple)

#define XZP 33                  // xz row pitch (float): x 0..15, z 16..31
#define XCP 24                  // xc row pitch (in_t)
#define DBP 100                 // dbl row pitch (float)
#define STP 260                 // SSM state row pitch in the ring (float): 1 KB + 16 B, conflict-free float4 reads
#define S_DBL (BR * STP * 4)    // dbl's place in the ring (after the states)
#define S_WI 0
#define S_WO (S_WI + WI_EL * 2)
#define S_WX (S_WO + WO_EL * 2)
#define S_C (S_WX + WX_EL * 2)
#define S_RING (S_C + 2 * C_EL * 4)
#define S_RES (S_RING + NSLOT * SLOT_BYTES)
#define S_XZ (S_RES + BR * OCOL * 4)
#define S_XC (S_XZ + BR * XZP * 4)
#define S_Y (S_XC + BR * XCP * 2)
#define S_INV (S_Y + BR * PCH * 2)
#define S_RED (S_INV + BR * 4)
#define S_BAR (S_RED + 16 * 48 * 4)
#define S_PTR (S_BAR + 32 * 8)
#define P_MAX_L 128
#define PSMEM (S_PTR + 2 * P_MAX_L * 8)



// out: dynamic shared memory, CTAs, threads, rows, fp32 constants per (layer, CTA)
extern "C" __global__ void persistent_smem(int* out) {
    out[0] = PSMEM; out[1] = NCTA_P; out[2] = PTHR; out[3] = BR; out[4] = C_EL; out[5] = PCL;
}

// PROFILE 1: clock64() deltas of thread 0 of CTA 0 per phase (and barrier) summed into pers_prof, read and
// zeroed by persistent_prof: [0] P1, [1] B2, [2] P2, [3] B3, [4] P3, [5] B4, [6] P4, [7] B1; the phases split
// further (each slot the time since the stamp before): P1 = [19] the G stream's issue, the conv windows' loads
// and the rows' sums of squares, [20] the wait for the in_proj weights, [8] G stream + in_proj mma, [9] the state
// copies' issue, the exchange and xz, [10] conv, [0] x_proj partials; P3 = [11] x_proj outputs loaded, [12] the
// states' wait, [13] dt + state update + y + write-back, [14] the CTA barrier after it, [4] Y stored; P4 = [15] Y
// stream + out_proj mma, [6] the exchange, residual -> G
#ifndef PROFILE
#define PROFILE 0
#endif

__device__ long long pers_prof[32];
extern "C" __global__ void persistent_prof(long long* out) {
    if (threadIdx.x < 32) {
        out[threadIdx.x] = pers_prof[threadIdx.x];
        pers_prof[threadIdx.x] = 0;
    }
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

static_assert(PDM == OCOL * NCTA_P && OCOL == 8 && PCH == 16, "mappings below");
static_assert(PNX == 96 && (BR * PNX) % NCTA_P == 0 && BR * PNX / NCTA_P == 48, "x_proj reduce-scatter mapping");
static_assert(S_DBL + BR * DBP * 4 + BR * PCH * 4 <= NSLOT * SLOT_BYTES && BR * OCOL * 4 <= S_DBL, "scratch in the ring");
static_assert(S_RING % 128 == 0 && S_C % 16 == 0 && S_BAR % 16 == 0 && C_EL % 4 == 0, "aligned regions");
static_assert(PSMEM <= 227 * 1024, "fits an SM");
static_assert(S_DBL + BR * PCH * (PKC - 1) * 4 <= NSLOT * SLOT_BYTES, "the conv windows staged in the ring");
static_assert(PCL == 2 && G_CHUNKS <= NSLOT, "the pair's split below; P1's chunks issued at once");
static_assert(BR * XZP >= 2 * (BR / 8) * 32 * 4 + BR, "the peer's half-sums of squares after its partials in xz_s");
static_assert(S_XZ % 16 == 0 && S_RED % 16 == 0 && BR * XZP * 4 >= 2 * (BR / 8) * 32 * 16 && 16 * 48 * 4 >= (BR / 16) * 32 * 16,
              "the peer's partials arrive in xz_s (8 KB) and red_s (2 KB)");

__device__ __forceinline__ void bar_arrive(unsigned long long* b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(sm_addr(b)) : "memory");
}
// (a wait that cannot end -- a bug -- traps after seconds instead of hanging the GPU)
__device__ __forceinline__ void bar_wait(unsigned long long* b, unsigned parity) {
    for (unsigned n = 0;; ++n) {
        unsigned ok;
        asm volatile("{\n\t.reg .pred p;\n\t"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                     "selp.u32 %0, 1, 0, p;\n}" : "=r"(ok) : "r"(sm_addr(b)), "r"(parity) : "memory");
        if (ok) return;
        if (n == (1u << 24)) __trap();
    }
}
// bulk copy global -> this CTA's shared memory (copy engine), crediting b (armed with the byte count here)
__device__ __forceinline__ void copy_in(void* dst, const void* src, unsigned bytes, unsigned long long* b) {
    mbar_expect(b, bytes);
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(sm_addr(dst)), "l"(src), "r"(bytes), "r"(sm_addr(b)) : "memory");
}
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
    if ((reinterpret_cast<unsigned long long>(src) & 15) == 0)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mma16816(float* acc, const uint4& a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    const in_t a = from_f(lo), b = from_f(hi);
    return (unsigned)*reinterpret_cast<const unsigned short*>(&a) |
           ((unsigned)*reinterpret_cast<const unsigned short*>(&b) << 16);
}
// every thread of both CTAs of the cluster
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// 16 bytes into CTA `rank`'s copy of dst, credited to that CTA's copy of mbarrier bar
__device__ __forceinline__ void send4(const float* dst, unsigned rank, float a, float b, float c, float d,
                                      unsigned long long* bar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 ::"r"(remote(dst, rank)), "r"(__float_as_uint(a)), "r"(__float_as_uint(b)), "r"(__float_as_uint(c)),
                 "r"(__float_as_uint(d)), "r"(remote(bar, rank)) : "memory");
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// Grid-wide barrier number k (0, 1, ... within the launch): every CTA adds 1 to bars[0] and waits until it
// reaches NCTA_P (k + 1). Writes before it (any thread of any CTA) are visible after it, also to bulk copies;
// the data other CTAs wrote is read with ld.global.cg (L2, never a stale L1 line) or by bulk copies.
__device__ __forceinline__ void grid_sync(unsigned* bars, unsigned k) {
    asm volatile("fence.proxy.async;" ::: "memory");
    __syncthreads();
    if (threadIdx.x == 0) {
        asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(bars), "r"(1u) : "memory");
        const unsigned target = NCTA_P * (k + 1);
        for (unsigned n = 0; ld_acquire(bars) < target; ++n)
            if (n == (1u << 26)) __trap();
        asm volatile("fence.proxy.async.global;" ::: "memory");
    }
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(PTHR, 1) persistent_step(
    const long long* __restrict__ ids, const float* __restrict__ emb, const float* __restrict__ norm0,
    float eps, const in_t* __restrict__ Wi_p, const in_t* __restrict__ Wo_p, const in_t* __restrict__ Wx_p,
    const float* __restrict__ C_p, const long long* __restrict__ state_ptrs, int L, int batch,
    float* __restrict__ residual, in_t* __restrict__ Gbuf, in_t* __restrict__ Ybuf, float* __restrict__ xpart,
    float* __restrict__ dbl, float* __restrict__ sspart, unsigned* __restrict__ bars)
{
    extern __shared__ __align__(128) unsigned char smem[];
    const uint4* wi_s = reinterpret_cast<const uint4*>(smem + S_WI);
    const uint2* wo_s = reinterpret_cast<const uint2*>(smem + S_WO);
    const uint4* wx_s = reinterpret_cast<const uint4*>(smem + S_WX);
    float* c_s = reinterpret_cast<float*>(smem + S_C);             // [2][C_EL]
    unsigned char* ring = smem + S_RING;
    float* res_s = reinterpret_cast<float*>(smem + S_RES);         // [BR][OCOL] the owned residual columns
    float* xz_s = reinterpret_cast<float*>(smem + S_XZ);           // [BR][XZP]
    in_t* xc_s = reinterpret_cast<in_t*>(smem + S_XC);             // [BR][XCP]
    in_t* y_s = reinterpret_cast<in_t*>(smem + S_Y);               // [BR][PCH]
    float* inv_s = reinterpret_cast<float*>(smem + S_INV);         // [BR]
    float* red_s = reinterpret_cast<float*>(smem + S_RED);         // [4][BR], [16][48] or the peer's out_proj sums
    unsigned long long* full = reinterpret_cast<unsigned long long*>(smem + S_BAR);
    unsigned long long* empty = full + NSLOT;
    unsigned long long* bar_wi = full + 2 * NSLOT;
    unsigned long long* bar_wo = bar_wi + 1;
    unsigned long long* bar_wx = bar_wi + 2;
    unsigned long long* bar_c = bar_wi + 3;                        // [2]
    unsigned long long* bar_st = bar_wi + 5;                       // the SSM states in the ring
    unsigned long long* bar_xi = bar_wi + 6;                       // the peer's in_proj partials (in xz_s)
    unsigned long long* bar_px = bar_wi + 7;                       // the peer's out_proj partials (in red_s)
    long long* ptr_s = reinterpret_cast<long long*>(smem + S_PTR);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int c = blockIdx.x, ch0 = c * PCH;
    unsigned nbar = 0;                                             // grid barriers passed
    unsigned q = 0;                                                // ring chunks consumed so far (all phases)

    auto wi_src = [&](int l) { return Wi_p + ((long long)l * NCTA_P + c) * WI_EL; };
    auto wo_src = [&](int l) { return Wo_p + ((long long)l * NCTA_P + c) * WO_EL; };
    auto wx_src = [&](int l) { return Wx_p + ((long long)l * NCTA_P + c) * WX_EL; };
    auto c_src = [&](int l) { return C_p + ((long long)l * NCTA_P + c) * C_EL; };
    auto ssm_ptr = [&](int l) { return reinterpret_cast<float*>(ptr_s[L + l]); };
    auto conv_ptr = [&](int l) { return reinterpret_cast<float*>(ptr_s[l]); };
    // the ring: chunk number qq (counted over the whole launch) into slot qq % NSLOT; thread 0 issues
    auto issue = [&](unsigned qq, const void* src) {
        const unsigned slot = qq % NSLOT;
        if (qq >= NSLOT) bar_wait(empty + slot, ((qq / NSLOT) - 1) & 1);
        copy_in(ring + slot * SLOT_BYTES, src, SLOT_BYTES, full + slot);
    };

    if (tid < 2 * L) ptr_s[tid] = state_ptrs[tid];
    if (tid == 0) {
        for (int i = 0; i < NSLOT; ++i) {
            mbar_init(full + i, 1);
            mbar_init(empty + i, NWARP);
        }
        for (int i = 0; i < 8; ++i) mbar_init(bar_wi + i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
        copy_in(smem + S_WI, wi_src(0), WI_EL * 2, bar_wi);
        copy_in(smem + S_WO, wo_src(0), WO_EL * 2, bar_wo);
        copy_in(smem + S_WX, wx_src(0), WX_EL * 2, bar_wx);
        copy_in(c_s, c_src(0), C_EL * 4, bar_c);
    }
    __syncthreads();
    const unsigned rk = cluster_rank(), peer = rk ^ 1;
    cluster_sync();                                                // the peer's mbarriers exist before we send
    const int g_off = (int)rk * G_CHUNKS, y_off = (int)rk * Y_CHUNKS;   // the first G / Y chunk this CTA streams

#if PROFILE
    const bool prof = tid == 0 && c == 0;
    long long plast = clock64();
#define STAMP(i)                                                    \
    if (prof) {                                                     \
        const long long now = clock64();                            \
        atomicAdd(reinterpret_cast<unsigned long long*>(&pers_prof[i]), (unsigned long long)(now - plast)); \
        plast = now;                                                \
    }
#else
#define STAMP(i)
#endif

    // epilogue mapping E: row er, residual columns 8c + 2ep, +1
    const int er = tid >> 2, ep = tid & 3;
    // the owned residual columns -> G (times the norm weight nw, rounded) and the row's partial sum of squares
    auto emit = [&](const float* nw) {
        const float r0 = res_s[er * OCOL + 2 * ep], r1 = res_s[er * OCOL + 2 * ep + 1];
        float ss = r0 * r0 + r1 * r1;
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        if (ep == 0) sspart[c * BR + er] = ss;
        // B fragment of k-step c/2, n-tile er/8, lane (er%8)*4+ep, register c%2
        const int idx = (((c >> 1) * (BR / 8) + (er >> 3)) * 32 + (er & 7) * 4 + ep) * 2 + (c & 1);
        reinterpret_cast<unsigned*>(Gbuf)[idx] = pack2(r0 * nw[2 * ep], r1 * nw[2 * ep + 1]);
    };
    constexpr int CVQ = PCH * (PKC - 1) / 4;                    // float4s of a row's conv windows: 12
    float4 cvr[BR * CVQ / PTHR];                                // float4 tid + 256 m of [row][12]
    auto load_cv = [&](int layer) {                             // layer's conv windows of the CTA's channels
        const float* base = conv_ptr(layer) + (long long)ch0 * (PKC - 1);
#pragma unroll
        for (int m = 0; m < BR * CVQ / PTHR; ++m) {
            const int f = tid + m * PTHR, r = f / CVQ, q = f % CVQ;
            cvr[m] = r < batch ? *reinterpret_cast<const float4*>(base + (long long)r * PEI * (PKC - 1) + 4 * q)
                               : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    {
        float2 v = make_float2(0.f, 0.f);
        if (er < batch) v = *reinterpret_cast<const float2*>(emb + ids[er] * PDM + c * OCOL + 2 * ep);
        res_s[er * OCOL + 2 * ep] = v.x;
        res_s[er * OCOL + 2 * ep + 1] = v.y;
        emit(norm0 + c * OCOL);
    }
    grid_sync(bars, nbar++);

    // mapping T (conv, P1): channel tc, rows tr + 16 i
    const int tc = tid & 15, tr = tid >> 4;

    for (int l = 0; l < L; ++l) {
        const float* cl = c_s + (l & 1) * C_EL;
        // ======== P1: in_proj, conv, x_proj partials ========
        if (tid == 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            for (int i = 0; i < NSLOT && i < G_CHUNKS; ++i)
                issue(q + i, reinterpret_cast<const unsigned char*>(Gbuf) + (long long)(g_off + i) * SLOT_BYTES);
            mbar_expect(bar_xi, (BR / 8) * 2 * 32 * 16 + BR * 4);     // the peer's in_proj partials and half-sums
            if (l > 0) copy_in(smem + S_WO, wo_src(l), WO_EL * 2, bar_wo);   // out_proj(l-1) done before B1
        }
        load_cv(l);
        {   // half-sums of squares of every row: row tid % 64, partials of CTAs 64 rk + 16 (tid / 64) ..
            const int row = tid & 63, grp = tid >> 6;
            float v[NCTA_P / 8];
#pragma unroll
            for (int j = 0; j < NCTA_P / 8; ++j)
                v[j] = __ldcg(sspart + ((int)rk * (NCTA_P / 2) + grp * (NCTA_P / 8) + j) * BR + row);
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < NCTA_P / 8; ++j) s += v[j];
            red_s[grp * BR + row] = s;
        }
        STAMP(19);
        bar_wait(bar_wi, l & 1);
        STAMP(20);
        {   // in_proj, the pair's 64 outputs over this CTA's half of K: warp w m-tile w / 2, n-tiles 4 (w % 2) ..
            // +3, every k-step (even / odd k-steps in two accumulator chains); warps 4k'..4k'+3 hold rank k's outputs
            const int mt = warp >> 1, nb = (warp & 1) * 4;
            float acc[2][4][4];
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int n = 0; n < 4; ++n)
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[h][n][j] = 0.f;
            for (int i = 0; i < G_CHUNKS; ++i, ++q) {
                const unsigned slot = q % NSLOT;
                bar_wait(full + slot, (q / NSLOT) & 1);
                const uint2* bp = reinterpret_cast<const uint2*>(ring + slot * SLOT_BYTES) + nb * 32 + lane;
#pragma unroll
                for (int kk = 0; kk < 8; ++kk) {
                    const uint4 a = wi_s[(mt * (PDM / 16 / PCL) + i * 8 + kk) * 32 + lane];
#pragma unroll
                    for (int n = 0; n < 4; ++n) {
                        const uint2 b = bp[(kk * (BR / 8) + n) * 32];
                        mma16816(acc[kk & 1][n], a, b.x, b.y);
                    }
                }
                __syncwarp();
                if (lane == 0) bar_arrive(empty + slot);
                if (tid == 0 && i + NSLOT < G_CHUNKS)
                    issue(q + NSLOT, reinterpret_cast<const unsigned char*>(Gbuf) + (long long)(g_off + i + NSLOT) * SLOT_BYTES);
            }
            STAMP(8);
            float v[4][4];
#pragma unroll
            for (int n = 0; n < 4; ++n)
#pragma unroll
                for (int j = 0; j < 4; ++j) v[n][j] = acc[0][n][j] + acc[1][n][j];
            // xz_s holds the peer's partials until the sums are formed: [m-tile 2 (x, z)][n-tile 8][lane][4]
            float* rx = xz_s;
            const bool own = (unsigned)(warp >> 2) == rk;
            if (!own) {
#pragma unroll
                for (int n = 0; n < 4; ++n)
                    send4(rx + (((mt & 1) * (BR / 8) + nb + n) * 32 + lane) * 4, peer, v[n][0], v[n][1], v[n][2], v[n][3],
                          bar_xi);
            }
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");   // (the ring: generic reads, then copies)
            {
                float* cv_s = reinterpret_cast<float*>(ring + S_DBL);     // [BR][48]: the conv windows (free in P1)
#pragma unroll
                for (int m = 0; m < BR * CVQ / PTHR; ++m) *reinterpret_cast<float4*>(cv_s + 4 * (tid + m * PTHR)) = cvr[m];
            }
            __syncthreads();                                    // red_s (the sums of squares) complete
            {   // this layer's SSM states into the ring (every warp is done with it): warp w rows 8w.., lanes 0..7
                if (tid == 0)
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                                 ::"r"(sm_addr(bar_st)), "r"((unsigned)(batch * PCH * PNS * 4)) : "memory");
                const int r = warp * (BR / NWARP) + lane;
                if (lane < BR / NWARP && r < batch)
                    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                                 ::"r"(sm_addr(ring + r * STP * 4)), "l"(ssm_ptr(l) + ((long long)r * PEI + ch0) * PNS),
                                 "r"(PCH * PNS * 4), "r"(sm_addr(bar_st)) : "memory");
            }
            if (tid < BR) {   // this half's sum of row tid; 4 rows a message into the peer's xz_s past its partials
                const float h = red_s[tid] + red_s[BR + tid] + red_s[2 * BR + tid] + red_s[3 * BR + tid];
                const float h1 = __shfl_down_sync(0xffffffffu, h, 1), h2 = __shfl_down_sync(0xffffffffu, h, 2),
                            h3 = __shfl_down_sync(0xffffffffu, h, 3);
                if ((tid & 3) == 0) send4(xz_s + 2 * (BR / 8) * 32 * 4 + tid, peer, h, h1, h2, h3, bar_xi);
                bar_wait(bar_xi, l & 1);
                inv_s[tid] = rsqrtf((h + xz_s[2 * (BR / 8) * 32 * 4 + tid]) / (float)PDM + eps);
            }
            if (own) {
                bar_wait(bar_xi, l & 1);
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    const float4 u = *reinterpret_cast<const float4*>(rx + (((mt & 1) * (BR / 8) + nb + n) * 32 + lane) * 4);
                    v[n][0] += u.x; v[n][1] += u.y; v[n][2] += u.z; v[n][3] += u.w;
                }
            }
            __syncthreads();                                    // inv_s written, the peer's partials read
            if (own) {   // xz = rnd(inv * (ours + the peer's)): C fragment rows = outputs, columns = batch rows
#pragma unroll
                for (int n = 0; n < 4; ++n) {
                    const int row = (nb + n) * 8 + 2 * t, mm = (mt & 1) * 16 + g;
                    const float i0 = inv_s[row], i1 = inv_s[row + 1];
                    xz_s[row * XZP + mm] = rnd(v[n][0] * i0);
                    xz_s[(row + 1) * XZP + mm] = rnd(v[n][1] * i1);
                    xz_s[row * XZP + mm + 8] = rnd(v[n][2] * i0);
                    xz_s[(row + 1) * XZP + mm + 8] = rnd(v[n][3] * i1);
                }
            }
        }
        STAMP(9);
        bar_wait(bar_c + (l & 1), (l >> 1) & 1);
        __syncthreads();                                        // xz_s complete (the states were issued above)
        {   // conv step + SiLU, mapping T, on the windows staged in the ring; then the shifted windows back, as float4s
            float* cv_s = reinterpret_cast<float*>(ring + S_DBL);     // [BR][48]
            const float* w = cl + C_CW + tc * PKC;
            const float cb = cl[C_CB + tc];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int r = tr + 16 * i;
                float* cw = cv_s + r * (4 * CVQ) + tc * (PKC - 1);
                const float x = xz_s[r * XZP + tc], c0 = cw[0], c1 = cw[1], c2 = cw[2];
                float a = c0 * w[0];
                a = fmaf(c1, w[1], a);
                a = fmaf(c2, w[2], a);
                a = fmaf(x, w[3], a);
                cw[0] = c1;
                cw[1] = c2;
                cw[2] = x;
                xc_s[r * XCP + tc] = from_f(silu_f(a + cb));
            }
        }
        __syncthreads();
        STAMP(10);
        {   // x_proj partials over the 16 channels: warp w = rows 8w..8w+7, 6 m-tiles of the 96 outputs
            bar_wait(bar_wx, l & 1);
            const in_t* xb = xc_s + (warp * 8 + g) * XCP + 2 * t;
            const unsigned b0 = *reinterpret_cast<const unsigned*>(xb), b1 = *reinterpret_cast<const unsigned*>(xb + 8);
            float* dst = xpart + (long long)c * BR * PNX;
#pragma unroll
            for (int mt = 0; mt < PNX / 16; ++mt) {
                float a[4] = {0.f, 0.f, 0.f, 0.f};
                mma16816(a, wx_s[mt * 32 + lane], b0, b1);
                const int row = warp * 8 + 2 * t, m = mt * 16 + g;
                dst[row * PNX + m] = a[0];
                dst[(row + 1) * PNX + m] = a[1];
                dst[row * PNX + m + 8] = a[2];
                dst[(row + 1) * PNX + m + 8] = a[3];
            }
        }
        {   // the shifted windows back to global as float4s (the barrier before x_proj ordered the conv's writes)
            const float* cv_s = reinterpret_cast<const float*>(ring + S_DBL);
            float* base = conv_ptr(l) + (long long)ch0 * (PKC - 1);
#pragma unroll
            for (int m = 0; m < BR * CVQ / PTHR; ++m) {
                const int f = tid + m * PTHR, r = f / CVQ, q = f % CVQ;
                if (r < batch)
                    *reinterpret_cast<float4*>(base + (long long)r * PEI * (PKC - 1) + 4 * q) =
                        *reinterpret_cast<const float4*>(cv_s + 4 * f);
            }
        }
        STAMP(0);
        grid_sync(bars, nbar++);
        STAMP(1);

        // ======== P2: x_proj reduce-scatter (one round trip: 16 groups of 8 partials, 12 float4 each) ========
        if (tid < 16 * 12) {
            const int c4 = tid % 12, grp = tid / 12;
            const float4* src = reinterpret_cast<const float4*>(xpart + c * 48) + c4;
            float4 v[8];
#pragma unroll
            for (int j = 0; j < 8; ++j) v[j] = __ldcg(src + (long long)(grp * 8 + j) * (BR * PNX / 4));
            float4 a = v[0];
#pragma unroll
            for (int j = 1; j < 8; ++j) {
                a.x += v[j].x;
                a.y += v[j].y;
                a.z += v[j].z;
                a.w += v[j].w;
            }
            *reinterpret_cast<float4*>(&red_s[grp * 48 + 4 * c4]) = a;
        }
        __syncthreads();
        if (tid < 48) {
            float a = red_s[tid];
#pragma unroll
            for (int grp = 1; grp < 16; ++grp) a += red_s[grp * 48 + tid];
            dbl[c * 48 + tid] = rnd(a);
        }
        STAMP(2);
        grid_sync(bars, nbar++);
        STAMP(3);

        // ======== P3: dt, state update, y ========
        if (tid == 0 && l + 1 < L) {    // the next layer's in_proj / x_proj / constants (their buffers are free)
            copy_in(smem + S_WX, wx_src(l + 1), WX_EL * 2, bar_wx);
            copy_in(c_s + ((l + 1) & 1) * C_EL, c_src(l + 1), C_EL * 4, bar_c + ((l + 1) & 1));
        }
        float* dbl_s = reinterpret_cast<float*>(ring + S_DBL);         // [BR][DBP]
        float* st_s = reinterpret_cast<float*>(ring);                  // [BR][STP]: row r, channel j, state n
        {
            static_assert((BR * PNX / 4) % PTHR == 0, "whole float4s a thread");
            constexpr int NV = BR * PNX / 4 / PTHR;                    // 6
            float4 v[NV];
#pragma unroll
            for (int k = 0; k < NV; ++k) v[k] = __ldcg(reinterpret_cast<const float4*>(dbl) + tid + k * PTHR);
#pragma unroll
            for (int k = 0; k < NV; ++k) {
                const int idx = tid + k * PTHR, row = idx / (PNX / 4), c4 = idx % (PNX / 4);
                *reinterpret_cast<float4*>(&dbl_s[row * DBP + 4 * c4]) = v[k];
            }
        }
        STAMP(11);
        bar_wait(bar_st, l & 1);
        __syncthreads();
        STAMP(12);
        float* dt_s = reinterpret_cast<float*>(ring + S_DBL + BR * DBP * 4);   // [BR][PCH]: softplus(dt)
        {   // dt: A = W_dt (channels x ranks, hi and lo parts), B = dt_low^T (ranks x rows 8w..8w+7), 4 k-steps
            const float* wd = cl + C_WDT;
            const float* db = dbl_s + (8 * warp + g) * DBP + 2 * t;
            float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int ks = 0; ks < PRK / 16; ++ks) {
                float2 w[4];                                   // a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    w[j] = *reinterpret_cast<const float2*>(wd + (g + 8 * (j & 1)) * PRK + 16 * ks + 2 * t + 8 * (j >> 1));
                uint4 hi, lo;
                unsigned* h = &hi.x;
                unsigned* o = &lo.x;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    h[j] = pack2(w[j].x, w[j].y);
                    o[j] = pack2(w[j].x - rnd(w[j].x), w[j].y - rnd(w[j].y));
                }
                const unsigned b0 = pack2(db[16 * ks], db[16 * ks + 1]), b1 = pack2(db[16 * ks + 8], db[16 * ks + 9]);
                mma16816(acc, hi, b0, b1);
                mma16816(acc, lo, b0, b1);
            }
            const int row = 8 * warp + 2 * t;                  // C: (channel g, rows row / row+1), (g+8, ..)
            const float b0 = cl[C_DTB + g], b8 = cl[C_DTB + g + 8];
            dt_s[row * PCH + g] = softplus_fast(acc[0] + b0);
            dt_s[(row + 1) * PCH + g] = softplus_fast(acc[1] + b0);
            dt_s[row * PCH + g + 8] = softplus_fast(acc[2] + b8);
            dt_s[(row + 1) * PCH + g + 8] = softplus_fast(acc[3] + b8);
        }
        __syncthreads();
        {
            const int wc = lane & 15, rot = (wc >> 1) & 3;
            const float Dd = cl[C_D + wc];
            float4 Ar[4];                                              // A of channel wc, float4 (j + rot) % 4 at j
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                Ar[j] = *reinterpret_cast<const float4*>(cl + C_A + wc * PNS + 4 * ((j + rot) & 3));
                Ar[j].x *= 1.4426950408889634f;                        // (ex2)
                Ar[j].y *= 1.4426950408889634f;
                Ar[j].z *= 1.4426950408889634f;
                Ar[j].w *= 1.4426950408889634f;
            }
#pragma unroll
            for (int i = 0; i < BR / NWARP / 2; ++i) {
                const int r = warp * (BR / NWARP) + 2 * i + (lane >> 4);
                const float* db = dbl_s + r * DBP;
                const float d = dt_s[r * PCH + wc];
                const float x = to_f(xc_s[r * XCP + wc]);
                const float dx = d * x;
                float y = 0.f;
#pragma unroll
                for (int j = 0; j < PNS / 4; ++j) {
                    const int jj = (j + rot) & 3;
                    const float4 Bv = *reinterpret_cast<const float4*>(db + PRK + 4 * jj);
                    const float4 Cv = *reinterpret_cast<const float4*>(db + PRK + PNS + 4 * jj);
                    float* sp = st_s + r * STP + wc * PNS + 4 * jj;
                    float4 s = r < batch ? *reinterpret_cast<const float4*>(sp) : make_float4(0.f, 0.f, 0.f, 0.f);
                    s.x = fmaf(ex2_fast(d * Ar[j].x), s.x, dx * Bv.x);
                    s.y = fmaf(ex2_fast(d * Ar[j].y), s.y, dx * Bv.y);
                    s.z = fmaf(ex2_fast(d * Ar[j].z), s.z, dx * Bv.z);
                    s.w = fmaf(ex2_fast(d * Ar[j].w), s.w, dx * Bv.w);
                    *reinterpret_cast<float4*>(sp) = s;
                    y = fmaf(s.x, Cv.x, y);
                    y = fmaf(s.y, Cv.y, y);
                    y = fmaf(s.z, Cv.z, y);
                    y = fmaf(s.w, Cv.w, y);
                }
                y = fmaf(Dd, x, y);
                y_s[r * PCH + wc] = from_f(y * silu_fast(xz_s[r * XZP + PCH + wc]));
                // this warp's two rows are done: back to global, lane q the float4s q, q + 32 of row 2i + j
                __syncwarp();
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int rw = warp * (BR / NWARP) + 2 * i + j;
                    if (rw < batch) {
                        float4* dst = reinterpret_cast<float4*>(ssm_ptr(l) + ((long long)rw * PEI + ch0) * PNS);
                        const float4* src = reinterpret_cast<const float4*>(st_s + rw * STP);
                        const float4 a = src[lane], b = src[lane + 32];
                        dst[lane] = a;
                        dst[lane + 32] = b;
                    }
                }
            }
        }
        STAMP(13);
        __syncthreads();                                               // y_s complete (the states went row by row)
        STAMP(14);
        {   // y -> Y in A-fragment order: k-step c, m-tile mt, lane, register j (rows g / g+8, columns 2t / 2t+8)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int idx = tid + h * PTHR, mt = idx >> 7, ln = (idx >> 2) & 31, j = idx & 3;
                const int row = mt * 16 + (ln >> 2) + (j & 1) * 8, k = 2 * (ln & 3) + (j >> 1) * 8;
                const unsigned v = *reinterpret_cast<const unsigned*>(&y_s[row * PCH + k]);
                reinterpret_cast<unsigned*>(Ybuf)[(c * (BR / 16) * 32) * 4 + idx] = v;
            }
        }
        STAMP(4);
        grid_sync(bars, nbar++);
        STAMP(5);

        // ======== P4: out_proj rows 8c..8c+7, residual add, the next layer's G ========
        if (tid == 0) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            for (int i = 0; i < NSLOT && i < Y_CHUNKS; ++i)
                issue(q + i, reinterpret_cast<const unsigned char*>(Ybuf) + (long long)(y_off + i) * SLOT_BYTES);
            mbar_expect(bar_px, (BR / 16) * 32 * 16);                  // the peer's out_proj partials, this layer
        }
        bar_wait(bar_wo, l & 1);
        {   // out_proj, the pair's 16 columns over this CTA's half of the channels: warp w m-tile w % 4, n-tile w / 4
            // (= the rank whose columns), every k-step in 4 accumulator chains; the peer's n-tile goes to its red_s
            const int mt = warp & 3, nt = warp >> 2;
            float oa[4][4];
#pragma unroll
            for (int h = 0; h < 4; ++h)
#pragma unroll
                for (int j = 0; j < 4; ++j) oa[h][j] = 0.f;
            for (int i = 0; i < Y_CHUNKS; ++i, ++q) {
                const unsigned slot = q % NSLOT;
                bar_wait(full + slot, (q / NSLOT) & 1);
                const uint4* ap = reinterpret_cast<const uint4*>(ring + slot * SLOT_BYTES) + mt * 32 + lane;
#pragma unroll
                for (int kk = 0; kk < 8; ++kk) {
                    const uint2 b = wo_s[(nt * (PEI / 16 / PCL) + i * 8 + kk) * 32 + lane];
                    mma16816(oa[kk & 3], ap[kk * (BR / 16) * 32], b.x, b.y);
                }
                __syncwarp();
                if (lane == 0) bar_arrive(empty + slot);
                if (tid == 0 && i + NSLOT < Y_CHUNKS)
                    issue(q + NSLOT, reinterpret_cast<const unsigned char*>(Ybuf) + (long long)(y_off + i + NSLOT) * SLOT_BYTES);
                if (tid == 0 && i == (Y_CHUNKS > NSLOT ? Y_CHUNKS - NSLOT - 1 : 0) && l + 1 < L)
                    copy_in(smem + S_WI, wi_src(l + 1), WI_EL * 2, bar_wi);
            }
            STAMP(15);
            float o[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) o[j] = (oa[0][j] + oa[1][j]) + (oa[2][j] + oa[3][j]);
            const bool own = (unsigned)nt == rk;
            if (!own) send4(red_s + (mt * 32 + lane) * 4, peer, o[0], o[1], o[2], o[3], bar_px);
            __syncthreads();                                    // every warp is done with the ring's chunks
            float* os = reinterpret_cast<float*>(ring);         // [row][col]: this CTA's 8 columns, the pair's sums
            if (own) {
                bar_wait(bar_px, l & 1);
                const float4 u = *reinterpret_cast<const float4*>(red_s + (mt * 32 + lane) * 4);
                const int row = mt * 16 + g;
                *reinterpret_cast<float2*>(&os[row * OCOL + 2 * t]) = make_float2(o[0] + u.x, o[1] + u.y);
                *reinterpret_cast<float2*>(&os[(row + 8) * OCOL + 2 * t]) = make_float2(o[2] + u.z, o[3] + u.w);
            }
            __syncthreads();
        }
        {
            const float* os = reinterpret_cast<const float*>(ring);
            const float o0 = os[er * OCOL + 2 * ep], o1 = os[er * OCOL + 2 * ep + 1];
            res_s[er * OCOL + 2 * ep] += rnd(o0);
            res_s[er * OCOL + 2 * ep + 1] += rnd(o1);
            if (l + 1 < L) emit(cl + C_NW);
        }
        STAMP(6);
        if (l + 1 < L) grid_sync(bars, nbar++);
        STAMP(7);
    }
    if (er < batch)
        *reinterpret_cast<float2*>(residual + (long long)er * PDM + c * OCOL + 2 * ep) =
            make_float2(res_s[er * OCOL + 2 * ep], res_s[er * OCOL + 2 * ep + 1]);
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");       // the last states written
    cluster_sync();                                                // no CTA leaves while its peer may still send
    // the last CTA out resets the counters for the next launch (every CTA has passed the last barrier)
    __syncthreads();
    if (tid == 0) {
        const unsigned done = atomicAdd(bars + 1, 1u);
        if (done == NCTA_P - 1) {
            bars[0] = 0;
            bars[1] = 0;
            __threadfence();
        }
    }
}

#endif  // sm_90+

// decode_fused.cu -- one whole decoding step of a small ByteMambaLM (embedding, every layer, final norm, head)
// as ONE kernel launch: a thread-block cluster of 8 CTAs per batch row, synchronised by transaction barriers and
// exchanging partial sums through distributed shared memory (DSMEM). For bytemamba.
//
// What it computes (bytemamba/ops/fused_step.py holds the PyTorch reference, fused_step_ref):
//   res = emb[id]                                                    (float32 residual stream)
//   per layer l:  h   = in_t(rmsnorm(res) * norm_w[l])               (projection inputs stored as in_t)
//                 xz  = in_t(W_in[l] @ h);  x = xz[:e], z = xz[e:]
//                 xc  = in_t(silu(conv step of x: window [conv_state, x], taps conv_w, + conv_b)), state shifted
//                 dbl = in_t(W_x[l] @ xc) = (dt_low (r), B (n), C (n))
//                 dt  = softplus(W_dt[l] @ dt_low + dt_bias);  s = exp(dt A) s + dt xc B;  y = <s, C> + D xc
//                 y   = in_t(y * silu(z));  res += float(in_t(W_out[l] @ y))
//   logits = float(in_t(W_head @ in_t(rmsnorm(res) * norm_w[L])))
// Arithmetic is float32; in_t (-DIN_DTYPE: 1 bfloat16, 2 float16) is the storage of weights and projection
// inputs/outputs, as under autocast.
//
// Shapes (fixed at compile time; the Python wrapper checks the model against them): d_model DM = 256,
// d_inner EI = 512, d_state NS = 16, dt_rank RK = 16, d_conv 4, vocab NV = 256; any number of layers L.
//   ids (B) int64; emb (NV, DM) f32; head (NV, DM) in_t; norm_w (L+1, DM) f32 (last: the final norm);
//   W_in (L, 2EI, DM), W_x (L, RK+2NS, EI), W_out (L, DM, EI) in_t; conv_w (L, EI, 4), conv_b (L, EI),
//   W_dt (L, EI, RK), dt_bias (L, EI), A (L, EI, NS) (= -exp(A_log)), D (L, EI) f32;
//   state_ptrs (2L) int64: device addresses of each layer's conv state (B, EI, 3) and SSM state (B, EI, NS),
//   float32, contiguous, updated in place; logits (B, NV) f32 out.
//
// How it is launched: grid 8*B blocks of 512 threads, cluster dims (8,1,1) compiled in (sm_90), so a plain
// launch works; cluster b computes batch row b. CTA c of a cluster owns channels [64c, 64c+64):
//   in_proj rows of its x and z channels (128 x 256), the conv and SSM state of its channels, the x_proj and
//   out_proj partial sums over its channels, pushed into every CTA's shared memory (DSMEM st.async), each
//   CTA then waiting on its own transaction barrier (mbarrier) until the 8 sources' bytes arrived
//   (SYNC_MODE 0: cluster barriers instead): 2 exchanges per layer, no grid-wide sync. Every CTA keeps an
//   identical copy of the residual (the partials are summed in the same fixed order everywhere). Every
//   weight a thread needs for layer l+1 is loaded into its registers while layer l runs (~71 registers of
//   prefetch), so the L2 latency is hidden. The head's 256 rows are split 32 per CTA. 128 registers, no
//   spills (nvcc 13.0), ~12 KB static shared memory; state buffers must not alias.

#include "fused_common.cuh"

// Thread-block clusters and DSMEM need sm_90: for older targets this file compiles to nothing (the Python
// side refuses such devices).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

static_assert(DM == 32 * 8, "in_proj / head: one warp covers a row of 8-element (16-byte) chunks");
static_assert(2 * EC == 8 * (NTHR / 32), "in_proj: 8 rows per warp");
static_assert(EC * 8 == NTHR, "SSM: 8 lanes per channel, 2 states and 2 ranks each");
static_assert(NS == 16 && RK == 16, "SSM lanes hold 2 states and 2 dt ranks");
static_assert(NX * 8 <= NTHR && EC == 64, "x_proj partials: 8 lanes per row over the CTA's 64 channels");
static_assert(DM * 8 == 4 * NTHR, "out_proj: 4 rows per thread");
static_assert(NV == NCTA * 2 * (NTHR / 32), "head: 2 rows per warp");

__device__ __forceinline__ void unpack8(const uint4& raw, float* w) {
    const in_t* e = reinterpret_cast<const in_t*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) w[i] = to_f(e[i]);
}
__device__ __forceinline__ float dot8(const uint4& raw, const float* x) {
    float w[8];
    unpack8(raw, w);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) s = fmaf(w[i], x[i], s);
    return s;
}
__device__ __forceinline__ uint4 ldg16(const in_t* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// ---- cluster helpers (PTX, sm_90) ----------------------------------------------------------------------
__device__ __forceinline__ void st_remote(unsigned addr, float v) {
    asm volatile("st.shared::cluster.f32 [%0], %1;" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ void st_remote4(unsigned addr, float4 v) {
    asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "f"(v.x), "f"(v.y), "f"(v.z),
                 "f"(v.w) : "memory");
}
__device__ __forceinline__ void cluster_arrive() {
    asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
    asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_sync() { cluster_arrive(); cluster_wait(); }

// SYNC_MODE 1 (default): transaction barriers instead of cluster barriers. The partial sums go out as st.async
// (a remote shared-memory store that also credits its byte count to an mbarrier in the destination CTA);
// a CTA waits on its own mbarrier until all 8 sources' bytes arrived. No cluster-wide barrier, hence no
// GPU-scope fence (barrier.cluster.arrive.release compiles to MEMBAR.ALL.GPU, which also waits for this
// thread's outstanding global stores and prefetch loads). SYNC_MODE 0: barrier.cluster after each exchange.
#ifndef SYNC_MODE
#define SYNC_MODE 1
#endif
// v into the remote address raddr (shared::cluster), crediting 4 bytes to the remote mbarrier rbar
__device__ __forceinline__ void st_async(unsigned raddr, float v, unsigned rbar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];"
                 ::"r"(raddr), "r"(__float_as_uint(v)), "r"(rbar) : "memory");
}
__device__ __forceinline__ void st_async4(unsigned raddr, float4 v, unsigned rbar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 ::"r"(raddr), "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)), "r"(__float_as_uint(v.z)),
                 "r"(__float_as_uint(v.w)), "r"(rbar) : "memory");
}
// How the partial sums travel. PACK 0: one 4-byte DSMEM store per row and destination. PACK 1 (default):
// 16-byte stores (4 rows each), 4x fewer stores and mbarrier credits. PACK 2 (SYNC_MODE 1 only): each CTA
// writes its partials into its own shared memory, then one thread per destination copies them with one bulk
// copy (cp.async.bulk shared::cta -> shared::cluster, the copy engine credits the destination's mbarrier):
// 8 messages per exchange instead of hundreds, at the cost of a CTA barrier and the copy engine's latency.
// DBL_ONCE 1 (default): x_proj's 48 outputs summed from the partials once (2 warps wait for them and sum,
// then a CTA barrier) instead of by every thread, all 16 warps spinning on the mbarrier (0).
// Measured on an H200 (docs/PERF.md, audio6m, 15 layers, batch 1, kernel alone): PACK 1 / DBL_ONCE 1
// 54.7 us; PACK 1 / 0 58.8; PACK 0 / 0 56.9; PACK 2 / 0 61.0; PACK 2 / 1 56.3; SYNC_MODE 0 72.4.
#ifndef PACK
#define PACK 1
#endif
#ifndef DBL_ONCE
#define DBL_ONCE 1
#endif
#if PACK == 2 && SYNC_MODE != 1
#error "PACK 2 needs SYNC_MODE 1"
#endif
__device__ __forceinline__ void bulk_to(const float* dst, unsigned rank, const float* src, unsigned bytes,
                                        unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(remote(dst, rank)), "r"(sm_addr(src)), "r"(bytes), "r"(remote(bar, rank)) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() {     // generic-proxy smem writes -> the copy engine
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}
// one 16-byte message to CTA `rank`: v into dst (this CTA's address of the slot), credited to bar
__device__ __forceinline__ void send4(const float* dst, unsigned rank, float4 v, unsigned long long* bar) {
#if SYNC_MODE == 1
    st_async4(remote(dst, rank), v, remote(bar, rank));
#else
    st_remote4(remote(dst, rank), v);
#endif
}

// ---- the kernel ----------------------------------------------------------------------------------------
struct Prefetch {               // what one thread needs of one layer, loaded a layer ahead
    uint4 win[8];               // in_proj: 8 rows x 16 bytes
    uint4 wx;                   // x_proj: 16 bytes of one row
    uint4 wo[4];                // out_proj: 4 rows x 16 bytes
    float4 nw0, nw1;            // norm weight of the lane's 8 columns
    float cw, cs;               // conv tap weight and state value (lane p of a 4-lane group)
    float cb;                   // conv bias
    float2 s, a, wdt;           // SSM: 2 states, their A, 2 ranks of W_dt
    float dtb, dd;              // dt bias, D
    float* cst;                 // this thread's conv state value (x warps, taps 0..2)
    float* sst;                 // this thread's 2 SSM states
};

extern "C" __global__ void __cluster_dims__(NCTA, 1, 1) __launch_bounds__(NTHR, 1) fused_step(
    const long long* __restrict__ ids, const float* __restrict__ emb, const in_t* __restrict__ head,
    const float* __restrict__ norm_w, float eps,
    const in_t* __restrict__ W_in, const float* __restrict__ conv_w, const float* __restrict__ conv_b,
    const in_t* __restrict__ W_x, const float* __restrict__ W_dt, const float* __restrict__ dt_bias,
    const float* __restrict__ A, const float* __restrict__ Dp, const in_t* __restrict__ W_out,
    const long long* __restrict__ state_ptrs, int L, int batch, float* __restrict__ logits)
{
    __shared__ __align__(16) float res[DM];   // the residual stream (identical in every CTA)
    __shared__ float red[NTHR / 32];
    __shared__ __align__(16) float xc[EC];
    __shared__ __align__(16) float yc[EC];
    __shared__ float zc[EC];
    __shared__ __align__(16) float xpart[NCTA][NX];   // x_proj partial sums, one row per source CTA
    __shared__ __align__(16) float opart[NCTA][DM];   // out_proj partial sums, one row per source CTA
#if SYNC_MODE == 1
    __shared__ __align__(8) unsigned long long bar_x, bar_o;   // their transaction barriers
#endif
#if PACK == 2
    __shared__ __align__(16) float xloc[NX];          // this CTA's partials, the bulk copies' sources
    __shared__ __align__(16) float oloc[DM];
#endif
#if DBL_ONCE
    __shared__ float dbl[NX];
#endif

#if SYNC_MODE == 1
#define BAR_X (&bar_x)
#define BAR_O (&bar_o)
#else
#define BAR_X ((unsigned long long*)0)           // (unused: no transaction barriers)
#define BAR_O ((unsigned long long*)0)
#endif
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const unsigned c = cluster_rank();
    const int b = (int)cluster_id();
    if (b >= batch) return;                 // (whole clusters only: the grid is 8 * batch)
    const int ch0 = (int)c * EC;            // first channel of this CTA

    // in_proj / conv: warp w < 8 -> x rows (channels 8w..8w+7), w >= 8 -> z rows; lane = 16-byte chunk
    const bool xwarp = warp < 8;
    const int in_row0 = xwarp ? ch0 + 8 * warp : EI + ch0 + 8 * (warp - 8);
    const int cv_ch = ch0 + 8 * (warp & 7) + (lane >> 2), cv_p = lane & 3;   // conv: row lane>>2, tap lane&3
    // x_proj partials: thread < 384: row tid>>3, chunk tid&7 of the CTA's 64 channels
    const int xp_row = tid >> 3, q = tid & 7;
    // SSM: channel tid>>3 (local), states / ranks 2q, 2q+1; out_proj: rows 4g..4g+3, chunk q
    const int s_ch = tid >> 3, g = tid >> 3;

    // loads of layer l's weights and states into P, each issued right after the previous layer used them
    auto fetch_in = [&](int l, Prefetch& P) {         // in_proj rows and the norm weight (or the head's)
        if (l < L) {
            const in_t* wi = W_in + (long long)l * 2 * EI * DM;
#pragma unroll
            for (int i = 0; i < 8; ++i) P.win[i] = ldg16(wi + (long long)(in_row0 + i) * DM + lane * 8);
        } else {                                        // the head: CTA c rows 32c + 2 warp + {0, 1}
            const in_t* hr = head + (long long)(c * 32 + 2 * warp) * DM + lane * 8;
            P.win[0] = ldg16(hr);
            P.win[1] = ldg16(hr + DM);
        }
        P.nw0 = __ldg(reinterpret_cast<const float4*>(norm_w + (long long)l * DM + lane * 8));
        P.nw1 = __ldg(reinterpret_cast<const float4*>(norm_w + (long long)l * DM + lane * 8 + 4));
    };
    auto fetch_conv = [&](int l, Prefetch& P) {
        if (xwarp) {
            P.cst = reinterpret_cast<float*>(state_ptrs[l]) + ((long long)b * EI + cv_ch) * (KC - 1) + cv_p;
            P.cw = __ldg(conv_w + ((long long)l * EI + cv_ch) * KC + cv_p);
            P.cb = __ldg(conv_b + (long long)l * EI + cv_ch);
            P.cs = cv_p < KC - 1 ? *P.cst : 0.f;
        } else {
            P.cst = nullptr;
            P.cw = P.cb = P.cs = 0.f;
        }
    };
    auto fetch_x = [&](int l, Prefetch& P) {
        if (tid < NX * 8) P.wx = ldg16(W_x + ((long long)l * NX + xp_row) * EI + ch0 + q * 8);
    };
    auto fetch_ssm = [&](int l, Prefetch& P) {
        P.sst = reinterpret_cast<float*>(state_ptrs[L + l]) + ((long long)b * EI + ch0 + s_ch) * NS + 2 * q;
        const long long sc = (long long)l * EI + ch0 + s_ch;
        P.s = *reinterpret_cast<const float2*>(P.sst);
        P.a = __ldg(reinterpret_cast<const float2*>(A + sc * NS + 2 * q));
        P.wdt = __ldg(reinterpret_cast<const float2*>(W_dt + sc * RK + 2 * q));
        P.dtb = __ldg(dt_bias + sc);
        P.dd = __ldg(Dp + sc);
    };
    auto fetch_out = [&](int l, Prefetch& P) {
        const in_t* wo = W_out + (long long)l * DM * EI;
#pragma unroll
        for (int m = 0; m < 4; ++m) P.wo[m] = ldg16(wo + (long long)(4 * g + m) * EI + ch0 + q * 8);
    };

#if SYNC_MODE == 1
    if (tid == 0) {
        mbar_init(&bar_x, 1);
        mbar_init(&bar_o, 1);
        mbar_expect(&bar_x, NCTA * NX * 4);
        mbar_expect(&bar_o, NCTA * DM * 4);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");   // (the fence above orders the init)
#else
    cluster_arrive();
#endif
    // every CTA of the cluster has started (and set up its barriers) before any DSMEM store: the matching
    // cluster wait is at (C) of layer 0
    // a kernel launched after this one with programmatic dependent launch (the sampler, BYTEMAMBA_STEP_PDL=1)
    // may be scheduled now; it waits (griddepcontrol.wait) for this grid's completion before reading logits
    asm volatile("griddepcontrol.launch_dependents;" :::);
    Prefetch P;
    fetch_in(0, P);
    fetch_conv(0, P);
    fetch_x(0, P);
    fetch_ssm(0, P);
    fetch_out(0, P);
    const long long id = ids[b];
    float v = tid < DM ? emb[id * DM + tid] : 0.f;

    for (int l = 0; l <= L; ++l) {
        // (A) residual += out_proj (the 8 partials in a fixed order), then the RMSNorm statistics
        if (tid < DM) {
            if (l > 0) {
#if SYNC_MODE == 1
                mbar_wait(&bar_o, (l - 1) & 1);
#endif
                float o = 0.f;
#pragma unroll
                for (int s = 0; s < NCTA; ++s) o += opart[s][tid];
                v = res[tid] + rnd(o);
            }
            res[tid] = v;
            float ss = v * v;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) red[warp] = ss;
        }
#if SYNC_MODE == 1
        if (l > 0 && tid == 0) mbar_expect(&bar_o, NCTA * DM * 4);   // arm the next phase
#endif
        __syncthreads();
        float tot = 0.f;
#pragma unroll
        for (int w = 0; w < DM / 32; ++w) tot += red[w];
        const float inv = rsqrtf(tot / (float)DM + eps);
        float h[8];
        {
            const float4 r0 = *reinterpret_cast<const float4*>(&res[lane * 8]);
            const float4 r1 = *reinterpret_cast<const float4*>(&res[lane * 8 + 4]);
            const float nw[8] = {P.nw0.x, P.nw0.y, P.nw0.z, P.nw0.w, P.nw1.x, P.nw1.y, P.nw1.z, P.nw1.w};
            const float rv[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = rnd(rv[i] * inv * nw[i]);
        }
        if (l == L) {
            // final norm + head: CTA c rows 32c + 2 warp + {0, 1} (fetch_in put them in P.win[0..1])
            float a0 = dot8(P.win[0], h), a1 = dot8(P.win[1], h);
            const bool hi = lane & 16;
            float t = (hi ? a1 : a0) + __shfl_xor_sync(0xffffffffu, hi ? a0 : a1, 16);
#pragma unroll
            for (int o = 8; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
            if ((lane & 15) == 0) logits[(long long)b * NV + c * 32 + 2 * warp + (lane >> 4)] = rnd(t);
            break;
        }

        // (B) in_proj: 8 rows per warp, reduced transposed (lane group lane>>2 ends with row lane>>2)
        float acc[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = dot8(P.win[i], h);
        fetch_in(l + 1, P);
        float a4[4], a2[2];
        {
            const bool hi = lane & 16;
#pragma unroll
            for (int i = 0; i < 4; ++i)
                a4[i] = (hi ? acc[i + 4] : acc[i]) + __shfl_xor_sync(0xffffffffu, hi ? acc[i] : acc[i + 4], 16);
            const bool hi8 = lane & 8;
#pragma unroll
            for (int i = 0; i < 2; ++i)
                a2[i] = (hi8 ? a4[i + 2] : a4[i]) + __shfl_xor_sync(0xffffffffu, hi8 ? a4[i] : a4[i + 2], 8);
        }
        const bool hi4 = lane & 4;
        float row = (hi4 ? a2[1] : a2[0]) + __shfl_xor_sync(0xffffffffu, hi4 ? a2[0] : a2[1], 4);
        row += __shfl_xor_sync(0xffffffffu, row, 2);
        row += __shfl_xor_sync(0xffffffffu, row, 1);
        row = rnd(row);                       // xz as stored (in_t)
        const int lrow = 8 * (warp & 7) + (lane >> 2);
        if (xwarp) {
            // conv step: lane p of the group holds tap p's weight and window value (state p, or x for p = 3)
            const float wv = cv_p < KC - 1 ? P.cs : row;
            float cacc = P.cw * wv;
            cacc += __shfl_xor_sync(0xffffffffu, cacc, 1);
            cacc += __shfl_xor_sync(0xffffffffu, cacc, 2);
            const float nxt = __shfl_down_sync(0xffffffffu, wv, 1, 4);   // window shifted by one
            if (cv_p < KC - 1) *P.cst = nxt;
            if (cv_p == 0) xc[lrow] = rnd(silu_f(cacc + P.cb));
            if (l + 1 < L) fetch_conv(l + 1, P);
        } else if ((lane & 3) == 0) {
            zc[lrow] = row;
        }
        __syncthreads();

        // (C) x_proj partial sums over this CTA's channels, pushed to every CTA (lane q -> CTA q)
        if (l == 0) cluster_wait();             // the start barrier: every CTA runs before any DSMEM store
        if (tid < NX * 8) {
            const float4 x0 = *reinterpret_cast<const float4*>(&xc[q * 8]);
            const float4 x1 = *reinterpret_cast<const float4*>(&xc[q * 8 + 4]);
            const float xv[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            float p = dot8(P.wx, xv);
            p += __shfl_xor_sync(0xffffffffu, p, 4);
            p += __shfl_xor_sync(0xffffffffu, p, 2);
            p += __shfl_xor_sync(0xffffffffu, p, 1);
#if PACK == 2
            if (q == 0) xloc[xp_row] = p;
#elif PACK
            // warp w holds rows 4w..4w+3 in its four 8-lane groups: lane q < 8 gathers them for CTA q
            const float4 v4 = make_float4(__shfl_sync(0xffffffffu, p, q), __shfl_sync(0xffffffffu, p, q + 8),
                                          __shfl_sync(0xffffffffu, p, q + 16), __shfl_sync(0xffffffffu, p, q + 24));
            if (lane < 8) send4(&xpart[c][4 * warp], q, v4, BAR_X);
#elif SYNC_MODE == 1
            st_async(remote(&xpart[c][xp_row], q), p, remote(&bar_x, q));
#else
            st_remote(remote(&xpart[c][xp_row], q), p);
#endif
            if (l + 1 < L) fetch_x(l + 1, P);
        }
#if PACK == 2
        fence_proxy_async();
        __syncthreads();
        if (tid < NCTA) bulk_to(&xpart[c][0], tid, xloc, NX * 4, &bar_x);
#endif
#if SYNC_MODE == 0
        cluster_sync();
#endif
#if DBL_ONCE
        // x_proj's outputs once: warps 0-1 wait for the partials and sum them, the others meet them at the barrier
        if (tid < 64) {
#if SYNC_MODE == 1
            mbar_wait(&bar_x, l & 1);
            if (tid == 0) mbar_expect(&bar_x, NCTA * NX * 4);       // arm the next phase
#endif
            if (tid < NX) {
                float sacc = 0.f;
#pragma unroll
                for (int s = 0; s < NCTA; ++s) sacc += xpart[s][tid];
                dbl[tid] = rnd(sacc);
            }
        }
#endif
#if SYNC_MODE == 1 && !DBL_ONCE
        mbar_wait(&bar_x, l & 1);
        if (tid == 0) mbar_expect(&bar_x, NCTA * NX * 4);           // arm the next phase
#endif

        // (D) SSM state update for channel s_ch (8 lanes, 2 states and 2 dt ranks each)
        {
            float dl[2], Bv[2], Cv[2];
#if DBL_ONCE
            __syncthreads();
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                dl[k] = dbl[2 * q + k]; Bv[k] = dbl[RK + 2 * q + k]; Cv[k] = dbl[RK + NS + 2 * q + k];
            }
#else
#pragma unroll
            for (int k = 0; k < 2; ++k) {
                float sd = 0.f, sb = 0.f, sc = 0.f;
#pragma unroll
                for (int s = 0; s < NCTA; ++s) {
                    sd += xpart[s][2 * q + k];
                    sb += xpart[s][RK + 2 * q + k];
                    sc += xpart[s][RK + NS + 2 * q + k];
                }
                dl[k] = rnd(sd); Bv[k] = rnd(sb); Cv[k] = rnd(sc);
            }
#endif
            float d = fmaf(P.wdt.y, dl[1], P.wdt.x * dl[0]);
            d += __shfl_xor_sync(0xffffffffu, d, 4);
            d += __shfl_xor_sync(0xffffffffu, d, 2);
            d += __shfl_xor_sync(0xffffffffu, d, 1);
            d += P.dtb;
            d = d <= 20.f ? log1pf(__expf(d)) : d;      // softplus, PyTorch's threshold
            const float xv = xc[s_ch];
            const float dx = d * xv;
            const float s0 = fmaf(__expf(d * P.a.x), P.s.x, dx * Bv[0]);
            const float s1 = fmaf(__expf(d * P.a.y), P.s.y, dx * Bv[1]);
            *reinterpret_cast<float2*>(P.sst) = make_float2(s0, s1);
            float y = fmaf(s1, Cv[1], s0 * Cv[0]);
            y += __shfl_xor_sync(0xffffffffu, y, 4);
            y += __shfl_xor_sync(0xffffffffu, y, 2);
            y += __shfl_xor_sync(0xffffffffu, y, 1);
            if (q == 0) yc[s_ch] = rnd((y + P.dd * xv) * silu_f(zc[s_ch]));
            if (l + 1 < L) fetch_ssm(l + 1, P);
        }
        __syncthreads();

        // (E) out_proj partial sums: rows 4g..4g+3 over chunk q of this CTA's channels; lane q holds row
        // 4g + (q>>1) after the transposed reduction and pushes it to CTAs 4(q&1) .. 4(q&1)+3
        {
            const float4 y0 = *reinterpret_cast<const float4*>(&yc[q * 8]);
            const float4 y1 = *reinterpret_cast<const float4*>(&yc[q * 8 + 4]);
            const float yv[8] = {y0.x, y0.y, y0.z, y0.w, y1.x, y1.y, y1.z, y1.w};
            float o[4];
#pragma unroll
            for (int m = 0; m < 4; ++m) o[m] = dot8(P.wo[m], yv);
#if PACK == 1
            // all-reduce the 4 rows over the 8 lanes; lane q sends rows 4g..4g+3 to CTA q
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                o[m] += __shfl_xor_sync(0xffffffffu, o[m], 4);
                o[m] += __shfl_xor_sync(0xffffffffu, o[m], 2);
                o[m] += __shfl_xor_sync(0xffffffffu, o[m], 1);
            }
            send4(&opart[c][4 * g], q, make_float4(o[0], o[1], o[2], o[3]), BAR_O);
#else
            const bool h4 = q & 4, h2 = q & 2;
            float o2[2];
#pragma unroll
            for (int i = 0; i < 2; ++i)
                o2[i] = (h4 ? o[i + 2] : o[i]) + __shfl_xor_sync(0xffffffffu, h4 ? o[i] : o[i + 2], 4);
            float t = (h2 ? o2[1] : o2[0]) + __shfl_xor_sync(0xffffffffu, h2 ? o2[0] : o2[1], 2);
            t += __shfl_xor_sync(0xffffffffu, t, 1);
            const int orow = 4 * g + (q >> 1);
#if PACK == 2
            if ((q & 1) == 0) oloc[orow] = t;
#else
            const unsigned r0 = 4u * (q & 1);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
#if SYNC_MODE == 1
                st_async(remote(&opart[c][orow], r0 + k), t, remote(&bar_o, r0 + k));
#else
                st_remote(remote(&opart[c][orow], r0 + k), t);
#endif
            }
#endif  // PACK == 2
#endif  // PACK == 1
        }

        if (l + 1 < L) fetch_out(l + 1, P);
#if PACK == 2
        fence_proxy_async();
        __syncthreads();
        if (tid < NCTA) bulk_to(&opart[c][0], tid, oloc, DM * 4, &bar_o);
#endif
#if SYNC_MODE == 0
        cluster_sync();
#endif
    }
}

#endif  // sm_90+

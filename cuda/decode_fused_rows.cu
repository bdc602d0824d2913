// decode_fused_rows.cu -- one whole decoding step of a small ByteMambaLM for MANY batch rows (embedding, every
// layer, final norm, head) as ONE kernel launch: a thread-block cluster of 8 CTAs carries a tile of ROWS batch
// rows (16 or 24: -DROWS), the projections run on tensor cores (mma.sync m16n8k16, bf16/fp16 in, fp32
// accumulate; the rows are the mma n dimension, so every weight read from shared memory serves ROWS rows).
// For bytemamba.
//
// What it computes: the same as cuda/decode_fused.cu (the small-batch cluster kernel; PyTorch reference
// fused_step_ref in bytemamba/ops/fused_step.py), with the same roundings to in_t (-DIN_DTYPE: 1 bfloat16,
// 2 float16) where autocast stores: the normed residual, xz, the conv output, x_proj's output, y, out_proj's
// output, the logits. Only the summation order differs (tensor-core dot products).
//
// Shapes (compile time): d_model DM 256, d_inner EI 512, d_state NS 16, dt_rank RK 16, d_conv 4, vocab NV 256,
// any number of layers 1 <= L <= MAX_L, any batch (tiles of rpc <= ROWS rows, the last one partial).
//   Weights pre-packed per layer and per CTA by bytemamba/ops/fused_step.py (pack_rows): the A operands of the
//   mma in fragment order (16 bytes per lane per 16x16 tile, tiles (m, k) row-major), so one bulk copy brings a
//   CTA's slice of a layer into shared memory:
//   Wi_p (L, 8, 128*256) in_t: CTA c's in_proj rows [x channels 64c..64c+63 | z channels 512+64c..]
//   Wx_p (L, 8, 48*64)   in_t: x_proj's columns 64c..64c+63;  Wo_p (L, 8, 256*64) in_t: out_proj's columns
//   K_p  (L, 8, K_EL)    f32: W_dt^T (16 x 64), A (64 x 16), conv_w (64 x 4), conv_b, dt_bias, D (64 each),
//                             the layer's norm weight (256)
//   head_p (8, 32*256)   in_t: head rows 32c..32c+31;  normf (DM) f32: the final norm weight
//   state_ptrs (2L) int64: each layer's conv state (B, EI, 3) and SSM state (B, EI, NS), float32, in place.
//
// How it is launched: grid 8 * ceil(B / rpc) CTAs of 512 threads, cluster dims (8,1,1) compiled in, SMEM_BYTES
// of dynamic shared memory (fused_rows_smem() reports it and ROWS; 197 KB at 16 rows, 232,064 B at 24): one
// CTA per SM. Cluster t computes rows rpc t .. rpc t + rpc - 1 (rpc <= ROWS, a kernel argument: the launcher
// spreads a batch over every cluster of its waves, e.g. 256 rows as 15 tiles of 18 at ROWS 24, so that each SM
// moves fewer rows' states; TRIM: the work skips the rows past a tile's last). CTA c owns channels [64c, 64c+64)
// (in_proj x/z rows, conv and SSM state, x_proj and out_proj partial sums over them) and residual columns
// [32c, 32c+32) (out_proj's output, the residual add). Per layer:
//   N  RMSNorm of the rows (every CTA holds the full residual), h -> shared memory (in_t)
//   I  in_proj: 128 x 256 x ROWS on tensor cores (a warp per 16-row m-tile, one or two 8-row n-tiles)
//   C  conv step + SiLU (conv states loaded into registers at I)
//   X  x_proj partial sums (48 x 64 x ROWS), each row's to its owner (CTAs 0..5 own 8 rows each; st.async,
//      16-byte messages, mbarrier); the owner sums the 8 partials and sends the rounded sums to all 8 CTAs
//   D  dt = softplus(W_dt dt_low + b) (lane q of a channel's 4 computes ROWS/8 of its rows' dt, shared by
//      shuffles), state update, y = <s, C> + D x, gate by silu(z); the fp32 SSM states sit in registers,
//      loaded a whole layer ahead (SSM_AT 2) after a bulk prefetch into L2, and are written back right after
//   O  out_proj partial sums (256 x 64 x ROWS): the 32 columns CTA j owns go to CTA j (reduce-scatter)
//   R  the owner sums the 8 partials, adds them to the residual and sends its 32 columns to all 8 CTAs
// Each CTA's weight slice of layer l+1 (in_proj 64 KB, x_proj 6 KB, out_proj 32 KB, the fp32 constants 11 KB,
// double-buffered) is brought by bulk copies (cp.async.bulk, copy engine, mbarrier) right after layer l used it.
// 4 exchanges a layer (X's two hops, O, R), no cluster-wide barrier after the start.
// Measured on an H200 (docs/PERF.md, "audio6m large batches"): an H200 holds 15 such clusters at once (a wave
// of 240 rows at 16 rows a cluster, 360 at 24); 15 layers, kernel alone (BULK and TRIM, 13:17 UTC): 97 us at 64
// rows (13 tiles of 5), 146 us at 240 (16 rows a tile), 186 us at 256 (24-row build, 15 tiles of 18). The
// launcher picks the build by waves. Without state traffic the chain is ~8 us a layer at 16 rows, ~12 at 24
// (measured before BULK and TRIM); the states add ~2-3 us a layer per SM (their loads and stores share the
// load/store unit with the DSMEM exchanges).
// An earlier 16-row body (a separate dt phase and buffers; the states loaded from HBM straight into registers a
// layer ahead) was 3-5% slower at 64-240 rows and was removed; commit 0b64af9 has it.

#include "fused_common.cuh"

#ifndef ROWS
#define ROWS 16                 // batch rows per cluster: 16 or 24 (ROWS / 8 mma n-tiles)
#endif
#define OC (DM / NCTA)          // residual columns owned per CTA: 32
#define VC (NV / NCTA)          // head rows per CTA: 32

// packed sizes per (layer, CTA), elements
#define WI_EL (2 * EC * DM)
#define WX_EL (NX * EC)
#define WO_EL (DM * EC)
#define HD_EL (VC * DM)
// the fp32 constants of a (layer, CTA), offsets in floats
#define K_WDT 0                 // [RK][EC] (transposed: lane = channel reads consecutive words)
#define K_A (K_WDT + RK * EC)   // [EC][NS]
#define K_CW (K_A + EC * NS)    // [EC][KC]
#define K_CB (K_CW + EC * KC)
#define K_DTB (K_CB + EC)
#define K_D (K_DTB + EC)
#define K_NW (K_D + EC)         // [DM]
#define K_EL (K_NW + DM)        // 2752

// xz stored as in_t (its values are rounded to in_t anyway), h inside the out_proj partials' buffer, no dt / dx
// buffers (dt is computed in the state phase): what makes 24 rows fit
#define HP 264                  // h row pitch (in_t): 528 bytes, conflict-free B-fragment loads
#define XZP 136                 // xz row pitch (in_t)
#define XCP 72                  // xc / y row pitch (in_t)
#define DBP 52                  // dbl row pitch (float): dt_low 0..15, B 16..31, C 32..47
#define S_WI 0
#define S_WO (S_WI + WI_EL * 2)
#define S_WX (S_WO + WO_EL * 2)
#define S_K (S_WX + WX_EL * 2)
#define S_RES (S_K + 2 * K_EL * 4)
// BULK 1 (the default since the lead's H200 call at 12:45 UTC: kernel alone 199 -> 185 us at 256 rows, 126 -> 117
// at 64; its GPU tests passed at 16 and 24 rows; 0 with TRIM 0 gives the st.async messages): out_proj's
// reduce-scatter and the residual's all-gather by bulk copies shared::cta -> shared::cluster (copy engine, one per
// destination block) instead of 16-byte st.async messages (at 24 rows 3,072 messages out of a CTA a layer -> 14 +
// 42 copies). Needs the residual stored in column blocks (block j = the 32 columns CTA j owns, [ROWS][32], blocks
// padded by 4 floats against bank conflicts) and the out_proj partials n-major ([src][ROWS][OC]); the partials are
// staged in xr_s (free during O: a CTA's next x_proj partials come only after every out_proj copy has landed).
#ifndef BULK
#define BULK 1
#endif
// TRIM 1 (the default since the lead's H200 call at 13:17 UTC: kernel alone 117 -> 97 us at 64 rows, neutral at
// 240 and 256 rows; its GPU tests passed at 16 and 24 rows; 0 covers all ROWS rows of every tile; needs BULK):
// the per-row work and the exchanges cover the tile's real rows only (rpc may be < ROWS: 256 rows run as 15
// tiles of 18 on the 24-row build, 64 as 13 tiles of 5 on the 16-row one): N normalises rows < nrows, the conv
// skips the others, mma n-tiles wholly past the last row are skipped (in_proj's last, x_proj's warps, out_proj's
// loop, the head), x_proj messages of 4 rows past it are not sent, the owners send the sums of rows < nrows,
// out_proj's copies carry nrows rows and the residual's all-gather the warps of rows < nrows (each copy its real
// rows); the mbarriers expect those bytes (runtime). Rows past the last then hold garbage (never stored, never
// mixed into a real row: every step is per row).
// (A BAL candidate, balancing the 24-row build's in_proj and norm between warps, was slower at 256 rows and
// neutral elsewhere; removed, commit 39e9c91 has it.)
#ifndef TRIM
#define TRIM 1
#endif
#define RBS (BULK ? ROWS * OC + 4 : ROWS * OC)   // floats a residual block (BULK) / a row's 32 columns
#define S_OR (S_RES + NCTA * RBS * 4)
#define S_H S_OR                // (h shares the out_proj partials' buffer: see the kernel)
#define S_XR (S_OR + NCTA * OC * ROWS * 4)
#define S_XZ (S_XR + NCTA * NX * ROWS * 4)
#define S_XC (S_XZ + ROWS * XZP * 2)
#define S_Y (S_XC + ROWS * XCP * 2)
#define S_DBL (S_Y + ROWS * XCP * 2)
#define S_BAR (S_DBL + ROWS * DBP * 4)
#define S_PTR (S_BAR + 16 * 8)          // the state pointers (2L int64; L <= MAX_L)
#define MAX_L 64
#define SMEM_BYTES (S_PTR + 2 * MAX_L * 8)

// x_proj's exchange: CTA c < NXO owns x_proj rows XO c .. XO c + XO - 1 (reduce-scatter of the partials, the
// owner's sums all-gathered into every CTA's dbl)
#define XO 8                    // x_proj rows an owner
#define NXO (NX / XO)           // owners: CTAs 0..5
// bytes each exchange brings into a CTA
#define X_BYTES (NCTA * XO * ROWS * 4)      // x_proj partials into an owner
#define D_BYTES (NX * ROWS * 4)             // dbl (the owners' sums) into every CTA
#define O_BYTES ((NCTA - BULK) * OC * ROWS * 4)        // (BULK: a CTA's own partials and columns are
#define R_BYTES ((NCTA - BULK) * OC * ROWS * 4)        //  written in place)

// out[0] the dynamic shared memory, out[1] the rows a cluster (the launcher's grid)
extern "C" __global__ void fused_rows_smem(int* out) { out[0] = SMEM_BYTES; out[1] = ROWS; }

// Benchmark knobs (off by default): NO_STATE_IO 1 skips the SSM states' loads and stores (the state starts at
// zero every layer: wrong results, the HBM traffic's share of the time); PROFILE 1 adds clock64() deltas of
// thread 0 of CTA 0 of cluster 0 per phase into rows_prof, read and zeroed by fused_rows_prof.
// STATE_HINT 1: the SSM states loaded and stored with the streaming (evict-first) cache hint, so that they
// push the weights out of L2 less (spills with nvcc 13.0; not timed).
#ifndef NO_STATE_IO
#define NO_STATE_IO 0
#endif
#ifndef STATE_HINT
#define STATE_HINT 0
#endif
#ifndef PROFILE
#define PROFILE 0
#endif
__device__ long long rows_prof[16];
extern "C" __global__ void fused_rows_prof(long long* out) {
    if (threadIdx.x < 16) {
        out[threadIdx.x] = rows_prof[threadIdx.x];
        rows_prof[threadIdx.x] = 0;
    }
}

// Thread-block clusters, bulk copies and st.async need sm_90: for older targets the step kernel compiles to
// nothing (the Python side refuses such devices).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900

static_assert(S_BAR % 16 == 0 && S_WO % 16 == 0 && S_K % 16 == 0 && S_H % 16 == 0, "16-byte aligned regions");
static_assert(SMEM_BYTES <= 227 * 1024, "fits an SM");
static_assert(!TRIM || BULK, "TRIM needs BULK");
static_assert(EC == 64 && OC == 32 && VC == 32 && NX == 48, "tile counts below");


// the residual of row r, column col: [ROWS][DM] row-major, or (BULK) column block col / 32 of [ROWS][32]
__device__ __forceinline__ int res_at(int r, int col) {
    return BULK ? (col >> 5) * RBS + r * OC + (col & 31) : r * DM + col;
}
// `bytes` of this CTA's shared memory at src into CTA `rank`'s copy of dst (copy engine), credited to that CTA's
// copy of bar; src written by ordinary stores needs fence.proxy.async in each writer before
__device__ __forceinline__ void copy_to(const float* dst, const float* src, unsigned bytes, unsigned rank,
                                        unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(remote(dst, rank)), "r"(sm_addr(src)), "r"(bytes), "r"(remote(bar, rank)) : "memory");
}
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// 16 bytes into CTA `rank`'s copy of dst, credited to that CTA's copy of bar
__device__ __forceinline__ void send4(const float* dst, unsigned rank, float4 v, unsigned long long* bar) {
    asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.b32 [%0], {%1, %2, %3, %4}, [%5];"
                 ::"r"(remote(dst, rank)), "r"(__float_as_uint(v.x)), "r"(__float_as_uint(v.y)),
                 "r"(__float_as_uint(v.z)), "r"(__float_as_uint(v.w)), "r"(remote(bar, rank)) : "memory");
}
// bulk copy global -> this CTA's shared memory (copy engine), crediting bar; bar armed with the byte count first
__device__ __forceinline__ void load_bulk(void* dst, const void* src, unsigned bytes, unsigned long long* bar) {
    mbar_expect(bar, bytes);
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 ::"r"(sm_addr(dst)), "l"(src), "r"(bytes), "r"(sm_addr(bar)) : "memory");
}
// acc += A (16x16, fragment a) * B (16x8, fragment b0 b1)
__device__ __forceinline__ void mma16816(float* acc, const uint4& a, unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned lds32(const in_t* p) { return *reinterpret_cast<const unsigned*>(p); }
// the C fragment (rows g, g+8; columns 2t, 2t+1) regrouped into one 4-column message per lane: even t lanes
// get row g, columns 2t..2t+3; odd t lanes row g+8, columns 2t-2..2t+1 (one exchange with lane ^ 1)
__device__ __forceinline__ float4 regroup(const float* c, int t) {
    const float p0 = __shfl_xor_sync(0xffffffffu, c[0], 1), p1 = __shfl_xor_sync(0xffffffffu, c[1], 1);
    const float p2 = __shfl_xor_sync(0xffffffffu, c[2], 1), p3 = __shfl_xor_sync(0xffffffffu, c[3], 1);
    return (t & 1) ? make_float4(p2, p3, c[2], c[3]) : make_float4(c[0], c[1], p0, p1);
}

static_assert((ROWS == 16 || ROWS == 24) && NTHR == 8 * EC, "mappings below: 8 threads per channel; in_proj "
              "warps 0..7 take n-tiles 0..ROWS/8-2, warps 8..15 the last; ROWS/2 rows a state thread");
static_assert(ROWS * HP * 2 <= NCTA * OC * ROWS * 4, "h fits in the out_proj partials' buffer");
// SSM_AT: where a layer's SSM states are loaded into registers (from L2): 0 at the start of C, 1 at the start
// of I (a phase earlier), 2 (default) a whole layer ahead, after the previous layer's out_proj sends (registers
// held throughout). Measured on an H200 at 24 rows, batch 256, us a step: 238.9 / 236.1 / 224.8.
#ifndef SSM_AT
#define SSM_AT 2
#endif

// the bulk prefetch of global memory into L2 (copy engine; address and size multiples of 16: a state tensor
// not 16-byte aligned, possible for a view, is simply not prefetched)
__device__ __forceinline__ void prefetch_l2(const void* src, unsigned bytes) {
    if ((reinterpret_cast<unsigned long long>(src) & 15) == 0)
        asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

// the row of a state-update thread's j-th: rows rh, rh + 2, ... (interleaved, so that the two halves of a tile
// of rpc < ROWS rows skip alike the rows past its last)
#define SROW(j) (2 * (j) + rh)

// in_proj for NT n-tiles (rows 8 nt0 .. 8 (nt0 + NT) - 1) of m-tile mt: each A fragment read once serves NT
// mma; xz stored rounded to in_t
template <int NT>
__device__ __forceinline__ void in_proj_tiles(const uint4* wf, const in_t* h_s, int nt0, int mt, int g, int t,
                                              in_t* xz_s) {
    float acc[NT][2][4] = {};
    const in_t* hb = h_s + (nt0 * 8 + g) * HP + 2 * t;
#pragma unroll
    for (int kt = 0; kt < 16; ++kt) {
        const uint4 a = wf[kt * 32];
#pragma unroll
        for (int j = 0; j < NT; ++j)
            mma16816(acc[j][kt & 1], a, lds32(hb + j * 8 * HP + kt * 16), lds32(hb + j * 8 * HP + kt * 16 + 8));
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int n = (nt0 + j) * 8 + 2 * t, m = mt * 16 + g;
        xz_s[n * XZP + m] = from_f(acc[j][0][0] + acc[j][1][0]);
        xz_s[(n + 1) * XZP + m] = from_f(acc[j][0][1] + acc[j][1][1]);
        xz_s[n * XZP + m + 8] = from_f(acc[j][0][2] + acc[j][1][2]);
        xz_s[(n + 1) * XZP + m + 8] = from_f(acc[j][0][3] + acc[j][1][3]);
    }
}

extern "C" __global__ void __cluster_dims__(NCTA, 1, 1) __launch_bounds__(NTHR, 1) fused_step_rows(
    const long long* __restrict__ ids, const float* __restrict__ emb, const in_t* __restrict__ head_p,
    const float* __restrict__ normf, float eps, const in_t* __restrict__ Wi_p, const in_t* __restrict__ Wx_p,
    const in_t* __restrict__ Wo_p, const float* __restrict__ K_p, const long long* __restrict__ state_ptrs,
    int L, int batch, int rpc, float* __restrict__ logits)
{
    constexpr int NTL = ROWS / 8;            // mma n-tiles: 3
    constexpr int RH = ROWS / 2;             // rows a thread of the state update: 12
    constexpr int RQ = RH / 4;               // of which the thread computes dt and y: 3
    constexpr int XW = 3 * NTL;              // x_proj warps (3 m-tiles x NTL n-tiles): 9
    extern __shared__ __align__(16) unsigned char smem[];
    in_t* wi_s = reinterpret_cast<in_t*>(smem + S_WI);          // in_proj fragments (the head's at l = L)
    in_t* wo_s = reinterpret_cast<in_t*>(smem + S_WO);
    in_t* wx_s = reinterpret_cast<in_t*>(smem + S_WX);
    float* k_s = reinterpret_cast<float*>(smem + S_K);           // [2][K_EL]
    float* res_s = reinterpret_cast<float*>(smem + S_RES);       // [ROWS][DM] the residual (all CTAs alike)
    float* or_s = reinterpret_cast<float*>(smem + S_OR);         // [src][OC][ROWS] out_proj partials
    float* xr_s = reinterpret_cast<float*>(smem + S_XR);         // [src][NX][ROWS] x_proj partials
    // h shares or_s: h is written in N (after R's reads of or_s and a CTA barrier) and read in I; another CTA
    // writes or_s only after its x_proj sums, which need this CTA's x_proj partials, sent after I
    in_t* h_s = reinterpret_cast<in_t*>(smem + S_H);             // [ROWS][HP]
    in_t* xz_s = reinterpret_cast<in_t*>(smem + S_XZ);           // [ROWS][XZP]: x 0..63, z 64..127 (rounded)
    in_t* xc_s = reinterpret_cast<in_t*>(smem + S_XC);           // [ROWS][XCP]
    in_t* y_s = reinterpret_cast<in_t*>(smem + S_Y);             // [ROWS][XCP]
    float* dbl_s = reinterpret_cast<float*>(smem + S_DBL);       // [ROWS][DBP]
    unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + S_BAR);
    long long* ptr_s = reinterpret_cast<long long*>(smem + S_PTR);   // state_ptrs, read once
    unsigned long long* bar_x = bars + 0;   // x_proj partials arrived
    unsigned long long* bar_o = bars + 1;   // out_proj partials arrived
    unsigned long long* bar_r = bars + 2;   // residual columns arrived
    unsigned long long* bar_wi = bars + 3;  // weight slices arrived (bulk copies)
    unsigned long long* bar_wx = bars + 4;
    unsigned long long* bar_wo = bars + 5;
    unsigned long long* bar_k = bars + 6;   // [2]
    unsigned long long* bar_d = bars + 8;   // dbl arrived (x_proj's all-gather)

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const unsigned c = cluster_rank();
    const int b0 = (int)cluster_id() * rpc;
    if (b0 >= batch) return;                     // (whole clusters)
    const int nrows = min(rpc, batch - b0);
    // the rows the per-row work covers (TRIM: the real ones; rounded up to 4: x_proj's messages, R's warps)
    const int nact = TRIM ? nrows : ROWS, nr4 = TRIM ? (nrows + 3) & ~3 : ROWS;
    // the bytes each exchange brings into a CTA (TRIM: of the real rows)
    const unsigned x_bytes = TRIM ? NCTA * XO * nr4 * 4 : X_BYTES, d_bytes = TRIM ? NX * nrows * 4 : D_BYTES;
    const unsigned o_bytes = TRIM ? (NCTA - 1) * OC * nrows * 4 : O_BYTES;
    const unsigned r_bytes = TRIM ? (NCTA - 1) * OC * nrows * 4 : R_BYTES;
    const int ch0 = (int)c * EC;
    // mapping T (conv): channel tch, rows tr, tr + 8, tr + 16
    const int tch = tid & (EC - 1), tr = tid >> 6;
    // mapping S (dt, state update): rows SROW(j) = rh, rh + 2, .. (j < RH), channel sch, states 4q .. 4q + 3; dt
    // and y of rows SROW(RQ q + i), i < RQ
    const int rh = tid >> 8, sch = (tid >> 2) & (EC - 1), q = tid & 3;

    auto wi_src = [&](int l) { return Wi_p + ((long long)l * NCTA + c) * WI_EL; };
    auto wx_src = [&](int l) { return Wx_p + ((long long)l * NCTA + c) * WX_EL; };
    auto wo_src = [&](int l) { return Wo_p + ((long long)l * NCTA + c) * WO_EL; };
    auto k_src = [&](int l) { return K_p + ((long long)l * NCTA + c) * K_EL; };

    if (tid < 2 * L) ptr_s[tid] = state_ptrs[tid];      // (L <= MAX_L, checked by the launcher)
    if (tid == 0) {
        for (int i = 0; i < 9; ++i) mbar_init(bars + i, 1);
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        if (c < NXO) mbar_expect(bar_x, x_bytes);
        mbar_expect(bar_d, d_bytes);
        mbar_expect(bar_o, o_bytes);
        mbar_expect(bar_r, r_bytes);
        load_bulk(wi_s, wi_src(0), WI_EL * 2, bar_wi);
        load_bulk(wx_s, wx_src(0), WX_EL * 2, bar_wx);
        load_bulk(wo_s, wo_src(0), WO_EL * 2, bar_wo);
        load_bulk(k_s, k_src(0), K_EL * 4, bar_k);
        if (L > 1) load_bulk(k_s + K_EL, k_src(1), K_EL * 4, bar_k + 1);
    }
    __syncthreads();
    // every CTA of the cluster has set up its barriers before any DSMEM store: the wait is at X of layer 0
    asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" :::);

    // a layer's states of this CTA's channels into L2, a layer before the registers load them: each row's SSM
    // state (4 KB) and conv state (768 bytes) are contiguous, one bulk prefetch each (threads 0..23, 32..55)
    auto prefetch_states = [&](int l) {
        if (tid < nrows) {
            if (!NO_STATE_IO)
                prefetch_l2(reinterpret_cast<const float*>(ptr_s[L + l]) + ((long long)(b0 + tid) * EI + ch0) * NS,
                            EC * NS * 4);
        } else if (tid >= 32 && tid - 32 < nrows) {
            prefetch_l2(reinterpret_cast<const float*>(ptr_s[l]) + ((long long)(b0 + tid - 32) * EI + ch0) * (KC - 1),
                        EC * (KC - 1) * 4);
        }
    };
    float4 st[RH];
    float cs[NTL][KC - 1];
    auto fetch_ssm = [&](int l) {
        const float* base = reinterpret_cast<const float*>(ptr_s[L + l]);
#pragma unroll
        for (int j = 0; j < RH; ++j) {
            const int r = SROW(j);
            const float4* p = reinterpret_cast<const float4*>(base + ((long long)(b0 + r) * EI + ch0 + sch) * NS + 4 * q);
            st[j] = r < nrows && !NO_STATE_IO ? (STATE_HINT ? __ldcs(p) : *p) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    auto fetch_conv = [&](int l) {
        const float* base = reinterpret_cast<const float*>(ptr_s[l]);
#pragma unroll
        for (int i = 0; i < NTL; ++i) {
            const int r = tr + 8 * i;
#pragma unroll
            for (int p = 0; p < KC - 1; ++p)
                cs[i][p] = r < nrows ? base[((long long)(b0 + r) * EI + ch0 + tch) * (KC - 1) + p] : 0.f;
        }
    };
    prefetch_states(0);
    if (SSM_AT == 2) fetch_ssm(0);
#pragma unroll
    for (int i = 0; i < ROWS * DM / 4 / NTHR; ++i) {
        const int idx = tid + NTHR * i, r = idx >> 6, col = (idx & 63) * 4;
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (r < nrows) v = __ldg(reinterpret_cast<const float4*>(emb + ids[b0 + r] * DM + col));
        *reinterpret_cast<float4*>(&res_s[res_at(r, col)]) = v;
    }
    __syncthreads();

#if PROFILE
    const bool prof = tid == 0 && c == 0 && b0 == 0;
    long long plast = clock64();
#define STAMP(i)                                                    \
    if (prof) {                                                     \
        const long long now = clock64();                            \
        atomicAdd(reinterpret_cast<unsigned long long*>(&rows_prof[i]), (unsigned long long)(now - plast)); \
        plast = now;                                                \
    }
#else
#define STAMP(i)
#endif
    for (int l = 0; l <= L; ++l) {
        const float* kl = k_s + (l & 1) * K_EL;
        // (N) RMSNorm: warp w normalises rows w and w + 16; h -> shared memory as in_t
        if (l > 0) {
            if (warp == NTHR / 32 - 1) {            // (not one of R's warps)
                mbar_wait(bar_r, (l - 1) & 1);
                if (lane == 0 && l < L) mbar_expect(bar_r, r_bytes);
            }
            __syncthreads();
        }
        if (l + 1 < L) prefetch_states(l + 1);
        if (l < L) mbar_wait(bar_k + (l & 1), (l >> 1) & 1);
        for (int r = warp; r < nact; r += NTHR / 32) {
            const float4 r0 = *reinterpret_cast<const float4*>(&res_s[res_at(r, lane * 8)]);
            const float4 r1 = *reinterpret_cast<const float4*>(&res_s[res_at(r, lane * 8 + 4)]);
            const float rv[8] = {r0.x, r0.y, r0.z, r0.w, r1.x, r1.y, r1.z, r1.w};
            float ss = 0.f;
#pragma unroll
            for (int i = 0; i < 8; ++i) ss = fmaf(rv[i], rv[i], ss);
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            const float inv = rsqrtf(ss / (float)DM + eps);
            float4 n0, n1;
            if (l < L) {
                n0 = *reinterpret_cast<const float4*>(&kl[K_NW + lane * 8]);
                n1 = *reinterpret_cast<const float4*>(&kl[K_NW + lane * 8 + 4]);
            } else {
                n0 = __ldg(reinterpret_cast<const float4*>(normf + lane * 8));
                n1 = __ldg(reinterpret_cast<const float4*>(normf + lane * 8 + 4));
            }
            const float nw[8] = {n0.x, n0.y, n0.z, n0.w, n1.x, n1.y, n1.z, n1.w};
            __align__(16) in_t hv[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) hv[i] = from_f(rv[i] * inv * nw[i]);
            *reinterpret_cast<uint4*>(&h_s[r * HP + lane * 8]) = *reinterpret_cast<const uint4*>(hv);
        }
        __syncthreads();
        STAMP(0);

        if (l == L) {
            // final norm + head: CTA c's 32 vocabulary rows, 2 m-tiles x 3 n-tiles, one warp each
            mbar_wait(bar_wi, L & 1);
            if (warp < 2 * NTL && (!TRIM || (warp >> 1) * 8 < nrows)) {
                const int mt = warp & 1, nt = warp >> 1;
                float acc[2][4] = {};
                const uint4* wf = reinterpret_cast<const uint4*>(wi_s) + mt * 16 * 32 + lane;
                const in_t* hb = h_s + (nt * 8 + g) * HP + 2 * t;
#pragma unroll
                for (int kt = 0; kt < 16; ++kt)
                    mma16816(acc[kt & 1], wf[kt * 32], lds32(hb + kt * 16), lds32(hb + kt * 16 + 8));
                const int n = nt * 8 + 2 * t, m = c * VC + mt * 16 + g;
                const float v[4] = {acc[0][0] + acc[1][0], acc[0][1] + acc[1][1], acc[0][2] + acc[1][2],
                                    acc[0][3] + acc[1][3]};
                if (n < nrows) {
                    logits[(long long)(b0 + n) * NV + m] = rnd(v[0]);
                    logits[(long long)(b0 + n) * NV + m + 8] = rnd(v[2]);
                }
                if (n + 1 < nrows) {
                    logits[(long long)(b0 + n + 1) * NV + m] = rnd(v[1]);
                    logits[(long long)(b0 + n + 1) * NV + m + 8] = rnd(v[3]);
                }
            }
            STAMP(9);
            if (BULK) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");   // (copies out of smem done)
            break;
        }

        // (I) in_proj: warp w = m-tile w & 7 of the CTA's 128 xz rows, n-tiles 0 and 1 (w < 8) or 2, K = 256;
        // the conv states (prefetched into L2 a layer ago) load meanwhile
        fetch_conv(l);
        if (SSM_AT == 1) fetch_ssm(l);
        mbar_wait(bar_wi, l & 1);
        {
            const uint4* wf = reinterpret_cast<const uint4*>(wi_s) + (warp & 7) * 16 * 32 + lane;
            if (warp < 8) in_proj_tiles<NTL - 1>(wf, h_s, 0, warp & 7, g, t, xz_s);
            else if (!TRIM || (NTL - 1) * 8 < nrows) in_proj_tiles<1>(wf, h_s, NTL - 1, warp & 7, g, t, xz_s);
        }
        __syncthreads();
        STAMP(1);
        if (tid == 0) {                          // the next in_proj slice (or the head's) into the free buffer
            if (l + 1 < L) load_bulk(wi_s, wi_src(l + 1), WI_EL * 2, bar_wi);
            else load_bulk(wi_s, head_p + (long long)c * HD_EL, HD_EL * 2, bar_wi);
        }

        // (C) the SSM states of this layer into registers (from L2; used in D); conv step + SiLU, mapping T;
        // the window shifted into the conv state (global)
        if (SSM_AT == 0) fetch_ssm(l);
        {
            const float4 w = *reinterpret_cast<const float4*>(&kl[K_CW + tch * KC]);
            const float cb = kl[K_CB + tch];
            float* base = reinterpret_cast<float*>(ptr_s[l]);
#pragma unroll
            for (int i = 0; i < NTL; ++i) {
                const int r = tr + 8 * i;
                if (TRIM && r >= nrows) continue;
                const float x = to_f(xz_s[r * XZP + tch]);
                float a = cs[i][0] * w.x;
                a = fmaf(cs[i][1], w.y, a);
                a = fmaf(cs[i][2], w.z, a);
                a = fmaf(x, w.w, a);
                if (r < nrows) {
                    float* p = base + ((long long)(b0 + r) * EI + ch0 + tch) * (KC - 1);
                    p[0] = cs[i][1];
                    p[1] = cs[i][2];
                    p[2] = x;
                }
                xc_s[r * XCP + tch] = from_f(silu_f(a + cb));
            }
        }
        __syncthreads();
        STAMP(2);

        // (X) x_proj partial sums over this CTA's channels (48 x 64 x ROWS): warps 0..XW-1, each row's partial
        // to its owner (an all-to-all of the whole partials, the earlier exchange, moved 8x the DSMEM bytes)
        if (l == 0) asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");   // the start barrier
        if (warp < XW && (!TRIM || (warp / 3) * 8 < nrows)) {
            mbar_wait(bar_wx, l & 1);
            const int mt = warp % 3, nt = warp / 3;
            float acc[4] = {};
            const uint4* wf = reinterpret_cast<const uint4*>(wx_s) + mt * 4 * 32 + lane;
            const in_t* xb = xc_s + (nt * 8 + g) * XCP + 2 * t;
#pragma unroll
            for (int kt = 0; kt < 4; ++kt) mma16816(acc, wf[kt * 32], lds32(xb + kt * 16), lds32(xb + kt * 16 + 8));
            const float4 msg = regroup(acc, t);
            const int m = mt * 16 + g + ((t & 1) ? 8 : 0), n0 = nt * 8 + 2 * (t & 2);
            const float* dst = &xr_s[(c * NX + m) * ROWS + n0];
            if (!TRIM || n0 < nrows) send4(dst, m / XO, msg, bar_x);          // to the owner of row m
        }
        STAMP(3);
        // the owner: rows XO c + 4 grp .. + 3 of row n = the rounded sums of the 8 partials (fixed order), to
        // every CTA's dbl; then every CTA waits for its dbl
        if (c < NXO && tid < XO / 4 * ROWS && (!TRIM || tid % ROWS < nrows)) {
            mbar_wait(bar_x, l & 1);
            if (tid == 0) mbar_expect(bar_x, x_bytes);               // arm the next layer's exchange
            const int n = tid % ROWS, m0 = XO * c + 4 * (tid / ROWS);
            float o[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float sm = 0.f;
#pragma unroll
                for (int d = 0; d < NCTA; ++d) sm += xr_s[(d * NX + m0 + i) * ROWS + n];
                o[i] = rnd(sm);
            }
            const float4 v = make_float4(o[0], o[1], o[2], o[3]);
#pragma unroll
            for (int d = 0; d < NCTA; ++d) send4(&dbl_s[n * DBP + m0], d, v, bar_d);
        }
        if (warp == NTHR / 32 - 1) {
            mbar_wait(bar_d, l & 1);
            if (lane == 0) mbar_expect(bar_d, d_bytes);
        }
        __syncthreads();
        STAMP(4);
        if (tid == 0 && l + 1 < L) load_bulk(wx_s, wx_src(l + 1), WX_EL * 2, bar_wx);
        STAMP(5);

        // (D) mapping S. dt = softplus(W_dt dt_low + dt_bias) of rows SROW(RQ q + i) (the 4 lanes of a channel
        // share the rows' dt by shuffles); state update (rows past the tile's last skipped); y = <s, C> + D x
        // (4 lanes reduced transposed: lane q ends with rows SROW(RQ q + i)), gated by silu(z)
        {
            float dts[RQ];
            {
                float wdt[RK];
#pragma unroll
                for (int k = 0; k < RK; ++k) wdt[k] = kl[K_WDT + k * EC + sch];
                const float dtb = kl[K_DTB + sch];
#pragma unroll
                for (int i = 0; i < RQ; ++i) {
                    const int r = SROW(RQ * q + i);
                    float d = 0.f;
#pragma unroll
                    for (int k4 = 0; k4 < RK / 4; ++k4) {
                        const float4 dl = *reinterpret_cast<const float4*>(&dbl_s[r * DBP + 4 * k4]);
                        d = fmaf(wdt[4 * k4], dl.x, d);
                        d = fmaf(wdt[4 * k4 + 1], dl.y, d);
                        d = fmaf(wdt[4 * k4 + 2], dl.z, d);
                        d = fmaf(wdt[4 * k4 + 3], dl.w, d);
                    }
                    d += dtb;
                    dts[i] = d <= 20.f ? log1pf(__expf(d)) : d;       // softplus, PyTorch's threshold
                }
            }
            const float4 a4 = *reinterpret_cast<const float4*>(&kl[K_A + sch * NS + 4 * q]);
            float* base = reinterpret_cast<float*>(ptr_s[L + l]);
            float yp[RH];
#pragma unroll
            for (int j = 0; j < RH; ++j) {
                const int r = SROW(j);
                if (r >= nrows) {         // (warp-uniform: no lane of this warp has a row here)
                    yp[j] = 0.f;
                    continue;
                }
                const float d = __shfl_sync(0xffffffffu, dts[j % RQ], (lane & ~3) | (j / RQ));
                const float dx = d * to_f(xc_s[r * XCP + sch]);
                const float4 Bv = *reinterpret_cast<const float4*>(&dbl_s[r * DBP + RK + 4 * q]);
                const float4 Cv = *reinterpret_cast<const float4*>(&dbl_s[r * DBP + RK + NS + 4 * q]);
                float4 s = st[j];
                s.x = fmaf(__expf(d * a4.x), s.x, dx * Bv.x);
                s.y = fmaf(__expf(d * a4.y), s.y, dx * Bv.y);
                s.z = fmaf(__expf(d * a4.z), s.z, dx * Bv.z);
                s.w = fmaf(__expf(d * a4.w), s.w, dx * Bv.w);
                if (r < nrows && !NO_STATE_IO) {
                    float4* p = reinterpret_cast<float4*>(base + ((long long)(b0 + r) * EI + ch0 + sch) * NS + 4 * q);
                    if (STATE_HINT) __stcs(p, s);
                    else *p = s;
                }
                float y = s.x * Cv.x;
                y = fmaf(s.y, Cv.y, y);
                y = fmaf(s.z, Cv.z, y);
                yp[j] = fmaf(s.w, Cv.w, y);
            }
            float v2[RH / 2], v1[RQ];
            const bool h2 = q & 2, h1 = q & 1;
#pragma unroll
            for (int i = 0; i < RH / 2; ++i)
                v2[i] = (h2 ? yp[i + RH / 2] : yp[i]) + __shfl_xor_sync(0xffffffffu, h2 ? yp[i] : yp[i + RH / 2], 2);
#pragma unroll
            for (int i = 0; i < RQ; ++i)
                v1[i] = (h1 ? v2[i + RQ] : v2[i]) + __shfl_xor_sync(0xffffffffu, h1 ? v2[i] : v2[i + RQ], 1);
            const float Dd = kl[K_D + sch];
#pragma unroll
            for (int i = 0; i < RQ; ++i) {
                const int r = SROW(RQ * q + i);
                const float xv = to_f(xc_s[r * XCP + sch]);
                y_s[r * XCP + sch] = from_f((v1[i] + Dd * xv) * silu_f(to_f(xz_s[r * XZP + EC + sch])));
            }
        }
        __syncthreads();
        STAMP(6);
        if (tid == 0 && l + 2 < L) load_bulk(k_s + (l & 1) * K_EL, k_src(l + 2), K_EL * 4, bar_k + (l & 1));

        // (O) out_proj partial sums over this CTA's channels: warp w = m-tile (residual columns 16w..16w+15,
        // owned by CTA w >> 1), all n-tiles; sent to the owner
        mbar_wait(bar_wo, l & 1);
        {
            const uint4* wf = reinterpret_cast<const uint4*>(wo_s) + warp * 4 * 32 + lane;
            uint4 a[4];
#pragma unroll
            for (int kt = 0; kt < 4; ++kt) a[kt] = wf[kt * 32];
            const unsigned owner = warp >> 1;
#pragma unroll
            for (int nt = 0; nt < NTL; ++nt) {
                if (TRIM && nt * 8 >= nrows) break;
                float acc[4] = {};
                const in_t* yb = y_s + (nt * 8 + g) * XCP + 2 * t;
#pragma unroll
                for (int kt = 0; kt < 4; ++kt) mma16816(acc, a[kt], lds32(yb + kt * 16), lds32(yb + kt * 16 + 8));
#if BULK
                // n-major partials of owner `owner`'s 32 columns: its own slot here, or the staging in xr_s
                float* slot = owner == c ? or_s + c * ROWS * OC : xr_s + owner * ROWS * OC;
                const int mc = (warp & 1) * 16 + g, n = nt * 8 + 2 * t;
                slot[n * OC + mc] = acc[0];
                slot[(n + 1) * OC + mc] = acc[1];
                slot[n * OC + mc + 8] = acc[2];
                slot[(n + 1) * OC + mc + 8] = acc[3];
#else
                const float4 msg = regroup(acc, t);
                const int m = (warp & 1) * 16 + g + ((t & 1) ? 8 : 0);
                send4(&or_s[(c * OC + m) * ROWS + nt * 8 + 2 * (t & 2)], owner, msg, bar_o);
#endif
            }
#if BULK
            if (owner != c) {                        // the warp pair's slot, one copy to its owner
                fence_async_smem();
                asm volatile("bar.sync %0, 64;" ::"r"(1 + (int)owner) : "memory");
                if ((warp & 1) == 0 && lane == 0) {
                    copy_to(or_s + c * ROWS * OC, xr_s + owner * ROWS * OC, nact * OC * 4, owner, bar_o);
                    asm volatile("cp.async.bulk.commit_group;" ::: "memory");
                }
            }
#endif
        }
        if (SSM_AT == 2 && l + 1 < L) fetch_ssm(l + 1);
        __syncthreads();
        STAMP(7);
        if (tid == 0 && l + 1 < L) load_bulk(wo_s, wo_src(l + 1), WO_EL * 2, bar_wo);

        // (R) the owner: residual columns 32c + 4mq .. +3 of row n += rounded sum of the 8 partials (fixed
        // order); the new values to every CTA
        if (tid < nr4 * OC / 4) {
            mbar_wait(bar_o, l & 1);
            if (tid == 0) mbar_expect(bar_o, o_bytes);               // arm the next layer's exchange
#if BULK
            // thread: row n = tid / 8, columns 4 mq .. + 3 (a warp: 4 whole rows of the block, one copy each CTA)
            const int n = tid >> 3, mq = tid & 7;
            float4 sm = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
            for (int d = 0; d < NCTA; ++d) {
                const float4 p = *reinterpret_cast<const float4*>(&or_s[(d * ROWS + n) * OC + 4 * mq]);
                sm.x += p.x; sm.y += p.y; sm.z += p.z; sm.w += p.w;
            }
            float* dst = &res_s[res_at(n, c * OC + 4 * mq)];
            float4 v = *reinterpret_cast<const float4*>(dst);
            v.x += rnd(sm.x); v.y += rnd(sm.y); v.z += rnd(sm.z); v.w += rnd(sm.w);
            *reinterpret_cast<float4*>(dst) = v;
            fence_async_smem();
            __syncwarp();
            if (lane == 0) {
                const float* rows4 = &res_s[res_at(n, c * OC)];          // rows n .. n + 3, 512 bytes
                const unsigned bytes = (TRIM ? min(4, nrows - n) : 4) * OC * 4;   // (TRIM: the real rows)
#pragma unroll
                for (int d = 1; d < NCTA; ++d) {
                    const unsigned rank = (c + d) % NCTA;
                    copy_to(rows4, rows4, bytes, rank, bar_r);
                }
                asm volatile("cp.async.bulk.commit_group;" ::: "memory");
            }
#else
            const int n = tid % ROWS, mq = tid / ROWS;
            float o[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float s = 0.f;
#pragma unroll
                for (int d = 0; d < NCTA; ++d) s += or_s[(d * OC + 4 * mq + i) * ROWS + n];
                o[i] = rnd(s);
            }
            float* dst = &res_s[n * DM + c * OC + 4 * mq];
            float4 v = *reinterpret_cast<const float4*>(dst);
            v.x += o[0]; v.y += o[1]; v.z += o[2]; v.w += o[3];
#pragma unroll
            for (int d = 0; d < NCTA; ++d) send4(dst, d, v, bar_r);
#endif
        }
        STAMP(8);
    }
}

#endif  // sm_90+

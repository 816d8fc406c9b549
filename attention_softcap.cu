// Causal self-attention with an attention-logit soft-cap (Gemma-2), the case cuDNN's fused SDPA
// cannot do: scores z = cap * tanh(scale * q.k / cap), then the causal / sliding-window mask and the
// softmax. GQA, optional sliding window, head dims up to 256; declared in attention.h.
//
// Flash-attention style, O(S) memory (no S x S matrix in global memory), fp32 CUDA-core math:
// - forward: a block per (b, query head h, tile of SC_ROWS_PER_BLOCK queries), looping over tiles of
//   SC_KEYS keys staged in shared memory as fp32, online softmax in fp32. Writes out (bf16) and the
//   natural-log log-sum-exp of each query's capped scores to stats.
// - backward (flash-attention-2): with D_i = dO_i . O_i, P = exp(z - lse), dP = dO V^T,
//   dZ = P (dP - D), d(scale q.k) = dZ (1 - tanh^2): dq_i = scale sum_j dZ'_ij k_j,
//   dk_j = scale sum_i dZ'_ij q_i, dv_j = sum_i P_ij dO_i.
//   dQ: a block per (b, h, query tile) looping over key tiles; dK / dV: a block per (b, kv head,
//   tile of keys) looping over the query heads of its group (in order) and over query tiles.
//   Every sum runs in a fixed order and no atomics are used: results are bit-identical run to run.
//
// Work split inside a block (SC_WARPS warps, each owning SC_ROWS rows of the block's tile): for the
// q.k products a lane takes one key (query) of the streamed tile and loops over the head dim; for the
// P V (or dZ K, ...) products a lane owns the head-dim elements d = lane + 32 t, t < NT, and the
// streamed tile's weights reach it through warp shuffles. Streamed tiles use a row stride of hd + 1
// floats so that the lane-per-row reads hit 32 different banks.
//
// Layouts (attention.h): qkv / dqkv (B*S, C) bf16, C = (Hq + 2 Hkv) hd, row b*S + s = [q heads | k
// heads | v heads]; out / dout (B*S, Hq hd) bf16; stats (B, Hq, S) fp32.
#include <math.h>
#include "attention.h"

#define SC_WARPS 4                               // warps of every block
#define SC_THREADS (SC_WARPS * 32)
#define SC_ROWS 4                                // rows of the block's own tile per warp
#define SC_ROWS_PER_BLOCK (SC_WARPS * SC_ROWS)   // 16 queries (forward, dQ) or keys (dK / dV)
#define SC_KEYS 32                               // rows of a streamed tile: one per lane
#define SC_MAX_HD 256                            // NT = 8 head-dim elements per lane
#define SC_SMEM_DEFAULT (48 * 1024)              // dynamic shared memory allowed without opting in

// Shape figures every kernel needs, passed by value.
typedef struct {
    int S, Hq, Hkv, hd, group, window;  // group = Hq / Hkv
    float scale, cap;
} SoftcapGeometry;

static __device__ __forceinline__ float sc_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float sc_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Whether query i sees key j (0 <= j): causal, i < S, and inside the window when there is one.
static __device__ __forceinline__ int sc_visible(int i, int j, int S, int window) {
    return i < S && j <= i && (window == 0 || j > i - window);
}

// dst[r * ld + d] = src[(row0 + r) * src_ld + d] as fp32 for r < n_rows, d < hd; zero for rows at or
// beyond S. src points at row 0 of the sequence, at the head's first column. All threads call it.
static __device__ void sc_load_rows(float *dst, int ld, const bf16 *src, size_t src_ld, int row0, int n_rows,
                                    int S, int hd) {
    for (int e = threadIdx.x; e < n_rows * hd; e += SC_THREADS) {
        int r = e / hd, d = e - r * hd, i = row0 + r;
        dst[r * ld + d] = i < S ? __bfloat162float(src[(size_t)i * src_ld + d]) : 0.0f;
    }
}

// Forward. grid (ceil(S / 16), Hq, B). Reads qkv (B*S, C); writes out (B*S, Hq hd) and stats (B, Hq, S).
// Shared memory: q tile [16][hd], k and v tiles [SC_KEYS][hd + 1] fp32.
template <int NT>
__global__ void __launch_bounds__(SC_THREADS)
    softcap_forward_kernel(bf16 *out, float *stats, const bf16 *qkv, SoftcapGeometry g) {
    extern __shared__ float smem[];
    const int hd = g.hd, ld = hd + 1, S = g.S;
    float *sq = smem, *sk = sq + SC_ROWS_PER_BLOCK * hd, *sv = sk + SC_KEYS * ld;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * SC_ROWS_PER_BLOCK, kvh = h / g.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = warp * SC_ROWS;
    const size_t C = (size_t)(g.Hq + 2 * g.Hkv) * hd, O = (size_t)g.Hq * hd;
    const bf16 *base = qkv + (size_t)b * S * C;
    sc_load_rows(sq, hd, base + (size_t)h * hd, C, q0, SC_ROWS_PER_BLOCK, S, hd);

    float o[SC_ROWS][NT], m[SC_ROWS], l[SC_ROWS];  // l: this lane's part of the softmax denominator
#pragma unroll
    for (int r = 0; r < SC_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
#pragma unroll
        for (int t = 0; t < NT; t++) o[r][t] = 0.0f;
    }
    const int q_last = min(q0 + SC_ROWS_PER_BLOCK, S) - 1;
    const int k_begin = g.window > 0 ? max(0, q0 - g.window + 1) : 0;
    for (int k0 = k_begin; k0 <= q_last; k0 += SC_KEYS) {
        __syncthreads();  // every warp is done with the previous k / v tile
        sc_load_rows(sk, ld, base + (size_t)(g.Hq + kvh) * hd, C, k0, SC_KEYS, S, hd);
        sc_load_rows(sv, ld, base + (size_t)(g.Hq + g.Hkv + kvh) * hd, C, k0, SC_KEYS, S, hd);
        __syncthreads();
        float s[SC_ROWS];
#pragma unroll
        for (int r = 0; r < SC_ROWS; r++) s[r] = 0.0f;
        const float *kr = sk + lane * ld;
        for (int d = 0; d < hd; d++) {
            float kd = kr[d];
#pragma unroll
            for (int r = 0; r < SC_ROWS; r++) s[r] += sq[(row0 + r) * hd + d] * kd;
        }
        const int j = k0 + lane;
        float p[SC_ROWS];
#pragma unroll
        for (int r = 0; r < SC_ROWS; r++) {
            int vis = sc_visible(q0 + row0 + r, j, S, g.window);
            float z = vis ? g.cap * tanhf(g.scale * s[r] / g.cap) : -INFINITY;
            float m_new = fmaxf(m[r], sc_warp_max(z));  // the same in every lane
            float corr = 1.0f;
            p[r] = 0.0f;
            if (m_new != -INFINITY) {
                corr = expf(m[r] - m_new);
                p[r] = vis ? expf(z - m_new) : 0.0f;
            }
            m[r] = m_new;
            l[r] = l[r] * corr + p[r];
#pragma unroll
            for (int t = 0; t < NT; t++) o[r][t] *= corr;
        }
        for (int jj = 0; jj < SC_KEYS; jj++) {
            float pj[SC_ROWS];
#pragma unroll
            for (int r = 0; r < SC_ROWS; r++) pj[r] = __shfl_sync(0xffffffffu, p[r], jj);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                int d = lane + 32 * t;
                float vd = d < hd ? sv[jj * ld + d] : 0.0f;
#pragma unroll
                for (int r = 0; r < SC_ROWS; r++) o[r][t] += pj[r] * vd;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SC_ROWS; r++) {
        int i = q0 + row0 + r;
        float L = sc_warp_sum(l[r]);
        if (i >= S) continue;
        float inv = 1.0f / L;
        bf16 *orow = out + ((size_t)b * S + i) * O + (size_t)h * hd;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            int d = lane + 32 * t;
            if (d < hd) orow[d] = __float2bfloat16(o[r][t] * inv);
        }
        if (lane == 0) stats[((size_t)b * g.Hq + h) * S + i] = m[r] + logf(L);
    }
}

// dQ. grid (ceil(S / 16), Hq, B). Reads qkv, dout, out, stats; writes the q columns of dqkv.
// Shared memory: q and dO tiles [16][hd], k and v tiles [SC_KEYS][hd + 1] fp32.
template <int NT>
__global__ void __launch_bounds__(SC_THREADS)
    softcap_backward_dq_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats, const bf16 *qkv,
                               SoftcapGeometry g) {
    extern __shared__ float smem[];
    const int hd = g.hd, ld = hd + 1, S = g.S;
    float *sq = smem, *sdo = sq + SC_ROWS_PER_BLOCK * hd, *sk = sdo + SC_ROWS_PER_BLOCK * hd, *sv = sk + SC_KEYS * ld;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * SC_ROWS_PER_BLOCK, kvh = h / g.group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = warp * SC_ROWS;
    const size_t C = (size_t)(g.Hq + 2 * g.Hkv) * hd, O = (size_t)g.Hq * hd;
    const bf16 *base = qkv + (size_t)b * S * C;
    sc_load_rows(sq, hd, base + (size_t)h * hd, C, q0, SC_ROWS_PER_BLOCK, S, hd);
    sc_load_rows(sdo, hd, dout + (size_t)b * S * O + (size_t)h * hd, O, q0, SC_ROWS_PER_BLOCK, S, hd);
    __syncthreads();

    float lse[SC_ROWS], D[SC_ROWS], dq[SC_ROWS][NT];
#pragma unroll
    for (int r = 0; r < SC_ROWS; r++) {
        int i = q0 + row0 + r;
        float part = 0.0f;
        if (i < S) {
            const bf16 *orow = out + ((size_t)b * S + i) * O + (size_t)h * hd;
            for (int d = lane; d < hd; d += 32) part += sdo[(row0 + r) * hd + d] * __bfloat162float(orow[d]);
        }
        D[r] = sc_warp_sum(part);
        lse[r] = i < S ? stats[((size_t)b * g.Hq + h) * S + i] : 0.0f;
#pragma unroll
        for (int t = 0; t < NT; t++) dq[r][t] = 0.0f;
    }
    const int q_last = min(q0 + SC_ROWS_PER_BLOCK, S) - 1;
    const int k_begin = g.window > 0 ? max(0, q0 - g.window + 1) : 0;
    for (int k0 = k_begin; k0 <= q_last; k0 += SC_KEYS) {
        __syncthreads();  // every warp is done with the previous k / v tile
        sc_load_rows(sk, ld, base + (size_t)(g.Hq + kvh) * hd, C, k0, SC_KEYS, S, hd);
        sc_load_rows(sv, ld, base + (size_t)(g.Hq + g.Hkv + kvh) * hd, C, k0, SC_KEYS, S, hd);
        __syncthreads();
        float s[SC_ROWS], dp[SC_ROWS];
#pragma unroll
        for (int r = 0; r < SC_ROWS; r++) s[r] = dp[r] = 0.0f;
        const float *kr = sk + lane * ld, *vr = sv + lane * ld;
        for (int d = 0; d < hd; d++) {
            float kd = kr[d], vd = vr[d];
#pragma unroll
            for (int r = 0; r < SC_ROWS; r++) {
                s[r] += sq[(row0 + r) * hd + d] * kd;
                dp[r] += sdo[(row0 + r) * hd + d] * vd;
            }
        }
        const int j = k0 + lane;
        float ds[SC_ROWS];
#pragma unroll
        for (int r = 0; r < SC_ROWS; r++) {
            float th = tanhf(g.scale * s[r] / g.cap);
            float p = sc_visible(q0 + row0 + r, j, S, g.window) ? expf(g.cap * th - lse[r]) : 0.0f;
            ds[r] = p * (dp[r] - D[r]) * (1.0f - th * th) * g.scale;
        }
        for (int jj = 0; jj < SC_KEYS; jj++) {
            float dsj[SC_ROWS];
#pragma unroll
            for (int r = 0; r < SC_ROWS; r++) dsj[r] = __shfl_sync(0xffffffffu, ds[r], jj);
#pragma unroll
            for (int t = 0; t < NT; t++) {
                int d = lane + 32 * t;
                float kd = d < hd ? sk[jj * ld + d] : 0.0f;
#pragma unroll
                for (int r = 0; r < SC_ROWS; r++) dq[r][t] += dsj[r] * kd;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SC_ROWS; r++) {
        int i = q0 + row0 + r;
        if (i >= S) continue;
        bf16 *row = dqkv + ((size_t)b * S + i) * C + (size_t)h * hd;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            int d = lane + 32 * t;
            if (d < hd) row[d] = __float2bfloat16(dq[r][t]);
        }
    }
}

// dK, dV. grid (ceil(S / 16), Hkv, B): a block owns 16 keys of kv head kvh and sums over the query
// heads kvh * group .. (kvh + 1) * group - 1 in order, then over query tiles in order. Reads qkv,
// dout, out, stats; writes the k and v columns of dqkv. Shared memory: k and v rows [16][hd], q and
// dO tiles [SC_KEYS][hd + 1], lse and D of the query tile [SC_KEYS] each, fp32.
template <int NT>
__global__ void __launch_bounds__(SC_THREADS)
    softcap_backward_dkv_kernel(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats, const bf16 *qkv,
                                SoftcapGeometry g) {
    extern __shared__ float smem[];
    const int hd = g.hd, ld = hd + 1, S = g.S;
    float *sk = smem, *sv = sk + SC_ROWS_PER_BLOCK * hd, *sq = sv + SC_ROWS_PER_BLOCK * hd, *sdo = sq + SC_KEYS * ld;
    float *slse = sdo + SC_KEYS * ld, *sD = slse + SC_KEYS;
    const int b = blockIdx.z, kvh = blockIdx.y, k0 = blockIdx.x * SC_ROWS_PER_BLOCK;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, row0 = warp * SC_ROWS;
    const size_t C = (size_t)(g.Hq + 2 * g.Hkv) * hd, O = (size_t)g.Hq * hd;
    const bf16 *base = qkv + (size_t)b * S * C;
    sc_load_rows(sk, hd, base + (size_t)(g.Hq + kvh) * hd, C, k0, SC_ROWS_PER_BLOCK, S, hd);
    sc_load_rows(sv, hd, base + (size_t)(g.Hq + g.Hkv + kvh) * hd, C, k0, SC_ROWS_PER_BLOCK, S, hd);

    float dk[SC_ROWS][NT], dv[SC_ROWS][NT];
#pragma unroll
    for (int r = 0; r < SC_ROWS; r++) {
#pragma unroll
        for (int t = 0; t < NT; t++) dk[r][t] = dv[r][t] = 0.0f;
    }
    const int k_last = min(k0 + SC_ROWS_PER_BLOCK, S) - 1;
    const int q_end = g.window > 0 ? min(S, k_last + g.window) : S;  // queries i < q_end see a key of the block
    for (int h = kvh * g.group; h < (kvh + 1) * g.group; h++) {
        for (int q0 = k0; q0 < q_end; q0 += SC_KEYS) {
            __syncthreads();  // every warp is done with the previous q / dO tile and its lse, D
            sc_load_rows(sq, ld, base + (size_t)h * hd, C, q0, SC_KEYS, S, hd);
            sc_load_rows(sdo, ld, dout + (size_t)b * S * O + (size_t)h * hd, O, q0, SC_KEYS, S, hd);
            __syncthreads();
            for (int rr = warp; rr < SC_KEYS; rr += SC_WARPS) {  // D and lse of the tile's queries
                int i = q0 + rr;
                float part = 0.0f;
                if (i < S) {
                    const bf16 *orow = out + ((size_t)b * S + i) * O + (size_t)h * hd;
                    for (int d = lane; d < hd; d += 32) part += sdo[rr * ld + d] * __bfloat162float(orow[d]);
                }
                part = sc_warp_sum(part);
                if (lane == 0) {
                    sD[rr] = part;
                    slse[rr] = i < S ? stats[((size_t)b * g.Hq + h) * S + i] : 0.0f;
                }
            }
            __syncthreads();
            float s[SC_ROWS], dp[SC_ROWS];
#pragma unroll
            for (int r = 0; r < SC_ROWS; r++) s[r] = dp[r] = 0.0f;
            const float *qr = sq + lane * ld, *dor = sdo + lane * ld;
            for (int d = 0; d < hd; d++) {
                float qd = qr[d], dod = dor[d];
#pragma unroll
                for (int r = 0; r < SC_ROWS; r++) {
                    s[r] += qd * sk[(row0 + r) * hd + d];
                    dp[r] += dod * sv[(row0 + r) * hd + d];
                }
            }
            const int i = q0 + lane;
            const float lse_i = slse[lane], D_i = sD[lane];
            float p[SC_ROWS], ds[SC_ROWS];
#pragma unroll
            for (int r = 0; r < SC_ROWS; r++) {
                float th = tanhf(g.scale * s[r] / g.cap);
                p[r] = sc_visible(i, k0 + row0 + r, S, g.window) ? expf(g.cap * th - lse_i) : 0.0f;
                ds[r] = p[r] * (dp[r] - D_i) * (1.0f - th * th) * g.scale;
            }
            for (int ii = 0; ii < SC_KEYS; ii++) {
                float pi[SC_ROWS], dsi[SC_ROWS];
#pragma unroll
                for (int r = 0; r < SC_ROWS; r++) {
                    pi[r] = __shfl_sync(0xffffffffu, p[r], ii);
                    dsi[r] = __shfl_sync(0xffffffffu, ds[r], ii);
                }
#pragma unroll
                for (int t = 0; t < NT; t++) {
                    int d = lane + 32 * t;
                    float qd = d < hd ? sq[ii * ld + d] : 0.0f, dod = d < hd ? sdo[ii * ld + d] : 0.0f;
#pragma unroll
                    for (int r = 0; r < SC_ROWS; r++) {
                        dk[r][t] += dsi[r] * qd;
                        dv[r][t] += pi[r] * dod;
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < SC_ROWS; r++) {
        int j = k0 + row0 + r;
        if (j >= S) continue;
        bf16 *krow = dqkv + ((size_t)b * S + j) * C + (size_t)(g.Hq + kvh) * hd;
        bf16 *vrow = dqkv + ((size_t)b * S + j) * C + (size_t)(g.Hq + g.Hkv + kvh) * hd;
#pragma unroll
        for (int t = 0; t < NT; t++) {
            int d = lane + 32 * t;
            if (d < hd) {
                krow[d] = __float2bfloat16(dk[r][t]);
                vrow[d] = __float2bfloat16(dv[r][t]);
            }
        }
    }
}

// ---- host side ----

extern "C" int attention_softcap_supported(const AttentionShape *s, char *why, size_t why_len) {
    const char *reason = NULL;
    if (s == NULL) reason = "no shape given";
    else if (s->B < 1 || s->S < 1 || s->Hq < 1 || s->Hkv < 1 || s->hd < 1)
        reason = "B, S, Hq, Hkv and hd must be positive";
    else if (s->B > 65535 || s->Hq > 65535) reason = "B and Hq must be at most 65535 (grid dimensions)";
    else if (s->Hq % s->Hkv != 0) reason = "Hkv must divide Hq (grouped-query attention)";
    else if (s->hd > SC_MAX_HD) reason = "the soft-cap kernels support head dims up to 256";
    else if (!(s->softcap > 0) || !isfinite(s->softcap)) reason = "the soft-cap kernels need a positive finite softcap";
    else if (s->window < 0) reason = "window must be 0 (full causal) or positive";
    else if (!(s->scale > 0) || !isfinite(s->scale)) reason = "scale must be a positive finite number";
    if (why != NULL && why_len > 0) snprintf(why, why_len, "%s", reason != NULL ? reason : "");
    return reason == NULL;
}

static SoftcapGeometry softcap_geometry(const AttentionShape *s, const char *caller) {
    char why[160];
    if (!attention_softcap_supported(s, why, sizeof(why))) die("%s: shape not supported: %s", caller, why);
    SoftcapGeometry g;
    g.S = s->S;
    g.Hq = s->Hq;
    g.Hkv = s->Hkv;
    g.hd = s->hd;
    g.group = s->Hq / s->Hkv;
    g.window = s->window;
    g.scale = s->scale;
    g.cap = s->softcap;
    return g;
}

// Head-dim elements per lane, rounded up to the instantiated 1, 4 or 8 (ptxas spills a few registers
// of the dK / dV kernel at NT = 2, so head dims 33..64 take NT = 4 with idle lanes).
static int softcap_nt(int hd) { return hd <= 32 ? 1 : hd <= 128 ? 4 : 8; }

// Opts the kernel in to `bytes` of dynamic shared memory when that is above the default 48 KiB; dies
// when the device cannot give that much.
static void softcap_prepare_smem(const void *kernel, size_t bytes, const char *caller) {
    if (bytes <= SC_SMEM_DEFAULT) return;
    int dev = 0, max_smem = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (bytes > (size_t)max_smem) die("%s: needs %zu bytes of shared memory, the device allows %d", caller, bytes, max_smem);
    cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes));
}

// Launches kernel<NT> for the NT of this head dim with the given grid and shared memory.
#define SOFTCAP_LAUNCH(kernel, nt, grid, smem, stream, caller, ...)                                   \
    do {                                                                                            \
        switch (nt) {                                                                               \
            case 1: softcap_prepare_smem((const void *)kernel<1>, smem, caller);                   \
                kernel<1><<<grid, SC_THREADS, smem, stream>>>(__VA_ARGS__); break;                  \
            case 4: softcap_prepare_smem((const void *)kernel<4>, smem, caller);                   \
                kernel<4><<<grid, SC_THREADS, smem, stream>>>(__VA_ARGS__); break;                  \
            default: softcap_prepare_smem((const void *)kernel<8>, smem, caller);                  \
                kernel<8><<<grid, SC_THREADS, smem, stream>>>(__VA_ARGS__); break;                  \
        }                                                                                           \
        cudaCheckLaunch();                                                                          \
    } while (0)

extern "C" void attention_softcap_forward(bf16 *out, float *stats, const bf16 *qkv, const AttentionShape *s,
                                          cudaStream_t stream) {
    SoftcapGeometry g = softcap_geometry(s, "attention_softcap_forward");
    dim3 grid((unsigned)ceil_div(s->S, SC_ROWS_PER_BLOCK), (unsigned)s->Hq, (unsigned)s->B);
    size_t smem = ((size_t)SC_ROWS_PER_BLOCK * s->hd + 2 * (size_t)SC_KEYS * (s->hd + 1)) * sizeof(float);
    SOFTCAP_LAUNCH(softcap_forward_kernel, softcap_nt(s->hd), grid, smem, stream, "attention_softcap_forward", out,
                   stats, qkv, g);
}

extern "C" void attention_softcap_backward(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats,
                                           const bf16 *qkv, const AttentionShape *s, cudaStream_t stream) {
    SoftcapGeometry g = softcap_geometry(s, "attention_softcap_backward");
    int nt = softcap_nt(s->hd);
    size_t smem = (2 * (size_t)SC_ROWS_PER_BLOCK * s->hd + 2 * (size_t)SC_KEYS * (s->hd + 1)) * sizeof(float);
    dim3 grid_q((unsigned)ceil_div(s->S, SC_ROWS_PER_BLOCK), (unsigned)s->Hq, (unsigned)s->B);
    SOFTCAP_LAUNCH(softcap_backward_dq_kernel, nt, grid_q, smem, stream, "attention_softcap_backward", dqkv, dout,
                   out, stats, qkv, g);
    dim3 grid_kv((unsigned)ceil_div(s->S, SC_ROWS_PER_BLOCK), (unsigned)s->Hkv, (unsigned)s->B);
    size_t smem_kv = smem + 2 * SC_KEYS * sizeof(float);
    SOFTCAP_LAUNCH(softcap_backward_dkv_kernel, nt, grid_kv, smem_kv, stream, "attention_softcap_backward", dqkv,
                   dout, out, stats, qkv, g);
}

// Device kernels of the trainer and their launchers (declared in mst_kernels.h): embedding, RMSNorm,
// RoPE, gated activations, elementwise ops, cross-entropy over vocabulary chunks, AdamW and
// deterministic reductions. Built for Hopper (sm_90); all of them are memory-bound.
//
// Conventions used by every kernel below:
// - A thread works on "units" of UNIT = 8 consecutive elements. When the rows (or the flat buffer) and
//   every pointer a kernel touches are 16-byte aligned (the `vec` flag, decided once by the launcher), a
//   full unit is one 16-byte load/store (8 bf16, or two float4 for fp32). Otherwise, and for the last
//   partial unit of a row, the elements are loaded and stored one by one (the scalar path), so any
//   size works.
// - Arithmetic is fp32; bf16 is storage only, written with round-to-nearest-even unless said.
// - No float atomics anywhere: every reduction runs in a fixed order (per-block partials, then a
//   fixed-order final pass), so results are bit-identical from run to run.
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "adamw8bit.h"
#include "model_config.h"
#include "mst_kernels.h"

#define UNIT 8                  // elements per thread work unit (16 bytes of bf16)
#define WARP_SIZE 32
#define ROW_BLOCK 256           // threads of the one-block-per-row kernels
#define FLAT_BLOCK 256          // threads of the flat elementwise kernels
#define FLAT_MAX_BLOCKS 65536   // grid cap of the flat kernels (they grid-stride beyond it)
#define NORM_WARPS 4            // rows (one per warp) of an rmsnorm_forward block
#define RMS_BWD_WARPS 8         // warps of an rmsnorm_backward block = rows of one sub-group
#define RMS_BWD_ROWS 32         // rows of an rmsnorm_backward block (its dw partial covers these)
#define COLSUM_SEGMENTS 16      // row segments summed in parallel by rmsnorm_dw_reduce_kernel
#define GRAD_NORM_PARTIALS 1024 // blocks (= partial sums) of grad_norm_accumulate
#define GRAD_NORM_THREADS 256
#define SUM_THREADS 1024        // threads of the single-block reductions

// ---------------------------------------------------------------------------------------------
// Device helpers: unit loads/stores and fixed-order reductions
// ---------------------------------------------------------------------------------------------

// f[0..UNIT) = p[0..nv) as fp32, zeros beyond nv. One 16-byte load when vec and the unit is full.
static __device__ __forceinline__ void load8_bf16(float *f, const bf16 *p, int nv, int vec) {
    if (vec && nv == UNIT) {
        uint4 raw = *(const uint4 *)p;
        __nv_bfloat162 h[UNIT / 2];
        memcpy(h, &raw, sizeof(raw));  // register reinterpretation without breaking type-based aliasing
#pragma unroll
        for (int k = 0; k < UNIT / 2; k++) {
            float2 t = __bfloat1622float2(h[k]);
            f[2 * k] = t.x;
            f[2 * k + 1] = t.y;
        }
    } else {
#pragma unroll
        for (int k = 0; k < UNIT; k++) f[k] = k < nv ? __bfloat162float(p[k]) : 0.0f;
    }
}

// p[0..nv) = h[0..nv) (already bf16).
static __device__ __forceinline__ void store8_bf16_raw(bf16 *p, const bf16 *h, int nv, int vec) {
    if (vec && nv == UNIT) {
        uint4 raw;
        memcpy(&raw, h, sizeof(raw));
        *(uint4 *)p = raw;
    } else {
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            if (k < nv) p[k] = h[k];
        }
    }
}

// p[0..nv) = bf16(f[0..nv)), round to nearest even.
static __device__ __forceinline__ void store8_bf16(bf16 *p, const float *f, int nv, int vec) {
    bf16 h[UNIT];
#pragma unroll
    for (int k = 0; k < UNIT; k++) h[k] = __float2bfloat16_rn(f[k]);
    store8_bf16_raw(p, h, nv, vec);
}

static __device__ __forceinline__ void load8_f32(float *f, const float *p, int nv, int vec) {
    if (vec && nv == UNIT) {
        float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
        f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
        f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < UNIT; k++) f[k] = k < nv ? p[k] : 0.0f;
    }
}

static __device__ __forceinline__ void store8_f32(float *p, const float *f, int nv, int vec) {
    if (vec && nv == UNIT) {
        *(float4 *)p = make_float4(f[0], f[1], f[2], f[3]);
        *(float4 *)(p + 4) = make_float4(f[4], f[5], f[6], f[7]);
    } else {
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            if (k < nv) p[k] = f[k];
        }
    }
}

// Unit load/store of a buffer whose element type is a run-time DType; `off` counts elements.
static __device__ __forceinline__ void load8_typed(float *f, const void *p, DType t, size_t off, int nv, int vec) {
    if (t == DT_FP32) load8_f32(f, (const float *)p + off, nv, vec);
    else load8_bf16(f, (const bf16 *)p + off, nv, vec);
}

static __device__ __forceinline__ void store8_typed(void *p, DType t, size_t off, const float *f, int nv, int vec) {
    if (t == DT_FP32) store8_f32((float *)p + off, f, nv, vec);
    else store8_bf16((bf16 *)p + off, f, nv, vec);
}

// Butterfly sums: every lane ends with the same, bit-identical value (fp addition is commutative).
static __device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block in a fixed order; the result reaches every thread. blockDim.x is a multiple of
// 32; `smem` holds 32 floats. Every thread of the block must call it.
static __device__ float block_sum(float v, float *smem) {
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    int n_warps = blockDim.x / WARP_SIZE;
    v = warp_sum(v);
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    return warp_sum(lane < n_warps ? smem[lane] : 0.0f);
}

// Merges the log-sum-exp state (m2, s2) into (m, s): s is a sum of exp(z - m). Symmetric in its two
// operands bit for bit, so butterfly merges leave every lane with the same state.
static __device__ __forceinline__ void lse_merge(float *m, float *s, float m2, float s2) {
    float mx = fmaxf(*m, m2);
    if (mx == -INFINITY) return;  // both states empty
    *s = *s * expf(*m - mx) + s2 * expf(m2 - mx);
    *m = mx;
}

static __device__ __forceinline__ void warp_lse_merge(float *m, float *s) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, *m, o), s2 = __shfl_xor_sync(0xffffffffu, *s, o);
        lse_merge(m, s, m2, s2);
    }
}

// Grid of a flat kernel over `units` work units, FLAT_BLOCK threads each; the kernels grid-stride.
static unsigned int flat_blocks(size_t units) {
    size_t blocks = ceil_div_size(units, FLAT_BLOCK);
    if (blocks > FLAT_MAX_BLOCKS) blocks = FLAT_MAX_BLOCKS;
    return (unsigned int)(blocks > 0 ? blocks : 1);
}

static int aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

// out (N, d) bf16 = embed[tokens[n]] (V, d) bf16 * scale. One block per row n. tokens must lie in
// [0, V): the kernel does not know V (the data loader checks the ids).
__global__ void embedding_forward_kernel(bf16 *out, const int32_t *tokens, const bf16 *embed, int d, float scale,
                                         int vec) {
    const bf16 *src = embed + (size_t)tokens[blockIdx.x] * d;
    bf16 *dst = out + (size_t)blockIdx.x * d;
    for (int j = threadIdx.x * UNIT; j < d; j += blockDim.x * UNIT) {
        int nv = min(UNIT, d - j);
        float f[UNIT];
        load8_bf16(f, src + j, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) f[k] *= scale;
        store8_bf16(dst + j, f, nv, vec);
    }
}

void embedding_forward(bf16 *out, const int32_t *tokens, const bf16 *embed, int N, int d, float scale,
                       cudaStream_t stream) {
    if (N < 0 || d <= 0) die("embedding_forward: bad shape N=%d d=%d", N, d);
    if (N == 0) return;
    int vec = d % UNIT == 0 && aligned16(out) && aligned16(embed);
    embedding_forward_kernel<<<N, 128, 0, stream>>>(out, tokens, embed, d, scale, vec);
    cudaCheckLaunch();
}

// dembed[tok] (d) += scale * sum of dout (N, d) rows p in positions[offsets[u] .. offsets[u+1]), for
// tok = unique_tokens[u]; one block per unique token u, positions summed in the given order (fp32),
// then one read-modify-write of the embedding row (fp32 or bf16). Rows of absent tokens are untouched.
__global__ void embedding_backward_kernel(void *dembed, DType dembed_type, const bf16 *dout,
                                          const int32_t *unique_tokens, const int32_t *offsets,
                                          const int32_t *positions, int d, float scale, int vec) {
    int u = blockIdx.x;
    size_t row = (size_t)unique_tokens[u] * d;
    int p0 = offsets[u], p1 = offsets[u + 1];
    for (int j = threadIdx.x * UNIT; j < d; j += blockDim.x * UNIT) {
        int nv = min(UNIT, d - j);
        float acc[UNIT] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int p = p0; p < p1; p++) {
            float f[UNIT];
            load8_bf16(f, dout + (size_t)positions[p] * d + j, nv, vec);
#pragma unroll
            for (int k = 0; k < UNIT; k++) acc[k] += f[k];
        }
        float g[UNIT];
        load8_typed(g, dembed, dembed_type, row + j, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) g[k] += scale * acc[k];
        store8_typed(dembed, dembed_type, row + j, g, nv, vec);
    }
}

void embedding_backward(void *dembed, DType dembed_type, const bf16 *dout, const int32_t *unique_tokens,
                        const int32_t *offsets, const int32_t *positions, int n_unique, int d, float scale,
                        cudaStream_t stream) {
    if (n_unique < 0 || d <= 0) die("embedding_backward: bad shape n_unique=%d d=%d", n_unique, d);
    if (n_unique == 0) return;
    int vec = d % UNIT == 0 && aligned16(dembed) && aligned16(dout);
    embedding_backward_kernel<<<n_unique, 128, 0, stream>>>(dembed, dembed_type, dout, unique_tokens, offsets,
                                                            positions, d, scale, vec);
    cudaCheckLaunch();
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

// y (N, d) bf16 = x * rstd * (w + w_offset), rstd (N) fp32 = 1 / sqrt(mean(x^2) + eps); x (N, d) bf16,
// w (d) bf16. One warp per row, NORM_WARPS rows per block; x is read twice (the second pass hits cache).
__global__ void __launch_bounds__(NORM_WARPS * WARP_SIZE)
    rmsnorm_forward_kernel(bf16 *y, float *rstd, const bf16 *x, const bf16 *w, int N, int d, float eps,
                           float w_offset, int vec) {
    int lane = threadIdx.x % WARP_SIZE;
    int row = blockIdx.x * NORM_WARPS + threadIdx.x / WARP_SIZE;
    if (row >= N) return;  // whole warp; no block-level synchronisation below
    const bf16 *xr = x + (size_t)row * d;
    bf16 *yr = y + (size_t)row * d;
    float ss = 0.0f;
    for (int j = lane * UNIT; j < d; j += WARP_SIZE * UNIT) {
        float f[UNIT];
        load8_bf16(f, xr + j, min(UNIT, d - j), vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) ss += f[k] * f[k];
    }
    float r = rsqrtf(warp_sum(ss) / (float)d + eps);
    if (lane == 0) rstd[row] = r;
    for (int j = lane * UNIT; j < d; j += WARP_SIZE * UNIT) {
        int nv = min(UNIT, d - j);
        float f[UNIT], g[UNIT];
        load8_bf16(f, xr + j, nv, vec);
        load8_bf16(g, w + j, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) f[k] = f[k] * r * (g[k] + w_offset);
        store8_bf16(yr + j, f, nv, vec);
    }
}

void rmsnorm_forward(bf16 *y, float *rstd, const bf16 *x, const bf16 *w, int N, int d, float eps,
                     float w_offset, cudaStream_t stream) {
    if (N < 0 || d <= 0) die("rmsnorm_forward: bad shape N=%d d=%d", N, d);
    if (N == 0) return;
    int vec = d % UNIT == 0 && aligned16(y) && aligned16(x) && aligned16(w);
    rmsnorm_forward_kernel<<<ceil_div(N, NORM_WARPS), NORM_WARPS * WARP_SIZE, 0, stream>>>(y, rstd, x, w, N, d,
                                                                                            eps, w_offset, vec);
    cudaCheckLaunch();
}

int rmsnorm_rows_per_block(void) { return RMS_BWD_ROWS; }

// Backward of rmsnorm_forward for the RMS_BWD_ROWS rows of block b. With g = w + w_offset and r = rstd:
//   dx = (accumulate ? dx : 0) + r * g * dy - x * r^3 * mean(dy * g * x)          dx, dy, x (N, d) bf16
//   scratch[b] (d) fp32 = sum over the block's rows of dy * x * r                 (dw partial)
// The rows go in sub-groups of RMS_BWD_WARPS: each warp reduces one row's coefficient, then every
// thread owns units of columns and walks the sub-group's rows in order (dy, x re-read from cache),
// adding its columns of dw into shared memory (d floats, dynamic) that only it touches.
__global__ void __launch_bounds__(RMS_BWD_WARPS * WARP_SIZE)
    rmsnorm_backward_kernel(bf16 *dx, float *scratch, const bf16 *dy, const bf16 *x, const bf16 *w,
                            const float *rstd, int N, int d, float w_offset, int accumulate, int vec) {
    extern __shared__ float4 dw_acc_raw[];  // (d) floats; float4 makes it 16-byte aligned
    float *dw_acc = (float *)dw_acc_raw;
    __shared__ float row_coef[RMS_BWD_WARPS], row_rstd[RMS_BWD_WARPS];
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    int row0 = blockIdx.x * RMS_BWD_ROWS;
    const int stride = RMS_BWD_WARPS * WARP_SIZE * UNIT;
    for (int j = threadIdx.x * UNIT; j < d; j += stride) {
        float z[UNIT] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        store8_f32(dw_acc + j, z, min(UNIT, d - j), 1);
    }
    for (int g0 = row0; g0 < row0 + RMS_BWD_ROWS && g0 < N; g0 += RMS_BWD_WARPS) {
        int row = g0 + warp;
        if (row < N) {
            const bf16 *dyr = dy + (size_t)row * d, *xr = x + (size_t)row * d;
            float s = 0.0f;
            for (int j = lane * UNIT; j < d; j += WARP_SIZE * UNIT) {
                int nv = min(UNIT, d - j);
                float a[UNIT], b[UNIT], c[UNIT];
                load8_bf16(a, dyr + j, nv, vec);
                load8_bf16(b, xr + j, nv, vec);
                load8_bf16(c, w + j, nv, vec);
#pragma unroll
                for (int k = 0; k < UNIT; k++) s += a[k] * (c[k] + w_offset) * b[k];
            }
            s = warp_sum(s);
            float r = rstd[row];
            if (lane == 0) {
                row_coef[warp] = r * r * r * (s / (float)d);
                row_rstd[warp] = r;
            }
        }
        __syncthreads();
        int n_rows = min(RMS_BWD_WARPS, N - g0);
        for (int j = threadIdx.x * UNIT; j < d; j += stride) {
            int nv = min(UNIT, d - j);
            float g[UNIT], acc[UNIT];
            load8_bf16(g, w + j, nv, vec);
            load8_f32(acc, dw_acc + j, nv, 1);
#pragma unroll
            for (int i = 0; i < RMS_BWD_WARPS; i++) {
                if (i < n_rows) {
                    size_t off = (size_t)(g0 + i) * d + j;
                    float fdy[UNIT], fx[UNIT], o[UNIT];
                    load8_bf16(fdy, dy + off, nv, vec);
                    load8_bf16(fx, x + off, nv, vec);
                    if (accumulate) {
                        load8_bf16(o, dx + off, nv, vec);
                    } else {
#pragma unroll
                        for (int k = 0; k < UNIT; k++) o[k] = 0.0f;
                    }
                    float r = row_rstd[i], coef = row_coef[i];
#pragma unroll
                    for (int k = 0; k < UNIT; k++) {
                        o[k] += r * (g[k] + w_offset) * fdy[k] - fx[k] * coef;
                        acc[k] += fdy[k] * fx[k] * r;
                    }
                    store8_bf16(dx + off, o, nv, vec);
                }
            }
            store8_f32(dw_acc + j, acc, nv, 1);
        }
        __syncthreads();  // row_coef / row_rstd are rewritten by the next sub-group
    }
    for (int j = threadIdx.x * UNIT; j < d; j += stride) {
        int nv = min(UNIT, d - j);
        float acc[UNIT];
        load8_f32(acc, dw_acc + j, nv, 1);
        store8_f32(scratch + (size_t)blockIdx.x * d + j, acc, nv, vec);
    }
}

// dw (d) fp32 += sum over b in [0, n_blocks) of partials (n_blocks, d), in a fixed order: thread
// (x, y) of a (32, COLSUM_SEGMENTS) block sums rows y, y + COLSUM_SEGMENTS, ... of column
// blockIdx.x * 32 + x, then row 0 of threads adds the segments in order.
__global__ void rmsnorm_dw_reduce_kernel(float *dw, const float *partials, int n_blocks, int d) {
    __shared__ float seg[COLSUM_SEGMENTS][WARP_SIZE + 1];
    int col = blockIdx.x * WARP_SIZE + threadIdx.x;
    float s = 0.0f;
    if (col < d) {
        for (int b = threadIdx.y; b < n_blocks; b += COLSUM_SEGMENTS) s += partials[(size_t)b * d + col];
    }
    seg[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < d) {
        float total = 0.0f;
#pragma unroll
        for (int i = 0; i < COLSUM_SEGMENTS; i++) total += seg[i][threadIdx.x];
        dw[col] += total;
    }
}

void rmsnorm_backward(bf16 *dx, float *dw_fp32, float *scratch, const bf16 *dy, const bf16 *x,
                      const bf16 *w, const float *rstd, int N, int d, float w_offset, int accumulate,
                      cudaStream_t stream) {
    if (N < 0 || d <= 0) die("rmsnorm_backward: bad shape N=%d d=%d", N, d);
    if (N == 0) return;
    size_t smem = (size_t)d * sizeof(float);
    int max_smem = 0, dev = 0;
    cudaCheck(cudaGetDevice(&dev));
    cudaCheck(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (smem + 2 * RMS_BWD_WARPS * sizeof(float) > (size_t)max_smem) {
        die("rmsnorm_backward: d=%d needs %zu bytes of shared memory, the device allows %d", d, smem, max_smem);
    }
    if (smem > 48 * 1024) {
        cudaCheck(cudaFuncSetAttribute(rmsnorm_backward_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)smem));
    }
    int vec = d % UNIT == 0 && aligned16(dx) && aligned16(dy) && aligned16(x) && aligned16(w) && aligned16(scratch);
    int n_blocks = ceil_div(N, RMS_BWD_ROWS);
    rmsnorm_backward_kernel<<<n_blocks, RMS_BWD_WARPS * WARP_SIZE, smem, stream>>>(dx, scratch, dy, x, w, rstd, N,
                                                                                   d, w_offset, accumulate, vec);
    cudaCheckLaunch();
    if (dw_fp32 == NULL) return;  // a frozen weight: no gradient
    dim3 block(WARP_SIZE, COLSUM_SEGMENTS);
    rmsnorm_dw_reduce_kernel<<<ceil_div(d, WARP_SIZE), block, 0, stream>>>(dw_fp32, scratch, n_blocks, d);
    cudaCheckLaunch();
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

// Rotates, in place, the pairs (i, i + hd/2), i < hd/2, of the first Hrot = Hq + Hkv heads (q and k) of
// every row of qkv (N, (Hq + 2 Hkv) * hd) bf16; v heads are untouched. Row n has position
// pos_offset + n % S; cos_sin (max_pos, hd) fp32 holds [cos | sin] of pos * inv_freq[i].
//   (a, b) -> (a cos - b sin, b cos + a sin), sin negated when inverse (the backward).
// One thread per unit of 8 pairs; flat index = (n * Hrot + head) * units_per_head + unit.
__global__ void rope_kernel(bf16 *qkv, const float *cos_sin, int N, int S, int pos_offset, int Hrot, int row_len,
                            int hd, int inverse, int vec) {
    int half = hd / 2;
    int units_per_head = (half + UNIT - 1) / UNIT;
    size_t total = (size_t)N * Hrot * units_per_head;
    float sgn = inverse ? -1.0f : 1.0f;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        int i0 = (int)(idx % units_per_head) * UNIT;
        size_t t = idx / units_per_head;
        int head = (int)(t % Hrot);
        size_t n = t / Hrot;
        int nv = min(UNIT, half - i0);
        int pos = pos_offset + (int)(n % S);
        const float *cs = cos_sin + (size_t)pos * hd;
        bf16 *p = qkv + n * row_len + (size_t)head * hd;
        float a[UNIT], b[UNIT], c[UNIT], s[UNIT];
        load8_bf16(a, p + i0, nv, vec);
        load8_bf16(b, p + half + i0, nv, vec);
        load8_f32(c, cs + i0, nv, vec);
        load8_f32(s, cs + half + i0, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            float sn = sgn * s[k];
            float ra = a[k] * c[k] - b[k] * sn, rb = b[k] * c[k] + a[k] * sn;
            a[k] = ra;
            b[k] = rb;
        }
        store8_bf16(p + i0, a, nv, vec);
        store8_bf16(p + half + i0, b, nv, vec);
    }
}

void rope_apply(bf16 *qkv, const float *cos_sin, int N, int S, int pos_offset, int Hq, int Hkv, int hd,
                int inverse, cudaStream_t stream) {
    if (N < 0 || S <= 0 || pos_offset < 0 || Hq <= 0 || Hkv < 0 || hd <= 0 || hd % 2 != 0) {
        die("rope_apply: bad shape N=%d S=%d pos_offset=%d Hq=%d Hkv=%d hd=%d", N, S, pos_offset, Hq, Hkv, hd);
    }
    if (N == 0) return;
    int half = hd / 2, Hrot = Hq + Hkv;
    int vec = half % UNIT == 0 && aligned16(qkv) && aligned16(cos_sin);
    size_t units = (size_t)N * Hrot * ceil_div(half, UNIT);
    rope_kernel<<<flat_blocks(units), FLAT_BLOCK, 0, stream>>>(qkv, cos_sin, N, S, pos_offset, Hrot,
                                                               (Hq + 2 * Hkv) * hd, hd, inverse, vec);
    cudaCheckLaunch();
}

// Llama-3.1 frequency scaling (Hugging Face's _compute_llama3_parameters), in double.
static double rope_llama3_inv_freq(double inv_freq, double factor, double low_freq_factor,
                                   double high_freq_factor, double orig_max_pos) {
    double wavelen = 2.0 * M_PI / inv_freq;
    double low_freq_wavelen = orig_max_pos / low_freq_factor;
    double high_freq_wavelen = orig_max_pos / high_freq_factor;
    if (wavelen < high_freq_wavelen) return inv_freq;
    if (wavelen > low_freq_wavelen) return inv_freq / factor;
    double smooth = (orig_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
    return (1.0 - smooth) * inv_freq / factor + smooth * inv_freq;
}

void rope_table_fill(float *cos_sin_host, int max_pos, int hd, float theta, int scaling, float factor,
                     float low_freq_factor, float high_freq_factor, int orig_max_pos) {
    if (max_pos <= 0 || hd <= 0 || hd % 2 != 0 || !(theta > 0.0f)) {
        die("rope_table_fill: bad arguments max_pos=%d hd=%d theta=%g", max_pos, hd, (double)theta);
    }
    if (scaling == ROPE_SCALING_LLAMA3 &&
        !(factor > 0.0f && low_freq_factor > 0.0f && high_freq_factor > low_freq_factor && orig_max_pos > 0)) {
        die("rope_table_fill: bad Llama-3 scaling factor=%g low=%g high=%g orig_max_pos=%d", (double)factor,
            (double)low_freq_factor, (double)high_freq_factor, orig_max_pos);
    }
    if (scaling != ROPE_SCALING_NONE && scaling != ROPE_SCALING_LLAMA3) die("rope_table_fill: unknown scaling %d", scaling);
    int half = hd / 2;
    double *inv_freq = (double *)mallocCheck((size_t)half * sizeof(double));
    for (int i = 0; i < half; i++) {
        inv_freq[i] = pow((double)theta, -2.0 * i / hd);
        if (scaling == ROPE_SCALING_LLAMA3) {
            inv_freq[i] = rope_llama3_inv_freq(inv_freq[i], factor, low_freq_factor, high_freq_factor, orig_max_pos);
        }
    }
    for (int p = 0; p < max_pos; p++) {
        float *row = cos_sin_host + (size_t)p * hd;
        for (int i = 0; i < half; i++) {
            double angle = (double)p * inv_freq[i];
            row[i] = (float)cos(angle);
            row[half + i] = (float)sin(angle);
        }
    }
    free(inv_freq);
}

// ---------------------------------------------------------------------------------------------
// Gated MLP activation
// ---------------------------------------------------------------------------------------------

#define GELU_K 0.7978845608028654f  // sqrt(2 / pi)
#define GELU_C 0.044715f

// act(g) and act'(g) for SiLU (g * sigmoid(g)) or tanh-GELU (0.5 g (1 + tanh(K (g + C g^3)))).
static __device__ __forceinline__ void glu_act(float g, int activation, float *act, float *dact) {
    if (activation == ACT_GELU_TANH) {
        float t = tanhf(GELU_K * (g + GELU_C * g * g * g));
        float dt = 1.0f - t * t;
        *act = 0.5f * g * (1.0f + t);
        // dt is exactly 0 once |g| > ~9; skipping the term keeps huge g (g^2 = inf) from giving 0 * inf.
        *dact = 0.5f * (1.0f + t) + (dt == 0.0f ? 0.0f : 0.5f * g * dt * GELU_K * (1.0f + 3.0f * GELU_C * g * g));
    } else {
        float s = 1.0f / (1.0f + expf(-g));
        *act = g * s;
        *dact = s * (1.0f + g * (1.0f - s));
    }
}

// h (N, F) bf16 = act(gate) * up, gate_up (N, 2F) bf16 = [gate | up]. One thread per unit of 8 columns;
// flat index = n * units_per_row + unit.
__global__ void glu_forward_kernel(bf16 *h, const bf16 *gate_up, int N, int F, int activation, int vec) {
    int units_per_row = (F + UNIT - 1) / UNIT;
    size_t total = (size_t)N * units_per_row;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t n = idx / units_per_row;
        int j = (int)(idx % units_per_row) * UNIT;
        int nv = min(UNIT, F - j);
        const bf16 *gp = gate_up + n * 2 * F + j;
        float g[UNIT], u[UNIT];
        load8_bf16(g, gp, nv, vec);
        load8_bf16(u, gp + F, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            float a, da;
            glu_act(g[k], activation, &a, &da);
            g[k] = a * u[k];
        }
        store8_bf16(h + n * F + j, g, nv, vec);
    }
}

void glu_forward(bf16 *h, const bf16 *gate_up, int N, int F, int activation, cudaStream_t stream) {
    if (N < 0 || F <= 0) die("glu_forward: bad shape N=%d F=%d", N, F);
    if (activation != ACT_SILU && activation != ACT_GELU_TANH) die("glu_forward: unknown activation %d", activation);
    if (N == 0) return;
    int vec = F % UNIT == 0 && aligned16(h) && aligned16(gate_up);
    size_t units = (size_t)N * ceil_div(F, UNIT);
    glu_forward_kernel<<<flat_blocks(units), FLAT_BLOCK, 0, stream>>>(h, gate_up, N, F, activation, vec);
    cudaCheckLaunch();
}

// dgate_up (N, 2F) bf16 = [dh * up * act'(gate) | dh * act(gate)], dh (N, F), gate_up (N, 2F) bf16.
// dgate_up may alias gate_up: each thread reads its gate and up units before writing the same units.
__global__ void glu_backward_kernel(bf16 *dgate_up, const bf16 *dh, const bf16 *gate_up, int N, int F,
                                    int activation, int vec) {
    int units_per_row = (F + UNIT - 1) / UNIT;
    size_t total = (size_t)N * units_per_row;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (size_t)gridDim.x * blockDim.x) {
        size_t n = idx / units_per_row;
        int j = (int)(idx % units_per_row) * UNIT;
        int nv = min(UNIT, F - j);
        size_t off = n * 2 * F + j;
        float g[UNIT], u[UNIT], dhv[UNIT];
        load8_bf16(g, gate_up + off, nv, vec);
        load8_bf16(u, gate_up + off + F, nv, vec);
        load8_bf16(dhv, dh + n * F + j, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            float a, da;
            glu_act(g[k], activation, &a, &da);
            g[k] = dhv[k] * u[k] * da;
            u[k] = dhv[k] * a;
        }
        store8_bf16(dgate_up + off, g, nv, vec);
        store8_bf16(dgate_up + off + F, u, nv, vec);
    }
}

void glu_backward(bf16 *dgate_up, const bf16 *dh, const bf16 *gate_up, int N, int F, int activation,
                  cudaStream_t stream) {
    if (N < 0 || F <= 0) die("glu_backward: bad shape N=%d F=%d", N, F);
    if (activation != ACT_SILU && activation != ACT_GELU_TANH) die("glu_backward: unknown activation %d", activation);
    if (N == 0) return;
    int vec = F % UNIT == 0 && aligned16(dgate_up) && aligned16(dh) && aligned16(gate_up);
    size_t units = (size_t)N * ceil_div(F, UNIT);
    glu_backward_kernel<<<flat_blocks(units), FLAT_BLOCK, 0, stream>>>(dgate_up, dh, gate_up, N, F, activation,
                                                                       vec);
    cudaCheckLaunch();
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

// x (n) bf16 += y (n) bf16.
__global__ void residual_add_kernel(bf16 *x, const bf16 *y, size_t n, int vec) {
    size_t units = (n + UNIT - 1) / UNIT;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (size_t)gridDim.x * blockDim.x) {
        size_t i = u * UNIT;
        int nv = (int)min((size_t)UNIT, n - i);
        float a[UNIT], b[UNIT];
        load8_bf16(a, x + i, nv, vec);
        load8_bf16(b, y + i, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) a[k] += b[k];
        store8_bf16(x + i, a, nv, vec);
    }
}

void residual_add(bf16 *x, const bf16 *y, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    int vec = aligned16(x) && aligned16(y);
    residual_add_kernel<<<flat_blocks(ceil_div_size(n, UNIT)), FLAT_BLOCK, 0, stream>>>(x, y, n, vec);
    cudaCheckLaunch();
}

// out (n) bf16 = round_to_nearest(in (n) fp32).
__global__ void cast_fp32_to_bf16_kernel(bf16 *out, const float *in, size_t n, int vec) {
    size_t units = (n + UNIT - 1) / UNIT;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (size_t)gridDim.x * blockDim.x) {
        size_t i = u * UNIT;
        int nv = (int)min((size_t)UNIT, n - i);
        float f[UNIT];
        load8_f32(f, in + i, nv, vec);
        store8_bf16(out + i, f, nv, vec);
    }
}

void cast_fp32_to_bf16(bf16 *out, const float *in, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    int vec = aligned16(out) && aligned16(in);
    cast_fp32_to_bf16_kernel<<<flat_blocks(ceil_div_size(n, UNIT)), FLAT_BLOCK, 0, stream>>>(out, in, n, vec);
    cudaCheckLaunch();
}

// out (n) fp32 = in (n) bf16 (exact).
__global__ void cast_bf16_to_fp32_kernel(float *out, const bf16 *in, size_t n, int vec) {
    size_t units = (n + UNIT - 1) / UNIT;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (size_t)gridDim.x * blockDim.x) {
        size_t i = u * UNIT;
        int nv = (int)min((size_t)UNIT, n - i);
        float f[UNIT];
        load8_bf16(f, in + i, nv, vec);
        store8_f32(out + i, f, nv, vec);
    }
}

void cast_bf16_to_fp32(float *out, const bf16 *in, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    int vec = aligned16(out) && aligned16(in);
    cast_bf16_to_fp32_kernel<<<flat_blocks(ceil_div_size(n, UNIT)), FLAT_BLOCK, 0, stream>>>(out, in, n, vec);
    cudaCheckLaunch();
}

// out (n) bf16 = std * random_normal_at(seed, first + i), grid-stride over the elements.
__global__ void random_normal_fill_kernel(bf16 *out, size_t n, uint64_t seed, uint64_t first, float std) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16(std * random_normal_at(seed, first + i));
}

void random_normal_fill(bf16 *out, size_t n, uint64_t seed, uint64_t first, float std, cudaStream_t stream) {
    if (n == 0) return;
    random_normal_fill_kernel<<<flat_blocks(n), FLAT_BLOCK, 0, stream>>>(out, n, seed, first, std);
    cudaCheckLaunch();
}

// out (n) bf16 = value.
__global__ void constant_fill_kernel(bf16 *out, size_t n, float value) {
    bf16 v = __float2bfloat16(value);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) out[i] = v;
}

void constant_fill(bf16 *out, size_t n, float value, cudaStream_t stream) {
    if (n == 0) return;
    constant_fill_kernel<<<flat_blocks(n), FLAT_BLOCK, 0, stream>>>(out, n, value);
    cudaCheckLaunch();
}

// dst (n) fp32 or bf16 += src (n) bf16 (sum in fp32, one rounding when dst is bf16).
__global__ void accumulate_into_kernel(void *dst, DType dst_type, const bf16 *src, size_t n, int vec) {
    size_t units = (n + UNIT - 1) / UNIT;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (size_t)gridDim.x * blockDim.x) {
        size_t i = u * UNIT;
        int nv = (int)min((size_t)UNIT, n - i);
        float a[UNIT], b[UNIT];
        load8_typed(a, dst, dst_type, i, nv, vec);
        load8_bf16(b, src + i, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) a[k] += b[k];
        store8_typed(dst, dst_type, i, a, nv, vec);
    }
}

void accumulate_into(void *dst, DType dst_type, const bf16 *src, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    int vec = aligned16(dst) && aligned16(src);
    accumulate_into_kernel<<<flat_blocks(ceil_div_size(n, UNIT)), FLAT_BLOCK, 0, stream>>>(dst, dst_type, src, n,
                                                                                          vec);
    cudaCheckLaunch();
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over vocabulary chunks
// ---------------------------------------------------------------------------------------------

// Soft-capped logit: cap * tanh(x / cap) when cap > 0, else x.
static __device__ __forceinline__ float softcapped(float x, float cap) {
    return cap > 0.0f ? cap * tanhf(x / cap) : x;
}

// row_max = -inf, row_sum = 0, target_logit = 0 for the N rows.
__global__ void ce_state_init_kernel(float *row_max, float *row_sum, float *target_logit, int N) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) {
        row_max[n] = -INFINITY;
        row_sum[n] = 0.0f;
        target_logit[n] = 0.0f;
    }
}

void ce_state_init(float *row_max, float *row_sum, float *target_logit, int N, cudaStream_t stream) {
    if (N < 0) die("ce_state_init: bad N=%d", N);
    if (N == 0) return;
    ce_state_init_kernel<<<ceil_div(N, FLAT_BLOCK), FLAT_BLOCK, 0, stream>>>(row_max, row_sum, target_logit, N);
    cudaCheckLaunch();
}

// Folds logits (N, Vc) fp32, vocabulary ids [v0, v0 + Vc), into the running per-row state (N) fp32:
// z = softcapped(logit); (row_max, row_sum) <- merge with (max z, sum exp(z - max z)); target_logit =
// z[targets[n] - v0] when the target falls in this tile. One block of ROW_BLOCK threads per row: each
// thread keeps an online (max, sum) over its units, then a fixed-order block merge.
__global__ void __launch_bounds__(ROW_BLOCK)
    ce_online_update_kernel(float *row_max, float *row_sum, float *target_logit, const float *logits, int Vc,
                            int v0, const int32_t *targets, float softcap, int vec) {
    __shared__ float sm_m[WARP_SIZE], sm_s[WARP_SIZE];
    int n = blockIdx.x;
    int lane = threadIdx.x % WARP_SIZE, warp = threadIdx.x / WARP_SIZE;
    const float *row = logits + (size_t)n * Vc;
    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x * UNIT; j < Vc; j += blockDim.x * UNIT) {
        int nv = min(UNIT, Vc - j);
        float z[UNIT];
        load8_f32(z, row + j, nv, vec);
        float lm = -INFINITY;
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            z[k] = softcapped(z[k], softcap);
            if (k < nv) lm = fmaxf(lm, z[k]);
        }
        float ls = 0.0f;
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            if (k < nv) ls += expf(z[k] - lm);
        }
        lse_merge(&m, &s, lm, ls);
    }
    warp_lse_merge(&m, &s);
    if (lane == 0) {
        sm_m[warp] = m;
        sm_s[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        int n_warps = blockDim.x / WARP_SIZE;
        m = lane < n_warps ? sm_m[lane] : -INFINITY;
        s = lane < n_warps ? sm_s[lane] : 0.0f;
        warp_lse_merge(&m, &s);
        if (lane == 0) {
            float rm = row_max[n], rs = row_sum[n];
            lse_merge(&rm, &rs, m, s);
            row_max[n] = rm;
            row_sum[n] = rs;
            int t = targets[n];
            if (t >= v0 && t - v0 < Vc) target_logit[n] = softcapped(row[t - v0], softcap);
        }
    }
}

void ce_online_update(float *row_max, float *row_sum, float *target_logit, const float *logits, int N,
                      int Vc, int v0, const int32_t *targets, float softcap, cudaStream_t stream) {
    if (N < 0 || Vc <= 0 || v0 < 0) die("ce_online_update: bad shape N=%d Vc=%d v0=%d", N, Vc, v0);
    if (N == 0) return;
    int vec = Vc % UNIT == 0 && aligned16(logits);
    ce_online_update_kernel<<<N, ROW_BLOCK, 0, stream>>>(row_max, row_sum, target_logit, logits, Vc, v0, targets,
                                                         softcap, vec);
    cudaCheckLaunch();
}

// lse (N) = row_max + log(row_sum); losses (N) = lse - target_logit where targets[n] >= 0, else 0.
__global__ void ce_finalize_kernel(float *lse, float *losses, const float *row_max, const float *row_sum,
                                   const float *target_logit, const int32_t *targets, int N) {
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n < N) {
        float l = row_max[n] + logf(row_sum[n]);
        lse[n] = l;
        losses[n] = targets[n] >= 0 ? l - target_logit[n] : 0.0f;
    }
}

void ce_finalize(float *lse, float *losses, const float *row_max, const float *row_sum,
                 const float *target_logit, const int32_t *targets, int N, cudaStream_t stream) {
    if (N < 0) die("ce_finalize: bad N=%d", N);
    if (N == 0) return;
    ce_finalize_kernel<<<ceil_div(N, FLAT_BLOCK), FLAT_BLOCK, 0, stream>>>(lse, losses, row_max, row_sum,
                                                                           target_logit, targets, N);
    cudaCheckLaunch();
}

// dlogits (N, Vc) bf16 = grad_scale * (exp(z - lse) - [v0 + j == target]) * dz/dx for the tile's raw
// logits x (N, Vc) fp32, z = softcapped(x), dz/dx = 1 - tanh^2(x / cap) (1 without a cap); rows with
// targets[n] < 0 are all zero. lse (N) fp32 from ce_finalize. One block of ROW_BLOCK threads per row.
__global__ void __launch_bounds__(ROW_BLOCK)
    ce_backward_tile_kernel(bf16 *dlogits, const float *logits, const float *lse, int Vc, int v0,
                            const int32_t *targets, float softcap, float grad_scale, int vec) {
    int n = blockIdx.x;
    int t = targets[n];
    const float *row = logits + (size_t)n * Vc;
    bf16 *out = dlogits + (size_t)n * Vc;
    float l = t >= 0 ? lse[n] : 0.0f;
    for (int j = threadIdx.x * UNIT; j < Vc; j += blockDim.x * UNIT) {
        int nv = min(UNIT, Vc - j);
        float x[UNIT];
        if (t >= 0) {
            load8_f32(x, row + j, nv, vec);
#pragma unroll
            for (int k = 0; k < UNIT; k++) {
                float z = x[k], dz = 1.0f;
                if (softcap > 0.0f) {
                    float th = tanhf(x[k] / softcap);
                    z = softcap * th;
                    dz = 1.0f - th * th;
                }
                float p = expf(z - l) - (v0 + j + k == t ? 1.0f : 0.0f);
                x[k] = grad_scale * p * dz;
            }
        } else {
#pragma unroll
            for (int k = 0; k < UNIT; k++) x[k] = 0.0f;
        }
        store8_bf16(out + j, x, nv, vec);
    }
}

void ce_backward_tile(bf16 *dlogits, const float *logits, const float *lse, int N, int Vc, int v0,
                      const int32_t *targets, float softcap, float grad_scale, cudaStream_t stream) {
    if (N < 0 || Vc <= 0 || v0 < 0) die("ce_backward_tile: bad shape N=%d Vc=%d v0=%d", N, Vc, v0);
    if (N == 0) return;
    int vec = Vc % UNIT == 0 && aligned16(dlogits) && aligned16(logits);
    ce_backward_tile_kernel<<<N, ROW_BLOCK, 0, stream>>>(dlogits, logits, lse, Vc, v0, targets, softcap, grad_scale,
                                                         vec);
    cudaCheckLaunch();
}

// out[0] = sum of losses (N) fp32: one block; thread i sums i, i + SUM_THREADS, ... then a fixed tree.
__global__ void __launch_bounds__(SUM_THREADS) sum_reduce_kernel(float *out, const float *losses, int N) {
    __shared__ float smem[WARP_SIZE];
    float s = 0.0f;
    for (int i = threadIdx.x; i < N; i += blockDim.x) s += losses[i];
    s = block_sum(s, smem);
    if (threadIdx.x == 0) out[0] = s;
}

void sum_reduce(float *out, const float *losses, int N, cudaStream_t stream) {
    if (N < 0) die("sum_reduce: bad N=%d", N);
    sum_reduce_kernel<<<1, SUM_THREADS, 0, stream>>>(out, losses, N);
    cudaCheckLaunch();
}

// ---------------------------------------------------------------------------------------------
// Optimizer
// ---------------------------------------------------------------------------------------------

// Per-launch constants of adamw_kernel, derived from AdamWParams on the host in double.
typedef struct {
    float beta1, beta2, eps;
    float decay;          // lr * weight_decay
    float step_size;      // lr / (1 - beta1^step)
    float inv_sqrt_bc2;   // 1 / sqrt(1 - beta2^step)
    float grad_scale;
    uint32_t seed;
    uint64_t index_base;
} AdamWConsts;

// Stochastic rounding to bf16 (adamw8bit.h: bf16_bits_stochastic, bits from sr_bits).
static __device__ __forceinline__ bf16 bf16_stochastic(float x, uint32_t rnd) {
    return __ushort_as_bfloat16(bf16_bits_stochastic(x, rnd));
}

// The new weights p[0..nv) of elements i.. : master (fp32) and param = round_to_nearest(p) when master
// is non-NULL, else param with stochastic rounding (bits from sr_bits(seed, index_base + element index):
// a part of a tensor updated on its own draws the bits the whole tensor would). The 8 elements span
// at most three groups of four, so three sr_hash4 calls (two when aligned) serve them.
static __device__ __forceinline__ void store8_weights(bf16 *param, float *master, size_t i, const float *p, int nv,
                                                      int vec, uint32_t seed, uint64_t index_base) {
    if (master != NULL) {
        store8_f32(master + i, p, nv, vec);
        store8_bf16(param + i, p, nv, vec);
        return;
    }
    uint64_t first = index_base + i, q0 = first >> 2;
    uint64_t r0 = sr_hash4(seed, q0), r1 = sr_hash4(seed, q0 + 1), r2 = (first & 3) ? sr_hash4(seed, q0 + 2) : 0;
    bf16 h[UNIT];
#pragma unroll
    for (int k = 0; k < UNIT; k++) {
        uint64_t e = first + k, q = (e >> 2) - q0;
        uint64_t word = q == 0 ? r0 : (q == 1 ? r1 : r2);
        h[k] = bf16_stochastic(p[k], (uint32_t)(word >> (16 * (e & 3))));
    }
    store8_bf16_raw(param + i, h, nv, vec);
}

// One AdamW step over n elements, 8 per thread unit:
//   g = grad * grad_scale; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2
//   p -= decay * p; p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps)      (PyTorch's AdamW)
// p comes from master (n) fp32 when non-NULL (written back, param = round_to_nearest(p)), else from
// param (n) bf16 (written with stochastic rounding, bits from sr_bits(seed, index_base + element index)).
// grad (n) is grad_type, m and v (n) are moment_type (fp32 or bf16, rounded to nearest).
// With sumsq_partials (launched with GRAD_NORM_PARTIALS blocks): sumsq_partials[block] += the block's
// sum of grad^2 (the raw gradient, before grad_scale), as grad_norm_accumulate would add.
__global__ void adamw_kernel(bf16 *param, float *master, const void *grad, DType grad_type, void *m, void *v,
                             DType moment_type, size_t n, AdamWConsts c, float *sumsq_partials, int vec) {
    __shared__ float smem[WARP_SIZE];
    size_t units = (n + UNIT - 1) / UNIT;
    float sumsq = 0.0f;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (size_t)gridDim.x * blockDim.x) {
        size_t i = u * UNIT;
        int nv = (int)min((size_t)UNIT, n - i);
        float p[UNIT], g[UNIT], fm[UNIT], fv[UNIT];
        if (master != NULL) load8_f32(p, master + i, nv, vec);
        else load8_bf16(p, param + i, nv, vec);
        load8_typed(g, grad, grad_type, i, nv, vec);
        load8_typed(fm, m, moment_type, i, nv, vec);
        load8_typed(fv, v, moment_type, i, nv, vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            sumsq += g[k] * g[k];
            float gk = g[k] * c.grad_scale;
            fm[k] = c.beta1 * fm[k] + (1.0f - c.beta1) * gk;
            fv[k] = c.beta2 * fv[k] + (1.0f - c.beta2) * gk * gk;
            p[k] -= c.decay * p[k];
            p[k] -= c.step_size * fm[k] / (sqrtf(fv[k]) * c.inv_sqrt_bc2 + c.eps);
        }
        store8_typed(m, moment_type, i, fm, nv, vec);
        store8_typed(v, moment_type, i, fv, nv, vec);
        store8_weights(param, master, i, p, nv, vec, c.seed, c.index_base);
    }
    if (sumsq_partials != NULL) {
        sumsq = block_sum(sumsq, smem);
        if (threadIdx.x == 0) sumsq_partials[blockIdx.x] += sumsq;
    }
}

void adamw_update(bf16 *param, float *master, const void *grad, DType grad_type, void *m, void *v,
                  DType moment_type, size_t n, const AdamWParams *p, float *sumsq_partials, cudaStream_t stream) {
    if (p->step < 1) die("adamw_update: step must be >= 1 (got %d)", p->step);
    if (n == 0) return;
    AdamWConsts c;
    c.beta1 = p->beta1;
    c.beta2 = p->beta2;
    c.eps = p->eps;
    c.decay = (float)((double)p->lr * (double)p->weight_decay);
    c.step_size = (float)((double)p->lr / (1.0 - pow((double)p->beta1, (double)p->step)));
    c.inv_sqrt_bc2 = (float)(1.0 / sqrt(1.0 - pow((double)p->beta2, (double)p->step)));
    c.grad_scale = p->grad_scale;
    c.seed = p->seed;
    c.index_base = p->index_base;
    int vec = aligned16(param) && (master == NULL || aligned16(master)) && aligned16(grad) && aligned16(m) &&
              aligned16(v);
    unsigned int blocks = sumsq_partials != NULL ? GRAD_NORM_PARTIALS : flat_blocks(ceil_div_size(n, UNIT));
    adamw_kernel<<<blocks, FLAT_BLOCK, 0, stream>>>(param, master, grad, grad_type, m, v, moment_type, n, c,
                                                    sumsq_partials, vec);
    cudaCheckLaunch();
}

int grad_norm_partials(void) { return GRAD_NORM_PARTIALS; }

// sumsq_partials[b] += sum of grad^2 over the units u = b * blockDim + t + k * (GRAD_NORM_PARTIALS *
// blockDim), k = 0, 1, ... of grad (n) fp32 or bf16; the grid is exactly GRAD_NORM_PARTIALS blocks, so
// the summation order depends only on n.
__global__ void __launch_bounds__(GRAD_NORM_THREADS)
    grad_norm_accumulate_kernel(float *sumsq_partials, const void *grad, DType grad_type, size_t n, int vec) {
    __shared__ float smem[WARP_SIZE];
    size_t units = (n + UNIT - 1) / UNIT;
    float s = 0.0f;
    for (size_t u = (size_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (size_t)gridDim.x * blockDim.x) {
        size_t i = u * UNIT;
        float f[UNIT];
        load8_typed(f, grad, grad_type, i, (int)min((size_t)UNIT, n - i), vec);
#pragma unroll
        for (int k = 0; k < UNIT; k++) s += f[k] * f[k];
    }
    s = block_sum(s, smem);
    if (threadIdx.x == 0) sumsq_partials[blockIdx.x] += s;
}

void grad_norm_accumulate(float *sumsq_partials, const void *grad, DType grad_type, size_t n, cudaStream_t stream) {
    if (n == 0) return;
    int vec = aligned16(grad);
    grad_norm_accumulate_kernel<<<GRAD_NORM_PARTIALS, GRAD_NORM_THREADS, 0, stream>>>(sumsq_partials, grad,
                                                                                      grad_type, n, vec);
    cudaCheckLaunch();
}

// out[0] = sum of sumsq_partials (GRAD_NORM_PARTIALS) fp32 in a fixed order: the squared global norm.
__global__ void __launch_bounds__(SUM_THREADS) grad_norm_finish_kernel(float *out, const float *sumsq_partials) {
    __shared__ float smem[WARP_SIZE];
    float s = 0.0f;
    for (int i = threadIdx.x; i < GRAD_NORM_PARTIALS; i += blockDim.x) s += sumsq_partials[i];
    s = block_sum(s, smem);
    if (threadIdx.x == 0) out[0] = s;
}

void grad_norm_finish(float *out, const float *sumsq_partials, cudaStream_t stream) {
    grad_norm_finish_kernel<<<1, SUM_THREADS, 0, stream>>>(out, sumsq_partials);
    cudaCheckLaunch();
}

// ---------------------------------------------------------------------------------------------
// 8-bit AdamW (block-wise quantized moments; the format, the code books and the per-element math
// are in adamw8bit.h, shared with the CPU twin)
// ---------------------------------------------------------------------------------------------

#define ADAM8_MAX_GRID 1024  // grid cap of adamw8bit_kernel (it grid-strides; each CTA loads the books once)

static __device__ Adam8Codebooks g_adam8_books;  // filled once by adam8_books_upload
static_assert(sizeof(Adam8Codebooks) % 4 == 0, "adamw8bit_kernel copies the code books in 4-byte words");

// The UNIT codes p[0..nv) packed little-endian into 64 bits (zero bytes beyond nv): one 8-byte load
// when vec and the unit is full.
static __device__ __forceinline__ uint64_t load_codes(const uint8_t *p, int nv, int vec) {
    if (vec && nv == UNIT) return *(const uint64_t *)p;
    uint64_t q = 0;
    for (int k = 0; k < nv; k++) q |= (uint64_t)p[k] << (8 * k);
    return q;
}

static __device__ __forceinline__ void store_codes(uint8_t *p, uint64_t q, int nv, int vec) {
    if (vec && nv == UNIT) {
        *(uint64_t *)p = q;
        return;
    }
    for (int k = 0; k < nv; k++) p[k] = (uint8_t)(q >> (8 * k));
}

static __device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = WARP_SIZE / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// One 8-bit AdamW step over n elements; one warp per block of ADAM8_BLOCK = 32 lanes x UNIT elements:
// reads the block's codes and scales (m_codes, v_codes (n) uint8, m_absmax, v_absmax (blocks) fp32),
// param (n) bf16 or master (n) fp32, grad (n) grad_type; dequantizes, runs adam8_step per element,
// takes the new absmax over the warp, re-encodes, and writes codes, scales and the weights (master
// and round-to-nearest param, or param with stochastic rounding, bits from sr_bits(seed, index)).
// Padding codes past n are neither read nor written. Each CTA with work copies the code books (codes,
// thresholds, bucket counts: 10.5 KB) from g_adam8_books into shared memory first.
// With sumsq_partials (launched with GRAD_NORM_PARTIALS blocks): sumsq_partials[block] += the block's
// sum of grad^2 (the raw gradient, before grad_scale), as adamw_update does.
__global__ void __launch_bounds__(FLAT_BLOCK)
    adamw8bit_kernel(bf16 *param, float *master, const void *grad, DType grad_type, uint8_t *m_codes,
                     float *m_absmax, uint8_t *v_codes, float *v_absmax, size_t n, Adam8Consts c,
                     float *sumsq_partials, int vec, int vec_codes) {
    __shared__ __align__(16) Adam8Codebooks books;
    __shared__ float smem[WARP_SIZE];
    int lane = threadIdx.x % WARP_SIZE, warps = blockDim.x / WARP_SIZE;
    size_t n_blocks = (n + ADAM8_BLOCK - 1) / ADAM8_BLOCK;
    float sumsq = 0.0f;
    if ((size_t)blockIdx.x * warps < n_blocks) {  // uniform over the CTA: a CTA past the tensor only adds 0
        const uint32_t *src = (const uint32_t *)&g_adam8_books;
        uint32_t *dst = (uint32_t *)&books;
        for (int k = threadIdx.x; k < (int)(sizeof(Adam8Codebooks) / 4); k += blockDim.x) dst[k] = src[k];
        __syncthreads();
    }
    for (size_t b = (size_t)blockIdx.x * warps + threadIdx.x / WARP_SIZE; b < n_blocks; b += (size_t)gridDim.x * warps) {
        size_t i = b * ADAM8_BLOCK + (size_t)lane * UNIT;
        int nv = i < n ? (int)min((size_t)UNIT, n - i) : 0;
        float p[UNIT], g[UNIT], fm[UNIT], fv[UNIT];
        if (master != NULL) load8_f32(p, master + i, nv, vec);
        else load8_bf16(p, param + i, nv, vec);
        load8_typed(g, grad, grad_type, i, nv, vec);
        uint64_t qm = load_codes(m_codes + i, nv, vec_codes), qv = load_codes(v_codes + i, nv, vec_codes);
        float am = m_absmax[b], av = v_absmax[b], new_am = 0.0f, new_av = 0.0f;
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            sumsq += g[k] * g[k];  // 0 past n
            fm[k] = A8_MUL(books.m_code[(qm >> (8 * k)) & 255u], am);
            fv[k] = A8_MUL(books.v_code[(qv >> (8 * k)) & 255u], av);
            adam8_step(&p[k], g[k], &fm[k], &fv[k], &c);
            if (k < nv) {
                new_am = fmaxf(new_am, fabsf(fm[k]));
                new_av = fmaxf(new_av, fv[k]);
            }
        }
        new_am = warp_max(new_am);
        new_av = warp_max(new_av);
        float inv_m = adam8_inv_scale(new_am), inv_v = adam8_inv_scale(new_av);
        qm = 0;
        qv = 0;
#pragma unroll
        for (int k = 0; k < UNIT; k++) {
            qm |= (uint64_t)adam8_encode_m(fm[k], inv_m, &books) << (8 * k);
            qv |= (uint64_t)adam8_encode_v(fv[k], inv_v, &books) << (8 * k);
        }
        store_codes(m_codes + i, qm, nv, vec_codes);
        store_codes(v_codes + i, qv, nv, vec_codes);
        if (lane == 0) {
            m_absmax[b] = new_am;
            v_absmax[b] = new_av;
        }
        store8_weights(param, master, i, p, nv, vec, c.seed, 0);
    }
    if (sumsq_partials != NULL) {
        sumsq = block_sum(sumsq, smem);
        if (threadIdx.x == 0) sumsq_partials[blockIdx.x] += sumsq;
    }
}

// Uploads the code books (built on the host) to g_adam8_books on the first call, on `stream`, and
// waits for it, so that every later launch on any stream sees them.
static void adam8_books_upload(cudaStream_t stream) {
    static int uploaded = 0;
    static Adam8Codebooks books;
    if (uploaded) return;
    adam8_codebooks_init(&books);
    cudaCheck(cudaMemcpyToSymbolAsync(g_adam8_books, &books, sizeof(books), 0, cudaMemcpyHostToDevice, stream));
    cudaCheck(cudaStreamSynchronize(stream));
    uploaded = 1;
}

void adamw8bit_update(bf16 *param, float *master, const void *grad, DType grad_type, uint8_t *m_codes, float *m_absmax,
                      uint8_t *v_codes, float *v_absmax, size_t n, const AdamWParams *p, float *sumsq_partials,
                      cudaStream_t stream) {
    Adam8Consts c = adam8_consts(p->lr, p->beta1, p->beta2, p->eps, p->weight_decay, p->grad_scale, p->step, p->seed);
    if (n == 0) return;
    adam8_books_upload(stream);
    int vec = aligned16(param) && (master == NULL || aligned16(master)) && aligned16(grad);
    int vec_codes = ((uintptr_t)m_codes & 7u) == 0 && ((uintptr_t)v_codes & 7u) == 0;
    size_t warps = FLAT_BLOCK / WARP_SIZE, grid = ceil_div_size(ceil_div_size(n, ADAM8_BLOCK), warps);
    if (grid > ADAM8_MAX_GRID) grid = ADAM8_MAX_GRID;
    if (sumsq_partials != NULL) grid = GRAD_NORM_PARTIALS;
    adamw8bit_kernel<<<(unsigned int)grid, FLAT_BLOCK, 0, stream>>>(param, master, grad, grad_type, m_codes, m_absmax,
                                                                    v_codes, v_absmax, n, c, sumsq_partials, vec,
                                                                    vec_codes);
    cudaCheckLaunch();
}

// LoRA adapters and the quantized frozen base on the GPU (see lora_gpu.h): the adapter GEMMs of a
// fused group, the block-diagonal B_blk, and the int8 / NF4 quantize and dequantize kernels.
#include "lora_gpu.h"
#include "matmul.h"

#define LORA_THREADS 256
#define QUANT_WARPS 8  // quant blocks (one warp each) per thread block of quant_quantize_kernel

static unsigned lora_grid(size_t n) {
    size_t b = ceil_div_size(n, LORA_THREADS);
    return (unsigned)(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

// The adapted targets of a group, in layout order: their row offsets in the fused output, heights,
// and the offsets of their B's in a layer block. Passed to the kernels by value.
typedef struct {
    int count, rank, R, out_g;
    int row_off[3], rows[3];
    size_t b_off[3];
} GroupMembers;

static GroupMembers group_members(const LoraLayout *L, int group) {
    GroupMembers g;
    memset(&g, 0, sizeof(g));
    g.rank = L->rank;
    g.R = L->group_rank[group];
    g.out_g = (int)L->group_out[group];
    for (int t = 0; t < LORA_TARGET_COUNT; t++) {
        if (lora_target_group(t) != group || !lora_has(L, t)) continue;
        g.row_off[g.count] = (int)L->row_off[t];
        g.rows[g.count] = (int)L->out[t];
        g.b_off[g.count] = L->b_off[t];
        g.count++;
    }
    return g;
}

// bblk (out_g, R) bf16: element (row, col) is B_j[row - row_off_j][col - j r] for j = col / r when
// row lies in target j's rows, else 0. Reads the B's of one layer block; writes all of bblk.
__global__ void lora_materialize_kernel(bf16 *bblk, const bf16 *layer_params, GroupMembers g) {
    size_t n = (size_t)g.out_g * g.R;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        int row = (int)(i / g.R), col = (int)(i % g.R), j = col / g.rank, k = col % g.rank;
        int r = row - g.row_off[j];
        bblk[i] = (r >= 0 && r < g.rows[j]) ? layer_params[g.b_off[j] + (size_t)r * g.rank + k] : __float2bfloat16(0.0f);
    }
}

// layer_grads[B_j] (rows_j, r) += dbblk[row_off_j + i][j r + k] for every target j of the group.
// Reads dbblk (out_g, R) fp32; each B-gradient element is owned by one thread.
__global__ void lora_gather_kernel(float *layer_grads, const float *dbblk, GroupMembers g) {
    size_t n = 0;
    for (int j = 0; j < g.count; j++) n += (size_t)g.rows[j] * g.rank;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        size_t e = i;
        int j = 0;
        while (e >= (size_t)g.rows[j] * g.rank) e -= (size_t)g.rows[j++] * g.rank;
        int row = (int)(e / g.rank), k = (int)(e % g.rank);
        layer_grads[g.b_off[j] + e] += dbblk[(size_t)(g.row_off[j] + row) * g.R + j * g.rank + k];
    }
}

void lora_materialize_bblk(bf16 *bblk, const bf16 *layer_params, const LoraLayout *L, int group, cudaStream_t stream) {
    GroupMembers g = group_members(L, group);
    if (g.count == 0) die("lora_materialize_bblk: group %d has no adapters", group);
    lora_materialize_kernel<<<lora_grid((size_t)g.out_g * g.R), LORA_THREADS, 0, stream>>>(bblk, layer_params, g);
    cudaCheckLaunch();
}

void lora_gather_dbblk(float *layer_grads, const float *dbblk, const LoraLayout *L, int group, cudaStream_t stream) {
    GroupMembers g = group_members(L, group);
    if (g.count == 0) die("lora_gather_dbblk: group %d has no adapters", group);
    lora_gather_kernel<<<lora_grid((size_t)g.out_g * g.rank), LORA_THREADS, 0, stream>>>(layer_grads, dbblk, g);
    cudaCheckLaunch();
}

// ---- the adapter GEMMs of a group ----

static int group_is_blocked(int group) { return group == LG_QKV || group == LG_GATE_UP; }

static const bf16 *group_bblk(const GpuLora *g, int l, int group) {
    if (group_is_blocked(group)) return g->bblk[group];
    int t = group == LG_O ? LORA_O : LORA_DOWN;
    return g->params + lora_offset(&g->layout, l, t, 1);
}

static const bf16 *group_a(const GpuLora *g, int l, int group) {
    return g->params + (size_t)l * g->layout.layer_size + g->layout.group_a[group];
}

void lora_prepare_group(GpuLora *g, int l, int group, cudaStream_t stream) {
    if (!lora_group_on(g, group) || !group_is_blocked(group)) return;
    lora_materialize_bblk(g->bblk[group], g->params + (size_t)l * g->layout.layer_size, &g->layout, group, stream);
}

void lora_forward(GpuLora *g, int l, int group, bf16 *y, const bf16 *x, int n, cudaStream_t stream) {
    if (!lora_group_on(g, group)) return;
    const LoraLayout *L = &g->layout;
    int R = L->group_rank[group], in = (int)L->group_in[group], out = (int)L->group_out[group];
    gemm(g->u, DT_BF16, x, 0, group_a(g, l, group), 1, n, R, in, 1.0f, 0.0f, NULL, stream);
    gemm(y, DT_BF16, g->u, 0, group_bblk(g, l, group), 1, n, out, R, L->scale, 1.0f, NULL, stream);
}

void lora_backward_weights(GpuLora *g, int l, int group, const bf16 *dy, const bf16 *x, int n, cudaStream_t stream) {
    if (!lora_group_on(g, group)) return;
    const LoraLayout *L = &g->layout;
    int R = L->group_rank[group], in = (int)L->group_in[group], out = (int)L->group_out[group];
    float *lg = lora_layer_grads(g, l);
    gemm(g->u, DT_BF16, x, 0, group_a(g, l, group), 1, n, R, in, 1.0f, 0.0f, NULL, stream);  // u, as in forward
    if (group_is_blocked(group)) {
        gemm(g->dbblk, DT_FP32, dy, 1, g->u, 0, out, R, n, L->scale, 0.0f, NULL, stream);
        lora_gather_dbblk(lg, g->dbblk, L, group, stream);
    } else {
        int t = group == LG_O ? LORA_O : LORA_DOWN;
        gemm(lg + L->b_off[t], DT_FP32, dy, 1, g->u, 0, out, R, n, L->scale, 1.0f, NULL, stream);
    }
    gemm(g->du, DT_BF16, dy, 0, group_bblk(g, l, group), 0, n, R, out, L->scale, 0.0f, NULL, stream);
    linear_backward_weight(lg + L->group_a[group], DT_FP32, g->du, x, n, in, R, 1, stream);
}

void lora_backward_input(GpuLora *g, int l, int group, bf16 *dx, int n, cudaStream_t stream) {
    if (!lora_group_on(g, group)) return;
    const LoraLayout *L = &g->layout;
    linear_backward_input(dx, g->du, group_a(g, l, group), n, (int)L->group_in[group], L->group_rank[group], 1, stream);
}

// ---- quantized base ----

// The NF4 levels and midpoints (quant.h), passed to the kernels by value (no per-device state).
typedef struct { float level[16], mid[15]; } Nf4Table;

static Nf4Table nf4_table(void) {
    Nf4Table t;
    memcpy(t.level, QUANT_NF4_LEVELS, sizeof(t.level));
    for (int k = 0; k < 15; k++) t.mid[k] = quant_nf4_midpoint(k);
    return t;
}

// One warp per block of QUANT_BLOCK elements of w (n) bf16: lane t owns elements 2t, 2t + 1 of the
// block. absmax[b] = max |w| over the block (warp max); codes: int8 one byte per element, NF4 the
// byte holding both (even element in the high nibble). The arithmetic is quant_quantize_cpu's.
__global__ void quant_quantize_kernel(int kind, unsigned char *codes, float *absmax, const bf16 *w, size_t n, Nf4Table nf4) {
    size_t block = (size_t)blockIdx.x * QUANT_WARPS + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    size_t i0 = block * QUANT_BLOCK + 2 * (size_t)lane;
    if (block * QUANT_BLOCK >= n) return;
    float x0 = i0 < n ? __bfloat162float(w[i0]) : 0.0f, x1 = i0 + 1 < n ? __bfloat162float(w[i0 + 1]) : 0.0f;
    float a = fmaxf(fabsf(x0), fabsf(x1));
    for (int off = 16; off > 0; off /= 2) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, off));
    if (lane == 0) absmax[block] = a;
    if (i0 >= n) return;
    if (kind == BASE_QUANT_INT8) {
        float inv = a > 0.0f ? __fdiv_rn(127.0f, a) : 0.0f;
        codes[i0] = (unsigned char)(signed char)fminf(fmaxf(rintf(__fmul_rn(x0, inv)), -127.0f), 127.0f);
        if (i0 + 1 < n) codes[i0 + 1] = (unsigned char)(signed char)fminf(fmaxf(rintf(__fmul_rn(x1, inv)), -127.0f), 127.0f);
        return;
    }
    float inv = a > 0.0f ? __fdiv_rn(1.0f, a) : 0.0f;
    float s0 = fminf(fmaxf(__fmul_rn(x0, inv), -1.0f), 1.0f), s1 = fminf(fmaxf(__fmul_rn(x1, inv), -1.0f), 1.0f);
    int q0 = 0, q1 = 0;
    for (int k = 0; k < 15; k++) {
        q0 += nf4.mid[k] < s0;
        q1 += nf4.mid[k] < s1;
    }
    codes[i0 / 2] = (unsigned char)((q0 << 4) | q1);  // past an odd n, x1 = 0: the code of 0 pads
}

// out (n) bf16 = dequantized element i: int8 code * (absmax / 127), NF4 level * absmax, rounded to
// nearest even. Reads codes and absmax; one thread per pair of elements, grid-stride.
__global__ void quant_dequantize_kernel(int kind, bf16 *out, const unsigned char *codes, const float *absmax, size_t n,
                                        Nf4Table nf4) {
    size_t pairs = (n + 1) / 2;
    for (size_t p = (size_t)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (size_t)gridDim.x * blockDim.x) {
        size_t i = 2 * p;
        float a = absmax[i / QUANT_BLOCK], v0, v1;
        if (kind == BASE_QUANT_INT8) {
            float scale = __fdiv_rn(a, 127.0f);
            v0 = __fmul_rn((float)(signed char)codes[i], scale);
            v1 = i + 1 < n ? __fmul_rn((float)(signed char)codes[i + 1], scale) : 0.0f;
        } else {
            unsigned char b = codes[p];
            v0 = __fmul_rn(nf4.level[b >> 4], a);
            v1 = __fmul_rn(nf4.level[b & 15], a);
        }
        out[i] = __float2bfloat16_rn(v0);
        if (i + 1 < n) out[i + 1] = __float2bfloat16_rn(v1);
    }
}

static void check_kind(int kind, const char *who) {
    if (kind != BASE_QUANT_INT8 && kind != BASE_QUANT_NF4) die("%s: kind %d is not int8 or nf4", who, kind);
}

void quant_quantize(int kind, unsigned char *codes, float *absmax, const bf16 *w, size_t n, cudaStream_t stream) {
    check_kind(kind, "quant_quantize");
    if (n == 0) return;
    size_t blocks = ceil_div_size(quant_blocks(n), QUANT_WARPS);
    if (blocks > 0x7fffffff) die("quant_quantize: %zu elements are too many for one launch", n);
    quant_quantize_kernel<<<(unsigned)blocks, QUANT_WARPS * 32, 0, stream>>>(kind, codes, absmax, w, n, nf4_table());
    cudaCheckLaunch();
}

void quant_dequantize(int kind, bf16 *out, const unsigned char *codes, const float *absmax, size_t n, cudaStream_t stream) {
    check_kind(kind, "quant_dequantize");
    if (n == 0) return;
    quant_dequantize_kernel<<<lora_grid((n + 1) / 2), LORA_THREADS, 0, stream>>>(kind, out, codes, absmax, n, nf4_table());
    cudaCheckLaunch();
}

void qbase_store_layer(GpuLora *g, const ParamLayout *p, int l, const bf16 *block, cudaStream_t stream) {
    const QuantLayerLayout *q = &g->qlayout;
    unsigned char *rec = g->qbase + (size_t)l * q->bytes;
    for (int t = 0; t < LT_COUNT; t++) {
        if (p->layer.offset[t] == SIZE_MAX) continue;
        size_t n = p->layer.rows[t] * p->layer.cols[t];
        const bf16 *w = block + p->layer.offset[t];
        if (quant_is_projection(t)) quant_quantize(q->kind, rec + q->codes[t], (float *)(rec + q->absmax[t]), w, n, stream);
        else cudaCheck(cudaMemcpyAsync(rec + q->small[t], w, n * sizeof(bf16), cudaMemcpyDeviceToDevice, stream));
    }
    g->wlayer_of = -1;
}

void qbase_load_layer(GpuLora *g, const ParamLayout *p, int l, cudaStream_t stream) {
    if (g->wlayer_of == l) return;
    const QuantLayerLayout *q = &g->qlayout;
    const unsigned char *rec = g->qbase + (size_t)l * q->bytes;
    for (int t = 0; t < LT_COUNT; t++) {
        if (p->layer.offset[t] == SIZE_MAX) continue;
        size_t n = p->layer.rows[t] * p->layer.cols[t];
        bf16 *w = g->wlayer + p->layer.offset[t];
        if (quant_is_projection(t)) quant_dequantize(q->kind, w, rec + q->codes[t], (const float *)(rec + q->absmax[t]), n, stream);
        else cudaCheck(cudaMemcpyAsync(w, rec + q->small[t], n * sizeof(bf16), cudaMemcpyDeviceToDevice, stream));
    }
    g->wlayer_of = l;
}

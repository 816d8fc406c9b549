// LoRA adapters and the quantized frozen base on the GPU: the device state that gpu_model.cu keeps
// for them, and the launchers of lora_gpu.cu. See lora.h for the adapter layout and quant.h for the
// quantized formats (whose CPU twins these kernels reproduce bit for bit).
//
// Adapters go on top of the fused base GEMMs. For a group g (q|k|v, o, gate|up, down) with fused
// base output (n, out_g) and input x (n, in), A_cat (R, in) holds the A's of its adapted targets
// and B_blk (out_g, R) is block-diagonal: target j's B (out_j, r) at rows [row_off_j, +out_j) and
// columns [j r, (j + 1) r), zeros elsewhere (groups o and down have one target: B_blk is B itself).
//   forward:  u = x A_cat^T (n, R);  y += scale * u B_blk^T           (two skinny GEMMs)
//   backward: u recomputed; dB_blk = scale * dy^T u, whose diagonal blocks are added to the B's
//             gradients; du = scale * dy B_blk; dA_cat += du^T x; dx += du A_cat
// The zeros cost (R - r) / R of the second GEMM, a few percent of one base GEMM.
#ifndef LORA_GPU_H
#define LORA_GPU_H

#include "cuda_utils.h"
#include "lora.h"

typedef struct {
    LoraConfig cfg;            // rank 0: no LoRA
    LoraLayout layout;
    bf16 *params;              // adapters (layout.total), bf16: what the GEMMs read
    float *grads;              // fp32: every layer (gradient accumulation) or one layer's block
    int grads_per_layer;       // 1: grads holds only the layer being processed (optimizer in backward)
    bf16 *bblk[LORA_GROUP_COUNT];  // materialized B_blk of q|k|v and gate|up (NULL for o, down)
    bf16 *u, *du;              // scratch (rows, R) of the group being processed
    float *dbblk;              // scratch (out_g, R) fp32: dB_blk before its blocks are gathered
    // quantized frozen base (cfg.base_quant != BASE_QUANT_NONE)
    QuantLayerLayout qlayout;
    unsigned char *qbase;      // n_layers records of qlayout.bytes
    bf16 *wlayer;              // one layer's bf16 block (ParamLayout.layer_size): the dequantized layer
    int wlayer_of;             // which layer wlayer holds (-1: none)
} GpuLora;

// Group g of layer l has adapters.
static inline int lora_group_on(const GpuLora *g, int group) { return g->cfg.rank > 0 && g->layout.group_rank[group] > 0; }

// Gradient block of layer l's adapters (layout.layer_size floats).
static inline float *lora_layer_grads(const GpuLora *g, int l) {
    return g->grads + (g->grads_per_layer ? 0 : (size_t)l * g->layout.layer_size);
}

// B_blk of layer l's group into g->bblk[group] (groups q|k|v and gate|up; nothing for o, down).
void lora_prepare_group(GpuLora *g, int l, int group, cudaStream_t stream);
// y (n, out_g) += scale * (x (n, in) A_cat^T) B_blk^T for layer l's group (no-op without adapters).
void lora_forward(GpuLora *g, int l, int group, bf16 *y, const bf16 *x, int n, cudaStream_t stream);
// Adds the adapter gradients of layer l's group from dy (n, out_g) and x (n, in) to the layer's
// block (always accumulates, over MsT chunks too: the caller zeroes the block once per step or per
// layer), leaving du in g->du for lora_backward_input. Call before x is overwritten.
void lora_backward_weights(GpuLora *g, int l, int group, const bf16 *dy, const bf16 *x, int n, cudaStream_t stream);
// dx (n, in) += du A_cat (after the base GEMM wrote dx).
void lora_backward_input(GpuLora *g, int l, int group, bf16 *dx, int n, cudaStream_t stream);

// ---- kernels with CPU twins (tested in dev/test_lora_kernels.cu) ----
// bblk (out_g, R) = block-diagonal of the group's B's (lora.h layout, layer block `layer_params`).
void lora_materialize_bblk(bf16 *bblk, const bf16 *layer_params, const LoraLayout *L, int group, cudaStream_t stream);
// Adds the diagonal blocks of dbblk (out_g, R) fp32 to the group's B gradients in `layer_grads`.
void lora_gather_dbblk(float *layer_grads, const float *dbblk, const LoraLayout *L, int group, cudaStream_t stream);
// codes, absmax of w (n) bf16, quant.h's rules (one block of QUANT_BLOCK elements per warp).
void quant_quantize(int kind, unsigned char *codes, float *absmax, const bf16 *w, size_t n, cudaStream_t stream);
// out (n) bf16 = dequantized codes.
void quant_dequantize(int kind, bf16 *out, const unsigned char *codes, const float *absmax, size_t n, cudaStream_t stream);

// ---- the quantized base ----
// Quantizes layer l's bf16 block (ParamLayout order, on the device at `block`) into its record.
void qbase_store_layer(GpuLora *g, const ParamLayout *p, int l, const bf16 *block, cudaStream_t stream);
// g->wlayer = layer l's bf16 block (dequantized projections, copied norms and biases), unless it holds l.
void qbase_load_layer(GpuLora *g, const ParamLayout *p, int l, cudaStream_t stream);

#endif  // LORA_GPU_H

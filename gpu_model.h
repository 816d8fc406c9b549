// The model on the GPU: forward, the mini-sequence MLP and LM-head + cross-entropy passes,
// backward with recomputation (and optional host offload of layer inputs), AdamW (optionally
// inside the backward pass). bf16 weights and activations, fp32 accumulation, norms, softmax and
// cross-entropy in fp32, fp32 weight gradients. Every device buffer is a slice of one arena whose
// layout is the memory plan of mst.h. Our kernels use no float atomics; cuDNN's attention backward
// may accumulate dQ with atomics (attention_cudnn.cpp), so GPU runs are not yet known to repeat
// bit for bit: test_llama checks it and reports.
//
// Several GPUs (settings.comm, one process per GPU; gpu_dist.cu): every rank runs the model on its
// own tokens (its rows of the batch, or with seq_parallel its S tokens of every row, attention
// switching to all tokens of its heads through Ulysses all-to-alls) and the gradients are summed
// over the ranks: each rank keeps the sum of its ZeRO part of every block (zero.h), updates that
// part with AdamW (its moments and master weights hold only that part) and sends the new bf16
// weights to every rank. With optimizer-in-backward a layer's exchange and update run on a side
// stream while the backward of the layer below goes on. Loss, valid-token counts and the gradient
// norm are over all ranks, so every rank sees the numbers one GPU would with the whole batch.
#ifndef GPU_MODEL_H
#define GPU_MODEL_H

#include "comm.h"
#include "cuda_utils.h"
#include "lora_gpu.h"
#include "model_config.h"
#include "mst.h"
#include "step_profile.h"
#include "ulysses.h"
#include "zero.h"

typedef struct {
    int B, S;               // this rank's rows and tokens per row (its part of the batch on several GPUs)
    int mst_chunks;         // M token chunks of the MLP and LM head; 1 = standard transformer, 0 = auto
    int vocab_chunk;        // LM-head columns per tile; V = one tile (one pass), 0 = auto
    int recompute;          // 1: keep only layer inputs, recompute each layer in backward; MST_RECOMPUTE_AUTO:
                            // off when the standard transformer fits (gpu_model_init resolves it to 0 or 1)
    int attn_kept_layers;   // with recompute: the last K layers keep their attention activations (no recompute
                            // of their attention part); 0: none; MST_KEPT_AUTO: as many as fit
    int offload;            // 1: layer inputs may live in pinned host memory (needs recompute)
    int host_layers;        // with offload: layers whose inputs go to the host (the first ones); 0 = auto
    int grad_accum_steps;   // 1 enables optimizer-in-backward
    DType moment_type;      // AdamW moments: DT_FP32 or DT_BF16 (unused with moments_8bit)
    int moments_8bit;       // 1: 8-bit block-wise moments (--optimizer adamw8bit; adamw8bit.h)
    int master_weights;     // 1: fp32 master weights (bf16 weights are round-to-nearest copies)
    size_t gpu_mem_budget;  // bytes for arena + cuBLASLt workspace; 0: free memory minus a 1 GiB margin
    size_t host_mem_budget; // pinned bytes for offloaded layer inputs; 0: mst_default_host_budget(physical memory)
                            // (shared by the ranks of a host)
    LoraConfig lora;        // rank 0: every weight trains; else adapters on a frozen (optionally quantized) base
    uint64_t lora_seed;     // initialization of new adapters (lora_init_params)
    uint64_t init_seed;     // gpu_model_init with no parameters: the seed of the random init
    int attn_head_groups;   // attention backward in 1, 2, 4 or 8 head-group calls (less cuDNN workspace); 0 = auto
    int attn_bwd_sliced;    // 1: the attention backward keeps one head group's gradients at a time (attn_sliced.h,
                            // mst.h); 0: off; MST_SLICED_AUTO: only when nothing else fits
    Comm *comm;             // NULL: one GPU; else the ranks this model trains with (comm.h)
    int seq_parallel;       // with comm: 1 = Ulysses sequence parallel (B, S: every row, this rank's S tokens)
    int overlap_optimizer;  // one GPU, optimizer-in-backward: 1 = a layer's AdamW on the side stream, overlapping
                            // the backward of the layer below (one more layer-gradient buffer; same results)
} GpuSettings;

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    float clip;       // global gradient-norm clip; 0 = none
    int step;         // 1-based
    uint32_t seed;    // stochastic rounding seed (mixed per tensor and step)
} OptimizerStep;

typedef struct {
    float loss;       // mean cross-entropy over the valid targets of this micro-batch
    float grad_norm;  // global norm of the step's gradients (0 on micro steps that do not update)
    int n_valid;      // targets >= 0 in this micro-batch
} StepResult;

typedef struct {
    size_t planned;       // plan.device_total
    size_t arena;         // bytes of the arena allocation
    size_t arena_drop;    // the cudaMemGetInfo drop measured around the arena allocation
    size_t device_used, device_total;  // cudaMemGetInfo now: total - free, total
    size_t host_pinned;   // plan.host_total
    size_t peak_used;     // the largest device_used seen by gpu_model_memory_report
} MemoryReport;

// Pointers of one layer's activations: per-layer slices when they are kept (no recompute; with
// recompute the attention part of the last attn_kept_layers layers), else the shared working
// buffers. MLP buffers are one chunk's (c rows) unless kept per layer (M = 1, no recompute). Post-norm buffers are NULL unless the family has post-norms.
typedef struct {
    bf16 *ln1; float *ln1_rstd; bf16 *qkv; bf16 *att; float *att_stats; bf16 *h1;
    bf16 *ao; float *ao_rstd;
    bf16 *ln2; float *ln2_rstd; bf16 *gate_up; bf16 *glu; bf16 *dn; float *dn_rstd;
    bf16 *qkv_heads, *att_heads;  // sequence parallel: q|k|v and attention output of this rank's heads, every token
} LayerActs;

typedef struct {
    ModelConfig config;
    ParamLayout layout;
    GpuSettings settings;
    MemoryPlan plan;
    char *arena;
    size_t arena_drop;
    char *host_block;  // pinned, plan.host_total bytes
    cudaStream_t stream, copy_stream;
    // offload staging buffers X[2] (layer l uses X[l % 2]) and their events
    cudaEvent_t ev_written[2], ev_saved[2], ev_free[2], ev_fetched[2];
    // weights and optimizer state
    bf16 *params; float *master; void *adam_m, *adam_v; float *rope;
    float *adam_m_absmax, *adam_v_absmax;  // moments_8bit: adam_m, adam_v hold the codes, these the block scales
    Adam8Layout adam8_layout;              // moments_8bit: where each tensor's blocks start
    // gradients: full model (gradient accumulation), or one layer + embedding/head + final norm
    float *grads, *layer_grads, *embed_head_grads, *final_norm_grads, *grad_norm_partials;
    // batch and residual stream
    int32_t *tokens, *targets, *embed_unique, *embed_offsets, *embed_positions;
    float *scalars;  // [0] loss sum, [1] sum of squared gradients
    bf16 *layer_inputs, *x_offload, *x_final, *dresid;
    bf16 *layer_inputs_host;
    LayerActs *acts;  // one per layer
    bf16 *datt, *dqkv, *attn_tmp, *mlp_tmp;
    bf16 *datt_g, *dqkv_g;  // the sliced attention backward's one-group scratch (else NULL)
    bf16 *xf, *dxf, *dlogits; float *xf_rstd, *dxf_acc, *logits, *ce_max, *ce_sum, *ce_target, *ce_lse, *losses;
    void *attn_workspace; float *reduce_scratch;
    // host-side batch index (embedding backward) and state
    int32_t *h_counts, *h_unique, *h_offsets, *h_positions, *h_tokens;
    int n_unique;
    float prev_grad_norm;  // optimizer-in-backward clips with the previous step's norm
    int has_prev_norm;
    size_t peak_used;
    StepProfile *profile;  // NULL unless gpu_model_profile_enable
    int capture;           // 1: the next update copies its gradient to capture_grads (gpu_model_capture_grads)
    float *capture_grads;  // host, n_train floats (may be NULL on ranks other than 0)
    // several GPUs (NULL / 0 on one): the ranks, this rank's ZeRO parts, the side stream of the
    // gradient exchange and update, its events, and the sequence-parallel heads and buffers
    Comm *comm;
    int sp;                      // sequence-parallel ranks (1: none)
    ZeroLayout zero;
    UlyssesHeads heads;
    cudaStream_t grad_stream;    // the side stream (also on one GPU with overlap_optimizer); NULL: none
    int layer_grad_buffers;      // 2 with the side stream (layers alternate), else 1
    cudaEvent_t ev_compute, ev_grads_free[2], ev_head_free, ev_grad_done;
    float *grad_shard;           // the summed gradient of this rank's part of one block
    bf16 *a2a_send, *a2a_recv, *datt_heads, *dqkv_heads;
    // LoRA: the adapters and their gradients, the quantized base (lora_gpu.h). With LoRA the AdamW
    // moments and master weights above are the adapters' (n_train values) and the base has no gradients.
    GpuLora lora;
    size_t n_train;    // values with gradients and optimizer state: layout.total, or the adapters'
} GpuModel;

// Resolves the auto settings in *s, plans, refuses (dies with the plan breakdown and what would
// fit) before allocating if it cannot fit, allocates the arena, uploads the weights. params_bf16
// NULL: a random init on the device instead (benchmark presets): matrices N(0, 0.02) from
// random_normal_at(s->init_seed, parameter offset), biases 0, norm weights 1 (0 where the family
// scales by 1 + w).
void gpu_model_init(GpuModel *m, const ModelConfig *c, const uint16_t *params_bf16, GpuSettings *s);
void gpu_model_print_plan(const GpuModel *m, FILE *f);
// --profile: GPU time of each training step by region (step_profile.h); reset drops the steps so far.
void gpu_model_profile_enable(GpuModel *m);
void gpu_model_profile_reset(GpuModel *m);
void gpu_model_profile_print(const GpuModel *m, FILE *f);
// tokens, targets: host arrays (B*S), targets < 0 ignored. Loss = mean CE over valid targets of this
// micro-batch; gradients are of loss / grad_accum_steps. On micro_index == grad_accum_steps - 1
// applies AdamW (global-norm clipping when opt->clip > 0) and zeroes the gradients.
// With grad_accum_steps == 1 (optimizer-in-backward) the clip uses the previous step's norm
// (no clipping on the first step after init or set_optimizer_state without a stored norm).
void gpu_model_train_micro_step(GpuModel *m, const int32_t *tokens, const int32_t *targets, int micro_index,
                                const OptimizerStep *opt, StepResult *out);
float gpu_model_eval_loss(GpuModel *m, const int32_t *tokens, const int32_t *targets);
// Logits (V, fp32, soft-capped where the family does) at position n_tokens - 1 of one sequence.
void gpu_model_next_token_logits(GpuModel *m, const int32_t *tokens, int n_tokens, float *logits_host);
// The bf16 weights (layout.total); with LoRA the frozen base (refused when it is quantized: the bf16
// base is not kept).
void gpu_model_get_params(GpuModel *m, uint16_t *params_bf16_host);
// The LoRA adapters (lora.h layout, n_train floats: the bf16 adapters widened / the values rounded to bf16).
void gpu_model_get_lora(GpuModel *m, float *host);
void gpu_model_set_lora(GpuModel *m, const float *host);
// Optimizer state blob over the n_train trainable values:
// m | v (moment_type) | [master fp32] | float prev_grad_norm | int32 has_prev | 8 zero bytes.
// With moments_8bit (full-parameter only), m and v are each codes (adam8_layout.total * ADAM8_BLOCK
// bytes, uint8) | scales (adam8_layout.total fp32): m codes | m scales | v codes | v scales | [master] | the same trailer.
size_t gpu_model_optimizer_state_bytes(const GpuModel *m);
void gpu_model_get_optimizer_state(GpuModel *m, void *host);
void gpu_model_set_optimizer_state(GpuModel *m, const void *host);
void gpu_model_memory_report(GpuModel *m, MemoryReport *r);
// The gradients accumulated so far (n_train floats: every parameter, or with LoRA the adapters);
// needs grad_accum_steps > 1.
void gpu_model_debug_grads(GpuModel *m, float *grads_host);
// The next optimizer update first copies the gradient it applies (n_train floats, summed over
// the ranks, before clipping) to grads_host (rank 0's on several GPUs; the others may pass NULL).
// Needs grad_accum_steps > 1 (optimizer-in-backward never holds the whole gradient).
void gpu_model_capture_grads(GpuModel *m, float *grads_host);
void gpu_model_free(GpuModel *m);
// The cuBLASLt / cuDNN handles are created by the first gpu_model_init and shared by later models;
// this releases them (call once at exit, after the last gpu_model_free).
void gpu_model_release_handles(void);

#endif  // GPU_MODEL_H

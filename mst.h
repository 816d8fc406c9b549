// The memory planner of the Mini-Sequence Transformer trainer: the bytes of every device and
// pinned-host buffer the GPU model allocates, for a config, a batch shape and the run settings,
// and the choice of chunk counts (and offloaded layers) that fits a budget.
//
// Plain host C (no CUDA): tests/test_planner.c builds it with gcc. gpu_model.cu takes every
// device pointer from this plan (by entry name), so the plan is the layout, not an estimate of it:
// one arena of exactly plan.device_total bytes, every entry 256-byte aligned inside it.
// The mini-sequence passes themselves (MLP and LM head + cross-entropy over token chunks and
// vocabulary tiles) run in gpu_model.cu on the buffers planned here.
//
// Buffers (N = B*S tokens, c = chunk rows = ceil(N / M), vc = vocabulary columns per tile):
//   weights        params bf16, RoPE cos/sin table (S, hd) fp32; with LoRA the adapters (bf16) and
//                  the block-diagonal B of q|k|v and gate|up (lora_gpu.h); with a quantized base
//                  the per-layer records (quant.h), one dequantized layer (bf16) and, bf16, only
//                  the embedding, final norm and LM head
//   optimizer      AdamW moments m, v (bf16 or fp32; or, full-parameter only, 8-bit codes + an fp32
//                  scale per 256-element block, adamw8bit.h), optional fp32 master weights: of every
//                  parameter, or with LoRA of the adapters only (the base is frozen)
//   gradients      fp32: the full model with gradient accumulation; with optimizer-in-backward
//                  (grad_accum_steps = 1) one layer's block + embedding/LM head + final norm;
//                  grad-norm partial sums. An untied model's embedding/LM-head gradient buffer
//                  lives in the shared region (below): it is in use only when no layer is
//                  (counted there, as intermediates). With LoRA the same for the adapters only
//                  (all layers, or one layer's block) and no embedding/LM-head gradients
//   activations    saved layer inputs (N, d) bf16 per device-resident layer; without recompute
//                  also each layer's attention activations (and with M = 1 its MLP ones)
//   intermediates  the residual stream's end (x_final, which the LM head's backward overwrites
//                  with dresid row by row), batch ids, offload staging buffers, and one shared
//                  region holding either one layer's working buffers (attention part over N rows
//                  + one MLP chunk over c rows; the attention output's gradient reuses h1) or the
//                  LM-head working buffers (one token chunk: normed rows, logits tile (c, vc)
//                  fp32, dlogits, CE state): the two never live at the same time, so they share
//                  the same bytes
//   workspace      attention workspace (cuDNN's, or the soft-cap backward's), fp32 scratch of the
//                  norm/bias gradient reductions (the cuBLASLt workspace is allocated by
//                  matmul_init: device_external)
//   host           pinned host slots of offloaded layer inputs (the first host_layers layers)
// Several GPUs (ranks > 1, zero.h and ulysses.h): the moments and master weights are this GPU's
// ZeRO shard (the longest of any rank), a gradient-shard buffer receives the summed gradient of
// this GPU's part of a block, and optimizer-in-backward keeps two layer-gradient buffers (one is
// reduced on the side stream while backward fills the other). With sequence parallelism S is this
// GPU's tokens per row; attention works on all ranks * S tokens of this GPU's heads: the RoPE
// table and attention statistics cover the whole sequence, and the head-layout q|k|v, attention
// output, their gradients and the all-to-all send / receive buffers join the layer working set.
#ifndef MST_H
#define MST_H

#include "adamw8bit.h"
#include "lora.h"
#include "model_config.h"
#include "ulysses.h"
#include "zero.h"

#define MST_ALIGN 256
#define MST_MAX_ENTRIES 64
#define MST_MATMUL_WORKSPACE ((size_t)32 << 20)  // cuBLASLt workspace: 32 MiB (Hopper's recommendation)
#define MST_MIN_TILE_ROWS 1024                   // auto keeps token chunks at least this tall when it can
#define MST_SLICED_AUTO (-1)                     // MstSettings.attn_bwd_sliced: the planner decides
#define MST_KEPT_AUTO (-1)                       // MstSettings.attn_kept_layers: as many as fit
#define MST_RECOMPUTE_AUTO (-1)                  // MstSettings.recompute: off when the standard transformer fits

typedef enum {
    MEM_WEIGHTS, MEM_OPTIMIZER, MEM_GRADIENTS, MEM_ACTIVATIONS, MEM_INTERMEDIATES, MEM_WORKSPACE, MEM_HOST,
    MEM_CATEGORY_COUNT
} MemCategory;

// Which region an entry lives in: its own bytes, or one of the two alternatives of the shared
// working region (same bytes, used at different times).
enum { SHARE_NONE = 0, SHARE_LAYER = 1, SHARE_LMHEAD = 2 };

typedef struct {
    int B, S;
    int mst_chunks;        // M: token chunks of the MLP and LM-head passes (1 = standard); 0 = auto
    int vocab_chunk;       // LM-head columns per tile (V = one tile, one pass); 0 = auto
    int recompute;         // 1: keep only layer inputs; backward recomputes each layer; MST_RECOMPUTE_AUTO:
                           // off when the plan without it fits at M = 1 and one vocabulary tile (or the
                           // chunking asked for), else on (mst_plan_auto resolves it)
    int attn_kept_layers;  // with recompute: the last K layers keep their attention part's activations, so
                           // the backward recomputes only their MLP chunks (which it always does with
                           // recompute); 0: none; MST_KEPT_AUTO: as many as fit once everything else does
    int offload;           // 1: the first host_layers layers keep their inputs in pinned host memory
    int host_layers;       // with offload: how many layers; 0 = auto (as few as fit)
    int grad_accum_steps;  // 1: optimizer-in-backward (no full-model gradient buffer)
    int moment_bytes;      // bytes per AdamW moment element: 2 (bf16), 4 (fp32), or 1: 8-bit block-wise
                           // (adamw8bit.h: 1 byte + an fp32 scale per ADAM8_BLOCK elements)
    int master_weights;    // 1: fp32 master copy of the weights
    int ranks;             // GPUs sharing the gradient sums and the optimizer state; 0 or 1: one GPU
    int seq_parallel;      // 1 (ranks > 1): Ulysses sequence parallel; S is this GPU's tokens of a row
    int overlap_optimizer; // 1: optimizer-in-backward on one GPU runs a layer's AdamW on a side stream
                           // while the backward of the layer below goes on (two layer-gradient buffers)
    int attn_head_groups;  // G: the attention backward runs in G calls over Hq/G query heads each, which
                           // divides cuDNN's fp32 workspace by about G; 1, 2, 4 or 8 dividing Hkv; 0 = auto
    int attn_bwd_sliced;   // 1: the attention backward runs group by group (G >= 2) with only one group's
                           // dO and dq|dk|dv (packed) at a time; dq|dk|dv go back into q|k|v's own buffer,
                           // so no full dqkv / datt exists (recompute, cuDNN, one GPU's whole sequence,
                           // no LoRA, q width >= d_model); 0: off; MST_SLICED_AUTO: only when nothing else fits
    LoraConfig lora;       // rank 0: every weight trains; else adapters on a frozen (optionally quantized) base
} MstSettings;


static inline int mst_ranks(const MstSettings *s) { return s->ranks > 1 ? s->ranks : 1; }
// Layer-gradient buffers of optimizer-in-backward: two when a side stream reads one (several GPUs,
// or overlap_optimizer) while backward fills the other, else one.
static inline int mst_layer_grad_buffers(const MstSettings *s) { return mst_ranks(s) > 1 || s->overlap_optimizer ? 2 : 1; }
// Layers that keep their attention activations (the last ones): 0 without recompute (all keep them).
static inline int mst_kept_layers(const MstSettings *s) { return s->recompute && s->attn_kept_layers > 0 ? s->attn_kept_layers : 0; }
// 1 when the backward recomputes layer l's attention part (recompute on and l not among the kept).
static inline int mst_attn_recomputed(const MstSettings *s, int n_layers, int l) { return s->recompute && l < n_layers - mst_kept_layers(s); }
// Tokens of a whole row: S, or ranks * S under sequence parallelism.
static inline int mst_full_seq(const MstSettings *s) { return s->seq_parallel ? mst_ranks(s) * s->S : s->S; }

// Figures that only the kernels' modules know. On the GPU the model fills them from cuDNN and
// the launchers; without a GPU mst_kernel_figures_estimate() gives documented estimates.
typedef struct {
    size_t attn_workspace;      // attention workspace for (B, S), bytes: cuDNN SDPA's or the soft-cap backward's
    size_t attn_workspace_grouped[3];  // the same with the backward in 2, 4, 8 head groups; 0: not offered
    size_t attn_workspace_sliced[3];   // the same for the sliced backward (packed per-group graph); 0: not offered
    size_t matmul_workspace;    // cuBLASLt workspace (allocated by matmul_init, outside the arena)
    size_t reduce_scratch;      // fp32 partial sums of the norm-weight / bias gradients over N rows, bytes
    size_t grad_norm_partials;  // floats of the grad-norm partial sums
} MstKernelFigures;

// The attention workspace with the backward in G head groups (G <= 1: one call); 0 when not offered.
static inline size_t mst_attn_workspace(const MstKernelFigures *f, int G) {
    return G <= 1 ? f->attn_workspace : G == 2 ? f->attn_workspace_grouped[0] : G == 4 ? f->attn_workspace_grouped[1]
                                                : G == 8 ? f->attn_workspace_grouped[2] : 0;
}

// The attention workspace of the settings' backward: sliced or not, in their head groups.
static inline size_t mst_attn_workspace_of(const MstKernelFigures *f, const MstSettings *s) {
    if (s->attn_bwd_sliced != 1) return mst_attn_workspace(f, s->attn_head_groups);
    int G = s->attn_head_groups;
    return G == 2 ? f->attn_workspace_sliced[0] : G == 4 ? f->attn_workspace_sliced[1] : G == 8 ? f->attn_workspace_sliced[2] : 0;
}

// Why the sliced attention backward cannot run with these settings, or NULL when it can.
static inline const char *mst_sliced_refusal(const ModelConfig *c, const MstSettings *s) {
    if (!s->recompute) return "the sliced attention backward reuses the recomputed layer's buffers: it needs recompute on";
    if (s->lora.rank) return "the sliced attention backward is not for LoRA (the o-projection adapter's input gradient needs the whole attention-output gradient)";
    if (c->attn_softcap > 0.0f) return "the sliced attention backward runs cuDNN's head groups; soft-capped attention (Gemma-2) runs our own kernels";
    if (s->seq_parallel) return "the sliced attention backward is for one GPU's whole sequence, not sequence parallel";
    if (c->n_heads * c->head_dim < c->d_model) return "the sliced attention backward recomputes the normed input into the attention output's buffer, which is narrower than d_model for this model";
    if (s->attn_head_groups == 1) return "the sliced attention backward runs in 2, 4 or 8 head groups, not 1";
    return NULL;
}

// The kv heads that one GPU's attention runs on: all of them, or with sequence parallel this GPU's
// (ulysses.h; a replicated kv head counts once). Head groups must divide them.
static inline int mst_attn_kv_heads(const ModelConfig *c, const MstSettings *s) {
    UlyssesHeads u;
    char msg[256];
    if (!s->seq_parallel || ulysses_heads_init(&u, s->ranks, c->n_heads, c->n_kv_heads, c->head_dim, msg, sizeof(msg)))
        return c->n_kv_heads;
    return u.hkv_loc;
}

// 1 when the attention backward may run in G head groups: one call always; G > 1 when the figures
// offer it and G divides the kv heads of one GPU's attention.
static inline int mst_head_groups_offered(const ModelConfig *c, const MstSettings *s, const MstKernelFigures *f, int G) {
    return G <= 1 || (mst_attn_workspace(f, G) > 0 && mst_attn_kv_heads(c, s) % G == 0);
}

// 1 when the sliced attention backward may run with s (attn_bwd_sliced = 1, its head groups G >= 2):
// the model and settings allow it, the figures offer its graph, G divides the kv heads.
static inline int mst_sliced_offered(const ModelConfig *c, const MstSettings *s, const MstKernelFigures *f) {
    return mst_sliced_refusal(c, s) == NULL && s->attn_head_groups >= 2 && mst_attn_workspace_of(f, s) > 0 &&
           c->n_kv_heads % s->attn_head_groups == 0;
}

typedef struct {
    char name[32];
    size_t slice_bytes;  // one slice (e.g. one layer), a multiple of MST_ALIGN
    int count;           // slices (layers) in this entry
    size_t bytes;        // count * slice_bytes
    size_t offset;       // in the device arena, or in the pinned host block for MEM_HOST
    int category;        // MemCategory
    int share;           // SHARE_NONE / SHARE_LAYER / SHARE_LMHEAD
} PlanEntry;

typedef struct {
    PlanEntry entries[MST_MAX_ENTRIES];
    int n_entries;
    size_t device_total;     // the arena: exactly what gpu_model cudaMallocs
    size_t device_external;  // outside the arena: the cuBLASLt workspace
    size_t host_total;       // pinned host bytes
    size_t category_bytes[MEM_CATEGORY_COUNT];  // the shared region counts once, as intermediates
    size_t shared_bytes;     // size of the shared working region
    MstSettings settings;    // resolved: mst_chunks, vocab_chunk, host_layers all explicit
    MstKernelFigures figures;
    int n_tokens;            // N = B*S
    int chunk_rows, n_chunks;     // token chunks: rows per chunk, number of chunks
    int vocab_tiles;              // ceil(V / vocab_chunk)
    int host_layers, device_layers;
    int mlp_saved;           // 1: M = 1 without recompute, MLP intermediates kept per layer
} MemoryPlan;

static inline const char *mst_category_name(int c) {
    static const char *names[MEM_CATEGORY_COUNT] = {"weights", "optimizer", "gradients", "activations",
                                                    "intermediates", "workspace", "host"};
    return (c >= 0 && c < MEM_CATEGORY_COUNT) ? names[c] : "?";
}

static inline size_t mst_align(size_t bytes) { return (bytes + MST_ALIGN - 1) / MST_ALIGN * MST_ALIGN; }
static inline size_t mst_ceil_div(size_t a, size_t b) { return (a + b - 1) / b; }

// Estimates for planning without a GPU. cuDNN 9.14's SDPA backward on the H100 asks for two fp32
// (B, S, Hq, hd) buffers plus one fp32 row statistic (B, Hq, S): 128.5 MiB for Llama-3-8B at S=4096
// (measured); with the backward in G head groups, the same for Hq/G heads; with an attention soft-cap
// every layer runs the soft-cap kernels instead, whose workspace is exactly one fp32 (B, Hq, S)
// (attention_softcap_workspace_bytes in attention_softcap.cu); the norm/bias gradient
// reductions keep one fp32 row of partial sums per 32 rows for the widest reduced tensor (the
// fused QKV bias); 1024 grad-norm partials; 32 MiB of cuBLASLt workspace.
static inline size_t mst_attn_workspace_estimate(const ModelConfig *c, size_t N, int head_groups) {
    size_t heads = (size_t)(c->n_heads / head_groups);
    return 2 * N * heads * c->head_dim * 4 + N * heads * 4;
}

static inline void mst_kernel_figures_estimate(const ModelConfig *c, int B, int S, MstKernelFigures *f) {
    size_t N = (size_t)B * S;
    size_t qkv = (size_t)(c->n_heads + 2 * c->n_kv_heads) * c->head_dim;
    size_t widest = qkv > (size_t)c->d_model ? qkv : (size_t)c->d_model;
    f->attn_workspace = c->attn_softcap > 0.0f ? N * c->n_heads * 4 : mst_attn_workspace_estimate(c, N, 1);
    for (int k = 0; k < 3; k++) {
        int G = 2 << k;
        f->attn_workspace_grouped[k] = c->attn_softcap > 0.0f || c->n_kv_heads % G != 0 ? 0
                                       : mst_attn_workspace_estimate(c, N, G);
        f->attn_workspace_sliced[k] = f->attn_workspace_grouped[k];  // the same dQ accumulators per group
    }
    f->matmul_workspace = MST_MATMUL_WORKSPACE;
    f->reduce_scratch = (N + 31) / 32 * widest * 4;
    f->grad_norm_partials = 1024;
}

// Checks the settings against the config. Returns NULL when valid, else a message in buf.
// mst_chunks, vocab_chunk and host_layers may be 0 (auto).
static inline const char *mst_settings_check(const ModelConfig *c, const MstSettings *s, char *buf, size_t len) {
    long N = (long)s->B * s->S;
    if (s->B < 1 || s->S < 1) { snprintf(buf, len, "batch %d x sequence %d: both must be >= 1", s->B, s->S); return buf; }
    if (N > (1L << 30)) { snprintf(buf, len, "B*S = %ld tokens is too many", N); return buf; }
    if (s->mst_chunks < 0 || s->mst_chunks > N) { snprintf(buf, len, "mini-sequence chunks M = %d must be in [1, B*S = %ld] (0 = auto)", s->mst_chunks, N); return buf; }
    if (s->vocab_chunk < 0 || s->vocab_chunk > c->vocab_size) { snprintf(buf, len, "vocab chunk %d must be in [1, V = %d] (0 = auto)", s->vocab_chunk, c->vocab_size); return buf; }
    if (s->offload && !s->recompute) { snprintf(buf, len, "offload keeps only layer inputs on the host: it needs recompute on"); return buf; }
    if (s->attn_kept_layers != MST_KEPT_AUTO && (s->attn_kept_layers < 0 || s->attn_kept_layers > c->n_layers)) {
        snprintf(buf, len, "kept attention layers %d must be in [0, %d] (or auto)", s->attn_kept_layers, c->n_layers); return buf;
    }
    if (s->recompute != 0 && s->recompute != 1 && s->recompute != MST_RECOMPUTE_AUTO) {
        snprintf(buf, len, "recompute %d must be 0, 1 or auto", s->recompute); return buf;
    }
    if (s->attn_kept_layers > 0 && !s->recompute) {
        snprintf(buf, len, "keeping the attention activations of some layers is a choice of recompute: without recompute every layer keeps them");
        return buf;
    }
    if (s->host_layers < 0 || s->host_layers > c->n_layers || (!s->offload && s->host_layers != 0)) {
        snprintf(buf, len, "host layers %d must be in [0, %d] and needs offload", s->host_layers, c->n_layers); return buf;
    }
    if (s->grad_accum_steps < 1) { snprintf(buf, len, "grad_accum_steps %d must be >= 1", s->grad_accum_steps); return buf; }
    if (!(s->attn_head_groups == 0 || s->attn_head_groups == 1 || s->attn_head_groups == 2 || s->attn_head_groups == 4 ||
          s->attn_head_groups == 8) || (s->attn_head_groups > 1 && c->n_kv_heads % s->attn_head_groups != 0)) {
        snprintf(buf, len, "attention head groups %d must be 1, 2, 4 or 8 and divide the %d kv heads (0 = auto)",
                 s->attn_head_groups, c->n_kv_heads);
        return buf;
    }
    if (s->attn_bwd_sliced != 0 && s->attn_bwd_sliced != 1 && s->attn_bwd_sliced != MST_SLICED_AUTO) {
        snprintf(buf, len, "sliced attention backward %d must be 0, 1 or auto", s->attn_bwd_sliced);
        return buf;
    }
    if (s->attn_bwd_sliced == 1 && mst_sliced_refusal(c, s)) { snprintf(buf, len, "%s", mst_sliced_refusal(c, s)); return buf; }
    if (s->moment_bytes != 1 && s->moment_bytes != 2 && s->moment_bytes != 4) { snprintf(buf, len, "moment bytes %d must be 1 (8-bit), 2 (bf16) or 4 (fp32)", s->moment_bytes); return buf; }
    if (s->moment_bytes == 1 && mst_ranks(s) > 1) { snprintf(buf, len, "8-bit moments are not sharded over several GPUs (ZeRO): use --moments bf16 or fp32 with %d GPUs", s->ranks); return buf; }
    if (s->moment_bytes == 1 && s->lora.rank) { snprintf(buf, len, "8-bit moments are for full-parameter training, not LoRA adapters"); return buf; }
    if (s->lora.rank && mst_ranks(s) > 1) {
        snprintf(buf, len, "LoRA trains on one GPU only: %d GPUs were asked for (the adapters' gradients are not exchanged "
                 "between GPUs); run without mpirun / torchrun, or train every weight", s->ranks);
        return buf;
    }
    if (s->lora.rank && s->overlap_optimizer) { snprintf(buf, len, "the overlapped optimizer is for full-parameter training, not LoRA adapters"); return buf; }
    if (s->ranks < 0 || (s->seq_parallel && s->ranks < 2)) { snprintf(buf, len, "ranks %d (sequence parallel %d): sequence parallelism needs 2 or more GPUs", s->ranks, s->seq_parallel); return buf; }
    if ((long)mst_full_seq(s) * s->B > (1L << 31)) { snprintf(buf, len, "B*S = %ld tokens over all GPUs is too many", (long)mst_full_seq(s) * s->B); return buf; }
    UlyssesHeads u;
    if (s->seq_parallel && ulysses_heads_init(&u, s->ranks, c->n_heads, c->n_kv_heads, c->head_dim, buf, len)) return buf;
    if (s->attn_head_groups > 1 && mst_attn_kv_heads(c, s) % s->attn_head_groups != 0) {
        snprintf(buf, len, "attention head groups %d must divide the %d kv heads that one GPU's attention runs on%s",
                 s->attn_head_groups, mst_attn_kv_heads(c, s), s->seq_parallel ? " (sequence parallel: the kv heads per GPU)" : "");
        return buf;
    }
    return lora_config_check(&s->lora, buf, len);
}

// ---- building a plan ----

typedef struct {
    MemoryPlan *p;
    size_t device_cursor, host_cursor;
    size_t shared_begin, shared_end;
    int share;  // region new device entries go to
} PlanBuilder;

static inline void plan_add(PlanBuilder *b, const char *name, size_t raw_slice, int count, int category) {
    if (b->p->n_entries >= MST_MAX_ENTRIES) die("memory plan: more than %d entries", MST_MAX_ENTRIES);
    PlanEntry *e = &b->p->entries[b->p->n_entries++];
    snprintf(e->name, sizeof(e->name), "%s", name);
    e->slice_bytes = mst_align(raw_slice);
    e->count = count;
    e->bytes = e->slice_bytes * (size_t)count;
    e->category = category;
    e->share = category == MEM_HOST ? SHARE_NONE : b->share;
    if (category == MEM_HOST) {
        e->offset = b->host_cursor;
        b->host_cursor += e->bytes;
    } else {
        e->offset = b->device_cursor;
        b->device_cursor += e->bytes;
        if (b->share != SHARE_NONE && b->device_cursor > b->shared_end) b->shared_end = b->device_cursor;
    }
}

// Starts alternative `share` of the shared region (every alternative begins at the same offset).
static inline void plan_share_begin(PlanBuilder *b, int share) {
    if (b->share == SHARE_NONE) {
        b->shared_begin = b->device_cursor;
        b->shared_end = b->device_cursor;
    }
    b->share = share;
    b->device_cursor = b->shared_begin;
}

static inline void plan_share_end(PlanBuilder *b) {
    b->share = SHARE_NONE;
    b->device_cursor = b->shared_end;
    b->p->shared_bytes = b->shared_end - b->shared_begin;
}

// Sequence-parallel head counts of this GPU (query heads, q|k|v heads); all heads on one GPU.
static inline void plan_local_heads(const ModelConfig *c, const MstSettings *s, size_t *hq, size_t *hqkv) {
    UlyssesHeads u;
    char msg[256];
    if (!s->seq_parallel) {
        *hq = (size_t)c->n_heads;
        *hqkv = (size_t)c->n_heads + 2 * (size_t)c->n_kv_heads;
        return;
    }
    if (ulysses_heads_init(&u, s->ranks, c->n_heads, c->n_kv_heads, c->head_dim, msg, sizeof(msg))) die("memory plan: %s", msg);
    *hq = (size_t)ulysses_local_heads(&u, 0);
    *hqkv = (size_t)ulysses_local_heads(&u, 1);
}

// plan_add of entry prefix + name (the kept layers' copies of the layer working buffers: "kept_qkv").
static inline void plan_add_prefixed(PlanBuilder *b, const char *prefix, const char *name, size_t raw_slice, int count,
                                     int category) {
    char full[32];
    snprintf(full, sizeof(full), "%s%s", prefix, name);
    plan_add(b, full, raw_slice, count, category);
}

// The attention part of one layer over n rows: norm, fused QKV, attention output and its
// log-sum-exp statistics, the residual after attention (h1), and with post-norms the o-proj output.
// Without keep_ln1 (recompute) the normed input has no buffer of its own: the forward writes it to
// h1's (read only by the QKV projection, before h1 is written) and the backward recomputes it into
// qkv's (dead once the attention backward is done). Sequence parallel: the statistics are of this
// GPU's heads over the whole sequence, and the head-layout q|k|v and attention output (B, ranks * S
// rows) are kept too. Entry names start with prefix.
static inline void plan_attention_acts(PlanBuilder *b, const ModelConfig *c, const MstSettings *s, size_t n, int count,
                                       int category, int keep_ln1, const char *prefix) {
    size_t d = (size_t)c->d_model, q = (size_t)c->n_heads * c->head_dim, hd = (size_t)c->head_dim;
    size_t qkv = q + 2 * (size_t)c->n_kv_heads * c->head_dim, hq, hqkv;
    size_t rows_full = (size_t)s->B * mst_full_seq(s);
    plan_local_heads(c, s, &hq, &hqkv);
    if (keep_ln1) plan_add_prefixed(b, prefix, "ln1", n * d * 2, count, category);
    plan_add_prefixed(b, prefix, "ln1_rstd", n * 4, count, category);
    plan_add_prefixed(b, prefix, "qkv", n * qkv * 2, count, category);
    plan_add_prefixed(b, prefix, "att", n * q * 2, count, category);
    plan_add_prefixed(b, prefix, "att_stats", rows_full * hq * 4, count, category);
    if (s->seq_parallel) {
        plan_add_prefixed(b, prefix, "qkv_heads", rows_full * hqkv * hd * 2, count, category);
        plan_add_prefixed(b, prefix, "att_heads", rows_full * hq * hd * 2, count, category);
    }
    plan_add_prefixed(b, prefix, "h1", n * d * 2, count, category);
    if (c->post_norms) {
        plan_add_prefixed(b, prefix, "ao", n * d * 2, count, category);
        plan_add_prefixed(b, prefix, "ao_rstd", n * 4, count, category);
    }
}

// The MLP intermediates of rows rows: norm, gate|up, activation, and with post-norms the down output.
static inline void plan_mlp_acts(PlanBuilder *b, const ModelConfig *c, size_t rows, int count, int category) {
    size_t d = (size_t)c->d_model, f = (size_t)c->d_ff;
    plan_add(b, "ln2", rows * d * 2, count, category);
    plan_add(b, "ln2_rstd", rows * 4, count, category);
    plan_add(b, "gate_up", rows * 2 * f * 2, count, category);
    plan_add(b, "glu", rows * f * 2, count, category);
    if (c->post_norms) {
        plan_add(b, "dn", rows * d * 2, count, category);
        plan_add(b, "dn_rstd", rows * 4, count, category);
    }
}

// Sequence parallel, in the layer working set: the all-to-all send and receive buffers (the
// largest exchange is q|k|v) and the head-layout gradients of the attention output and of q|k|v.
static inline void plan_sequence_parallel(PlanBuilder *b, const ModelConfig *c, const MstSettings *s) {
    size_t hq, hqkv, hd = (size_t)c->head_dim, rows_full = (size_t)s->B * mst_full_seq(s);
    plan_local_heads(c, s, &hq, &hqkv);
    plan_add(b, "a2a_send", rows_full * hqkv * hd * 2, 1, MEM_INTERMEDIATES);
    plan_add(b, "a2a_recv", rows_full * hqkv * hd * 2, 1, MEM_INTERMEDIATES);
    plan_add(b, "datt_heads", rows_full * hq * hd * 2, 1, MEM_INTERMEDIATES);
    plan_add(b, "dqkv_heads", rows_full * hqkv * hd * 2, 1, MEM_INTERMEDIATES);
}

// LoRA weights: the adapters (bf16) and the materialized block-diagonal B of the fused groups.
static inline void plan_lora_weights(PlanBuilder *b, const LoraLayout *L) {
    plan_add(b, "lora_params", L->total * 2, 1, MEM_WEIGHTS);
    if (L->group_rank[LG_QKV]) plan_add(b, "lora_bblk_qkv", L->group_out[LG_QKV] * L->group_rank[LG_QKV] * 2, 1, MEM_WEIGHTS);
    if (L->group_rank[LG_GATE_UP]) plan_add(b, "lora_bblk_gate_up", L->group_out[LG_GATE_UP] * L->group_rank[LG_GATE_UP] * 2, 1, MEM_WEIGHTS);
}

// LoRA working buffers of one group at a time over up to n rows: u = x A_cat^T and du (n, R) bf16,
// dB_blk (out_g, R) fp32, each sized for the largest group.
static inline void plan_lora_scratch(PlanBuilder *b, const LoraLayout *L, size_t n) {
    size_t R = 0, dbblk = 0;
    for (int g = 0; g < LORA_GROUP_COUNT; g++) {
        if ((size_t)L->group_rank[g] > R) R = (size_t)L->group_rank[g];
        if (L->group_out[g] * L->group_rank[g] > dbblk) dbblk = L->group_out[g] * L->group_rank[g];
    }
    plan_add(b, "lora_u", n * R * 2, 1, MEM_INTERMEDIATES);
    plan_add(b, "lora_du", n * R * 2, 1, MEM_INTERMEDIATES);
    plan_add(b, "lora_dbblk", dbblk * 4, 1, MEM_INTERMEDIATES);
}

// Builds the plan for fully resolved settings (mst_chunks >= 1, vocab_chunk >= 1, host_layers
// explicit). Dies on invalid settings (callers validate user input with mst_settings_check first).
static inline void mst_plan_build(MemoryPlan *p, const ModelConfig *c, const MstSettings *s, const MstKernelFigures *fig) {
    char msg[256];
    const char *err = mst_settings_check(c, s, msg, sizeof(msg));
    if (err) die("memory plan: %s", err);
    if (s->mst_chunks < 1 || s->vocab_chunk < 1) die("memory plan: chunk counts must be resolved before building");
    if (s->attn_bwd_sliced == MST_SLICED_AUTO) die("memory plan: the sliced attention backward must be resolved (0 or 1) before building");
    if (s->attn_kept_layers == MST_KEPT_AUTO) die("memory plan: the kept attention layers must be resolved before building");
    if (s->recompute == MST_RECOMPUTE_AUTO) die("memory plan: recompute must be resolved (0 or 1) before building");
    memset(p, 0, sizeof(*p));
    p->settings = *s;
    p->figures = *fig;
    ParamLayout lay;
    param_layout_init(&lay, c);
    size_t B = (size_t)s->B, S = (size_t)s->S, N = B * S;
    size_t d = (size_t)c->d_model, q = (size_t)c->n_heads * c->head_dim, V = (size_t)c->vocab_size;
    size_t qkv = q + 2 * (size_t)c->n_kv_heads * c->head_dim;
    int L = c->n_layers;
    p->n_tokens = (int)N;
    p->chunk_rows = (int)mst_ceil_div(N, (size_t)s->mst_chunks);
    p->n_chunks = (int)mst_ceil_div(N, (size_t)p->chunk_rows);
    p->vocab_tiles = (int)mst_ceil_div(V, (size_t)s->vocab_chunk);
    p->host_layers = s->offload ? s->host_layers : 0;
    p->device_layers = L - p->host_layers;
    p->mlp_saved = (s->mst_chunks == 1 && !s->recompute);
    size_t rows = (size_t)p->chunk_rows, vc = (size_t)s->vocab_chunk;

    LoraLayout lora;
    lora_layout_init(&lora, c, &s->lora);
    size_t n_train = s->lora.rank ? lora.total : lay.total;  // values with gradients and optimizer state

    PlanBuilder b;
    memset(&b, 0, sizeof(b));
    b.p = p;
    if (s->lora.base_quant != BASE_QUANT_NONE) {
        QuantLayerLayout q;
        quant_layer_layout_init(&q, &lay, s->lora.base_quant);
        plan_add(&b, "params", quant_rest_elems(&lay, L) * 2, 1, MEM_WEIGHTS);
        plan_add(&b, "qbase", q.bytes, L, MEM_WEIGHTS);
        plan_add(&b, "qbase_layer", lay.layer_size * 2, 1, MEM_WEIGHTS);
    } else {
        plan_add(&b, "params", lay.total * 2, 1, MEM_WEIGHTS);
    }
    size_t state = n_train, shard = 0;  // optimizer-state elements of this GPU, gradient-shard elements
    if (mst_ranks(s) > 1) zero_figures(&lay, c, s->ranks, &state, &shard);
    plan_add(&b, "rope_cos_sin", (size_t)mst_full_seq(s) * c->head_dim * 4, 1, MEM_WEIGHTS);
    if (s->lora.rank) plan_lora_weights(&b, &lora);
    if (s->moment_bytes == 1) {  // codes (every tensor padded to whole blocks) and block scales; one GPU only
        Adam8Layout a8;
        adam8_layout_init(&a8, &lay, c);
        plan_add(&b, "adam_m", a8.total * ADAM8_BLOCK, 1, MEM_OPTIMIZER);
        plan_add(&b, "adam_v", a8.total * ADAM8_BLOCK, 1, MEM_OPTIMIZER);
        plan_add(&b, "adam_m_absmax", a8.total * sizeof(float), 1, MEM_OPTIMIZER);
        plan_add(&b, "adam_v_absmax", a8.total * sizeof(float), 1, MEM_OPTIMIZER);
    } else {
        plan_add(&b, "adam_m", state * s->moment_bytes, 1, MEM_OPTIMIZER);
        plan_add(&b, "adam_v", state * s->moment_bytes, 1, MEM_OPTIMIZER);
    }
    if (s->master_weights) plan_add(&b, "master", state * 4, 1, MEM_OPTIMIZER);
    if (s->lora.rank) {
        if (s->grad_accum_steps > 1) plan_add(&b, "lora_grads", lora.total * 4, 1, MEM_GRADIENTS);
        else plan_add(&b, "lora_layer_grads", lora.layer_size * 4, 1, MEM_GRADIENTS);
    } else if (s->grad_accum_steps > 1) {
        plan_add(&b, "grads", lay.total * 4, 1, MEM_GRADIENTS);
    } else {
        plan_add(&b, "layer_grads", lay.layer_size * 4, mst_layer_grad_buffers(s), MEM_GRADIENTS);
        if (c->tied_embeddings) plan_add(&b, "embed_head_grads", V * d * 4, 1, MEM_GRADIENTS);
        plan_add(&b, "final_norm_grads", d * 4, 1, MEM_GRADIENTS);
    }
    if (shard > 0) plan_add(&b, "grad_shard", shard * 4, 1, MEM_GRADIENTS);
    plan_add(&b, "grad_norm_partials", fig->grad_norm_partials * 4, 1, MEM_GRADIENTS);
    if (p->device_layers > 0) plan_add(&b, "layer_inputs", N * d * 2, p->device_layers, MEM_ACTIVATIONS);
    if (p->host_layers > 0) plan_add(&b, "layer_inputs_host", N * d * 2, p->host_layers, MEM_HOST);
    if (mst_kept_layers(s)) plan_attention_acts(&b, c, s, N, mst_kept_layers(s), MEM_ACTIVATIONS, 0, "kept_");
    if (!s->recompute) {
        plan_attention_acts(&b, c, s, N, L, MEM_ACTIVATIONS, 1, "");
        if (p->mlp_saved) plan_mlp_acts(&b, c, N, L, MEM_ACTIVATIONS);
    }
    plan_add(&b, "tokens", N * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "targets", N * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "embed_unique", N * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "embed_offsets", (N + 1) * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "embed_positions", N * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "scalars", 4 * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "x_final_dresid", N * d * 2, 1, MEM_INTERMEDIATES);
    // Offload staging: layer l's input passes through slot l % 2 (one slot when one layer is offloaded).
    if (p->host_layers > 0) plan_add(&b, "x_offload", N * d * 2, p->host_layers > 1 ? 2 : 1, MEM_INTERMEDIATES);

    plan_share_begin(&b, SHARE_LAYER);
    if (s->recompute) plan_attention_acts(&b, c, s, N, 1, MEM_INTERMEDIATES, 0, "");
    if (s->seq_parallel) plan_sequence_parallel(&b, c, s);
    if (s->attn_bwd_sliced == 1) {  // one head group's dO and packed dq|dk|dv; the full dqkv goes to qkv's buffer
        plan_add(&b, "datt_g", N * (q / (size_t)s->attn_head_groups) * 2, 1, MEM_INTERMEDIATES);
        plan_add(&b, "dqkv_g", N * (qkv / (size_t)s->attn_head_groups) * 2, 1, MEM_INTERMEDIATES);
    } else {
        if (q > d) plan_add(&b, "datt", N * q * 2, 1, MEM_INTERMEDIATES);
        plan_add(&b, "dqkv", N * qkv * 2, 1, MEM_INTERMEDIATES);
    }
    if (c->post_norms) plan_add(&b, "attn_tmp", N * d * 2, 1, MEM_INTERMEDIATES);
    if (!p->mlp_saved) plan_mlp_acts(&b, c, rows, 1, MEM_INTERMEDIATES);
    if (c->post_norms) plan_add(&b, "mlp_tmp", (p->mlp_saved ? N : rows) * d * 2, 1, MEM_INTERMEDIATES);
    if (s->lora.rank) plan_lora_scratch(&b, &lora, N);
    plan_share_begin(&b, SHARE_LMHEAD);
    // Untied optimizer-in-backward: the head's gradient lives from the LM-head pass to its update
    // right after it, and the embedding's from the end of the layers' backward to its update, both
    // times when no layer's working buffers are in use.
    if (s->grad_accum_steps == 1 && !c->tied_embeddings && !s->lora.rank) plan_add(&b, "embed_head_grads", V * d * 4, 1, MEM_GRADIENTS);
    plan_add(&b, "xf", rows * d * 2, 1, MEM_INTERMEDIATES);
    plan_add(&b, "xf_rstd", rows * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "dxf", rows * d * 2, 1, MEM_INTERMEDIATES);
    if (p->vocab_tiles > 1) plan_add(&b, "dxf_acc", rows * d * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "logits", rows * vc * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "dlogits", rows * vc * 2, 1, MEM_INTERMEDIATES);
    plan_add(&b, "ce_max", rows * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "ce_sum", rows * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "ce_target", rows * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "ce_lse", rows * 4, 1, MEM_INTERMEDIATES);
    plan_add(&b, "losses", N * 4, 1, MEM_INTERMEDIATES);
    plan_share_end(&b);

    plan_add(&b, "attn_workspace", mst_attn_workspace_of(fig, s), 1, MEM_WORKSPACE);
    plan_add(&b, "reduce_scratch", fig->reduce_scratch, 1, MEM_WORKSPACE);

    p->device_total = b.device_cursor;
    p->host_total = b.host_cursor;
    p->device_external = fig->matmul_workspace;
    for (int i = 0; i < p->n_entries; i++) {
        if (p->entries[i].share == SHARE_NONE) p->category_bytes[p->entries[i].category] += p->entries[i].bytes;
    }
    p->category_bytes[MEM_INTERMEDIATES] += p->shared_bytes;
}

// Pinned host memory the planner may use by default: all but 16 GiB of the machine's memory (the
// operating system, the loader's buffers, the host copy of the weights), and at least 3/4 of it.
// On the 125 GiB device machine that is 109 GiB: Llama-3-8B's 32 layer inputs at S = 384K take 96.
static inline size_t mst_default_host_budget(size_t physical_bytes) {
    size_t quarter_off = physical_bytes / 4 * 3, keep = (size_t)16 << 30;
    size_t all_but = physical_bytes > keep ? physical_bytes - keep : 0;
    return all_but > quarter_off ? all_but : quarter_off;
}

// The entry called `name`, or NULL.
static inline const PlanEntry *mst_plan_find(const MemoryPlan *p, const char *name) {
    for (int i = 0; i < p->n_entries; i++) {
        if (strcmp(p->entries[i].name, name) == 0) return &p->entries[i];
    }
    return NULL;
}

static inline int mst_plan_fits(const MemoryPlan *p, size_t device_budget, size_t host_budget) {
    return p->device_total + p->device_external <= device_budget && p->host_total <= host_budget;
}

// ---- choosing settings that fit ----

// Kernel figures at another sequence length: the O(S) ones scale linearly (used for hints only).
static inline MstKernelFigures mst_figures_rescale(const MstKernelFigures *f, int S_from, int S_to) {
    MstKernelFigures g = *f;
    g.attn_workspace = (size_t)((double)f->attn_workspace * S_to / S_from) + 1;
    for (int k = 0; k < 3; k++) {
        if (f->attn_workspace_grouped[k]) g.attn_workspace_grouped[k] = (size_t)((double)f->attn_workspace_grouped[k] * S_to / S_from) + 1;
        if (f->attn_workspace_sliced[k]) g.attn_workspace_sliced[k] = (size_t)((double)f->attn_workspace_sliced[k] * S_to / S_from) + 1;
    }
    g.reduce_scratch = (size_t)((double)f->reduce_scratch * S_to / S_from) + 1;
    return g;
}

// Candidate chunk counts, ascending: the given M, or 1, 2, 4, ... and N itself.
static inline int plan_m_candidates(const MstSettings *s, int *out, int max_out) {
    int N = s->B * s->S, n = 0;
    if (s->mst_chunks > 0) { out[0] = s->mst_chunks; return 1; }
    for (long m = 1; m < N && n < max_out - 1; m *= 2) out[n++] = (int)m;
    out[n++] = N;
    return n;
}

// Candidate vocabulary chunks, descending: the given one, or V, then about V/2, V/4, ... rounded up
// to multiples of 128, down to 128.
static inline int plan_vc_candidates(const ModelConfig *c, const MstSettings *s, int *out, int max_out) {
    int V = c->vocab_size, n = 0;
    if (s->vocab_chunk > 0) { out[0] = s->vocab_chunk; return 1; }
    out[n++] = V;
    for (long k = 2; k <= V && n < max_out; k *= 2) {
        int vc = (int)mst_ceil_div(mst_ceil_div((size_t)V, (size_t)k), 128) * 128;
        if (vc < out[n - 1]) out[n++] = vc;
        if (vc <= 128) break;
    }
    return n;
}

// The most frugal settings (largest M, smallest vocab chunk, most host layers) for a hint.
static inline MstSettings plan_frugal(const ModelConfig *c, const MstSettings *s, const MstKernelFigures *fig) {
    int ms[64], vcs[64];
    MstSettings f = *s;
    f.mst_chunks = ms[plan_m_candidates(s, ms, 64) - 1];
    f.vocab_chunk = vcs[plan_vc_candidates(c, s, vcs, 64) - 1];
    if (s->offload && s->host_layers == 0) f.host_layers = c->n_layers;
    if (s->attn_head_groups == 0) {  // the most groups offered, the smallest workspace
        f.attn_head_groups = 1;
        for (int G = 2; G <= 8; G *= 2)
            if (mst_head_groups_offered(c, s, fig, G) && mst_attn_workspace(fig, G) < mst_attn_workspace(fig, f.attn_head_groups))
                f.attn_head_groups = G;
    }
    if (s->attn_bwd_sliced == MST_SLICED_AUTO) {  // sliced in the most groups it is offered in, if any
        MstSettings t = f;
        f.attn_bwd_sliced = 0;
        for (int G = 2; G <= 8; G *= 2) {
            t.attn_head_groups = G;
            t.attn_bwd_sliced = 1;
            if ((s->attn_head_groups == 0 || s->attn_head_groups == G) && mst_sliced_offered(c, &t, fig)) f = t;
        }
    }
    return f;
}

// Searches the settings in order of preference (fewest offloaded layers; then one vocabulary tile
// with chunks of at least MST_MIN_TILE_ROWS rows; then fewest chunks M; then the largest vocabulary
// chunk) and keeps the first plan that fits. Returns 1 on success.
static inline int plan_search(MemoryPlan *p, const ModelConfig *c, const MstSettings *s, const MstKernelFigures *fig,
                              size_t device_budget, size_t host_budget) {
    int ms[64], vcs[64];
    int n_m = plan_m_candidates(s, ms, 64), n_vc = plan_vc_candidates(c, s, vcs, 64);
    int N = s->B * s->S;
    int min_rows = N < MST_MIN_TILE_ROWS ? N : MST_MIN_TILE_ROWS;
    int h_lo = 0, h_hi = 0;
    if (s->offload) {
        h_lo = s->host_layers;
        h_hi = s->host_layers > 0 ? s->host_layers : c->n_layers;
    }
    MstSettings t = *s;
    for (int h = h_lo; h <= h_hi; h++) {
        t.host_layers = h;
        for (int pass = 0; pass < 2; pass++) {
            for (int i = 0; i < (pass == 0 ? 1 : n_vc); i++) {
                t.vocab_chunk = vcs[i];
                for (int j = 0; j < n_m; j++) {
                    t.mst_chunks = ms[j];
                    if (pass == 0 && (int)mst_ceil_div((size_t)N, (size_t)ms[j]) < min_rows) continue;
                    mst_plan_build(p, c, &t, fig);
                    if (mst_plan_fits(p, device_budget, host_budget)) return 1;
                }
            }
        }
    }
    return 0;
}

// plan_search with the attention backward in one call, else (auto) in 2, 4, 8 head groups as the
// figures and the kv heads of one GPU's attention offer them: the first that fits. The sliced
// backward (when on, or auto and nothing else fits) in 2, 4, 8 groups after that.
static inline int plan_search_groups(MemoryPlan *p, const ModelConfig *c, const MstSettings *s,
                                     const MstKernelFigures *fig, size_t device_budget, size_t host_budget) {
    MstSettings t = *s;
    for (int sliced = 0; sliced <= 1; sliced++) {
        if (sliced ? s->attn_bwd_sliced == 0 : s->attn_bwd_sliced == 1) continue;
        t.attn_bwd_sliced = sliced;
        for (int G = 1; G <= 8; G *= 2) {
            if (s->attn_head_groups > 0 && G != s->attn_head_groups) continue;
            t.attn_head_groups = G;
            if (sliced ? !mst_sliced_offered(c, &t, fig) : !mst_head_groups_offered(c, s, fig, G)) continue;
            if (plan_search(p, c, &t, fig, device_budget, host_budget)) return 1;
        }
    }
    return 0;
}
// The moment format of a moment_bytes setting, as the plan prints it.
static inline const char *mst_moments_name(int moment_bytes) {
    return moment_bytes == 4 ? "fp32" : moment_bytes == 2 ? "bf16" : "8-bit block-wise";
}

#define MST_GIB(x) ((double)(x) / (1024.0 * 1024.0 * 1024.0))

// A byte count as (value, unit) for "%.2f %s": GiB, MiB, KiB or bytes, whichever reads best.
static inline double mst_human_value(size_t b) {
    return b >= ((size_t)1 << 30) ? MST_GIB(b) : b >= ((size_t)1 << 20) ? (double)b / 1048576.0 : b >= 1024 ? (double)b / 1024.0 : (double)b;
}
static inline const char *mst_human_unit(size_t b) {
    return b >= ((size_t)1 << 30) ? "GiB" : b >= ((size_t)1 << 20) ? "MiB" : b >= 1024 ? "KiB" : "bytes";
}
#define MST_HUMAN(x) mst_human_value(x), mst_human_unit(x)

// Recompute auto: the plan without recompute at the chunking asked for, or else at M = 1 and one
// vocabulary tile (the standard transformer, the fastest step), in any head grouping the figures
// offer, when nothing asks for recompute (offload, the sliced backward, kept attention layers).
// Returns 1 with that plan in p when it fits. With M > 1 and no recompute the step is no faster than
// recompute with kept attention layers (H100, Llama-3-8B at 8K and 16K), which fits longer sequences.
static inline int plan_standard_fits(MemoryPlan *p, const ModelConfig *c, const MstSettings *s, const MstKernelFigures *fig,
                                     size_t device_budget, size_t host_budget) {
    if (s->offload || s->attn_bwd_sliced == 1 || s->attn_kept_layers > 0) return 0;
    MstSettings t = *s;
    t.recompute = 0;
    t.attn_kept_layers = 0;
    t.attn_bwd_sliced = 0;
    if (t.mst_chunks == 0) t.mst_chunks = 1;
    if (t.vocab_chunk == 0) t.vocab_chunk = c->vocab_size;
    return plan_search_groups(p, c, &t, fig, device_budget, host_budget);
}

// With the plan p that fits, the most layers (up to all) that can keep their attention activations
// within the budgets, the other settings as p's: p is rebuilt with them. Each kept layer saves the
// recompute of its attention part (norm, q|k|v, attention forward, o-projection) in the backward.
static inline void plan_keep_most_attention(MemoryPlan *p, const ModelConfig *c, const MstKernelFigures *fig,
                                            size_t device_budget, size_t host_budget) {
    MstSettings t = p->settings;
    int lo = 0, hi = c->n_layers;  // lo fits (p itself); find the largest that does
    MemoryPlan tmp;
    while (lo < hi) {
        int mid = lo + (hi - lo + 1) / 2;
        t.attn_kept_layers = mid;
        mst_plan_build(&tmp, c, &t, fig);
        if (mst_plan_fits(&tmp, device_budget, host_budget)) lo = mid; else hi = mid - 1;
    }
    t.attn_kept_layers = lo;
    mst_plan_build(p, c, &t, fig);
}

// Resolves the auto settings (recompute, mst_chunks, vocab_chunk, host_layers = 0, kept attention
// layers) to the highest-throughput choice that fits device_budget (arena + cuBLASLt workspace) and
// host_budget (pinned memory): recompute off when the standard transformer fits; else the chunking,
// head groups and offload first, as if no layer kept its attention activations, then as many kept
// layers as the memory left allows.
// Returns 1 with the plan, or 0 with a message in msg: the breakdown of the most frugal plan, the
// longest sequence that fits with these settings, and the settings changes that would make it fit.
static inline int mst_plan_auto(MemoryPlan *p, const ModelConfig *c, const MstSettings *s, const MstKernelFigures *fig,
                                size_t device_budget, size_t host_budget, char *msg, size_t msg_len) {
    msg[0] = '\0';
    const char *err = mst_settings_check(c, s, msg, msg_len);
    if (err) return 0;
    if (s->recompute == MST_RECOMPUTE_AUTO) {
        if (plan_standard_fits(p, c, s, fig, device_budget, host_budget)) return 1;
        MstSettings t = *s;
        t.recompute = 1;
        return mst_plan_auto(p, c, &t, fig, device_budget, host_budget, msg, msg_len);
    }
    // Auto kept attention layers take only what is left: everything below plans none, and a plan
    // that fits then gets as many as its budgets allow.
    int keep_auto = s->attn_kept_layers == MST_KEPT_AUTO;
    MstSettings none_kept = *s;
    if (keep_auto) none_kept.attn_kept_layers = 0;
    s = &none_kept;
    if (plan_search_groups(p, c, s, fig, device_budget, host_budget)) {
        if (keep_auto && s->recompute) plan_keep_most_attention(p, c, fig, device_budget, host_budget);
        return 1;
    }

    MstSettings f = plan_frugal(c, s, fig);
    mst_plan_build(p, c, &f, fig);
    snprintf(msg, msg_len,
             "does not fit: B=%d S=%d needs %.2f %s on the device (arena %.2f %s + cuBLASLt %.2f %s) and %.2f %s pinned host "
             "even with M=%d, vocab chunk %d, %d offloaded layers; budget %.2f %s device, %.2f %s host.\n  breakdown:",
             s->B, mst_full_seq(s), MST_HUMAN(p->device_total + p->device_external), MST_HUMAN(p->device_total),
             MST_HUMAN(p->device_external), MST_HUMAN(p->host_total), f.mst_chunks, f.vocab_chunk, p->host_layers,
             MST_HUMAN(device_budget), MST_HUMAN(host_budget));
    for (int k = 0; k < MEM_CATEGORY_COUNT; k++) appendf(msg, msg_len, " %s %.2f %s%s", mst_category_name(k), MST_HUMAN(p->category_bytes[k]), k + 1 < MEM_CATEGORY_COUNT ? "," : "\n");

    // Longest sequence that fits with these settings (binary search on S, each S with the full
    // search: with offload the host budget can bind before the device's, and then fewer offloaded
    // layers than the frugal choice's all of them fit a longer sequence).
    int lo = 0, hi = s->S;
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        MstSettings t = *s;
        t.S = mid;
        if (t.mst_chunks > t.B * mid) t.mst_chunks = t.B * mid;
        MstKernelFigures g = mst_figures_rescale(fig, s->S, mid);
        MemoryPlan tmp;
        if (plan_search_groups(&tmp, c, &t, &g, device_budget, host_budget)) lo = mid; else hi = mid;
    }
    if (lo > 0) appendf(msg, msg_len, "  with these settings the longest sequence that fits is about S=%d (B=%d)\n", lo * (mst_full_seq(s) / s->S), s->B);
    else appendf(msg, msg_len, "  with these settings nothing fits, not even S=1 (the weights and optimizer state alone are too large)\n");

    // Single settings changes that would make it fit.
    struct { const char *what; MstSettings t; } alt[8];
    int n_alt = 0;
    if (mst_kept_layers(s)) { alt[n_alt].what = "no layer keeping its attention activations (--keep-attn auto)"; alt[n_alt].t = *s; alt[n_alt].t.attn_kept_layers = 0; n_alt++; }
    if (!s->recompute) { alt[n_alt].what = "recompute on"; alt[n_alt].t = *s; alt[n_alt].t.recompute = 1; n_alt++; }
    if (!s->offload) { alt[n_alt].what = "recompute + offload on"; alt[n_alt].t = *s; alt[n_alt].t.recompute = 1; alt[n_alt].t.offload = 1; alt[n_alt].t.host_layers = 0; n_alt++; }
    if (s->moment_bytes == 4) { alt[n_alt].what = "bf16 optimizer moments"; alt[n_alt].t = *s; alt[n_alt].t.moment_bytes = 2; n_alt++; }
    if (s->moment_bytes > 1 && mst_ranks(s) == 1 && !s->lora.rank) { alt[n_alt].what = "8-bit optimizer moments (--optimizer adamw8bit)"; alt[n_alt].t = *s; alt[n_alt].t.moment_bytes = 1; n_alt++; }
    if (s->master_weights) { alt[n_alt].what = "no fp32 master weights"; alt[n_alt].t = *s; alt[n_alt].t.master_weights = 0; n_alt++; }
    if (s->grad_accum_steps > 1) { alt[n_alt].what = "grad_accum_steps=1 (optimizer in backward)"; alt[n_alt].t = *s; alt[n_alt].t.grad_accum_steps = 1; n_alt++; }
    int any = 0;
    for (int i = 0; i < n_alt; i++) {
        MemoryPlan tmp;
        if (plan_search_groups(&tmp, c, &alt[i].t, fig, device_budget, host_budget)) {
            appendf(msg, msg_len, "  it would fit with %s (M=%d, vocab chunk %d, %d offloaded layers)\n", alt[i].what, tmp.settings.mst_chunks, tmp.settings.vocab_chunk, tmp.host_layers);
            any = 1;
        }
    }
    if (!any) appendf(msg, msg_len, "  no single change of recompute/offload/moments/master/accumulation/kept attention makes it fit at this S\n");
    return 0;
}

// ---- the memory of one training step over time ----
//
// The arena is allocated once, so the device memory in use is flat during a step; what changes is
// which planned buffers hold data that is still to be read. The timeline walks one training micro
// step (the last one with gradient accumulation) phase by phase, in the order gpu_model.cu runs it:
//   embedding fwd; per layer: attention fwd, MLP fwd (all M chunks: one chunk's buffers live);
//   LM head + loss (fwd and bwd over every token chunk and vocabulary tile); the untied head's
//   AdamW (optimizer-in-backward); per layer in reverse: recompute (with recompute, unless the layer
//   keeps its attention activations), MLP bwd,
//   attention bwd (+ the layer's AdamW with optimizer-in-backward); embedding bwd; optimizer (the
//   embedding and final norm with optimizer-in-backward, else the full AdamW step).
// A buffer is live from the phase that writes it to the last phase that reads it:
//   always         weights, optimizer state, full-model / final-norm gradients and norm partials,
//                  the batch (tokens, targets, embedding-backward index)
//   layer input l  from its write (embedding, or layer l-1's MLP) to layer l's attention bwd; the
//                  same for its pinned host slot when offloaded
//   saved acts     (no recompute, or a layer that keeps its attention activations: kept_*) layer l's
//                  attention part from its attention fwd to its attention bwd; its MLP buffers
//                  (M = 1, no recompute) from its MLP fwd to its MLP bwd
//   x_final/dresid from the last layer's MLP fwd to the embedding bwd
//   staging X[s]   an offloaded layer's input: in the forward while that layer runs, in the backward
//                  while it or the layer after it runs (prefetch), and over the LM head for layer L-1
//   layer working  attention part (recompute): attention fwd, recompute, MLP and attention bwd, and
//   set            h1 also in the MLP fwd; MLP chunk: MLP fwd and bwd; gradients of the attention
//                  (dqkv, datt): attention bwd; one layer's gradients: the layer's backward
//   LM-head set    the LM head phase; an untied embedding/head gradient also at the head update,
//                  the embedding bwd and the optimizer (tied: from the LM head to the optimizer)
//   LoRA           adapters, their B blocks and full gradients, the quantized base and its one
//                  dequantized layer (it keeps the last layer loaded): always; the adapter input
//                  products u: every layer phase; one layer's adapter gradients, du, dB_blk: its backward
//   workspace      cuDNN's in the attention phases; the reduction scratch in the norm backwards
// Bytes are counted by each entry's own category (unlike plan.category_bytes, which counts the
// shared region as intermediates), over the arena only (not the cuBLASLt workspace).

typedef enum {
    PHASE_EMBED_FWD, PHASE_ATTN_FWD, PHASE_MLP_FWD, PHASE_LM_HEAD, PHASE_HEAD_UPDATE, PHASE_RECOMPUTE,
    PHASE_MLP_BWD, PHASE_ATTN_BWD, PHASE_EMBED_BWD, PHASE_OPTIMIZER, PHASE_KIND_COUNT
} MstPhaseKind;

typedef struct {
    int kind;                          // MstPhaseKind
    int layer;                         // the layer of a layer phase, else -1
    size_t bytes[MEM_CATEGORY_COUNT];  // live bytes by entry category (MEM_HOST: pinned host)
    size_t device;                     // live device bytes: every category but MEM_HOST
} MstPhase;

static inline const char *mst_phase_id(int kind) {
    static const char *ids[PHASE_KIND_COUNT] = {"embed_fwd", "attn_fwd", "mlp_fwd", "lm_head", "head_update",
                                                "recompute", "mlp_bwd", "attn_bwd", "embed_bwd", "optimizer"};
    return (kind >= 0 && kind < PHASE_KIND_COUNT) ? ids[kind] : "?";
}

static inline int mst_plan_layers(const MemoryPlan *p) { return p->host_layers + p->device_layers; }
static inline int mst_plan_untied_opt_in_backward(const MemoryPlan *p) {
    const PlanEntry *e = mst_plan_find(p, "embed_head_grads");
    return e != NULL && e->share == SHARE_LMHEAD;
}

// Phases of one micro step: 4 + 4 L, one recompute phase per layer whose attention part is
// recomputed, plus the untied head's update.
static inline int mst_timeline_length(const MemoryPlan *p) {
    int L = mst_plan_layers(p), recomputed = 0;
    for (int l = 0; l < L; l++) recomputed += mst_attn_recomputed(&p->settings, L, l);
    return 4 + mst_plan_untied_opt_in_backward(p) + 4 * L + recomputed;
}

static inline int phase_is_backward(int kind) { return kind >= PHASE_RECOMPUTE && kind <= PHASE_EMBED_BWD; }

// Sets of phase kinds, as bit masks.
#define PHASE_BIT(kind) (1u << (kind))
#define PHASES_ATTENTION (PHASE_BIT(PHASE_ATTN_FWD) | PHASE_BIT(PHASE_RECOMPUTE) | PHASE_BIT(PHASE_ATTN_BWD))
#define PHASES_LAYER_BWD (PHASE_BIT(PHASE_RECOMPUTE) | PHASE_BIT(PHASE_MLP_BWD) | PHASE_BIT(PHASE_ATTN_BWD))
#define PHASES_LAYER (PHASE_BIT(PHASE_ATTN_FWD) | PHASE_BIT(PHASE_MLP_FWD) | PHASES_LAYER_BWD)
#define PHASES_NORM_BWD (PHASE_BIT(PHASE_LM_HEAD) | PHASE_BIT(PHASE_MLP_BWD) | PHASE_BIT(PHASE_ATTN_BWD))
#define PHASES_EMBED_HEAD_GRAD (PHASE_BIT(PHASE_LM_HEAD) | PHASE_BIT(PHASE_HEAD_UPDATE) | PHASE_BIT(PHASE_EMBED_BWD) | PHASE_BIT(PHASE_OPTIMIZER))
static inline int phase_in(int kind, unsigned mask) { return (int)((mask >> kind) & 1u); }

// 1 when layer i's input (written by the embedding or layer i-1's MLP) holds data at the phase.
static inline int layer_input_live(int i, int kind, int layer) {
    if (kind == PHASE_EMBED_FWD) return i == 0;
    if (kind == PHASE_ATTN_FWD) return i <= layer;
    if (kind == PHASE_MLP_FWD) return i <= layer + 1;
    if (kind == PHASE_LM_HEAD || kind == PHASE_HEAD_UPDATE) return 1;
    return phase_is_backward(kind) && i <= layer;  // released after layer i's attention bwd
}

// 1 when layer i's saved attention activations (kind_written = PHASE_ATTN_FWD, released after its
// attention bwd) or saved MLP activations (PHASE_MLP_FWD, released after its MLP bwd) hold data.
static inline int saved_act_live(int i, int kind_written, int kind, int layer) {
    if (kind == PHASE_ATTN_FWD || kind == PHASE_MLP_FWD) return i < layer || (i == layer && kind >= kind_written);
    if (kind == PHASE_LM_HEAD || kind == PHASE_HEAD_UPDATE) return 1;
    if (!phase_is_backward(kind) || kind == PHASE_EMBED_BWD) return 0;
    if (kind_written == PHASE_MLP_FWD) return i < layer || (i == layer && kind <= PHASE_MLP_BWD);
    return i <= layer;
}

// Staging slots holding an offloaded layer's input at the phase (see the liveness list above).
static inline int staging_live(const MemoryPlan *p, int kind, int layer) {
    int H = p->host_layers, L = mst_plan_layers(p), n = 0;
    if (kind == PHASE_EMBED_FWD) return H > 0;
    if (kind == PHASE_ATTN_FWD) return layer < H;
    if (kind == PHASE_MLP_FWD) return (layer < H) + (layer + 1 < H);
    if (kind == PHASE_LM_HEAD || kind == PHASE_HEAD_UPDATE) return L - 1 < H;
    if (!phase_is_backward(kind) || kind == PHASE_EMBED_BWD) return 0;
    n = layer < H;
    if (layer > 0 && layer - 1 < H) n++;  // the prefetch of layer l-1
    return n;
}

static inline int name_in(const char *name, const char *const *list) {
    for (; *list; list++) if (strcmp(name, *list) == 0) return 1;
    return 0;
}

// Slices of entry e that hold live data during phase (kind, layer). Dies on an entry without a rule
// (a new plan entry must say when it is live).
static inline int mst_entry_live(const MemoryPlan *p, const PlanEntry *e, int kind, int layer) {
    static const char *const always[] = {"params", "rope_cos_sin", "adam_m", "adam_v", "adam_m_absmax", "adam_v_absmax",
                                         "master", "grads", "final_norm_grads", "grad_norm_partials", "tokens", "targets",
                                         "embed_unique", "embed_offsets", "embed_positions", "scalars", "grad_shard", "qbase",
                                         "qbase_layer", "lora_params", "lora_bblk_qkv", "lora_bblk_gate_up", "lora_grads", NULL};
    static const char *const attn_acts[] = {"ln1", "ln1_rstd", "qkv", "att", "att_stats", "h1", "ao", "ao_rstd",
                                             "qkv_heads", "att_heads", NULL};
    static const char *const mlp_acts[] = {"ln2", "ln2_rstd", "gate_up", "glu", "dn", "dn_rstd", NULL};
    static const char *const lm_head_set[] = {"xf", "xf_rstd", "dxf", "dxf_acc", "logits", "dlogits", "ce_max", "ce_sum",
                                              "ce_target", "ce_lse", "losses", NULL};
    const char *n = e->name;
    int saved = e->share == SHARE_NONE, live = 0;
    if (name_in(n, always)) return e->count;
    if (strncmp(n, "kept_", 5) == 0 && name_in(n + 5, attn_acts)) {  // slice j: layer L - count + j
        int first = mst_plan_layers(p) - e->count;
        for (int j = 0; j < e->count; j++) live += saved_act_live(first + j, PHASE_ATTN_FWD, kind, layer);
        return live;
    }
    if (strcmp(n, "layer_inputs") == 0 || strcmp(n, "layer_inputs_host") == 0) {
        int first = strcmp(n, "layer_inputs") == 0 ? p->host_layers : 0;  // layer of slice 0
        for (int j = 0; j < e->count; j++) live += layer_input_live(first + j, kind, layer);
        return live;
    }
    if (name_in(n, attn_acts) || name_in(n, mlp_acts)) {
        int written = name_in(n, attn_acts) ? PHASE_ATTN_FWD : PHASE_MLP_FWD;
        if (saved) {
            for (int j = 0; j < e->count; j++) live += saved_act_live(j, written, kind, layer);
            return live;
        }
        if (written == PHASE_MLP_FWD) return kind == PHASE_MLP_FWD || kind == PHASE_MLP_BWD;
        if (layer >= mst_plan_layers(p) - mst_kept_layers(&p->settings)) return 0;  // a kept layer has its own (kept_*)
        if (strcmp(n, "h1") == 0 && kind == PHASE_MLP_FWD) return 1;
        return phase_in(kind, PHASES_ATTENTION | PHASE_BIT(PHASE_MLP_BWD));
    }
    if (name_in(n, lm_head_set)) return kind == PHASE_LM_HEAD;
    if (strcmp(n, "x_final_dresid") == 0)
        return (kind == PHASE_MLP_FWD && layer == mst_plan_layers(p) - 1) || kind == PHASE_LM_HEAD ||
               kind == PHASE_HEAD_UPDATE || phase_is_backward(kind);
    if (strcmp(n, "x_offload") == 0) {
        int s = staging_live(p, kind, layer);
        return s < e->count ? s : e->count;
    }
    // two buffers (side stream): one is still read by the previous layer's update while backward fills the other
    if (strcmp(n, "layer_grads") == 0) return phase_in(kind, PHASES_LAYER_BWD) ? e->count : 0;
    if (strcmp(n, "lora_layer_grads") == 0) return phase_in(kind, PHASES_LAYER_BWD);
    if (strcmp(n, "lora_u") == 0) return phase_in(kind, PHASES_LAYER);
    if (strcmp(n, "lora_du") == 0 || strcmp(n, "lora_dbblk") == 0) return phase_in(kind, PHASES_LAYER_BWD);
    if (strcmp(n, "embed_head_grads") == 0) {
        if (saved) return kind >= PHASE_LM_HEAD;  // tied: the head's gradient, then the embedding's added
        return phase_in(kind, PHASES_EMBED_HEAD_GRAD);
    }
    if (strcmp(n, "dqkv") == 0 || strcmp(n, "datt") == 0) return kind == PHASE_ATTN_BWD;
    if (strcmp(n, "datt_heads") == 0 || strcmp(n, "dqkv_heads") == 0) return kind == PHASE_ATTN_BWD;
    if (strcmp(n, "datt_g") == 0 || strcmp(n, "dqkv_g") == 0) return kind == PHASE_ATTN_BWD;
    if (strcmp(n, "a2a_send") == 0 || strcmp(n, "a2a_recv") == 0) return phase_in(kind, PHASES_ATTENTION);
    if (strcmp(n, "attn_tmp") == 0) return phase_in(kind, PHASES_ATTENTION);
    if (strcmp(n, "mlp_tmp") == 0) return kind == PHASE_MLP_FWD || kind == PHASE_MLP_BWD;
    if (strcmp(n, "attn_workspace") == 0) return phase_in(kind, PHASES_ATTENTION);
    if (strcmp(n, "reduce_scratch") == 0) return phase_in(kind, PHASES_NORM_BWD);
    die("memory timeline: no liveness rule for plan entry '%s'", n);
    return 0;
}

static inline void timeline_add(const MemoryPlan *p, MstPhase *out, int *n, int kind, int layer) {
    MstPhase *ph = &out[(*n)++];
    memset(ph, 0, sizeof(*ph));
    ph->kind = kind;
    ph->layer = layer;
    for (int i = 0; i < p->n_entries; i++) {
        const PlanEntry *e = &p->entries[i];
        ph->bytes[e->category] += (size_t)mst_entry_live(p, e, kind, layer) * e->slice_bytes;
    }
    for (int k = 0; k < MEM_CATEGORY_COUNT; k++) if (k != MEM_HOST) ph->device += ph->bytes[k];
}

// Fills out[0 .. mst_timeline_length(p)) with the phases of one micro step. Returns their number.
static inline int mst_timeline(const MemoryPlan *p, MstPhase *out) {
    int L = mst_plan_layers(p), n = 0;
    timeline_add(p, out, &n, PHASE_EMBED_FWD, -1);
    for (int l = 0; l < L; l++) {
        timeline_add(p, out, &n, PHASE_ATTN_FWD, l);
        timeline_add(p, out, &n, PHASE_MLP_FWD, l);
    }
    timeline_add(p, out, &n, PHASE_LM_HEAD, -1);
    if (mst_plan_untied_opt_in_backward(p)) timeline_add(p, out, &n, PHASE_HEAD_UPDATE, -1);
    for (int l = L - 1; l >= 0; l--) {
        if (mst_attn_recomputed(&p->settings, L, l)) timeline_add(p, out, &n, PHASE_RECOMPUTE, l);
        timeline_add(p, out, &n, PHASE_MLP_BWD, l);
        timeline_add(p, out, &n, PHASE_ATTN_BWD, l);
    }
    timeline_add(p, out, &n, PHASE_EMBED_BWD, -1);
    timeline_add(p, out, &n, PHASE_OPTIMIZER, -1);
    return n;
}

// The phase where the most device bytes are live (its index in the timeline) and those bytes.
static inline size_t mst_timeline_peak(const MemoryPlan *p, MstPhase *at) {
    int n = mst_timeline_length(p);
    MstPhase *ph = (MstPhase *)mallocCheck((size_t)n * sizeof(MstPhase));
    mst_timeline(p, ph);
    int best = 0;
    for (int i = 1; i < n; i++) if (ph[i].device > ph[best].device) best = i;
    *at = ph[best];
    free(ph);
    return at->device;
}

// Prints the plan: one row per entry (MiB, category, region), then totals per category.
static inline void mst_plan_print(const MemoryPlan *p, FILE *f) {
    const MstSettings *s = &p->settings;
    fprintf(f, "memory plan: B=%d S=%d | M=%d (%d chunks of %d rows) | vocab chunk %d (%d tile%s, %s) | recompute %s | "
               "offload %s (%d of %d layer inputs on the host) | %s | moments %s%s%s\n",
            s->B, mst_full_seq(s), s->mst_chunks, p->n_chunks, p->chunk_rows, s->vocab_chunk, p->vocab_tiles,
            p->vocab_tiles == 1 ? "" : "s", p->vocab_tiles == 1 ? "one pass" : "two passes", s->recompute ? "on" : "off",
            s->offload ? "on" : "off", p->host_layers, p->host_layers + p->device_layers,
            s->grad_accum_steps > 1 ? "gradient accumulation (fp32 full-model gradients)" : "optimizer in backward (fp32 gradients of one layer)",
            mst_moments_name(s->moment_bytes), s->master_weights ? " + fp32 master weights" : "",
            s->attn_head_groups == 2 ? " | attention backward in 2 head groups"
            : s->attn_head_groups == 4 ? " | attention backward in 4 head groups"
            : s->attn_head_groups == 8 ? " | attention backward in 8 head groups" : "");
    if (mst_kept_layers(s))
        fprintf(f, "  kept attention: the last %d of %d layers keep their attention activations (kept_*); the backward "
                   "recomputes the attention part of the other %d only\n", mst_kept_layers(s), mst_plan_layers(p),
                mst_plan_layers(p) - mst_kept_layers(s));
    if (s->attn_bwd_sliced == 1)
        fprintf(f, "  sliced attention backward: one head group's dO and dq|dk|dv at a time (datt_g, dqkv_g); dq|dk|dv "
                   "go back into q|k|v's buffer, the normed input is recomputed into att's\n");
    if (s->lora.rank) {
        char targets[64];
        lora_targets_string(s->lora.targets, targets, sizeof(targets));
        fprintf(f, "  LoRA rank %d on %s: frozen base (%s), gradients and optimizer state of the adapters only\n",
                s->lora.rank, targets, s->lora.base_quant == BASE_QUANT_NONE ? "bf16" : base_quant_name(s->lora.base_quant));
    }
    if (s->grad_accum_steps == 1 && s->overlap_optimizer && mst_ranks(s) == 1)
        fprintf(f, "  overlapped optimizer: a layer's AdamW runs on a side stream during the backward of the layer below\n");
    if (mst_ranks(s) > 1) {
        if (s->seq_parallel) fprintf(f, "  %d GPUs, sequence parallel: this GPU holds %d of the %d tokens of every row (B=%d)", s->ranks, s->S, mst_full_seq(s), s->B);
        else fprintf(f, "  %d GPUs, data parallel: this GPU trains %d of the %d rows of a batch", s->ranks, s->B, s->B * s->ranks);
        fprintf(f, "; ZeRO: it keeps 1/%d of the optimizer state and updates that part of the weights\n", s->ranks);
    }
    fprintf(f, "  %-20s %12s  %-13s %s\n", "buffer", "MiB", "category", "region");
    for (int i = 0; i < p->n_entries; i++) {
        const PlanEntry *e = &p->entries[i];
        char region[48];
        if (e->category == MEM_HOST) snprintf(region, sizeof(region), "pinned host");
        else if (e->share == SHARE_LAYER) snprintf(region, sizeof(region), "shared: layer working set");
        else if (e->share == SHARE_LMHEAD) snprintf(region, sizeof(region), "shared: LM-head working set");
        else snprintf(region, sizeof(region), "arena");
        char name[48];
        if (e->count > 1) snprintf(name, sizeof(name), "%s x%d", e->name, e->count);
        else snprintf(name, sizeof(name), "%s", e->name);
        fprintf(f, "  %-20s %12.1f  %-13s %s\n", name, (double)e->bytes / (1024.0 * 1024.0), mst_category_name(e->category), region);
    }
    fprintf(f, "  totals:");
    for (int k = 0; k < MEM_CATEGORY_COUNT; k++) fprintf(f, " %s %.2f GiB%s", mst_category_name(k), MST_GIB(p->category_bytes[k]), k + 1 < MEM_CATEGORY_COUNT ? "," : "\n");
    fprintf(f, "  device: arena %.2f GiB (shared working region %.2f GiB) + cuBLASLt workspace %.2f GiB = %.2f GiB; pinned host %.2f GiB\n",
            MST_GIB(p->device_total), MST_GIB(p->shared_bytes), MST_GIB(p->device_external),
            MST_GIB(p->device_total + p->device_external), MST_GIB(p->host_total));
    MstPhase at;
    mst_timeline_peak(p, &at);
    fprintf(f, "  one step: live data peaks at %.2f GiB of the %.2f GiB arena (%s", MST_GIB(at.device),
            MST_GIB(p->device_total), mst_phase_id(at.kind));
    if (at.layer >= 0) fprintf(f, ", layer %d", at.layer);
    fprintf(f, "); the other buffers are used at other times\n");
}

// The plan as one JSON object: settings, budgets, totals by category, every entry, and the timeline
// of one step (bytes, exact integers). `model` names the config; `fits` whether it fits the budgets.
static inline void mst_plan_write_json(const MemoryPlan *p, const ModelConfig *c, const char *model, size_t device_budget,
                                       size_t host_budget, int fits, FILE *f) {
    const MstSettings *s = &p->settings;
    static const char *const regions[] = {"arena", "shared: layer working set", "shared: LM-head working set"};
    fprintf(f, "{\"format\": \"mst-memory-plan\", \"version\": 1, \"model\": \"");
    for (const char *q = model; *q; q++) {
        if (*q == '"' || *q == '\\') fputc('\\', f);
        if ((unsigned char)*q >= 0x20) fputc(*q, f);
    }
    fprintf(f, "\", \"family\": \"%s\",\n \"config\": {\"vocab\": %d, \"d_model\": %d, \"n_layers\": %d, \"n_heads\": %d, "
               "\"n_kv_heads\": %d, \"head_dim\": %d, \"d_ff\": %d, \"tied_embeddings\": %d},\n",
            family_name(c->family), c->vocab_size, c->d_model, c->n_layers, c->n_heads, c->n_kv_heads, c->head_dim,
            c->d_ff, c->tied_embeddings);
    fprintf(f, " \"settings\": {\"B\": %d, \"S\": %d, \"M\": %d, \"chunk_rows\": %d, \"vocab_chunk\": %d, \"vocab_tiles\": %d, "
               "\"recompute\": %d, \"attn_kept_layers\": %d, \"offload\": %d, \"host_layers\": %d, \"grad_accum\": %d, "
               "\"moment_bytes\": %d, \"master_weights\": %d},\n",
            s->B, s->S, s->mst_chunks, p->chunk_rows, s->vocab_chunk, p->vocab_tiles, s->recompute, mst_kept_layers(s),
            s->offload, p->host_layers, s->grad_accum_steps, s->moment_bytes, s->master_weights);
    fprintf(f, " \"fits\": %s, \"device_budget\": %zu, \"host_budget\": %zu, \"device_total\": %zu, \"device_external\": %zu, "
               "\"host_total\": %zu, \"shared_bytes\": %zu,\n \"categories\": {",
            fits ? "true" : "false", device_budget, host_budget, p->device_total, p->device_external, p->host_total,
            p->shared_bytes);
    for (int k = 0; k < MEM_CATEGORY_COUNT; k++) fprintf(f, "%s\"%s\": %zu", k ? ", " : "", mst_category_name(k), p->category_bytes[k]);
    fprintf(f, "},\n \"entries\": [\n");
    for (int i = 0; i < p->n_entries; i++) {
        const PlanEntry *e = &p->entries[i];
        fprintf(f, "  {\"name\": \"%s\", \"category\": \"%s\", \"region\": \"%s\", \"count\": %d, \"slice_bytes\": %zu, "
                   "\"bytes\": %zu, \"offset\": %zu}%s\n",
                e->name, mst_category_name(e->category), e->category == MEM_HOST ? "pinned host" : regions[e->share],
                e->count, e->slice_bytes, e->bytes, e->offset, i + 1 < p->n_entries ? "," : "");
    }
    int n = mst_timeline_length(p);
    MstPhase *ph = (MstPhase *)mallocCheck((size_t)n * sizeof(MstPhase));
    mst_timeline(p, ph);
    fprintf(f, " ],\n \"timeline\": [\n");
    for (int i = 0; i < n; i++) {
        fprintf(f, "  {\"phase\": \"%s\", \"layer\": %d, \"device\": %zu, \"bytes\": {", mst_phase_id(ph[i].kind), ph[i].layer,
                ph[i].device);
        for (int k = 0; k < MEM_CATEGORY_COUNT; k++) fprintf(f, "%s\"%s\": %zu", k ? ", " : "", mst_category_name(k), ph[i].bytes[k]);
        fprintf(f, "}}%s\n", i + 1 < n ? "," : "");
    }
    fprintf(f, " ]}\n");
    free(ph);
}

// ---- presets: the published Hugging Face configs, for planning without weights ----

static inline void preset_base(ModelConfig *c, int family, int V, int d, int L, int H, int KV, int hd, int F, int max_pos,
                               float eps, float theta) {
    memset(c, 0, sizeof(*c));
    c->family = family;
    c->vocab_size = V;
    c->d_model = d;
    c->n_layers = L;
    c->n_heads = H;
    c->n_kv_heads = KV;
    c->head_dim = hd;
    c->d_ff = F;
    c->max_pos = max_pos;
    c->activation = ACT_SILU;
    c->sliding_period = 1;
    c->norm_eps = eps;
    c->rope_theta = theta;
    c->query_scale = 1.0f / sqrtf((float)hd);
    c->embed_scale = 1.0f;
}

static const char *const MST_PRESETS[] = {"llama3-8b", "llama2-7b", "mistral-7b", "qwen2-7b", "gemma2-9b"};
#define MST_PRESET_COUNT 5

// Fills `out` with the named preset's config. Returns 1, or 0 for an unknown name.
static inline int mst_preset(const char *name, ModelConfig *out) {
    if (strcmp(name, "llama3-8b") == 0) {  // Meta-Llama-3.1-8B (Llama-3 RoPE scaling)
        preset_base(out, FAMILY_LLAMA, 128256, 4096, 32, 32, 8, 128, 14336, 131072, 1e-5f, 500000.0f);
        out->rope_scaling = ROPE_SCALING_LLAMA3;
        out->rope_factor = 8.0f;
        out->rope_low_freq_factor = 1.0f;
        out->rope_high_freq_factor = 4.0f;
        out->rope_orig_max_pos = 8192;
    } else if (strcmp(name, "llama2-7b") == 0) {
        preset_base(out, FAMILY_LLAMA, 32000, 4096, 32, 32, 32, 128, 11008, 4096, 1e-5f, 10000.0f);
    } else if (strcmp(name, "mistral-7b") == 0) {  // Mistral-7B-v0.1
        preset_base(out, FAMILY_MISTRAL, 32000, 4096, 32, 32, 8, 128, 14336, 32768, 1e-5f, 10000.0f);
        out->sliding_window = 4096;
    } else if (strcmp(name, "qwen2-7b") == 0) {
        preset_base(out, FAMILY_QWEN2, 152064, 3584, 28, 28, 4, 128, 18944, 131072, 1e-6f, 1000000.0f);
        out->qkv_bias = 1;
    } else if (strcmp(name, "gemma2-9b") == 0) {
        preset_base(out, FAMILY_GEMMA2, 256000, 3584, 42, 16, 8, 256, 14336, 8192, 1e-6f, 10000.0f);
        out->tied_embeddings = 1;
        out->norm_offset = 1;
        out->post_norms = 1;
        out->activation = ACT_GELU_TANH;
        out->sliding_window = 4096;
        out->sliding_period = 2;
        out->attn_softcap = 50.0f;
        out->final_softcap = 30.0f;
        out->query_scale = 1.0f / sqrtf(256.0f);
        out->embed_scale = sqrtf(3584.0f);
    } else {
        return 0;
    }
    return 1;
}

// Prints the preset names (for --help).
static inline void mst_preset_list(FILE *f) {
    for (int i = 0; i < MST_PRESET_COUNT; i++) fprintf(f, "%s%s", MST_PRESETS[i], i + 1 < MST_PRESET_COUNT ? ", " : "\n");
}

#endif  // MST_H

// The model on the GPU (see gpu_model.h): host orchestration of the kernels in mst_kernels.cu,
// the GEMMs of matmul.cu and cuDNN attention, over the buffers of the memory plan (mst.h).
//
// One training micro step, N = B*S tokens, chunks of c rows, vocabulary tiles of vc columns:
//   embedding -> x_0
//   layer l: save x_l (device slot, or pinned host slot copied on the side stream)
//            attention part: ln1 = norm(x_l), qkv = ln1 [Wq|Wk|Wv]^T + b, RoPE, SDPA (cuDNN; soft-capped:
//            attention_softcap.cu) -> att,
//            h1 = x_l + att Wo^T (Gemma-2: x_l + post_norm(att Wo^T))
//            MLP in M chunks: out_c = h1_c + mlp(norm(h1_c)) (only one chunk's (c, 2F), (c, F) live)
//   LM head per token chunk: xf = norm(x_L chunk); pass 1 over vocabulary tiles: logits tile
//            (c, vc) fp32, online max / sum-exp / target logit; finalize; pass 2 recomputes each
//            tile (one pass when one tile holds V): dlogits = (softmax - onehot) / (n_valid * accum),
//            dxf += dlogits W_tile, dW_tile += dlogits^T xf; final-norm backward -> dresid chunk
//   layers in reverse: fetch x_l (prefetch x_{l-1} from the host on the side stream), recompute the
//            attention part (not for the last attn_kept_layers layers: their forward kept it in
//            kept_* buffers), MLP backward per chunk (recomputing the chunk), attention backward,
//            RoPE inverse, QKV backward, norm backward; residual gradient accumulated in dresid
//   embedding backward (positions grouped by token on the host: deterministic)
// Optimizer-in-backward (grad_accum_steps == 1): each layer's AdamW runs right after its backward
// on the one-layer fp32 gradient buffer; an untied LM head is updated right after the LM-head pass
// (it is touched once), the embedding (with the tied head's gradient) and the final norm last.
// Several GPUs: the hooks below call gpu_dist.cu for the gradient sums and sharded updates (on a
// side stream, block by block) and comm.cu for the sequence-parallel attention (attention_core_*).
// LoRA (lora_gpu.h): the base is frozen (no weight gradients: the gradient pointers are NULL and the
// GEMM / norm launchers skip them); each fused base GEMM gets its group's two adapter GEMMs, and the
// optimizer updates the adapters. A quantized base is dequantized layer by layer into one bf16
// block (qbase_load_layer) that W() points into.
#include <math.h>
#include <unistd.h>
#include "attention.h"
#include "attn_sliced.h"
#include "gpu_dist.h"
#include "gpu_model.h"
#include "matmul.h"
#include "mst_kernels.h"

// Left free below the memory free at init (measured after the CUDA context exists) for the cuBLASLt
// and cuDNN handles and graphs: on an H100 the peak in use ran 0.56 GiB above the plan, the context
// (~0.5 GiB, outside this budget) included.
#define GPU_MEM_MARGIN ((size_t)512 << 20)

// ---- small accessors ----

static int quantized_base(const GpuModel *m) { return m->lora.qbase != NULL; }

// Tensor t of layer l: in the flat bf16 parameters, or in the dequantized layer of a quantized base.
static bf16 *W(const GpuModel *m, int l, int t) {
    if (quantized_base(m)) return m->lora.wlayer + m->layout.layer.offset[t];
    return m->params + param_offset(&m->layout, l, t);
}

// A tensor outside the layers (embedding, final norm, LM head) at flat offset `offset`: a quantized
// base keeps only these in params, without the layers' block between them.
static bf16 *P(const GpuModel *m, size_t offset) {
    if (quantized_base(m) && offset >= m->layout.layers_begin) offset -= (size_t)m->config.n_layers * m->layout.layer_size;
    return m->params + offset;
}

// The one-layer gradient buffer of layer l: with the side stream (several GPUs, or
// overlap_optimizer) layers alternate between two, so that the side stream sums (several GPUs) and
// applies one while backward fills the other.
static float *layer_grad_block(const GpuModel *m, int l) {
    return m->layer_grads + (size_t)(l % m->layer_grad_buffers) * m->layout.layer_size;
}

// Gradient of tensor t of layer l: the full-model buffer, the one-layer buffer, or NULL (LoRA: frozen).
static float *G(const GpuModel *m, int l, int t) {
    if (m->grads) return m->grads + param_offset(&m->layout, l, t);
    return m->layer_grads ? layer_grad_block(m, l) + m->layout.layer.offset[t] : NULL;
}
static float *grad_embed(const GpuModel *m) { return m->grads ? m->grads + m->layout.embed : m->embed_head_grads; }
static float *grad_head(const GpuModel *m) { return m->grads ? m->grads + m->layout.lm_head : m->embed_head_grads; }
static float *grad_final_norm(const GpuModel *m) { return m->grads ? m->grads + m->layout.final_norm : m->final_norm_grads; }

static int is_host_layer(const GpuModel *m, int l) { return l < m->plan.host_layers; }
static size_t nd_elems(const GpuModel *m) { return (size_t)m->plan.n_tokens * m->config.d_model; }

// Device buffer holding layer l's input: its device slot, or offload staging buffer X[l % 2].
static bf16 *layer_input(const GpuModel *m, int l) {
    if (is_host_layer(m, l)) return m->x_offload + (size_t)(l % 2) * (mst_plan_find(&m->plan, "x_offload")->slice_bytes / sizeof(bf16));
    const PlanEntry *e = mst_plan_find(&m->plan, "layer_inputs");
    return m->layer_inputs + (size_t)(l - m->plan.host_layers) * (e->slice_bytes / sizeof(bf16));
}
static bf16 *host_slot(const GpuModel *m, int l) {
    const PlanEntry *e = mst_plan_find(&m->plan, "layer_inputs_host");
    return m->layer_inputs_host + (size_t)l * (e->slice_bytes / sizeof(bf16));
}

static float norm_w_offset(const GpuModel *m) { return m->config.norm_offset ? 1.0f : 0.0f; }
static int qkv_features(const ModelConfig *c) { return (c->n_heads + 2 * c->n_kv_heads) * c->head_dim; }

static AttentionShape attention_shape(const ModelConfig *c, int layer, int B, int S) {
    AttentionShape sh;
    sh.B = B;
    sh.S = S;
    sh.Hq = c->n_heads;
    sh.Hkv = c->n_kv_heads;
    sh.hd = c->head_dim;
    sh.scale = c->query_scale;
    sh.window = config_layer_is_sliding(c, layer) ? c->sliding_window : 0;
    sh.softcap = c->attn_softcap;
    sh.head_groups = 1;
    return sh;
}

// Sequence parallel over sp ranks: attention sees every token (sp * S) of this rank's heads.
static AttentionShape attention_shape_sp(const ModelConfig *c, int layer, int B, int S, int sp, const UlyssesHeads *u) {
    AttentionShape sh = attention_shape(c, layer, B, S * sp);
    if (sp > 1) {
        sh.Hq = u->hq_loc;
        sh.Hkv = u->hkv_loc;
    }
    return sh;
}

// Ranks of the sequence-parallel split the settings ask for (1: none), with their heads in *u.
static int settings_sp(const ModelConfig *c, const GpuSettings *s, UlyssesHeads *u) {
    memset(u, 0, sizeof(*u));
    if (s->seq_parallel && s->comm == NULL) die("sequence parallel needs several GPUs (GpuSettings.comm)");
    if (!s->seq_parallel || s->comm->world == 1) return 1;
    char why[256];
    if (ulysses_heads_init(u, s->comm->world, c->n_heads, c->n_kv_heads, c->head_dim, why, sizeof(why))) die("%s", why);
    return s->comm->world;
}

// RoPE position of this rank's first token of a row (sequence parallel: rank * S).
static int rope_offset(const GpuModel *m, int Sn) { return m->sp > 1 ? m->comm->rank * Sn : 0; }

// 1 when cuDNN would take the shape but for its soft-cap (Gemma-2): such layers run the soft-cap
// kernels of attention_softcap.cu instead; every other shape goes to cuDNN.
static int attention_via_softcap(const AttentionShape *sh) {
    if (!(sh->softcap > 0.0f)) return 0;
    AttentionShape plain = *sh;
    plain.softcap = 0.0f;
    return attention_supported(&plain, NULL, 0);
}

// Layer attention forward / backward through the path attention_via_softcap picks (attention.h).
static void layer_attention_forward(bf16 *out, float *stats, const bf16 *qkv, const AttentionShape *sh,
                                    void *workspace, cudaStream_t st) {
    if (attention_via_softcap(sh)) attention_softcap_forward(out, stats, qkv, sh, st);
    else attention_forward(out, stats, qkv, sh, workspace, st);
}

static void layer_attention_backward(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats,
                                     const bf16 *qkv, const AttentionShape *sh, void *workspace, cudaStream_t st) {
    if (attention_via_softcap(sh)) attention_softcap_backward(dqkv, dout, out, stats, qkv, sh, workspace, st);
    else attention_backward(dqkv, dout, out, stats, qkv, sh, workspace, st);
}

// Attention of layer l on a->qkv (Bn rows of Sn tokens, RoPE applied) -> a->att, a->att_stats.
// Sequence parallel: q|k|v goes to the head layout (every token, this rank's heads), attention runs
// there, and its output comes back to this rank's tokens (Ulysses, comm.h).
static void attention_core_forward(GpuModel *m, int l, const LayerActs *a, int Bn, int Sn) {
    AttentionShape sh = attention_shape_sp(&m->config, l, Bn, Sn, m->sp, &m->heads);
    cudaStream_t st = m->stream;
    step_profile_mark(m->profile, PROF_SDPA_FWD, st);
    if (m->sp == 1) {
        layer_attention_forward(a->att, a->att_stats, a->qkv, &sh, m->attn_workspace, st);
    } else {
        ulysses_to_heads(m->comm, a->qkv_heads, m->a2a_send, a->qkv, Bn, Sn, &m->heads, 1, st);
        layer_attention_forward(a->att_heads, a->att_stats, a->qkv_heads, &sh, m->attn_workspace, st);
        ulysses_from_heads(m->comm, a->att, m->a2a_recv, a->att_heads, Bn, Sn, &m->heads, 0, st);
    }
    step_profile_mark(m->profile, PROF_ATTN_OUT, st);
}

// datt (this rank's tokens) -> m->dqkv, the way back through the same layouts.
static void attention_core_backward(GpuModel *m, int l, const LayerActs *a, const bf16 *datt) {
    int B = m->settings.B, S = m->settings.S;
    AttentionShape sh = attention_shape_sp(&m->config, l, B, S, m->sp, &m->heads);
    sh.head_groups = m->settings.attn_head_groups;
    cudaStream_t st = m->stream;
    step_profile_mark(m->profile, PROF_SDPA_BWD, st);
    if (m->sp == 1) {
        layer_attention_backward(m->dqkv, datt, a->att, a->att_stats, a->qkv, &sh, m->attn_workspace, st);
    } else {
        ulysses_to_heads(m->comm, m->datt_heads, m->a2a_send, datt, B, S, &m->heads, 0, st);
        layer_attention_backward(m->dqkv_heads, m->datt_heads, a->att_heads, a->att_stats, a->qkv_heads, &sh, m->attn_workspace, st);
        ulysses_from_heads(m->comm, m->dqkv, m->a2a_recv, m->dqkv_heads, B, S, &m->heads, 1, st);
    }
    step_profile_mark(m->profile, PROF_ATTN_IN_BWD, st);
}

// Waits for `stream`; with several GPUs under the watchdog (a collective may be in it).
static void model_sync(GpuModel *m, cudaStream_t stream, const char *what) {
    if (m->comm) comm_wait(m->comm, stream, what);
    else cudaCheck(cudaStreamSynchronize(stream));
}

// host[n] = scalars[0 .. n) (loss sum, squared grad norm), over all ranks with several GPUs.
static void read_scalars(GpuModel *m, float *host, int n) {
    if (m->comm) {
        dist_read_scalars(m, host, n);
        return;
    }
    cudaCheck(cudaMemcpyAsync(host, m->scalars, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost, m->stream));
    cudaCheck(cudaStreamSynchronize(m->stream));
}

// Pointer to slice `slice` of a plan entry (entries with one slice serve every slice), or NULL
// when the plan has no such entry (e.g. post-norm buffers of a family without post-norms).
static void *plan_ptr(const GpuModel *m, const char *name, int slice) {
    const PlanEntry *e = mst_plan_find(&m->plan, name);
    if (e == NULL) return NULL;
    char *base = e->category == MEM_HOST ? m->host_block : m->arena;
    return base + e->offset + (size_t)(e->count > 1 ? slice : 0) * e->slice_bytes;
}
static void *plan_req(const GpuModel *m, const char *name, int slice) {
    void *p = plan_ptr(m, name, slice);
    if (p == NULL) die("gpu model: the memory plan has no buffer '%s'", name);
    return p;
}
// Layer l's attention buffer `name`: its slice of kept_<name> when it keeps its attention activations
// under recompute (the last attn_kept_layers layers), else slice l of <name> (the one shared slice
// with recompute). required: die when the plan has none (else NULL: a buffer of some families only).
static void *attn_buffer(const GpuModel *m, const char *name, int l, int required) {
    int first_kept = m->config.n_layers - mst_kept_layers(&m->plan.settings);
    char kept[32];
    snprintf(kept, sizeof(kept), "kept_%s", name);
    const char *which = l >= first_kept ? kept : name;
    int slice = l >= first_kept ? l - first_kept : l;
    return required ? plan_req(m, which, slice) : plan_ptr(m, which, slice);
}

// ---- layer forward ----

// The attention part of layer l on `in` (N, d) for Bn sequences of Sn tokens: fills a->ln1, qkv
// (after RoPE), att, att_stats, [ao, ao_rstd] and h1 = in + attention output.
static void attention_block_forward(GpuModel *m, int l, const LayerActs *a, const bf16 *in, int Bn, int Sn) {
    const ModelConfig *c = &m->config;
    int N = Bn * Sn, d = c->d_model, q = c->n_heads * c->head_dim;
    cudaStream_t st = m->stream;
    step_profile_mark(m->profile, PROF_ATTN_IN, st);
    rmsnorm_forward(a->ln1, a->ln1_rstd, in, W(m, l, LT_ATTN_NORM), N, d, c->norm_eps, norm_w_offset(m), st);
    linear_forward(a->qkv, DT_BF16, a->ln1, W(m, l, LT_WQ), c->qkv_bias ? W(m, l, LT_BQ) : NULL, N, d, qkv_features(c), 0, st);
    lora_prepare_group(&m->lora, l, LG_QKV, st);
    lora_forward(&m->lora, l, LG_QKV, a->qkv, a->ln1, N, st);
    rope_apply(a->qkv, m->rope, N, Sn, rope_offset(m, Sn), c->n_heads, c->n_kv_heads, c->head_dim, 0, st);
    attention_core_forward(m, l, a, Bn, Sn);
    cudaCheck(cudaMemcpyAsync(a->h1, in, (size_t)N * d * sizeof(bf16), cudaMemcpyDeviceToDevice, st));
    if (c->post_norms) {
        linear_forward(a->ao, DT_BF16, a->att, W(m, l, LT_WO), NULL, N, q, d, 0, st);
        lora_forward(&m->lora, l, LG_O, a->ao, a->att, N, st);
        rmsnorm_forward(m->attn_tmp, a->ao_rstd, a->ao, W(m, l, LT_POST_ATTN_NORM), N, d, c->norm_eps, norm_w_offset(m), st);
        residual_add(a->h1, m->attn_tmp, (size_t)N * d, st);
    } else {
        linear_forward(a->h1, DT_BF16, a->att, W(m, l, LT_WO), NULL, N, q, d, 1, st);
        lora_forward(&m->lora, l, LG_O, a->h1, a->att, N, st);
    }
}

// One MLP chunk's buffers: rows [r0, r0 + n) of the per-layer buffers when they are kept (M = 1,
// no recompute, so r0 = 0), else the chunk buffers.
typedef struct { bf16 *ln2; float *ln2_rstd; bf16 *gate_up, *glu, *dn; float *dn_rstd; bf16 *tmp; } MlpChunk;

static MlpChunk mlp_chunk(const GpuModel *m, const LayerActs *a, int r0) {
    size_t d = (size_t)m->config.d_model, f = (size_t)m->config.d_ff;
    size_t r = m->plan.mlp_saved ? (size_t)r0 : 0;
    MlpChunk b;
    b.ln2 = a->ln2 + r * d;
    b.ln2_rstd = a->ln2_rstd + r;
    b.gate_up = a->gate_up + r * 2 * f;
    b.glu = a->glu + r * f;
    b.dn = a->dn ? a->dn + r * d : NULL;
    b.dn_rstd = a->dn_rstd ? a->dn_rstd + r : NULL;
    b.tmp = m->mlp_tmp ? m->mlp_tmp + r * d : NULL;
    return b;
}

// The chunk's forward up to the activation: ln2 = norm(x), gate_up = ln2 [Wg|Wu]^T, glu = act(gate) * up,
// and with post-norms dn = glu Wd^T. x: (n, d) rows of h1.
static void mlp_chunk_forward(GpuModel *m, int l, const MlpChunk *b, const bf16 *x, int n) {
    const ModelConfig *c = &m->config;
    int d = c->d_model, F = c->d_ff;
    cudaStream_t st = m->stream;
    rmsnorm_forward(b->ln2, b->ln2_rstd, x, W(m, l, LT_MLP_NORM), n, d, c->norm_eps, norm_w_offset(m), st);
    linear_forward(b->gate_up, DT_BF16, b->ln2, W(m, l, LT_W_GATE), NULL, n, d, 2 * F, 0, st);
    lora_forward(&m->lora, l, LG_GATE_UP, b->gate_up, b->ln2, n, st);
    glu_forward(b->glu, b->gate_up, n, F, c->activation, st);
    if (c->post_norms) {
        linear_forward(b->dn, DT_BF16, b->glu, W(m, l, LT_W_DOWN), NULL, n, F, d, 0, st);
        lora_forward(&m->lora, l, LG_DOWN, b->dn, b->glu, n, st);
    }
}

// Mini-sequence MLP: out (N, d) (holding h1) += mlp(h1), one chunk of c rows at a time.
static void mlp_forward(GpuModel *m, int l, const LayerActs *a, bf16 *out, int N) {
    const ModelConfig *c = &m->config;
    int d = c->d_model, F = c->d_ff, rows = m->plan.chunk_rows;
    cudaStream_t st = m->stream;
    lora_prepare_group(&m->lora, l, LG_GATE_UP, st);
    for (int r0 = 0; r0 < N; r0 += rows) {
        int n = N - r0 < rows ? N - r0 : rows;
        MlpChunk b = mlp_chunk(m, a, r0);
        bf16 *o = out + (size_t)r0 * d;
        mlp_chunk_forward(m, l, &b, a->h1 + (size_t)r0 * d, n);
        if (c->post_norms) {
            rmsnorm_forward(b.tmp, b.dn_rstd, b.dn, W(m, l, LT_POST_MLP_NORM), n, d, c->norm_eps, norm_w_offset(m), st);
            residual_add(o, b.tmp, (size_t)n * d, st);
        } else {
            linear_forward(o, DT_BF16, b.glu, W(m, l, LT_W_DOWN), NULL, n, F, d, 1, st);
            lora_forward(&m->lora, l, LG_DOWN, o, b.glu, n, st);
        }
    }
}

// Copies offloaded layer l's input (in X[l % 2]) to its pinned host slot on the side stream.
static void save_to_host(GpuModel *m, int l) {
    int b = l % 2;
    cudaCheck(cudaEventRecord(m->ev_written[b], m->stream));
    cudaCheck(cudaStreamWaitEvent(m->copy_stream, m->ev_written[b], 0));
    cudaCheck(cudaMemcpyAsync(host_slot(m, l), layer_input(m, l), nd_elems(m) * sizeof(bf16), cudaMemcpyDeviceToHost, m->copy_stream));
    cudaCheck(cudaEventRecord(m->ev_saved[b], m->copy_stream));
}

// Fetches offloaded layer l's input into X[l % 2] on the side stream, once the compute stream is
// done with that buffer; the compute stream waits on ev_fetched before using it.
static void fetch_from_host(GpuModel *m, int l) {
    int b = l % 2;
    cudaCheck(cudaStreamWaitEvent(m->copy_stream, m->ev_free[b], 0));
    cudaCheck(cudaMemcpyAsync(layer_input(m, l), host_slot(m, l), nd_elems(m) * sizeof(bf16), cudaMemcpyHostToDevice, m->copy_stream));
    cudaCheck(cudaEventRecord(m->ev_fetched[b], m->copy_stream));
}

// Embedding and every layer for Bn sequences of Sn tokens (tokens already on the device).
// x_final (Bn*Sn, d) receives the last layer's output. save = 1 copies offloaded inputs to the host.
static void forward_layers(GpuModel *m, int Bn, int Sn, int save) {
    const ModelConfig *c = &m->config;
    int N = Bn * Sn, L = c->n_layers;
    cudaStream_t st = m->stream;
    if (is_host_layer(m, 0)) cudaCheck(cudaStreamWaitEvent(st, m->ev_saved[0], 0));
    step_profile_mark(m->profile, PROF_EMBEDDING, st);
    embedding_forward(layer_input(m, 0), m->tokens, P(m, m->layout.embed), N, c->d_model, c->embed_scale, st);
    for (int l = 0; l < L; l++) {
        if (quantized_base(m)) qbase_load_layer(&m->lora, &m->layout, l, st);
        if (save && is_host_layer(m, l)) save_to_host(m, l);
        bf16 *out = l + 1 < L ? layer_input(m, l + 1) : m->x_final;
        // X[(l+1) % 2] last held layer l-1's input: its copy to the host must be done first.
        if (l + 1 < L && is_host_layer(m, l + 1)) cudaCheck(cudaStreamWaitEvent(st, m->ev_saved[(l + 1) % 2], 0));
        const LayerActs *a = &m->acts[l];
        attention_block_forward(m, l, a, layer_input(m, l), Bn, Sn);
        cudaCheck(cudaMemcpyAsync(out, a->h1, (size_t)N * c->d_model * sizeof(bf16), cudaMemcpyDeviceToDevice, st));
        step_profile_mark(m->profile, PROF_MLP_FWD, st);
        mlp_forward(m, l, a, out, N);
    }
    for (int b = 0; b < 2; b++) cudaCheck(cudaEventRecord(m->ev_free[b], st));
}

// ---- LM head + cross-entropy (mini-sequence, vocabulary tiles) ----

// logits (n, vt) fp32 = xf (n, d) W_head[v0 : v0 + vt]^T.
static void logits_tile(GpuModel *m, int n, int v0, int vt) {
    const bf16 *Wh = P(m, m->layout.lm_head) + (size_t)v0 * m->config.d_model;
    linear_forward(m->logits, DT_FP32, m->xf, Wh, NULL, n, m->config.d_model, vt, 0, m->stream);
}

// Final norm, LM head and cross-entropy over the first N rows of x_final, token chunk by token
// chunk. losses[n] per token and scalars[0] = their sum. With backward: dresid = d(loss)/d(x_final)
// with dlogits scaled by grad_scale, and the head / final-norm weight gradients accumulated.
static void lm_head_pass(GpuModel *m, int N, float grad_scale, int backward) {
    const ModelConfig *c = &m->config;
    int d = c->d_model, V = c->vocab_size, vc = m->plan.settings.vocab_chunk, tiles = m->plan.vocab_tiles;
    int rows = m->plan.chunk_rows;
    cudaStream_t st = m->stream;
    const bf16 *Wfinal = P(m, m->layout.final_norm);
    const bf16 *Wh = P(m, m->layout.lm_head);
    float *dWh = backward ? grad_head(m) : NULL;
    step_profile_mark(m->profile, PROF_LM_HEAD, st);
    for (int r0 = 0; r0 < N; r0 += rows) {
        int n = N - r0 < rows ? N - r0 : rows;
        const int32_t *tg = m->targets + r0;
        const bf16 *x = m->x_final + (size_t)r0 * d;
        rmsnorm_forward(m->xf, m->xf_rstd, x, Wfinal, n, d, c->norm_eps, norm_w_offset(m), st);
        ce_state_init(m->ce_max, m->ce_sum, m->ce_target, n, st);
        for (int t = 0; t < tiles; t++) {
            int v0 = t * vc, vt = V - v0 < vc ? V - v0 : vc;
            logits_tile(m, n, v0, vt);
            ce_online_update(m->ce_max, m->ce_sum, m->ce_target, m->logits, n, vt, v0, tg, c->final_softcap, st);
        }
        ce_finalize(m->ce_lse, m->losses + r0, m->ce_max, m->ce_sum, m->ce_target, tg, n, st);
        if (!backward) continue;
        for (int t = 0; t < tiles; t++) {
            int v0 = t * vc, vt = V - v0 < vc ? V - v0 : vc;
            const bf16 *Wt = Wh + (size_t)v0 * d;
            if (tiles > 1) logits_tile(m, n, v0, vt);  // pass 2 recomputes the tile
            ce_backward_tile(m->dlogits, m->logits, m->ce_lse, n, vt, v0, tg, c->final_softcap, grad_scale, st);
            if (tiles == 1) {
                linear_backward_input(m->dxf, m->dlogits, Wt, n, d, vt, 0, st);
            } else {  // dxf accumulates over tiles in fp32: dxf_acc (n, d) (+)= dlogits (n, vt) W_tile (vt, d)
                gemm(m->dxf_acc, DT_FP32, m->dlogits, 0, Wt, 0, n, d, vt, 1.0f, t > 0 ? 1.0f : 0.0f, NULL, st);
            }
            if (dWh) linear_backward_weight(dWh + (size_t)v0 * d, DT_FP32, m->dlogits, m->xf, n, d, vt, r0 > 0 || m->grads != NULL, st);
        }
        if (tiles > 1) cast_fp32_to_bf16(m->dxf, m->dxf_acc, (size_t)n * d, st);
        rmsnorm_backward(m->dresid + (size_t)r0 * d, grad_final_norm(m), m->reduce_scratch, m->dxf, x, Wfinal, m->xf_rstd,
                         n, d, norm_w_offset(m), 0, st);
    }
    sum_reduce(m->scalars, m->losses, N, st);
}

// ---- layer backward ----

// MLP backward, chunk by chunk (recomputing the chunk's intermediates unless kept):
// dresid (N, d) += d mlp(h1) / d h1 . dresid; the matrices' gradients are written by the first
// chunk when `fresh` (this step's first gradient of the layer), else accumulated.
static void mlp_backward(GpuModel *m, int l, const LayerActs *a, int fresh) {
    const ModelConfig *c = &m->config;
    int N = m->plan.n_tokens, d = c->d_model, F = c->d_ff, rows = m->plan.chunk_rows;
    cudaStream_t st = m->stream;
    step_profile_mark(m->profile, PROF_MLP_BWD, st);
    lora_prepare_group(&m->lora, l, LG_GATE_UP, st);
    for (int r0 = 0; r0 < N; r0 += rows) {
        int n = N - r0 < rows ? N - r0 : rows;
        MlpChunk b = mlp_chunk(m, a, r0);
        const bf16 *x = a->h1 + (size_t)r0 * d;
        bf16 *dres = m->dresid + (size_t)r0 * d;
        if (!m->plan.mlp_saved) {
            mlp_chunk_forward(m, l, &b, x, n);
            if (c->post_norms)  // recompute dn_rstd (the output itself is not needed)
                rmsnorm_forward(b.tmp, b.dn_rstd, b.dn, W(m, l, LT_POST_MLP_NORM), n, d, c->norm_eps, norm_w_offset(m), st);
        }
        const bf16 *dy = dres;  // gradient of the down projection's output
        if (c->post_norms) {
            rmsnorm_backward(b.tmp, G(m, l, LT_POST_MLP_NORM), m->reduce_scratch, dres, b.dn, W(m, l, LT_POST_MLP_NORM),
                             b.dn_rstd, n, d, norm_w_offset(m), 0, st);
            dy = b.tmp;
        }
        int acc = !(fresh && r0 == 0);
        linear_backward_weight(G(m, l, LT_W_DOWN), DT_FP32, dy, b.glu, n, F, d, acc, st);
        lora_backward_weights(&m->lora, l, LG_DOWN, dy, b.glu, n, st);
        linear_backward_input(b.glu, dy, W(m, l, LT_W_DOWN), n, F, d, 0, st);       // glu := d glu
        lora_backward_input(&m->lora, l, LG_DOWN, b.glu, n, st);
        glu_backward(b.gate_up, b.glu, b.gate_up, n, F, c->activation, st);          // gate_up := d gate_up
        linear_backward_weight(G(m, l, LT_W_GATE), DT_FP32, b.gate_up, b.ln2, n, d, 2 * F, acc, st);
        lora_backward_weights(&m->lora, l, LG_GATE_UP, b.gate_up, b.ln2, n, st);
        linear_backward_input(b.ln2, b.gate_up, W(m, l, LT_W_GATE), n, d, 2 * F, 0, st);  // ln2 := d ln2
        lora_backward_input(&m->lora, l, LG_GATE_UP, b.ln2, n, st);
        rmsnorm_backward(dres, G(m, l, LT_MLP_NORM), m->reduce_scratch, b.ln2, x, W(m, l, LT_MLP_NORM), b.ln2_rstd,
                         n, d, norm_w_offset(m), 1, st);
    }
}

// Attention-part backward: dresid (N, d) holds d h1 on entry and d in on exit. The gradient of the
// attention output goes to h1's buffer (dead once the MLP backward is done) unless datt has its own
// (when Hq * hd > d). `fresh` as in mlp_backward.
// The sliced attention backward of layer l (attn_sliced.h): one head group's dO and dq|dk|dv at a
// time; a->qkv holds dq|dk|dv (before the inverse RoPE) on return.
static void attention_sliced_layer_backward(GpuModel *m, int l, const LayerActs *a, const bf16 *dao) {
    AttentionShape sh = attention_shape(&m->config, l, m->settings.B, m->settings.S);
    sh.head_groups = m->settings.attn_head_groups;
    step_profile_mark(m->profile, PROF_SDPA_BWD, m->stream);
    attention_backward_sliced(a->qkv, m->dqkv_g, m->datt_g, dao, W(m, l, LT_WO), a->att, a->att_stats, &sh,
                              m->config.d_model, m->attn_workspace, m->stream);
}

static void attention_block_backward(GpuModel *m, int l, const LayerActs *a, const bf16 *in, int fresh) {
    const ModelConfig *c = &m->config;
    int N = m->plan.n_tokens, d = c->d_model, q = c->n_heads * c->head_dim, qkv = qkv_features(c);
    cudaStream_t st = m->stream;
    lora_prepare_group(&m->lora, l, LG_QKV, st);
    const bf16 *dao = m->dresid;  // gradient of the o-projection output
    step_profile_mark(m->profile, PROF_ATTN_OUT_BWD, st);
    if (c->post_norms) {
        rmsnorm_backward(m->attn_tmp, G(m, l, LT_POST_ATTN_NORM), m->reduce_scratch, m->dresid, a->ao,
                         W(m, l, LT_POST_ATTN_NORM), a->ao_rstd, N, d, norm_w_offset(m), 0, st);
        dao = m->attn_tmp;
    }
    linear_backward_weight(G(m, l, LT_WO), DT_FP32, dao, a->att, N, q, d, !fresh, st);
    lora_backward_weights(&m->lora, l, LG_O, dao, a->att, N, st);
    bf16 *dqkv = m->dqkv;
    if (m->settings.attn_bwd_sliced) {  // mst.h: recompute, cuDNN, one GPU's sequence, no LoRA, q >= d
        attention_sliced_layer_backward(m, l, a, dao);
        dqkv = a->qkv;
    } else {
        bf16 *datt = m->datt != NULL ? m->datt : a->h1;
        linear_backward_input(datt, dao, W(m, l, LT_WO), N, q, d, 0, st);
        lora_backward_input(&m->lora, l, LG_O, datt, N, st);
        attention_core_backward(m, l, a, datt);
    }
    rope_apply(dqkv, m->rope, N, m->settings.S, rope_offset(m, m->settings.S), c->n_heads, c->n_kv_heads, c->head_dim, 1, st);
    const bf16 *ln1 = a->ln1;
    if (m->settings.recompute) {  // ln1 shared h1's buffer in the forward: recompute it where q, k, v were
        bf16 *at = m->settings.attn_bwd_sliced ? a->att : a->qkv;  // sliced: q|k|v's buffer holds dqkv, att is free
        rmsnorm_forward(at, a->ln1_rstd, in, W(m, l, LT_ATTN_NORM), N, d, c->norm_eps, norm_w_offset(m), st);
        ln1 = at;
    }
    linear_backward_weight(G(m, l, LT_WQ), DT_FP32, dqkv, ln1, N, d, qkv, !fresh, st);
    if (c->qkv_bias) bias_backward(G(m, l, LT_BQ), m->reduce_scratch, dqkv, N, qkv, st);
    lora_backward_weights(&m->lora, l, LG_QKV, dqkv, ln1, N, st);
    linear_backward_input(a->ln1, dqkv, W(m, l, LT_WQ), N, d, qkv, 0, st);  // ln1 := d ln1
    lora_backward_input(&m->lora, l, LG_QKV, a->ln1, N, st);
    rmsnorm_backward(m->dresid, G(m, l, LT_ATTN_NORM), m->reduce_scratch, a->ln1, in, W(m, l, LT_ATTN_NORM), a->ln1_rstd,
                     N, d, norm_w_offset(m), 1, st);
}

// ---- optimizer ----

// Stochastic-rounding seed of one tensor at one step (splitmix-style mixing).
static uint32_t tensor_seed(uint32_t seed, int tensor_id, int step) {
    uint64_t z = ((uint64_t)seed << 32) ^ ((uint64_t)(uint32_t)tensor_id * 0x9E3779B97F4A7C15ull) ^ (uint64_t)(uint32_t)step;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)(z ^ (z >> 31));
}

// Ids of the tensors in file order (embed 0, layer tensors, final norm, LM head), for the seeds.
static int layer_tensor_id(int l, int t) { return 1 + l * LT_COUNT + t; }
static int final_norm_id(const ModelConfig *c) { return 1 + c->n_layers * LT_COUNT; }
static int lm_head_id(const ModelConfig *c) { return 2 + c->n_layers * LT_COUNT; }

// AdamW on elements [lo, hi) of tensor t (gpu_dist.h). Weight decay only on matrices (rows > 1):
// not on norms and biases. With LoRA (one GPU) the tensor is an adapter (offset in the adapter
// layout), always decayed: all are matrices, even at rank 1. sumsq_partials non-NULL: the
// gradient's squares are added to them in the same pass.
void gm_adamw_slice(GpuModel *m, const GmTensor *t, size_t lo, size_t hi, const float *grad, size_t state_at,
                    const OptimizerStep *opt, float clip_scale, float *sumsq_partials, cudaStream_t stream) {
    AdamWParams p;
    p.lr = opt->lr;
    p.beta1 = opt->beta1;
    p.beta2 = opt->beta2;
    p.eps = opt->eps;
    p.weight_decay = (t->rows > 1 || m->lora.cfg.rank) ? opt->weight_decay : 0.0f;
    p.grad_scale = clip_scale;
    p.step = opt->step;
    p.seed = tensor_seed(opt->seed, t->id, opt->step);
    p.index_base = lo;
    if (m->settings.moments_8bit) {  // one GPU, no LoRA (mst_settings_check): always a whole tensor
        size_t b = adam8_block_of(&m->adam8_layout, &m->layout, t->offset);
        adamw8bit_update(m->params + t->offset, m->master ? m->master + t->offset : NULL, grad, DT_FP32,
                         (uint8_t *)m->adam_m + b * ADAM8_BLOCK, m->adam_m_absmax + b, (uint8_t *)m->adam_v + b * ADAM8_BLOCK,
                         m->adam_v_absmax + b, hi - lo, &p, sumsq_partials, stream);
        return;
    }
    size_t mb = dtype_bytes(m->settings.moment_type);
    bf16 *param = (m->lora.cfg.rank ? m->lora.params : m->params) + t->offset + lo;
    adamw_update(param, m->master ? m->master + state_at : NULL, grad, DT_FP32, (char *)m->adam_m + state_at * mb,
                 (char *)m->adam_v + state_at * mb, m->settings.moment_type, hi - lo, &p, sumsq_partials, stream);
}

// AdamW on one whole tensor (offset, rows x cols elements of the flat layout, or of the adapter
// layout with LoRA) with gradient `grad` on `stream`. Optimizer-in-backward adds the gradient's
// squares to the norm partials in the same pass.
static void adamw_tensor(GpuModel *m, size_t offset, size_t rows, size_t cols, const float *grad, int tensor_id,
                         const OptimizerStep *opt, float clip_scale, cudaStream_t stream) {
    GmTensor t = {offset, rows, cols, tensor_id};
    gm_adamw_slice(m, &t, 0, rows * cols, grad, offset, opt, clip_scale, m->settings.grad_accum_steps == 1 ? m->grad_norm_partials : NULL,
                   stream);
}

int gm_block_tensors(const GpuModel *m, int b, GmTensor *out) {
    const ModelConfig *c = &m->config;
    const ParamLayout *p = &m->layout;
    size_t V = (size_t)c->vocab_size, d = (size_t)c->d_model;
    if (b == 0 || b == zero_block_lm_head(c)) {
        GmTensor t = {b == 0 ? p->embed : p->lm_head, V, d, b == 0 ? 0 : lm_head_id(c)};
        out[0] = t;
        return 1;
    }
    if (b == zero_block_final_norm(c)) {
        GmTensor t = {p->final_norm, 1, d, final_norm_id(c)};
        out[0] = t;
        return 1;
    }
    int l = b - zero_block_layer(0), n = 0;
    for (int k = 0; k < LT_COUNT; k++) {
        if (p->layer.offset[k] == SIZE_MAX) continue;
        GmTensor t = {param_offset(p, l, k), p->layer.rows[k], p->layer.cols[k], layer_tensor_id(l, k)};
        out[n++] = t;
    }
    return n;
}

// LoRA: AdamW on layer l's adapters (the moments and master weights are the adapters').
static void adamw_lora_layer(GpuModel *m, int l, const OptimizerStep *opt, float clip_scale, cudaStream_t stream) {
    const LoraLayout *L = &m->lora.layout;
    const float *grads = lora_layer_grads(&m->lora, l);
    for (int t = 0; t < LORA_TARGET_COUNT; t++) {
        if (!lora_has(L, t)) continue;
        for (int is_b = 0; is_b < 2; is_b++) {
            size_t rows = is_b ? L->out[t] : (size_t)L->rank, cols = is_b ? (size_t)L->rank : L->in[t];
            int id = (1 << 24) + (l * LORA_TARGET_COUNT + t) * 2 + is_b;
            adamw_tensor(m, lora_offset(L, l, t, is_b), rows, cols, grads + (is_b ? L->b_off[t] : L->a_off[t]), id, opt,
                         clip_scale, stream);
        }
    }
}

static void adamw_layer(GpuModel *m, int l, const OptimizerStep *opt, float clip_scale, cudaStream_t stream) {
    if (m->lora.cfg.rank) {
        adamw_lora_layer(m, l, opt, clip_scale, stream);
        return;
    }
    const ParamLayout *p = &m->layout;
    for (int t = 0; t < LT_COUNT; t++) {
        if (p->layer.offset[t] == SIZE_MAX) continue;
        adamw_tensor(m, param_offset(p, l, t), p->layer.rows[t], p->layer.cols[t], G(m, l, t), layer_tensor_id(l, t), opt, clip_scale,
                     stream);
    }
}

void gm_side_after_compute(GpuModel *m) {
    cudaCheck(cudaEventRecord(m->ev_compute, m->stream));
    cudaCheck(cudaStreamWaitEvent(m->grad_stream, m->ev_compute, 0));
}

// Optimizer-in-backward of layer l, its backward queued: AdamW on the compute stream; with the side
// stream there (the backward of layer l - 1 goes on meanwhile; same kernels in the same order, so
// the same numbers); several GPUs: the sum over the ranks first (gpu_dist.cu).
static void update_layer(GpuModel *m, int l, const OptimizerStep *opt, float clip_scale) {
    if (m->comm) {
        dist_update_block(m, zero_block_layer(l), layer_grad_block(m, l), m->ev_grads_free[l % 2], opt, clip_scale);
    } else if (m->grad_stream) {
        gm_side_after_compute(m);
        adamw_layer(m, l, opt, clip_scale, m->grad_stream);
        cudaCheck(cudaEventRecord(m->ev_grads_free[l % 2], m->grad_stream));
    } else {
        adamw_layer(m, l, opt, clip_scale, m->stream);
    }
}

static float clip_scale_for(float norm, float clip) {
    return (clip > 0.0f && norm > clip) ? clip / (norm + 1e-6f) : 1.0f;
}

// Gradient accumulation: after the last micro step, the global norm over the full gradient buffer,
// AdamW on every tensor with the clip scale, and the gradients zeroed. Returns the norm. Several
// GPUs: the gradient summed over the ranks first, each rank updating its parts (gpu_dist.cu).
static float optimizer_step_full(GpuModel *m, const OptimizerStep *opt) {
    const ModelConfig *c = &m->config;
    const ParamLayout *p = &m->layout;
    cudaStream_t st = m->stream;
    step_profile_mark(m->profile, PROF_OPTIMIZER, st);
    if (m->comm) {
        float norm = dist_reduce_grads(m);
        dist_update_parts(m, opt, clip_scale_for(norm, opt->clip));
        return norm;
    }
    float *grads = m->lora.cfg.rank ? m->lora.grads : m->grads;
    if (m->capture) {
        cudaCheck(cudaMemcpyAsync(m->capture_grads, grads, m->n_train * sizeof(float), cudaMemcpyDeviceToHost, st));
        m->capture = 0;
    }
    cudaCheck(cudaMemsetAsync(m->grad_norm_partials, 0, (size_t)m->plan.figures.grad_norm_partials * sizeof(float), st));
    grad_norm_accumulate(m->grad_norm_partials, grads, DT_FP32, m->n_train, st);
    grad_norm_finish(m->scalars + 1, m->grad_norm_partials, st);
    float sumsq;
    cudaCheck(cudaMemcpyAsync(&sumsq, m->scalars + 1, sizeof(float), cudaMemcpyDeviceToHost, st));
    cudaCheck(cudaStreamSynchronize(st));
    float norm = sqrtf(sumsq);
    float scale = clip_scale_for(norm, opt->clip);
    int frozen = m->lora.cfg.rank > 0;  // LoRA: only the layers' adapters train
    if (!frozen) adamw_tensor(m, p->embed, (size_t)c->vocab_size, (size_t)c->d_model, m->grads + p->embed, 0, opt, scale, st);
    for (int l = 0; l < c->n_layers; l++) adamw_layer(m, l, opt, scale, st);
    if (!frozen) adamw_tensor(m, p->final_norm, 1, (size_t)c->d_model, m->grads + p->final_norm, final_norm_id(c), opt, scale, st);
    if (!frozen && !c->tied_embeddings)
        adamw_tensor(m, p->lm_head, (size_t)c->vocab_size, (size_t)c->d_model, m->grads + p->lm_head, lm_head_id(c), opt, scale, st);
    cudaCheck(cudaMemsetAsync(grads, 0, m->n_train * sizeof(float), st));
    return norm;
}

// ---- batch upload ----

// Uploads tokens and targets (checking their range), groups positions by token for the
// deterministic embedding backward (counting sort: unique tokens ascending, positions ascending
// within a token) and returns the number of valid targets.
static int upload_batch(GpuModel *m, const int32_t *tokens, const int32_t *targets, int N) {
    const ModelConfig *c = &m->config;
    int V = c->vocab_size, n_valid = 0;
    for (int i = 0; i < N; i++) {
        if (tokens[i] < 0 || tokens[i] >= V) die("token %d at position %d is outside the vocabulary [0, %d)", tokens[i], i, V);
        if (targets != NULL) {
            if (targets[i] >= V || targets[i] < -1) die("target %d at position %d is outside [-1, %d)", targets[i], i, V);
            n_valid += targets[i] >= 0;
        }
    }
    cudaStream_t st = m->stream;
    cudaCheck(cudaMemcpyAsync(m->tokens, tokens, (size_t)N * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    if (targets != NULL) cudaCheck(cudaMemcpyAsync(m->targets, targets, (size_t)N * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    memset(m->h_counts, 0, (size_t)V * sizeof(int32_t));
    for (int i = 0; i < N; i++) m->h_counts[tokens[i]]++;
    int u = 0, at = 0;
    for (int v = 0; v < V; v++) {
        if (m->h_counts[v] == 0) continue;
        m->h_unique[u] = v;
        m->h_offsets[u] = at;
        at += m->h_counts[v];
        m->h_counts[v] = m->h_offsets[u];  // becomes the write cursor of token v
        u++;
    }
    m->h_offsets[u] = at;
    for (int i = 0; i < N; i++) m->h_positions[m->h_counts[tokens[i]]++] = i;
    m->n_unique = u;
    cudaCheck(cudaMemcpyAsync(m->embed_unique, m->h_unique, (size_t)u * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(m->embed_offsets, m->h_offsets, (size_t)(u + 1) * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(m->embed_positions, m->h_positions, (size_t)N * sizeof(int32_t), cudaMemcpyHostToDevice, st));
    return n_valid;
}

// ---- training step ----

// Whole-layer recompute: the attention part's forward again (its inner regions count as recompute).
static void recompute_attention_block(GpuModel *m, int l, const LayerActs *a, const bf16 *in) {
    step_profile_mark(m->profile, PROF_RECOMPUTE, m->stream);
    if (m->profile) m->profile->muted++;
    attention_block_forward(m, l, a, in, m->settings.B, m->settings.S);
    if (m->profile) m->profile->muted--;
}

// Optimizer-in-backward, before layer l's backward: the layer's norm and bias gradients are sums
// added into their buffers, so they start at zero; the matrices' gradients are overwritten by their
// first GEMM of the step. LoRA: the base has no gradients, and every adapter GEMM accumulates
// (MsT chunks, the block-diagonal gather), so the layer's adapter block (a few MB) starts at zero.
static void zero_layer_grads(GpuModel *m, int l) {
    if (m->lora.cfg.rank) {
        cudaCheck(cudaMemsetAsync(m->lora.grads, 0, m->lora.layout.layer_size * sizeof(float), m->stream));
        return;
    }
    const ParamLayout *p = &m->layout;
    for (int t = 0; t < LT_COUNT; t++) {
        if (p->layer.offset[t] == SIZE_MAX || p->layer.rows[t] != 1) continue;
        cudaCheck(cudaMemsetAsync(G(m, l, t), 0, p->layer.cols[t] * sizeof(float), m->stream));
    }
}

// The backward pass through every layer (reverse order) and the embedding, with the offload
// prefetch pipeline and, with optimizer-in-backward, each layer's AdamW right after its backward
// (several GPUs: handed to the side stream, which sums the layer's gradient over the ranks first).
static void backward_layers(GpuModel *m, const OptimizerStep *opt, float clip_scale, int opt_in_backward) {
    const ModelConfig *c = &m->config;
    int L = c->n_layers;
    cudaStream_t st = m->stream;
    int lora = m->lora.cfg.rank > 0;
    for (int l = L - 1; l >= 0; l--) {
        if (l > 0 && is_host_layer(m, l - 1)) fetch_from_host(m, l - 1);  // prefetch while layer l runs
        if (is_host_layer(m, l)) cudaCheck(cudaStreamWaitEvent(st, m->ev_fetched[l % 2], 0));
        if (quantized_base(m)) qbase_load_layer(&m->lora, &m->layout, l, st);
        if (opt_in_backward) {
            if (m->grad_stream) cudaCheck(cudaStreamWaitEvent(st, m->ev_grads_free[l % 2], 0));  // layer l + 2's update has read it
            zero_layer_grads(m, l);
        }
        const LayerActs *a = &m->acts[l];
        const bf16 *in = layer_input(m, l);
        if (mst_attn_recomputed(&m->plan.settings, L, l)) recompute_attention_block(m, l, a, in);
        mlp_backward(m, l, a, opt_in_backward);
        attention_block_backward(m, l, a, in, opt_in_backward);
        if (is_host_layer(m, l)) cudaCheck(cudaEventRecord(m->ev_free[l % 2], st));
        if (opt_in_backward) {
            step_profile_mark(m->profile, PROF_OPTIMIZER, st);
            update_layer(m, l, opt, clip_scale);
        }
    }
    if (lora) return;  // the embedding is frozen
    step_profile_mark(m->profile, PROF_EMBEDDING, st);
    // Untied optimizer-in-backward: the head's gradient was applied and its buffer (shared with the
    // layer working set) is reused; absent tokens' rows must read zero. Tied: the head's gradient is
    // there and the embedding's adds to it.
    if (opt_in_backward && !c->tied_embeddings)
        cudaCheck(cudaMemsetAsync(m->embed_head_grads, 0, (size_t)c->vocab_size * c->d_model * sizeof(float), st));
    embedding_backward(grad_embed(m), DT_FP32, m->dresid, m->embed_unique, m->embed_offsets, m->embed_positions,
                       m->n_unique, c->d_model, c->embed_scale, st);
}

void gpu_model_train_micro_step(GpuModel *m, const int32_t *tokens, const int32_t *targets, int micro_index,
                                const OptimizerStep *opt, StepResult *out) {
    const ModelConfig *c = &m->config;
    const GpuSettings *s = &m->settings;
    int accum = s->grad_accum_steps, N = m->plan.n_tokens, L = c->n_layers;
    if (micro_index < 0 || micro_index >= accum) die("micro step %d outside [0, grad_accum_steps = %d)", micro_index, accum);
    int opt_in_backward = accum == 1;
    cudaStream_t st = m->stream;
    int n_valid = upload_batch(m, tokens, targets, N);
    if (m->comm) n_valid = dist_sum_count(m, n_valid);  // the loss is the mean over every rank's valid targets
    float grad_scale = n_valid > 0 ? 1.0f / ((float)n_valid * (float)accum) : 0.0f;
    // Optimizer-in-backward clips with the previous step's norm (this step's is known only at the end).
    float clip_scale = (opt_in_backward && m->has_prev_norm) ? clip_scale_for(m->prev_grad_norm, opt->clip) : 1.0f;
    int frozen = m->lora.cfg.rank > 0;  // LoRA: embedding, final norm and LM head have no gradients
    if (opt_in_backward) cudaCheck(cudaMemsetAsync(m->grad_norm_partials, 0, m->plan.figures.grad_norm_partials * sizeof(float), st));
    if (opt_in_backward && !frozen) {
        cudaCheck(cudaMemsetAsync(m->final_norm_grads, 0, (size_t)c->d_model * sizeof(float), st));
    }
    forward_layers(m, s->B, s->S, 1);
    if (is_host_layer(m, L - 1)) fetch_from_host(m, L - 1);  // overlaps the LM head
    lm_head_pass(m, N, grad_scale, 1);
    if (opt_in_backward && !frozen && !c->tied_embeddings) {  // the untied head is complete: update it, reuse its buffer
        step_profile_mark(m->profile, PROF_OPTIMIZER, st);
        if (m->comm) {  // its buffer is in the layers' shared working set: the sum must have read it first
            dist_update_block(m, zero_block_lm_head(c), m->embed_head_grads, m->ev_head_free, opt, clip_scale);
            cudaCheck(cudaStreamWaitEvent(st, m->ev_head_free, 0));
        } else {
            adamw_tensor(m, m->layout.lm_head, (size_t)c->vocab_size, (size_t)c->d_model, m->embed_head_grads, lm_head_id(c), opt,
                         clip_scale, st);
        }
    }
    backward_layers(m, opt, clip_scale, opt_in_backward);
    if (opt_in_backward && m->comm) {
        step_profile_mark(m->profile, PROF_OPTIMIZER, st);
        dist_finish_update(m, opt, clip_scale);
    } else if (opt_in_backward) {
        step_profile_mark(m->profile, PROF_OPTIMIZER, st);
        if (m->grad_stream) {  // the layers' updates add to the norm partials first
            cudaCheck(cudaEventRecord(m->ev_grad_done, m->grad_stream));
            cudaCheck(cudaStreamWaitEvent(st, m->ev_grad_done, 0));
        }
        if (!frozen) {
            adamw_tensor(m, m->layout.embed, (size_t)c->vocab_size, (size_t)c->d_model, m->embed_head_grads, 0, opt, clip_scale, st);
            adamw_tensor(m, m->layout.final_norm, 1, (size_t)c->d_model, m->final_norm_grads, final_norm_id(c), opt, clip_scale, st);
        }
        grad_norm_finish(m->scalars + 1, m->grad_norm_partials, st);
    }
    step_profile_end_step(m->profile, st);
    float sums[2];
    read_scalars(m, sums, opt_in_backward ? 2 : 1);
    out->n_valid = n_valid;
    out->loss = n_valid > 0 ? sums[0] / (float)n_valid : 0.0f;
    out->grad_norm = 0.0f;
    if (opt_in_backward) {
        out->grad_norm = sqrtf(sums[1]);
        m->prev_grad_norm = out->grad_norm;
        m->has_prev_norm = 1;
    } else if (micro_index == accum - 1) {
        out->grad_norm = optimizer_step_full(m, opt);
        step_profile_end_step(m->profile, st);
        cudaCheck(cudaStreamSynchronize(st));
    }
}

void gpu_model_capture_grads(GpuModel *m, float *grads_host) {
    if (m->settings.grad_accum_steps < 2)
        die("capturing the gradient needs grad_accum_steps > 1 (optimizer-in-backward never holds the whole gradient)");
    if (grads_host == NULL && (m->comm == NULL || m->comm->rank == 0)) die("capturing the gradient needs a host buffer");
    m->capture = 1;
    m->capture_grads = grads_host;
}

// Evaluation and sampling are left out of --profile's step figures.
float gpu_model_eval_loss(GpuModel *m, const int32_t *tokens, const int32_t *targets) {
    int N = m->plan.n_tokens;
    StepProfile *profile = m->profile;
    m->profile = NULL;
    int n_valid = upload_batch(m, tokens, targets, N);
    if (m->comm) n_valid = dist_sum_count(m, n_valid);
    forward_layers(m, m->settings.B, m->settings.S, 0);
    lm_head_pass(m, N, 0.0f, 0);
    m->profile = profile;
    float sum;
    read_scalars(m, &sum, 1);
    return n_valid > 0 ? sum / (float)n_valid : 0.0f;
}

// One sequence padded to S with token 0 (causal attention: the padding never reaches position
// n_tokens - 1), then the final norm and LM head on that one row, tile by tile. Sequence parallel:
// every rank runs its S of the sp * S positions; the rank holding position n_tokens - 1 computes
// the logits and sends each tile to the others.
void gpu_model_next_token_logits(GpuModel *m, const int32_t *tokens, int n_tokens, float *logits_host) {
    const ModelConfig *c = &m->config;
    int S = m->settings.S, d = c->d_model, V = c->vocab_size, vc = m->plan.settings.vocab_chunk;
    int first = rope_offset(m, S), last = n_tokens - 1, owner = last / S;
    if (n_tokens < 1 || n_tokens > S * m->sp)
        die("next-token logits: %d tokens, expected 1..%d (the planned sequence length)", n_tokens, S * m->sp);
    memset(m->h_tokens, 0, (size_t)S * sizeof(int32_t));
    if (n_tokens > first) memcpy(m->h_tokens, tokens + first, (size_t)(n_tokens - first < S ? n_tokens - first : S) * sizeof(int32_t));
    upload_batch(m, m->h_tokens, NULL, S);
    StepProfile *profile = m->profile;
    m->profile = NULL;
    forward_layers(m, 1, S, 0);
    m->profile = profile;
    cudaStream_t st = m->stream;
    int mine = m->sp == 1 || m->comm->rank == owner;
    if (mine)
        rmsnorm_forward(m->xf, m->xf_rstd, m->x_final + (size_t)(last - owner * S) * d, P(m, m->layout.final_norm), 1, d,
                        c->norm_eps, norm_w_offset(m), st);
    for (int v0 = 0; v0 < V; v0 += vc) {
        int vt = V - v0 < vc ? V - v0 : vc;
        if (mine) logits_tile(m, 1, v0, vt);
        if (m->sp > 1) comm_broadcast_f32(m->comm, m->logits, (size_t)vt, owner, st);
        cudaCheck(cudaMemcpyAsync(logits_host + v0, m->logits, (size_t)vt * sizeof(float), cudaMemcpyDeviceToHost, st));
        model_sync(m, st, "next-token logits");  // the next tile overwrites m->logits
    }
    if (c->final_softcap > 0.0f) {
        for (int v = 0; v < V; v++) logits_host[v] = c->final_softcap * tanhf(logits_host[v] / c->final_softcap);
    }
}

// ---- init / free ----

// Device and host shape requirements of the kernels: 16-byte aligned rows for cuBLASLt.
static void check_supported(const ModelConfig *c, const GpuSettings *s) {
    if (s->recompute && qkv_features(c) < c->d_model)  // the backward recomputes the normed input into qkv's buffer
        die("%s config: with recompute the GPU path needs (Hq + 2 Hkv) * head_dim (%d) >= d_model (%d)",
            family_name(c->family), qkv_features(c), c->d_model);
    if (c->d_model % 8 || c->d_ff % 8 || c->head_dim % 8)
        die("%s config: d_model (%d), d_ff (%d) and head_dim (%d) must be multiples of 8 on the GPU path",
            family_name(c->family), c->d_model, c->d_ff, c->head_dim);
    char msg[256];
    if (lora_config_check(&s->lora, msg, sizeof(msg))) die("%s", msg);
    if (s->lora.rank % 8)
        die("LoRA rank %d: the GPU path needs a multiple of 8 (the adapter GEMMs' rows stay 16-byte aligned)", s->lora.rank);
    for (int sliding = 0; sliding < 2; sliding++) {
        int layer = -1;
        for (int l = 0; l < c->n_layers; l++) if (config_layer_is_sliding(c, l) == sliding) { layer = l; break; }
        if (layer < 0) continue;
        char why[256];
        UlyssesHeads u;
        int sp = settings_sp(c, s, &u);
        AttentionShape sh = attention_shape_sp(c, layer, s->B, s->S, sp, &u);
        int ok = attention_via_softcap(&sh) ? attention_softcap_supported(&sh, why, sizeof(why))
                                            : attention_supported(&sh, why, sizeof(why));
        if (!ok)
            die("%s: attention of layer %d is not supported on this GPU path: %s", family_name(c->family), layer, why);
    }
}

// Attention workspace with the backward in G head groups: largest over the layer kinds and the
// (1, S) sampling shape; sequence parallel: this rank's heads over every token of a row.
static size_t attention_workspace_figure(const ModelConfig *c, const GpuSettings *s, int G, int sliced) {
    size_t most = 0;
    UlyssesHeads u;
    int sp = settings_sp(c, s, &u);
    for (int l = 0; l < c->n_layers && l < 2; l++) {
        for (int b = 0; b < 2; b++) {
            AttentionShape sh = attention_shape_sp(c, l, b == 0 ? s->B : 1, s->S, sp, &u);
            sh.head_groups = G;  // the sampling shape runs only the forward, which is the same for every G
            size_t w = attention_via_softcap(&sh) ? attention_softcap_workspace_bytes(&sh)
                       : sliced                   ? attention_group_workspace_bytes(&sh)
                                                  : attention_workspace_bytes(&sh);
            if (w > most) most = w;
        }
    }
    return most;
}

// The kv heads of one GPU's attention: all, or this rank's with sequence parallel.
static int attn_kv_heads(const ModelConfig *c, const GpuSettings *s) {
    UlyssesHeads u;
    return settings_sp(c, s, &u) > 1 ? u.hkv_loc : c->n_kv_heads;
}

// The kernel modules' own figures for this shape: attention workspace (cuDNN's, or the soft-cap
// kernels' B Hq S floats), reduction scratch over N rows, grad-norm partials. head_groups: 1 also
// builds cuDNN's backward in 2, 4 and 8 head groups (those that divide the kv heads of one GPU's
// attention) for their workspace, and unless the sliced backward is off (or sequence parallel) the
// packed-group graph of the sliced backward in those groups.
static MstKernelFigures kernel_figures(const ModelConfig *c, const GpuSettings *s, int head_groups) {
    MstKernelFigures f;
    memset(&f, 0, sizeof(f));
    f.attn_workspace = attention_workspace_figure(c, s, 1, 0);
    UlyssesHeads u;
    int sliced = s->attn_bwd_sliced != 0 && settings_sp(c, s, &u) == 1;
    for (int k = 0; k < 3 && head_groups && c->attn_softcap == 0.0f; k++) {
        if (attn_kv_heads(c, s) % (2 << k) != 0) continue;
        f.attn_workspace_grouped[k] = attention_workspace_figure(c, s, 2 << k, 0);
        if (sliced) f.attn_workspace_sliced[k] = attention_workspace_figure(c, s, 2 << k, 1);
    }
    int N = s->B * s->S;
    size_t norm_floats = (size_t)ceil_div(N, rmsnorm_rows_per_block()) * c->d_model;
    size_t bias_floats = c->qkv_bias ? bias_grad_scratch_floats(N, qkv_features(c)) : 0;
    f.reduce_scratch = (norm_floats > bias_floats ? norm_floats : bias_floats) * sizeof(float);
    f.matmul_workspace = MST_MATMUL_WORKSPACE;
    f.grad_norm_partials = (size_t)grad_norm_partials();
    return f;
}

// Points every buffer of the model at its plan entry.
static void bind_buffers(GpuModel *m) {
    const ModelConfig *c = &m->config;
    m->params = (bf16 *)plan_req(m, "params", 0);
    m->rope = (float *)plan_req(m, "rope_cos_sin", 0);
    GpuLora *g = &m->lora;
    g->params = (bf16 *)plan_ptr(m, "lora_params", 0);
    g->grads = (float *)plan_ptr(m, "lora_grads", 0);
    g->grads_per_layer = g->grads == NULL;
    if (g->grads_per_layer) g->grads = (float *)plan_ptr(m, "lora_layer_grads", 0);
    g->bblk[LG_QKV] = (bf16 *)plan_ptr(m, "lora_bblk_qkv", 0);
    g->bblk[LG_GATE_UP] = (bf16 *)plan_ptr(m, "lora_bblk_gate_up", 0);
    g->u = (bf16 *)plan_ptr(m, "lora_u", 0);
    g->du = (bf16 *)plan_ptr(m, "lora_du", 0);
    g->dbblk = (float *)plan_ptr(m, "lora_dbblk", 0);
    g->qbase = (unsigned char *)plan_ptr(m, "qbase", 0);
    g->wlayer = (bf16 *)plan_ptr(m, "qbase_layer", 0);
    g->wlayer_of = -1;
    m->adam_m = plan_req(m, "adam_m", 0);
    m->adam_v = plan_req(m, "adam_v", 0);
    m->adam_m_absmax = (float *)plan_ptr(m, "adam_m_absmax", 0);
    m->adam_v_absmax = (float *)plan_ptr(m, "adam_v_absmax", 0);
    m->master = (float *)plan_ptr(m, "master", 0);
    m->grads = (float *)plan_ptr(m, "grads", 0);
    m->layer_grads = (float *)plan_ptr(m, "layer_grads", 0);
    m->layer_grad_buffers = m->layer_grads ? mst_plan_find(&m->plan, "layer_grads")->count : 1;
    m->embed_head_grads = (float *)plan_ptr(m, "embed_head_grads", 0);
    m->final_norm_grads = (float *)plan_ptr(m, "final_norm_grads", 0);
    m->grad_norm_partials = (float *)plan_req(m, "grad_norm_partials", 0);
    m->tokens = (int32_t *)plan_req(m, "tokens", 0);
    m->targets = (int32_t *)plan_req(m, "targets", 0);
    m->embed_unique = (int32_t *)plan_req(m, "embed_unique", 0);
    m->embed_offsets = (int32_t *)plan_req(m, "embed_offsets", 0);
    m->embed_positions = (int32_t *)plan_req(m, "embed_positions", 0);
    m->scalars = (float *)plan_req(m, "scalars", 0);
    m->layer_inputs = (bf16 *)plan_ptr(m, "layer_inputs", 0);
    m->layer_inputs_host = (bf16 *)plan_ptr(m, "layer_inputs_host", 0);
    m->x_offload = (bf16 *)plan_ptr(m, "x_offload", 0);
    m->x_final = (bf16 *)plan_req(m, "x_final_dresid", 0);
    m->dresid = m->x_final;  // the LM head's backward turns x_final into d(loss)/d(x_final) row by row
    m->datt = (bf16 *)plan_ptr(m, "datt", 0);
    m->dqkv = (bf16 *)plan_ptr(m, "dqkv", 0);  // NULL with the sliced attention backward
    m->datt_g = (bf16 *)plan_ptr(m, "datt_g", 0);
    m->dqkv_g = (bf16 *)plan_ptr(m, "dqkv_g", 0);
    m->attn_tmp = (bf16 *)plan_ptr(m, "attn_tmp", 0);
    m->mlp_tmp = (bf16 *)plan_ptr(m, "mlp_tmp", 0);
    m->xf = (bf16 *)plan_req(m, "xf", 0);
    m->xf_rstd = (float *)plan_req(m, "xf_rstd", 0);
    m->dxf = (bf16 *)plan_req(m, "dxf", 0);
    m->dxf_acc = (float *)plan_ptr(m, "dxf_acc", 0);
    m->logits = (float *)plan_req(m, "logits", 0);
    m->dlogits = (bf16 *)plan_req(m, "dlogits", 0);
    m->ce_max = (float *)plan_req(m, "ce_max", 0);
    m->ce_sum = (float *)plan_req(m, "ce_sum", 0);
    m->ce_target = (float *)plan_req(m, "ce_target", 0);
    m->ce_lse = (float *)plan_req(m, "ce_lse", 0);
    m->losses = (float *)plan_req(m, "losses", 0);
    m->attn_workspace = plan_req(m, "attn_workspace", 0);
    m->reduce_scratch = (float *)plan_req(m, "reduce_scratch", 0);
    m->grad_shard = (float *)plan_ptr(m, "grad_shard", 0);
    m->a2a_send = (bf16 *)plan_ptr(m, "a2a_send", 0);
    m->a2a_recv = (bf16 *)plan_ptr(m, "a2a_recv", 0);
    m->datt_heads = (bf16 *)plan_ptr(m, "datt_heads", 0);
    m->dqkv_heads = (bf16 *)plan_ptr(m, "dqkv_heads", 0);
    m->acts = (LayerActs *)callocCheck((size_t)c->n_layers, sizeof(LayerActs));
    for (int l = 0; l < c->n_layers; l++) {
        LayerActs *a = &m->acts[l];
        a->ln1_rstd = (float *)attn_buffer(m, "ln1_rstd", l, 1);
        a->qkv = (bf16 *)attn_buffer(m, "qkv", l, 1);
        a->att = (bf16 *)attn_buffer(m, "att", l, 1);
        a->att_stats = (float *)attn_buffer(m, "att_stats", l, 1);
        a->h1 = (bf16 *)attn_buffer(m, "h1", l, 1);
        a->ln1 = m->settings.recompute ? a->h1 : (bf16 *)plan_req(m, "ln1", l);  // mst.h: plan_attention_acts
        a->ao = (bf16 *)attn_buffer(m, "ao", l, 0);
        a->ao_rstd = (float *)attn_buffer(m, "ao_rstd", l, 0);
        a->ln2 = (bf16 *)plan_req(m, "ln2", l);
        a->ln2_rstd = (float *)plan_req(m, "ln2_rstd", l);
        a->gate_up = (bf16 *)plan_req(m, "gate_up", l);
        a->glu = (bf16 *)plan_req(m, "glu", l);
        a->dn = (bf16 *)plan_ptr(m, "dn", l);
        a->dn_rstd = (float *)plan_ptr(m, "dn_rstd", l);
        a->qkv_heads = (bf16 *)attn_buffer(m, "qkv_heads", l, 0);
        a->att_heads = (bf16 *)attn_buffer(m, "att_heads", l, 0);
    }
}

// Several GPUs with auto recompute or auto kept attention layers: each rank planned for its own free
// memory, but all must recompute the same layers (under sequence parallelism the recompute runs the
// attention's all-to-alls). Recompute is on everywhere if any rank needs it, and every rank keeps
// the attention of as few layers as the rank that could keep the fewest. Re-plans this rank's
// settings where they differ (both changes need less memory than the plan that fit, or a plan that
// mst_plan_auto finds within the rank's budgets).
static void agree_recompute(GpuModel *m, const MstSettings *asked, const MstKernelFigures *fig, size_t device_budget,
                            size_t host_budget) {
    int world = m->comm->world, rank = m->comm->rank;
    double *v = (double *)callocCheck(2 * (size_t)world, sizeof(double));
    v[rank] = m->plan.settings.recompute;
    v[world + rank] = mst_kept_layers(&m->plan.settings);
    comm_sum_host(m->comm, v, 2 * world);
    int recompute = 0, fewest = m->config.n_layers;
    for (int r = 0; r < world; r++) {
        if (v[r] > 0.5) recompute = 1;
        if ((int)v[world + r] < fewest) fewest = (int)v[world + r];
    }
    free(v);
    if (recompute && !m->plan.settings.recompute) {  // with recompute this rank needs less memory: it fits
        MstSettings t = *asked;
        t.recompute = 1;
        char msg[4096];
        if (!mst_plan_auto(&m->plan, &m->config, &t, fig, device_budget, host_budget, msg, sizeof(msg)))
            die("rank %d: another rank needs recompute, and with it this one does not fit: %s", rank, msg);
    }
    if (asked->attn_kept_layers == MST_KEPT_AUTO && mst_kept_layers(&m->plan.settings) != fewest) {
        MstSettings t = m->plan.settings;
        t.attn_kept_layers = fewest;
        mst_plan_build(&m->plan, &m->config, &t, fig);
    }
}

// The optimizer state's device buffers in the order of the state blob (gpu_model.h): the moments (8-bit:
// m codes, m scales, v codes, v scales), then the master weights when kept. Returns how many.
#define OPT_STATE_PIECES 5

static int opt_state_pieces(const GpuModel *m, void **ptr, size_t *bytes) {
    size_t n = m->n_train;
    int k = 0;
    if (m->settings.moments_8bit) {
        size_t blocks = m->adam8_layout.total;
        ptr[k] = m->adam_m; bytes[k++] = blocks * ADAM8_BLOCK;
        ptr[k] = m->adam_m_absmax; bytes[k++] = blocks * sizeof(float);
        ptr[k] = m->adam_v; bytes[k++] = blocks * ADAM8_BLOCK;
        ptr[k] = m->adam_v_absmax; bytes[k++] = blocks * sizeof(float);
    } else {
        ptr[k] = m->adam_m; bytes[k++] = n * dtype_bytes(m->settings.moment_type);
        ptr[k] = m->adam_v; bytes[k++] = n * dtype_bytes(m->settings.moment_type);
    }
    if (m->master) { ptr[k] = m->master; bytes[k++] = n * sizeof(float); }
    return k;
}

// cuBLASLt and cuDNN handles (with cuDNN's per-shape graph cache) live for the process, shared by
// every model it creates, so that building models one after another (tests) builds graphs once.
static int handles_ready = 0;

static void ensure_handles(void) {
    if (handles_ready) return;
    attention_init();
    matmul_init(MST_MATMUL_WORKSPACE);
    handles_ready = 1;
}

void gpu_model_release_handles(void) {
    if (!handles_ready) return;
    matmul_free();
    attention_free();
    handles_ready = 0;
}

static size_t physical_memory_bytes(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return (pages > 0 && page > 0) ? (size_t)pages * (size_t)page : 0;
}

// A quantized base: the embedding, final norm and LM head to params (without the layers between
// them, see P()), each layer's block through the dequantized-layer buffer into its quantized record.
static void upload_quantized_base(GpuModel *m, const uint16_t *params_bf16) {
    const ParamLayout *p = &m->layout;
    cudaStream_t st = m->stream;
    size_t layers_end = p->layers_begin + (size_t)m->config.n_layers * p->layer_size;
    cudaCheck(cudaMemcpyAsync(m->params, params_bf16, p->layers_begin * sizeof(uint16_t), cudaMemcpyHostToDevice, st));
    cudaCheck(cudaMemcpyAsync(P(m, layers_end), params_bf16 + layers_end, (p->total - layers_end) * sizeof(uint16_t),
                              cudaMemcpyHostToDevice, st));
    for (int l = 0; l < m->config.n_layers; l++) {
        cudaCheck(cudaMemcpyAsync(m->lora.wlayer, params_bf16 + p->layers_begin + (size_t)l * p->layer_size,
                                  p->layer_size * sizeof(uint16_t), cudaMemcpyHostToDevice, st));
        qbase_store_layer(&m->lora, p, l, m->lora.wlayer, st);
    }
}

typedef struct { GpuModel *m; uint64_t seed; cudaStream_t stream; } RandomInitCtx;

// One tensor of the benchmark init. With a quantized base, a layer's tensors are drawn into the
// dequantized-layer buffer and the layer is quantized into its record after its last tensor.
static void random_init_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    RandomInitCtx *x = (RandomInitCtx *)ctx;
    GpuModel *m = x->m;
    const ParamLayout *p = &m->layout;
    size_t in_layers = offset - p->layers_begin;
    int layer_tensor = quantized_base(m) && offset >= p->layers_begin && in_layers < (size_t)m->config.n_layers * p->layer_size;
    bf16 *out = layer_tensor ? m->lora.wlayer + in_layers % p->layer_size : P(m, offset);
    if (rows > 1) random_normal_fill(out, rows * cols, x->seed, offset, 0.02f, x->stream);
    else if (strstr(name, "norm")) constant_fill(out, cols, m->config.norm_offset ? 0.0f : 1.0f, x->stream);
    else constant_fill(out, cols, 0.0f, x->stream);  // biases
    if (layer_tensor && (in_layers + rows * cols) % p->layer_size == 0)
        qbase_store_layer(&m->lora, p, (int)(in_layers / p->layer_size), m->lora.wlayer, x->stream);
}

// The benchmark init of gpu_model_init (gpu_model.h), on the device: no host copy of the weights.
static void random_init_params(GpuModel *m, uint64_t seed, cudaStream_t stream) {
    RandomInitCtx ctx = {m, seed, stream};
    param_layout_visit(&m->layout, &m->config, random_init_tensor, &ctx);
}

// The side stream of the layers' updates (several GPUs: also of the gradient sums) and its events.
static void side_stream_init(GpuModel *m) {
    cudaCheck(cudaStreamCreateWithFlags(&m->grad_stream, cudaStreamNonBlocking));
    cudaEvent_t *events[] = {&m->ev_compute, &m->ev_grads_free[0], &m->ev_grads_free[1], &m->ev_head_free, &m->ev_grad_done};
    for (size_t i = 0; i < sizeof(events) / sizeof(events[0]); i++)
        cudaCheck(cudaEventCreateWithFlags(events[i], cudaEventDisableTiming));
}

static void side_stream_free(GpuModel *m) {
    cudaCheck(cudaStreamSynchronize(m->grad_stream));
    cudaEvent_t events[] = {m->ev_compute, m->ev_grads_free[0], m->ev_grads_free[1], m->ev_head_free, m->ev_grad_done};
    for (size_t i = 0; i < sizeof(events) / sizeof(events[0]); i++) cudaCheck(cudaEventDestroy(events[i]));
    cudaCheck(cudaStreamDestroy(m->grad_stream));
    m->grad_stream = NULL;
}

void gpu_model_init(GpuModel *m, const ModelConfig *c, const uint16_t *params_bf16, GpuSettings *s) {
    memset(m, 0, sizeof(*m));
    m->config = *c;
    param_layout_init(&m->layout, c);
    adam8_layout_init(&m->adam8_layout, &m->layout, c);
    if (s->moment_type != DT_FP32 && s->moment_type != DT_BF16) die("moment type %d is not fp32 or bf16", (int)s->moment_type);
    if (s->moments_8bit && s->lora.rank) die("8-bit moments are for full-parameter training, not LoRA adapters");
    m->comm = s->comm;
    m->sp = settings_sp(c, s, &m->heads);
    size_t free_b, total_b;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    ensure_handles();
    check_supported(c, s);  // dies naming the family and cuDNN's reason
    MstKernelFigures fig = kernel_figures(c, s, 0);

    MstSettings ms;
    memset(&ms, 0, sizeof(ms));
    ms.B = s->B;
    ms.S = s->S;
    ms.mst_chunks = s->mst_chunks;
    ms.vocab_chunk = s->vocab_chunk;
    ms.recompute = s->recompute;
    ms.attn_kept_layers = s->attn_kept_layers;
    ms.offload = s->offload;
    ms.host_layers = s->host_layers;
    ms.grad_accum_steps = s->grad_accum_steps;
    ms.moment_bytes = s->moments_8bit ? 1 : (int)dtype_bytes(s->moment_type);
    ms.master_weights = s->master_weights;
    ms.ranks = m->comm ? m->comm->world : 1;
    ms.seq_parallel = m->sp > 1;
    ms.overlap_optimizer = s->overlap_optimizer && s->grad_accum_steps == 1;
    ms.attn_head_groups = s->attn_head_groups;
    ms.attn_bwd_sliced = s->attn_bwd_sliced;
    ms.lora = s->lora;
    m->lora.cfg = s->lora;
    lora_layout_init(&m->lora.layout, c, &s->lora);
    quant_layer_layout_init(&m->lora.qlayout, &m->layout, s->lora.base_quant);
    m->n_train = s->lora.rank ? m->lora.layout.total : m->layout.total;
    if (s->gpu_mem_budget == 0) s->gpu_mem_budget = free_b > GPU_MEM_MARGIN ? free_b - GPU_MEM_MARGIN : 0;
    if (s->host_mem_budget == 0) s->host_mem_budget = mst_default_host_budget(physical_memory_bytes()) / (m->comm ? m->comm->local_world : 1);
    char msg[4096];
    // the attention backward in head groups is built only when one call does not fit (or is asked for)
    int fits = s->attn_head_groups <= 1 && s->attn_bwd_sliced != 1 &&
               mst_plan_auto(&m->plan, c, &ms, &fig, s->gpu_mem_budget, s->host_mem_budget, msg, sizeof(msg));
    if (!fits && c->attn_softcap == 0.0f && s->attn_head_groups != 1) {
        fig = kernel_figures(c, s, 1);
        fits = mst_plan_auto(&m->plan, c, &ms, &fig, s->gpu_mem_budget, s->host_mem_budget, msg, sizeof(msg));
    }
    if (!fits) die("%s %dx%d: refusing to start: %s", family_name(c->family), s->B, s->S, msg);
    if (m->comm && (s->recompute == MST_RECOMPUTE_AUTO || s->attn_kept_layers == MST_KEPT_AUTO))
        agree_recompute(m, &ms, &fig, s->gpu_mem_budget, s->host_mem_budget);
    s->recompute = m->plan.settings.recompute;
    s->mst_chunks = m->plan.settings.mst_chunks;
    s->vocab_chunk = m->plan.settings.vocab_chunk;
    s->host_layers = m->plan.host_layers;
    s->attn_head_groups = m->plan.settings.attn_head_groups > 1 ? m->plan.settings.attn_head_groups : 1;
    s->attn_bwd_sliced = m->plan.settings.attn_bwd_sliced;
    s->attn_kept_layers = mst_kept_layers(&m->plan.settings);
    m->settings = *s;

    size_t free_before, free_after;
    cudaCheck(cudaMemGetInfo(&free_before, &total_b));
    cudaCheck(cudaMalloc((void **)&m->arena, m->plan.device_total));
    cudaCheck(cudaMemGetInfo(&free_after, &total_b));
    m->arena_drop = free_before - free_after;
    if (m->plan.host_total > 0) cudaCheck(cudaHostAlloc((void **)&m->host_block, m->plan.host_total, cudaHostAllocDefault));
    bind_buffers(m);
    if (m->comm) dist_model_init(m);

    cudaCheck(cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking));
    cudaCheck(cudaStreamCreateWithFlags(&m->copy_stream, cudaStreamNonBlocking));
    if (m->comm || ms.overlap_optimizer) side_stream_init(m);
    for (int b = 0; b < 2; b++) {
        cudaCheck(cudaEventCreateWithFlags(&m->ev_written[b], cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&m->ev_saved[b], cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&m->ev_free[b], cudaEventDisableTiming));
        cudaCheck(cudaEventCreateWithFlags(&m->ev_fetched[b], cudaEventDisableTiming));
    }

    const ParamLayout *p = &m->layout;
    cudaStream_t st = m->stream;
    if (!params_bf16) random_init_params(m, s->init_seed, st);
    else if (quantized_base(m)) upload_quantized_base(m, params_bf16);
    else cudaCheck(cudaMemcpyAsync(m->params, params_bf16, p->total * sizeof(uint16_t), cudaMemcpyHostToDevice, st));
    size_t positions = (size_t)s->S * m->sp;  // sequence parallel: every position of the whole row
    float *rope = (float *)mallocCheck(positions * c->head_dim * sizeof(float));
    rope_table_fill(rope, (int)positions, c->head_dim, c->rope_theta, c->rope_scaling, c->rope_factor, c->rope_low_freq_factor,
                    c->rope_high_freq_factor, c->rope_orig_max_pos);
    cudaCheck(cudaMemcpyAsync(m->rope, rope, positions * c->head_dim * sizeof(float), cudaMemcpyHostToDevice, st));
    // the moments start at zero (several GPUs: this rank's parts; the master weights come from the weights below)
    static const char *const moments[] = {"adam_m", "adam_v", "adam_m_absmax", "adam_v_absmax"};
    for (size_t i = 0; i < sizeof(moments) / sizeof(moments[0]); i++) {
        const PlanEntry *e = mst_plan_find(&m->plan, moments[i]);
        if (e) cudaCheck(cudaMemsetAsync(plan_req(m, moments[i], 0), 0, e->bytes, st));
    }
    if (m->grads) cudaCheck(cudaMemsetAsync(m->grads, 0, p->total * sizeof(float), st));
    if (s->lora.rank) {
        float *adapters = (float *)mallocCheck(m->n_train * sizeof(float));
        lora_init_params(adapters, &m->lora.layout, s->lora_seed);
        gpu_model_set_lora(m, adapters);  // also the master copy
        free(adapters);
        if (!m->lora.grads_per_layer) cudaCheck(cudaMemsetAsync(m->lora.grads, 0, m->n_train * sizeof(float), st));
    } else if (m->master && m->comm) {
        dist_init_master(m);
    } else if (m->master) {
        cast_bf16_to_fp32(m->master, m->params, p->total, st);
    }
    cudaCheck(cudaStreamSynchronize(st));
    free(rope);

    int N = m->plan.n_tokens;
    m->h_counts = (int32_t *)mallocCheck((size_t)c->vocab_size * sizeof(int32_t));
    m->h_unique = (int32_t *)mallocCheck((size_t)N * sizeof(int32_t));
    m->h_offsets = (int32_t *)mallocCheck((size_t)(N + 1) * sizeof(int32_t));
    m->h_positions = (int32_t *)mallocCheck((size_t)N * sizeof(int32_t));
    m->h_tokens = (int32_t *)mallocCheck((size_t)s->S * sizeof(int32_t));
}

void gpu_model_print_plan(const GpuModel *m, FILE *f) { mst_plan_print(&m->plan, f); }

// Room for the marks of one step: about ten per layer, with MsT chunks adding none (regions
// enclose the chunk loops).
void gpu_model_profile_enable(GpuModel *m) {
    if (m->profile != NULL) return;
    m->profile = (StepProfile *)mallocCheck(sizeof(StepProfile));
    step_profile_init(m->profile, 64 + 16 * m->config.n_layers);
}

void gpu_model_profile_reset(GpuModel *m) {
    if (m->profile != NULL) step_profile_reset(m->profile);
}

void gpu_model_profile_print(const GpuModel *m, FILE *f) {
    if (m->profile != NULL) step_profile_print(m->profile, f);
}

void gpu_model_get_params(GpuModel *m, uint16_t *params_bf16_host) {
    if (quantized_base(m)) die("gpu_model_get_params: the base is stored quantized (%s): its bf16 weights are not kept",
                               base_quant_name(m->lora.cfg.base_quant));
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaMemcpy(params_bf16_host, m->params, m->layout.total * sizeof(uint16_t), cudaMemcpyDeviceToHost));
}

#define OPT_STATE_TRAILER 16

void gpu_model_get_lora(GpuModel *m, float *host) {
    if (m->lora.cfg.rank == 0) die("gpu_model_get_lora: the model has no LoRA adapters");
    size_t n = m->n_train;
    uint16_t *bits = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaMemcpy(bits, m->lora.params, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) host[i] = bf16_bits_to_float(bits[i]);
    free(bits);
}

// The adapters rounded to bf16 (and, with master weights, kept exactly in the fp32 master copy).
void gpu_model_set_lora(GpuModel *m, const float *host) {
    if (m->lora.cfg.rank == 0) die("gpu_model_set_lora: the model has no LoRA adapters");
    size_t n = m->n_train;
    uint16_t *bits = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) bits[i] = float_to_bf16_bits(host[i]);
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaMemcpy(m->lora.params, bits, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    if (m->master) cudaCheck(cudaMemcpy(m->master, host, n * sizeof(float), cudaMemcpyHostToDevice));
    free(bits);
}

size_t gpu_model_optimizer_state_bytes(const GpuModel *m) {
    void *ptr[OPT_STATE_PIECES];
    size_t bytes[OPT_STATE_PIECES], total = OPT_STATE_TRAILER;
    int n = opt_state_pieces(m, ptr, bytes);
    for (int i = 0; i < n; i++) total += bytes[i];
    return total;
}

// Several GPUs: every rank calls it; rank 0 gathers the whole state (the others may pass NULL).
void gpu_model_get_optimizer_state(GpuModel *m, void *host) {
    void *ptr[OPT_STATE_PIECES];
    size_t bytes[OPT_STATE_PIECES], at = 0;
    int n = opt_state_pieces(m, ptr, bytes);
    char *h = (char *)host;
    if (m->comm) {
        dist_get_optimizer_state(m, h);
        if (h == NULL) return;
        for (int i = 0; i < n; i++) at += bytes[i];
    } else {
        cudaCheck(cudaStreamSynchronize(m->stream));
        for (int i = 0; i < n; i++) {
            cudaCheck(cudaMemcpy(h + at, ptr[i], bytes[i], cudaMemcpyDeviceToHost));
            at += bytes[i];
        }
    }
    int32_t trailer[4] = {0, m->has_prev_norm, 0, 0};
    memcpy(&trailer[0], &m->prev_grad_norm, sizeof(float));
    memcpy(h + at, trailer, sizeof(trailer));
}

// Several GPUs: every rank passes the whole state and keeps its parts.
void gpu_model_set_optimizer_state(GpuModel *m, const void *host) {
    void *ptr[OPT_STATE_PIECES];
    size_t bytes[OPT_STATE_PIECES], at = 0;
    int n = opt_state_pieces(m, ptr, bytes);
    const char *h = (const char *)host;
    cudaCheck(cudaStreamSynchronize(m->stream));
    if (m->comm) {
        dist_set_optimizer_state(m, h);
        for (int i = 0; i < n; i++) at += bytes[i];
    } else {
        for (int i = 0; i < n; i++) {
            cudaCheck(cudaMemcpy(ptr[i], h + at, bytes[i], cudaMemcpyHostToDevice));
            at += bytes[i];
        }
    }
    int32_t trailer[4];
    memcpy(trailer, h + at, sizeof(trailer));
    memcpy(&m->prev_grad_norm, &trailer[0], sizeof(float));
    m->has_prev_norm = trailer[1] != 0;
}

void gpu_model_memory_report(GpuModel *m, MemoryReport *r) {
    size_t free_b, total_b;
    cudaCheck(cudaMemGetInfo(&free_b, &total_b));
    r->planned = m->plan.device_total;
    r->arena = m->plan.device_total;
    r->arena_drop = m->arena_drop;
    r->device_used = total_b - free_b;
    r->device_total = total_b;
    r->host_pinned = m->plan.host_total;
    if (r->device_used > m->peak_used) m->peak_used = r->device_used;
    r->peak_used = m->peak_used;
}

void gpu_model_debug_grads(GpuModel *m, float *grads_host) {
    const float *grads = m->lora.cfg.rank ? (m->lora.grads_per_layer ? NULL : m->lora.grads) : m->grads;
    if (grads == NULL) die("gradients are kept only with grad_accum_steps > 1 (optimizer-in-backward consumes them)");
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaMemcpy(grads_host, grads, m->n_train * sizeof(float), cudaMemcpyDeviceToHost));
}

void gpu_model_free(GpuModel *m) {
    cudaCheck(cudaStreamSynchronize(m->stream));
    cudaCheck(cudaStreamSynchronize(m->copy_stream));
    if (m->comm) dist_model_free(m);
    if (m->grad_stream) side_stream_free(m);
    for (int b = 0; b < 2; b++) {
        cudaCheck(cudaEventDestroy(m->ev_written[b]));
        cudaCheck(cudaEventDestroy(m->ev_saved[b]));
        cudaCheck(cudaEventDestroy(m->ev_free[b]));
        cudaCheck(cudaEventDestroy(m->ev_fetched[b]));
    }
    cudaCheck(cudaStreamDestroy(m->stream));
    cudaCheck(cudaStreamDestroy(m->copy_stream));
    if (m->profile != NULL) {
        step_profile_free(m->profile);
        free(m->profile);
        m->profile = NULL;
    }
    cudaCheck(cudaFree(m->arena));
    if (m->host_block) cudaCheck(cudaFreeHost(m->host_block));
    free(m->acts);
    free(m->h_counts);
    free(m->h_unique);
    free(m->h_offsets);
    free(m->h_positions);
    free(m->h_tokens);
    memset(m, 0, sizeof(*m));
}

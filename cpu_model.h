// The CPU reference model: forward, backward and AdamW for every family (Llama-2/3, Mistral,
// Qwen2, Gemma-2) in plain C, fp32, with OpenMP on the heavy loops. It is the correctness anchor
// that every GPU test is compared with, and the path train_llama takes on a machine without a GPU.
//
// It computes exactly what Hugging Face transformers computes (checked against HF in float64 by
// tests/test_cpu_model.c), per layer:
//   a = attn_norm(x); q,k,v = a Wq^T (+bq), a Wk^T (+bk), a Wv^T (+bv); RoPE on q,k
//   s = query_scale * q.k; [s = cap tanh(s/cap)]; causal (+ sliding window) mask; softmax; att = P v
//   o = att Wo^T; [o = post_attn_norm(o)]; x = x + o
//   m = mlp_norm(x); h = act(m Wg^T) * (m Wu^T); y = h Wd^T; [y = post_mlp_norm(y)]; x = x + y
// then logits = final_norm(x) W_lm^T, [logits = cap tanh(logits/cap)], cross-entropy.
// Shapes: N = B*S token rows, d = d_model, qd = Hq*hd, kvd = Hkv*hd, F = d_ff, V = vocab.
// Every activation lives in one host allocation laid out by cpu_act_sizes() (llm.c style), so
// cpu_model_bytes() can say what a run needs before anything is allocated.
// Plain C99, also valid C++ (casts on allocations). Build with -fopenmp for threads.
#ifndef CPU_MODEL_H
#define CPU_MODEL_H

#include <math.h>
#include "adamw8bit.h"
#include "lora.h"
#include "model_config.h"

// Loops with less work than this (in multiply-adds or elements) run on one thread: for tiny
// shapes, waking the thread team costs more than the loop.
#define CPU_PARALLEL_MIN_WORK 32768

// ----------------------------------------------------------------------------
// Activation layout. Per-layer tensors hold all L layers back to back.
typedef enum {
    CA_RESID,      // (L+1, N, d) residual stream: input of layer l; [L] is the final hidden state
    CA_LN1,        // (L, N, d)  attn_norm output
    CA_RSTD1,      // (L, N)
    CA_Q,          // (L, N, qd) queries after RoPE
    CA_K,          // (L, N, kvd) keys after RoPE
    CA_V,          // (L, N, kvd)
    CA_PROBS,      // (L, B, Hq, S, S) attention probabilities, 0 where masked
    CA_ATT,        // (L, N, qd) attention output, input of o_proj
    CA_O,          // (L, N, d)  o_proj output (kept only with post_norms: input of post_attn_norm)
    CA_RSTD_PO,    // (L, N)     post_attn_norm rstd (post_norms only)
    CA_XMID,       // (L, N, d)  residual after the attention block
    CA_LN2,        // (L, N, d)  mlp_norm output
    CA_RSTD2,      // (L, N)
    CA_GATE,       // (L, N, F)  gate projection (pre-activation)
    CA_UP,         // (L, N, F)  up projection
    CA_H,          // (L, N, F)  act(gate) * up, input of down_proj
    CA_MLP,        // (L, N, d)  down_proj output (post_norms only: input of post_mlp_norm)
    CA_RSTD_PM,    // (L, N)     post_mlp_norm rstd (post_norms only)
    CA_LNF,        // (N, d)     final_norm output
    CA_RSTDF,      // (N)
    CA_LOGITS,     // (N, V)     logits after the final soft-cap
    CA_LSE,        // (N)        log-sum-exp of each logits row
    CA_ROPE_COS,   // (S, hd/2)
    CA_ROPE_SIN,   // (S, hd/2)
    // backward scratch, one layer at a time
    CA_DRES,       // (N, d)  gradient of the residual stream
    CA_DNORM,      // (N, d)  gradient of a norm's output
    CA_DPOST,      // (N, d)  gradient of a post-norm's input
    CA_DQ,         // (N, qd)
    CA_DK,         // (N, kvd)
    CA_DV,         // (N, kvd)
    CA_DATT,       // (N, qd)
    CA_DSCORES,    // (B, Hq, S, S) gradient of the pre-softmax scores
    CA_DH,         // (N, F)  gradient of h, then of gate (in place)
    CA_DUP,        // (N, F)
    CA_DLOGITS,    // (N, V)
    CA_COUNT
} CpuActTensor;

// Elements of each activation tensor for a config and batch shape (B, S).
static inline void cpu_act_sizes(size_t sizes[CA_COUNT], const ModelConfig *c, int B, int S) {
    size_t L = (size_t)c->n_layers, N = (size_t)B * S, d = (size_t)c->d_model;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t F = (size_t)c->d_ff, V = (size_t)c->vocab_size, post = (size_t)c->post_norms;
    size_t att = (size_t)B * c->n_heads * S * S, half = (size_t)c->head_dim / 2;
    sizes[CA_RESID] = (L + 1) * N * d;
    sizes[CA_LN1] = L * N * d;
    sizes[CA_RSTD1] = L * N;
    sizes[CA_Q] = L * N * qd;
    sizes[CA_K] = L * N * kvd;
    sizes[CA_V] = L * N * kvd;
    sizes[CA_PROBS] = L * att;
    sizes[CA_ATT] = L * N * qd;
    sizes[CA_O] = post * L * N * d;
    sizes[CA_RSTD_PO] = post * L * N;
    sizes[CA_XMID] = L * N * d;
    sizes[CA_LN2] = L * N * d;
    sizes[CA_RSTD2] = L * N;
    sizes[CA_GATE] = L * N * F;
    sizes[CA_UP] = L * N * F;
    sizes[CA_H] = L * N * F;
    sizes[CA_MLP] = post * L * N * d;
    sizes[CA_RSTD_PM] = post * L * N;
    sizes[CA_LNF] = N * d;
    sizes[CA_RSTDF] = N;
    sizes[CA_LOGITS] = N * V;
    sizes[CA_LSE] = N;
    sizes[CA_ROPE_COS] = (size_t)S * half;
    sizes[CA_ROPE_SIN] = (size_t)S * half;
    sizes[CA_DRES] = N * d;
    sizes[CA_DNORM] = N * d;
    sizes[CA_DPOST] = N * d;
    sizes[CA_DQ] = N * qd;
    sizes[CA_DK] = N * kvd;
    sizes[CA_DV] = N * kvd;
    sizes[CA_DATT] = N * qd;
    sizes[CA_DSCORES] = att;
    sizes[CA_DH] = N * F;
    sizes[CA_DUP] = N * F;
    sizes[CA_DLOGITS] = N * V;
}

// One layer's saved activations (pointers into the activation block), for the current (B, S).
typedef struct {
    float *x, *ln1, *rstd1, *q, *k, *v, *probs, *att, *o, *rstd_po, *x_mid, *ln2, *rstd2;
    float *gate, *up, *h, *mlp, *rstd_pm, *x_out;
} CpuLayerActs;

typedef struct {
    ModelConfig c;
    ParamLayout layout;
    float *params;        // (layout.total) fp32 weights in model.bin order
    float *grads;         // (layout.total) accumulated by cpu_model_backward
    int max_B, max_S;
    float *acts_memory;   // one block holding every activation tensor, sized for (max_B, max_S)
    float *acts[CA_COUNT];
    int32_t *tokens;      // (max_B * max_S) inputs of the last forward
    int32_t *targets;     // (max_B * max_S) targets of the last forward (-1: ignored)
    int B, S;             // shape of the last forward
    int has_targets;      // 1 when the last forward computed a loss (backward needs it)
    int n_valid;          // targets >= 0 in the last forward
    double loss;          // mean cross-entropy of the last forward, in double
    float *logits;        // (B, S, V) of the last forward (== acts[CA_LOGITS])
    // LoRA (cpu_model_init_lora): adapters on a frozen base. grads is then NULL: the base has none.
    LoraConfig lora;      // rank 0: no LoRA, every parameter trains
    LoraLayout lora_layout;
    float *lora_params, *lora_grads;  // (lora_layout.total)
    float *lora_u, *lora_du;          // scratch (max_B * max_S, rank)
} CpuModel;

// Host bytes cpu_model_init allocates for config c and batch shape (B, S).
static inline size_t cpu_model_bytes(const ModelConfig *c, int B, int S) {
    ParamLayout layout;
    param_layout_init(&layout, c);
    size_t sizes[CA_COUNT], acts = 0;
    cpu_act_sizes(sizes, c, B, S);
    for (int i = 0; i < CA_COUNT; i++) acts += sizes[i];
    return (2 * layout.total + acts) * sizeof(float) + 2 * (size_t)B * S * sizeof(int32_t);
}

// Allocates params, grads (zeroed) and activations for up to (max_B, max_S). Prints nothing.
static inline void cpu_model_init(CpuModel *m, const ModelConfig *c, int max_B, int max_S) {
    char msg[512];
    const char *err = config_validate(c, msg, sizeof(msg));
    if (err) die("cpu_model_init: %s", err);
    if (max_B < 1 || max_S < 1) die("cpu_model_init: batch shape (%d, %d) must be positive", max_B, max_S);
    memset(m, 0, sizeof(*m));
    m->c = *c;
    param_layout_init(&m->layout, c);
    m->max_B = max_B;
    m->max_S = max_S;
    m->params = (float *)mallocCheck(m->layout.total * sizeof(float));
    m->grads = (float *)callocCheck(m->layout.total, sizeof(float));
    size_t sizes[CA_COUNT], total = 0;
    cpu_act_sizes(sizes, c, max_B, max_S);
    for (int i = 0; i < CA_COUNT; i++) total += sizes[i];
    m->acts_memory = (float *)callocCheck(total, sizeof(float));
    float *p = m->acts_memory;
    for (int i = 0; i < CA_COUNT; i++) {
        m->acts[i] = p;
        p += sizes[i];
    }
    m->tokens = (int32_t *)callocCheck((size_t)max_B * max_S, sizeof(int32_t));
    m->targets = (int32_t *)callocCheck((size_t)max_B * max_S, sizeof(int32_t));
    m->logits = m->acts[CA_LOGITS];
}

// Host bytes cpu_model_init_lora adds for LoRA lc (cpu_model_bytes counted the base gradients,
// which LoRA frees): adapters and their gradients, the (N, r) scratch, minus the base gradients.
static inline long long cpu_lora_bytes(const ModelConfig *c, const LoraConfig *lc, int B, int S) {
    if (lc->rank == 0) return 0;
    ParamLayout layout;
    LoraLayout L;
    param_layout_init(&layout, c);
    lora_layout_init(&L, c, lc);
    size_t n = 2 * L.total + 2 * (size_t)B * S * lc->rank;
    return (long long)(n * sizeof(float)) - (long long)(layout.total * sizeof(float));
}

// Switches the model (after cpu_model_init, before loading weights) to LoRA lc: the base is frozen
// (its gradients are freed), the adapters get PEFT's initialization from `seed`, and with a
// quantized base cpu_model_load_bf16 stores every projection as the GPU computes with it.
static inline void cpu_model_init_lora(CpuModel *m, const LoraConfig *lc, uint64_t seed) {
    char msg[256];
    if (lora_config_check(lc, msg, sizeof(msg))) die("cpu_model_init_lora: %s", msg);
    if (lc->rank < 1) die("cpu_model_init_lora: LoRA needs rank >= 1");
    m->lora = *lc;
    lora_layout_init(&m->lora_layout, &m->c, lc);
    free(m->grads);
    m->grads = NULL;
    m->lora_params = (float *)mallocCheck(m->lora_layout.total * sizeof(float));
    m->lora_grads = (float *)callocCheck(m->lora_layout.total, sizeof(float));
    size_t scratch = (size_t)m->max_B * m->max_S * lc->rank;
    m->lora_u = (float *)callocCheck(scratch, sizeof(float));
    m->lora_du = (float *)callocCheck(scratch, sizeof(float));
    lora_init_params(m->lora_params, &m->lora_layout, seed);
}

// Copies n trainable values (the adapters with LoRA, else every parameter).
static inline size_t cpu_model_trainable(const CpuModel *m) { return m->lora.rank ? m->lora_layout.total : m->layout.total; }
static inline float *cpu_model_trainable_params(CpuModel *m) { return m->lora.rank ? m->lora_params : m->params; }
static inline float *cpu_model_trainable_grads(CpuModel *m) { return m->lora.rank ? m->lora_grads : m->grads; }

// params (layout.total bf16 bits, model.bin order) -> fp32 params. With a quantized base (LoRA), every
// layer projection is replaced by its quantized-then-dequantized bf16 value (quant.h).
static inline void cpu_model_load_bf16(CpuModel *m, const uint16_t *params_bf16) {
    for (size_t i = 0; i < m->layout.total; i++) m->params[i] = bf16_bits_to_float(params_bf16[i]);
    if (m->lora.base_quant == BASE_QUANT_NONE) return;
    for (int l = 0; l < m->c.n_layers; l++) {
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            int lt = lora_target_tensor(t);
            quant_round_trip_cpu(m->lora.base_quant, m->params + param_offset(&m->layout, l, lt),
                                 m->layout.layer.rows[lt] * m->layout.layer.cols[lt]);
        }
    }
}

// fp32 params -> out (layout.total bf16 bits, round to nearest even), e.g. for a checkpoint.
static inline void cpu_model_store_bf16(const CpuModel *m, uint16_t *out) {
    for (size_t i = 0; i < m->layout.total; i++) out[i] = float_to_bf16_bits(m->params[i]);
}

static inline void cpu_model_zero_grad(CpuModel *m) {
    memset(cpu_model_trainable_grads(m), 0, cpu_model_trainable(m) * sizeof(float));
}

static inline void cpu_model_free(CpuModel *m) {
    free(m->params);
    free(m->grads);
    free(m->acts_memory);
    free(m->tokens);
    free(m->targets);
    free(m->lora_params);
    free(m->lora_grads);
    free(m->lora_u);
    free(m->lora_du);
    memset(m, 0, sizeof(*m));
}

// Layer l's activations for the current (B, S): per-layer tensors are indexed with the current
// N, so a smaller batch uses a prefix of each tensor's region.
static inline CpuLayerActs cpu_layer_acts(const CpuModel *m, int l) {
    const ModelConfig *c = &m->c;
    size_t N = (size_t)m->B * m->S, d = (size_t)c->d_model, F = (size_t)c->d_ff;
    size_t qd = (size_t)c->n_heads * c->head_dim, kvd = (size_t)c->n_kv_heads * c->head_dim;
    size_t att = (size_t)m->B * c->n_heads * m->S * m->S;
    CpuLayerActs a;
    a.x = m->acts[CA_RESID] + l * N * d;
    a.x_out = a.x + N * d;
    a.ln1 = m->acts[CA_LN1] + l * N * d;
    a.rstd1 = m->acts[CA_RSTD1] + l * N;
    a.q = m->acts[CA_Q] + l * N * qd;
    a.k = m->acts[CA_K] + l * N * kvd;
    a.v = m->acts[CA_V] + l * N * kvd;
    a.probs = m->acts[CA_PROBS] + l * att;
    a.att = m->acts[CA_ATT] + l * N * qd;
    a.o = c->post_norms ? m->acts[CA_O] + l * N * d : NULL;
    a.rstd_po = c->post_norms ? m->acts[CA_RSTD_PO] + l * N : NULL;
    a.x_mid = m->acts[CA_XMID] + l * N * d;
    a.ln2 = m->acts[CA_LN2] + l * N * d;
    a.rstd2 = m->acts[CA_RSTD2] + l * N;
    a.gate = m->acts[CA_GATE] + l * N * F;
    a.up = m->acts[CA_UP] + l * N * F;
    a.h = m->acts[CA_H] + l * N * F;
    a.mlp = c->post_norms ? m->acts[CA_MLP] + l * N * d : NULL;
    a.rstd_pm = c->post_norms ? m->acts[CA_RSTD_PM] + l * N : NULL;
    return a;
}

// ----------------------------------------------------------------------------
// Building blocks. Each writes its outputs and, in backward, accumulates (+=) into gradients.

// out (N, OC) = inp (N, C) . w (OC, C)^T + bias (OC; NULL: none).
// Four input rows share each weight row load; dot products accumulate in float.
static inline void cpu_matmul_forward(float *out, const float *inp, const float *w, const float *bias,
                                      int N, int C, int OC) {
    int blocks = (N + 3) / 4;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)N * C * OC > CPU_PARALLEL_MIN_WORK)
    for (int b = 0; b < blocks; b++) {
        for (int o = 0; o < OC; o++) {
            const float *wr = w + (size_t)o * C;
            int n0 = 4 * b, rows = N - n0 < 4 ? N - n0 : 4;
            const float *x0 = inp + (size_t)n0 * C;
            const float *x1 = rows > 1 ? x0 + C : x0, *x2 = rows > 2 ? x0 + 2 * (size_t)C : x0;
            const float *x3 = rows > 3 ? x0 + 3 * (size_t)C : x0;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int i = 0; i < C; i++) {
                s0 += x0[i] * wr[i];
                s1 += x1[i] * wr[i];
                s2 += x2[i] * wr[i];
                s3 += x3[i] * wr[i];
            }
            float bo = bias ? bias[o] : 0.0f, s[4] = {s0, s1, s2, s3};
            for (int r = 0; r < rows; r++) out[(size_t)(n0 + r) * OC + o] = s[r] + bo;
        }
    }
}

// y[r] (C) += a[r] * x (C) for the first `rows` (1..4) rows: one load of x serves every row.
static inline void cpu_axpy_rows(float *const y[4], const float a[4], const float *x, int rows, int C) {
    if (rows == 4) {
        float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
        float a0 = a[0], a1 = a[1], a2 = a[2], a3 = a[3];
#pragma omp simd
        for (int i = 0; i < C; i++) {
            float xi = x[i];
            y0[i] += a0 * xi;
            y1[i] += a1 * xi;
            y2[i] += a2 * xi;
            y3[i] += a3 * xi;
        }
        return;
    }
    for (int r = 0; r < rows; r++) {
        float *yr = y[r], ar = a[r];
#pragma omp simd
        for (int i = 0; i < C; i++) yr[i] += ar * x[i];
    }
}

// Backward of cpu_matmul_forward: dinp (N, C) += dout (N, OC) . w (OC, C);
// dw (OC, C) += dout^T . inp (sum over the N rows in float; skipped when dw is NULL: a frozen weight);
// dbias (OC) += column sums of dout (in double; skipped when dbias is NULL). Rows are updated four
// at a time (cpu_axpy_rows).
static inline void cpu_matmul_backward(float *dinp, float *dw, float *dbias, const float *dout,
                                       const float *inp, const float *w, int N, int C, int OC) {
    int n_blocks = (N + 3) / 4, o_blocks = (OC + 3) / 4;
#pragma omp parallel for schedule(static) if ((size_t)N * C * OC > CPU_PARALLEL_MIN_WORK)
    for (int b = 0; b < n_blocks; b++) {
        int n0 = 4 * b, rows = N - n0 < 4 ? N - n0 : 4;
        float *dx[4] = {NULL, NULL, NULL, NULL}, g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int r = 0; r < rows; r++) dx[r] = dinp + (size_t)(n0 + r) * C;
        for (int o = 0; o < OC; o++) {
            for (int r = 0; r < rows; r++) g[r] = dout[(size_t)(n0 + r) * OC + o];
            cpu_axpy_rows(dx, g, w + (size_t)o * C, rows, C);
        }
    }
    if (dw == NULL) o_blocks = 0;
#pragma omp parallel for schedule(static) if ((size_t)N * C * OC > CPU_PARALLEL_MIN_WORK)
    for (int b = 0; b < o_blocks; b++) {
        int o0 = 4 * b, rows = OC - o0 < 4 ? OC - o0 : 4;
        float *dwr[4] = {NULL, NULL, NULL, NULL}, g[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int r = 0; r < rows; r++) dwr[r] = dw + (size_t)(o0 + r) * C;
        for (int n = 0; n < N; n++) {
            for (int r = 0; r < rows; r++) g[r] = dout[(size_t)n * OC + o0 + r];
            cpu_axpy_rows(dwr, g, inp + (size_t)n * C, rows, C);
        }
    }
    if (dbias) {
#pragma omp parallel for schedule(static) if ((size_t)N * OC > CPU_PARALLEL_MIN_WORK)
        for (int o = 0; o < OC; o++) {
            double s = 0.0;
            for (int n = 0; n < N; n++) s += dout[(size_t)n * OC + o];
            dbias[o] += (float)s;
        }
    }
}

// RMSNorm: out (N, d) = x * rstd * (w + offset), rstd (N) = 1 / sqrt(mean(x^2) + eps).
// offset is 1 for Gemma ((1 + w) scaling), else 0. Mean of squares in double.
static inline void cpu_rmsnorm_forward(float *out, float *rstd, const float *x, const float *w, int N, int d,
                                       float eps, int offset) {
#pragma omp parallel for schedule(static) if ((size_t)N * d > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * d;
        double ss = 0.0;
        for (int i = 0; i < d; i++) ss += (double)xr[i] * xr[i];
        float r = (float)(1.0 / sqrt(ss / d + (double)eps));
        rstd[n] = r;
        float *yr = out + (size_t)n * d;
        for (int i = 0; i < d; i++) yr[i] = (xr[i] * r) * (w[i] + (float)offset);
    }
}

// Backward of cpu_rmsnorm_forward: with xh = x * rstd and g = dout * (w + offset),
// dx (N, d) += rstd * (g - xh * mean(g * xh)); dw (d) += sum over rows of dout * xh (in double;
// skipped when dw is NULL: a frozen weight).
static inline void cpu_rmsnorm_backward(float *dx, float *dw, const float *dout, const float *x, const float *rstd,
                                        const float *w, int N, int d, int offset) {
#pragma omp parallel for schedule(static) if ((size_t)N * d > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *xr = x + (size_t)n * d, *gr = dout + (size_t)n * d;
        float r = rstd[n];
        double dot = 0.0;
        for (int i = 0; i < d; i++) dot += (double)(gr[i] * (w[i] + (float)offset)) * (xr[i] * r);
        float mean = (float)(dot / d);
        float *dxr = dx + (size_t)n * d;
        for (int i = 0; i < d; i++) dxr[i] += r * (gr[i] * (w[i] + (float)offset) - xr[i] * r * mean);
    }
    if (dw == NULL) return;
#pragma omp parallel for schedule(static) if ((size_t)N * d > CPU_PARALLEL_MIN_WORK)
    for (int i = 0; i < d; i++) {
        double s = 0.0;
        for (int n = 0; n < N; n++) s += (double)dout[(size_t)n * d + i] * (x[(size_t)n * d + i] * rstd[n]);
        dw[i] += (float)s;
    }
}

// RoPE tables cos, sin (S, hd/2) for positions 0..S-1, computed as Hugging Face does: inverse
// frequencies theta^(-2i/hd) in float32 (with Llama-3 scaling per _compute_llama3_parameters),
// angle = position * inv_freq in float32.
static inline void cpu_rope_tables(float *cos_t, float *sin_t, const ModelConfig *c, int S) {
    int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        float inv = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)c->head_dim);
        if (c->rope_scaling == ROPE_SCALING_LLAMA3) {
            float old_ctx = (float)c->rope_orig_max_pos;
            float low_wavelen = old_ctx / c->rope_low_freq_factor;
            float high_wavelen = old_ctx / c->rope_high_freq_factor;
            float wavelen = 6.28318530717958647692f / inv;  // 2 pi
            if (wavelen > low_wavelen) {
                inv = inv / c->rope_factor;
            } else if (!(wavelen < high_wavelen)) {
                float smooth = (old_ctx / wavelen - c->rope_low_freq_factor) /
                               (c->rope_high_freq_factor - c->rope_low_freq_factor);
                inv = (1.0f - smooth) * inv / c->rope_factor + smooth * inv;
            }
        }
        for (int p = 0; p < S; p++) {
            float angle = (float)p * inv;
            cos_t[(size_t)p * half + i] = cosf(angle);
            sin_t[(size_t)p * half + i] = sinf(angle);
        }
    }
}

// In-place RoPE on x (B*S, H, hd), rotate_half convention: dimension i pairs with i + hd/2.
// sign = +1 rotates forward; sign = -1 applies the transpose (the backward of the rotation).
static inline void cpu_rope_apply(float *x, const float *cos_t, const float *sin_t, int B, int S, int H, int hd,
                                  float sign) {
    int half = hd / 2;
#pragma omp parallel for collapse(2) schedule(static) if ((size_t)B * S * H * hd > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < B * S; n++) {
        for (int h = 0; h < H; h++) {
            int pos = n % S;
            float *v = x + ((size_t)n * H + h) * hd;
            const float *cr = cos_t + (size_t)pos * half, *sr = sin_t + (size_t)pos * half;
            for (int i = 0; i < half; i++) {
                float a = v[i], b = v[i + half], cs = cr[i], sn = sign * sr[i];
                v[i] = a * cs - b * sn;
                v[i + half] = b * cs + a * sn;
            }
        }
    }
}

// First key visible to query i: i - window + 1 on sliding layers (HF: kv > q - window), else 0.
static inline int cpu_attn_first_key(int i, int window) {
    int lo = window > 0 ? i - window + 1 : 0;
    return lo > 0 ? lo : 0;
}

static inline float cpu_dot(const float *a, const float *b, int n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// Causal GQA attention. q (N, Hq, hd), k, v (N, Hkv, hd) -> probs (B, Hq, S, S), out (N, Hq, hd).
// Query head h reads kv head h / (Hq / Hkv). scores = scale * q.k, soft-capped when softcap > 0,
// keys j with first_key(i) <= j <= i visible; softmax sums in double.
static inline void cpu_attention_forward(float *out, float *probs, const float *q, const float *k, const float *v,
                                         int B, int S, int Hq, int Hkv, int hd, float scale, float softcap,
                                         int window) {
    int group = Hq / Hkv;
#pragma omp parallel for collapse(3) schedule(static) if ((size_t)B * Hq * S * S * hd > CPU_PARALLEL_MIN_WORK)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hq; h++) {
            for (int i = 0; i < S; i++) {
                const float *qi = q + (((size_t)b * S + i) * Hq + h) * hd;
                float *p = probs + (((size_t)b * Hq + h) * S + i) * S;
                int lo = cpu_attn_first_key(i, window), g = h / group;
                float maxv = -INFINITY;
                for (int j = 0; j < S; j++) {
                    if (j < lo || j > i) {
                        p[j] = 0.0f;
                        continue;
                    }
                    float s = scale * cpu_dot(qi, k + (((size_t)b * S + j) * Hkv + g) * hd, hd);
                    if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
                    p[j] = s;
                    if (s > maxv) maxv = s;
                }
                double sum = 0.0;
                for (int j = lo; j <= i; j++) {
                    p[j] = expf(p[j] - maxv);
                    sum += p[j];
                }
                float inv = (float)(1.0 / sum);
                float *o = out + (((size_t)b * S + i) * Hq + h) * hd;
                for (int t = 0; t < hd; t++) o[t] = 0.0f;
                for (int j = lo; j <= i; j++) {
                    p[j] *= inv;
                    const float *vj = v + (((size_t)b * S + j) * Hkv + g) * hd;
#pragma omp simd
                    for (int t = 0; t < hd; t++) o[t] += p[j] * vj[t];
                }
            }
        }
    }
}

// Backward of cpu_attention_forward. dout (N, Hq, hd) -> dq (N, Hq, hd) written, dk, dv (N, Hkv, hd)
// written; dscores (B, Hq, S, S) is scratch holding d(score) already multiplied by scale.
// Pass 1 (one query row at a time): dp = dout.v, softmax and soft-cap backward, dq.
// Pass 2 (one key row at a time, summing over the query heads of its group): dk, dv.
static inline void cpu_attention_backward(float *dq, float *dk, float *dv, float *dscores, const float *dout,
                                          const float *probs, const float *q, const float *k, const float *v,
                                          int B, int S, int Hq, int Hkv, int hd, float scale, float softcap,
                                          int window) {
    int group = Hq / Hkv;
#pragma omp parallel for collapse(3) schedule(static) if ((size_t)B * Hq * S * S * hd > CPU_PARALLEL_MIN_WORK)
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hq; h++) {
            for (int i = 0; i < S; i++) {
                int lo = cpu_attn_first_key(i, window), g = h / group;
                const float *p = probs + (((size_t)b * Hq + h) * S + i) * S;
                float *ds = dscores + (((size_t)b * Hq + h) * S + i) * S;
                const float *qi = q + (((size_t)b * S + i) * Hq + h) * hd;
                const float *dy = dout + (((size_t)b * S + i) * Hq + h) * hd;
                double pdp = 0.0;
                for (int j = lo; j <= i; j++) {
                    ds[j] = cpu_dot(dy, v + (((size_t)b * S + j) * Hkv + g) * hd, hd);
                    pdp += (double)p[j] * ds[j];
                }
                float *dqi = dq + (((size_t)b * S + i) * Hq + h) * hd;
                for (int t = 0; t < hd; t++) dqi[t] = 0.0f;
                for (int j = 0; j < S; j++) {
                    if (j < lo || j > i) {
                        ds[j] = 0.0f;
                        continue;
                    }
                    const float *kj = k + (((size_t)b * S + j) * Hkv + g) * hd;
                    float dz = p[j] * (ds[j] - (float)pdp);
                    if (softcap > 0.0f) {
                        float t = tanhf(scale * cpu_dot(qi, kj, hd) / softcap);
                        dz *= 1.0f - t * t;
                    }
                    ds[j] = dz * scale;
#pragma omp simd
                    for (int t = 0; t < hd; t++) dqi[t] += ds[j] * kj[t];
                }
            }
        }
    }
#pragma omp parallel for collapse(3) schedule(static) if ((size_t)B * Hq * S * S * hd > CPU_PARALLEL_MIN_WORK)
    for (int b = 0; b < B; b++) {
        for (int g = 0; g < Hkv; g++) {
            for (int j = 0; j < S; j++) {
                float *dkj = dk + (((size_t)b * S + j) * Hkv + g) * hd;
                float *dvj = dv + (((size_t)b * S + j) * Hkv + g) * hd;
                for (int t = 0; t < hd; t++) dkj[t] = dvj[t] = 0.0f;
                int hi = window > 0 && j + window < S ? j + window : S;  // queries i < hi see key j
                for (int h = g * group; h < (g + 1) * group; h++) {
                    for (int i = j; i < hi; i++) {
                        float dsij = dscores[(((size_t)b * Hq + h) * S + i) * S + j];
                        float pij = probs[(((size_t)b * Hq + h) * S + i) * S + j];
                        const float *qi = q + (((size_t)b * S + i) * Hq + h) * hd;
                        const float *dy = dout + (((size_t)b * S + i) * Hq + h) * hd;
#pragma omp simd
                        for (int t = 0; t < hd; t++) {
                            dkj[t] += dsij * qi[t];
                            dvj[t] += pij * dy[t];
                        }
                    }
                }
            }
        }
    }
}

// Gated MLP activation: h (n) = act(gate) * up, act = SiLU or tanh-approximate GELU.
static inline float cpu_act(float x, int activation, float *dact) {
    if (activation == ACT_SILU) {
        float s = 1.0f / (1.0f + expf(-x));
        *dact = s * (1.0f + x * (1.0f - s));
        return x * s;
    }
    const float k0 = 0.7978845608028654f, k1 = 0.044715f;  // sqrt(2/pi)
    float t = tanhf(k0 * (x + k1 * x * x * x));
    *dact = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k0 * (1.0f + 3.0f * k1 * x * x);
    return 0.5f * x * (1.0f + t);
}

static inline void cpu_glu_forward(float *h, const float *gate, const float *up, size_t n, int activation) {
#pragma omp parallel for schedule(static) if (n > CPU_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) {
        float dact;
        h[i] = cpu_act(gate[i], activation, &dact) * up[i];
    }
}

// Backward of cpu_glu_forward: dh (n) -> dgate written in place of dh, dup (n) written.
static inline void cpu_glu_backward(float *dh_dgate, float *dup, const float *gate, const float *up, size_t n,
                                    int activation) {
#pragma omp parallel for schedule(static) if (n > CPU_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) {
        float dact, a = cpu_act(gate[i], activation, &dact), dh = dh_dgate[i];
        dup[i] = dh * a;
        dh_dgate[i] = dh * up[i] * dact;
    }
}

// x (n) += y (n)
static inline void cpu_add_inplace(float *x, const float *y, size_t n) {
#pragma omp parallel for schedule(static) if (n > CPU_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) x[i] += y[i];
}

// ----------------------------------------------------------------------------
// Forward and backward of the whole model.

static inline const float *cpu_param(const CpuModel *m, int layer, int t) { return m->params + param_offset(&m->layout, layer, t); }
// Gradient of a base tensor; NULL when the base is frozen (LoRA).
static inline float *cpu_grad(CpuModel *m, int layer, int t) { return m->grads ? m->grads + param_offset(&m->layout, layer, t) : NULL; }
static inline float *cpu_grad_at(CpuModel *m, size_t offset) { return m->grads ? m->grads + offset : NULL; }

// ---- LoRA: y += scale * (x A^T) B^T on the adapted projections (lora.h) ----

// out (N, out) += scale * (inp (N, in) A^T) B^T for target t of layer l, when t has an adapter.
static inline void cpu_lora_forward(CpuModel *m, int l, int t, float *out, const float *inp, int N) {
    const LoraLayout *L = &m->lora_layout;
    if (!lora_has(L, t)) return;
    int r = L->rank, in = (int)L->in[t], o = (int)L->out[t];
    const float *A = m->lora_params + lora_offset(L, l, t, 0), *B = m->lora_params + lora_offset(L, l, t, 1);
    float *u = m->lora_u, scale = L->scale;
    cpu_matmul_forward(u, inp, A, NULL, N, in, r);
#pragma omp parallel for schedule(static) if ((size_t)N * o * r > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < o; j++) out[(size_t)n * o + j] += scale * cpu_dot(u + (size_t)n * r, B + (size_t)j * r, r);
    }
}

// Backward of cpu_lora_forward: with u = scale * inp A^T (recomputed), dB += dout^T u,
// du = scale * dout B, dA += du^T inp, dinp (N, in) += du A.
static inline void cpu_lora_backward(CpuModel *m, int l, int t, float *dinp, const float *dout, const float *inp, int N) {
    const LoraLayout *L = &m->lora_layout;
    if (!lora_has(L, t)) return;
    int r = L->rank, in = (int)L->in[t], o = (int)L->out[t];
    size_t a = lora_offset(L, l, t, 0), b = lora_offset(L, l, t, 1), nr = (size_t)N * r;
    float *u = m->lora_u, *du = m->lora_du, scale = L->scale;
    cpu_matmul_forward(u, inp, m->lora_params + a, NULL, N, in, r);
    for (size_t i = 0; i < nr; i++) u[i] *= scale;
    memset(du, 0, nr * sizeof(float));
    cpu_matmul_backward(du, m->lora_grads + b, NULL, dout, u, m->lora_params + b, N, r, o);
    for (size_t i = 0; i < nr; i++) du[i] *= scale;
    cpu_matmul_backward(dinp, m->lora_grads + a, NULL, du, inp, m->lora_params + a, N, in, r);
}

// A projection of layer l (base weight of LoRA target t) with its adapter: forward and backward.
static inline void cpu_proj_forward(CpuModel *m, int l, int t, float *out, const float *inp, const float *bias, int N) {
    int lt = lora_target_tensor(t);
    cpu_matmul_forward(out, inp, cpu_param(m, l, lt), bias, N, (int)m->layout.layer.cols[lt], (int)m->layout.layer.rows[lt]);
    cpu_lora_forward(m, l, t, out, inp, N);
}

static inline void cpu_proj_backward(CpuModel *m, int l, int t, float *dinp, float *dbias, const float *dout,
                                     const float *inp, int N) {
    int lt = lora_target_tensor(t);
    cpu_matmul_backward(dinp, cpu_grad(m, l, lt), dbias, dout, inp, cpu_param(m, l, lt), N,
                        (int)m->layout.layer.cols[lt], (int)m->layout.layer.rows[lt]);
    cpu_lora_backward(m, l, t, dinp, dout, inp, N);
}

static inline int cpu_layer_window(const CpuModel *m, int l) {
    return config_layer_is_sliding(&m->c, l) ? m->c.sliding_window : 0;
}

// One decoder layer: a.x (N, d) -> a.x_out (N, d), saving what backward needs in a.
static inline void cpu_layer_forward(CpuModel *m, int l, const CpuLayerActs *a) {
    const ModelConfig *c = &m->c;
    int B = m->B, S = m->S, N = B * S, d = c->d_model, F = c->d_ff, hd = c->head_dim;
    int bias = c->qkv_bias;
    cpu_rmsnorm_forward(a->ln1, a->rstd1, a->x, cpu_param(m, l, LT_ATTN_NORM), N, d, c->norm_eps, c->norm_offset);
    cpu_proj_forward(m, l, LORA_Q, a->q, a->ln1, bias ? cpu_param(m, l, LT_BQ) : NULL, N);
    cpu_proj_forward(m, l, LORA_K, a->k, a->ln1, bias ? cpu_param(m, l, LT_BK) : NULL, N);
    cpu_proj_forward(m, l, LORA_V, a->v, a->ln1, bias ? cpu_param(m, l, LT_BV) : NULL, N);
    cpu_rope_apply(a->q, m->acts[CA_ROPE_COS], m->acts[CA_ROPE_SIN], B, S, c->n_heads, hd, 1.0f);
    cpu_rope_apply(a->k, m->acts[CA_ROPE_COS], m->acts[CA_ROPE_SIN], B, S, c->n_kv_heads, hd, 1.0f);
    cpu_attention_forward(a->att, a->probs, a->q, a->k, a->v, B, S, c->n_heads, c->n_kv_heads, hd, c->query_scale,
                          c->attn_softcap, cpu_layer_window(m, l));
    size_t nd = (size_t)N * d;
    if (c->post_norms) {
        cpu_proj_forward(m, l, LORA_O, a->o, a->att, NULL, N);
        cpu_rmsnorm_forward(a->x_mid, a->rstd_po, a->o, cpu_param(m, l, LT_POST_ATTN_NORM), N, d, c->norm_eps,
                            c->norm_offset);
    } else {
        cpu_proj_forward(m, l, LORA_O, a->x_mid, a->att, NULL, N);
    }
    cpu_add_inplace(a->x_mid, a->x, nd);
    cpu_rmsnorm_forward(a->ln2, a->rstd2, a->x_mid, cpu_param(m, l, LT_MLP_NORM), N, d, c->norm_eps, c->norm_offset);
    cpu_proj_forward(m, l, LORA_GATE, a->gate, a->ln2, NULL, N);
    cpu_proj_forward(m, l, LORA_UP, a->up, a->ln2, NULL, N);
    cpu_glu_forward(a->h, a->gate, a->up, (size_t)N * F, c->activation);
    if (c->post_norms) {
        cpu_proj_forward(m, l, LORA_DOWN, a->mlp, a->h, NULL, N);
        cpu_rmsnorm_forward(a->x_out, a->rstd_pm, a->mlp, cpu_param(m, l, LT_POST_MLP_NORM), N, d, c->norm_eps,
                            c->norm_offset);
    } else {
        cpu_proj_forward(m, l, LORA_DOWN, a->x_out, a->h, NULL, N);
    }
    cpu_add_inplace(a->x_out, a->x_mid, nd);
}

// Final soft-cap and cross-entropy. logits (N, V) soft-capped in place; lse (N) saved.
// Returns the mean loss over targets >= 0 (0 when there are none), summed in double.
static inline double cpu_cross_entropy_forward(CpuModel *m, int N) {
    const ModelConfig *c = &m->c;
    int V = c->vocab_size, has_targets = m->has_targets;
    float cap = c->final_softcap, *logits = m->acts[CA_LOGITS], *lse = m->acts[CA_LSE];
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total) if ((size_t)N * V > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        float *row = logits + (size_t)n * V;
        float maxv = -INFINITY;
        for (int v = 0; v < V; v++) {
            if (cap > 0.0f) row[v] = cap * tanhf(row[v] / cap);
            if (row[v] > maxv) maxv = row[v];
        }
        double sum = 0.0;
        for (int v = 0; v < V; v++) sum += exp((double)(row[v] - maxv));
        lse[n] = (float)(maxv + log(sum));
        if (has_targets && m->targets[n] >= 0) total += (double)maxv + log(sum) - row[m->targets[n]];
    }
    return m->n_valid > 0 ? total / m->n_valid : 0.0;
}

// Runs the model on tokens (B, S). With targets (B, S) (-1 or any negative: ignored), returns the
// mean cross-entropy over the valid targets (0 if none); with targets NULL, computes logits only
// and returns 0. Keeps every activation backward needs; m->logits holds (B, S, V).
static inline float cpu_model_forward(CpuModel *m, const int32_t *tokens, const int32_t *targets, int B, int S) {
    const ModelConfig *c = &m->c;
    if (B < 1 || S < 1 || B > m->max_B || S > m->max_S)
        die("cpu_model_forward: batch shape (%d, %d) outside [1, %d] x [1, %d]", B, S, m->max_B, m->max_S);
    int N = B * S, d = c->d_model, V = c->vocab_size;
    m->B = B;
    m->S = S;
    m->has_targets = targets != NULL;
    m->n_valid = 0;
    for (int n = 0; n < N; n++) {
        if (tokens[n] < 0 || tokens[n] >= V) die("cpu_model_forward: token %d at position %d outside [0, %d)", tokens[n], n, V);
        m->tokens[n] = tokens[n];
        m->targets[n] = targets ? targets[n] : -1;
        if (m->targets[n] >= V) die("cpu_model_forward: target %d at position %d outside [0, %d)", m->targets[n], n, V);
        if (m->targets[n] >= 0) m->n_valid++;
    }
    cpu_rope_tables(m->acts[CA_ROPE_COS], m->acts[CA_ROPE_SIN], c, S);
    float *x = m->acts[CA_RESID];
    const float *embed = m->params + m->layout.embed;
#pragma omp parallel for schedule(static) if ((size_t)N * d > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *e = embed + (size_t)m->tokens[n] * d;
        for (int i = 0; i < d; i++) x[(size_t)n * d + i] = e[i] * c->embed_scale;
    }
    for (int l = 0; l < c->n_layers; l++) {
        CpuLayerActs a = cpu_layer_acts(m, l);
        cpu_layer_forward(m, l, &a);
    }
    const float *xf = m->acts[CA_RESID] + (size_t)c->n_layers * N * d;
    cpu_rmsnorm_forward(m->acts[CA_LNF], m->acts[CA_RSTDF], xf, m->params + m->layout.final_norm, N, d, c->norm_eps,
                        c->norm_offset);
    cpu_matmul_forward(m->acts[CA_LOGITS], m->acts[CA_LNF], m->params + m->layout.lm_head, NULL, N, d, V);
    m->loss = cpu_cross_entropy_forward(m, N);
    return (float)m->loss;
}

// dlogits (N, V) = (softmax - onehot(target)) / n_valid, times the soft-cap derivative
// 1 - (logit / cap)^2; rows with an ignored target get 0.
static inline void cpu_cross_entropy_backward(CpuModel *m, int N) {
    int V = m->c.vocab_size;
    float cap = m->c.final_softcap, inv_n = 1.0f / (float)m->n_valid;
    const float *logits = m->acts[CA_LOGITS], *lse = m->acts[CA_LSE];
    float *dlogits = m->acts[CA_DLOGITS];
#pragma omp parallel for schedule(static) if ((size_t)N * V > CPU_PARALLEL_MIN_WORK)
    for (int n = 0; n < N; n++) {
        const float *row = logits + (size_t)n * V;
        float *drow = dlogits + (size_t)n * V;
        int target = m->targets[n];
        for (int v = 0; v < V; v++) {
            if (target < 0) {
                drow[v] = 0.0f;
                continue;
            }
            float g = (expf(row[v] - lse[n]) - (v == target ? 1.0f : 0.0f)) * inv_n;
            if (cap > 0.0f) {
                float t = row[v] / cap;
                g *= 1.0f - t * t;
            }
            drow[v] = g;
        }
    }
}

// Backward of one decoder layer. dres (N, d) holds d(loss)/d(a.x_out) on entry and
// d(loss)/d(a.x) on return; parameter gradients of layer l are accumulated.
static inline void cpu_layer_backward(CpuModel *m, int l, const CpuLayerActs *a, float *dres) {
    const ModelConfig *c = &m->c;
    int B = m->B, S = m->S, N = B * S, d = c->d_model, F = c->d_ff, hd = c->head_dim;
    int qd = c->n_heads * hd, bias = c->qkv_bias, off = c->norm_offset;
    size_t nd = (size_t)N * d;
    float *dnorm = m->acts[CA_DNORM], *dpost = m->acts[CA_DPOST], *dh = m->acts[CA_DH], *dup = m->acts[CA_DUP];
    float *dq = m->acts[CA_DQ], *dk = m->acts[CA_DK], *dv = m->acts[CA_DV], *datt = m->acts[CA_DATT];
    // MLP block: x_out = x_mid + [post_mlp_norm](h Wd^T)
    const float *dmlp = dres;
    if (c->post_norms) {
        memset(dpost, 0, nd * sizeof(float));
        cpu_rmsnorm_backward(dpost, cpu_grad(m, l, LT_POST_MLP_NORM), dres, a->mlp, a->rstd_pm,
                             cpu_param(m, l, LT_POST_MLP_NORM), N, d, off);
        dmlp = dpost;
    }
    memset(dh, 0, (size_t)N * F * sizeof(float));
    cpu_proj_backward(m, l, LORA_DOWN, dh, NULL, dmlp, a->h, N);
    cpu_glu_backward(dh, dup, a->gate, a->up, (size_t)N * F, c->activation);
    memset(dnorm, 0, nd * sizeof(float));
    cpu_proj_backward(m, l, LORA_GATE, dnorm, NULL, dh, a->ln2, N);
    cpu_proj_backward(m, l, LORA_UP, dnorm, NULL, dup, a->ln2, N);
    cpu_rmsnorm_backward(dres, cpu_grad(m, l, LT_MLP_NORM), dnorm, a->x_mid, a->rstd2, cpu_param(m, l, LT_MLP_NORM),
                         N, d, off);
    // attention block: x_mid = x + [post_attn_norm](att Wo^T)
    const float *dproj = dres;
    if (c->post_norms) {
        memset(dpost, 0, nd * sizeof(float));
        cpu_rmsnorm_backward(dpost, cpu_grad(m, l, LT_POST_ATTN_NORM), dres, a->o, a->rstd_po,
                             cpu_param(m, l, LT_POST_ATTN_NORM), N, d, off);
        dproj = dpost;
    }
    memset(datt, 0, (size_t)N * qd * sizeof(float));
    cpu_proj_backward(m, l, LORA_O, datt, NULL, dproj, a->att, N);
    cpu_attention_backward(dq, dk, dv, m->acts[CA_DSCORES], datt, a->probs, a->q, a->k, a->v, B, S, c->n_heads,
                           c->n_kv_heads, hd, c->query_scale, c->attn_softcap, cpu_layer_window(m, l));
    cpu_rope_apply(dq, m->acts[CA_ROPE_COS], m->acts[CA_ROPE_SIN], B, S, c->n_heads, hd, -1.0f);
    cpu_rope_apply(dk, m->acts[CA_ROPE_COS], m->acts[CA_ROPE_SIN], B, S, c->n_kv_heads, hd, -1.0f);
    memset(dnorm, 0, nd * sizeof(float));
    cpu_proj_backward(m, l, LORA_Q, dnorm, bias ? cpu_grad(m, l, LT_BQ) : NULL, dq, a->ln1, N);
    cpu_proj_backward(m, l, LORA_K, dnorm, bias ? cpu_grad(m, l, LT_BK) : NULL, dk, a->ln1, N);
    cpu_proj_backward(m, l, LORA_V, dnorm, bias ? cpu_grad(m, l, LT_BV) : NULL, dv, a->ln1, N);
    cpu_rmsnorm_backward(dres, cpu_grad(m, l, LT_ATTN_NORM), dnorm, a->x, a->rstd1, cpu_param(m, l, LT_ATTN_NORM), N,
                         d, off);
}

// grads += d(loss)/d(params) for the last forward (the mean over its valid targets).
// With no valid target the loss is the constant 0 and nothing is added.
static inline void cpu_model_backward(CpuModel *m) {
    const ModelConfig *c = &m->c;
    if (!m->has_targets) die("cpu_model_backward: the last forward had no targets (logits only)");
    if (m->n_valid == 0) return;
    int N = m->B * m->S, d = c->d_model, V = c->vocab_size;
    float *dres = m->acts[CA_DRES];
    cpu_cross_entropy_backward(m, N);
    float *dlnf = m->acts[CA_DNORM];
    memset(dlnf, 0, (size_t)N * d * sizeof(float));
    cpu_matmul_backward(dlnf, cpu_grad_at(m, m->layout.lm_head), NULL, m->acts[CA_DLOGITS], m->acts[CA_LNF],
                        m->params + m->layout.lm_head, N, d, V);
    memset(dres, 0, (size_t)N * d * sizeof(float));
    const float *xf = m->acts[CA_RESID] + (size_t)c->n_layers * N * d;
    cpu_rmsnorm_backward(dres, cpu_grad_at(m, m->layout.final_norm), dlnf, xf, m->acts[CA_RSTDF],
                         m->params + m->layout.final_norm, N, d, c->norm_offset);
    for (int l = c->n_layers - 1; l >= 0; l--) {
        CpuLayerActs a = cpu_layer_acts(m, l);
        cpu_layer_backward(m, l, &a, dres);
    }
    if (m->grads == NULL) return;  // frozen base: the embedding has no gradient
    // embedding: rows of repeated tokens accumulate, so parallelize over the d columns
    float *dembed = m->grads + m->layout.embed;
#pragma omp parallel for schedule(static) if ((size_t)N * d > CPU_PARALLEL_MIN_WORK)
    for (int i = 0; i < d; i++) {
        for (int n = 0; n < N; n++) dembed[(size_t)m->tokens[n] * d + i] += dres[(size_t)n * d + i] * c->embed_scale;
    }
}

// ----------------------------------------------------------------------------
// Optimizer.

typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
} AdamWHparams;

typedef struct {
    float *params, *grads;        // the trainable values: every parameter, or the LoRA adapters
    float *mom1, *mom2;           // fp32 moments, or
    const Adam8State *q;          // 8-bit moments when non-NULL (with their block layout and code books;
    const Adam8Layout *q_layout;  // full-parameter training only)
    const Adam8Codebooks *books;
    const ParamLayout *layout;
    const AdamWHparams *h;
    int step;
    float grad_scale;
    int decay_all;          // 1: every tensor is decayed (LoRA adapters are all matrices, even at rank 1)
} CpuAdamWCtx;

// AdamW on one tensor (PyTorch's torch.optim.AdamW): p -= lr * wd * p (decoupled; matrices only),
// then with g = grad_scale * grad, m = b1 m + (1-b1) g, v = b2 v + (1-b2) g^2,
// p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps). With 8-bit moments, the same step
// through adamw8bit.h's CPU twin (the fp32 params are its master weights).
static inline void cpu_adamw_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    (void)name;
    CpuAdamWCtx *a = (CpuAdamWCtx *)ctx;
    const AdamWHparams *h = a->h;
    if (a->q) {
        Adam8Consts c = adam8_consts(h->lr, h->beta1, h->beta2, h->eps, rows > 1 ? h->weight_decay : 0.0f,
                                     a->grad_scale, a->step, 0u);
        Adam8State t = adam8_state_at(*a->q, adam8_block_of(a->q_layout, a->layout, offset));
        adamw8bit_update_cpu(NULL, a->params + offset, a->grads + offset, t, rows * cols, &c, a->books);
        return;
    }
    float decay = (rows > 1 || a->decay_all) ? 1.0f - h->lr * h->weight_decay : 1.0f;
    float step_size = (float)(h->lr / (1.0 - pow((double)h->beta1, a->step)));
    float bc2_sqrt = (float)sqrt(1.0 - pow((double)h->beta2, a->step));
    float *p = a->params + offset, *g = a->grads + offset, *m1 = a->mom1 + offset, *m2 = a->mom2 + offset;
    size_t n = rows * cols;
#pragma omp parallel for schedule(static) if (n > CPU_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) {
        float gi = g[i] * a->grad_scale;
        m1[i] = h->beta1 * m1[i] + (1.0f - h->beta1) * gi;
        m2[i] = h->beta2 * m2[i] + (1.0f - h->beta2) * gi * gi;
        p[i] = p[i] * decay - step_size * m1[i] / (sqrtf(m2[i]) / bc2_sqrt + h->eps);
    }
}

// One AdamW step (step is 1-based) on every trainable value; mom1, mom2 (cpu_model_trainable) start
// at zero. Weight decay applies to tensors with more than one row (embed, projections, lm_head), not
// to norms or biases; with LoRA only the adapters train, every one of them decayed.
// grad_scale multiplies the gradients first (global-norm clipping).
static inline void cpu_adamw_step(CpuModel *m, float *mom1, float *mom2, const AdamWHparams *h, int step,
                                  float grad_scale) {
    if (step < 1) die("cpu_adamw_step: step %d must be >= 1", step);
    CpuAdamWCtx ctx = {cpu_model_trainable_params(m), cpu_model_trainable_grads(m), mom1, mom2, NULL, NULL, NULL,
                       &m->layout, h, step, grad_scale, m->lora.rank > 0};
    if (m->lora.rank) lora_layout_visit(&m->lora_layout, cpu_adamw_tensor, &ctx);
    else param_layout_visit(&m->layout, &m->c, cpu_adamw_tensor, &ctx);
}

// The same step with 8-bit moments (adamw8bit.h): state (layout->total blocks of both moments)
// starts all zero. Full-parameter training only (the LoRA adapters keep fp32 moments).
static inline void cpu_adamw8bit_step(CpuModel *m, const Adam8State *state, const Adam8Layout *layout,
                                      const Adam8Codebooks *books, const AdamWHparams *h, int step, float grad_scale) {
    if (step < 1) die("cpu_adamw8bit_step: step %d must be >= 1", step);
    if (m->lora.rank) die("cpu_adamw8bit_step: 8-bit moments are for full-parameter training, not LoRA");
    CpuAdamWCtx ctx = {m->params, m->grads, NULL, NULL, state, layout, books, &m->layout, h, step, grad_scale, 0};
    param_layout_visit(&m->layout, &m->c, cpu_adamw_tensor, &ctx);
}

// Global L2 norm of the gradients of the trainable values, accumulated in double.
static inline float cpu_grad_norm(CpuModel *m) {
    double s = 0.0;
    size_t n = cpu_model_trainable(m);
    const float *g = cpu_model_trainable_grads(m);
#pragma omp parallel for schedule(static) reduction(+ : s) if (n > CPU_PARALLEL_MIN_WORK)
    for (size_t i = 0; i < n; i++) s += (double)g[i] * g[i];
    return (float)sqrt(s);
}

#endif  // CPU_MODEL_H

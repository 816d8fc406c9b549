// Tests of the CPU reference model (cpu_model.h).
//  1. Finite differences (independent of Hugging Face): on a tiny config that switches every
//     feature on at once (GQA, head_dim != d/Hq, qkv bias, Gemma norm offset and post-norms,
//     GELU, attention and final soft-caps, sliding window on alternate layers, Llama-3 RoPE
//     scaling, untied head, ignored targets), the analytic gradient of each tensor along a random
//     direction is compared with a 4-point central difference of the loss, taken in double.
//  2. Invariants: all-ignored targets give loss 0 and zero gradients; logits do not depend on
//     whether targets are given; each batch row computes the same as that row run alone.
//     AdamW and the gradient norm against the same arithmetic in double. Bad calls (token out of
//     range, batch too large, backward without targets, bad config, step 0) die with a message.
//  3. Hugging Face references: for each case in tests/ref (written by scripts from HF transformers
//     in float64), logits, loss, every gradient, and three AdamW steps (losses before steps
//     1..3 and the parameters after step 2).
//  4. LoRA (lora.h): finite differences of every adapter tensor on the all-features config; a new
//     adapter leaves the logits of the base bit for bit; the base stays frozen (no gradients, AdamW
//     leaves it untouched); lora.bin round trip and its error paths; and the PEFT references
//     (scripts/make_lora_reference.py, float64): logits, loss, every adapter gradient, three AdamW
//     steps over the adapters.
// Usage: test_cpu_model [ref_dir]   (default tests/ref). About 0.2 s on 2 idle cores; on cores
// busy with other jobs, set OMP_WAIT_POLICY=passive (spinning OpenMP threads otherwise wait for
// preempted ones at each of the thousands of small parallel loops: seconds instead of 0.2 s).
// Build: gcc -O2 -Wall -Wextra -fopenmp -I. tests/test_cpu_model.c -o build/test_cpu_model -lm
#include <unistd.h>
#include "cpu_model.h"
#include "tensor_file.h"
#include "tests/test_util.h"

// Tolerances. The model computes in fp32 (unit roundoff 6e-8) against references in float64
// (HF itself does RoPE, RMSNorm and softmax in float32 even in a float64 model). Errors grow with
// the depth of the computation and the length of the dot products (tens of terms in these tiny
// models); the six cases show at most 1e-6 (logits) and 2e-6 (gradients) relative to the
// tensor's largest entry, so the tolerances keep a 10x margin, and any real error (a wrong mask,
// sign, scale or missing term) moves the result by 1e-3 or more.
#define TOL_FORWARD 1e-5   // logits, relative to max |logit|
#define TOL_LOSS 1e-6      // the loss: one scalar, summed in double (cases show <= 1e-7)
#define TOL_GRAD 2e-5      // every gradient tensor, relative to its max |entry|
// Parameters after two AdamW steps, see compare_adamw_tensor: well-conditioned entries relative
// to max |param| (cases show <= 3.5e-6), the others in units of lr (cases show <= 9e-3; the bound
// lr * grad_err / (4 eps) with grad_err ~ 4e-10 gives 1e-2).
#define TOL_ADAMW_PARAM 1e-5
#define TOL_ADAMW_NOISY_STEP 2e-2
// cpu_adamw_step against the same update written out in double: fp32 rounding only.
#define TOL_ADAMW_UNIT 1e-6
// Finite differences in double on an fp32 model: the loss carries fp32 noise of ~1e-7, which a
// step of h = 3e-3 turns into ~1e-4 in the difference quotient; the 4-point stencil's truncation
// error is O(h^4). Errors are relative to ||grad||_2 of the tensor (the typical size of g.u);
// the config shows <= 5e-4 (the key biases, whose gradient is small because softmax ignores a
// shift common to a query's scores, come closest). A wrong term in a gradient shows as 1e-2 or more.
#define TOL_FD 2e-3

static const char *CASES[] = {"llama2_mha", "llama3_gqa", "llama_tied", "mistral", "qwen2", "gemma2"};
#define NUM_CASES ((int)(sizeof(CASES) / sizeof(CASES[0])))

// ----------------------------------------------------------------------------
// Deterministic random numbers (xorshift64*), so the test does the same work on every run.

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint32_t rng_u32(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (uint32_t)((rng_state * 0x2545F4914F6CDD1Dull) >> 32);
}

// Uniform in [-1, 1).
static float rng_sym(void) { return (float)((rng_u32() >> 8) * (2.0 / 16777216.0) - 1.0); }

// A tiny config with every optional feature of the model switched on.
static ModelConfig all_features_config(void) {
    ModelConfig c;
    memset(&c, 0, sizeof(c));
    c.family = FAMILY_GEMMA2;
    c.vocab_size = 13;
    c.d_model = 12;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 8;
    c.d_ff = 20;
    c.max_pos = 64;
    c.tied_embeddings = 0;
    c.qkv_bias = 1;
    c.norm_offset = 1;
    c.post_norms = 1;
    c.activation = ACT_GELU_TANH;
    c.sliding_window = 3;
    c.sliding_period = 2;
    c.rope_scaling = ROPE_SCALING_LLAMA3;
    c.rope_orig_max_pos = 64;  // wavelengths 6.3, 63, 628, 6283: unchanged, smoothed, scaled, scaled
    c.norm_eps = 1e-6f;
    c.rope_theta = 10000.0f;
    c.rope_factor = 8.0f;
    c.rope_low_freq_factor = 1.0f;
    c.rope_high_freq_factor = 4.0f;
    c.attn_softcap = 2.0f;
    c.final_softcap = 3.0f;
    c.query_scale = 0.4f;
    c.embed_scale = sqrtf(12.0f);
    return c;
}

// Fills params with values of scale 0.5 (norm weights: around 0 with the Gemma +1 offset).
static void random_params(CpuModel *m) {
    for (size_t i = 0; i < m->layout.total; i++) m->params[i] = 0.5f * rng_sym();
}

static LoraConfig lora_config(int rank, float alpha, unsigned targets) {
    LoraConfig lc = {rank, alpha, targets, BASE_QUANT_NONE};
    return lc;
}

static void random_adapters(CpuModel *m) {
    for (size_t i = 0; i < m->lora_layout.total; i++) m->lora_params[i] = 0.5f * rng_sym();
}

// The config of the hand-counted sizes: V=10 d=4 L=1 Hq=2 Hkv=1 hd=2 F=6, untied, no bias, no post-norms.
static ModelConfig hand_counted_config(void) {
    ModelConfig small = all_features_config();
    small.vocab_size = 10;
    small.d_model = 4;
    small.n_layers = 1;
    small.n_heads = 2;
    small.n_kv_heads = 1;
    small.head_dim = 2;
    small.d_ff = 6;
    small.qkv_bias = 0;
    small.post_norms = 0;
    return small;
}

static void random_batch(int32_t *tokens, int32_t *targets, int n, int V) {
    for (int i = 0; i < n; i++) {
        tokens[i] = (int32_t)(rng_u32() % (uint32_t)V);
        targets[i] = (i % 4 == 3) ? -1 : (int32_t)(rng_u32() % (uint32_t)V);  // every 4th ignored
    }
}

// ----------------------------------------------------------------------------
// 1. Finite differences.

typedef struct {
    CpuModel *m;
    const int32_t *tokens, *targets;
    int B, S;
    TestReport *r;
} FdCtx;

static double fd_loss(FdCtx *f) {
    cpu_model_forward(f->m, f->tokens, f->targets, f->B, f->S);
    return f->m->loss;
}

// For one tensor: u = random +-1 direction; compares the derivative of the loss along u from the
// 4-point stencil (8 (L(h) - L(-h)) - (L(2h) - L(-2h))) / 12h, L(t) = loss(p + t u), with g.u,
// the error taken relative to ||g||_2. p and the analytic gradient are the model's trainable values
// (every parameter, or the LoRA adapters).
static void fd_check_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    FdCtx *f = (FdCtx *)ctx;
    CpuModel *m = f->m;
    float *values = cpu_model_trainable_params(m), *grads = cpu_model_trainable_grads(m);
    size_t n = rows * cols;
    const double h = 3e-3;
    float *saved = (float *)mallocCheck(n * sizeof(float));
    float *u = (float *)mallocCheck(n * sizeof(float));
    memcpy(saved, values + offset, n * sizeof(float));
    double gu = 0.0, gg = 0.0;
    for (size_t i = 0; i < n; i++) {
        u[i] = (rng_u32() & 1) ? 1.0f : -1.0f;
        gu += (double)grads[offset + i] * u[i];
        gg += (double)grads[offset + i] * grads[offset + i];
    }
    double at[4];  // loss at p + k h u for k = -2, -1, 1, 2
    const int k[4] = {-2, -1, 1, 2};
    for (int s = 0; s < 4; s++) {
        for (size_t i = 0; i < n; i++) values[offset + i] = saved[i] + (float)(k[s] * h) * u[i];
        at[s] = fd_loss(f);
    }
    memcpy(values + offset, saved, n * sizeof(float));
    double fd = (8.0 * (at[2] - at[1]) - (at[3] - at[0])) / (12.0 * h), err = fabs(fd - gu);
    char label[96];
    snprintf(label, sizeof(label), "fd %s", name);
    test_table_row(f->r, label, err, gg > 0.0 ? err / sqrt(gg) : err, TOL_FD);
    free(saved);
    free(u);
}

// Every trainable tensor of the all-features config: each parameter, or with lora (not NULL) each
// adapter tensor (random adapters: a new one has B = 0).
static void test_finite_differences(TestReport *r, const LoraConfig *lora) {
    ModelConfig c = all_features_config();
    int B = 2, S = 7;
    CpuModel m;
    cpu_model_init(&m, &c, B, S);
    if (lora) cpu_model_init_lora(&m, lora, 11);
    random_params(&m);
    if (lora) random_adapters(&m);
    int32_t tokens[14], targets[14];
    random_batch(tokens, targets, B * S, c.vocab_size);
    cpu_model_forward(&m, tokens, targets, B, S);
    cpu_model_backward(&m);
    test_table_header(lora ? "LoRA finite differences, all-features config, rank 3, every target (directional)"
                           : "finite differences, all-features config (directional, per tensor)");
    FdCtx f = {&m, tokens, targets, B, S, r};
    if (lora) lora_layout_visit(&m.lora_layout, fd_check_tensor, &f);
    else param_layout_visit(&m.layout, &c, fd_check_tensor, &f);
    cpu_model_free(&m);
}

// ----------------------------------------------------------------------------
// 2. Invariants.

static void test_invariants(TestReport *r) {
    ModelConfig c = all_features_config();
    int B = 3, S = 6, N = B * S, V = c.vocab_size;
    CpuModel m, one;
    cpu_model_init(&m, &c, B, S);
    cpu_model_init(&one, &c, 1, S);
    random_params(&m);
    memcpy(one.params, m.params, m.layout.total * sizeof(float));
    int32_t tokens[18], targets[18], ignored[18];
    random_batch(tokens, targets, N, V);
    for (int i = 0; i < N; i++) ignored[i] = -1;
    test_table_header("invariants, all-features config");

    float loss = cpu_model_forward(&m, tokens, ignored, B, S);
    cpu_model_backward(&m);
    double gmax = 0.0;
    for (size_t i = 0; i < m.layout.total; i++) gmax = fmax(gmax, fabs(m.grads[i]));
    test_table_row(r, "all targets ignored: loss", fabs(loss), fabs(loss), 0.0);
    test_table_row(r, "all targets ignored: max |grad|", gmax, gmax, 0.0);

    cpu_model_forward(&m, tokens, NULL, B, S);
    float *no_targets = (float *)mallocCheck((size_t)N * V * sizeof(float));
    memcpy(no_targets, m.logits, (size_t)N * V * sizeof(float));
    cpu_model_forward(&m, tokens, targets, B, S);
    test_compare_f32(r, "logits: targets NULL vs given", no_targets, m.logits, (size_t)N * V, 0.0);

    float *rows = (float *)mallocCheck((size_t)N * V * sizeof(float));
    for (int b = 0; b < B; b++) {
        cpu_model_forward(&one, tokens + b * S, targets + b * S, 1, S);
        memcpy(rows + (size_t)b * S * V, one.logits, (size_t)S * V * sizeof(float));
    }
    // Same arithmetic per row, except that threads may split the work differently: equal to ~1 ulp.
    test_compare_f32(r, "logits: batch of 3 vs rows alone", m.logits, rows, (size_t)N * V, 1e-6);
    free(no_targets);
    free(rows);

    uint16_t *bf16 = (uint16_t *)mallocCheck(m.layout.total * sizeof(uint16_t));
    cpu_model_store_bf16(&m, bf16);
    cpu_model_load_bf16(&one, bf16);
    double round_err = 0.0;  // bf16 stores 7 mantissa bits: round to nearest is within 2^-8 relative
    for (size_t i = 0; i < m.layout.total; i++)
        round_err = fmax(round_err, fabs(one.params[i] - m.params[i]) / fmax(fabs(m.params[i]), 1e-30));
    uint16_t *again = (uint16_t *)mallocCheck(m.layout.total * sizeof(uint16_t));
    cpu_model_store_bf16(&one, again);
    test_table_row(r, "bf16 store -> load: max rel rounding", round_err, round_err, 1.0 / 256.0);
    test_check(r, memcmp(bf16, again, m.layout.total * sizeof(uint16_t)) == 0,
               "bf16 store -> load -> store: identical bits");
    free(bf16);
    free(again);
    cpu_model_free(&m);
    cpu_model_free(&one);

    // cpu_model_bytes by hand for V=10 d=4 L=1 Hq=2 Hkv=1 hd=2 F=6, untied, B=1 S=3 (N=3):
    // params 212 (embed 40, layer 128, final_norm 4, lm_head 40), x2 with grads; activations 384
    // (see cpu_act_sizes: 93 attention side, 27 norms/residual, 54 MLP, 48 head/rope,
    //  162 backward scratch); tokens and targets 2 x 3 int32. (424 + 384) * 4 + 24 = 3256 bytes.
    ModelConfig small = hand_counted_config();
    size_t bytes = cpu_model_bytes(&small, 1, 3);
    char line[96];
    snprintf(line, sizeof(line), "cpu_model_bytes of a hand-counted config: %zu (want 3256)", bytes);
    test_check(r, bytes == 3256, line);
}

// AdamW and the gradient norm against the same arithmetic written out in double (PyTorch's
// torch.optim.AdamW, single-tensor path). Weight decay is chosen here by name (norms and biases
// are exempt), independently of cpu_adamw_step's choice by row count.
typedef struct {
    double *p, *m1, *m2;
    const double *g;
    const AdamWHparams *h;
    int step;
    double grad_scale;
} AdamWDoubleCtx;

static void adamw_double_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    AdamWDoubleCtx *a = (AdamWDoubleCtx *)ctx;
    const AdamWHparams *h = a->h;
    int decay = strstr(name, "norm") == NULL && strstr(name, ".b") == NULL;
    double bc1 = 1.0 - pow(h->beta1, a->step), bc2 = 1.0 - pow(h->beta2, a->step);
    for (size_t i = offset; i < offset + rows * cols; i++) {
        double g = a->g[i] * a->grad_scale;
        if (decay) a->p[i] *= 1.0 - (double)h->lr * h->weight_decay;
        a->m1[i] = h->beta1 * a->m1[i] + (1.0 - h->beta1) * g;
        a->m2[i] = h->beta2 * a->m2[i] + (1.0 - h->beta2) * g * g;
        a->p[i] -= h->lr / bc1 * a->m1[i] / (sqrt(a->m2[i]) / sqrt(bc2) + h->eps);
    }
}

static void test_adamw_unit(TestReport *r) {
    ModelConfig c = all_features_config();
    CpuModel m;
    cpu_model_init(&m, &c, 1, 1);
    random_params(&m);
    size_t n = m.layout.total;
    float *mom1 = (float *)callocCheck(n, sizeof(float)), *mom2 = (float *)callocCheck(n, sizeof(float));
    double *p = (double *)mallocCheck(n * sizeof(double)), *g = (double *)mallocCheck(n * sizeof(double));
    double *m1 = (double *)callocCheck(n, sizeof(double)), *m2 = (double *)callocCheck(n, sizeof(double));
    for (size_t i = 0; i < n; i++) p[i] = m.params[i];
    AdamWHparams h = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f};
    const float grad_scale = 0.5f;
    test_table_header("AdamW and grad norm vs double, all-features config, 3 steps, grad_scale 0.5");
    for (int step = 1; step <= 3; step++) {
        double sq = 0.0;
        for (size_t i = 0; i < n; i++) {  // |g| in [1e-3, 1e-2]: well away from eps
            float u = rng_sym();
            m.grads[i] = (u < 0.0f ? -1e-2f : 1e-2f) * (0.1f + 0.9f * fabsf(u));
            g[i] = m.grads[i];
            sq += g[i] * g[i];
        }
        char label[64];
        snprintf(label, sizeof(label), "grad norm, step %d", step);
        test_compare_scalar(r, label, cpu_grad_norm(&m), sqrt(sq), TOL_ADAMW_UNIT);
        cpu_adamw_step(&m, mom1, mom2, &h, step, grad_scale);
        AdamWDoubleCtx ctx = {p, m1, m2, g, &h, step, grad_scale};
        param_layout_visit(&m.layout, &c, adamw_double_tensor, &ctx);
    }
    float *pf = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) pf[i] = (float)p[i];
    test_compare_f32(r, "params after 3 steps", m.params, pf, n, TOL_ADAMW_UNIT);
    for (size_t i = 0; i < n; i++) pf[i] = (float)m1[i];
    test_compare_f32(r, "first moment", mom1, pf, n, TOL_ADAMW_UNIT);
    for (size_t i = 0; i < n; i++) pf[i] = (float)m2[i];
    test_compare_f32(r, "second moment", mom2, pf, n, TOL_ADAMW_UNIT);
    free(pf);
    free(p);
    free(g);
    free(m1);
    free(m2);
    free(mom1);
    free(mom2);
    cpu_model_free(&m);
}

// Bad calls die with a message (run in forked children, before this process starts OpenMP threads).
typedef enum { BAD_TOKEN, BAD_TARGET, BAD_SHAPE, BACKWARD_NO_TARGETS, BAD_CONFIG, BAD_STEP } BadCall;

static void run_bad_call(void *arg) {
    BadCall which = *(const BadCall *)arg;
    ModelConfig c = all_features_config();
    if (which == BAD_CONFIG) c.n_kv_heads = 3;
    CpuModel m;
    cpu_model_init(&m, &c, 2, 7);
    random_params(&m);
    int32_t tokens[14], targets[14];
    random_batch(tokens, targets, 14, c.vocab_size);
    if (which == BAD_TOKEN) tokens[5] = c.vocab_size;
    if (which == BAD_TARGET) targets[6] = c.vocab_size + 4;
    int B = which == BAD_SHAPE ? 3 : 2;
    cpu_model_forward(&m, tokens, which == BACKWARD_NO_TARGETS ? NULL : targets, B, 7);
    cpu_model_backward(&m);
    if (which == BAD_STEP) {
        AdamWHparams h = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.0f};
        cpu_adamw_step(&m, NULL, NULL, &h, 0, 1.0f);
    }
}

static void test_bad_calls(TestReport *r) {
    printf("\n== bad calls (forked child must exit 1 with the phrase)\n");
    static const BadCall calls[] = {BAD_TOKEN, BAD_TARGET, BAD_SHAPE, BACKWARD_NO_TARGETS, BAD_CONFIG, BAD_STEP};
    static const char *labels[] = {"token id = vocab size", "target id > vocab size", "batch 3 > max_B 2",
                                   "backward after a logits-only forward", "config n_kv_heads 3 of 4",
                                   "AdamW step 0"};
    static const char *phrases[] = {"token 13 at position 5 outside [0, 13)", "target 17 at position 6 outside [0, 13)",
                                    "batch shape (3, 7) outside [1, 2] x [1, 7]", "the last forward had no targets",
                                    "cpu_model_init: n_kv_heads 3", "step 0 must be >= 1"};
    for (int i = 0; i < 6; i++) test_expect_exit(r, labels[i], run_bad_call, (void *)&calls[i], 1, phrases[i]);
}

// ----------------------------------------------------------------------------
// 3. Hugging Face references.

typedef struct {
    const TensorFile *ref;
    const char *ref_path;
    const char *prefix;   // "grad." or "adamw.param."
    const float *values;  // the model's grads or params
    double tol;
    TestReport *r;
} RefCompareCtx;

// Compares one parameter-shaped tensor with the reference tensor "<prefix><name>".
static void compare_param_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    RefCompareCtx *x = (RefCompareCtx *)ctx;
    char key[160];
    snprintf(key, sizeof(key), "%s%s", x->prefix, name);
    const NamedTensor *t = tensor_file_find(x->ref, key);
    if (t == NULL || t->dtype != TENSOR_F32 || t->numel != rows * cols) {
        printf("%-34s missing, not f32, or not %zu x %zu in %s  FAIL\n", key, rows, cols, x->ref_path);
        test_record(x->r, 0);
        return;
    }
    test_compare_f32(x->r, key, x->values + offset, (const float *)t->data, rows * cols, x->tol);
}

// Returns the tensor or records a failure (NULL) when it is absent or has the wrong type/size.
static const NamedTensor *ref_tensor(TestReport *r, const TensorFile *tf, const char *name, int dtype, size_t numel,
                                     const char *path) {
    const NamedTensor *t = tensor_file_find(tf, name);
    if (t == NULL || t->dtype != dtype || (numel && t->numel != numel)) {
        printf("%s: tensor '%s' missing or of the wrong type/size  FAIL\n", path, name);
        test_record(r, 0);
        return NULL;
    }
    return t;
}

typedef struct {
    const TensorFile *ref;
    const char *ref_path;
    const float *params;
    const AdamWHparams *h;
    TestReport *r;
} AdamWCompareCtx;

// Compares the parameters after two AdamW steps with "adamw.param.<name>", in two groups.
// Adam's first step moves a weight by lr * g / (|g| + eps) (bias-corrected): where |g| is small
// (near eps, or where step 2's gradient nearly cancels step 1's), fp32 noise in g, which is of
// the order of 1e-6 of the tensor's largest gradient, becomes a visible fraction of a step.
// Entries whose reference step-1 gradient is at least 1e-3 of the tensor's largest are
// well-conditioned and held to TOL_ADAMW_PARAM relative to max |param|; the rest are held to
// TOL_ADAMW_NOISY_STEP in units of lr. The optimizer's arithmetic itself is checked exactly by
// test_adamw_unit.
static void compare_adamw_tensor(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    AdamWCompareCtx *x = (AdamWCompareCtx *)ctx;
    char key[160], gkey[160], label[200];
    size_t n = rows * cols;
    snprintf(key, sizeof(key), "adamw.param.%s", name);
    snprintf(gkey, sizeof(gkey), "grad.%s", name);
    const NamedTensor *t = tensor_file_find(x->ref, key), *g = tensor_file_find(x->ref, gkey);
    if (!t || !g || t->dtype != TENSOR_F32 || g->dtype != TENSOR_F32 || t->numel != n || g->numel != n) {
        printf("%-34s or %s missing, not f32, or not %zu x %zu in %s  FAIL\n", key, gkey, rows, cols, x->ref_path);
        test_record(x->r, 0);
        return;
    }
    const float *ref = (const float *)t->data, *gref = (const float *)g->data, *got = x->params + offset;
    double well_err = 0.0, noisy_err = 0.0, max_ref = 0.0, threshold = 0.0;
    size_t noisy = 0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) threshold = fmax(threshold, 1e-3 * fabs((double)gref[i]));
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        if (!isfinite(got[i])) finite = 0;
        max_ref = fmax(max_ref, fabs((double)ref[i]));
        if (fabs((double)gref[i]) >= threshold) {
            well_err = fmax(well_err, e);
        } else {
            noisy_err = fmax(noisy_err, e);
            noisy++;
        }
    }
    test_table_row(x->r, key, well_err, finite ? well_err / max_ref : NAN, TOL_ADAMW_PARAM);
    if (noisy > 0) {
        snprintf(label, sizeof(label), "  %zu small-|g| entries (err / lr)", noisy);
        test_table_row(x->r, label, noisy_err, finite ? noisy_err / x->h->lr : NAN, TOL_ADAMW_NOISY_STEP);
    }
}

static void run_adamw(TestReport *r, CpuModel *m, const TensorFile *tf, const char *path, const int32_t *tokens,
                      const int32_t *targets, int B, int S) {
    const NamedTensor *hp = ref_tensor(r, tf, "adamw.hparams", TENSOR_F32, 5, path);
    const NamedTensor *losses = ref_tensor(r, tf, "adamw.loss", TENSOR_F32, 3, path);
    if (!hp || !losses) return;
    const float *h5 = (const float *)hp->data;
    AdamWHparams h = {h5[0], h5[1], h5[2], h5[3], h5[4]};
    float *mom1 = (float *)callocCheck(cpu_model_trainable(m), sizeof(float));
    float *mom2 = (float *)callocCheck(cpu_model_trainable(m), sizeof(float));
    for (int step = 1; step <= 3; step++) {
        cpu_model_zero_grad(m);
        float loss = cpu_model_forward(m, tokens, targets, B, S);
        char label[64];
        snprintf(label, sizeof(label), "adamw.loss before step %d", step);
        test_compare_scalar(r, label, loss, ((const float *)losses->data)[step - 1], TOL_LOSS);
        if (step == 3) break;
        cpu_model_backward(m);
        cpu_adamw_step(m, mom1, mom2, &h, step, 1.0f);
    }
    AdamWCompareCtx x = {tf, path, cpu_model_trainable_params(m), &h, r};
    if (m->lora.rank) lora_layout_visit(&m->lora_layout, compare_adamw_tensor, &x);
    else param_layout_visit(&m->layout, &m->c, compare_adamw_tensor, &x);
    free(mom1);
    free(mom2);
}

// A Hugging Face reference case: the base <name>.model.bin and its outputs <name>.ref.bin, or with
// lora the PEFT case: adapters <name>.lora.bin on that base, outputs <name>.lora_ref.bin.
static void run_reference_case(TestReport *r, const char *dir, const char *name, int lora) {
    char model_path[1024], lora_path[1024], ref_path[1024], title[1200];
    snprintf(model_path, sizeof(model_path), "%s/%s.model.bin", dir, name);
    snprintf(lora_path, sizeof(lora_path), "%s/%s.lora.bin", dir, name);
    snprintf(ref_path, sizeof(ref_path), "%s/%s.%s.bin", dir, name, lora ? "lora_ref" : "ref");
    snprintf(title, sizeof(title), "%sreference case %s (%s)", lora ? "LoRA " : "", name, ref_path);
    test_table_header(title);
    if (access(model_path, R_OK) != 0 || access(ref_path, R_OK) != 0 || (lora && access(lora_path, R_OK) != 0)) {
        printf("missing %s or %s%s%s  FAIL\n", model_path, ref_path, lora ? " or " : "", lora ? lora_path : "");
        test_record(r, 0);
        return;
    }
    ModelConfig c;
    ParamLayout layout;
    uint16_t *bf16 = model_load_bf16(&c, &layout, model_path);
    LoraConfig lc;
    if (lora) lora_load(lora_path, &c, &lc, NULL);
    TensorFile tf;
    tensor_file_load(&tf, ref_path);
    const NamedTensor *tok = ref_tensor(r, &tf, "tokens", TENSOR_I32, 0, ref_path);
    const NamedTensor *tgt = tok ? ref_tensor(r, &tf, "targets", TENSOR_I32, tok->numel, ref_path) : NULL;
    if (tok && tok->ndim != 2) {
        printf("%s: tokens must be (B, S)  FAIL\n", ref_path);
        test_record(r, 0);
        tok = NULL;
    }
    if (tok && tgt) {
        int B = (int)tok->dims[0], S = (int)tok->dims[1];
        const int32_t *tokens = (const int32_t *)tok->data, *targets = (const int32_t *)tgt->data;
        size_t nv = (size_t)B * S * c.vocab_size;
        const NamedTensor *logits = ref_tensor(r, &tf, "logits", TENSOR_F32, nv, ref_path);
        const NamedTensor *loss = ref_tensor(r, &tf, "loss", TENSOR_F32, 1, ref_path);
        CpuModel m;
        cpu_model_init(&m, &c, B, S);
        if (lora) {
            cpu_model_init_lora(&m, &lc, 0);
            lora_load(lora_path, &c, &lc, m.lora_params);
        }
        cpu_model_load_bf16(&m, bf16);
        float got_loss = cpu_model_forward(&m, tokens, targets, B, S);
        if (logits) test_compare_f32(r, "logits", m.logits, (const float *)logits->data, nv, TOL_FORWARD);
        if (loss) test_compare_scalar(r, "loss", got_loss, ((const float *)loss->data)[0], TOL_LOSS);
        cpu_model_backward(&m);
        RefCompareCtx x = {&tf, ref_path, "grad.", cpu_model_trainable_grads(&m), TOL_GRAD, r};
        if (lora) lora_layout_visit(&m.lora_layout, compare_param_tensor, &x);
        else param_layout_visit(&m.layout, &c, compare_param_tensor, &x);
        run_adamw(r, &m, &tf, ref_path, tokens, targets, B, S);
        cpu_model_free(&m);
    }
    tensor_file_free(&tf);
    free(bf16);
}

// ----------------------------------------------------------------------------
// 4. LoRA.

static void test_lora_invariants(TestReport *r) {
    ModelConfig c = all_features_config();
    int B = 2, S = 6, N = B * S, V = c.vocab_size;
    CpuModel base, m;
    cpu_model_init(&base, &c, B, S);
    cpu_model_init(&m, &c, B, S);
    LoraConfig lc = lora_config(2, 4.0f, (1u << LORA_K) | (1u << LORA_O) | (1u << LORA_UP));
    cpu_model_init_lora(&m, &lc, 5);
    random_params(&base);
    memcpy(m.params, base.params, m.layout.total * sizeof(float));
    int32_t tokens[12], targets[12];
    random_batch(tokens, targets, N, V);
    test_table_header("LoRA invariants, all-features config, rank 2 on k, o, up");

    const LoraLayout *L = &m.lora_layout;
    double a_excess = 0.0, b_max = 0.0, a_max = 0.0;
    for (int l = 0; l < c.n_layers; l++) {
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (!lora_has(L, t)) continue;
            const float *a = m.lora_params + lora_offset(L, l, t, 0), *b = m.lora_params + lora_offset(L, l, t, 1);
            double bound = 1.0 / sqrt((double)L->in[t]);
            for (size_t i = 0; i < (size_t)L->rank * L->in[t]; i++) {
                a_excess = fmax(a_excess, fabs(a[i]) - bound);
                a_max = fmax(a_max, fabs(a[i]) / bound);
            }
            for (size_t i = 0; i < L->out[t] * (size_t)L->rank; i++) b_max = fmax(b_max, fabs(b[i]));
        }
    }
    test_check(r, a_excess <= 0.0 && a_max > 0.5, "new adapter: every A within +-1/sqrt(in), not all small");
    test_table_row(r, "new adapter: max |B|", b_max, b_max, 0.0);

    cpu_model_forward(&base, tokens, targets, B, S);
    cpu_model_forward(&m, tokens, targets, B, S);
    test_compare_f32(r, "new adapter: logits vs the base alone", m.logits, base.logits, (size_t)N * V, 0.0);
    cpu_model_backward(&m);
    test_check(r, m.grads == NULL, "LoRA: the base has no gradient buffer");
    double da = 0.0, db = 0.0;
    for (int l = 0; l < c.n_layers; l++) {
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (!lora_has(L, t)) continue;
            const float *ga = m.lora_grads + lora_offset(L, l, t, 0), *gb = m.lora_grads + lora_offset(L, l, t, 1);
            for (size_t i = 0; i < (size_t)L->rank * L->in[t]; i++) da = fmax(da, fabs(ga[i]));
            for (size_t i = 0; i < L->out[t] * (size_t)L->rank; i++) db = fmax(db, fabs(gb[i]));
        }
    }
    test_table_row(r, "new adapter (B = 0): max |dA|", da, da, 0.0);
    test_check(r, db > 0.0, "new adapter: dB is not zero");

    float *mom1 = (float *)callocCheck(L->total, sizeof(float)), *mom2 = (float *)callocCheck(L->total, sizeof(float));
    float *before = (float *)mallocCheck(L->total * sizeof(float));
    memcpy(before, m.lora_params, L->total * sizeof(float));
    AdamWHparams h = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f};
    cpu_adamw_step(&m, mom1, mom2, &h, 1, 1.0f);
    test_check(r, memcmp(m.params, base.params, m.layout.total * sizeof(float)) == 0,
               "LoRA AdamW step: the base parameters are bit-identical");
    test_check(r, memcmp(m.lora_params, before, L->total * sizeof(float)) != 0, "LoRA AdamW step: the adapters moved");

    char path[] = "/tmp/test_lora_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) die("mkstemp failed");
    close(fd);
    lc.base_quant = BASE_QUANT_NF4;
    lora_save(path, &c, &lc, m.lora_params);
    LoraConfig back;
    float *loaded = (float *)mallocCheck(L->total * sizeof(float));
    lora_load(path, &c, &back, loaded);
    remove(path);
    test_check(r, back.rank == lc.rank && back.alpha == lc.alpha && back.targets == lc.targets &&
                      back.base_quant == BASE_QUANT_NF4 && memcmp(loaded, m.lora_params, L->total * sizeof(float)) == 0,
               "lora.bin save -> load: same settings and adapters, bit for bit");

    // lora_layout by hand for V=10 d=4 L=1 Hq=2 Hkv=1 hd=2 F=6, rank 2 on q and down:
    // A_q (2, 4) + B_q (4, 2) + A_down (2, 6) + B_down (4, 2) = 8 + 8 + 12 + 8 = 36 per layer; with B=1 S=3
    // the CPU path adds 2 x 36 (adapters, grads) + 2 x 3 x 2 (scratch) floats and frees the 212 base grads:
    // (72 + 12 - 212) x 4 = -512 bytes.
    ModelConfig small = hand_counted_config();
    LoraConfig slc = lora_config(2, 1.0f, (1u << LORA_Q) | (1u << LORA_DOWN));
    LoraLayout sl;
    lora_layout_init(&sl, &small, &slc);
    char line[128];
    snprintf(line, sizeof(line), "LoRA layout of a hand-counted config: %zu elements, cpu_lora_bytes %lld (want 36, -512)",
             sl.total, cpu_lora_bytes(&small, &slc, 1, 3));
    test_check(r, sl.total == 36 && cpu_lora_bytes(&small, &slc, 1, 3) == -512, line);
    free(mom1);
    free(mom2);
    free(before);
    free(loaded);
    cpu_model_free(&base);
    cpu_model_free(&m);
}

// Bad LoRA inputs die (or are refused) with a message.
typedef enum { LORA_BAD_BASE, LORA_BAD_TRUNCATED, LORA_BAD_RANK } LoraBadCall;
typedef struct { LoraBadCall which; const char *path; } LoraBadArg;

static void run_lora_bad_call(void *arg) {
    const LoraBadArg *a = (const LoraBadArg *)arg;
    ModelConfig c = all_features_config();
    LoraConfig lc = lora_config(0, 1.0f, 1u);
    if (a->which == LORA_BAD_RANK) {
        CpuModel m;
        cpu_model_init(&m, &c, 1, 2);
        cpu_model_init_lora(&m, &lc, 1);
    }
    if (a->which == LORA_BAD_BASE) c.vocab_size = 14;
    lora_load(a->path, &c, &lc, NULL);
}

static void test_lora_bad_calls(TestReport *r) {
    printf("\n== LoRA bad inputs\n");
    ModelConfig c = all_features_config();
    LoraConfig lc = lora_config(2, 1.0f, 1u << LORA_V);
    LoraLayout L;
    lora_layout_init(&L, &c, &lc);
    float *params = (float *)callocCheck(L.total, sizeof(float));
    char good[] = "/tmp/test_lora_good_XXXXXX", cut[] = "/tmp/test_lora_cut_XXXXXX";
    int fd1 = mkstemp(good), fd2 = mkstemp(cut);
    if (fd1 < 0 || fd2 < 0) die("mkstemp failed");
    close(fd1);
    close(fd2);
    lora_save(good, &c, &lc, params);
    lora_save(cut, &c, &lc, params);
    if (truncate(cut, lora_file_bytes(&L) - 4) != 0) die("truncate failed");
    LoraBadArg base = {LORA_BAD_BASE, good}, trunc = {LORA_BAD_TRUNCATED, cut}, rank = {LORA_BAD_RANK, good};
    test_expect_exit(r, "lora.bin of another base model", run_lora_bad_call, &base, 1, "belong to another base model");
    test_expect_exit(r, "truncated lora.bin", run_lora_bad_call, &trunc, 1, "truncated");
    test_expect_exit(r, "cpu_model_init_lora with rank 0", run_lora_bad_call, &rank, 1, "LoRA needs rank >= 1");
    remove(good);
    remove(cut);
    free(params);
    char msg[256];
    unsigned mask;
    const char *err = lora_parse_targets("q,x", &mask, msg, sizeof(msg));
    test_check(r, err && strstr(err, "'x' is not one of"), "--lora-targets q,x: 'x' is not one of q, k, v, ...");
    err = lora_parse_targets("gate,q,down", &mask, msg, sizeof(msg));
    test_check(r, !err && mask == ((1u << LORA_Q) | (1u << LORA_GATE) | (1u << LORA_DOWN)), "--lora-targets gate,q,down");
    LoraConfig quant_only = lora_config(0, 1.0f, 0);
    quant_only.base_quant = BASE_QUANT_NF4;
    err = lora_config_check(&quant_only, msg, sizeof(msg));
    test_check(r, err && strstr(err, "needs LoRA"), "a quantized base without LoRA is refused");
}

static const char *LORA_CASES[] = {"llama3_gqa", "qwen2", "gemma2"};

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/ref";
    TestReport r = {0, 0};
    test_bad_calls(&r);
    test_lora_bad_calls(&r);
    test_finite_differences(&r, NULL);
    test_invariants(&r);
    test_adamw_unit(&r);
    for (int i = 0; i < NUM_CASES; i++) run_reference_case(&r, dir, CASES[i], 0);
    LoraConfig fd_lora = lora_config(3, 5.0f, LORA_ALL_TARGETS);
    test_finite_differences(&r, &fd_lora);
    test_lora_invariants(&r);
    for (int i = 0; i < (int)(sizeof(LORA_CASES) / sizeof(LORA_CASES[0])); i++) run_reference_case(&r, dir, LORA_CASES[i], 1);
    return test_report_finish(&r, "test_cpu_model");
}

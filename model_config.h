// The model: its configuration, the model.bin file format and the parameter layout.
//
// model.bin = a header of MODEL_HEADER_INTS little-endian int32 slots (floats are stored as
// their IEEE-754 bits in an int32 slot), then every parameter tensor as bf16, row-major,
// in the order that param_layout_init() lists (see README "model.bin"):
//   embed (V, d)
//   for each layer l:  attn_norm (d), wq (Hq*hd, d), wk (Hkv*hd, d), wv (Hkv*hd, d),
//                      [bq (Hq*hd), bk (Hkv*hd), bv (Hkv*hd)], wo (d, Hq*hd), [post_attn_norm (d)],
//                      mlp_norm (d), w_gate (F, d), w_up (F, d), w_down (d, F), [post_mlp_norm (d)]
// wq|wk|wv are adjacent (one fused QKV projection), as are bq|bk|bv and w_gate|w_up.
//   final_norm (d)
//   [lm_head (V, d)]          absent when the embeddings are tied
// Bracketed tensors exist only when the config asks for them (qkv_bias, post_norms, untied head).
// Weights keep Hugging Face's orientation (out_features, in_features) and its q/k row order
// (RoPE rotates dimension i with i + hd/2), so export and import are plain byte copies.
#ifndef MODEL_CONFIG_H
#define MODEL_CONFIG_H

#include <math.h>
#include "utils.h"

#define MODEL_MAGIC 0x4D53544Du  // "MTSM" read as little-endian bytes: 'M','T','S','M'
#define MODEL_VERSION 1
#define MODEL_HEADER_INTS 256
#define MODEL_HEADER_BYTES (MODEL_HEADER_INTS * 4)

typedef enum { FAMILY_LLAMA = 0, FAMILY_MISTRAL = 1, FAMILY_QWEN2 = 2, FAMILY_GEMMA2 = 3, FAMILY_COUNT } ModelFamily;
typedef enum { ACT_SILU = 0, ACT_GELU_TANH = 1 } Activation;  // SwiGLU / GeGLU (tanh GELU)
typedef enum { ROPE_SCALING_NONE = 0, ROPE_SCALING_LLAMA3 = 1 } RopeScaling;

// Header slot indices. Integer slots hold int32; float slots hold float32 bits.
enum {
    HDR_MAGIC = 0, HDR_VERSION = 1, HDR_FAMILY = 2, HDR_VOCAB = 3, HDR_D_MODEL = 4, HDR_LAYERS = 5,
    HDR_HEADS = 6, HDR_KV_HEADS = 7, HDR_HEAD_DIM = 8, HDR_D_FF = 9, HDR_MAX_POS = 10,
    HDR_TIED_EMBED = 11, HDR_QKV_BIAS = 12, HDR_NORM_OFFSET = 13, HDR_POST_NORMS = 14,
    HDR_ACTIVATION = 15, HDR_SLIDING_WINDOW = 16, HDR_SLIDING_PERIOD = 17, HDR_ROPE_SCALING = 18,
    HDR_ROPE_ORIG_MAX_POS = 19,
    HDR_F_NORM_EPS = 32, HDR_F_ROPE_THETA = 33, HDR_F_ROPE_FACTOR = 34, HDR_F_ROPE_LOW_FREQ = 35,
    HDR_F_ROPE_HIGH_FREQ = 36, HDR_F_ATTN_SOFTCAP = 37, HDR_F_FINAL_SOFTCAP = 38,
    HDR_F_QUERY_SCALE = 39, HDR_F_EMBED_SCALE = 40,
};

typedef struct {
    int family;            // ModelFamily
    int vocab_size;        // V: rows of the embedding and of the LM head
    int d_model;           // d
    int n_layers;          // L
    int n_heads;           // Hq
    int n_kv_heads;        // Hkv (divides Hq; GQA when smaller)
    int head_dim;          // hd (Gemma-2: not d / Hq)
    int d_ff;              // F
    int max_pos;           // max_position_embeddings (informational; RoPE works at any position)
    int tied_embeddings;   // 1: the LM head is the embedding matrix
    int qkv_bias;          // 1: q/k/v projections have biases (Qwen2)
    int norm_offset;       // 1: RMSNorm scales by (1 + w) (Gemma)
    int post_norms;        // 1: RMSNorm on the attention and MLP outputs before the residual (Gemma-2)
    int activation;        // Activation
    int sliding_window;    // 0: full causal attention; else keys within this many positions (incl. self)
    int sliding_period;    // layer l uses the window when l % sliding_period == 0 (1: every layer)
    int rope_scaling;      // RopeScaling
    int rope_orig_max_pos; // Llama-3 scaling: original_max_position_embeddings
    float norm_eps;
    float rope_theta;
    float rope_factor, rope_low_freq_factor, rope_high_freq_factor;  // Llama-3 scaling
    float attn_softcap;    // 0: none; else scores = cap * tanh(scores / cap) (Gemma-2)
    float final_softcap;   // 0: none; else logits = cap * tanh(logits / cap) (Gemma-2)
    float query_scale;     // multiplies q.k (1/sqrt(hd), or Gemma-2's query_pre_attn_scalar^-0.5)
    float embed_scale;     // multiplies the embedding output (1, or sqrt(d) for Gemma)
} ModelConfig;

static inline const char *family_name(int family) {
    switch (family) {
        case FAMILY_LLAMA: return "llama";
        case FAMILY_MISTRAL: return "mistral";
        case FAMILY_QWEN2: return "qwen2";
        case FAMILY_GEMMA2: return "gemma2";
        default: return "unknown";
    }
}

static inline int config_layer_is_sliding(const ModelConfig *c, int layer) {
    return c->sliding_window > 0 && (layer % c->sliding_period) == 0;
}

static inline float header_float(const int32_t *h, int slot) {
    float f;
    memcpy(&f, &h[slot], sizeof(f));
    return f;
}

static inline void header_set_float(int32_t *h, int slot, float f) { memcpy(&h[slot], &f, sizeof(f)); }

// Checks every field for a sane range. Returns NULL when valid, else a message naming the field.
// `buf` receives the message text.
static inline const char *config_validate(const ModelConfig *c, char *buf, size_t buflen) {
#define BAD(...) do { snprintf(buf, buflen, __VA_ARGS__); return buf; } while (0)
    if (c->family < 0 || c->family >= FAMILY_COUNT) BAD("family %d is not one of 0..%d", c->family, FAMILY_COUNT - 1);
    if (c->vocab_size < 2 || c->vocab_size > (1 << 24)) BAD("vocab_size %d out of range [2, 16777216]", c->vocab_size);
    if (c->d_model < 1 || c->d_model > 65536) BAD("d_model %d out of range [1, 65536]", c->d_model);
    if (c->n_layers < 1 || c->n_layers > 1024) BAD("n_layers %d out of range [1, 1024]", c->n_layers);
    if (c->n_heads < 1 || c->n_heads > 1024) BAD("n_heads %d out of range [1, 1024]", c->n_heads);
    if (c->n_kv_heads < 1 || c->n_kv_heads > c->n_heads || c->n_heads % c->n_kv_heads != 0)
        BAD("n_kv_heads %d must be in [1, n_heads=%d] and divide it", c->n_kv_heads, c->n_heads);
    if (c->head_dim < 2 || c->head_dim > 1024 || c->head_dim % 2 != 0) BAD("head_dim %d must be even and in [2, 1024]", c->head_dim);
    if (c->d_ff < 1 || c->d_ff > (1 << 20)) BAD("d_ff %d out of range [1, 1048576]", c->d_ff);
    if (c->max_pos < 1) BAD("max_position_embeddings %d must be positive", c->max_pos);
    if ((unsigned)c->tied_embeddings > 1 || (unsigned)c->qkv_bias > 1 || (unsigned)c->norm_offset > 1 || (unsigned)c->post_norms > 1)
        BAD("flags must be 0 or 1 (tied %d, qkv_bias %d, norm_offset %d, post_norms %d)",
            c->tied_embeddings, c->qkv_bias, c->norm_offset, c->post_norms);
    if (c->activation != ACT_SILU && c->activation != ACT_GELU_TANH) BAD("activation %d is not 0 (silu) or 1 (gelu_tanh)", c->activation);
    if (c->sliding_window < 0) BAD("sliding_window %d is negative", c->sliding_window);
    if (c->sliding_period < 1 || c->sliding_period > c->n_layers + 1) BAD("sliding_period %d out of range [1, n_layers+1]", c->sliding_period);
    if (c->rope_scaling != ROPE_SCALING_NONE && c->rope_scaling != ROPE_SCALING_LLAMA3) BAD("rope_scaling %d is not 0 (none) or 1 (llama3)", c->rope_scaling);
    if (!(c->norm_eps > 0.0f && c->norm_eps < 1.0f)) BAD("norm_eps %g out of range (0, 1)", c->norm_eps);
    if (!(c->rope_theta > 1.0f && isfinite(c->rope_theta))) BAD("rope_theta %g must be finite and > 1", c->rope_theta);
    if (c->rope_scaling == ROPE_SCALING_LLAMA3) {
        if (!(c->rope_factor >= 1.0f) || !(c->rope_low_freq_factor > 0.0f) || !(c->rope_high_freq_factor > c->rope_low_freq_factor) || c->rope_orig_max_pos < 1)
            BAD("llama3 rope scaling needs factor >= 1, 0 < low_freq_factor < high_freq_factor, original_max_position_embeddings >= 1 (got %g, %g, %g, %d)",
                c->rope_factor, c->rope_low_freq_factor, c->rope_high_freq_factor, c->rope_orig_max_pos);
    }
    if (!(c->attn_softcap >= 0.0f && isfinite(c->attn_softcap))) BAD("attention soft-cap %g must be >= 0", c->attn_softcap);
    if (!(c->final_softcap >= 0.0f && isfinite(c->final_softcap))) BAD("final logit soft-cap %g must be >= 0", c->final_softcap);
    if (!(c->query_scale > 0.0f && isfinite(c->query_scale))) BAD("query_scale %g must be > 0", c->query_scale);
    if (!(c->embed_scale > 0.0f && isfinite(c->embed_scale))) BAD("embed_scale %g must be > 0", c->embed_scale);
    return NULL;
#undef BAD
}

// Parses and validates a header. Returns NULL on success, else an error message in `buf`.
static inline const char *config_from_header(ModelConfig *c, const int32_t *h, char *buf, size_t buflen) {
    if ((uint32_t)h[HDR_MAGIC] != MODEL_MAGIC) {
        snprintf(buf, buflen, "bad magic 0x%08x (expected 0x%08x): not a model.bin file", (uint32_t)h[HDR_MAGIC], MODEL_MAGIC);
        return buf;
    }
    if (h[HDR_VERSION] != MODEL_VERSION) {
        snprintf(buf, buflen, "unsupported model.bin version %d (this build reads version %d)", h[HDR_VERSION], MODEL_VERSION);
        return buf;
    }
    c->family = h[HDR_FAMILY];
    c->vocab_size = h[HDR_VOCAB];
    c->d_model = h[HDR_D_MODEL];
    c->n_layers = h[HDR_LAYERS];
    c->n_heads = h[HDR_HEADS];
    c->n_kv_heads = h[HDR_KV_HEADS];
    c->head_dim = h[HDR_HEAD_DIM];
    c->d_ff = h[HDR_D_FF];
    c->max_pos = h[HDR_MAX_POS];
    c->tied_embeddings = h[HDR_TIED_EMBED];
    c->qkv_bias = h[HDR_QKV_BIAS];
    c->norm_offset = h[HDR_NORM_OFFSET];
    c->post_norms = h[HDR_POST_NORMS];
    c->activation = h[HDR_ACTIVATION];
    c->sliding_window = h[HDR_SLIDING_WINDOW];
    c->sliding_period = h[HDR_SLIDING_PERIOD];
    c->rope_scaling = h[HDR_ROPE_SCALING];
    c->rope_orig_max_pos = h[HDR_ROPE_ORIG_MAX_POS];
    c->norm_eps = header_float(h, HDR_F_NORM_EPS);
    c->rope_theta = header_float(h, HDR_F_ROPE_THETA);
    c->rope_factor = header_float(h, HDR_F_ROPE_FACTOR);
    c->rope_low_freq_factor = header_float(h, HDR_F_ROPE_LOW_FREQ);
    c->rope_high_freq_factor = header_float(h, HDR_F_ROPE_HIGH_FREQ);
    c->attn_softcap = header_float(h, HDR_F_ATTN_SOFTCAP);
    c->final_softcap = header_float(h, HDR_F_FINAL_SOFTCAP);
    c->query_scale = header_float(h, HDR_F_QUERY_SCALE);
    c->embed_scale = header_float(h, HDR_F_EMBED_SCALE);
    return config_validate(c, buf, buflen);
}

static inline void config_to_header(const ModelConfig *c, int32_t *h) {
    memset(h, 0, MODEL_HEADER_BYTES);
    h[HDR_MAGIC] = (int32_t)MODEL_MAGIC;
    h[HDR_VERSION] = MODEL_VERSION;
    h[HDR_FAMILY] = c->family;
    h[HDR_VOCAB] = c->vocab_size;
    h[HDR_D_MODEL] = c->d_model;
    h[HDR_LAYERS] = c->n_layers;
    h[HDR_HEADS] = c->n_heads;
    h[HDR_KV_HEADS] = c->n_kv_heads;
    h[HDR_HEAD_DIM] = c->head_dim;
    h[HDR_D_FF] = c->d_ff;
    h[HDR_MAX_POS] = c->max_pos;
    h[HDR_TIED_EMBED] = c->tied_embeddings;
    h[HDR_QKV_BIAS] = c->qkv_bias;
    h[HDR_NORM_OFFSET] = c->norm_offset;
    h[HDR_POST_NORMS] = c->post_norms;
    h[HDR_ACTIVATION] = c->activation;
    h[HDR_SLIDING_WINDOW] = c->sliding_window;
    h[HDR_SLIDING_PERIOD] = c->sliding_period;
    h[HDR_ROPE_SCALING] = c->rope_scaling;
    h[HDR_ROPE_ORIG_MAX_POS] = c->rope_orig_max_pos;
    header_set_float(h, HDR_F_NORM_EPS, c->norm_eps);
    header_set_float(h, HDR_F_ROPE_THETA, c->rope_theta);
    header_set_float(h, HDR_F_ROPE_FACTOR, c->rope_factor);
    header_set_float(h, HDR_F_ROPE_LOW_FREQ, c->rope_low_freq_factor);
    header_set_float(h, HDR_F_ROPE_HIGH_FREQ, c->rope_high_freq_factor);
    header_set_float(h, HDR_F_ATTN_SOFTCAP, c->attn_softcap);
    header_set_float(h, HDR_F_FINAL_SOFTCAP, c->final_softcap);
    header_set_float(h, HDR_F_QUERY_SCALE, c->query_scale);
    header_set_float(h, HDR_F_EMBED_SCALE, c->embed_scale);
}

// ----------------------------------------------------------------------------
// Parameter layout: every tensor's name, shape and offset (in elements) in one flat array,
// in file order. A layer's tensors are contiguous, so a layer is one (offset, count) block.

// Tensor kinds within a layer, in file order.
typedef enum {
    LT_ATTN_NORM, LT_WQ, LT_WK, LT_WV, LT_BQ, LT_BK, LT_BV, LT_WO, LT_POST_ATTN_NORM,
    LT_MLP_NORM, LT_W_GATE, LT_W_UP, LT_W_DOWN, LT_POST_MLP_NORM, LT_COUNT
} LayerTensor;

typedef struct {
    size_t offset[LT_COUNT];  // element offset of each tensor within the layer block (SIZE_MAX: absent)
    size_t rows[LT_COUNT], cols[LT_COUNT];
} LayerLayout;

typedef struct {
    size_t embed;             // offset of embed (V, d)
    size_t layers_begin;      // offset of layer 0's block
    size_t layer_size;        // elements in one layer block
    size_t final_norm;        // offset of final_norm (d)
    size_t lm_head;           // offset of the LM head (V, d): == embed when tied
    size_t total;             // elements in all parameters
    LayerLayout layer;        // offsets within a layer block (identical for every layer)
} ParamLayout;

static inline const char *layer_tensor_name(int t) {
    static const char *names[LT_COUNT] = {"attn_norm", "wq", "wk", "wv", "bq", "bk", "bv", "wo",
                                          "post_attn_norm", "mlp_norm", "w_gate", "w_up", "w_down",
                                          "post_mlp_norm"};
    return names[t];
}

static inline int layer_tensor_present(const ModelConfig *c, int t) {
    switch (t) {
        case LT_BQ: case LT_BK: case LT_BV: return c->qkv_bias;
        case LT_POST_ATTN_NORM: case LT_POST_MLP_NORM: return c->post_norms;
        default: return 1;
    }
}

static inline void param_layout_init(ParamLayout *p, const ModelConfig *c) {
    size_t d = (size_t)c->d_model, q = (size_t)c->n_heads * c->head_dim;
    size_t kv = (size_t)c->n_kv_heads * c->head_dim, f = (size_t)c->d_ff;
    size_t shapes[LT_COUNT][2] = {
        {1, d}, {q, d}, {kv, d}, {kv, d}, {1, q}, {1, kv}, {1, kv}, {d, q}, {1, d},
        {1, d}, {f, d}, {f, d}, {d, f}, {1, d}};
    size_t at = 0;
    for (int t = 0; t < LT_COUNT; t++) {
        p->layer.rows[t] = shapes[t][0];
        p->layer.cols[t] = shapes[t][1];
        if (layer_tensor_present(c, t)) {
            p->layer.offset[t] = at;
            at += shapes[t][0] * shapes[t][1];
        } else {
            p->layer.offset[t] = SIZE_MAX;
        }
    }
    p->layer_size = at;
    p->embed = 0;
    p->layers_begin = (size_t)c->vocab_size * d;
    p->final_norm = p->layers_begin + (size_t)c->n_layers * p->layer_size;
    p->lm_head = c->tied_embeddings ? p->embed : p->final_norm + d;
    p->total = p->final_norm + d + (c->tied_embeddings ? 0 : (size_t)c->vocab_size * d);
}

// Offset of tensor t of layer l in the flat parameter array.
static inline size_t param_offset(const ParamLayout *p, int layer, int t) {
    return p->layers_begin + (size_t)layer * p->layer_size + p->layer.offset[t];
}

// Calls fn(name, offset, rows, cols, ctx) for every tensor in file order.
// Names: "embed", "layers.<l>.<tensor>", "final_norm", "lm_head".
typedef void (*ParamVisitor)(const char *name, size_t offset, size_t rows, size_t cols, void *ctx);

static inline void param_layout_visit(const ParamLayout *p, const ModelConfig *c, ParamVisitor fn, void *ctx) {
    char name[64];
    fn("embed", p->embed, (size_t)c->vocab_size, (size_t)c->d_model, ctx);
    for (int l = 0; l < c->n_layers; l++) {
        for (int t = 0; t < LT_COUNT; t++) {
            if (p->layer.offset[t] == SIZE_MAX) continue;
            snprintf(name, sizeof(name), "layers.%d.%s", l, layer_tensor_name(t));
            fn(name, param_offset(p, l, t), p->layer.rows[t], p->layer.cols[t], ctx);
        }
    }
    fn("final_norm", p->final_norm, 1, (size_t)c->d_model, ctx);
    if (!c->tied_embeddings) fn("lm_head", p->lm_head, (size_t)c->vocab_size, (size_t)c->d_model, ctx);
}

// ----------------------------------------------------------------------------
// model.bin I/O (host side). The loader checks magic, version, every config field, and that
// the file holds exactly header + total parameters as bf16.

// Reads the header only (for planning without weights). Dies with a clear message on any problem.
static inline void model_read_config(ModelConfig *c, const char *path) {
    FILE *f = fopenCheck(path, "rb");
    long size = file_size_bytes(f, path);
    if (size < MODEL_HEADER_BYTES) die("%s: truncated: %ld bytes, smaller than the %d-byte header", path, size, MODEL_HEADER_BYTES);
    int32_t header[MODEL_HEADER_INTS];
    freadCheck(header, sizeof(int32_t), MODEL_HEADER_INTS, f, path);
    char msg[512];
    const char *err = config_from_header(c, header, msg, sizeof(msg));
    if (err) die("%s: %s", path, err);
    ParamLayout layout;
    param_layout_init(&layout, c);
    long expected = MODEL_HEADER_BYTES + (long)(layout.total * sizeof(uint16_t));
    if (size != expected) {
        die("%s: size %ld bytes disagrees with its header: %s config with %zu parameters needs %ld bytes (%s)",
            path, size, family_name(c->family), layout.total, expected, size < expected ? "truncated" : "trailing bytes");
    }
    fcloseCheck(f, path);
}

// Reads the config and all parameters as raw bf16 bits into a new buffer of layout->total elements.
static inline uint16_t *model_load_bf16(ModelConfig *c, ParamLayout *layout, const char *path) {
    model_read_config(c, path);
    param_layout_init(layout, c);
    uint16_t *params = (uint16_t *)mallocCheck(layout->total * sizeof(uint16_t));
    FILE *f = fopenCheck(path, "rb");
    fseekCheck(f, MODEL_HEADER_BYTES, SEEK_SET, path);
    freadCheck(params, sizeof(uint16_t), layout->total, f, path);
    fcloseCheck(f, path);
    return params;
}

// Writes header + bf16 parameters to `path` through a temporary file and a rename.
static inline void model_save_bf16(const ModelConfig *c, const uint16_t *params, const char *path) {
    ParamLayout layout;
    param_layout_init(&layout, c);
    int32_t header[MODEL_HEADER_INTS];
    config_to_header(c, header);
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopenCheck(tmp, "wb");
    fwriteCheck(header, sizeof(int32_t), MODEL_HEADER_INTS, f, tmp);
    fwriteCheck(params, sizeof(uint16_t), layout.total, f, tmp);
    fcloseCheck(f, tmp);
    rename_check(tmp, path);
}

// Parameter count (for MFU: 6 N tokens) excluding the embedding lookup table, and including the
// LM head (tied or not), since every token multiplies by it.
static inline size_t config_matmul_params(const ModelConfig *c) {
    ParamLayout p;
    param_layout_init(&p, c);
    return (size_t)c->n_layers * p.layer_size + (size_t)c->vocab_size * c->d_model;
}

#endif  // MODEL_CONFIG_H

// LoRA adapters on a frozen base model: the configuration, the adapter layout, PEFT's initialization
// and the lora.bin file. Plain C (host), also valid C++.
//
// A target t (q, k, v, o, gate, up, down) is one projection W_t (out, in) of every layer. Its adapter is
// A (r, in) and B (out, r), and the layer computes y = x W_t^T + scale * (x A^T) B^T with
// scale = alpha / r (Hu et al. 2021, as PEFT's LoRA layers). A new adapter has B = 0 and A uniform in
// [-1/sqrt(in), 1/sqrt(in)] (the bound of PEFT's kaiming_uniform_(a = sqrt(5))), so training starts
// from the base model. Only the adapters train: the base has no gradients and no optimizer state.
//
// The base keeps its fused GEMMs (q|k|v and gate|up), so targets are grouped by the fused base GEMM
// whose output they add to: LG_QKV (q, k, v), LG_O (o), LG_GATE_UP (gate, up), LG_DOWN (down).
// A layer's adapters lie group by group; within a group first the A's of its targets (adjacent: one
// (R, in) matrix A_cat with R = r x the group's targets), then their B's:
//   [A_q A_k A_v B_q B_k B_v] [A_o B_o] [A_gate A_up B_gate B_up] [A_down B_down]
// (targets without an adapter leave no gap). Layer l's block starts at l * layer_size.
//
// lora.bin, little-endian: LORA_HEADER_INTS int32 slots
//   [0] magic 'M','T','S','L'  [1] version  [2] rank  [3] alpha (float32 bits)  [4] target mask
//   (bit t: target t)  [5] base quantization the adapters were trained on (BaseQuant)  [6] n_layers
//   [7] adapter elements; the rest 0
// then the base model's MODEL_HEADER_INTS header (the config the adapters belong to), then every
// adapter tensor as fp32, in lora_layout_visit order. model.bin stays the base, untouched.
#ifndef LORA_H
#define LORA_H

#include <math.h>
#include "model_config.h"
#include "quant.h"

#define LORA_MAGIC 0x4C53544Du  // bytes 'M','T','S','L'
#define LORA_VERSION 1
#define LORA_HEADER_INTS 64

typedef enum { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_TARGET_COUNT } LoraTarget;
typedef enum { LG_QKV, LG_O, LG_GATE_UP, LG_DOWN, LORA_GROUP_COUNT } LoraGroup;

#define LORA_ALL_TARGETS ((1u << LORA_TARGET_COUNT) - 1u)

typedef struct {
    int rank;          // r >= 1; 0: no LoRA (every weight trains)
    float alpha;       // scale = alpha / r
    unsigned targets;  // bit t set: target t has an adapter
    int base_quant;    // BaseQuant: storage of the frozen base matrices (needs rank >= 1 unless none)
} LoraConfig;

typedef struct {
    int rank, n_layers;
    unsigned targets;
    float scale;                          // alpha / rank
    size_t in[LORA_TARGET_COUNT], out[LORA_TARGET_COUNT];
    size_t a_off[LORA_TARGET_COUNT];      // A's offset in a layer block (SIZE_MAX: no adapter)
    size_t b_off[LORA_TARGET_COUNT];      // B's offset
    size_t row_off[LORA_TARGET_COUNT];    // first column of the target in its group's fused base output
    int group_rank[LORA_GROUP_COUNT];     // R: r x adapted targets of the group (0: none)
    size_t group_a[LORA_GROUP_COUNT];     // offset of the group's A_cat in a layer block
    size_t group_in[LORA_GROUP_COUNT], group_out[LORA_GROUP_COUNT];  // fused base GEMM (out, in)
    size_t layer_size, total;             // elements of one layer block, of all layers
} LoraLayout;

static inline const char *lora_target_name(int t) {
    static const char *names[LORA_TARGET_COUNT] = {"q", "k", "v", "o", "gate", "up", "down"};
    return names[t];
}

// Hugging Face module name of a target (PEFT's target_modules).
static inline const char *lora_target_hf_module(int t) {
    static const char *names[LORA_TARGET_COUNT] = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"};
    return names[t];
}

// The base weight a target adapts.
static inline int lora_target_tensor(int t) {
    static const int tensors[LORA_TARGET_COUNT] = {LT_WQ, LT_WK, LT_WV, LT_WO, LT_W_GATE, LT_W_UP, LT_W_DOWN};
    return tensors[t];
}

static inline int lora_target_group(int t) {
    static const int groups[LORA_TARGET_COUNT] = {LG_QKV, LG_QKV, LG_QKV, LG_O, LG_GATE_UP, LG_GATE_UP, LG_DOWN};
    return groups[t];
}

static inline int lora_has(const LoraLayout *L, int t) { return L->rank > 0 && (L->targets >> t & 1u); }

// "q,k,v,o,gate,up,down" (any subset, any order, or "all") -> *mask. NULL when valid, else a message.
static inline const char *lora_parse_targets(const char *list, unsigned *mask, char *buf, size_t len) {
    *mask = 0;
    if (strcmp(list, "all") == 0) {
        *mask = LORA_ALL_TARGETS;
        return NULL;
    }
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t n = end ? (size_t)(end - p) : strlen(p);
        int found = -1;
        for (int t = 0; t < LORA_TARGET_COUNT; t++)
            if (strlen(lora_target_name(t)) == n && strncmp(p, lora_target_name(t), n) == 0) found = t;
        if (found < 0) {
            snprintf(buf, len, "LoRA target '%.*s' is not one of q, k, v, o, gate, up, down (or 'all')", (int)n, p);
            return buf;
        }
        *mask |= 1u << found;
        p += n;
        if (*p == ',') p++;
    }
    if (*mask == 0) {
        snprintf(buf, len, "LoRA targets '%s' name no projection", list);
        return buf;
    }
    return NULL;
}

// NULL when the LoRA settings are valid for a base of n_layers layers, else a message in buf.
static inline const char *lora_config_check(const LoraConfig *lc, char *buf, size_t len) {
    if (lc->rank < 0 || lc->rank > 65536) { snprintf(buf, len, "LoRA rank %d must be in [1, 65536] (0: no LoRA)", lc->rank); return buf; }
    if (lc->base_quant < 0 || lc->base_quant >= BASE_QUANT_COUNT) { snprintf(buf, len, "base quantization %d is not none, int8 or nf4", lc->base_quant); return buf; }
    if (lc->rank == 0) {
        if (lc->base_quant != BASE_QUANT_NONE) { snprintf(buf, len, "a quantized base (%s) is frozen: it needs LoRA (--lora-rank R)", base_quant_name(lc->base_quant)); return buf; }
        return NULL;
    }
    if (!(lc->alpha > 0.0f) || !isfinite(lc->alpha)) { snprintf(buf, len, "LoRA alpha %g must be positive", lc->alpha); return buf; }
    if (lc->targets == 0 || (lc->targets & ~LORA_ALL_TARGETS)) { snprintf(buf, len, "LoRA target mask 0x%x names no projection or an unknown one", lc->targets); return buf; }
    return NULL;
}

static inline void lora_layout_init(LoraLayout *L, const ModelConfig *c, const LoraConfig *lc) {
    memset(L, 0, sizeof(*L));
    ParamLayout p;
    param_layout_init(&p, c);
    L->rank = lc->rank;
    L->n_layers = c->n_layers;
    L->targets = lc->rank > 0 ? lc->targets : 0;
    L->scale = lc->rank > 0 ? lc->alpha / (float)lc->rank : 0.0f;
    size_t r = (size_t)lc->rank, at = 0, row_in_group[LORA_GROUP_COUNT] = {0, 0, 0, 0};
    for (int t = 0; t < LORA_TARGET_COUNT; t++) {
        int lt = lora_target_tensor(t), g = lora_target_group(t);
        L->out[t] = p.layer.rows[lt];
        L->in[t] = p.layer.cols[lt];
        L->row_off[t] = row_in_group[g];
        row_in_group[g] += L->out[t];
        L->group_in[g] = L->in[t];
        L->a_off[t] = L->b_off[t] = SIZE_MAX;
    }
    for (int g = 0; g < LORA_GROUP_COUNT; g++) {
        L->group_out[g] = row_in_group[g];
        L->group_a[g] = at;
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (lora_target_group(t) != g || !lora_has(L, t)) continue;
            L->a_off[t] = at;
            at += r * L->in[t];
            L->group_rank[g] += lc->rank;
        }
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (lora_target_group(t) != g || !lora_has(L, t)) continue;
            L->b_off[t] = at;
            at += L->out[t] * r;
        }
    }
    L->layer_size = at;
    L->total = at * (size_t)c->n_layers;
}

// Offset of target t's A (or B when is_b) of layer l in the flat adapter array.
static inline size_t lora_offset(const LoraLayout *L, int layer, int t, int is_b) {
    return (size_t)layer * L->layer_size + (is_b ? L->b_off[t] : L->a_off[t]);
}

// Calls fn(name, offset, rows, cols, ctx) for every adapter tensor in file order:
// "layers.<l>.<target>.lora_A" (r, in) and "...lora_B" (out, r).
static inline void lora_layout_visit(const LoraLayout *L, ParamVisitor fn, void *ctx) {
    char name[64];
    for (int l = 0; l < L->n_layers; l++) {
        for (int g = 0; g < LORA_GROUP_COUNT; g++) {
            for (int is_b = 0; is_b < 2; is_b++) {
                for (int t = 0; t < LORA_TARGET_COUNT; t++) {
                    if (lora_target_group(t) != g || !lora_has(L, t)) continue;
                    snprintf(name, sizeof(name), "layers.%d.%s.lora_%s", l, lora_target_name(t), is_b ? "B" : "A");
                    fn(name, lora_offset(L, l, t, is_b), is_b ? L->out[t] : (size_t)L->rank,
                       is_b ? (size_t)L->rank : L->in[t], ctx);
                }
            }
        }
    }
}

// splitmix64: the adapter init's random stream (one per layer and target, so the values do not
// depend on which other targets have adapters).
static inline uint64_t lora_splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// New adapters (PEFT's default): every A uniform in [-1/sqrt(in), 1/sqrt(in)), every B zero.
static inline void lora_init_params(float *params, const LoraLayout *L, uint64_t seed) {
    for (int l = 0; l < L->n_layers; l++) {
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (!lora_has(L, t)) continue;
            uint64_t s = seed ^ ((uint64_t)(l * LORA_TARGET_COUNT + t + 1) << 32);
            float bound = 1.0f / sqrtf((float)L->in[t]);
            float *a = params + lora_offset(L, l, t, 0), *b = params + lora_offset(L, l, t, 1);
            for (size_t i = 0; i < (size_t)L->rank * L->in[t]; i++)
                a[i] = bound * (float)((double)(lora_splitmix(&s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
            memset(b, 0, L->out[t] * (size_t)L->rank * sizeof(float));
        }
    }
}

// The targets as "q,k,v" (for logs and the PEFT config).
static inline void lora_targets_string(unsigned mask, char *buf, size_t len) {
    buf[0] = '\0';
    for (int t = 0; t < LORA_TARGET_COUNT; t++) {
        if (!(mask >> t & 1u)) continue;
        size_t used = strlen(buf);
        snprintf(buf + used, len - used, "%s%s", used ? "," : "", lora_target_name(t));
    }
}

// ---- lora.bin ----

static inline long lora_file_bytes(const LoraLayout *L) {
    return (long)(LORA_HEADER_INTS + MODEL_HEADER_INTS) * 4 + (long)(L->total * sizeof(float));
}

// Writes the adapters of base c (params: L.total fp32) through a temporary file and a rename.
static inline void lora_save(const char *path, const ModelConfig *c, const LoraConfig *lc, const float *params) {
    LoraLayout L;
    lora_layout_init(&L, c, lc);
    int32_t h[LORA_HEADER_INTS], base[MODEL_HEADER_INTS];
    memset(h, 0, sizeof(h));
    h[0] = (int32_t)LORA_MAGIC;
    h[1] = LORA_VERSION;
    h[2] = lc->rank;
    memcpy(&h[3], &lc->alpha, sizeof(float));
    h[4] = (int32_t)lc->targets;
    h[5] = lc->base_quant;
    h[6] = c->n_layers;
    h[7] = (int32_t)L.total;
    config_to_header(c, base);
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    FILE *f = fopenCheck(tmp, "wb");
    fwriteCheck(h, sizeof(int32_t), LORA_HEADER_INTS, f, tmp);
    fwriteCheck(base, sizeof(int32_t), MODEL_HEADER_INTS, f, tmp);
    fwriteCheck(params, sizeof(float), L.total, f, tmp);
    fcloseCheck(f, tmp);
    rename_check(tmp, path);
}

// Reads lora.bin's settings into *lc (checking that it belongs to base c) and, when params is not
// NULL, its adapters (lora_layout's total fp32). Dies with a message naming the file on any problem.
static inline void lora_load(const char *path, const ModelConfig *c, LoraConfig *lc, float *params) {
    FILE *f = fopenCheck(path, "rb");
    long size = file_size_bytes(f, path);
    long head = (long)(LORA_HEADER_INTS + MODEL_HEADER_INTS) * 4;
    if (size < head) die("%s: truncated: %ld bytes, smaller than the %ld-byte lora.bin header", path, size, head);
    int32_t h[LORA_HEADER_INTS], base[MODEL_HEADER_INTS], want[MODEL_HEADER_INTS];
    freadCheck(h, sizeof(int32_t), LORA_HEADER_INTS, f, path);
    freadCheck(base, sizeof(int32_t), MODEL_HEADER_INTS, f, path);
    if ((uint32_t)h[0] != LORA_MAGIC) die("%s: bad magic 0x%08x (expected 0x%08x): not a lora.bin file", path, (uint32_t)h[0], LORA_MAGIC);
    if (h[1] != LORA_VERSION) die("%s: unsupported lora.bin version %d (this build reads version %d)", path, h[1], LORA_VERSION);
    lc->rank = h[2];
    memcpy(&lc->alpha, &h[3], sizeof(float));
    lc->targets = (unsigned)h[4];
    lc->base_quant = h[5];
    char msg[256];
    if (lc->rank < 1) die("%s: LoRA rank %d must be >= 1", path, lc->rank);
    if (lora_config_check(lc, msg, sizeof(msg))) die("%s: %s", path, msg);
    config_to_header(c, want);
    if (memcmp(base, want, sizeof(want)) != 0 || h[6] != c->n_layers)
        die("%s: the adapters belong to another base model (its config differs from the model's header)", path);
    LoraLayout L;
    lora_layout_init(&L, c, lc);
    if (h[7] != (int32_t)L.total || size != lora_file_bytes(&L))
        die("%s: size %ld bytes (%d adapter elements in the header) disagrees with rank %d on targets 0x%x: %ld bytes (%s)",
            path, size, h[7], lc->rank, lc->targets, lora_file_bytes(&L), size < lora_file_bytes(&L) ? "truncated" : "trailing bytes");
    if (params) freadCheck(params, sizeof(float), L.total, f, path);
    fcloseCheck(f, path);
}

#endif  // LORA_H

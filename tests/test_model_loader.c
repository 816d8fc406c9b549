// Tests of model_config.h (config checks, parameter layout, model.bin I/O) and tensor_file.h
// (reference bundles).
//  - Every loader error path is fed a broken file written to a temp dir; the loader runs in a
//    forked child that must exit with status 1 and print a specific phrase on stderr.
//  - param_layout_init totals against the published parameter counts of real models.
//  - config_to_header / config_from_header round trip, model_save_bf16 / model_load_bf16 round
//    trip, and a valid bundle read back tensor by tensor.
// Build: gcc -O2 -Wall -Wextra -fopenmp -I. tests/test_model_loader.c -o build/test_model_loader -lm
#include "model_config.h"
#include "tensor_file.h"
#include "tests/test_util.h"

static char tmp_dir[256];

#define PATH_LEN 512

// out (PATH_LEN) = path of the scratch file `name` in the temp dir.
static char *tmp_path(char *out, const char *name) {
    snprintf(out, PATH_LEN, "%s/%s", tmp_dir, name);
    return out;
}

// A valid tiny Llama-style config: V=50 d=16 L=2 Hq=4 Hkv=2 hd=4 F=24, untied.
static ModelConfig tiny_config(void) {
    ModelConfig c;
    memset(&c, 0, sizeof(c));
    c.family = FAMILY_LLAMA;
    c.vocab_size = 50;
    c.d_model = 16;
    c.n_layers = 2;
    c.n_heads = 4;
    c.n_kv_heads = 2;
    c.head_dim = 4;
    c.d_ff = 24;
    c.max_pos = 128;
    c.activation = ACT_SILU;
    c.sliding_period = 1;
    c.rope_scaling = ROPE_SCALING_NONE;
    c.norm_eps = 1e-5f;
    c.rope_theta = 10000.0f;
    c.query_scale = 0.5f;
    c.embed_scale = 1.0f;
    return c;
}

// Writes `header` (MODEL_HEADER_BYTES bytes, or only header_bytes of it) then n_params bf16
// values (a fixed pattern) to path.
static void write_model_file(const char *path, const int32_t *header, size_t header_bytes, size_t n_params) {
    FILE *f = fopenCheck(path, "wb");
    fwriteCheck(header, 1, header_bytes, f, path);
    for (size_t i = 0; i < n_params; i++) {
        uint16_t v = float_to_bf16_bits((float)(i % 97) * 0.01f - 0.4f);
        fwriteCheck(&v, sizeof(v), 1, f, path);
    }
    fcloseCheck(f, path);
}

static size_t config_total(const ModelConfig *c) {
    ParamLayout p;
    param_layout_init(&p, c);
    return p.total;
}

// Writes a model.bin at path whose header is c (validated or not) and whose tensors fit tiny_config().
static void write_model_with_config(const char *path, const ModelConfig *c) {
    int32_t header[MODEL_HEADER_INTS];
    ModelConfig valid = tiny_config();
    config_to_header(c, header);
    write_model_file(path, header, MODEL_HEADER_BYTES, config_total(&valid));
}

static void load_model(void *arg) {
    ModelConfig c;
    ParamLayout layout;
    free(model_load_bf16(&c, &layout, (const char *)arg));
}

static void load_bundle(void *arg) {
    TensorFile tf;
    tensor_file_load(&tf, (const char *)arg);
    tensor_file_free(&tf);
}

static void get_missing_tensor(void *arg) {
    TensorFile tf;
    tensor_file_load(&tf, (const char *)arg);
    tensor_file_get(&tf, "no_such_tensor", (const char *)arg);
}

// ----------------------------------------------------------------------------
// model.bin error paths

typedef struct {
    const char *label;
    void (*mutate)(ModelConfig *c);
    const char *phrase;
} BadConfig;

static void bad_family(ModelConfig *c) { c->family = 7; }
static void bad_vocab_small(ModelConfig *c) { c->vocab_size = 1; }
static void bad_vocab_large(ModelConfig *c) { c->vocab_size = (1 << 24) + 1; }
static void bad_d_model(ModelConfig *c) { c->d_model = 0; }
static void bad_layers(ModelConfig *c) { c->n_layers = 0; }
static void bad_heads(ModelConfig *c) { c->n_heads = 0; }
static void bad_kv_not_dividing(ModelConfig *c) { c->n_kv_heads = 3; }
static void bad_kv_more_than_q(ModelConfig *c) { c->n_kv_heads = 8; }
static void bad_head_dim_odd(ModelConfig *c) { c->head_dim = 5; }
static void bad_d_ff(ModelConfig *c) { c->d_ff = -4; }
static void bad_max_pos(ModelConfig *c) { c->max_pos = 0; }
static void bad_flag(ModelConfig *c) { c->tied_embeddings = 2; }
static void bad_activation(ModelConfig *c) { c->activation = 2; }
static void bad_window(ModelConfig *c) { c->sliding_window = -1; }
static void bad_period(ModelConfig *c) { c->sliding_period = 0; }
static void bad_rope_kind(ModelConfig *c) { c->rope_scaling = 2; }
static void llama3_base(ModelConfig *c) {
    c->rope_scaling = ROPE_SCALING_LLAMA3;
    c->rope_factor = 8.0f;
    c->rope_low_freq_factor = 1.0f;
    c->rope_high_freq_factor = 4.0f;
    c->rope_orig_max_pos = 8192;
}
static void bad_rope_factor(ModelConfig *c) { llama3_base(c); c->rope_factor = 0.5f; }
static void bad_rope_freqs(ModelConfig *c) { llama3_base(c); c->rope_high_freq_factor = 1.0f; }
static void bad_rope_orig(ModelConfig *c) { llama3_base(c); c->rope_orig_max_pos = 0; }
static void bad_eps_zero(ModelConfig *c) { c->norm_eps = 0.0f; }
static void bad_eps_negative(ModelConfig *c) { c->norm_eps = -1e-5f; }
static void bad_eps_nan(ModelConfig *c) { c->norm_eps = NAN; }
static void bad_theta(ModelConfig *c) { c->rope_theta = INFINITY; }
static void bad_attn_cap(ModelConfig *c) { c->attn_softcap = -1.0f; }
static void bad_final_cap(ModelConfig *c) { c->final_softcap = NAN; }
static void bad_query_scale(ModelConfig *c) { c->query_scale = 0.0f; }
static void bad_embed_scale(ModelConfig *c) { c->embed_scale = -2.0f; }

static const BadConfig BAD_CONFIGS[] = {
    {"family 7", bad_family, "family 7 is not one of"},
    {"vocab_size 1", bad_vocab_small, "vocab_size 1 out of range"},
    {"vocab_size 2^24 + 1", bad_vocab_large, "vocab_size 16777217 out of range"},
    {"d_model 0", bad_d_model, "d_model 0 out of range"},
    {"n_layers 0", bad_layers, "n_layers 0 out of range"},
    {"n_heads 0", bad_heads, "n_heads 0 out of range"},
    {"n_kv_heads 3 does not divide 4", bad_kv_not_dividing, "n_kv_heads 3 must be in [1, n_heads=4] and divide it"},
    {"n_kv_heads 8 > n_heads 4", bad_kv_more_than_q, "n_kv_heads 8 must be in"},
    {"head_dim 5 (odd)", bad_head_dim_odd, "head_dim 5 must be even"},
    {"d_ff -4", bad_d_ff, "d_ff -4 out of range"},
    {"max_pos 0", bad_max_pos, "max_position_embeddings 0 must be positive"},
    {"tied flag 2", bad_flag, "flags must be 0 or 1 (tied 2"},
    {"activation 2", bad_activation, "activation 2 is not 0 (silu) or 1 (gelu_tanh)"},
    {"sliding_window -1", bad_window, "sliding_window -1 is negative"},
    {"sliding_period 0", bad_period, "sliding_period 0 out of range"},
    {"rope_scaling 2", bad_rope_kind, "rope_scaling 2 is not 0 (none) or 1 (llama3)"},
    {"llama3 rope factor 0.5", bad_rope_factor, "llama3 rope scaling needs factor >= 1"},
    {"llama3 rope high == low freq factor", bad_rope_freqs, "llama3 rope scaling needs"},
    {"llama3 rope original max pos 0", bad_rope_orig, "original_max_position_embeddings >= 1"},
    {"norm_eps 0", bad_eps_zero, "norm_eps 0 out of range"},
    {"norm_eps -1e-5", bad_eps_negative, "norm_eps -1e-05 out of range"},
    {"norm_eps NaN", bad_eps_nan, "norm_eps nan out of range"},
    {"rope_theta inf", bad_theta, "rope_theta inf must be finite"},
    {"attention soft-cap -1", bad_attn_cap, "attention soft-cap -1 must be >= 0"},
    {"final soft-cap NaN", bad_final_cap, "final logit soft-cap nan must be >= 0"},
    {"query_scale 0", bad_query_scale, "query_scale 0 must be > 0"},
    {"embed_scale -2", bad_embed_scale, "embed_scale -2 must be > 0"},
};

static void test_model_errors(TestReport *r) {
    printf("\n== model.bin error paths (forked loader must exit 1 with the phrase)\n");
    ModelConfig c = tiny_config();
    size_t total = config_total(&c);
    int32_t header[MODEL_HEADER_INTS];
    config_to_header(&c, header);

    char p[PATH_LEN];
    test_expect_exit(r, "missing file", load_model, tmp_path(p, "does_not_exist.bin"), 1, "cannot open");
    tmp_path(p, "empty.bin");
    write_model_file(p, header, 0, 0);
    test_expect_exit(r, "empty file", load_model, p, 1, "smaller than the 1024-byte header");
    tmp_path(p, "short_header.bin");
    write_model_file(p, header, 100, 0);
    test_expect_exit(r, "truncated header (100 bytes)", load_model, p, 1, "smaller than the 1024-byte header");

    header[HDR_MAGIC] = 0x12345678;
    tmp_path(p, "bad_magic.bin");
    write_model_file(p, header, MODEL_HEADER_BYTES, total);
    test_expect_exit(r, "wrong magic", load_model, p, 1, "bad magic 0x12345678");
    config_to_header(&c, header);
    header[HDR_VERSION] = MODEL_VERSION + 1;
    tmp_path(p, "bad_version.bin");
    write_model_file(p, header, MODEL_HEADER_BYTES, total);
    test_expect_exit(r, "unknown version", load_model, p, 1, "unsupported model.bin version 2");
    config_to_header(&c, header);

    tmp_path(p, "truncated_tensors.bin");
    write_model_file(p, header, MODEL_HEADER_BYTES, total - 1);
    test_expect_exit(r, "tensors one bf16 short", load_model, p, 1, "disagrees with its header");
    test_expect_exit(r, "  ... says truncated", load_model, p, 1, "(truncated)");
    tmp_path(p, "no_tensors.bin");
    write_model_file(p, header, MODEL_HEADER_BYTES, 0);
    test_expect_exit(r, "header only, no tensors", load_model, p, 1, "(truncated)");
    tmp_path(p, "trailing.bin");
    write_model_file(p, header, MODEL_HEADER_BYTES, total + 3);
    test_expect_exit(r, "three bf16 of trailing bytes", load_model, p, 1, "(trailing bytes)");

    for (size_t i = 0; i < sizeof(BAD_CONFIGS) / sizeof(BAD_CONFIGS[0]); i++) {
        ModelConfig bad = tiny_config();
        BAD_CONFIGS[i].mutate(&bad);
        char name[64];
        snprintf(name, sizeof(name), "bad_config_%zu.bin", i);
        write_model_with_config(tmp_path(p, name), &bad);
        test_expect_exit(r, BAD_CONFIGS[i].label, load_model, p, 1, BAD_CONFIGS[i].phrase);
    }
}

// ----------------------------------------------------------------------------
// tensor bundle error paths

static void put_u32(FILE *f, uint32_t v, const char *path) { fwriteCheck(&v, sizeof(v), 1, f, path); }

// Writes one tensor record: name, dtype, dims, then numel 4-byte values (i * 0.5 or i).
static void put_tensor(FILE *f, const char *name, uint32_t dtype, uint32_t ndim, const uint32_t *dims,
                       const char *path) {
    put_u32(f, (uint32_t)strlen(name), path);
    fwriteCheck(name, 1, strlen(name), f, path);
    put_u32(f, dtype, path);
    put_u32(f, ndim, path);
    size_t numel = 1;
    for (uint32_t d = 0; d < ndim; d++) {
        put_u32(f, dims[d], path);
        numel *= dims[d];
    }
    for (size_t i = 0; i < numel; i++) {
        if (dtype == TENSOR_F32) {
            float v = 0.5f * (float)i;
            fwriteCheck(&v, 4, 1, f, path);
        } else {
            int32_t v = (int32_t)i - 3;
            fwriteCheck(&v, 4, 1, f, path);
        }
    }
}

// A valid bundle: "logits" f32 (2, 3), "tokens" i32 (4).
static void write_valid_bundle(const char *path) {
    FILE *f = fopenCheck(path, "wb");
    put_u32(f, TENSOR_FILE_MAGIC, path);
    put_u32(f, TENSOR_FILE_VERSION, path);
    put_u32(f, 2, path);
    uint32_t d23[2] = {2, 3}, d4[1] = {4};
    put_tensor(f, "logits", TENSOR_F32, 2, d23, path);
    put_tensor(f, "tokens", TENSOR_I32, 1, d4, path);
    fcloseCheck(f, path);
}

// Copies the first `keep` bytes of src to dst.
static void write_prefix(const char *src, const char *dst, long keep) {
    FILE *f = fopenCheck(src, "rb");
    long size = file_size_bytes(f, src);
    if (keep > size) keep = size;
    char *buf = (char *)mallocCheck((size_t)size);
    freadCheck(buf, 1, (size_t)size, f, src);
    fcloseCheck(f, src);
    FILE *g = fopenCheck(dst, "wb");
    fwriteCheck(buf, 1, (size_t)keep, g, dst);
    fcloseCheck(g, dst);
    free(buf);
}

// Writes the bundle `name` (its path into path, PATH_LEN): a preamble of magic, version and count,
// then the single record written by `record` (none when NULL).
static void write_one_record_bundle(char *path, const char *name, uint32_t magic, uint32_t version, uint32_t count,
                                    void (*record)(FILE *, const char *)) {
    tmp_path(path, name);
    FILE *f = fopenCheck(path, "wb");
    put_u32(f, magic, path);
    put_u32(f, version, path);
    put_u32(f, count, path);
    if (record) record(f, path);
    fcloseCheck(f, path);
}

static void record_empty_name(FILE *f, const char *path) { put_u32(f, 0, path); }
static void record_bad_dtype(FILE *f, const char *path) {
    uint32_t d[1] = {1};
    put_tensor(f, "x", 7, 1, d, path);
}
static void record_too_many_dims(FILE *f, const char *path) {
    put_u32(f, 1, path);
    fwriteCheck("x", 1, 1, f, path);
    put_u32(f, TENSOR_F32, path);
    put_u32(f, 5, path);
}

static void test_bundle_errors(TestReport *r) {
    printf("\n== tensor bundle error paths\n");
    char valid[PATH_LEN], p[PATH_LEN];
    tmp_path(valid, "valid.ref.bin");
    write_valid_bundle(valid);
    FILE *f = fopenCheck(valid, "rb");
    long size = file_size_bytes(f, valid);
    fcloseCheck(f, valid);

    test_expect_exit(r, "missing bundle", load_bundle, tmp_path(p, "nope.ref.bin"), 1, "cannot open");
    write_one_record_bundle(p, "bad_magic.ref.bin", 0xDEADBEEFu, TENSOR_FILE_VERSION, 0, NULL);
    test_expect_exit(r, "bundle bad magic", load_bundle, p, 1, "bad magic 0xdeadbeef: not a tensor bundle");
    write_one_record_bundle(p, "bad_version.ref.bin", TENSOR_FILE_MAGIC, 9, 0, NULL);
    test_expect_exit(r, "bundle unknown version", load_bundle, p, 1, "unsupported tensor bundle version 9");
    write_one_record_bundle(p, "bad_count.ref.bin", TENSOR_FILE_MAGIC, TENSOR_FILE_VERSION, 1u << 30, NULL);
    test_expect_exit(r, "bundle implausible count", load_bundle, p, 1, "implausible tensor count");
    write_one_record_bundle(p, "empty_name.ref.bin", TENSOR_FILE_MAGIC, TENSOR_FILE_VERSION, 1, record_empty_name);
    test_expect_exit(r, "bundle empty tensor name", load_bundle, p, 1, "bad name length 0");
    write_one_record_bundle(p, "bad_dtype.ref.bin", TENSOR_FILE_MAGIC, TENSOR_FILE_VERSION, 1, record_bad_dtype);
    test_expect_exit(r, "bundle unknown dtype", load_bundle, p, 1, "unknown dtype 7");
    write_one_record_bundle(p, "five_dims.ref.bin", TENSOR_FILE_MAGIC, TENSOR_FILE_VERSION, 1, record_too_many_dims);
    test_expect_exit(r, "bundle 5 dims", load_bundle, p, 1, "has 5 dims (max 4)");
    tmp_path(p, "short_preamble.ref.bin");
    write_prefix(valid, p, 6);
    test_expect_exit(r, "bundle truncated in the preamble", load_bundle, p, 1, "truncated or unreadable");
    tmp_path(p, "short_data.ref.bin");
    write_prefix(valid, p, size - 4);
    test_expect_exit(r, "bundle truncated in the last tensor", load_bundle, p, 1, "truncated or unreadable");
    test_expect_exit(r, "bundle missing tensor name", get_missing_tensor, valid, 1,
                     "no tensor named 'no_such_tensor'");
}

// ----------------------------------------------------------------------------
// Positive tests

typedef struct {
    const char *name;
    int family, V, d, L, Hq, Hkv, hd, F, tied, bias, post_norms;
    size_t expected;  // published parameter count
} KnownModel;

// Published parameter counts (Hugging Face model cards / model.num_parameters()).
static const KnownModel KNOWN[] = {
    {"Llama-2-7B", FAMILY_LLAMA, 32000, 4096, 32, 32, 32, 128, 11008, 0, 0, 0, 6738415616ull},
    {"Llama-3-8B", FAMILY_LLAMA, 128256, 4096, 32, 32, 8, 128, 14336, 0, 0, 0, 8030261248ull},
    {"Llama-3.2-1B (tied)", FAMILY_LLAMA, 128256, 2048, 16, 32, 8, 64, 8192, 1, 0, 0, 1235814400ull},
    {"Mistral-7B", FAMILY_MISTRAL, 32000, 4096, 32, 32, 8, 128, 14336, 0, 0, 0, 7241732096ull},
    {"Qwen2.5-7B (qkv bias)", FAMILY_QWEN2, 152064, 3584, 28, 28, 4, 128, 18944, 0, 1, 0, 7615616512ull},
    {"Gemma-2-9B (tied, post-norms)", FAMILY_GEMMA2, 256000, 3584, 42, 16, 8, 256, 14336, 1, 0, 1, 9241705984ull},
};

static void test_known_totals(TestReport *r) {
    printf("\n== param_layout_init totals vs published parameter counts\n");
    for (size_t i = 0; i < sizeof(KNOWN) / sizeof(KNOWN[0]); i++) {
        const KnownModel *k = &KNOWN[i];
        ModelConfig c = tiny_config();
        c.family = k->family;
        c.vocab_size = k->V;
        c.d_model = k->d;
        c.n_layers = k->L;
        c.n_heads = k->Hq;
        c.n_kv_heads = k->Hkv;
        c.head_dim = k->hd;
        c.d_ff = k->F;
        c.tied_embeddings = k->tied;
        c.qkv_bias = k->bias;
        c.post_norms = k->post_norms;
        ParamLayout p;
        param_layout_init(&p, &c);
        char line[160];
        snprintf(line, sizeof(line), "%-30s %14zu (want %14zu)", k->name, p.total, k->expected);
        test_check(r, p.total == k->expected, line);
    }
    // Tied vs untied differ by exactly one (V, d) matrix, and the head aliases the embedding.
    ModelConfig c = tiny_config();
    ParamLayout untied, tied;
    param_layout_init(&untied, &c);
    c.tied_embeddings = 1;
    param_layout_init(&tied, &c);
    test_check(r, untied.total - tied.total == (size_t)c.vocab_size * c.d_model && tied.lm_head == tied.embed &&
                      untied.lm_head == untied.final_norm + (size_t)c.d_model,
               "tiny: tied = untied - V*d, tied lm_head == embed, untied after final_norm");
    // The tiny layer block by hand: 16 + 16*16 + 2*(8*16) + 16*16 + 16 + 3*(24*16) = 1952.
    test_check(r, untied.layer_size == 1952 && untied.total == 50 * 16 + 2 * 1952 + 16 + 50 * 16,
               "tiny: layer block 1952 elements, total 5520");
}

static int configs_equal(const ModelConfig *a, const ModelConfig *b) { return memcmp(a, b, sizeof(*a)) == 0; }

// A config where every field differs from zero and from tiny_config's defaults.
static ModelConfig full_config(void) {
    ModelConfig c = tiny_config();
    c.family = FAMILY_GEMMA2;
    c.tied_embeddings = 1;
    c.qkv_bias = 1;
    c.norm_offset = 1;
    c.post_norms = 1;
    c.activation = ACT_GELU_TANH;
    c.sliding_window = 7;
    c.sliding_period = 2;
    llama3_base(&c);
    c.attn_softcap = 50.0f;
    c.final_softcap = 30.0f;
    c.query_scale = 0.0625f;
    c.embed_scale = 4.0f;
    c.norm_eps = 1e-6f;
    c.rope_theta = 500000.0f;
    return c;
}

static void test_round_trips(TestReport *r) {
    printf("\n== round trips\n");
    ModelConfig c = full_config(), back;
    memset(&back, 0, sizeof(back));
    int32_t header[MODEL_HEADER_INTS];
    config_to_header(&c, header);
    char msg[512];
    const char *err = config_from_header(&back, header, msg, sizeof(msg));
    test_check(r, err == NULL && configs_equal(&c, &back), "config_to_header -> config_from_header: every field");
    int rest_zero = 1;
    for (int i = HDR_ROPE_ORIG_MAX_POS + 1; i < HDR_F_NORM_EPS; i++) rest_zero &= header[i] == 0;
    for (int i = HDR_F_EMBED_SCALE + 1; i < MODEL_HEADER_INTS; i++) rest_zero &= header[i] == 0;
    test_check(r, rest_zero, "config_to_header: unused header slots are zero");

    ParamLayout layout;
    param_layout_init(&layout, &c);
    uint16_t *params = (uint16_t *)mallocCheck(layout.total * sizeof(uint16_t));
    for (size_t i = 0; i < layout.total; i++) params[i] = (uint16_t)(i * 2654435761u >> 16);
    char path[PATH_LEN], bundle[PATH_LEN];
    tmp_path(path, "roundtrip.model.bin");
    model_save_bf16(&c, params, path);
    ModelConfig loaded;
    ParamLayout loaded_layout;
    uint16_t *got = model_load_bf16(&loaded, &loaded_layout, path);
    test_check(r, configs_equal(&c, &loaded) && loaded_layout.total == layout.total &&
                      memcmp(got, params, layout.total * sizeof(uint16_t)) == 0,
               "model_save_bf16 -> model_load_bf16: config and every bf16 bit");
    FILE *f = fopenCheck(path, "rb");
    long size = file_size_bytes(f, path);
    fcloseCheck(f, path);
    test_check(r, size == (long)(MODEL_HEADER_BYTES + layout.total * 2), "model.bin size = header + 2 * total");
    ModelConfig header_only;
    model_read_config(&header_only, path);
    test_check(r, configs_equal(&c, &header_only), "model_read_config reads the same config");
    free(params);
    free(got);

    tmp_path(bundle, "valid.ref.bin");
    TensorFile tf;
    tensor_file_load(&tf, bundle);
    const NamedTensor *lg = tensor_file_find(&tf, "logits"), *tk = tensor_file_find(&tf, "tokens");
    int ok = tf.count == 2 && lg && tk && lg->dtype == TENSOR_F32 && lg->ndim == 2 && lg->dims[0] == 2 &&
             lg->dims[1] == 3 && lg->numel == 6 && ((const float *)lg->data)[5] == 2.5f && tk->dtype == TENSOR_I32 &&
             tk->ndim == 1 && tk->numel == 4 && ((const int32_t *)tk->data)[0] == -3 &&
             tensor_file_find(&tf, "absent") == NULL;
    test_check(r, ok, "valid bundle: names, dtypes, dims and values read back");
    tensor_file_free(&tf);
}

// Removes every file in the temp dir that this test created, then the dir.
static void remove_tmp_dir(void) {
    static const char *names[] = {"empty.bin", "short_header.bin", "bad_magic.bin", "bad_version.bin",
                                  "truncated_tensors.bin", "no_tensors.bin", "trailing.bin", "valid.ref.bin",
                                  "bad_magic.ref.bin", "bad_version.ref.bin", "bad_count.ref.bin",
                                  "empty_name.ref.bin", "bad_dtype.ref.bin", "five_dims.ref.bin",
                                  "short_preamble.ref.bin", "short_data.ref.bin", "roundtrip.model.bin"};
    char path[PATH_LEN];
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) remove(tmp_path(path, names[i]));
    for (size_t i = 0; i < sizeof(BAD_CONFIGS) / sizeof(BAD_CONFIGS[0]); i++) {
        char name[64];
        snprintf(name, sizeof(name), "bad_config_%zu.bin", i);
        remove(tmp_path(path, name));
    }
    if (rmdir(tmp_dir) != 0) printf("warning: could not remove %s\n", tmp_dir);
}

int main(void) {
    snprintf(tmp_dir, sizeof(tmp_dir), "/tmp/test_model_loader.XXXXXX");
    if (mkdtemp(tmp_dir) == NULL) die("cannot create a temp dir: %s", strerror(errno));
    TestReport r = {0, 0};
    test_model_errors(&r);
    test_bundle_errors(&r);
    test_known_totals(&r);
    test_round_trips(&r);
    remove_tmp_dir();
    return test_report_finish(&r, "test_model_loader");
}

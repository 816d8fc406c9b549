// Tests of the memory planner (mst.h): every entry of a tiny config against figures computed by
// hand, the layout invariants (alignment, no overlap outside the shared region), monotonicity,
// the auto choice (fits, prefers the fast settings, refuses with a useful message), settings
// validation, the memory timeline of one step (hand figures for the tiny config, invariants over
// many settings, LoRA on an NF4 base and 8-bit moments included, MsT against the standard
// transformer for Llama-3-8B), the Llama-3-8B plans at S = 96K and 128K on an 80 GiB GPU, and the
// plans of several GPUs (sharded optimizer state, sequence-parallel buffers by hand, head groups
// against the kv heads of one GPU, LoRA refused, the longest Llama-3-8B sequence on 2 and 8 GPUs
// against one). LoRA: the entries of a tiny LoRA plan on an NF4 base by hand (no base gradients,
// optimizer state of the adapters only, the quantized records), and what LoRA and a 4-bit base save
// on Llama-3-8B. Kept attention layers (--keep-attn): their buffers by hand, the timeline without
// their recompute, the auto choice (only what is left; the longest sequence unchanged), refusals.
// Build: gcc -O2 -Wall -Wextra -I. tests/test_planner.c -o build/test_planner -lm
#include "mst.h"
#include "tests/test_util.h"

static int failures = 0;

#define CHECK(cond, ...) do { if (!(cond)) { failures++; printf("FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

// Tiny untied Llama: V=100 d=32 L=2 Hq=4 Hkv=2 hd=8 F=64.
// Layer block: attn_norm 32 + wq 32x32 + wk 16x32 + wv 16x32 + wo 32x32 + mlp_norm 32
//              + gate 64x32 + up 64x32 + down 32x64 = 9280 elements.
// Total: embed 3200 + 2 x 9280 + final_norm 32 + lm_head 3200 = 24992 elements.
static ModelConfig tiny_config(int layers) {
    ModelConfig c;
    preset_base(&c, FAMILY_LLAMA, 100, 32, layers, 4, 2, 8, 64, 128, 1e-5f, 10000.0f);
    return c;
}

static MstSettings tiny_settings(void) {
    MstSettings s;
    memset(&s, 0, sizeof(s));
    s.B = 2; s.S = 10; s.mst_chunks = 2; s.vocab_chunk = 50; s.recompute = 1; s.offload = 0;
    s.host_layers = 0; s.grad_accum_steps = 1; s.moment_bytes = 4; s.master_weights = 0;
    return s;
}

static MstKernelFigures tiny_figures(void) {
    MstKernelFigures f;
    memset(&f, 0, sizeof(f));
    f.attn_workspace = 1000; f.matmul_workspace = 4096; f.reduce_scratch = 300; f.grad_norm_partials = 64;
    return f;
}

typedef struct { const char *name; size_t bytes; int category; int share; } Expected;

// B=2 S=10: N=20 tokens; M=2: chunks of 10 rows; vocab chunk 50: 2 tiles. Bytes rounded up to 256.
static const Expected TINY[] = {
    {"params", 50176, MEM_WEIGHTS, SHARE_NONE},            // 24992 x 2 = 49984
    {"rope_cos_sin", 512, MEM_WEIGHTS, SHARE_NONE},        // S 10 x hd 8 x 4 = 320
    {"adam_m", 100096, MEM_OPTIMIZER, SHARE_NONE},         // 24992 x 4 = 99968
    {"adam_v", 100096, MEM_OPTIMIZER, SHARE_NONE},
    {"layer_grads", 37120, MEM_GRADIENTS, SHARE_NONE},     // 9280 x 4
    {"final_norm_grads", 256, MEM_GRADIENTS, SHARE_NONE},  // 32 x 4 = 128
    {"grad_norm_partials", 256, MEM_GRADIENTS, SHARE_NONE},// 64 x 4
    {"layer_inputs", 2560, MEM_ACTIVATIONS, SHARE_NONE},   // 2 layers x (20 x 32 x 2 = 1280)
    {"tokens", 256, MEM_INTERMEDIATES, SHARE_NONE},        // 20 x 4 = 80
    {"targets", 256, MEM_INTERMEDIATES, SHARE_NONE},
    {"embed_unique", 256, MEM_INTERMEDIATES, SHARE_NONE},
    {"embed_offsets", 256, MEM_INTERMEDIATES, SHARE_NONE}, // 21 x 4 = 84
    {"embed_positions", 256, MEM_INTERMEDIATES, SHARE_NONE},
    {"scalars", 256, MEM_INTERMEDIATES, SHARE_NONE},
    {"x_final_dresid", 1280, MEM_INTERMEDIATES, SHARE_NONE},
    {"ln1_rstd", 256, MEM_INTERMEDIATES, SHARE_LAYER},     // 20 x 4
    {"qkv", 2560, MEM_INTERMEDIATES, SHARE_LAYER},         // 20 x (32 + 16 + 16) x 2
    {"att", 1280, MEM_INTERMEDIATES, SHARE_LAYER},         // 20 x 32 x 2
    {"att_stats", 512, MEM_INTERMEDIATES, SHARE_LAYER},    // B 2 x Hq 4 x S 10 x 4 = 320
    {"h1", 1280, MEM_INTERMEDIATES, SHARE_LAYER},
    {"dqkv", 2560, MEM_INTERMEDIATES, SHARE_LAYER},
    {"ln2", 768, MEM_INTERMEDIATES, SHARE_LAYER},          // 10 rows x 32 x 2 = 640
    {"ln2_rstd", 256, MEM_INTERMEDIATES, SHARE_LAYER},     // 10 x 4
    {"gate_up", 2560, MEM_INTERMEDIATES, SHARE_LAYER},     // 10 x 128 x 2
    {"glu", 1280, MEM_INTERMEDIATES, SHARE_LAYER},         // 10 x 64 x 2
    {"embed_head_grads", 12800, MEM_GRADIENTS, SHARE_LMHEAD},  // 100 x 32 x 4 (untied: no layer is live)
    {"xf", 768, MEM_INTERMEDIATES, SHARE_LMHEAD},          // 10 x 32 x 2
    {"xf_rstd", 256, MEM_INTERMEDIATES, SHARE_LMHEAD},
    {"dxf", 768, MEM_INTERMEDIATES, SHARE_LMHEAD},
    {"dxf_acc", 1280, MEM_INTERMEDIATES, SHARE_LMHEAD},    // 10 x 32 x 4 (two vocabulary tiles)
    {"logits", 2048, MEM_INTERMEDIATES, SHARE_LMHEAD},     // 10 x 50 x 4 = 2000
    {"dlogits", 1024, MEM_INTERMEDIATES, SHARE_LMHEAD},    // 10 x 50 x 2 = 1000
    {"ce_max", 256, MEM_INTERMEDIATES, SHARE_LMHEAD},
    {"ce_sum", 256, MEM_INTERMEDIATES, SHARE_LMHEAD},
    {"ce_target", 256, MEM_INTERMEDIATES, SHARE_LMHEAD},
    {"ce_lse", 256, MEM_INTERMEDIATES, SHARE_LMHEAD},
    {"losses", 256, MEM_INTERMEDIATES, SHARE_LMHEAD},      // N 20 x 4
    {"attn_workspace", 1024, MEM_WORKSPACE, SHARE_NONE},   // 1000
    {"reduce_scratch", 512, MEM_WORKSPACE, SHARE_NONE},    // 300
};
// No datt (Hq x hd = d: the attention output's gradient reuses h1) and, with recompute, no ln1 (it
// reuses h1's and then qkv's buffer). Layer working set: 13312 bytes; LM-head working set:
// 12800 + 7424 = 20224; the shared region is the larger.
// Arena: 50176 + 512 + 2 x 100096 + 37120 + 256 + 256 + 2560 + 6 x 256 + 1280
//        + 20224 + 1024 + 512 = 315648 bytes.
#define TINY_SHARED 20224
#define TINY_ARENA 315648

static void test_hand_figures(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    MstKernelFigures f = tiny_figures();
    MemoryPlan p;
    mst_plan_build(&p, &c, &s, &f);
    int n_expected = (int)(sizeof(TINY) / sizeof(TINY[0]));
    printf("%-20s %10s %10s\n", "entry", "planned", "by hand");
    CHECK(p.n_entries == n_expected, "plan has %d entries, expected %d", p.n_entries, n_expected);
    for (int i = 0; i < n_expected; i++) {
        const PlanEntry *e = mst_plan_find(&p, TINY[i].name);
        if (e == NULL) { CHECK(0, "entry %s missing", TINY[i].name); continue; }
        printf("%-20s %10zu %10zu\n", TINY[i].name, e->bytes, TINY[i].bytes);
        CHECK(e->bytes == TINY[i].bytes, "%s: %zu bytes, expected %zu", TINY[i].name, e->bytes, TINY[i].bytes);
        CHECK(e->category == TINY[i].category, "%s: category %s, expected %s", TINY[i].name,
              mst_category_name(e->category), mst_category_name(TINY[i].category));
        CHECK(e->share == TINY[i].share, "%s: region %d, expected %d", TINY[i].name, e->share, TINY[i].share);
    }
    CHECK(p.shared_bytes == TINY_SHARED, "shared region %zu, expected %d", p.shared_bytes, TINY_SHARED);
    CHECK(p.device_total == TINY_ARENA, "arena %zu, expected %d", p.device_total, TINY_ARENA);
    CHECK(p.device_external == 4096, "external %zu, expected 4096", p.device_external);
    CHECK(p.host_total == 0, "host %zu, expected 0", p.host_total);
    CHECK(p.chunk_rows == 10 && p.n_chunks == 2 && p.vocab_tiles == 2, "chunks %d x %d rows, %d tiles",
          p.n_chunks, p.chunk_rows, p.vocab_tiles);
    size_t sum = 0;
    for (int k = 0; k < MEM_CATEGORY_COUNT; k++) sum += p.category_bytes[k];
    CHECK(sum == p.device_total, "category totals %zu != arena %zu", sum, p.device_total);
    printf("tiny plan: arena %zu bytes (by hand %d)\n", p.device_total, TINY_ARENA);
}

// Every entry aligned, inside the arena, and overlapping another only when both are in different
// alternatives of the shared region.
static void check_layout(const MemoryPlan *p, const char *what) {
    for (int i = 0; i < p->n_entries; i++) {
        const PlanEntry *a = &p->entries[i];
        CHECK(a->offset % MST_ALIGN == 0 && a->slice_bytes % MST_ALIGN == 0, "%s: %s misaligned", what, a->name);
        size_t limit = a->category == MEM_HOST ? p->host_total : p->device_total;
        CHECK(a->offset + a->bytes <= limit, "%s: %s ends past its block", what, a->name);
        for (int j = i + 1; j < p->n_entries; j++) {
            const PlanEntry *b = &p->entries[j];
            if ((a->category == MEM_HOST) != (b->category == MEM_HOST)) continue;
            int overlap = a->offset < b->offset + b->bytes && b->offset < a->offset + a->bytes;
            int allowed = a->share != SHARE_NONE && b->share != SHARE_NONE && a->share != b->share;
            CHECK(!overlap || allowed, "%s: %s and %s overlap", what, a->name, b->name);
        }
    }
}

// Three configs for the invariant sweeps: a tiny Llama of `layers` layers, a tiny 3-layer one with
// post-norms, q/k/v biases and tied embeddings, and Llama-3-8B (the sweeps give it S = 4096).
static void varied_configs(ModelConfig cfgs[3], int layers) {
    cfgs[0] = tiny_config(layers);
    cfgs[1] = tiny_config(3);
    cfgs[1].post_norms = 1; cfgs[1].qkv_bias = 1; cfgs[1].tied_embeddings = 1;
    mst_preset("llama3-8b", &cfgs[2]);
}

// The plan of c under s with the kernel figures estimated for its shape (mst_kernel_figures_estimate).
static MemoryPlan plan_estimated(const ModelConfig *c, MstSettings s) {
    MstKernelFigures f;
    mst_kernel_figures_estimate(c, s.B, s.S, &f);
    MemoryPlan p;
    mst_plan_build(&p, c, &s, &f);
    return p;
}

static void test_layouts(void) {
    ModelConfig cfgs[3];
    varied_configs(cfgs, 2);
    for (int ci = 0; ci < 3; ci++) {
        for (int rc = 0; rc < 2; rc++) {
            for (int m = 1; m <= 4; m += 3) {
                for (int off = 0; off <= rc; off++) {
                    MstSettings s = tiny_settings();
                    if (ci == 2) s.S = 4096;
                    s.recompute = rc; s.mst_chunks = m; s.offload = off; s.host_layers = off ? 1 : 0;
                    s.grad_accum_steps = 1 + off; s.master_weights = rc; s.moment_bytes = m == 4 ? 1 : 4;
                    MemoryPlan p = plan_estimated(&cfgs[ci], s);
                    char what[96];
                    snprintf(what, sizeof(what), "config %d recompute %d M %d offload %d", ci, rc, m, off);
                    check_layout(&p, what);
                }
            }
        }
    }
    printf("layout invariants checked\n");
}

static MemoryPlan plan_with(const ModelConfig *c, MstSettings s) {
    MstKernelFigures f = tiny_figures();
    MemoryPlan p;
    mst_plan_build(&p, c, &s, &f);
    return p;
}

static void test_monotonic(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    MstSettings longer = s;
    longer.S = 20;
    CHECK(plan_with(&c, longer).device_total > plan_with(&c, s).device_total, "more S must need more bytes");
    for (int rc = 0; rc < 2; rc++) {
        MstSettings m1 = s, m4 = s;
        m1.recompute = m4.recompute = rc;
        m1.mst_chunks = 1; m4.mst_chunks = 4;
        MemoryPlan p1 = plan_with(&c, m1), p4 = plan_with(&c, m4);
        size_t i1 = p1.category_bytes[MEM_INTERMEDIATES] + p1.category_bytes[MEM_ACTIVATIONS];
        size_t i4 = p4.category_bytes[MEM_INTERMEDIATES] + p4.category_bytes[MEM_ACTIVATIONS];
        CHECK(i4 < i1, "recompute %d: M=4 must need fewer intermediate+activation bytes than M=1 (%zu vs %zu)", rc, i4, i1);
        CHECK(p4.device_total < p1.device_total, "recompute %d: M=4 arena %zu not below M=1 arena %zu", rc, p4.device_total, p1.device_total);
    }
    MstSettings norc = s;
    norc.recompute = 0;
    CHECK(plan_with(&c, s).category_bytes[MEM_ACTIVATIONS] < plan_with(&c, norc).category_bytes[MEM_ACTIVATIONS],
          "recompute must keep fewer activation bytes");
    ModelConfig deep = tiny_config(6);
    MstSettings off = s;
    off.offload = 1; off.host_layers = 4;
    MemoryPlan po = plan_with(&deep, off), pn = plan_with(&deep, s);
    CHECK(po.device_total < pn.device_total, "offload must need fewer device bytes (%zu vs %zu)", po.device_total, pn.device_total);
    CHECK(po.host_total == 4 * 1280 && pn.host_total == 0, "offload host bytes %zu, expected %d", po.host_total, 4 * 1280);
    MstSettings vc_small = s;
    vc_small.vocab_chunk = 10;
    CHECK(plan_with(&c, vc_small).category_bytes[MEM_INTERMEDIATES] <= plan_with(&c, s).category_bytes[MEM_INTERMEDIATES],
          "a smaller vocabulary chunk must not need more bytes");
    printf("monotonicity checked\n");
}

static void test_auto(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    s.mst_chunks = 0; s.vocab_chunk = 0;
    MstKernelFigures f = tiny_figures();
    MemoryPlan p;
    char msg[4096];
    // Ample budget: the standard transformer (M = 1) with one vocabulary tile.
    int ok = mst_plan_auto(&p, &c, &s, &f, (size_t)1 << 30, 0, msg, sizeof(msg));
    CHECK(ok && p.settings.mst_chunks == 1 && p.settings.vocab_chunk == c.vocab_size,
          "ample budget: got ok %d M %d vc %d", ok, p.settings.mst_chunks, p.settings.vocab_chunk);
    // Just below that plan: auto must chunk, and the plan it picks must fit.
    size_t best = p.device_total + p.device_external;
    ok = mst_plan_auto(&p, &c, &s, &f, best - 1, 0, msg, sizeof(msg));
    CHECK(ok && p.device_total + p.device_external <= best - 1 && (p.settings.mst_chunks > 1 || p.vocab_tiles > 1),
          "tight budget: ok %d total %zu M %d tiles %d", ok, p.device_total + p.device_external, p.settings.mst_chunks, p.vocab_tiles);
    printf("auto at %zu bytes: M=%d vocab chunk %d, arena %zu\n", best - 1, p.settings.mst_chunks, p.settings.vocab_chunk, p.device_total);
    // Offload: auto keeps as many layer inputs on the device as fit.
    ModelConfig deep = tiny_config(6);
    MstSettings so = s;
    so.offload = 1;
    MemoryPlan all_dev;
    ok = mst_plan_auto(&all_dev, &deep, &so, &f, (size_t)1 << 30, (size_t)1 << 30, msg, sizeof(msg));
    CHECK(ok && all_dev.host_layers == 0, "offload with ample budget: ok %d host layers %d", ok, all_dev.host_layers);
    MstSettings forced = so;
    forced.host_layers = 3; forced.mst_chunks = 20; forced.vocab_chunk = 10;
    MemoryPlan p3 = plan_with(&deep, forced);
    ok = mst_plan_auto(&p, &deep, &so, &f, p3.device_total + p3.device_external, (size_t)1 << 30, msg, sizeof(msg));
    CHECK(ok && p.host_layers >= 1 && p.host_layers <= 3 && p.device_total + p.device_external <= p3.device_total + p3.device_external,
          "offload tight: ok %d host layers %d", ok, p.host_layers);
    // Host budget too small for the offloaded layers: refused.
    ok = mst_plan_auto(&p, &deep, &so, &f, p3.device_total + p3.device_external, 100, msg, sizeof(msg));
    CHECK(!ok, "a host budget of 100 bytes must refuse offloading");
    // Impossible: refused with the breakdown, the longest S and the change that would fit.
    ok = mst_plan_auto(&p, &c, &s, &f, 1000, 0, msg, sizeof(msg));
    CHECK(!ok && strstr(msg, "does not fit") && strstr(msg, "weights") && strstr(msg, "not even S=1"),
          "impossible budget must refuse with a breakdown; got: %s", msg);
    printf("refusal message (1000-byte budget):\n%s", msg);
    MstSettings norc = s;
    norc.recompute = 0;
    MstSettings rc = s;
    rc.mst_chunks = 20; rc.vocab_chunk = c.vocab_size;  // the smallest recompute plan
    MemoryPlan prc = plan_with(&c, rc);
    ok = !mst_plan_auto(&p, &c, &norc, &f, prc.device_total + prc.device_external, 0, msg, sizeof(msg));
    CHECK(ok && strstr(msg, "recompute on") != NULL && strstr(msg, "longest sequence"),
          "without recompute at the recompute plan's size: expect a refusal naming recompute; got: %s", msg);
    printf("refusal message (recompute off):\n%s", msg);
    // Bad settings are refused with a message.
    MstSettings bad = s;
    bad.offload = 1; bad.recompute = 0;
    CHECK(!mst_plan_auto(&p, &c, &bad, &f, (size_t)1 << 30, (size_t)1 << 30, msg, sizeof(msg)) && strstr(msg, "recompute"),
          "offload without recompute must be refused; got: %s", msg);
    bad = s; bad.mst_chunks = 21;
    CHECK(!mst_plan_auto(&p, &c, &bad, &f, (size_t)1 << 30, 0, msg, sizeof(msg)) && strstr(msg, "chunks"),
          "M > B*S must be refused; got: %s", msg);
    bad = s; bad.moment_bytes = 3;
    CHECK(!mst_plan_auto(&p, &c, &bad, &f, (size_t)1 << 30, 0, msg, sizeof(msg)) && strstr(msg, "moment"),
          "moment bytes 3 must be refused; got: %s", msg);
    bad = s; bad.moment_bytes = 1; bad.lora.rank = 4; bad.lora.alpha = 8.0f; bad.lora.targets = LORA_ALL_TARGETS;
    CHECK(!mst_plan_auto(&p, &c, &bad, &f, (size_t)1 << 30, 0, msg, sizeof(msg)) && strstr(msg, "not LoRA"),
          "8-bit moments with LoRA must be refused; got: %s", msg);
    printf("auto choice checked\n");
}

// 8-bit moments (adamw8bit.h): per moment, codes padded to whole 256-element blocks per tensor and
// one fp32 scale per block. Tiny config by hand: embed 3200 -> 13 blocks; a layer: norm 1, wq 4,
// wk 2, wv 2, wo 4, norm 1, gate 8, up 8, down 8 = 38; final norm 1; lm_head 13: 103 blocks.
static void test_moments_8bit(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    s.moment_bytes = 1;
    MemoryPlan p = plan_with(&c, s);
    const PlanEntry *m = mst_plan_find(&p, "adam_m"), *v = mst_plan_find(&p, "adam_v");
    const PlanEntry *ma = mst_plan_find(&p, "adam_m_absmax"), *va = mst_plan_find(&p, "adam_v_absmax");
    CHECK(m && v && ma && va, "8-bit plan lacks adam_m / adam_v / adam_m_absmax / adam_v_absmax");
    if (m && v && ma && va) {
        CHECK(m->bytes == 103 * 256 && v->bytes == 103 * 256, "8-bit codes %zu, %zu bytes, expected %d", m->bytes, v->bytes, 103 * 256);
        CHECK(ma->bytes == 512 && va->bytes == 512, "8-bit scales %zu, %zu bytes, expected 512 (103 x 4 = 412)", ma->bytes, va->bytes);
        CHECK(m->category == MEM_OPTIMIZER && ma->category == MEM_OPTIMIZER, "8-bit state must count as optimizer");
    }
    size_t expect = TINY_ARENA - 2 * 100096 + 2 * 103 * 256 + 2 * 512;
    CHECK(p.device_total == expect, "8-bit tiny arena %zu, expected %zu", p.device_total, expect);
    printf("8-bit moments, tiny plan: codes 2 x %d + scales 2 x 512 bytes, arena %zu\n", 103 * 256, p.device_total);
    MstPhase at;  // the step timeline knows the block scales (live all step, as the moments)
    size_t peak = mst_timeline_peak(&p, &at);
    CHECK(peak >= m->bytes + v->bytes + ma->bytes + va->bytes && peak <= p.device_total, "8-bit timeline peak %zu of arena %zu", peak,
          p.device_total);

    // Llama-3-8B: 8-bit moments take a little over half of bf16's bytes (1 + 4/256 vs 2 per element)
    ModelConfig big;
    mst_preset("llama3-8b", &big);
    MstSettings b = tiny_settings();
    b.S = 4096; b.B = 1; b.moment_bytes = 2;
    MemoryPlan p16 = plan_with(&big, b);
    b.moment_bytes = 1;
    MemoryPlan p8 = plan_with(&big, b);
    double ratio = (double)p8.category_bytes[MEM_OPTIMIZER] / (double)p16.category_bytes[MEM_OPTIMIZER];
    CHECK(ratio > 0.5 && ratio < 0.51, "llama3-8b 8-bit / bf16 optimizer bytes = %.4f, expected (0.5, 0.51)", ratio);
    printf("llama3-8b optimizer state: bf16 %.2f GiB, 8-bit %.2f GiB (ratio %.4f)\n",
           MST_GIB(p16.category_bytes[MEM_OPTIMIZER]), MST_GIB(p8.category_bytes[MEM_OPTIMIZER]), ratio);

    // A budget that fits the 8-bit plan but not the bf16 one: refused, naming --optimizer adamw8bit
    MstSettings a = b;
    a.moment_bytes = 2; a.mst_chunks = 0; a.vocab_chunk = 0;
    MstKernelFigures f = tiny_figures();
    MemoryPlan tmp;
    char msg[4096];
    int ok = !mst_plan_auto(&tmp, &big, &a, &f, p8.device_total + p8.device_external, 0, msg, sizeof(msg));
    CHECK(ok && strstr(msg, "--optimizer adamw8bit") != NULL, "bf16 moments at the 8-bit plan's size: expect a refusal naming adamw8bit; got: %s", msg);
    printf("8-bit moments checked\n");
}

static void test_presets(void) {
    char buf[256];
    for (int i = 0; i < MST_PRESET_COUNT; i++) {
        ModelConfig c;
        CHECK(mst_preset(MST_PRESETS[i], &c), "preset %s missing", MST_PRESETS[i]);
        CHECK(config_validate(&c, buf, sizeof(buf)) == NULL, "preset %s invalid: %s", MST_PRESETS[i], buf);
        printf("preset %-11s %6.2f B matmul parameters\n", MST_PRESETS[i], (double)config_matmul_params(&c) / 1e9);
    }
    ModelConfig c;
    CHECK(!mst_preset("gpt2", &c), "unknown preset must be refused");
    mst_preset("llama3-8b", &c);
    ParamLayout lay;
    param_layout_init(&lay, &c);
    CHECK(lay.total == 8030261248ull, "llama3-8b has %zu parameters, expected 8030261248", lay.total);
    // Gemma-2's soft-capped attention runs on the soft-cap kernels: their workspace is one fp32 per
    // (b, query head, position), the figure attention_softcap_workspace_bytes gives on the GPU.
    mst_preset("gemma2-9b", &c);
    MstKernelFigures f;
    mst_kernel_figures_estimate(&c, 2, 3000, &f);
    CHECK(f.attn_workspace == (size_t)2 * 16 * 3000 * 4, "gemma2-9b attention workspace %zu, expected 2 Hq S floats",
          f.attn_workspace);
}

// ---- the memory timeline of one step

// The tiny plan's timeline (recompute, M=2, two vocabulary tiles, untied, optimizer in backward):
// always live: params 50176 + rope 512 + moments 2 x 100096 + final-norm grads 256 + norm partials
// 256 + the batch 6 x 256 = 252928; layer inputs 1280 each; x_final/dresid 1280; layer grads 37120;
// attention part 5888 (ln1_rstd 256, qkv 2560, att 1280, att_stats 512, h1 1280); MLP chunk 4864
// (ln2 768, ln2_rstd 256, gate_up 2560, glu 1280); dqkv 2560; LM-head set 20224; cuDNN workspace
// 1024, reduction scratch 512.
#define TINY_ALWAYS 252928

static void test_timeline_hand(void) {
    ModelConfig c = tiny_config(2);
    MemoryPlan p = plan_with(&c, tiny_settings());
    MstPhase ph[64];
    int n = mst_timeline(&p, ph);
    static const int kinds[] = {PHASE_EMBED_FWD, PHASE_ATTN_FWD, PHASE_MLP_FWD, PHASE_ATTN_FWD, PHASE_MLP_FWD,
                                PHASE_LM_HEAD, PHASE_HEAD_UPDATE, PHASE_RECOMPUTE, PHASE_MLP_BWD, PHASE_ATTN_BWD,
                                PHASE_RECOMPUTE, PHASE_MLP_BWD, PHASE_ATTN_BWD, PHASE_EMBED_BWD, PHASE_OPTIMIZER};
    static const int layers[] = {-1, 0, 0, 1, 1, -1, -1, 1, 1, 1, 0, 0, 0, -1, -1};
    static const size_t device[] = {
        TINY_ALWAYS + 1280,                                   // embedding: layer 0's input
        TINY_ALWAYS + 1280 + 5888 + 1024,                     // attention fwd 0: + attention part, workspace
        TINY_ALWAYS + 2 * 1280 + 1280 + 4864,                 // MLP fwd 0: + layer 1's input, h1, MLP chunk
        TINY_ALWAYS + 2 * 1280 + 5888 + 1024,
        TINY_ALWAYS + 2 * 1280 + 1280 + 1280 + 4864,          // MLP fwd 1 writes x_final
        TINY_ALWAYS + 2 * 1280 + 1280 + 20224 + 512,          // LM head: its set (with the head's gradient), scratch
        TINY_ALWAYS + 2 * 1280 + 1280 + 12800,                // head update: the head's gradient
        TINY_ALWAYS + 2 * 1280 + 1280 + 37120 + 5888 + 1024,  // recompute 1: + layer grads
        TINY_ALWAYS + 2 * 1280 + 1280 + 37120 + 5888 + 4864 + 512,
        TINY_ALWAYS + 2 * 1280 + 1280 + 37120 + 5888 + 2560 + 1024 + 512,
        TINY_ALWAYS + 1280 + 1280 + 37120 + 5888 + 1024,      // layer 1's input released
        TINY_ALWAYS + 1280 + 1280 + 37120 + 5888 + 4864 + 512,
        TINY_ALWAYS + 1280 + 1280 + 37120 + 5888 + 2560 + 1024 + 512,
        TINY_ALWAYS + 1280 + 12800,                           // embedding bwd: dresid, the embedding's gradient
        TINY_ALWAYS + 12800,                                  // optimizer: the embedding's gradient
    };
    int want = (int)(sizeof(kinds) / sizeof(kinds[0]));
    CHECK(n == want && mst_timeline_length(&p) == want, "tiny timeline: %d phases (length %d), expected %d", n,
          mst_timeline_length(&p), want);
    printf("\n%-16s %6s %10s %10s\n", "phase", "layer", "live", "by hand");
    size_t peak = 0;
    for (int i = 0; i < n && i < want; i++) {
        printf("%-16s %6d %10zu %10zu\n", mst_phase_id(ph[i].kind), ph[i].layer, ph[i].device, device[i]);
        CHECK(ph[i].kind == kinds[i] && ph[i].layer == layers[i], "phase %d: %s %d, expected %s %d", i,
              mst_phase_id(ph[i].kind), ph[i].layer, mst_phase_id(kinds[i]), layers[i]);
        CHECK(ph[i].device == device[i], "phase %d (%s %d): %zu live bytes, expected %zu", i, mst_phase_id(ph[i].kind),
              ph[i].layer, ph[i].device, device[i]);
        if (ph[i].device > peak) peak = ph[i].device;
    }
    // The peak is layer 1's MLP backward. What the arena holds that is never live then: the part of
    // the shared region beyond the attention part + one MLP chunk (20224 - 10752), and cuDNN's workspace.
    size_t slack = (TINY_SHARED - (5888 + 4864)) + 1024;
    MstPhase at;
    CHECK(peak == ph[8].device && mst_timeline_peak(&p, &at) == TINY_ARENA - slack && at.kind == PHASE_MLP_BWD && at.layer == 1,
          "tiny peak %zu at %s %d, expected arena %d - slack %zu at mlp_bwd 1", at.device, mst_phase_id(at.kind), at.layer,
          TINY_ARENA, slack);
    CHECK(ph[8].bytes[MEM_GRADIENTS] == 37120 + 256 + 256 && ph[8].bytes[MEM_ACTIVATIONS] == 2 * 1280,
          "MLP bwd 1: gradients %zu, activations %zu", ph[8].bytes[MEM_GRADIENTS], ph[8].bytes[MEM_ACTIVATIONS]);
    printf("tiny timeline: peak %zu bytes = arena %d - never-simultaneous slack %zu\n", peak, TINY_ARENA, slack);
}

// Invariants of one plan's timeline. Returns the number of phases.
static int check_timeline(const MemoryPlan *p, const char *what) {
    int n = mst_timeline_length(p);
    MstPhase *ph = (MstPhase *)mallocCheck((size_t)n * sizeof(MstPhase));
    CHECK(mst_timeline(p, ph) == n, "%s: timeline length", what);
    int fwd_end = 0, head = 0;
    for (int i = 0; i < n; i++) {
        if (ph[i].kind == PHASE_LM_HEAD) { head = i; fwd_end = i - 1; }
        size_t sum = 0;
        for (int k = 0; k < MEM_CATEGORY_COUNT; k++) if (k != MEM_HOST) sum += ph[i].bytes[k];
        CHECK(sum == ph[i].device && ph[i].device <= p->device_total && ph[i].bytes[MEM_HOST] <= p->host_total,
              "%s: phase %d (%s) holds %zu bytes (categories %zu), arena %zu", what, i, mst_phase_id(ph[i].kind),
              ph[i].device, sum, p->device_total);
        CHECK(ph[i].bytes[MEM_WEIGHTS] == p->category_bytes[MEM_WEIGHTS] &&
              ph[i].bytes[MEM_OPTIMIZER] == p->category_bytes[MEM_OPTIMIZER],
              "%s: phase %d: weights and optimizer state are live all the time", what, i);
    }
    // Activations grow over the forward, all live at the LM head, released over the backward.
    for (int i = 1; i <= fwd_end; i++)
        CHECK(ph[i].bytes[MEM_ACTIVATIONS] >= ph[i - 1].bytes[MEM_ACTIVATIONS], "%s: activations shrink at forward phase %d", what, i);
    for (int i = head + 1; i < n; i++)
        CHECK(ph[i].bytes[MEM_ACTIVATIONS] <= ph[i - 1].bytes[MEM_ACTIVATIONS], "%s: activations grow at backward phase %d", what, i);
    CHECK(ph[head].bytes[MEM_ACTIVATIONS] == p->category_bytes[MEM_ACTIVATIONS] && ph[head].bytes[MEM_HOST] == p->host_total,
          "%s: at the LM head every saved activation is live (%zu of %zu)", what, ph[head].bytes[MEM_ACTIVATIONS],
          p->category_bytes[MEM_ACTIVATIONS]);
    CHECK(ph[n - 1].bytes[MEM_ACTIVATIONS] == 0 && ph[n - 1].bytes[MEM_HOST] == 0 && ph[n - 1].kind == PHASE_OPTIMIZER,
          "%s: the step ends with every activation released", what);
    // Every planned byte holds live data at some phase: no entry is planned and never used.
    for (int j = 0; j < p->n_entries; j++) {
        const PlanEntry *e = &p->entries[j];
        int most = 0;
        for (int i = 0; i < n; i++) {
            int live = mst_entry_live(p, e, ph[i].kind, ph[i].layer);
            CHECK(live >= 0 && live <= e->count, "%s: %s has %d of %d slices live", what, e->name, live, e->count);
            if (live > most) most = live;
        }
        CHECK(most == e->count, "%s: %s is never fully live (%d of %d slices)", what, e->name, most, e->count);
    }
    free(ph);
    return n;
}

static void test_timeline_invariants(void) {
    ModelConfig cfgs[3];
    varied_configs(cfgs, 4);
    int plans = 0;
    for (int ci = 0; ci < 3; ci++) {
        for (int rc = 0; rc < 2; rc++) {
            for (int m = 1; m <= 4; m += 3) {
                for (int host = 0; host <= (rc ? 3 : 0); host++) {
                    for (int accum = 1; accum <= 2; accum++) {
                        for (int v = 0; v < 4; v++) {  // 1: LoRA r4 on an NF4 base; 2: 8-bit moments; 3: kept attention
                            int lora = v == 1;
                            MstSettings s = tiny_settings();
                            if (ci == 2) { s.S = 4096; s.vocab_chunk = 16384; }
                            s.recompute = rc; s.mst_chunks = m; s.offload = host > 0; s.host_layers = host;
                            s.grad_accum_steps = accum;
                            if (lora) {
                                s.lora.rank = 4; s.lora.alpha = 8.0f; s.lora.targets = LORA_ALL_TARGETS;
                                s.lora.base_quant = BASE_QUANT_NF4;
                            }
                            if (v == 2) s.moment_bytes = 1;
                            if (v == 3) s.attn_kept_layers = rc ? 2 : 0;  // the last two layers, with recompute
                            MemoryPlan p = plan_estimated(&cfgs[ci], s);
                            char what[128];
                            snprintf(what, sizeof(what), "config %d recompute %d M %d host layers %d accum %d variant %d",
                                     ci, rc, m, host, accum, v);
                            int n = check_timeline(&p, what);
                            int L = cfgs[ci].n_layers;
                            int untied_oib = accum == 1 && !cfgs[ci].tied_embeddings && !lora;
                            int recomputed = rc ? L - (v == 3 ? 2 : 0) : 0;
                            CHECK(n == 4 + untied_oib + 4 * L + recomputed, "%s: %d phases", what, n);
                            plans++;
                        }
                    }
                }
            }
        }
    }
    // The standard transformer (M = 1, no recompute): the device memory in use only grows over the forward.
    for (int ci = 0; ci < 3; ci++) {
        MstSettings s = tiny_settings();
        s.recompute = 0; s.mst_chunks = 1; s.vocab_chunk = cfgs[ci].vocab_size;
        if (ci == 2) s.S = 4096;
        MemoryPlan p = plan_estimated(&cfgs[ci], s);
        MstPhase ph[256];
        int n = mst_timeline(&p, ph);
        for (int i = 1; i < n && ph[i].kind != PHASE_LM_HEAD; i++)
            CHECK(ph[i].device >= ph[i - 1].device, "config %d standard: memory drops at forward phase %d (%s %d)", ci, i,
                  mst_phase_id(ph[i].kind), ph[i].layer);
    }
    printf("timeline invariants checked on %d plans\n", plans);
}

// Llama-3-8B at S = 16K on 78 GiB: the standard transformer does not fit, MsT + recompute does, and
// its peak is far below the standard one's.
static void test_timeline_llama3(void) {
    ModelConfig c;
    mst_preset("llama3-8b", &c);
    MstSettings s;
    memset(&s, 0, sizeof(s));
    s.B = 1; s.S = 16384; s.grad_accum_steps = 1; s.moment_bytes = 2;
    MstKernelFigures f;
    mst_kernel_figures_estimate(&c, s.B, s.S, &f);
    size_t budget = (size_t)78 << 30;
    char msg[4096];
    MstSettings std = s, rc = s, ms = s;
    std.mst_chunks = 1; std.vocab_chunk = c.vocab_size;
    rc = std; rc.recompute = 1;
    ms.recompute = 1; ms.mst_chunks = 8;
    MemoryPlan pstd, prc, pms;
    int fits_std = mst_plan_auto(&pstd, &c, &std, &f, budget, 0, msg, sizeof(msg));
    int fits_rc = mst_plan_auto(&prc, &c, &rc, &f, budget, 0, msg, sizeof(msg));
    int fits_ms = mst_plan_auto(&pms, &c, &ms, &f, budget, 0, msg, sizeof(msg));
    MstPhase at_std, at_rc, at_ms;
    size_t peak_std = mst_timeline_peak(&pstd, &at_std), peak_rc = mst_timeline_peak(&prc, &at_rc);
    size_t peak_ms = mst_timeline_peak(&pms, &at_ms);
    printf("llama3-8b S=16384: standard peak %.2f GiB (%s), recompute %.2f GiB (%s %d), MsT M=8 + recompute %.2f GiB (%s %d)\n",
           MST_GIB(peak_std), mst_phase_id(at_std.kind), MST_GIB(peak_rc), mst_phase_id(at_rc.kind), at_rc.layer,
           MST_GIB(peak_ms), mst_phase_id(at_ms.kind), at_ms.layer);
    CHECK(!fits_std && fits_rc && fits_ms, "fits: standard %d (expected 0), recompute %d, MsT %d", fits_std, fits_rc, fits_ms);
    CHECK(peak_ms < peak_rc && peak_rc < peak_std && peak_std > budget && peak_ms < budget,
          "peaks: MsT %zu < recompute %zu < standard %zu, and standard above the budget", peak_ms, peak_rc, peak_std);
    CHECK(at_std.kind == PHASE_LM_HEAD, "the standard transformer peaks at the LM head, got %s", mst_phase_id(at_std.kind));
    check_timeline(&pstd, "llama3-8b standard");
    check_timeline(&pms, "llama3-8b MsT");
}

static void timeline_of_unknown_entry(void *arg) {
    MemoryPlan *p = (MemoryPlan *)arg;
    MstPhase ph[64];
    mst_timeline(p, ph);
}

static void test_timeline_unknown_entry(void) {
    ModelConfig c = tiny_config(2);
    MemoryPlan p = plan_with(&c, tiny_settings());
    snprintf(p.entries[3].name, sizeof(p.entries[3].name), "new_buffer");
    TestReport r = {0, 0};
    test_expect_exit(&r, "an entry without a liveness rule", timeline_of_unknown_entry, &p, 1, "no liveness rule for plan entry 'new_buffer'");
    failures += r.failed;
}

// Llama-3-8B, B=1, recompute, bf16 moments, optimizer in backward, on an 80 GiB GPU
// (78 GiB budget: about 79 GiB free after the CUDA context, minus gpu_model's 1 GiB margin).
static void print_llama3_plan(int S) {
    ModelConfig c;
    mst_preset("llama3-8b", &c);
    MstSettings s;
    memset(&s, 0, sizeof(s));
    s.B = 1; s.S = S; s.recompute = 1; s.grad_accum_steps = 1; s.moment_bytes = 2;
    MstKernelFigures f;
    mst_kernel_figures_estimate(&c, s.B, s.S, &f);
    size_t dev = (size_t)78 << 30, host = (size_t)400 << 30;
    MemoryPlan p;
    char msg[4096];
    printf("\n== Llama-3-8B, S=%d, 78 GiB device budget, no offload ==\n", S);
    if (mst_plan_auto(&p, &c, &s, &f, dev, host, msg, sizeof(msg))) mst_plan_print(&p, stdout);
    else printf("%s", msg);
    s.offload = 1;
    printf("\n== Llama-3-8B, S=%d, 78 GiB device budget, offload (400 GiB pinned host budget) ==\n", S);
    int ok = mst_plan_auto(&p, &c, &s, &f, dev, host, msg, sizeof(msg));
    CHECK(ok, "llama3-8b S=%d with offload must fit on 78 GiB: %s", S, msg);
    if (ok) mst_plan_print(&p, stdout);
}

// Default pinned-host budget: all but 16 GiB, at least 3/4 of the machine.
static void test_host_budget(void) {
    size_t G = (size_t)1 << 30;
    CHECK(mst_default_host_budget(125 * G) == 109 * G, "125 GiB machine: %zu", mst_default_host_budget(125 * G));
    CHECK(mst_default_host_budget(24 * G) == 18 * G, "24 GiB machine: %zu", mst_default_host_budget(24 * G));
    CHECK(mst_default_host_budget(8 * G) == 6 * G, "8 GiB machine: %zu", mst_default_host_budget(8 * G));
    CHECK(mst_default_host_budget(0) == 0, "no memory: %zu", mst_default_host_budget(0));
}

// mst_settings_check on s: accepted (want NULL), or refused with a message containing want.
static void expect_check(const ModelConfig *c, const MstSettings *s, const char *want, const char *what) {
    char msg[512];
    const char *err = mst_settings_check(c, s, msg, sizeof(msg));
    if (want == NULL) CHECK(err == NULL, "%s: accepted, got: %s", what, err ? err : "");
    else CHECK(err && strstr(err, want), "%s: refused with '%s', got: %s", what, want, err ? err : "accepted");
}

// Several GPUs: the ZeRO shard sizes, the second layer-gradient buffer, and the sequence-parallel
// buffers of the tiny config (Hq 4, Hkv 2 over 2 GPUs: 2 query heads and 1 kv head each; S = 10
// tokens per GPU, 20 in all) by hand.
static void test_several_gpus(void) {
    ModelConfig c = tiny_config(2);
    ParamLayout lay;
    param_layout_init(&lay, &c);
    size_t state, shard;
    zero_figures(&lay, &c, 2, &state, &shard);
    MstSettings dp = tiny_settings();
    dp.ranks = 2;
    MemoryPlan p = plan_with(&c, dp);
    check_layout(&p, "2 GPUs data parallel");
    const PlanEntry *m = mst_plan_find(&p, "adam_m"), *g = mst_plan_find(&p, "grad_shard"), *lg = mst_plan_find(&p, "layer_grads");
    CHECK(m && m->bytes == mst_align(state * 4) && state < lay.total / 2 + 5 * ZERO_ALIGN, "adam_m of one of 2 GPUs: %zu bytes, state %zu of %zu",
          m ? m->bytes : 0, state, lay.total);
    CHECK(g && g->bytes == mst_align(shard * 4), "grad_shard %zu bytes, expected %zu", g ? g->bytes : 0, mst_align(shard * 4));
    CHECK(lg && lg->count == 2, "optimizer in backward over 2 GPUs keeps 2 layer-gradient buffers");
    CHECK(mst_plan_find(&p, "a2a_send") == NULL && mst_plan_find(&p, "qkv_heads") == NULL, "data parallel has no all-to-all buffers");
    MstSettings one = tiny_settings();
    CHECK(plan_with(&c, one).category_bytes[MEM_OPTIMIZER] > p.category_bytes[MEM_OPTIMIZER], "sharded moments are smaller than one GPU's");

    const Expected SP[] = {
        {"rope_cos_sin", 768, MEM_WEIGHTS, SHARE_NONE},       // 20 positions x hd 8 x 4 = 640
        {"att_stats", 512, MEM_INTERMEDIATES, SHARE_LAYER},   // B 2 x 2 heads x 20 x 4 = 320
        {"qkv_heads", 2560, MEM_INTERMEDIATES, SHARE_LAYER},  // 2 x 20 rows x (2 + 1 + 1) heads x 8 x 2
        {"att_heads", 1280, MEM_INTERMEDIATES, SHARE_LAYER},  // 2 x 20 x 2 x 8 x 2
        {"a2a_send", 2560, MEM_INTERMEDIATES, SHARE_LAYER},
        {"a2a_recv", 2560, MEM_INTERMEDIATES, SHARE_LAYER},
        {"datt_heads", 1280, MEM_INTERMEDIATES, SHARE_LAYER},
        {"dqkv_heads", 2560, MEM_INTERMEDIATES, SHARE_LAYER},
        {"qkv", 2560, MEM_INTERMEDIATES, SHARE_LAYER},        // this GPU's 20 rows, all heads: as on one GPU
    };
    MstSettings sp = tiny_settings();
    sp.ranks = 2;
    sp.seq_parallel = 1;
    p = plan_with(&c, sp);
    check_layout(&p, "2 GPUs sequence parallel");
    for (size_t i = 0; i < sizeof(SP) / sizeof(SP[0]); i++) {
        const PlanEntry *e = mst_plan_find(&p, SP[i].name);
        CHECK(e && e->bytes == SP[i].bytes && e->category == SP[i].category && e->share == SP[i].share,
              "sequence parallel %s: %zu bytes (expected %zu)", SP[i].name, e ? e->bytes : 0, SP[i].bytes);
    }
    sp.recompute = 0;
    p = plan_with(&c, sp);
    check_layout(&p, "2 GPUs sequence parallel without recompute");
    const PlanEntry *qh = mst_plan_find(&p, "qkv_heads");
    CHECK(qh && qh->count == 2 && qh->category == MEM_ACTIVATIONS, "without recompute every layer keeps its head-layout q|k|v");

    char msg[512];
    MstSettings bad = tiny_settings();
    bad.seq_parallel = 1;
    expect_check(&c, &bad, "2 or more GPUs", "sequence parallel on one GPU");
    bad.ranks = 3;
    expect_check(&c, &bad, "split evenly", "4 heads over 3 GPUs");
    MstSettings q8 = tiny_settings();
    q8.ranks = 2;
    q8.moment_bytes = 1;
    expect_check(&c, &q8, "8-bit moments are not sharded", "8-bit moments over 2 GPUs");
    MstSettings lr = tiny_settings();
    lr.lora.rank = 2;
    lr.lora.alpha = 4.0f;
    lr.lora.targets = LORA_ALL_TARGETS;
    expect_check(&c, &lr, NULL, "LoRA on one GPU");
    lr.ranks = 2;
    expect_check(&c, &lr, "LoRA trains on one GPU only", "LoRA over 2 GPUs");
    lr.seq_parallel = 1;
    expect_check(&c, &lr, "LoRA trains on one GPU only", "LoRA sequence parallel over 2 GPUs");
    lr.ranks = 0;
    lr.seq_parallel = 0;
    lr.overlap_optimizer = 1;
    expect_check(&c, &lr, "not LoRA adapters", "LoRA with the overlapped optimizer");

    // head groups against the kv heads of one GPU's attention: tiny (2 kv heads) takes 2 groups on one
    // GPU or data parallel, not sequence parallel over 2 (1 kv head each) or 4 GPUs (a replicated kv head)
    MstSettings hg = tiny_settings();
    hg.attn_head_groups = 2;
    expect_check(&c, &hg, NULL, "2 head groups on one GPU");
    hg.ranks = 2;
    expect_check(&c, &hg, NULL, "2 head groups, 2 GPUs data parallel");
    hg.seq_parallel = 1;
    expect_check(&c, &hg, "kv heads per GPU", "2 head groups, 2 GPUs sequence parallel");
    CHECK(mst_attn_kv_heads(&c, &hg) == 1, "tiny over 2 GPUs: %d kv heads per GPU", mst_attn_kv_heads(&c, &hg));
    hg.ranks = 4;
    expect_check(&c, &hg, "kv heads per GPU", "2 head groups, 4 GPUs sequence parallel");
    hg.attn_head_groups = 1;
    expect_check(&c, &hg, NULL, "1 head group, 4 GPUs sequence parallel");

    // Llama-3-8B (32 query, 8 kv heads): auto picks among the groups that divide a GPU's kv heads
    ModelConfig l3;
    mst_preset("llama3-8b", &l3);
    const int want_groups[4][2] = {{1, 8}, {2, 4}, {4, 2}, {8, 1}};  // GPUs, the most groups of the frugal choice
    for (int k = 0; k < 4; k++) {
        MstSettings a;
        memset(&a, 0, sizeof(a));
        a.B = 1; a.S = 8192; a.recompute = 1; a.grad_accum_steps = 1; a.moment_bytes = 2;
        a.ranks = want_groups[k][0]; a.seq_parallel = a.ranks > 1;
        MstKernelFigures f;
        mst_kernel_figures_estimate(&l3, a.B, a.S, &f);
        MstSettings fr = plan_frugal(&l3, &a, &f);
        CHECK(fr.attn_head_groups == want_groups[k][1], "llama3-8b over %d GPUs: frugal head groups %d, expected %d",
              a.ranks, fr.attn_head_groups, want_groups[k][1]);
        for (int G = 1; G <= 8; G *= 2)
            CHECK(mst_head_groups_offered(&l3, &a, &f, G) == (G <= want_groups[k][1]), "llama3-8b over %d GPUs: %d groups %s",
                  a.ranks, G, G <= want_groups[k][1] ? "not offered" : "offered");
        // a budget that only the most groups fit: the auto plan takes them (checked against the kv heads)
        MemoryPlan hp, one;
        a.attn_head_groups = 1;
        fr = plan_frugal(&l3, &a, &f);
        fr.attn_head_groups = want_groups[k][1];
        mst_plan_build(&hp, &l3, &fr, &f);
        a.attn_head_groups = 0;
        int fits = mst_plan_auto(&one, &l3, &a, &f, hp.device_total + hp.device_external, 0, msg, sizeof(msg));
        CHECK(fits && one.settings.attn_head_groups >= 1 && mst_attn_kv_heads(&l3, &a) % one.settings.attn_head_groups == 0,
              "llama3-8b over %d GPUs at the grouped plan's budget: fits %d with %d head groups", a.ranks, fits,
              fits ? one.settings.attn_head_groups : 0);
        CHECK(!fits || one.settings.attn_head_groups == want_groups[k][1], "llama3-8b over %d GPUs: auto took %d head groups, expected %d",
              a.ranks, one.settings.attn_head_groups, want_groups[k][1]);
    }

    // one GPU, overlapped optimizer: a second layer-gradient buffer, nothing else changes
    MstSettings ov = tiny_settings();
    MemoryPlan plain = plan_with(&c, ov);
    ov.overlap_optimizer = 1;
    p = plan_with(&c, ov);
    check_layout(&p, "overlapped optimizer");
    lg = mst_plan_find(&p, "layer_grads");
    CHECK(lg && lg->count == 2 && p.device_total == plain.device_total + lg->slice_bytes,
          "overlapped optimizer: 2 layer-gradient buffers (%d), %zu bytes more than without", lg ? lg->count : 0,
          p.device_total - plain.device_total);
    printf("several-GPU plans checked\n");
}

// The longest S (a multiple of 1024, below 4M) of a preset, B=1, recompute, no offload, bf16
// moments, on `ranks` GPUs of `gib` GiB (sequence parallel when ranks > 1: S / ranks tokens each),
// with the sliced attention backward `sliced` (0, 1, MST_SLICED_AUTO), from the planner.
static int planned_longest(const char *preset, double gib, int ranks, int sliced) {
    ModelConfig c;
    mst_preset(preset, &c);
    int lo = 0, hi = 4096;  // in units of 1024 tokens
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        MstSettings s;
        memset(&s, 0, sizeof(s));
        s.B = 1; s.S = mid * 1024 / ranks; s.recompute = 1; s.grad_accum_steps = 1; s.moment_bytes = 2;
        s.ranks = ranks; s.seq_parallel = ranks > 1; s.attn_bwd_sliced = sliced;
        MstKernelFigures f;
        mst_kernel_figures_estimate(&c, s.B, s.S, &f);
        MemoryPlan p;
        char msg[4096];
        if (mst_plan_auto(&p, &c, &s, &f, (size_t)(gib * 1073741824.0), 0, msg, sizeof(msg))) lo = mid;
        else hi = mid;
    }
    return lo * 1024;
}

static void test_llama3_scaling(void) {
    int s1 = planned_longest("llama3-8b", 78, 1, 0), s2 = planned_longest("llama3-8b", 78, 2, 0),
        s8 = planned_longest("llama3-8b", 78, 8, 0);
    printf("Llama-3-8B longest S (planner, 78 GiB per GPU, recompute, no offload): 1 GPU %d, 2 GPUs %d (%.2fx), 8 GPUs %d (%.2fx)\n",
           s1, s2, (double)s2 / s1, s8, (double)s8 / s1);
    CHECK(s2 >= 1.8 * s1, "2 GPUs must plan at least 1.8x the longest sequence of one (%d vs %d)", s2, s1);
    CHECK(s8 > s2, "8 GPUs must plan a longer sequence than 2 (%d vs %d)", s8, s2);
}

// Tiny config (2 layers), LoRA rank 2 on q, k, v, gate, down, NF4 base, optimizer in backward.
// Adapters per layer: q|k|v A 3 x (2 x 32) + B (32 + 16 + 16) x 2 = 320; gate A 2 x 32 + B 64 x 2 = 192;
// down A 2 x 64 + B 32 x 2 = 192: 704, 1408 in all. NF4 record of a layer (16-byte aligned parts):
// attn_norm 64 B; wq 1024: codes 512 + absmax 16 x 4; wk, wv 512: 256 + 32 each; wo as wq; mlp_norm
// 64 B; gate, up, down 2048: 1024 + 128 each = 5312 B, 5376 rounded to 256.
static const Expected TINY_LORA[] = {
    {"params", 13056, MEM_WEIGHTS, SHARE_NONE},             // embed 3200 + final_norm 32 + lm_head 3200, x 2 = 12864
    {"qbase", 10752, MEM_WEIGHTS, SHARE_NONE},              // 2 x 5376
    {"qbase_layer", 18688, MEM_WEIGHTS, SHARE_NONE},        // 9280 x 2 = 18560
    {"lora_params", 2816, MEM_WEIGHTS, SHARE_NONE},         // 1408 x 2
    {"lora_bblk_qkv", 768, MEM_WEIGHTS, SHARE_NONE},        // 64 x R 6 x 2
    {"lora_bblk_gate_up", 512, MEM_WEIGHTS, SHARE_NONE},    // 128 x R 2 x 2
    {"adam_m", 5632, MEM_OPTIMIZER, SHARE_NONE},            // 1408 x 4
    {"adam_v", 5632, MEM_OPTIMIZER, SHARE_NONE},
    {"lora_layer_grads", 2816, MEM_GRADIENTS, SHARE_NONE},  // 704 x 4
    {"lora_u", 256, MEM_INTERMEDIATES, SHARE_LAYER},        // N 20 x R 6 x 2 = 240
    {"lora_du", 256, MEM_INTERMEDIATES, SHARE_LAYER},
    {"lora_dbblk", 1536, MEM_INTERMEDIATES, SHARE_LAYER},   // q|k|v: 64 x 6 x 4 = 1536 (gate|up 1024, down 256)
};

static void test_lora_plans(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    s.lora.rank = 2;
    s.lora.alpha = 4.0f;
    s.lora.targets = (1u << LORA_Q) | (1u << LORA_K) | (1u << LORA_V) | (1u << LORA_GATE) | (1u << LORA_DOWN);
    s.lora.base_quant = BASE_QUANT_NF4;
    MemoryPlan p = plan_with(&c, s);
    check_layout(&p, "tiny LoRA NF4");
    for (size_t i = 0; i < sizeof(TINY_LORA) / sizeof(TINY_LORA[0]); i++) {
        const PlanEntry *e = mst_plan_find(&p, TINY_LORA[i].name);
        if (e == NULL) { CHECK(0, "LoRA plan: entry %s missing", TINY_LORA[i].name); continue; }
        CHECK(e->bytes == TINY_LORA[i].bytes && e->category == TINY_LORA[i].category && e->share == TINY_LORA[i].share,
              "LoRA plan: %s has %zu bytes (category %d, region %d), expected %zu", TINY_LORA[i].name, e->bytes,
              e->category, e->share, TINY_LORA[i].bytes);
    }
    const char *absent[] = {"grads", "layer_grads", "embed_head_grads", "final_norm_grads", "master", "lora_grads"};
    for (int i = 0; i < 6; i++) CHECK(mst_plan_find(&p, absent[i]) == NULL, "LoRA plan: unexpected entry %s", absent[i]);
    s.grad_accum_steps = 2;
    s.master_weights = 1;
    p = plan_with(&c, s);
    CHECK(mst_plan_find(&p, "lora_grads") && mst_plan_find(&p, "lora_grads")->bytes == 5632 &&
          mst_plan_find(&p, "master") && mst_plan_find(&p, "master")->bytes == 5632 && !mst_plan_find(&p, "grads"),
          "LoRA plan with accumulation: lora_grads and master of the 1408 adapters (5632 bytes each)");

    // Llama-3-8B at S = 65536 (80 GiB): LoRA r 16 on every projection saves the base's gradients and
    // moments; an NF4 base stores the projections in 4.5 bits (4-bit codes + an fp32 absmax per 64).
    mst_preset("llama3-8b", &c);
    MstSettings t = tiny_settings();
    t.B = 1; t.S = 65536; t.mst_chunks = 8; t.vocab_chunk = 16384; t.moment_bytes = 2;
    MstKernelFigures f;
    mst_kernel_figures_estimate(&c, t.B, t.S, &f);
    MemoryPlan full;
    mst_plan_build(&full, &c, &t, &f);
    t.lora.rank = 16;
    t.lora.alpha = 32.0f;
    t.lora.targets = LORA_ALL_TARGETS;
    mst_plan_build(&p, &c, &t, &f);
    double lora_saved = MST_GIB(full.device_total) - MST_GIB(p.device_total);
    t.lora.base_quant = BASE_QUANT_NF4;
    MemoryPlan q;
    mst_plan_build(&q, &c, &t, &f);
    double quant_saved = MST_GIB(p.device_total) - MST_GIB(q.device_total);
    ParamLayout lay;
    param_layout_init(&lay, &c);
    size_t proj = lay.layer_size - 2 * (size_t)c.d_model;  // a layer's projections (two norms besides)
    double want_quant = MST_GIB((size_t)c.n_layers * (proj * 2 - proj / 2 - proj / 64 * 4)) - MST_GIB(lay.layer_size * 2);
    printf("llama3-8b S=65536: full %.2f GiB, LoRA r16 %.2f GiB (saves %.2f), + NF4 base %.2f GiB (saves %.2f, by hand %.2f)\n",
           MST_GIB(full.device_total), MST_GIB(p.device_total), lora_saved, MST_GIB(q.device_total), quant_saved, want_quant);
    // LoRA drops the fp32 layer gradient, the embedding/head gradients and the bf16 moments of ~8B
    // parameters: at least 4 x 8.0e9 bytes = 29.8 GiB.
    CHECK(lora_saved > 29.8, "LoRA saves %.2f GiB, expected > 29.8", lora_saved);
    CHECK(fabs(quant_saved - want_quant) < 0.01, "NF4 saves %.2f GiB, by hand %.2f", quant_saved, want_quant);
}

// The longest S that a refusal reports for settings s (planned at S = 2^20), or 0 if none.
static int reported_longest(const ModelConfig *c, MstSettings s, size_t device, size_t host) {
    MstKernelFigures f;
    MemoryPlan p;
    char msg[8192];
    s.S = 1 << 20;
    mst_kernel_figures_estimate(c, s.B, s.S, &f);
    if (mst_plan_auto(&p, c, &s, &f, device, host, msg, sizeof(msg))) return 0;
    const char *at = strstr(msg, "fits is about S=");
    return at ? atoi(at + strlen("fits is about S=")) : 0;
}

static int fits_at(const ModelConfig *c, MstSettings s, int S, size_t device, size_t host) {
    MstKernelFigures f;
    MemoryPlan p;
    char msg[8192];
    s.S = S;
    mst_kernel_figures_estimate(c, s.B, s.S, &f);
    return mst_plan_auto(&p, c, &s, &f, device, host, msg, sizeof(msg));
}

// Llama-3-8B, LoRA r16 on every projection over an NF4 base, 80 GiB device, the 125 GiB device
// machine's default host budget (109 GiB): the longest sequence a refusal reports fits and 2% more
// does not; all on the GPU it is >= 200K (issue 8's target), with offload >= 400K. With offload the
// host budget binds first (32 layer inputs of 8 KiB a token), so the answer keeps some layer inputs
// on the device: the search must not stop at the all-offloaded plan.
static void test_lora_longest(void) {
    ModelConfig c;
    mst_preset("llama3-8b", &c);
    MstSettings s = tiny_settings();
    s.B = 1;
    s.moment_bytes = 2;
    s.mst_chunks = 0;
    s.vocab_chunk = 0;
    s.lora.rank = 16;
    s.lora.alpha = 32.0f;
    s.lora.targets = LORA_ALL_TARGETS;
    s.lora.base_quant = BASE_QUANT_NF4;
    size_t G = (size_t)1 << 30, device = 80 * G, host = mst_default_host_budget(125 * G);
    for (int offload = 0; offload < 2; offload++) {
        s.offload = offload;
        int S = reported_longest(&c, s, device, host);
        printf("llama3-8b LoRA r16 NF4, 80 GiB%s: longest S = %d\n", offload ? " + 109 GiB pinned host" : "", S);
        CHECK(S >= (offload ? 400000 : 200000), "longest S %d below the target", S);
        CHECK(fits_at(&c, s, S, device, host), "the reported longest S=%d does not fit", S);
        CHECK(!fits_at(&c, s, S + S / 50, device, host), "S=%d (2%% above the reported longest) fits", S + S / 50);
    }
}

// The sliced attention backward: the tiny plan's entries by hand (no dqkv; one group's datt_g and
// dqkv_g; the sliced graph's workspace), layout and timeline; the settings it refuses; auto takes it
// only when nothing else fits (Llama-2-7B at S = 131072 on 78.16 GiB), and what it saves.
static void test_sliced_attention_backward(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    s.attn_bwd_sliced = 1;
    s.attn_head_groups = 2;
    MstKernelFigures f = tiny_figures();
    f.attn_workspace_grouped[0] = 900;
    f.attn_workspace_sliced[0] = 700;
    MemoryPlan p;
    mst_plan_build(&p, &c, &s, &f);
    const PlanEntry *dg = mst_plan_find(&p, "datt_g"), *qg = mst_plan_find(&p, "dqkv_g"), *ws = mst_plan_find(&p, "attn_workspace");
    // datt_g: 20 rows x (32 / 2) x 2 = 640 -> 768; dqkv_g: 20 x (64 / 2) x 2 = 1280; workspace 700 -> 768
    CHECK(dg && dg->bytes == 768 && dg->share == SHARE_LAYER, "sliced: datt_g %zu bytes, expected 768 in the layer set", dg ? dg->bytes : 0);
    CHECK(qg && qg->bytes == 1280 && qg->share == SHARE_LAYER, "sliced: dqkv_g %zu bytes, expected 1280 in the layer set", qg ? qg->bytes : 0);
    CHECK(ws && ws->bytes == 768, "sliced: attention workspace %zu bytes, expected 768 (the sliced graph's)", ws ? ws->bytes : 0);
    CHECK(!mst_plan_find(&p, "dqkv") && !mst_plan_find(&p, "datt"), "sliced: no full dqkv / datt");
    // the layer working set 13312 - dqkv 2560 + 768 + 1280 stays below the LM-head set; arena - 1024 + 768
    CHECK(p.shared_bytes == TINY_SHARED && p.device_total == TINY_ARENA - 1024 + 768, "sliced: shared %zu, arena %zu, expected %d, %d",
          p.shared_bytes, p.device_total, TINY_SHARED, TINY_ARENA - 1024 + 768);
    check_layout(&p, "tiny sliced");
    check_timeline(&p, "tiny sliced");
    MstPhase ph[64];
    int n = mst_timeline(&p, ph);
    for (int i = 0; i < n; i++) {
        int live = mst_entry_live(&p, dg, ph[i].kind, ph[i].layer) + mst_entry_live(&p, qg, ph[i].kind, ph[i].layer);
        CHECK(live == (ph[i].kind == PHASE_ATTN_BWD ? 2 : 0), "sliced: datt_g + dqkv_g live %d at %s", live, mst_phase_id(ph[i].kind));
    }
    MstSettings off = s;
    off.attn_bwd_sliced = 0;
    MemoryPlan po = plan_with(&c, off);
    CHECK(mst_plan_find(&po, "dqkv") && !mst_plan_find(&po, "dqkv_g"), "sliced off: the full dqkv, no dqkv_g");

    // refusals
    expect_check(&c, &s, NULL, "sliced, 2 groups, recompute");
    MstSettings b = s;
    b.recompute = 0;
    expect_check(&c, &b, "needs recompute on", "sliced without recompute");
    b = s;
    b.lora.rank = 2; b.lora.alpha = 4.0f; b.lora.targets = LORA_ALL_TARGETS;
    expect_check(&c, &b, "not for LoRA", "sliced with LoRA");
    b = s;
    b.attn_head_groups = 1;
    expect_check(&c, &b, "not 1", "sliced in 1 group");
    b = s;
    b.attn_bwd_sliced = 2;
    expect_check(&c, &b, "must be 0, 1 or auto", "sliced = 2");
    b = s;
    b.ranks = 2; b.seq_parallel = 1; b.attn_head_groups = 0;
    expect_check(&c, &b, "not sequence parallel", "sliced, sequence parallel");
    ModelConfig capped = c;
    capped.attn_softcap = 50.0f;
    expect_check(&capped, &s, "soft-capped", "sliced with an attention soft-cap");
    ModelConfig narrow = c;
    narrow.n_heads = 2;  // q = 16 < d = 32
    expect_check(&narrow, &s, "narrower than d_model", "sliced with q narrower than d");
    b = s;
    b.recompute = 0;
    b.attn_bwd_sliced = MST_SLICED_AUTO;
    expect_check(&c, &b, NULL, "sliced auto without recompute (never taken)");

    // Llama-2-7B at S = 131072 on 78.16 GiB: does not fit with the sliced backward off, fits with it
    // (auto and on), in 8 groups; at S = 65536 auto does not take it
    ModelConfig l2;
    mst_preset("llama2-7b", &l2);
    MstSettings a;
    memset(&a, 0, sizeof(a));
    a.B = 1; a.S = 131072; a.recompute = 1; a.grad_accum_steps = 1; a.moment_bytes = 2;
    MstKernelFigures lf;
    mst_kernel_figures_estimate(&l2, a.B, a.S, &lf);
    size_t budget = (size_t)(78.16 * 1073741824.0);
    char msg[8192];
    MemoryPlan pl, pa;
    int fits_off = mst_plan_auto(&pl, &l2, &a, &lf, budget, 0, msg, sizeof(msg));
    a.attn_bwd_sliced = MST_SLICED_AUTO;
    int fits_auto = mst_plan_auto(&pa, &l2, &a, &lf, budget, 0, msg, sizeof(msg));
    CHECK(!fits_off && fits_auto && pa.settings.attn_bwd_sliced == 1 && pa.settings.attn_head_groups == 8,
          "llama2-7b S=131072 on 78.16 GiB: off fits %d (expected 0), auto fits %d sliced %d in %d groups (expected 1, 1, 8)",
          fits_off, fits_auto, pa.settings.attn_bwd_sliced, pa.settings.attn_head_groups);
    if (fits_auto) {
        const PlanEntry *g8 = mst_plan_find(&pa, "dqkv_g"), *d8 = mst_plan_find(&pa, "datt_g");
        CHECK(g8 && g8->bytes == (size_t)131072 * 12288 / 8 * 2 && d8 && d8->bytes == (size_t)131072 * 4096 / 8 * 2,
              "llama2-7b sliced: dqkv_g %zu (384 MiB), datt_g %zu (128 MiB)", g8 ? g8->bytes : 0, d8 ? d8->bytes : 0);
        check_timeline(&pa, "llama2-7b S=131072 sliced");
        MstPhase at;
        size_t peak = mst_timeline_peak(&pa, &at);
        CHECK(peak <= pa.device_total, "llama2-7b sliced: peak %zu above the arena", peak);
    }
    MstSettings on = a;
    on.attn_bwd_sliced = 1;
    MemoryPlan pn;
    CHECK(mst_plan_auto(&pn, &l2, &on, &lf, budget, 0, msg, sizeof(msg)) && pn.settings.attn_bwd_sliced == 1 && pn.settings.attn_head_groups >= 2,
          "llama2-7b S=131072 sliced on: fits in %d groups", pn.settings.attn_head_groups);
    a.S = 65536;
    mst_kernel_figures_estimate(&l2, a.B, a.S, &lf);
    CHECK(mst_plan_auto(&pa, &l2, &a, &lf, budget, 0, msg, sizeof(msg)) && pa.settings.attn_bwd_sliced == 0,
          "llama2-7b S=65536 auto: sliced %d, expected 0 (the plain backward fits)", pa.settings.attn_bwd_sliced);

    int l2_off = planned_longest("llama2-7b", 78.16, 1, 0), l2_auto = planned_longest("llama2-7b", 78.16, 1, MST_SLICED_AUTO);
    int l3_off = planned_longest("llama3-8b", 78.16, 1, 0), l3_auto = planned_longest("llama3-8b", 78.16, 1, MST_SLICED_AUTO);
    printf("longest S on 78.16 GiB (planner, MsT + recompute, bf16 moments, no offload): llama2-7b %d -> %d sliced, "
           "llama3-8b %d -> %d sliced\n", l2_off, l2_auto, l3_off, l3_auto);
    CHECK(l2_auto >= 131072 && l2_auto > l2_off && l3_auto > l3_off, "the sliced backward lengthens the longest S: llama2-7b %d -> %d, llama3-8b %d -> %d",
          l2_off, l2_auto, l3_off, l3_auto);
    printf("sliced attention backward plans checked\n");
}

// Kept attention activations (--keep-attn): with recompute, the last K layers keep their attention
// part (kept_*, K slices of the shared buffers' sizes), the backward recomputes only the others;
// the timeline has no recompute phase for them; auto K takes only what is left once the chunking
// is chosen, so it never shortens the longest sequence; refused without recompute or above L.
static void test_kept_attention(void) {
    ModelConfig c = tiny_config(2);
    MstSettings s = tiny_settings();
    s.attn_kept_layers = 1;
    MemoryPlan p = plan_with(&c, s), none = plan_with(&c, tiny_settings());
    // kept_ln1_rstd 256 + kept_qkv 2560 + kept_att 1280 + kept_att_stats 512 + kept_h1 1280 (TINY's layer sizes)
    static const Expected kept[] = {{"kept_ln1_rstd", 256, MEM_ACTIVATIONS, SHARE_NONE}, {"kept_qkv", 2560, MEM_ACTIVATIONS, SHARE_NONE},
                                    {"kept_att", 1280, MEM_ACTIVATIONS, SHARE_NONE}, {"kept_att_stats", 512, MEM_ACTIVATIONS, SHARE_NONE},
                                    {"kept_h1", 1280, MEM_ACTIVATIONS, SHARE_NONE}};
    for (size_t i = 0; i < sizeof(kept) / sizeof(kept[0]); i++) {
        const PlanEntry *e = mst_plan_find(&p, kept[i].name);
        CHECK(e && e->bytes == kept[i].bytes && e->count == 1 && e->category == kept[i].category && e->share == SHARE_NONE,
              "kept 1: entry %s: %zu bytes x%d", kept[i].name, e ? e->bytes : 0, e ? e->count : 0);
    }
    CHECK(mst_plan_find(&p, "kept_ln1") == NULL, "a kept layer writes its normed input into h1's buffer, as with recompute");
    CHECK(p.device_total == TINY_ARENA + 5888 && p.category_bytes[MEM_ACTIVATIONS] == none.category_bytes[MEM_ACTIVATIONS] + 5888,
          "kept 1: arena %zu (expected %d), activations +%zu (expected 5888)", p.device_total, TINY_ARENA + 5888,
          p.category_bytes[MEM_ACTIVATIONS] - none.category_bytes[MEM_ACTIVATIONS]);
    // The timeline: a recompute phase for layer 0 only; layer 1's kept buffers live from its
    // attention fwd to its attention bwd, and the shared attention buffers idle during its phases.
    MstPhase ph[64];
    int n = mst_timeline(&p, ph), recomputes = 0;
    CHECK(n == mst_timeline_length(&p) && n == 4 + 1 + 4 * 2 + 1, "kept 1: %d phases", n);
    for (int i = 0; i < n; i++) if (ph[i].kind == PHASE_RECOMPUTE) { recomputes++; CHECK(ph[i].layer == 0, "recompute of kept layer %d", ph[i].layer); }
    CHECK(recomputes == 1, "kept 1: %d recompute phases (expected 1)", recomputes);
    const PlanEntry *kq = mst_plan_find(&p, "kept_qkv"), *sq = mst_plan_find(&p, "qkv");
    for (int i = 0; i < n; i++) {
        int l1_fwd = (ph[i].kind == PHASE_ATTN_FWD || ph[i].kind == PHASE_MLP_FWD) && ph[i].layer == 1;
        int expect_kept = (l1_fwd || ph[i].kind == PHASE_LM_HEAD || ph[i].kind == PHASE_HEAD_UPDATE ||
                           (phase_is_backward(ph[i].kind) && ph[i].kind != PHASE_EMBED_BWD && ph[i].layer == 1));
        CHECK(mst_entry_live(&p, kq, ph[i].kind, ph[i].layer) == expect_kept, "kept_qkv live at phase %d (%s %d)", i,
              mst_phase_id(ph[i].kind), ph[i].layer);
        if (ph[i].layer == 1 && ph[i].kind != PHASE_MLP_FWD && ph[i].kind != PHASE_MLP_BWD)
            CHECK(mst_entry_live(&p, sq, ph[i].kind, 1) == 0, "the shared qkv idles in kept layer 1's %s", mst_phase_id(ph[i].kind));
    }
    check_timeline(&p, "kept 1");
    // Refusals.
    MstKernelFigures f = tiny_figures();
    char msg[4096];
    MemoryPlan tmp;
    MstSettings bad = s;
    bad.recompute = 0;
    CHECK(!mst_plan_auto(&tmp, &c, &bad, &f, (size_t)1 << 30, 0, msg, sizeof(msg)) && strstr(msg, "without recompute every layer"),
          "kept layers without recompute must be refused; got: %s", msg);
    bad = s; bad.attn_kept_layers = 3;
    CHECK(!mst_plan_auto(&tmp, &c, &bad, &f, (size_t)1 << 30, 0, msg, sizeof(msg)) && strstr(msg, "must be in [0, 2]"),
          "3 kept layers of 2 must be refused; got: %s", msg);
    // Auto: the chunking first (as with none kept), then as many kept layers as the rest allows.
    MstSettings a = tiny_settings();
    a.mst_chunks = 0; a.vocab_chunk = 0; a.attn_kept_layers = MST_KEPT_AUTO;
    MstSettings a0 = a;
    a0.attn_kept_layers = 0;
    MemoryPlan base0, got;
    CHECK(mst_plan_auto(&base0, &c, &a0, &f, (size_t)1 << 30, 0, msg, sizeof(msg)), "ample budget, none kept: %s", msg);
    size_t need0 = base0.device_total + base0.device_external;
    size_t budgets[4] = {need0, need0 + 5887, need0 + 5888, (size_t)1 << 30};
    int expect_k[4] = {0, 0, 1, 2};
    for (int i = 0; i < 4; i++) {
        int ok = mst_plan_auto(&got, &c, &a, &f, budgets[i], 0, msg, sizeof(msg));
        CHECK(ok && got.settings.attn_kept_layers == expect_k[i] && got.settings.mst_chunks == base0.settings.mst_chunks &&
                  got.settings.vocab_chunk == base0.settings.vocab_chunk && got.device_total + got.device_external <= budgets[i],
              "auto at %zu bytes: ok %d kept %d (expected %d), M %d vc %d", budgets[i], ok, got.settings.attn_kept_layers,
              expect_k[i], got.settings.mst_chunks, got.settings.vocab_chunk);
    }
    MstSettings arc = a;
    arc.recompute = 0;
    CHECK(mst_plan_auto(&got, &c, &arc, &f, (size_t)1 << 30, 0, msg, sizeof(msg)) && got.settings.attn_kept_layers == 0 &&
              mst_plan_find(&got, "kept_qkv") == NULL, "auto without recompute keeps no separate attention buffers");
    // Llama-3-8B on 78 GiB: at 16K most layers keep their attention (about 450 MiB a layer); at the
    // longest sequence none do, and that longest sequence is the one with none kept.
    ModelConfig l3;
    mst_preset("llama3-8b", &l3);
    MstSettings ls;
    memset(&ls, 0, sizeof(ls));
    ls.B = 1; ls.S = 16384; ls.recompute = 1; ls.grad_accum_steps = 1; ls.moment_bytes = 2; ls.attn_kept_layers = MST_KEPT_AUTO;
    MstKernelFigures lf;
    mst_kernel_figures_estimate(&l3, ls.B, ls.S, &lf);
    size_t budget = (size_t)78 << 30;
    CHECK(mst_plan_auto(&got, &l3, &ls, &lf, budget, 0, msg, sizeof(msg)) && got.settings.attn_kept_layers >= 24,
          "llama3-8b S=16384: %d layers keep their attention (expected >= 24)", got.settings.attn_kept_layers);
    printf("llama3-8b S=16384 on 78 GiB: %d of 32 layers keep their attention activations (arena %.2f GiB)\n",
           got.settings.attn_kept_layers, MST_GIB(got.device_total));
    // Sequence parallel over 2 GPUs: a kept layer keeps its head-layout q|k|v and attention output too.
    MstSettings sp = ls;
    sp.S = 8192; sp.ranks = 2; sp.seq_parallel = 1; sp.attn_kept_layers = 4;
    sp.mst_chunks = 1; sp.vocab_chunk = l3.vocab_size;
    MemoryPlan psp = plan_estimated(&l3, sp);
    const PlanEntry *kh = mst_plan_find(&psp, "kept_qkv_heads"), *ka = mst_plan_find(&psp, "kept_att_heads");
    CHECK(kh && ka && kh->count == 4 && ka->count == 4 && kh->bytes == mst_plan_find(&psp, "qkv_heads")->bytes * 4,
          "sequence parallel, 4 kept layers: kept_qkv_heads x%d, kept_att_heads x%d", kh ? kh->count : 0, ka ? ka->count : 0);
    check_timeline(&psp, "llama3-8b sequence parallel, 4 kept layers");
    int longest = planned_longest("llama3-8b", 78, 1, 0);
    ls.S = longest;
    mst_kernel_figures_estimate(&l3, ls.B, ls.S, &lf);
    CHECK(mst_plan_auto(&got, &l3, &ls, &lf, budget, 0, msg, sizeof(msg)) && got.settings.attn_kept_layers == 0,
          "llama3-8b at its longest S=%d: auto keeps %d layers (expected 0)", longest, got.settings.attn_kept_layers);
    ls.S = longest + 1024;
    mst_kernel_figures_estimate(&l3, ls.B, ls.S, &lf);
    CHECK(!mst_plan_auto(&got, &l3, &ls, &lf, budget, 0, msg, sizeof(msg)), "auto kept layers must not fit a longer S than none kept");
    printf("kept attention checked\n");
}

// Recompute auto: off when the standard transformer (M = 1, one tile, or the chunking asked for)
// fits; else on, with the kept attention layers auto; on whenever offload, the sliced backward or
// kept layers ask for it; the longest sequence is the one with recompute on.
static void test_recompute_auto(void) {
    ModelConfig c = tiny_config(2);
    MstKernelFigures f = tiny_figures();
    MstSettings a = tiny_settings();
    a.recompute = MST_RECOMPUTE_AUTO; a.mst_chunks = 0; a.vocab_chunk = 0; a.attn_kept_layers = MST_KEPT_AUTO;
    MemoryPlan p;
    char msg[4096];
    int ok = mst_plan_auto(&p, &c, &a, &f, (size_t)1 << 30, 0, msg, sizeof(msg));
    CHECK(ok && p.settings.recompute == 0 && p.settings.mst_chunks == 1 && p.settings.vocab_chunk == c.vocab_size,
          "ample budget: ok %d recompute %d M %d vc %d (expected the standard transformer)", ok, p.settings.recompute,
          p.settings.mst_chunks, p.settings.vocab_chunk);
    size_t standard = p.device_total + p.device_external;
    ok = mst_plan_auto(&p, &c, &a, &f, standard - 1, 0, msg, sizeof(msg));
    CHECK(ok && p.settings.recompute == 1 && p.device_total + p.device_external <= standard - 1,
          "just below the standard plan: ok %d recompute %d (expected on)", ok, p.settings.recompute);
    MstSettings m2 = a;
    m2.mst_chunks = 2;
    ok = mst_plan_auto(&p, &c, &m2, &f, (size_t)1 << 30, 0, msg, sizeof(msg));
    CHECK(ok && p.settings.recompute == 0 && p.settings.mst_chunks == 2, "M 2 asked, ample: recompute %d M %d", p.settings.recompute,
          p.settings.mst_chunks);
    MstSettings asks[2] = {a, a};
    asks[0].offload = 1;
    asks[1].attn_kept_layers = 1;
    for (int i = 0; i < 2; i++) {
        ok = mst_plan_auto(&p, &c, &asks[i], &f, (size_t)1 << 30, (size_t)1 << 30, msg, sizeof(msg));
        CHECK(ok && p.settings.recompute == 1, "%s asks for recompute: got %d", i ? "a kept layer" : "offload", p.settings.recompute);
    }
    ModelConfig l3;
    mst_preset("llama3-8b", &l3);
    MstSettings ls;
    memset(&ls, 0, sizeof(ls));
    ls.B = 1; ls.grad_accum_steps = 1; ls.moment_bytes = 2; ls.recompute = MST_RECOMPUTE_AUTO; ls.attn_kept_layers = MST_KEPT_AUTO;
    size_t budget = (size_t)78 << 30;
    int seqs[3] = {4096, 8192, planned_longest("llama3-8b", 78, 1, 0)};
    for (int i = 0; i < 3; i++) {
        ls.S = seqs[i];
        MstKernelFigures lf;
        mst_kernel_figures_estimate(&l3, ls.B, ls.S, &lf);
        ok = mst_plan_auto(&p, &l3, &ls, &lf, budget, 0, msg, sizeof(msg));
        printf("llama3-8b S=%d, recompute auto on 78 GiB: recompute %d, M %d, %d layers keep their attention\n", ls.S,
               p.settings.recompute, p.settings.mst_chunks, mst_kept_layers(&p.settings));
        CHECK(ok && p.settings.recompute == (i > 0), "llama3-8b S=%d: ok %d recompute %d", ls.S, ok, p.settings.recompute);
    }
    CHECK(mst_kept_layers(&p.settings) == 0, "at the longest S no layer keeps its attention");
    printf("recompute auto checked\n");
}

int main(void) {
    test_host_budget();
    test_hand_figures();
    test_lora_plans();
    test_lora_longest();
    test_layouts();
    test_monotonic();
    test_auto();
    test_moments_8bit();
    test_presets();
    test_timeline_hand();
    test_timeline_invariants();
    test_timeline_llama3();
    test_timeline_unknown_entry();
    test_several_gpus();
    test_sliced_attention_backward();
    test_kept_attention();
    test_recompute_auto();
    test_llama3_scaling();
    print_llama3_plan(96 * 1024);
    print_llama3_plan(128 * 1024);
    if (failures) {
        printf("test_planner: %d check(s) FAILED\n", failures);
        return 1;
    }
    printf("test_planner: all checks passed\n");
    return 0;
}

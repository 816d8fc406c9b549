// Tests of zero.h: each block's parts over the ranks tile it exactly (in rank order, aligned
// starts, balanced to one unit) for many sizes and rank counts; the blocks tile the flat
// parameter array (tied and untied heads); each rank's state arrays hold its parts in order,
// aligned, without overlap; one rank owns everything; the plan figures are the maxima over the
// ranks; Llama-3-8B over 8 GPUs keeps an eighth of the optimizer state per GPU.
//
// Build: gcc -O2 -Wall -Wextra -I. tests/test_zero.c -o build/test_zero
#include "mst.h"
#include "tests/test_util.h"

static TestReport g_report = {0, 0};

// The parts of a block of `size` over `world` ranks tile [0, size) in rank order, every start is a
// multiple of ZERO_ALIGN, and the parts differ in length by at most one unit (+ the short last one).
static int ranges_ok(size_t size, int world) {
    size_t at = 0, longest = 0, shortest = SIZE_MAX;
    for (int r = 0; r < world; r++) {
        size_t lo, hi;
        zero_range(size, world, r, &lo, &hi);
        if (lo != at || hi < lo || lo % ZERO_ALIGN != 0) return 0;
        size_t units = (hi - lo + ZERO_ALIGN - 1) / ZERO_ALIGN;
        if (units > longest) longest = units;
        if (units < shortest) shortest = units;
        at = hi;
    }
    return at == size && longest - shortest <= 1 + (size % ZERO_ALIGN != 0);
}

static void test_ranges(void) {
    printf("\n== block parts over the ranks\n");
    const size_t sizes[] = {1, 255, 256, 257, 1000, 4096, 65539, 1 << 20, 218112000, 525336576};
    const int worlds[] = {1, 2, 3, 4, 7, 8, 16};
    int all = 1;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        for (size_t k = 0; k < sizeof(worlds) / sizeof(worlds[0]); k++)
            if (!ranges_ok(sizes[i], worlds[k])) {
                printf("    size %zu over %d ranks: bad parts\n", sizes[i], worlds[k]);
                all = 0;
            }
    test_check(&g_report, all, "10 sizes x 7 rank counts: parts tile the block, aligned, balanced");
    size_t lo, hi;
    zero_range(4096, 8, 5, &lo, &hi);
    test_check(&g_report, lo == 2560 && hi == 3072, "4096 elements over 8 ranks: rank 5 owns [2560, 3072)");
    zero_range(300, 4, 0, &lo, &hi);
    int a = lo == 0 && hi == 0;
    zero_range(300, 4, 1, &lo, &hi);
    a &= lo == 0 && hi == 256;
    zero_range(300, 4, 3, &lo, &hi);
    a &= lo == 256 && hi == 300;
    test_check(&g_report, a, "300 elements (2 units) over 4 ranks: ranks 0 and 2 own nothing, rank 3 the short unit");
}

// Tiny config (as in test_planner.c): V=100 d=32 L=2 Hq=4 Hkv=2 hd=8 F=64.
static ModelConfig tiny(int tied) {
    ModelConfig c;
    preset_base(&c, FAMILY_LLAMA, 100, 32, 2, 4, 2, 8, 64, 128, 1e-5f, 10000.0f);
    c.tied_embeddings = tied;
    return c;
}

static void test_layout(void) {
    printf("\n== blocks and state arrays\n");
    for (int tied = 0; tied < 2; tied++) {
        ModelConfig c = tiny(tied);
        ParamLayout p;
        param_layout_init(&p, &c);
        for (int world = 1; world <= 5; world++) {
            int ok = 1;
            size_t state_max = 0, shard_max = 0;
            unsigned char *owned = (unsigned char *)callocCheck(p.total, 1);
            for (int r = 0; r < world; r++) {
                ZeroLayout z;
                zero_layout_init(&z, &p, &c, world, r);
                ok &= z.n_blocks == c.n_layers + (tied ? 2 : 3);
                size_t at = 0, state_at = 0;
                for (int b = 0; b < z.n_blocks; b++) {
                    ok &= z.offset[b] == at && z.lo[b] >= z.offset[b] && z.hi[b] <= z.offset[b] + z.size[b] && z.lo[b] <= z.hi[b];
                    ok &= z.state[b] == state_at && z.state[b] % ZERO_ALIGN == 0;
                    for (size_t e = z.lo[b]; e < z.hi[b]; e++) owned[e]++;
                    at += z.size[b];
                    state_at += zero_align_up(z.hi[b] - z.lo[b]);
                    if (z.hi[b] - z.lo[b] > shard_max) shard_max = z.hi[b] - z.lo[b];
                }
                ok &= at == p.total && z.state_elems == state_at;
                if (world == 1) ok &= z.lo[0] == 0 && z.hi[z.n_blocks - 1] == p.total;
                if (z.state_elems > state_max) state_max = z.state_elems;
                zero_layout_free(&z);
            }
            for (size_t e = 0; e < p.total; e++) ok &= owned[e] == 1;
            free(owned);
            size_t fig_state, fig_shard;
            zero_figures(&p, &c, world, &fig_state, &fig_shard);
            ok &= fig_state == state_max && fig_shard == shard_max;
            char what[160];
            snprintf(what, sizeof(what), "%s head, %d ranks: blocks tile the array, every element owned once, state packed",
                     tied ? "tied" : "untied", world);
            test_check(&g_report, ok, what);
        }
        ZeroLayout z;
        zero_layout_init(&z, &p, &c, 2, 1);
        size_t off, size;
        zero_block(&p, &c, zero_block_layer(1), &off, &size);
        int ok = off == p.layers_begin + p.layer_size && size == p.layer_size;
        zero_block(&p, &c, zero_block_final_norm(&c), &off, &size);
        ok &= off == p.final_norm && size == 32;
        zero_block(&p, &c, zero_block_lm_head(&c), &off, &size);
        ok &= off == p.lm_head && size == 3200;
        zero_layout_free(&z);
        test_check(&g_report, ok, tied ? "tied: the LM head block is the embedding" : "untied: layer, final-norm and head blocks");
    }
}

static void bad_rank(void *arg) {
    (void)arg;
    ModelConfig c = tiny(0);
    ParamLayout p;
    param_layout_init(&p, &c);
    ZeroLayout z;
    zero_layout_init(&z, &p, &c, 2, 2);
}

static void test_llama8b(void) {
    printf("\n== Llama-3-8B\n");
    ModelConfig c;
    mst_preset("llama3-8b", &c);
    ParamLayout p;
    param_layout_init(&p, &c);
    for (int world = 2; world <= 8; world *= 2) {
        size_t state_max, shard_max;
        zero_figures(&p, &c, world, &state_max, &shard_max);
        double ideal = (double)p.total / world;
        size_t slack = (size_t)zero_n_blocks(&c) * 2 * ZERO_ALIGN;
        char what[160];
        snprintf(what, sizeof(what), "%d GPUs: %zu state elements per GPU (ideal %.0f), largest part %zu (head / %d)",
                 world, state_max, ideal, shard_max, world);
        test_check(&g_report, state_max >= ideal && state_max <= ideal + slack &&
                                  shard_max >= (size_t)c.vocab_size * c.d_model / world && shard_max <= (size_t)c.vocab_size * c.d_model / world + ZERO_ALIGN,
                   what);
    }
    test_expect_exit(&g_report, "rank 2 of 2", bad_rank, NULL, 1, "zero layout: rank 2 of 2");
}

int main(void) {
    test_ranges();
    test_layout();
    test_llama8b();
    return test_report_finish(&g_report, "test_zero");
}

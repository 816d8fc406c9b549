// Data loader tests on small shards written to a temporary directory: sequential batches and
// epoch wrap-around against an independent expectation, BOS targets, shuffled epochs (a
// permutation, seed-determined, different per epoch), bit-exact resume from a saved position,
// packed fine-tuning rows (samples whole, truncation, padding, masked targets), the shipped
// data/default shards, and every error
// path of dataloader_init / dataloader_set_position in a forked child that must exit 1 with a
// clear message.
//
// Build and run (from the repository root):
//   gcc -O2 -Wall -Wextra -I. tests/test_dataloader.c -o build/test_dataloader && ./build/test_dataloader
#include "dataloader.h"
#include "tests/test_util.h"

static TestReport g_report = {0, 0};
static char g_dir[] = "/tmp/test_dataloader_XXXXXX";

static void check(const char *label, int ok, const char *detail) {
    printf("  %-52s %-4s %s\n", label, ok ? "ok" : "FAIL", detail);
    test_record(&g_report, ok);
}

// ---------------------------------------------------------------------------------------------
// Writing shards

typedef struct {
    int32_t magic, version, flags, vocab, bos, eos, pad;
    int64_t truncate_by;   // bytes cut off the end
    int64_t extra;         // junk bytes appended
    int32_t n_tokens_override;  // != 0: header n_tokens says this instead
} ShardSpec;

static ShardSpec spec_default(int has_mask) {
    ShardSpec s = {(int32_t)SHARD_MAGIC, SHARD_VERSION, has_mask ? SHARD_FLAG_MASK : 0, 5000, 1, 2, -1, 0, 0, 0};
    return s;
}

static char *path_in_dir(const char *name) {
    char *p = (char *)mallocCheck(strlen(g_dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", g_dir, name);
    return p;
}

static void write_shard(const char *name, const uint32_t *toks, int n, const uint8_t *mask, ShardSpec sp) {
    char *path = path_in_dir(name);
    int32_t h[SHARD_HEADER_INTS] = {0};
    h[0] = sp.magic;
    h[1] = sp.version;
    h[2] = sp.n_tokens_override != 0 ? sp.n_tokens_override : n;
    h[3] = sp.flags;
    h[4] = sp.vocab;
    h[5] = sp.bos;
    h[6] = sp.eos;
    h[7] = sp.pad;
    size_t size = sizeof(h) + (size_t)n * 4 + (mask ? (size_t)n : 0);
    unsigned char *buf = (unsigned char *)callocCheck(size + (size_t)sp.extra, 1);
    memcpy(buf, h, sizeof(h));
    memcpy(buf + sizeof(h), toks, (size_t)n * 4);
    if (mask) memcpy(buf + sizeof(h) + (size_t)n * 4, mask, (size_t)n);
    FILE *f = fopenCheck(path, "wb");
    fwriteCheck(buf, 1, size + (size_t)sp.extra - (size_t)sp.truncate_by, f, path);
    fcloseCheck(f, path);
    free(buf);
    free(path);
}

// Tokens base, base+1, ... (no BOS/EOS ids among them: those are 1 and 2).
static uint32_t *ramp(int n, uint32_t base) {
    uint32_t *t = (uint32_t *)mallocCheck((size_t)n * sizeof(uint32_t));
    for (int i = 0; i < n; i++) t[i] = base + (uint32_t)i;
    return t;
}

static void open_loader(DataLoader *dl, const char *pattern, int B, int S, int shuffle, uint64_t seed) {
    char *p = path_in_dir(pattern);
    dataloader_init(dl, p, B, S, 5000, shuffle, seed);
    free(p);
}

// ---------------------------------------------------------------------------------------------
// Sequential, BOS targets, shuffling, resume

// Shards seq_a (n=23, tokens 100..) and seq_b (n=17, tokens 300..), S=4: windows at 0,4,...:
// a has (23-1)/4 = 5 windows, b has (17-1)/4 = 4. Expected row k of the stream: window k mod 9.
static void test_sequential(void) {
    uint32_t *a = ramp(23, 100), *b = ramp(17, 300);
    write_shard("seq_a.bin", a, 23, NULL, spec_default(0));
    write_shard("seq_b.bin", b, 17, NULL, spec_default(0));
    DataLoader dl;
    open_loader(&dl, "seq_*.bin", 2, 4, 0, 0);
    int bad = 0, rows = 0;
    for (int step = 0; step < 10; step++) {  // 20 rows = 2 epochs + 2 rows
        dataloader_next_batch(&dl);
        for (int r = 0; r < 2; r++, rows++) {
            int w = rows % 9;
            uint32_t first = w < 5 ? 100 + 4 * (uint32_t)w : 300 + 4 * (uint32_t)(w - 5);
            for (int j = 0; j < 4; j++) {
                bad += dl.inputs[r * 4 + j] != (int)(first + (uint32_t)j);
                bad += dl.targets[r * 4 + j] != (int)(first + (uint32_t)j + 1);
            }
        }
    }
    char detail[128];
    snprintf(detail, sizeof(detail), "%d wrong values in 20 rows; epoch now %lld (expect 2)", bad, (long long)dl.epoch);
    check("sequential windows across 2 shards and 2 epochs", bad == 0 && dl.epoch == 2, detail);
    dataloader_free(&dl);
    free(a);
    free(b);
}

// A stream BOS x x EOS BOS x x x EOS ...: targets are -1 exactly where the next token is BOS.
static void test_bos_targets(void) {
    uint32_t t[17] = {1, 10, 11, 2, 1, 12, 13, 14, 2, 1, 15, 2, 1, 16, 17, 18, 2};
    write_shard("bos.bin", t, 17, NULL, spec_default(0));
    DataLoader dl;
    open_loader(&dl, "bos.bin", 1, 16, 0, 0);
    dataloader_next_batch(&dl);
    int bad = 0, n_ignored = 0;
    for (int j = 0; j < 16; j++) {
        int expect = t[j + 1] == 1 ? -1 : (int)t[j + 1];
        bad += dl.targets[j] != expect || dl.inputs[j] != (int)t[j];
        n_ignored += dl.targets[j] == -1;
    }
    char detail[128];
    snprintf(detail, sizeof(detail), "%d wrong, %d targets ignored (expect 3)", bad, n_ignored);
    check("target -1 where the next token is a document's BOS", bad == 0 && n_ignored == 3, detail);
    dataloader_free(&dl);
}

// Reads `rows` rows (B = 1) and records each row's first input token.
static void read_firsts(DataLoader *dl, int rows, int *firsts) {
    for (int i = 0; i < rows; i++) {
        dataloader_next_batch(dl);
        firsts[i] = dl->inputs[0];
    }
}

// One shuffled epoch over seq_a + seq_b (9 windows) is a permutation of the windows; same seed,
// same order; another seed or the next epoch, another order.
static void test_shuffle(void) {
    enum { W = 9 };
    DataLoader dl, dl2, dl3;
    open_loader(&dl, "seq_*.bin", 1, 4, 1, 1234);
    open_loader(&dl2, "seq_*.bin", 1, 4, 1, 1234);
    open_loader(&dl3, "seq_*.bin", 1, 4, 1, 99);
    int e0[W], e1[W], same[2 * W], other[W], seen[W] = {0};
    read_firsts(&dl, W, e0);
    read_firsts(&dl, W, e1);
    read_firsts(&dl2, 2 * W, same);
    read_firsts(&dl3, W, other);
    int perm_ok = 1, in_order = 1, repeat_ok = 1, differs_seed = 0, differs_epoch = 0;
    for (int i = 0; i < W; i++) {
        int w = e0[i] >= 300 ? 5 + (e0[i] - 300) / 4 : (e0[i] - 100) / 4;
        if (w < 0 || w >= W || seen[w]++) perm_ok = 0;
        in_order &= w == i;
        repeat_ok &= same[i] == e0[i] && same[W + i] == e1[i];
        differs_seed |= other[i] != e0[i];
        differs_epoch |= e1[i] != e0[i];
    }
    check("shuffled epoch is a permutation of all windows", perm_ok && !in_order, perm_ok ? "each window once, not in file order" : "windows missing or repeated");
    check("same seed gives the same batches (2 epochs)", repeat_ok, "");
    check("another seed / the next epoch give another order", differs_seed && differs_epoch, "");
    dataloader_free(&dl);
    dataloader_free(&dl2);
    dataloader_free(&dl3);
}

// Saves the position after `before` batches, reads `after` more; a fresh loader restored to the
// position must read the same `after` batches bit for bit.
static int resume_matches(const char *pattern, int B, int S, int shuffle, int before, int after) {
    DataLoader dl, dl2;
    open_loader(&dl, pattern, B, S, shuffle, 77);
    for (int i = 0; i < before; i++) dataloader_next_batch(&dl);
    DataPosition pos = dataloader_get_position(&dl);
    size_t n = (size_t)B * S;
    int *ref = (int *)mallocCheck((size_t)after * 2 * n * sizeof(int));
    for (int i = 0; i < after; i++) {
        dataloader_next_batch(&dl);
        memcpy(ref + 2 * n * i, dl.inputs, n * sizeof(int));
        memcpy(ref + 2 * n * i + n, dl.targets, n * sizeof(int));
    }
    open_loader(&dl2, pattern, B, S, shuffle, 77);
    dataloader_set_position(&dl2, pos);
    int same = 1;
    for (int i = 0; i < after; i++) {
        dataloader_next_batch(&dl2);
        same &= memcmp(ref + 2 * n * i, dl2.inputs, n * sizeof(int)) == 0;
        same &= memcmp(ref + 2 * n * i + n, dl2.targets, n * sizeof(int)) == 0;
    }
    free(ref);
    dataloader_free(&dl);
    dataloader_free(&dl2);
    return same;
}

static void test_resume(void) {
    check("resume, sequential, mid-shard", resume_matches("seq_*.bin", 2, 4, 0, 3, 12), "12 batches after 3");
    check("resume, shuffled, across epochs", resume_matches("seq_*.bin", 2, 4, 1, 7, 12), "12 batches after 7 (epoch 1)");
    check("resume, shuffled packed fine-tuning rows", resume_matches("pack*.bin", 2, 8, 1, 3, 9), "9 batches after 3");
}

// ---------------------------------------------------------------------------------------------
// Packing

// Samples (S = 8, rows of 9): A = BOS 20 21 | 22 EOS (5 tokens, trained on the last 2),
// B = BOS 30 | 31 EOS (4), C = BOS 40..50 with mask on 45.. (12 tokens: truncated to 9),
// D = BOS 60 | EOS (3). Packing: row 0 = A B (9 tokens), row 1 = C[0..9), row 2 = D + 6 pad.
static void test_packing(void) {
    uint32_t t[24] = {1, 20, 21, 22, 2, 1, 30, 31, 2, 1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 1, 60, 2};
    uint8_t m[24] = {0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1};
    ShardSpec sp = spec_default(1);
    sp.pad = 3;
    write_shard("pack.bin", t, 24, m, sp);
    DataLoader dl;
    open_loader(&dl, "pack.bin", 3, 8, 0, 0);
    dataloader_next_batch(&dl);
    const int in[3][8] = {{1, 20, 21, 22, 2, 1, 30, 31}, {1, 40, 41, 42, 43, 44, 45, 46}, {1, 60, 2, 3, 3, 3, 3, 3}};
    const int tg[3][8] = {{-1, -1, 22, 2, -1, -1, 31, 2}, {-1, -1, -1, -1, -1, 45, 46, 47}, {-1, 2, -1, -1, -1, -1, -1, -1}};
    int bad = 0;
    for (int r = 0; r < 3; r++) {
        for (int j = 0; j < 8; j++) bad += dl.inputs[r * 8 + j] != in[r][j] || dl.targets[r * 8 + j] != tg[r][j];
    }
    char detail[128];
    snprintf(detail, sizeof(detail), "%d wrong of 48; %lld rows", bad, (long long)dl.n_rows);
    check("packed rows: whole samples, truncation, padding, mask", bad == 0 && dl.n_rows == 3, detail);
    dataloader_next_batch(&dl);  // wraps: epoch 1 starts with row 0 again
    int wrap_ok = dl.epoch == 1 && memcmp(dl.inputs, in, sizeof(in)) == 0;
    check("packed rows wrap to the next epoch", wrap_ok, "");
    dataloader_free(&dl);
    uint32_t t2[10] = {1, 70, 71, 2, 1, 72, 2, 1, 73, 2};
    uint8_t m2[10] = {0, 1, 1, 1, 0, 1, 1, 0, 1, 1};
    write_shard("pack2.bin", t2, 10, m2, sp);
}

// The shipped corpus (data/default, vocab 2048) validates and yields batches that start at its
// first window: BOS (id 0) of Genesis 1.
static void test_shipped_corpus(void) {
    DataLoader train, val;
    dataloader_init(&train, "data/default/train_*.bin", 4, 64, 2048, 0, 0);
    dataloader_init(&val, "data/default/val.bin", 4, 64, 2048, 0, 0);
    dataloader_next_batch(&train);
    int ok = train.n_shards == 2 && train.bos_id == 0 && train.eos_id == 1 && train.inputs[0] == 0 && train.targets[0] >= 2;
    char detail[160];
    snprintf(detail, sizeof(detail), "train %d shards, %lld tokens; val %lld tokens", train.n_shards,
             (long long)train.total_tokens, (long long)val.total_tokens);
    check("shipped data/default shards validate and load", ok, detail);
    dataloader_free(&train);
    dataloader_free(&val);
}

// ---------------------------------------------------------------------------------------------
// Error paths, each in a forked child

typedef struct {
    const char *pattern;
    int S;
    DataPosition pos;  // used when set_position is tested (seq_len != 0)
} InitArgs;

static void run_init(void *arg) {
    const InitArgs *a = (InitArgs *)arg;
    DataLoader dl;
    open_loader(&dl, a->pattern, 1, a->S, 0, 0);
    if (a->pos.seq_len != 0) dataloader_set_position(&dl, a->pos);
}


static void expect_init_failure(const char *label, const char *name, int S, const char *phrase) {
    InitArgs a = {name, S, {0, 0, 0, 0, 0}};
    test_expect_exit(&g_report, label, run_init, &a, 1, phrase);
}

static void test_errors(void) {
    uint32_t *good = ramp(40, 100);
    uint8_t mask[40] = {0};
    ShardSpec sp;
    sp = spec_default(0); sp.magic = 0x11223344;    write_shard("e_magic.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.version = 9;           write_shard("e_version.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.truncate_by = 10;      write_shard("e_trunc.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.truncate_by = 200;     write_shard("e_trunchdr.bin", good, 0, NULL, sp);
    sp = spec_default(0); sp.extra = 5;             write_shard("e_extra.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.flags = 6;             write_shard("e_flags.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.vocab = 6000;          write_shard("e_vocab.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.bos = 7000;            write_shard("e_special.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.n_tokens_override = -3; write_shard("e_count.bin", good, 40, NULL, sp);
    sp = spec_default(1);                           write_shard("e_nomaskbytes.bin", good, 40, NULL, sp);
    good[17] = 5000;
    sp = spec_default(0);                           write_shard("e_token.bin", good, 40, NULL, sp);
    good[17] = 117;
    mask[33] = 2;
    sp = spec_default(1);                           write_shard("e_mask.bin", good, 40, mask, sp);
    mask[33] = 0;
    sp = spec_default(1); sp.bos = -1; sp.eos = -1; write_shard("e_nodelim.bin", good, 40, mask, sp);
    sp = spec_default(0);                           write_shard("e_disagree_a.bin", good, 40, NULL, sp);
    sp = spec_default(0); sp.eos = 3;               write_shard("e_disagree_b.bin", good, 40, NULL, sp);
    sp = spec_default(0);                           write_shard("e_short.bin", good, 8, NULL, sp);
    printf("\nerror paths (forked child must exit 1 with the phrase)\n");
    expect_init_failure("no files match", "nothing_*.bin", 4, "no files match");
    expect_init_failure("bad magic", "e_magic.bin", 4, "e_magic.bin: not a token shard");
    expect_init_failure("bad version", "e_version.bin", 4, "unsupported shard version 9");
    expect_init_failure("truncated tokens", "e_trunc.bin", 4, "e_trunc.bin: truncated shard");
    expect_init_failure("truncated header", "e_trunchdr.bin", 4, "shorter than the 1024-byte header");
    expect_init_failure("trailing bytes", "e_extra.bin", 4, "5 unexpected bytes");
    expect_init_failure("unknown flags", "e_flags.bin", 4, "unknown shard flags 0x6");
    expect_init_failure("shard vocab > model vocab", "e_vocab.bin", 4, "made for vocab_size 6000");
    expect_init_failure("special id out of range", "e_special.bin", 4, "special id 7000");
    expect_init_failure("negative token count", "e_count.bin", 4, "shard has -3 tokens");
    expect_init_failure("mask flag without mask bytes", "e_nomaskbytes.bin", 4, "with a loss mask");
    expect_init_failure("token id >= vocab_size", "e_token.bin", 4, "e_token.bin: token at position 17 is 5000, not below vocab_size 5000");
    expect_init_failure("mask byte not 0/1", "e_mask.bin", 4, "loss-mask byte at position 33 is 2");
    expect_init_failure("mask without bos/eos", "e_nodelim.bin", 4, "needs a bos_id or eos_id");
    expect_init_failure("shards disagree on ids", "e_disagree_*.bin", 4, "differ from");
    expect_init_failure("too short for S + 1", "e_short.bin", 8, "has the 9 tokens one sequence needs");
    InitArgs other_s = {"seq_*.bin", 4, {0, 0, 0, 8, 2}};
    test_expect_exit(&g_report, "position with another S", run_init, (void *)&other_s, 1, "sequence length 8, this run uses 4");
    InitArgs other_n = {"seq_*.bin", 4, {0, 0, 0, 4, 3}};
    test_expect_exit(&g_report, "position with other shards", run_init, (void *)&other_n, 1, "for 3 shards, 2 match now");
    InitArgs beyond = {"seq_*.bin", 4, {0, 0, 99, 4, 2}};
    test_expect_exit(&g_report, "position row out of range", run_init, (void *)&beyond, 1, "row 99 is beyond");
    free(good);
}

static int remove_entry(const char *name) {
    char *p = path_in_dir(name);
    int rc = unlink(p);
    free(p);
    return rc;
}

int main(void) {
    if (mkdtemp(g_dir) == NULL) die("mkdtemp failed");
    printf("data loader tests in %s\n", g_dir);
    test_sequential();
    test_bos_targets();
    test_shuffle();
    test_packing();
    test_resume();
    test_shipped_corpus();
    test_errors();
    const char *files[] = {"seq_a.bin", "seq_b.bin", "bos.bin", "pack.bin", "pack2.bin", "e_magic.bin", "e_version.bin",
                           "e_trunc.bin", "e_trunchdr.bin", "e_extra.bin", "e_flags.bin", "e_vocab.bin", "e_special.bin",
                           "e_count.bin", "e_nomaskbytes.bin", "e_token.bin", "e_mask.bin", "e_nodelim.bin",
                           "e_disagree_a.bin", "e_disagree_b.bin", "e_short.bin"};
    for (size_t i = 0; i < sizeof(files) / sizeof(files[0]); i++) remove_entry(files[i]);
    rmdir(g_dir);
    return test_report_finish(&g_report, "test_dataloader");
}

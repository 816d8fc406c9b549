// The host-side logic of a multi-GPU run for N = 1, 2, 4 and 8 GPUs, so that nothing silently
// assumes two: for each N, forked processes meet through the file rendezvous and a rank with another
// configuration is named; the global batch splits into N parts that put back together are the batch
// (data and sequence parallel); every ZeRO block is owned exactly once, and optimizer state written
// by the N ranks at their state offsets reassembles into the whole-model blob; every attention head
// is held by the right ranks (kv heads replicated when fewer than N) and the pack / unpack twins
// round-trip; the planner shards the optimizer state by N, keeps two layer-gradient buffers and,
// sequence parallel, plans the whole-sequence RoPE table.
// Build: gcc -O2 -Wall -Wextra -fopenmp -I. tests/test_gpu_counts.c -o build/test_gpu_counts -lm
#include <sys/wait.h>
#include "dist.h"
#include "mst.h"
#include "tests/test_util.h"
#include "ulysses.h"
#include "zero.h"

static TestReport g_report = {0, 0};
static const int COUNTS[] = {1, 2, 4, 8};
#define N_COUNTS ((int)(sizeof(COUNTS) / sizeof(COUNTS[0])))

static void checkf(int ok, const char *fmt, int n) {
    char what[256];
    snprintf(what, sizeof(what), fmt, n);
    test_check(&g_report, ok, what);
}

// ---- rendezvous and configuration agreement ----

// Child: rank `rank` of `world` meets the others in dir and writes to fd whether it got rank 0's
// blob and every peer; then it stays alive until `hold` reads end of file, as a real rank stays in
// NCCL's init (a rank whose process is gone counts as dead to the others).
static pid_t spawn_rank(const char *dir, int rank, int world, int fd, const int hold[2]) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid != 0) return pid;
    close(hold[1]);
    unsigned char blob[16];
    memset(blob, rank == 0 ? 0x5A : 0x00, sizeof(blob));
    DistPeer peers[8];
    char err[1024];
    int ok = dist_rendezvous(dir, rank, world, blob, sizeof(blob), peers, 20.0, err, sizeof(err));
    if (!ok) fprintf(stderr, "rank %d: %s\n", rank, err);
    unsigned char r = (unsigned char)(ok && blob[0] == 0x5A && blob[15] == 0x5A && peers[world - 1].pid > 0);
    ssize_t w = write(fd, &r, 1);
    char c;
    while (read(hold[0], &c, 1) > 0) continue;
    _exit(w == 1 ? 0 : 3);
}

static void test_rendezvous(int n, const char *base) {
    char dir[256];
    snprintf(dir, sizeof(dir), "%s/rdv%d", base, n);
    int fds[8][2], hold[2];
    pid_t pids[8];
    if (pipe(hold) != 0) die("pipe: %s", strerror(errno));
    for (int q = n - 1; q >= 0; q--) {  // rank 0 last: the others wait for its id file
        if (pipe(fds[q]) != 0) die("pipe: %s", strerror(errno));
        pids[q] = spawn_rank(dir, q, n, fds[q][1], hold);
        close(fds[q][1]);
    }
    close(hold[0]);
    int all = 1;
    for (int q = 0; q < n; q++) {
        unsigned char r = 0;
        all &= read(fds[q][0], &r, 1) == 1 && r == 1;
        close(fds[q][0]);
    }
    close(hold[1]);
    for (int q = 0; q < n; q++) waitpid(pids[q], NULL, 0);
    for (int q = 0; q < n; q++) dist_rendezvous_cleanup(dir, q);
    rmdir(dir);
    checkf(all, "%d rank(s) meet through the rendezvous files and all get rank 0's id", n);

    const char *items[2] = {"model", "batch shape"};
    uint64_t h[16];
    for (int r = 0; r < n; r++) { h[2 * r] = 11; h[2 * r + 1] = 22; }
    char msg[1024];
    checkf(dist_agreement_message(items, 2, h, n, msg, sizeof(msg)) == NULL, "%d rank(s) with one configuration agree", n);
    if (n > 1) {
        h[2 * (n - 1) + 1] = 23;  // the last rank has another batch shape
        const char *m = dist_agreement_message(items, 2, h, n, msg, sizeof(msg));
        char want[64];
        snprintf(want, sizeof(want), "rank %d differs from rank 0 in: batch shape", n - 1);
        checkf(m != NULL && strstr(m, want) != NULL && strstr(m, "in: model") == NULL, "%d ranks: the last rank's other batch shape is named", n);
    }
}

// ---- the global batch in N parts ----

static void test_batch(int n) {
    enum { B = 8, S = 64 };
    int global[B * S], rebuilt[B * S], part[B * S];
    for (int i = 0; i < B * S; i++) global[i] = 7 * i + 1;
    for (int sp = 0; sp < 2; sp++) {
        int Bl, Sl;
        char err[256];
        int ok = dist_local_shape(B, S, n, sp, &Bl, &Sl, err, sizeof(err)) && Bl * Sl * n == B * S && (sp ? Bl == B : Sl == S);
        memset(rebuilt, 0, sizeof(rebuilt));
        for (int r = 0; r < n && ok; r++) {
            dist_slice_batch(part, global, B, S, n, r, sp);
            for (int b = 0; b < Bl; b++)
                for (int s = 0; s < Sl; s++) rebuilt[(sp ? b : r * Bl + b) * S + (sp ? r * Sl + s : s)] = part[b * Sl + s];
        }
        checkf(ok && memcmp(rebuilt, global, sizeof(global)) == 0,
               sp ? "sequence parallel over %d: the parts put back together are the batch" : "data parallel over %d: the parts put back together are the batch", n);
    }
    int Bl, Sl;
    char err[256];
    checkf(n == 1 || !dist_local_shape(n - 1, S, n, 0, &Bl, &Sl, err, sizeof(err)), "data parallel over %d refuses a batch it cannot split", n);
}

// ---- ZeRO parts and the optimizer-state blob ----

// The state value of flat element i (what a rank writes for its part, what the blob must hold).
static float state_value(size_t i) { return (float)(i % 100003) + 0.25f; }

static void test_zero(int n, const ModelConfig *c, const char *name) {
    ParamLayout p;
    param_layout_init(&p, c);
    // the blob only for the small models (Llama-3-8B's would take 32 GB): for it the parts must tile each block
    float *blob = p.total < ((size_t)1 << 24) ? (float *)mallocCheck(p.total * sizeof(float)) : NULL;
    if (blob) for (size_t i = 0; i < p.total; i++) blob[i] = -1.0f;
    size_t state_max, shard_max;
    zero_figures(&p, c, n, &state_max, &shard_max);
    int covered = 1, fits = 1;
    size_t owned = 0;
    for (int r = 0; r < n; r++) {
        ZeroLayout z;
        zero_layout_init(&z, &p, c, n, r);
        fits &= z.state_elems <= state_max;
        for (int b = 0; b < z.n_blocks; b++) {
            size_t prev_lo, prev_hi;  // rank r's part starts where rank r - 1's ends
            zero_range(z.size[b], n, r > 0 ? r - 1 : 0, &prev_lo, &prev_hi);
            covered &= z.lo[b] == z.offset[b] + (r > 0 ? prev_hi : 0) && (r < n - 1 || z.hi[b] == z.offset[b] + z.size[b]);
            fits &= z.hi[b] - z.lo[b] <= shard_max && z.state[b] + (z.hi[b] - z.lo[b]) <= z.state_elems;
            owned += z.hi[b] - z.lo[b];
        }
        if (blob) {
            float *state = (float *)callocCheck(z.state_elems > 0 ? z.state_elems : 1, sizeof(float));
            for (int b = 0; b < z.n_blocks; b++)  // rank r writes its part, as AdamW on the side stream does
                for (size_t i = z.lo[b]; i < z.hi[b]; i++) state[z.state[b] + (i - z.lo[b])] = state_value(i);
            for (int b = 0; b < z.n_blocks; b++) {  // and sends it to the blob (gpu_dist.cu's gathering)
                size_t lo, hi;
                zero_range(z.size[b], n, r, &lo, &hi);
                for (size_t i = lo; i < hi; i++) blob[z.offset[b] + i] = state[z.state[b] + (i - lo)];
            }
            free(state);
        }
        zero_layout_free(&z);
    }
    size_t wrong = 0;
    for (size_t i = 0; blob && i < p.total; i++) wrong += blob[i] != state_value(i);
    char what[256];
    snprintf(what, sizeof(what), "%s over %d: every element owned once (%zu of %zu), parts inside the planned arrays, %s (%zu wrong)",
             name, n, owned, p.total, blob ? "blob reassembled" : "parts tile each block", wrong);
    test_check(&g_report, covered && fits && owned == p.total && wrong == 0, what);
    snprintf(what, sizeof(what), "%s over %d: one rank's state %zu elements <= total / N + one aligned unit per block", name, n, state_max);
    test_check(&g_report, state_max <= p.total / (size_t)n + (size_t)zero_n_blocks(c) * ZERO_ALIGN, what);
    free(blob);
}

// ---- Ulysses heads ----

static void test_heads(int n, int Hq, int Hkv) {
    UlyssesHeads u;
    char buf[256], what[256];
    const char *err = ulysses_heads_init(&u, n, Hq, Hkv, 4, buf, sizeof(buf));
    if (Hq % n != 0) {
        snprintf(what, sizeof(what), "%d heads over %d GPUs refused with a reason", Hq, n);
        test_check(&g_report, err != NULL && strstr(err, "split evenly") != NULL, what);
        return;
    }
    int held[64] = {0}, ok = err == NULL;
    for (int r = 0; r < n && ok; r++)
        for (int j = 0; j < ulysses_local_heads(&u, 1); j++) {
            int g = ulysses_global_head(&u, r, j), p0, jj;
            int k = ulysses_holders(&u, g, &p0, &jj);
            held[g]++;
            ok &= r >= p0 && r < p0 + k && jj == j;
        }
    for (int g = 0; g < Hq + 2 * Hkv && ok; g++) ok &= held[g] == (g < Hq ? 1 : u.kv_rep);
    int rows = 3, H = ulysses_full_heads(&u, 1), Hl = ulysses_local_heads(&u, 1);
    size_t full = (size_t)rows * H * 4, chunks = (size_t)n * rows * Hl * 4;
    float *x = (float *)mallocCheck(full * sizeof(float)), *y = (float *)mallocCheck(full * sizeof(float));
    float *send = (float *)mallocCheck(chunks * sizeof(float));
    for (size_t i = 0; i < full; i++) x[i] = (float)i;
    ulysses_pack_cpu(send, x, rows, &u, 1);
    memset(y, 0, full * sizeof(float));
    ulysses_unpack_cpu(y, send, rows, &u, 1);  // replicated kv heads come back as the sum of their replicas
    for (size_t i = 0; i < full; i++) ok &= y[i] == x[i] * ((int)(i / 4 % (size_t)H) < Hq ? 1.0f : (float)u.kv_rep);
    free(x);
    free(y);
    free(send);
    snprintf(what, sizeof(what), "Hq %d Hkv %d over %d: each q head on one rank, each kv head on %d, pack/unpack round trip (kv replicas summed)", Hq, Hkv, n,
             err ? 0 : u.kv_rep);
    test_check(&g_report, ok, what);
}

// ---- planner ----

static MemoryPlan plan_for(const ModelConfig *c, int n, int sp, int S_local) {
    MstSettings s;
    memset(&s, 0, sizeof(s));
    s.B = 1; s.S = S_local; s.mst_chunks = 4; s.vocab_chunk = 16032; s.recompute = 1; s.grad_accum_steps = 1; s.moment_bytes = 2;
    s.ranks = n; s.seq_parallel = sp && n > 1;
    MstKernelFigures f;
    mst_kernel_figures_estimate(c, s.B, s.S, &f);
    MemoryPlan p;
    mst_plan_build(&p, c, &s, &f);
    return p;
}

static void test_planner(int n, const ModelConfig *c) {
    ParamLayout lay;
    param_layout_init(&lay, c);
    for (int sp = 0; sp < 2; sp++) {
        int S_local = 8192;
        MemoryPlan p = plan_for(c, n, sp, S_local);
        const PlanEntry *m = mst_plan_find(&p, "adam_m"), *lg = mst_plan_find(&p, "layer_grads");
        const PlanEntry *rope = mst_plan_find(&p, "rope_cos_sin"), *gs = mst_plan_find(&p, "grad_shard");
        const PlanEntry *a2a = mst_plan_find(&p, "a2a_send");
        size_t full_seq = (size_t)S_local * (sp ? n : 1);
        int ok = m && lg && rope && m->bytes <= mst_align((lay.total / n + (size_t)zero_n_blocks(c) * ZERO_ALIGN) * 2) &&
                 lg->count == (n > 1 ? 2 : 1) && rope->bytes == mst_align(full_seq * c->head_dim * 4) && (gs != NULL) == (n > 1) &&
                 (a2a != NULL) == (sp && n > 1);
        char what[256];
        snprintf(what, sizeof(what), "Llama-3-8B %s over %d: moments 1/%d (%.2f GiB), %d layer-gradient buffer(s), RoPE for %zu positions",
                 sp ? "sequence parallel" : "data parallel", n, n, m ? m->bytes / 1073741824.0 : 0.0, lg ? lg->count : 0, full_seq);
        test_check(&g_report, ok, what);
    }
}

int main(void) {
    char base[] = "/tmp/test_gpu_counts_XXXXXX";
    if (mkdtemp(base) == NULL) die("mkdtemp: %s", strerror(errno));
    ModelConfig tied, untied, llama;
    preset_base(&untied, FAMILY_LLAMA, 100, 32, 3, 8, 2, 4, 64, 128, 1e-5f, 10000.0f);
    tied = untied;
    tied.tied_embeddings = 1;
    mst_preset("llama3-8b", &llama);
    for (int k = 0; k < N_COUNTS; k++) {
        int n = COUNTS[k];
        printf("\n== %d GPU%s\n", n, n > 1 ? "s" : "");
        test_rendezvous(n, base);
        test_batch(n);
        test_zero(n, &untied, "tiny untied");
        test_zero(n, &tied, "tiny tied");
        test_zero(n, &llama, "Llama-3-8B");
        test_heads(n, 32, 8);
        test_heads(n, 8, 2);
        test_heads(n, 4, 4);
        test_planner(n, &llama);
    }
    rmdir(base);
    return test_report_finish(&g_report, "test_gpu_counts");
}

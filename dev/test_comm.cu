// Checks comm.cu.
//
// One process (`build/test_comm`, part of `make test` on a GPU): the Ulysses pack / unpack kernels
// against their CPU twins (ulysses.h), bit for bit, for several rank and head counts (replicated kv
// heads included), on random bf16 inputs with every output element poisoned (NaN) first.
//
// Several processes (`mpirun -np N build/test_comm`, or RANK / WORLD_SIZE / LOCAL_RANK set by hand
// with --dist-id ID): every collective the trainer uses against values known on every rank, exact
// (small dyadic numbers: sums of them are exact in fp32 and bf16): host sums, the ZeRO part sums and
// weight exchange on a block that does not split evenly, gathering to rank 0, the Ulysses
// all-to-alls both ways, and the configuration check. Failure modes (dev/multi_gpu_check.sh runs them):
//   --disagree     rank 1 hashes its configuration differently: every rank must stop, naming rank 1
//   --die-rank R   rank R exits right after the checks; the others, waiting in a sum, must be stopped
//                  by their watchdog naming rank R
//   --hang-rank R  rank R sleeps instead of joining a sum; the others must time out (--dist-timeout)
// Options: --dist-dir DIR, --dist-id ID, --dist-timeout SECONDS (default 60).
// Exit status 0: every check passed (or no GPU: it says so); 1: a check failed or a rank stopped.
#include <math.h>
#include "comm.h"
#include "tests/test_util.h"
#include "zero.h"

static uint16_t *to_device_bits(const uint16_t *h, size_t n) {
    uint16_t *d;
    cudaCheck(cudaMalloc(&d, n * sizeof(uint16_t)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    return d;
}

static uint16_t *poisoned_device(size_t n) {
    uint16_t *d;
    cudaCheck(cudaMalloc(&d, n * sizeof(uint16_t)));
    cudaCheck(cudaMemset(d, 0xFF, n * sizeof(uint16_t)));  // bf16 0xFFFF is a NaN
    return d;
}

static uint64_t g_rng = 0x243F6A8885A308D3ULL;

static uint16_t rand_bf16(void) {
    g_rng = g_rng * 6364136223846793005ULL + 1442695040888963407ULL;
    return float_to_bf16_bits((float)((int)(g_rng >> 40) % 2001 - 1000) / 317.0f);
}

// Counts elements where got and want differ in their bits.
static size_t count_diff(const uint16_t *got, const uint16_t *want, size_t n) {
    size_t bad = 0;
    for (size_t i = 0; i < n; i++) bad += got[i] != want[i];
    return bad;
}

// ---- one process: pack / unpack kernels ----

static void check_kernels(TestReport *t, int R, int Hq, int Hkv, int hd, int rows) {
    UlyssesHeads u;
    char buf[256];
    if (ulysses_heads_init(&u, R, Hq, Hkv, hd, buf, sizeof(buf))) die("%s", buf);
    for (int with_kv = 0; with_kv < 2; with_kv++) {
        size_t nx = (size_t)rows * ulysses_full_heads(&u, with_kv) * hd, ns = (size_t)R * rows * ulysses_local_heads(&u, with_kv) * hd;
        uint16_t *x = (uint16_t *)mallocCheck(nx * 2), *send = (uint16_t *)mallocCheck(ns * 2), *got = (uint16_t *)mallocCheck((nx > ns ? nx : ns) * 2);
        uint16_t *want = (uint16_t *)mallocCheck((nx > ns ? nx : ns) * 2);
        float *fx = (float *)mallocCheck(nx * 4), *fs = (float *)mallocCheck(ns * 4);
        for (size_t i = 0; i < nx; i++) { x[i] = rand_bf16(); fx[i] = bf16_bits_to_float(x[i]); }
        for (size_t i = 0; i < ns; i++) { send[i] = rand_bf16(); fs[i] = bf16_bits_to_float(send[i]); }
        // pack
        uint16_t *dx = to_device_bits(x, nx), *dout = poisoned_device(ns);
        ulysses_pack((bf16 *)dout, (const bf16 *)dx, rows, &u, with_kv, 0);
        cudaCheck(cudaMemcpy(got, dout, ns * 2, cudaMemcpyDeviceToHost));
        ulysses_pack_cpu(fs, fx, rows, &u, with_kv);
        for (size_t i = 0; i < ns; i++) want[i] = float_to_bf16_bits(fs[i]);
        size_t bad = count_diff(got, want, ns);
        char what[200];
        snprintf(what, sizeof(what), "pack   R=%d Hq=%d Hkv=%d hd=%d rows=%d %s: %zu of %zu differ", R, Hq, Hkv, hd, rows,
                 with_kv ? "qkv" : "att", bad, ns);
        test_check(t, bad == 0, what);
        cudaCheck(cudaFree(dx));
        cudaCheck(cudaFree(dout));
        // unpack (summing kv replicas in fp32, rounded to nearest)
        for (size_t i = 0; i < ns; i++) fs[i] = bf16_bits_to_float(send[i]);
        uint16_t *drecv = to_device_bits(send, ns), *dx2 = poisoned_device(nx);
        ulysses_unpack((bf16 *)dx2, (const bf16 *)drecv, rows, &u, with_kv, 0);
        cudaCheck(cudaMemcpy(got, dx2, nx * 2, cudaMemcpyDeviceToHost));
        ulysses_unpack_cpu(fx, fs, rows, &u, with_kv);
        for (size_t i = 0; i < nx; i++) want[i] = float_to_bf16_bits(fx[i]);
        bad = count_diff(got, want, nx);
        snprintf(what, sizeof(what), "unpack R=%d Hq=%d Hkv=%d hd=%d rows=%d %s (kv_rep %d): %zu of %zu differ", R, Hq, Hkv, hd, rows,
                 with_kv ? "qkv" : "att", u.kv_rep, bad, nx);
        test_check(t, bad == 0, what);
        cudaCheck(cudaFree(drecv));
        cudaCheck(cudaFree(dx2));
        free(x); free(send); free(got); free(want); free(fx); free(fs);
    }
}

// ---- several processes ----

// Exact test values: small multiples of 1/8, the same on every rank for the same (a, b, c).
static float value_of(long a, long b, long c) {
    uint64_t z = (uint64_t)a * 0x9E3779B97F4A7C15ull ^ (uint64_t)b * 0xBF58476D1CE4E5B9ull ^ (uint64_t)c * 0x94D049BB133111EBull;
    z ^= z >> 29;
    return (float)((long)(z % 127) - 63) / 8.0f;
}

static void check_host_sums(TestReport *t, Comm *c) {
    double v[2] = {(double)(c->rank + 1), 1.0};
    comm_sum_host(c, v, 2);
    int w = c->world;
    test_check(t, v[0] == w * (w + 1) / 2.0 && v[1] == w, "comm_sum_host: sum of rank + 1 and the rank count");
}

static void check_reduce_parts(TestReport *t, Comm *c) {
    size_t n = 100003;  // not a multiple of ZERO_ALIGN: the last part is short
    float *h = (float *)mallocCheck(n * sizeof(float)), *d, *out;
    for (size_t i = 0; i < n; i++) h[i] = (float)(i % 1000) + (float)c->rank;
    cudaCheck(cudaMalloc(&d, n * sizeof(float)));
    cudaCheck(cudaMalloc(&out, n * sizeof(float)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(out, 0xFF, n * sizeof(float)));
    comm_reduce_parts(c, out, d, n, c->stream);
    size_t lo, hi;
    zero_range(n, c->world, c->rank, &lo, &hi);
    comm_wait(c, c->stream, "test: reduce parts");
    cudaCheck(cudaMemcpy(h, out, (hi - lo) * sizeof(float), cudaMemcpyDeviceToHost));
    size_t bad = 0;
    int w = c->world;
    for (size_t i = lo; i < hi; i++) bad += h[i - lo] != (float)(w * (i % 1000)) + (float)(w * (w - 1) / 2);
    char what[160];
    snprintf(what, sizeof(what), "comm_reduce_parts: this rank's part [%zu, %zu) of %zu is the sum (%zu differ)", lo, hi, n, bad);
    test_check(t, bad == 0, what);
    cudaCheck(cudaFree(d));
    cudaCheck(cudaFree(out));
    free(h);
}

static void check_gather_parts(TestReport *t, Comm *c) {
    size_t n = 70001;
    uint16_t *h = (uint16_t *)mallocCheck(n * 2), *want = (uint16_t *)mallocCheck(n * 2);
    for (int q = 0; q < c->world; q++) {
        size_t lo, hi;
        zero_range(n, c->world, q, &lo, &hi);
        for (size_t i = lo; i < hi; i++) {
            want[i] = float_to_bf16_bits(value_of(q, (long)i, 7));
            h[i] = q == c->rank ? want[i] : 0xFFFF;  // other ranks' parts: NaN until they arrive
        }
    }
    uint16_t *d = to_device_bits(h, n);
    comm_gather_parts(c, (bf16 *)d, n, c->stream);
    comm_wait(c, c->stream, "test: gather parts");
    cudaCheck(cudaMemcpy(h, d, n * 2, cudaMemcpyDeviceToHost));
    size_t bad = count_diff(h, want, n);
    char what[160];
    snprintf(what, sizeof(what), "comm_gather_parts: every rank's part of %zu bf16 weights everywhere (%zu differ)", n, bad);
    test_check(t, bad == 0, what);
    cudaCheck(cudaFree(d));
    free(h);
    free(want);
}

static void check_send_to_root(TestReport *t, Comm *c) {
    size_t bytes = 1000;
    unsigned char *h = (unsigned char *)mallocCheck(bytes);
    void *src, *dst;
    cudaCheck(cudaMalloc(&src, bytes));
    cudaCheck(cudaMalloc(&dst, bytes));
    for (size_t i = 0; i < bytes; i++) h[i] = (unsigned char)(c->rank * 31 + i);
    cudaCheck(cudaMemcpy(src, h, bytes, cudaMemcpyHostToDevice));
    size_t bad = 0;
    for (int q = 0; q < c->world; q++) {
        cudaCheck(cudaMemset(dst, 0, bytes));
        comm_send_to_root(c, dst, src, bytes, q, c->stream);
        comm_wait(c, c->stream, "test: send to root");
        if (c->rank != 0) continue;
        cudaCheck(cudaMemcpy(h, dst, bytes, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < bytes; i++) bad += h[i] != (unsigned char)(q * 31 + i);
    }
    test_check(t, bad == 0, c->rank == 0 ? "comm_send_to_root: rank 0 got every rank's bytes" : "comm_send_to_root: sent to rank 0");
    cudaCheck(cudaFree(src));
    cudaCheck(cudaFree(dst));
    free(h);
}

// x (B, S, H hd) of the whole sequence is value_of(b, s, column) on every rank; this rank's part goes
// to the head layout and back.
static void check_all_to_all(TestReport *t, Comm *c, int Hq, int Hkv, int hd) {
    UlyssesHeads u;
    char buf[256];
    if (ulysses_heads_init(&u, c->world, Hq, Hkv, hd, buf, sizeof(buf))) {
        printf("  (skipping Hq=%d Hkv=%d over %d ranks: %s)\n", Hq, Hkv, c->world, buf);
        return;
    }
    int B = 2, Sl = 5, S = Sl * c->world, H = ulysses_full_heads(&u, 1), Hl = ulysses_local_heads(&u, 1);
    size_t nx = (size_t)B * Sl * H * hd, nh = (size_t)B * S * Hl * hd;
    uint16_t *x = (uint16_t *)mallocCheck(nx * 2), *heads = (uint16_t *)mallocCheck(nh * 2), *got = (uint16_t *)mallocCheck((nx > nh ? nx : nh) * 2);
    uint16_t *x_back = (uint16_t *)mallocCheck(nx * 2);
    for (int b = 0; b < B; b++)
        for (int s = 0; s < Sl; s++)
            for (int g = 0; g < H; g++)
                for (int e = 0; e < hd; e++) {
                    size_t i = (((size_t)b * Sl + s) * H + g) * hd + e;
                    float v = value_of(b, c->rank * Sl + s, (long)g * hd + e);
                    x[i] = float_to_bf16_bits(v);
                    x_back[i] = float_to_bf16_bits(g < Hq ? v : v * u.kv_rep);  // replicated kv heads come back summed
                }
    for (int b = 0; b < B; b++)
        for (int s = 0; s < S; s++)
            for (int j = 0; j < Hl; j++)
                for (int e = 0; e < hd; e++)
                    heads[(((size_t)b * S + s) * Hl + j) * hd + e] = float_to_bf16_bits(value_of(b, s, (long)ulysses_global_head(&u, c->rank, j) * hd + e));
    uint16_t *dx = to_device_bits(x, nx), *dheads = poisoned_device(nh), *dsend = poisoned_device(nh), *dback = poisoned_device(nx);
    ulysses_to_heads(c, (bf16 *)dheads, (bf16 *)dsend, (const bf16 *)dx, B, Sl, &u, 1, c->stream);
    comm_wait(c, c->stream, "test: to heads");
    cudaCheck(cudaMemcpy(got, dheads, nh * 2, cudaMemcpyDeviceToHost));
    size_t bad = count_diff(got, heads, nh);
    char what[200];
    snprintf(what, sizeof(what), "ulysses_to_heads   Hq=%d Hkv=%d hd=%d B=%d S=%d: every token of this rank's heads (%zu differ)", Hq, Hkv, hd, B, S, bad);
    test_check(t, bad == 0, what);
    ulysses_from_heads(c, (bf16 *)dback, (bf16 *)dsend, (const bf16 *)dheads, B, Sl, &u, 1, c->stream);
    comm_wait(c, c->stream, "test: from heads");
    cudaCheck(cudaMemcpy(got, dback, nx * 2, cudaMemcpyDeviceToHost));
    bad = count_diff(got, x_back, nx);
    snprintf(what, sizeof(what), "ulysses_from_heads Hq=%d Hkv=%d (kv_rep %d): back, kv replicas summed (%zu differ)", Hq, Hkv, u.kv_rep, bad);
    test_check(t, bad == 0, what);
    cudaCheck(cudaFree(dx)); cudaCheck(cudaFree(dheads)); cudaCheck(cudaFree(dsend)); cudaCheck(cudaFree(dback));
    free(x); free(heads); free(got); free(x_back);
}

typedef struct {
    const char *dir, *id;
    double timeout;
    int disagree, die_rank, hang_rank;
} Args;

static Args parse_args(int argc, char **argv) {
    Args a = {NULL, NULL, 60.0, 0, -1, -1};
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i];
        if (strcmp(f, "--disagree") == 0) { a.disagree = 1; continue; }
        if (i + 1 >= argc) die("%s needs a value (or is unknown)", f);
        const char *v = argv[++i];
        if (strcmp(f, "--dist-dir") == 0) a.dir = v;
        else if (strcmp(f, "--dist-id") == 0) a.id = v;
        else if (strcmp(f, "--dist-timeout") == 0) a.timeout = atof(v);
        else if (strcmp(f, "--die-rank") == 0) a.die_rank = atoi(v);
        else if (strcmp(f, "--hang-rank") == 0) a.hang_rank = atoi(v);
        else die("unknown option %s", f);
    }
    if (!(a.timeout > 0.0)) die("--dist-timeout must be > 0");
    return a;
}

static int several_ranks(const DistEnv *e, const Args *a) {
    TestReport t = {0, 0};
    char dir[4096], err[512];
    if (!dist_rendezvous_dir(dir, sizeof(dir), e, a->dir, a->id, err, sizeof(err))) die("%s", err);
    Comm c;
    comm_init(&c, e, dir, a->timeout);
    printf("rank %d of %d on GPU %d: NCCL took %.1f MiB\n", c.rank, c.world, c.device, c.nccl_bytes / 1048576.0);
    const char *items[3] = {"model", "batch", "optimizer"};
    uint64_t hashes[3] = {11, 22, 33};
    if (a->disagree && c.rank == 1) hashes[1] = 99;
    comm_check_agreement(&c, items, hashes, 3);
    test_check(&t, !a->disagree, "comm_check_agreement: every rank agrees");
    check_host_sums(&t, &c);
    check_reduce_parts(&t, &c);
    check_gather_parts(&t, &c);
    check_send_to_root(&t, &c);
    check_all_to_all(&t, &c, 8, 2, 64);
    check_all_to_all(&t, &c, 8, 8, 128);
    check_all_to_all(&t, &c, 4, 1, 16);
    if (c.rank == a->die_rank) {
        printf("rank %d: exiting on purpose (--die-rank)\n", c.rank);
        fflush(stdout);
        _exit(3);
    }
    if (c.rank == a->hang_rank) {
        printf("rank %d: sleeping instead of joining (--hang-rank)\n", c.rank);
        fflush(stdout);
        sleep((unsigned)(3 * a->timeout + 5));
        _exit(3);
    }
    double v = 1.0;
    comm_sum_host(&c, &v, 1);  // with --die-rank / --hang-rank the others stop here
    comm_free(&c);
    char name[64];
    snprintf(name, sizeof(name), "test_comm rank %d", e->rank);
    return test_report_finish(&t, name);
}

int main(int argc, char **argv) {
    Args a = parse_args(argc, argv);
    DistEnv e;
    char err[512];
    if (!dist_env_read(&e, err, sizeof(err))) die("%s", err);
    if (cuda_device_count() == 0) {
        printf("no GPU: test_comm SKIPPED (its checks need a GPU)\n");
        return 0;
    }
    if (e.world > 1) return several_ranks(&e, &a);
    TestReport t = {0, 0};
    printf("== Ulysses pack / unpack kernels vs their CPU twins (bitwise)\n");
    const int cases[][5] = {{2, 4, 2, 64, 7}, {4, 4, 2, 128, 33}, {4, 8, 1, 8, 5}, {8, 32, 8, 128, 17}, {8, 8, 2, 64, 3}, {2, 16, 8, 256, 9}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
        check_kernels(&t, cases[i][0], cases[i][1], cases[i][2], cases[i][3], cases[i][4]);
    printf("(the collectives need several processes: mpirun -np 2 build/test_comm, or dev/multi_gpu_check.sh)\n");
    return test_report_finish(&t, "test_comm");
}

// Tests of dist.h without MPI or a GPU: the process group from Open MPI's and torchrun's variables
// (and every malformed case), the rendezvous directory name, the file rendezvous between forked
// processes (every rank gets rank 0's bytes and every peer's pid; a missing rank times out with a
// message naming it; files left by a dead process are ignored; foreign files are refused), the
// message naming the ranks whose configuration differs, and each rank's part of a global batch.
//
// Build: gcc -O2 -Wall -Wextra -I. tests/test_dist.c -o build/test_dist
#include "dist.h"
#include "tests/test_util.h"

static TestReport g_report = {0, 0};
static char g_base[] = "/tmp/test_dist_XXXXXX";

static const char *const ENV_NAMES[] = {
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
    "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"};

static void env_clear(void) {
    for (size_t i = 0; i < sizeof(ENV_NAMES) / sizeof(ENV_NAMES[0]); i++) unsetenv(ENV_NAMES[i]);
}

// Sets "NAME=VALUE" pairs, NULL-terminated.
static void env_set(const char *const *pairs) {
    env_clear();
    for (int i = 0; pairs[i] != NULL; i++) {
        char name[64];
        const char *eq = strchr(pairs[i], '=');
        snprintf(name, sizeof(name), "%.*s", (int)(eq - pairs[i]), pairs[i]);
        setenv(name, eq + 1, 1);
    }
}

// ---- the process group from the environment ----

static void test_env(void) {
    printf("\n== process group from the environment\n");
    DistEnv e;
    char err[512];
    env_clear();
    test_check(&g_report, dist_env_read(&e, err, sizeof(err)) && e.world == 1 && e.rank == 0 && strcmp(e.launcher, "none") == 0,
               "no launcher variables: one process");

    const char *ompi[] = {"OMPI_COMM_WORLD_RANK=3", "OMPI_COMM_WORLD_SIZE=4", "OMPI_COMM_WORLD_LOCAL_RANK=1",
                          "OMPI_COMM_WORLD_LOCAL_SIZE=2", "OMPI_MCA_orte_ess_jobid=12345678", "RANK=0", "WORLD_SIZE=9", NULL};
    env_set(ompi);
    int ok = dist_env_read(&e, err, sizeof(err));
    test_check(&g_report, ok && e.rank == 3 && e.world == 4 && e.local_rank == 1 && e.local_world == 2 &&
                              strcmp(e.launcher, "mpirun") == 0 && strcmp(e.job_id, "12345678") == 0,
               "Open MPI variables win over RANK/WORLD_SIZE; job id from orte_ess_jobid");

    const char *pmix[] = {"OMPI_COMM_WORLD_RANK=0", "OMPI_COMM_WORLD_SIZE=2", "OMPI_COMM_WORLD_LOCAL_RANK=0",
                          "PMIX_NAMESPACE=prterun-host/1@1", NULL};
    env_set(pmix);
    ok = dist_env_read(&e, err, sizeof(err));
    test_check(&g_report, ok && e.local_world == 2 && strcmp(e.job_id, "prterun-host_1_1") == 0,
               "job id from PMIX_NAMESPACE, made safe for a path; local size defaults to the world");

    const char *torch[] = {"RANK=1", "WORLD_SIZE=2", "LOCAL_RANK=1", "LOCAL_WORLD_SIZE=2", "TORCHELASTIC_RUN_ID=abc", NULL};
    env_set(torch);
    ok = dist_env_read(&e, err, sizeof(err));
    test_check(&g_report, ok && e.rank == 1 && e.world == 2 && e.local_rank == 1 && strcmp(e.launcher, "torchrun") == 0 &&
                              strcmp(e.job_id, "abc") == 0,
               "torchrun-style RANK / WORLD_SIZE / LOCAL_RANK");

    const char *single[] = {"RANK=0", "WORLD_SIZE=1", NULL};
    env_set(single);
    test_check(&g_report, dist_env_read(&e, err, sizeof(err)) && e.world == 1 && e.local_rank == 0,
               "WORLD_SIZE=1 without LOCAL_RANK is one process");

    struct { const char *pairs[5]; const char *phrase; } bad[] = {
        {{"OMPI_COMM_WORLD_SIZE=2", NULL}, "OMPI_COMM_WORLD_RANK is not"},
        {{"OMPI_COMM_WORLD_SIZE=2", "OMPI_COMM_WORLD_RANK=2", "OMPI_COMM_WORLD_LOCAL_RANK=0", NULL}, "not an integer in [0, 1]"},
        {{"WORLD_SIZE=two", "RANK=0", NULL}, "WORLD_SIZE='two'"},
        {{"WORLD_SIZE=0", "RANK=0", NULL}, "not an integer in [1,"},
        {{"WORLD_SIZE=4", "RANK=1", NULL}, "LOCAL_RANK is not"},
        {{"WORLD_SIZE=4", "RANK=1", "LOCAL_RANK=2", "LOCAL_WORLD_SIZE=2"}, "LOCAL_RANK='2'"},
        {{"WORLD_SIZE=4", "RANK=1", "LOCAL_RANK=0", "LOCAL_WORLD_SIZE=5"}, "LOCAL_WORLD_SIZE='5'"},
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        env_set(bad[i].pairs);
        err[0] = '\0';
        ok = dist_env_read(&e, err, sizeof(err));
        char what[200];
        snprintf(what, sizeof(what), "malformed environment %zu refused: \"%s\"", i, bad[i].phrase);
        test_check(&g_report, !ok && strstr(err, bad[i].phrase) != NULL, what);
        if (ok || strstr(err, bad[i].phrase) == NULL) printf("    got: %s\n", ok ? "(accepted)" : err);
    }
    env_clear();

    char dir[4096];
    DistEnv two = {0, 2, 0, 2, "torchrun", ""};
    test_check(&g_report, dist_rendezvous_dir(dir, sizeof(dir), &two, "/x/y", NULL, err, sizeof(err)) && strcmp(dir, "/x/y") == 0,
               "--dist-dir is used as given");
    char want[256];
    snprintf(want, sizeof(want), "/tmp/mst-train-%d-my_job", (int)getuid());
    test_check(&g_report, dist_rendezvous_dir(dir, sizeof(dir), &two, NULL, "my job", err, sizeof(err)) && strcmp(dir, want) == 0,
               "--dist-id names /tmp/mst-train-<uid>-<id>");
    test_check(&g_report, !dist_rendezvous_dir(dir, sizeof(dir), &two, NULL, NULL, err, sizeof(err)) && strstr(err, "--dist-id") != NULL,
               "no job id and no --dist-id/--dist-dir: a message asking for one");
}

// ---- rendezvous between forked processes ----

#define BLOB 128

typedef struct {
    int ok;
    unsigned char blob[BLOB];
    int peer_pids[8];
    char err[1024];
} RankResult;

// Runs dist_rendezvous as `rank` of `world` in a child after delay_ms; the result goes to fd.
// The child then stays alive until `hold` reads end of file (the parent closes it once every rank
// has reported), as a real rank stays alive in NCCL's init after the rendezvous.
static pid_t spawn_rank(const char *dir, int rank, int world, int delay_ms, double timeout_s, int fd, const int hold[2]) {
    fflush(NULL);
    pid_t pid = fork();
    if (pid != 0) return pid;
    close(hold[1]);
    usleep((useconds_t)delay_ms * 1000);
    RankResult r;
    memset(&r, 0, sizeof(r));
    for (int i = 0; i < BLOB; i++) r.blob[i] = (unsigned char)(rank == 0 ? (i * 7 + 3) : 0xEE);
    DistPeer peers[8];
    memset(peers, 0, sizeof(peers));
    r.ok = dist_rendezvous(dir, rank, world, r.blob, BLOB, peers, timeout_s, r.err, sizeof(r.err));
    for (int q = 0; q < world; q++) r.peer_pids[q] = peers[q].pid;
    ssize_t w = write(fd, &r, sizeof(r));
    char c;
    while (read(hold[0], &c, 1) > 0) continue;
    _exit(w == (ssize_t)sizeof(r) ? 0 : 3);
}

// Starts ranks (delays in ms, -1: not started), collects their results in rank order.
static void run_ranks(const char *dir, int world, const int *delay_ms, double timeout_s, RankResult *res, pid_t *pids) {
    int fds[8][2], hold[2];
    if (pipe(hold) != 0) { perror("pipe"); exit(2); }
    for (int q = 0; q < world; q++) {
        pids[q] = 0;
        memset(&res[q], 0, sizeof(res[q]));
        if (delay_ms[q] < 0) continue;
        if (pipe(fds[q]) != 0) { perror("pipe"); exit(2); }
        pids[q] = spawn_rank(dir, q, world, delay_ms[q], timeout_s, fds[q][1], hold);
        close(fds[q][1]);
    }
    close(hold[0]);
    for (int q = 0; q < world; q++) {
        if (delay_ms[q] < 0) continue;
        ssize_t got = read(fds[q][0], &res[q], sizeof(res[q]));
        if (got != (ssize_t)sizeof(res[q])) snprintf(res[q].err, sizeof(res[q].err), "child wrote %zd bytes", got);
        close(fds[q][0]);
    }
    close(hold[1]);
    for (int q = 0; q < world; q++)
        if (delay_ms[q] >= 0) waitpid(pids[q], NULL, 0);
}

static int blob_is_rank0s(const unsigned char *b) {
    for (int i = 0; i < BLOB; i++) if (b[i] != (unsigned char)(i * 7 + 3)) return 0;
    return 1;
}

static void make_dir(char *out, size_t len, const char *name) {
    snprintf(out, len, "%s/%s", g_base, name);
}

// A pid that belonged to a process that has exited and been reaped.
static int dead_pid(void) {
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    waitpid(pid, NULL, 0);
    return (int)pid;
}

// Removes whatever a test left in dir (peer files of ranks 0..7, the id file) and dir itself.
static void clean_dir(const char *dir) {
    for (int q = 0; q < 8; q++) dist_rendezvous_cleanup(dir, q);
    rmdir(dir);
}

static void write_text(const char *dir, const char *name, const void *bytes, size_t n) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopenCheck(path, "wb");
    fwriteCheck(bytes, 1, n, f, path);
    fcloseCheck(f, path);
}

static void test_rendezvous(void) {
    printf("\n== rendezvous through files (forked ranks)\n");
    char dir[4096];
    RankResult res[8];
    pid_t pids[8];

    make_dir(dir, sizeof(dir), "four");
    int delays[4] = {150, 0, 40, 90};  // rank 0 comes last but one: the others wait for its id
    run_ranks(dir, 4, delays, 10.0, res, pids);
    int all = 1;
    for (int q = 0; q < 4; q++) {
        int ok = res[q].ok && blob_is_rank0s(res[q].blob);
        for (int p = 0; p < 4; p++) ok &= res[q].peer_pids[p] == (int)pids[p];
        if (!ok) printf("    rank %d: ok %d, err '%s'\n", q, res[q].ok, res[q].err);
        all &= ok;
    }
    test_check(&g_report, all, "4 ranks: every rank gets rank 0's 128 bytes and every peer's pid");
    clean_dir(dir);
    struct stat st;
    test_check(&g_report, stat(dir, &st) != 0, "cleanup removes the files and the directory");

    make_dir(dir, sizeof(dir), "no_rank0");
    int no0[2] = {-1, 0};
    double t0 = dist_now();
    run_ranks(dir, 2, no0, 0.5, res, pids);
    double took = dist_now() - t0;
    int ok = !res[1].ok && strstr(res[1].err, "rank 1: timed out") && strstr(res[1].err, "rank(s) 0") &&
             strstr(res[1].err, "nccl.id") && strstr(res[1].err, "--dist-id");
    test_check(&g_report, ok && took < 5.0, "rank 0 never starts: rank 1 times out naming rank 0 and the id file");
    if (!ok) printf("    got: %s\n", res[1].err);
    clean_dir(dir);

    make_dir(dir, sizeof(dir), "no_rank2");
    int no2[3] = {0, 0, -1};
    run_ranks(dir, 3, no2, 0.5, res, pids);
    ok = !res[0].ok && strstr(res[0].err, "rank(s) 2") && strstr(res[0].err, "nccl.id") == NULL;
    test_check(&g_report, ok, "rank 2 never starts: rank 0 times out naming rank 2 only");
    if (!ok) printf("    got: %s\n", res[0].err);
    clean_dir(dir);

    // files of an earlier job whose processes are gone: ignored, the live job's replace them
    make_dir(dir, sizeof(dir), "stale");
    mkdir(dir, 0700);
    DistPeer me;
    dist_self(&me);
    DistIdHeader h;
    memset(&h, 0, sizeof(h));
    h.magic = DIST_ID_MAGIC;
    h.version = DIST_ID_VERSION;
    h.world = 2;
    h.pid = dead_pid();
    memcpy(h.host, me.host, sizeof(h.host));
    h.blob_len = BLOB;
    unsigned char stale[sizeof(DistIdHeader) + BLOB];
    memcpy(stale, &h, sizeof(h));
    memset(stale + sizeof(h), 0x55, BLOB);
    write_text(dir, "nccl.id", stale, sizeof(stale));
    char peer[128];
    int n = snprintf(peer, sizeof(peer), "mst-peer 1\n%d %s\n", dead_pid(), me.host);
    write_text(dir, "rank0.peer", peer, (size_t)n);
    int late0[2] = {300, 0};
    run_ranks(dir, 2, late0, 10.0, res, pids);
    ok = res[1].ok && blob_is_rank0s(res[1].blob) && res[1].peer_pids[0] == (int)pids[0];
    test_check(&g_report, ok, "a dead job's nccl.id and rank0.peer are ignored until rank 0 replaces them");
    if (!ok) printf("    rank 1: ok %d, err '%s'\n", res[1].ok, res[1].err);
    clean_dir(dir);

    make_dir(dir, sizeof(dir), "foreign");
    mkdir(dir, 0700);
    write_text(dir, "rank0.peer", "hello\n", 6);
    int one[2] = {-1, 0};
    run_ranks(dir, 2, one, 2.0, res, pids);
    ok = !res[1].ok && strstr(res[1].err, "rank0.peer is not a peer file");
    test_check(&g_report, ok, "a file that is not a peer file is refused by name");
    if (!ok) printf("    got: %s\n", res[1].err);
    clean_dir(dir);

    make_dir(dir, sizeof(dir), "other_world");
    mkdir(dir, 0700);
    mkdir(dir, 0700);
    h.world = 3;
    h.pid = (int)getpid();  // alive: this test process
    memcpy(stale, &h, sizeof(h));
    write_text(dir, "nccl.id", stale, sizeof(stale));
    run_ranks(dir, 2, one, 2.0, res, pids);
    ok = !res[1].ok && strstr(res[1].err, "is for 3 ranks") && strstr(res[1].err, "one of 2");
    test_check(&g_report, ok, "a live id file for another world size is refused");
    if (!ok) printf("    got: %s\n", res[1].err);
    clean_dir(dir);
}

static void test_pid_alive(void) {
    printf("\n== process liveness\n");
    test_check(&g_report, dist_pid_alive((int)getpid()), "this process is alive");
    test_check(&g_report, !dist_pid_alive(dead_pid()), "a reaped child is gone");
    pid_t z = fork();
    if (z == 0) _exit(0);
    usleep(100000);  // exited, not reaped: a zombie
    test_check(&g_report, !dist_pid_alive((int)z), "an exited, unreaped child (zombie) is gone");
    waitpid(z, NULL, 0);
    test_check(&g_report, !dist_pid_alive(0) && !dist_pid_alive(-5), "pid <= 0 is never alive");
}

// ---- configuration agreement ----

static void test_agreement(void) {
    printf("\n== configuration agreement message\n");
    const char *items[3] = {"model", "batch", "optimizer"};
    char buf[1024];
    uint64_t same[4 * 3];
    for (int r = 0; r < 4; r++) for (int k = 0; k < 3; k++) same[r * 3 + k] = 100 + k;
    test_check(&g_report, dist_agreement_message(items, 3, same, 4, buf, sizeof(buf)) == NULL, "every rank agrees: no message");
    uint64_t diff[4 * 3];
    memcpy(diff, same, sizeof(diff));
    diff[2 * 3 + 1] = 7;  // rank 2: batch
    diff[3 * 3 + 0] = 8;  // rank 3: model and optimizer
    diff[3 * 3 + 2] = 9;
    const char *m = dist_agreement_message(items, 3, diff, 4, buf, sizeof(buf));
    int ok = m != NULL && strstr(m, "rank 2 differs from rank 0 in: batch;") && strstr(m, "rank 3 differs from rank 0 in: model, optimizer") &&
             strstr(m, "rank 1") == NULL && strstr(m, "same command line");
    test_check(&g_report, ok, "names each disagreeing rank and what differs, not the agreeing ones");
    printf("    message: %s\n", m ? m : "(none)");
    uint64_t many[20 * 3];
    for (int r = 0; r < 20; r++) for (int k = 0; k < 3; k++) many[r * 3 + k] = r == 0 ? 1 : 2;
    m = dist_agreement_message(items, 3, many, 20, buf, sizeof(buf));
    test_check(&g_report, m != NULL && strstr(m, "and more ranks") && strstr(m, "rank 10") == NULL, "many disagreeing ranks: the first 8 and 'more'");
}

// ---- each rank's part of a global batch ----

static void test_batch_split(void) {
    printf("\n== each rank's part of a global batch\n");
    int B = 4, S = 12;
    int global[48], rebuilt[48], part[48];
    for (int i = 0; i < B * S; i++) global[i] = 1000 + i;
    char err[256];
    for (int sp = 0; sp < 2; sp++) {
        for (int world = 1; world <= 4; world *= 2) {
            int Bl, Sl;
            int ok = dist_local_shape(B, S, world, sp, &Bl, &Sl, err, sizeof(err));
            ok = ok && Bl * Sl * world == B * S && (sp ? Bl == B : Sl == S);
            memset(rebuilt, 0, sizeof(rebuilt));
            for (int r = 0; r < world && ok; r++) {
                dist_slice_batch(part, global, B, S, world, r, sp);
                for (int b = 0; b < Bl; b++)
                    for (int s = 0; s < Sl; s++) {
                        int gb = sp ? b : r * Bl + b, gs = sp ? r * Sl + s : s;
                        rebuilt[gb * S + gs] = part[b * Sl + s];
                    }
            }
            ok = ok && memcmp(rebuilt, global, sizeof(global)) == 0;
            char what[128];
            snprintf(what, sizeof(what), "%s over %d ranks: the parts put back together are the batch",
                     sp ? "sequence parallel" : "data parallel", world);
            test_check(&g_report, ok, what);
        }
    }
    int Bl, Sl;
    test_check(&g_report, !dist_local_shape(3, 12, 2, 0, &Bl, &Sl, err, sizeof(err)) && strstr(err, "--batch 3 does not split over 2"),
               "data parallel: batch 3 over 2 GPUs is refused");
    test_check(&g_report, !dist_local_shape(1, 10, 4, 1, &Bl, &Sl, err, sizeof(err)) && strstr(err, "--seq-len 10 does not split over 4"),
               "sequence parallel: S 10 over 4 GPUs is refused");
}

int main(void) {
    if (mkdtemp(g_base) == NULL) die("mkdtemp %s: %s", g_base, strerror(errno));
    test_env();
    test_rendezvous();
    test_pid_alive();
    test_agreement();
    test_batch_split();
    rmdir(g_base);
    return test_report_finish(&g_report, "test_dist");
}

// Several processes, one GPU each: the process group from the launcher's environment, the
// rendezvous through files that hands every rank rank 0's NCCL unique id (no MPI library is
// linked: `mpirun -np N` only starts the processes), the check that every rank runs the same
// configuration, and which part of a global batch each rank trains on. Plain host C (POSIX);
// the NCCL side is comm.h. tests/test_dist.c builds it with gcc.
//
// Environment (the first family that sets a world size wins):
//   Open MPI (mpirun):      OMPI_COMM_WORLD_RANK, _SIZE, _LOCAL_RANK, _LOCAL_SIZE; job id from
//                           OMPI_MCA_orte_ess_jobid (Open MPI 4), else PMIX_NAMESPACE
//   torchrun style:         RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE; job id TORCHELASTIC_RUN_ID
//   neither:                one process (world 1: no NCCL, no rendezvous)
//
// Rendezvous directory (every rank of a job uses the same one; default /tmp/mst-train-<uid>-<job id>):
//   rank<r>.peer   written by rank r: "mst-peer 1\n<pid> <host>\n"
//   nccl.id        written by rank 0: DIST_ID_MAGIC, version, world, pid, host[64], blob length, blob
// Every file is written to a temporary name and renamed, so a reader never sees half a file. A
// rank waits (polling, up to a timeout) until every peer file and the id file exist. A file left
// by an earlier job whose writer is gone (same host, pid not alive) is ignored until this job's
// rank replaces it; files of other hosts cannot be checked that way, so give each job its own
// directory (a launcher's job id does that). The files are removed once the NCCL communicator is up.
#ifndef DIST_H
#define DIST_H

#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include "utils.h"

#define DIST_ID_MAGIC 0x44495344u  // bytes 'D','S','I','D'
#define DIST_ID_VERSION 1
#define DIST_HOST_LEN 64
#define DIST_MAX_BLOB 4096
#define DIST_POLL_US 10000  // rendezvous poll interval

typedef struct {
    int rank, world;              // this process and the number of processes (1: a single-process run)
    int local_rank, local_world;  // among the processes of this host; the GPU is local_rank
    char launcher[16];            // "mpirun", "torchrun" or "none"
    char job_id[128];             // the launcher's job id, "" when it gives none
} DistEnv;

typedef struct {
    int pid;
    char host[DIST_HOST_LEN];
} DistPeer;

// ---- the process group from the environment ----

// Parses environment variable `name` as an integer in [lo, hi]. Returns 1 and sets *out, 0 when
// unset, -1 (with a message in err) when set but not such an integer.
static inline int dist_env_int(const char *name, int lo, int hi, int *out, char *err, size_t len) {
    const char *s = getenv(name);
    if (s == NULL || *s == '\0') return 0;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi) {
        snprintf(err, len, "environment: %s='%s' is not an integer in [%d, %d]", name, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 1;
}

// Keeps [A-Za-z0-9._-] of src (others become '_'), so a job id can name a directory.
static inline void dist_sanitize(char *dst, size_t len, const char *src) {
    size_t i = 0;
    for (; src[i] != '\0' && i + 1 < len; i++) {
        char ch = src[i];
        int ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '.' || ch == '-' || ch == '_';
        dst[i] = ok ? ch : '_';
    }
    dst[i] = '\0';
}

// Fills e from the launcher's variables (see the top). Returns 1, or 0 with a message in err
// (a variable that is malformed, missing next to its family's others, or out of range).
static inline int dist_env_read(DistEnv *e, char *err, size_t len) {
    static const char *const FAMILIES[2][7] = {
        {"mpirun", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
         "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"},
        {"torchrun", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID", NULL}};
    memset(e, 0, sizeof(*e));
    e->world = e->local_world = 1;
    snprintf(e->launcher, sizeof(e->launcher), "none");
    for (int f = 0; f < 2; f++) {
        const char *const *v = FAMILIES[f];
        int world, got = dist_env_int(v[1], 1, 1 << 20, &world, err, len);
        if (got < 0) return 0;
        if (got == 0) continue;
        int rank, local_rank = -1, local_world = world;
        got = dist_env_int(v[2], 0, world - 1, &rank, err, len);
        if (got < 0) return 0;
        if (got == 0) { snprintf(err, len, "environment: %s=%d is set but %s is not", v[1], world, v[2]); return 0; }
        if (dist_env_int(v[4], 1, world, &local_world, err, len) < 0) return 0;
        got = dist_env_int(v[3], 0, local_world - 1, &local_rank, err, len);
        if (got < 0) return 0;
        if (got == 0) {
            if (world > 1) { snprintf(err, len, "environment: %s=%d is set but %s is not (which GPU is this rank's?)", v[1], world, v[3]); return 0; }
            local_rank = 0;
        }
        e->world = world;
        e->rank = rank;
        e->local_rank = local_rank;
        e->local_world = local_world;
        snprintf(e->launcher, sizeof(e->launcher), "%s", v[0]);
        for (int k = 5; k < 7 && v[k] != NULL; k++) {
            const char *id = getenv(v[k]);
            if (id != NULL && *id != '\0') { dist_sanitize(e->job_id, sizeof(e->job_id), id); break; }
        }
        return 1;
    }
    return 1;
}

// The rendezvous directory: `dir` when given, else /tmp/mst-train-<uid>-<id> with id = `id` when
// given, else the launcher's job id. Returns 1, or 0 with a message when there is none to use.
static inline int dist_rendezvous_dir(char *out, size_t len, const DistEnv *e, const char *dir, const char *id,
                                      char *err, size_t errlen) {
    if (dir != NULL && *dir != '\0') {
        snprintf(out, len, "%s", dir);
        return 1;
    }
    char clean[128];
    if (id != NULL && *id != '\0') dist_sanitize(clean, sizeof(clean), id);
    else if (e->job_id[0] != '\0') snprintf(clean, sizeof(clean), "%s", e->job_id);
    else {
        snprintf(err, errlen, "%d processes (%s) but no job id to meet under: pass the same --dist-id ID (or --dist-dir DIR) to every rank",
                 e->world, e->launcher);
        return 0;
    }
    snprintf(out, len, "/tmp/mst-train-%d-%s", (int)getuid(), clean);
    return 1;
}

// ---- rendezvous files ----

static inline double dist_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

// 1 when process pid exists and has not exited (a zombie, exited but not yet reaped, counts as gone).
static inline int dist_pid_alive(int pid) {
    if (pid <= 0) return 0;
    if (kill(pid, 0) != 0 && errno != EPERM) return 0;
    char path[64], buf[256];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (f == NULL) return 1;  // no /proc: trust kill()
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *paren = strrchr(buf, ')');  // "pid (comm) S ...": the state follows the last ')'
    return !(paren != NULL && paren[1] == ' ' && (paren[2] == 'Z' || paren[2] == 'X'));
}

static inline void dist_self(DistPeer *p) {
    memset(p, 0, sizeof(*p));
    p->pid = (int)getpid();
    if (gethostname(p->host, sizeof(p->host) - 1) != 0) snprintf(p->host, sizeof(p->host), "unknown");
}

// 1 when the process that wrote a file is gone: same host and its pid is not alive.
static inline int dist_writer_gone(const DistPeer *writer) {
    DistPeer me;
    dist_self(&me);
    return strcmp(writer->host, me.host) == 0 && !dist_pid_alive(writer->pid);
}

// Writes bytes to dir/name through a temporary file and a rename. Returns 1, or 0 with a message.
static inline int dist_write_atomic(const char *dir, const char *name, const void *bytes, size_t n, char *err, size_t len) {
    char path[1024], tmp[1100];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    snprintf(tmp, sizeof(tmp), "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "wb");
    if (f == NULL) { snprintf(err, len, "rendezvous: cannot write %.900s: %s", tmp, strerror(errno)); return 0; }
    int ok = fwrite(bytes, 1, n, f) == n;
    ok = (fclose(f) == 0) && ok;
    if (!ok || rename(tmp, path) != 0) {
        snprintf(err, len, "rendezvous: cannot write %.900s: %s", path, strerror(errno));
        remove(tmp);
        return 0;
    }
    return 1;
}

// Reads at most cap bytes of dir/name. Returns the byte count, or -1 when the file does not exist.
static inline long dist_read_file(const char *dir, const char *name, void *buf, size_t cap) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (f == NULL) return -1;
    size_t n = fread(buf, 1, cap, f);
    fclose(f);
    return (long)n;
}

typedef struct {
    uint32_t magic, version;
    int32_t world, pid;
    char host[DIST_HOST_LEN];
    uint32_t blob_len, reserved;
} DistIdHeader;

// Peer file dir/rank<q>.peer -> p. Returns 1 when it is there and its writer is this job's (alive,
// or on another host), 0 when it is missing or left by a process that is gone, -1 (message in
// err) when it is not a peer file.
static inline int dist_read_peer(const char *dir, int q, DistPeer *p, char *err, size_t len) {
    char name[64], text[256];
    snprintf(name, sizeof(name), "rank%d.peer", q);
    long got = dist_read_file(dir, name, text, sizeof(text) - 1);
    if (got < 0) return 0;
    text[got] = '\0';
    int version;
    memset(p, 0, sizeof(*p));
    if (sscanf(text, "mst-peer %d\n%d %63s", &version, &p->pid, p->host) != 3 || version != 1 || p->pid <= 0) {
        snprintf(err, len, "rendezvous: %s/%s is not a peer file of this program", dir, name);
        return -1;
    }
    return !dist_writer_gone(p);
}

// Id file dir/nccl.id -> blob (blob_len bytes). Returns 1 when it is there and its writer is
// alive (or on another host), 0 when missing or stale, -1 (message in err) when it is not an id
// file or was written for another world size.
static inline int dist_read_id(const char *dir, int world, void *blob, size_t blob_len, char *err, size_t len) {
    size_t bytes = sizeof(DistIdHeader) + blob_len;
    unsigned char *buf = (unsigned char *)mallocCheck(bytes);
    long got = dist_read_file(dir, "nccl.id", buf, bytes);
    DistIdHeader h;
    memset(&h, 0, sizeof(h));
    if (got >= (long)sizeof(h)) memcpy(&h, buf, sizeof(h));
    int status = 0;
    if (got < 0) {
        status = 0;
    } else if ((size_t)got != bytes || h.magic != DIST_ID_MAGIC || h.version != DIST_ID_VERSION || h.blob_len != blob_len) {
        snprintf(err, len, "rendezvous: %s/nccl.id is not an id file of this program (%ld bytes)", dir, got);
        status = -1;
    } else {
        DistPeer writer;
        writer.pid = h.pid;
        memcpy(writer.host, h.host, sizeof(writer.host));
        writer.host[DIST_HOST_LEN - 1] = '\0';
        if (dist_writer_gone(&writer)) {
            status = 0;
        } else if (h.world != world) {
            snprintf(err, len, "rendezvous: %s/nccl.id is for %d ranks, this rank was started as one of %d", dir, h.world, world);
            status = -1;
        } else {
            memcpy(blob, buf + sizeof(h), blob_len);
            status = 1;
        }
    }
    free(buf);
    return status;
}

// Writes this rank's peer file and, on rank 0, the id file holding blob.
static inline int dist_publish(const char *dir, int rank, int world, const void *blob, size_t blob_len, char *err, size_t len) {
    DistPeer me;
    dist_self(&me);
    char text[256], name[64];
    int n = snprintf(text, sizeof(text), "mst-peer 1\n%d %s\n", me.pid, me.host);
    snprintf(name, sizeof(name), "rank%d.peer", rank);
    if (!dist_write_atomic(dir, name, text, (size_t)n, err, len)) return 0;
    if (rank != 0) return 1;
    DistIdHeader h;
    memset(&h, 0, sizeof(h));
    h.magic = DIST_ID_MAGIC;
    h.version = DIST_ID_VERSION;
    h.world = world;
    h.pid = me.pid;
    memcpy(h.host, me.host, sizeof(h.host));
    h.blob_len = (uint32_t)blob_len;
    unsigned char *id = (unsigned char *)mallocCheck(sizeof(h) + blob_len);
    memcpy(id, &h, sizeof(h));
    memcpy(id + sizeof(h), blob, blob_len);
    int ok = dist_write_atomic(dir, "nccl.id", id, sizeof(h) + blob_len, err, len);
    free(id);
    return ok;
}

// Ranks meet in `dir`: each writes its peer file, rank 0 writes blob (blob_len bytes, e.g. the
// NCCL unique id); then each waits until every rank's peer file and rank 0's id file are there.
// On success blob (every rank) holds rank 0's bytes and peers[world] every rank's pid and host.
// Returns 1, or 0 with a message in err: a timeout naming the ranks that never arrived, a file
// that is not a rendezvous file, or an id file for another world size.
static inline int dist_rendezvous(const char *dir, int rank, int world, void *blob, size_t blob_len, DistPeer *peers,
                                  double timeout_s, char *err, size_t len) {
    err[0] = '\0';
    if (blob_len == 0 || blob_len > DIST_MAX_BLOB) { snprintf(err, len, "rendezvous: blob of %zu bytes (1..%d)", blob_len, DIST_MAX_BLOB); return 0; }
    if (mkdir(dir, 0700) != 0 && errno != EEXIST) { snprintf(err, len, "rendezvous: cannot create %s: %s", dir, strerror(errno)); return 0; }
    if (!dist_publish(dir, rank, world, blob, blob_len, err, len)) return 0;
    int *arrived = (int *)callocCheck((size_t)world, sizeof(int));
    int have_id = rank == 0, ok = 0;
    double deadline = dist_now() + timeout_s;
    for (;;) {
        int missing = 0, status = 0;
        for (int q = 0; q < world && status >= 0; q++) {
            if (!arrived[q]) {
                status = dist_read_peer(dir, q, &peers[q], err, len);
                arrived[q] = status > 0 || (status == 0 && q == rank);
            }
            missing += !arrived[q];
        }
        if (status >= 0 && !have_id) {
            status = dist_read_id(dir, world, blob, blob_len, err, len);
            have_id = status > 0;
        }
        if (status < 0) break;
        if (missing == 0 && have_id) { ok = 1; break; }
        if (dist_now() > deadline) {
            snprintf(err, len, "rank %d: timed out after %.0f s waiting in %s for", rank, timeout_s, dir);
            for (int q = 0, k = 0; q < world && k < 8; q++)
                if (!arrived[q]) appendf(err, len, "%s %d", k++ ? "," : " rank(s)", q);
            if (!have_id) appendf(err, len, "%s rank 0's NCCL id (nccl.id)", missing > 0 ? " and" : "");
            appendf(err, len, ": did every rank start, with the same --dist-dir / --dist-id?");
            break;
        }
        usleep(DIST_POLL_US);
    }
    free(arrived);
    return ok;
}

// Removes this rank's rendezvous files (rank 0 also the id file and the directory, when empty).
// Call once every rank has read them (after the communicator is up).
static inline void dist_rendezvous_cleanup(const char *dir, int rank) {
    char path[4096];
    snprintf(path, sizeof(path), "%s/rank%d.peer", dir, rank);
    remove(path);
    if (rank != 0) return;
    snprintf(path, sizeof(path), "%s/nccl.id", dir);
    remove(path);
    rmdir(dir);  // fails harmlessly while other ranks' files are still there
}

// ---- every rank runs the same configuration ----

// hashes (world x n_items, row r = rank r's hash of each named item). Returns NULL when every row
// equals rank 0's, else a message in buf naming each disagreeing rank (up to 8) and the items.
static inline const char *dist_agreement_message(const char *const *items, int n_items, const uint64_t *hashes, int world,
                                                 char *buf, size_t len) {
    int bad = 0;
    buf[0] = '\0';
    for (int r = 1; r < world; r++) {
        int differs = 0;
        for (int k = 0; k < n_items; k++) differs |= hashes[(size_t)r * n_items + k] != hashes[k];
        if (!differs) continue;
        if (bad++ == 8) { appendf(buf, len, "; and more ranks"); break; }
        appendf(buf, len, "%srank %d differs from rank 0 in:", bad > 1 ? "; " : "", r);
        for (int k = 0, n = 0; k < n_items; k++)
            if (hashes[(size_t)r * n_items + k] != hashes[k]) appendf(buf, len, "%s %s", n++ ? "," : "", items[k]);
    }
    if (bad == 0) return NULL;
    appendf(buf, len, " (every rank needs the same command line, model and data)");
    return buf;
}

// ---- each rank's part of a global batch ----

// Rows and tokens per row of one rank for a global batch (B, S): data parallel splits the rows,
// sequence parallel splits each row into `world` runs of consecutive tokens. Returns 1, or 0 with
// a message when the split is not even.
static inline int dist_local_shape(int B, int S, int world, int seq_parallel, int *B_local, int *S_local, char *err, size_t len) {
    int split = seq_parallel ? S : B;
    if (split % world != 0) {
        snprintf(err, len, "%s %d does not split over %d GPUs: make it a multiple of %d", seq_parallel ? "--seq-len" : "--batch", split, world, world);
        return 0;
    }
    *B_local = seq_parallel ? B : B / world;
    *S_local = seq_parallel ? S / world : S;
    return 1;
}

// out (B_local, S_local) = this rank's part of in (B, S): rows [rank B_local, (rank + 1) B_local),
// or of every row the tokens [rank S_local, (rank + 1) S_local). Shapes from dist_local_shape.
static inline void dist_slice_batch(int *out, const int *in, int B, int S, int world, int rank, int seq_parallel) {
    int Bl = seq_parallel ? B : B / world, Sl = seq_parallel ? S / world : S;
    int row0 = seq_parallel ? 0 : rank * Bl, col0 = seq_parallel ? rank * Sl : 0;
    for (int b = 0; b < Bl; b++) memcpy(out + (size_t)b * Sl, in + (size_t)(row0 + b) * S + col0, (size_t)Sl * sizeof(int));
}

#endif  // DIST_H

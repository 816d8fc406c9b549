// Communicators, watchdog, collectives and the Ulysses pack / unpack kernels (see comm.h).
#include <stdarg.h>
#include "comm.h"
#include "zero.h"

#define PACK_BLOCK 256  // threads of the pack / unpack kernels
#define PACK_UNIT 8     // bf16 elements per thread unit: one 16-byte load and store

// ---- watchdog ----

// Prints "error: rank R: <message>" and ends the process at once (another thread may be blocked
// inside CUDA or NCCL, so no exit handlers run).
static void comm_fail(const Comm *c, const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fflush(stdout);
    fprintf(stderr, "error: rank %d: ", c->rank);
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    fflush(stderr);
    va_end(args);
    _exit(1);
}

// Dies when a peer on this host is no longer alive.
static void check_peers(const Comm *c) {
    DistPeer me;
    dist_self(&me);
    for (int q = 0; q < c->world; q++) {
        const DistPeer *p = &c->peers[q];
        if (q == c->rank || strcmp(p->host, me.host) != 0 || dist_pid_alive(p->pid)) continue;
        comm_fail(c, "rank %d (pid %d on %s) exited or was killed; stopping this rank too (it would wait for it forever)", q, p->pid, p->host);
    }
}

static void check_async(const Comm *c, ncclComm_t comm, const char *name) {
    if (comm == NULL) return;
    ncclResult_t err;
    if (ncclCommGetAsyncError(comm, &err) != ncclSuccess) return;  // the comm is being torn down
    if (err != ncclSuccess && err != ncclInProgress)
        comm_fail(c, "NCCL reported an error on the %s communicator: %s (%s)", name, ncclGetErrorString(err), ncclGetLastError(comm));
}

static void *watchdog_main(void *arg) {
    Comm *c = (Comm *)arg;
    for (long tick = 1;; tick++) {
        usleep(COMM_WATCH_MS * 1000);
        pthread_mutex_lock(&c->mu);
        int stop = c->stop, armed = c->armed;
        double deadline = c->deadline;
        char what[sizeof(c->what)];
        memcpy(what, c->what, sizeof(what));
        ncclComm_t grads = c->grads, seq = c->seq;
        pthread_mutex_unlock(&c->mu);
        if (stop) return NULL;
        if (armed && dist_now() > deadline)
            comm_fail(c, "timed out after %.0f s in %s: a peer rank is stuck or gone (--dist-timeout sets the limit; raise it for steps "
                         "that take longer)", c->timeout_s, what);
        if (tick % 5 == 0) check_peers(c);
        check_async(c, grads, "gradient");
        check_async(c, seq, "sequence");
    }
}

void comm_arm(Comm *c, const char *what) {
    pthread_mutex_lock(&c->mu);
    snprintf(c->what, sizeof(c->what), "%s", what);
    c->deadline = dist_now() + c->timeout_s;
    c->armed = 1;
    pthread_mutex_unlock(&c->mu);
}

void comm_disarm(Comm *c) {
    pthread_mutex_lock(&c->mu);
    c->armed = 0;
    pthread_mutex_unlock(&c->mu);
}

void comm_wait(Comm *c, cudaStream_t stream, const char *what) {
    comm_arm(c, what);
    cudaCheck(cudaStreamSynchronize(stream));
    comm_disarm(c);
}

// ---- init / free ----

// One small exchange of every kind the trainer uses, on both communicators, so NCCL connects
// (and allocates its buffers) now.
static void warm_up(Comm *c) {
    float *f = (float *)c->scratch;
    cudaStream_t st = c->stream;
    cudaCheck(cudaMemsetAsync(f, 0, 4 * sizeof(float), st));
    ncclCheck(ncclAllReduce(f, f, 1, ncclFloat32, ncclSum, c->grads, st));
    ncclCheck(ncclAllGather(f, f + 1, 1, ncclFloat32, c->grads, st));
    ncclCheck(ncclGroupStart());
    for (int q = 0; q < c->world; q++) {
        ncclCheck(ncclReduce(f, f, 1, ncclFloat32, ncclSum, q, c->grads, st));
        ncclCheck(ncclBroadcast(f, f, 1, ncclFloat32, q, c->grads, st));
    }
    ncclCheck(ncclGroupEnd());
    ncclComm_t comms[2] = {c->grads, c->seq};
    for (int k = 0; k < 2; k++) {
        ncclCheck(ncclGroupStart());
        for (int q = 0; q < c->world; q++) {
            if (q == c->rank) continue;
            ncclCheck(ncclSend(f, 1, ncclFloat32, q, comms[k], st));
            ncclCheck(ncclRecv(f + 2, 1, ncclFloat32, q, comms[k], st));
        }
        ncclCheck(ncclGroupEnd());
    }
    ncclCheck(ncclBroadcast(f, f, 1, ncclFloat32, 0, c->seq, st));
    comm_wait(c, st, "NCCL warm-up (the first exchange between all ranks)");
}

void comm_init(Comm *c, const DistEnv *e, const char *dir, double timeout_s) {
    memset(c, 0, sizeof(*c));
    c->rank = e->rank;
    c->world = e->world;
    c->local_rank = e->local_rank;
    c->local_world = e->local_world;
    c->timeout_s = timeout_s;
    int n = cuda_device_count();
    if (n == 0) die("rank %d: no GPU visible: every process of a multi-GPU run needs one", c->rank);
    c->device = n == 1 ? 0 : e->local_rank;  // one visible GPU: the launcher already gave this process its own
    if (c->device >= n)
        die("rank %d: local rank %d but only %d GPUs are visible on this host: start at most %d processes per host", c->rank,
            e->local_rank, n, n);
    cudaCheck(cudaSetDevice(c->device));
    size_t free0, free1, total;
    cudaCheck(cudaMemGetInfo(&free0, &total));
    ncclUniqueId ids[2];
    memset(ids, 0, sizeof(ids));
    if (c->rank == 0) {
        ncclCheck(ncclGetUniqueId(&ids[0]));
        ncclCheck(ncclGetUniqueId(&ids[1]));
    }
    c->peers = (DistPeer *)callocCheck((size_t)c->world, sizeof(DistPeer));
    char err[2048];
    if (!dist_rendezvous(dir, c->rank, c->world, ids, sizeof(ids), c->peers, timeout_s, err, sizeof(err))) die("%s", err);
    if (pthread_mutex_init(&c->mu, NULL) != 0) die("rank %d: cannot create the watchdog's mutex", c->rank);
    if (pthread_create(&c->watchdog, NULL, watchdog_main, c) != 0) die("rank %d: cannot start the watchdog thread", c->rank);
    comm_arm(c, "NCCL communicator init (every rank must reach it)");
    ncclComm_t grads, seq;
    ncclCheck(ncclCommInitRank(&grads, c->world, ids[0], c->rank));
    ncclCheck(ncclCommInitRank(&seq, c->world, ids[1], c->rank));
    comm_disarm(c);
    pthread_mutex_lock(&c->mu);
    c->grads = grads;
    c->seq = seq;
    pthread_mutex_unlock(&c->mu);
    cudaCheck(cudaMalloc(&c->scratch, COMM_SCRATCH_BYTES));
    cudaCheck(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    warm_up(c);
    dist_rendezvous_cleanup(dir, c->rank);  // every rank has read the files: it is connected
    cudaCheck(cudaMemGetInfo(&free1, &total));
    c->nccl_bytes = free0 > free1 ? free0 - free1 : 0;
}

void comm_free(Comm *c) {
    // Two barriers: after the first every rank is done with its work; each then stops its watchdog
    // (a peer that exits first must not look like a crash), and the second keeps any rank from
    // exiting while another's watchdog still runs.
    double one = 1.0;
    comm_sum_host(c, &one, 1);
    pthread_mutex_lock(&c->mu);
    c->stop = 1;
    pthread_mutex_unlock(&c->mu);
    if (pthread_join(c->watchdog, NULL) != 0) die("rank %d: cannot join the watchdog thread", c->rank);
    float *f = (float *)c->scratch;
    ncclCheck(ncclAllReduce(f, f, 1, ncclFloat32, ncclSum, c->grads, c->stream));
    cudaCheck(cudaStreamSynchronize(c->stream));
    ncclCheck(ncclCommDestroy(c->grads));
    ncclCheck(ncclCommDestroy(c->seq));
    cudaCheck(cudaStreamDestroy(c->stream));
    cudaCheck(cudaFree(c->scratch));
    pthread_mutex_destroy(&c->mu);
    free(c->peers);
    memset(c, 0, sizeof(*c));
}

// ---- host values ----

void comm_check_agreement(Comm *c, const char *const *items, const uint64_t *hashes, int n) {
    if (n < 1 || n > COMM_MAX_ITEMS || (size_t)(c->world + 1) * COMM_MAX_ITEMS * sizeof(uint64_t) > COMM_SCRATCH_BYTES)
        die("rank %d: agreement check of %d items over %d ranks does not fit the scratch", c->rank, n, c->world);
    uint64_t *d = (uint64_t *)c->scratch, *all = (uint64_t *)mallocCheck((size_t)c->world * n * sizeof(uint64_t));
    cudaCheck(cudaMemcpyAsync(d, hashes, (size_t)n * sizeof(uint64_t), cudaMemcpyHostToDevice, c->stream));
    ncclCheck(ncclAllGather(d, d + COMM_MAX_ITEMS, (size_t)n, ncclUint64, c->grads, c->stream));
    cudaCheck(cudaMemcpyAsync(all, d + COMM_MAX_ITEMS, (size_t)c->world * n * sizeof(uint64_t), cudaMemcpyDeviceToHost, c->stream));
    comm_wait(c, c->stream, "the configuration check");
    char msg[2048];
    const char *bad = dist_agreement_message(items, n, all, c->world, msg, sizeof(msg));
    free(all);
    if (bad) die("rank %d: the ranks do not run the same configuration: %s", c->rank, bad);
}

void comm_sum_host(Comm *c, double *v, int n) {
    if (n < 1 || (size_t)n * sizeof(double) > COMM_SCRATCH_BYTES) die("rank %d: comm_sum_host of %d values", c->rank, n);
    double *d = (double *)c->scratch;
    cudaCheck(cudaMemcpyAsync(d, v, (size_t)n * sizeof(double), cudaMemcpyHostToDevice, c->stream));
    ncclCheck(ncclAllReduce(d, d, (size_t)n, ncclFloat64, ncclSum, c->grads, c->stream));
    cudaCheck(cudaMemcpyAsync(v, d, (size_t)n * sizeof(double), cudaMemcpyDeviceToHost, c->stream));
    comm_wait(c, c->stream, "a sum over the ranks");
}

// ---- ZeRO exchanges ----

void comm_reduce_parts(Comm *c, float *out, const float *block, size_t size, cudaStream_t stream) {
    ncclCheck(ncclGroupStart());
    for (int q = 0; q < c->world; q++) {
        size_t lo, hi;
        zero_range(size, c->world, q, &lo, &hi);
        if (hi == lo) continue;
        ncclCheck(ncclReduce(block + lo, q == c->rank ? out : (float *)block + lo, hi - lo, ncclFloat32, ncclSum, q, c->grads, stream));
    }
    ncclCheck(ncclGroupEnd());
}

void comm_gather_parts(Comm *c, bf16 *block, size_t size, cudaStream_t stream) {
    ncclCheck(ncclGroupStart());
    for (int q = 0; q < c->world; q++) {
        size_t lo, hi;
        zero_range(size, c->world, q, &lo, &hi);
        if (hi > lo) ncclCheck(ncclBroadcast(block + lo, block + lo, hi - lo, ncclBfloat16, q, c->grads, stream));
    }
    ncclCheck(ncclGroupEnd());
}

void comm_sum_f32(Comm *c, float *buf, size_t n, cudaStream_t stream) {
    ncclCheck(ncclAllReduce(buf, buf, n, ncclFloat32, ncclSum, c->grads, stream));
}

void comm_send_to_root(Comm *c, void *dst, const void *src, size_t bytes, int from, cudaStream_t stream) {
    if (bytes == 0) return;
    if (from == 0) {
        if (c->rank == 0) cudaCheck(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
        return;
    }
    ncclCheck(ncclGroupStart());
    if (c->rank == from) ncclCheck(ncclSend(src, bytes, ncclUint8, 0, c->grads, stream));
    if (c->rank == 0) ncclCheck(ncclRecv(dst, bytes, ncclUint8, from, c->grads, stream));
    ncclCheck(ncclGroupEnd());
}

void comm_broadcast_f32(Comm *c, float *buf, size_t n, int root, cudaStream_t stream) {
    ncclCheck(ncclBroadcast(buf, buf, n, ncclFloat32, root, c->seq, stream));
}

// ---- Ulysses ----

static int aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// Pack: send (R chunks of (rows, Hl hd)): chunk p, row r, local head j <- x (rows, H hd) row r, head
// ulysses_global_head(p, j). One thread per 8 elements (16 bytes) of a destination head.
__global__ void ulysses_pack_kernel(bf16 *send, const bf16 *x, int rows, UlyssesHeads u, int with_kv) {
    int H = ulysses_full_heads(&u, with_kv), Hl = ulysses_local_heads(&u, with_kv), units = u.hd / PACK_UNIT;
    size_t total = (size_t)u.ranks * rows * Hl * units;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i % units);
        size_t rest = i / units;
        int j = (int)(rest % Hl);
        rest /= Hl;
        size_t r = rest % rows;
        int p = (int)(rest / rows);
        const bf16 *src = x + (r * H + ulysses_global_head(&u, p, j)) * u.hd + t * PACK_UNIT;
        *(uint4 *)(send + i * PACK_UNIT) = *(const uint4 *)src;
    }
}

// Unpack: x (rows, H hd) head g of row r <- the sum over the ranks holding g (ascending, fp32,
// rounded to nearest) of their chunk's row r, local head j; a plain copy when one rank holds g.
__global__ void ulysses_unpack_kernel(bf16 *x, const bf16 *recv, int rows, UlyssesHeads u, int with_kv) {
    int H = ulysses_full_heads(&u, with_kv), Hl = ulysses_local_heads(&u, with_kv), units = u.hd / PACK_UNIT;
    size_t total = (size_t)rows * H * units, chunk = (size_t)rows * Hl * u.hd;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        int t = (int)(i % units), g = (int)((i / units) % H);
        size_t r = i / units / H;
        int p0, j, n = ulysses_holders(&u, g, &p0, &j);
        const bf16 *src = recv + (size_t)p0 * chunk + (r * Hl + j) * u.hd + t * PACK_UNIT;
        if (n == 1) {
            *(uint4 *)(x + i * PACK_UNIT) = *(const uint4 *)src;
            continue;
        }
        float s[PACK_UNIT] = {0.0f};
        for (int k = 0; k < n; k++, src += chunk) {
            uint4 raw = *(const uint4 *)src;
            bf16 h[PACK_UNIT];
            memcpy(h, &raw, sizeof(raw));  // register reinterpretation without breaking type-based aliasing
#pragma unroll
            for (int e = 0; e < PACK_UNIT; e++) s[e] += __bfloat162float(h[e]);
        }
        bf16 out[PACK_UNIT];
#pragma unroll
        for (int e = 0; e < PACK_UNIT; e++) out[e] = __float2bfloat16_rn(s[e]);
        uint4 raw;
        memcpy(&raw, out, sizeof(raw));
        *(uint4 *)(x + i * PACK_UNIT) = raw;
    }
}

static int pack_blocks(size_t units) {
    size_t b = (units + PACK_BLOCK - 1) / PACK_BLOCK;
    return (int)(b < 65536 ? (b > 0 ? b : 1) : 65536);
}

static void pack_check(const UlyssesHeads *u, const void *a, const void *b, const char *what) {
    if (u->hd % PACK_UNIT != 0 || !aligned16(a) || !aligned16(b))
        die("%s: head dim %d must be a multiple of %d and the buffers 16-byte aligned", what, u->hd, PACK_UNIT);
}

void ulysses_pack(bf16 *send, const bf16 *x, int rows, const UlyssesHeads *u, int with_kv, cudaStream_t stream) {
    pack_check(u, send, x, "ulysses_pack");
    size_t units = (size_t)u->ranks * rows * ulysses_local_heads(u, with_kv) * (u->hd / PACK_UNIT);
    if (units == 0) return;
    ulysses_pack_kernel<<<pack_blocks(units), PACK_BLOCK, 0, stream>>>(send, x, rows, *u, with_kv);
    cudaCheckLaunch();
}

void ulysses_unpack(bf16 *x, const bf16 *recv, int rows, const UlyssesHeads *u, int with_kv, cudaStream_t stream) {
    pack_check(u, x, recv, "ulysses_unpack");
    size_t units = (size_t)rows * ulysses_full_heads(u, with_kv) * (u->hd / PACK_UNIT);
    if (units == 0) return;
    ulysses_unpack_kernel<<<pack_blocks(units), PACK_BLOCK, 0, stream>>>(x, recv, rows, *u, with_kv);
    cudaCheckLaunch();
}

// The first of rank p's S_loc rows of sequence b in a head-layout buffer (B, world * S_loc rows of `width`).
static bf16 *head_rows(const bf16 *heads, int b, int p, int S_loc, int world, int width) {
    return (bf16 *)heads + ((size_t)b * S_loc * world + (size_t)p * S_loc) * width;
}

void ulysses_to_heads(Comm *c, bf16 *heads, bf16 *send, const bf16 *x, int B, int S_loc, const UlyssesHeads *u, int with_kv,
                      cudaStream_t stream) {
    int Fl = ulysses_local_heads(u, with_kv) * u->hd;
    size_t piece = (size_t)S_loc * Fl, chunk = (size_t)B * piece;
    ulysses_pack(send, x, B * S_loc, u, with_kv, stream);
    ncclCheck(ncclGroupStart());
    for (int p = 0; p < c->world; p++) {
        if (p == c->rank) continue;
        for (int b = 0; b < B; b++) {
            ncclCheck(ncclSend(send + p * chunk + b * piece, piece, ncclBfloat16, p, c->seq, stream));
            ncclCheck(ncclRecv(head_rows(heads, b, p, S_loc, c->world, Fl), piece, ncclBfloat16, p, c->seq, stream));
        }
    }
    ncclCheck(ncclGroupEnd());
    for (int b = 0; b < B; b++)
        cudaCheck(cudaMemcpyAsync(head_rows(heads, b, c->rank, S_loc, c->world, Fl), send + c->rank * chunk + b * piece,
                                  piece * sizeof(bf16), cudaMemcpyDeviceToDevice, stream));
}

void ulysses_from_heads(Comm *c, bf16 *x, bf16 *recv, const bf16 *heads, int B, int S_loc, const UlyssesHeads *u, int with_kv,
                        cudaStream_t stream) {
    int Fl = ulysses_local_heads(u, with_kv) * u->hd;
    size_t piece = (size_t)S_loc * Fl, chunk = (size_t)B * piece;
    ncclCheck(ncclGroupStart());
    for (int p = 0; p < c->world; p++) {
        if (p == c->rank) continue;
        for (int b = 0; b < B; b++) {
            ncclCheck(ncclSend(head_rows(heads, b, p, S_loc, c->world, Fl), piece, ncclBfloat16, p, c->seq, stream));
            ncclCheck(ncclRecv(recv + p * chunk + b * piece, piece, ncclBfloat16, p, c->seq, stream));
        }
    }
    ncclCheck(ncclGroupEnd());
    for (int b = 0; b < B; b++)
        cudaCheck(cudaMemcpyAsync(recv + c->rank * chunk + b * piece, head_rows(heads, b, c->rank, S_loc, c->world, Fl),
                                  piece * sizeof(bf16), cudaMemcpyDeviceToDevice, stream));
    ulysses_unpack(x, recv, B * S_loc, u, with_kv, stream);
}

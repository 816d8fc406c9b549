// The NCCL side of several GPUs (one process each): communicators made from the file rendezvous
// of dist.h, a watchdog that turns a dead or stuck peer into a clear error instead of a hang, the
// configuration agreement check, the collectives of the ZeRO optimizer (gradient parts summed to
// their owner, weight parts sent to every rank), and Ulysses' all-to-alls with their pack /
// unpack kernels. Every NCCL call is checked.
//
// Two communicators over the same ranks: `grads` carries the gradient sums, the ZeRO weight
// exchange and the scalar sums on the model's side stream; `seq` carries the sequence-parallel
// all-to-alls on the compute stream, so the two streams never share a communicator.
//
// Watchdog: a thread polls every COMM_WATCH_MS. It stops the process (exit status 1, after
// printing "error: rank R: ...") when
//   - a peer process on this host is gone (pid no longer alive): named by rank, pid and host;
//   - NCCL reports an asynchronous error on a communicator;
//   - the main thread has waited longer than the timeout in a blocking call it armed
//     (comm_wait, comm_arm): a peer on another host died or every rank is stuck.
#ifndef COMM_H
#define COMM_H

#include <nccl.h>
#include <pthread.h>
#include "cuda_utils.h"
#include "dist.h"
#include "ulysses.h"

#define COMM_WATCH_MS 100
#define COMM_SCRATCH_BYTES ((size_t)64 << 10)  // device scratch for host-value sums and the agreement check
#define COMM_MAX_ITEMS 16                      // agreement items

static inline void nccl_check(ncclResult_t r, const char *file, int line) {
    if (r != ncclSuccess) die("NCCL: %s (%d): %s [%s:%d]", ncclGetErrorString(r), (int)r, ncclGetLastError(NULL), file, line);
}
#define ncclCheck(call) nccl_check((call), __FILE__, __LINE__)

typedef struct {
    int rank, world, local_rank, local_world, device;
    ncclComm_t grads, seq;
    DistPeer *peers;       // (world) pid and host of every rank
    double timeout_s;
    size_t nccl_bytes;     // device memory NCCL and the scratch took (cudaMemGetInfo around init and warm-up)
    void *scratch;         // COMM_SCRATCH_BYTES of device memory
    cudaStream_t stream;   // host-value sums, the agreement check, warm-up
    // watchdog
    pthread_t watchdog;
    pthread_mutex_t mu;
    int stop, armed;
    double deadline;
    char what[160];
} Comm;

// Selects GPU local_rank (or the only visible one), meets the other ranks in `dir` (dist.h), creates
// both communicators, warms up every kind of exchange (so NCCL's buffers exist before the memory
// planner reads free memory) and starts the watchdog. timeout_s bounds the rendezvous and every
// armed wait. Dies with a message naming this rank on any failure.
void comm_init(Comm *c, const DistEnv *e, const char *dir, double timeout_s);
void comm_free(Comm *c);

// The watchdog's deadline around a blocking call of the main thread; `what` names it in the error.
void comm_arm(Comm *c, const char *what);
void comm_disarm(Comm *c);
// cudaStreamSynchronize(stream) with the watchdog armed.
void comm_wait(Comm *c, cudaStream_t stream, const char *what);

// Every rank gives hashes[n] of the same named items; dies on every rank when any rank's differ,
// naming the ranks and the items (dist_agreement_message).
void comm_check_agreement(Comm *c, const char *const *items, const uint64_t *hashes, int n);
// v[n] = the sums of v[n] over the ranks (fp64, blocking).
void comm_sum_host(Comm *c, double *v, int n);

// ---- ZeRO exchanges on `stream` over the grads communicator (parts from zero_range) ----
// Rank q receives into `out` (its part's length) the sum over the ranks of elements [lo_q, hi_q) of
// block (size fp32 elements, every rank's whole block). out may be block + lo_q (in place).
void comm_reduce_parts(Comm *c, float *out, const float *block, size_t size, cudaStream_t stream);
// Every rank's part [lo_q, hi_q) of block (size bf16 elements) to every rank, in place.
void comm_gather_parts(Comm *c, bf16 *block, size_t size, cudaStream_t stream);
// buf (n fp32) = the sum over the ranks, in place.
void comm_sum_f32(Comm *c, float *buf, size_t n, cudaStream_t stream);
// Rank `from` sends bytes of src to rank 0, which receives them into dst (checkpoint gathering).
// Every rank calls it (the others do nothing); from == 0 copies.
void comm_send_to_root(Comm *c, void *dst, const void *src, size_t bytes, int from, cudaStream_t stream);

// ---- Ulysses all-to-alls on `stream` over the seq communicator (ulysses.h) ----
// x (B*S_loc, H hd): this rank's S_loc tokens of B rows, every head -> heads (B*S, H_loc hd), S =
// world * S_loc: every token, this rank's heads. send: world * B*S_loc * H_loc hd elements.
void ulysses_to_heads(Comm *c, bf16 *heads, bf16 *send, const bf16 *x, int B, int S_loc, const UlyssesHeads *u, int with_kv,
                      cudaStream_t stream);
// The way back: heads (B*S, H_loc hd) -> x (B*S_loc, H hd), replicated kv heads summed. recv: as send.
void ulysses_from_heads(Comm *c, bf16 *x, bf16 *recv, const bf16 *heads, int B, int S_loc, const UlyssesHeads *u, int with_kv,
                        cudaStream_t stream);
// buf (n fp32) on every rank = root's, over the seq communicator.
void comm_broadcast_f32(Comm *c, float *buf, size_t n, int root, cudaStream_t stream);

// The pack / unpack kernels (CPU twins ulysses_pack_cpu / ulysses_unpack_cpu). hd % 8 == 0 and
// 16-byte aligned pointers. send: ranks chunks of (rows, H_loc hd); x: (rows, H hd).
void ulysses_pack(bf16 *send, const bf16 *x, int rows, const UlyssesHeads *u, int with_kv, cudaStream_t stream);
void ulysses_unpack(bf16 *x, const bf16 *recv, int rows, const UlyssesHeads *u, int with_kv, cudaStream_t stream);

#endif  // COMM_H

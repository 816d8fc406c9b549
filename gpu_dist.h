// Several GPUs inside the GPU model: what gpu_model.cu calls at its hooks (implemented in
// gpu_dist.cu) and the two optimizer helpers of gpu_model.cu that gpu_dist.cu uses. Internal to
// the two files; callers of the model use gpu_model.h.
//
// Streams: the model's compute stream runs forward and backward (and the sequence-parallel
// all-to-alls); the side stream `grad_stream` runs, block by block, the sum of the gradient over
// the ranks (each rank receiving its part), the grad-norm partial sums of that part, AdamW on it
// and the exchange of the new weights. Events order the two: the side stream starts a block once
// the compute stream has written its gradient, and the compute stream overwrites a gradient buffer
// only once the side stream has summed it (ev_grads_free per layer buffer, ev_head_free for the
// embedding/head buffer).
#ifndef GPU_DIST_H
#define GPU_DIST_H

#include "gpu_model.h"

// ---- from gpu_model.cu ----
typedef struct {
    size_t offset, rows, cols;  // in the flat parameter array
    int id;                     // the tensor's stochastic-rounding id
} GmTensor;
// The tensors of ZeRO block b (zero.h), in flat order; returns how many (at most LT_COUNT).
int gm_block_tensors(const GpuModel *m, int b, GmTensor *out);
// AdamW on elements [lo, hi) of tensor t: grad holds the gradient of element lo onward, state_at is
// the index of element lo in the moment (and master) arrays; sumsq_partials non-NULL: the slice's
// squares are added to them in the same pass.
void gm_adamw_slice(GpuModel *m, const GmTensor *t, size_t lo, size_t hi, const float *grad, size_t state_at,
                    const OptimizerStep *opt, float clip_scale, float *sumsq_partials, cudaStream_t stream);
// What the compute stream has queued so far comes before what the side stream gets next.
void gm_side_after_compute(GpuModel *m);

// ---- gpu_dist.cu ----
// After the arena is bound: this rank's ZeRO parts, the side stream and its events.
void dist_model_init(GpuModel *m);
void dist_model_free(GpuModel *m);
// Master weights of this rank's parts from the bf16 weights.
void dist_init_master(GpuModel *m);
// Optimizer-in-backward, one block whose gradient `grad` (the whole block, this rank's tokens) the
// compute stream has just finished: summed over the ranks into this rank's part, its norm
// partials, AdamW on the part, the new weights to every rank. `consumed` (may be NULL) is recorded
// once grad has been read.
void dist_update_block(GpuModel *m, int b, const float *grad, cudaEvent_t consumed, const OptimizerStep *opt, float clip_scale);
// After the embedding backward: the embedding (with a tied head) and final-norm blocks, then the
// squared norm of the whole step's gradient (this rank's parts) into scalars[1].
void dist_finish_update(GpuModel *m, const OptimizerStep *opt, float clip_scale);
// Gradient accumulation, at the update: the gradient buffer's parts summed over the ranks (each rank
// its own, in place; with capture, rank 0 also gathers the others' into the host buffer). Returns
// the norm of the whole summed gradient.
float dist_reduce_grads(GpuModel *m);
// AdamW on this rank's parts of the summed gradient, the new weights to every rank, the gradient
// buffer zeroed; waits for it all.
void dist_update_parts(GpuModel *m, const OptimizerStep *opt, float clip_scale);
// host[n] = scalars[0 .. n) summed over the ranks, once both streams are done (blocking).
void dist_read_scalars(GpuModel *m, float *host, int n);
// n summed over the ranks (blocking; both streams must be idle).
int dist_sum_count(GpuModel *m, int n);
// The optimizer-state blob's moments and master weights (gpu_model.h's layout, whole model): rank 0
// gathers every rank's parts into host; every rank calls it (host may be NULL on the others).
void dist_get_optimizer_state(GpuModel *m, char *host);
// Every rank takes its parts from the whole-model blob in host.
void dist_set_optimizer_state(GpuModel *m, const char *host);

#endif  // GPU_DIST_H

// Several GPUs inside the GPU model: the ZeRO gradient exchange and sharded AdamW on the side
// stream, the scalar sums, and the gathering of the sharded optimizer state for checkpoints (see
// gpu_dist.h; the sequence-parallel attention lives at its hook in gpu_model.cu).
#include <math.h>
#include "gpu_dist.h"
#include "mst_kernels.h"

void dist_model_init(GpuModel *m) {
    zero_layout_init(&m->zero, &m->layout, &m->config, m->comm->world, m->comm->rank);
    if (m->zero.state_elems > mst_plan_find(&m->plan, "adam_m")->bytes / dtype_bytes(m->settings.moment_type))
        die("rank %d: the plan's moment arrays are shorter than this rank's ZeRO parts", m->comm->rank);
}

void dist_model_free(GpuModel *m) {
    zero_layout_free(&m->zero);
}

void dist_init_master(GpuModel *m) {
    const ZeroLayout *z = &m->zero;
    for (int b = 0; b < z->n_blocks; b++) cast_bf16_to_fp32(m->master + z->state[b], m->params + z->lo[b], z->hi[b] - z->lo[b], m->stream);
}

// AdamW on this rank's part of block b, on the side stream; grad holds the part's summed gradient.
// sumsq_partials non-NULL: the part's squares are added to them in the same pass.
static void update_part(GpuModel *m, int b, const float *grad, const OptimizerStep *opt, float clip_scale, float *sumsq_partials) {
    GmTensor t[LT_COUNT];
    int n = gm_block_tensors(m, b, t);
    size_t lo = m->zero.lo[b], hi = m->zero.hi[b];
    for (int i = 0; i < n; i++) {
        size_t first = t[i].offset > lo ? t[i].offset : lo, end = t[i].offset + t[i].rows * t[i].cols;
        if (end > hi) end = hi;
        if (first >= end) continue;
        gm_adamw_slice(m, &t[i], first - t[i].offset, end - t[i].offset, grad + (first - lo), m->zero.state[b] + (first - lo), opt,
                       clip_scale, sumsq_partials, m->grad_stream);
    }
}

void dist_update_block(GpuModel *m, int b, const float *grad, cudaEvent_t consumed, const OptimizerStep *opt, float clip_scale) {
    cudaStream_t gs = m->grad_stream;
    gm_side_after_compute(m);
    comm_reduce_parts(m->comm, m->grad_shard, grad, m->zero.size[b], gs);
    if (consumed) cudaCheck(cudaEventRecord(consumed, gs));
    update_part(m, b, m->grad_shard, opt, clip_scale, m->grad_norm_partials);
    comm_gather_parts(m->comm, m->params + m->zero.offset[b], m->zero.size[b], gs);
}

void dist_finish_update(GpuModel *m, const OptimizerStep *opt, float clip_scale) {
    dist_update_block(m, 0, m->embed_head_grads, NULL, opt, clip_scale);
    dist_update_block(m, zero_block_final_norm(&m->config), m->final_norm_grads, NULL, opt, clip_scale);
    grad_norm_finish(m->scalars + 1, m->grad_norm_partials, m->grad_stream);
}

void dist_read_scalars(GpuModel *m, float *host, int n) {
    gm_side_after_compute(m);
    comm_sum_f32(m->comm, m->scalars, (size_t)n, m->grad_stream);
    cudaCheck(cudaMemcpyAsync(host, m->scalars, (size_t)n * sizeof(float), cudaMemcpyDeviceToHost, m->grad_stream));
    comm_wait(m->comm, m->grad_stream, "the end of a step (the ranks' backward passes and weight exchange)");
}

int dist_sum_count(GpuModel *m, int n) {
    double v = (double)n;
    comm_sum_host(m->comm, &v, 1);
    return (int)v;
}

// Rank 0's gradient buffer receives every other rank's summed parts in place, then goes to capture_grads.
static void capture_summed_grads(GpuModel *m) {
    Comm *c = m->comm;
    const ZeroLayout *z = &m->zero;
    for (int b = 0; b < z->n_blocks; b++)
        for (int q = 1; q < c->world; q++) {
            size_t lo, hi;
            zero_range(z->size[b], c->world, q, &lo, &hi);
            float *part = m->grads + z->offset[b] + lo;
            comm_send_to_root(c, part, part, (hi - lo) * sizeof(float), q, m->grad_stream);
        }
    if (c->rank == 0) {
        if (m->capture_grads == NULL) die("rank 0: capturing gradients needs a host buffer");
        cudaCheck(cudaMemcpyAsync(m->capture_grads, m->grads, m->layout.total * sizeof(float), cudaMemcpyDeviceToHost, m->grad_stream));
    }
    comm_wait(c, m->grad_stream, "gathering the gradient to rank 0");
    m->capture = 0;
}

float dist_reduce_grads(GpuModel *m) {
    const ZeroLayout *z = &m->zero;
    cudaStream_t gs = m->grad_stream;
    gm_side_after_compute(m);
    for (int b = 0; b < z->n_blocks; b++) comm_reduce_parts(m->comm, m->grads + z->lo[b], m->grads + z->offset[b], z->size[b], gs);
    if (m->capture) capture_summed_grads(m);
    cudaCheck(cudaMemsetAsync(m->grad_norm_partials, 0, (size_t)m->plan.figures.grad_norm_partials * sizeof(float), gs));
    for (int b = 0; b < z->n_blocks; b++) grad_norm_accumulate(m->grad_norm_partials, m->grads + z->lo[b], DT_FP32, z->hi[b] - z->lo[b], gs);
    grad_norm_finish(m->scalars + 1, m->grad_norm_partials, gs);
    comm_sum_f32(m->comm, m->scalars + 1, 1, gs);
    float sumsq;
    cudaCheck(cudaMemcpyAsync(&sumsq, m->scalars + 1, sizeof(float), cudaMemcpyDeviceToHost, gs));
    comm_wait(m->comm, gs, "the gradient sum over the ranks");
    return sqrtf(sumsq);
}

void dist_update_parts(GpuModel *m, const OptimizerStep *opt, float clip_scale) {
    const ZeroLayout *z = &m->zero;
    cudaStream_t gs = m->grad_stream;
    for (int b = 0; b < z->n_blocks; b++) {
        update_part(m, b, m->grads + z->lo[b], opt, clip_scale, NULL);
        comm_gather_parts(m->comm, m->params + z->offset[b], z->size[b], gs);
    }
    cudaCheck(cudaMemsetAsync(m->grads, 0, m->layout.total * sizeof(float), gs));
    comm_wait(m->comm, gs, "the weight exchange after the update");
}

// The state arrays of the blob (gpu_model.h): m and v (moment type), then the fp32 master weights.
typedef struct { char *dev; size_t elem; size_t blob_at; } StateArray;

static int state_arrays(const GpuModel *m, StateArray *a) {
    size_t mb = dtype_bytes(m->settings.moment_type), total = m->layout.total;
    char *dev[3] = {(char *)m->adam_m, (char *)m->adam_v, (char *)m->master};
    int n = m->master ? 3 : 2;
    for (int k = 0; k < n; k++) {
        a[k].dev = dev[k];
        a[k].elem = k < 2 ? mb : sizeof(float);
        a[k].blob_at = (size_t)k * total * mb;
    }
    return n;
}

void dist_get_optimizer_state(GpuModel *m, char *host) {
    Comm *c = m->comm;
    const ZeroLayout *z = &m->zero;
    cudaStream_t gs = m->grad_stream;
    if (c->rank == 0 && host == NULL) die("rank 0: the optimizer state needs a host buffer");
    gm_side_after_compute(m);
    StateArray arr[3];
    int n = state_arrays(m, arr);
    for (int k = 0; k < n; k++)
        for (int b = 0; b < z->n_blocks; b++)
            for (int q = 0; q < c->world; q++) {  // rank q's part of block b, through rank 0's gradient-shard buffer
                size_t lo, hi;
                zero_range(z->size[b], c->world, q, &lo, &hi);
                size_t bytes = (hi - lo) * arr[k].elem;
                comm_send_to_root(c, m->grad_shard, arr[k].dev + z->state[b] * arr[k].elem, bytes, q, gs);
                if (c->rank == 0 && bytes > 0)
                    cudaCheck(cudaMemcpyAsync(host + arr[k].blob_at + (z->offset[b] + lo) * arr[k].elem, m->grad_shard, bytes,
                                              cudaMemcpyDeviceToHost, gs));
            }
    comm_wait(c, gs, "gathering the optimizer state to rank 0");
}

void dist_set_optimizer_state(GpuModel *m, const char *host) {
    const ZeroLayout *z = &m->zero;
    StateArray arr[3];
    int n = state_arrays(m, arr);
    for (int k = 0; k < n; k++)
        for (int b = 0; b < z->n_blocks; b++)
            cudaCheck(cudaMemcpy(arr[k].dev + z->state[b] * arr[k].elem, host + arr[k].blob_at + z->lo[b] * arr[k].elem,
                                 (z->hi[b] - z->lo[b]) * arr[k].elem, cudaMemcpyHostToDevice));
}

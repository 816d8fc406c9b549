// Where a training step's GPU time goes: the model marks the start of each region on its stream
// with a CUDA event; after the step the time between consecutive marks is added to the region
// that the earlier mark opened. One pass, no extra synchronization inside the step; the events
// cost a few microseconds each. Used by train_llama --profile.
// With a memory trace (train_llama --mem-trace) each mark also waits for the stream and writes the
// device memory in use at that point (cudaMemGetInfo: the arena, the workspaces and the CUDA context)
// as one JSON line; that synchronization slows the step, so traced steps are not timed figures.
#ifndef STEP_PROFILE_H
#define STEP_PROFILE_H

#include <stdio.h>
#include "cuda_utils.h"

typedef enum {
    PROF_EMBEDDING,     // embedding forward and backward
    PROF_ATTN_IN,       // attention norm, QKV projection, RoPE
    PROF_SDPA_FWD,      // the attention kernel itself (cuDNN or soft-cap)
    PROF_ATTN_OUT,      // output projection, post-norm, residual
    PROF_MLP_FWD,       // MLP chunks forward
    PROF_LM_HEAD,       // final norm, LM head and cross-entropy, forward and backward
    PROF_RECOMPUTE,     // attention part recomputed in backward (whole-layer recompute)
    PROF_MLP_BWD,       // MLP chunks backward (with the chunk recompute when not kept)
    PROF_ATTN_OUT_BWD,  // output projection backward
    PROF_SDPA_BWD,      // the attention kernel's backward
    PROF_ATTN_IN_BWD,   // RoPE, QKV projection and attention norm backward
    PROF_OPTIMIZER,     // AdamW, gradient norm, gradient zeroing
    PROF_COUNT
} ProfRegion;

static const char *const prof_region_names[PROF_COUNT] = {
    "embedding fwd+bwd", "attn norm+qkv+rope", "attention fwd", "attn out proj", "mlp fwd",
    "lm head + loss", "recompute attn fwd", "mlp bwd", "attn out proj bwd", "attention bwd",
    "attn qkv+norm bwd", "optimizer",
};

typedef struct {
    cudaEvent_t *events;
    int *regions;
    int n, cap;
    int muted;              // > 0: marks are ignored (a region that contains others, e.g. recompute)
    double ms[PROF_COUNT];  // summed over the measured steps
    long marks[PROF_COUNT];
    int steps;
    FILE *mem_trace;        // non-NULL: one JSON line per mark and step end (step_profile_trace_memory)
    int traced_steps;
} StepProfile;

static inline void step_profile_init(StepProfile *p, int cap) {
    memset(p, 0, sizeof(*p));
    p->cap = cap;
    p->events = (cudaEvent_t *)mallocCheck((size_t)(cap + 1) * sizeof(cudaEvent_t));  // + the closing event
    p->regions = (int *)mallocCheck((size_t)cap * sizeof(int));
    for (int i = 0; i <= cap; i++) cudaCheck(cudaEventCreate(&p->events[i]));
}

// Starts writing the device memory in use at each mark to f: {"step", "mark", "region", "used", "total"}
// (bytes; region "step end" closes a step).
static inline void step_profile_trace_memory(StepProfile *p, FILE *f) { p->mem_trace = f; }

// Waits for stream st and writes the device memory in use, as a sample opening `region_name`.
static inline void step_profile_sample(StepProfile *p, int mark, const char *region_name, cudaStream_t st) {
    size_t free_bytes = 0, total = 0;
    cudaCheck(cudaStreamSynchronize(st));
    cudaCheck(cudaMemGetInfo(&free_bytes, &total));
    fprintf(p->mem_trace, "{\"step\": %d, \"mark\": %d, \"region\": \"%s\", \"used\": %zu, \"total\": %zu}\n",
            p->traced_steps, mark, region_name, total - free_bytes, total);
}

// Opens `region` at this point of stream st (closing the region open before). No-op when p is NULL.
static inline void step_profile_mark(StepProfile *p, ProfRegion region, cudaStream_t st) {
    if (p == NULL || p->muted > 0) return;
    if (p->n >= p->cap) die("--profile: more than %d regions in one step", p->cap);
    if (p->mem_trace != NULL) step_profile_sample(p, p->n, prof_region_names[region], st);
    cudaCheck(cudaEventRecord(p->events[p->n], st));
    p->regions[p->n++] = (int)region;
}

// Closes the step: waits for its last mark and adds each region's time to the totals.
static inline void step_profile_end_step(StepProfile *p, cudaStream_t st) {
    if (p == NULL || p->n == 0) return;
    if (p->mem_trace != NULL) {
        step_profile_sample(p, p->n, "step end", st);
        p->traced_steps++;
    }
    cudaCheck(cudaEventRecord(p->events[p->n], st));
    cudaCheck(cudaEventSynchronize(p->events[p->n]));
    for (int i = 0; i < p->n; i++) {
        float ms;
        cudaCheck(cudaEventElapsedTime(&ms, p->events[i], p->events[i + 1]));
        p->ms[p->regions[i]] += ms;
        p->marks[p->regions[i]]++;
    }
    p->n = 0;
    p->steps++;
}

// Forgets the steps so far (the first, warm-up steps).
static inline void step_profile_reset(StepProfile *p) {
    memset(p->ms, 0, sizeof(p->ms));
    memset(p->marks, 0, sizeof(p->marks));
    p->steps = 0;
}

// Table: region, ms per step, share of the profiled time, regions opened per step.
static inline void step_profile_print(const StepProfile *p, FILE *f) {
    if (p->steps == 0) {
        fprintf(f, "profile: no step was measured\n");
        return;
    }
    double total = 0.0;
    for (int r = 0; r < PROF_COUNT; r++) total += p->ms[r];
    fprintf(f, "profile: GPU time per step by region, mean of %d steps (%.1f ms a step)\n", p->steps, total / p->steps);
    fprintf(f, "  %-22s %10s %7s %8s\n", "region", "ms/step", "share", "marks");
    for (int r = 0; r < PROF_COUNT; r++) {
        if (p->marks[r] == 0) continue;
        fprintf(f, "  %-22s %10.2f %6.1f%% %8ld\n", prof_region_names[r], p->ms[r] / p->steps, 100.0 * p->ms[r] / total,
                p->marks[r] / p->steps);
    }
}

static inline void step_profile_free(StepProfile *p) {
    for (int i = 0; i <= p->cap; i++) cudaCheck(cudaEventDestroy(p->events[i]));
    free(p->events);
    free(p->regions);
}

#endif  // STEP_PROFILE_H

// Causal self-attention through cuDNN's fused flash attention (SDPA fprop / bprop), with GQA and an
// optional sliding window; O(S) memory. Built graphs are cached per shape. C interface; the
// implementation (attention_cudnn.cpp) uses the cudnn-frontend C++ headers.
#ifndef ATTENTION_H
#define ATTENTION_H

#include "cuda_utils.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int B, S;            // batch, sequence length (tokens of this rank)
    int Hq, Hkv, hd;     // query heads, key/value heads (divides Hq), head dim
    float scale;         // multiplies q.k (1/sqrt(hd) or the family's query scale)
    int window;          // 0: full causal; else each query sees the last `window` keys incl. itself
    float softcap;       // 0: none. cuDNN cannot soft-cap: attention_supported() says no when > 0 (see below)
    int head_groups;     // backward only: G calls over Hq/G query heads and their Hkv/G kv heads each, so
                         // cuDNN's fp32 workspace is about 1/G as large; 0 or 1: one call. G divides Hkv.
} AttentionShape;

void attention_init(void);
void attention_free(void);
// 1 when the cuDNN path handles the shape; else 0 with a reason in `why`.
int attention_supported(const AttentionShape *shape, char *why, size_t why_len);
// Device workspace the forward/backward of this shape need (cuDNN's own figure; the backward's for
// one of its head_groups calls).
size_t attention_workspace_bytes(const AttentionShape *shape);

// qkv (B*S, (Hq + 2 Hkv) * hd) bf16, RoPE already applied: q heads, then k heads, then v heads.
// out (B*S, Hq * hd) bf16; stats (B, Hq, S) fp32 log-sum-exp kept for the backward.
void attention_forward(bf16 *out, float *stats, const bf16 *qkv, const AttentionShape *shape,
                       void *workspace, cudaStream_t stream);
// dqkv (B*S, (Hq + 2 Hkv) * hd) = gradients of q, k, v in qkv's layout, in shape->head_groups calls.
void attention_backward(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats, const bf16 *qkv,
                        const AttentionShape *shape, void *workspace, cudaStream_t stream);

// The backward of one head group of shape->head_groups (>= 2) with packed per-group buffers, for a
// caller that keeps only one group's gradients at a time: dout_g (B*S, hq hd) = the gradient of the
// group's columns of out; dqkv_g (B*S, (hq + 2 hk) hd), row = [dq | dk | dv] of the group's hq = Hq/G
// query and hk = Hkv/G kv heads (every element written). out, stats, qkv are the whole buffers.
void attention_backward_group(bf16 *dqkv_g, const bf16 *dout_g, const bf16 *out, const float *stats, const bf16 *qkv,
                              const AttentionShape *shape, int group, void *workspace, cudaStream_t stream);
// Device workspace of the forward and of attention_backward_group's graph (head_groups >= 2).
size_t attention_group_workspace_bytes(const AttentionShape *shape);

// ---- soft-capped attention (attention_softcap.cu): our own flash-attention-2 kernels on tensor cores
// for what cuDNN cannot do, scores z = softcap * tanh(scale q.k / softcap) before the mask and softmax
// (Gemma-2). Same layouts and mask as above; deterministic (no atomics). Head dims up to 256, multiples of 8.
// 1 when the soft-cap kernels handle the shape (softcap > 0 among the rest); else 0 with a reason.
int attention_softcap_supported(const AttentionShape *shape, char *why, size_t why_len);
// Device workspace the backward needs: B * Hq * S floats (the rowwise dO . O).
size_t attention_softcap_workspace_bytes(const AttentionShape *shape);
// out (B*S, Hq hd) bf16 and stats (B, Hq, S) fp32 log-sum-exp of the capped scores, from qkv.
void attention_softcap_forward(bf16 *out, float *stats, const bf16 *qkv, const AttentionShape *shape,
                               cudaStream_t stream);
// dqkv (B*S, (Hq + 2 Hkv) hd): every element written.
void attention_softcap_backward(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats, const bf16 *qkv,
                                const AttentionShape *shape, void *workspace, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif  // ATTENTION_H

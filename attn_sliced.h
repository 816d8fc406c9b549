// The attention backward of one layer group by group, with only one head group's gradients in
// memory at a time (mst.h attn_bwd_sliced): for each of the shape's head_groups G groups,
//   datt_g (N, hq hd)            = dao (N, d) Wo[:, the group's columns]        (gemm_strided)
//   dqkv_g (N, (hq + 2 hk) hd)   = cuDNN backward of the group (attention_backward_group)
//   qkv[:, the group's q, k, v columns] := dqkv_g's dq, dk, dv                  (strided copies)
// hq = Hq / G, hk = Hkv / G; N = B S tokens. The group's q, k, v are read only by its own cuDNN call,
// so once it is done their columns are free: after the last group qkv holds the whole dq|dk|dv in
// the layout of attention_backward's dqkv (before the inverse RoPE), and no full-size dqkv or datt
// buffer ever exists.
#ifndef ATTN_SLICED_H
#define ATTN_SLICED_H

#include "attention.h"

// qkv (N, (Hq + 2 Hkv) hd): q|k|v with RoPE applied on entry, dq|dk|dv on return. dao (N, d_model):
// gradient of the o-projection's output; Wo (d_model, Hq hd); att (N, Hq hd) and stats (B, Hq, S):
// the forward's output and log-sum-exp. datt_g, dqkv_g: scratch of one group (sizes above).
// shape->head_groups >= 2 (attention_backward_group); workspace: attention_group_workspace_bytes.
void attention_backward_sliced(bf16 *qkv, bf16 *dqkv_g, bf16 *datt_g, const bf16 *dao, const bf16 *Wo, const bf16 *att,
                               const float *stats, const AttentionShape *shape, int d_model, void *workspace,
                               cudaStream_t stream);

#endif  // ATTN_SLICED_H

// Launchers of the device kernels in mst_kernels.cu. Every launcher is asynchronous on `stream`
// and checks its launch. Shapes are written (rows, cols), row-major; N is a number of tokens.
// All reductions accumulate in fp32; bf16 is only the storage type.
#ifndef MST_KERNELS_H
#define MST_KERNELS_H

#include "cuda_utils.h"

// ---- embedding ----
// out (N, d) = embed[tokens[n]] * scale.
void embedding_forward(bf16 *out, const int32_t *tokens, const bf16 *embed, int N, int d, float scale,
                       cudaStream_t stream);
// dembed[tok] += scale * sum of dout rows whose token is tok, deterministic: the host groups the
// positions by token (unique_tokens[u] owns positions[offsets[u] .. offsets[u+1])), one block per
// unique token sums its rows in a fixed order. dembed is fp32 or bf16 (dembed_type).
void embedding_backward(void *dembed, DType dembed_type, const bf16 *dout, const int32_t *unique_tokens,
                        const int32_t *offsets, const int32_t *positions, int n_unique, int d, float scale,
                        cudaStream_t stream);

// ---- RMSNorm ----  y = x * rstd * (w + w_offset), rstd = 1 / sqrt(mean(x^2) + eps)
// w_offset is 1 for Gemma (weights stored as w - 1), else 0.
void rmsnorm_forward(bf16 *y, float *rstd, const bf16 *x, const bf16 *w, int N, int d, float eps,
                     float w_offset, cudaStream_t stream);
// dx = (accumulate ? dx : 0) + d(y)/d(x) . dy; dw_fp32 (d) += sum over rows of dy * x * rstd
// (dw_fp32 NULL: a frozen weight, no gradient).
// `scratch` holds ceil(N / rmsnorm_rows_per_block()) * d floats of per-block partial sums, so the
// weight-gradient reduction is deterministic (no atomics).
void rmsnorm_backward(bf16 *dx, float *dw_fp32, float *scratch, const bf16 *dy, const bf16 *x,
                      const bf16 *w, const float *rstd, int N, int d, float w_offset, int accumulate,
                      cudaStream_t stream);
int rmsnorm_rows_per_block(void);

// ---- RoPE ----  rotates dims (i, i + hd/2) of every q and k head by angle pos * inv_freq[i].
// qkv (N, (Hq + 2 Hkv) * hd): q heads, then k heads, then v heads (v untouched).
// pos of row n = pos_offset + n % S. cos_sin (max_pos, hd) fp32: [cos(hd/2) | sin(hd/2)] per position,
// from rope_table_fill() (Llama-3 scaling included). inverse = 1 rotates by -angle (backward).
void rope_apply(bf16 *qkv, const float *cos_sin, int N, int S, int pos_offset, int Hq, int Hkv, int hd,
                int inverse, cudaStream_t stream);
// Host: fills the (max_pos, hd) table in double precision, rounded to float.
void rope_table_fill(float *cos_sin_host, int max_pos, int hd, float theta, int scaling, float factor,
                     float low_freq_factor, float high_freq_factor, int orig_max_pos);

// ---- gated MLP activation ----  gate_up (N, 2F) = [gate | up] -> h (N, F) = act(gate) * up
// act: ACT_SILU (SwiGLU) or ACT_GELU_TANH (GeGLU).
void glu_forward(bf16 *h, const bf16 *gate_up, int N, int F, int activation, cudaStream_t stream);
// dgate_up (N, 2F) = [dh * up * act'(gate) | dh * act(gate)]. dgate_up may alias gate_up.
void glu_backward(bf16 *dgate_up, const bf16 *dh, const bf16 *gate_up, int N, int F, int activation,
                  cudaStream_t stream);

// ---- elementwise ----
// x (n) += y (n).
void residual_add(bf16 *x, const bf16 *y, size_t n, cudaStream_t stream);
// out (n) = (bf16) in (n) and back.
void cast_fp32_to_bf16(bf16 *out, const float *in, size_t n, cudaStream_t stream);
void cast_bf16_to_fp32(float *out, const bf16 *in, size_t n, cudaStream_t stream);
// dst (n) += src (n) with dst fp32 or bf16 (dst_type), src bf16: folds a bf16 gradient into a buffer.
void accumulate_into(void *dst, DType dst_type, const bf16 *src, size_t n, cudaStream_t stream);

// ---- random init (benchmark presets) ----
// Element i of a random tensor is std * N(0, 1) from a counter-based generator of (seed, i) alone:
// splitmix64 of pair i/2 gives two 24-bit uniforms, Box-Muller turns them into the pair's two normals.
// The same function runs on the host (tests), so the values do not depend on the launch shape.
__host__ __device__ inline float random_normal_at(uint64_t seed, uint64_t i) {
    uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i / 2 + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    float u1 = (float)((z >> 40) + 1) * (1.0f / 16777216.0f);  // (0, 1]
    float u2 = (float)(z & 0xFFFFFFull) * (1.0f / 16777216.0f);  // [0, 1)
    float r = sqrtf(-2.0f * logf(u1)), a = 6.2831853f * u2;
    return (i & 1) ? r * sinf(a) : r * cosf(a);
}
// out (n) = bf16(std * random_normal_at(seed, first + k)) for k < n.
void random_normal_fill(bf16 *out, size_t n, uint64_t seed, uint64_t first, float std, cudaStream_t stream);
// out (n) = bf16(value).
void constant_fill(bf16 *out, size_t n, float value, cudaStream_t stream);

// ---- cross-entropy over vocabulary chunks (the LM head never holds S x V logits) ----
// targets[n] < 0 means "no loss at this token". softcap > 0 applies cap * tanh(z / cap) to logits.
// Running state per row, fp32: row_max, row_sum (of exp(z - row_max)), target_logit.
// ce_state_init sets row_max = -inf, row_sum = 0, target_logit = 0.
void ce_state_init(float *row_max, float *row_sum, float *target_logit, int N, cudaStream_t stream);
// Folds one tile of logits (N, Vc) fp32 holding vocabulary ids [v0, v0 + Vc) into the running state.
void ce_online_update(float *row_max, float *row_sum, float *target_logit, const float *logits, int N,
                      int Vc, int v0, const int32_t *targets, float softcap, cudaStream_t stream);
// lse[n] = row_max + log(row_sum); losses[n] = lse - target_logit for a valid target, else 0.
void ce_finalize(float *lse, float *losses, const float *row_max, const float *row_sum,
                 const float *target_logit, const int32_t *targets, int N, cudaStream_t stream);
// dlogits (N, Vc) bf16 = grad_scale * (softmax - onehot) for the tile, through the soft-cap's
// derivative; zero rows where targets[n] < 0. grad_scale is usually 1 / (number of valid targets).
void ce_backward_tile(bf16 *dlogits, const float *logits, const float *lse, int N, int Vc, int v0,
                      const int32_t *targets, float softcap, float grad_scale, cudaStream_t stream);
// out[0] = sum of losses[0..N) in a fixed order (deterministic), fp32.
void sum_reduce(float *out, const float *losses, int N, cudaStream_t stream);

// ---- optimizer ----
typedef struct {
    float lr, beta1, beta2, eps;
    float weight_decay;   // decoupled; the caller passes 0 for tensors that are not decayed
    float grad_scale;     // multiplies every gradient first (clipping, 1 / accumulation steps)
    int step;             // 1-based, for the bias corrections
    uint32_t seed;        // stochastic rounding of the bf16 weights (one stream per tensor + step)
    uint64_t index_base;  // index of the first element in its tensor: a part updated on its own (ZeRO)
                          // draws the same rounding bits as the whole tensor would (0 for a whole tensor)
} AdamWParams;
// One fused AdamW step over n elements: param bf16 (and master fp32 when non-NULL: updated in fp32,
// param = round(master)); grad fp32 or bf16; moments m, v fp32 or bf16. Without a master copy the
// new bf16 weight is written with stochastic rounding, bits from (seed, index_base + element index).
// sumsq_partials non-NULL: the same pass adds the gradient's squares to them, as grad_norm_accumulate
// does (one read of the gradient, not two).
void adamw_update(bf16 *param, float *master, const void *grad, DType grad_type, void *m, void *v,
                  DType moment_type, size_t n, const AdamWParams *p, float *sumsq_partials, cudaStream_t stream);
// The same step with 8-bit moments (adamw8bit.h: format, code books, math; adamw8bit_update_cpu
// is its CPU twin, bit for bit): m_codes, v_codes (n) uint8 and m_absmax, v_absmax (ceil(n / 256))
// fp32 of one tensor are decoded, updated and re-encoded with new block scales in place.
// sumsq_partials as adamw_update's.
void adamw8bit_update(bf16 *param, float *master, const void *grad, DType grad_type, uint8_t *m_codes, float *m_absmax,
                      uint8_t *v_codes, float *v_absmax, size_t n, const AdamWParams *p, float *sumsq_partials,
                      cudaStream_t stream);
// sumsq_partials[0 .. grad_norm_partials()) += per-block partial sums of grad^2 (deterministic);
// grad_norm_finish sums them into out[0]. The caller zeroes the partials once per step.
void grad_norm_accumulate(float *sumsq_partials, const void *grad, DType grad_type, size_t n, cudaStream_t stream);
void grad_norm_finish(float *out, const float *sumsq_partials, cudaStream_t stream);
int grad_norm_partials(void);

#endif  // MST_KERNELS_H

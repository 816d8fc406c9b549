// GEMMs through cuBLASLt: bf16 inputs, fp32 accumulation, output bf16 or fp32, optional bias and
// beta (accumulate into the output). Row-major language throughout.
#ifndef MATMUL_H
#define MATMUL_H

#include "cuda_utils.h"

// Creates the cuBLASLt handle and a workspace of `workspace_bytes` on the device.
void matmul_init(size_t workspace_bytes);
void matmul_free(void);

// D (M, N) = alpha * op(A) op(B) + beta * D  [+ bias (N) broadcast over rows, bf16, may be NULL]
//   op(A) is (M, K): A stored (M, K) when trans_a == 0, stored (K, M) when trans_a == 1.
//   op(B) is (K, N): B stored (K, N) when trans_b == 0, stored (N, K) when trans_b == 1.
// D is bf16 or fp32 (d_type). All pointers 16-byte aligned; D may not alias A or B.
void gemm(void *D, DType d_type, const bf16 *A, int trans_a, const bf16 *B, int trans_b, int M, int N,
          int K, float alpha, float beta, const bf16 *bias, cudaStream_t stream);

// gemm() on operands that are column slices of wider row-major matrices (e.g. one head group's
// columns): lda, ldb, ldd are the elements from one stored row to the next (>= the stored columns:
// K or M for A as stored, N or K for B, N for D; each row 16-byte aligned). No bias.
void gemm_strided(void *D, DType d_type, int ldd, const bf16 *A, int lda, int trans_a, const bf16 *B, int ldb,
                  int trans_b, int M, int N, int K, float alpha, float beta, cudaStream_t stream);

// Linear layer helpers in the Hugging Face orientation: weight W (out, in).
// out (N, out) = inp (N, in) W^T [+ bias] [+ out when accumulate] ; out_type bf16 or fp32.
void linear_forward(void *out, DType out_type, const bf16 *inp, const bf16 *W, const bf16 *bias,
                    int N, int in, int out_features, int accumulate, cudaStream_t stream);
// dinp (N, in) = dout (N, out) W [+ dinp when accumulate].
void linear_backward_input(bf16 *dinp, const bf16 *dout, const bf16 *W, int N, int in, int out_features,
                           int accumulate, cudaStream_t stream);
// dW (out, in) = dout^T (out, N) inp (N, in) [+ dW when accumulate] ; dW fp32 or bf16. The first
// write of a step overwrites, so nothing needs zeroing (and the GEMM does not read dW). dW NULL: a
// frozen weight, nothing to do.
void linear_backward_weight(void *dW, DType dw_type, const bf16 *dout, const bf16 *inp, int N, int in,
                            int out_features, int accumulate, cudaStream_t stream);
// dbias (out) fp32 += column sums of dout (N, out) (dbias NULL: frozen, nothing to do); `scratch` holds at least
// bias_grad_scratch_floats(N, out) floats (deterministic, no atomics).
void bias_backward(float *dbias, float *scratch, const bf16 *dout, int N, int out_features, cudaStream_t stream);
size_t bias_grad_scratch_floats(int N, int out_features);

#endif  // MATMUL_H

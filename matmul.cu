// GEMMs through cuBLASLt (bf16 inputs, fp32 accumulation, bf16 or fp32 output, bias epilogue, beta
// accumulation), the linear-layer helpers built on them, and the deterministic bias-gradient
// reduction. See matmul.h for the contracts.
//
// Layout mapping: cuBLASLt is column-major. A row-major matrix (r, c) with leading dimension c is the
// same memory as a column-major matrix (c, r) with leading dimension c. So the row-major product
// D (M, N) = op(A) (M, K) op(B) (K, N) is computed as the column-major product
// D^T (N, M) = op(B)^T (N, K) op(A)^T (K, M): cuBLASLt's first operand is our B, its second our A.
#include "matmul.h"

// One cached GEMM configuration: descriptors and the heuristic's algorithm for a shape. The same
// handful of shapes repeats in every layer, so the heuristic query runs once per shape.
typedef struct {
    int M, N, K, trans_a, trans_b, has_bias;
    int lda, ldb, ldd;  // leading dimensions (row-major: elements from one stored row to the next)
    DType d_type;
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t layout_a, layout_b, layout_d;  // layout_a/_b describe OUR A and B
    cublasLtMatmulAlgo_t algo;
} GemmPlan;

// Room for every shape of a training step: the base GEMMs, their tail chunks, and with LoRA six
// adapter GEMMs per fused group (a full table evicts round-robin and re-runs the heuristic).
#define GEMM_PLAN_CACHE_SIZE 256

typedef struct {
    cublasLtHandle_t handle;
    void *workspace;
    size_t workspace_bytes;
    GemmPlan plans[GEMM_PLAN_CACHE_SIZE];
    int n_plans;
    int next_evict;  // round-robin victim once the table is full
} MatmulState;

static MatmulState matmul_state;

void matmul_init(size_t workspace_bytes) {
    if (matmul_state.handle != NULL) die("matmul_init called twice");
    cublasCheck(cublasLtCreate(&matmul_state.handle));
    matmul_state.workspace_bytes = workspace_bytes;
    matmul_state.workspace = NULL;
    if (workspace_bytes > 0) cudaCheck(cudaMalloc(&matmul_state.workspace, workspace_bytes));
    matmul_state.n_plans = 0;
    matmul_state.next_evict = 0;
}

static void gemm_plan_destroy(GemmPlan *p) {
    cublasCheck(cublasLtMatrixLayoutDestroy(p->layout_a));
    cublasCheck(cublasLtMatrixLayoutDestroy(p->layout_b));
    cublasCheck(cublasLtMatrixLayoutDestroy(p->layout_d));
    cublasCheck(cublasLtMatmulDescDestroy(p->op));
}

void matmul_free(void) {
    if (matmul_state.handle == NULL) return;
    for (int i = 0; i < matmul_state.n_plans; i++) gemm_plan_destroy(&matmul_state.plans[i]);
    if (matmul_state.workspace != NULL) cudaCheck(cudaFree(matmul_state.workspace));
    cublasCheck(cublasLtDestroy(matmul_state.handle));
    memset(&matmul_state, 0, sizeof(matmul_state));
}

// Fills p's descriptors for its shape and asks the heuristic for the best algorithm.
static void gemm_plan_build(GemmPlan *p) {
    cudaDataType_t d_cuda = p->d_type == DT_FP32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasCheck(cublasLtMatmulDescCreate(&p->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // cuBLASLt's first operand is our B: stored col-major (N, K) when trans_b == 0 (no op), else (K, N) + T.
    cublasOperation_t op_first = p->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasOperation_t op_second = p->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    cublasCheck(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSA, &op_first, sizeof(op_first)));
    cublasCheck(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_TRANSB, &op_second, sizeof(op_second)));
    if (p->has_bias) {
        cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_BIAS;
        cudaDataType_t bias_type = CUDA_R_16BF;
        cublasCheck(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)));
        cublasCheck(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                   sizeof(bias_type)));
    }
    // Storage (column-major rows, cols, ld) of each operand.
    // Our B: row-major (K, N) = col-major (N, K) ld N; row-major (N, K) = col-major (K, N) ld K.
    // A row-major leading dimension is the column-major one of the transposed view.
    if (p->trans_b) cublasCheck(cublasLtMatrixLayoutCreate(&p->layout_b, CUDA_R_16BF, p->K, p->N, p->ldb));
    else cublasCheck(cublasLtMatrixLayoutCreate(&p->layout_b, CUDA_R_16BF, p->N, p->K, p->ldb));
    // Our A: row-major (M, K) = col-major (K, M) ld K; row-major (K, M) = col-major (M, K) ld M.
    if (p->trans_a) cublasCheck(cublasLtMatrixLayoutCreate(&p->layout_a, CUDA_R_16BF, p->M, p->K, p->lda));
    else cublasCheck(cublasLtMatrixLayoutCreate(&p->layout_a, CUDA_R_16BF, p->K, p->M, p->lda));
    // D: row-major (M, N) = col-major (N, M) ld N. C is D.
    cublasCheck(cublasLtMatrixLayoutCreate(&p->layout_d, d_cuda, p->N, p->M, p->ldd));

    cublasLtMatmulPreference_t pref;
    cublasCheck(cublasLtMatmulPreferenceCreate(&pref));
    size_t ws = matmul_state.workspace_bytes;
    cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    // matmul.h promises 16-byte aligned pointers, not the 256 bytes the heuristic assumes by default.
    uint32_t align = 16;
    const cublasLtMatmulPreferenceAttributes_t align_attrs[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; i++) {
        cublasCheck(cublasLtMatmulPreferenceSetAttribute(pref, align_attrs[i], &align, sizeof(align)));
    }

    cublasLtMatmulHeuristicResult_t result;
    int n_results = 0;
    cublasCheck(cublasLtMatmulAlgoGetHeuristic(matmul_state.handle, p->op, p->layout_b, p->layout_a, p->layout_d,
                                               p->layout_d, pref, 1, &result, &n_results));
    cublasCheck(cublasLtMatmulPreferenceDestroy(pref));
    if (n_results == 0) {
        die("cuBLASLt has no algorithm for gemm M=%d N=%d K=%d trans_a=%d trans_b=%d lda=%d ldb=%d ldd=%d d_type=%s "
            "bias=%d (workspace %zu bytes)", p->M, p->N, p->K, p->trans_a, p->trans_b, p->lda, p->ldb, p->ldd,
            p->d_type == DT_FP32 ? "fp32" : "bf16", p->has_bias, matmul_state.workspace_bytes);
    }
    cublasCheck(result.state);
    p->algo = result.algo;
}

// The cached plan for this shape, built on first use.
static GemmPlan *gemm_plan_get(int M, int N, int K, int trans_a, int trans_b, int lda, int ldb, int ldd, DType d_type,
                               int has_bias) {
    for (int i = 0; i < matmul_state.n_plans; i++) {
        GemmPlan *p = &matmul_state.plans[i];
        if (p->M == M && p->N == N && p->K == K && p->trans_a == trans_a && p->trans_b == trans_b && p->lda == lda &&
            p->ldb == ldb && p->ldd == ldd && p->d_type == d_type && p->has_bias == has_bias) {
            return p;
        }
    }
    GemmPlan *p;
    if (matmul_state.n_plans < GEMM_PLAN_CACHE_SIZE) {
        p = &matmul_state.plans[matmul_state.n_plans++];
    } else {
        p = &matmul_state.plans[matmul_state.next_evict];
        matmul_state.next_evict = (matmul_state.next_evict + 1) % GEMM_PLAN_CACHE_SIZE;
        gemm_plan_destroy(p);
    }
    p->M = M;
    p->N = N;
    p->K = K;
    p->trans_a = trans_a;
    p->trans_b = trans_b;
    p->lda = lda;
    p->ldb = ldb;
    p->ldd = ldd;
    p->d_type = d_type;
    p->has_bias = has_bias;
    gemm_plan_build(p);
    return p;
}

// D (M, N) fp32 += bias (N) bf16 broadcast over rows. One thread per element.
__global__ void add_bias_fp32_kernel(float *D, const bf16 *bias, int M, int N) {
    size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (size_t)M * N) return;
    D[idx] += __bfloat162float(bias[idx % N]);
}

static void check_aligned(const void *ptr, const char *what) {
    if (ptr == NULL) die("gemm: %s pointer is NULL", what);
    if (((uintptr_t)ptr) % 16 != 0) die("gemm: %s pointer %p is not 16-byte aligned", what, ptr);
}

// The GEMM of gemm() and gemm_strided(): leading dimensions already checked.
static void gemm_run(void *D, DType d_type, int ldd, const bf16 *A, int lda, int trans_a, const bf16 *B, int ldb,
                     int trans_b, int M, int N, int K, float alpha, float beta, const bf16 *bias, cudaStream_t stream) {
    if (M <= 0 || N <= 0 || K <= 0) die("gemm: bad shape M=%d N=%d K=%d", M, N, K);
    check_aligned(D, "D");
    check_aligned(A, "A");
    check_aligned(B, "B");
    if (bias != NULL) check_aligned(bias, "bias");
    if (matmul_state.handle == NULL) die("gemm: matmul_init was not called");
    // cuBLASLt's bias epilogue takes a bias of D's type; a bf16 bias on an fp32 D is added by our kernel.
    int epilogue_bias = bias != NULL && d_type == DT_BF16;
    GemmPlan *p = gemm_plan_get(M, N, K, trans_a ? 1 : 0, trans_b ? 1 : 0, lda, ldb, ldd, d_type, epilogue_bias);
    if (epilogue_bias) {
        cublasCheck(cublasLtMatmulDescSetAttribute(p->op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)));
    }
    cublasCheck(cublasLtMatmul(matmul_state.handle, p->op, &alpha, B, p->layout_b, A, p->layout_a, &beta, D,
                               p->layout_d, D, p->layout_d, &p->algo, matmul_state.workspace,
                               matmul_state.workspace_bytes, stream));
    if (bias != NULL && d_type == DT_FP32) {
        size_t n = (size_t)M * N;
        const int block = 256;
        add_bias_fp32_kernel<<<(unsigned)ceil_div_size(n, block), block, 0, stream>>>((float *)D, bias, M, N);
        cudaCheckLaunch();
    }
}

void gemm(void *D, DType d_type, const bf16 *A, int trans_a, const bf16 *B, int trans_b, int M, int N, int K,
          float alpha, float beta, const bf16 *bias, cudaStream_t stream) {
    gemm_run(D, d_type, N, A, trans_a ? M : K, trans_a, B, trans_b ? K : N, trans_b, M, N, K, alpha, beta, bias, stream);
}

// Dies unless ld (elements) covers the stored row of `cols` elements and keeps every row 16-byte aligned.
static void check_ld(int ld, int cols, size_t elem_bytes, const char *what) {
    if (ld < cols || ((size_t)ld * elem_bytes) % 16 != 0)
        die("gemm_strided: leading dimension %s = %d must be >= its %d stored columns and a multiple of 16 bytes", what,
            ld, cols);
}

void gemm_strided(void *D, DType d_type, int ldd, const bf16 *A, int lda, int trans_a, const bf16 *B, int ldb,
                  int trans_b, int M, int N, int K, float alpha, float beta, cudaStream_t stream) {
    check_ld(lda, trans_a ? M : K, sizeof(bf16), "lda");
    check_ld(ldb, trans_b ? K : N, sizeof(bf16), "ldb");
    check_ld(ldd, N, d_type == DT_FP32 ? sizeof(float) : sizeof(bf16), "ldd");
    gemm_run(D, d_type, ldd, A, lda, trans_a, B, ldb, trans_b, M, N, K, alpha, beta, NULL, stream);
}

void linear_forward(void *out, DType out_type, const bf16 *inp, const bf16 *W, const bf16 *bias, int N, int in,
                    int out_features, int accumulate, cudaStream_t stream) {
    gemm(out, out_type, inp, 0, W, 1, N, out_features, in, 1.0f, accumulate ? 1.0f : 0.0f, bias, stream);
}

void linear_backward_input(bf16 *dinp, const bf16 *dout, const bf16 *W, int N, int in, int out_features,
                           int accumulate, cudaStream_t stream) {
    gemm(dinp, DT_BF16, dout, 0, W, 0, N, in, out_features, 1.0f, accumulate ? 1.0f : 0.0f, NULL, stream);
}

void linear_backward_weight(void *dW, DType dw_type, const bf16 *dout, const bf16 *inp, int N, int in,
                            int out_features, int accumulate, cudaStream_t stream) {
    if (dW == NULL) return;  // a frozen weight
    gemm(dW, dw_type, dout, 1, inp, 0, out_features, in, N, 1.0f, accumulate ? 1.0f : 0.0f, NULL, stream);
}

// ---- bias gradient: column sums of dout (N, out), deterministic ----
#define BIAS_GRAD_ROWS_PER_BLOCK 256
#define BIAS_GRAD_COLS_PER_BLOCK 32
#define BIAS_GRAD_ROW_LANES 8

size_t bias_grad_scratch_floats(int N, int out_features) {
    return (size_t)ceil_div(N, BIAS_GRAD_ROWS_PER_BLOCK) * (size_t)out_features;
}

// partial (n_row_blocks, out): partial[rb][c] = sum of dout[r][c] over the rows r of row block rb, in a
// fixed order. Block (32, 8) threads covers 32 columns x BIAS_GRAD_ROWS_PER_BLOCK rows.
__global__ void bias_grad_partial_kernel(float *partial, const bf16 *dout, int N, int out_features) {
    __shared__ float lane_sums[BIAS_GRAD_ROW_LANES][BIAS_GRAD_COLS_PER_BLOCK + 1];
    int c = blockIdx.x * BIAS_GRAD_COLS_PER_BLOCK + threadIdx.x;
    int r0 = blockIdx.y * BIAS_GRAD_ROWS_PER_BLOCK;
    int r1 = min(r0 + BIAS_GRAD_ROWS_PER_BLOCK, N);
    float sum = 0.0f;
    if (c < out_features) {
        for (int r = r0 + threadIdx.y; r < r1; r += BIAS_GRAD_ROW_LANES) {
            sum += __bfloat162float(dout[(size_t)r * out_features + c]);
        }
    }
    lane_sums[threadIdx.y][threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.y == 0 && c < out_features) {
        float total = 0.0f;
        for (int l = 0; l < BIAS_GRAD_ROW_LANES; l++) total += lane_sums[l][threadIdx.x];
        partial[(size_t)blockIdx.y * out_features + c] = total;
    }
}

// dbias (out) += sum over row blocks of partial (n_row_blocks, out), in row-block order.
__global__ void bias_grad_finalize_kernel(float *dbias, const float *partial, int n_row_blocks, int out_features) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= out_features) return;
    float total = 0.0f;
    for (int rb = 0; rb < n_row_blocks; rb++) total += partial[(size_t)rb * out_features + c];
    dbias[c] += total;
}

void bias_backward(float *dbias, float *scratch, const bf16 *dout, int N, int out_features, cudaStream_t stream) {
    if (dbias == NULL) return;  // a frozen bias
    if (N <= 0 || out_features <= 0) die("bias_backward: bad shape N=%d out=%d", N, out_features);
    int n_row_blocks = ceil_div(N, BIAS_GRAD_ROWS_PER_BLOCK);
    if (n_row_blocks > 65535) {
        die("bias_backward: N=%d exceeds the %d rows one launch covers", N, 65535 * BIAS_GRAD_ROWS_PER_BLOCK);
    }
    dim3 grid(ceil_div(out_features, BIAS_GRAD_COLS_PER_BLOCK), n_row_blocks);
    dim3 block(BIAS_GRAD_COLS_PER_BLOCK, BIAS_GRAD_ROW_LANES);
    bias_grad_partial_kernel<<<grid, block, 0, stream>>>(scratch, dout, N, out_features);
    cudaCheckLaunch();
    const int threads = 256;
    bias_grad_finalize_kernel<<<ceil_div(out_features, threads), threads, 0, stream>>>(dbias, scratch, n_row_blocks,
                                                                                      out_features);
    cudaCheckLaunch();
}

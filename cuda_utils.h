// CUDA-side helpers: the bf16 type, and checks that print file, line and the library's own
// error string for every CUDA runtime, cuBLAS(Lt), cuDNN and NCCL call, then exit.
#ifndef CUDA_UTILS_H
#define CUDA_UTILS_H

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "utils.h"

typedef __nv_bfloat16 bf16;

// Element type of a buffer whose precision is a run-time choice (gradients, optimizer moments).
typedef enum { DT_BF16 = 0, DT_FP32 = 1 } DType;

static inline size_t dtype_bytes(DType t) { return t == DT_FP32 ? 4 : 2; }

static inline void cuda_check(cudaError_t err, const char *file, int line) {
    if (err != cudaSuccess) die("CUDA: %s [%s:%d]", cudaGetErrorString(err), file, line);
}
#define cudaCheck(call) cuda_check((call), __FILE__, __LINE__)

// After a kernel launch: catches launch-configuration errors at the launch site.
#define cudaCheckLaunch() cuda_check(cudaGetLastError(), __FILE__, __LINE__)

static inline void cublas_check(cublasStatus_t status, const char *file, int line) {
    if (status != CUBLAS_STATUS_SUCCESS) die("cuBLAS: %s (%d) [%s:%d]", cublasGetStatusString(status), (int)status, file, line);
}
#define cublasCheck(call) cublas_check((call), __FILE__, __LINE__)

// Number of CUDA devices usable by this process (0 when there is no GPU or no driver).
static inline int cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no device" error
        return 0;
    }
    return n;
}

static inline int ceil_div(int a, int b) { return (a + b - 1) / b; }
static inline size_t ceil_div_size(size_t a, size_t b) { return (a + b - 1) / b; }

#endif  // CUDA_UTILS_H

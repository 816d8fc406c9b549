// Checks gemm(), the linear-layer helpers and bias_backward() (matmul.cu) against a double-precision
// CPU reference on random bf16 inputs, then times the GEMMs of one Llama-3-8B training step.
//
// Build (from the repository root):
//   nvcc -O3 -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -I. -Xcompiler -Wall
//        dev/test_matmul.cu matmul.cu -o test_matmul -lcublasLt -lcublas
// Run: ./test_matmul [peak_tflops]   (peak used for the "% of roofline" column; default 800)
// Exit status: 0 all checks passed (or no GPU: skipped, said so), 1 a check failed.
//
// Tolerances (on ||gpu - ref|| / ||ref||; the reference uses the same bf16-rounded inputs):
// - bf16 output: the only error left once the fp32 accumulation is done is the final rounding to
//   bf16, at most 2^-9 relative per element (about 2^-9 / sqrt(3) = 1.1e-3 as an rms); 4e-3 leaves
//   room for the fp32 accumulation error and for beta/bias added before rounding.
// - fp32 output: products of two bf16 numbers are exact in fp32, so the only error is the fp32
//   accumulation over K terms, about 2^-24 * sqrt(K) relative as a random walk (3e-6 at K = 2048),
//   a few times more with the tensor cores' truncating alignment; 2e-5 is 100x below what a bf16
//   intermediate rounding would give, so a wrong precision fails, as does any layout mistake (~1).
// - bias gradient (fp32 sums of up to N bf16 values): same argument, 1e-5.
#include <math.h>
#include "matmul.h"
#include "tests/test_util.h"

#define TOL_BF16_OUT 4e-3
#define TOL_FP32_OUT 2e-5
#define TOL_BIAS_GRAD 1e-5

// ---- host random numbers (splitmix64), reproducible across runs ----
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [0, 1).
static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }

// bf16 bits of a random value with magnitude in [0.125, 1) and a random sign: never zero.
static uint16_t random_bf16_nonzero(void) {
    double mag = 0.125 + 0.875 * rng_uniform();
    float v = (float)((rng_next() & 1) ? -mag : mag);
    return float_to_bf16_bits(v);
}

static void fill_bf16_nonzero(uint16_t *h, size_t n) {
    for (size_t i = 0; i < n; i++) h[i] = random_bf16_nonzero();
}

static uint16_t *upload_bf16(const uint16_t *h, size_t n) {
    uint16_t *d;
    cudaCheck(cudaMalloc(&d, n * sizeof(uint16_t)));
    cudaCheck(cudaMemcpy(d, h, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
    return d;
}

// ---- comparison table (its own columns: the tolerance is on the relative l2 error) ----
// Prints one row: max abs err, max abs err / max |ref|, ||err|| / ||ref|| and the tolerance on it.
static void compare(TestReport *t, const char *name, const double *got, const double *ref, size_t n, double tol) {
    double max_abs = 0, max_ref = 0, err2 = 0, ref2 = 0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) {
        double e = fabs(got[i] - ref[i]);
        if (!isfinite(got[i])) finite = 0;
        if (e > max_abs) max_abs = e;
        if (fabs(ref[i]) > max_ref) max_ref = fabs(ref[i]);
        err2 += e * e;
        ref2 += ref[i] * ref[i];
    }
    double rel = sqrt(err2 / (ref2 > 0 ? ref2 : 1.0));
    int ok = finite && rel <= tol;
    printf("%-46s %10.3e %10.3e %10.3e %8.0e  %s\n", name, max_abs, max_abs / (max_ref > 0 ? max_ref : 1.0), rel,
           tol, ok ? "ok" : "FAIL");
    test_record(t, ok);
}

static void print_table_header(void) {
    printf("%-46s %10s %10s %10s %8s\n", "case", "max abs", "max/|ref|", "rel l2", "tol");
}

// ---- bad input: each must die with status 1 and a message naming the problem ----
// Fake device addresses: the checks run before any CUDA call, so nothing is dereferenced.
#define FAKE_PTR(addr) ((bf16 *)(uintptr_t)(addr))

// gemm (M, N, K) = (m, 8, 8) on fake pointers D, A, B.
static void gemm_fake(void *D, uintptr_t a, int m) {
    gemm(D, DT_BF16, FAKE_PTR(a), 0, FAKE_PTR(0x3000), 0, m, 8, 8, 1.0f, 0.0f, NULL, 0);
}
// Each runs in a forked child (test_expect_exit); the argument is unused.
static void gemm_zero_shape(void *) { gemm_fake(FAKE_PTR(0x1000), 0x2000, 0); }
static void gemm_misaligned(void *) { gemm_fake(FAKE_PTR(0x1000), 0x2002, 8); }
static void gemm_null(void *) { gemm_fake(NULL, 0x2000, 8); }
static void gemm_no_init(void *) { gemm_fake(FAKE_PTR(0x1000), 0x2000, 8); }
static void gemm_strided_short_ld(void *) {
    gemm_strided(FAKE_PTR(0x1000), DT_BF16, 8, FAKE_PTR(0x2000), 4, 0, FAKE_PTR(0x3000), 8, 0, 8, 8, 8, 1.0f, 0.0f, 0);
}
static void bias_backward_zero_rows(void *) {
    bias_backward((float *)FAKE_PTR(0x1000), (float *)FAKE_PTR(0x2000), FAKE_PTR(0x3000), 0, 8, 0);
}

static void check_bad_input(TestReport *t) {
    printf("bad input (run before matmul_init, no GPU needed):\n");
    test_expect_exit(t, "gemm M = 0", gemm_zero_shape, NULL, 1, "gemm: bad shape");
    test_expect_exit(t, "gemm misaligned A", gemm_misaligned, NULL, 1, "A pointer 0x2002 is not 16-byte aligned");
    test_expect_exit(t, "gemm NULL D", gemm_null, NULL, 1, "D pointer is NULL");
    test_expect_exit(t, "gemm before matmul_init", gemm_no_init, NULL, 1, "matmul_init was not called");
    test_expect_exit(t, "gemm_strided lda < K", gemm_strided_short_ld, NULL, 1, "leading dimension lda = 4 must be >= its 8");
    test_expect_exit(t, "bias_backward N = 0", bias_backward_zero_rows, NULL, 1, "bias_backward: bad shape");
}

// ---- reference GEMM in double ----
// ref (M, N) = alpha op(A) op(B) + beta d0 + bias; A, B bf16 bits stored as described in matmul.h.
static void reference_gemm(double *ref, const uint16_t *A, int trans_a, const uint16_t *B, int trans_b, int M,
                           int N, int K, double alpha, double beta, const double *d0, const uint16_t *bias) {
    double *a = (double *)mallocCheck((size_t)M * K * sizeof(double));   // op(A) (M, K)
    double *bt = (double *)mallocCheck((size_t)N * K * sizeof(double));  // op(B)^T (N, K)
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++)
            a[(size_t)m * K + k] = bf16_bits_to_float(trans_a ? A[(size_t)k * M + m] : A[(size_t)m * K + k]);
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            bt[(size_t)n * K + k] = bf16_bits_to_float(trans_b ? B[(size_t)n * K + k] : B[(size_t)k * N + n]);
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            const double *ar = a + (size_t)m * K, *br = bt + (size_t)n * K;
            double s = 0;
            for (int k = 0; k < K; k++) s += ar[k] * br[k];
            double v = alpha * s;
            if (beta != 0) v += beta * d0[(size_t)m * N + n];
            if (bias != NULL) v += bf16_bits_to_float(bias[n]);
            ref[(size_t)m * N + n] = v;
        }
    }
    free(a);
    free(bt);
}

// Device D buffer of d_type holding random nonzero values; d0 gets the same values in double.
static void *make_initial_d(DType d_type, size_t n, double *d0) {
    void *d;
    cudaCheck(cudaMalloc(&d, n * dtype_bytes(d_type)));
    if (d_type == DT_BF16) {
        uint16_t *h = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
        fill_bf16_nonzero(h, n);
        for (size_t i = 0; i < n; i++) d0[i] = bf16_bits_to_float(h[i]);
        cudaCheck(cudaMemcpy(d, h, n * sizeof(uint16_t), cudaMemcpyHostToDevice));
        free(h);
    } else {
        float *h = (float *)mallocCheck(n * sizeof(float));
        for (size_t i = 0; i < n; i++) {
            h[i] = (float)((rng_uniform() - 0.5) * 2.0 + ((rng_next() & 1) ? 1e-3 : -1e-3));
            d0[i] = h[i];
        }
        cudaCheck(cudaMemcpy(d, h, n * sizeof(float), cudaMemcpyHostToDevice));
        free(h);
    }
    return d;
}

static void download_d(double *out, const void *d, DType d_type, size_t n) {
    if (d_type == DT_BF16) {
        uint16_t *h = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
        cudaCheck(cudaMemcpy(h, d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; i++) out[i] = bf16_bits_to_float(h[i]);
        free(h);
    } else {
        float *h = (float *)mallocCheck(n * sizeof(float));
        cudaCheck(cudaMemcpy(h, d, n * sizeof(float), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < n; i++) out[i] = h[i];
        free(h);
    }
}

// One gemm() call against the reference.
static void check_gemm(TestReport *t, int M, int N, int K, int trans_a, int trans_b, DType d_type, int use_bias,
                       float alpha, float beta) {
    size_t na = (size_t)M * K, nb = (size_t)K * N, nd = (size_t)M * N;
    uint16_t *hA = (uint16_t *)mallocCheck(na * sizeof(uint16_t));
    uint16_t *hB = (uint16_t *)mallocCheck(nb * sizeof(uint16_t));
    uint16_t *hbias = (uint16_t *)mallocCheck((size_t)N * sizeof(uint16_t));
    double *d0 = (double *)mallocCheck(nd * sizeof(double));
    double *ref = (double *)mallocCheck(nd * sizeof(double));
    double *got = (double *)mallocCheck(nd * sizeof(double));
    fill_bf16_nonzero(hA, na);
    fill_bf16_nonzero(hB, nb);
    fill_bf16_nonzero(hbias, (size_t)N);
    uint16_t *dA = upload_bf16(hA, na), *dB = upload_bf16(hB, nb), *dbias = upload_bf16(hbias, (size_t)N);
    void *dD = make_initial_d(d_type, nd, d0);

    gemm(dD, d_type, (const bf16 *)dA, trans_a, (const bf16 *)dB, trans_b, M, N, K, alpha, beta,
         use_bias ? (const bf16 *)dbias : NULL, 0);
    cudaCheck(cudaDeviceSynchronize());
    download_d(got, dD, d_type, nd);
    reference_gemm(ref, hA, trans_a, hB, trans_b, M, N, K, alpha, beta, d0, use_bias ? hbias : NULL);

    char name[128];
    snprintf(name, sizeof(name), "gemm %dx%dx%d %c%c %s bias=%d a=%.1f b=%.0f", M, N, K, trans_a ? 'T' : 'N',
             trans_b ? 'T' : 'N', d_type == DT_FP32 ? "fp32" : "bf16", use_bias, alpha, beta);
    compare(t, name, got, ref, nd, d_type == DT_FP32 ? TOL_FP32_OUT : TOL_BF16_OUT);

    cudaCheck(cudaFree(dA));
    cudaCheck(cudaFree(dB));
    cudaCheck(cudaFree(dbias));
    cudaCheck(cudaFree(dD));
    free(hA);
    free(hB);
    free(hbias);
    free(d0);
    free(ref);
    free(got);
}

// Columns [off, off + cols) of a row-major (rows, ld) matrix, packed into (rows, cols).
static void take_columns(uint16_t *out, const uint16_t *parent, int rows, int cols, int ld, int off) {
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) out[(size_t)r * cols + c] = parent[(size_t)r * ld + off + c];
}

// Leading dimension of a matrix with `used` columns: rounded up to 8 elements, so that every row
// starts 16-byte aligned (gemm_strided refuses anything else).
static int aligned_ld(int used) { return (used + 7) / 8 * 8; }

// One gemm_strided() call: A, B and D are column slices (at column offset `off`, leading dimension
// stored columns + pad, rounded up to 8) of wider random matrices. The slice of D must match the
// reference on the packed slices; D's columns outside the slice must keep their initial values.
static void check_gemm_strided(TestReport *t, int M, int N, int K, int trans_a, int trans_b, DType d_type, float beta,
                               int off, int pad) {
    int ra = trans_a ? K : M, ca = trans_a ? M : K, rb = trans_b ? N : K, cb = trans_b ? K : N;
    int lda = aligned_ld(off + ca + pad), ldb = aligned_ld(off + cb + pad), ldd = aligned_ld(off + N + pad);
    size_t na = (size_t)ra * lda, nb = (size_t)rb * ldb, nd = (size_t)M * ldd;
    uint16_t *hA = (uint16_t *)mallocCheck(na * sizeof(uint16_t)), *hB = (uint16_t *)mallocCheck(nb * sizeof(uint16_t));
    uint16_t *pa = (uint16_t *)mallocCheck((size_t)ra * ca * sizeof(uint16_t));
    uint16_t *pb = (uint16_t *)mallocCheck((size_t)rb * cb * sizeof(uint16_t));
    double *d0 = (double *)mallocCheck(nd * sizeof(double)), *d0_slice = (double *)mallocCheck((size_t)M * N * sizeof(double));
    double *ref = (double *)mallocCheck((size_t)M * N * sizeof(double)), *got = (double *)mallocCheck(nd * sizeof(double));
    double *got_slice = (double *)mallocCheck((size_t)M * N * sizeof(double));
    fill_bf16_nonzero(hA, na);
    fill_bf16_nonzero(hB, nb);
    uint16_t *dA = upload_bf16(hA, na), *dB = upload_bf16(hB, nb);
    void *dD = make_initial_d(d_type, nd, d0);
    size_t eb = dtype_bytes(d_type);

    gemm_strided((char *)dD + (size_t)off * eb, d_type, ldd, (const bf16 *)dA + off, lda, trans_a, (const bf16 *)dB + off,
                 ldb, trans_b, M, N, K, 1.0f, beta, 0);
    cudaCheck(cudaDeviceSynchronize());
    download_d(got, dD, d_type, nd);
    take_columns(pa, hA, ra, ca, lda, off);
    take_columns(pb, hB, rb, cb, ldb, off);
    size_t outside_changed = 0;
    for (int m = 0; m < M; m++) {
        for (int c = 0; c < ldd; c++) {
            size_t i = (size_t)m * ldd + c;
            if (c >= off && c < off + N) {
                d0_slice[(size_t)m * N + c - off] = d0[i];
                got_slice[(size_t)m * N + c - off] = got[i];
            } else if (got[i] != d0[i]) {
                outside_changed++;
            }
        }
    }
    reference_gemm(ref, pa, trans_a, pb, trans_b, M, N, K, 1.0, beta, d0_slice, NULL);

    char name[128];
    snprintf(name, sizeof(name), "gemm_strided %dx%dx%d %c%c %s b=%.0f off=%d pad=%d", M, N, K, trans_a ? 'T' : 'N',
             trans_b ? 'T' : 'N', d_type == DT_FP32 ? "fp32" : "bf16", beta, off, pad);
    compare(t, name, got_slice, ref, (size_t)M * N, d_type == DT_FP32 ? TOL_FP32_OUT : TOL_BF16_OUT);
    char what[224];
    snprintf(what, sizeof(what), "%s: D outside the slice unchanged (%zu changed)", name, outside_changed);
    test_check(t, outside_changed == 0, what);

    cudaCheck(cudaFree(dA));
    cudaCheck(cudaFree(dB));
    cudaCheck(cudaFree(dD));
    free(hA);
    free(hB);
    free(pa);
    free(pb);
    free(d0);
    free(d0_slice);
    free(ref);
    free(got);
    free(got_slice);
}

// linear_forward / linear_backward_input / linear_backward_weight in the HF orientation, W (out, in).
static void check_linear_helpers(TestReport *t, int N, int in, int out) {
    size_t n_inp = (size_t)N * in, n_w = (size_t)out * in, n_out = (size_t)N * out;
    uint16_t *h_inp = (uint16_t *)mallocCheck(n_inp * 2), *h_w = (uint16_t *)mallocCheck(n_w * 2);
    uint16_t *h_dout = (uint16_t *)mallocCheck(n_out * 2), *h_bias = (uint16_t *)mallocCheck((size_t)out * 2);
    fill_bf16_nonzero(h_inp, n_inp);
    fill_bf16_nonzero(h_w, n_w);
    fill_bf16_nonzero(h_dout, n_out);
    fill_bf16_nonzero(h_bias, (size_t)out);
    uint16_t *d_inp = upload_bf16(h_inp, n_inp), *d_w = upload_bf16(h_w, n_w);
    uint16_t *d_dout = upload_bf16(h_dout, n_out), *d_bias = upload_bf16(h_bias, (size_t)out);
    size_t n_max = n_inp > n_w ? n_inp : n_w;
    if (n_out > n_max) n_max = n_out;
    double *d0 = (double *)mallocCheck(n_max * sizeof(double));
    double *ref = (double *)mallocCheck(n_max * sizeof(double));
    double *got = (double *)mallocCheck(n_max * sizeof(double));
    char name[128];

    // out (N, out) = inp W^T + bias + out (accumulate), fp32 output.
    void *d_out = make_initial_d(DT_FP32, n_out, d0);
    linear_forward(d_out, DT_FP32, (const bf16 *)d_inp, (const bf16 *)d_w, (const bf16 *)d_bias, N, in, out, 1, 0);
    cudaCheck(cudaDeviceSynchronize());
    download_d(got, d_out, DT_FP32, n_out);
    reference_gemm(ref, h_inp, 0, h_w, 1, N, out, in, 1.0, 1.0, d0, h_bias);
    snprintf(name, sizeof(name), "linear_forward %dx%d->%d fp32 bias acc", N, in, out);
    compare(t, name, got, ref, n_out, TOL_FP32_OUT);
    cudaCheck(cudaFree(d_out));

    // dinp (N, in) = dout W, bf16, overwrite.
    void *d_dinp = make_initial_d(DT_BF16, n_inp, d0);
    linear_backward_input((bf16 *)d_dinp, (const bf16 *)d_dout, (const bf16 *)d_w, N, in, out, 0, 0);
    cudaCheck(cudaDeviceSynchronize());
    download_d(got, d_dinp, DT_BF16, n_inp);
    reference_gemm(ref, h_dout, 0, h_w, 0, N, in, out, 1.0, 0.0, d0, NULL);
    snprintf(name, sizeof(name), "linear_backward_input %dx%d->%d bf16", N, in, out);
    compare(t, name, got, ref, n_inp, TOL_BF16_OUT);
    cudaCheck(cudaFree(d_dinp));

    // dW (out, in) = dout^T inp [+ dW], fp32 and bf16, overwrite and accumulate.
    for (int dt = 0; dt < 4; dt++) {
        DType dw_type = dt % 2 == 0 ? DT_FP32 : DT_BF16;
        int accumulate = dt / 2;
        void *d_dw = make_initial_d(dw_type, n_w, d0);
        linear_backward_weight(d_dw, dw_type, (const bf16 *)d_dout, (const bf16 *)d_inp, N, in, out, accumulate, 0);
        cudaCheck(cudaDeviceSynchronize());
        download_d(got, d_dw, dw_type, n_w);
        reference_gemm(ref, h_dout, 1, h_inp, 0, out, in, N, 1.0, accumulate ? 1.0 : 0.0, d0, NULL);
        snprintf(name, sizeof(name), "linear_backward_weight %dx%d->%d %s %s", N, in, out,
                 dw_type == DT_FP32 ? "fp32" : "bf16", accumulate ? "+=" : "=");
        compare(t, name, got, ref, n_w, dw_type == DT_FP32 ? TOL_FP32_OUT : TOL_BF16_OUT);
        cudaCheck(cudaFree(d_dw));
    }

    cudaCheck(cudaFree(d_inp));
    cudaCheck(cudaFree(d_w));
    cudaCheck(cudaFree(d_dout));
    cudaCheck(cudaFree(d_bias));
    free(h_inp);
    free(h_w);
    free(h_dout);
    free(h_bias);
    free(d0);
    free(ref);
    free(got);
}

// bias_backward: dbias += column sums of dout, against the reference, and bitwise equal on a rerun.
static void check_bias_backward(TestReport *t, int N, int out) {
    size_t n = (size_t)N * out;
    uint16_t *h_dout = (uint16_t *)mallocCheck(n * 2);
    fill_bf16_nonzero(h_dout, n);
    uint16_t *d_dout = upload_bf16(h_dout, n);
    float *h_init = (float *)mallocCheck((size_t)out * sizeof(float));
    for (int c = 0; c < out; c++) h_init[c] = (float)(rng_uniform() - 0.5);
    float *d_dbias, *d_scratch;
    cudaCheck(cudaMalloc(&d_dbias, (size_t)out * sizeof(float)));
    cudaCheck(cudaMalloc(&d_scratch, bias_grad_scratch_floats(N, out) * sizeof(float)));
    float *h_run[2];
    for (int run = 0; run < 2; run++) {
        cudaCheck(cudaMemcpy(d_dbias, h_init, (size_t)out * sizeof(float), cudaMemcpyHostToDevice));
        bias_backward(d_dbias, d_scratch, (const bf16 *)d_dout, N, out, 0);
        cudaCheck(cudaDeviceSynchronize());
        h_run[run] = (float *)mallocCheck((size_t)out * sizeof(float));
        cudaCheck(cudaMemcpy(h_run[run], d_dbias, (size_t)out * sizeof(float), cudaMemcpyDeviceToHost));
    }
    double *ref = (double *)mallocCheck((size_t)out * sizeof(double));
    double *got = (double *)mallocCheck((size_t)out * sizeof(double));
    for (int c = 0; c < out; c++) {
        double s = h_init[c];
        for (int r = 0; r < N; r++) s += bf16_bits_to_float(h_dout[(size_t)r * out + c]);
        ref[c] = s;
        got[c] = h_run[0][c];
    }
    char name[128];
    snprintf(name, sizeof(name), "bias_backward N=%d out=%d", N, out);
    compare(t, name, got, ref, (size_t)out, TOL_BIAS_GRAD);
    test_check(t, memcmp(h_run[0], h_run[1], (size_t)out * sizeof(float)) == 0, "  rerun bitwise identical");
    cudaCheck(cudaFree(d_dout));
    cudaCheck(cudaFree(d_dbias));
    cudaCheck(cudaFree(d_scratch));
    free(h_dout);
    free(h_init);
    free(h_run[0]);
    free(h_run[1]);
    free(ref);
    free(got);
}

// ---- timing of the Llama-3-8B step GEMMs ----
// x (n) = deterministic pseudo-random bf16 in [-1, 1) from a hash of the index.
__global__ void fill_random_bf16_kernel(bf16 *x, size_t n, uint32_t seed) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    uint32_t h = (uint32_t)i * 2654435761u ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    x[i] = __float2bfloat16((float)(h & 0xffffff) / 8388608.0f - 1.0f);
}

static void fill_random_device(bf16 *x, size_t n, uint32_t seed) {
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(n, 256), 256>>>(x, n, seed);
    cudaCheckLaunch();
}

typedef struct {
    const char *name;
    int in, out;
    DType fwd_type;  // logits of the LM head are fp32
} LinearShape;

// Mean time of one call in ms: warm-up calls, then `iters` calls between two events.
static float time_gemm(void *D, DType d_type, const bf16 *A, int ta, const bf16 *B, int tb, int M, int N, int K,
                       float beta) {
    const int warmup = 3, iters = 20;
    for (int i = 0; i < warmup; i++) gemm(D, d_type, A, ta, B, tb, M, N, K, 1.0f, beta, NULL, 0);
    cudaEvent_t start, stop;
    cudaCheck(cudaEventCreate(&start));
    cudaCheck(cudaEventCreate(&stop));
    cudaCheck(cudaEventRecord(start, 0));
    for (int i = 0; i < iters; i++) gemm(D, d_type, A, ta, B, tb, M, N, K, 1.0f, beta, NULL, 0);
    cudaCheck(cudaEventRecord(stop, 0));
    cudaCheck(cudaEventSynchronize(stop));
    float ms = 0;
    cudaCheck(cudaEventElapsedTime(&ms, start, stop));
    cudaCheck(cudaEventDestroy(start));
    cudaCheck(cudaEventDestroy(stop));
    return ms / iters;
}

static void print_timing(const char *layer, const char *form, int M, int N, int K, float ms, double peak) {
    double tflops = 2.0 * M * N * (double)K / (ms * 1e-3) / 1e12;
    printf("%-10s %-16s %6d %6d %6d %9.3f %9.1f %7.1f%%\n", layer, form, M, N, K, ms, tflops, 100.0 * tflops / peak);
}

static void time_llama3_8b(double peak) {
    const int T = 8192;  // tokens in the step
    const LinearShape shapes[] = {
        {"qkv", 4096, 6144, DT_BF16},       {"o", 4096, 4096, DT_BF16},     {"gate_up", 4096, 28672, DT_BF16},
        {"down", 14336, 4096, DT_BF16},     {"lm_head", 4096, 16384, DT_FP32},
    };
    const int n_shapes = (int)(sizeof(shapes) / sizeof(shapes[0]));
    size_t max_inp = 0, max_w = 0, max_out = 0;
    for (int i = 0; i < n_shapes; i++) {
        size_t ni = (size_t)T * shapes[i].in, nw = (size_t)shapes[i].in * shapes[i].out, no = (size_t)T * shapes[i].out;
        if (ni > max_inp) max_inp = ni;
        if (nw > max_w) max_w = nw;
        if (no > max_out) max_out = no;
    }
    bf16 *inp, *w, *dout, *dinp;
    void *out, *dw;
    cudaCheck(cudaMalloc(&inp, max_inp * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dinp, max_inp * sizeof(bf16)));
    cudaCheck(cudaMalloc(&w, max_w * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dw, max_w * sizeof(float)));
    cudaCheck(cudaMalloc(&dout, max_out * sizeof(bf16)));
    cudaCheck(cudaMalloc(&out, max_out * sizeof(float)));
    fill_random_device(inp, max_inp, 1);
    fill_random_device(w, max_w, 2);
    fill_random_device(dout, max_out, 3);
    cudaCheck(cudaMemset(dw, 0, max_w * sizeof(float)));

    printf("\nLlama-3-8B step GEMMs, %d tokens; %% of a %.0f TFLOP/s dense bf16 roofline\n", T, peak);
    printf("%-10s %-16s %6s %6s %6s %9s %9s %8s\n", "layer", "form", "M", "N", "K", "ms", "TFLOP/s", "of peak");
    for (int i = 0; i < n_shapes; i++) {
        const LinearShape *s = &shapes[i];
        float ms = time_gemm(out, s->fwd_type, inp, 0, w, 1, T, s->out, s->in, 0.0f);
        print_timing(s->name, s->fwd_type == DT_FP32 ? "fwd (fp32 out)" : "fwd", T, s->out, s->in, ms, peak);
        ms = time_gemm(dinp, DT_BF16, dout, 0, w, 0, T, s->in, s->out, 0.0f);
        print_timing(s->name, "bwd input", T, s->in, s->out, ms, peak);
        ms = time_gemm(dw, DT_FP32, dout, 1, inp, 0, s->out, s->in, T, 1.0f);
        print_timing(s->name, "bwd weight fp32", s->out, s->in, T, ms, peak);
        ms = time_gemm(dw, DT_BF16, dout, 1, inp, 0, s->out, s->in, T, 1.0f);
        print_timing(s->name, "bwd weight bf16", s->out, s->in, T, ms, peak);
    }
    cudaCheck(cudaFree(inp));
    cudaCheck(cudaFree(dinp));
    cudaCheck(cudaFree(w));
    cudaCheck(cudaFree(dw));
    cudaCheck(cudaFree(dout));
    cudaCheck(cudaFree(out));
}

int main(int argc, char **argv) {
    double peak = 800.0;
    if (argc > 2) die("usage: %s [peak_tflops]", argv[0]);
    if (argc == 2) {
        char *end;
        peak = strtod(argv[1], &end);
        if (*end != '\0' || !(peak > 0)) die("peak_tflops must be a positive number, got '%s'", argv[1]);
    }
    TestReport t = {0, 0};
    check_bad_input(&t);
    if (cuda_device_count() == 0) {
        printf("test_matmul: no CUDA device: GPU checks SKIPPED (only the %d bad-input checks ran)\n",
               t.passed + t.failed);
        return test_report_finish(&t, "test_matmul");
    }
    matmul_init((size_t)32 << 20);
    print_table_header();
    // Every layout / output type / bias / beta combination on an odd shape.
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int dt = 0; dt < 2; dt++)
                for (int bias = 0; bias < 2; bias++)
                    for (int beta = 0; beta < 2; beta++)
                        check_gemm(&t, 37, 263, 48, ta, tb, dt ? DT_FP32 : DT_BF16, bias, 1.0f, (float)beta);
    // alpha != 1: the bias is added after the scaling (D = alpha AB + beta D + bias).
    check_gemm(&t, 37, 263, 48, 0, 1, DT_BF16, 1, 0.5f, 1.0f);
    check_gemm(&t, 37, 263, 48, 0, 1, DT_FP32, 1, 0.5f, 1.0f);
    // Odd K as well, and larger shapes.
    check_gemm(&t, 129, 72, 301, 1, 0, DT_FP32, 0, 1.0f, 1.0f);
    check_gemm(&t, 129, 72, 301, 0, 1, DT_BF16, 1, 1.0f, 0.0f);
    check_gemm(&t, 512, 1536, 1024, 0, 1, DT_BF16, 1, 1.0f, 0.0f);
    check_gemm(&t, 512, 1536, 1024, 0, 0, DT_BF16, 0, 1.0f, 1.0f);
    check_gemm(&t, 1024, 768, 2048, 1, 0, DT_FP32, 0, 1.0f, 1.0f);
    check_gemm(&t, 1024, 768, 2048, 1, 1, DT_FP32, 1, 1.0f, 0.0f);
    // Column slices of wider matrices: one head group's columns (offsets and pads multiples of 8).
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++)
            for (int dt = 0; dt < 2; dt++)
                check_gemm_strided(&t, 37, 64, 48, ta, tb, dt ? DT_FP32 : DT_BF16, (float)((ta + tb + dt) & 1), 64, 8);
    check_gemm_strided(&t, 300, 128, 512, 0, 0, DT_BF16, 0.0f, 256, 128);  // datt_g = dao . Wo[:, group]
    check_gemm_strided(&t, 128, 512, 300, 1, 0, DT_FP32, 1.0f, 128, 0);
    check_linear_helpers(&t, 300, 512, 384);
    check_bias_backward(&t, 1000, 263);
    check_bias_backward(&t, 37, 4096);
    printf("%d checks, %d failed\n", t.passed + t.failed, t.failed);
    if (t.failed == 0) time_llama3_8b(peak);
    matmul_free();
    return test_report_finish(&t, "test_matmul");
}

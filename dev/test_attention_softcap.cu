// Checks the soft-capped attention kernels (attention_softcap.cu) against the double-precision CPU
// reference of dev/attention_reference.h: causal GQA attention with optional sliding window, query
// scale and logit soft-cap z = cap tanh(scale q.k / cap); forward (out, log-sum-exp stats) and
// backward (dq, dk, dv in the packed dqkv layout) on random bf16 inputs, plus a bitwise rerun of the
// backward (the kernels use no atomics). Then times forward and backward at the Gemma-2-9B shape.
//
// Build: make build/test_attention_softcap     Run: ./build/test_attention_softcap
// Exit status: 0 all checks passed (without a GPU only the host-side checks run, and it says so),
// 1 a check failed.
//
// Tolerances (on ||gpu - ref|| / ||ref||; the reference uses the same bf16 inputs, in double). A numpy
// emulation of the kernels' tile loops in fp32 (bf16 out, bf16 O in D, bf16 gradients) on these cases
// gives: out 1.5-1.6e-3, stats 2-6e-8, dv 1.6-1.7e-3, dq / dk 2.0-5.2e-3.
// - out: the kernels keep scores, P and the P V sums in fp32 and round only the output to bf16
//   (about 2^-9 / sqrt(3) = 1.1e-3 rms relative); 8e-3 (the cuDNN test's figure) leaves 5x. A mask
//   one key too wide moves out by about 1/window per row (12% at window 8) and fails.
// - stats: fp32 log-sum-exp of scores from exact bf16 products summed in fp32 and a tanhf within a
//   few ulps: a few fp32 ulps of |lse|; 1e-4 still catches a wrong base, scale, cap or mask.
// - dq, dk, dv: the output rounding of each gradient (1.1e-3) plus D = rowsum(dO * O) taken from
//   the bf16 O, amplified by the cancellation in dP - D where P is peaked (the hd 256 case: 5.2e-3);
//   1e-2 leaves 1.9x there. A missing (1 - tanh^2) factor moves dq / dk by 25-130% and fails.
// Every output buffer is filled with NaN before the call, so an element not written fails.
#include <math.h>
#include "attention.h"
#include "dev/attention_reference.h"

#define TOL_OUT 8e-3
#define TOL_STATS 1e-4
#define TOL_GRAD 1e-2

// ---- host-side checks of attention_softcap_supported (no GPU needed) ----
static void check_supported_case(TestReport *t, const char *name, AttentionShape s, int expected) {
    char why[160];
    int got = attention_softcap_supported(&s, why, sizeof(why));
    int ok = got == expected && (got == 1 || why[0] != '\0');
    printf("  %-36s expect %d got %d  %-4s %s\n", name, expected, got, ok ? "ok" : "FAIL", why);
    test_record(t, ok);
}

static void check_supported(TestReport *t) {
    printf("attention_softcap_supported:\n");
    float sc = 1.0f / 16.0f;
    check_supported_case(t, "Gemma-2-9B global (cap 50)", make_shape(1, 8192, 16, 8, 256, sc, 0, 50.0f), 1);
    check_supported_case(t, "Gemma-2-9B sliding 4096", make_shape(1, 8192, 16, 8, 256, sc, 4096, 50.0f), 1);
    check_supported_case(t, "hd 40, S 1", make_shape(3, 1, 2, 2, 40, sc, 0, 5.0f), 1);
    check_supported_case(t, "no soft-cap (cuDNN's case)", make_shape(1, 64, 8, 4, 256, sc, 0, 0.0f), 0);
    check_supported_case(t, "negative soft-cap", make_shape(1, 64, 8, 4, 256, sc, 0, -1.0f), 0);
    check_supported_case(t, "infinite soft-cap", make_shape(1, 64, 8, 4, 256, sc, 0, INFINITY), 0);
    check_supported_case(t, "hd 264 (> 256)", make_shape(1, 64, 8, 4, 264, sc, 0, 50.0f), 0);
    check_supported_case(t, "Hkv 3 does not divide Hq 8", make_shape(1, 64, 8, 3, 128, sc, 0, 50.0f), 0);
    check_supported_case(t, "negative window", make_shape(1, 64, 8, 8, 128, sc, -1, 50.0f), 0);
    check_supported_case(t, "zero scale", make_shape(1, 64, 8, 8, 128, 0.0f, 0, 50.0f), 0);
    check_supported_case(t, "S = 0", make_shape(1, 0, 8, 8, 128, sc, 0, 50.0f), 0);
    char why[64];
    int got = attention_softcap_supported(NULL, why, sizeof(why));
    printf("  %-36s expect 0 got %d  %-4s %s\n", "NULL shape", got, got == 0 ? "ok" : "FAIL", why);
    test_record(t, got == 0);
}

// ---- bad input: each must die with status 1 and a message naming the problem ----
// Fake device addresses: the checks fail before any CUDA call, so nothing is dereferenced.
#define FAKE_PTR(addr) ((bf16 *)(uintptr_t)(addr))

// Each runs in a forked child (test_expect_exit); the argument is unused.
static void forward_no_softcap(void *) {
    AttentionShape s = make_shape(1, 64, 8, 4, 256, 0.0625f, 0, 0.0f);
    attention_softcap_forward(FAKE_PTR(0x1000), (float *)FAKE_PTR(0x2000), FAKE_PTR(0x3000), &s, 0);
}
static void backward_big_head_dim(void *) {
    AttentionShape s = make_shape(1, 64, 8, 8, 512, 0.1f, 0, 50.0f);
    attention_softcap_backward(FAKE_PTR(0x1000), FAKE_PTR(0x2000), FAKE_PTR(0x3000), (float *)FAKE_PTR(0x4000),
                               FAKE_PTR(0x5000), &s, 0);
}

static void check_bad_input(TestReport *t) {
    printf("bad input (no GPU needed):\n");
    test_expect_exit(t, "forward without soft-cap", forward_no_softcap, NULL, 1, "positive finite softcap");
    test_expect_exit(t, "backward with hd 512", backward_big_head_dim, NULL, 1, "head dims up to 256");
}

// Forward + backward of one shape against the reference, q and k entries of magnitude up to 2
// (v and dout up to 1); then a rerun of the backward that must match bit for bit.
static void check_case(TestReport *t, const char *label, AttentionShape s) {
    printf("%s: B=%d S=%d Hq=%d Hkv=%d hd=%d scale=%.4f window=%d softcap=%g\n", label, s.B, s.S, s.Hq, s.Hkv, s.hd,
           (double)s.scale, s.window, (double)s.softcap);
    char why[160];
    if (!attention_softcap_supported(&s, why, sizeof(why))) {
        printf("  unexpectedly unsupported: %s  FAIL\n", why);
        test_record(t, 0);
        return;
    }
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, O = (size_t)s.Hq * s.hd, rows = (size_t)s.B * s.S;
    size_t n_qkv = rows * C, n_out = rows * O, n_stats = (size_t)s.B * s.Hq * s.S;
    uint16_t *h_qkv = (uint16_t *)mallocCheck(n_qkv * 2), *h_dout = (uint16_t *)mallocCheck(n_out * 2);
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < C; c++) h_qkv[r * C + c] = random_bf16_nonzero(c < (size_t)(s.Hq + s.Hkv) * s.hd ? 2.0 : 1.0);
    for (size_t i = 0; i < n_out; i++) h_dout[i] = random_bf16_nonzero(1.0);

    void *d_qkv, *d_dout;
    cudaCheck(cudaMalloc(&d_qkv, n_qkv * 2));
    cudaCheck(cudaMalloc(&d_dout, n_out * 2));
    cudaCheck(cudaMemcpy(d_qkv, h_qkv, n_qkv * 2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_dout, h_dout, n_out * 2, cudaMemcpyHostToDevice));
    void *d_out = device_alloc_nan(n_out * 2), *d_stats = device_alloc_nan(n_stats * 4);
    void *d_dqkv = device_alloc_nan(n_qkv * 2), *d_dqkv2 = device_alloc_nan(n_qkv * 2);

    attention_softcap_forward((bf16 *)d_out, (float *)d_stats, (const bf16 *)d_qkv, &s, 0);
    attention_softcap_backward((bf16 *)d_dqkv, (const bf16 *)d_dout, (const bf16 *)d_out, (const float *)d_stats,
                               (const bf16 *)d_qkv, &s, 0);
    attention_softcap_backward((bf16 *)d_dqkv2, (const bf16 *)d_dout, (const bf16 *)d_out, (const float *)d_stats,
                               (const bf16 *)d_qkv, &s, 0);
    cudaCheck(cudaDeviceSynchronize());

    double *out = (double *)mallocCheck(n_out * sizeof(double));
    double *ref_out = (double *)mallocCheck(n_out * sizeof(double));
    double *stats = (double *)mallocCheck(n_stats * sizeof(double));
    double *ref_lse = (double *)mallocCheck(n_stats * sizeof(double));
    double *dqkv = (double *)mallocCheck(n_qkv * sizeof(double));
    double *ref_dqkv = (double *)mallocCheck(n_qkv * sizeof(double));
    double *a = (double *)mallocCheck(n_qkv * sizeof(double)), *b = (double *)mallocCheck(n_qkv * sizeof(double));
    download_bf16(out, d_out, n_out);
    float *h_stats = (float *)mallocCheck(n_stats * sizeof(float));
    cudaCheck(cudaMemcpy(h_stats, d_stats, n_stats * sizeof(float), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n_stats; i++) stats[i] = h_stats[i];
    download_bf16(dqkv, d_dqkv, n_qkv);
    reference_attention(&s, h_qkv, h_dout, ref_out, ref_lse, ref_dqkv);

    printf("  %-8s %10s %10s %10s %8s\n", "tensor", "max abs", "max/|ref|", "rel l2", "tol");
    compare(t, "out", out, ref_out, n_out, TOL_OUT);
    compare(t, "stats", stats, ref_lse, n_stats, TOL_STATS);
    const char *names[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; part++) {
        size_t n = gather_part(a, dqkv, &s, part);
        gather_part(b, ref_dqkv, &s, part);
        compare(t, names[part], a, b, n, TOL_GRAD);
    }
    uint16_t *first = (uint16_t *)mallocCheck(n_qkv * 2), *second = (uint16_t *)mallocCheck(n_qkv * 2);
    cudaCheck(cudaMemcpy(first, d_dqkv, n_qkv * 2, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(second, d_dqkv2, n_qkv * 2, cudaMemcpyDeviceToHost));
    int same = memcmp(first, second, n_qkv * 2) == 0;
    printf("  backward rerun bitwise identical: %s  %s\n", same ? "yes" : "no", same ? "ok" : "FAIL");
    test_record(t, same);

    cudaCheck(cudaFree(d_qkv));
    cudaCheck(cudaFree(d_dout));
    cudaCheck(cudaFree(d_out));
    cudaCheck(cudaFree(d_stats));
    cudaCheck(cudaFree(d_dqkv));
    cudaCheck(cudaFree(d_dqkv2));
    free(h_qkv);
    free(h_dout);
    free(h_stats);
    free(out);
    free(ref_out);
    free(stats);
    free(ref_lse);
    free(dqkv);
    free(ref_dqkv);
    free(a);
    free(b);
    free(first);
    free(second);
}

// ---- timing at the Gemma-2-9B shape (B=1, Hq=16, Hkv=8, hd=256, scale 1/16, cap 50) ----
static void time_case(int S, int window) {
    AttentionShape s = make_shape(1, S, 16, 8, 256, 1.0f / 16.0f, window, 50.0f);
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, rows = (size_t)s.B * s.S, n_out = rows * s.Hq * s.hd;
    bf16 *qkv, *dqkv, *out, *dout;
    float *stats;
    cudaCheck(cudaMalloc(&qkv, rows * C * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dqkv, rows * C * sizeof(bf16)));
    cudaCheck(cudaMalloc(&out, n_out * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dout, n_out * sizeof(bf16)));
    cudaCheck(cudaMalloc(&stats, rows * s.Hq * sizeof(float)));
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(rows * C, 256), 256>>>(qkv, rows * C, 7);
    cudaCheckLaunch();
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(n_out, 256), 256>>>(dout, n_out, 8);
    cudaCheckLaunch();

    const int warmup = 1, iters = 3;
    cudaEvent_t e0, e1, e2;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    cudaCheck(cudaEventCreate(&e2));
    for (int i = 0; i < warmup; i++) {
        attention_softcap_forward(out, stats, qkv, &s, 0);
        attention_softcap_backward(dqkv, dout, out, stats, qkv, &s, 0);
    }
    float fwd_ms = 0, bwd_ms = 0;
    for (int i = 0; i < iters; i++) {
        float f, b;
        cudaCheck(cudaEventRecord(e0, 0));
        attention_softcap_forward(out, stats, qkv, &s, 0);
        cudaCheck(cudaEventRecord(e1, 0));
        attention_softcap_backward(dqkv, dout, out, stats, qkv, &s, 0);
        cudaCheck(cudaEventRecord(e2, 0));
        cudaCheck(cudaEventSynchronize(e2));
        cudaCheck(cudaEventElapsedTime(&f, e0, e1));
        cudaCheck(cudaEventElapsedTime(&b, e1, e2));
        fwd_ms += f;
        bwd_ms += b;
    }
    fwd_ms /= iters;
    bwd_ms /= iters;
    double pairs = 0;  // visible (query, key) pairs of one head
    for (int i = 0; i < S; i++) pairs += window > 0 && window < i + 1 ? window : i + 1;
    double fwd_flops = 4.0 * pairs * s.hd * s.Hq;  // q.k and P V
    double bwd_flops = 2.5 * fwd_flops;            // recomputed q.k, dO V^T, dQ, dK, dV
    printf("%6d %7d %9.2f %8.1f %9.2f %8.1f %9.2f\n", S, window, fwd_ms, fwd_flops / (fwd_ms * 1e-3) / 1e12, bwd_ms,
           bwd_flops / (bwd_ms * 1e-3) / 1e12, fwd_ms + bwd_ms);
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    cudaCheck(cudaEventDestroy(e2));
    cudaCheck(cudaFree(qkv));
    cudaCheck(cudaFree(dqkv));
    cudaCheck(cudaFree(out));
    cudaCheck(cudaFree(dout));
    cudaCheck(cudaFree(stats));
}

int main(int argc, char **argv) {
    int timing = 1;
    if (argc > 2 || (argc == 2 && strcmp(argv[1], "--no-timing") != 0)) die("usage: %s [--no-timing]", argv[0]);
    if (argc == 2) timing = 0;
    TestReport t = {0, 0};
    check_supported(&t);
    check_bad_input(&t);
    if (cuda_device_count() == 0) {
        printf("test_attention_softcap: no CUDA device: GPU checks SKIPPED (only the %d host checks ran)\n",
               t.passed + t.failed);
        return test_report_finish(&t, "test_attention_softcap");
    }
    // Spread (std) of the raw scores scale q.k for these inputs: about 1.5 scale sqrt(hd); each case
    // puts a good part of them where tanh bends (3 vs cap 5, 12 vs 50, 2.2 vs 3, 2.4 vs 10).
    check_case(&t, "small GQA, cap 5, window 8", make_shape(2, 37, 4, 2, 16, 0.5f, 8, 5.0f));
    check_case(&t, "Gemma-like hd 256, cap 50, window 64", make_shape(1, 300, 8, 4, 256, 0.5f, 64, 50.0f));
    check_case(&t, "no window, hd 128, Hkv 1, cap 3", make_shape(1, 150, 4, 1, 128, 0.125f, 0, 3.0f));
    check_case(&t, "MHA hd 64, window = S, cap 10", make_shape(2, 65, 2, 2, 64, 0.2f, 65, 10.0f));
    check_case(&t, "S = 1, hd 40", make_shape(3, 1, 2, 2, 40, 0.25f, 0, 5.0f));
    printf("%d checks, %d failed\n", t.passed + t.failed, t.failed);
    if (t.failed == 0 && timing) {
        printf("\nGemma-2-9B attention (B=1, Hq=16, Hkv=8, hd=256, cap 50), fp32 CUDA-core kernels\n");
        printf("%6s %7s %9s %8s %9s %8s %9s\n", "S", "window", "fwd ms", "TFLOP/s", "bwd ms", "TFLOP/s", "total ms");
        time_case(8192, 0);
        time_case(8192, 4096);
    }
    return test_report_finish(&t, "test_attention_softcap");
}

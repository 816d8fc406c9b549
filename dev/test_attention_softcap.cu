// Checks the soft-capped attention kernels (attention_softcap.cu) on the GPU against the double-precision
// CPU reference of dev/attention_reference.h: causal GQA attention with optional sliding window, query
// scale and logit soft-cap z = cap tanh(scale q.k / cap); forward (out, log-sum-exp stats) and backward
// (dq, dk, dv in the packed dqkv layout) on random bf16 inputs for the cases of attention_reference.h
// (the same ones dev/test_attention_softcap_emu.cu runs on the CPU emulator) and a few longer ones,
// plus a bitwise rerun of the backward (the kernels use no atomics). Then times forward and backward at the Gemma-2-9B shape,
// next to cuDNN's SDPA on the same shape without the cap (what the kernels are measured against).
//
// Build: make build/test_attention_softcap     Run: ./build/test_attention_softcap [--no-timing]
// Exit status: 0 all checks passed (without a GPU only the host-side checks run, and it says so),
// 1 a check failed. Tolerances: see attention_reference.h. Every output buffer is filled with NaN
// before the call, so an element not written fails.
#include <math.h>
#include "attention.h"
#include "dev/attention_reference.h"

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
    check_supported_case(t, "Gemma-2-27B (Hq 32, Hkv 16, hd 128)", make_shape(1, 8192, 32, 16, 128, sc, 0, 50.0f), 1);
    check_supported_case(t, "hd 40, S 1", make_shape(3, 1, 2, 2, 40, sc, 0, 5.0f), 1);
    check_supported_case(t, "no soft-cap (cuDNN's case)", make_shape(1, 64, 8, 4, 256, sc, 0, 0.0f), 0);
    check_supported_case(t, "negative soft-cap", make_shape(1, 64, 8, 4, 256, sc, 0, -1.0f), 0);
    check_supported_case(t, "infinite soft-cap", make_shape(1, 64, 8, 4, 256, sc, 0, INFINITY), 0);
    check_supported_case(t, "hd 264 (> 256)", make_shape(1, 64, 8, 4, 264, sc, 0, 50.0f), 0);
    check_supported_case(t, "hd 36 (not a multiple of 8)", make_shape(1, 64, 8, 4, 36, sc, 0, 50.0f), 0);
    check_supported_case(t, "Hkv 3 does not divide Hq 8", make_shape(1, 64, 8, 3, 128, sc, 0, 50.0f), 0);
    check_supported_case(t, "negative window", make_shape(1, 64, 8, 8, 128, sc, -1, 50.0f), 0);
    check_supported_case(t, "zero scale", make_shape(1, 64, 8, 8, 128, 0.0f, 0, 50.0f), 0);
    check_supported_case(t, "S = 0", make_shape(1, 0, 8, 8, 128, sc, 0, 50.0f), 0);
    char why[64];
    int got = attention_softcap_supported(NULL, why, sizeof(why));
    printf("  %-36s expect 0 got %d  %-4s %s\n", "NULL shape", got, got == 0 ? "ok" : "FAIL", why);
    test_record(t, got == 0);
    AttentionShape g = make_shape(2, 4096, 16, 8, 256, sc, 0, 50.0f);
    size_t ws = attention_softcap_workspace_bytes(&g);
    int ws_ok = ws == (size_t)2 * 16 * 4096 * sizeof(float);
    printf("  %-36s expect %d got %zu  %s\n", "workspace B=2 Hq=16 S=4096 (bytes)", 2 * 16 * 4096 * 4, ws,
           ws_ok ? "ok" : "FAIL");
    test_record(t, ws_ok);
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
                               FAKE_PTR(0x5000), &s, FAKE_PTR(0x6000), 0);
}
static void forward_misaligned_qkv(void *) {
    AttentionShape s = make_shape(1, 64, 8, 4, 256, 0.0625f, 0, 50.0f);
    attention_softcap_forward(FAKE_PTR(0x1000), (float *)FAKE_PTR(0x2000), FAKE_PTR(0x3002), &s, 0);
}
static void backward_no_workspace(void *) {
    AttentionShape s = make_shape(1, 64, 8, 4, 256, 0.0625f, 0, 50.0f);
    attention_softcap_backward(FAKE_PTR(0x1000), FAKE_PTR(0x2000), FAKE_PTR(0x3000), (float *)FAKE_PTR(0x4000),
                               FAKE_PTR(0x5000), &s, NULL, 0);
}

static void check_bad_input(TestReport *t) {
    printf("bad input (no GPU needed):\n");
    test_expect_exit(t, "forward without soft-cap", forward_no_softcap, NULL, 1, "positive finite softcap");
    test_expect_exit(t, "backward with hd 512", backward_big_head_dim, NULL, 1, "head dims up to 256");
    test_expect_exit(t, "forward with qkv not 16-byte aligned", forward_misaligned_qkv, NULL, 1, "16-byte aligned");
    test_expect_exit(t, "backward without workspace", backward_no_workspace, NULL, 1, "workspace");
}

// Forward + backward of one case against the reference; then a rerun of the backward that must match
// bit for bit.
static void check_case(TestReport *t, const SoftcapCase *c) {
    const AttentionShape s = c->shape;
    printf("%s: B=%d S=%d Hq=%d Hkv=%d hd=%d scale=%.4f window=%d softcap=%g\n", c->label, s.B, s.S, s.Hq, s.Hkv,
           s.hd, (double)s.scale, s.window, (double)s.softcap);
    char why[160];
    if (!attention_softcap_supported(&s, why, sizeof(why))) {
        printf("  unexpectedly unsupported: %s  FAIL\n", why);
        test_record(t, 0);
        return;
    }
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, O = (size_t)s.Hq * s.hd, rows = (size_t)s.B * s.S;
    size_t n_qkv = rows * C, n_out = rows * O, n_stats = (size_t)s.B * s.Hq * s.S;
    uint16_t *h_qkv = (uint16_t *)mallocCheck(n_qkv * 2), *h_dout = (uint16_t *)mallocCheck(n_out * 2);
    fill_softcap_inputs(&s, h_qkv, h_dout);

    void *d_qkv, *d_dout, *d_ws;
    cudaCheck(cudaMalloc(&d_qkv, n_qkv * 2));
    cudaCheck(cudaMalloc(&d_dout, n_out * 2));
    cudaCheck(cudaMemcpy(d_qkv, h_qkv, n_qkv * 2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_dout, h_dout, n_out * 2, cudaMemcpyHostToDevice));
    void *d_out = device_alloc_nan(n_out * 2), *d_stats = device_alloc_nan(n_stats * 4);
    void *d_dqkv = device_alloc_nan(n_qkv * 2), *d_dqkv2 = device_alloc_nan(n_qkv * 2);
    d_ws = device_alloc_nan(attention_softcap_workspace_bytes(&s));

    attention_softcap_forward((bf16 *)d_out, (float *)d_stats, (const bf16 *)d_qkv, &s, 0);
    attention_softcap_backward((bf16 *)d_dqkv, (const bf16 *)d_dout, (const bf16 *)d_out, (const float *)d_stats,
                               (const bf16 *)d_qkv, &s, d_ws, 0);
    attention_softcap_backward((bf16 *)d_dqkv2, (const bf16 *)d_dout, (const bf16 *)d_out, (const float *)d_stats,
                               (const bf16 *)d_qkv, &s, d_ws, 0);
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
    compare(t, "out", out, ref_out, n_out, SOFTCAP_TOL_OUT);
    compare(t, "stats", stats, ref_lse, n_stats, SOFTCAP_TOL_STATS);
    const char *names[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; part++) {
        size_t n = gather_part(a, dqkv, &s, part);
        gather_part(b, ref_dqkv, &s, part);
        compare(t, names[part], a, b, n, SOFTCAP_TOL_GRAD);
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
    cudaCheck(cudaFree(d_ws));
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

// GPU-only cases (too slow for the emulator): many tiles per block, a window spanning several key tiles
// that starts and ends inside tiles, full causal with GQA groups of 4, and B = 2.
static const SoftcapCase long_cases[] = {
    {"long: Gemma-2-9B heads, S 1000, window 300", {1, 1000, 16, 8, 256, 0.0625f, 300, 50.0f}},
    {"long: GQA 4, hd 128, S 777, no window", {1, 777, 8, 2, 128, 0.125f, 0, 30.0f}},
    {"long: B 2, hd 64, S 513, window 129", {2, 513, 4, 2, 64, 0.25f, 129, 10.0f}},
};

// ---- timing at the Gemma-2-9B shape (B=1, Hq=16, Hkv=8, hd=256, scale 1/16, cap 50) ----
// Mean milliseconds of the forward and the backward of `s` over `iters` runs after `warmup`, through
// the soft-cap kernels (softcap > 0) or cuDNN (softcap == 0; ws: its workspace).
static void time_pair(const AttentionShape *s, bf16 *qkv, bf16 *dqkv, bf16 *out, bf16 *dout, float *stats, void *ws,
                      float *fwd_ms, float *bwd_ms) {
    const int warmup = 2, iters = 10;
    cudaEvent_t e0, e1, e2;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    cudaCheck(cudaEventCreate(&e2));
    *fwd_ms = *bwd_ms = 0.0f;
    for (int i = 0; i < warmup + iters; i++) {
        float f, b;
        cudaCheck(cudaEventRecord(e0, 0));
        if (s->softcap > 0) attention_softcap_forward(out, stats, qkv, s, 0);
        else attention_forward(out, stats, qkv, s, ws, 0);
        cudaCheck(cudaEventRecord(e1, 0));
        if (s->softcap > 0) attention_softcap_backward(dqkv, dout, out, stats, qkv, s, ws, 0);
        else attention_backward(dqkv, dout, out, stats, qkv, s, ws, 0);
        cudaCheck(cudaEventRecord(e2, 0));
        cudaCheck(cudaEventSynchronize(e2));
        cudaCheck(cudaEventElapsedTime(&f, e0, e1));
        cudaCheck(cudaEventElapsedTime(&b, e1, e2));
        if (i < warmup) continue;
        *fwd_ms += f / iters;
        *bwd_ms += b / iters;
    }
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    cudaCheck(cudaEventDestroy(e2));
}

// One table row: the soft-cap kernels, then cuDNN on the same shape without the cap, and their ratio.
static void time_case(int S, int window) {
    AttentionShape s = make_shape(1, S, 16, 8, 256, 1.0f / 16.0f, window, 50.0f), plain = s;
    plain.softcap = 0.0f;
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, rows = (size_t)s.B * s.S, n_out = rows * s.Hq * s.hd;
    size_t ws_bytes = attention_softcap_workspace_bytes(&s), cudnn_ws = attention_workspace_bytes(&plain);
    if (cudnn_ws > ws_bytes) ws_bytes = cudnn_ws;
    bf16 *qkv, *dqkv, *out, *dout;
    float *stats;
    void *ws;
    cudaCheck(cudaMalloc(&qkv, rows * C * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dqkv, rows * C * sizeof(bf16)));
    cudaCheck(cudaMalloc(&out, n_out * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dout, n_out * sizeof(bf16)));
    cudaCheck(cudaMalloc(&stats, rows * s.Hq * sizeof(float)));
    cudaCheck(cudaMalloc(&ws, ws_bytes));
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(rows * C, 256), 256>>>(qkv, rows * C, 7);
    cudaCheckLaunch();
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(n_out, 256), 256>>>(dout, n_out, 8);
    cudaCheckLaunch();

    float fwd_ms, bwd_ms, ref_fwd_ms, ref_bwd_ms;
    time_pair(&s, qkv, dqkv, out, dout, stats, ws, &fwd_ms, &bwd_ms);
    time_pair(&plain, qkv, dqkv, out, dout, stats, ws, &ref_fwd_ms, &ref_bwd_ms);
    double pairs = 0;  // visible (query, key) pairs of one head
    for (int i = 0; i < S; i++) pairs += window > 0 && window < i + 1 ? window : i + 1;
    double fwd_flops = 4.0 * pairs * s.hd * s.Hq;  // q.k and P V
    double bwd_flops = 2.5 * fwd_flops;            // recomputed q.k, dO V^T, dQ, dK, dV
    printf("%6d %7d %8.2f %8.1f %8.2f %8.1f %8.1f %8.1f %8.1f %8.1f\n", S, window, fwd_ms,
           fwd_flops / (fwd_ms * 1e-3) / 1e12, bwd_ms, bwd_flops / (bwd_ms * 1e-3) / 1e12,
           fwd_flops / (ref_fwd_ms * 1e-3) / 1e12, bwd_flops / (ref_bwd_ms * 1e-3) / 1e12,
           100.0 * ref_fwd_ms / fwd_ms, 100.0 * ref_bwd_ms / bwd_ms);
    cudaCheck(cudaFree(qkv));
    cudaCheck(cudaFree(dqkv));
    cudaCheck(cudaFree(out));
    cudaCheck(cudaFree(dout));
    cudaCheck(cudaFree(stats));
    cudaCheck(cudaFree(ws));
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
    for (int i = 0; i < N_SOFTCAP_CASES; i++) check_case(&t, &softcap_cases[i]);
    for (size_t i = 0; i < sizeof(long_cases) / sizeof(long_cases[0]); i++) check_case(&t, &long_cases[i]);
    printf("%d checks, %d failed\n", t.passed + t.failed, t.failed);
    if (t.failed == 0 && timing) {
        attention_init();
        printf("\nGemma-2-9B attention (B=1, Hq=16, Hkv=8, hd=256, scale 1/16): soft-cap kernels (cap 50) against\n"
               "cuDNN SDPA on the same shape without the cap; TFLOP/s count the visible (query, key) pairs,\n"
               "backward = 2.5 x forward\n");
        printf("%14s  %-35s  %-17s  %s\n", "", "---------- soft-cap kernels -------", "-- cuDNN, no cap -",
               "- % of cuDNN -");
        printf("%6s %7s %8s %8s %8s %8s %8s %8s %8s %8s\n", "S", "window", "fwd ms", "TFLOP/s", "bwd ms", "TFLOP/s",
               "fwd TF/s", "bwd TF/s", "fwd", "bwd");
        time_case(8192, 0);
        time_case(8192, 4096);
        time_case(16384, 0);
        time_case(16384, 4096);
        attention_free();
    }
    return test_report_finish(&t, "test_attention_softcap");
}

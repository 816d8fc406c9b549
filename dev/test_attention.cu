// Checks the cuDNN attention path (attention_cudnn.cpp) against a double-precision CPU reference of
// causal attention with GQA, sliding window and query scale, forward (out, log-sum-exp stats) and
// backward (dq, dk, dv in the packed dqkv layout; with head groups also group by group through the
// packed-group graph of the sliced backward), on random bf16 inputs; then times forward and
// backward at the Llama-3-8B attention shape.
//
// Build (from the repository root):
//   nvcc -O3 -std=c++17 -arch=sm_90 -I. -isystem .deps/cudnn_frontend/include -Xcompiler -Wall
//        -c attention_cudnn.cpp -o attention_cudnn.o
//   nvcc -O3 -std=c++17 -arch=sm_90 --expt-relaxed-constexpr -I. -Xcompiler -Wall
//        dev/test_attention.cu attention_cudnn.o -o test_attention -lcudnn -lcublasLt -lcublas
// Run: ./test_attention [peak_tflops]   (for the "% of roofline" column; default 800)
// Exit status: 0 all checks passed (without a GPU only the host-side checks run, and it says so),
// 1 a check failed.
//
// Tolerances (on ||gpu - ref|| / ||ref||; the reference uses the same bf16 inputs, in double):
// - out: flash attention rounds the probabilities P to bf16 before the P V product and rounds the
//   output to bf16, each about 2^-9 / sqrt(3) = 1.1e-3 rms relative; an emulation of those roundings
//   (numpy, on these cases) gives 2.2-2.3e-3, so 8e-3 leaves 3.5x. A mask one key too wide moves out
//   by about 1/window per row (6% at window 16) and fails.
// - stats (log-sum-exp, fp32): scores come from exact bf16 products accumulated in fp32, so the
//   error is a few fp32 ulps; 1e-4 still catches a wrong base (log2 vs ln: 44%), a wrong scale or a
//   mask one key too wide (about 1/window in every row).
// - dq, dk, dv: on top of the P rounding, dS = P (dP - D) is rounded to bf16 before the dQ / dK
//   products, and D = rowsum(dO * O) uses the bf16 O, with cancellation in dP - D; the emulation
//   gives 2.3e-3 (dv) to 3.9e-3 (dq, dk on the most peaked case), so 1e-2.
// Every output buffer is filled with NaN before the call, so an element cuDNN does not write fails.
#include <math.h>
#include "attention.h"
#include "dev/attention_reference.h"

#define TOL_OUT 8e-3
#define TOL_STATS 1e-4
#define TOL_GRAD 1e-2

// ---- host-side checks of attention_supported (no GPU needed) ----
static void check_supported_case(TestReport *t, const char *name, AttentionShape s, int expected) {
    char why[160];
    int got = attention_supported(&s, why, sizeof(why));
    int ok = got == expected && (got == 1 || why[0] != '\0');
    printf("  %-34s expect %d got %d  %-4s %s\n", name, expected, got, ok ? "ok" : "FAIL", why);
    test_record(t, ok);
}

static void check_supported(TestReport *t) {
    printf("attention_supported:\n");
    float sc = 1.0f / sqrtf(128.0f);
    check_supported_case(t, "Llama-3-8B (Hq 32, Hkv 8, hd 128)", make_shape(1, 8192, 32, 8, 128, sc, 0, 0), 1);
    check_supported_case(t, "sliding window 4096", make_shape(1, 8192, 32, 8, 128, sc, 4096, 0), 1);
    check_supported_case(t, "hd 256", make_shape(1, 64, 8, 4, 256, sc, 0, 0), 1);
    check_supported_case(t, "Gemma-2 soft-cap 50", make_shape(1, 64, 8, 4, 256, sc, 0, 50.0f), 0);
    check_supported_case(t, "hd 264 (> 256)", make_shape(1, 64, 8, 4, 264, sc, 0, 0), 0);
    check_supported_case(t, "hd 100 (not a multiple of 8)", make_shape(1, 64, 8, 4, 100, sc, 0, 0), 0);
    check_supported_case(t, "Hkv 3 does not divide Hq 8", make_shape(1, 64, 8, 3, 128, sc, 0, 0), 0);
    check_supported_case(t, "S = 1", make_shape(1, 1, 8, 8, 128, sc, 0, 0), 0);
    check_supported_case(t, "negative window", make_shape(1, 64, 8, 8, 128, sc, -1, 0), 0);
    check_supported_case(t, "zero scale", make_shape(1, 64, 8, 8, 128, 0.0f, 0, 0), 0);
    check_supported_case(t, "B = 0", make_shape(0, 64, 8, 8, 128, sc, 0, 0), 0);
    check_supported_case(t, "head_groups 4 of Hkv 8", with_head_groups(make_shape(1, 64, 32, 8, 128, sc, 0, 0), 4), 1);
    check_supported_case(t, "head_groups 3 of Hkv 8", with_head_groups(make_shape(1, 64, 32, 8, 128, sc, 0, 0), 3), 0);
    check_supported_case(t, "head_groups -1", with_head_groups(make_shape(1, 64, 8, 8, 128, sc, 0, 0), -1), 0);
    char why[64];
    int got = attention_supported(NULL, why, sizeof(why));
    printf("  %-34s expect 0 got %d  %-4s %s\n", "NULL shape", got, got == 0 ? "ok" : "FAIL", why);
    test_record(t, got == 0);
}

// ---- bad input: each must die with status 1 and a message naming the problem ----
// Fake device addresses: the checks run before any CUDA or cuDNN call, so nothing is dereferenced.
#define FAKE_PTR(addr) ((bf16 *)(uintptr_t)(addr))

// Each runs in a forked child (test_expect_exit); the argument is unused.
static void forward_softcap(void *) {
    AttentionShape s = make_shape(1, 64, 8, 4, 256, 0.0625f, 0, 50.0f);
    attention_forward(FAKE_PTR(0x1000), (float *)FAKE_PTR(0x2000), FAKE_PTR(0x3000), &s, NULL, 0);
}
static void backward_bad_head_dim(void *) {
    AttentionShape s = make_shape(1, 64, 8, 8, 100, 0.1f, 0, 0);
    attention_backward(FAKE_PTR(0x1000), FAKE_PTR(0x2000), FAKE_PTR(0x3000), (float *)FAKE_PTR(0x4000),
                       FAKE_PTR(0x5000), &s, NULL, 0);
}
static void workspace_no_init(void *) {
    AttentionShape s = make_shape(1, 64, 8, 8, 128, 0.1f, 0, 0);
    attention_workspace_bytes(&s);
}
static void group_backward_one_group(void *) {
    AttentionShape s = make_shape(1, 64, 8, 8, 128, 0.1f, 0, 0);
    attention_backward_group(FAKE_PTR(0x1000), FAKE_PTR(0x2000), FAKE_PTR(0x3000), (float *)FAKE_PTR(0x4000),
                             FAKE_PTR(0x5000), &s, 0, NULL, 0);
}

static void check_bad_input(TestReport *t) {
    printf("bad input (before attention_init, no GPU needed):\n");
    test_expect_exit(t, "forward with soft-cap", forward_softcap, NULL, 1, "cannot soft-cap");
    test_expect_exit(t, "backward with hd 100", backward_bad_head_dim, NULL, 1, "multiple of 8");
    test_expect_exit(t, "workspace before attention_init", workspace_no_init, NULL, 1, "attention_init was not called");
    test_expect_exit(t, "packed-group backward, 1 group", group_backward_one_group, NULL, 1, "needs 2 or more groups");
}

// Copies cols bf16 columns of rows rows between row-major buffers of pitches dst_ld and src_ld (elements).
static void copy_cols(void *dst, size_t dst_ld, const void *src, size_t src_ld, size_t cols, size_t rows) {
    cudaCheck(cudaMemcpy2D(dst, dst_ld * 2, src, src_ld * 2, cols * 2, rows, cudaMemcpyDeviceToDevice));
}

// attention_backward_group over every group (packed dO of the group in, packed dq|dk|dv out, each
// poisoned with NaN first), reassembled into dqkv's layout in d_dqkv (B*S, C) for the comparison.
static void backward_by_packed_groups(void *d_dqkv, const void *d_dout, const void *d_out, const void *d_stats,
                                      const void *d_qkv, const AttentionShape *s) {
    int G = s->head_groups;
    size_t rows = (size_t)s->B * s->S, hd = (size_t)s->hd, C = (size_t)(s->Hq + 2 * s->Hkv) * hd;
    size_t qg = (size_t)(s->Hq / G) * hd, kg = (size_t)(s->Hkv / G) * hd, Cg = qg + 2 * kg;
    size_t ws_bytes = attention_group_workspace_bytes(s);
    void *d_ws = NULL, *d_dout_g, *d_dqkv_g;
    if (ws_bytes > 0) cudaCheck(cudaMalloc(&d_ws, ws_bytes));
    printf("  packed-group backward: workspace %zu bytes\n", ws_bytes);
    cudaCheck(cudaMalloc(&d_dout_g, rows * qg * 2));
    for (int g = 0; g < G; g++) {
        copy_cols(d_dout_g, qg, (const uint16_t *)d_dout + g * qg, (size_t)s->Hq * hd, qg, rows);
        d_dqkv_g = device_alloc_nan(rows * Cg * 2);
        attention_backward_group((bf16 *)d_dqkv_g, (const bf16 *)d_dout_g, (const bf16 *)d_out, (const float *)d_stats,
                                 (const bf16 *)d_qkv, s, g, d_ws, 0);
        uint16_t *dst = (uint16_t *)d_dqkv, *src = (uint16_t *)d_dqkv_g;
        copy_cols(dst + g * qg, C, src, Cg, qg, rows);
        copy_cols(dst + (size_t)s->Hq * hd + g * kg, C, src + qg, Cg, kg, rows);
        copy_cols(dst + (size_t)(s->Hq + s->Hkv) * hd + g * kg, C, src + qg + kg, Cg, kg, rows);
        cudaCheck(cudaFree(d_dqkv_g));
    }
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaFree(d_dout_g));
    if (d_ws != NULL) cudaCheck(cudaFree(d_ws));
}

// Forward + backward of one shape against the reference. check_determinism also reruns the backward
// and reports whether dqkv is bitwise identical (informational: cuDNN's Hopper backward
// accumulates dQ with atomics unless asked for its O(S^2)-workspace deterministic mode).
static void check_case(TestReport *t, const char *label, AttentionShape s, int check_determinism) {
    char shape[160];
    snprintf(shape, sizeof(shape), "B=%d S=%d Hq=%d Hkv=%d hd=%d scale=%.4f window=%d head_groups=%d", s.B, s.S, s.Hq,
             s.Hkv, s.hd, (double)s.scale, s.window, s.head_groups);
    printf("%s: %s\n", label, shape);
    char why[160];
    if (!attention_supported(&s, why, sizeof(why))) {
        printf("  unexpectedly unsupported: %s  FAIL\n", why);
        test_record(t, 0);
        return;
    }
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, O = (size_t)s.Hq * s.hd, rows = (size_t)s.B * s.S;
    size_t n_qkv = rows * C, n_out = rows * O, n_stats = (size_t)s.B * s.Hq * s.S;
    uint16_t *h_qkv = (uint16_t *)mallocCheck(n_qkv * 2), *h_dout = (uint16_t *)mallocCheck(n_out * 2);
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < C; c++)  // q, k larger than v so that the softmax is far from uniform
            h_qkv[r * C + c] = random_bf16_nonzero(c < (size_t)(s.Hq + s.Hkv) * s.hd ? 2.0 : 1.0);
    for (size_t i = 0; i < n_out; i++) h_dout[i] = random_bf16_nonzero(1.0);

    void *d_qkv, *d_dout;
    cudaCheck(cudaMalloc(&d_qkv, n_qkv * 2));
    cudaCheck(cudaMalloc(&d_dout, n_out * 2));
    cudaCheck(cudaMemcpy(d_qkv, h_qkv, n_qkv * 2, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemcpy(d_dout, h_dout, n_out * 2, cudaMemcpyHostToDevice));
    void *d_out = device_alloc_nan(n_out * 2), *d_stats = device_alloc_nan(n_stats * 4);
    void *d_dqkv = device_alloc_nan(n_qkv * 2);
    size_t ws_bytes = attention_workspace_bytes(&s);
    void *d_ws = NULL;
    if (ws_bytes > 0) cudaCheck(cudaMalloc(&d_ws, ws_bytes));
    printf("  workspace %zu bytes\n", ws_bytes);

    attention_forward((bf16 *)d_out, (float *)d_stats, (const bf16 *)d_qkv, &s, d_ws, 0);
    attention_backward((bf16 *)d_dqkv, (const bf16 *)d_dout, (const bf16 *)d_out, (const float *)d_stats,
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
    compare(t, "out", out, ref_out, n_out, TOL_OUT);
    compare(t, "stats", stats, ref_lse, n_stats, TOL_STATS);
    const char *names[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; part++) {
        size_t n = gather_part(a, dqkv, &s, part);
        gather_part(b, ref_dqkv, &s, part);
        compare(t, names[part], a, b, n, TOL_GRAD);
    }
    if (s.head_groups > 1) {  // the sliced backward's packed-group graph, group by group, against the same reference
        void *d_dqkv_p = device_alloc_nan(n_qkv * 2);
        backward_by_packed_groups(d_dqkv_p, d_dout, d_out, d_stats, d_qkv, &s);
        download_bf16(dqkv, d_dqkv_p, n_qkv);
        const char *packed_names[3] = {"dq grp", "dk grp", "dv grp"};
        for (int part = 0; part < 3; part++) {
            size_t n = gather_part(a, dqkv, &s, part);
            gather_part(b, ref_dqkv, &s, part);
            compare(t, packed_names[part], a, b, n, TOL_GRAD);
        }
        cudaCheck(cudaFree(d_dqkv_p));
    }

    if (check_determinism) {
        uint16_t *first = (uint16_t *)mallocCheck(n_qkv * 2), *second = (uint16_t *)mallocCheck(n_qkv * 2);
        cudaCheck(cudaMemcpy(first, d_dqkv, n_qkv * 2, cudaMemcpyDeviceToHost));
        attention_backward((bf16 *)d_dqkv, (const bf16 *)d_dout, (const bf16 *)d_out, (const float *)d_stats,
                           (const bf16 *)d_qkv, &s, d_ws, 0);
        cudaCheck(cudaMemcpy(second, d_dqkv, n_qkv * 2, cudaMemcpyDeviceToHost));
        printf("  backward rerun bitwise identical: %s (informational)\n",
               memcmp(first, second, n_qkv * 2) == 0 ? "yes" : "no");
        free(first);
        free(second);
    }

    cudaCheck(cudaFree(d_qkv));
    cudaCheck(cudaFree(d_dout));
    cudaCheck(cudaFree(d_out));
    cudaCheck(cudaFree(d_stats));
    cudaCheck(cudaFree(d_dqkv));
    if (d_ws != NULL) cudaCheck(cudaFree(d_ws));
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
}

// ---- timing at the Llama-3-8B shape ----
static void time_case(int S, int head_groups, double peak) {
    AttentionShape s = with_head_groups(make_shape(1, S, 32, 8, 128, 1.0f / sqrtf(128.0f), 0, 0), head_groups);
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, rows = (size_t)s.B * s.S;
    bf16 *qkv, *dqkv, *out, *dout;
    float *stats;
    cudaCheck(cudaMalloc(&qkv, rows * C * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dqkv, rows * C * sizeof(bf16)));
    cudaCheck(cudaMalloc(&out, rows * s.Hq * s.hd * sizeof(bf16)));
    cudaCheck(cudaMalloc(&dout, rows * s.Hq * s.hd * sizeof(bf16)));
    cudaCheck(cudaMalloc(&stats, rows * s.Hq * sizeof(float)));
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(rows * C, 256), 256>>>(qkv, rows * C, 7);
    cudaCheckLaunch();
    fill_random_bf16_kernel<<<(unsigned)ceil_div_size(rows * s.Hq * s.hd, 256), 256>>>(dout, rows * s.Hq * s.hd, 8);
    cudaCheckLaunch();
    size_t ws_bytes = attention_workspace_bytes(&s);
    void *ws = NULL;
    if (ws_bytes > 0) cudaCheck(cudaMalloc(&ws, ws_bytes));

    const int warmup = 2, iters = 10;
    cudaEvent_t e0, e1, e2;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    cudaCheck(cudaEventCreate(&e2));
    for (int i = 0; i < warmup; i++) {
        attention_forward(out, stats, qkv, &s, ws, 0);
        attention_backward(dqkv, dout, out, stats, qkv, &s, ws, 0);
    }
    float fwd_ms = 0, bwd_ms = 0;
    for (int i = 0; i < iters; i++) {
        float f, b;
        cudaCheck(cudaEventRecord(e0, 0));
        attention_forward(out, stats, qkv, &s, ws, 0);
        cudaCheck(cudaEventRecord(e1, 0));
        attention_backward(dqkv, dout, out, stats, qkv, &s, ws, 0);
        cudaCheck(cudaEventRecord(e2, 0));
        cudaCheck(cudaEventSynchronize(e2));
        cudaCheck(cudaEventElapsedTime(&f, e0, e1));
        cudaCheck(cudaEventElapsedTime(&b, e1, e2));
        fwd_ms += f;
        bwd_ms += b;
    }
    fwd_ms /= iters;
    bwd_ms /= iters;
    double fwd_flops = 4.0 * S * (double)S * s.hd * s.Hq / 2.0;  // causal: half of QK^T and PV
    double bwd_flops = 2.5 * fwd_flops;
    double fwd_tf = fwd_flops / (fwd_ms * 1e-3) / 1e12, bwd_tf = bwd_flops / (bwd_ms * 1e-3) / 1e12;
    double all_tf = (fwd_flops + bwd_flops) / ((fwd_ms + bwd_ms) * 1e-3) / 1e12;
    printf("%6d %6d %9.3f %8.1f %9.3f %8.1f %9.3f %8.1f %7.1f%% %8.1f\n", S, head_groups, fwd_ms, fwd_tf, bwd_ms, bwd_tf,
           fwd_ms + bwd_ms, all_tf, 100.0 * all_tf / peak, ws_bytes / 1048576.0);
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    cudaCheck(cudaEventDestroy(e2));
    cudaCheck(cudaFree(qkv));
    cudaCheck(cudaFree(dqkv));
    cudaCheck(cudaFree(out));
    cudaCheck(cudaFree(dout));
    cudaCheck(cudaFree(stats));
    if (ws != NULL) cudaCheck(cudaFree(ws));
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
    check_supported(&t);
    check_bad_input(&t);
    if (cuda_device_count() == 0) {
        printf("test_attention: no CUDA device: cuDNN checks SKIPPED (only the %d host checks ran)\n",
               t.passed + t.failed);
        return test_report_finish(&t, "test_attention");
    }
    attention_init();
    check_case(&t, "small GQA", make_shape(2, 37, 4, 2, 64, 0.125f, 0, 0), 0);
    check_case(&t, "long MHA", make_shape(1, 1000, 8, 8, 128, 1.0f / sqrtf(128.0f), 0, 0), 1);
    check_case(&t, "window 64, Hkv 1", make_shape(2, 300, 4, 1, 128, 1.0f / sqrtf(128.0f), 64, 0), 0);
    check_case(&t, "window 16, scale 0.2", make_shape(1, 100, 4, 2, 64, 0.2f, 16, 0), 0);
    check_case(&t, "window = S (= causal)", make_shape(1, 50, 2, 2, 64, 0.125f, 50, 0), 0);
    check_case(&t, "hd 256", make_shape(1, 70, 2, 1, 256, 0.0625f, 0, 0), 0);
    check_case(&t, "small GQA, 2 head groups", with_head_groups(make_shape(2, 37, 4, 2, 64, 0.125f, 0, 0), 2), 0);
    check_case(&t, "long GQA, 4 head groups", with_head_groups(make_shape(1, 1000, 16, 8, 128, 1.0f / sqrtf(128.0f), 0, 0), 4), 1);
    check_case(&t, "window 64, MHA, 8 head groups", with_head_groups(make_shape(2, 300, 8, 8, 64, 0.125f, 64, 0), 8), 0);
    printf("%d checks, %d failed\n", t.passed + t.failed, t.failed);
    if (t.failed == 0) {
        printf("\nLlama-3-8B attention (B=1, Hq=32, Hkv=8, hd=128, causal); %% of a %.0f TFLOP/s roofline\n", peak);
        printf("%6s %6s %9s %8s %9s %8s %9s %8s %8s %8s\n", "S", "groups", "fwd ms", "TFLOP/s", "bwd ms", "TFLOP/s",
               "total ms", "TFLOP/s", "of peak", "ws MiB");
        time_case(8192, 1, peak);
        time_case(16384, 1, peak);
        time_case(16384, 2, peak);
        time_case(16384, 8, peak);
    }
    attention_free();
    return test_report_finish(&t, "test_attention");
}

// Kernel-level tests of lora_gpu.cu against their CPU twins (quant.h, lora.h) and a double reference.
//   quant_quantize / quant_dequantize (int8, NF4): codes, absmax and dequantized bf16 bits identical to
//     quant_quantize_cpu / quant_dequantize_cpu, on sizes with a partial last block and an odd count,
//     blocks of zeros, outliers and values on NF4 midpoints; every output poisoned with 0xFF first
//     (an element the kernel forgot to write differs), plus guard bytes after each output.
//   lora_materialize_bblk / lora_gather_dbblk: bit-exact against the same loops on the CPU.
//   lora_forward / lora_backward_weights / lora_backward_input of every group (q|k|v with two of its
//     targets, o, gate|up, down): against the formulas of lora_gpu.h in double on the same bf16 inputs.
//     The backward runs in two row chunks (as the MsT MLP loop does) on a gradient block that starts
//     non-zero: the adapter gradients must add to it, chunk after chunk (the GPU model zeroes the
//     block once; an overwriting GEMM would lose the first chunk and the start values).
//     Tolerance 2e-2 of the largest reference entry: bf16 storage of u and du (2^-8 relative each)
//     through sums of a few hundred terms; a transposed or misplaced operand is off by O(1).
// Build: make build/test_lora_kernels. Run: ./build/test_lora_kernels (skips, and says so, without a GPU).
#include <math.h>
#include "lora_gpu.h"
#include "matmul.h"
#include "mst.h"
#include "tests/test_util.h"

#define GUARD 64
#define TOL_LORA 2e-2

static uint64_t rng_state = 0x243F6A8885A308D3ull;

static double rng_normal(void) {  // Box-Muller on splitmix64 uniforms
    double u1 = ((double)(lora_splitmix(&rng_state) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = (double)(lora_splitmix(&rng_state) >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

// Device copy of host bytes with GUARD bytes of 0x5A after them.
static void *to_device(const void *host, size_t bytes) {
    char *d;
    cudaCheck(cudaMalloc((void **)&d, bytes + GUARD));
    cudaCheck(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice));
    cudaCheck(cudaMemset(d + bytes, 0x5A, GUARD));
    return d;
}

// A poisoned (0xFF) device output of `bytes` with guard bytes.
static void *device_output(size_t bytes) {
    char *d;
    cudaCheck(cudaMalloc((void **)&d, bytes + GUARD));
    cudaCheck(cudaMemset(d, 0xFF, bytes));
    cudaCheck(cudaMemset(d + bytes, 0x5A, GUARD));
    return d;
}

// Copies a device output back; records a failure when its guard bytes changed.
static void *from_device(TestReport *r, const void *d, size_t bytes, const char *what) {
    char *h = (char *)mallocCheck(bytes + GUARD);
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(h, d, bytes + GUARD, cudaMemcpyDeviceToHost));
    int intact = 1;
    for (int i = 0; i < GUARD; i++) intact &= (unsigned char)h[bytes + i] == 0x5A;
    if (!intact) {
        char line[160];
        snprintf(line, sizeof(line), "%s: wrote past its end", what);
        test_check(r, 0, line);
    }
    return h;
}

// Weights with the cases the quantizers must get right: normal values, a zero block, an outlier, NF4
// midpoints and values just beside them (times the block's absmax).
static uint16_t *quant_input(size_t n) {
    uint16_t *w = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) w[i] = float_to_bf16_bits((float)(0.05 * rng_normal()));
    for (size_t i = QUANT_BLOCK; i < 2 * QUANT_BLOCK && i < n; i++) w[i] = 0;
    if (n > 3 * QUANT_BLOCK) {
        w[2 * QUANT_BLOCK + 5] = float_to_bf16_bits(4.0f);  // absmax 4 of block 2: exact in bf16
        for (int k = 0; k < 15 && (size_t)(2 * QUANT_BLOCK + 6 + 3 * k + 2) < n; k++) {
            float mid = 4.0f * quant_nf4_midpoint(k);
            uint16_t b = float_to_bf16_bits(mid);
            size_t at = 2 * QUANT_BLOCK + 6 + 3 * k;
            w[at] = b;
            w[at + 1] = (uint16_t)(b + 1);
            w[at + 2] = (uint16_t)(b - 1);
        }
    }
    return w;
}

static void test_quant_case(TestReport *r, int kind, size_t n) {
    char label[128];
    uint16_t *w = quant_input(n);
    float *wf = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) wf[i] = bf16_bits_to_float(w[i]);
    size_t cb = quant_code_bytes(kind, n), nb = quant_blocks(n);
    unsigned char *codes = (unsigned char *)mallocCheck(cb);
    float *absmax = (float *)mallocCheck(nb * sizeof(float));
    uint16_t *deq = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    quant_quantize_cpu(kind, codes, absmax, wf, n);
    quant_dequantize_cpu(kind, deq, codes, absmax, n);

    bf16 *d_w = (bf16 *)to_device(w, n * sizeof(uint16_t));
    unsigned char *d_codes = (unsigned char *)device_output(cb);
    float *d_absmax = (float *)device_output(nb * sizeof(float));
    bf16 *d_out = (bf16 *)device_output(n * sizeof(uint16_t));
    quant_quantize(kind, d_codes, d_absmax, d_w, n, 0);
    quant_dequantize(kind, d_out, d_codes, d_absmax, n, 0);
    unsigned char *g_codes = (unsigned char *)from_device(r, d_codes, cb, "codes");
    float *g_absmax = (float *)from_device(r, d_absmax, nb * sizeof(float), "absmax");
    uint16_t *g_out = (uint16_t *)from_device(r, d_out, n * sizeof(uint16_t), "dequantized");
    size_t bad_codes = 0, bad_out = 0;
    for (size_t i = 0; i < cb; i++) bad_codes += g_codes[i] != codes[i];
    for (size_t i = 0; i < n; i++) bad_out += g_out[i] != deq[i];
    snprintf(label, sizeof(label), "%s n=%zu: codes identical to the CPU (%zu differ)", base_quant_name(kind), n, bad_codes);
    test_check(r, bad_codes == 0, label);
    snprintf(label, sizeof(label), "%s n=%zu: absmax identical to the CPU", base_quant_name(kind), n);
    test_check(r, memcmp(g_absmax, absmax, nb * sizeof(float)) == 0, label);
    snprintf(label, sizeof(label), "%s n=%zu: dequantized bf16 identical to the CPU (%zu differ)", base_quant_name(kind), n, bad_out);
    test_check(r, bad_out == 0, label);
    cudaCheck(cudaFree(d_w));
    cudaCheck(cudaFree(d_codes));
    cudaCheck(cudaFree(d_absmax));
    cudaCheck(cudaFree(d_out));
    free(w);
    free(wf);
    free(codes);
    free(absmax);
    free(deq);
    free(g_codes);
    free(g_absmax);
    free(g_out);
}

// ---- LoRA ----

// A small config whose fused outputs have distinct widths: d 64, q 64, kv 32, F 96.
static ModelConfig lora_test_config(void) {
    ModelConfig c;
    preset_base(&c, FAMILY_LLAMA, 32, 64, 2, 4, 2, 16, 96, 64, 1e-5f, 10000.0f);
    return c;
}

static float *bf16_random_f32(size_t n, double std) {  // bf16-valued floats
    float *x = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = bf16_bits_to_float(float_to_bf16_bits((float)(std * rng_normal())));
    return x;
}

static bf16 *device_bf16(const float *x, size_t n) {
    uint16_t *b = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) b[i] = float_to_bf16_bits(x[i]);
    bf16 *d = (bf16 *)to_device(b, n * sizeof(uint16_t));
    free(b);
    return d;
}

static float *host_f32_of_bf16(TestReport *r, const bf16 *d, size_t n, const char *what) {
    uint16_t *b = (uint16_t *)from_device(r, d, n * sizeof(uint16_t), what);
    float *x = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) x[i] = bf16_bits_to_float(b[i]);
    free(b);
    return x;
}

// The group's B_blk on the CPU: (out_g, R), target j's B at its rows and its r columns.
static float *cpu_bblk(const float *layer, const LoraLayout *L, int group) {
    int R = L->group_rank[group], r = L->rank, j = 0;
    float *b = (float *)callocCheck(L->group_out[group] * R, sizeof(float));
    for (int t = 0; t < LORA_TARGET_COUNT; t++) {
        if (lora_target_group(t) != group || !lora_has(L, t)) continue;
        for (size_t i = 0; i < L->out[t]; i++)
            for (int k = 0; k < r; k++) b[(L->row_off[t] + i) * R + j * r + k] = layer[L->b_off[t] + i * r + k];
        j++;
    }
    return b;
}

static void compare_rows(TestReport *r, const char *name, const float *got, const double *ref, size_t n) {
    float *reff = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) reff[i] = (float)ref[i];
    test_compare_f32(r, name, got, reff, n, TOL_LORA);
    free(reff);
}

// One group of layer 1 (of 2): forward y += scale u B_blk^T over n rows and the three backward
// products in two chunks of rows, added to start gradients g0, against double loops; also
// lora_materialize_bblk and lora_gather_dbblk (of the second chunk) bit for bit.
static void test_lora_group(TestReport *r, const LoraLayout *L, int group, int n) {
    const char *gname[LORA_GROUP_COUNT] = {"q|k|v", "o", "gate|up", "down"};
    char name[128];
    int R = L->group_rank[group], in = (int)L->group_in[group], out = (int)L->group_out[group], l = 1;
    size_t lsz = L->layer_size;
    float *params = bf16_random_f32(L->total, 0.3), *layer = params + lsz;
    float *x = bf16_random_f32((size_t)n * in, 1.0), *y0 = bf16_random_f32((size_t)n * out, 1.0);
    float *dy = bf16_random_f32((size_t)n * out, 1.0), *dx0 = bf16_random_f32((size_t)n * in, 1.0);
    GpuLora g;
    memset(&g, 0, sizeof(g));
    g.cfg.rank = L->rank;
    g.layout = *L;
    g.params = device_bf16(params, L->total);
    float *g0 = bf16_random_f32(lsz, 10.0);  // std 10 against ~30 of the gradients: losing it fails
    g.grads = (float *)to_device(g0, lsz * sizeof(float));
    g.grads_per_layer = 1;
    g.bblk[group] = (bf16 *)device_output((size_t)out * R * sizeof(uint16_t));
    g.u = (bf16 *)device_output((size_t)n * R * sizeof(uint16_t));
    g.du = (bf16 *)device_output((size_t)n * R * sizeof(uint16_t));
    g.dbblk = (float *)device_output((size_t)out * R * sizeof(float));
    bf16 *d_x = device_bf16(x, (size_t)n * in), *d_y = device_bf16(y0, (size_t)n * out);
    bf16 *d_dy = device_bf16(dy, (size_t)n * out), *d_dx = device_bf16(dx0, (size_t)n * in);

    float *bblk = cpu_bblk(layer, L, group);
    int blocked = group == LG_QKV || group == LG_GATE_UP;
    if (blocked) {
        lora_prepare_group(&g, l, group, 0);
        float *got = host_f32_of_bf16(r, g.bblk[group], (size_t)out * R, "bblk");
        snprintf(name, sizeof(name), "%s: lora_materialize_bblk identical to the CPU", gname[group]);
        test_check(r, memcmp(got, bblk, (size_t)out * R * sizeof(float)) == 0, name);
        free(got);
    }
    // double references
    const float *A = layer + L->group_a[group];
    double *u = (double *)callocCheck((size_t)n * R, sizeof(double)), *y = (double *)mallocCheck((size_t)n * out * sizeof(double));
    double *du = (double *)callocCheck((size_t)n * R, sizeof(double)), *dx = (double *)mallocCheck((size_t)n * in * sizeof(double));
    double *dA = (double *)callocCheck((size_t)R * in, sizeof(double)), *dB = (double *)callocCheck((size_t)out * R, sizeof(double));
    for (size_t i = 0; i < (size_t)R * in; i++) dA[i] = g0[L->group_a[group] + i];
    int half = n / 2;  // backward chunks: rows [0, half) and [half, n)
    for (int i = 0; i < n; i++)
        for (int k = 0; k < R; k++)
            for (int c = 0; c < in; c++) u[(size_t)i * R + k] += (double)x[(size_t)i * in + c] * A[(size_t)k * in + c];
    for (int i = 0; i < n; i++) {
        for (int o = 0; o < out; o++) {
            double s = 0.0, g = dy[(size_t)i * out + o];
            for (int k = 0; k < R; k++) s += u[(size_t)i * R + k] * bblk[(size_t)o * R + k];
            y[(size_t)i * out + o] = y0[(size_t)i * out + o] + L->scale * s;
            for (int k = 0; k < R; k++) {
                du[(size_t)i * R + k] += L->scale * g * bblk[(size_t)o * R + k];
                dB[(size_t)o * R + k] += L->scale * g * u[(size_t)i * R + k];
            }
        }
    }
    for (int i = 0; i < n; i++)
        for (int c = 0; c < in; c++) {
            double s = dx0[(size_t)i * in + c];
            for (int k = 0; k < R; k++) {
                s += du[(size_t)i * R + k] * A[(size_t)k * in + c];
                dA[(size_t)k * in + c] += du[(size_t)i * R + k] * x[(size_t)i * in + c];
            }
            dx[(size_t)i * in + c] = s;
        }
    lora_forward(&g, l, group, d_y, d_x, n, 0);
    for (int r0 = 0; r0 < n; r0 += half) {
        int rows = r0 == 0 ? half : n - half;
        lora_backward_weights(&g, l, group, d_dy + (size_t)r0 * out, d_x + (size_t)r0 * in, rows, 0);
        lora_backward_input(&g, l, group, d_dx + (size_t)r0 * in, rows, 0);
    }
    float *gy = host_f32_of_bf16(r, d_y, (size_t)n * out, "y"), *gdx = host_f32_of_bf16(r, d_dx, (size_t)n * in, "dx");
    float *grads = (float *)from_device(r, g.grads, lsz * sizeof(float), "grads");
    snprintf(name, sizeof(name), "%s: y += scale u B^T", gname[group]);
    compare_rows(r, name, gy, y, (size_t)n * out);
    snprintf(name, sizeof(name), "%s: dx += du A", gname[group]);
    compare_rows(r, name, gdx, dx, (size_t)n * in);
    snprintf(name, sizeof(name), "%s: dA_cat", gname[group]);
    compare_rows(r, name, grads + L->group_a[group], dA, (size_t)R * in);
    float *gdb = cpu_bblk(grads, L, group);  // gathered B gradients laid out as B_blk (zeros off the blocks)
    float *gb0 = cpu_bblk(g0, L, group);     // their start values, laid out the same way
    float *ones = (float *)mallocCheck(lsz * sizeof(float));
    for (size_t i = 0; i < lsz; i++) ones[i] = 1.0f;
    float *mask = cpu_bblk(ones, L, group);  // 1 on the diagonal blocks
    double *dB_diag = (double *)callocCheck((size_t)out * R, sizeof(double));
    for (size_t i = 0; i < (size_t)out * R; i++) dB_diag[i] = mask[i] != 0.0f ? gb0[i] + dB[i] : 0.0;
    snprintf(name, sizeof(name), "%s: dB (diagonal blocks of dB_blk)", gname[group]);
    compare_rows(r, name, gdb, dB_diag, (size_t)out * R);
    float *lg = (float *)mallocCheck(lsz * sizeof(float));
    if (blocked) {  // the gather itself, bit for bit: the B gradients read between the two chunks (rerun
        // from g0) plus the dB_blk the second chunk left in g.dbblk equal those read after it
        cudaCheck(cudaMemcpy(g.grads, g0, lsz * sizeof(float), cudaMemcpyHostToDevice));
        lora_backward_weights(&g, l, group, d_dy, d_x, half, 0);
        float *before = (float *)from_device(r, g.grads, lsz * sizeof(float), "grads");
        memcpy(lg, before, lsz * sizeof(float));
        lora_backward_weights(&g, l, group, d_dy + (size_t)half * out, d_x + (size_t)half * in, n - half, 0);
        float *dbblk = (float *)from_device(r, g.dbblk, (size_t)out * R * sizeof(float), "dbblk");
        float *after = (float *)from_device(r, g.grads, lsz * sizeof(float), "grads");
        int j = 0;
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (lora_target_group(t) != group || !lora_has(L, t)) continue;
            for (size_t i = 0; i < L->out[t]; i++)
                for (int k = 0; k < L->rank; k++)
                    lg[L->b_off[t] + i * L->rank + k] += dbblk[(L->row_off[t] + i) * R + j * L->rank + k];
            j++;
        }
        int same = 1;
        for (int t = 0; t < LORA_TARGET_COUNT; t++) {
            if (lora_target_group(t) != group || !lora_has(L, t)) continue;
            same &= memcmp(lg + L->b_off[t], after + L->b_off[t], L->out[t] * L->rank * sizeof(float)) == 0;
        }
        snprintf(name, sizeof(name), "%s: lora_gather_dbblk adds to the gradients, identical to the CPU", gname[group]);
        test_check(r, same, name);
        free(before);
        free(after);
        free(dbblk);
    }
    cudaCheck(cudaFree(g.params));
    cudaCheck(cudaFree(g.grads));
    cudaCheck(cudaFree(g.bblk[group]));
    cudaCheck(cudaFree(g.u));
    cudaCheck(cudaFree(g.du));
    cudaCheck(cudaFree(g.dbblk));
    cudaCheck(cudaFree(d_x));
    cudaCheck(cudaFree(d_y));
    cudaCheck(cudaFree(d_dy));
    cudaCheck(cudaFree(d_dx));
    free(params);
    free(x);
    free(y0);
    free(dy);
    free(dx0);
    free(g0);
    free(gb0);
    free(bblk);
    free(u);
    free(y);
    free(du);
    free(dx);
    free(dA);
    free(dB);
    free(gy);
    free(gdx);
    free(grads);
    free(gdb);
    free(ones);
    free(mask);
    free(dB_diag);
    free(lg);
}

int main(void) {
    TestReport r = {0, 0};
    if (cuda_device_count() == 0) {
        printf("no GPU: test_lora_kernels SKIPPED\n");
        return test_report_finish(&r, "test_lora_kernels");
    }
    printf("\n== quant_quantize / quant_dequantize vs quant.h on the CPU\n");
    const size_t sizes[4] = {1, 129, 64 * 37, 1000003};
    for (int kind = BASE_QUANT_INT8; kind <= BASE_QUANT_NF4; kind++)
        for (int i = 0; i < 4; i++) test_quant_case(&r, kind, sizes[i]);

    matmul_init((size_t)32 << 20);
    ModelConfig c = lora_test_config();
    LoraConfig lc = {8, 16.0f, (1u << LORA_Q) | (1u << LORA_V) | (1u << LORA_O) | (1u << LORA_GATE) | (1u << LORA_UP) |
                                   (1u << LORA_DOWN), BASE_QUANT_NONE};
    LoraLayout L;
    lora_layout_init(&L, &c, &lc);
    test_table_header("LoRA group GEMMs and B_blk kernels (rank 8; q|k|v adapts q and v) vs double");
    for (int group = 0; group < LORA_GROUP_COUNT; group++) test_lora_group(&r, &L, group, 40);
    matmul_free();
    return test_report_finish(&r, "test_lora_kernels");
}

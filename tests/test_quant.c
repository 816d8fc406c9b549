// Tests of the quantized frozen base on the CPU (quant.h, cpu_model.h with --base-quant):
//  1. NF4 against bitsandbytes (tests/ref/quant_nf4.ref.bin, scripts/make_quant_reference.py): codes,
//     absmax and the fp32 dequantized values identical, on a vector with a partial last block, an odd
//     count, a zero block, an outlier and values on and beside every NF4 midpoint.
//  2. int8 and NF4 error bounds on random blocks: |w - w'| <= absmax / 254 (int8, before the bf16
//     rounding), <= absmax x half the widest NF4 gap (NF4), each up to fp32 rounding (the product
//     code x absmax / 127 carries up to 127 ulps of absmax / 127: a factor 1 + 254 x 2^-23 on the
//     bound); the absmax element is exact; zeros stay zero; the dequantized bf16 is the nearest-even
//     rounding of the fp32 value.
//  3. The CPU model with a quantized base computes with dequantize-then-bf16 weights: its logits equal
//     those of an unquantized model loaded with quant_quantize_cpu + quant_dequantize_cpu's bf16 bits
//     (bit for bit), and differ from the bf16 base's by a visible amount that is not all of them
//     (relative L2 between 1e-5 and 0.5: these tiny random models amplify weight errors).
//  4. Training falls: LoRA (rank 8, every target) on the NF4 base of tests/ref/llama3_gqa, 30 AdamW
//     steps on its reference batch: the loss drops by more than a third.
// Usage: test_quant [ref_dir] (default tests/ref).
// Build: gcc -O2 -Wall -Wextra -fopenmp -I. tests/test_quant.c -o build/test_quant -lm
#include "cpu_model.h"
#include "tensor_file.h"
#include "tests/test_util.h"

static uint64_t rng = 0x5DEECE66Dull;

static double rng_normal(void) {
    double u1 = ((double)(lora_splitmix(&rng) >> 11) + 0.5) / 9007199254740992.0;
    double u2 = (double)(lora_splitmix(&rng) >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static void test_bitsandbytes(TestReport *r, const char *dir) {
    char path[1024];
    snprintf(path, sizeof(path), "%s/quant_nf4.ref.bin", dir);
    test_table_header("NF4 vs bitsandbytes quantize_4bit / dequantize_4bit (blocksize 64)");
    TensorFile tf;
    tensor_file_load(&tf, path);
    const NamedTensor *w = tensor_file_get(&tf, "w", path), *codes = tensor_file_get(&tf, "codes", path);
    const NamedTensor *absmax = tensor_file_get(&tf, "absmax", path), *deq = tensor_file_get(&tf, "dequant", path);
    size_t n = w->numel;
    if (codes->numel != quant_code_bytes(BASE_QUANT_NF4, n) || absmax->numel != quant_blocks(n) || deq->numel != n)
        die("%s: sizes of codes/absmax/dequant do not fit w (%zu)", path, n);
    uint8_t *c = (uint8_t *)mallocCheck(codes->numel);
    float *a = (float *)mallocCheck(absmax->numel * sizeof(float)), *v = (float *)mallocCheck(n * sizeof(float));
    quant_quantize_cpu(BASE_QUANT_NF4, c, a, (const float *)w->data, n);
    size_t bad = 0;
    for (size_t i = 0; i < codes->numel; i++) bad += c[i] != (uint8_t)((const int32_t *)codes->data)[i];
    char line[128];
    snprintf(line, sizeof(line), "NF4 codes of %zu elements identical to bitsandbytes (%zu bytes differ)", n, bad);
    test_check(r, bad == 0, line);
    test_compare_f32(r, "absmax", a, (const float *)absmax->data, absmax->numel, 0.0);
    for (size_t i = 0; i < n; i++) v[i] = quant_value_cpu(BASE_QUANT_NF4, c, a, i);
    test_compare_f32(r, "dequantized (fp32)", v, (const float *)deq->data, n, 0.0);
    free(c);
    free(a);
    free(v);
    tensor_file_free(&tf);
}

static void test_bounds(TestReport *r) {
    test_table_header("error bounds on 64 random blocks (normal values, scale 0.02; block 3 zeros)");
    size_t n = 64 * QUANT_BLOCK;
    float *w = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) w[i] = bf16_bits_to_float(float_to_bf16_bits((float)(0.02 * rng_normal())));
    memset(w + 3 * QUANT_BLOCK, 0, QUANT_BLOCK * sizeof(float));
    double max_gap = 0.0;
    for (int k = 0; k < 15; k++) max_gap = fmax(max_gap, QUANT_NF4_LEVELS[k + 1] - QUANT_NF4_LEVELS[k]);
    for (int kind = BASE_QUANT_INT8; kind <= BASE_QUANT_NF4; kind++) {
        uint8_t *codes = (uint8_t *)mallocCheck(quant_code_bytes(kind, n));
        float *absmax = (float *)mallocCheck(quant_blocks(n) * sizeof(float));
        uint16_t *bits = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
        quant_quantize_cpu(kind, codes, absmax, w, n);
        quant_dequantize_cpu(kind, bits, codes, absmax, n);
        double worst = 0.0, worst_abs = 0.0, at_max = 0.0, zeros = 0.0;
        size_t not_nearest = 0;
        for (size_t i = 0; i < n; i++) {
            float a = absmax[i / QUANT_BLOCK], v = quant_value_cpu(kind, codes, absmax, i);
            double bound = kind == BASE_QUANT_INT8 ? a / 254.0 : a * max_gap / 2.0;
            double err = fabs((double)w[i] - v);
            worst_abs = fmax(worst_abs, err);
            if (bound > 0.0) worst = fmax(worst, err / bound);
            if (fabsf(w[i]) == a && a > 0.0f) at_max = fmax(at_max, fabs((double)w[i] - v));
            if (i / QUANT_BLOCK == 3) zeros = fmax(zeros, fabs(bf16_bits_to_float(bits[i])));
            not_nearest += bits[i] != float_to_bf16_bits(v);
        }
        char label[96];
        snprintf(label, sizeof(label), "%s: max |w - w'| / bound", base_quant_name(kind));
        test_table_row(r, label, worst_abs, worst, 1.0 + 254.0 * 1.1920929e-7);
        snprintf(label, sizeof(label), "%s: error at each block's absmax", base_quant_name(kind));
        test_table_row(r, label, at_max, at_max, 0.0);
        snprintf(label, sizeof(label), "%s: zero block dequantizes to 0", base_quant_name(kind));
        test_table_row(r, label, zeros, zeros, 0.0);
        snprintf(label, sizeof(label), "%s: bf16 output = nearest-even rounding of the fp32 value", base_quant_name(kind));
        test_check(r, not_nearest == 0, label);
        free(codes);
        free(absmax);
        free(bits);
    }
    free(w);
}

// A CPU model of the base at `model_path` with LoRA (rank 8, every target, adapters from `seed` with
// random B so they matter) on a base stored as `quant`.
static void lora_model(CpuModel *m, const ModelConfig *c, const uint16_t *bf16, int quant, int B, int S) {
    LoraConfig lc = {8, 16.0f, LORA_ALL_TARGETS, quant};
    cpu_model_init(m, c, B, S);
    cpu_model_init_lora(m, &lc, 3);
    uint64_t s = 77;
    for (size_t i = 0; i < m->lora_layout.total; i++)
        m->lora_params[i] = 0.05f * (float)((double)(lora_splitmix(&s) >> 11) / 4503599627370496.0 - 1.0);
    cpu_model_load_bf16(m, bf16);
}

static void test_model(TestReport *r, const char *dir) {
    char model_path[1024], ref_path[1024];
    snprintf(model_path, sizeof(model_path), "%s/llama3_gqa.model.bin", dir);
    snprintf(ref_path, sizeof(ref_path), "%s/llama3_gqa.ref.bin", dir);
    ModelConfig c;
    ParamLayout layout;
    uint16_t *bf16 = model_load_bf16(&c, &layout, model_path);
    TensorFile tf;
    tensor_file_load(&tf, ref_path);
    const NamedTensor *tok = tensor_file_get(&tf, "tokens", ref_path), *tgt = tensor_file_get(&tf, "targets", ref_path);
    int B = (int)tok->dims[0], S = (int)tok->dims[1];
    const int32_t *tokens = (const int32_t *)tok->data, *targets = (const int32_t *)tgt->data;
    size_t nv = (size_t)B * S * c.vocab_size;

    for (int kind = BASE_QUANT_INT8; kind <= BASE_QUANT_NF4; kind++) {
        char title[128];
        snprintf(title, sizeof(title), "%s base of llama3_gqa with LoRA: forward vs dequantize-then-bf16 weights", base_quant_name(kind));
        test_table_header(title);
        uint16_t *deq = (uint16_t *)mallocCheck(layout.total * sizeof(uint16_t));
        memcpy(deq, bf16, layout.total * sizeof(uint16_t));
        for (int l = 0; l < c.n_layers; l++) {
            for (int t = 0; t < LT_COUNT; t++) {
                if (!quant_is_projection(t)) continue;
                size_t off = param_offset(&layout, l, t), n = layout.layer.rows[t] * layout.layer.cols[t];
                float *w = (float *)mallocCheck(n * sizeof(float));
                uint8_t *codes = (uint8_t *)mallocCheck(quant_code_bytes(kind, n));
                float *absmax = (float *)mallocCheck(quant_blocks(n) * sizeof(float));
                for (size_t i = 0; i < n; i++) w[i] = bf16_bits_to_float(bf16[off + i]);
                quant_quantize_cpu(kind, codes, absmax, w, n);
                quant_dequantize_cpu(kind, deq + off, codes, absmax, n);
                free(w);
                free(codes);
                free(absmax);
            }
        }
        CpuModel q, ref, plain;
        lora_model(&q, &c, bf16, kind, B, S);
        lora_model(&ref, &c, deq, BASE_QUANT_NONE, B, S);
        lora_model(&plain, &c, bf16, BASE_QUANT_NONE, B, S);
        cpu_model_forward(&q, tokens, targets, B, S);
        cpu_model_forward(&ref, tokens, targets, B, S);
        cpu_model_forward(&plain, tokens, targets, B, S);
        test_compare_f32(r, "logits: quantized base vs dequantized bf16", q.logits, ref.logits, nv, 0.0);
        double diff = 0.0, scale = 0.0;
        for (size_t i = 0; i < nv; i++) {
            diff += ((double)q.logits[i] - plain.logits[i]) * ((double)q.logits[i] - plain.logits[i]);
            scale += (double)plain.logits[i] * plain.logits[i];
        }
        double rel = sqrt(diff / scale);
        char line[160];
        snprintf(line, sizeof(line), "logits: quantized vs bf16 base, relative L2 %.2e (want 1e-5 .. 0.5)", rel);
        test_check(r, rel > 1e-5 && rel < 0.5, line);
        cpu_model_free(&q);
        cpu_model_free(&ref);
        cpu_model_free(&plain);
        free(deq);
    }

    test_table_header("LoRA on the NF4 base of llama3_gqa: 30 AdamW steps on one batch");
    CpuModel m;
    lora_model(&m, &c, bf16, BASE_QUANT_NF4, B, S);
    float *m1 = (float *)callocCheck(m.lora_layout.total, sizeof(float)), *m2 = (float *)callocCheck(m.lora_layout.total, sizeof(float));
    AdamWHparams h = {1e-2f, 0.9f, 0.95f, 1e-8f, 0.0f};
    float first = 0.0f, last = 0.0f;
    for (int step = 1; step <= 31; step++) {
        cpu_model_zero_grad(&m);
        last = cpu_model_forward(&m, tokens, targets, B, S);
        if (step == 1) first = last;
        if (step == 31) break;
        cpu_model_backward(&m);
        cpu_adamw_step(&m, m1, m2, &h, step, 1.0f);
    }
    char line[128];
    snprintf(line, sizeof(line), "loss %.4f -> %.4f after 30 steps (want a drop of more than a third)", first, last);
    test_check(r, isfinite(last) && last < first * 2.0f / 3.0f, line);
    free(m1);
    free(m2);
    cpu_model_free(&m);
    tensor_file_free(&tf);
    free(bf16);
}

int main(int argc, char **argv) {
    const char *dir = argc > 1 ? argv[1] : "tests/ref";
    TestReport r = {0, 0};
    test_bitsandbytes(&r, dir);
    test_bounds(&r);
    test_model(&r, dir);
    return test_report_finish(&r, "test_quant");
}

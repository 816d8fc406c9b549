// Quantized storage of a frozen base model's projection matrices (QLoRA-style): the formats, their
// sizes, and the CPU quantizer / dequantizer that the GPU kernels (lora_gpu.cu) reproduce bit for bit.
// Plain C (host), also valid C++.
//
// A matrix of n elements (row-major, as in model.bin) is cut into blocks of QUANT_BLOCK consecutive
// elements (the last block may be shorter); each block keeps its absmax (largest |w|) as fp32.
//   int8: code = rint(w * (127 / absmax)) in [-127, 127] (round half to even), one byte per element;
//         w' = code * (absmax / 127).
//   NF4:  s = clamp(w * (1 / absmax), -1, 1), code = the number of midpoints between consecutive
//         NF4 levels that lie strictly below s (the nearest level; a tie goes to the lower one);
//         two codes per byte, the even element in the high nibble (an odd count pads the last
//         byte with the code of 0); w' = NF4[code] * absmax.
//         NF4 are the 16 levels of Dettmers et al. 2023 (QLoRA), normal-distribution quantiles
//         scaled to [-1, 1] with an exact 0; the packing and the tie rule are those of bitsandbytes,
//         so codes and absmax can be compared with bitsandbytes' quantize_4bit(blocksize=64, nf4).
// Every product and quotient is one fp32 operation, so the CPU and the GPU (IEEE division, no fast
// math) produce identical codes; a dequantized weight is rounded to bf16 (nearest even), the type the
// GEMMs read. A block of zeros has absmax 0 and dequantizes to zeros.
#ifndef QUANT_H
#define QUANT_H

#include <math.h>
#include "model_config.h"

#define QUANT_BLOCK 64

typedef enum { BASE_QUANT_NONE = 0, BASE_QUANT_INT8 = 1, BASE_QUANT_NF4 = 2, BASE_QUANT_COUNT } BaseQuant;

static inline const char *base_quant_name(int q) {
    switch (q) {
        case BASE_QUANT_NONE: return "none";
        case BASE_QUANT_INT8: return "int8";
        case BASE_QUANT_NF4: return "nf4";
        default: return "unknown";
    }
}

// The 16 NF4 levels, ascending (QLoRA's NormalFloat4 with blocksize 64 and an exact zero).
static const float QUANT_NF4_LEVELS[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// Midpoint k lies between levels k and k + 1, computed in fp32 as (a + b) / 2.
static inline float quant_nf4_midpoint(int k) { return (QUANT_NF4_LEVELS[k] + QUANT_NF4_LEVELS[k + 1]) / 2.0f; }

static inline size_t quant_blocks(size_t n) { return (n + QUANT_BLOCK - 1) / QUANT_BLOCK; }

// Bytes of the codes of n elements.
static inline size_t quant_code_bytes(int kind, size_t n) { return kind == BASE_QUANT_NF4 ? (n + 1) / 2 : n; }

// The NF4 code of s in [-1, 1]: how many midpoints lie strictly below s.
static inline int quant_nf4_code(float s) {
    int q = 0;
    for (int k = 0; k < 15; k++) q += quant_nf4_midpoint(k) < s;
    return q;
}

static inline float quant_block_absmax(const float *w, size_t n) {
    float a = 0.0f;
    for (size_t i = 0; i < n; i++) a = fmaxf(a, fabsf(w[i]));
    return a;
}

// w (n) fp32 -> codes (quant_code_bytes(kind, n)) and absmax (quant_blocks(n)).
static inline void quant_quantize_cpu(int kind, uint8_t *codes, float *absmax, const float *w, size_t n) {
    if (kind != BASE_QUANT_INT8 && kind != BASE_QUANT_NF4) die("quantize: kind %d is not int8 or nf4", kind);
    if (kind == BASE_QUANT_NF4) memset(codes, 0, quant_code_bytes(kind, n));
    for (size_t b = 0; b < quant_blocks(n); b++) {
        size_t i0 = b * QUANT_BLOCK, len = n - i0 < QUANT_BLOCK ? n - i0 : QUANT_BLOCK;
        float a = quant_block_absmax(w + i0, len);
        absmax[b] = a;
        for (size_t i = i0; i < i0 + len; i++) {
            if (kind == BASE_QUANT_INT8) {
                float inv = a > 0.0f ? 127.0f / a : 0.0f;
                float q = rintf(w[i] * inv);
                codes[i] = (uint8_t)(int8_t)fminf(fmaxf(q, -127.0f), 127.0f);
            } else {
                float inv = a > 0.0f ? 1.0f / a : 0.0f;
                float s = fminf(fmaxf(w[i] * inv, -1.0f), 1.0f);
                codes[i / 2] |= (uint8_t)(quant_nf4_code(s) << (i % 2 ? 0 : 4));
            }
        }
    }
    if (kind == BASE_QUANT_NF4 && n % 2) codes[n / 2] |= (uint8_t)quant_nf4_code(0.0f);
}

// Element i of a quantized matrix, fp32 (before the bf16 rounding).
static inline float quant_value_cpu(int kind, const uint8_t *codes, const float *absmax, size_t i) {
    float a = absmax[i / QUANT_BLOCK];
    if (kind == BASE_QUANT_INT8) return (float)(int8_t)codes[i] * (a / 127.0f);
    int q = i % 2 ? codes[i / 2] & 15 : codes[i / 2] >> 4;
    return QUANT_NF4_LEVELS[q] * a;
}

// codes, absmax -> out (n) bf16 bits: the weights the GEMMs see.
static inline void quant_dequantize_cpu(int kind, uint16_t *out, const uint8_t *codes, const float *absmax, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = float_to_bf16_bits(quant_value_cpu(kind, codes, absmax, i));
}

// w (n) fp32 replaced by its quantized-then-dequantized bf16 value (what the GPU computes with).
static inline void quant_round_trip_cpu(int kind, float *w, size_t n) {
    uint8_t *codes = (uint8_t *)mallocCheck(quant_code_bytes(kind, n));
    float *absmax = (float *)mallocCheck(quant_blocks(n) * sizeof(float));
    quant_quantize_cpu(kind, codes, absmax, w, n);
    for (size_t i = 0; i < n; i++) w[i] = bf16_bits_to_float(float_to_bf16_bits(quant_value_cpu(kind, codes, absmax, i)));
    free(codes);
    free(absmax);
}

// ---- one layer of a quantized base, as the GPU stores it ----
// Per layer one record: for each projection (wq, wk, wv, wo, w_gate, w_up, w_down) its codes and
// absmax; for every other tensor of the layer (norms, biases) its bf16 values. Parts start at
// 16-byte boundaries; the record is a multiple of 256 bytes. Dequantizing the record gives the
// layer's block of the flat bf16 layout (model_config.h), so the GEMMs read W at the usual offsets.

static inline int quant_is_projection(int t) {
    return t == LT_WQ || t == LT_WK || t == LT_WV || t == LT_WO || t == LT_W_GATE || t == LT_W_UP || t == LT_W_DOWN;
}

typedef struct {
    int kind;                                    // BaseQuant
    size_t codes[LT_COUNT], absmax[LT_COUNT];    // byte offsets in the record (projections)
    size_t small[LT_COUNT];                      // byte offset of a bf16 tensor (the others present)
    size_t bytes;                                // record size
} QuantLayerLayout;

static inline size_t quant_align16(size_t b) { return (b + 15) / 16 * 16; }

static inline void quant_layer_layout_init(QuantLayerLayout *q, const ParamLayout *p, int kind) {
    memset(q, 0, sizeof(*q));
    q->kind = kind;
    size_t at = 0;
    for (int t = 0; t < LT_COUNT; t++) {
        q->codes[t] = q->absmax[t] = q->small[t] = SIZE_MAX;
        if (p->layer.offset[t] == SIZE_MAX) continue;
        size_t n = p->layer.rows[t] * p->layer.cols[t];
        if (quant_is_projection(t)) {
            q->codes[t] = at;
            at = quant_align16(at + quant_code_bytes(kind, n));
            q->absmax[t] = at;
            at = quant_align16(at + quant_blocks(n) * sizeof(float));
        } else {
            q->small[t] = at;
            at = quant_align16(at + n * sizeof(uint16_t));
        }
    }
    q->bytes = (at + 255) / 256 * 256;
}

// Bytes of the frozen base weights that stay bf16 with a quantized base: embedding, final norm and
// an untied LM head (the layers' records hold the rest).
static inline size_t quant_rest_elems(const ParamLayout *p, int n_layers) { return p->total - (size_t)n_layers * p->layer_size; }

#endif  // QUANT_H

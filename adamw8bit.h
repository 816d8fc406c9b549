// 8-bit AdamW: optimizer moments stored as one byte per element with block-wise scales, after
// Dettmers et al. 2022, "8-bit Optimizers via Block-wise Quantization" (dynamic tree quantization,
// one absmax per block). This header holds what the CUDA kernel (adamw8bit_update in
// mst_kernels.cu) and its CPU twin (adamw8bit_update_cpu below) share: the two code books, the
// block layout of a model's moments, the per-element AdamW step and the encoders. The CPU
// training path (train_llama --cpu --optimizer adamw8bit) runs the twin.
//
// State of one moment of a tensor of n elements: ceil(n / ADAM8_BLOCK) blocks; block b holds
// codes[b*256 .. b*256+256) (uint8, an index into the moment's code book) and absmax[b] (fp32).
// Element i of block b is code_book[codes[i]] * absmax[b]. The first moment m uses the signed
// book, the second moment v the unsigned one. Codes past n in a tensor's last block are padding:
// never read, never written.
//
// One step on a block (per element, fp32): dequantize m and v; g = grad * grad_scale;
// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= decay * p;
// p -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps) (PyTorch's AdamW, as adamw_update, with the
// new m and v in fp32); then absmax = max |m| (resp. max v) over the block, and every m, v is
// re-encoded as the nearest code of x / absmax (ties to the lower code). A positive v never encodes
// to 0: it takes the smallest positive code instead, so that a v too small for the book only
// shrinks that element's next step (m / (0 + eps) would blow it up).
//
// Bit-exact twins: every fp32 operation of the step and the encoders goes through A8_MUL/ADD/SUB/
// DIV/SQRT, which are the round-to-nearest intrinsics on the device (never fused into an FMA) and
// plain operators on the host (x86-64 SSE: IEEE single, no FMA unless the host compiler is told
// to use one; the Makefile does not). Max, abs and table lookups are exact. So the kernel and the
// twin give the same bits; dev/test_kernels.cu checks it.
//
// Plain C99 (also valid C++); the CUDA compiler sees the shared functions as __host__ __device__.
#ifndef ADAMW8BIT_H
#define ADAMW8BIT_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "model_config.h"
#include "utils.h"

#ifdef __CUDACC__
#define A8_HD __host__ __device__
#else
#define A8_HD
#endif

#ifdef __CUDA_ARCH__
#define A8_MUL(a, b) __fmul_rn(a, b)
#define A8_ADD(a, b) __fadd_rn(a, b)
#define A8_SUB(a, b) __fsub_rn(a, b)
#define A8_DIV(a, b) __fdiv_rn(a, b)
#define A8_SQRT(a) __fsqrt_rn(a)
#else
#define A8_MUL(a, b) ((a) * (b))
#define A8_ADD(a, b) ((a) + (b))
#define A8_SUB(a, b) ((a) - (b))
#define A8_DIV(a, b) ((a) / (b))
#define A8_SQRT(a) sqrtf(a)
#endif

// 256 elements per block: one warp of the kernel holds a block, 8 per lane (the kernels' 16-byte
// unit), so the block's absmax is a warp reduction. The paper uses 2048 for its kernels' sake and
// reports that smaller blocks are more precise (an outlier scales fewer neighbours); the scales
// cost 4 / 256 = 1.6% of a byte per element.
#define ADAM8_BLOCK 256
#define ADAM8_CODES 256
#define ADAM8_DECADES 7   // code book magnitudes span 10^-7 .. 1

// ----------------------------------------------------------------------------
// Code books (dynamic tree quantization). A tree value of decade e (0 <= e < 7) with f fraction
// bits is 10^-e * (0.1 + 0.9 (j + 0.5) / 2^f), j = 0 .. 2^f - 1: the midpoints of 2^f equal bins
// of [0.1, 1], scaled into [10^-(e+1), 10^-e]. Decade e has the bits a byte has left after a sign
// bit (signed book), e zero bits and the indicator bit.
//   signed (m):   f = 6 - e: 64 + 32 + ... + 1 = 127 positive tree values, plus 0, +1 and -1. The
//                 negatives mirror the positives except the smallest (5.5e-7), whose slot holds -1,
//                 so that 256 codes hold 0 and +-1 exactly (the element at a block's absmax is exact).
//                 Sorted: codes 0..126 negative, 127 is 0, 128..255 positive, 255 is +1.
//   unsigned (v): f = 7 - e: 128 + 64 + ... + 2 = 254 tree values, plus 0 (code 0) and 1 (code 255).
// thr[k] is the fp32 midpoint of codes k and k+1 (computed in double): x encodes to the number of
// thresholds below it, the nearest code. To find that number in O(1), y falls in one of ADAM8_BUCKETS
// buckets by its sign, exponent and top ADAM8_BUCKET_MANT mantissa bits (adam8_bucket: non-decreasing
// in y); lo[b] counts the thresholds of the buckets below b, and a short scan adds those of y's own
// bucket that are below y (at most 1 of the signed book's, 2 of the unsigned one's).

#define ADAM8_BUCKET_MANT 6       // mantissa bits of a bucket: 64 buckets per binade
#define ADAM8_BUCKET_EXP_LO 103   // biased exponent of 2^-24: smaller magnitudes share one bucket
#define ADAM8_BUCKET_EXP_HI 127   // of 2^0: magnitudes from 2 up share the top bucket
#define ADAM8_BUCKETS_HALF (((ADAM8_BUCKET_EXP_HI - ADAM8_BUCKET_EXP_LO + 1) << ADAM8_BUCKET_MANT) + 1)
#define ADAM8_BUCKETS (2 * ADAM8_BUCKETS_HALF)  // negative y, then positive y

typedef struct {
    float m_code[ADAM8_CODES], v_code[ADAM8_CODES];          // ascending
    float m_thr[ADAM8_CODES - 1], v_thr[ADAM8_CODES - 1];    // midpoints
    uint8_t m_lo[ADAM8_BUCKETS], v_lo[ADAM8_BUCKETS];        // thresholds in the buckets below
} Adam8Codebooks;

// The encoder's bucket of y (see above): -0 and +0 fall in neighbouring buckets, which no threshold
// separates (none is 0).
A8_HD static inline int adam8_bucket(float y) {
    uint32_t u;
    memcpy(&u, &y, sizeof(u));
    int z = (int)((u & 0x7fffffffu) >> (23 - ADAM8_BUCKET_MANT)) - (ADAM8_BUCKET_EXP_LO << ADAM8_BUCKET_MANT) + 1;
    z = z < 0 ? 0 : z > ADAM8_BUCKETS_HALF - 1 ? ADAM8_BUCKETS_HALF - 1 : z;
    return (u >> 31) ? ADAM8_BUCKETS_HALF - 1 - z : ADAM8_BUCKETS_HALF + z;
}

#define ADAM8_M_ZERO 127  // the signed book's code of 0

static inline int adam8_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// Appends the tree values of every decade (f = bits_at_decade_0 - e fraction bits) to out; returns
// how many. Decimal powers are literals, so the books do not depend on the C library's pow().
static inline int adam8_tree_values(double *out, int bits_at_decade_0) {
    static const double decade[ADAM8_DECADES] = {1.0, 1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6};
    int n = 0;
    for (int e = 0; e < ADAM8_DECADES; e++) {
        int bins = 1 << (bits_at_decade_0 - e);
        for (int j = 0; j < bins; j++) out[n++] = decade[e] * (0.1 + 0.9 * (j + 0.5) / bins);
    }
    return n;
}

// Sorts the 256 values, stores them as fp32 codes and fills the midpoint thresholds and the buckets'
// counts of the thresholds below them.
static inline void adam8_book_finish(double *vals, float *code, float *thr, uint8_t *lo) {
    qsort(vals, ADAM8_CODES, sizeof(double), adam8_cmp_double);
    for (int k = 0; k < ADAM8_CODES; k++) code[k] = (float)vals[k];
    for (int k = 0; k + 1 < ADAM8_CODES; k++) thr[k] = (float)(0.5 * ((double)code[k] + (double)code[k + 1]));
    int k = 0;
    for (int b = 0; b < ADAM8_BUCKETS; b++) {
        while (k < ADAM8_CODES - 1 && adam8_bucket(thr[k]) < b) k++;
        lo[b] = (uint8_t)k;
    }
}

static inline void adam8_codebooks_init(Adam8Codebooks *cb) {
    double tree[ADAM8_CODES], vals[ADAM8_CODES];
    int n = adam8_tree_values(tree, 6), k = 0;  // 127 values; tree[n - 1] is the smallest
    for (int i = 0; i < n; i++) vals[k++] = tree[i];
    for (int i = 0; i < n - 1; i++) vals[k++] = -tree[i];
    vals[k++] = 0.0;
    vals[k++] = 1.0;
    vals[k++] = -1.0;
    if (k != ADAM8_CODES) die("adam8_codebooks_init: signed book has %d codes, not %d", k, ADAM8_CODES);
    adam8_book_finish(vals, cb->m_code, cb->m_thr, cb->m_lo);
    n = adam8_tree_values(tree, 7);  // 254 values
    k = 0;
    for (int i = 0; i < n; i++) vals[k++] = tree[i];
    vals[k++] = 0.0;
    vals[k++] = 1.0;
    if (k != ADAM8_CODES) die("adam8_codebooks_init: unsigned book has %d codes, not %d", k, ADAM8_CODES);
    adam8_book_finish(vals, cb->v_code, cb->v_thr, cb->v_lo);
}

// ----------------------------------------------------------------------------
// Encoding and the per-element step (shared by the kernel and the twin)

// Number of thresholds thr[0..255) below y: the count below y's bucket, then the scan within it.
A8_HD static inline int adam8_search(float y, const float *thr, const uint8_t *lo) {
    int k = lo[adam8_bucket(y)];
    while (k < ADAM8_CODES - 1 && thr[k] < y) k++;
    return k;
}

// max(a, b) for the block scales, a NaN b ignored (as fmaxf, which the host would call out of line).
A8_HD static inline float adam8_max(float a, float b) { return b > a ? b : a; }

// 1 / absmax, or 0 for an all-zero block (every element then encodes to the code of 0).
A8_HD static inline float adam8_inv_scale(float absmax) { return absmax > 0.0f ? A8_DIV(1.0f, absmax) : 0.0f; }

A8_HD static inline uint8_t adam8_encode_m(float m, float inv, const Adam8Codebooks *cb) {
    return (uint8_t)adam8_search(A8_MUL(m, inv), cb->m_thr, cb->m_lo);
}

A8_HD static inline uint8_t adam8_encode_v(float v, float inv, const Adam8Codebooks *cb) {
    int q = adam8_search(A8_MUL(v, inv), cb->v_thr, cb->v_lo);
    return (uint8_t)(q == 0 && v > 0.0f ? 1 : q);
}

// Per-call constants of the step, derived in double on the host (as adamw_update does).
typedef struct {
    float beta1, beta2, one_minus_beta1, one_minus_beta2, eps;
    float decay;          // lr * weight_decay
    float step_size;      // lr / (1 - beta1^step)
    float inv_sqrt_bc2;   // 1 / sqrt(1 - beta2^step)
    float grad_scale;
    uint32_t seed;        // stochastic rounding of bf16 weights
} Adam8Consts;

static inline Adam8Consts adam8_consts(float lr, float beta1, float beta2, float eps, float weight_decay,
                                       float grad_scale, int step, uint32_t seed) {
    if (step < 1) die("adamw8bit: step must be >= 1 (got %d)", step);
    Adam8Consts c;
    c.beta1 = beta1;
    c.beta2 = beta2;
    c.one_minus_beta1 = 1.0f - beta1;
    c.one_minus_beta2 = 1.0f - beta2;
    c.eps = eps;
    c.decay = (float)((double)lr * (double)weight_decay);
    c.step_size = (float)((double)lr / (1.0 - pow((double)beta1, (double)step)));
    c.inv_sqrt_bc2 = (float)(1.0 / sqrt(1.0 - pow((double)beta2, (double)step)));
    c.grad_scale = grad_scale;
    c.seed = seed;
    return c;
}

// One AdamW step of one element: m, v (dequantized) and p updated in place, g the raw gradient.
A8_HD static inline void adam8_step(float *p, float g, float *m, float *v, const Adam8Consts *c) {
    float gk = A8_MUL(g, c->grad_scale);
    *m = A8_ADD(A8_MUL(c->beta1, *m), A8_MUL(c->one_minus_beta1, gk));
    *v = A8_ADD(A8_MUL(c->beta2, *v), A8_MUL(A8_MUL(c->one_minus_beta2, gk), gk));
    float w = A8_SUB(*p, A8_MUL(c->decay, *p));
    float denom = A8_ADD(A8_MUL(A8_SQRT(*v), c->inv_sqrt_bc2), c->eps);
    *p = A8_SUB(w, A8_DIV(A8_MUL(c->step_size, *m), denom));
}

// The rounding bits of elements 4 q .. 4 q + 3 (16 each, element 4 q + r in bits 16 r ..): a
// SplitMix64 finalizer over seed * golden + q, so a kernel hashes once per four elements.
A8_HD static inline uint64_t sr_hash4(uint32_t seed, uint64_t q) {
    uint64_t z = q + (uint64_t)seed * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// 16 random bits for element i: its part of sr_hash4(seed, i / 4).
A8_HD static inline uint32_t sr_bits(uint32_t seed, uint64_t i) {
    return (uint32_t)(sr_hash4(seed, i >> 2) >> (16 * (i & 3))) & 0xffffu;
}

// Stochastic rounding to bf16 bits: add 16 random bits below the bf16 mantissa, then truncate.
// Rounds away from zero with probability (dropped bits) / 2^16, so the expected value is x. Inf
// and NaN pass as is.
A8_HD static inline uint16_t bf16_bits_stochastic(float x, uint32_t rnd) {
    uint32_t u;
    memcpy(&u, &x, sizeof(u));
    if ((u & 0x7f800000u) != 0x7f800000u) u += rnd & 0xffffu;
    return (uint16_t)(u >> 16);
}

// ----------------------------------------------------------------------------
// Block layout of a model's moments: every tensor starts a new block (so a tensor's update
// rewrites only its own scales), tensors in file order. Offsets and sizes are in blocks.

static inline size_t adam8_blocks(size_t n) { return (n + ADAM8_BLOCK - 1) / ADAM8_BLOCK; }

typedef struct {
    size_t embed, layers_begin, layer_blocks, final_norm, lm_head, total;
    size_t layer_offset[LT_COUNT];  // within a layer's blocks (SIZE_MAX: absent)
} Adam8Layout;

static inline void adam8_layout_init(Adam8Layout *a, const ParamLayout *p, const ModelConfig *c) {
    size_t embed = adam8_blocks((size_t)c->vocab_size * c->d_model), at = 0;
    for (int t = 0; t < LT_COUNT; t++) {
        a->layer_offset[t] = p->layer.offset[t] == SIZE_MAX ? SIZE_MAX : at;
        if (p->layer.offset[t] != SIZE_MAX) at += adam8_blocks(p->layer.rows[t] * p->layer.cols[t]);
    }
    a->layer_blocks = at;
    a->embed = 0;
    a->layers_begin = embed;
    a->final_norm = embed + (size_t)c->n_layers * at;
    a->lm_head = c->tied_embeddings ? a->embed : a->final_norm + adam8_blocks((size_t)c->d_model);
    a->total = a->final_norm + adam8_blocks((size_t)c->d_model) + (c->tied_embeddings ? 0 : embed);
}

// First block of the tensor that starts at parameter offset `offset`; dies if no tensor starts there.
static inline size_t adam8_block_of(const Adam8Layout *a, const ParamLayout *p, size_t offset) {
    if (offset == p->embed) return a->embed;
    if (offset == p->final_norm) return a->final_norm;
    if (offset == p->lm_head) return a->lm_head;
    if (offset >= p->layers_begin && offset < p->final_norm) {
        size_t l = (offset - p->layers_begin) / p->layer_size, rel = (offset - p->layers_begin) % p->layer_size;
        for (int t = 0; t < LT_COUNT; t++)
            if (p->layer.offset[t] == rel) return a->layers_begin + l * a->layer_blocks + a->layer_offset[t];
    }
    die("adamw8bit: no tensor starts at parameter offset %zu", offset);
    return 0;
}

// Device or host bytes of both moments' state for a layout: codes and scales.
static inline size_t adam8_state_bytes(const Adam8Layout *a) { return 2 * a->total * (ADAM8_BLOCK + sizeof(float)); }

// Pointers to one tensor's (or a whole model's) 8-bit moments.
typedef struct {
    uint8_t *m_codes, *v_codes;   // blocks * ADAM8_BLOCK
    float *m_absmax, *v_absmax;   // blocks
} Adam8State;

// The state of the tensor whose blocks start at `block` inside a model's state.
static inline Adam8State adam8_state_at(Adam8State s, size_t block) {
    Adam8State t = {s.m_codes + block * ADAM8_BLOCK, s.v_codes + block * ADAM8_BLOCK, s.m_absmax + block,
                    s.v_absmax + block};
    return t;
}

// ----------------------------------------------------------------------------
// The CPU twin of adamw8bit_update: one step of n elements. p is master (fp32) when non-NULL, else
// param (bf16 bits); with master, param (when non-NULL) gets bf16 round-to-nearest copies, else it
// is written with stochastic rounding (bits of sr_bits(seed, element index)). grad fp32.

static inline void adam8_block_cpu(uint16_t *param, float *master, const float *grad, Adam8State s, size_t b,
                                   size_t n, const Adam8Consts *c, const Adam8Codebooks *cb) {
    size_t i0 = b * ADAM8_BLOCK, cnt = n - i0 < ADAM8_BLOCK ? n - i0 : ADAM8_BLOCK;
    float p[ADAM8_BLOCK], m[ADAM8_BLOCK], v[ADAM8_BLOCK], am = s.m_absmax[b], av = s.v_absmax[b];
    float new_am = 0.0f, new_av = 0.0f;
    for (size_t j = 0; j < cnt; j++) {
        size_t i = i0 + j;
        p[j] = master ? master[i] : bf16_bits_to_float(param[i]);
        m[j] = A8_MUL(cb->m_code[s.m_codes[i]], am);
        v[j] = A8_MUL(cb->v_code[s.v_codes[i]], av);
        adam8_step(&p[j], grad[i], &m[j], &v[j], c);
        new_am = adam8_max(new_am, fabsf(m[j]));
        new_av = adam8_max(new_av, v[j]);
    }
    float inv_m = adam8_inv_scale(new_am), inv_v = adam8_inv_scale(new_av);
    for (size_t j = 0; j < cnt; j++) {
        size_t i = i0 + j;
        s.m_codes[i] = adam8_encode_m(m[j], inv_m, cb);
        s.v_codes[i] = adam8_encode_v(v[j], inv_v, cb);
        if (master) {
            master[i] = p[j];
            if (param) param[i] = float_to_bf16_bits(p[j]);
        } else {
            param[i] = bf16_bits_stochastic(p[j], sr_bits(c->seed, (uint64_t)i));
        }
    }
    s.m_absmax[b] = new_am;
    s.v_absmax[b] = new_av;
}

static inline void adamw8bit_update_cpu(uint16_t *param, float *master, const float *grad, Adam8State s, size_t n,
                                        const Adam8Consts *c, const Adam8Codebooks *cb) {
    if (master == NULL && param == NULL) die("adamw8bit_update_cpu: no weights (param and master are NULL)");
    long long nb = (long long)adam8_blocks(n);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (long long b = 0; b < nb; b++) adam8_block_cpu(param, master, grad, s, (size_t)b, n, c, cb);
}

#endif  // ADAMW8BIT_H

// Shared by the attention test programs (dev/test_attention.cu: cuDNN path; dev/test_attention_softcap.cu
// and dev/test_attention_softcap_emu.cu: soft-cap kernels on the GPU and on the CPU emulator):
// reproducible random bf16 inputs, the relative-l2 comparison row, the soft-cap test cases, a
// double-precision CPU reference of causal GQA attention with sliding window, query scale and soft-cap
// (forward and backward), and device helpers (NaN-poisoned buffers, downloads, random fill for timings).
#ifndef DEV_ATTENTION_REFERENCE_H
#define DEV_ATTENTION_REFERENCE_H

#include <math.h>
#include "attention.h"
#include "tests/test_util.h"

// ---- host random numbers (splitmix64), reproducible ----
static uint64_t rng_state = 0x243F6A8885A308D3ull;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }

// bf16 bits of a random value with magnitude in [max_mag / 8, max_mag) and a random sign: never zero.
static uint16_t random_bf16_nonzero(double max_mag) {
    double mag = max_mag * (0.125 + 0.875 * rng_uniform());
    return float_to_bf16_bits((float)((rng_next() & 1) ? -mag : mag));
}

// One table row (its own columns: the tolerance is on the relative l2 error): max abs err, max abs err / max |ref|, ||err|| / ||ref||, the tolerance on the last.
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
    printf("  %-8s %10.3e %10.3e %10.3e %8.0e  %s%s\n", name, max_abs, max_abs / (max_ref > 0 ? max_ref : 1.0), rel,
           tol, ok ? "ok" : "FAIL", finite ? "" : " (non-finite values: elements not written?)");
    test_record(t, ok);
}

// An AttentionShape from its fields.
static AttentionShape make_shape(int B, int S, int Hq, int Hkv, int hd, float scale, int window, float softcap) {
    AttentionShape s;
    s.B = B;
    s.S = S;
    s.Hq = Hq;
    s.Hkv = Hkv;
    s.hd = hd;
    s.scale = scale;
    s.window = window;
    s.softcap = softcap;
    s.head_groups = 1;
    return s;
}

// The same shape with the backward split into G head groups.
static AttentionShape with_head_groups(AttentionShape s, int G) {
    s.head_groups = G;
    return s;
}

// ---- the soft-cap cases: dev/test_attention_softcap.cu runs them on the GPU, dev/test_attention_softcap_emu.cu
// on the CPU warp emulator ----
// Tolerances on ||got - ref|| / ||ref|| (the reference uses the same bf16 inputs, in double). A numpy
// emulation of flash-attention tile loops in fp32 (bf16 out, bf16 O in D, bf16 gradients) on these
// cases gives: out 1.5-1.6e-3, stats 2-6e-8, dv 1.6-1.7e-3, dq / dk 2.0-5.2e-3.
// - out: scores, P and the P V sums stay in fp32 but P enters the tensor cores as bf16 and the output
//   is rounded to bf16 (about 2^-9 / sqrt(3) = 1.1e-3 rms relative each); 8e-3 (the cuDNN test's
//   figure) leaves room. A mask one key too wide moves out by about 1/window per row (12% at window 8).
// - stats: fp32 log-sum-exp of scores from exact bf16 products summed in fp32: a few fp32 ulps of
//   |lse|; 1e-4 still catches a wrong base, scale, cap or mask.
// - dq, dk, dv: bf16 rounding of P, dS and each gradient plus D = rowsum(dO * O) taken from the bf16 O,
//   amplified by the cancellation in dP - D where P is peaked (the hd 256 case: 5.2e-3); 1e-2 leaves
//   1.9x there. A missing (1 - tanh^2) factor moves dq / dk by 25-130%.
#define SOFTCAP_TOL_OUT 8e-3
#define SOFTCAP_TOL_STATS 1e-4
#define SOFTCAP_TOL_GRAD 1e-2

typedef struct {
    const char *label;
    AttentionShape shape;  // B, S, Hq, Hkv, hd, scale, window, softcap
} SoftcapCase;

// Spread (std) of the raw scores scale q.k for these inputs: about 1.5 scale sqrt(hd); the first
// cases put a good part of them where tanh bends (3 vs cap 5, 12 vs 50, 2.2 vs 3, 2.4 vs 10). Tiles
// are 64 queries x 64 (forward, dK / dV) or 32 (dQ) keys: the cases cover partial last tiles, exact
// multiples of 64, windows that skip tiles or end inside one, GQA groups of 1 to 4, and every head-dim
// tile (64: hd 16, 40, 64; 128; 256). Window 2 puts the first key of a query tile's range, and the last
// query of a key tile's range, right at a tile edge, where an off-by-one in the tile ranges drops a
// (query, key) pair worth half of its row.
static const SoftcapCase softcap_cases[] = {
    {"small GQA, cap 5, window 8", {2, 37, 4, 2, 16, 0.5f, 8, 5.0f}},
    {"Gemma-like hd 256, cap 50, window 64", {1, 300, 8, 4, 256, 0.5f, 64, 50.0f}},
    {"no window, hd 128, Hkv 1, cap 3", {1, 150, 4, 1, 128, 0.125f, 0, 3.0f}},
    {"MHA hd 64, window = S, cap 10", {2, 65, 2, 2, 64, 0.2f, 65, 10.0f}},
    {"S = 1, hd 40", {3, 1, 2, 2, 40, 0.25f, 0, 5.0f}},
    {"S = 128 (whole tiles), hd 64, cap 5", {1, 128, 4, 2, 64, 0.3f, 0, 5.0f}},
    {"window 2 (tile edges), hd 64", {1, 200, 2, 1, 64, 0.3f, 2, 5.0f}},
    {"Gemma-2-9B heads, S 203, window 96", {1, 203, 16, 8, 256, 0.0625f, 96, 50.0f}},
};
#define N_SOFTCAP_CASES ((int)(sizeof(softcap_cases) / sizeof(softcap_cases[0])))

// Random inputs of a case: qkv (B*S, C) with q and k entries of magnitude up to 2 and v up to 1;
// dout (B*S, Hq hd) up to 1. bf16 bits, never zero.
static void fill_softcap_inputs(const AttentionShape *s, uint16_t *qkv, uint16_t *dout) {
    size_t C = (size_t)(s->Hq + 2 * s->Hkv) * s->hd, rows = (size_t)s->B * s->S;
    for (size_t r = 0; r < rows; r++)
        for (size_t c = 0; c < C; c++) qkv[r * C + c] = random_bf16_nonzero(c < (size_t)(s->Hq + s->Hkv) * s->hd ? 2.0 : 1.0);
    for (size_t i = 0; i < rows * s->Hq * s->hd; i++) dout[i] = random_bf16_nonzero(1.0);
}

// ---- CPU reference in double ----
// qkv (B*S, C) bf16 bits, C = (Hq + 2 Hkv) hd. Outputs: out (B*S, Hq hd), lse (B, Hq, S); with
// dout (B*S, Hq hd) given, dqkv (B*S, C). Query head h uses kv head h / (Hq / Hkv). Scores are
// scale q.k, soft-capped to softcap tanh(scores / softcap) when s->softcap > 0.
static int key_visible(int i, int j, int window) { return j <= i && (window == 0 || j > i - window); }

static void reference_attention(const AttentionShape *s, const uint16_t *qkv_bits, const uint16_t *dout_bits,
                                double *out, double *lse, double *dqkv) {
    int B = s->B, S = s->S, Hq = s->Hq, Hkv = s->Hkv, hd = s->hd, rep = Hq / Hkv;
    size_t C = (size_t)(Hq + 2 * Hkv) * hd, O = (size_t)Hq * hd;
    double *qkv = (double *)mallocCheck((size_t)B * S * C * sizeof(double));
    double *dout = (double *)mallocCheck((size_t)B * S * O * sizeof(double));
    for (size_t i = 0; i < (size_t)B * S * C; i++) qkv[i] = bf16_bits_to_float(qkv_bits[i]);
    for (size_t i = 0; i < (size_t)B * S * O; i++) dout[i] = bf16_bits_to_float(dout_bits[i]);
    double *p = (double *)mallocCheck((size_t)S * sizeof(double));  // scores, then probabilities of row i
    memset(dqkv, 0, (size_t)B * S * C * sizeof(double));
    for (int b = 0; b < B; b++) {
        for (int h = 0; h < Hq; h++) {
            int g = h / rep;
            size_t qo = (size_t)h * hd, ko = (size_t)(Hq + g) * hd, vo = (size_t)(Hq + Hkv + g) * hd;
            for (int i = 0; i < S; i++) {
                const double *q = qkv + (size_t)(b * S + i) * C + qo;
                double m = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    if (!key_visible(i, j, s->window)) continue;
                    const double *k = qkv + (size_t)(b * S + j) * C + ko;
                    double dot = 0;
                    for (int d = 0; d < hd; d++) dot += q[d] * k[d];
                    p[j] = s->scale * dot;
                    if (s->softcap > 0) p[j] = s->softcap * tanh(p[j] / s->softcap);
                    if (p[j] > m) m = p[j];
                }
                double sum = 0;
                for (int j = 0; j <= i; j++)
                    if (key_visible(i, j, s->window)) sum += exp(p[j] - m);
                double l = m + log(sum);
                lse[((size_t)b * Hq + h) * S + i] = l;
                double *o = out + (size_t)(b * S + i) * O + qo;
                for (int d = 0; d < hd; d++) o[d] = 0;
                for (int j = 0; j <= i; j++) {
                    if (!key_visible(i, j, s->window)) continue;
                    p[j] = exp(p[j] - l);
                    const double *v = qkv + (size_t)(b * S + j) * C + vo;
                    for (int d = 0; d < hd; d++) o[d] += p[j] * v[d];
                }
                // Backward of row i: dP_j = dO.v_j, D = dO.o, dS_j = P_j (dP_j - D).
                const double *dO = dout + (size_t)(b * S + i) * O + qo;
                double D = 0;
                for (int d = 0; d < hd; d++) D += dO[d] * o[d];
                double *dq = dqkv + (size_t)(b * S + i) * C + qo;
                for (int j = 0; j <= i; j++) {
                    if (!key_visible(i, j, s->window)) continue;
                    const double *k = qkv + (size_t)(b * S + j) * C + ko;
                    const double *v = qkv + (size_t)(b * S + j) * C + vo;
                    double *dk = dqkv + (size_t)(b * S + j) * C + ko;
                    double *dv = dqkv + (size_t)(b * S + j) * C + vo;
                    double dpj = 0, dot = 0;
                    for (int d = 0; d < hd; d++) {
                        dpj += dO[d] * v[d];
                        dot += q[d] * k[d];
                    }
                    double ds = p[j] * (dpj - D) * s->scale;  // includes the scale of the scores
                    if (s->softcap > 0) {  // z = cap tanh(x / cap): dz/dx = 1 - tanh^2
                        double th = tanh(s->scale * dot / s->softcap);
                        ds *= 1 - th * th;
                    }
                    for (int d = 0; d < hd; d++) {
                        dq[d] += ds * k[d];
                        dk[d] += ds * q[d];
                        dv[d] += p[j] * dO[d];
                    }
                }
            }
        }
    }
    free(qkv);
    free(dout);
    free(p);
}

// ---- device helpers ----
static void *device_alloc_nan(size_t bytes) {
    void *d;
    cudaCheck(cudaMalloc(&d, bytes));
    cudaCheck(cudaMemset(d, 0xFF, bytes));  // all-ones bits: NaN in bf16 and fp32
    return d;
}

static void download_bf16(double *out, const void *d, size_t n) {
    uint16_t *h = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    cudaCheck(cudaMemcpy(h, d, n * sizeof(uint16_t), cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) out[i] = bf16_bits_to_float(h[i]);
    free(h);
}

// Gathers the q (part 0), k (1) or v (2) columns of a (B*S, C) array into a dense array.
static size_t gather_part(double *dst, const double *src, const AttentionShape *s, int part) {
    size_t C = (size_t)(s->Hq + 2 * s->Hkv) * s->hd;
    size_t c0 = part == 0 ? 0 : part == 1 ? (size_t)s->Hq * s->hd : (size_t)(s->Hq + s->Hkv) * s->hd;
    size_t width = part == 0 ? (size_t)s->Hq * s->hd : (size_t)s->Hkv * s->hd;
    size_t n = 0;
    for (size_t r = 0; r < (size_t)s->B * s->S; r++)
        for (size_t c = 0; c < width; c++) dst[n++] = src[r * C + c0 + c];
    return n;
}

// ---- timing helpers ----
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

#endif  // DEV_ATTENTION_REFERENCE_H

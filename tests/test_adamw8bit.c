// Tests of the 8-bit AdamW state (adamw8bit.h) on the CPU: the code books, the encoder, the
// quantize/dequantize round trip of random data against its error bound, the block layout of a
// model's moments, and the CPU twin's step against AdamW in double precision. (The CUDA kernel is
// checked against this twin bit for bit by dev/test_kernels.cu on a GPU.)
//
// Round-trip bound: x in a block with scale a = max |x| encodes y = x / a to the nearest code, so
// |decode - x| <= a * gap(y) / 2, gap(y) = distance between the two codes around y, plus fp32
// rounding (1 / a, x * (1 / a) and code * a: held to 4 eps |x| + eps times the half gap).
// Near the top of the range (|y| >= 0.1) the gap is 0.9 / 64 (m) and 0.9 / 128 (v): errors of at
// most 0.70% and 0.35% of the block's absmax; each decade down has half as many codes.
// Build: gcc -O2 -Wall -Wextra -fopenmp -I. tests/test_adamw8bit.c -o build/test_adamw8bit -lm
#include <float.h>
#include "adamw8bit.h"
#include "mst.h"  // preset_base
#include "tests/test_util.h"

#define EPS ((double)FLT_EPSILON)

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s, double lo, double hi) {
    return lo + (hi - lo) * (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

// ----------------------------------------------------------------------------
// Code books and the encoder

static void test_codebooks(TestReport *r, const Adam8Codebooks *cb) {
    int asc = 1, thr_between = 1, mirror = 1;
    for (int k = 0; k + 1 < ADAM8_CODES; k++) {
        asc &= cb->m_code[k] < cb->m_code[k + 1] && cb->v_code[k] < cb->v_code[k + 1];
        thr_between &= cb->m_code[k] < cb->m_thr[k] && cb->m_thr[k] < cb->m_code[k + 1];
        thr_between &= cb->v_code[k] < cb->v_thr[k] && cb->v_thr[k] < cb->v_code[k + 1];
    }
    // negative codes 1..126 mirror positive codes 129..254 (the smallest positive, 128, has no mirror)
    for (int k = 1; k < ADAM8_M_ZERO; k++) mirror &= cb->m_code[k] == -cb->m_code[2 * ADAM8_M_ZERO + 1 - k];
    test_check(r, asc, "code books: 256 strictly ascending codes each");
    test_check(r, thr_between, "code books: every threshold lies strictly between its two codes");
    test_check(r, cb->m_code[0] == -1.0f && cb->m_code[ADAM8_M_ZERO] == 0.0f && cb->m_code[255] == 1.0f && mirror,
               "signed book: -1, 0 (code 127), +1 exact; negatives mirror positives");
    test_check(r, cb->v_code[0] == 0.0f && cb->v_code[255] == 1.0f, "unsigned book: 0 (code 0) and 1 (code 255) exact");
    printf("  smallest positive codes: m %.3e, v %.3e; largest below 1: m %.6f, v %.6f\n", cb->m_code[128],
           cb->v_code[1], cb->m_code[254], cb->v_code[254]);
}

// Index of the code nearest to y by brute force (ties: the lower code).
static int nearest_code(const float *code, float y) {
    int best = 0;
    for (int k = 1; k < ADAM8_CODES; k++)
        if (fabs((double)code[k] - y) < fabs((double)code[best] - y)) best = k;
    return best;
}

// The encoder returns the nearest code: for every code itself, both neighbours of every threshold,
// and random y; a positive v never encodes to 0.
static void test_encoder(TestReport *r, const Adam8Codebooks *cb) {
    int self = 1, around = 1, random_ok = 1;
    for (int k = 0; k < ADAM8_CODES; k++) {
        self &= adam8_search(cb->m_code[k], cb->m_thr, cb->m_lo) == k && adam8_search(cb->v_code[k], cb->v_thr, cb->v_lo) == k;
        if (k + 1 < ADAM8_CODES) {
            around &= adam8_search(cb->m_thr[k], cb->m_thr, cb->m_lo) == k;  // a tie goes to the lower code
            around &= adam8_search(nextafterf(cb->m_thr[k], 2.0f), cb->m_thr, cb->m_lo) == k + 1;
            around &= adam8_search(cb->v_thr[k], cb->v_thr, cb->v_lo) == k;
            around &= adam8_search(nextafterf(cb->v_thr[k], 2.0f), cb->v_thr, cb->v_lo) == k + 1;
        }
    }
    uint64_t s = 11;
    for (int i = 0; i < 200000; i++) {
        // half uniform, half log-uniform magnitudes down to 1e-9
        float y = i % 2 ? (float)rng_uniform(&s, -1.0, 1.0) : (float)pow(10.0, rng_uniform(&s, -9.0, 0.0));
        float yv = fabsf(y);
        random_ok &= adam8_search(y, cb->m_thr, cb->m_lo) == nearest_code(cb->m_code, y);
        random_ok &= adam8_search(yv, cb->v_thr, cb->v_lo) == nearest_code(cb->v_code, yv);
    }
    int most_m = 0, most_v = 0;  // thresholds that share a bucket: the encoder's scan length
    for (int b = 0; b + 1 < ADAM8_BUCKETS; b++) {
        most_m = cb->m_lo[b + 1] - cb->m_lo[b] > most_m ? cb->m_lo[b + 1] - cb->m_lo[b] : most_m;
        most_v = cb->v_lo[b + 1] - cb->v_lo[b] > most_v ? cb->v_lo[b + 1] - cb->v_lo[b] : most_v;
    }
    char what[96];
    snprintf(what, sizeof(what), "encoder buckets: at most %d (m) and %d (v) thresholds share one", most_m, most_v);
    test_check(r, most_m <= 1 && most_v <= 2, what);
    test_check(r, self, "encoder: every code encodes to itself");
    test_check(r, around, "encoder: a threshold goes to the lower code, the next float up to the upper");
    test_check(r, random_ok, "encoder == brute-force nearest code for 200000 random y (uniform, log-uniform)");
    test_check(r, adam8_encode_v(1e-30f, 1.0f, cb) == 1 && adam8_encode_v(0.0f, 1.0f, cb) == 0 &&
                      adam8_encode_m(1e-30f, 1.0f, cb) == ADAM8_M_ZERO,
               "encoder: a tiny positive v takes code 1 (not 0); 0 stays 0; a tiny m rounds to 0");
}

// ----------------------------------------------------------------------------
// Round trip of random blocks

// Half the gap between the two codes around y (code[0] <= y <= code[255]), by bisection over the codes.
static double half_gap(const float *code, float y) {
    int lo = 0, hi = ADAM8_CODES - 1;
    while (hi - lo > 1) {
        int mid = (lo + hi) / 2;
        if (code[mid] <= y) lo = mid;
        else hi = mid;
    }
    return 0.5 * ((double)code[hi] - code[lo]);
}

typedef enum { DIST_UNIFORM, DIST_GAUSS_OUTLIER, DIST_LOG, DIST_COUNT } Dist;
static const char *DIST_NAMES[DIST_COUNT] = {"uniform", "normal + 1 outlier/block", "log-uniform 1e-8..1"};

static float draw(uint64_t *s, Dist d, int j) {
    double sign = rng_next(s) & 1 ? -1.0 : 1.0;
    if (d == DIST_UNIFORM) return (float)rng_uniform(s, -1.0, 1.0);
    if (d == DIST_LOG) return (float)(sign * pow(10.0, rng_uniform(s, -8.0, 0.0)));
    double u1 = rng_uniform(s, 1e-12, 1.0), u2 = rng_uniform(s, 0.0, 1.0);
    return (float)((j == 17 ? 50.0 : 1.0) * sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// Encodes blocks of random x (signed: m; |x|^2-like non-negative: v) and decodes them again. Every
// element must be within its bound; prints the worst error relative to the absmax and, for
// |x| >= 0.1 absmax, relative to |x|.
static void test_round_trip(TestReport *r, const Adam8Codebooks *cb, int is_v, Dist dist, uint64_t seed) {
    enum { BLOCKS = 2000 };
    uint64_t s = seed;
    const float *code = is_v ? cb->v_code : cb->m_code;
    double worst_ratio = 0.0, max_err_a = 0.0, max_rel_top = 0.0;
    size_t n_bad = 0, absmax_exact = 0;
    for (int b = 0; b < BLOCKS; b++) {
        float x[ADAM8_BLOCK], a = 0.0f;
        for (int j = 0; j < ADAM8_BLOCK; j++) {
            x[j] = draw(&s, dist, j);
            if (is_v) x[j] = x[j] * x[j];
            a = fmaxf(a, fabsf(x[j]));
        }
        float inv = adam8_inv_scale(a);
        int exact = 1;
        for (int j = 0; j < ADAM8_BLOCK; j++) {
            uint8_t q = is_v ? adam8_encode_v(x[j], inv, cb) : adam8_encode_m(x[j], inv, cb);
            double dec = (double)(code[q] * a), err = fabs(dec - x[j]), y = x[j] / (double)a;
            double bound = a * half_gap(code, (float)y) * (1.0 + EPS) + 4.0 * EPS * fabs(x[j]);
            if (is_v && x[j] > 0.0f && y < code[1]) bound = a * code[1];  // tiny v -> code 1 (rounds up)
            if (!(err <= bound)) n_bad++;
            if (err / bound > worst_ratio) worst_ratio = err / bound;
            if (err / a > max_err_a) max_err_a = err / a;
            if (fabs(y) >= 0.1 && err / fabs(x[j]) > max_rel_top) max_rel_top = err / fabs(x[j]);
            if (fabsf(x[j]) == a && dec != x[j]) exact = 0;
        }
        absmax_exact += exact;
    }
    char name[96];
    snprintf(name, sizeof(name), "%s %-24s", is_v ? "v" : "m", DIST_NAMES[dist]);
    printf("%-34s %12.3e %14.3e %12.3e %10zu %8zu/%d  %s\n", name, max_err_a, max_rel_top, worst_ratio, n_bad,
           absmax_exact, BLOCKS, n_bad == 0 && absmax_exact == BLOCKS ? "PASS" : "FAIL");
    test_record(r, n_bad == 0 && absmax_exact == BLOCKS);
}

// ----------------------------------------------------------------------------
// Block layout of a model's moments

typedef struct { const Adam8Layout *a; const ParamLayout *p; size_t next_block; int ok; } LayoutWalk;

// Tensors in file order must start where the previous one's blocks end.
static void layout_visit(const char *name, size_t offset, size_t rows, size_t cols, void *ctx) {
    (void)name;
    LayoutWalk *w = (LayoutWalk *)ctx;
    w->ok &= adam8_block_of(w->a, w->p, offset) == w->next_block;
    w->next_block += adam8_blocks(rows * cols);
}

static void test_layout(TestReport *r, int tied, int qkv_bias) {
    ModelConfig c;
    preset_base(&c, FAMILY_LLAMA, 100, 32, 2, 4, 2, 8, 64, 128, 1e-5f, 10000.0f);
    c.tied_embeddings = tied;
    c.qkv_bias = qkv_bias;
    ParamLayout p;
    param_layout_init(&p, &c);
    Adam8Layout a;
    adam8_layout_init(&a, &p, &c);
    LayoutWalk w = {&a, &p, 0, 1};
    param_layout_visit(&p, &c, layout_visit, &w);
    // by hand: embed 3200 -> 13 blocks; layer: norm 32 (1), wq 1024 (4), wk 512 (2), wv 512 (2),
    // [biases 32, 16, 16: 1 each], wo 1024 (4), norm 32 (1), gate/up 2048 (8 each), down 2048 (8)
    size_t layer = 1 + 4 + 2 + 2 + 4 + 1 + 8 + 8 + 8 + (qkv_bias ? 3 : 0);
    size_t total = 13 + 2 * layer + 1 + (tied ? 0 : 13);
    char what[120];
    snprintf(what, sizeof(what), "block layout (tied %d, qkv bias %d): %zu blocks, every tensor at its own blocks",
             tied, qkv_bias, total);
    test_check(r, w.ok && w.next_block == a.total && a.total == total && a.layer_blocks == layer, what);
}

// ----------------------------------------------------------------------------
// The twin's step against AdamW in double precision

// One step of n elements from a random 8-bit state (block 0 all zero, as a fresh state): the new
// weights against p - lr wd p - lr/bc1 m1 / (sqrt(v1)/sqrt(bc2) + eps) in double from the decoded
// m0, v0; the new scales against max |m1|, max v1; the decoded new moments against m1, v1 within the
// round-trip bound. Master weights (fp32) or bf16 weights with stochastic rounding (either bf16
// neighbour of the exact value, one ulp).
static void test_twin_step(TestReport *r, const Adam8Codebooks *cb, size_t n, int use_master, uint64_t seed) {
    uint64_t s = seed;
    size_t nb = adam8_blocks(n), nc = nb * ADAM8_BLOCK;
    float *master = (float *)mallocCheck(n * 4), *grad = (float *)mallocCheck(n * 4), *p0 = (float *)mallocCheck(n * 4);
    uint16_t *param = (uint16_t *)mallocCheck(n * 2);
    uint8_t *mq = (uint8_t *)mallocCheck(nc), *vq = (uint8_t *)mallocCheck(nc);
    float *ma = (float *)mallocCheck(nb * 4), *va = (float *)mallocCheck(nb * 4);
    double *m0 = (double *)mallocCheck(n * 8), *v0 = (double *)mallocCheck(n * 8);
    for (size_t i = 0; i < n; i++) {
        param[i] = float_to_bf16_bits((float)rng_uniform(&s, -1.0, 1.0));
        master[i] = use_master ? (float)rng_uniform(&s, -1.0, 1.0) : bf16_bits_to_float(param[i]);
        p0[i] = master[i];
        grad[i] = (float)rng_uniform(&s, -1.0, 1.0);
    }
    for (size_t i = 0; i < nc; i++) {
        mq[i] = (uint8_t)(rng_next(&s) & 255);
        vq[i] = (uint8_t)(rng_next(&s) & 255);
    }
    for (size_t b = 0; b < nb; b++) {
        ma[b] = b == 0 ? 0.0f : (float)rng_uniform(&s, 0.01, 0.1);
        va[b] = b == 0 ? 0.0f : (float)rng_uniform(&s, 1e-4, 1e-2);
    }
    for (size_t i = 0; i < n; i++) {
        m0[i] = (double)cb->m_code[mq[i]] * ma[i / ADAM8_BLOCK];
        v0[i] = (double)cb->v_code[vq[i]] * va[i / ADAM8_BLOCK];
    }
    const double lr = 1e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, gs = 0.5;
    const int step = 7;
    Adam8Consts c = adam8_consts((float)lr, (float)b1, (float)b2, (float)eps, (float)wd, (float)gs, step, 99u);
    Adam8State st = {mq, vq, ma, va};
    adamw8bit_update_cpu(param, use_master ? master : NULL, grad, st, n, &c, cb);

    double bc1 = 1.0 - pow(b1, step), bc2 = 1.0 - pow(b2, step);
    double w_p = 0.0, w_m = 0.0, w_v = 0.0, w_a = 0.0, e_p = 0.0, e_m = 0.0, e_v = 0.0, e_a = 0.0;
    for (size_t b = 0; b < nb; b++) {
        size_t lo = b * ADAM8_BLOCK, hi = lo + ADAM8_BLOCK < n ? lo + ADAM8_BLOCK : n;
        // m1, v1 in double with the fp32 betas the twin uses (1 - 0.9f is exact in fp32), and the
        // fp32 rounding error bound of each (three roundings of the terms and their sum)
        double m1[ADAM8_BLOCK], v1[ADAM8_BLOCK], mt[ADAM8_BLOCK], am = 0.0, av = 0.0, am_tol = 0.0;
        double fb1 = (float)b1, fb2 = (float)b2;
        for (size_t i = lo; i < hi; i++) {
            double g = (double)grad[i] * gs;
            m1[i - lo] = fb1 * m0[i] + (1.0 - fb1) * g;
            v1[i - lo] = fb2 * v0[i] + (1.0 - fb2) * g * g;
            mt[i - lo] = 4.0 * EPS * (fabs(fb1 * m0[i]) + fabs((1.0 - fb1) * g)) + 1e-30;
            am = fmax(am, fabs(m1[i - lo]));
            av = fmax(av, v1[i - lo]);
            am_tol = fmax(am_tol, mt[i - lo]);
        }
        w_a = fmax(w_a, fmax(fabs(ma[b] - am) / am_tol, fabs(va[b] - av) / (4.0 * EPS * av + 1e-30)));
        e_a = fmax(e_a, fmax(fabs(ma[b] - am), fabs(va[b] - av)));
        for (size_t i = lo; i < hi; i++) {
            double mi = m1[i - lo], vi = v1[i - lo], m_err = mt[i - lo];
            double dm = (double)cb->m_code[mq[i]] * ma[b], dv = (double)cb->v_code[vq[i]] * va[b];
            double bm = ma[b] * half_gap(cb->m_code, (float)(mi / ma[b])) + 8.0 * EPS * fabs(mi) + m_err;
            double bv = va[b] * half_gap(cb->v_code, (float)(vi / va[b])) + 8.0 * EPS * vi + 1e-30;
            if (vi > 0.0 && vi / va[b] < cb->v_code[1]) bv = va[b] * cb->v_code[1];
            w_m = fmax(w_m, fabs(dm - mi) / bm);
            w_v = fmax(w_v, fabs(dv - vi) / bv);
            e_m = fmax(e_m, fabs(dm - mi));
            e_v = fmax(e_v, fabs(dv - vi));
            double upd = lr / bc1 * mi / (sqrt(vi) / sqrt(bc2) + eps), dec = lr * wd * p0[i];
            double p1 = p0[i] - dec - upd;
            // fp32 error of the step: 1e-5 of the update plus m1's own rounding carried through
            double ptol = 1e-5 * (fabs(upd) + fabs(dec)) + 4.0 * EPS * fabs(p0[i]) + lr / bc1 * m_err / (sqrt(vi) / sqrt(bc2) + eps);
            double got = use_master ? (double)master[i] : (double)bf16_bits_to_float(param[i]);
            double tol = ptol;
            if (!use_master) {  // stochastic rounding: either bf16 neighbour of p1 (spacing just above |p1|)
                int ex;
                frexp(fabs(p1) * (1.0 + 1e-5), &ex);
                tol += ldexp(1.0, ex - 8);
            }
            w_p = fmax(w_p, fabs(got - p1) / tol);
            e_p = fmax(e_p, fabs(got - p1));
            if (use_master && param[i] != float_to_bf16_bits(master[i])) w_p = INFINITY;
        }
    }
    char name[64];
    snprintf(name, sizeof(name), "n=%zu %s: weights", n, use_master ? "master" : "bf16 sr");
    test_table_row(r, name, e_p, w_p, 1.0);
    snprintf(name, sizeof(name), "n=%zu %s: block scales", n, use_master ? "master" : "bf16 sr");
    test_table_row(r, name, e_a, w_a, 1.0);
    snprintf(name, sizeof(name), "n=%zu %s: decoded m", n, use_master ? "master" : "bf16 sr");
    test_table_row(r, name, e_m, w_m, 1.0);
    snprintf(name, sizeof(name), "n=%zu %s: decoded v", n, use_master ? "master" : "bf16 sr");
    test_table_row(r, name, e_v, w_v, 1.0);
    free(master); free(grad); free(p0); free(param); free(mq); free(vq); free(ma); free(va); free(m0); free(v0);
}

int main(void) {
    TestReport r = {0, 0};
    Adam8Codebooks cb;
    adam8_codebooks_init(&cb);
    printf("== code books and encoder\n");
    test_codebooks(&r, &cb);
    test_encoder(&r, &cb);

    printf("\n== round trip: 2000 blocks of 256 each; errors relative to the block absmax a and (|x| >= 0.1 a) to |x|;\n"
           "   bound per element: a * half the gap of the codes around x / a + fp32 rounding\n");
    printf("%-34s %12s %14s %12s %10s %10s\n", "moment / data", "max err / a", "max rel (top)", "err/bound",
           "over", "absmax ok");
    for (int is_v = 0; is_v < 2; is_v++)
        for (int d = 0; d < DIST_COUNT; d++) test_round_trip(&r, &cb, is_v, (Dist)d, 100 + 10 * is_v + d);

    printf("\n== block layout\n");
    test_layout(&r, 0, 0);
    test_layout(&r, 1, 1);

    test_table_header("CPU twin, one step against double-precision AdamW (rel err column: worst err / tolerance)");
    test_twin_step(&r, &cb, (size_t)37 * 4099, 1, 5);
    test_twin_step(&r, &cb, (size_t)37 * 4099, 0, 6);
    test_twin_step(&r, &cb, 1003, 1, 7);
    return test_report_finish(&r, "test_adamw8bit");
}

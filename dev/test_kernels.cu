// Kernel-level tests and benchmarks of mst_kernels.cu.
//
// For every launcher in mst_kernels.h: random inputs from fixed seeds, a CPU reference in double, the
// kernel on outputs poisoned with 0xFF bytes (NaN in bf16 and fp32, so an element the kernel forgot
// to write fails), guard bytes around every device buffer (an overrun fails), odd sizes (scalar path
// and tails), aligned sizes (16-byte vector path) and deliberately misaligned pointers. One table row
// per checked tensor: max abs err, max rel err, ||err|| / ||ref||, worst err / tolerance, the
// tolerance, PASS/FAIL. Exits 1 on any failure.
// Then (unless --no-timing) a timing table at Llama-3-8B sizes: median of 20 runs, achieved GB/s and
// the fraction of a 3.0 TB/s memory roofline, with bytes = every input read once + every output
// written once.
//
// Build: nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -Wall -I. dev/test_kernels.cu mst_kernels.cu
//            -o build/test_kernels
// Run:   ./build/test_kernels [--no-timing]
//
// Tolerances. Inputs are exact bf16 (or fp32) values, so the double reference sees the same numbers
// as the kernel. A bf16 output computed in fp32 and rounded once is off by at most half a bf16 ulp
// (8 significant bits: 2^-8 relative) plus the fp32 error of its computation; bf16 outputs are held
// to rtol = 2^-7 (twice the rounding bound) plus an atol of a few fp32 ulps times the magnitude of
// the terms that cancel in the result (named per kernel below). fp32 outputs are held to a small multiple
// of FLT_EPSILON times the number and size of the terms they sum.
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include "adamw8bit.h"
#include "model_config.h"
#include "mst_kernels.h"
#include "tests/test_util.h"

#define GUARD_BYTES 256
#define BF16_RTOL (1.0 / 128.0)   // 2^-7: twice the relative rounding error of bf16
#define F32_EPS ((double)FLT_EPSILON)
#define ROOFLINE_GBS 3000.0       // H100 memory roofline used for the "% roof" column (GB/s)
#define TIMING_RUNS 20
#define WARMUP_RUNS 3

// ---------------------------------------------------------------------------------------------
// Small host utilities: random numbers, bf16 arrays, the comparison rows
// ---------------------------------------------------------------------------------------------

typedef struct {
    uint64_t s;
} Rng;

static uint64_t rng_u64(Rng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Uniform in [lo, hi).
static double rng_uniform(Rng *r, double lo, double hi) {
    return lo + (hi - lo) * (double)(rng_u64(r) >> 11) * (1.0 / 9007199254740992.0);
}

static int rng_int(Rng *r, int n) { return (int)(rng_u64(r) % (uint64_t)n); }

static double bf(uint16_t h) { return (double)bf16_bits_to_float(h); }

static uint16_t *rand_bf16(Rng *r, size_t n, double lo, double hi) {
    uint16_t *a = (uint16_t *)mallocCheck(n * sizeof(uint16_t));
    for (size_t i = 0; i < n; i++) a[i] = float_to_bf16_bits((float)rng_uniform(r, lo, hi));
    return a;
}

static float *rand_f32(Rng *r, size_t n, double lo, double hi) {
    float *a = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = (float)rng_uniform(r, lo, hi);
    return a;
}

// Random buffer of element type t (fp32 or bf16) as raw bytes.
static void *rand_typed(Rng *r, DType t, size_t n, double lo, double hi) {
    return t == DT_FP32 ? (void *)rand_f32(r, n, lo, hi) : (void *)rand_bf16(r, n, lo, hi);
}

static double typed_at(const void *p, DType t, size_t i) {
    return t == DT_FP32 ? (double)((const float *)p)[i] : bf(((const uint16_t *)p)[i]);
}

static const char *dtype_name(DType t) { return t == DT_FP32 ? "fp32" : "bf16"; }

// Spacing of bf16 numbers at |x| (x finite, nonzero): 2^(exponent - 7).
static double bf16_spacing(double x) {
    int e;
    frexp(fabs(x), &e);  // |x| = m 2^e, m in [0.5, 1)
    return ldexp(1.0, e - 1 - 7);
}

// One table row: a tensor compared element by element against its reference.
typedef struct {
    const char *kernel;
    char tcase[48];
    const char *tensor;
    const char *tol_desc;
    double max_abs, max_rel, sq_err, sq_ref, worst;
    size_t n, n_bad, n_nan;
} Cmp;

static void print_table_header(void) {
    printf("%-22s %-36s %-10s %10s %10s %10s %10s %8s  %-26s %s\n", "kernel", "case", "tensor", "elements",
           "max_abs", "max_rel", "rel_l2", "err/tol", "tolerance", "status");
}

static void cmp_begin(Cmp *c, const char *kernel, const char *tcase, const char *tensor, const char *tol_desc) {
    memset(c, 0, sizeof(*c));
    c->kernel = kernel;
    snprintf(c->tcase, sizeof(c->tcase), "%s", tcase);
    c->tensor = tensor;
    c->tol_desc = tol_desc;
}

// Adds one element; passes when |got - ref| <= tol (a NaN got, e.g. the unwritten poison, never passes).
// max_rel is taken over elements whose |ref| exceeds 1e-3 of the tolerance scale, to stay readable.
static void cmp_add(Cmp *c, double got, double ref, double tol) {
    double err = fabs(got - ref);
    c->n++;
    if (!isfinite(got) && isfinite(ref)) {
        c->n_nan++;
        c->n_bad++;
        c->worst = INFINITY;
        return;
    }
    if (!(err <= tol)) c->n_bad++;
    if (err > c->max_abs) c->max_abs = err;
    if (fabs(ref) > 0.0 && err / fabs(ref) > c->max_rel && fabs(ref) > 1e-3 * tol) c->max_rel = err / fabs(ref);
    c->sq_err += err * err;
    c->sq_ref += ref * ref;
    double ratio = tol > 0.0 ? err / tol : (err > 0.0 ? INFINITY : 0.0);
    if (ratio > c->worst) c->worst = ratio;
}

static void cmp_end(TestReport *r, const Cmp *c) {
    double rel_l2 = c->sq_ref > 0.0 ? sqrt(c->sq_err / c->sq_ref) : sqrt(c->sq_err);
    int fail = c->n_bad > 0 || c->n == 0;
    printf("%-22s %-36s %-10s %10zu %10.3e %10.3e %10.3e %8.3f  %-26s %s", c->kernel, c->tcase, c->tensor, c->n,
           c->max_abs, c->max_rel, rel_l2, c->worst, c->tol_desc, fail ? "FAIL" : "PASS");
    if (c->n_bad > 0) printf(" (%zu bad, %zu NaN/unwritten)", c->n_bad, c->n_nan);
    printf("\n");
    test_record(r, !fail);
}

// A bitwise check (untouched regions, determinism, guard bytes) as one table row.
static void check_exact(TestReport *r, const char *kernel, const char *tcase, const char *tensor, const void *a,
                        const void *b, size_t bytes) {
    const unsigned char *pa = (const unsigned char *)a, *pb = (const unsigned char *)b;
    size_t bad = 0;
    for (size_t i = 0; i < bytes; i++) bad += pa[i] != pb[i];
    printf("%-22s %-36s %-10s %10zu %10s %10s %10s %8s  %-26s %s", kernel, tcase, tensor, bytes, "-", "-", "-", "-",
           "bitwise equal (bytes)", bad ? "FAIL" : "PASS");
    if (bad) printf(" (%zu bytes differ)", bad);
    printf("\n");
    test_record(r, !bad);
}

// ---------------------------------------------------------------------------------------------
// Device buffers with guard bytes before (when offset) and after the payload
// ---------------------------------------------------------------------------------------------

typedef struct {
    unsigned char *base;
    void *p;          // payload = base + offset (offset > 0 makes a misaligned pointer)
    size_t bytes, offset;
} DBuf;

static DBuf dbuf_alloc(size_t bytes, size_t offset) {
    DBuf b;
    b.bytes = bytes;
    b.offset = offset;
    cudaCheck(cudaMalloc((void **)&b.base, offset + bytes + GUARD_BYTES));
    cudaCheck(cudaMemset(b.base, 0x5A, offset + bytes + GUARD_BYTES));
    b.p = b.base + offset;
    return b;
}

static DBuf dbuf_from(const void *host, size_t bytes, size_t offset) {
    DBuf b = dbuf_alloc(bytes, offset);
    cudaCheck(cudaMemcpy(b.p, host, bytes, cudaMemcpyHostToDevice));
    return b;
}

static void dbuf_upload(DBuf *b, const void *host) { cudaCheck(cudaMemcpy(b->p, host, b->bytes, cudaMemcpyHostToDevice)); }
static void dbuf_download(void *host, const DBuf *b) {
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(host, b->p, b->bytes, cudaMemcpyDeviceToHost));
}
static void dbuf_poison(DBuf *b) { cudaCheck(cudaMemset(b->p, 0xFF, b->bytes)); }

// Number of guard bytes (before and after the payload) that are no longer 0x5A.
static size_t dbuf_guard_damage(const DBuf *b) {
    size_t n = b->offset + GUARD_BYTES, bad = 0;
    unsigned char *h = (unsigned char *)mallocCheck(n);
    cudaCheck(cudaDeviceSynchronize());
    cudaCheck(cudaMemcpy(h, b->base, b->offset, cudaMemcpyDeviceToHost));
    cudaCheck(cudaMemcpy(h + b->offset, b->base + b->offset + b->bytes, GUARD_BYTES, cudaMemcpyDeviceToHost));
    for (size_t i = 0; i < n; i++) bad += h[i] != 0x5A;
    free(h);
    return bad;
}

// One row: the guard bytes of every buffer of a case are intact.
static void check_guards(TestReport *r, const char *kernel, const char *tcase, DBuf *const *bufs, int n_bufs) {
    size_t bad = 0, total = 0;
    for (int i = 0; i < n_bufs; i++) {
        bad += dbuf_guard_damage(bufs[i]);
        total += bufs[i]->offset + GUARD_BYTES;
    }
    printf("%-22s %-36s %-10s %10zu %10s %10s %10s %8s  %-26s %s", kernel, tcase, "guards", total, "-", "-", "-", "-",
           "untouched (bytes)", bad ? "FAIL" : "PASS");
    if (bad) printf(" (%zu bytes overwritten)", bad);
    printf("\n");
    test_record(r, !bad);
}

static void dbuf_free(DBuf *b) { cudaCheck(cudaFree(b->base)); }

// ---------------------------------------------------------------------------------------------
// Embedding
// ---------------------------------------------------------------------------------------------

static void test_embedding_forward(TestReport *rep, int N, int d, int V, float scale, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d d=%d V=%d scale=%g", N, d, V, (double)scale);
    int32_t *tok = (int32_t *)mallocCheck((size_t)N * sizeof(int32_t));
    for (int n = 0; n < N; n++) tok[n] = rng_int(&rng, V);
    uint16_t *emb = rand_bf16(&rng, (size_t)V * d, -1.0, 1.0);
    uint16_t *out = (uint16_t *)mallocCheck((size_t)N * d * 2);
    DBuf d_tok = dbuf_from(tok, (size_t)N * 4, 0), d_emb = dbuf_from(emb, (size_t)V * d * 2, 0);
    DBuf d_out = dbuf_alloc((size_t)N * d * 2, 0);
    dbuf_poison(&d_out);
    embedding_forward((bf16 *)d_out.p, (const int32_t *)d_tok.p, (const bf16 *)d_emb.p, N, d, scale, 0);
    dbuf_download(out, &d_out);
    Cmp c;
    cmp_begin(&c, "embedding_forward", tcase, "out", "rtol 2^-7");
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < d; j++) {
            double ref = bf(emb[(size_t)tok[n] * d + j]) * scale;
            cmp_add(&c, bf(out[(size_t)n * d + j]), ref, BF16_RTOL * fabs(ref));
        }
    }
    cmp_end(rep, &c);
    DBuf *bufs[] = {&d_tok, &d_emb, &d_out};
    check_guards(rep, "embedding_forward", tcase, bufs, 3);
    for (int i = 0; i < 3; i++) dbuf_free(bufs[i]);
    free(tok);
    free(emb);
    free(out);
}

// Groups positions by token, as the trainer's host code does: unique tokens ascending, each owning
// its positions in increasing order. Returns the number of unique tokens.
static int group_tokens(const int32_t *tok, int N, int V, int32_t *unique, int32_t *offsets, int32_t *positions) {
    int *count = (int *)callocCheck((size_t)V, sizeof(int));
    for (int n = 0; n < N; n++) count[tok[n]]++;
    int nu = 0, off = 0;
    int *start = (int *)mallocCheck((size_t)V * sizeof(int));
    for (int v = 0; v < V; v++) {
        start[v] = off;
        if (count[v] > 0) {
            unique[nu] = v;
            offsets[nu] = off;
            nu++;
            off += count[v];
        }
    }
    offsets[nu] = off;
    for (int n = 0; n < N; n++) positions[start[tok[n]]++] = n;
    free(count);
    free(start);
    return nu;
}

static void test_embedding_backward(TestReport *rep, int N, int d, int V, DType dt, float scale, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d d=%d V=%d %s", N, d, V, dtype_name(dt));
    int32_t *tok = (int32_t *)mallocCheck((size_t)N * 4), *uniq = (int32_t *)mallocCheck((size_t)N * 4);
    int32_t *offs = (int32_t *)mallocCheck((size_t)(N + 1) * 4), *pos = (int32_t *)mallocCheck((size_t)N * 4);
    for (int n = 0; n < N; n++) tok[n] = rng_int(&rng, V);
    int nu = group_tokens(tok, N, V, uniq, offs, pos);
    uint16_t *dout = rand_bf16(&rng, (size_t)N * d, -1.0, 1.0);
    size_t esz = dtype_bytes(dt);
    void *demb = rand_typed(&rng, dt, (size_t)V * d, -1.0, 1.0);
    void *got = mallocCheck((size_t)V * d * esz);
    DBuf d_dout = dbuf_from(dout, (size_t)N * d * 2, 0), d_demb = dbuf_from(demb, (size_t)V * d * esz, 0);
    DBuf d_uniq = dbuf_from(uniq, (size_t)nu * 4, 0), d_offs = dbuf_from(offs, (size_t)(nu + 1) * 4, 0);
    DBuf d_pos = dbuf_from(pos, (size_t)N * 4, 0);
    embedding_backward(d_demb.p, dt, (const bf16 *)d_dout.p, (const int32_t *)d_uniq.p, (const int32_t *)d_offs.p,
                       (const int32_t *)d_pos.p, nu, d, scale, 0);
    dbuf_download(got, &d_demb);
    // Reference: every row of the table (absent tokens must come back bit-identical: tol 0).
    double *sum = (double *)mallocCheck((size_t)d * sizeof(double)), *mag = (double *)mallocCheck((size_t)d * sizeof(double));
    int *count = (int *)callocCheck((size_t)V, sizeof(int));
    for (int n = 0; n < N; n++) count[tok[n]]++;
    Cmp c;
    cmp_begin(&c, "embedding_backward", tcase, "dembed", dt == DT_FP32 ? "2(k+2)eps*mag" : "2^-7|ref|+2(k+2)eps*mag");
    for (int v = 0; v < V; v++) {
        for (int j = 0; j < d; j++) sum[j] = mag[j] = 0.0;
        for (int n = 0; n < N; n++) {
            if (tok[n] != v) continue;
            for (int j = 0; j < d; j++) {
                sum[j] += bf(dout[(size_t)n * d + j]);
                mag[j] += fabs(bf(dout[(size_t)n * d + j]));
            }
        }
        for (int j = 0; j < d; j++) {
            size_t i = (size_t)v * d + j;
            double init = typed_at(demb, dt, i), ref = init + (double)scale * sum[j];
            double tol = 2.0 * (count[v] + 2) * F32_EPS * (fabs(init) + fabs(scale) * mag[j]);
            if (count[v] == 0) tol = 0.0;
            else if (dt == DT_BF16) tol += BF16_RTOL * fabs(ref);
            cmp_add(&c, typed_at(got, dt, i), ref, tol);
        }
    }
    cmp_end(rep, &c);
    DBuf *bufs[] = {&d_dout, &d_demb, &d_uniq, &d_offs, &d_pos};
    check_guards(rep, "embedding_backward", tcase, bufs, 5);
    for (int i = 0; i < 5; i++) dbuf_free(bufs[i]);
    free(tok); free(uniq); free(offs); free(pos); free(dout); free(demb); free(got); free(sum); free(mag); free(count);
}

// ---------------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------------

// Random RMSNorm weight: around 1 when stored plainly, around 0 when stored as w - 1 (Gemma).
static uint16_t *rand_norm_weight(Rng *rng, int d, float w_offset) {
    return w_offset != 0.0f ? rand_bf16(rng, (size_t)d, -0.5, 0.5) : rand_bf16(rng, (size_t)d, 0.5, 1.5);
}

static double ref_rstd(const uint16_t *xr, int d, float eps) {
    double ss = 0.0;
    for (int j = 0; j < d; j++) ss += bf(xr[j]) * bf(xr[j]);
    return 1.0 / sqrt(ss / d + (double)eps);
}

static void test_rmsnorm_forward(TestReport *rep, int N, int d, float w_offset, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d d=%d offset=%g", N, d, (double)w_offset);
    float eps = 1e-5f;
    uint16_t *x = rand_bf16(&rng, (size_t)N * d, -2.0, 2.0), *w = rand_norm_weight(&rng, d, w_offset);
    uint16_t *y = (uint16_t *)mallocCheck((size_t)N * d * 2);
    float *rstd = (float *)mallocCheck((size_t)N * 4);
    DBuf d_x = dbuf_from(x, (size_t)N * d * 2, 0), d_w = dbuf_from(w, (size_t)d * 2, 0);
    DBuf d_y = dbuf_alloc((size_t)N * d * 2, 0), d_r = dbuf_alloc((size_t)N * 4, 0);
    dbuf_poison(&d_y);
    dbuf_poison(&d_r);
    rmsnorm_forward((bf16 *)d_y.p, (float *)d_r.p, (const bf16 *)d_x.p, (const bf16 *)d_w.p, N, d, eps, w_offset, 0);
    dbuf_download(y, &d_y);
    dbuf_download(rstd, &d_r);
    Cmp cy, cr;
    cmp_begin(&cy, "rmsnorm_forward", tcase, "y", "rtol 2^-7");
    cmp_begin(&cr, "rmsnorm_forward", tcase, "rstd", "rtol 1e-5");
    for (int n = 0; n < N; n++) {
        const uint16_t *xr = x + (size_t)n * d;
        double r = ref_rstd(xr, d, eps);
        cmp_add(&cr, rstd[n], r, 1e-5 * r);
        for (int j = 0; j < d; j++) {
            double ref = bf(xr[j]) * r * (bf(w[j]) + w_offset);
            cmp_add(&cy, bf(y[(size_t)n * d + j]), ref, BF16_RTOL * fabs(ref));
        }
    }
    cmp_end(rep, &cy);
    cmp_end(rep, &cr);
    DBuf *bufs[] = {&d_x, &d_w, &d_y, &d_r};
    check_guards(rep, "rmsnorm_forward", tcase, bufs, 4);
    for (int i = 0; i < 4; i++) dbuf_free(bufs[i]);
    free(x); free(w); free(y); free(rstd);
}

// Runs rmsnorm_backward from fresh copies of dx0 (when accumulating) and dw0; returns dx and dw.
static void run_rmsnorm_backward(uint16_t *dx_out, float *dw_out, DBuf *d_dx, DBuf *d_dw, DBuf *d_scr,
                                 const uint16_t *dx0, const float *dw0, const DBuf *d_dy, const DBuf *d_x,
                                 const DBuf *d_w, const DBuf *d_r, int N, int d, float w_offset, int accumulate) {
    if (accumulate) dbuf_upload(d_dx, dx0);
    else dbuf_poison(d_dx);
    dbuf_upload(d_dw, dw0);
    dbuf_poison(d_scr);
    rmsnorm_backward((bf16 *)d_dx->p, (float *)d_dw->p, (float *)d_scr->p, (const bf16 *)d_dy->p,
                     (const bf16 *)d_x->p, (const bf16 *)d_w->p, (const float *)d_r->p, N, d, w_offset, accumulate, 0);
    dbuf_download(dx_out, d_dx);
    dbuf_download(dw_out, d_dw);
}

static void test_rmsnorm_backward(TestReport *rep, int N, int d, float w_offset, int accumulate, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d d=%d offset=%g acc=%d", N, d, (double)w_offset, accumulate);
    uint16_t *x = rand_bf16(&rng, (size_t)N * d, -2.0, 2.0), *w = rand_norm_weight(&rng, d, w_offset);
    uint16_t *dy = rand_bf16(&rng, (size_t)N * d, -1.0, 1.0), *dx0 = rand_bf16(&rng, (size_t)N * d, -1.0, 1.0);
    float *dw0 = rand_f32(&rng, (size_t)d, -1.0, 1.0), *rstd = (float *)mallocCheck((size_t)N * 4);
    for (int n = 0; n < N; n++) rstd[n] = (float)ref_rstd(x + (size_t)n * d, d, 1e-5f);
    size_t n_scr = (size_t)ceil_div(N, rmsnorm_rows_per_block()) * d;
    DBuf d_x = dbuf_from(x, (size_t)N * d * 2, 0), d_w = dbuf_from(w, (size_t)d * 2, 0);
    DBuf d_dy = dbuf_from(dy, (size_t)N * d * 2, 0), d_r = dbuf_from(rstd, (size_t)N * 4, 0);
    DBuf d_dx = dbuf_alloc((size_t)N * d * 2, 0), d_dw = dbuf_alloc((size_t)d * 4, 0);
    DBuf d_scr = dbuf_alloc(n_scr * 4, 0);
    uint16_t *dx = (uint16_t *)mallocCheck((size_t)N * d * 2), *dx2 = (uint16_t *)mallocCheck((size_t)N * d * 2);
    float *dw = (float *)mallocCheck((size_t)d * 4), *dw2 = (float *)mallocCheck((size_t)d * 4);
    run_rmsnorm_backward(dx, dw, &d_dx, &d_dw, &d_scr, dx0, dw0, &d_dy, &d_x, &d_w, &d_r, N, d, w_offset, accumulate);
    run_rmsnorm_backward(dx2, dw2, &d_dx, &d_dw, &d_scr, dx0, dw0, &d_dy, &d_x, &d_w, &d_r, N, d, w_offset, accumulate);

    // dx = r g dy - x r^3 mean(dy g x) [+ dx0]; atol covers the fp32 error of the cancelling terms.
    Cmp cx, cw;
    cmp_begin(&cx, "rmsnorm_backward", tcase, "dx", "2^-7|ref|+2e-5*|terms|");
    cmp_begin(&cw, "rmsnorm_backward", tcase, "dw", "1e-5*sum|terms|");
    double *dw_ref = (double *)callocCheck((size_t)d, sizeof(double)), *dw_mag = (double *)callocCheck((size_t)d, sizeof(double));
    for (int n = 0; n < N; n++) {
        const uint16_t *xr = x + (size_t)n * d, *dyr = dy + (size_t)n * d;
        double r = rstd[n], s = 0.0, s_abs = 0.0;
        for (int j = 0; j < d; j++) {
            double t = bf(dyr[j]) * (bf(w[j]) + w_offset) * bf(xr[j]);
            s += t;
            s_abs += fabs(t);
        }
        double coef = r * r * r * s / d, coef_abs = r * r * r * s_abs / d;
        for (int j = 0; j < d; j++) {
            size_t i = (size_t)n * d + j;
            double g = bf(w[j]) + w_offset, a = r * g * bf(dyr[j]), b = bf(xr[j]) * coef;
            double init = accumulate ? bf(dx0[i]) : 0.0;
            double ref = init + a - b;
            double mag = fabs(init) + fabs(a) + fabs(bf(xr[j])) * coef_abs;
            cmp_add(&cx, bf(dx[i]), ref, BF16_RTOL * fabs(ref) + 2e-5 * mag);
            dw_ref[j] += bf(dyr[j]) * bf(xr[j]) * r;
            dw_mag[j] += fabs(bf(dyr[j]) * bf(xr[j]) * r);
        }
    }
    for (int j = 0; j < d; j++) {
        double ref = dw0[j] + dw_ref[j];
        cmp_add(&cw, dw[j], ref, 1e-5 * (fabs(dw0[j]) + dw_mag[j]));
    }
    cmp_end(rep, &cx);
    cmp_end(rep, &cw);
    check_exact(rep, "rmsnorm_backward", tcase, "dx rerun", dx, dx2, (size_t)N * d * 2);
    check_exact(rep, "rmsnorm_backward", tcase, "dw rerun", dw, dw2, (size_t)d * 4);
    DBuf *bufs[] = {&d_x, &d_w, &d_dy, &d_r, &d_dx, &d_dw, &d_scr};
    check_guards(rep, "rmsnorm_backward", tcase, bufs, 7);
    for (int i = 0; i < 7; i++) dbuf_free(bufs[i]);
    free(x); free(w); free(dy); free(dx0); free(dw0); free(rstd); free(dx); free(dx2); free(dw); free(dw2);
    free(dw_ref); free(dw_mag);
}

// ---------------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------------

// Independent twin of rope_table_fill, written the way Hugging Face writes it: both branches of the
// Llama-3 rule evaluated, then selected (torch.where), with inv_freq = 1 / theta^(2i / hd). Counts
// the frequencies that fall in each band (high, medium, low) in `bands`.
static void twin_rope_table(double *tab, int max_pos, int hd, double theta, int scaling, double factor, double low,
                            double high, double orig, int *bands) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        double inv = 1.0 / pow(theta, (double)(2 * i) / (double)hd);
        if (scaling) {
            double wavelen = 2.0 * M_PI / inv;
            double low_wl = orig / low, high_wl = orig / high;
            double scaled = wavelen > low_wl ? inv / factor : inv;
            double smooth = (orig / wavelen - low) / (high - low);
            double smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
            int medium = !(wavelen < high_wl) && !(wavelen > low_wl);
            bands[wavelen < high_wl ? 0 : (medium ? 1 : 2)]++;
            inv = medium ? smoothed : scaled;
        }
        for (int p = 0; p < max_pos; p++) {
            tab[(size_t)p * hd + i] = cos(p * inv);
            tab[(size_t)p * hd + half + i] = sin(p * inv);
        }
    }
}

// Host-only: runs without a GPU.
static void test_rope_table(TestReport *rep, int max_pos, int hd, float theta, int scaling) {
    char tcase[48];
    int bands[3] = {0, 0, 0};
    float factor = 8.0f, low = 1.0f, high = 4.0f;
    int orig = 8192;
    float *tab = (float *)mallocCheck((size_t)max_pos * hd * 4);
    double *ref = (double *)mallocCheck((size_t)max_pos * hd * 8);
    rope_table_fill(tab, max_pos, hd, theta, scaling, factor, low, high, orig);
    twin_rope_table(ref, max_pos, hd, theta, scaling, factor, low, high, orig, bands);
    snprintf(tcase, sizeof(tcase), "pos=%d hd=%d theta=%g %s", max_pos, hd, (double)theta,
             scaling ? "llama3" : "plain");
    if (scaling) {
        printf("  (llama3 bands over %d frequencies: %d high / %d medium / %d low)\n", hd / 2, bands[0], bands[1],
               bands[2]);
    }
    // float rounding of cos/sin (2^-24 relative) plus the double error of angles up to max_pos radians.
    Cmp c;
    cmp_begin(&c, "rope_table_fill", tcase, "cos_sin", "6e-8 + 1e-15*pos");
    for (int p = 0; p < max_pos; p++) {
        for (int i = 0; i < hd; i++) cmp_add(&c, tab[(size_t)p * hd + i], ref[(size_t)p * hd + i], 6e-8 + 1e-15 * p);
    }
    cmp_end(rep, &c);
    if (scaling && (bands[0] == 0 || bands[1] == 0 || bands[2] == 0)) {
        printf("rope_table_fill: test case does not exercise all three Llama-3 bands\n");
        test_record(rep, 0);
    }
    free(tab);
    free(ref);
}

static void test_rope(TestReport *rep, int N, int S, int pos_offset, int Hq, int Hkv, int hd, int inverse, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d S=%d off=%d H=%d/%d hd=%d%s", N, S, pos_offset, Hq, Hkv, hd,
             inverse ? " inv" : "");
    int row = (Hq + 2 * Hkv) * hd, half = hd / 2, max_pos = pos_offset + S;
    float *tab = (float *)mallocCheck((size_t)max_pos * hd * 4);
    rope_table_fill(tab, max_pos, hd, 500000.0f, ROPE_SCALING_LLAMA3, 8.0f, 1.0f, 4.0f, 8192);
    uint16_t *qkv = rand_bf16(&rng, (size_t)N * row, -2.0, 2.0), *got = (uint16_t *)mallocCheck((size_t)N * row * 2);
    DBuf d_qkv = dbuf_from(qkv, (size_t)N * row * 2, 0), d_tab = dbuf_from(tab, (size_t)max_pos * hd * 4, 0);
    rope_apply((bf16 *)d_qkv.p, (const float *)d_tab.p, N, S, pos_offset, Hq, Hkv, hd, inverse, 0);
    dbuf_download(got, &d_qkv);
    Cmp c;
    cmp_begin(&c, "rope_apply", tcase, "q,k", "2^-7|ref|+1e-6(|a|+|b|)");
    double sgn = inverse ? -1.0 : 1.0;
    for (int n = 0; n < N; n++) {
        const float *cs = tab + (size_t)(pos_offset + n % S) * hd;
        for (int h = 0; h < Hq + Hkv; h++) {
            size_t base = (size_t)n * row + (size_t)h * hd;
            for (int i = 0; i < half; i++) {
                double a = bf(qkv[base + i]), b = bf(qkv[base + half + i]), co = cs[i], si = sgn * cs[half + i];
                double ra = a * co - b * si, rb = b * co + a * si, atol = 1e-6 * (fabs(a) + fabs(b));
                cmp_add(&c, bf(got[base + i]), ra, BF16_RTOL * fabs(ra) + atol);
                cmp_add(&c, bf(got[base + half + i]), rb, BF16_RTOL * fabs(rb) + atol);
            }
        }
    }
    cmp_end(rep, &c);
    // v heads must be untouched, bit for bit.
    size_t vlen = (size_t)Hkv * hd * 2;
    unsigned char *v_in = (unsigned char *)mallocCheck((size_t)N * vlen), *v_out = (unsigned char *)mallocCheck((size_t)N * vlen);
    for (int n = 0; n < N; n++) {
        size_t off = (size_t)n * row + (size_t)(Hq + Hkv) * hd;
        memcpy(v_in + (size_t)n * vlen, qkv + off, vlen);
        memcpy(v_out + (size_t)n * vlen, got + off, vlen);
    }
    check_exact(rep, "rope_apply", tcase, "v", v_in, v_out, (size_t)N * vlen);
    DBuf *bufs[] = {&d_qkv, &d_tab};
    check_guards(rep, "rope_apply", tcase, bufs, 2);
    dbuf_free(&d_qkv);
    dbuf_free(&d_tab);
    free(tab); free(qkv); free(got); free(v_in); free(v_out);
}

// ---------------------------------------------------------------------------------------------
// Gated activations
// ---------------------------------------------------------------------------------------------

// act(g) and act'(g) in double.
static void ref_act(double g, int activation, double *a, double *da) {
    if (activation == ACT_GELU_TANH) {
        double k = sqrt(2.0 / M_PI), c = 0.044715;
        double t = tanh(k * (g + c * g * g * g));
        *a = 0.5 * g * (1.0 + t);
        *da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * k * (1.0 + 3.0 * c * g * g);
    } else {
        double s = 1.0 / (1.0 + exp(-g));
        *a = g * s;
        *da = s * (1.0 + g * (1.0 - s));
    }
}

static void test_glu(TestReport *rep, int N, int F, int activation, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d F=%d %s", N, F, activation == ACT_SILU ? "silu" : "gelu_tanh");
    size_t nh = (size_t)N * F, ngu = 2 * nh;
    uint16_t *gu = rand_bf16(&rng, ngu, -5.0, 5.0), *dh = rand_bf16(&rng, nh, -1.0, 1.0);
    uint16_t *h = (uint16_t *)mallocCheck(nh * 2), *dgu = (uint16_t *)mallocCheck(ngu * 2);
    uint16_t *dgu_inplace = (uint16_t *)mallocCheck(ngu * 2);
    DBuf d_gu = dbuf_from(gu, ngu * 2, 0), d_dh = dbuf_from(dh, nh * 2, 0);
    DBuf d_h = dbuf_alloc(nh * 2, 0), d_dgu = dbuf_alloc(ngu * 2, 0);
    dbuf_poison(&d_h);
    dbuf_poison(&d_dgu);
    glu_forward((bf16 *)d_h.p, (const bf16 *)d_gu.p, N, F, activation, 0);
    glu_backward((bf16 *)d_dgu.p, (const bf16 *)d_dh.p, (const bf16 *)d_gu.p, N, F, activation, 0);
    dbuf_download(h, &d_h);
    dbuf_download(dgu, &d_dgu);
    glu_backward((bf16 *)d_gu.p, (const bf16 *)d_dh.p, (const bf16 *)d_gu.p, N, F, activation, 0);  // in place
    dbuf_download(dgu_inplace, &d_gu);

    // The fp32 activation loses absolute accuracy where 1 + tanh or 1 - tanh^2 cancel (large |g|):
    // atol = 2e-7 |u| (1 + |g|^3) (and |dh| times that for the gradients).
    Cmp ch, cg, cu, cgi, cui;
    cmp_begin(&ch, "glu_forward", tcase, "h", "2^-7|ref|+2e-7|u|(1+|g|^3)");
    cmp_begin(&cg, "glu_backward", tcase, "dgate", "2^-7|ref|+2e-7|dh u|(1+|g|^3)");
    cmp_begin(&cu, "glu_backward", tcase, "dup", "2^-7|ref|+2e-7|dh|(1+|g|^3)");
    cmp_begin(&cgi, "glu_backward", tcase, "dgate (in place)", "same as dgate");
    cmp_begin(&cui, "glu_backward", tcase, "dup (in place)", "same as dup");
    for (int n = 0; n < N; n++) {
        for (int j = 0; j < F; j++) {
            size_t ig = (size_t)n * 2 * F + j, iu = ig + F, ih = (size_t)n * F + j;
            double g = bf(gu[ig]), u = bf(gu[iu]), d = bf(dh[ih]), a, da;
            ref_act(g, activation, &a, &da);
            double big = 1.0 + fabs(g) * g * g;
            double rh = a * u, rg = d * u * da, ru = d * a;
            double tg = BF16_RTOL * fabs(rg) + 2e-7 * fabs(d * u) * big, tu = BF16_RTOL * fabs(ru) + 2e-7 * fabs(d) * big;
            cmp_add(&ch, bf(h[ih]), rh, BF16_RTOL * fabs(rh) + 2e-7 * fabs(u) * big);
            cmp_add(&cg, bf(dgu[ig]), rg, tg);
            cmp_add(&cu, bf(dgu[iu]), ru, tu);
            cmp_add(&cgi, bf(dgu_inplace[ig]), rg, tg);
            cmp_add(&cui, bf(dgu_inplace[iu]), ru, tu);
        }
    }
    cmp_end(rep, &ch);
    cmp_end(rep, &cg);
    cmp_end(rep, &cu);
    cmp_end(rep, &cgi);
    cmp_end(rep, &cui);
    DBuf *bufs[] = {&d_gu, &d_dh, &d_h, &d_dgu};
    check_guards(rep, "glu", tcase, bufs, 4);
    for (int i = 0; i < 4; i++) dbuf_free(bufs[i]);
    free(gu); free(dh); free(h); free(dgu); free(dgu_inplace);
}

// ---------------------------------------------------------------------------------------------
// Elementwise
// ---------------------------------------------------------------------------------------------

// off_a, off_b: byte offsets of the two device pointers (2 = one bf16 element: misaligned, scalar path).
static void test_residual_add(TestReport *rep, size_t n, size_t off_a, size_t off_b, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu offsets=%zu,%zu", n, off_a, off_b);
    uint16_t *x = rand_bf16(&rng, n, -4.0, 4.0), *y = rand_bf16(&rng, n, -4.0, 4.0), *got = (uint16_t *)mallocCheck(n * 2);
    DBuf d_x = dbuf_from(x, n * 2, off_a), d_y = dbuf_from(y, n * 2, off_b);
    residual_add((bf16 *)d_x.p, (const bf16 *)d_y.p, n, 0);
    dbuf_download(got, &d_x);
    Cmp c;
    cmp_begin(&c, "residual_add", tcase, "x", "rtol 2^-7");
    for (size_t i = 0; i < n; i++) {
        double ref = bf(x[i]) + bf(y[i]);
        cmp_add(&c, bf(got[i]), ref, BF16_RTOL * fabs(ref));
    }
    cmp_end(rep, &c);
    DBuf *bufs[] = {&d_x, &d_y};
    check_guards(rep, "residual_add", tcase, bufs, 2);
    dbuf_free(&d_x);
    dbuf_free(&d_y);
    free(x); free(y); free(got);
}

// fp32 -> bf16 must match the host's round-to-nearest-even bit for bit; bf16 -> fp32 is exact.
static void test_casts(TestReport *rep, size_t n, size_t off, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu offset=%zu", n, off);
    float *f = rand_f32(&rng, n, -100.0, 100.0);
    uint16_t *h = (uint16_t *)mallocCheck(n * 2), *expect = (uint16_t *)mallocCheck(n * 2);
    for (size_t i = 0; i < n; i++) expect[i] = float_to_bf16_bits(f[i]);
    float *back = (float *)mallocCheck(n * 4), *back_ref = (float *)mallocCheck(n * 4);
    for (size_t i = 0; i < n; i++) back_ref[i] = bf16_bits_to_float(expect[i]);
    DBuf d_f = dbuf_from(f, n * 4, off * 4), d_h = dbuf_alloc(n * 2, off * 2), d_back = dbuf_alloc(n * 4, 0);
    dbuf_poison(&d_h);
    dbuf_poison(&d_back);
    cast_fp32_to_bf16((bf16 *)d_h.p, (const float *)d_f.p, n, 0);
    cast_bf16_to_fp32((float *)d_back.p, (const bf16 *)d_h.p, n, 0);
    dbuf_download(h, &d_h);
    dbuf_download(back, &d_back);
    check_exact(rep, "cast_fp32_to_bf16", tcase, "out", h, expect, n * 2);
    check_exact(rep, "cast_bf16_to_fp32", tcase, "out", back, back_ref, n * 4);
    DBuf *bufs[] = {&d_f, &d_h, &d_back};
    check_guards(rep, "casts", tcase, bufs, 3);
    for (int i = 0; i < 3; i++) dbuf_free(bufs[i]);
    free(f); free(h); free(expect); free(back); free(back_ref);
}

// random_normal_fill against random_normal_at on the host (one bf16 step: the rounding plus float
// differences of logf/sinf between host and device), its moments (5 standard errors), and constant_fill.
static void test_random_fill(TestReport *rep, size_t n, uint64_t seed, uint64_t first, size_t off) {
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu first=%llu off=%zu el", n, (unsigned long long)first, off);
    const float std = 0.02f;
    DBuf d = dbuf_alloc(n * 2, off * 2);  // off elements: a 2-byte aligned but not 16-byte aligned start
    dbuf_poison(&d);
    random_normal_fill((bf16 *)d.p, n, seed, first, std, 0);
    uint16_t *h = (uint16_t *)mallocCheck(n * 2);
    dbuf_download(h, &d);
    Cmp c;
    cmp_begin(&c, "random_normal_fill", tcase, "out", "1 bf16 step of host twin");
    double sum = 0.0, sq = 0.0;
    for (size_t i = 0; i < n; i++) {
        double ref = (double)(std * random_normal_at(seed, first + i)), got = bf(h[i]);
        cmp_add(&c, got, ref, bf16_spacing(ref));
        sum += got;
        sq += got * got;
    }
    cmp_end(rep, &c);
    double mean = sum / n, sd = sqrt(sq / n - mean * mean);
    cmp_begin(&c, "random_normal_fill", tcase, "moments", "5 standard errors");
    cmp_add(&c, mean / std, 0.0, 5.0 / sqrt((double)n));
    cmp_add(&c, sd / std, 1.0, 5.0 * sqrt(0.5 / n) + 1.0 / 256.0);  // plus the bf16 rounding of each value
    cmp_end(rep, &c);
    constant_fill((bf16 *)d.p, n, 1.0f, 0);
    dbuf_download(h, &d);
    uint16_t *expect = (uint16_t *)mallocCheck(n * 2);
    for (size_t i = 0; i < n; i++) expect[i] = float_to_bf16_bits(1.0f);
    check_exact(rep, "constant_fill", tcase, "out", h, expect, n * 2);
    DBuf *bufs[] = {&d};
    check_guards(rep, "random/constant fill", tcase, bufs, 1);
    dbuf_free(&d);
    free(h);
    free(expect);
}

static void test_accumulate_into(TestReport *rep, size_t n, DType dt, size_t off, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu %s offset=%zu", n, dtype_name(dt), off);
    size_t esz = dtype_bytes(dt);
    void *dst = rand_typed(&rng, dt, n, -2.0, 2.0), *got = mallocCheck(n * esz);
    uint16_t *src = rand_bf16(&rng, n, -2.0, 2.0);
    DBuf d_dst = dbuf_from(dst, n * esz, off * esz), d_src = dbuf_from(src, n * 2, 0);
    accumulate_into(d_dst.p, dt, (const bf16 *)d_src.p, n, 0);
    dbuf_download(got, &d_dst);
    Cmp c;
    cmp_begin(&c, "accumulate_into", tcase, "dst", dt == DT_FP32 ? "2eps(|dst|+|src|)" : "rtol 2^-7");
    for (size_t i = 0; i < n; i++) {
        double a = typed_at(dst, dt, i), b = bf(src[i]), ref = a + b;
        double tol = dt == DT_FP32 ? 2.0 * F32_EPS * (fabs(a) + fabs(b)) : BF16_RTOL * fabs(ref);
        cmp_add(&c, typed_at(got, dt, i), ref, tol);
    }
    cmp_end(rep, &c);
    DBuf *bufs[] = {&d_dst, &d_src};
    check_guards(rep, "accumulate_into", tcase, bufs, 2);
    dbuf_free(&d_dst);
    dbuf_free(&d_src);
    free(dst); free(got); free(src);
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy over vocabulary chunks
// ---------------------------------------------------------------------------------------------

static double ref_softcap(double x, double cap) { return cap > 0.0 ? cap * tanh(x / cap) : x; }

// Full pass: state init, one ce_online_update per vocabulary tile of width Vc (the last one narrower),
// ce_finalize, sum_reduce of the losses, then ce_backward_tile per tile (with the reference lse).
static void test_cross_entropy(TestReport *rep, int N, int V, int Vc, float softcap, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d V=%d Vc=%d cap=%g", N, V, Vc, (double)softcap);
    double range = softcap > 0.0f ? 3.0 * softcap : 8.0;
    float *logits = rand_f32(&rng, (size_t)N * V, -range, range);  // (N, V) row-major
    int32_t *tgt = (int32_t *)mallocCheck((size_t)N * 4);
    for (int n = 0; n < N; n++) tgt[n] = rng_uniform(&rng, 0.0, 1.0) < 0.2 ? -100 : rng_int(&rng, V);
    tgt[0] = V - 1;  // the last id of the last, narrowest tile
    if (N > 1) tgt[1] = 0;
    if (N > 2) tgt[2] = -1;
    int n_valid = 0;
    for (int n = 0; n < N; n++) n_valid += tgt[n] >= 0;
    float grad_scale = 1.0f / (float)(n_valid > 0 ? n_valid : 1);

    // Reference lse, losses in double.
    double *lse = (double *)mallocCheck((size_t)N * 8), *loss = (double *)mallocCheck((size_t)N * 8);
    double loss_sum = 0.0, loss_abs = 0.0;
    for (int n = 0; n < N; n++) {
        const float *row = logits + (size_t)n * V;
        double mx = -INFINITY, s = 0.0;
        for (int v = 0; v < V; v++) mx = fmax(mx, ref_softcap(row[v], softcap));
        for (int v = 0; v < V; v++) s += exp(ref_softcap(row[v], softcap) - mx);
        lse[n] = mx + log(s);
        loss[n] = tgt[n] >= 0 ? lse[n] - ref_softcap(row[tgt[n]], softcap) : 0.0;
        loss_sum += loss[n];
        loss_abs += fabs(loss[n]);
    }

    int n_tiles = ceil_div(V, Vc);
    DBuf d_tgt = dbuf_from(tgt, (size_t)N * 4, 0), d_tile = dbuf_alloc((size_t)N * Vc * 4, 0);
    DBuf d_m = dbuf_alloc((size_t)N * 4, 0), d_s = dbuf_alloc((size_t)N * 4, 0), d_t = dbuf_alloc((size_t)N * 4, 0);
    DBuf d_lse = dbuf_alloc((size_t)N * 4, 0), d_loss = dbuf_alloc((size_t)N * 4, 0), d_sum = dbuf_alloc(4, 0);
    DBuf d_dl = dbuf_alloc((size_t)N * Vc * 2, 0);
    float *tile = (float *)mallocCheck((size_t)N * Vc * 4);
    dbuf_poison(&d_m);
    dbuf_poison(&d_s);
    dbuf_poison(&d_t);
    ce_state_init((float *)d_m.p, (float *)d_s.p, (float *)d_t.p, N, 0);
    for (int t = 0; t < n_tiles; t++) {
        int v0 = t * Vc, w = V - v0 < Vc ? V - v0 : Vc;
        for (int n = 0; n < N; n++) memcpy(tile + (size_t)n * w, logits + (size_t)n * V + v0, (size_t)w * 4);
        cudaCheck(cudaMemcpy(d_tile.p, tile, (size_t)N * w * 4, cudaMemcpyHostToDevice));
        ce_online_update((float *)d_m.p, (float *)d_s.p, (float *)d_t.p, (const float *)d_tile.p, N, w, v0,
                         (const int32_t *)d_tgt.p, softcap, 0);
    }
    dbuf_poison(&d_lse);
    dbuf_poison(&d_loss);
    dbuf_poison(&d_sum);
    ce_finalize((float *)d_lse.p, (float *)d_loss.p, (const float *)d_m.p, (const float *)d_s.p,
                (const float *)d_t.p, (const int32_t *)d_tgt.p, N, 0);
    sum_reduce((float *)d_sum.p, (const float *)d_loss.p, N, 0);
    float *g_lse = (float *)mallocCheck((size_t)N * 4), *g_loss = (float *)mallocCheck((size_t)N * 4), g_sum;
    dbuf_download(g_lse, &d_lse);
    dbuf_download(g_loss, &d_loss);
    dbuf_download(&g_sum, &d_sum);

    // fp32 exp/log/tanh and sums of V terms: a few 1e-6 absolute on lse and losses (values ~10..100).
    Cmp cl, cs, ct;
    cmp_begin(&cl, "ce_online+finalize", tcase, "lse", "1e-6|ref|+2e-5");
    cmp_begin(&cs, "ce_online+finalize", tcase, "losses", "1e-6|lse|+4e-5");
    cmp_begin(&ct, "ce+sum_reduce", tcase, "loss sum", "1e-6 sum|loss|+4e-5 N");
    for (int n = 0; n < N; n++) {
        cmp_add(&cl, g_lse[n], lse[n], 1e-6 * fabs(lse[n]) + 2e-5);
        cmp_add(&cs, g_loss[n], loss[n], tgt[n] >= 0 ? 1e-6 * fabs(lse[n]) + 4e-5 : 0.0);
    }
    cmp_add(&ct, g_sum, loss_sum, 1e-6 * loss_abs + 4e-5 * N);
    cmp_end(rep, &cl);
    cmp_end(rep, &cs);
    cmp_end(rep, &ct);

    // Backward per tile from the reference lse (rounded to float, as the kernel receives it).
    float *lse_f = (float *)mallocCheck((size_t)N * 4);
    for (int n = 0; n < N; n++) lse_f[n] = (float)lse[n];
    cudaCheck(cudaMemcpy(d_lse.p, lse_f, (size_t)N * 4, cudaMemcpyHostToDevice));
    uint16_t *dl = (uint16_t *)mallocCheck((size_t)N * Vc * 2);
    Cmp cd;
    // atol: the fp32 error of exp(z - lse) with |z|, |lse| up to ~100: 1e-5 * grad_scale.
    cmp_begin(&cd, "ce_backward_tile", tcase, "dlogits", "2^-7|ref|+1e-5*scale");
    for (int t = 0; t < n_tiles; t++) {
        int v0 = t * Vc, w = V - v0 < Vc ? V - v0 : Vc;
        for (int n = 0; n < N; n++) memcpy(tile + (size_t)n * w, logits + (size_t)n * V + v0, (size_t)w * 4);
        cudaCheck(cudaMemcpy(d_tile.p, tile, (size_t)N * w * 4, cudaMemcpyHostToDevice));
        dbuf_poison(&d_dl);
        ce_backward_tile((bf16 *)d_dl.p, (const float *)d_tile.p, (const float *)d_lse.p, N, w, v0,
                         (const int32_t *)d_tgt.p, softcap, grad_scale, 0);
        cudaCheck(cudaDeviceSynchronize());
        cudaCheck(cudaMemcpy(dl, d_dl.p, (size_t)N * w * 2, cudaMemcpyDeviceToHost));
        for (int n = 0; n < N; n++) {
            for (int j = 0; j < w; j++) {
                double x = tile[(size_t)n * w + j], ref = 0.0, tol = 0.0;
                if (tgt[n] >= 0) {
                    double z = ref_softcap(x, softcap);
                    double dz = softcap > 0.0f ? 1.0 - tanh(x / softcap) * tanh(x / softcap) : 1.0;
                    ref = grad_scale * (exp(z - lse[n]) - (v0 + j == tgt[n] ? 1.0 : 0.0)) * dz;
                    tol = BF16_RTOL * fabs(ref) + 1e-5 * grad_scale;
                }
                cmp_add(&cd, bf(dl[(size_t)n * w + j]), ref, tol);
            }
        }
    }
    cmp_end(rep, &cd);
    DBuf *bufs[] = {&d_tgt, &d_tile, &d_m, &d_s, &d_t, &d_lse, &d_loss, &d_sum, &d_dl};
    check_guards(rep, "cross_entropy", tcase, bufs, 9);
    for (int i = 0; i < 9; i++) dbuf_free(bufs[i]);
    free(logits); free(tgt); free(lse); free(loss); free(tile); free(g_lse); free(g_loss); free(lse_f); free(dl);
}

static void test_sum_reduce(TestReport *rep, int N, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "N=%d", N);
    float *x = rand_f32(&rng, (size_t)N, 0.0, 10.0), got[2];
    double ref = 0.0, mag = 0.0;
    for (int i = 0; i < N; i++) {
        ref += x[i];
        mag += fabs(x[i]);
    }
    DBuf d_x = dbuf_from(x, (size_t)N * 4, 0), d_out = dbuf_alloc(4, 0);
    for (int k = 0; k < 2; k++) {
        dbuf_poison(&d_out);
        sum_reduce((float *)d_out.p, (const float *)d_x.p, N, 0);
        dbuf_download(&got[k], &d_out);
    }
    // Each thread adds about N / 1024 terms in sequence, then 10 tree levels.
    double depth = (double)N / 1024.0 + 11.0;
    Cmp c;
    cmp_begin(&c, "sum_reduce", tcase, "out", "(N/1024+11)eps*sum|x|");
    cmp_add(&c, got[0], ref, depth * F32_EPS * mag);
    cmp_end(rep, &c);
    check_exact(rep, "sum_reduce", tcase, "rerun", &got[0], &got[1], 4);
    DBuf *bufs[] = {&d_x, &d_out};
    check_guards(rep, "sum_reduce", tcase, bufs, 2);
    dbuf_free(&d_x);
    dbuf_free(&d_out);
    free(x);
}

// ---------------------------------------------------------------------------------------------
// Optimizer
// ---------------------------------------------------------------------------------------------

// Sums the fused gradient-norm partials (d_part, grad_norm_partials() fp32) into the poisoned d_norm
// and compares with ref (the sum of grad^2 in double) over `terms` positive terms: relative error at
// most (terms per thread + tree levels) eps, as test_grad_norm's bound.
static void check_sumsq_partials(TestReport *rep, const char *kernel, const char *tcase, const DBuf *d_part,
                                 DBuf *d_norm, double ref, double terms) {
    float got;
    dbuf_poison(d_norm);
    grad_norm_finish((float *)d_norm->p, (const float *)d_part->p, 0);
    dbuf_download(&got, d_norm);
    Cmp c;
    cmp_begin(&c, kernel, tcase, "sum sq", "(terms/(P*256)+40)eps|ref|");
    cmp_add(&c, got, ref, (terms / (grad_norm_partials() * 256.0) + 40.0) * F32_EPS * ref);
    cmp_end(rep, &c);
}

// with_norm: the fused gradient-norm partials too (checked against the sum of grad^2 in double).
static void test_adamw(TestReport *rep, size_t n, DType grad_t, DType mom_t, int use_master, size_t off, int with_norm,
                       uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu g=%s m=%s %s off=%zu%s", n, dtype_name(grad_t), dtype_name(mom_t),
             use_master ? "master" : "sr", off, with_norm ? " +norm" : "");
    AdamWParams hp = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, 7, 1234u};
    float *master = use_master ? rand_f32(&rng, n, -1.0, 1.0) : NULL;
    uint16_t *param = rand_bf16(&rng, n, -1.0, 1.0);
    if (use_master) {
        for (size_t i = 0; i < n; i++) param[i] = float_to_bf16_bits(master[i]);
    }
    void *grad = rand_typed(&rng, grad_t, n, -1.0, 1.0);
    void *m = rand_typed(&rng, mom_t, n, -0.1, 0.1), *v = rand_typed(&rng, mom_t, n, 1e-4, 0.01);
    size_t gsz = dtype_bytes(grad_t), msz = dtype_bytes(mom_t);
    DBuf d_p = dbuf_from(param, n * 2, off * 2), d_g = dbuf_from(grad, n * gsz, off * gsz);
    DBuf d_m = dbuf_from(m, n * msz, off * msz), d_v = dbuf_from(v, n * msz, off * msz);
    DBuf d_master = use_master ? dbuf_from(master, n * 4, off * 4) : dbuf_alloc(4, 0);
    int P = grad_norm_partials();
    DBuf d_part = dbuf_alloc((size_t)P * 4, 0), d_norm = dbuf_alloc(4, 0);
    cudaCheck(cudaMemset(d_part.p, 0, (size_t)P * 4));
    adamw_update((bf16 *)d_p.p, use_master ? (float *)d_master.p : NULL, d_g.p, grad_t, d_m.p, d_v.p, mom_t, n, &hp,
                 with_norm ? (float *)d_part.p : NULL, 0);
    if (with_norm) {
        double ref_sumsq = 0.0;
        for (size_t i = 0; i < n; i++) ref_sumsq += typed_at(grad, grad_t, i) * typed_at(grad, grad_t, i);
        check_sumsq_partials(rep, "adamw_update", tcase, &d_part, &d_norm, ref_sumsq, (double)n);
    }
    uint16_t *gp = (uint16_t *)mallocCheck(n * 2);
    void *gm = mallocCheck(n * msz), *gv = mallocCheck(n * msz);
    float *gmaster = (float *)mallocCheck(n * 4);
    dbuf_download(gp, &d_p);
    dbuf_download(gm, &d_m);
    dbuf_download(gv, &d_v);
    if (use_master) dbuf_download(gmaster, &d_master);

    double b1 = hp.beta1, b2 = hp.beta2, lr = hp.lr, bc1 = 1.0 - pow(b1, hp.step), bc2 = 1.0 - pow(b2, hp.step);
    Cmp cm, cv, cp, cw;
    const char *mtol = mom_t == DT_FP32 ? "4eps*|terms|" : "2^-7|ref|+4eps*|terms|";
    cmp_begin(&cm, "adamw_update", tcase, "m", mtol);
    cmp_begin(&cv, "adamw_update", tcase, "v", mtol);
    cmp_begin(&cp, "adamw_update", tcase, "param", use_master ? "2^-7|ref|+ptol" : "1 bf16 ulp+ptol");
    cmp_begin(&cw, "adamw_update", tcase, "master", "4eps|p|+ptol");
    size_t n_rn_mismatch = 0;
    for (size_t i = 0; i < n; i++) {
        double g = typed_at(grad, grad_t, i) * hp.grad_scale;
        double m0 = typed_at(m, mom_t, i), v0 = typed_at(v, mom_t, i);
        double m1 = b1 * m0 + (1.0 - b1) * g, v1 = b2 * v0 + (1.0 - b2) * g * g;
        double p0 = use_master ? master[i] : bf(param[i]);
        double step = lr / bc1 * m1 / (sqrt(v1) / sqrt(bc2) + hp.eps), dec = lr * hp.weight_decay * p0;
        double p1 = p0 - dec - step, upd = fabs(step) + fabs(dec);
        double mt = 4.0 * F32_EPS * (fabs(b1 * m0) + fabs((1.0 - b1) * g));
        double vt = 4.0 * F32_EPS * (fabs(b2 * v0) + fabs((1.0 - b2) * g * g));
        // The update inherits the fp32 error of m1, which can be large relative to m1 when b1 m0 and
        // (1 - b1) g cancel: ptol = 1e-5 |update| + that error carried through the step.
        double ptol = 1e-5 * upd + lr / bc1 * mt / (sqrt(v1) / sqrt(bc2) + hp.eps);
        if (mom_t == DT_BF16) {
            mt += BF16_RTOL * fabs(m1);
            vt += BF16_RTOL * fabs(v1);
        }
        cmp_add(&cm, typed_at(gm, mom_t, i), m1, mt);
        cmp_add(&cv, typed_at(gv, mom_t, i), v1, vt);
        if (use_master) {
            cmp_add(&cw, gmaster[i], p1, 4.0 * F32_EPS * fabs(p0) + ptol);
            cmp_add(&cp, bf(gp[i]), p1, BF16_RTOL * fabs(p1) + ptol);
            n_rn_mismatch += gp[i] != float_to_bf16_bits(gmaster[i]);
        } else {
            // Any of the two bf16 neighbours is right; the spacing is taken just above |p1| so that
            // a p1 a hair below a power of two, computed a hair above it in fp32, still passes.
            cmp_add(&cp, bf(gp[i]), p1, bf16_spacing(fabs(p1) * (1.0 + 1e-5)) + ptol);
        }
    }
    cmp_end(rep, &cm);
    cmp_end(rep, &cv);
    cmp_end(rep, &cp);
    if (use_master) {
        cmp_end(rep, &cw);
        printf("%-22s %-36s %-10s %10zu %10s %10s %10s %8s  %-26s %s\n", "adamw_update", tcase, "param=rn", n, "-",
               "-", "-", "-", "param == bf16_rn(master)", n_rn_mismatch ? "FAIL" : "PASS");
        test_record(rep, !n_rn_mismatch);
    }
    DBuf *bufs[] = {&d_p, &d_g, &d_m, &d_v, &d_master, &d_part, &d_norm};
    check_guards(rep, "adamw_update", tcase, bufs, 7);
    for (int i = 0; i < 7; i++) dbuf_free(bufs[i]);
    free(master); free(param); free(grad); free(m); free(v); free(gp); free(gm); free(gv); free(gmaster);
}

// Stochastic rounding statistics. Weights 1.0, step 1, gradients +-1, m = v = 0, no decay, lr = 2^-10:
// the exact new weight is 1 - 2^-10 (a quarter bf16 ulp below 1, ulp 2^-8) or 1 + 2^-10 (an eighth of
// an ulp above 1, ulp 2^-7), so stochastic rounding lands on 1.0 with probability 3/4, resp. on
// 1 + 2^-7 with probability 1/8 (round-to-nearest would always give 1.0). Same seed: same bits;
// another seed: different bits; the tensor updated in two parts (index_base = where the second
// starts, as a ZeRO rank updates its part; once at a 16-byte boundary, once not): the same bits.
static void test_adamw_stochastic(TestReport *rep, size_t n) {
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu sr statistics", n);
    uint16_t *param = (uint16_t *)mallocCheck(n * 2), *got[3];
    float *grad = (float *)mallocCheck(n * 4), *zeros = (float *)callocCheck(n, 4);
    for (size_t i = 0; i < n; i++) {
        param[i] = float_to_bf16_bits(1.0f);
        grad[i] = (i % 2) ? -1.0f : 1.0f;
    }
    DBuf d_p = dbuf_alloc(n * 2, 0), d_g = dbuf_from(grad, n * 4, 0), d_m = dbuf_alloc(n * 4, 0), d_v = dbuf_alloc(n * 4, 0);
    uint32_t seeds[3] = {77u, 77u, 78u};
    for (int k = 0; k < 3; k++) {
        AdamWParams hp = {1.0f / 1024.0f, 0.9f, 0.95f, 1e-8f, 0.0f, 1.0f, 1, seeds[k]};
        dbuf_upload(&d_p, param);
        dbuf_upload(&d_m, zeros);
        dbuf_upload(&d_v, zeros);
        adamw_update((bf16 *)d_p.p, NULL, d_g.p, DT_FP32, d_m.p, d_v.p, DT_FP32, n, &hp, NULL, 0);
        got[k] = (uint16_t *)mallocCheck(n * 2);
        dbuf_download(got[k], &d_p);
    }
    uint16_t one = float_to_bf16_bits(1.0f), below = (uint16_t)(one - 1), above = (uint16_t)(one + 1);
    size_t n_dec = 0, n_inc = 0, up_dec = 0, up_inc = 0, outside = 0;
    for (size_t i = 0; i < n; i++) {
        uint16_t h = got[0][i];
        if (i % 2 == 0) {  // weight decreases to 1 - 2^-10: 1.0 (p = 3/4) or 1 - 2^-8
            n_dec++;
            up_dec += h == one;
            outside += h != one && h != below;
        } else {  // weight increases to 1 + 2^-10: 1 + 2^-7 (p = 1/8) or 1.0
            n_inc++;
            up_inc += h == above;
            outside += h != one && h != above;
        }
    }
    double f_dec = (double)up_dec / (double)n_dec, f_inc = (double)up_inc / (double)n_inc;
    // 1% absolute: more than 5 standard deviations at n = 1e5 (sd = sqrt(p(1-p)/(n/2)) <= 0.0019).
    Cmp c;
    cmp_begin(&c, "adamw_update", tcase, "P(up)", "|f - p| <= 0.01");
    cmp_add(&c, f_dec, 0.75, 0.01);
    cmp_add(&c, f_inc, 0.125, 0.01);
    cmp_add(&c, (double)outside, 0.0, 0.0);
    cmp_end(rep, &c);
    printf("  (stochastic rounding: %.4f of decreasing weights stayed at 1.0 (expect 0.75), %.4f of increasing "
           "weights went up (expect 0.125))\n", f_dec, f_inc);
    check_exact(rep, "adamw_update", tcase, "same seed", got[0], got[1], n * 2);
    uint16_t *parts = (uint16_t *)mallocCheck(n * 2);
    size_t cuts[2] = {n / 3 / 8 * 8, n / 3 + 3};
    for (int k = 0; k < 2; k++) {
        dbuf_upload(&d_p, param);
        dbuf_upload(&d_m, zeros);
        dbuf_upload(&d_v, zeros);
        for (int part = 0; part < 2; part++) {
            size_t lo = part == 0 ? 0 : cuts[k], hi = part == 0 ? cuts[k] : n;
            AdamWParams hp = {1.0f / 1024.0f, 0.9f, 0.95f, 1e-8f, 0.0f, 1.0f, 1, seeds[0], lo};
            adamw_update((bf16 *)d_p.p + lo, NULL, (const float *)d_g.p + lo, DT_FP32, (float *)d_m.p + lo, (float *)d_v.p + lo,
                         DT_FP32, hi - lo, &hp, NULL, 0);
        }
        dbuf_download(parts, &d_p);
        check_exact(rep, "adamw_update", tcase, k == 0 ? "two parts" : "two parts, odd cut", parts, got[0], n * 2);
    }
    free(parts);
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) differ += got[0][i] != got[2][i];
    int ok = differ > n / 10;
    printf("%-22s %-36s %-10s %10zu %10s %10s %10s %8s  %-26s %s (%zu elements differ)\n", "adamw_update", tcase,
           "other seed", n, "-", "-", "-", "-", "> 10% elements differ", ok ? "PASS" : "FAIL", differ);
    test_record(rep, ok);
    DBuf *bufs[] = {&d_p, &d_g, &d_m, &d_v};
    check_guards(rep, "adamw_update", tcase, bufs, 4);
    for (int i = 0; i < 4; i++) dbuf_free(bufs[i]);
    for (int k = 0; k < 3; k++) free(got[k]);
    free(param); free(grad); free(zeros);
}

// 8-bit AdamW against its CPU twin adamw8bit_update_cpu (adamw8bit.h), bit for bit: weights,
// master weights, both moments' codes (padding past n included: it must stay untouched) and block
// scales, after two steps (step 7, then 8 on the codes the first wrote). The twin itself is checked
// against a double-precision AdamW and the code books' rounding bounds on the CPU by
// tests/test_adamw8bit.c. Random weights, gradients, codes and scales; block 0 starts all zero
// (absmax 0, as a fresh state). With master weights the bf16 param is a pure output and starts
// poisoned. `off` misaligns every buffer by that many elements (codes by that many bytes).
// with_norm: the fused gradient-norm partials too (both steps add; against 2 x the sum of grad^2).
static void test_adamw8bit(TestReport *rep, size_t n, DType grad_t, int use_master, size_t off, int with_norm,
                           uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu g=%s %s off=%zu%s", n, dtype_name(grad_t), use_master ? "master" : "sr", off,
             with_norm ? " +norm" : "");
    size_t nb = adam8_blocks(n), nc = nb * ADAM8_BLOCK, gsz = dtype_bytes(grad_t);
    float *master = use_master ? rand_f32(&rng, n, -1.0, 1.0) : NULL;
    uint16_t *param = rand_bf16(&rng, n, -1.0, 1.0);
    void *grad = rand_typed(&rng, grad_t, n, -1.0, 1.0);
    float *grad_f32 = (float *)mallocCheck(n * 4);
    for (size_t i = 0; i < n; i++) grad_f32[i] = (float)typed_at(grad, grad_t, i);
    uint8_t *codes = (uint8_t *)mallocCheck(2 * nc);
    for (size_t i = 0; i < 2 * nc; i++) codes[i] = (uint8_t)rng_int(&rng, 256);
    float *absmax = (float *)mallocCheck(2 * nb * 4);
    for (size_t b = 0; b < nb; b++) {
        absmax[b] = b == 0 ? 0.0f : (float)rng_uniform(&rng, 0.01, 0.1);
        absmax[nb + b] = b == 0 ? 0.0f : (float)rng_uniform(&rng, 1e-4, 1e-2);
    }
    DBuf d_p = dbuf_from(param, n * 2, off * 2), d_g = dbuf_from(grad, n * gsz, off * gsz);
    DBuf d_master = use_master ? dbuf_from(master, n * 4, off * 4) : dbuf_alloc(4, 0);
    DBuf d_mq = dbuf_from(codes, nc, off), d_vq = dbuf_from(codes + nc, nc, off);
    DBuf d_ma = dbuf_from(absmax, nb * 4, off * 4), d_va = dbuf_from(absmax + nb, nb * 4, off * 4);
    if (use_master) dbuf_poison(&d_p);
    int P = grad_norm_partials();
    DBuf d_part = dbuf_alloc((size_t)P * 4, 0), d_norm = dbuf_alloc(4, 0);
    cudaCheck(cudaMemset(d_part.p, 0, (size_t)P * 4));

    Adam8Codebooks books;
    adam8_codebooks_init(&books);
    Adam8State host = {codes, codes + nc, absmax, absmax + nb};
    for (int step = 7; step <= 8; step++) {
        AdamWParams hp = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0.5f, step, 1234u + (uint32_t)step};
        adamw8bit_update((bf16 *)d_p.p, use_master ? (float *)d_master.p : NULL, d_g.p, grad_t, (uint8_t *)d_mq.p,
                         (float *)d_ma.p, (uint8_t *)d_vq.p, (float *)d_va.p, n, &hp,
                         with_norm ? (float *)d_part.p : NULL, 0);
        Adam8Consts c = adam8_consts(hp.lr, hp.beta1, hp.beta2, hp.eps, hp.weight_decay, hp.grad_scale, hp.step, hp.seed);
        adamw8bit_update_cpu(param, master, grad_f32, host, n, &c, &books);
    }
    if (with_norm) {  // two steps added to the same partials
        double ref_sumsq = 0.0;
        for (size_t i = 0; i < n; i++) ref_sumsq += 2.0 * (double)grad_f32[i] * grad_f32[i];
        check_sumsq_partials(rep, "adamw8bit_update", tcase, &d_part, &d_norm, ref_sumsq, 2.0 * n);
    }
    uint16_t *gp = (uint16_t *)mallocCheck(n * 2);
    uint8_t *gq = (uint8_t *)mallocCheck(nc);
    float *gf = (float *)mallocCheck((n > nb ? n : nb) * 4);
    dbuf_download(gp, &d_p);
    check_exact(rep, "adamw8bit_update", tcase, "param", gp, param, n * 2);
    if (use_master) {
        dbuf_download(gf, &d_master);
        check_exact(rep, "adamw8bit_update", tcase, "master", gf, master, n * 4);
    }
    dbuf_download(gq, &d_mq);
    check_exact(rep, "adamw8bit_update", tcase, "m codes", gq, codes, nc);
    dbuf_download(gq, &d_vq);
    check_exact(rep, "adamw8bit_update", tcase, "v codes", gq, codes + nc, nc);
    dbuf_download(gf, &d_ma);
    check_exact(rep, "adamw8bit_update", tcase, "m absmax", gf, absmax, nb * 4);
    dbuf_download(gf, &d_va);
    check_exact(rep, "adamw8bit_update", tcase, "v absmax", gf, absmax + nb, nb * 4);
    DBuf *bufs[] = {&d_p, &d_g, &d_master, &d_mq, &d_vq, &d_ma, &d_va, &d_part, &d_norm};
    check_guards(rep, "adamw8bit_update", tcase, bufs, 9);
    for (int i = 0; i < 9; i++) dbuf_free(bufs[i]);
    free(master); free(param); free(grad); free(grad_f32); free(codes); free(absmax); free(gp); free(gq); free(gf);
}

// Two tensors (fp32 then bf16, the second misaligned by `off` elements) into the same partials.
static void test_grad_norm(TestReport *rep, size_t n1, size_t n2, size_t off, uint64_t seed) {
    Rng rng = {seed};
    char tcase[48];
    snprintf(tcase, sizeof(tcase), "n=%zu fp32 + %zu bf16 off=%zu", n1, n2, off);
    float *g1 = rand_f32(&rng, n1, -1.0, 1.0);
    uint16_t *g2 = rand_bf16(&rng, n2, -1.0, 1.0);
    double ref = 0.0;
    for (size_t i = 0; i < n1; i++) ref += (double)g1[i] * g1[i];
    for (size_t i = 0; i < n2; i++) ref += bf(g2[i]) * bf(g2[i]);
    int P = grad_norm_partials();
    DBuf d_g1 = dbuf_from(g1, n1 * 4, 0), d_g2 = dbuf_from(g2, n2 * 2, off * 2);
    DBuf d_part = dbuf_alloc((size_t)P * 4, 0), d_out = dbuf_alloc(4, 0);
    float got[2];
    for (int k = 0; k < 2; k++) {
        cudaCheck(cudaMemset(d_part.p, 0, (size_t)P * 4));
        dbuf_poison(&d_out);
        grad_norm_accumulate((float *)d_part.p, d_g1.p, DT_FP32, n1, 0);
        grad_norm_accumulate((float *)d_part.p, d_g2.p, DT_BF16, n2, 0);
        grad_norm_finish((float *)d_out.p, (const float *)d_part.p, 0);
        dbuf_download(&got[k], &d_out);
    }
    // All terms positive: relative error <= (terms per thread + tree levels) eps.
    double depth = (double)(n1 + n2) / (8.0 * P * 256.0) * 8.0 + 40.0;
    Cmp c;
    cmp_begin(&c, "grad_norm", tcase, "sum sq", "(n/(P*256)+40)eps|ref|");
    cmp_add(&c, got[0], ref, depth * F32_EPS * ref);
    cmp_end(rep, &c);
    check_exact(rep, "grad_norm", tcase, "rerun", &got[0], &got[1], 4);
    DBuf *bufs[] = {&d_g1, &d_g2, &d_part, &d_out};
    check_guards(rep, "grad_norm", tcase, bufs, 4);
    for (int i = 0; i < 4; i++) dbuf_free(bufs[i]);
    free(g1);
    free(g2);
}

// ---------------------------------------------------------------------------------------------
// Timing at Llama-3-8B sizes
// ---------------------------------------------------------------------------------------------

// Fills p (n) with uniform values in [lo, hi) from a hash of (seed, index): benchmark inputs.
__global__ void bench_fill_kernel(void *p, DType t, size_t n, uint32_t seed, float lo, float hi) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ ((uint64_t)seed << 32);
        z = (z ^ (z >> 31)) * 0xBF58476D1CE4E5B9ull;
        z ^= z >> 29;
        float u = lo + (hi - lo) * (float)(z >> 40) * (1.0f / 16777216.0f);
        if (t == DT_FP32) ((float *)p)[i] = u;
        else ((bf16 *)p)[i] = __float2bfloat16(u);
    }
}

static void *bench_alloc(DType t, size_t n, uint32_t seed, float lo, float hi) {
    void *p;
    cudaCheck(cudaMalloc(&p, n * dtype_bytes(t)));
    bench_fill_kernel<<<4096, 256>>>(p, t, n, seed, lo, hi);
    cudaCheckLaunch();
    return p;
}

typedef struct {
    int N, d, F, V, Vc, Hq, Hkv, hd, n_unique;
    size_t n_opt;
    int32_t *tokens, *targets, *uniq, *offsets, *positions;
    bf16 *embed, *x, *y, *dx, *dy, *w, *qkv, *gate_up, *h, *dh, *dlogits;
    float *rstd, *scratch, *dw, *cos_sin, *logits, *row_max, *row_sum, *tlogit, *lse, *losses, *out;
    float *dembed, *big_f32, *partials;
    bf16 *big_bf16, *p_bf16;
    float *master, *g_f32, *m_f32, *v_f32;
    bf16 *g_bf16, *m_bf16, *v_bf16;
    uint8_t *m_codes, *v_codes;
    float *m_absmax, *v_absmax;
} Bench;

typedef void (*BenchFn)(const Bench *b);

static void b_embedding_forward(const Bench *b) { embedding_forward(b->y, b->tokens, b->embed, b->N, b->d, 1.0f, 0); }
static void b_embedding_backward(const Bench *b) {
    embedding_backward(b->dembed, DT_FP32, b->dy, b->uniq, b->offsets, b->positions, b->n_unique, b->d, 1.0f, 0);
}
static void b_rmsnorm_forward(const Bench *b) { rmsnorm_forward(b->y, b->rstd, b->x, b->w, b->N, b->d, 1e-5f, 0.0f, 0); }
static void b_rmsnorm_backward(const Bench *b) {
    rmsnorm_backward(b->dx, b->dw, b->scratch, b->dy, b->x, b->w, b->rstd, b->N, b->d, 0.0f, 0, 0);
}
static void b_rope(const Bench *b) { rope_apply(b->qkv, b->cos_sin, b->N, b->N, 0, b->Hq, b->Hkv, b->hd, 0, 0); }
static void b_glu_forward(const Bench *b) { glu_forward(b->h, b->gate_up, b->N, b->F, ACT_SILU, 0); }
static void b_glu_backward(const Bench *b) { glu_backward(b->gate_up, b->dh, b->gate_up, b->N, b->F, ACT_SILU, 0); }
static void b_residual_add(const Bench *b) { residual_add(b->x, b->y, (size_t)b->N * b->d, 0); }
static void b_cast_to_bf16(const Bench *b) { cast_fp32_to_bf16(b->big_bf16, b->big_f32, b->n_opt, 0); }
static void b_cast_to_fp32(const Bench *b) { cast_bf16_to_fp32(b->big_f32, b->big_bf16, b->n_opt, 0); }
static void b_accumulate_f32(const Bench *b) { accumulate_into(b->big_f32, DT_FP32, b->big_bf16, b->n_opt, 0); }
static void b_ce_online(const Bench *b) {
    ce_online_update(b->row_max, b->row_sum, b->tlogit, b->logits, b->N, b->Vc, 0, b->targets, 0.0f, 0);
}
static void b_ce_online_cap(const Bench *b) {
    ce_online_update(b->row_max, b->row_sum, b->tlogit, b->logits, b->N, b->Vc, 0, b->targets, 30.0f, 0);
}
static void b_ce_finalize(const Bench *b) {
    ce_finalize(b->lse, b->losses, b->row_max, b->row_sum, b->tlogit, b->targets, b->N, 0);
}
static void b_ce_backward(const Bench *b) {
    ce_backward_tile(b->dlogits, b->logits, b->lse, b->N, b->Vc, 0, b->targets, 0.0f, 1.0f / b->N, 0);
}
static void b_sum_reduce(const Bench *b) { sum_reduce(b->out, b->losses, b->N, 0); }
static void b_adamw_bf16_sr(const Bench *b) {
    AdamWParams hp = {1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3, 5u};
    adamw_update(b->p_bf16, NULL, b->g_bf16, DT_BF16, b->m_bf16, b->v_bf16, DT_BF16, b->n_opt, &hp, NULL, 0);
}
// The model's default: fp32 layer gradients, bf16 moments, stochastic rounding, fused norm partials.
static void b_adamw_model(const Bench *b) {
    AdamWParams hp = {1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3, 5u};
    adamw_update(b->p_bf16, NULL, b->g_f32, DT_FP32, b->m_bf16, b->v_bf16, DT_BF16, b->n_opt, &hp, b->partials, 0);
}
static void b_adamw_fp32_master(const Bench *b) {
    AdamWParams hp = {1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3, 5u};
    adamw_update(b->p_bf16, b->master, b->g_f32, DT_FP32, b->m_f32, b->v_f32, DT_FP32, b->n_opt, &hp, NULL, 0);
}
static void b_adamw8bit_sr(const Bench *b) {
    AdamWParams hp = {1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f, 3, 5u};
    adamw8bit_update(b->p_bf16, NULL, b->g_f32, DT_FP32, b->m_codes, b->m_absmax, b->v_codes, b->v_absmax, b->n_opt,
                     &hp, b->partials, 0);
}
static void b_grad_norm(const Bench *b) { grad_norm_accumulate(b->partials, b->g_f32, DT_FP32, b->n_opt, 0); }

static int cmp_float(const void *a, const void *b) {
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

// Median time in microseconds of TIMING_RUNS launches after WARMUP_RUNS.
static double bench_time_us(BenchFn fn, const Bench *b) {
    cudaEvent_t e0, e1;
    cudaCheck(cudaEventCreate(&e0));
    cudaCheck(cudaEventCreate(&e1));
    for (int i = 0; i < WARMUP_RUNS; i++) fn(b);
    float ms[TIMING_RUNS];
    for (int i = 0; i < TIMING_RUNS; i++) {
        cudaCheck(cudaEventRecord(e0, 0));
        fn(b);
        cudaCheck(cudaEventRecord(e1, 0));
        cudaCheck(cudaEventSynchronize(e1));
        cudaCheck(cudaEventElapsedTime(&ms[i], e0, e1));
    }
    cudaCheck(cudaEventDestroy(e0));
    cudaCheck(cudaEventDestroy(e1));
    qsort(ms, TIMING_RUNS, sizeof(float), cmp_float);
    return 1e3 * 0.5 * (ms[TIMING_RUNS / 2 - 1] + ms[TIMING_RUNS / 2]);
}

static void bench_row(const char *name, const char *shape, double bytes, BenchFn fn, const Bench *b) {
    double us = bench_time_us(fn, b);
    double gbs = bytes / (us * 1e-6) / 1e9, roof_us = bytes / (ROOFLINE_GBS * 1e9) * 1e6;
    printf("%-26s %-30s %10.1f %10.1f %10.1f %10.0f %7.1f%%\n", name, shape, bytes / 1e6, roof_us, us, gbs,
           100.0 * gbs / ROOFLINE_GBS);
}

static void run_timing(void) {
    Bench b;
    memset(&b, 0, sizeof(b));
    b.N = 16384; b.d = 4096; b.F = 14336; b.V = 128256; b.Vc = 8192; b.Hq = 32; b.Hkv = 8; b.hd = 128;
    b.n_opt = (size_t)b.d * b.F;
    size_t Nd = (size_t)b.N * b.d, NF = (size_t)b.N * b.F, NV = (size_t)b.N * b.Vc;
    size_t qkv_row = (size_t)(b.Hq + 2 * b.Hkv) * b.hd;

    // Host-side inputs: tokens, their grouping, targets, the RoPE table.
    Rng rng = {2024};
    int32_t *tok = (int32_t *)mallocCheck((size_t)b.N * 4), *uniq = (int32_t *)mallocCheck((size_t)b.N * 4);
    int32_t *offs = (int32_t *)mallocCheck((size_t)(b.N + 1) * 4), *pos = (int32_t *)mallocCheck((size_t)b.N * 4);
    int32_t *tgt = (int32_t *)mallocCheck((size_t)b.N * 4);
    for (int n = 0; n < b.N; n++) {
        tok[n] = rng_int(&rng, b.V);
        tgt[n] = rng_int(&rng, b.Vc);
    }
    b.n_unique = group_tokens(tok, b.N, b.V, uniq, offs, pos);
    float *tab = (float *)mallocCheck((size_t)b.N * b.hd * 4);
    rope_table_fill(tab, b.N, b.hd, 500000.0f, ROPE_SCALING_LLAMA3, 8.0f, 1.0f, 4.0f, 8192);
    int32_t **ibufs[] = {&b.tokens, &b.uniq, &b.offsets, &b.positions, &b.targets};
    int32_t *ihost[] = {tok, uniq, offs, pos, tgt};
    size_t icount[] = {(size_t)b.N, (size_t)b.n_unique, (size_t)b.n_unique + 1, (size_t)b.N, (size_t)b.N};
    for (int i = 0; i < 5; i++) {
        cudaCheck(cudaMalloc((void **)ibufs[i], icount[i] * 4));
        cudaCheck(cudaMemcpy(*ibufs[i], ihost[i], icount[i] * 4, cudaMemcpyHostToDevice));
    }
    cudaCheck(cudaMalloc((void **)&b.cos_sin, (size_t)b.N * b.hd * 4));
    cudaCheck(cudaMemcpy(b.cos_sin, tab, (size_t)b.N * b.hd * 4, cudaMemcpyHostToDevice));

    b.embed = (bf16 *)bench_alloc(DT_BF16, (size_t)b.V * b.d, 1, -1.0f, 1.0f);
    b.dembed = (float *)bench_alloc(DT_FP32, (size_t)b.V * b.d, 2, -1.0f, 1.0f);
    b.x = (bf16 *)bench_alloc(DT_BF16, Nd, 3, -2.0f, 2.0f);
    b.y = (bf16 *)bench_alloc(DT_BF16, Nd, 4, -2.0f, 2.0f);
    b.dx = (bf16 *)bench_alloc(DT_BF16, Nd, 5, -1.0f, 1.0f);
    b.dy = (bf16 *)bench_alloc(DT_BF16, Nd, 6, -1.0f, 1.0f);
    b.w = (bf16 *)bench_alloc(DT_BF16, (size_t)b.d, 7, 0.5f, 1.5f);
    b.rstd = (float *)bench_alloc(DT_FP32, (size_t)b.N, 8, 0.5f, 1.5f);
    b.scratch = (float *)bench_alloc(DT_FP32, (size_t)ceil_div(b.N, rmsnorm_rows_per_block()) * b.d, 9, 0.0f, 1.0f);
    b.dw = (float *)bench_alloc(DT_FP32, (size_t)b.d, 10, -1.0f, 1.0f);
    b.qkv = (bf16 *)bench_alloc(DT_BF16, (size_t)b.N * qkv_row, 11, -2.0f, 2.0f);
    b.gate_up = (bf16 *)bench_alloc(DT_BF16, 2 * NF, 12, -4.0f, 4.0f);
    b.h = (bf16 *)bench_alloc(DT_BF16, NF, 13, -1.0f, 1.0f);
    b.dh = (bf16 *)bench_alloc(DT_BF16, NF, 14, -1.0f, 1.0f);
    b.logits = (float *)bench_alloc(DT_FP32, NV, 15, -10.0f, 10.0f);
    b.dlogits = (bf16 *)bench_alloc(DT_BF16, NV, 16, -1.0f, 1.0f);
    b.lse = (float *)bench_alloc(DT_FP32, (size_t)b.N, 17, 9.0f, 11.0f);
    b.losses = (float *)bench_alloc(DT_FP32, (size_t)b.N, 18, 0.0f, 10.0f);
    b.out = (float *)bench_alloc(DT_FP32, 1, 19, 0.0f, 1.0f);
    b.big_f32 = (float *)bench_alloc(DT_FP32, b.n_opt, 20, -1.0f, 1.0f);
    b.big_bf16 = (bf16 *)bench_alloc(DT_BF16, b.n_opt, 21, -1.0f, 1.0f);
    b.p_bf16 = (bf16 *)bench_alloc(DT_BF16, b.n_opt, 22, -1.0f, 1.0f);
    b.master = (float *)bench_alloc(DT_FP32, b.n_opt, 23, -1.0f, 1.0f);
    b.g_f32 = (float *)bench_alloc(DT_FP32, b.n_opt, 24, -1.0f, 1.0f);
    b.m_f32 = (float *)bench_alloc(DT_FP32, b.n_opt, 25, -0.1f, 0.1f);
    b.v_f32 = (float *)bench_alloc(DT_FP32, b.n_opt, 26, 1e-4f, 1e-2f);
    b.g_bf16 = (bf16 *)bench_alloc(DT_BF16, b.n_opt, 27, -1.0f, 1.0f);
    b.m_bf16 = (bf16 *)bench_alloc(DT_BF16, b.n_opt, 28, -0.1f, 0.1f);
    b.v_bf16 = (bf16 *)bench_alloc(DT_BF16, b.n_opt, 29, 1e-4f, 1e-2f);
    b.partials = (float *)bench_alloc(DT_FP32, (size_t)grad_norm_partials(), 30, 0.0f, 0.0f);
    size_t n_opt_blocks = adam8_blocks(b.n_opt);
    cudaCheck(cudaMalloc((void **)&b.m_codes, n_opt_blocks * ADAM8_BLOCK));
    cudaCheck(cudaMalloc((void **)&b.v_codes, n_opt_blocks * ADAM8_BLOCK));
    cudaCheck(cudaMemset(b.m_codes, 0x90, n_opt_blocks * ADAM8_BLOCK));
    cudaCheck(cudaMemset(b.v_codes, 0x90, n_opt_blocks * ADAM8_BLOCK));
    b.m_absmax = (float *)bench_alloc(DT_FP32, n_opt_blocks, 31, 0.01f, 0.1f);
    b.v_absmax = (float *)bench_alloc(DT_FP32, n_opt_blocks, 32, 1e-4f, 1e-2f);
    cudaCheck(cudaMalloc((void **)&b.row_max, (size_t)b.N * 4));
    cudaCheck(cudaMalloc((void **)&b.row_sum, (size_t)b.N * 4));
    cudaCheck(cudaMalloc((void **)&b.tlogit, (size_t)b.N * 4));
    ce_state_init(b.row_max, b.row_sum, b.tlogit, b.N, 0);
    cudaCheck(cudaDeviceSynchronize());

    double N = b.N, d = b.d, F = b.F, Vc = b.Vc, nopt = (double)b.n_opt, U = b.n_unique;
    double qk = N * (b.Hq + b.Hkv) * b.hd;
    char s_nd[32], s_nf[32], s_nv[32], s_opt[32], s_qkv[32], s_emb[32];
    snprintf(s_nd, sizeof(s_nd), "N=%d d=%d", b.N, b.d);
    snprintf(s_nf, sizeof(s_nf), "N=%d F=%d", b.N, b.F);
    snprintf(s_nv, sizeof(s_nv), "N=%d Vc=%d", b.N, b.Vc);
    snprintf(s_opt, sizeof(s_opt), "n=%zu (d x F)", b.n_opt);
    snprintf(s_qkv, sizeof(s_qkv), "N=%d H=%d/%d hd=%d", b.N, b.Hq, b.Hkv, b.hd);
    snprintf(s_emb, sizeof(s_emb), "N=%d d=%d unique=%d", b.N, b.d, b.n_unique);
    printf("\nTiming (median of %d runs after %d warm-up; bytes = inputs read once + outputs written once; "
           "roofline %.1f TB/s)\n", TIMING_RUNS, WARMUP_RUNS, ROOFLINE_GBS / 1e3);
    printf("%-26s %-30s %10s %10s %10s %10s %8s\n", "kernel", "shape", "MB", "roof_us", "time_us", "GB/s", "%roof");
    bench_row("embedding_forward", s_nd, N * 4 + 2 * N * d * 2, b_embedding_forward, &b);
    bench_row("embedding_backward fp32", s_emb, N * d * 2 + U * d * 8 + (2 * U + 1 + N) * 4, b_embedding_backward, &b);
    bench_row("rmsnorm_forward", s_nd, 2 * N * d * 2 + d * 2 + N * 4, b_rmsnorm_forward, &b);
    bench_row("rmsnorm_backward", s_nd, 3 * N * d * 2 + d * 2 + N * 4 + d * 8, b_rmsnorm_backward, &b);
    bench_row("rope_apply", s_qkv, 2 * qk * 2 + N * b.hd * 4, b_rope, &b);
    bench_row("glu_forward silu", s_nf, 3 * N * F * 2, b_glu_forward, &b);
    bench_row("glu_backward silu inplace", s_nf, 5 * N * F * 2, b_glu_backward, &b);
    bench_row("residual_add", s_nd, 3 * N * d * 2, b_residual_add, &b);
    bench_row("cast_fp32_to_bf16", s_opt, nopt * 6, b_cast_to_bf16, &b);
    bench_row("cast_bf16_to_fp32", s_opt, nopt * 6, b_cast_to_fp32, &b);
    bench_row("accumulate_into fp32", s_opt, nopt * 10, b_accumulate_f32, &b);
    bench_row("ce_online_update", s_nv, N * Vc * 4 + N * 4 * 6, b_ce_online, &b);
    bench_row("ce_online_update cap=30", s_nv, N * Vc * 4 + N * 4 * 6, b_ce_online_cap, &b);
    bench_row("ce_finalize", s_nv, N * 4 * 6, b_ce_finalize, &b);
    bench_row("ce_backward_tile", s_nv, N * Vc * 6 + N * 8, b_ce_backward, &b);
    bench_row("sum_reduce", s_nv, N * 4 + 4, b_sum_reduce, &b);
    bench_row("adamw bf16 g/m/v, sr", s_opt, nopt * 14, b_adamw_bf16_sr, &b);
    bench_row("adamw fp32 g/m/v + master", s_opt, nopt * 30, b_adamw_fp32_master, &b);
    bench_row("adamw g fp32 m/v bf16 +norm", s_opt, nopt * 16, b_adamw_model, &b);
    bench_row("adamw8bit g fp32, sr +norm", s_opt, nopt * 12 + nopt / ADAM8_BLOCK * 16, b_adamw8bit_sr, &b);
    bench_row("grad_norm_accumulate fp32", s_opt, nopt * 4, b_grad_norm, &b);

    void *dev_ptrs[] = {b.tokens, b.targets, b.uniq, b.offsets, b.positions, b.embed, b.x, b.y, b.dx, b.dy, b.w,
                        b.qkv, b.gate_up, b.h, b.dh, b.dlogits, b.rstd, b.scratch, b.dw, b.cos_sin, b.logits,
                        b.row_max, b.row_sum, b.tlogit, b.lse, b.losses, b.out, b.dembed, b.big_f32, b.partials,
                        b.big_bf16, b.p_bf16, b.master, b.g_f32, b.m_f32, b.v_f32, b.g_bf16, b.m_bf16, b.v_bf16,
                        b.m_codes, b.v_codes, b.m_absmax, b.v_absmax};
    for (size_t i = 0; i < sizeof(dev_ptrs) / sizeof(dev_ptrs[0]); i++) cudaCheck(cudaFree(dev_ptrs[i]));
    free(tok); free(uniq); free(offs); free(pos); free(tgt); free(tab);
}

// ---------------------------------------------------------------------------------------------

static void run_gpu_tests(TestReport *rep) {
    print_table_header();
    test_embedding_forward(rep, 37, 4099, 1000, 1.0f, 1);
    test_embedding_forward(rep, 4096, 4096, 5000, 64.0f, 2);
    test_embedding_forward(rep, 45, 24, 7, 1.5f, 3);
    test_embedding_backward(rep, 37, 4099, 50, DT_FP32, 1.0f, 4);
    test_embedding_backward(rep, 4096, 4096, 5000, DT_FP32, 64.0f, 5);
    test_embedding_backward(rep, 1000, 264, 3, DT_BF16, 1.0f, 6);
    test_embedding_backward(rep, 37, 4099, 50, DT_BF16, 0.5f, 7);

    test_rmsnorm_forward(rep, 37, 4099, 0.0f, 10);
    test_rmsnorm_forward(rep, 4096, 4096, 0.0f, 11);
    test_rmsnorm_forward(rep, 37, 4104, 1.0f, 12);
    test_rmsnorm_forward(rep, 5, 20, 1.0f, 13);
    test_rmsnorm_backward(rep, 37, 4099, 0.0f, 0, 20);
    test_rmsnorm_backward(rep, 4096, 4096, 0.0f, 1, 21);
    test_rmsnorm_backward(rep, 45, 4104, 1.0f, 0, 22);
    test_rmsnorm_backward(rep, 41, 16392, 0.0f, 1, 23);
    test_rmsnorm_backward(rep, 3, 20, 1.0f, 1, 24);

    test_rope(rep, 26, 13, 5, 4, 2, 64, 0, 30);
    test_rope(rep, 37, 37, 0, 3, 1, 36, 0, 31);
    test_rope(rep, 512, 256, 100, 32, 8, 128, 0, 32);
    test_rope(rep, 512, 256, 100, 32, 8, 128, 1, 33);
    test_rope(rep, 37, 37, 3, 3, 1, 36, 1, 34);

    test_glu(rep, 37, 4099, ACT_SILU, 40);
    test_glu(rep, 37, 4099, ACT_GELU_TANH, 41);
    test_glu(rep, 512, 4096, ACT_SILU, 42);
    test_glu(rep, 512, 4096, ACT_GELU_TANH, 43);
    test_glu(rep, 9, 20, ACT_SILU, 44);

    test_residual_add(rep, (size_t)37 * 4099, 0, 0, 50);
    test_residual_add(rep, (size_t)4096 * 4096, 0, 0, 51);
    test_residual_add(rep, (size_t)37 * 4099, 2, 0, 52);
    test_residual_add(rep, 4096, 0, 6, 53);
    test_casts(rep, (size_t)37 * 4099, 0, 54);
    test_casts(rep, (size_t)1 << 20, 0, 55);
    test_casts(rep, 1000, 1, 56);
    test_random_fill(rep, (size_t)1 << 20, 61, 0, 0);
    test_random_fill(rep, 4099, 62, 12345, 1);
    test_accumulate_into(rep, (size_t)37 * 4099, DT_FP32, 0, 57);
    test_accumulate_into(rep, (size_t)37 * 4099, DT_BF16, 0, 58);
    test_accumulate_into(rep, (size_t)1 << 20, DT_BF16, 0, 59);
    test_accumulate_into(rep, 1003, DT_FP32, 1, 60);

    test_cross_entropy(rep, 37, 1000, 333, 0.0f, 70);
    test_cross_entropy(rep, 37, 1000, 333, 30.0f, 71);
    test_cross_entropy(rep, 64, 32000, 8192, 0.0f, 72);
    test_cross_entropy(rep, 64, 32000, 8192, 30.0f, 73);
    test_cross_entropy(rep, 5, 7, 8, 0.0f, 74);
    test_sum_reduce(rep, 37, 75);
    test_sum_reduce(rep, 100003, 76);

    test_adamw(rep, (size_t)37 * 4099, DT_FP32, DT_FP32, 1, 0, 0, 80);
    test_adamw(rep, (size_t)37 * 4099, DT_BF16, DT_BF16, 0, 0, 1, 81);
    test_adamw(rep, (size_t)1 << 20, DT_FP32, DT_BF16, 0, 0, 1, 82);
    test_adamw(rep, (size_t)1 << 20, DT_BF16, DT_FP32, 1, 0, 0, 83);
    test_adamw(rep, 1003, DT_FP32, DT_FP32, 0, 1, 1, 84);
    test_adamw_stochastic(rep, 100000);
    test_adamw8bit(rep, (size_t)37 * 4099, DT_FP32, 0, 0, 0, 85);
    test_adamw8bit(rep, (size_t)37 * 4099, DT_BF16, 1, 0, 1, 86);
    test_adamw8bit(rep, (size_t)1 << 20, DT_FP32, 1, 0, 0, 87);
    test_adamw8bit(rep, (size_t)1 << 20, DT_FP32, 0, 0, 1, 93);
    test_adamw8bit(rep, 1003, DT_BF16, 0, 3, 1, 88);
    test_adamw8bit(rep, 256, DT_FP32, 1, 1, 0, 89);
    test_adamw8bit(rep, 5, DT_FP32, 0, 0, 1, 92);
    test_grad_norm(rep, (size_t)37 * 4099, (size_t)1 << 20, 0, 90);
    test_grad_norm(rep, 1003, 77777, 3, 91);
}

int main(int argc, char **argv) {
    int timing = 1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--no-timing") == 0) timing = 0;
        else die("usage: %s [--no-timing]", argv[0]);
    }
    TestReport rep = {0, 0};
    printf("Host checks\n");
    print_table_header();
    test_rope_table(&rep, 300, 64, 10000.0f, ROPE_SCALING_NONE);
    test_rope_table(&rep, 4096, 128, 500000.0f, ROPE_SCALING_LLAMA3);
    if (cuda_device_count() == 0) {
        printf("\nno GPU: kernel tests SKIPPED (only the %d host checks ran)\n", rep.passed + rep.failed);
        return test_report_finish(&rep, "test_kernels");
    }
    cudaDeviceProp prop;
    cudaCheck(cudaGetDeviceProperties(&prop, 0));
    printf("\nKernel checks on %s (sm_%d%d)\n", prop.name, prop.major, prop.minor);
    run_gpu_tests(&rep);
    printf("\n%d checks, %d failed\n", rep.passed + rep.failed, rep.failed);
    if (timing && rep.failed == 0) run_timing();
    return test_report_finish(&rep, "test_kernels");
}

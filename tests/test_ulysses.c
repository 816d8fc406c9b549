// Tests of ulysses.h: the head assignment against a naive one built from the GQA rule (which kv
// head each query head reads), the holders of every head, pack/unpack as inverses (replicated kv
// heads summed), the refused head counts, and a CPU simulation of sequence-parallel attention:
// R simulated ranks each hold S/R tokens, apply RoPE at their offset, pack, exchange (the
// all-to-all, as comm.cu does it with NCCL), run the CPU reference attention on their heads over
// all S tokens, exchange back and unpack; forward outputs and the q/k/v gradients (after the
// inverse RoPE) must equal one process's attention over the whole sequence.
//
// Build: gcc -O2 -Wall -Wextra -fopenmp -I. tests/test_ulysses.c -o build/test_ulysses -lm
#include "cpu_model.h"
#include "mst.h"
#include "ulysses.h"
#include "tests/test_util.h"

static TestReport g_report = {0, 0};
static uint64_t g_rng = 0x9E3779B97F4A7C15ULL;

static float rnd(void) {
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static float *rand_array(size_t n) {
    float *a = (float *)mallocCheck(n * sizeof(float));
    for (size_t i = 0; i < n; i++) a[i] = rnd();
    return a;
}

// ---- head assignment ----

// Rank p's heads, built from the rule: query heads [p Hq/R, (p+1) Hq/R), then the kv heads those
// query heads read (h / (Hq / Hkv)) in ascending order without repeats, as k heads, then v heads.
static int naive_heads(int R, int Hq, int Hkv, int p, int *out) {
    int n = 0, hq = Hq / R, group = Hq / Hkv, kv[64], nkv = 0;
    for (int i = 0; i < hq; i++) {
        int h = p * hq + i, g = h / group;
        out[n++] = h;
        if (nkv == 0 || kv[nkv - 1] != g) kv[nkv++] = g;
    }
    for (int i = 0; i < nkv; i++) out[n++] = Hq + kv[i];
    for (int i = 0; i < nkv; i++) out[n++] = Hq + Hkv + kv[i];
    return n;
}

static void test_heads(int R, int Hq, int Hkv) {
    UlyssesHeads u;
    char buf[256];
    int ok = ulysses_heads_init(&u, R, Hq, Hkv, 8, buf, sizeof(buf)) == NULL;
    int Hl = ok ? ulysses_local_heads(&u, 1) : 0, H = Hq + 2 * Hkv;
    for (int p = 0; p < R && ok; p++) {
        int want[64];
        int n = naive_heads(R, Hq, Hkv, p, want);
        ok &= n == Hl;
        for (int j = 0; j < Hl && ok; j++) ok &= ulysses_global_head(&u, p, j) == want[j];
        // GQA stays local: local query head i reads local kv head i / (hq_loc / hkv_loc), which is
        // the kv head that global query head p hq_loc + i reads
        for (int i = 0; i < u.hq_loc && ok; i++) {
            int local_kv = i / (u.hq_loc / u.hkv_loc);
            ok &= ulysses_global_head(&u, p, u.hq_loc + local_kv) - Hq == (p * u.hq_loc + i) / (Hq / Hkv);
        }
    }
    for (int g = 0; g < H && ok; g++) {  // holders == every (p, j) that maps to g
        int p0, j, n = ulysses_holders(&u, g, &p0, &j), count = 0;
        for (int p = 0; p < R; p++)
            for (int jj = 0; jj < Hl; jj++)
                if (ulysses_global_head(&u, p, jj) == g) {
                    ok &= p >= p0 && p < p0 + n && jj == j;
                    count++;
                }
        ok &= count == n;
    }
    // pack then unpack: q heads back as they were, kv heads times the replication
    int rows = 5, hd = 8;
    float *x = rand_array((size_t)rows * H * hd);
    float *send = (float *)mallocCheck((size_t)R * rows * Hl * hd * sizeof(float));
    float *back = (float *)mallocCheck((size_t)rows * H * hd * sizeof(float));
    if (ok) {
        ulysses_pack_cpu(send, x, rows, &u, 1);
        ulysses_unpack_cpu(back, send, rows, &u, 1);
        for (int r = 0; r < rows; r++)
            for (int g = 0; g < H; g++)
                for (int t = 0; t < hd; t++) {
                    size_t i = ((size_t)r * H + g) * hd + t;
                    ok &= back[i] == x[i] * (g < Hq ? 1.0f : (float)u.kv_rep);
                }
    }
    free(x);
    free(send);
    free(back);
    char what[160];
    snprintf(what, sizeof(what), "R=%d Hq=%d Hkv=%d (kv_rep %d): heads = GQA rule, holders, pack/unpack inverse", R, Hq, Hkv, ok ? u.kv_rep : 0);
    test_check(&g_report, ok, what);
}

static void test_refused(int R, int Hq, int Hkv) {
    UlyssesHeads u;
    char buf[256];
    const char *m = ulysses_heads_init(&u, R, Hq, Hkv, 8, buf, sizeof(buf));
    char what[160];
    snprintf(what, sizeof(what), "R=%d Hq=%d Hkv=%d refused with a message", R, Hq, Hkv);
    test_check(&g_report, m != NULL && (strstr(m, "split evenly") || strstr(m, "bad shape")), what);
    if (m) printf("    %s\n", m);
}

// ---- CPU simulation of sequence-parallel attention ----

typedef struct { int B, S, R, Hq, Hkv, hd, window; float softcap; } SimCase;

// heads[p] (B*S, F) <- chunk p of every rank q's send[q] (R chunks of (B*S_l, F)): rank q's tokens
// land at rows (b, q*S_l + s). The all-to-all that ulysses_to_heads does with NCCL.
static void exchange_to_heads(float **heads, float **send, int B, int S, int R, int F) {
    int Sl = S / R;
    for (int p = 0; p < R; p++)
        for (int q = 0; q < R; q++)
            for (int b = 0; b < B; b++)
                memcpy(heads[p] + ((size_t)b * S + (size_t)q * Sl) * F, send[q] + ((size_t)p * B * Sl + (size_t)b * Sl) * F,
                       (size_t)Sl * F * sizeof(float));
}

// recv[q] chunk p (B*S_l, F) <- rows (b, q*S_l + s) of heads[p]: the way back (ulysses_from_heads).
static void exchange_from_heads(float **recv, float **heads, int B, int S, int R, int F) {
    int Sl = S / R;
    for (int q = 0; q < R; q++)
        for (int p = 0; p < R; p++)
            for (int b = 0; b < B; b++)
                memcpy(recv[q] + ((size_t)p * B * Sl + (size_t)b * Sl) * F, heads[p] + ((size_t)b * S + (size_t)q * Sl) * F,
                       (size_t)Sl * F * sizeof(float));
}

// dst (n, a + b + c) rows <- [x (n, a) | y (n, b) | z (n, c)], and the inverse.
static void fuse3(float *dst, const float *x, const float *y, const float *z, size_t n, int a, int b, int c) {
    for (size_t r = 0; r < n; r++) {
        float *d = dst + r * (size_t)(a + b + c);
        memcpy(d, x + r * a, (size_t)a * sizeof(float));
        memcpy(d + a, y + r * b, (size_t)b * sizeof(float));
        memcpy(d + a + b, z + r * c, (size_t)c * sizeof(float));
    }
}
static void split3(float *x, float *y, float *z, const float *src, size_t n, int a, int b, int c) {
    for (size_t r = 0; r < n; r++) {
        const float *s = src + r * (size_t)(a + b + c);
        memcpy(x + r * a, s, (size_t)a * sizeof(float));
        memcpy(y + r * b, s + a, (size_t)b * sizeof(float));
        memcpy(z + r * c, s + a + b, (size_t)c * sizeof(float));
    }
}

// Rows (b, p*S_l + s) of full (B*S, w) -> part (B*S_l, w), or back when to_full.
static void rows_of_rank(float *part, float *full, int B, int S, int R, int p, int w, int to_full) {
    int Sl = S / R;
    for (int b = 0; b < B; b++) {
        float *f = full + ((size_t)b * S + (size_t)p * Sl) * w, *q = part + (size_t)b * Sl * w;
        if (to_full) memcpy(f, q, (size_t)Sl * w * sizeof(float));
        else memcpy(q, f, (size_t)Sl * w * sizeof(float));
    }
}

// This rank's q, k, v rows (B*S_l of them) with RoPE at positions p*S_l + s, fused (rows, F).
static void local_qkv(float *lqkv, const float *q, const float *k, const float *v, const float *cos_t, const float *sin_t,
                      int B, int S, int R, int p, int Hq, int Hkv, int hd) {
    int Sl = S / R, qd = Hq * hd, kvd = Hkv * hd;
    size_t Nl = (size_t)B * Sl, at = (size_t)p * Sl * (hd / 2);
    float *lq = (float *)mallocCheck(Nl * qd * sizeof(float)), *lk = (float *)mallocCheck(Nl * kvd * sizeof(float));
    float *lv = (float *)mallocCheck(Nl * kvd * sizeof(float));
    rows_of_rank(lq, (float *)q, B, S, R, p, qd, 0);
    rows_of_rank(lk, (float *)k, B, S, R, p, kvd, 0);
    rows_of_rank(lv, (float *)v, B, S, R, p, kvd, 0);
    cpu_rope_apply(lq, cos_t + at, sin_t + at, B, Sl, Hq, hd, 1.0f);
    cpu_rope_apply(lk, cos_t + at, sin_t + at, B, Sl, Hkv, hd, 1.0f);
    fuse3(lqkv, lq, lk, lv, Nl, qd, kvd, kvd);
    free(lq);
    free(lk);
    free(lv);
}

static float **rank_buffers(int R, size_t n) {
    float **b = (float **)mallocCheck((size_t)R * sizeof(float *));
    for (int p = 0; p < R; p++) b[p] = (float *)callocCheck(n, sizeof(float));
    return b;
}

static void free_rank_buffers(float **b, int R) {
    for (int p = 0; p < R; p++) free(b[p]);
    free(b);
}

static void simulate(SimCase k) {
    int B = k.B, S = k.S, R = k.R, Hq = k.Hq, Hkv = k.Hkv, hd = k.hd, Sl = S / R, half = hd / 2;
    int qd = Hq * hd, kvd = Hkv * hd, F = qd + 2 * kvd;
    size_t N = (size_t)B * S, Nl = (size_t)B * Sl;
    ModelConfig c;
    preset_base(&c, FAMILY_LLAMA, 16, Hq * hd, 1, Hq, Hkv, hd, 16, S, 1e-5f, 10000.0f);
    float scale = 1.0f / sqrtf((float)hd);
    float *cos_t = (float *)mallocCheck((size_t)S * half * sizeof(float)), *sin_t = (float *)mallocCheck((size_t)S * half * sizeof(float));
    cpu_rope_tables(cos_t, sin_t, &c, S);
    float *q = rand_array(N * qd), *kk = rand_array(N * kvd), *v = rand_array(N * kvd), *dout = rand_array(N * qd);
    float *dscores = (float *)mallocCheck((size_t)B * Hq * S * S * sizeof(float));

    // one process: RoPE, attention, backward, inverse RoPE on the gradients
    float *qr = (float *)mallocCheck(N * qd * sizeof(float)), *kr = (float *)mallocCheck(N * kvd * sizeof(float));
    memcpy(qr, q, N * qd * sizeof(float));
    memcpy(kr, kk, N * kvd * sizeof(float));
    cpu_rope_apply(qr, cos_t, sin_t, B, S, Hq, hd, 1.0f);
    cpu_rope_apply(kr, cos_t, sin_t, B, S, Hkv, hd, 1.0f);
    float *out_ref = (float *)mallocCheck(N * qd * sizeof(float)), *probs = (float *)mallocCheck((size_t)B * Hq * S * S * sizeof(float));
    float *dq_ref = (float *)mallocCheck(N * qd * sizeof(float)), *dk_ref = (float *)mallocCheck(N * kvd * sizeof(float));
    float *dv_ref = (float *)mallocCheck(N * kvd * sizeof(float));
    cpu_attention_forward(out_ref, probs, qr, kr, v, B, S, Hq, Hkv, hd, scale, k.softcap, k.window);
    cpu_attention_backward(dq_ref, dk_ref, dv_ref, dscores, dout, probs, qr, kr, v, B, S, Hq, Hkv, hd, scale, k.softcap, k.window);
    cpu_rope_apply(dq_ref, cos_t, sin_t, B, S, Hq, hd, -1.0f);
    cpu_rope_apply(dk_ref, cos_t, sin_t, B, S, Hkv, hd, -1.0f);

    // R ranks, each with its S/R tokens
    UlyssesHeads u;
    char buf[256];
    if (ulysses_heads_init(&u, R, Hq, Hkv, hd, buf, sizeof(buf))) die("%s", buf);
    int hql = u.hq_loc, hkvl = u.hkv_loc, Fl = ulysses_local_heads(&u, 1) * hd, Ol = hql * hd;
    float **send = rank_buffers(R, N * Fl), **heads = rank_buffers(R, N * Fl), **oh = rank_buffers(R, N * Ol);
    float **recv = rank_buffers(R, N * Fl), **dheads = rank_buffers(R, N * Ol), **dqkv_h = rank_buffers(R, N * Fl);
    float **pr = rank_buffers(R, (size_t)B * hql * S * S);
    float *lqkv = (float *)mallocCheck(Nl * F * sizeof(float)), *lo = (float *)mallocCheck(Nl * qd * sizeof(float));
    float *hq = (float *)mallocCheck(N * Ol * sizeof(float)), *hk = (float *)mallocCheck(N * hkvl * hd * sizeof(float));
    float *hv = (float *)mallocCheck(N * hkvl * hd * sizeof(float)), *hdq = (float *)mallocCheck(N * Ol * sizeof(float));
    float *hdk = (float *)mallocCheck(N * hkvl * hd * sizeof(float)), *hdv = (float *)mallocCheck(N * hkvl * hd * sizeof(float));
    float *out_sp = (float *)mallocCheck(N * qd * sizeof(float)), *dq_sp = (float *)mallocCheck(N * qd * sizeof(float));
    float *dk_sp = (float *)mallocCheck(N * kvd * sizeof(float)), *dv_sp = (float *)mallocCheck(N * kvd * sizeof(float));
    float *lq = (float *)mallocCheck(Nl * qd * sizeof(float)), *lk = (float *)mallocCheck(Nl * kvd * sizeof(float));
    float *lv = (float *)mallocCheck(Nl * kvd * sizeof(float));

    // forward: pack, to the head layout, attention on this rank's heads over all S tokens, back, unpack
    for (int p = 0; p < R; p++) {
        local_qkv(lqkv, q, kk, v, cos_t, sin_t, B, S, R, p, Hq, Hkv, hd);
        ulysses_pack_cpu(send[p], lqkv, (int)Nl, &u, 1);
    }
    exchange_to_heads(heads, send, B, S, R, Fl);
    for (int p = 0; p < R; p++) {
        split3(hq, hk, hv, heads[p], N, Ol, hkvl * hd, hkvl * hd);
        cpu_attention_forward(oh[p], pr[p], hq, hk, hv, B, S, hql, hkvl, hd, scale, k.softcap, k.window);
    }
    exchange_from_heads(recv, oh, B, S, R, Ol);
    for (int p = 0; p < R; p++) {
        ulysses_unpack_cpu(lo, recv[p], (int)Nl, &u, 0);
        rows_of_rank(lo, out_sp, B, S, R, p, qd, 1);
    }

    // backward: this rank's output gradient to the head layout, attention backward, back, unpack
    // (summing the replicas of kv heads), inverse RoPE at this rank's positions
    for (int p = 0; p < R; p++) {
        rows_of_rank(lo, dout, B, S, R, p, qd, 0);
        ulysses_pack_cpu(send[p], lo, (int)Nl, &u, 0);
    }
    exchange_to_heads(dheads, send, B, S, R, Ol);
    for (int p = 0; p < R; p++) {
        split3(hq, hk, hv, heads[p], N, Ol, hkvl * hd, hkvl * hd);
        cpu_attention_backward(hdq, hdk, hdv, dscores, dheads[p], pr[p], hq, hk, hv, B, S, hql, hkvl, hd, scale, k.softcap, k.window);
        fuse3(dqkv_h[p], hdq, hdk, hdv, N, Ol, hkvl * hd, hkvl * hd);
    }
    exchange_from_heads(recv, dqkv_h, B, S, R, Fl);
    for (int p = 0; p < R; p++) {
        size_t at = (size_t)p * Sl * half;
        ulysses_unpack_cpu(lqkv, recv[p], (int)Nl, &u, 1);
        split3(lq, lk, lv, lqkv, Nl, qd, kvd, kvd);
        cpu_rope_apply(lq, cos_t + at, sin_t + at, B, Sl, Hq, hd, -1.0f);
        cpu_rope_apply(lk, cos_t + at, sin_t + at, B, Sl, Hkv, hd, -1.0f);
        rows_of_rank(lq, dq_sp, B, S, R, p, qd, 1);
        rows_of_rank(lk, dk_sp, B, S, R, p, kvd, 1);
        rows_of_rank(lv, dv_sp, B, S, R, p, kvd, 1);
    }

    char title[160];
    snprintf(title, sizeof(title), "%d ranks vs one: B=%d S=%d Hq=%d Hkv=%d (kv_rep %d) window %d softcap %g", R, B, S, Hq, Hkv,
             u.kv_rep, k.window, k.softcap);
    test_table_header(title);
    test_compare_f32(&g_report, "attention output", out_sp, out_ref, N * qd, 1e-6);
    test_compare_f32(&g_report, "dq (after inverse RoPE)", dq_sp, dq_ref, N * qd, 1e-6);
    test_compare_f32(&g_report, "dk (after inverse RoPE)", dk_sp, dk_ref, N * kvd, 1e-5);
    test_compare_f32(&g_report, "dv", dv_sp, dv_ref, N * kvd, 1e-5);

    float *all[] = {cos_t, sin_t, q, kk, v, dout, dscores, qr, kr, out_ref, probs, dq_ref, dk_ref, dv_ref, lqkv, lo, hq, hk, hv,
                    hdq, hdk, hdv, out_sp, dq_sp, dk_sp, dv_sp, lq, lk, lv};
    for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++) free(all[i]);
    float **per_rank[] = {send, heads, oh, recv, dheads, dqkv_h, pr};
    for (size_t i = 0; i < sizeof(per_rank) / sizeof(per_rank[0]); i++) free_rank_buffers(per_rank[i], R);
}

int main(void) {
    printf("== head assignment\n");
    const int cases[][3] = {{1, 4, 2}, {2, 4, 2}, {2, 4, 4}, {4, 4, 2}, {4, 4, 1}, {2, 8, 2}, {4, 8, 8}, {8, 8, 2}, {8, 32, 8}, {16, 32, 8}};
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) test_heads(cases[i][0], cases[i][1], cases[i][2]);
    test_refused(3, 4, 2);
    test_refused(2, 6, 3);
    test_refused(8, 28, 4);
    test_refused(2, 4, 3);
    SimCase sims[] = {{2, 12, 2, 4, 2, 8, 0, 0.0f}, {2, 12, 4, 4, 2, 8, 0, 0.0f}, {1, 12, 4, 4, 1, 8, 0, 0.0f},
                      {2, 12, 2, 4, 4, 8, 5, 0.0f}, {2, 12, 4, 8, 2, 8, 0, 20.0f}};
    for (size_t i = 0; i < sizeof(sims) / sizeof(sims[0]); i++) simulate(sims[i]);
    return test_report_finish(&g_report, "test_ulysses");
}

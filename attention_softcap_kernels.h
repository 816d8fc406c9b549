// Bodies of the soft-capped attention kernels (attention_softcap.cu), written against a handful of
// primitives that the includer defines first, so that the same code runs on the GPU (attention_softcap.cu:
// PTX) and on the CPU warp emulator of dev/test_attention_softcap_emu.cu (every warp-level operation
// emulated from its PTX definition, shared memory checked for races and never-written reads):
//
//   SC_FN                                function qualifier of every body and helper below
//   SC_UNROLL                            "#pragma unroll" on the device, nothing on the host
//   int sc_tid(), sc_block_x(), sc_block_y(), sc_block_z()
//   void sc_sync()                       __syncthreads
//   float sc_shfl_xor(float v, int mask) full-warp butterfly shuffle
//   float sc_ex2(float x), sc_rcp(float x)               2^x and 1/x (approximate on the device)
//   uint32_t sc_pack_bf16x2(float lo, float hi)          round to bf16, lo in the low half
//   float sc_u32_as_float(uint32_t u)
//   void sc_ldmatrix_x4(uint32_t r[4], const char *row)       ldmatrix.sync.aligned.m8n8.x4.shared.b16
//   void sc_ldmatrix_x4_trans(uint32_t r[4], const char *row) the same with .trans
//   void sc_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
//                                        mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, c += a b
//   void sc_cp_async16(char *dst, const bf16 *src, int valid)  16 bytes to shared memory, zeros when !valid
//   void sc_cp_async_commit(), sc_cp_async_wait_all(), sc_cp_async_wait_1()   cp.async groups
//   void sc_st_shared_u32(char *p, uint32_t v)
//   uint32_t sc_ld_global_u32(const bf16 *p); float sc_ld_global_f32(const float *p)
//   void sc_st_global_u32(bf16 *p, uint32_t v); void sc_st_global_f32(float *p, float v)
//
// The math (scores x = q.k, t = tanh(scale x / cap), z = cap t, P = softmax of the visible z; natural-log
// stats lse = log sum exp z; backward with D_i = dO_i . O_i: dS = P (dP - D) (1 - t^2) scale) is
// computed in the base-2 domain: z log2(e) and lse log2(e), so that every exponential is one ex2.
// With u = 1 - t = 2 / (1 + exp(2 scale x / cap)), z log2(e) = cap log2(e) (1 - u) and 1 - t^2 = u (2 - u):
// one ex2 and one reciprocal per score, exact at both ends of tanh (u = 0 or 2) and without the
// cancellation of 1 - t^2 near |t| = 1.
//
// Tensor cores: bf16 mma.sync m16n8k16 with fp32 accumulation; operands staged in shared memory with
// cp.async, rows padded by 8 elements (16 bytes) so that the 8 rows an ldmatrix reads fall in 8
// different 4-bank groups. The head dim is padded to the tile HD (64, 128 or 256) with zeros.
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane / 4, t = lane % 4):
//   A (16 x 16): a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, cols 2t, 2t+1), a[2] = (row g, cols
//                2t+8, 2t+9), a[3] = (row g+8, cols 2t+8, 2t+9)
//   B (16 x 8):  b0 = (rows 2t, 2t+1, col g), b1 = (rows 2t+8, 2t+9, col g)
//   C (16 x 8):  c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1)
// so the C fragments of two adjacent 8-column tiles, rounded to bf16, are the A fragment of the next
// product over those 16 columns (P V, dS K, ...).
//
// Layouts (attention.h): qkv / dqkv (B*S, C) bf16, C = (Hq + 2 Hkv) hd, row b*S + s = [q heads | k heads |
// v heads]; out / dout (B*S, Hq hd) bf16; stats (B, Hq, S) fp32; D (B, Hq, S) fp32 workspace.
#ifndef ATTENTION_SOFTCAP_KERNELS_H
#define ATTENTION_SOFTCAP_KERNELS_H

#include <math.h>
#include <stdint.h>
#include "attention.h"

#define SC_PAD 8             // bf16 elements of padding at the end of every shared-memory row
#define SC_BM 64             // queries of a forward or dQ block: 4 warps x 16 rows
#define SC_BN_FWD 64         // keys of one forward step
#define SC_BN_DQ 32          // keys of one dQ step
#define SC_BKV 64            // keys of a dK / dV block
#define SC_BQ_KV 64          // queries of one dK / dV step
#define SC_FWD_THREADS 128
#define SC_DQ_THREADS 128
#define SC_DKV_THREADS 256   // 8 warps
#define SC_DOT_THREADS 128   // 4 warps, one (row, head) each
#define SC_LOG2E 1.4426950408889634f
#define SC_LN2 0.6931471805599453f

// Everything a kernel reads: pointers (the forward writes out and stats, the backward reads them) and
// the shape with its derived constants.
typedef struct {
    const bf16 *qkv;
    bf16 *out;
    float *stats;
    const bf16 *dout;
    bf16 *dqkv;
    float *D;  // (B, Hq, S) workspace of the backward: dO_i . O_i
    int B, S, Hq, Hkv, hd, group, window;
    float scale;
    float tanh_arg;  // 2 scale log2(e) / cap: exp(2 scale x / cap) = ex2(x tanh_arg)
    float cap_log2;  // cap log2(e)
} ScParams;

SC_FN int sc_imin(int a, int b) { return a < b ? a : b; }
SC_FN int sc_imax(int a, int b) { return a > b ? a : b; }

// Whether query i sees key j (0 <= j): i < S, causal, and inside the window when there is one.
SC_FN int sc_visible(int i, int j, int S, int window) { return i < S && j <= i && (window == 0 || j > i - window); }

// Whether some (query, key) pair of the tile [q0, q0 + nq) x [k0, k0 + nk) is not visible (or out of range).
SC_FN int sc_tile_needs_mask(int q0, int nq, int k0, int nk, int S, int window) {
    return k0 + nk - 1 > q0 || q0 + nq > S || k0 + nk > S || (window > 0 && k0 < q0 + nq - window);
}

// 1 - tanh(scale x / cap) from the raw score x.
SC_FN float sc_one_minus_tanh(float x, float tanh_arg) { return 2.0f * sc_rcp(1.0f + sc_ex2(x * tanh_arg)); }

// Stages rows row0 .. row0 + rows - 1 of one head into shared memory dst [rows][HD + SC_PAD] with
// cp.async (the caller commits). src points at the head's first column in sequence row 0, rows ld
// elements apart; rows at or beyond S and columns at or beyond hd are zero-filled.
template <int HD>
SC_FN void sc_stage_rows(char *dst, const bf16 *src, size_t ld, int row0, int rows, int S, int hd, int nthreads) {
    const int chunks = HD / 8;
    for (int c = sc_tid(); c < rows * chunks; c += nthreads) {
        int r = c / chunks, col = (c % chunks) * 8, i = row0 + r;
        int valid = i < S && col < hd;
        sc_cp_async16(dst + ((size_t)r * (HD + SC_PAD) + col) * 2, valid ? src + (size_t)i * ld + col : src, valid);
    }
}

// A fragment of the 16 x 16 block at (row0, k0) of a row-major bf16 array with rows ld elements apart.
SC_FN void sc_load_a(uint32_t a[4], const char *base, int ld, int row0, int k0, int lane) {
    int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = k0 + (lane >> 4) * 8;
    sc_ldmatrix_x4(a, base + ((size_t)r * ld + c) * 2);
}

// B fragments of the two 8-column tiles n0.. and n0 + 8.. over k0 .. k0 + 15, from an array holding B
// transposed ([n][k], e.g. keys x head dims for Q K^T): b[0], b[1] for the first tile, b[2], b[3] for
// the second.
SC_FN void sc_load_b_nk(uint32_t b[4], const char *base, int ld, int n0, int k0, int lane) {
    int r = n0 + (lane & 7) + (lane >> 4) * 8, c = k0 + ((lane >> 3) & 1) * 8;
    sc_ldmatrix_x4(b, base + ((size_t)r * ld + c) * 2);
}

// The same two tiles from an array holding B itself ([k][n], e.g. keys x head dims for P V).
SC_FN void sc_load_b_kn(uint32_t b[4], const char *base, int ld, int k0, int n0, int lane) {
    int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8, c = n0 + (lane >> 4) * 8;
    sc_ldmatrix_x4_trans(b, base + ((size_t)r * ld + c) * 2);
}

// acc[N / 8][4] = the warp's 16 rows of A (rows row0.. of sa) times B^T (rows 0 .. N - 1 of sb) over HD:
// a 16 x N block of A B^T, both operands [rows][HD + SC_PAD] in shared memory.
template <int HD, int N>
SC_FN void sc_gemm_abt(float acc[N / 8][4], const char *sa, int row0, const char *sb, int n_row0, int lane) {
    SC_UNROLL
    for (int n = 0; n < N / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
    SC_UNROLL
    for (int k = 0; k < HD; k += 16) {
        uint32_t a[4];
        sc_load_a(a, sa, HD + SC_PAD, row0, k, lane);
        SC_UNROLL
        for (int n = 0; n < N; n += 16) {
            uint32_t b[4];
            sc_load_b_nk(b, sb, HD + SC_PAD, n_row0 + n, k, lane);
            sc_mma(acc[n / 8], a, b[0], b[1]);
            sc_mma(acc[n / 8 + 1], a, b[2], b[3]);
        }
    }
}

// A fragments over K columns from C fragments over K columns: frag[k / 16] from c[k / 8], c[k / 8 + 1].
template <int K>
SC_FN void sc_c_to_a(uint32_t frag[K / 16][4], const float c[K / 8][4]) {
    SC_UNROLL
    for (int k = 0; k < K / 16; k++) {
        frag[k][0] = sc_pack_bf16x2(c[2 * k][0], c[2 * k][1]);
        frag[k][1] = sc_pack_bf16x2(c[2 * k][2], c[2 * k][3]);
        frag[k][2] = sc_pack_bf16x2(c[2 * k + 1][0], c[2 * k + 1][1]);
        frag[k][3] = sc_pack_bf16x2(c[2 * k + 1][2], c[2 * k + 1][3]);
    }
}

// acc[N / 8][4] += (A fragments over K columns) times B (rows kb0 .. kb0 + K - 1, columns nb0 .. nb0 + N - 1
// of sb, a [k][ldb] shared-memory array).
template <int K, int N>
SC_FN void sc_gemm_frag_b(float acc[N / 8][4], const uint32_t frag[K / 16][4], const char *sb, int ldb, int kb0,
                          int nb0, int lane) {
    SC_UNROLL
    for (int k = 0; k < K; k += 16) {
        SC_UNROLL
        for (int n = 0; n < N; n += 16) {
            uint32_t b[4];
            sc_load_b_kn(b, sb, ldb, kb0 + k, nb0 + n, lane);
            sc_mma(acc[n / 8], frag[k / 16], b[0], b[1]);
            sc_mma(acc[n / 8 + 1], frag[k / 16], b[2], b[3]);
        }
    }
}

// acc[N / 8][4] += A (the warp's 16 rows row0.. of sa, a [rows][lda] array, over K columns) times B
// (rows 0 .. K - 1, columns nb0.. of sb, a [k][ldb] array).
template <int K, int N>
SC_FN void sc_gemm_ab(float acc[N / 8][4], const char *sa, int lda, int row0, const char *sb, int ldb, int nb0,
                      int lane) {
    SC_UNROLL
    for (int k = 0; k < K; k += 16) {
        uint32_t a[4];
        sc_load_a(a, sa, lda, row0, k, lane);
        SC_UNROLL
        for (int n = 0; n < N; n += 16) {
            uint32_t b[4];
            sc_load_b_kn(b, sb, ldb, k, nb0 + n, lane);
            sc_mma(acc[n / 8], a, b[0], b[1]);
            sc_mma(acc[n / 8 + 1], a, b[2], b[3]);
        }
    }
}

// Writes the warp's C fragments acc[N / 8][4] (rows r0 = row g and r0 + 8 of a 16-row block, columns
// c0 + 8 n + 2t) as bf16 to dst (row r at dst + r * ld), rows below S and columns below hd only, each
// value times mul[0] (rows g) or mul[1] (rows g + 8).
template <int N>
SC_FN void sc_store_rows(bf16 *dst, size_t ld, int r0, int c0, const float acc[N / 8][4], const float mul[2], int S,
                         int hd, int lane) {
    const int g = lane >> 2, t = lane & 3;
    SC_UNROLL
    for (int h = 0; h < 2; h++) {
        int r = r0 + g + 8 * h;
        if (r >= S) continue;
        SC_UNROLL
        for (int n = 0; n < N / 8; n++) {
            int c = c0 + n * 8 + 2 * t;
            if (c < hd)
                sc_st_global_u32(dst + (size_t)r * ld + c,
                                 sc_pack_bf16x2(acc[n][2 * h] * mul[h], acc[n][2 * h + 1] * mul[h]));
        }
    }
}

// ---- forward ----
// Block: (b, query head h, 64 queries), the heaviest (last) query tiles first; 4 warps x 16 queries.
// Loops over the visible 64-key tiles: S = Q K^T, soft-cap, mask, online softmax in fp32, O += P V.
// K of the next tile loads during P V, V of this tile during Q K^T and the softmax.
// Shared memory: Q [64][HD + 8], K [64][HD + 8], V [64][HD + 8] bf16.
template <int HD>
SC_FN void sc_forward_block(const ScParams &p, char *smem) {
    const int LD = HD + SC_PAD, S = p.S;
    char *sQ = smem, *sK = sQ + SC_BM * LD * 2, *sV = sK + SC_BN_FWD * LD * 2;
    const int tid = sc_tid(), warp = tid / 32, lane = tid % 32, t = lane & 3;
    const int q0 = ((S + SC_BM - 1) / SC_BM - 1 - sc_block_x()) * SC_BM, h = sc_block_y(), b = sc_block_z();
    const int kvh = h / p.group;
    const size_t C = (size_t)(p.Hq + 2 * p.Hkv) * p.hd;
    const bf16 *base = p.qkv + (size_t)b * S * C;
    const bf16 *gq = base + (size_t)h * p.hd, *gk = base + (size_t)(p.Hq + kvh) * p.hd;
    const bf16 *gv = base + (size_t)(p.Hq + p.Hkv + kvh) * p.hd;
    const int kt_begin = (p.window > 0 ? sc_imax(0, q0 - p.window + 1) : 0) / SC_BN_FWD;
    const int kt_end = (sc_imin(S, q0 + SC_BM) - 1) / SC_BN_FWD;
    sc_stage_rows<HD>(sQ, gq, C, q0, SC_BM, S, p.hd, SC_FWD_THREADS);
    sc_stage_rows<HD>(sK, gk, C, kt_begin * SC_BN_FWD, SC_BN_FWD, S, p.hd, SC_FWD_THREADS);
    sc_cp_async_commit();

    const int rows[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};
    float o[HD / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // m: max of z log2(e) so far
    SC_UNROLL
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    for (int kt = kt_begin; kt <= kt_end; kt++) {
        const int k0 = kt * SC_BN_FWD;
        sc_cp_async_wait_all();
        sc_sync();  // K(kt) is visible to every warp, and every warp is done with V(kt - 1)
        sc_stage_rows<HD>(sV, gv, C, k0, SC_BN_FWD, S, p.hd, SC_FWD_THREADS);
        sc_cp_async_commit();

        float s[SC_BN_FWD / 8][4];
        sc_gemm_abt<HD, SC_BN_FWD>(s, sQ, warp * 16, sK, 0, lane);
        const int masked = sc_tile_needs_mask(q0, SC_BM, k0, SC_BN_FWD, S, p.window);
        float mx[2] = {-INFINITY, -INFINITY};
        SC_UNROLL
        for (int n = 0; n < SC_BN_FWD / 8; n++) {
            SC_UNROLL
            for (int e = 0; e < 4; e++) {
                float z = p.cap_log2 - p.cap_log2 * sc_one_minus_tanh(s[n][e], p.tanh_arg);
                if (masked && !sc_visible(rows[e >> 1], k0 + n * 8 + 2 * t + (e & 1), S, p.window)) z = -INFINITY;
                s[n][e] = z;
                mx[e >> 1] = fmaxf(mx[e >> 1], z);
            }
        }
        float ref[2];  // the running max each row's exponentials are taken against (0 while all are masked)
        SC_UNROLL
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], sc_shfl_xor(mx[r], 1));
            mx[r] = fmaxf(mx[r], sc_shfl_xor(mx[r], 2));
            float m_new = fmaxf(m[r], mx[r]);
            ref[r] = m_new == -INFINITY ? 0.0f : m_new;
            float alpha = sc_ex2(m[r] - ref[r]);
            m[r] = m_new;
            l[r] *= alpha;
            SC_UNROLL
            for (int n = 0; n < HD / 8; n++) {
                o[n][2 * r] *= alpha;
                o[n][2 * r + 1] *= alpha;
            }
        }
        SC_UNROLL
        for (int n = 0; n < SC_BN_FWD / 8; n++) {
            SC_UNROLL
            for (int e = 0; e < 4; e++) {
                s[n][e] = sc_ex2(s[n][e] - ref[e >> 1]);
                l[e >> 1] += s[n][e];
            }
        }
        uint32_t pa[SC_BN_FWD / 16][4];
        sc_c_to_a<SC_BN_FWD>(pa, s);

        sc_cp_async_wait_all();
        sc_sync();  // V(kt) is visible to every warp, and every warp is done with K(kt)
        if (kt < kt_end) sc_stage_rows<HD>(sK, gk, C, k0 + SC_BN_FWD, SC_BN_FWD, S, p.hd, SC_FWD_THREADS);
        sc_cp_async_commit();
        sc_gemm_frag_b<SC_BN_FWD, HD>(o, pa, sV, LD, 0, 0, lane);
    }

    float inv[2];
    SC_UNROLL
    for (int r = 0; r < 2; r++) {
        l[r] += sc_shfl_xor(l[r], 1);
        l[r] += sc_shfl_xor(l[r], 2);
        inv[r] = 1.0f / l[r];
        if (t == 0 && rows[r] < S)
            sc_st_global_f32(p.stats + ((size_t)b * p.Hq + h) * S + rows[r], (m[r] + log2f(l[r])) * SC_LN2);
    }
    const size_t O = (size_t)p.Hq * p.hd;
    sc_store_rows<HD>(p.out + (size_t)b * S * O + (size_t)h * p.hd, O, q0 + warp * 16, 0, o, inv, S, p.hd, lane);
}

// ---- backward ----
// D (B, Hq, S) = rowwise dO . O in fp32, one warp per (token row, head). Reads out and dout, writes D.
SC_FN void sc_backward_dot_block(const ScParams &p) {
    const int warp = sc_tid() / 32, lane = sc_tid() % 32;
    const size_t w = (size_t)sc_block_x() * (SC_DOT_THREADS / 32) + warp, n_rows = (size_t)p.B * p.S * p.Hq;
    if (w >= n_rows) return;  // the whole warp
    const size_t row = w / p.Hq, O = (size_t)p.Hq * p.hd;
    const int h = (int)(w % p.Hq);
    const bf16 *o = p.out + row * O + (size_t)h * p.hd, *d = p.dout + row * O + (size_t)h * p.hd;
    float acc = 0.0f;
    for (int c = 2 * lane; c < p.hd; c += 64) {
        uint32_t ov = sc_ld_global_u32(o + c), dv = sc_ld_global_u32(d + c);
        acc += sc_u32_as_float(ov << 16) * sc_u32_as_float(dv << 16) +
               sc_u32_as_float(ov & 0xffff0000u) * sc_u32_as_float(dv & 0xffff0000u);
    }
    SC_UNROLL
    for (int m = 16; m > 0; m >>= 1) acc += sc_shfl_xor(acc, m);
    const size_t b = row / p.S, i = row % p.S;
    if (lane == 0) sc_st_global_f32(p.D + (b * p.Hq + h) * p.S + i, acc);
}

// dS of one C fragment element: from the raw score x, dP, and the row's lse log2(e) and D; 0 when not visible.
// Also returns P through *prob.
SC_FN float sc_dscore(float x, float dp, float lse2, float D, int visible, const ScParams &p, float *prob) {
    float u = sc_one_minus_tanh(x, p.tanh_arg);
    float pr = visible ? sc_ex2(p.cap_log2 - p.cap_log2 * u - lse2) : 0.0f;
    *prob = pr;
    return pr * (dp - D) * (u * (2.0f - u)) * p.scale;
}

// dQ. Block: (b, query head h, 64 queries), heaviest first; 4 warps x 16 queries. Loops over the visible
// 32-key tiles: dP = dO V^T, S = Q K^T, dS, dQ += dS K (dQ stays in registers; written once).
// V of the next tile loads during Q K^T and dS K, K of the next tile during dO V^T.
// Reads qkv, dout, stats, D; writes the q columns of dqkv.
// Shared memory: Q [64][HD + 8], dO [64][HD + 8], K [32][HD + 8], V [32][HD + 8] bf16.
template <int HD>
SC_FN void sc_backward_dq_block(const ScParams &p, char *smem) {
    const int LD = HD + SC_PAD, S = p.S;
    char *sQ = smem, *sdO = sQ + SC_BM * LD * 2, *sK = sdO + SC_BM * LD * 2, *sV = sK + SC_BN_DQ * LD * 2;
    const int tid = sc_tid(), warp = tid / 32, lane = tid % 32, t = lane & 3;
    const int q0 = ((S + SC_BM - 1) / SC_BM - 1 - sc_block_x()) * SC_BM, h = sc_block_y(), b = sc_block_z();
    const int kvh = h / p.group;
    const size_t C = (size_t)(p.Hq + 2 * p.Hkv) * p.hd, O = (size_t)p.Hq * p.hd;
    const bf16 *base = p.qkv + (size_t)b * S * C;
    const bf16 *gq = base + (size_t)h * p.hd, *gk = base + (size_t)(p.Hq + kvh) * p.hd;
    const bf16 *gv = base + (size_t)(p.Hq + p.Hkv + kvh) * p.hd;
    const bf16 *gdo = p.dout + (size_t)b * S * O + (size_t)h * p.hd;
    const int kt_begin = (p.window > 0 ? sc_imax(0, q0 - p.window + 1) : 0) / SC_BN_DQ;
    const int kt_end = (sc_imin(S, q0 + SC_BM) - 1) / SC_BN_DQ;
    sc_stage_rows<HD>(sQ, gq, C, q0, SC_BM, S, p.hd, SC_DQ_THREADS);
    sc_stage_rows<HD>(sdO, gdo, O, q0, SC_BM, S, p.hd, SC_DQ_THREADS);
    sc_stage_rows<HD>(sV, gv, C, kt_begin * SC_BN_DQ, SC_BN_DQ, S, p.hd, SC_DQ_THREADS);
    sc_cp_async_commit();
    sc_stage_rows<HD>(sK, gk, C, kt_begin * SC_BN_DQ, SC_BN_DQ, S, p.hd, SC_DQ_THREADS);
    sc_cp_async_commit();

    const int rows[2] = {q0 + warp * 16 + (lane >> 2), q0 + warp * 16 + (lane >> 2) + 8};
    const size_t stat0 = ((size_t)b * p.Hq + h) * S;
    float lse2[2], Dr[2], dq[HD / 8][4];
    SC_UNROLL
    for (int r = 0; r < 2; r++) {
        lse2[r] = rows[r] < S ? sc_ld_global_f32(p.stats + stat0 + rows[r]) * SC_LOG2E : 0.0f;
        Dr[r] = rows[r] < S ? sc_ld_global_f32(p.D + stat0 + rows[r]) : 0.0f;
    }
    SC_UNROLL
    for (int n = 0; n < HD / 8; n++) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    for (int kt = kt_begin; kt <= kt_end; kt++) {
        const int k0 = kt * SC_BN_DQ;
        sc_cp_async_wait_1();
        sc_sync();  // Q, dO and V(kt) are visible to every warp
        float dp[SC_BN_DQ / 8][4], s[SC_BN_DQ / 8][4];
        sc_gemm_abt<HD, SC_BN_DQ>(dp, sdO, warp * 16, sV, 0, lane);
        sc_cp_async_wait_all();
        sc_sync();  // K(kt) is visible to every warp, and every warp is done with V(kt)
        if (kt < kt_end) sc_stage_rows<HD>(sV, gv, C, k0 + SC_BN_DQ, SC_BN_DQ, S, p.hd, SC_DQ_THREADS);
        sc_cp_async_commit();
        sc_gemm_abt<HD, SC_BN_DQ>(s, sQ, warp * 16, sK, 0, lane);
        const int masked = sc_tile_needs_mask(q0, SC_BM, k0, SC_BN_DQ, S, p.window);
        SC_UNROLL
        for (int n = 0; n < SC_BN_DQ / 8; n++) {
            SC_UNROLL
            for (int e = 0; e < 4; e++) {
                int vis = !masked || sc_visible(rows[e >> 1], k0 + n * 8 + 2 * t + (e & 1), S, p.window);
                float prob;
                s[n][e] = sc_dscore(s[n][e], dp[n][e], lse2[e >> 1], Dr[e >> 1], vis, p, &prob);
            }
        }
        uint32_t da[SC_BN_DQ / 16][4];
        sc_c_to_a<SC_BN_DQ>(da, s);
        sc_gemm_frag_b<SC_BN_DQ, HD>(dq, da, sK, LD, 0, 0, lane);
        sc_sync();  // every warp is done with K(kt)
        if (kt < kt_end) sc_stage_rows<HD>(sK, gk, C, k0 + SC_BN_DQ, SC_BN_DQ, S, p.hd, SC_DQ_THREADS);
        sc_cp_async_commit();
    }
    const float one[2] = {1.0f, 1.0f};
    sc_store_rows<HD>(p.dqkv + (size_t)b * S * C + (size_t)h * p.hd, C, q0 + warp * 16, 0, dq, one, S, p.hd, lane);
}

// dK, dV. Block: (b, kv head, 64 keys), the heaviest (first) key tiles first; 8 warps. Loops over the
// query heads of the kv head's group in order and, for each, over the 64-query tiles that see a key of
// the block, in order (so the sums have a fixed order: no atomics, bit-identical reruns):
//   S^T = K Q^T and dP^T = V dO^T, warp (w % 4, w / 4) computing keys 16 (w % 4).. x queries 32 (w / 4)..;
//   P^T and dS^T to shared memory (bf16);
//   dK += dS^T Q and dV += P^T dO, warp (w % 4, w / 4) owning keys 16 (w % 4).. x head dims (HD / 2)(w / 4)..
// Q of the next step loads during dV, dO of the next step during K Q^T.
// Reads qkv, dout, stats, D; writes the k and v columns of dqkv.
// Shared memory: K, V, Q, dO [64][HD + 8], P^T, dS^T [64][64 + 8] bf16.
template <int HD>
SC_FN void sc_backward_dkv_block(const ScParams &p, char *smem) {
    const int LD = HD + SC_PAD, LDP = SC_BQ_KV + SC_PAD, S = p.S;
    char *sK = smem, *sV = sK + SC_BKV * LD * 2, *sQ = sV + SC_BKV * LD * 2, *sdO = sQ + SC_BQ_KV * LD * 2;
    char *sP = sdO + SC_BQ_KV * LD * 2, *sdS = sP + SC_BKV * LDP * 2;
    const int tid = sc_tid(), warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
    const int kw = warp & 3, half = warp >> 2;  // key group of 16, and query half (S^T) or head-dim half (dK, dV)
    const int k0 = sc_block_x() * SC_BKV, kvh = sc_block_y(), b = sc_block_z();
    const size_t C = (size_t)(p.Hq + 2 * p.Hkv) * p.hd, O = (size_t)p.Hq * p.hd;
    const bf16 *base = p.qkv + (size_t)b * S * C, *gdo_b = p.dout + (size_t)b * S * O;
    const int k_last = sc_imin(S, k0 + SC_BKV) - 1;
    const int q_end = p.window > 0 ? sc_imin(S, k_last + p.window) : S;  // queries k0 <= i < q_end see a key here
    const int qt_begin = k0 / SC_BQ_KV, n_qt = (q_end - 1) / SC_BQ_KV - qt_begin + 1, n_steps = p.group * n_qt;
    sc_stage_rows<HD>(sK, base + (size_t)(p.Hq + kvh) * p.hd, C, k0, SC_BKV, S, p.hd, SC_DKV_THREADS);
    sc_stage_rows<HD>(sV, base + (size_t)(p.Hq + p.Hkv + kvh) * p.hd, C, k0, SC_BKV, S, p.hd, SC_DKV_THREADS);
    sc_stage_rows<HD>(sQ, base + (size_t)(kvh * p.group) * p.hd, C, qt_begin * SC_BQ_KV, SC_BQ_KV, S, p.hd,
                      SC_DKV_THREADS);
    sc_cp_async_commit();
    sc_stage_rows<HD>(sdO, gdo_b + (size_t)(kvh * p.group) * p.hd, O, qt_begin * SC_BQ_KV, SC_BQ_KV, S, p.hd,
                      SC_DKV_THREADS);
    sc_cp_async_commit();

    float dk[HD / 16][4], dv[HD / 16][4];
    SC_UNROLL
    for (int n = 0; n < HD / 16; n++) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }
    for (int step = 0; step < n_steps; step++) {
        const int h = kvh * p.group + step / n_qt, q0 = (qt_begin + step % n_qt) * SC_BQ_KV;
        const int h_next = kvh * p.group + (step + 1) / n_qt, q0_next = (qt_begin + (step + 1) % n_qt) * SC_BQ_KV;
        sc_cp_async_wait_1();
        sc_sync();  // Q(step) is visible to every warp
        float st[4][4], dpt[4][4];  // keys 16 kw + (g, g + 8) x queries 32 half + 8 n + (2t, 2t + 1)
        sc_gemm_abt<HD, 32>(st, sK, kw * 16, sQ, half * 32, lane);
        sc_cp_async_wait_all();
        sc_sync();  // dO(step) is visible to every warp
        sc_gemm_abt<HD, 32>(dpt, sV, kw * 16, sdO, half * 32, lane);

        const int masked = sc_tile_needs_mask(q0, SC_BQ_KV, k0, SC_BKV, S, p.window);
        const size_t stat0 = ((size_t)b * p.Hq + h) * S;
        SC_UNROLL
        for (int n = 0; n < 4; n++) {
            float lse2[2], Dq[2];
            SC_UNROLL
            for (int c = 0; c < 2; c++) {
                int i = q0 + half * 32 + n * 8 + 2 * t + c;
                lse2[c] = i < S ? sc_ld_global_f32(p.stats + stat0 + i) * SC_LOG2E : 0.0f;
                Dq[c] = i < S ? sc_ld_global_f32(p.D + stat0 + i) : 0.0f;
            }
            SC_UNROLL
            for (int e = 0; e < 4; e++) {
                int i = q0 + half * 32 + n * 8 + 2 * t + (e & 1), j = k0 + kw * 16 + g + 8 * (e >> 1);
                float prob;
                dpt[n][e] = sc_dscore(st[n][e], dpt[n][e], lse2[e & 1], Dq[e & 1], !masked || sc_visible(i, j, S, p.window),
                                      p, &prob);
                st[n][e] = prob;
            }
            SC_UNROLL
            for (int r = 0; r < 2; r++) {
                size_t off = ((size_t)(kw * 16 + g + 8 * r) * LDP + half * 32 + n * 8 + 2 * t) * 2;
                sc_st_shared_u32(sP + off, sc_pack_bf16x2(st[n][2 * r], st[n][2 * r + 1]));
                sc_st_shared_u32(sdS + off, sc_pack_bf16x2(dpt[n][2 * r], dpt[n][2 * r + 1]));
            }
        }
        sc_sync();  // P^T and dS^T are complete
        sc_gemm_ab<SC_BQ_KV, HD / 2>(dk, sdS, LDP, kw * 16, sQ, LD, half * (HD / 2), lane);
        sc_sync();  // every warp is done with Q(step)
        if (step + 1 < n_steps)
            sc_stage_rows<HD>(sQ, base + (size_t)h_next * p.hd, C, q0_next, SC_BQ_KV, S, p.hd, SC_DKV_THREADS);
        sc_cp_async_commit();
        sc_gemm_ab<SC_BQ_KV, HD / 2>(dv, sP, LDP, kw * 16, sdO, LD, half * (HD / 2), lane);
        sc_sync();  // every warp is done with dO(step), P^T and dS^T
        if (step + 1 < n_steps)
            sc_stage_rows<HD>(sdO, gdo_b + (size_t)h_next * p.hd, O, q0_next, SC_BQ_KV, S, p.hd, SC_DKV_THREADS);
        sc_cp_async_commit();
    }
    const float one[2] = {1.0f, 1.0f};
    bf16 *dk_out = p.dqkv + (size_t)b * S * C + (size_t)(p.Hq + kvh) * p.hd;
    bf16 *dv_out = p.dqkv + (size_t)b * S * C + (size_t)(p.Hq + p.Hkv + kvh) * p.hd;
    sc_store_rows<HD / 2>(dk_out, C, k0 + kw * 16, half * (HD / 2), dk, one, S, p.hd, lane);
    sc_store_rows<HD / 2>(dv_out, C, k0 + kw * 16, half * (HD / 2), dv, one, S, p.hd, lane);
}

// ---- launch geometry (host side), shared by attention_softcap.cu and the emulator test ----

// The kernel parameters of a shape (attention_softcap_supported says yes); pointers left NULL.
static inline ScParams sc_params(const AttentionShape *s) {
    ScParams p;
    memset(&p, 0, sizeof(p));
    p.B = s->B;
    p.S = s->S;
    p.Hq = s->Hq;
    p.Hkv = s->Hkv;
    p.hd = s->hd;
    p.group = s->Hq / s->Hkv;
    p.window = s->window;
    p.scale = s->scale;
    p.tanh_arg = 2.0f * s->scale * SC_LOG2E / s->softcap;
    p.cap_log2 = s->softcap * SC_LOG2E;
    return p;
}

// The head-dim tile of a head dim: 64, 128 or 256.
static inline int sc_head_tile(int hd) { return hd <= 64 ? 64 : hd <= 128 ? 128 : 256; }

typedef struct {
    unsigned grid_x, grid_y, grid_z, threads;
    size_t smem;  // dynamic shared memory bytes
} ScLaunch;

static inline ScLaunch sc_launch(unsigned x, unsigned y, unsigned z, unsigned threads, size_t smem) {
    ScLaunch l = {x, y, z, threads, smem};
    return l;
}
static inline size_t sc_row_bytes(int HD) { return (size_t)(HD + SC_PAD) * 2; }
static inline ScLaunch sc_forward_launch(const ScParams *p, int HD) {
    return sc_launch(ceil_div(p->S, SC_BM), p->Hq, p->B, SC_FWD_THREADS, (SC_BM + 2 * SC_BN_FWD) * sc_row_bytes(HD));
}
static inline ScLaunch sc_dot_launch(const ScParams *p) {
    size_t rows = (size_t)p->B * p->S * p->Hq;
    return sc_launch((unsigned)ceil_div_size(rows, SC_DOT_THREADS / 32), 1, 1, SC_DOT_THREADS, 0);
}
static inline ScLaunch sc_dq_launch(const ScParams *p, int HD) {
    return sc_launch(ceil_div(p->S, SC_BM), p->Hq, p->B, SC_DQ_THREADS, (2 * SC_BM + 2 * SC_BN_DQ) * sc_row_bytes(HD));
}
static inline ScLaunch sc_dkv_launch(const ScParams *p, int HD) {
    size_t smem = (2 * SC_BKV + 2 * SC_BQ_KV) * sc_row_bytes(HD) + 2 * (size_t)SC_BKV * (SC_BQ_KV + SC_PAD) * 2;
    return sc_launch(ceil_div(p->S, SC_BKV), p->Hkv, p->B, SC_DKV_THREADS, smem);
}

#endif  // ATTENTION_SOFTCAP_KERNELS_H

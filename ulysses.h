// Ulysses sequence parallelism, the index math: with R ranks, each rank holds S/R consecutive
// tokens of every sequence with all attention heads (the sequence layout); for attention it
// needs all S tokens of H/R heads (the head layout). An all-to-all switches layouts: rank q
// sends rank p the columns of p's heads for q's tokens, and back after attention.
//
// Heads of a rank in the head layout (R divides Hq; R divides Hkv, or Hkv divides R):
//   query heads   hq_loc = Hq / R: rank p holds query heads [p hq_loc, (p + 1) hq_loc)
//   k and v heads hkv_loc = Hkv / R when Hkv >= R: rank p holds kv heads [p hkv_loc, (p + 1) hkv_loc);
//                 when Hkv < R each kv head is replicated on kv_rep = R / Hkv ranks: hkv_loc = 1 and
//                 rank p holds kv head p / kv_rep.
// Either way the query heads of a rank read only that rank's kv heads (GQA stays local), so the
// head layout of the fused qkv buffer is again "q heads, k heads, v heads" with hq_loc, hkv_loc.
// Going back, the gradient of a replicated kv head is the sum of its replicas' gradients.
//
// Buffers: a sequence-layout tensor is (rows, H hd) with H = Hq + 2 Hkv (qkv, with_kv = 1) or
// H = Hq (attention output, with_kv = 0). Pack cuts it into R chunks of (rows, H_loc hd), chunk p
// holding the heads rank p needs, in rank p's local order; unpack is its inverse (summing kv
// replicas). The index functions are shared by the CPU twins below and the kernels of comm.cu.
#ifndef ULYSSES_H
#define ULYSSES_H

#include <stdio.h>
#include <string.h>

#ifdef __CUDACC__
#define ULYSSES_HD __host__ __device__
#else
#define ULYSSES_HD
#endif

typedef struct {
    int ranks, Hq, Hkv, hd;
    int hq_loc, hkv_loc;  // heads per rank in the head layout
    int kv_rep;           // ranks holding each kv head: 1, or ranks / Hkv when Hkv < ranks
} UlyssesHeads;

// Fills u for R = ranks. Returns NULL, or a message in buf when the heads do not split over R.
static inline const char *ulysses_heads_init(UlyssesHeads *u, int ranks, int Hq, int Hkv, int hd, char *buf, size_t len) {
    memset(u, 0, sizeof(*u));
    if (ranks < 1 || Hq < 1 || Hkv < 1 || hd < 1 || Hq % Hkv != 0) {
        snprintf(buf, len, "sequence parallel: bad shape (ranks %d, heads %d, kv heads %d, head dim %d)", ranks, Hq, Hkv, hd);
        return buf;
    }
    if (Hq % ranks != 0 || (Hkv % ranks != 0 && ranks % Hkv != 0)) {
        snprintf(buf, len, "sequence parallel over %d GPUs needs the %d query heads to split evenly and the %d kv heads to split "
                 "evenly or divide %d (use a GPU count that divides %d)", ranks, Hq, Hkv, ranks, Hq);
        return buf;
    }
    u->ranks = ranks;
    u->Hq = Hq;
    u->Hkv = Hkv;
    u->hd = hd;
    u->hq_loc = Hq / ranks;
    u->hkv_loc = Hkv >= ranks ? Hkv / ranks : 1;
    u->kv_rep = Hkv >= ranks ? 1 : ranks / Hkv;
    return NULL;
}

// Heads of a sequence-layout row (H) and of a rank's head-layout row (H_loc).
ULYSSES_HD static inline int ulysses_full_heads(const UlyssesHeads *u, int with_kv) { return with_kv ? u->Hq + 2 * u->Hkv : u->Hq; }
ULYSSES_HD static inline int ulysses_local_heads(const UlyssesHeads *u, int with_kv) { return with_kv ? u->hq_loc + 2 * u->hkv_loc : u->hq_loc; }

// Sequence-layout head of local head j of rank p (heads: q, then k, then v).
ULYSSES_HD static inline int ulysses_global_head(const UlyssesHeads *u, int p, int j) {
    if (j < u->hq_loc) return p * u->hq_loc + j;
    j -= u->hq_loc;
    int seg = j / u->hkv_loc, jk = j % u->hkv_loc;  // seg 0: k, 1: v
    return u->Hq + seg * u->Hkv + (p / u->kv_rep) * u->hkv_loc + jk;
}

// The ranks holding sequence-layout head g: ranks [*p0, *p0 + n) (returned), each as local head *j.
ULYSSES_HD static inline int ulysses_holders(const UlyssesHeads *u, int g, int *p0, int *j) {
    if (g < u->Hq) {
        *p0 = g / u->hq_loc;
        *j = g % u->hq_loc;
        return 1;
    }
    int seg = (g - u->Hq) / u->Hkv, gk = (g - u->Hq) % u->Hkv;
    *p0 = (gk / u->hkv_loc) * u->kv_rep;
    *j = u->hq_loc + seg * u->hkv_loc + gk % u->hkv_loc;
    return u->kv_rep;
}

// ---- CPU twins of the pack / unpack kernels (comm.cu) ----

// send: R chunks of (rows, H_loc hd); chunk p, row r, local head j = x (rows, H hd) row r, head
// ulysses_global_head(p, j).
static inline void ulysses_pack_cpu(float *send, const float *x, int rows, const UlyssesHeads *u, int with_kv) {
    int H = ulysses_full_heads(u, with_kv), Hl = ulysses_local_heads(u, with_kv), hd = u->hd;
    for (int p = 0; p < u->ranks; p++)
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < Hl; j++) {
                float *dst = send + (((size_t)p * rows + r) * Hl + j) * hd;
                const float *src = x + ((size_t)r * H + ulysses_global_head(u, p, j)) * hd;
                memcpy(dst, src, (size_t)hd * sizeof(float));
            }
}

// x (rows, H hd): head g of row r = the sum over the ranks p holding g (ascending) of chunk p's
// row r, local head j (recv: R chunks of (rows, H_loc hd)). The inverse of pack for q heads and
// unreplicated kv heads; replicated kv heads get the sum of their replicas.
static inline void ulysses_unpack_cpu(float *x, const float *recv, int rows, const UlyssesHeads *u, int with_kv) {
    int H = ulysses_full_heads(u, with_kv), Hl = ulysses_local_heads(u, with_kv), hd = u->hd;
    for (int r = 0; r < rows; r++)
        for (int g = 0; g < H; g++) {
            int p0, j, n = ulysses_holders(u, g, &p0, &j);
            float *dst = x + ((size_t)r * H + g) * hd;
            for (int t = 0; t < hd; t++) {
                float s = 0.0f;
                for (int p = p0; p < p0 + n; p++) s += recv[(((size_t)p * rows + r) * Hl + j) * hd + t];
                dst[t] = s;
            }
        }
}

#endif  // ULYSSES_H

// ZeRO sharding of the optimizer over the ranks of a process group: which part of the flat
// parameter array each rank updates, and where that part lives in the rank's (smaller) AdamW
// moment and master-weight arrays. Plain host C; mst.h plans with it, gpu_dist.cu runs it.
//
// The flat array (model_config.h) is cut into blocks that the backward pass finishes one at a
// time: the embedding, each layer, the final norm and the untied LM head. Every block is split
// over the ranks in units of ZERO_ALIGN elements (rank r takes units [U r / W, U (r + 1) / W) of
// the block's U units, the last unit may be short), so each rank's part starts 16-byte aligned
// for bf16 and fp32 and the parts differ by at most one unit. After a block's gradient is
// summed over the ranks, each rank keeps the sum of its part only (reduce-scatter), updates its
// part with AdamW, and the updated bf16 weights of every part are sent to every rank (all-gather).
// A rank's state arrays hold its parts of the blocks in block order, each padded to ZERO_ALIGN.
#ifndef ZERO_H
#define ZERO_H

#include "model_config.h"

#define ZERO_ALIGN 256  // elements

typedef struct {
    int world, rank, n_blocks;
    size_t *offset, *size;  // block b: flat elements [offset, offset + size)
    size_t *lo, *hi;        // this rank's part of block b, as flat offsets (lo == hi: none)
    size_t *state;          // where that part starts in this rank's sharded optimizer arrays
    size_t state_elems;     // length of this rank's optimizer arrays (moments, master weights)
} ZeroLayout;

// Blocks, in flat-array order: 0 embedding (with the tied LM head), 1 + l layer l,
// L + 1 final norm, L + 2 untied LM head.
static inline int zero_n_blocks(const ModelConfig *c) { return c->n_layers + (c->tied_embeddings ? 2 : 3); }
static inline int zero_block_layer(int l) { return 1 + l; }
static inline int zero_block_final_norm(const ModelConfig *c) { return c->n_layers + 1; }
static inline int zero_block_lm_head(const ModelConfig *c) { return c->tied_embeddings ? 0 : c->n_layers + 2; }

static inline void zero_block(const ParamLayout *p, const ModelConfig *c, int b, size_t *offset, size_t *size) {
    size_t vd = (size_t)c->vocab_size * c->d_model;
    if (b == 0) { *offset = p->embed; *size = vd; }
    else if (b <= c->n_layers) { *offset = p->layers_begin + (size_t)(b - 1) * p->layer_size; *size = p->layer_size; }
    else if (b == c->n_layers + 1) { *offset = p->final_norm; *size = (size_t)c->d_model; }
    else { *offset = p->lm_head; *size = vd; }
}

// [lo, hi) of a block of `size` elements that `rank` of `world` owns (offsets within the block).
static inline void zero_range(size_t size, int world, int rank, size_t *lo, size_t *hi) {
    size_t units = (size + ZERO_ALIGN - 1) / ZERO_ALIGN;
    size_t u0 = units * (size_t)rank / (size_t)world, u1 = units * (size_t)(rank + 1) / (size_t)world;
    *lo = u0 * ZERO_ALIGN;
    *hi = u1 * ZERO_ALIGN < size ? u1 * ZERO_ALIGN : size;
}

static inline size_t zero_align_up(size_t n) { return (n + ZERO_ALIGN - 1) / ZERO_ALIGN * ZERO_ALIGN; }

static inline void zero_layout_init(ZeroLayout *z, const ParamLayout *p, const ModelConfig *c, int world, int rank) {
    if (world < 1 || rank < 0 || rank >= world) die("zero layout: rank %d of %d", rank, world);
    memset(z, 0, sizeof(*z));
    z->world = world;
    z->rank = rank;
    z->n_blocks = zero_n_blocks(c);
    size_t n = (size_t)z->n_blocks;
    z->offset = (size_t *)mallocCheck(n * sizeof(size_t));
    z->size = (size_t *)mallocCheck(n * sizeof(size_t));
    z->lo = (size_t *)mallocCheck(n * sizeof(size_t));
    z->hi = (size_t *)mallocCheck(n * sizeof(size_t));
    z->state = (size_t *)mallocCheck(n * sizeof(size_t));
    size_t at = 0;
    for (int b = 0; b < z->n_blocks; b++) {
        size_t lo, hi;
        zero_block(p, c, b, &z->offset[b], &z->size[b]);
        zero_range(z->size[b], world, rank, &lo, &hi);
        z->lo[b] = z->offset[b] + lo;
        z->hi[b] = z->offset[b] + hi;
        z->state[b] = at;
        at += zero_align_up(hi - lo);
    }
    z->state_elems = at;
}

static inline void zero_layout_free(ZeroLayout *z) {
    free(z->offset);
    free(z->size);
    free(z->lo);
    free(z->hi);
    free(z->state);
    memset(z, 0, sizeof(*z));
}

// The longest state arrays of any rank, and the largest part of one block on any rank: the plan
// sizes the sharded optimizer arrays and the gradient-shard buffer with them (equal on every rank).
static inline void zero_figures(const ParamLayout *p, const ModelConfig *c, int world, size_t *state_max, size_t *shard_max) {
    *state_max = 0;
    *shard_max = 0;
    for (int r = 0; r < world; r++) {
        ZeroLayout z;
        zero_layout_init(&z, p, c, world, r);
        if (z.state_elems > *state_max) *state_max = z.state_elems;
        for (int b = 0; b < z.n_blocks; b++)
            if (z.hi[b] - z.lo[b] > *shard_max) *shard_max = z.hi[b] - z.lo[b];
        zero_layout_free(&z);
    }
}

#endif  // ZERO_H

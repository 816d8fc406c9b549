// The data loader: token shards in, batches of (inputs, targets) out. Plain C.
//
// Shard file (written by scripts/prepare_text.py, prepare_longalpaca.py, build_default_corpus.py),
// little-endian:
//   header of SHARD_HEADER_INTS int32:
//     [0] magic SHARD_MAGIC ('M','T','S','D')  [1] version 1  [2] n_tokens (>= 1)
//     [3] flags: bit 0 = a loss mask follows the tokens; other bits must be 0
//     [4] vocab_size of the tokenizer the shard was made with (must not exceed the model's)
//     [5] bos_id  [6] eos_id  [7] pad_id  (-1 = none; every shard of a run must agree)
//     rest 0
//   then n_tokens uint32 token ids
//   then, when flags bit 0 is set, n_tokens uint8 loss-mask bytes (1 = train on predicting this
//   token, 0 = do not; nothing else allowed)
// Documents follow each other in the stream, each as BOS, its tokens, EOS.
//
// Batches: inputs and targets are (B, S) int32, row-major. targets[b][j] is the token that follows
// inputs[b][j], or -1 (no loss) when that token is a document's BOS, is masked out, or is padding.
//   Pre-training shards (no mask): row = a window of S + 1 consecutive tokens; windows start at
//   multiples of S (stride S, so each token is predicted once per epoch); the tail that does not
//   fill a window is skipped. A window may span documents.
//   Fine-tuning shards (mask): the shard is cut into samples, each starting at a BOS (or, when the
//   tokenizer has no BOS, after each EOS). Samples are packed whole, in file order, into rows of
//   S + 1 tokens: a sample goes into the current row if it fits, else it starts a new row; a sample
//   longer than S + 1 tokens is truncated to S + 1 and fills a row alone. The rest of a row is
//   padding (pad_id, else eos_id, else 0) with target -1. Packed samples share a row without an
//   attention mask between them (each starts with BOS; positions run on).
// Order: sequential reads shards in glob order and rows in file order. Shuffled reads shards in a
// seeded permutation per epoch and the rows of each shard in a seeded permutation per epoch and
// shard (splitmix64 of (seed, epoch, shard), Fisher-Yates); the same seed gives the same batches.
// After the last row of the last shard the next epoch starts (epoch + 1) and reading wraps around.
// A batch may take rows from two shards or two epochs.
// Position: (epoch, shard = index in that epoch's shard order, cursor = rows of that shard already
// read). Every order is a function of the seed and the position, so restoring a saved position
// reproduces the following batches exactly.
// Memory: the current shard is held in memory whole (tokens + mask); every shard is validated
// (header, size, token ids < vocab_size, mask bytes) at init, before training starts.
#ifndef DATALOADER_H
#define DATALOADER_H

#include <glob.h>
#include "utils.h"

#define SHARD_MAGIC 0x4453544Du  // bytes 'M','T','S','D'
#define SHARD_VERSION 1
#define SHARD_HEADER_INTS 256
#define SHARD_FLAG_MASK 1

typedef struct {
    int64_t epoch;     // completed passes over the data
    int64_t shard;     // index into this epoch's shard order
    int64_t cursor;    // rows of that shard already read
    int64_t seq_len;   // S the position was taken with (rows depend on it)
    int64_t n_shards;  // shard count the position was taken with
} DataPosition;

typedef struct {
    int64_t start, len;  // tokens [start, start + len) of the current shard
} DataSample;

typedef struct {
    // configuration
    int B, S, vocab_size, shuffle;
    uint64_t seed;
    int bos_id, eos_id, pad_id;
    // the shards (glob order)
    int n_shards;
    char **paths;
    int64_t *shard_tokens;   // (n_shards)
    int *shard_has_mask;     // (n_shards)
    int64_t total_tokens;
    // the current shard, held whole
    int loaded;              // index into paths, -1 none
    uint32_t *tokens;        // (shard_tokens[loaded])
    uint8_t *mask;           // (shard_tokens[loaded]) or NULL
    int64_t n_rows;          // rows (windows or packed rows) in the current shard
    DataSample *samples;     // fine-tuning: the shard's samples in file order
    int64_t *row_first;      // fine-tuning: (n_rows + 1) row r packs samples [row_first[r], row_first[r+1])
    int64_t *row_order;      // (n_rows) the order rows are read in this epoch
    int64_t *shard_order;    // (n_shards) the order shards are read in this epoch
    // position
    int64_t epoch, shard_pos, cursor;
    // scratch for one packed row
    uint32_t *row_tokens;    // (S + 1)
    uint8_t *row_mask;       // (S + 1)
    // outputs of dataloader_next_batch
    int *inputs;             // (B, S)
    int *targets;            // (B, S) -1 = no loss
} DataLoader;

// ---------------------------------------------------------------------------------------------
// Seeded permutations

static inline uint64_t dl_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// perm (n) = a permutation of 0..n-1 determined by (seed, epoch, stream), or the identity when
// shuffle is 0. stream: -1 for the shard order, else the shard's index.
static inline void dl_permutation(int64_t *perm, int64_t n, int shuffle, uint64_t seed, int64_t epoch, int64_t stream) {
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    if (!shuffle) return;
    uint64_t state = seed;
    uint64_t a = dl_splitmix64(&state) ^ (uint64_t)epoch;
    state = a;
    uint64_t b = dl_splitmix64(&state) ^ (uint64_t)stream;
    state = b;
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(dl_splitmix64(&state) % (uint64_t)(i + 1));
        int64_t tmp = perm[i];
        perm[i] = perm[j];
        perm[j] = tmp;
    }
}

// ---------------------------------------------------------------------------------------------
// Validation at init

// Reads and checks one shard's header and size; fills its token count and mask flag, and the
// loader's special ids (all shards must agree).
static inline void dl_check_header(DataLoader *dl, int s) {
    const char *path = dl->paths[s];
    FILE *f = fopenCheck(path, "rb");
    long size = file_size_bytes(f, path);
    if (size < (long)(SHARD_HEADER_INTS * 4)) {
        die("%s: truncated shard: %ld bytes, shorter than the %d-byte header", path, size, SHARD_HEADER_INTS * 4);
    }
    int32_t h[SHARD_HEADER_INTS];
    freadCheck(h, sizeof(int32_t), SHARD_HEADER_INTS, f, path);
    fcloseCheck(f, path);
    if ((uint32_t)h[0] != SHARD_MAGIC) die("%s: not a token shard (magic 0x%08x, expected 0x%08x)", path, (uint32_t)h[0], SHARD_MAGIC);
    if (h[1] != SHARD_VERSION) die("%s: unsupported shard version %d (this program reads version %d)", path, h[1], SHARD_VERSION);
    if (h[2] < 1) die("%s: shard has %d tokens (needs at least 1)", path, h[2]);
    if (h[3] & ~SHARD_FLAG_MASK) die("%s: unknown shard flags 0x%x (known: 0x%x = loss mask)", path, h[3], SHARD_FLAG_MASK);
    if (h[4] < 1 || h[4] > dl->vocab_size) {
        die("%s: shard was made for vocab_size %d but the model's vocab_size is %d", path, h[4], dl->vocab_size);
    }
    for (int k = 5; k <= 7; k++) {
        if (h[k] < -1 || h[k] >= dl->vocab_size) die("%s: header special id %d (slot %d) is out of range", path, h[k], k);
    }
    int has_mask = (h[3] & SHARD_FLAG_MASK) != 0;
    long expected = (long)SHARD_HEADER_INTS * 4 + (long)h[2] * (4 + has_mask);
    if (size < expected) die("%s: truncated shard: %ld bytes, expected %ld for %d tokens%s", path, size, expected, h[2], has_mask ? " with a loss mask" : "");
    if (size > expected) die("%s: %ld unexpected bytes after the end of the shard (%d tokens%s)", path, size - expected, h[2], has_mask ? " with a loss mask" : "");
    if (s == 0) {
        dl->bos_id = h[5];
        dl->eos_id = h[6];
        dl->pad_id = h[7];
    } else if (h[5] != dl->bos_id || h[6] != dl->eos_id || h[7] != dl->pad_id) {
        die("%s: special ids (bos %d, eos %d, pad %d) differ from %s's (bos %d, eos %d, pad %d)", path, h[5], h[6], h[7],
            dl->paths[0], dl->bos_id, dl->eos_id, dl->pad_id);
    }
    if (has_mask && dl->bos_id < 0 && dl->eos_id < 0) die("%s: a masked shard needs a bos_id or eos_id to delimit samples", path);
    dl->shard_tokens[s] = h[2];
    dl->shard_has_mask[s] = has_mask;
}

// Streams through one shard checking every token id and mask byte.
static inline void dl_check_contents(const DataLoader *dl, int s) {
    const char *path = dl->paths[s];
    FILE *f = fopenCheck(path, "rb");
    fseekCheck(f, SHARD_HEADER_INTS * 4, SEEK_SET, path);
    const int64_t chunk = 1 << 20;
    uint32_t *buf = (uint32_t *)mallocCheck((size_t)chunk * sizeof(uint32_t));
    int64_t n = dl->shard_tokens[s];
    for (int64_t at = 0; at < n; at += chunk) {
        int64_t m = n - at < chunk ? n - at : chunk;
        freadCheck(buf, sizeof(uint32_t), (size_t)m, f, path);
        for (int64_t i = 0; i < m; i++) {
            if (buf[i] >= (uint32_t)dl->vocab_size) {
                die("%s: token at position %lld is %u, not below vocab_size %d", path, (long long)(at + i), buf[i], dl->vocab_size);
            }
        }
    }
    uint8_t *mask = (uint8_t *)buf;
    for (int64_t at = 0; dl->shard_has_mask[s] && at < n; at += chunk) {
        int64_t m = n - at < chunk ? n - at : chunk;
        freadCheck(mask, 1, (size_t)m, f, path);
        for (int64_t i = 0; i < m; i++) {
            if (mask[i] > 1) die("%s: loss-mask byte at position %lld is %u (must be 0 or 1)", path, (long long)(at + i), mask[i]);
        }
    }
    free(buf);
    fcloseCheck(f, path);
}

// Rows a shard yields: windows of S + 1 for pre-training shards; for masked shards at least one.
static inline int64_t dl_rows_upper_bound(const DataLoader *dl, int s) {
    if (dl->shard_has_mask[s]) return 1;
    return dl->shard_tokens[s] >= dl->S + 1 ? (dl->shard_tokens[s] - 1) / dl->S : 0;
}

// ---------------------------------------------------------------------------------------------
// The current shard

// Fine-tuning: cuts the loaded shard into samples and packs them into rows (see the top).
static inline void dl_pack_rows(DataLoader *dl) {
    int64_t n = dl->shard_tokens[dl->loaded];
    int64_t n_samples = 0;
    dl->samples = (DataSample *)mallocCheck((size_t)n * sizeof(DataSample));
    for (int64_t p = 0; p < n; p++) {
        int starts = p == 0 || (dl->bos_id >= 0 ? dl->tokens[p] == (uint32_t)dl->bos_id : dl->tokens[p - 1] == (uint32_t)dl->eos_id);
        if (starts) dl->samples[n_samples++].start = p;
    }
    for (int64_t i = 0; i < n_samples; i++) {
        int64_t end = i + 1 < n_samples ? dl->samples[i + 1].start : n;
        dl->samples[i].len = end - dl->samples[i].start;
    }
    dl->row_first = (int64_t *)mallocCheck((size_t)(n_samples + 1) * sizeof(int64_t));
    int64_t rows = 0, used = 0, cap = dl->S + 1;
    dl->row_first[0] = 0;
    for (int64_t i = 0; i < n_samples; i++) {
        int64_t len = dl->samples[i].len < cap ? dl->samples[i].len : cap;
        if (used > 0 && used + len > cap) {
            dl->row_first[++rows] = i;
            used = 0;
        }
        used += len;
    }
    dl->row_first[++rows] = n_samples;
    dl->n_rows = rows;
}

// Makes shard_order[shard_pos] the current shard for this epoch: loads it (unless it is already
// loaded), builds its rows and this epoch's row order.
static inline void dl_enter_shard(DataLoader *dl) {
    int s = (int)dl->shard_order[dl->shard_pos];
    if (s != dl->loaded) {
        free(dl->tokens);
        free(dl->mask);
        free(dl->samples);
        free(dl->row_first);
        dl->mask = NULL;
        dl->samples = NULL;
        dl->row_first = NULL;
        const char *path = dl->paths[s];
        int64_t n = dl->shard_tokens[s];
        FILE *f = fopenCheck(path, "rb");
        fseekCheck(f, SHARD_HEADER_INTS * 4, SEEK_SET, path);
        dl->tokens = (uint32_t *)mallocCheck((size_t)n * sizeof(uint32_t));
        freadCheck(dl->tokens, sizeof(uint32_t), (size_t)n, f, path);
        if (dl->shard_has_mask[s]) {
            dl->mask = (uint8_t *)mallocCheck((size_t)n);
            freadCheck(dl->mask, 1, (size_t)n, f, path);
        }
        fcloseCheck(f, path);
        dl->loaded = s;
        if (dl->shard_has_mask[s]) dl_pack_rows(dl);
        else dl->n_rows = dl_rows_upper_bound(dl, s);
        free(dl->row_order);
        dl->row_order = (int64_t *)mallocCheck((size_t)(dl->n_rows + 1) * sizeof(int64_t));
    }
    dl_permutation(dl->row_order, dl->n_rows, dl->shuffle, dl->seed, dl->epoch, s);
}

// Starts epoch `epoch` at shard position `shard_pos`: this epoch's shard order, then the shard.
static inline void dl_enter_epoch(DataLoader *dl, int64_t epoch, int64_t shard_pos) {
    dl->epoch = epoch;
    dl->shard_pos = shard_pos;
    dl_permutation(dl->shard_order, dl->n_shards, dl->shuffle, dl->seed, epoch, -1);
    dl_enter_shard(dl);
}

// Moves past exhausted shards (and epochs) until a row is available.
static inline void dl_ensure_row(DataLoader *dl) {
    while (dl->cursor >= dl->n_rows) {
        dl->cursor = 0;
        if (dl->shard_pos + 1 < dl->n_shards) {
            dl->shard_pos++;
            dl_enter_shard(dl);
        } else {
            dl_enter_epoch(dl, dl->epoch + 1, 0);
        }
    }
}

// Fills one row of inputs/targets (S each) from S + 1 tokens and their "train on it" bits.
static inline void dl_fill_row(const DataLoader *dl, int *inputs, int *targets, const uint32_t *toks, const uint8_t *train) {
    for (int j = 0; j < dl->S; j++) {
        uint32_t next = toks[j + 1];
        inputs[j] = (int)toks[j];
        int keep = (train == NULL || train[j + 1]) && !(dl->bos_id >= 0 && next == (uint32_t)dl->bos_id);
        targets[j] = keep ? (int)next : -1;
    }
}

// Packs row r of the current (masked) shard into the scratch row and fills inputs/targets.
static inline void dl_fill_packed_row(DataLoader *dl, int64_t r, int *inputs, int *targets) {
    int64_t used = 0, cap = dl->S + 1;
    for (int64_t i = dl->row_first[r]; i < dl->row_first[r + 1]; i++) {
        const DataSample *smp = &dl->samples[i];
        int64_t len = smp->len < cap - used ? smp->len : cap - used;
        memcpy(dl->row_tokens + used, dl->tokens + smp->start, (size_t)len * sizeof(uint32_t));
        memcpy(dl->row_mask + used, dl->mask + smp->start, (size_t)len);
        used += len;
    }
    uint32_t pad = (uint32_t)(dl->pad_id >= 0 ? dl->pad_id : dl->eos_id >= 0 ? dl->eos_id : 0);
    for (int64_t j = used; j < cap; j++) {
        dl->row_tokens[j] = pad;
        dl->row_mask[j] = 0;
    }
    dl_fill_row(dl, inputs, targets, dl->row_tokens, dl->row_mask);
}

// ---------------------------------------------------------------------------------------------
// API

// Opens every shard matching glob_pattern (sorted), validates them all (dies naming the file and
// the problem), and positions the loader at the start of epoch 0. B rows of S tokens per batch.
static inline void dataloader_init(DataLoader *dl, const char *glob_pattern, int B, int S, int vocab_size, int shuffle, uint64_t seed) {
    memset(dl, 0, sizeof(*dl));
    if (B < 1 || S < 1) die("dataloader: batch size %d and sequence length %d must be positive", B, S);
    dl->B = B;
    dl->S = S;
    dl->vocab_size = vocab_size;
    dl->shuffle = shuffle;
    dl->seed = seed;
    dl->loaded = -1;
    glob_t g;
    int rc = glob(glob_pattern, 0, NULL, &g);
    if (rc == GLOB_NOMATCH) die("dataloader: no files match '%s'", glob_pattern);
    if (rc != 0) die("dataloader: glob failed for '%s' (code %d)", glob_pattern, rc);
    dl->n_shards = (int)g.gl_pathc;
    dl->paths = (char **)mallocCheck((size_t)dl->n_shards * sizeof(char *));
    for (int s = 0; s < dl->n_shards; s++) {
        dl->paths[s] = (char *)mallocCheck(strlen(g.gl_pathv[s]) + 1);
        strcpy(dl->paths[s], g.gl_pathv[s]);
    }
    globfree(&g);
    dl->shard_tokens = (int64_t *)mallocCheck((size_t)dl->n_shards * sizeof(int64_t));
    dl->shard_has_mask = (int *)mallocCheck((size_t)dl->n_shards * sizeof(int));
    int64_t rows = 0;
    for (int s = 0; s < dl->n_shards; s++) {
        dl_check_header(dl, s);
        dl_check_contents(dl, s);
        dl->total_tokens += dl->shard_tokens[s];
        rows += dl_rows_upper_bound(dl, s);
    }
    if (rows == 0) {
        die("dataloader: no shard matching '%s' has the %d tokens one sequence needs (S + 1)", glob_pattern, S + 1);
    }
    dl->shard_order = (int64_t *)mallocCheck((size_t)dl->n_shards * sizeof(int64_t));
    dl->row_tokens = (uint32_t *)mallocCheck((size_t)(S + 1) * sizeof(uint32_t));
    dl->row_mask = (uint8_t *)mallocCheck((size_t)(S + 1));
    dl->inputs = (int *)mallocCheck((size_t)B * S * sizeof(int));
    dl->targets = (int *)mallocCheck((size_t)B * S * sizeof(int));
    dl_enter_epoch(dl, 0, 0);
}

// Fills dl->inputs and dl->targets (B, S) with the next B rows.
static inline void dataloader_next_batch(DataLoader *dl) {
    for (int b = 0; b < dl->B; b++) {
        dl_ensure_row(dl);
        int64_t r = dl->row_order[dl->cursor++];
        int *inputs = dl->inputs + (size_t)b * dl->S;
        int *targets = dl->targets + (size_t)b * dl->S;
        if (dl->mask != NULL) dl_fill_packed_row(dl, r, inputs, targets);
        else dl_fill_row(dl, inputs, targets, dl->tokens + r * dl->S, NULL);
    }
}

// Where the next batch starts (save it in a checkpoint).
static inline DataPosition dataloader_get_position(const DataLoader *dl) {
    DataPosition p = {dl->epoch, dl->shard_pos, dl->cursor, dl->S, dl->n_shards};
    return p;
}

// Continues from a saved position: the following batches equal those the saving run would have
// read. Dies when the position does not fit this loader (other S, other shard count, out of range).
static inline void dataloader_set_position(DataLoader *dl, DataPosition p) {
    if (p.seq_len != dl->S) die("dataloader: the saved data position is for sequence length %lld, this run uses %d", (long long)p.seq_len, dl->S);
    if (p.n_shards != dl->n_shards) die("dataloader: the saved data position is for %lld shards, %d match now", (long long)p.n_shards, dl->n_shards);
    if (p.epoch < 0 || p.shard < 0 || p.shard >= dl->n_shards) {
        die("dataloader: saved data position (epoch %lld, shard %lld) is out of range", (long long)p.epoch, (long long)p.shard);
    }
    dl_enter_epoch(dl, p.epoch, p.shard);
    if (p.cursor < 0 || p.cursor > dl->n_rows) {
        die("dataloader: saved data position row %lld is beyond the %lld rows of %s", (long long)p.cursor, (long long)dl->n_rows, dl->paths[dl->loaded]);
    }
    dl->cursor = p.cursor;
}

// Back to the start of epoch 0 (e.g. to evaluate on the same batches every time).
static inline void dataloader_reset(DataLoader *dl) {
    dl_enter_epoch(dl, 0, 0);
    dl->cursor = 0;
}

static inline void dataloader_free(DataLoader *dl) {
    for (int s = 0; s < dl->n_shards; s++) free(dl->paths[s]);
    free(dl->paths);
    free(dl->shard_tokens);
    free(dl->shard_has_mask);
    free(dl->tokens);
    free(dl->mask);
    free(dl->samples);
    free(dl->row_first);
    free(dl->row_order);
    free(dl->shard_order);
    free(dl->row_tokens);
    free(dl->row_mask);
    free(dl->inputs);
    free(dl->targets);
    memset(dl, 0, sizeof(*dl));
}

#endif  // DATALOADER_H

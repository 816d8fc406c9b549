// The tokenizer: token ids to bytes (sampling output) and text to token ids (prompts).
// Plain C. The file comes from scripts/tokenizer_export.py (a Hugging Face tokenizer.json).
//
// tokenizer.bin, little-endian:
//   header of TOKENIZER_HEADER_INTS int32:
//     [0] magic TOKENIZER_MAGIC ('M','T','S','K')   [1] version 1
//     [2] vocab_size (the model's; ids the tokenizer lacks are "unused" entries)
//     [3] bos_id  [4] eos_id  [5] pad_id  (-1 = none)
//     [6] kind: 1 byte-level BPE (Llama-3, Qwen2, GPT-2), 2 SentencePiece-style BPE with '\u2581'
//         for spaces and <0xXX> byte fallback (Llama-2, Mistral, Gemma)
//     [7] n_merges  [8] max_token_bytes
//     [9] pretokenizer for encoding: 0 none (decode-only file), 1 Llama-3 split regex,
//         2 Qwen2 split regex (single digits), 3 SentencePiece-style
//     [10] ignore_merges (1: a piece that is itself a token is emitted whole, as Llama-3 does)
//     [11] SentencePiece prepend of a space ('\u2581'): 0 never, 1 always (unless the segment
//          already starts with one), 2 first (same, only for the segment at the start of the text),
//          3 unconditional on every non-empty segment (the legacy Prepend normalizer)
//     [12] SentencePiece split (1: pieces start at every space, Metaspace split=true)
//     [13] unk_id (-1 none)  [14] n_tokenizer_vocab  [15] n_letter_ranges  [16] n_number_ranges
//     [17] normalizer: 0 none, 1 NFC (encode assumes its input is already NFC)
//     rest 0
//   then for each id 0..vocab_size-1: uint8 flags (TOK_FLAG_*), uint32 length, length raw bytes
//     (byte-level: GPT-2's byte<->unicode map undone; SentencePiece: '\u2581' -> ' ',
//     <0xXX> -> that byte; added tokens: their UTF-8 text)
//   then n_merges triples uint32 (left, right, merged) in priority order (first = applied first)
//   then n_letter_ranges + n_number_ranges pairs uint32 (lo, hi): inclusive code point ranges of
//     Unicode categories L and N, sorted, which the split regex needs.
//
// Encoding (tokenizer_encode) follows Hugging Face `tokenizers` for the supported pipelines:
// added tokens found literally in the text become their ids; each other segment is pre-tokenized
// (byte-level: a hand-written equivalent of the Llama-3 / Qwen2 split regex; SentencePiece: spaces
// become '\u2581', with the prepend and split rules above), then each piece is merged by BPE, lowest
// merge rank first, leftmost first on ties. SentencePiece characters without a token fall back to
// their <0xXX> byte tokens (else unk). No BOS is added: the caller prepends bos_id if it wants one.
// In decoded bytes '\u2581' is a space, so a literal U+2581 in a SentencePiece prompt is read as a
// space (Hugging Face cannot tell them apart either).
#ifndef TOKENIZER_H
#define TOKENIZER_H

#include <limits.h>
#include "utils.h"

#define TOKENIZER_MAGIC 0x4B53544Du  // bytes 'M','T','S','K'
#define TOKENIZER_VERSION 1
#define TOKENIZER_HEADER_INTS 256

enum { TOK_FLAG_SPECIAL = 1, TOK_FLAG_UNUSED = 2, TOK_FLAG_BYTE_FALLBACK = 4, TOK_FLAG_ADDED = 8 };
enum { TOKENIZER_BYTE_LEVEL = 1, TOKENIZER_SENTENCEPIECE = 2 };
enum { PRETOK_NONE = 0, PRETOK_LLAMA3 = 1, PRETOK_QWEN2 = 2, PRETOK_SENTENCEPIECE = 3 };
enum { PREPEND_NEVER = 0, PREPEND_ALWAYS = 1, PREPEND_FIRST = 2, PREPEND_UNCONDITIONAL = 3 };

typedef struct {
    int vocab_size, bos_id, eos_id, pad_id, unk_id;
    int kind, pretokenizer, ignore_merges, sp_prepend, sp_split, normalizer;
    int n_merges, max_token_bytes, n_tokenizer_vocab;
    uint8_t *flags;             // (vocab_size) TOK_FLAG_*
    uint32_t *offsets;          // (vocab_size + 1) token i is bytes[offsets[i] .. offsets[i+1])
    unsigned char *bytes;       // every token's bytes, concatenated
    uint32_t *merges;           // (n_merges, 3) left, right, merged
    uint32_t *letter_ranges;    // (n_letter_ranges, 2)
    uint32_t *number_ranges;    // (n_number_ranges, 2)
    int n_letter_ranges, n_number_ranges;
    uint64_t *pair_keys;        // open-addressing hash: (left << 32 | right) -> merge rank
    int32_t *pair_rank;         // (pair_cap) -1 = empty slot
    size_t pair_cap;
    int32_t *str_slots;         // open-addressing hash: token bytes -> id (plain tokens only)
    size_t str_cap;
    int32_t byte_fallback[256]; // id of <0xXX> for each byte, -1 if none
    int32_t *added_ids;         // added tokens, longest first (matched literally in the text)
    int n_added;
    const char *path;
} Tokenizer;

// ---------------------------------------------------------------------------------------------
// Loading

// A bounds-checked cursor over the file bytes: every read names what it was reading.
typedef struct {
    const unsigned char *data;
    size_t size, pos;
    const char *path;
} TokReader;

static inline const unsigned char *tok_reader_take(TokReader *r, size_t n, const char *what) {
    if (n > r->size - r->pos) {
        die("%s: truncated tokenizer.bin: %s needs %zu bytes at offset %zu but the file has %zu",
            r->path, what, n, r->pos, r->size);
    }
    const unsigned char *p = r->data + r->pos;
    r->pos += n;
    return p;
}

static inline uint32_t tok_reader_u32(TokReader *r, const char *what) {
    uint32_t v;
    memcpy(&v, tok_reader_take(r, 4, what), 4);
    return v;
}

// FNV-1a hash of a byte string.
static inline uint64_t tok_hash_bytes(const unsigned char *s, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ s[i]) * 1099511628211ull;
    return h;
}

static inline uint64_t tok_hash_u64(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    return x;
}

static inline size_t tok_table_capacity(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap *= 2;
    return cap;
}

static inline const unsigned char *tok_bytes_of(const Tokenizer *t, int id, size_t *len) {
    *len = t->offsets[id + 1] - t->offsets[id];
    return t->bytes + t->offsets[id];
}

// The plain token whose bytes are s[0..n), or -1.
static inline int tok_lookup_bytes(const Tokenizer *t, const unsigned char *s, size_t n) {
    size_t mask = t->str_cap - 1;
    for (size_t slot = tok_hash_bytes(s, n) & mask;; slot = (slot + 1) & mask) {
        int id = t->str_slots[slot];
        if (id < 0) return -1;
        size_t len;
        const unsigned char *b = tok_bytes_of(t, id, &len);
        if (len == n && memcmp(b, s, n) == 0) return id;
    }
}

// Merge rank of the pair (left, right), or -1 when the pair never merges.
static inline int tok_lookup_pair(const Tokenizer *t, int left, int right) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32) | (uint32_t)right;
    size_t mask = t->pair_cap - 1;
    for (size_t slot = tok_hash_u64(key) & mask;; slot = (slot + 1) & mask) {
        if (t->pair_rank[slot] < 0) return -1;
        if (t->pair_keys[slot] == key) return t->pair_rank[slot];
    }
}

static inline int tok_is_plain(const Tokenizer *t, int id) {
    return (t->flags[id] & (TOK_FLAG_UNUSED | TOK_FLAG_BYTE_FALLBACK | TOK_FLAG_ADDED)) == 0;
}

// Builds the lookup tables: bytes -> id (lowest id wins on duplicates), pair -> rank (first
// merge wins), byte -> fallback id, and the added tokens sorted longest first.
static inline void tokenizer_build_tables(Tokenizer *t) {
    t->str_cap = tok_table_capacity((size_t)t->vocab_size);
    t->str_slots = (int32_t *)mallocCheck(t->str_cap * sizeof(int32_t));
    memset(t->str_slots, 0xff, t->str_cap * sizeof(int32_t));
    for (int i = 0; i < 256; i++) t->byte_fallback[i] = -1;
    t->added_ids = (int32_t *)mallocCheck((size_t)t->vocab_size * sizeof(int32_t));
    t->n_added = 0;
    for (int id = 0; id < t->vocab_size; id++) {
        size_t len;
        const unsigned char *b = tok_bytes_of(t, id, &len);
        if ((t->flags[id] & TOK_FLAG_BYTE_FALLBACK) && len == 1 && t->byte_fallback[b[0]] < 0) t->byte_fallback[b[0]] = id;
        if ((t->flags[id] & TOK_FLAG_ADDED) && len > 0) t->added_ids[t->n_added++] = id;
        if (!tok_is_plain(t, id) || len == 0 || tok_lookup_bytes(t, b, len) >= 0) continue;
        size_t slot = tok_hash_bytes(b, len) & (t->str_cap - 1);
        while (t->str_slots[slot] >= 0) slot = (slot + 1) & (t->str_cap - 1);
        t->str_slots[slot] = id;
    }
    for (int i = 1; i < t->n_added; i++) {  // insertion sort by length, longest first
        int id = t->added_ids[i], j = i;
        uint32_t len = t->offsets[id + 1] - t->offsets[id];
        while (j > 0 && t->offsets[t->added_ids[j - 1] + 1] - t->offsets[t->added_ids[j - 1]] < len) {
            t->added_ids[j] = t->added_ids[j - 1];
            j--;
        }
        t->added_ids[j] = id;
    }
    t->pair_cap = tok_table_capacity((size_t)t->n_merges);
    t->pair_keys = (uint64_t *)mallocCheck(t->pair_cap * sizeof(uint64_t));
    t->pair_rank = (int32_t *)mallocCheck(t->pair_cap * sizeof(int32_t));
    memset(t->pair_rank, 0xff, t->pair_cap * sizeof(int32_t));
    for (int r = 0; r < t->n_merges; r++) {
        const uint32_t *m = t->merges + 3 * (size_t)r;
        if (tok_lookup_pair(t, (int)m[0], (int)m[1]) >= 0) continue;
        uint64_t key = ((uint64_t)m[0] << 32) | m[1];
        size_t slot = tok_hash_u64(key) & (t->pair_cap - 1);
        while (t->pair_rank[slot] >= 0) slot = (slot + 1) & (t->pair_cap - 1);
        t->pair_keys[slot] = key;
        t->pair_rank[slot] = r;
    }
}

static inline void tok_check_id(const char *path, const char *name, int id, int vocab_size) {
    if (id < -1 || id >= vocab_size) die("%s: %s %d is out of range (vocab_size %d)", path, name, id, vocab_size);
}

static inline void tok_check_range(const char *path, const char *name, int v, int lo, int hi) {
    if (v < lo || v > hi) die("%s: header field %s = %d is outside [%d, %d]", path, name, v, lo, hi);
}

// Reads and validates the header fields (magic, version, sizes, ids, enums).
static inline void tokenizer_read_header(Tokenizer *t, TokReader *r) {
    int32_t h[TOKENIZER_HEADER_INTS];
    memcpy(h, tok_reader_take(r, sizeof(h), "the header"), sizeof(h));
    if ((uint32_t)h[0] != TOKENIZER_MAGIC) {
        die("%s: not a tokenizer.bin (magic 0x%08x, expected 0x%08x); export one with "
            "scripts/tokenizer_export.py", t->path, (uint32_t)h[0], TOKENIZER_MAGIC);
    }
    if (h[1] != TOKENIZER_VERSION) {
        die("%s: unsupported tokenizer.bin version %d (this program reads version %d)", t->path, h[1], TOKENIZER_VERSION);
    }
    t->vocab_size = h[2];
    t->bos_id = h[3];
    t->eos_id = h[4];
    t->pad_id = h[5];
    t->kind = h[6];
    t->n_merges = h[7];
    t->max_token_bytes = h[8];
    t->pretokenizer = h[9];
    t->ignore_merges = h[10];
    t->sp_prepend = h[11];
    t->sp_split = h[12];
    t->unk_id = h[13];
    t->n_tokenizer_vocab = h[14];
    t->n_letter_ranges = h[15];
    t->n_number_ranges = h[16];
    t->normalizer = h[17];
    tok_check_range(t->path, "vocab_size", t->vocab_size, 1, 1 << 26);
    tok_check_range(t->path, "kind", t->kind, TOKENIZER_BYTE_LEVEL, TOKENIZER_SENTENCEPIECE);
    tok_check_range(t->path, "n_merges", t->n_merges, 0, 1 << 26);
    tok_check_range(t->path, "max_token_bytes", t->max_token_bytes, 0, 1 << 20);
    tok_check_range(t->path, "pretokenizer", t->pretokenizer, PRETOK_NONE, PRETOK_SENTENCEPIECE);
    tok_check_range(t->path, "ignore_merges", t->ignore_merges, 0, 1);
    tok_check_range(t->path, "sp_prepend", t->sp_prepend, PREPEND_NEVER, PREPEND_UNCONDITIONAL);
    tok_check_range(t->path, "sp_split", t->sp_split, 0, 1);
    tok_check_range(t->path, "n_tokenizer_vocab", t->n_tokenizer_vocab, 1, t->vocab_size);
    tok_check_range(t->path, "n_letter_ranges", t->n_letter_ranges, 0, 1 << 20);
    tok_check_range(t->path, "n_number_ranges", t->n_number_ranges, 0, 1 << 20);
    tok_check_range(t->path, "normalizer", t->normalizer, 0, 1);
    int sp = t->kind == TOKENIZER_SENTENCEPIECE;
    if (t->pretokenizer != PRETOK_NONE && sp != (t->pretokenizer == PRETOK_SENTENCEPIECE)) {
        die("%s: pretokenizer %d does not fit tokenizer kind %d", t->path, t->pretokenizer, t->kind);
    }
    tok_check_id(t->path, "bos_id", t->bos_id, t->vocab_size);
    tok_check_id(t->path, "eos_id", t->eos_id, t->vocab_size);
    tok_check_id(t->path, "pad_id", t->pad_id, t->vocab_size);
    tok_check_id(t->path, "unk_id", t->unk_id, t->vocab_size);
}

// Reads the per-id entries: flags, length, bytes.
static inline void tokenizer_read_tokens(Tokenizer *t, TokReader *r) {
    t->flags = (uint8_t *)mallocCheck((size_t)t->vocab_size);
    t->offsets = (uint32_t *)mallocCheck(((size_t)t->vocab_size + 1) * sizeof(uint32_t));
    size_t start = r->pos, total = 0;
    for (int id = 0; id < t->vocab_size; id++) {
        t->flags[id] = *tok_reader_take(r, 1, "a token's flags");
        uint32_t len = tok_reader_u32(r, "a token's length");
        if (t->flags[id] & ~(TOK_FLAG_SPECIAL | TOK_FLAG_UNUSED | TOK_FLAG_BYTE_FALLBACK | TOK_FLAG_ADDED)) {
            die("%s: token %d has unknown flags 0x%02x", t->path, id, t->flags[id]);
        }
        if (len > (uint32_t)t->max_token_bytes) {
            die("%s: token %d is %u bytes long, more than max_token_bytes %d", t->path, id, len, t->max_token_bytes);
        }
        tok_reader_take(r, len, "a token's bytes");
        t->offsets[id] = (uint32_t)total;
        total += len;
    }
    t->offsets[t->vocab_size] = (uint32_t)total;
    t->bytes = (unsigned char *)mallocCheck(total);
    size_t pos = start;
    for (int id = 0; id < t->vocab_size; id++) {
        uint32_t len = t->offsets[id + 1] - t->offsets[id];
        memcpy(t->bytes + t->offsets[id], r->data + pos + 5, len);
        pos += 5 + len;
    }
}

// Reads the merge triples and the Unicode ranges, checking ids and ranges.
static inline void tokenizer_read_tables(Tokenizer *t, TokReader *r) {
    size_t n = 3 * (size_t)t->n_merges;
    t->merges = (uint32_t *)mallocCheck(n * sizeof(uint32_t) + 1);
    memcpy(t->merges, tok_reader_take(r, n * sizeof(uint32_t), "the merges"), n * sizeof(uint32_t));
    for (size_t i = 0; i < n; i++) {
        if (t->merges[i] >= (uint32_t)t->vocab_size) {
            die("%s: merge %zu refers to token %u, outside the vocabulary (%d)", t->path, i / 3, t->merges[i], t->vocab_size);
        }
    }
    size_t nr = 2 * ((size_t)t->n_letter_ranges + (size_t)t->n_number_ranges);
    uint32_t *ranges = (uint32_t *)mallocCheck(nr * sizeof(uint32_t) + 1);
    memcpy(ranges, tok_reader_take(r, nr * sizeof(uint32_t), "the Unicode ranges"), nr * sizeof(uint32_t));
    for (size_t i = 0; i < nr; i += 2) {
        if (ranges[i] > ranges[i + 1] || ranges[i + 1] > 0x10FFFF) die("%s: bad Unicode range %zu", t->path, i / 2);
    }
    t->letter_ranges = ranges;
    t->number_ranges = ranges + 2 * (size_t)t->n_letter_ranges;
    if (r->pos != r->size) die("%s: %zu unexpected bytes after the end of the tokenizer data", t->path, r->size - r->pos);
}

// Loads and validates tokenizer.bin; dies with a clear message on any malformed file.
static inline void tokenizer_init(Tokenizer *t, const char *path) {
    memset(t, 0, sizeof(*t));
    t->path = path;
    FILE *f = fopenCheck(path, "rb");
    long size = file_size_bytes(f, path);
    unsigned char *data = (unsigned char *)mallocCheck((size_t)size + 1);
    freadCheck(data, 1, (size_t)size, f, path);
    fcloseCheck(f, path);
    TokReader r = {data, (size_t)size, 0, path};
    tokenizer_read_header(t, &r);
    tokenizer_read_tokens(t, &r);
    tokenizer_read_tables(t, &r);
    free(data);
    tokenizer_build_tables(t);
}

// The bytes of token `id` (not NUL-terminated; *len set). Dies on an id outside the vocabulary.
// Unused ids (padding rows of the embedding) decode to zero bytes.
static inline const unsigned char *tokenizer_decode(const Tokenizer *t, int id, size_t *len) {
    if (id < 0 || id >= t->vocab_size) {
        die("%s: token id %d is out of range (vocab_size %d)", t->path, id, t->vocab_size);
    }
    return tok_bytes_of(t, id, len);
}

// 1 if decoding should drop the space that the encoder prepends to the text (SentencePiece-style
// tokenizers that prepend one: HF's decoder strips it from the first token).
static inline int tokenizer_strips_leading_space(const Tokenizer *t) {
    return t->kind == TOKENIZER_SENTENCEPIECE && t->sp_prepend != PREPEND_NEVER;
}

// ---------------------------------------------------------------------------------------------
// Encoding

typedef struct {
    int *ids;
    int n, max;
} TokOut;

static inline void tok_emit(TokOut *out, int id) {
    if (out->n >= out->max) die("tokenizer_encode: the text needs more than %d tokens", out->max);
    out->ids[out->n++] = id;
}

static inline int tok_in_ranges(const uint32_t *ranges, int n, uint32_t c) {
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        if (c < ranges[2 * mid]) hi = mid - 1;
        else if (c > ranges[2 * mid + 1]) lo = mid + 1;
        else return 1;
    }
    return 0;
}

static inline int tok_is_letter(const Tokenizer *t, uint32_t c) { return tok_in_ranges(t->letter_ranges, t->n_letter_ranges, c); }
static inline int tok_is_number(const Tokenizer *t, uint32_t c) { return tok_in_ranges(t->number_ranges, t->n_number_ranges, c); }
static inline int tok_is_newline(uint32_t c) { return c == '\r' || c == '\n'; }

// Unicode White_Space (what the regex's \s matches).
static inline int tok_is_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// [^\s\p{L}\p{N}]
static inline int tok_is_other(const Tokenizer *t, uint32_t c) {
    return !tok_is_space(c) && !tok_is_letter(t, c) && !tok_is_number(t, c);
}

// Decodes one UTF-8 character of s[0..n) into *cp; returns its byte length. Dies on invalid UTF-8
// (`at` is the offset in the text, for the message).
static inline size_t tok_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp, size_t at) {
    unsigned char c = s[0];
    size_t len = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 0;
    if (len == 0 || len > n) die("tokenizer_encode: the text is not valid UTF-8 at byte %zu", at);
    uint32_t v = len == 1 ? c : (uint32_t)(c & (0x7F >> len));
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) die("tokenizer_encode: the text is not valid UTF-8 at byte %zu", at + i);
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

// End (code point index) of the Llama-3 / Qwen2 split-regex match that starts at cp[i]:
//   (?i:'s|'t|'re|'ve|'m|'ll|'d) | [^\r\n\p{L}\p{N}]?\p{L}+ | \p{N}{1,max_digits}
//   | ?[^\s\p{L}\p{N}]+[\r\n]* | \s*[\r\n]+ | \s+(?!\S) | \s+
// Alternatives are tried in that order, as the regex engine does.
static inline size_t tok_split_match(const Tokenizer *t, const uint32_t *cp, size_t n, size_t i, int max_digits) {
    if (cp[i] == '\'' && i + 1 < n) {
        uint32_t a = cp[i + 1] | 0x20, b = i + 2 < n ? (cp[i + 2] | 0x20) : 0;
        if (cp[i + 1] < 0x80 && (a == 's' || a == 't' || a == 'm' || a == 'd')) return i + 2;
        if (cp[i + 1] < 0x80 && i + 2 < n && cp[i + 2] < 0x80 &&
            ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))) return i + 3;
    }
    size_t j = i;
    if (!tok_is_newline(cp[j]) && !tok_is_letter(t, cp[j]) && !tok_is_number(t, cp[j]) && j + 1 < n && tok_is_letter(t, cp[j + 1])) j++;
    if (tok_is_letter(t, cp[j])) {
        while (j < n && tok_is_letter(t, cp[j])) j++;
        return j;
    }
    if (tok_is_number(t, cp[i])) {
        j = i;
        while (j < n && (int)(j - i) < max_digits && tok_is_number(t, cp[j])) j++;
        return j;
    }
    j = (cp[i] == ' ' && i + 1 < n && tok_is_other(t, cp[i + 1])) ? i + 1 : i;
    if (tok_is_other(t, cp[j])) {
        while (j < n && tok_is_other(t, cp[j])) j++;
        while (j < n && tok_is_newline(cp[j])) j++;
        return j;
    }
    size_t end = i;  // cp[i] is whitespace
    while (end < n && tok_is_space(cp[end])) end++;
    for (size_t k = end; k > i; k--) {
        if (tok_is_newline(cp[k - 1])) return k;
    }
    if (end == n || end - i == 1) return end;
    return end - 1;
}

// BPE on one pre-tokenized piece whose initial symbols are syms[0..n): repeatedly merges the
// adjacent pair of lowest merge rank (leftmost on ties) until no pair merges, then emits.
static inline void tok_bpe_merge(const Tokenizer *t, int *syms, int n, TokOut *out) {
    int *rank = (int *)mallocCheck((size_t)(n > 0 ? n : 1) * sizeof(int));
    for (int i = 0; i + 1 < n; i++) rank[i] = tok_lookup_pair(t, syms[i], syms[i + 1]);
    while (n > 1) {
        int best = -1;
        for (int i = 0; i + 1 < n; i++) {
            if (rank[i] >= 0 && (best < 0 || rank[i] < rank[best])) best = i;
        }
        if (best < 0) break;
        syms[best] = (int)t->merges[3 * (size_t)rank[best] + 2];
        memmove(syms + best + 1, syms + best + 2, (size_t)(n - best - 2) * sizeof(int));
        memmove(rank + best + 1, rank + best + 2, (size_t)(n > best + 2 ? n - best - 3 : 0) * sizeof(int));
        n--;
        if (best > 0) rank[best - 1] = tok_lookup_pair(t, syms[best - 1], syms[best]);
        if (best + 1 < n) rank[best] = tok_lookup_pair(t, syms[best], syms[best + 1]);
    }
    for (int i = 0; i < n; i++) tok_emit(out, syms[i]);
    free(rank);
}

// Initial symbols of a piece: byte-level: one token per byte; SentencePiece: one token per UTF-8
// character, else its <0xXX> byte tokens, else unk. Returns the symbol count.
static inline int tok_initial_symbols(const Tokenizer *t, const unsigned char *s, size_t n, int *syms) {
    int count = 0;
    for (size_t i = 0; i < n;) {
        size_t len = 1;
        if (t->kind == TOKENIZER_SENTENCEPIECE) {
            uint32_t cp;
            len = tok_utf8_decode(s + i, n - i, &cp, i);
        }
        int id = tok_lookup_bytes(t, s + i, len);
        if (id >= 0) {
            syms[count++] = id;
        } else if (t->kind == TOKENIZER_BYTE_LEVEL) {
            die("%s: byte 0x%02x has no token: cannot encode", t->path, s[i]);
        } else {
            int all = 1;
            for (size_t k = 0; k < len; k++) all = all && t->byte_fallback[s[i + k]] >= 0;
            if (!all && t->unk_id < 0) die("%s: character at byte %zu has no token, no byte fallback and no unk", t->path, i);
            if (all) {
                for (size_t k = 0; k < len; k++) syms[count++] = t->byte_fallback[s[i + k]];
            } else {
                syms[count++] = t->unk_id;
            }
        }
        i += len;
    }
    return count;
}

// Encodes one pre-tokenized piece s[0..n).
static inline void tok_encode_piece(const Tokenizer *t, const unsigned char *s, size_t n, TokOut *out) {
    if (n == 0) return;
    if (t->ignore_merges) {
        int whole = tok_lookup_bytes(t, s, n);
        if (whole >= 0) {
            tok_emit(out, whole);
            return;
        }
    }
    int *syms = (int *)mallocCheck(n * sizeof(int));
    int count = tok_initial_symbols(t, s, n, syms);
    tok_bpe_merge(t, syms, count, out);
    free(syms);
}

// Byte-level segment: split by the regex, then BPE each piece.
static inline void tok_encode_byte_level(const Tokenizer *t, const unsigned char *s, size_t n, TokOut *out) {
    uint32_t *cp = (uint32_t *)mallocCheck((n + 1) * sizeof(uint32_t));
    size_t *at = (size_t *)mallocCheck((n + 1) * sizeof(size_t));  // byte offset of each code point
    size_t count = 0;
    for (size_t i = 0; i < n; count++) {
        at[count] = i;
        i += tok_utf8_decode(s + i, n - i, &cp[count], i);
    }
    at[count] = n;
    int max_digits = t->pretokenizer == PRETOK_LLAMA3 ? 3 : 1;
    for (size_t i = 0; i < count;) {
        size_t end = tok_split_match(t, cp, count, i, max_digits);
        tok_encode_piece(t, s + at[i], at[end] - at[i], out);
        i = end;
    }
    free(cp);
    free(at);
}

// SentencePiece-style segment: (in decoded bytes, where '\u2581' is ' ') prepend a space by the
// scheme, split before spaces when asked, then BPE each piece. `at_start`: the segment begins the text.
static inline void tok_encode_sentencepiece(const Tokenizer *t, const unsigned char *s, size_t n, int at_start, TokOut *out) {
    unsigned char *buf = (unsigned char *)mallocCheck(n + 1);
    size_t m = 0;
    for (size_t i = 0; i < n;) {  // a literal U+2581 (E2 96 81) is a space after HF's normalization
        if (i + 2 < n && s[i] == 0xE2 && s[i + 1] == 0x96 && s[i + 2] == 0x81) {
            buf[m++] = ' ';
            i += 3;
        } else {
            buf[m++] = s[i++];
        }
    }
    int starts_with_space = m > 0 && buf[0] == ' ';
    int prepend = (t->sp_prepend == PREPEND_UNCONDITIONAL) ||
                  (t->sp_prepend == PREPEND_ALWAYS && !starts_with_space) ||
                  (t->sp_prepend == PREPEND_FIRST && at_start && !starts_with_space);
    unsigned char *text = (unsigned char *)mallocCheck(m + 2);
    text[0] = ' ';
    memcpy(text + 1, buf, m);
    unsigned char *p = prepend ? text : text + 1;
    size_t len = prepend ? m + 1 : m;
    size_t begin = 0;
    for (size_t i = 1; i <= len; i++) {
        if (i == len || (t->sp_split && p[i] == ' ')) {
            tok_encode_piece(t, p + begin, i - begin, out);
            begin = i;
        }
    }
    free(buf);
    free(text);
}

static inline void tok_encode_segment(const Tokenizer *t, const unsigned char *s, size_t n, int at_start, TokOut *out) {
    if (n == 0) return;
    if (t->kind == TOKENIZER_BYTE_LEVEL) tok_encode_byte_level(t, s, n, out);
    else tok_encode_sentencepiece(t, s, n, at_start, out);
}

// The added token (longest first) that matches s[0..n) at its start, or -1.
static inline int tok_match_added(const Tokenizer *t, const unsigned char *s, size_t n) {
    for (int k = 0; k < t->n_added; k++) {
        size_t len;
        const unsigned char *b = tok_bytes_of(t, t->added_ids[k], &len);
        if (len <= n && b[0] == s[0] && memcmp(b, s, len) == 0) return t->added_ids[k];
    }
    return -1;
}

// Encodes the NUL-terminated UTF-8 `text` into out_ids (room for max_ids); returns the count.
// No BOS is added. Dies when the file is decode-only, the text is not UTF-8, or max_ids is too small.
static inline int tokenizer_encode(const Tokenizer *t, const char *text, int *out_ids, int max_ids) {
    if (t->pretokenizer == PRETOK_NONE) {
        die("%s: this tokenizer's pre-tokenizer is not supported for encoding (decode only); "
            "see the note that scripts/tokenizer_export.py printed", t->path);
    }
    TokOut out = {out_ids, 0, max_ids};
    const unsigned char *s = (const unsigned char *)text;
    size_t n = strlen(text), seg = 0;
    for (size_t i = 0; i < n;) {
        int id = tok_match_added(t, s + i, n - i);
        if (id < 0) {
            i++;
            continue;
        }
        tok_encode_segment(t, s + seg, i - seg, seg == 0, &out);
        tok_emit(&out, id);
        i += t->offsets[id + 1] - t->offsets[id];
        seg = i;
    }
    tok_encode_segment(t, s + seg, n - seg, seg == 0, &out);
    return out.n;
}

static inline void tokenizer_free(Tokenizer *t) {
    free(t->flags);
    free(t->offsets);
    free(t->bytes);
    free(t->merges);
    free(t->letter_ranges);
    free(t->pair_keys);
    free(t->pair_rank);
    free(t->str_slots);
    free(t->added_ids);
    memset(t, 0, sizeof(*t));
}

#endif  // TOKENIZER_H

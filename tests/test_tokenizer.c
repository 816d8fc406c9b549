// Tokenizer tests: our C encoder and decoder against Hugging Face `tokenizers` on two small
// tokenizers (byte-level BPE with the Llama-3 split regex, and SentencePiece-style BPE with byte
// fallback) and the shipped data/default tokenizer, references by tests/tokenizer/make_fixtures.py; then every error path of tokenizer_init /
// tokenizer_decode on broken files, each in a forked child that must exit 1 with a clear message.
//
// Build and run (from the repository root):
//   gcc -O2 -Wall -Wextra -I. tests/test_tokenizer.c -o build/test_tokenizer && ./build/test_tokenizer
#include "tensor_file.h"
#include "tests/test_util.h"
#include "tokenizer.h"

static TestReport g_report = {0, 0};

// ---------------------------------------------------------------------------------------------
// Encode / decode against the reference

// The int32-per-element tensor `name` of the bundle as bytes / ids.
static const NamedTensor *get_i32(const TensorFile *tf, const char *name, const char *path) {
    const NamedTensor *t = tensor_file_get(tf, name, path);
    if (t->dtype != TENSOR_I32) die("%s: tensor '%s' is not int32", path, name);
    return t;
}

static char *tensor_to_string(const NamedTensor *t) {
    char *s = (char *)mallocCheck(t->numel + 1);
    for (size_t i = 0; i < t->numel; i++) s[i] = (char)((const int32_t *)t->data)[i];
    s[t->numel] = '\0';
    return s;
}

// Concatenated bytes of ids (dropping the prepended space when the tokenizer's decoder does).
static char *decode_all(const Tokenizer *t, const int *ids, int n, size_t *out_len) {
    size_t cap = 1, len = 0;
    for (int i = 0; i < n; i++) {
        size_t l;
        tokenizer_decode(t, ids[i], &l);
        cap += l;
    }
    char *s = (char *)mallocCheck(cap);
    for (int i = 0; i < n; i++) {
        size_t l;
        const unsigned char *b = tokenizer_decode(t, ids[i], &l);
        memcpy(s + len, b, l);
        len += l;
    }
    s[len] = '\0';
    if (tokenizer_strips_leading_space(t) && len > 0 && s[0] == ' ') {
        memmove(s, s + 1, len);
        len--;
    }
    *out_len = len;
    return s;
}

// Checks one tokenizer: every text's encoding equals HF's ids and decoding equals HF's text.
static void check_fixture(const char *name, const char *tok_path) {
    char ref_path[256];
    snprintf(ref_path, sizeof(ref_path), "tests/tokenizer/%s/expected.bin", name);
    Tokenizer t;
    tokenizer_init(&t, tok_path);
    TensorFile ref;
    tensor_file_load(&ref, ref_path);
    int count = ((const int32_t *)get_i32(&ref, "count", ref_path)->data)[0];
    printf("\n%s (vocab %d, %d merges, kind %d, pretokenizer %d)\n", name, t.vocab_size, t.n_merges, t.kind, t.pretokenizer);
    printf("  %-4s %-22s %8s %8s %10s %8s\n", "text", "start", "ids HF", "ids C", "id diffs", "decode");
    for (int k = 0; k < count; k++) {
        char key[32];
        snprintf(key, sizeof(key), "text_%d", k);
        char *text = tensor_to_string(get_i32(&ref, key, ref_path));
        snprintf(key, sizeof(key), "ids_%d", k);
        const NamedTensor *ref_ids = get_i32(&ref, key, ref_path);
        snprintf(key, sizeof(key), "decoded_%d", k);
        char *ref_text = tensor_to_string(get_i32(&ref, key, ref_path));
        int max_ids = 4 * (int)strlen(text) + 16;
        int *ids = (int *)mallocCheck((size_t)max_ids * sizeof(int));
        int n = tokenizer_encode(&t, text, ids, max_ids);
        int diffs = n == (int)ref_ids->numel ? 0 : 1 + abs(n - (int)ref_ids->numel);
        for (int i = 0; i < n && i < (int)ref_ids->numel; i++) diffs += ids[i] != ((const int32_t *)ref_ids->data)[i];
        size_t dec_len;
        const int32_t *hf_ids = (const int32_t *)ref_ids->data;
        int *hf_as_int = (int *)mallocCheck((ref_ids->numel + 1) * sizeof(int));
        for (size_t i = 0; i < ref_ids->numel; i++) hf_as_int[i] = hf_ids[i];
        char *dec = decode_all(&t, hf_as_int, (int)ref_ids->numel, &dec_len);
        int dec_ok = dec_len == strlen(ref_text) && memcmp(dec, ref_text, dec_len) == 0;
        char shown[23];
        size_t m = 0;
        for (size_t i = 0; text[i] && m < 20; i++) shown[m++] = (text[i] == '\n' || text[i] == '\t' || text[i] == '\r') ? ' ' : text[i];
        shown[m] = '\0';
        printf("  %-4d %-22s %8zu %8d %10d %8s\n", k, shown, ref_ids->numel, n, diffs, dec_ok ? "ok" : "FAIL");
        test_record(&g_report, diffs == 0 && dec_ok);
        free(text);
        free(ref_text);
        free(ids);
        free(hf_as_int);
        free(dec);
    }
    tensor_file_free(&ref);
    tokenizer_free(&t);
}

// ---------------------------------------------------------------------------------------------
// Error paths, each in a forked child


static void run_init(void *path) {
    Tokenizer t;
    tokenizer_init(&t, (const char *)path);
}

static void run_decode_out_of_range(void *path) {
    Tokenizer t;
    tokenizer_init(&t, (const char *)path);
    size_t len;
    tokenizer_decode(&t, t.vocab_size, &len);
}

static void run_encode_decode_only(void *path) {
    Tokenizer t;
    tokenizer_init(&t, (const char *)path);
    int ids[16];
    tokenizer_encode(&t, "hello", ids, 16);
}

static void run_encode_too_small(void *path) {
    Tokenizer t;
    tokenizer_init(&t, (const char *)path);
    int ids[2];
    tokenizer_encode(&t, "a longer sentence than two tokens", ids, 2);
}

static void run_encode_bad_utf8(void *path) {
    Tokenizer t;
    tokenizer_init(&t, (const char *)path);
    int ids[16];
    tokenizer_encode(&t, "ab\xC3(", ids, 16);
}

static unsigned char *read_all(const char *path, size_t *size) {
    FILE *f = fopenCheck(path, "rb");
    *size = (size_t)file_size_bytes(f, path);
    unsigned char *data = (unsigned char *)mallocCheck(*size);
    freadCheck(data, 1, *size, f, path);
    fcloseCheck(f, path);
    return data;
}

static void write_all(const char *path, const unsigned char *data, size_t size) {
    FILE *f = fopenCheck(path, "wb");
    fwriteCheck(data, 1, size, f, path);
    fcloseCheck(f, path);
}

// Writes a copy of `good` with int32 header slot `slot` set to `value` (slot < 0: unchanged),
// cut to `size` bytes, optionally with extra trailing bytes.
static void write_variant(const char *path, const unsigned char *good, size_t size, int slot, int32_t value, size_t extra) {
    unsigned char *data = (unsigned char *)callocCheck(size + extra, 1);
    memcpy(data, good, size);
    if (slot >= 0) memcpy(data + 4 * slot, &value, 4);
    write_all(path, data, size + extra);
    free(data);
}

static void check_errors(void) {
    const char *good_path = "tests/tokenizer/bytelevel/tokenizer.bin";
    size_t size;
    unsigned char *good = read_all(good_path, &size);
    char dir[] = "/tmp/test_tokenizer_XXXXXX";
    if (mkdtemp(dir) == NULL) die("mkdtemp failed");
    char p[16][320];
    for (int i = 0; i < 16; i++) snprintf(p[i], sizeof(p[i]), "%s/bad%d.bin", dir, i);
    write_variant(p[0], good, size, 0, 0x12345678, 0);
    write_variant(p[1], good, size, 1, 2, 0);
    write_variant(p[2], good, size / 2, -1, 0, 0);
    write_variant(p[3], good, 100, -1, 0, 0);
    write_variant(p[4], good, size, 3, 1 << 20, 0);
    write_variant(p[5], good, size, 6, 7, 0);
    write_variant(p[6], good, size, -1, 0, 3);
    write_variant(p[7], good, size, 8, 1, 0);
    write_variant(p[8], good, size, 9, PRETOK_NONE, 0);
    write_variant(p[9], good, size, 9, PRETOK_SENTENCEPIECE, 0);
    unsigned char *bad_flags = (unsigned char *)mallocCheck(size);
    memcpy(bad_flags, good, size);
    bad_flags[TOKENIZER_HEADER_INTS * 4] = 0x80;  // flags of token 0
    write_all(p[10], bad_flags, size);
    unsigned char *bad_merge = (unsigned char *)mallocCheck(size);
    memcpy(bad_merge, good, size);
    int32_t h[TOKENIZER_HEADER_INTS];
    memcpy(h, good, sizeof(h));
    size_t merges_at = size - 8 * (size_t)(h[15] + h[16]) - 12 * (size_t)h[7];
    uint32_t huge = 0x7fffffff;
    memcpy(bad_merge + merges_at, &huge, 4);
    write_all(p[11], bad_merge, size);
    printf("\nerror paths (forked child must exit 1 with the phrase)\n");
    test_expect_exit(&g_report, "missing file", run_init, (void *)"/nonexistent/tokenizer.bin", 1, "cannot open");
    test_expect_exit(&g_report, "bad magic", run_init, (void *)p[0], 1, "not a tokenizer.bin");
    test_expect_exit(&g_report, "bad version", run_init, (void *)p[1], 1, "unsupported tokenizer.bin version 2");
    test_expect_exit(&g_report, "truncated (half)", run_init, (void *)p[2], 1, "truncated tokenizer.bin");
    test_expect_exit(&g_report, "truncated header", run_init, (void *)p[3], 1, "truncated tokenizer.bin: the header");
    test_expect_exit(&g_report, "bos id out of range", run_init, (void *)p[4], 1, "bos_id 1048576 is out of range");
    test_expect_exit(&g_report, "unknown kind", run_init, (void *)p[5], 1, "header field kind = 7");
    test_expect_exit(&g_report, "trailing bytes", run_init, (void *)p[6], 1, "3 unexpected bytes");
    test_expect_exit(&g_report, "token longer than max", run_init, (void *)p[7], 1, "more than max_token_bytes 1");
    test_expect_exit(&g_report, "pretokenizer vs kind", run_init, (void *)p[9], 1, "does not fit tokenizer kind");
    test_expect_exit(&g_report, "unknown token flags", run_init, (void *)p[10], 1, "token 0 has unknown flags 0x80");
    test_expect_exit(&g_report, "merge id out of range", run_init, (void *)p[11], 1, "refers to token 2147483647");
    test_expect_exit(&g_report, "decode id out of range", run_decode_out_of_range, (void *)good_path, 1, "is out of range (vocab_size");
    test_expect_exit(&g_report, "encode with decode-only", run_encode_decode_only, (void *)p[8], 1, "not supported for encoding");
    test_expect_exit(&g_report, "encode output too small", run_encode_too_small, (void *)good_path, 1, "needs more than 2 tokens");
    test_expect_exit(&g_report, "encode invalid UTF-8", run_encode_bad_utf8, (void *)good_path, 1, "not valid UTF-8 at byte 3");
    for (int i = 0; i < 12; i++) unlink(p[i]);
    rmdir(dir);
    free(good);
    free(bad_flags);
    free(bad_merge);
}

int main(void) {
    check_fixture("bytelevel", "tests/tokenizer/bytelevel/tokenizer.bin");
    check_fixture("sentencepiece", "tests/tokenizer/sentencepiece/tokenizer.bin");
    check_fixture("default", "data/default/tokenizer.bin");
    check_errors();
    return test_report_finish(&g_report, "test_tokenizer");
}

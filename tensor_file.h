// Named-tensor bundles: the file format of the reference outputs that scripts/make_reference.py
// writes (logits, loss, gradients from Hugging Face) and that the tests read.
//
// Layout, little-endian:
//   uint32 magic TENSOR_FILE_MAGIC, uint32 version (1), uint32 count
//   count times: uint32 name_len, name bytes (no NUL), uint32 dtype (0 = float32, 1 = int32),
//                uint32 ndim (<= 4), uint32 dims[ndim], then prod(dims) elements of dtype
#ifndef TENSOR_FILE_H
#define TENSOR_FILE_H

#include "utils.h"

#define TENSOR_FILE_MAGIC 0x4E53544Du  // bytes 'M','T','S','N'
#define TENSOR_FILE_VERSION 1
#define TENSOR_MAX_DIMS 4

typedef enum { TENSOR_F32 = 0, TENSOR_I32 = 1 } TensorDtype;

typedef struct {
    char name[128];
    int dtype;
    int ndim;
    size_t dims[TENSOR_MAX_DIMS];
    size_t numel;
    void *data;  // float* or int32_t*
} NamedTensor;

typedef struct {
    int count;
    NamedTensor *tensors;
} TensorFile;

static inline uint32_t tensor_file_read_u32(FILE *f, const char *path) {
    uint32_t v;
    freadCheck(&v, sizeof(v), 1, f, path);
    return v;
}

// Loads every tensor of a bundle; dies with a clear message on a malformed or truncated file.
static inline void tensor_file_load(TensorFile *tf, const char *path) {
    FILE *f = fopenCheck(path, "rb");
    uint32_t magic = tensor_file_read_u32(f, path);
    if (magic != TENSOR_FILE_MAGIC) die("%s: bad magic 0x%08x: not a tensor bundle", path, magic);
    uint32_t version = tensor_file_read_u32(f, path);
    if (version != TENSOR_FILE_VERSION) die("%s: unsupported tensor bundle version %u", path, version);
    uint32_t count = tensor_file_read_u32(f, path);
    if (count > 100000) die("%s: implausible tensor count %u", path, count);
    tf->count = (int)count;
    tf->tensors = (NamedTensor *)callocCheck(count, sizeof(NamedTensor));
    for (uint32_t i = 0; i < count; i++) {
        NamedTensor *t = &tf->tensors[i];
        uint32_t name_len = tensor_file_read_u32(f, path);
        if (name_len == 0 || name_len >= sizeof(t->name)) die("%s: tensor %u has a bad name length %u", path, i, name_len);
        freadCheck(t->name, 1, name_len, f, path);
        t->name[name_len] = '\0';
        t->dtype = (int)tensor_file_read_u32(f, path);
        if (t->dtype != TENSOR_F32 && t->dtype != TENSOR_I32) die("%s: tensor '%s' has unknown dtype %d", path, t->name, t->dtype);
        t->ndim = (int)tensor_file_read_u32(f, path);
        if (t->ndim < 0 || t->ndim > TENSOR_MAX_DIMS) die("%s: tensor '%s' has %d dims (max %d)", path, t->name, t->ndim, TENSOR_MAX_DIMS);
        t->numel = 1;
        for (int d = 0; d < t->ndim; d++) {
            t->dims[d] = tensor_file_read_u32(f, path);
            t->numel *= t->dims[d];
        }
        if (t->numel > ((size_t)1 << 32)) die("%s: tensor '%s' is implausibly large", path, t->name);
        t->data = mallocCheck(t->numel * 4);
        freadCheck(t->data, 4, t->numel, f, path);
    }
    fcloseCheck(f, path);
}

// Returns the tensor called `name`, or NULL.
static inline const NamedTensor *tensor_file_find(const TensorFile *tf, const char *name) {
    for (int i = 0; i < tf->count; i++) {
        if (strcmp(tf->tensors[i].name, name) == 0) return &tf->tensors[i];
    }
    return NULL;
}

// Returns the tensor called `name` or dies naming the file.
static inline const NamedTensor *tensor_file_get(const TensorFile *tf, const char *name, const char *path) {
    const NamedTensor *t = tensor_file_find(tf, name);
    if (t == NULL) die("%s: no tensor named '%s'", path, name);
    return t;
}

static inline void tensor_file_free(TensorFile *tf) {
    for (int i = 0; i < tf->count; i++) free(tf->tensors[i].data);
    free(tf->tensors);
    tf->tensors = NULL;
    tf->count = 0;
}

#endif  // TENSOR_FILE_H

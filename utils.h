// Host-side helpers shared by every program: loud error checks at the call site
// (file, line and the reason), checked allocation, and small numeric utilities.
// Plain C; no CUDA here (the CUDA checks live in cuda_utils.h).
#ifndef UTILS_H
#define UTILS_H

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

// Print "error: <message>" to stderr and exit with status 1.
static inline void die(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    fprintf(stderr, "error: ");
    vfprintf(stderr, fmt, args);
    fprintf(stderr, "\n");
    va_end(args);
    exit(1);
}

static inline FILE *fopen_check(const char *path, const char *mode, const char *file, int line) {
    FILE *f = fopen(path, mode);
    if (f == NULL) {
        die("cannot open '%s' (mode %s): %s [%s:%d]", path, mode, strerror(errno), file, line);
    }
    return f;
}
#define fopenCheck(path, mode) fopen_check(path, mode, __FILE__, __LINE__)

// Reads exactly n items or dies naming the file role (e.g. "model.bin tensors").
static inline void fread_check(void *ptr, size_t size, size_t n, FILE *f, const char *what,
                               const char *file, int line) {
    size_t got = fread(ptr, size, n, f);
    if (got != n) {
        die("%s: truncated or unreadable (read %zu of %zu items of %zu bytes)%s [%s:%d]", what, got,
            n, size, ferror(f) ? ", I/O error" : "", file, line);
    }
}
#define freadCheck(ptr, size, n, f, what) fread_check(ptr, size, n, f, what, __FILE__, __LINE__)

static inline void fwrite_check(const void *ptr, size_t size, size_t n, FILE *f, const char *what,
                                const char *file, int line) {
    if (fwrite(ptr, size, n, f) != n) {
        die("%s: write failed: %s [%s:%d]", what, strerror(errno), file, line);
    }
}
#define fwriteCheck(ptr, size, n, f, what) fwrite_check(ptr, size, n, f, what, __FILE__, __LINE__)

static inline void fclose_check(FILE *f, const char *what, const char *file, int line) {
    if (fclose(f) != 0) {
        die("%s: close failed: %s [%s:%d]", what, strerror(errno), file, line);
    }
}
#define fcloseCheck(f, what) fclose_check(f, what, __FILE__, __LINE__)

static inline void fseek_check(FILE *f, long offset, int whence, const char *what, const char *file,
                               int line) {
    if (fseek(f, offset, whence) != 0) {
        die("%s: seek failed: %s [%s:%d]", what, strerror(errno), file, line);
    }
}
#define fseekCheck(f, off, whence, what) fseek_check(f, off, whence, what, __FILE__, __LINE__)

// Size of an open file in bytes (the position is restored to the start).
static inline long file_size_bytes(FILE *f, const char *what) {
    fseekCheck(f, 0, SEEK_END, what);
    long size = ftell(f);
    if (size < 0) die("%s: cannot tell file size: %s", what, strerror(errno));
    fseekCheck(f, 0, SEEK_SET, what);
    return size;
}

static inline void *malloc_check(size_t size, const char *file, int line) {
    void *p = malloc(size);
    if (p == NULL && size != 0) die("out of host memory allocating %zu bytes [%s:%d]", size, file, line);
    return p;
}
#define mallocCheck(size) malloc_check(size, __FILE__, __LINE__)

static inline void *calloc_check(size_t n, size_t size, const char *file, int line) {
    void *p = calloc(n, size);
    if (p == NULL && n != 0 && size != 0) {
        die("out of host memory allocating %zu x %zu bytes [%s:%d]", n, size, file, line);
    }
    return p;
}
#define callocCheck(n, size) calloc_check(n, size, __FILE__, __LINE__)

// Writes a file atomically: callers write to `tmp_path`, then this renames it over `path`,
// so a crash never leaves a half-written file under the final name.
static inline void rename_check(const char *tmp_path, const char *path) {
    if (rename(tmp_path, path) != 0) die("cannot rename '%s' to '%s': %s", tmp_path, path, strerror(errno));
}

// Appends printf-style text to the NUL-terminated string in buf (len bytes in all), truncating.
static inline void appendf(char *buf, size_t len, const char *fmt, ...) {
    size_t used = strlen(buf);
    if (used + 1 >= len) return;
    va_list args;
    va_start(args, fmt);
    vsnprintf(buf + used, len - used, fmt, args);
    va_end(args);
}

// bf16 <-> fp32 on the host. bf16 is the top 16 bits of an IEEE fp32.
static inline float bf16_bits_to_float(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

// Round to nearest even; NaN stays NaN.
static inline uint16_t float_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif  // UTILS_H

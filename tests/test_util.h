// Small helpers shared by the C tests: a pass/fail tally, a per-tensor comparison table
// (max abs error, max relative error, tolerance, PASS/FAIL), and running a function in a forked
// child to check that it exits with a given status and a given phrase on stderr (for the error
// paths of the loaders, which call die()).
//
// Usage:
//   TestReport r = {0};
//   test_table_header("case llama2_mha");
//   test_compare_f32(&r, "logits", got, ref, n, 1e-4);
//   test_expect_exit(&r, "wrong magic", load_fn, path, 1, "bad magic");
//   return test_report_finish(&r, "test_cpu_model");   // prints "test_cpu_model: N passed, M failed"
//
// Note: run forked checks before the program first uses OpenMP threads (libgomp's thread pool
// does not survive fork), or make sure the child uses none.
#ifndef TEST_UTIL_H
#define TEST_UTIL_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct {
    int passed, failed;
} TestReport;

static inline void test_record(TestReport *r, int ok) {
    if (ok) r->passed++;
    else r->failed++;
}

// Prints a title and the column header of a comparison table.
static inline void test_table_header(const char *title) {
    printf("\n== %s\n", title);
    printf("%-38s %12s %12s %10s  %s\n", "tensor", "max abs err", "max rel err", "tolerance", "result");
}

// One table row. rel is the error measure compared with tol.
static inline int test_table_row(TestReport *r, const char *name, double abs_err, double rel_err, double tol) {
    int ok = rel_err <= tol;  // false for NaN
    printf("%-38s %12.3e %12.3e %10.1e  %s\n", name, abs_err, rel_err, tol, ok ? "PASS" : "FAIL");
    test_record(r, ok);
    return ok;
}

// Compares got (n) with ref (n): max abs err = max |got - ref|, max rel err = max abs err / max |ref|
// (a tensor-wide scale, so tiny reference entries do not blow the ratio up). A reference that is
// all zero is compared by abs err alone. Any NaN or Inf in got fails. Returns 1 on pass.
static inline int test_compare_f32(TestReport *r, const char *name, const float *got, const float *ref, size_t n,
                                   double tol) {
    double max_abs = 0.0, max_ref = 0.0;
    int finite = 1;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i])) finite = 0;
        double e = fabs((double)got[i] - (double)ref[i]);
        if (e > max_abs) max_abs = e;
        if (fabs((double)ref[i]) > max_ref) max_ref = fabs((double)ref[i]);
    }
    double rel = max_ref > 0.0 ? max_abs / max_ref : max_abs;
    if (!finite) rel = NAN;
    return test_table_row(r, name, max_abs, rel, tol);
}

// Compares two scalars: abs err = |got - ref|, rel err = abs err / |ref| (abs err when ref is 0).
static inline int test_compare_scalar(TestReport *r, const char *name, double got, double ref, double tol) {
    double e = fabs(got - ref);
    double rel = ref != 0.0 ? e / fabs(ref) : e;
    if (!isfinite(got)) rel = NAN;
    return test_table_row(r, name, e, rel, tol);
}

// Records a boolean check with a one-line explanation.
static inline int test_check(TestReport *r, int ok, const char *what) {
    printf("%-74s %s\n", what, ok ? "PASS" : "FAIL");
    test_record(r, ok);
    return ok;
}

// Runs fn(arg) in a forked child with stdout silenced and stderr captured. Passes when the child
// exits with status `expect_status` and its stderr contains `expect_phrase`. Prints one row;
// on failure also prints what the child wrote to stderr.
static inline int test_expect_exit(TestReport *r, const char *label, void (*fn)(void *), void *arg,
                                   int expect_status, const char *expect_phrase) {
    char err[4096];
    size_t len = 0;
    int pipefd[2];
    fflush(stdout);
    fflush(stderr);
    if (pipe(pipefd) != 0) {
        perror("pipe");
        exit(2);
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("fork");
        exit(2);
    }
    if (pid == 0) {
        close(pipefd[0]);
        dup2(pipefd[1], STDERR_FILENO);
        close(pipefd[1]);
        if (freopen("/dev/null", "w", stdout) == NULL) _exit(3);
        fn(arg);
        fflush(NULL);
        _exit(0);
    }
    close(pipefd[1]);
    for (;;) {
        char chunk[512];
        ssize_t got = read(pipefd[0], chunk, sizeof(chunk));
        if (got <= 0) break;
        for (ssize_t i = 0; i < got && len + 1 < sizeof(err); i++) err[len++] = chunk[i];
    }
    err[len] = '\0';
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    int exited = WIFEXITED(status), code = exited ? WEXITSTATUS(status) : -1;
    int ok = exited && code == expect_status && strstr(err, expect_phrase) != NULL;
    printf("%-44s exit %3d (want %d), stderr has \"%s\"  %s\n", label, code, expect_status, expect_phrase,
           ok ? "PASS" : "FAIL");
    if (!ok) printf("    child stderr: %s\n", len ? err : "(empty)");
    test_record(r, ok);
    return ok;
}

// Prints the closing line "<program>: N passed, M failed" and returns the exit status (1 on failure).
static inline int test_report_finish(const TestReport *r, const char *program) {
    printf("\n%s: %d passed, %d failed\n", program, r->passed, r->failed);
    return r->failed > 0 ? 1 : 0;
}

#endif  // TEST_UTIL_H

// Runs the soft-capped attention kernels (the bodies in attention_softcap_kernels.h, the same source
// the GPU build compiles) on the CPU, one thread block at a time, and checks forward and backward
// against the double-precision reference of dev/attention_reference.h. No GPU needed: this is how the
// tensor-core kernels are tested on a machine without one (`make test` runs it).
//
// The emulator runs every CUDA thread of a block as a coroutine (ucontext) and implements each
// primitive from its PTX definition, independently of the kernels' own fragment bookkeeping:
// - warp-level ops (ldmatrix .x4 / .x4.trans, mma.m16n8k16 bf16 -> fp32, shfl.xor) execute when all 32
//   lanes of the warp reach the same op; lanes at different ops, or exited lanes, are an error;
// - __syncthreads releases when every thread of the block reaches it (a barrier some thread never
//   reaches, or one reached after others exited, is an error);
// - cp.async copies land only when the issuing thread waits for their group (wait_group N keeps the
//   newest N groups in flight), so reading data before waiting for it is caught;
// - shared memory is checked per 4-byte word: a read of a word never written, or of a word another
//   thread wrote (or has a cp.async in flight to) since the last barrier, and a write to a word
//   another thread read or wrote since the last barrier, are races and fail the test; ldmatrix needs
//   16-byte aligned rows, cp.async 16-byte aligned addresses;
// - global accesses must fall inside the buffers of the launch, writes only in its output buffers.
// Differences from the hardware: ex2 / rcp are exact here (approximate on the GPU, a few ulp), and
// the mma sums its 16 products in double before adding the accumulator.
//
// Build: make build/test_attention_softcap_emu     Run: ./build/test_attention_softcap_emu
// Exit status 0 when every check passes.
#include <stdarg.h>
#include <ucontext.h>
#include "attention.h"
#include "dev/attention_reference.h"

#define EMU_MAX_THREADS 256
#define EMU_STACK_BYTES (128 * 1024)
#define EMU_MAX_COPIES 128  // cp.async copies one thread may have in flight
#define EMU_NOBODY (-1)
#define EMU_SEVERAL (-2)

enum { EMU_RUNNABLE, EMU_AT_WARP_OP, EMU_AT_BARRIER, EMU_DONE };
enum { EMU_OP_SHFL, EMU_OP_LDSM, EMU_OP_LDSM_T, EMU_OP_MMA };

typedef struct {
    char *dst;
    unsigned char data[16];
    int group;
} EmuCopy;

typedef struct {
    ucontext_t ctx;
    int tid, state, op;
    const char *addr;  // ldmatrix: the row this lane supplies
    float fv;          // shfl: value in
    int mask;          // shfl: lane mask
    uint32_t a[4], b[2];
    float c[4];     // mma: accumulator in, result out
    uint32_t r[4];  // ldmatrix: result
    float fr;       // shfl: result
    EmuCopy copies[EMU_MAX_COPIES];  // issued, not landed
    int n_copies, committed;         // committed: cp.async groups closed so far
} EmuThread;

// Per 4-byte word of shared memory: who wrote it last and when (barrier epoch), whether a cp.async to
// it is in flight, and who read it in the current epoch.
typedef struct {
    int writer, write_epoch, pending, reader, read_epoch;
} EmuWord;

typedef struct {
    const char *base;
    size_t bytes;
    int writable;
} EmuRegion;

static struct {
    EmuThread th[EMU_MAX_THREADS];
    char *stacks;
    int n_threads, block[3], epoch;
    char *smem;
    size_t smem_cap;
    EmuWord *shadow;
    ucontext_t sched;
    EmuThread *cur;
    void (*body)(void);  // one thread of the kernel under test
    EmuRegion regions[8];
    int n_regions;
    long long warp_ops;
} emu;

static void emu_fail(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    die("emulator: block (%d, %d, %d), thread %d: %s", emu.block[0], emu.block[1], emu.block[2],
        emu.cur != NULL ? emu.cur->tid : -1, msg);
}

// ---- global memory: the buffers of the current launch ----
static void emu_region(const void *base, size_t bytes, int writable) {
    if (emu.n_regions == 8) die("emulator: too many buffers");
    EmuRegion r = {(const char *)base, bytes, writable};
    emu.regions[emu.n_regions++] = r;
}

static void emu_global(const void *p, size_t bytes, int write, const char *what) {
    const char *c = (const char *)p;
    if ((uintptr_t)c % bytes != 0) emu_fail("%s at %p is not %zu-byte aligned", what, p, bytes);
    for (int i = 0; i < emu.n_regions; i++) {
        const EmuRegion *r = &emu.regions[i];
        if (c >= r->base && c + bytes <= r->base + r->bytes) {
            if (write && !r->writable) emu_fail("%s writes the input buffer at %p", what, p);
            return;
        }
    }
    emu_fail("%s at %p is outside every buffer of the launch", what, p);
}

// ---- shared memory race checks ----
static size_t emu_smem_offset(const char *p, size_t bytes, size_t align, const char *what) {
    if (p < emu.smem || p + bytes > emu.smem + emu.smem_cap) emu_fail("%s at %p is outside shared memory", what, p);
    size_t off = (size_t)(p - emu.smem);
    if (off % align != 0) emu_fail("%s at shared offset %zu is not %zu-byte aligned", what, off, align);
    return off;
}

static void emu_read_word(size_t w, int tid) {
    EmuWord *s = &emu.shadow[w];
    if (s->writer == EMU_NOBODY) emu_fail("reads shared byte %zu, which was never written", 4 * w);
    if (s->pending) emu_fail("reads shared byte %zu while thread %d's cp.async to it is in flight", 4 * w, s->writer);
    if (s->writer != tid && s->write_epoch == emu.epoch)
        emu_fail("reads shared byte %zu that thread %d wrote since the last barrier", 4 * w, s->writer);
    if (s->read_epoch != emu.epoch) {
        s->read_epoch = emu.epoch;
        s->reader = tid;
    } else if (s->reader != tid) {
        s->reader = EMU_SEVERAL;
    }
}

static void emu_check_write_word(size_t w, int tid) {
    EmuWord *s = &emu.shadow[w];
    if (s->pending) emu_fail("writes shared byte %zu while thread %d's cp.async to it is in flight", 4 * w, s->writer);
    if (s->read_epoch == emu.epoch && s->reader != tid)
        emu_fail("writes shared byte %zu that thread %d read since the last barrier (-2: several)", 4 * w, s->reader);
    if (s->writer != EMU_NOBODY && s->writer != tid && s->write_epoch == emu.epoch)
        emu_fail("writes shared byte %zu that thread %d wrote since the last barrier", 4 * w, s->writer);
}

// ---- the primitives of attention_softcap_kernels.h ----
// Parks the current thread in `state` and hands over to the next runnable thread of the block (or back
// to the scheduler when there is none): one context switch per thread and warp-level operation.
static void emu_yield(int state) {
    EmuThread *t = emu.cur, *next = NULL;
    t->state = state;
    for (int i = t->tid + 1; i < emu.n_threads && next == NULL; i++)
        if (emu.th[i].state == EMU_RUNNABLE) next = &emu.th[i];
    if (next != NULL) {
        emu.cur = next;
        if (swapcontext(&t->ctx, &next->ctx) != 0) die("emulator: swapcontext failed");
    } else if (swapcontext(&t->ctx, &emu.sched) != 0) {
        die("emulator: swapcontext failed");
    }
}

static inline int sc_tid(void) { return emu.cur->tid; }
static inline int sc_block_x(void) { return emu.block[0]; }
static inline int sc_block_y(void) { return emu.block[1]; }
static inline int sc_block_z(void) { return emu.block[2]; }
static inline void sc_sync(void) { emu_yield(EMU_AT_BARRIER); }
static inline float sc_ex2(float x) { return exp2f(x); }
static inline float sc_rcp(float x) { return 1.0f / x; }
static inline uint32_t sc_pack_bf16x2(float lo, float hi) {
    return (uint32_t)float_to_bf16_bits(lo) | (uint32_t)float_to_bf16_bits(hi) << 16;
}
static inline float sc_u32_as_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

static inline float sc_shfl_xor(float v, int mask) {
    EmuThread *t = emu.cur;
    t->op = EMU_OP_SHFL;
    t->fv = v;
    t->mask = mask;
    emu_yield(EMU_AT_WARP_OP);
    return t->fr;
}

static void emu_ldmatrix(uint32_t r[4], const char *row, int op) {
    EmuThread *t = emu.cur;
    t->op = op;
    t->addr = row;
    emu_yield(EMU_AT_WARP_OP);
    memcpy(r, t->r, sizeof(t->r));
}
static inline void sc_ldmatrix_x4(uint32_t r[4], const char *row) { emu_ldmatrix(r, row, EMU_OP_LDSM); }
static inline void sc_ldmatrix_x4_trans(uint32_t r[4], const char *row) { emu_ldmatrix(r, row, EMU_OP_LDSM_T); }

static inline void sc_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    EmuThread *t = emu.cur;
    t->op = EMU_OP_MMA;
    memcpy(t->a, a, sizeof(t->a));
    t->b[0] = b0;
    t->b[1] = b1;
    memcpy(t->c, c, sizeof(t->c));
    emu_yield(EMU_AT_WARP_OP);
    memcpy(c, t->c, sizeof(t->c));
}

static inline void sc_cp_async16(char *dst, const bf16 *src, int valid) {
    EmuThread *t = emu.cur;
    size_t off = emu_smem_offset(dst, 16, 16, "cp.async destination");
    if (t->n_copies == EMU_MAX_COPIES) emu_fail("more than %d cp.async copies in flight", EMU_MAX_COPIES);
    EmuCopy *c = &t->copies[t->n_copies++];
    c->dst = dst;
    c->group = t->committed;
    if (valid) {
        emu_global(src, 16, 0, "cp.async source");
        memcpy(c->data, (const void *)src, 16);
    } else {
        memset(c->data, 0, 16);
    }
    for (size_t w = off / 4; w < off / 4 + 4; w++) {
        emu_check_write_word(w, t->tid);
        emu.shadow[w].pending = 1;
        emu.shadow[w].writer = t->tid;
    }
}
static inline void sc_cp_async_commit(void) { emu.cur->committed++; }

// Lands every copy of the groups older than the newest `keep` committed ones.
static void emu_cp_async_wait(int keep) {
    EmuThread *t = emu.cur;
    int kept = 0;
    for (int i = 0; i < t->n_copies; i++) {
        EmuCopy *c = &t->copies[i];
        if (c->group >= t->committed - keep) {
            t->copies[kept++] = *c;
            continue;
        }
        memcpy(c->dst, c->data, 16);
        size_t off = (size_t)(c->dst - emu.smem);
        for (size_t w = off / 4; w < off / 4 + 4; w++) {
            emu.shadow[w].pending = 0;
            emu.shadow[w].writer = t->tid;
            emu.shadow[w].write_epoch = emu.epoch;
        }
    }
    t->n_copies = kept;
}
static inline void sc_cp_async_wait_all(void) { emu_cp_async_wait(0); }
static inline void sc_cp_async_wait_1(void) { emu_cp_async_wait(1); }

static inline void sc_st_shared_u32(char *p, uint32_t v) {
    size_t w = emu_smem_offset(p, 4, 4, "st.shared") / 4;
    emu_check_write_word(w, emu.cur->tid);
    emu.shadow[w].writer = emu.cur->tid;
    emu.shadow[w].write_epoch = emu.epoch;
    memcpy(p, &v, 4);
}

static inline uint32_t sc_ld_global_u32(const bf16 *p) {
    emu_global(p, 4, 0, "ld.global.u32");
    uint32_t v;
    memcpy(&v, (const void *)p, 4);
    return v;
}
static inline float sc_ld_global_f32(const float *p) {
    emu_global(p, 4, 0, "ld.global.f32");
    return *p;
}
static inline void sc_st_global_u32(bf16 *p, uint32_t v) {
    emu_global(p, 4, 1, "st.global.u32");
    memcpy((void *)p, &v, 4);
}
static inline void sc_st_global_f32(float *p, float v) {
    emu_global(p, 4, 1, "st.global.f32");
    *p = v;
}

#define SC_FN static inline
#define SC_UNROLL
#include "attention_softcap_kernels.h"

// ---- warp-level operations, from the PTX ISA ----
static float emu_lo(uint32_t u) { return bf16_bits_to_float((uint16_t)(u & 0xffff)); }
static float emu_hi(uint32_t u) { return bf16_bits_to_float((uint16_t)(u >> 16)); }
static uint16_t emu_row_elem(const char *row, int c) {
    uint16_t v;
    memcpy(&v, row + 2 * c, 2);
    return v;
}

// ldmatrix .x4: lane 8 j + r supplies row r of matrix j (8 bf16, 16 bytes). Lane l receives in r[j]
// the elements (row l / 4, columns 2 (l % 4), 2 (l % 4) + 1) of matrix j; with .trans, the elements
// (rows 2 (l % 4), 2 (l % 4) + 1, column l / 4). The lower-indexed element sits in the low 16 bits.
static void emu_exec_ldmatrix(EmuThread *w, int trans) {
    for (int l = 0; l < 32; l++) {
        size_t off = emu_smem_offset(w[l].addr, 16, 16, "ldmatrix row");
        for (size_t k = off / 4; k < off / 4 + 4; k++) emu_read_word(k, w[l].tid);
    }
    for (int l = 0; l < 32; l++) {
        for (int j = 0; j < 4; j++) {
            uint16_t e0, e1;
            if (!trans) {
                const char *row = w[8 * j + l / 4].addr;
                e0 = emu_row_elem(row, 2 * (l % 4));
                e1 = emu_row_elem(row, 2 * (l % 4) + 1);
            } else {
                e0 = emu_row_elem(w[8 * j + 2 * (l % 4)].addr, l / 4);
                e1 = emu_row_elem(w[8 * j + 2 * (l % 4) + 1].addr, l / 4);
            }
            w[l].r[j] = (uint32_t)e0 | (uint32_t)e1 << 16;
        }
    }
}

// mma.m16n8k16.row.col.f32.bf16.bf16.f32: D (16 x 8) = A (16 x 16) B (16 x 8) + C, with g = lane / 4,
// t = lane % 4: a[0] = A(g, 2t..2t+1), a[1] = A(g+8, 2t..), a[2] = A(g, 2t+8..), a[3] = A(g+8, 2t+8..);
// b[0] = B(2t..2t+1, g), b[1] = B(2t+8..2t+9, g); c[0..1] = C(g, 2t..2t+1), c[2..3] = C(g+8, 2t..2t+1).
static void emu_exec_mma(EmuThread *w) {
    float A[16][16], B[16][8], Cm[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        const uint32_t *a = w[l].a, *b = w[l].b;
        A[g][2 * t] = emu_lo(a[0]);
        A[g][2 * t + 1] = emu_hi(a[0]);
        A[g + 8][2 * t] = emu_lo(a[1]);
        A[g + 8][2 * t + 1] = emu_hi(a[1]);
        A[g][2 * t + 8] = emu_lo(a[2]);
        A[g][2 * t + 9] = emu_hi(a[2]);
        A[g + 8][2 * t + 8] = emu_lo(a[3]);
        A[g + 8][2 * t + 9] = emu_hi(a[3]);
        B[2 * t][g] = emu_lo(b[0]);
        B[2 * t + 1][g] = emu_hi(b[0]);
        B[2 * t + 8][g] = emu_lo(b[1]);
        B[2 * t + 9][g] = emu_hi(b[1]);
        Cm[g][2 * t] = w[l].c[0];
        Cm[g][2 * t + 1] = w[l].c[1];
        Cm[g + 8][2 * t] = w[l].c[2];
        Cm[g + 8][2 * t + 1] = w[l].c[3];
    }
    float D[16][8];
    for (int i = 0; i < 16; i++) {
        for (int j = 0; j < 8; j++) {
            double sum = 0.0;
            for (int k = 0; k < 16; k++) sum += (double)A[i][k] * B[k][j];
            D[i][j] = (float)(sum + Cm[i][j]);
        }
    }
    for (int l = 0; l < 32; l++) {
        int g = l / 4, t = l % 4;
        w[l].c[0] = D[g][2 * t];
        w[l].c[1] = D[g][2 * t + 1];
        w[l].c[2] = D[g + 8][2 * t];
        w[l].c[3] = D[g + 8][2 * t + 1];
    }
}

static void emu_exec_warp_op(EmuThread *w) {
    int op = w[0].op;
    for (int l = 1; l < 32; l++) {
        if (w[l].op != op || (op == EMU_OP_SHFL && w[l].mask != w[0].mask)) {
            emu.cur = &w[l];
            emu_fail("lanes of warp %d are at different warp-level operations (%d vs %d)", w[0].tid / 32, w[l].op, op);
        }
    }
    emu.cur = &w[0];
    if (op == EMU_OP_SHFL)
        for (int l = 0; l < 32; l++) w[l].fr = w[l ^ w[l].mask].fv;
    else if (op == EMU_OP_MMA)
        emu_exec_mma(w);
    else
        emu_exec_ldmatrix(w, op == EMU_OP_LDSM_T);
    for (int l = 0; l < 32; l++) w[l].state = EMU_RUNNABLE;
    emu.warp_ops++;
}

// ---- running a grid ----
static void emu_thread_entry(void) {
    emu.body();
    emu_yield(EMU_DONE);
}

// Runs one block to completion: every runnable thread until its next warp op or barrier (in tid
// order, each handing over to the next), then the warp ops whose 32 lanes all arrived, then the
// barrier once every thread is there; until all exit.
static void emu_run_block(int bx, int by, int bz) {
    emu.block[0] = bx;
    emu.block[1] = by;
    emu.block[2] = bz;
    emu.epoch = 0;
    emu.cur = NULL;
    for (size_t w = 0; w < emu.smem_cap / 4; w++) {
        EmuWord init = {EMU_NOBODY, -1, 0, EMU_NOBODY, -1};
        emu.shadow[w] = init;
    }
    memset(emu.smem, 0xff, emu.smem_cap);
    for (int i = 0; i < emu.n_threads; i++) {
        EmuThread *t = &emu.th[i];
        t->tid = i;
        t->state = EMU_RUNNABLE;
        t->n_copies = 0;
        t->committed = 0;
        if (getcontext(&t->ctx) != 0) die("emulator: getcontext failed");
        t->ctx.uc_stack.ss_sp = emu.stacks + (size_t)i * EMU_STACK_BYTES;
        t->ctx.uc_stack.ss_size = EMU_STACK_BYTES;
        t->ctx.uc_link = &emu.sched;
        makecontext(&t->ctx, emu_thread_entry, 0);
    }
    for (;;) {
        int progress = 0, n_barrier = 0, n_done = 0;
        for (int i = 0; i < emu.n_threads; i++) {
            if (emu.th[i].state != EMU_RUNNABLE) continue;
            emu.cur = &emu.th[i];
            if (swapcontext(&emu.sched, &emu.th[i].ctx) != 0) die("emulator: swapcontext failed");
            progress = 1;
        }
        for (int w0 = 0; w0 < emu.n_threads; w0 += 32) {
            int at_op = 0, done = 0;
            for (int l = 0; l < 32; l++) {
                at_op += emu.th[w0 + l].state == EMU_AT_WARP_OP;
                done += emu.th[w0 + l].state == EMU_DONE;
            }
            if (at_op == 32) {
                emu_exec_warp_op(&emu.th[w0]);
                progress = 1;
            } else if (at_op > 0 && at_op + done == 32) {
                emu.cur = &emu.th[w0];
                emu_fail("warp %d: %d lanes wait at a warp-level operation that exited lanes never reach", w0 / 32, at_op);
            }
        }
        for (int i = 0; i < emu.n_threads; i++) {
            n_barrier += emu.th[i].state == EMU_AT_BARRIER;
            n_done += emu.th[i].state == EMU_DONE;
        }
        if (n_done == emu.n_threads) break;
        if (n_barrier == emu.n_threads) {
            emu.epoch++;
            for (int i = 0; i < emu.n_threads; i++) emu.th[i].state = EMU_RUNNABLE;
            progress = 1;
        } else if (n_barrier > 0 && n_barrier + n_done == emu.n_threads) {
            emu_fail("%d threads wait at a barrier that %d exited threads never reach", n_barrier, n_done);
        }
        if (!progress) emu_fail("deadlock: %d threads at a barrier, the rest at warp-level operations", n_barrier);
    }
    for (int i = 0; i < emu.n_threads; i++) {
        if (emu.th[i].n_copies > 0) {
            emu.cur = &emu.th[i];
            emu_fail("exits with %d cp.async copies never waited for", emu.th[i].n_copies);
        }
    }
}

static void emu_launch(void (*body)(void), ScLaunch l) {
    if (l.threads > EMU_MAX_THREADS || l.threads % 32 != 0) die("emulator: %u threads per block", l.threads);
    size_t smem = l.smem > 16 ? l.smem : 16;
    if (smem > emu.smem_cap) {
        free(emu.smem);
        free(emu.shadow);
        emu.smem = (char *)aligned_alloc(128, (smem + 127) / 128 * 128);
        emu.shadow = (EmuWord *)mallocCheck(smem / 4 * sizeof(EmuWord));
        if (emu.smem == NULL) die("emulator: out of memory");
        emu.smem_cap = smem;
    }
    emu.n_threads = (int)l.threads;
    emu.body = body;
    for (unsigned z = 0; z < l.grid_z; z++)
        for (unsigned y = 0; y < l.grid_y; y++)
            for (unsigned x = 0; x < l.grid_x; x++) emu_run_block((int)x, (int)y, (int)z);
}

// One thread of each kernel, reading its parameters from emu_params.
static ScParams emu_params;
template <int HD>
static void emu_forward_thread(void) { sc_forward_block<HD>(emu_params, emu.smem); }
static void emu_dot_thread(void) { sc_backward_dot_block(emu_params); }
template <int HD>
static void emu_dq_thread(void) { sc_backward_dq_block<HD>(emu_params, emu.smem); }
template <int HD>
static void emu_dkv_thread(void) { sc_backward_dkv_block<HD>(emu_params, emu.smem); }

#define EMU_BY_TILE(fn, HD) ((HD) == 64 ? fn<64> : (HD) == 128 ? fn<128> : fn<256>)

// ---- the checks ----
// Forward and backward of one shape on the emulator against the reference, with the GPU test's
// tolerances and inputs (q, k up to 2 in magnitude, v and dout up to 1). Outputs start as NaN.
static void check_case(TestReport *t, const SoftcapCase *c) {
    const AttentionShape s = c->shape;
    printf("%s: B=%d S=%d Hq=%d Hkv=%d hd=%d scale=%.4f window=%d softcap=%g\n", c->label, s.B, s.S, s.Hq, s.Hkv,
           s.hd, (double)s.scale, s.window, (double)s.softcap);
    size_t C = (size_t)(s.Hq + 2 * s.Hkv) * s.hd, rows = (size_t)s.B * s.S;
    size_t n_qkv = rows * C, n_out = rows * s.Hq * s.hd, n_stats = (size_t)s.B * s.Hq * s.S;
    uint16_t *qkv = (uint16_t *)mallocCheck(n_qkv * 2), *dout = (uint16_t *)mallocCheck(n_out * 2);
    fill_softcap_inputs(&s, qkv, dout);
    uint16_t *out = (uint16_t *)mallocCheck(n_out * 2), *dqkv = (uint16_t *)mallocCheck(n_qkv * 2);
    float *stats = (float *)mallocCheck(n_stats * 4), *D = (float *)mallocCheck(n_stats * 4);
    memset(out, 0xff, n_out * 2);
    memset(dqkv, 0xff, n_qkv * 2);
    memset(stats, 0xff, n_stats * 4);
    memset(D, 0xff, n_stats * 4);

    ScParams p = sc_params(&s);
    p.qkv = (const bf16 *)qkv;
    p.out = (bf16 *)out;
    p.stats = stats;
    p.dout = (const bf16 *)dout;
    p.dqkv = (bf16 *)dqkv;
    p.D = D;
    emu_params = p;
    const int HD = sc_head_tile(s.hd);
    emu.warp_ops = 0;
    emu.n_regions = 0;
    emu_region(qkv, n_qkv * 2, 0);
    emu_region(out, n_out * 2, 1);
    emu_region(stats, n_stats * 4, 1);
    emu_launch(EMU_BY_TILE(emu_forward_thread, HD), sc_forward_launch(&p, HD));
    emu.n_regions = 0;
    emu_region(out, n_out * 2, 0);
    emu_region(dout, n_out * 2, 0);
    emu_region(D, n_stats * 4, 1);
    emu_launch(emu_dot_thread, sc_dot_launch(&p));
    emu.n_regions = 0;
    emu_region(qkv, n_qkv * 2, 0);
    emu_region(dout, n_out * 2, 0);
    emu_region(stats, n_stats * 4, 0);
    emu_region(D, n_stats * 4, 0);
    emu_region(dqkv, n_qkv * 2, 1);
    emu_launch(EMU_BY_TILE(emu_dq_thread, HD), sc_dq_launch(&p, HD));
    emu_launch(EMU_BY_TILE(emu_dkv_thread, HD), sc_dkv_launch(&p, HD));
    printf("  (%lld warp-level operations emulated)\n", emu.warp_ops);

    double *got = (double *)mallocCheck(n_qkv * sizeof(double)), *ref = (double *)mallocCheck(n_qkv * sizeof(double));
    double *ref_out = (double *)mallocCheck(n_out * sizeof(double)), *ref_lse = (double *)mallocCheck(n_stats * sizeof(double));
    double *ref_dqkv = (double *)mallocCheck(n_qkv * sizeof(double));
    reference_attention(&s, qkv, dout, ref_out, ref_lse, ref_dqkv);
    printf("  %-8s %10s %10s %10s %8s\n", "tensor", "max abs", "max/|ref|", "rel l2", "tol");
    for (size_t i = 0; i < n_out; i++) got[i] = bf16_bits_to_float(out[i]);
    compare(t, "out", got, ref_out, n_out, SOFTCAP_TOL_OUT);
    for (size_t i = 0; i < n_stats; i++) got[i] = stats[i];
    compare(t, "stats", got, ref_lse, n_stats, SOFTCAP_TOL_STATS);
    double *all = (double *)mallocCheck(n_qkv * sizeof(double));
    for (size_t i = 0; i < n_qkv; i++) all[i] = bf16_bits_to_float(dqkv[i]);
    const char *names[3] = {"dq", "dk", "dv"};
    for (int part = 0; part < 3; part++) {
        size_t n = gather_part(got, all, &s, part);
        gather_part(ref, ref_dqkv, &s, part);
        compare(t, names[part], got, ref, n, SOFTCAP_TOL_GRAD);
    }
    free(qkv);
    free(dout);
    free(out);
    free(dqkv);
    free(stats);
    free(D);
    free(got);
    free(ref);
    free(ref_out);
    free(ref_lse);
    free(ref_dqkv);
    free(all);
}

int main(int argc, char **argv) {
    (void)argv;
    if (argc != 1) die("usage: test_attention_softcap_emu (no arguments)");
    emu.stacks = (char *)mallocCheck((size_t)EMU_MAX_THREADS * EMU_STACK_BYTES);
    TestReport t = {0, 0};
    for (int i = 0; i < N_SOFTCAP_CASES; i++) check_case(&t, &softcap_cases[i]);
    free(emu.stacks);
    free(emu.smem);
    free(emu.shadow);
    return test_report_finish(&t, "test_attention_softcap_emu");
}

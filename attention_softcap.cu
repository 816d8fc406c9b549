// Causal self-attention with an attention-logit soft-cap (Gemma-2), the case cuDNN's fused SDPA
// cannot do: scores z = cap * tanh(scale * q.k / cap), then the causal / sliding-window mask and the
// softmax. GQA, optional sliding window, head dims up to 256 (multiples of 8); declared in attention.h.
//
// Flash-attention-2 on tensor cores (bf16 mma.sync, fp32 accumulation), O(S) memory. The kernel
// bodies live in attention_softcap_kernels.h, written against a few primitives that this file maps
// to PTX (and dev/test_attention_softcap_emu.cu to a CPU warp emulator):
// - forward: a block per (b, query head, 64 queries); online softmax; writes out (bf16) and the
//   natural-log log-sum-exp of each query's capped scores to stats.
// - backward: D = rowwise dO . O into the workspace; dQ: a block per (b, query head, 64 queries)
//   looping over key tiles; dK / dV: a block per (b, kv head, 64 keys) looping over the query heads
//   of its group and their query tiles, in order. No atomics: results are bit-identical run to run.
#include "attention.h"

#define SC_FN static __device__ __forceinline__
#define SC_UNROLL _Pragma("unroll")

SC_FN int sc_tid(void) { return threadIdx.x; }
SC_FN int sc_block_x(void) { return blockIdx.x; }
SC_FN int sc_block_y(void) { return blockIdx.y; }
SC_FN int sc_block_z(void) { return blockIdx.z; }
SC_FN void sc_sync(void) { __syncthreads(); }
SC_FN float sc_shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

SC_FN float sc_ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

SC_FN float sc_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

SC_FN uint32_t sc_pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

SC_FN float sc_u32_as_float(uint32_t u) { return __uint_as_float(u); }

SC_FN void sc_ldmatrix_x4(uint32_t r[4], const char *row) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

SC_FN void sc_ldmatrix_x4_trans(uint32_t r[4], const char *row) {
    uint32_t a = (uint32_t)__cvta_generic_to_shared(row);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}

SC_FN void sc_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

SC_FN void sc_cp_async16(char *dst, const bf16 *src, int valid) {
    uint32_t d = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(valid ? 16 : 0));
}
SC_FN void sc_cp_async_commit(void) { asm volatile("cp.async.commit_group;"); }
SC_FN void sc_cp_async_wait_all(void) { asm volatile("cp.async.wait_group 0;" ::: "memory"); }
SC_FN void sc_cp_async_wait_1(void) { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

SC_FN void sc_st_shared_u32(char *p, uint32_t v) { *reinterpret_cast<uint32_t *>(p) = v; }
SC_FN uint32_t sc_ld_global_u32(const bf16 *p) { return *reinterpret_cast<const uint32_t *>(p); }
SC_FN float sc_ld_global_f32(const float *p) { return __ldg(p); }
SC_FN void sc_st_global_u32(bf16 *p, uint32_t v) { *reinterpret_cast<uint32_t *>(p) = v; }
SC_FN void sc_st_global_f32(float *p, float v) { *p = v; }

#include "attention_softcap_kernels.h"

// The kernels: each runs one block of the body of the same name in attention_softcap_kernels.h.
// Forward: reads qkv; writes out, stats.
template <int HD>
__global__ void __launch_bounds__(SC_FWD_THREADS, 2) softcap_forward_kernel(ScParams p) {
    extern __shared__ __align__(16) char sc_smem[];
    sc_forward_block<HD>(p, sc_smem);
}

// D = rowwise dO . O: reads out, dout; writes D.
__global__ void __launch_bounds__(SC_DOT_THREADS) softcap_backward_dot_kernel(ScParams p) { sc_backward_dot_block(p); }

// dQ: reads qkv, dout, stats, D; writes the q columns of dqkv.
template <int HD>
__global__ void __launch_bounds__(SC_DQ_THREADS, 2) softcap_backward_dq_kernel(ScParams p) {
    extern __shared__ __align__(16) char sc_smem[];
    sc_backward_dq_block<HD>(p, sc_smem);
}

// dK, dV: reads qkv, dout, stats, D; writes the k and v columns of dqkv.
template <int HD>
__global__ void __launch_bounds__(SC_DKV_THREADS, 1) softcap_backward_dkv_kernel(ScParams p) {
    extern __shared__ __align__(16) char sc_smem[];
    sc_backward_dkv_block<HD>(p, sc_smem);
}

// ---- host side ----

extern "C" int attention_softcap_supported(const AttentionShape *s, char *why, size_t why_len) {
    const char *reason = NULL;
    if (s == NULL) reason = "no shape given";
    else if (s->B < 1 || s->S < 1 || s->Hq < 1 || s->Hkv < 1 || s->hd < 1)
        reason = "B, S, Hq, Hkv and hd must be positive";
    else if (s->B > 65535 || s->Hq > 65535) reason = "B and Hq must be at most 65535 (grid dimensions)";
    else if (s->Hq % s->Hkv != 0) reason = "Hkv must divide Hq (grouped-query attention)";
    else if (s->hd > 256) reason = "the soft-cap kernels support head dims up to 256";
    else if (s->hd % 8 != 0) reason = "the soft-cap kernels need a head dim that is a multiple of 8";
    else if (!(s->softcap > 0) || !isfinite(s->softcap)) reason = "the soft-cap kernels need a positive finite softcap";
    else if (s->window < 0) reason = "window must be 0 (full causal) or positive";
    else if (!(s->scale > 0) || !isfinite(s->scale)) reason = "scale must be a positive finite number";
    if (why != NULL && why_len > 0) snprintf(why, why_len, "%s", reason != NULL ? reason : "");
    return reason == NULL;
}

extern "C" size_t attention_softcap_workspace_bytes(const AttentionShape *s) {
    return (size_t)s->B * s->Hq * s->S * sizeof(float);
}

// The kernel parameters of a supported shape; dies with the reason otherwise.
static ScParams softcap_params(const AttentionShape *s, const char *caller) {
    char why[160];
    if (!attention_softcap_supported(s, why, sizeof(why))) die("%s: shape not supported: %s", caller, why);
    return sc_params(s);
}

// The kernels move 16-byte chunks: every bf16 buffer must start 16-byte aligned (rows are, since hd % 8 == 0).
static void require_aligned(const void *ptr, size_t alignment, const char *what, const char *caller) {
    if (ptr == NULL || (uintptr_t)ptr % alignment != 0)
        die("%s: %s must be a %zu-byte aligned device pointer, got %p", caller, what, alignment, ptr);
}

// Launches `kernel` with the geometry l, first opting in to its dynamic shared memory when that is
// above the default 48 KiB (dies when the device cannot give that much).
static void softcap_launch(const void *kernel, ScLaunch l, const ScParams *p, cudaStream_t stream, const char *caller) {
    if (l.smem > 48 * 1024) {
        int dev = 0, max_smem = 0;
        cudaCheck(cudaGetDevice(&dev));
        cudaCheck(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if (l.smem > (size_t)max_smem)
            die("%s: needs %zu bytes of shared memory per block, the device allows %d", caller, l.smem, max_smem);
        cudaCheck(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)l.smem));
    }
    void *args[] = {(void *)p};
    cudaCheck(cudaLaunchKernel(kernel, dim3(l.grid_x, l.grid_y, l.grid_z), dim3(l.threads), args, l.smem, stream));
}

// kernel<HD> for the head-dim tile HD (64, 128 or 256).
#define SOFTCAP_BY_TILE(kernel, HD) \
    ((HD) == 64 ? (const void *)kernel<64> : (HD) == 128 ? (const void *)kernel<128> : (const void *)kernel<256>)

extern "C" void attention_softcap_forward(bf16 *out, float *stats, const bf16 *qkv, const AttentionShape *s,
                                          cudaStream_t stream) {
    const char *caller = "attention_softcap_forward";
    ScParams p = softcap_params(s, caller);
    require_aligned(qkv, 16, "qkv", caller);
    require_aligned(out, 16, "out", caller);
    require_aligned(stats, 4, "stats", caller);
    p.qkv = qkv;
    p.out = out;
    p.stats = stats;
    int HD = sc_head_tile(s->hd);
    softcap_launch(SOFTCAP_BY_TILE(softcap_forward_kernel, HD), sc_forward_launch(&p, HD), &p, stream, caller);
}

extern "C" void attention_softcap_backward(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats,
                                           const bf16 *qkv, const AttentionShape *s, void *workspace,
                                           cudaStream_t stream) {
    const char *caller = "attention_softcap_backward";
    ScParams p = softcap_params(s, caller);
    require_aligned(dqkv, 16, "dqkv", caller);
    require_aligned(dout, 16, "dout", caller);
    require_aligned(out, 16, "out", caller);
    require_aligned(stats, 4, "stats", caller);
    require_aligned(qkv, 16, "qkv", caller);
    require_aligned(workspace, 4, "workspace (attention_softcap_workspace_bytes)", caller);
    p.qkv = qkv;
    p.out = const_cast<bf16 *>(out);  // read only: the backward kernels never write out or stats
    p.stats = const_cast<float *>(stats);
    p.dout = dout;
    p.dqkv = dqkv;
    p.D = (float *)workspace;
    int HD = sc_head_tile(s->hd);
    softcap_launch((const void *)softcap_backward_dot_kernel, sc_dot_launch(&p), &p, stream, caller);
    softcap_launch(SOFTCAP_BY_TILE(softcap_backward_dq_kernel, HD), sc_dq_launch(&p, HD), &p, stream, caller);
    softcap_launch(SOFTCAP_BY_TILE(softcap_backward_dkv_kernel, HD), sc_dkv_launch(&p, HD), &p, stream, caller);
}

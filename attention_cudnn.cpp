// Causal self-attention (GQA, optional sliding window) through cuDNN's fused flash attention, built
// with the cudnn-frontend graph API and exposed through the C interface of attention.h.
//
// Every tensor is a strided view into the caller's packed buffers, so nothing is copied:
//   qkv / dqkv (B*S, C) bf16, C = (Hq + 2 Hkv) hd, row b*S + s = [q heads | k heads | v heads]:
//     Q  dims (B, Hq,  S, hd) strides (S C, hd, C, 1) at element offset 0
//     K  dims (B, Hkv, S, hd) strides (S C, hd, C, 1) at element offset Hq hd
//     V  dims (B, Hkv, S, hd) strides (S C, hd, C, 1) at element offset (Hq + Hkv) hd
//   out / dout (B*S, Hq hd) bf16: O, dO dims (B, Hq, S, hd) strides (S Hq hd, hd, Hq hd, 1)
//   stats (B, Hq, S) fp32: Stats dims (B, Hq, S, 1) strides (Hq S, S, 1, 1), the natural-log
//     log-sum-exp of each query's scaled scores, written by the forward, read by the backward.
// With head_groups G > 1 the backward runs G times over a slice of the heads: Q, O, dO, Stats, dQ
// views of Hq/G heads, K, V, dK, dV of Hkv/G heads, with the strides of the whole buffers, at the
// slice's element offset; one graph serves every slice.
// attention_backward_group runs one such slice with packed per-group gradients instead (the
// packed-group graph): dO (B*S, hq hd) dims (B, hq, S, hd) strides (S hq hd, hd, hq hd, 1), and
// dqkv_g (B*S, Cg) bf16, Cg = (hq + 2 hk) hd, row = [dq | dk | dv] of the group's heads: dQ, dK, dV
// strides (S Cg, hd, Cg, 1) at element offsets 0, hq hd, (hq + hk) hd.
// Mask: query i sees keys j with j <= i (causal: top-left diagonal, right bound 0) and, when
// window > 0, i - window < j (left bound `window`: cuDNN keeps j + window > i).
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <cmath>
#include <exception>
#include <memory>
#include <unordered_map>
#include <vector>

#include "attention.h"

namespace fe = cudnn_frontend;

static void cudnn_check(cudnnStatus_t status, const char *file, int line) {
    if (status != CUDNN_STATUS_SUCCESS) {
        die("cuDNN: %s (%d) [%s:%d]", cudnnGetErrorString(status), (int)status, file, line);
    }
}
#define cudnnCheck(call) cudnn_check((call), __FILE__, __LINE__)

// Tensor UIDs of the graphs' variant packs.
enum : int64_t {
    UID_Q = 1,
    UID_K,
    UID_V,
    UID_O,
    UID_STATS,
    UID_DO,
    UID_DQ,
    UID_DK,
    UID_DV,
};

// Which graph: the forward, the backward over whole-buffer views, or one head group's backward with
// packed dO and dq|dk|dv (attention_backward_group).
enum GraphKind { GRAPH_FORWARD = 0, GRAPH_BACKWARD = 1, GRAPH_BACKWARD_PACKED_GROUP = 2 };

static const char *graph_kind_name(int kind) {
    return kind == GRAPH_BACKWARD_PACKED_GROUP ? "packed-group backward" : kind == GRAPH_BACKWARD ? "backward" : "forward";
}

// A built graph for one shape and kind, with the workspace its execution plan needs.
struct AttentionGraph {
    AttentionShape shape;
    int kind;  // GraphKind
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace_bytes;
};

#define ATTENTION_GRAPH_CACHE_SIZE 16

// The table lives on the heap (attention_init / attention_free), so no frontend object is destroyed
// by static destructors at exit, e.g. after die().
static struct {
    cudnnHandle_t handle;
    AttentionGraph *graphs;  // [ATTENTION_GRAPH_CACHE_SIZE]
    int n_graphs;
    int next_evict;  // round-robin victim once the table is full
} attention_state;

static void describe_shape(char *buf, size_t len, const AttentionShape *s) {
    snprintf(buf, len, "B=%d S=%d Hq=%d Hkv=%d hd=%d scale=%g window=%d softcap=%g head_groups=%d", s->B, s->S, s->Hq,
             s->Hkv, s->hd, (double)s->scale, s->window, (double)s->softcap, s->head_groups);
}

static int head_groups(const AttentionShape *s) { return s->head_groups > 1 ? s->head_groups : 1; }

// Dies with the frontend's message when a graph step fails.
static void fe_check(const fe::error_t &err, const char *step, const AttentionShape *s, const char *file, int line) {
    if (err.is_good()) return;
    char shape[160];
    describe_shape(shape, sizeof(shape), s);
    die("cudnn-frontend: %s failed for attention %s: %s (code %d) [%s:%d]", step, shape, err.err_msg.c_str(),
        (int)err.code, file, line);
}
#define feCheck(call, step, shape) fe_check((call), (step), (shape), __FILE__, __LINE__)

extern "C" void attention_init(void) {
    if (attention_state.handle != NULL) die("attention_init called twice");
    cudnnCheck(cudnnCreate(&attention_state.handle));
    attention_state.graphs = new AttentionGraph[ATTENTION_GRAPH_CACHE_SIZE];
    attention_state.n_graphs = 0;
    attention_state.next_evict = 0;
}

extern "C" void attention_free(void) {
    if (attention_state.handle == NULL) return;
    delete[] attention_state.graphs;
    attention_state.graphs = NULL;
    attention_state.n_graphs = 0;
    attention_state.next_evict = 0;
    cudnnCheck(cudnnDestroy(attention_state.handle));
    attention_state.handle = NULL;
}

extern "C" int attention_supported(const AttentionShape *s, char *why, size_t why_len) {
    const char *reason = NULL;
    if (s == NULL) reason = "no shape given";
    else if (s->B < 1 || s->S < 1 || s->Hq < 1 || s->Hkv < 1 || s->hd < 1)
        reason = "B, S, Hq, Hkv and hd must be positive";
    else if (s->S < 2) reason = "cuDNN's SDPA backward rejects S = 1 (s_q = s_kv = 1)";
    else if (s->Hq % s->Hkv != 0) reason = "Hkv must divide Hq (grouped-query attention)";
    else if (s->hd % 8 != 0) reason = "cuDNN SDPA needs a head dim that is a multiple of 8";
    else if (s->hd > 256) reason = "cuDNN SDPA supports head dims up to 256";
    else if (s->softcap > 0) reason = "cuDNN SDPA cannot soft-cap attention logits (Gemma-2 needs another path)";
    else if (s->softcap != 0) reason = "softcap must be 0 (none) or positive";
    else if (s->window < 0) reason = "window must be 0 (full causal) or positive";
    else if (!(s->scale > 0) || !std::isfinite(s->scale)) reason = "scale must be a positive finite number";
    else if (s->head_groups < 0 || (s->head_groups > 1 && s->Hkv % s->head_groups != 0))
        reason = "head_groups must be 0, 1 or a divisor of Hkv";
    if (why != NULL && why_len > 0) snprintf(why, why_len, "%s", reason != NULL ? reason : "");
    return reason == NULL;
}

static void require_supported(const AttentionShape *s, const char *caller) {
    char why[160];
    if (!attention_supported(s, why, sizeof(why))) die("%s: shape not supported by the cuDNN path: %s", caller, why);
    if (attention_state.handle == NULL) die("%s: attention_init was not called", caller);
}

// require_supported, and head_groups > 1 (the packed-group backward runs one of several groups).
static void require_grouped(const AttentionShape *s, const char *caller) {
    if (s != NULL && s->head_groups < 2)
        die("%s: head_groups is %d: the packed-group backward needs 2 or more groups", caller, s->head_groups);
    require_supported(s, caller);
    // Its dO has other strides than O: cuDNN before 9.5.1 assumed them equal (PyTorch checked for it).
    if (cudnnGetVersion() < 90501)
        die("%s: the packed-group backward needs cuDNN 9.5.1 or newer (dO and O with different strides); this is %zu",
            caller, cudnnGetVersion());
}

// ---- tensor views ----
static int64_t qkv_row_elems(const AttentionShape *s) { return (int64_t)(s->Hq + 2 * s->Hkv) * s->hd; }

// A head range of the packed qkv (or dqkv) buffer: dims (B, heads, S, hd), strides (S C, hd, C, 1).
static fe::graph::Tensor_attributes qkv_view(const char *name, int64_t uid, const AttentionShape *s, int heads) {
    int64_t C = qkv_row_elems(s);
    return fe::graph::Tensor_attributes()
        .set_name(name)
        .set_uid(uid)
        .set_dim({s->B, heads, s->S, s->hd})
        .set_stride({(int64_t)s->S * C, s->hd, C, 1});
}

// out / dout (B*S, Hq hd): dims (B, heads, S, hd), strides (S Hq hd, hd, Hq hd, 1).
static std::vector<int64_t> o_dims(const AttentionShape *s, int heads) { return {s->B, heads, s->S, s->hd}; }
static std::vector<int64_t> o_strides(const AttentionShape *s) {
    int64_t row = (int64_t)s->Hq * s->hd;
    return {(int64_t)s->S * row, s->hd, row, 1};
}

// stats (B, heads, S) fp32: dims (B, heads, S, 1), packed strides (heads S, S, 1, 1). cuDNN before 9.26
// takes only packed stats in the backward, so a head slice of (B, Hq, S) is passed in place when B = 1
// and copied to packed scratch (grouped_stats_bytes) when B > 1.
static std::vector<int64_t> stats_dims(const AttentionShape *s, int heads) { return {s->B, heads, s->S, 1}; }
static std::vector<int64_t> stats_strides(const AttentionShape *s, int heads) { return {(int64_t)heads * s->S, s->S, 1, 1}; }

// Bytes of packed stats scratch one head slice needs at the end of the backward's workspace.
static int64_t grouped_stats_bytes(const AttentionShape *s) {
    int G = s->head_groups > 1 ? s->head_groups : 1;
    if (G == 1 || s->B == 1) return 0;
    return ((int64_t)s->B * (s->Hq / G) * s->S * (int64_t)sizeof(float) + 255) / 256 * 256;
}

static std::shared_ptr<fe::graph::Graph> new_graph(void) {
    auto graph = std::make_shared<fe::graph::Graph>();
    graph->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    return graph;
}

// Forward: (Q, K, V) -> (O, Stats), causal with the optional window, scores scaled by `scale`.
static std::shared_ptr<fe::graph::Graph> define_forward(const AttentionShape *s) {
    auto graph = new_graph();
    auto Q = graph->tensor(qkv_view("Q", UID_Q, s, s->Hq));
    auto K = graph->tensor(qkv_view("K", UID_K, s, s->Hkv));
    auto V = graph->tensor(qkv_view("V", UID_V, s, s->Hkv));
    auto options = fe::graph::SDPA_attributes()
                       .set_name("attention_forward")
                       .set_generate_stats(true)
                       .set_attn_scale(s->scale)
                       .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                       .set_diagonal_band_right_bound(0);
    if (s->window > 0) options.set_diagonal_band_left_bound(s->window);
    auto outputs = graph->sdpa(Q, K, V, options);
    outputs[0]->set_output(true).set_uid(UID_O).set_dim(o_dims(s, s->Hq)).set_stride(o_strides(s));
    outputs[1]->set_output(true)
        .set_uid(UID_STATS)
        .set_data_type(fe::DataType_t::FLOAT)
        .set_dim(stats_dims(s, s->Hq))
        .set_stride(stats_strides(s, s->Hq));
    return graph;
}

// Backward of one head slice: (Q, K, V, O, dO, Stats) -> (dQ, dK, dV) over Hq/G query heads and their
// Hkv/G kv heads, the same mask and scale as the forward. packed: dO and dQ, dK, dV in the packed
// per-group layouts (see the top of the file), else views of the whole buffers.
static std::shared_ptr<fe::graph::Graph> define_backward(const AttentionShape *s, int packed) {
    int hq = s->Hq / head_groups(s), hk = s->Hkv / head_groups(s);
    auto graph = new_graph();
    auto Q = graph->tensor(qkv_view("Q", UID_Q, s, hq));
    auto K = graph->tensor(qkv_view("K", UID_K, s, hk));
    auto V = graph->tensor(qkv_view("V", UID_V, s, hk));
    auto O = graph->tensor(
        fe::graph::Tensor_attributes().set_name("O").set_uid(UID_O).set_dim(o_dims(s, hq)).set_stride(o_strides(s)));
    int64_t do_row = packed ? (int64_t)hq * s->hd : (int64_t)s->Hq * s->hd;
    auto dO = graph->tensor(fe::graph::Tensor_attributes()
                                .set_name("dO")
                                .set_uid(UID_DO)
                                .set_dim(o_dims(s, hq))
                                .set_stride({(int64_t)s->S * do_row, s->hd, do_row, 1}));
    auto Stats = graph->tensor(fe::graph::Tensor_attributes()
                                   .set_name("Stats")
                                   .set_uid(UID_STATS)
                                   .set_data_type(fe::DataType_t::FLOAT)
                                   .set_dim(stats_dims(s, hq))
                                   .set_stride(stats_strides(s, hq)));
    auto options = fe::graph::SDPA_backward_attributes()
                       .set_name("attention_backward")
                       .set_attn_scale(s->scale)
                       .set_diagonal_alignment(fe::DiagonalAlignment_t::TOP_LEFT)
                       .set_diagonal_band_right_bound(0);
    if (s->window > 0) options.set_diagonal_band_left_bound(s->window);
    auto grads = graph->sdpa_backward(Q, K, V, O, dO, Stats, options);
    int64_t C = packed ? (int64_t)(hq + 2 * hk) * s->hd : qkv_row_elems(s);
    std::vector<int64_t> strides = {(int64_t)s->S * C, s->hd, C, 1};
    grads[0]->set_output(true).set_uid(UID_DQ).set_dim({s->B, hq, s->S, s->hd}).set_stride(strides);
    grads[1]->set_output(true).set_uid(UID_DK).set_dim({s->B, hk, s->S, s->hd}).set_stride(strides);
    grads[2]->set_output(true).set_uid(UID_DV).set_dim({s->B, hk, s->S, s->hd}).set_stride(strides);
    return graph;
}

// Defines, validates and builds the graph (heuristic mode A, first plan that builds) and records
// its workspace size. The frontend can also throw (e.g. no SDPA implementation fits): that dies too.
static void build_graph(AttentionGraph *entry) {
    const AttentionShape *s = &entry->shape;
    try {
        auto graph = entry->kind == GRAPH_FORWARD ? define_forward(s)
                                                  : define_backward(s, entry->kind == GRAPH_BACKWARD_PACKED_GROUP);
        feCheck(graph->validate(), "validate", s);
        feCheck(graph->build_operation_graph(attention_state.handle), "build_operation_graph", s);
        feCheck(graph->create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans", s);
        feCheck(graph->check_support(), "check_support", s);
        feCheck(graph->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE), "build_plans", s);
        int64_t workspace = 0;
        feCheck(graph->get_workspace_size(workspace), "get_workspace_size", s);
        entry->graph = graph;
        entry->workspace_bytes = (workspace + 255) / 256 * 256 + (entry->kind != GRAPH_FORWARD ? grouped_stats_bytes(s) : 0);
    } catch (const std::exception &e) {
        char shape[160];
        describe_shape(shape, sizeof(shape), s);
        die("cudnn-frontend threw while building the attention %s graph for %s: %s",
            graph_kind_name(entry->kind),
            shape, e.what());
    }
}

static int same_shape(const AttentionShape *a, const AttentionShape *b) {
    return a->B == b->B && a->S == b->S && a->Hq == b->Hq && a->Hkv == b->Hkv && a->hd == b->hd &&
           memcmp(&a->scale, &b->scale, sizeof(float)) == 0 && a->window == b->window &&
           memcmp(&a->softcap, &b->softcap, sizeof(float)) == 0 && head_groups(a) == head_groups(b);
}

// The cached graph for this shape and kind (GraphKind), built on first use.
static AttentionGraph *get_graph(const AttentionShape *s, int kind) {
    AttentionShape key = *s;
    if (kind == GRAPH_FORWARD) key.head_groups = 1;  // the forward runs in one call whatever the backward does
    for (int i = 0; i < attention_state.n_graphs; i++) {
        AttentionGraph *g = &attention_state.graphs[i];
        if (g->kind == kind && same_shape(&g->shape, &key)) return g;
    }
    AttentionGraph *g;
    if (attention_state.n_graphs < ATTENTION_GRAPH_CACHE_SIZE) {
        g = &attention_state.graphs[attention_state.n_graphs++];
    } else {
        g = &attention_state.graphs[attention_state.next_evict];
        attention_state.next_evict = (attention_state.next_evict + 1) % ATTENTION_GRAPH_CACHE_SIZE;
        cudaCheck(cudaDeviceSynchronize());  // no kernel of the victim's plan may still be running
        g->graph.reset();
    }
    g->shape = key;
    g->kind = kind;
    build_graph(g);
    return g;
}

extern "C" size_t attention_workspace_bytes(const AttentionShape *s) {
    require_supported(s, "attention_workspace_bytes");
    int64_t fwd = get_graph(s, GRAPH_FORWARD)->workspace_bytes;
    int64_t bwd = get_graph(s, GRAPH_BACKWARD)->workspace_bytes;
    return (size_t)(fwd > bwd ? fwd : bwd);
}

extern "C" size_t attention_group_workspace_bytes(const AttentionShape *s) {
    require_grouped(s, "attention_group_workspace_bytes");
    int64_t fwd = get_graph(s, GRAPH_FORWARD)->workspace_bytes;
    int64_t bwd = get_graph(s, GRAPH_BACKWARD_PACKED_GROUP)->workspace_bytes;
    return (size_t)(fwd > bwd ? fwd : bwd);
}

static void execute_graph(AttentionGraph *g, std::unordered_map<int64_t, void *> &pack, void *workspace,
                          cudaStream_t stream) {
    if (g->workspace_bytes > 0 && workspace == NULL) {
        die("attention: the %s pass needs %lld bytes of workspace and got NULL (see attention_workspace_bytes)",
            graph_kind_name(g->kind), (long long)g->workspace_bytes);
    }
    cudnnCheck(cudnnSetStream(attention_state.handle, stream));
    try {
        feCheck(g->graph->execute(attention_state.handle, pack, workspace), "execute", &g->shape);
    } catch (const std::exception &e) {
        die("cudnn-frontend threw while executing attention: %s", e.what());
    }
}

extern "C" void attention_forward(bf16 *out, float *stats, const bf16 *qkv, const AttentionShape *s, void *workspace,
                                  cudaStream_t stream) {
    require_supported(s, "attention_forward");
    AttentionGraph *g = get_graph(s, GRAPH_FORWARD);
    bf16 *q = const_cast<bf16 *>(qkv);
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, q},
        {UID_K, q + (size_t)s->Hq * s->hd},
        {UID_V, q + (size_t)(s->Hq + s->Hkv) * s->hd},
        {UID_O, out},
        {UID_STATS, stats},
    };
    execute_graph(g, pack, workspace, stream);
}

// Stats of query-head slice i for the backward: in place when B = 1, else copied to packed scratch
// at the end of the graph's workspace (rows b: hq S floats at pitch Hq S).
static float *slice_stats(AttentionGraph *g, const float *stats, const AttentionShape *s, int i, void *workspace,
                          cudaStream_t stream) {
    int hq = s->Hq / head_groups(s);
    float *slice = const_cast<float *>(stats) + (size_t)i * hq * s->S;
    int64_t stats_bytes = grouped_stats_bytes(s);
    if (stats_bytes == 0) return slice;
    float *packed = (float *)((char *)workspace + g->workspace_bytes - stats_bytes);
    size_t row = (size_t)hq * s->S * sizeof(float);
    cudaCheck(cudaMemcpy2DAsync(packed, row, slice, (size_t)s->Hq * s->S * sizeof(float), row, (size_t)s->B,
                                cudaMemcpyDeviceToDevice, stream));
    return packed;
}

extern "C" void attention_backward(bf16 *dqkv, const bf16 *dout, const bf16 *out, const float *stats, const bf16 *qkv,
                                   const AttentionShape *s, void *workspace, cudaStream_t stream) {
    require_supported(s, "attention_backward");
    AttentionGraph *g = get_graph(s, GRAPH_BACKWARD);
    int G = head_groups(s), hq = s->Hq / G, hk = s->Hkv / G;
    bf16 *q = const_cast<bf16 *>(qkv);
    size_t k_at = (size_t)s->Hq * s->hd, v_at = (size_t)(s->Hq + s->Hkv) * s->hd;
    for (int i = 0; i < G; i++) {
        size_t q_off = (size_t)i * hq * s->hd, kv_off = (size_t)i * hk * s->hd;
        std::unordered_map<int64_t, void *> pack = {
            {UID_Q, q + q_off},
            {UID_K, q + k_at + kv_off},
            {UID_V, q + v_at + kv_off},
            {UID_O, const_cast<bf16 *>(out) + q_off},
            {UID_DO, const_cast<bf16 *>(dout) + q_off},
            {UID_STATS, slice_stats(g, stats, s, i, workspace, stream)},
            {UID_DQ, dqkv + q_off},
            {UID_DK, dqkv + k_at + kv_off},
            {UID_DV, dqkv + v_at + kv_off},
        };
        execute_graph(g, pack, workspace, stream);
    }
}

extern "C" void attention_backward_group(bf16 *dqkv_g, const bf16 *dout_g, const bf16 *out, const float *stats,
                                         const bf16 *qkv, const AttentionShape *s, int group, void *workspace,
                                         cudaStream_t stream) {
    require_grouped(s, "attention_backward_group");
    int G = head_groups(s), hq = s->Hq / G, hk = s->Hkv / G;
    if (group < 0 || group >= G) die("attention_backward_group: group %d outside [0, %d)", group, G);
    AttentionGraph *g = get_graph(s, GRAPH_BACKWARD_PACKED_GROUP);
    bf16 *q = const_cast<bf16 *>(qkv);
    size_t q_off = (size_t)group * hq * s->hd, kv_off = (size_t)group * hk * s->hd;
    size_t k_at = (size_t)s->Hq * s->hd, v_at = (size_t)(s->Hq + s->Hkv) * s->hd;
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, q + q_off},
        {UID_K, q + k_at + kv_off},
        {UID_V, q + v_at + kv_off},
        {UID_O, const_cast<bf16 *>(out) + q_off},
        {UID_DO, const_cast<bf16 *>(dout_g)},
        {UID_STATS, slice_stats(g, stats, s, group, workspace, stream)},
        {UID_DQ, dqkv_g},
        {UID_DK, dqkv_g + (size_t)hq * s->hd},
        {UID_DV, dqkv_g + (size_t)(hq + hk) * s->hd},
    };
    execute_graph(g, pack, workspace, stream);
}

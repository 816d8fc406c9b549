// The sliced attention backward (attn_sliced.h): per head group, the o-projection's input gradient
// for the group's columns, cuDNN's backward of the group into packed scratch, and strided copies of
// dq, dk, dv into the group's (now free) columns of q|k|v.
#include "attn_sliced.h"
#include "matmul.h"

// Copies `cols` columns of rows rows from src (pitch src_ld elements) to dst (pitch dst_ld), bf16.
static void copy_columns(bf16 *dst, int dst_ld, const bf16 *src, int src_ld, int cols, size_t rows, cudaStream_t stream) {
    cudaCheck(cudaMemcpy2DAsync(dst, (size_t)dst_ld * sizeof(bf16), src, (size_t)src_ld * sizeof(bf16),
                                (size_t)cols * sizeof(bf16), rows, cudaMemcpyDeviceToDevice, stream));
}

void attention_backward_sliced(bf16 *qkv, bf16 *dqkv_g, bf16 *datt_g, const bf16 *dao, const bf16 *Wo, const bf16 *att,
                               const float *stats, const AttentionShape *sh, int d_model, void *workspace,
                               cudaStream_t stream) {
    int G = sh->head_groups;
    if (G < 2 || sh->Hkv % G != 0) die("attention_backward_sliced: head_groups %d must be >= 2 and divide Hkv = %d", G, sh->Hkv);
    size_t N = (size_t)sh->B * sh->S;
    int hd = sh->hd, q = sh->Hq * hd, C = (sh->Hq + 2 * sh->Hkv) * hd;
    int qg = (sh->Hq / G) * hd, kg = (sh->Hkv / G) * hd, Cg = qg + 2 * kg;
    for (int g = 0; g < G; g++) {
        // datt_g (N, qg) = dao (N, d) Wo[:, g qg .. (g + 1) qg)  (Wo stored (d, q): a column slice, ld q)
        gemm_strided(datt_g, DT_BF16, qg, dao, d_model, 0, Wo + (size_t)g * qg, q, 0, (int)N, qg, d_model, 1.0f, 0.0f,
                     stream);
        attention_backward_group(dqkv_g, datt_g, att, stats, qkv, sh, g, workspace, stream);
        copy_columns(qkv + (size_t)g * qg, C, dqkv_g, Cg, qg, N, stream);
        copy_columns(qkv + q + (size_t)g * kg, C, dqkv_g + qg, Cg, kg, N, stream);
        copy_columns(qkv + q + (size_t)(sh->Hkv * hd) + (size_t)g * kg, C, dqkv_g + qg + kg, Cg, kg, N, stream);
    }
}

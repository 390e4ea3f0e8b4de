/* The decoder stack of a dense Llama-family model (llama.py: Llama, Mistral, Qwen2's qkv bias;
 * no q/k norm, no MoE, one rank) as one call per step, for CPU fp32 with block-quantized weights
 * in AMX tiles (qgemm) and int8 blocks for steps of a few tokens, or, on a CPU without the tile
 * unit, int8 blocks only (bqgemm). It calls the same C kernels with the same arguments in the same order as the Python
 * forward does, one after another, so its hidden states are bit for bit the Python path's;
 * what it saves is the Python between them (~10 calls a layer, each through nn.Module and
 * ctypes, and a fresh tensor for most). The kernels come as function pointers from their own
 * libraries (engine/layers/csrc, engine/attention/csrc), so each keeps one definition.
 *
 * Buffers (step): residual comes in holding the embedded tokens and is the residual stream;
 * x ends holding the final norm's output, the hidden states. Per layer, with T tokens:
 *   x = norm(residual)           (layer 0; later layers: residual += x, x = norm(residual))
 *   qkv = x Wqkv^T (+ bias); rotary on its q and k heads
 *   attn = attention(q, k, v) over the paged cache (the kernels write k, v into it first)
 *   x = attn Wo^T; residual += x, x = norm(residual)
 *   gate_up = x Wgu^T; act = silu(gate) * up; x = act Wdown^T */
#include <stdint.h>

typedef void (*qgemm_fn)(const float *x, int64_t ldx, int64_t rows, int64_t k, const uint16_t *bq,
                         const float *dm, int64_t groups, int has_m, const float *bias, float *y, int64_t ldy,
                         int64_t n, uint16_t *ap, float *xs);
typedef int (*bqgemm_fn)(const float *x, int64_t ldx, int64_t rows, int64_t k, const int8_t *q8, const uint16_t *dm,
                         int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t n, float *xs,
                         float *xp);
typedef int (*decode_fn)(const float *q, int64_t q_stride, const float *k_new, int64_t k_stride, const float *v_new,
                         int64_t v_stride, const int64_t *slots, float *k_cache, float *v_cache,
                         const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens, float *out,
                         int64_t n, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                         float scale, int64_t max_seq_len);
typedef int (*prefill_fn)(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                          int64_t v_stride, const int64_t *slot_mapping, float *k_cache, float *v_cache,
                          const int32_t *block_tables, int64_t max_blocks, const int32_t *query_start,
                          const int32_t *seq_lens, int64_t first_seq, int64_t num_seqs, float *out, int64_t out_stride,
                          int64_t H, int64_t KVH, int64_t D, int64_t bs, float scale);
typedef void (*norm_fn)(float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t cols,
                        float eps);
typedef void (*rotary_fn)(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                          const int64_t *positions, const float *cos_table, const float *sin_table);
typedef void (*silu_fn)(const float *gate_up, int64_t rows, int64_t inter, float *out);

typedef struct {  /* one linear layer's integers: AMX tiles (qgemm.Packed), int8 blocks (bqgemm.Packed8) or both */
    const uint16_t *tiles;
    const float *dm;        /* the tiles' scales, fp32 */
    const int8_t *q8;
    const uint16_t *dm16;   /* the int8 blocks' scales, fp16 */
    const float *bias;
    int64_t groups, in_features, out_features;
    int64_t has_m;
} Weight;

typedef struct {
    const float *input_norm, *post_norm;
    Weight qkv, o, gate_up, down;
    float *k_cache, *v_cache;  /* [num_blocks, block_size, kv_heads, head_dim] */
} Layer;

typedef struct {
    int64_t num_layers, hidden, heads, kv_heads, head_dim, inter, block_size;
    float eps, scale;
    const Layer *layers;
    const float *final_norm, *cos_table, *sin_table;
    qgemm_fn qgemm;    /* where the weights have tiles */
    bqgemm_fn bqgemm;  /* where they have int8 blocks: steps of up to bq_rows tokens */
    int64_t bq_rows;
    decode_fn decode;
    prefill_fn prefill;
    norm_fn norm;
    rotary_fn rotary;
    silu_fn silu;
} Model;

typedef struct {  /* one step: the flat batch (decodes first) and its attention metadata */
    int64_t tokens, num_decodes, num_seqs, max_blocks, max_decode_len;
    const int64_t *positions, *slots;
    const int32_t *block_tables, *seq_lens, *query_start;
    float *residual, *x, *qkv, *attn, *gate_up, *act;
    uint16_t *ap;  /* qgemm's scratch (native_decoder.py sizes it) */
    float *xs;     /* either kernel's block sums */
    float *xp;     /* bqgemm's packed x */
} Step;

/* The kernel gemm.matmul picks for this many rows: int8 blocks up to bq_rows, else the tiles. */
static int linear(const Model *m, const Step *s, const float *x, const Weight *w, float *y) {
    if (w->q8 && s->tokens <= m->bq_rows)
        return m->bqgemm(x, w->in_features, s->tokens, w->in_features, w->q8, w->dm16, w->groups, (int)w->has_m,
                         w->bias, y, w->out_features, w->out_features, s->xs, s->xp) ? 4 : 0;
    m->qgemm(x, w->in_features, s->tokens, w->in_features, w->tiles, w->dm, w->groups, (int)w->has_m, w->bias, y,
             w->out_features, w->out_features, s->ap, s->xs);
    return 0;
}

/* 0; 1 when decode attention's score buffer, 2 when prefill attention's scratch, 4 when bqgemm's
 * scratch could not be allocated; 3 when the prefill kernel cannot take this shape (it wrote nothing). */
int decoder_forward_f32(const Model *m, const Step *s) {
    const int64_t T = s->tokens, H = m->heads, KVH = m->kv_heads, D = m->head_dim;
    const int64_t qkv_stride = (H + 2 * KVH) * D, nd = s->num_decodes;
    int r;
    for (int64_t l = 0; l < m->num_layers; l++) {
        const Layer *L = m->layers + l;
        if (l == 0) m->norm(s->residual, 0, L->input_norm, s->x, T, m->hidden, m->eps);
        else m->norm(s->x, s->residual, L->input_norm, s->x, T, m->hidden, m->eps);
        if ((r = linear(m, s, s->x, &L->qkv, s->qkv))) return r;
        m->rotary(s->qkv, qkv_stride, T, H + KVH, D, s->positions, m->cos_table, m->sin_table);
        const float *q = s->qkv, *k = q + H * D, *v = k + KVH * D;
        if (nd && m->decode(q, qkv_stride, k, qkv_stride, v, qkv_stride, s->slots, L->k_cache, L->v_cache,
                            s->block_tables, s->max_blocks, s->seq_lens, s->attn, nd, H, KVH, D, m->block_size,
                            m->scale, s->max_decode_len))
            return 1;
        if (nd < s->num_seqs) {
            r = m->prefill(q, qkv_stride, k, qkv_stride, v, qkv_stride, s->slots, L->k_cache, L->v_cache,
                           s->block_tables, s->max_blocks, s->query_start, s->seq_lens, nd, s->num_seqs, s->attn,
                           H * D, H, KVH, D, m->block_size, m->scale);
            if (r) return r == -2 ? 2 : 3;
        }
        if ((r = linear(m, s, s->attn, &L->o, s->x))) return r;
        m->norm(s->x, s->residual, L->post_norm, s->x, T, m->hidden, m->eps);
        if ((r = linear(m, s, s->x, &L->gate_up, s->gate_up))) return r;
        m->silu(s->gate_up, T, m->inter, s->act);
        if ((r = linear(m, s, s->act, &L->down, s->x))) return r;
    }
    m->norm(s->x, s->residual, m->final_norm, s->x, T, m->hidden, m->eps);
    return 0;
}

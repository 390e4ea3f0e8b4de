/* Causal attention for prefill chunks on CPUs, straight over the paged KV cache (the chunk's own
 * K/V already written there), flash-style: keys in chunks with an online softmax, so no
 * [queries, keys] matrix is ever whole.
 *
 * A work item is (sequence, kv head, 16 consecutive query tokens). Its rows are the 16 tokens x
 * G query heads of the GQA group (r = g * 16 + j), laid out across vector lanes: the queries are
 * transposed once into QT [head_dim][rows], and every product is then an 8 x (16 * nv) register
 * tile fed by broadcasts, like a GEMM's:
 *   scores  S[t][r]  = sum_d K[t][d] * QT[d][r]     (8 keys at a time, K rows read in place)
 *   output  OT[d][r] += sum_t V[t][d] * P[t][r]     (8 dims at a time, V rows read in place)
 * The softmax runs down S's columns, so a row's max, exp and sum are plain vector ops across
 * keys. Masked scores are a large negative number, not -inf (built with -ffast-math for
 * glibc's vector expf). Work items are shared out over OpenMP threads, longest (latest) first. */
#include <omp.h>
#include <stdint.h>
#include "denormals.h"
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
__m512 _ZGVeN16v_expf(__m512);  /* libmvec's 16-lane expf */
#define exp16 _ZGVeN16v_expf
#endif

#define BQ 16     /* query tokens per work item: one vector of lanes per query head */
#define KC 256    /* keys per chunk of the online softmax */
#define NEG (-1e30f)

#if defined(__AVX512F__)
typedef struct {
    float *qt, *s, *ot, *m, *l;  /* [D][R], [KC][R], [D][R], [R], [R] */
    const float **krows, **vrows;  /* [KC] each: the K and V row of each key of the chunk */
} Scratch;

/* S[i][v] = sum_d K_i[d] * QT[d][v] for 8 (mi) keys i and 16 nv rows v */
static inline __attribute__((always_inline)) void tile_qk(int mi, int nv, const float *const *krows, int64_t kvoff,
                                                          const float *qt, int64_t R, int64_t D, float *s) {
    __m512 acc[8][3];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
#pragma GCC unroll 3
        for (int v = 0; v < 3; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 b[3];
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) b[v] = _mm512_loadu_ps(qt + d * R + 16 * v);
#pragma GCC unroll 8
        for (int i = 0; i < mi; i++) {
            const __m512 a = _mm512_set1_ps(krows[i][kvoff + d]);
#pragma GCC unroll 3
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < mi; i++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(s + i * R + 16 * v, acc[i][v]);
}

/* OT[i][v] += sum_t V_t[i] * P[t][v] for 8 dims i and 16 nv rows v */
static inline __attribute__((always_inline)) void tile_pv(int nv, const float *const *vrows, int64_t kvoff, int64_t kc,
                                                          const float *p, int64_t R, float *ot) {
    __m512 acc[8][3];
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) acc[i][v] = _mm512_loadu_ps(ot + i * R + 16 * v);
    for (int64_t t = 0; t < kc; t++) {
        __m512 b[3];
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) b[v] = _mm512_loadu_ps(p + t * R + 16 * v);
        const float *vr = vrows[t] + kvoff;
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++) {
            const __m512 a = _mm512_set1_ps(vr[i]);
#pragma GCC unroll 3
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
#pragma GCC unroll 3
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(ot + i * R + 16 * v, acc[i][v]);
}

static void qk(int mi, int nv, const float *const *krows, int64_t kvoff, const float *qt, int64_t R, int64_t D,
               float *s) {
    switch (nv * 8 + mi) {  /* constant shapes, so the accumulators live in registers */
#define QK(NV, MI) case NV * 8 + MI: tile_qk(MI, NV, krows, kvoff, qt, R, D, s); break;
#define QK8(NV) QK(NV, 1) QK(NV, 2) QK(NV, 3) QK(NV, 4) QK(NV, 5) QK(NV, 6) QK(NV, 7) QK(NV, 8)
    QK8(1) QK8(2) QK8(3)
    }
}

static void pv(int nv, const float *const *vrows, int64_t kvoff, int64_t kc, const float *p, int64_t R, float *ot) {
    switch (nv) {
    case 1: tile_pv(1, vrows, kvoff, kc, p, R, ot); break;
    case 2: tile_pv(2, vrows, kvoff, kc, p, R, ot); break;
    default: tile_pv(3, vrows, kvoff, kc, p, R, ot); break;
    }
}

/* one work item: tokens [j0, j0 + nq) of a chunk whose first token sits at position pos0 */
static void attend_block(Scratch *w, const float *q, int64_t q_stride, const float *k_cache, const float *v_cache,
                         const int32_t *table, int64_t kvh, int64_t G, int64_t KVH, int64_t D, int64_t bs,
                         int64_t pos0, int64_t nq, float scale, float *out, int64_t out_stride) {
    const int64_t R = G * BQ, row = KVH * D;
    for (int64_t d = 0; d < D; d++)  /* QT[d][g * 16 + j] = q[token j][head kvh * G + g][d] */
        for (int64_t g = 0; g < G; g++)
            for (int64_t j = 0; j < BQ; j++)
                w->qt[d * R + g * BQ + j] = j < nq ? q[j * q_stride + (kvh * G + g) * D + d] : 0.f;
    for (int64_t r = 0; r < R; r++) w->m[r] = NEG, w->l[r] = 0.f;
    for (int64_t i = 0; i < D * R; i++) w->ot[i] = 0.f;
    const int64_t keys = pos0 + nq;  /* the last token sees keys [0, pos0 + nq) */
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i pos = _mm512_add_epi32(_mm512_set1_epi32((int)pos0), lane);  /* each lane's token position */
    const __m512 vscale = _mm512_set1_ps(scale);
    const __m512 lowest = _mm512_set1_ps(-87.f);  /* exp's fast path: below, libmvec calls scalar expf */
    for (int64_t t0 = 0; t0 < keys; t0 += KC) {
        const int64_t kc = keys - t0 < KC ? keys - t0 : KC;
        for (int64_t t = 0; t < kc; t++) {
            const int64_t at = t0 + t, slot = (int64_t)table[at / bs] * bs + at % bs;
            w->krows[t] = k_cache + slot * row;
            w->vrows[t] = v_cache + slot * row;
        }
        for (int64_t t = 0; t < kc; t += 8)
            for (int64_t v = 0; v < G; v += 3)
                qk((int)(kc - t < 8 ? kc - t : 8), (int)(G - v < 3 ? G - v : 3), w->krows + t, kvh * D,
                   w->qt + 16 * v, R, D, w->s + t * R + 16 * v);
        /* softmax down the columns: mask what a token may not see, new max, rescale, exp, sum */
        for (int64_t v = 0; v < G; v++) {
            __m512 mx = _mm512_loadu_ps(w->m + 16 * v);
            const __m512 old = mx;
            for (int64_t t = 0; t < kc; t++) {
                float *st = w->s + t * R + 16 * v;
                __m512 x = _mm512_loadu_ps(st);
                if (t0 + t > pos0) {  /* past the first token: the causal edge */
                    x = _mm512_mask_mov_ps(x, _mm512_cmpgt_epi32_mask(_mm512_set1_epi32((int)(t0 + t)), pos),
                                           _mm512_set1_ps(NEG));
                    _mm512_storeu_ps(st, x);
                }
                mx = _mm512_max_ps(mx, x);
            }
            const __m512 alpha = exp16(_mm512_max_ps(_mm512_mul_ps(vscale, _mm512_sub_ps(old, mx)), lowest));
            __m512 sum = _mm512_mul_ps(_mm512_loadu_ps(w->l + 16 * v), alpha);
            const __m512 shift = _mm512_mul_ps(vscale, mx);
            for (int64_t t = 0; t < kc; t++) {
                float *st = w->s + t * R + 16 * v;
                const __m512 x = _mm512_loadu_ps(st);  /* masked keys: exactly 0 */
                const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(NEG), _CMP_GT_OQ),
                                                     exp16(_mm512_max_ps(_mm512_fmsub_ps(vscale, x, shift), lowest)));
                _mm512_storeu_ps(st, p);
                sum = _mm512_add_ps(sum, p);
            }
            _mm512_storeu_ps(w->l + 16 * v, sum);
            _mm512_storeu_ps(w->m + 16 * v, mx);
            for (int64_t d = 0; d < D; d++) {
                float *o = w->ot + d * R + 16 * v;
                _mm512_storeu_ps(o, _mm512_mul_ps(_mm512_loadu_ps(o), alpha));
            }
        }
        for (int64_t d = 0; d < D; d += 8)
            for (int64_t v = 0; v < G; v += 3)
                pv((int)(G - v < 3 ? G - v : 3), w->vrows, kvh * D + d, kc, w->s + 16 * v, R, w->ot + d * R + 16 * v);
    }
    for (int64_t j = 0; j < nq; j++)
        for (int64_t g = 0; g < G; g++) {
            const int64_t r = g * BQ + j;
            const float inv = 1.f / w->l[r];
            float *o = out + j * out_stride + (kvh * G + g) * D;
            for (int64_t d = 0; d < D; d++) o[d] = w->ot[d * R + r] * inv;
        }
}
#endif

/* Attention for sequences [first_seq, num_seqs): sequence i's query tokens are rows
 * [query_start[i], query_start[i + 1]) of q (row stride q_stride, heads packed) and sit at the
 * end of its seq_lens[i] tokens of context (block table row i). Their own K/V rows (k, v: row
 * strides k_stride, v_stride, kv heads packed) are first written to their cache slots
 * (slot_mapping, indexed by token like q); the rest of the context is in the cache already.
 * Writes out (row stride out_stride). Returns 0; -1 where this build cannot (no AVX-512,
 * head_dim not a multiple of 16, query heads not a multiple of kv heads), having written
 * nothing; -2 when scratch memory runs out. */
int paged_prefill_attention_f32(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                                int64_t v_stride, const int64_t *slot_mapping, float *k_cache, float *v_cache,
                                const int32_t *block_tables, int64_t max_blocks, const int32_t *query_start,
                                const int32_t *seq_lens, int64_t first_seq, int64_t num_seqs, float *out,
                                int64_t out_stride, int64_t H, int64_t KVH, int64_t D, int64_t bs, float scale) {
#if defined(__AVX512F__)
    if (D % 16 || H % KVH) return -1;
    const int64_t G = H / KVH, R = G * BQ;
    int64_t items = 0;
    for (int64_t i = first_seq; i < num_seqs; i++) items += (query_start[i + 1] - query_start[i] + BQ - 1) / BQ;
    items *= KVH;
    const int64_t first_token = query_start[first_seq], tokens = query_start[num_seqs] - first_token;
    int failed = 0;
#pragma omp parallel
    {
        FLUSH_DENORMALS_BEGIN
#pragma omp for schedule(static)  /* then a barrier: every row is in place before any is read */
        for (int64_t i = first_token; i < first_token + tokens; i++)
            for (int64_t c = 0; c < KVH * D; c++) {
                k_cache[slot_mapping[i] * KVH * D + c] = k[i * k_stride + c];
                v_cache[slot_mapping[i] * KVH * D + c] = v[i * v_stride + c];
            }
        Scratch w = {0};
        float *mem = malloc(sizeof(float) * (2 * D * R + KC * R + 2 * R) + 2 * sizeof(float *) * KC);
        if (!mem) {
#pragma omp atomic write
            failed = 1;
        } else {
            w.qt = mem, w.ot = w.qt + D * R, w.s = w.ot + D * R, w.m = w.s + KC * R, w.l = w.m + R;
            w.krows = (const float **)(w.l + R), w.vrows = w.krows + KC;
        }
        /* items numbered from the last sequence's last block down: the longest first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!mem) continue;
            int64_t left = it / KVH, kvh = it % KVH, i = num_seqs - 1, nb = 0;
            for (;; i--) {  /* find the sequence and block this item is */
                nb = (query_start[i + 1] - query_start[i] + BQ - 1) / BQ;
                if (left < nb) break;
                left -= nb;
            }
            const int64_t b = nb - 1 - left, n = query_start[i + 1] - query_start[i];
            const int64_t j0 = b * BQ, nq = n - j0 < BQ ? n - j0 : BQ;
            const int64_t tok = query_start[i] + j0;
            attend_block(&w, q + tok * q_stride, q_stride, k_cache, v_cache, block_tables + i * max_blocks, kvh, G,
                         KVH, D, bs, seq_lens[i] - n + j0, nq, scale, out + tok * out_stride, out_stride);
        }
        free(mem);
        FLUSH_DENORMALS_END
    }
    return failed ? -2 : 0;
#else
    (void)q; (void)q_stride; (void)k; (void)k_stride; (void)v; (void)v_stride; (void)slot_mapping; (void)k_cache; (void)v_cache; (void)block_tables; (void)max_blocks; (void)query_start;
    (void)seq_lens; (void)first_seq; (void)num_seqs; (void)out; (void)out_stride; (void)H; (void)KVH; (void)D;
    (void)bs; (void)scale;
    return -1;
#endif
}

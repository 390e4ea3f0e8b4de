/* Decode attention straight over the paged KV cache, for CPUs: one query token per
 * sequence, keys and values read in place through the block table (no gather copy).
 * The step's new K/V rows are written into their cache slots here too, so a decode-only
 * step costs one call per layer. Work is split over (sequence, kv head) pairs with OpenMP;
 * loaded after torch, this shares torch's libgomp. Per pair, two passes over the context:
 * scores -> softmax -> weighted sum of V; the query heads that share the kv head (the GQA
 * group) are served by the same pass, so each K/V row is read from memory once. */
#include <float.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include "denormals.h"
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define TOKENS 16 /* keys scored together: one vector of scores */

static inline float dot(const float *a, const float *b, int64_t n) {
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

#if defined(__AVX512F__)
/* The 16 lane sums of v[0..15], in order, as one vector: a transpose-and-add tree
 * (15 shuffles + 15 adds for 16 sums) instead of 16 horizontal reductions. */
static inline __m512 sum16(__m512 v[16]) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)  /* per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3] */
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per 128-bit lane: the lane's sum of 4 vectors */
        __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++)  /* lanes 0+1 and 2+3 of two such vectors */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* scores[t] = q . k[t] for 16 keys at rows[t] + off; head_dim a multiple of 16 */
static inline void score16(const float *q, const float *const rows[TOKENS], int64_t off, int64_t head_dim,
                           float *scores) {
    __m512 acc[TOKENS];
#pragma GCC unroll 16
    for (int t = 0; t < TOKENS; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 16) {
        const __m512 qv = _mm512_loadu_ps(q + d);
#pragma GCC unroll 16
        for (int t = 0; t < TOKENS; t++) acc[t] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(rows[t] + off + d), acc[t]);
    }
    _mm512_storeu_ps(scores, sum16(acc));
}

/* Prefetches spread over a loop of 16 tokens: at token t, lines [t * per, (t + 1) * per) of the
 * `lines` lines at pf (per = lines / 16 rounded up). A burst of ~200 prefetches ahead of the work
 * (as prefetch_rows issues them) fills the core's fill buffers and then its load queue, and the
 * work waits behind it; one row's worth per token keeps the misses in flight under the FMAs
 * (cold, the whole decode attention 10-15% faster). */
static inline __attribute__((always_inline)) void prefetch_share(const char *pf, int lines, int t) {
    const int per = (lines + TOKENS - 1) / TOKENS;
    for (int l = t * per; l < (t + 1) * per && l < lines; l++) _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
}

/* scores[g][t] = scale * q_g . k[t] for the G <= 4 query heads of one kv head (q rows q_stride
 * apart) and 16 keys at rows[t] + off, head_dim = 16 * NC (NC <= 4), into out rows out_stride
 * apart: each key's vectors are loaded once for all G heads (score16 loads them once a head);
 * the same products and sums as score16, so the same scores. Carries prefetch_share(pf, lines). */
static inline __attribute__((always_inline)) void score_group_fixed(
        const float *q, int64_t q_stride, const int G, const int NC, const float *const rows[TOKENS], int64_t off,
        float *out, int64_t out_stride, float scale, const char *pf, int lines) {
    __m512 qv[4][4], part[4][TOKENS];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < NC; c++) qv[g][c] = _mm512_loadu_ps(q + g * q_stride + 16 * c);
    for (int t = 0; t < TOKENS; t++) {
        __m512 k[4];
        prefetch_share(pf, lines, t);
        for (int c = 0; c < NC; c++) k[c] = _mm512_loadu_ps(rows[t] + off + 16 * c);
        for (int g = 0; g < G; g++) {
            __m512 a = _mm512_mul_ps(qv[g][0], k[0]);
            for (int c = 1; c < NC; c++) a = _mm512_fmadd_ps(qv[g][c], k[c], a);
            part[g][t] = a;
        }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    for (int g = 0; g < G; g++) _mm512_storeu_ps(out + g * out_stride, _mm512_mul_ps(sum16(part[g]), sc));
}

/* score_group_fixed for a group of g <= 4 heads and head_dim = 16 * nc <= 64. */
static void score_group(const float *q, int64_t q_stride, int g, int nc, const float *const rows[TOKENS],
                        int64_t off, float *out, int64_t out_stride, float scale, const char *pf, int lines) {
#define CASE(G, C) \
    case 4 * (G - 1) + C - 1: \
        score_group_fixed(q, q_stride, G, C, rows, off, out, out_stride, scale, pf, lines); break;
    switch (4 * (g - 1) + nc - 1) {
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
    }
#undef CASE
}

/* out[g] += sum_t p[g][t] * v[t] for n <= 16 tokens at rows[t] + off, num_g <= 4 heads (p rows
 * p_stride apart, out rows out_stride apart) and nc <= 4 vectors of dims; always inlined with
 * constant num_g and nc (see weighted_sum) so the sums stay in registers. Carries
 * prefetch_share(pf, lines). */
static inline __attribute__((always_inline)) void weighted_sum_fixed(
        const float *p, int64_t p_stride, int64_t n, const int num_g, const int nc, const float *const rows[TOKENS],
        int64_t off, float *out, int64_t out_stride, const char *pf, int lines) {
    __m512 acc[4][4];
    for (int g = 0; g < num_g; g++)
        for (int c = 0; c < nc; c++) acc[g][c] = _mm512_loadu_ps(out + g * out_stride + 16 * c);
    for (int64_t t = 0; t < n; t++) {
        __m512 vv[4];
        prefetch_share(pf, lines, (int)t);
        for (int c = 0; c < nc; c++) vv[c] = _mm512_loadu_ps(rows[t] + off + 16 * c);
        for (int g = 0; g < num_g; g++) {
            const __m512 pg = _mm512_set1_ps(p[g * p_stride + t]);
            for (int c = 0; c < nc; c++) acc[g][c] = _mm512_fmadd_ps(pg, vv[c], acc[g][c]);
        }
    }
    for (int g = 0; g < num_g; g++)
        for (int c = 0; c < nc; c++) _mm512_storeu_ps(out + g * out_stride + 16 * c, acc[g][c]);
}

static void weighted_sum(const float *p, int64_t p_stride, int64_t n, int num_g, int nc,
                         const float *const rows[TOKENS], int64_t off, float *out, int64_t out_stride, const char *pf,
                         int lines) {
#define CASE(G, C) \
    case 4 * (G - 1) + C - 1: \
        weighted_sum_fixed(p, p_stride, n, G, C, rows, off, out, out_stride, pf, lines); break;
    switch (4 * (num_g - 1) + nc - 1) {
        CASE(1, 1) CASE(1, 2) CASE(1, 3) CASE(1, 4) CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4) CASE(4, 1) CASE(4, 2) CASE(4, 3) CASE(4, 4)
    }
#undef CASE
}
#endif

/* rows[t] = the cache row of token t0 + t for t < n; past n, the last one repeated */
static inline void token_rows(const float *cache, const int32_t *table, int64_t t0, int64_t n, int64_t block_size,
                              int64_t token_stride, const float *rows[TOKENS]) {
    int64_t b = t0 / block_size, o = t0 % block_size;
    for (int t = 0; t < TOKENS; t++) {
        rows[t] = t < n ? cache + ((int64_t)table[b] * block_size + o) * token_stride : rows[t - 1];
        if (++o == block_size) o = 0, b++;
    }
}

/* Asks for the rows of tokens [t0, t0 + 16) (those below len), bytes [from, from + bytes) of each,
 * ahead of their use: the walk through the blocks is too irregular for the hardware prefetcher. */
static inline void prefetch_rows(const float *cache, const int32_t *table, int64_t t0, int64_t len,
                                 int64_t block_size, int64_t token_stride, int64_t from, int64_t bytes) {
    for (int64_t t = t0; t < t0 + TOKENS && t < len; t++) {
        const char *r = (const char *)(cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride
                                       + from);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(r + b, 0, 3);
    }
}

/* Where tokens [t0, t0 + 16) start in the cache when a block holds whole 16-token chunks (t0 a
 * multiple of 16): their rows then follow one another in one block. */
static inline const char *chunk_start(const float *cache, const int32_t *table, int64_t t0, int64_t block_size,
                                      int64_t token_stride) {
    return (const char *)(cache + ((int64_t)table[t0 / block_size] * block_size + t0 % block_size) * token_stride);
}

/* Kv head j's part (of nkv equal parts) of the `lines` lines at pf: where it starts, and its
 * line count in *count (0 when pf is NULL). */
static inline const char *head_share(const char *pf, int lines, int64_t nkv, int64_t j, int *count) {
    const int share = (int)((lines + nkv - 1) / nkv), lo = (int)j * share < lines ? (int)j * share : lines;
    *count = pf ? (lines - lo < share ? lines - lo : share) : 0;
    return pf ? pf + 64 * lo : 0;
}

/* One work item: kv heads [kh0, kh1) of one sequence, each with its `group` query heads (at q
 * and out, head_dim apart, starting at kv head kh0's first query head). The context is walked
 * 16 tokens at a time across all the item's kv heads, so a block's rows are read together.
 * Where the item takes whole token rows and a block holds whole chunks (the usual case: one
 * item a sequence, block size 16), the next chunk is one run of memory, and its prefetches are
 * spread over the current chunk's work (prefetch_share), a third of it per kv head for three. */
static void attend(const float *q, const float *k_cache, const float *v_cache, const int32_t *table, int64_t len,
                   int64_t kh0, int64_t kh1, int64_t group, int64_t head_dim, int64_t block_size,
                   int64_t token_stride, float scale, float *scores, float *out) {
    const int64_t nkv = kh1 - kh0, heads = nkv * group;
    const float *rows[TOKENS];
    float s[TOKENS];
#if defined(__AVX512F__)
    const int vec = head_dim % 16 == 0;
#else
    const int vec = 0;
#endif
    const int spread = vec && block_size % TOKENS == 0 && nkv * head_dim == token_stride;
    const int64_t row_lines = token_stride * 4 / 64;
    for (int64_t t0 = 0; t0 < len; t0 += TOKENS) {
        const int64_t n = len - t0 < TOKENS ? len - t0 : TOKENS;
        token_rows(k_cache, table, t0, n, block_size, token_stride, rows);
        /* the next keys; at the last, the first values */
        const float *next = t0 + TOKENS < len ? k_cache : v_cache;
        const int64_t nt0 = t0 + TOKENS < len ? t0 + TOKENS : 0, nn = len - nt0 < TOKENS ? len - nt0 : TOKENS;
#if defined(__AVX512F__)
        if (spread && n == TOKENS && group <= 4 && head_dim <= 64) {
            const char *pf = chunk_start(next, table, nt0, block_size, token_stride);
            for (int64_t j = 0; j < nkv; j++) {
                int count;
                const char *part = head_share(pf, (int)(nn * row_lines), nkv, j, &count);
                score_group(q + j * group * head_dim, head_dim, (int)group, (int)(head_dim / 16), rows,
                            (kh0 + j) * head_dim, scores + j * group * len + t0, len, scale, part, count);
            }
            continue;
        }
#endif
        prefetch_rows(next, table, nt0, len, block_size, token_stride, kh0 * head_dim, nkv * head_dim * 4);
        for (int64_t kvh = kh0; kvh < kh1; kvh++)
            for (int64_t g = 0; g < group; g++) {
                const int64_t h = (kvh - kh0) * group + g;
#if defined(__AVX512F__)
                if (vec) score16(q + h * head_dim, rows, kvh * head_dim, head_dim, s);
#endif
                if (!vec)
                    for (int64_t t = 0; t < n; t++) s[t] = dot(q + h * head_dim, rows[t] + kvh * head_dim, head_dim);
                for (int64_t t = 0; t < n; t++) scores[h * len + t0 + t] = s[t] * scale;
            }
    }
    for (int64_t h = 0; h < heads; h++) {
        float *sc = scores + h * len, m = -FLT_MAX, sum = 0.f;  /* finite: built with -ffast-math */
        for (int64_t t = 0; t < len; t++) m = sc[t] > m ? sc[t] : m;
        for (int64_t t = 0; t < len; t++) sum += (sc[t] = expf(sc[t] - m));
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < len; t++) sc[t] *= inv;
    }
    memset(out, 0, sizeof(float) * heads * head_dim);
    for (int64_t t0 = 0; t0 < len; t0 += TOKENS) {
        const int64_t n = len - t0 < TOKENS ? len - t0 : TOKENS, nt0 = t0 + TOKENS;
        token_rows(v_cache, table, t0, n, block_size, token_stride, rows);
        const char *pf = spread && nt0 < len ? chunk_start(v_cache, table, nt0, block_size, token_stride) : 0;
        const int lines = pf ? (int)((len - nt0 < TOKENS ? len - nt0 : TOKENS) * row_lines) : 0;
        if (!spread)
            prefetch_rows(v_cache, table, nt0, len, block_size, token_stride, kh0 * head_dim, nkv * head_dim * 4);
        for (int64_t kvh = kh0; kvh < kh1; kvh++) {
            const int64_t h0 = (kvh - kh0) * group;
            int klines;
            const char *kpf = head_share(pf, lines, nkv, kvh - kh0, &klines);
#if defined(__AVX512F__)
            if (vec) {
                for (int64_t g0 = 0; g0 < group; g0 += 4)
                    for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
                        const int first = g0 == 0 && d0 == 0;  /* carries the kv head's share of the prefetches */
                        weighted_sum(scores + (h0 + g0) * len + t0, len, n, group - g0 < 4 ? (int)(group - g0) : 4,
                                     head_dim - d0 < 64 ? (int)(head_dim - d0) / 16 : 4, rows, kvh * head_dim + d0,
                                     out + (h0 + g0) * head_dim + d0, head_dim, first ? kpf : 0, first ? klines : 0);
                    }
                continue;
            }
#endif
            for (int64_t t = 0; t < n; t++) {
                const float *v = rows[t] + kvh * head_dim;
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[(h0 + g) * len + t0 + t];
                    float *o = out + (h0 + g) * head_dim;
                    for (int64_t i = 0; i < head_dim; i++) o[i] += p * v[i];
                }
            }
        }
    }
}

/* q: [n, num_heads, head_dim] with rows q_stride apart; k_new, v_new: [n, num_kv_heads, head_dim]
 * with rows k_stride, v_stride apart, written to the cache at slots[i] first (skipped when k_new
 * is NULL); out: [n, num_heads, head_dim] contiguous; k_cache, v_cache: [num_blocks, block_size,
 * num_kv_heads, head_dim]; block_tables: [n, max_blocks]; seq_lens: [n]. Query head h reads kv
 * head h / (num_heads / num_kv_heads). Returns nonzero when a score buffer could not be allocated. */
int paged_decode_attention_f32(const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                               const float *v_new, int64_t v_stride, const int64_t *slots, float *k_cache,
                               float *v_cache, const int32_t *block_tables, int64_t max_blocks,
                               const int32_t *seq_lens, float *out, int64_t n, int64_t num_heads,
                               int64_t num_kv_heads, int64_t head_dim, int64_t block_size, float scale,
                               int64_t max_seq_len) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    /* a whole sequence per item when there are enough to share out; else one kv head each */
    const int64_t parts = n >= 2 * omp_get_max_threads() ? 1 : num_kv_heads;
    const int64_t part_heads = num_kv_heads / parts;
    int failed = 0;
#pragma omp parallel
    {
        FLUSH_DENORMALS_BEGIN
        float *scores = malloc(sizeof(float) * part_heads * group * (max_seq_len > 0 ? max_seq_len : 1));
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < n * parts; item++) {
            if (!scores) continue;
            const int64_t s = item / parts, kh0 = item % parts * part_heads, kh1 = kh0 + part_heads;
            if (k_new)  /* this item's own new rows; no other item reads them */
                for (int64_t kvh = kh0; kvh < kh1; kvh++) {
                    const int64_t dst = slots[s] * token_stride + kvh * head_dim;
                    memcpy(k_cache + dst, k_new + s * k_stride + kvh * head_dim, sizeof(float) * head_dim);
                    memcpy(v_cache + dst, v_new + s * v_stride + kvh * head_dim, sizeof(float) * head_dim);
                }
            attend(q + s * q_stride + kh0 * group * head_dim, k_cache, v_cache, block_tables + s * max_blocks,
                   seq_lens[s], kh0, kh1, group, head_dim, block_size, token_stride, scale, scores,
                   out + (s * num_heads + kh0 * group) * head_dim);
        }
        free(scores);
        FLUSH_DENORMALS_END
    }
    return failed;
}

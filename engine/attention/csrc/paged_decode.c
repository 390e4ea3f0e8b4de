/* Decode attention straight over the paged KV cache, for CPUs: one query token per
 * sequence, keys and values read in place through the block table (no gather copy).
 * Work is split over (sequence, kv head) pairs with OpenMP; loaded after torch, this
 * shares torch's libgomp. Two passes per pair: scores -> softmax -> weighted sum of V. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 16

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.f;
    for (int j = 0; j < LANES; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline void axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* q, out: [n, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
 * block_tables: [n, max_blocks]; seq_lens: [n]. Query head h reads kv head h / (num_heads / num_kv_heads). */
int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int32_t *block_tables, int64_t max_blocks, const int32_t *seq_lens,
                               float *out, int64_t n, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, float scale, int64_t max_seq_len) {
    const int64_t group = num_heads / num_kv_heads;
    const int64_t token_stride = num_kv_heads * head_dim;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * group * (max_seq_len > 0 ? max_seq_len : 1));
        if (!scores) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < n * num_kv_heads; item++) {
            if (!scores) continue;
            const int64_t s = item / num_kv_heads, kvh = item % num_kv_heads;
            const int64_t len = seq_lens[s];
            const int32_t *table = block_tables + s * max_blocks;
            const float *qs = q + (s * num_heads + kvh * group) * head_dim;
            for (int64_t t = 0; t < len; t++) {
                const float *k = k_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride
                                 + kvh * head_dim;
                for (int64_t g = 0; g < group; g++) scores[g * len + t] = dot(qs + g * head_dim, k, head_dim) * scale;
            }
            for (int64_t g = 0; g < group; g++) {
                float *sc = scores + g * len, m = -FLT_MAX, sum = 0.f;  /* finite: built with -ffast-math */
                for (int64_t t = 0; t < len; t++) m = sc[t] > m ? sc[t] : m;
                for (int64_t t = 0; t < len; t++) sum += (sc[t] = expf(sc[t] - m));
                for (int64_t t = 0; t < len; t++) sc[t] /= sum;
            }
            float *os = out + (s * num_heads + kvh * group) * head_dim;
            memset(os, 0, sizeof(float) * group * head_dim);
            for (int64_t t = 0; t < len; t++) {
                const float *v = v_cache + ((int64_t)table[t / block_size] * block_size + t % block_size) * token_stride
                                 + kvh * head_dim;
                for (int64_t g = 0; g < group; g++) axpy(os + g * head_dim, scores[g * len + t], v, head_dim);
            }
        }
        free(scores);
    }
    return failed;
}

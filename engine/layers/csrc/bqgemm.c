/* y = x W^T (+ bias) with AVX-512 FMAs for weights quantized in blocks of 32 along k (GGUF Q4_0,
 * Q4_1, Q5_0, Q5_1, Q8_0): every step on a CPU without the AMX tile unit, steps of a few rows beside
 * it (qgemm.c is the AMX one; bqgemm.py says which steps):
 * W[n][k] = d[n][b] * q[n][k] + m[n][b] with b = k / 32 and q a small integer (|q| <= 128).
 *
 * The integers are streamed as int8 (1 byte a weight, plus 4 bytes of fp16 scales per 32: 1.125 bytes
 * against fp32's 4), widened to fp32 (exact), and multiplied with fp32 FMAs:
 *     T[r][n] = sum over the block's k of q[n][k] x[r][k]
 *     y[r][n] = sum_b d[n][b] T_b[r][n] + m[n][b] S_b[r]      (S_b[r]: the block's sum of x[r])
 * which differs from an fp32 matmul over the dequantized weights only in the order of its
 * roundings (tests/engine/test_bqgemm.py holds it to a float64 reference).
 *
 * Layouts (made once at load, bqgemm.py):
 *   q8 [G][K][16] int8: column group g (16 output columns), for each k the group's 16 integers;
 *   dm [G][nb][2][16] fp16: d then m for the group's 16 columns in block b (qgemm.c's layout; fp16
 *   as GGUF stores them, so exact, and 1.125 bytes a weight in all), widened per block.
 *
 * Four paths by row count; up to PANEL_MIN - 1 rows each streams a column group's integers once per tile of
 * rows and scales per block as above:
 * - up to 8 rows (decode steps; the integers are read once a call, so a step costs their bytes):
 *   each thread takes a run of column groups, several at once where the rows are few (1-2 rows: 4
 *   groups), so enough independent chains of FMAs are in flight to hide each FMA's latency; the
 *   integers are widened in registers as they stream, x read where it lies.
 * - 9 to 47 rows (a batch of decodes): x packed per tile of up to 24 rows as [K][rt] (and its block
 *   sums as [nb][rt]), so a tile's broadcasts come off one pointer; one widening of 16 integers
 *   feeds 24 FMAs, whose partial sums take 24 registers, so the running sums live in y.
 * - 48 rows and more (prefill chunks): re-widening for every tile would spend one vector op in ten
 *   on conversions, so each thread widens a pair of column groups over all of K to fp32 once per
 *   chunk of 96 rows (K x 32 floats of its own scratch, in L2) and walks the rows in tiles of 6 over
 *   it: per k two loads of weights and six broadcasts of x feed twelve FMAs (12 partial + 12 running
 *   sums + 2 weights: 26 registers), x packed per tile of 6 rows.
 * One tile function serves the first and third (tile: every sum in registers), stream_tile the second.
 * These three compute each output with the same FMAs in the same order (the partial sum of a block
 * from zero over its 32 k, then acc = T d + acc, then acc = m S + acc, the bias added last), so a
 * row's result does not depend on the other rows or on which of them its step took.
 * - PANEL_MIN rows and more (prefill chunks, past any decode step): the two sums a block takes there
 *   would cost a tile half its registers, so each work item (64 columns x 240 rows) dequantizes its
 *   columns to fp32 once (d q, then + m, rounded as a dequantized checkpoint is: W exactly) into a
 *   K x 64 panel in L2, and runs a plain fp32 matmul over it in 6 x 64 register tiles: per k four
 *   loads of weights and six broadcasts of x (read where it lies) feed 24 FMAs, a sum per output over
 *   128 k at a time (29 registers), the chunks' sums added in y. On a 2-core Zen 4 that reaches
 *   0.94-0.96 of its FMA peak at 2048 rows (MKL's sgemm on the fp32 weights 0.85-0.88). */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLK 32   /* k per quant block */
#define G 16     /* output columns per group: one zmm of fp32 */
#define ST 24    /* rows per streaming tile */
#define WIDE_MIN 48 /* rows from which the wide path takes over */
#define WG 2     /* column groups per wide tile */
#define WR 6     /* rows per wide tile */
#define CHUNK 96 /* rows per chunk on the wide path */
#define PANEL_MIN 129 /* rows from which the panel path takes over: past every decode step (bqgemm.py PANEL_MIN) */
#define PG 4     /* column groups per dequantized panel: 64 columns */
#define PR 6     /* rows per panel tile */
#define PROWS 240 /* rows per panel work item */
#define PK 128   /* k per partial sum there: y = sum over chunks of (sum over the chunk's k), as a blocked
                    sgemm sums, so its rounding error grows with PK + K / PK rather than K */

int bqgemm_supported(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
static inline __m512 widen(const int8_t *q) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
}

static inline __m512 scales(const uint16_t *p) {  /* 16 fp16 scales, widened (exact) */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline float block_sum(const float *x) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)));
}

/* rt rows (<= ST; a constant where it is inlined, so the loops unroll) of one column group, the
 * integers widened in registers as they stream; x packed as xp [K][rt], its block sums as xsp
 * [nb][rt]; y and bias (or 0) at the group's first column. Up to 8 rows the running sums stay in
 * registers; more rows take the registers for their partial sums, and the running sums live in y. */
static inline __attribute__((always_inline)) void stream_tile(const int rt, const float *xp, const float *xsp,
                                                              int64_t nb, const int8_t *qg, const uint16_t *dmg,
                                                              int has_m, float *y, int64_t ldy, __mmask16 mask,
                                                              const float *bias) {
    __m512 acc[8], t[ST];
#pragma GCC unroll 8
    for (int i = 0; i < (rt < 8 ? rt : 8); i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 32
        for (int i = 0; i < rt; i++) t[i] = _mm512_setzero_ps();
        const int8_t *qb = qg + b * BLK * G;
        const float *xb = xp + b * BLK * rt;
        for (int k = 0; k < BLK; k++) {
            const __m512 w = widen(qb + k * G);
#pragma GCC unroll 32
            for (int i = 0; i < rt; i++) t[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(xb[k * rt + i]), t[i]);
        }
        const __m512 d = scales(dmg + b * 2 * G), m = scales(dmg + (b * 2 + 1) * G);
#pragma GCC unroll 32
        for (int i = 0; i < rt; i++) {
            __m512 a = rt <= 8 ? acc[i] : b ? _mm512_maskz_loadu_ps(mask, y + i * ldy) : _mm512_setzero_ps();
            a = _mm512_fmadd_ps(t[i], d, a);
            if (has_m) a = _mm512_fmadd_ps(m, _mm512_set1_ps(xsp[b * rt + i]), a);
            if (rt <= 8) acc[i] = a;
            else _mm512_mask_storeu_ps(y + i * ldy, mask, a);
        }
    }
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
#pragma GCC unroll 32
    for (int i = 0; i < rt; i++)
        _mm512_mask_storeu_ps(y + i * ldy, mask,
                              _mm512_add_ps(rt <= 8 ? acc[i] : _mm512_maskz_loadu_ps(mask, y + i * ldy), bv));
}

/* A tile of rt rows by cg column groups with every sum in registers (rt and cg constants where it is
 * inlined, so the loops unroll): group j's weights at k from its int8 integers, q + j K G, widened as
 * they stream, or (widened) from the copy w [K][WG][G] the wide path made; x's element (i, k) at
 * x[i xi + k xk], the block sums S_b[i] at xs[i si + b sb]; group j's scales at dm + j nb 2 G; y and
 * bias (or 0) at the tile's first column. The same FMAs per output as stream_tile. */
static inline __attribute__((always_inline)) void tile(const int rt, const int cg, const int widened,
                                                       const int8_t *q, int64_t K, const float *w, const float *x,
                                                       int64_t xi, int64_t xk, const float *xs, int64_t si,
                                                       int64_t sb, int64_t nb, const uint16_t *dm, int has_m,
                                                       float *y, int64_t ldy, const __mmask16 *mask,
                                                       const float *bias) {
    __m512 acc[8][4], t[8][4];
#pragma GCC unroll 8
    for (int i = 0; i < rt; i++)
#pragma GCC unroll 4
        for (int j = 0; j < cg; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 8
        for (int i = 0; i < rt; i++)
#pragma GCC unroll 4
            for (int j = 0; j < cg; j++) t[i][j] = _mm512_setzero_ps();
        for (int k = b * BLK; k < (b + 1) * BLK; k++) {
            __m512 wk[4];
#pragma GCC unroll 4
            for (int j = 0; j < cg; j++)
                wk[j] = widened ? _mm512_load_ps(w + (k * WG + j) * G) : widen(q + (j * K + k) * G);
#pragma GCC unroll 8
            for (int i = 0; i < rt; i++) {
                const __m512 xv = _mm512_set1_ps(x[i * xi + k * xk]);
#pragma GCC unroll 4
                for (int j = 0; j < cg; j++) t[i][j] = _mm512_fmadd_ps(wk[j], xv, t[i][j]);
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < cg; j++) {
            const uint16_t *dmb = dm + (j * nb + b) * 2 * G;
            const __m512 d = scales(dmb);
#pragma GCC unroll 8
            for (int i = 0; i < rt; i++) acc[i][j] = _mm512_fmadd_ps(t[i][j], d, acc[i][j]);
            if (has_m) {
                const __m512 m = scales(dmb + G);
#pragma GCC unroll 8
                for (int i = 0; i < rt; i++)
                    acc[i][j] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[i * si + b * sb]), acc[i][j]);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < cg; j++) {
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask[j], bias + j * G) : _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int i = 0; i < rt; i++) _mm512_mask_storeu_ps(y + i * ldy + j * G, mask[j], _mm512_add_ps(acc[i][j], bv));
    }
}

static inline __mmask16 group_mask(int64_t N, int64_t g) {  /* the columns of group g that exist (none past N) */
    const int64_t nn = N - g * G < G ? N - g * G : G;
    return nn > 0 ? (__mmask16)((1u << nn) - 1) : 0;
}

/* Up to 8 rows: the block sums, then each thread a contiguous run of column groups, cg at a time. */
#define FEW_ROWS(rt, cg)                                                                                   \
    case rt:                                                                                               \
        for (; g < g1; g += step) {                                                                        \
            step = g + cg <= g1 ? cg : 1;                                                                  \
            const __mmask16 masks[4] = {group_mask(N, g), group_mask(N, g + 1), group_mask(N, g + 2),      \
                                        group_mask(N, g + 3)};                                             \
            const float *bg = bias ? bias + g * G : 0;                                                     \
            if (step == cg)                                                                                \
                tile(rt, cg, 0, q8 + g * K * G, K, 0, x, ldx, 1, xs, nb, 1, nb, dm + g * nb * 2 * G, has_m,   \
                     y + g * G, ldy, masks, bg);                                                           \
            else                                                                                           \
                tile(rt, 1, 0, q8 + g * K * G, K, 0, x, ldx, 1, xs, nb, 1, nb, dm + g * nb * 2 * G, has_m,    \
                     y + g * G, ldy, masks, bg);                                                           \
        }                                                                                                  \
        break

static void decode_rows(const float *x, int64_t ldx, int64_t rows, int64_t K, const int8_t *q8, const uint16_t *dm,
                        int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t N, float *xs) {
    const int64_t nb = K / BLK;
    if (has_m)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < nb; b++) xs[r * nb + b] = block_sum(x + r * ldx + b * BLK);
    const int64_t cg = rows <= 2 ? 4 : rows == 3 ? 3 : rows <= 6 ? 2 : 1, blocks = (groups + cg - 1) / cg;
#pragma omp parallel
    {
        const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
        int64_t g = blocks * tid / nth * cg, g1 = blocks * (tid + 1) / nth * cg, step;
        if (g1 > groups) g1 = groups;
        switch (rows) {
            FEW_ROWS(8, 1); FEW_ROWS(7, 1); FEW_ROWS(6, 2); FEW_ROWS(5, 2);
            FEW_ROWS(4, 2); FEW_ROWS(3, 3); FEW_ROWS(2, 4); default: FEW_ROWS(1, 4);
        }
    }
}

#define STREAM_CASE(n) \
    case n: stream_tile(n, xt, xst, nb, qg, dmg, has_m, yt, ldy, mask, bg); break

/* Inside a parallel region: x packed per tile of up to tr rows (the last one shorter) as [K][rt] at xp + r0 K,
 * its block sums as [nb][rt] at xs + r0 nb, a block of 32 k of a tile at a time (so no two threads write
 * one cache line), so a tile's broadcasts come off one pointer. */
static void pack_rows(const float *x, int64_t ldx, int64_t rows, int64_t K, int64_t tr, int has_m, float *xp,
                      float *xs) {
    const int64_t nb = K / BLK, items = (rows + tr - 1) / tr * nb;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < items; it++) {
        const int64_t r0 = it / nb * tr, b = it % nb, rt = rows - r0 < tr ? rows - r0 : tr;
        float *dst = xp + r0 * K + b * BLK * rt, *sums = xs + r0 * nb + b * rt;
        for (int64_t i = 0; i < rt; i++) {
            const float *xr = x + (r0 + i) * ldx + b * BLK;
            for (int k = 0; k < BLK; k++) dst[k * rt + i] = xr[k];
            sums[i] = has_m ? block_sum(xr) : 0.0f;
        }
    }
}

/* 9 to WIDE_MIN - 1 rows: x and its block sums packed per tile of up to ST rows as [K][rt] and [nb][rt]
 * (a block of 32 k of a tile at a time, so no two threads write one cache line), then OpenMP over
 * column groups, each walking the tiles. */
static void streaming(const float *x, int64_t ldx, int64_t rows, int64_t K, const int8_t *q8, const uint16_t *dm,
                      int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t N, float *xs,
                      float *xp) {
    const int64_t nb = K / BLK;
#pragma omp parallel
    {
        pack_rows(x, ldx, rows, K, ST, has_m, xp, xs);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            const int8_t *qg = q8 + g * K * G;
            const uint16_t *dmg = dm + g * nb * 2 * G;
            const float *bg = bias ? bias + g * G : 0;
            const __mmask16 mask = group_mask(N, g);
            float *yt = y + g * G;
            for (int64_t r0 = 0; r0 < rows; r0 += ST, yt += ST * ldy) {
                const int64_t rt = rows - r0 < ST ? rows - r0 : ST;
                const float *xt = xp + r0 * K, *xst = xs + r0 * nb;
                switch (rt) {
                    STREAM_CASE(24); STREAM_CASE(23); STREAM_CASE(22); STREAM_CASE(21); STREAM_CASE(20);
                    STREAM_CASE(19); STREAM_CASE(18); STREAM_CASE(17); STREAM_CASE(16); STREAM_CASE(15);
                    STREAM_CASE(14); STREAM_CASE(13); STREAM_CASE(12); STREAM_CASE(11); STREAM_CASE(10);
                    STREAM_CASE(9); STREAM_CASE(8); STREAM_CASE(7); STREAM_CASE(6); STREAM_CASE(5);
                    STREAM_CASE(4); STREAM_CASE(3); STREAM_CASE(2); default: STREAM_CASE(1);
                }
            }
        }
    }
}

/* This thread's scratch for widened weights, grown to the largest asked for and kept. */
static float *thread_scratch(int64_t floats) {
    static __thread float *buf;
    static __thread int64_t cap;
    if (floats > cap) {
        free(buf);
        cap = 0;
        if (posix_memalign((void **)&buf, 64, (size_t)floats * sizeof(float))) return buf = 0;
        cap = floats;
    }
    return buf;
}

#define WIDE_TILE(rt)                                                                              \
    do {                                                                                           \
        if (cg == 2) tile(rt, 2, 1, 0, K, w, xt, 1, rt, xst, 1, rt, nb, dmg, has_m, yr, ldy, mask, bg); \
        else tile(rt, 1, 1, 0, K, w, xt, 1, rt, xst, 1, rt, nb, dmg, has_m, yr, ldy, mask, bg);          \
    } while (0)

/* rows > RT: see the header. Returns 0, or -2 where a thread could not allocate its scratch. */
static int wide(const float *x, int64_t ldx, int64_t rows, int64_t K, const int8_t *q8, const uint16_t *dm,
                int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t N, float *xsp,
                float *xp) {
    const int64_t nb = K / BLK, pairs = (groups + WG - 1) / WG;
    int failed = 0;
#pragma omp parallel
    {
        pack_rows(x, ldx, rows, K, WR, has_m, xp, xsp);
        float *w = thread_scratch(K * WG * G);
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed)
            for (int64_t c0 = 0; c0 < rows; c0 += CHUNK) {
                const int64_t c1 = rows - c0 < CHUNK ? rows : c0 + CHUNK;
#pragma omp for schedule(static) nowait
                for (int64_t p = 0; p < pairs; p++) {
                    const int64_t g0 = p * WG, cg = groups - g0 < WG ? groups - g0 : WG;
                    for (int64_t k = 0; k < K; k++)
                        for (int j = 0; j < WG; j++)
                            _mm512_store_ps(w + (k * WG + j) * G,
                                            j < cg ? widen(q8 + ((g0 + j) * K + k) * G) : _mm512_setzero_ps());
                    const uint16_t *dmg = dm + g0 * nb * 2 * G;
                    const float *bg = bias ? bias + g0 * G : 0;
                    __mmask16 mask[WG];
                    for (int j = 0; j < WG; j++) mask[j] = j < cg ? group_mask(N, g0 + j) : 0;
                    for (int64_t r0 = c0; r0 < c1; r0 += WR) {
                        const int64_t rt = c1 - r0 < WR ? c1 - r0 : WR;
                        const float *xt = xp + r0 * K, *xst = xsp + r0 * nb;  /* r0: a multiple of WR */
                        float *yr = y + r0 * ldy + g0 * G;
                        switch (rt) {
                            case 6: WIDE_TILE(6); break;
                            case 5: WIDE_TILE(5); break;
                            case 4: WIDE_TILE(4); break;
                            case 3: WIDE_TILE(3); break;
                            case 2: WIDE_TILE(2); break;
                            default: WIDE_TILE(1); break;
                        }
                    }
                }
            }
    }
    return failed ? -2 : 0;
}

/* A tile of rt rows (a constant where it is inlined) by the PG column groups of a dequantized panel w
 * [K][PG][G]: per k, PG loads of weights and rt broadcasts of x (read in place: rt streams along its rows,
 * which the prefetchers follow; packing them cost ~5% at 576 inputs) feed PG rt FMAs into a sum per
 * output over PK k at a time (24 sums + 4 weights + a broadcast: 29 registers), each added into y. */
static inline __attribute__((always_inline)) void panel_tile(const int rt, const float *w, const float *x, int64_t ldx,
                                                             int64_t K, float *y, int64_t ldy, const __mmask16 *mask,
                                                             const float *bias) {
    for (int64_t k0 = 0; k0 < K; k0 += PK) {
        const int64_t k1 = K - k0 < PK ? K : k0 + PK;
        __m512 acc[PR][PG];
#pragma GCC unroll 6
        for (int i = 0; i < rt; i++)
#pragma GCC unroll 4
            for (int j = 0; j < PG; j++) acc[i][j] = _mm512_setzero_ps();
        for (int64_t k = k0; k < k1; k++) {
            __m512 wk[PG];
#pragma GCC unroll 4
            for (int j = 0; j < PG; j++) wk[j] = _mm512_load_ps(w + (k * PG + j) * G);
#pragma GCC unroll 6
            for (int i = 0; i < rt; i++) {
                const __m512 xv = _mm512_set1_ps(x[i * ldx + k]);
#pragma GCC unroll 4
                for (int j = 0; j < PG; j++) acc[i][j] = _mm512_fmadd_ps(wk[j], xv, acc[i][j]);
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < PG; j++) {
            const __m512 bv = bias && k1 == K ? _mm512_maskz_loadu_ps(mask[j], bias + j * G) : _mm512_setzero_ps();
#pragma GCC unroll 6
            for (int i = 0; i < rt; i++) {
                float *yo = y + i * ldy + j * G;
                const __m512 sum = k0 ? _mm512_add_ps(_mm512_maskz_loadu_ps(mask[j], yo), acc[i][j]) : acc[i][j];
                _mm512_mask_storeu_ps(yo, mask[j], _mm512_add_ps(sum, bv));
            }
        }
    }
}

/* Column groups g0 .. g0 + PG - 1 dequantized to fp32 as w [K][PG][G] (zero past the last group): d q, then
 * + m, each rounded to fp32 (the explicit roundings keep the compiler from fusing them), as a dequantized
 * checkpoint holds them. */
#define RNE (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static void dequantize_panel(const int8_t *q8, const uint16_t *dm, int64_t K, int64_t groups, int64_t g0, int has_m,
                             float *w) {
    const int64_t nb = K / BLK;
    for (int j = 0; j < PG; j++) {
        const int64_t g = g0 + j;
        if (g >= groups) {
            for (int64_t k = 0; k < K; k++) _mm512_store_ps(w + (k * PG + j) * G, _mm512_setzero_ps());
            continue;
        }
        for (int64_t b = 0; b < nb; b++) {
            const uint16_t *dmb = dm + (g * nb + b) * 2 * G;
            const __m512 d = scales(dmb), m = has_m ? scales(dmb + G) : _mm512_setzero_ps();
            for (int64_t k = b * BLK; k < (b + 1) * BLK; k++) {
                __m512 v = _mm512_mul_round_ps(d, widen(q8 + (g * K + k) * G), RNE);
                if (has_m) v = _mm512_add_round_ps(v, m, RNE);
                _mm512_store_ps(w + (k * PG + j) * G, v);
            }
        }
    }
}

/* PANEL_MIN rows and more (prefill chunks): a plain fp32 matmul over the dequantized weights. Each work item
 * (PG column groups x PROWS rows) dequantizes its panel into this thread's scratch (K x 64 floats, in L2) and
 * walks its rows in tiles of PR over it. Returns 0, or -2 where a thread could not allocate its scratch. */
static int panel_path(const float *x, int64_t ldx, int64_t rows, int64_t K, const int8_t *q8, const uint16_t *dm,
                      int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t N) {
    const int64_t panels = (groups + PG - 1) / PG, chunks = (rows + PROWS - 1) / PROWS;
    int failed = 0;
#pragma omp parallel
    {
        float *w = thread_scratch(K * PG * G);
        if (!w) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int64_t have = -1;  /* the panel in w */
        if (!failed)
#pragma omp for schedule(static)
            for (int64_t it = 0; it < panels * chunks; it++) {
                const int64_t p = it / chunks, c0 = it % chunks * PROWS, c1 = rows - c0 < PROWS ? rows : c0 + PROWS;
                const int64_t g0 = p * PG;
                if (p != have) dequantize_panel(q8, dm, K, groups, g0, has_m, w), have = p;
                __mmask16 mask[PG];
                for (int j = 0; j < PG; j++) mask[j] = group_mask(N, g0 + j);
                const float *bg = bias ? bias + g0 * G : 0;
                for (int64_t r0 = c0; r0 < c1; r0 += PR) {
                    const int64_t rt = c1 - r0 < PR ? c1 - r0 : PR;
                    const float *xt = x + r0 * ldx;
                    float *yr = y + r0 * ldy + g0 * G;
                    switch (rt) {
                        case 6: panel_tile(6, w, xt, ldx, K, yr, ldy, mask, bg); break;
                        case 5: panel_tile(5, w, xt, ldx, K, yr, ldy, mask, bg); break;
                        case 4: panel_tile(4, w, xt, ldx, K, yr, ldy, mask, bg); break;
                        case 3: panel_tile(3, w, xt, ldx, K, yr, ldy, mask, bg); break;
                        case 2: panel_tile(2, w, xt, ldx, K, yr, ldy, mask, bg); break;
                        default: panel_tile(1, w, xt, ldx, K, yr, ldy, mask, bg); break;
                    }
                }
            }
    }
    return failed ? -2 : 0;
}
#endif

/* x [rows][K] (row stride ldx), y [rows][N] (row stride ldy). Scratch (bqgemm.py sizes it): xs,
 * rows * K / 32 floats (the block sums); xp, rows * K floats (x packed per tile; unused up to 8
 * rows). Returns 0; -1 where this build has no AVX-512 (nothing written); -2 where a thread could
 * not allocate its scratch for the widened weights. */
int bqgemm_f32(const float *x, int64_t ldx, int64_t rows, int64_t K, const int8_t *q8, const uint16_t *dm,
               int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t N, float *xs,
               float *xp) {
#if defined(__AVX512F__)
    if (rows >= PANEL_MIN) return panel_path(x, ldx, rows, K, q8, dm, groups, has_m, bias, y, ldy, N);
    if (rows >= WIDE_MIN) return wide(x, ldx, rows, K, q8, dm, groups, has_m, bias, y, ldy, N, xs, xp);
    if (rows <= 8) decode_rows(x, ldx, rows, K, q8, dm, groups, has_m, bias, y, ldy, N, xs);
    else streaming(x, ldx, rows, K, q8, dm, groups, has_m, bias, y, ldy, N, xs, xp);
    return 0;
#else
    (void)x; (void)ldx; (void)rows; (void)K; (void)q8; (void)dm; (void)groups; (void)has_m; (void)bias; (void)y;
    (void)ldy; (void)N; (void)xs; (void)xp;
    return -1;
#endif
}

/* y = x W^T (+ bias) with AVX-512 FMAs for weights quantized in blocks of 32 along k (GGUF Q4_0,
 * Q4_1, Q5_0, Q5_1, Q8_0), for CPUs without the AMX tile unit (qgemm.c is the AMX one):
 * W[n][k] = d[n][b] * q[n][k] + m[n][b] with b = k / 32 and q a small integer (|q| <= 128).
 *
 * The integers are streamed as int8 (1 byte a weight, plus 8 bytes of scales per 32: ~1.03 bytes
 * against fp32's 4), widened to fp32 in registers (exact), and multiplied with fp32 FMAs:
 *     T[r][n] = sum over the block's k of q[n][k] x[r][k]
 *     y[r][n] = sum_b d[n][b] T_b[r][n] + m[n][b] S_b[r]      (S_b[r]: the block's sum of x[r])
 * which differs from an fp32 matmul over the dequantized weights only in the order of its
 * roundings (tests/engine/test_bqgemm.py holds it to a float64 reference).
 *
 * Layouts (made once at load, bqgemm.py):
 *   q8 [G][K][16] int8: column group g (16 output columns), for each k the group's 16 integers;
 *   dm [G][nb][2][16] fp32: d then m for the group's 16 columns in block b (as qgemm.c's).
 * Work: OpenMP over column groups; each group walks the rows in tiles of up to 8, so one load and
 * widening of 16 integers feeds 8 FMAs (8 partial and 8 running sums: 16 of the 32 zmm registers). A row's result does not depend on the other rows. */
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLK 32 /* k per quant block */
#define G 16   /* output columns per group: one zmm of fp32 */
#define RT 8   /* rows per tile */

int bqgemm_supported(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

#if defined(__AVX512F__)
/* One tile of rt rows (a constant where it is inlined, so the row loops unroll) for one column group. */
static inline __attribute__((always_inline)) void tile(const int rt, const float *x, int64_t ldx, const float *xs,
                                                       int64_t nb, const int8_t *qg, const float *dmg, int has_m,
                                                       __m512 *acc) {
    for (int i = 0; i < rt; i++) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512 t[RT];
        for (int i = 0; i < rt; i++) t[i] = _mm512_setzero_ps();
        const int8_t *qb = qg + b * BLK * G;
        const float *xb = x + b * BLK;
        for (int k = 0; k < BLK; k++) {
            const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qb + k * G))));
            for (int i = 0; i < rt; i++) t[i] = _mm512_fmadd_ps(w, _mm512_set1_ps(xb[i * ldx + k]), t[i]);
        }
        const __m512 d = _mm512_loadu_ps(dmg + b * 2 * G);
        for (int i = 0; i < rt; i++) acc[i] = _mm512_fmadd_ps(t[i], d, acc[i]);
        if (has_m) {
            const __m512 m = _mm512_loadu_ps(dmg + (b * 2 + 1) * G);
            for (int i = 0; i < rt; i++) acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(xs[i * nb + b]), acc[i]);
        }
    }
}
#endif

/* x [rows][K] (row stride ldx), y [rows][N] (row stride ldy); xs: scratch of rows * K / 32 floats (the
 * block sums, used where has_m). Returns 0; -1 where this build has no AVX-512 (nothing written). */
int bqgemm_f32(const float *x, int64_t ldx, int64_t rows, int64_t K, const int8_t *q8, const float *dm,
               int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t N, float *xs) {
#if defined(__AVX512F__)
    const int64_t nb = K / BLK;
    if (has_m) {
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            for (int64_t b = 0; b < nb; b++) {
                const __m512 lo = _mm512_loadu_ps(x + r * ldx + b * BLK), hi = _mm512_loadu_ps(x + r * ldx + b * BLK + 16);
                xs[r * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(lo, hi));
            }
    }
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int8_t *qg = q8 + g * K * G;
        const float *dmg = dm + g * nb * 2 * G;
        const int64_t n0 = g * G, nn = N - n0 < G ? N - n0 : G;
        const __mmask16 mask = (__mmask16)((1u << nn) - 1);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + n0) : _mm512_setzero_ps();
        for (int64_t r0 = 0; r0 < rows; r0 += RT) {
            const int64_t rt = rows - r0 < RT ? rows - r0 : RT;
            const float *xr = x + r0 * ldx, *xsr = xs + r0 * nb;
            __m512 acc[RT];
            switch (rt) {
                case 8: tile(8, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                case 7: tile(7, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                case 6: tile(6, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                case 5: tile(5, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                case 4: tile(4, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                case 3: tile(3, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                case 2: tile(2, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
                default: tile(1, xr, ldx, xsr, nb, qg, dmg, has_m, acc); break;
            }
            for (int i = 0; i < rt; i++)
                _mm512_mask_storeu_ps(y + (r0 + i) * ldy + n0, mask, _mm512_add_ps(acc[i], bv));
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)rows; (void)K; (void)q8; (void)dm; (void)groups; (void)has_m; (void)bias; (void)y;
    (void)ldy; (void)N; (void)xs;
    return -1;
#endif
}

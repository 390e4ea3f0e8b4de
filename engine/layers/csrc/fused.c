/* The elementwise work between the matmuls of a decoder layer, one pass each instead of a
 * chain of torch ops (each with its own dispatch, temporary and trip through memory).
 * Built with -ffp-contract=off: every product and sum is rounded as torch rounds it, so the
 * rotary is bit-for-bit torch's; the norm differs only in the order of its sum of squares.
 * Rows are shared out over OpenMP threads when there are enough of them to pay for it. */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define LANES 16
#define PARALLEL(work) if ((work) >= (1 << 16))

/* residual += x (when residual is not NULL); out = weight * (r * rsqrt(mean(r^2) + eps)) where r
 * is residual (or x); x, residual, out: [rows, cols] contiguous; out may be x. */
void add_rms_norm_f32(float *x, float *residual, const float *weight, float *out, int64_t rows, int64_t cols,
                      float eps) {
#pragma omp parallel for PARALLEL(rows * cols)
    for (int64_t i = 0; i < rows; i++) {
        float *xi = x + i * cols, *oi = out + i * cols;
        float *r = xi;
        if (residual) {
            r = residual + i * cols;
            for (int64_t j = 0; j < cols; j++) r[j] = xi[j] + r[j];
        }
        float acc[LANES] = {0};
        int64_t j = 0;
        for (; j + LANES <= cols; j += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += r[j + l] * r[j + l];
        for (; j < cols; j++) acc[0] += r[j] * r[j];
        for (int w = LANES / 2; w > 0; w /= 2)
            for (int l = 0; l < w; l++) acc[l] += acc[l + w];
        const float rstd = 1.f / sqrtf(acc[0] / (float)cols + eps);
        for (j = 0; j < cols; j++) oi[j] = weight[j] * (r[j] * rstd);
    }
}

/* In place on the first `heads` heads (head_dim each, packed) of each of `rows` rows, row_stride
 * apart: x = x * cos + rotate_half(x) * sin, with cos/sin rows ([max_pos, head_dim], the sign of
 * rotate_half folded into sin) picked by positions. */
void rotary_f32(float *x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
                const int64_t *positions, const float *cos_table, const float *sin_table) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for PARALLEL(rows * heads * head_dim)
    for (int64_t i = 0; i < rows; i++) {
        const float *c = cos_table + positions[i] * head_dim, *s = sin_table + positions[i] * head_dim;
        for (int64_t h = 0; h < heads; h++) {
            float *a = x + i * row_stride + h * head_dim, *b = a + half;
            for (int64_t j = 0; j < half; j++) {
                const float x1 = a[j], x2 = b[j];
                a[j] = x1 * c[j] + x2 * s[j];
                b[j] = x2 * c[half + j] + x1 * s[half + j];
            }
        }
    }
}

/* out[i] = the first index of the largest of row i's cols values (rows contiguous), as torch's
 * argmax picks; a NaN counts as the largest, as there. */
static int64_t argmax_row(const float *r, int64_t cols) {
    int64_t j = 0, arg = -1;
    float top = -INFINITY;
#if defined(__AVX512F__)
    if (cols >= LANES) {  /* per lane: the first maximum of its column of the row */
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i at = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(LANES);
        __mmask16 nan = 0;
        for (; j + LANES <= cols; j += LANES, idx = _mm512_add_epi32(idx, step)) {
            const __m512 v = _mm512_loadu_ps(r + j);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, gt, v);
            at = _mm512_mask_mov_epi32(at, gt, idx);
        }
        if (nan)
            for (int64_t i = 0;; i++)
                if (r[i] != r[i]) return i;
        float b[LANES];
        int32_t a[LANES];
        _mm512_storeu_ps(b, best);
        _mm512_storeu_epi32(a, at);
        for (int l = 0; l < LANES; l++)
            if (a[l] >= 0 && (b[l] > top || (b[l] == top && a[l] < arg))) top = b[l], arg = a[l];
    }
#endif
    for (; j < cols; j++) {
        if (r[j] != r[j]) {  /* the first NaN, unless an earlier one was seen above */
            for (int64_t i = 0; i < j; i++)
                if (r[i] != r[i]) return i;
            return j;
        }
        if (r[j] > top) top = r[j], arg = j;
    }
    return arg < 0 ? 0 : arg;  /* a row of -inf only: torch answers 0 */
}

void argmax_rows_f32(const float *x, int64_t rows, int64_t cols, int64_t *out) {
#pragma omp parallel for PARALLEL(rows * cols)
    for (int64_t i = 0; i < rows; i++) out[i] = argmax_row(x + i * cols, cols);
}

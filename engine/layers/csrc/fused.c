/* The elementwise work between the matmuls of a decoder layer, one pass each instead of a
 * chain of torch ops (each with its own dispatch, temporary and trip through memory).
 * Built with -ffp-contract=off: every product and sum is rounded as torch rounds it, so the
 * rotary is bit-for-bit torch's; the norm differs only in the order of its sum of squares.
 * Rows are shared out over OpenMP threads when there are enough of them to pay for it. */
#include <math.h>
#include <stdint.h>

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

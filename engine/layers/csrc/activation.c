/* The gated MLP's activation, silu(gate) * up, as one pass from the gate|up matmul's output into
 * a new [rows, inter] (torch: a chunk, a silu temporary and an in-place product, three
 * dispatches). silu is x / (1 + exp(-x)), as torch computes it, with glibc's vector expf
 * (libmvec) where AVX-512 is there; the division and product round as torch's do. */
#include <math.h>
#include <stdint.h>
#if defined(__AVX512F__)
#include <immintrin.h>
__m512 _ZGVeN16v_expf(__m512);  /* libmvec's 16-lane expf */
#endif

static inline void silu_mul_row(const float *g, const float *u, float *o, int64_t n) {
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        const __m512 x = _mm512_loadu_ps(g + j);
        const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(zero, x));
        _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
    }
#endif
    for (; j < n; j++) o[j] = g[j] / (1.f + expf(-g[j])) * u[j];
}

void silu_mul_f32(const float *gate_up, int64_t rows, int64_t inter, float *out) {
#pragma omp parallel for if (rows * inter >= (1 << 15))
    for (int64_t i = 0; i < rows; i++) silu_mul_row(gate_up + i * 2 * inter, gate_up + i * 2 * inter + inter,
                                                    out + i * inter, inter);
}

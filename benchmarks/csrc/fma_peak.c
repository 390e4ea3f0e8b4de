/* The CPU's fp32 FMA peak: each OpenMP thread runs 12 independent chains of a = a * b + c on the widest
 * vectors this build has (-march=native: 16 lanes with AVX-512, 8 with AVX2), so neither an FMA's latency
 * nor memory limits it; 2 FLOPs a lane an FMA. The bound a matmul kernel can approach, where a library
 * matmul (the engine's own peak probe) already loses a share to its loads and packing. */
#include <omp.h>
#include <stdint.h>

typedef float vec __attribute__((vector_size(64)));  /* one zmm, or two ymm without AVX-512 */
#define CHAINS 12

/* FLOPs per second of `threads` threads over `iters` rounds each; the sum of the chains goes to *sink (so
 * none is dropped). */
double fma_peak(int threads, int64_t iters, float *sink) {
    double t0 = omp_get_wtime();
    float total = 0.f;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        vec a[CHAINS], b, c;
        for (int l = 0; l < 16; l++) b[l] = 1.0000001f, c[l] = 1e-7f;
        for (int i = 0; i < CHAINS; i++)
            for (int l = 0; l < 16; l++) a[i][l] = (float)(i + l);
        for (int64_t it = 0; it < iters; it++)
#pragma GCC unroll 12
            for (int i = 0; i < CHAINS; i++) a[i] = a[i] * b + c;
        for (int i = 0; i < CHAINS; i++)
            for (int l = 0; l < 16; l++) total += a[i][l];
    }
    *sink = total;
    return (double)iters * CHAINS * 16 * 2 * threads / (omp_get_wtime() - t0);
}

/* The CPU's fp32 FMA peak: each OpenMP thread runs independent chains of a = a * b + c on the widest
 * vectors this build has (-march=native: one zmm of 16 lanes a chain with AVX-512, two ymm without), enough
 * of them that an FMA's latency does not limit it and few enough to stay in registers (12 zmm of 32; 6 x 2
 * ymm of 16); 2 FLOPs a lane an FMA. The bound a matmul kernel can approach, where a library
 * matmul (the engine's own peak probe) already loses a share to its loads and packing. */
#include <omp.h>
#include <stdint.h>

typedef float vec __attribute__((vector_size(64)));  /* one zmm, or two ymm without AVX-512 */
#if defined(__AVX512F__)
#define CHAINS 12
#else
#define CHAINS 6
#endif

/* FLOPs per second of up to `threads` threads (the team OpenMP grants) over `iters` rounds each; the sum
 * of the chains goes to *sink (so none is dropped). */
double fma_peak(int threads, int64_t iters, float *sink) {
    double t0 = omp_get_wtime();
    float total = 0.f;
    int team = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
#pragma omp single nowait
        team = omp_get_num_threads();
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
    return (double)iters * CHAINS * 16 * 2 * team / (omp_get_wtime() - t0);
}

/* Denormals flushed (DAZ | FTZ) by each thread for a kernel's own work, then put back: the
 * libraries are built without crtfastmath, which would set it for the whole process
 * (engine/native.py). BEGIN and END bracket the work inside one OpenMP parallel region. */
#ifndef PDSERVE_DENORMALS_H
#define PDSERVE_DENORMALS_H
#if defined(__SSE__)
#include <xmmintrin.h>
#define FLUSH_DENORMALS_BEGIN const unsigned saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FLUSH_DENORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_DENORMALS_BEGIN
#define FLUSH_DENORMALS_END
#endif
#endif

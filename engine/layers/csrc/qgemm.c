/* y = x W^T (+ bias) on AMX for weights quantized in blocks of 32 along k (GGUF Q4_0, Q4_1,
 * Q5_0, Q5_1, Q8_0): W[n][k] = d[n][b] * q[n][k] + m[n][b] with b = k / 32 and q a small integer.
 *
 * Exact to fp32, not bf16: q (|q| <= 128) is exact in bf16, and x is split into three bf16
 * parts, x = hi + mid + lo, which hold all 24 bits of its significand. A product of a q and a
 * part is exact in fp32; AMX sums them in fp32. So one 32-k block of a row and 16 columns is
 *     T[r][n] = sum_k q[n][k] x[r][k]      (3 TDPBF16PS, one per part, into one tile)
 * and y[r][n] = sum_b d[n][b] T_b[r][n] + m[n][b] S_b[r] with S_b[r] = sum of x[r][k] over the
 * block: an fp32 computation that differs from a plain fp32 matmul over the dequantized weights
 * only in the order of its roundings (the unit flushes denormal parts: |x| below ~1e-33 loses
 * its low bits). The bf16 tile holds a q block as it is stored (2 bytes a weight against fp32's
 * 4), and the tile unit's rate is 8-15x the AVX-512 FMAs' (1-1.8 TFLOP/s a core in bf16 on this
 * machine, as the host drifts), so three passes and the per-block scaling still leave it ahead.
 *
 * Layouts (made once at load, gemm.py):
 *   bq [G][nb][16 k-pairs][16 n][2] bf16: column group g (16 columns), block b, in the VNNI
 *      layout a B tile wants (k pairs interleaved per column);
 *   dm [G][nb][2][16] fp32: d then m for the group's 16 columns in block b.
 * Per call the rows are split into parts (ap [row tile][nb][3][16][32] bf16, A tiles) and block
 * sums (xs [rows][nb]) in caller-given scratch. Work: 2 row tiles x 2 column groups per step
 * (see block()), the column pairs shared out over OpenMP threads, each thread keeping its
 * pairs for every row block so its weights stay in its L2 during prefill.
 * A row's result does not depend on the other rows. */
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#define HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#define BLK 32          /* k per quant block = k per bf16 tile row */
#define TILE_ELEMS 512  /* bf16 in a 16 x 32 tile */
#define UNROLL 2        /* blocks whose stored tiles are scaled in one pass */
#define TSTRIDE 256     /* floats between the stored tiles of consecutive blocks */

int qgemm_supported(void) {
#ifdef HAVE_AMX
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
        return 0;  /* AMX-BF16, AMX-TILE */
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5)))
        return 0;  /* AVX512-BF16 (the split of x) */
    /* Linux hands out the 8 KiB tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA) */
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
#else
    return 0;
#endif
}

#ifdef HAVE_AMX
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* Tiles 0-5, 64 bytes a row: the weights' 16 rows (k pairs), and the parts' and accumulator's
 * `rows` rows (16, or fewer when the whole call has fewer: a tile product's time goes with its
 * rows). */
static void configure(int rows) {
    tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 6; i++) {
        cfg.rows[i] = i < 2 ? 16 : rows;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}

static inline __m512 widen(__m256bh h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16));
}

/* Row i of the padded rows: its three parts into the A tiles and its block sums. */
static void split_row(const float *x, int64_t ldx, int64_t rows, int64_t nb, int64_t i, uint16_t *ap, float *xs) {
    const int64_t rt = i / 16, r = i % 16;
    for (int64_t b = 0; b < nb; b++) {
        uint16_t *dst = ap + ((rt * nb + b) * 3) * TILE_ELEMS + r * BLK;
        __m512 v[2];
        for (int h = 0; h < 2; h++)
            v[h] = i < rows ? _mm512_loadu_ps(x + i * ldx + b * BLK + 16 * h) : _mm512_setzero_ps();
        xs[i * nb + b] = _mm512_reduce_add_ps(_mm512_add_ps(v[0], v[1]));
        for (int part = 0; part < 3; part++)
            for (int h = 0; h < 2; h++) {
                const __m256bh p = _mm512_cvtneps_pbh(v[h]);
                _mm256_storeu_si256((__m256i *)(dst + part * TILE_ELEMS + 16 * h), (__m256i)p);
                v[h] = _mm512_sub_ps(v[h], widen(p));  /* exact: the rounding's remainder */
            }
    }
}

/* acc[rows][32] (row stride 32) += d_u * T_u + m_u * S_u for the nu blocks' accumulator tiles
 * stored in t (TSTRIDE floats apart), block after block in registers, as one block at a time would;
 * without the m term for formats that have none (Q4_0, Q5_0, Q8_0: the LM head ~7% faster).
 * first: acc starts at zero (not read; the first FMA adds +0 as a zeroed acc would). */
static inline __attribute__((always_inline)) void scale_into(
    float *acc, const float *t, const float *dm, const float *xs, int64_t nb, const int rows, const int nu,
    const int has_m, const int first) {
    __m512 d[UNROLL], m[UNROLL];
    for (int u = 0; u < nu; u++) d[u] = _mm512_loadu_ps(dm + 32 * u), m[u] = _mm512_loadu_ps(dm + 32 * u + 16);
#pragma GCC unroll 16
    for (int r = 0; r < rows; r++) {
        __m512 a = first ? _mm512_setzero_ps() : _mm512_load_ps(acc + 32 * r);
        for (int u = 0; u < nu; u++) {
            a = _mm512_fmadd_ps(_mm512_load_ps(t + u * TSTRIDE + 16 * r), d[u], a);
            if (has_m) a = _mm512_fmadd_ps(_mm512_set1_ps(xs[r * nb + u]), m[u], a);
        }
        _mm512_store_ps(acc + 32 * r, a);
    }
}

/* One column pair (or single group) over one row block (two row tiles or one), all k.
 * Tiles: 0-1 the pair's weights, 2-4 a row tile's three parts, 5 the one accumulator, which
 * takes each 16 x 16 block's three products back to back and is stored for the scaling.
 * Measured on this tile unit: products into the same accumulator back to back run ~1.5x faster
 * than products that switch accumulators (8 against 12 ns each), and one accumulator reused
 * beat two or four (the whole decode matmul chain ~25% faster than four accumulators). Two
 * blocks' tiles are scaled in one pass (each sum loaded and stored once for both: the chain
 * 3-7% faster at 1, 32 and 256 rows; four or six blocks a pass were slower). The weights are
 * prefetched two blocks ahead, across the end of a pair into the next one's (cold, they come
 * from DRAM every decode step), the prefetches placed between the products: on this tile unit
 * the instructions that follow a chain of products wait for it, those between them do not (the
 * matmul chain 8-12% faster at 16, 32 and 2048 rows than with all of them ahead of the loads;
 * the scaling moved between the products as well was slower). */
static inline __attribute__((always_inline)) void block(
    const int two_rows, const int two_cols, const int has_m, const uint16_t *a0, const uint16_t *b0, const uint16_t *b1,
    const float *s0, const float *s1, const float *xs, int64_t nb, float acc[32 * 32], float *t,
    const int rows) {
    for (int64_t b = 0; b < nb; b += UNROLL) {
        const int nu = nb - b < UNROLL ? (int)(nb - b) : UNROLL;
        for (int u = 0; u < nu; u++) {
            const int64_t bb = b + u;
            const int64_t ahead = bb + 2 < nb ? bb + 2 : bb + 2 + nb;  /* past the pair's end: the next pair's */
            const char *n0 = (const char *)(b0 + ahead * TILE_ELEMS), *n1 = (const char *)(b1 + ahead * TILE_ELEMS);
            /* lines [L0, L1) of the pair's weight tiles two blocks ahead */
#define PF(L0, L1) do { for (int l = (L0); l < (L1); l++) { _mm_prefetch(n0 + 64 * l, _MM_HINT_T0); \
                                                           _mm_prefetch(n1 + 64 * l, _MM_HINT_T0); } } while (0)
            _mm_prefetch((const char *)(s0 + ahead * 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(s0 + ahead * 32 + 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(s1 + ahead * 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(s1 + ahead * 32 + 16), _MM_HINT_T0);
            _tile_loadd(0, b0 + bb * TILE_ELEMS, 64);
            if (two_cols) _tile_loadd(1, b1 + bb * TILE_ELEMS, 64);
            if (!two_rows) PF(8, 16);
            for (int rt = 0; rt < 1 + two_rows; rt++) {
                const uint16_t *pa = a0 + (rt * nb + bb) * 3 * TILE_ELEMS;
                float *tu = t + u * TSTRIDE + rt * 2 * UNROLL * 256;
                _tile_loadd(2, pa, 64);
                _tile_loadd(3, pa + TILE_ELEMS, 64);
                _tile_loadd(4, pa + 2 * TILE_ELEMS, 64);
                _tile_zero(5);
                _tile_dpbf16ps(5, 2, 0);
                PF(8 * rt, 8 * rt + 4);
                _tile_dpbf16ps(5, 3, 0);
                _tile_dpbf16ps(5, 4, 0);
                _tile_stored(5, tu, 64);
                if (two_cols) {
                    _tile_zero(5);
                    _tile_dpbf16ps(5, 2, 1);
                    PF(8 * rt + 4, 8 * rt + 8);
                    _tile_dpbf16ps(5, 3, 1);
                    _tile_dpbf16ps(5, 4, 1);
                    _tile_stored(5, tu + UNROLL * 256, 64);
                }
                if (!two_cols) PF(8 * rt + 4, 8 * rt + 8);
            }
        }
        const int64_t o = b * 32;
        float *t1 = t + UNROLL * 256, *tr = t + 2 * UNROLL * 256;
        /* nu and first as constants, so each form of the scaling is compiled apart */
#define SCALE_NU(ACC, T, S, XS, ROWS, FIRST) do { \
            if (nu == UNROLL) scale_into(ACC, T, S, XS, nb, ROWS, UNROLL, has_m, FIRST); \
            else scale_into(ACC, T, S, XS, nb, ROWS, nu, has_m, FIRST); } while (0)
#define SCALE(ACC, T, S, XS, ROWS) do { \
            if (b == 0) SCALE_NU(ACC, T, S, XS, ROWS, 1); else SCALE_NU(ACC, T, S, XS, ROWS, 0); } while (0)
        SCALE(acc, t, s0 + o, xs + b, rows);
        if (two_cols) SCALE(acc + 16, t1, s1 + o, xs + b, rows);
        if (two_rows) {
            SCALE(acc + 16 * 32, tr, s0 + o, xs + 16 * nb + b, 16);
            if (two_cols) SCALE(acc + 16 * 32 + 16, tr + UNROLL * 256, s1 + o, xs + 16 * nb + b, 16);
        }
#undef SCALE
#undef SCALE_NU
    }
#undef PF
}
#endif

/* x [rows, k] (row stride ldx) -> y [rows, n] (row stride ldy); groups = ceil(n / 16); has_m: 0
 * where every m is 0; ap: rows rounded up to 16 x k x 3 bf16; xs: rows rounded up to 16 x k/32 floats. */
void qgemm_f32(const float *x, int64_t ldx, int64_t rows, int64_t k, const uint16_t *bq, const float *dm,
               int64_t groups, int has_m, const float *bias, float *y, int64_t ldy, int64_t n, uint16_t *ap,
               float *xs) {
#ifdef HAVE_AMX
    const int64_t nb = k / BLK, tiles = (rows + 15) / 16, pairs = (groups + 1) / 2;
#pragma omp parallel
    {
        const int short_rows = rows < 16 ? (int)rows : 16;  /* one row tile of fewer rows */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (rows < 16 ? rows : tiles * 16); i++)
            split_row(x, ldx, rows, nb, i, ap, xs);
        configure(short_rows);
        const int64_t nt = omp_get_num_threads(), me = omp_get_thread_num();
        const int64_t p0 = pairs * me / nt, p1 = pairs * (me + 1) / nt;
        float acc[32 * 32] __attribute__((aligned(64)));
        float t[4 * UNROLL * 256] __attribute__((aligned(64)));
        for (int64_t rt = 0; rt < tiles; rt += 2) {
            const int two_rows = rt + 1 < tiles;
            const uint16_t *a0 = ap + rt * nb * 3 * TILE_ELEMS;
            const float *xsr = xs + rt * 16 * nb;
            for (int64_t p = p0; p < p1; p++) {
                const int64_t g = 2 * p;
                const int two_cols = g + 1 < groups;
                const uint16_t *b0 = bq + g * nb * TILE_ELEMS, *b1 = b0 + nb * TILE_ELEMS;
                const float *s0 = dm + g * nb * 32, *s1 = s0 + nb * 32;
#define BLOCK(M) do { \
                    if (two_rows && two_cols) block(1, 1, M, a0, b0, b1, s0, s1, xsr, nb, acc, t, 16); \
                    else if (two_rows) block(1, 0, M, a0, b0, b1, s0, s1, xsr, nb, acc, t, 16); \
                    else if (two_cols) block(0, 1, M, a0, b0, b1, s0, s1, xsr, nb, acc, t, short_rows); \
                    else block(0, 0, M, a0, b0, b1, s0, s1, xsr, nb, acc, t, short_rows); } while (0)
                if (has_m) BLOCK(1);
                else BLOCK(0);
#undef BLOCK
                const int64_t cols = (n - g * 16) < 32 ? n - g * 16 : 32;
                const __mmask16 m0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
                const __mmask16 m1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
                const int64_t last = rows - rt * 16 < 32 ? rows - rt * 16 : 32;
                for (int64_t r = 0; r < last; r++) {
                    float *out = y + (rt * 16 + r) * ldy + g * 16;
                    __m512 v0 = _mm512_load_ps(acc + 32 * r), v1 = _mm512_load_ps(acc + 32 * r + 16);
                    if (bias) {
                        v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, bias + g * 16));
                        v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, bias + g * 16 + 16));
                    }
                    _mm512_mask_storeu_ps(out, m0, v0);
                    _mm512_mask_storeu_ps(out + 16, m1, v1);
                }
            }
        }
        _tile_release();
    }
#else
    (void)x; (void)ldx; (void)rows; (void)k; (void)bq; (void)dm; (void)groups; (void)has_m; (void)bias;
    (void)y; (void)ldy; (void)n; (void)ap; (void)xs;
#endif
}

/* Weight-only int4 linear for small batches on AVX2 CPUs (the draft's decode steps).
 *
 * Why: decoding is memory-bound, so a draft step costs the bytes it reads. Group-wise int4
 * weights read 0.5625 bytes per weight against int8's 1, and torch 2.13 has no fast int4 CPU
 * kernel for AVX2 (its int4pack kernels measured 13-50x slower than FBGEMM at one row).
 *
 * Weights: row n is K/64 groups of 32 bytes; byte j of group g holds u[64g + j] in its low nibble
 * and u[64g + 32 + j] in its high one, where u = w_int + 8 is in [0, 15]; d[n, g] is the group's
 * float scale. Activations are quantized per row to int8 (absmax / 127), with per-group sums
 * xsum[m, g] so the +8 offset is removed exactly: dot(w_int, x) = dot(u, x) - 8 * sum(x).
 *
 *   y[m, n] = xs[m] * sum_g d[n, g] * (dot(u[n, g], xq[m, g]) - 8 * xsum[m, g])  (+ bias[n])
 *
 * Integer dots are exact and each output element is summed over groups in one fixed order on one
 * thread, so a row's result does not depend on the other rows or on the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define GROUP 64
#define MMAX 4 /* most activation rows per call (q4_linear_f32 checks) */

/* x [M, K] float -> xq [M, K] int8, xs [M] per-row scale, xc [M, K/GROUP] 8 x the group sums of xq, as floats
 * (exact: |8 x sum| <= 8 * 64 * 127): the blocks' offset correction, converted once here instead of in every
 * block's inner loop. */
static void q4_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs, float *xc) {
    const int64_t G = K / GROUP;
    for (int64_t m = 0; m < M; ++m) {
        const float *r = x + m * K;
        const float amax = absmax(r, K);
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        xs[m] = amax / 127.f;
        for (int64_t g = 0; g < G; ++g) {
            int32_t s = 0;
            for (int64_t k = g * GROUP; k < (g + 1) * GROUP; ++k) {
                const int8_t q = (int8_t)nearbyintf(r[k] * inv);
                xq[m * K + k] = q;
                s += q;
            }
            xc[m * G + g] = 8.f * (float)s;
        }
    }
}

/* A 1-row step also prefetches each weight row this many blocks ahead into L2: one core streams faster with more
 * lines in flight than its L1 miss buffers hold. Single draft-shaped linears on one core, weights from memory
 * (Zen 4, medians of 7, two alternations): 1 row 10-22% faster (896x9728 0.275-0.285 -> 0.236-0.265 ms, 4864x896
 * 0.194-0.197 -> 0.151-0.160 ms); at 3 rows (branch steps, compute-bound) it cost 5-10%, so only M = 1 has it. */
#define Q4_PREFETCH_L2 8

/* One block of NB weight rows against M activation rows (M and NB compile-time constants, so the
 * accumulators stay in registers: with M a run-time value they lived on the stack, and a 1-row
 * decode step ran at about a third of the core's integer throughput). Per group and row pair the
 * two nibble halves' u8 x s8 products are summed in int16 (at most 2 * 2 * 15 * 127 = 7620) before
 * one widening madd. Every (row, weight row) accumulator sees the same operations in the same
 * order whatever M is, so results stay batch-invariant. */
#define Q4_BLOCK(M, NB)                                                                                     \
    static void q4_block_##M##_##NB(const int8_t *xq, const float *xs, const float *xc, int64_t K,         \
                                    const uint8_t *w, const float *d, const float *bias, int64_t N,        \
                                    int64_t n0, float *y) {                                                \
        const int64_t G = K / GROUP, row_bytes = K / 2;                                                    \
        const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);                          \
        __m256 acc[M][NB];                                                                                 \
        float corr[M][NB];                                                                                 \
        for (int i = 0; i < M; ++i)                                                                        \
            for (int j = 0; j < NB; ++j) {                                                                 \
                acc[i][j] = _mm256_setzero_ps();                                                           \
                corr[i][j] = 0.f;                                                                          \
            }                                                                                              \
        for (int64_t g = 0; g < G; ++g) {                                                                  \
            for (int j = 0; j < NB; ++j) {                                                                 \
                const uint8_t *p = w + (n0 + j) * row_bytes + g * 32;                                      \
                _mm_prefetch((const char *)(p + 2 * NB * row_bytes), _MM_HINT_T0);                         \
                if (M == 1) /* and into L2 further ahead (see Q4_PREFETCH_L2) */                           \
                    _mm_prefetch((const char *)(p + Q4_PREFETCH_L2 * NB * row_bytes), _MM_HINT_T1);         \
                const __m256i v = _mm256_loadu_si256((const __m256i *)p);                                  \
                const __m256i lo = _mm256_and_si256(v, low);                                               \
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                         \
                const float dj = d[(n0 + j) * G + g];                                                      \
                const __m256 dv = _mm256_set1_ps(dj);                                                      \
                for (int i = 0; i < M; ++i) {                                                              \
                    const int8_t *x = xq + i * K + g * GROUP;                                              \
                    const __m256i s16 = _mm256_add_epi16(                                                  \
                        _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)x)),                  \
                        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x + 32))));          \
                    const __m256i s = _mm256_madd_epi16(s16, ones);                                        \
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), dv, acc[i][j]);                     \
                    corr[i][j] += dj * xc[i * G + g];                                                      \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int i = 0; i < M; ++i)                                                                        \
            for (int j = 0; j < NB; ++j) {                                                                 \
                float v = (hsum_ps(acc[i][j]) - corr[i][j]) * xs[i];                                       \
                if (bias) v += bias[n0 + j];                                                               \
                y[i * N + n0 + j] = v;                                                                     \
            }                                                                                              \
    }

Q4_BLOCK(1, 4)
Q4_BLOCK(2, 4)
Q4_BLOCK(3, 2)
Q4_BLOCK(4, 2)
Q4_BLOCK(1, 1)
Q4_BLOCK(2, 1)
Q4_BLOCK(3, 1)
Q4_BLOCK(4, 1)

typedef void (*q4_block_fn)(const int8_t *, const float *, const float *, int64_t, const uint8_t *,
                            const float *, const float *, int64_t, int64_t, float *);

/* y[M, N] for M in 1..MMAX: blocks of NB weight rows split over the OpenMP threads; a tail of fewer
 * than NB weight rows goes one row at a time. */
static void q4_linear(const int8_t *xq, const float *xs, const float *xc, int64_t M, int64_t K, const uint8_t *w,
               const float *d, const float *bias, int64_t N, float *y) {
    static const q4_block_fn blocks[MMAX + 1] = {0, q4_block_1_4, q4_block_2_4, q4_block_3_2, q4_block_4_2};
    static const q4_block_fn singles[MMAX + 1] = {0, q4_block_1_1, q4_block_2_1, q4_block_3_1, q4_block_4_1};
    static const int widths[MMAX + 1] = {0, 4, 4, 2, 2};
    const q4_block_fn block = blocks[M], single = singles[M];
    const int64_t nb = widths[M], full = N / nb;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < full; ++b) block(xq, xs, xc, K, w, d, bias, N, b * nb, y);
    for (int64_t n = full * nb; n < N; ++n) single(xq, xs, xc, K, w, d, bias, N, n, y);
}

/* The whole layer in one call from Python: quantize x [M, K] (M in 1..MMAX, else -2)
 * into scratch and run q4_linear. One foreign call instead of two and no scratch tensors: a draft
 * step makes about a hundred of these calls, and each torch allocation or call costs microseconds. */
int q4_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *d, const float *bias,
                  int64_t N, float *y) {
    if (M < 1 || M > MMAX) return -2; /* the kernels exist for 1..MMAX rows only */
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc((size_t)M * sizeof(float));
    float *xc = malloc((size_t)(M * (K / GROUP)) * sizeof(float));
    const int ok = xq && xs && xc;
    if (ok) {
        q4_quantize_rows(x, M, K, xq, xs, xc);
        q4_linear(xq, xs, xc, M, K, w, d, bias, N, y);
    }
    free(xq);
    free(xs);
    free(xc);
    return ok ? 0 : -1; /* -1: out of memory */
}

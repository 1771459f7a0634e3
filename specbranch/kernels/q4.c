/* Weight-only int4 linear for small batches (the draft's decode steps): AVX2 code, and AVX-512 VNNI code where
 * the CPU has it (isa.c picks; both give the same bits).
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
 * Layout ("blocked", as q8.c's and for the same reason): blocks of 4 weight rows; inside a block, for each group,
 * the 4 rows' 32 bytes one after another: w[N/4][K/64][4][32], and the scales likewise d[N/4][K/64][4] (N padded
 * to whole blocks; models/linear.py packs both). A block is one sequential run of memory, where 4 row-major rows
 * were 4 short streams.
 *
 * Integer dots are exact and each output element is summed over groups in one fixed order on one
 * thread, so a row's result does not depend on the other rows or on the thread count. The VNNI code forms the
 * same 8 int32 partial sums per group as the AVX2 code (lane l: bytes 4l..4l+3 of both nibble halves) and then
 * does the same float operations, so the two give the same bits.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define GROUP 64
#define MMAX 4    /* most activation rows per call (q4_linear_f32 checks) */
#define Q4_NB 4   /* weight rows per block */
#define Q4_GB 128 /* bytes per group of a block: Q4_NB rows x 32 */

int kernels_vnni(void); /* isa.c */

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

/* Prefetch distances in bytes of a thread's run of blocks (sequential): into L1, and further ahead into L2 (one
 * core streams faster with more lines in flight than its L1 miss buffers hold). */
#define Q4_PREFETCH 4096
#define Q4_PREFETCH_L2 32768

/* Both cache lines of the group Q4_PREFETCH bytes ahead into L1 and Q4_PREFETCH_L2 ahead into L2. */
static inline void q4_prefetch(const uint8_t *pg) {
    _mm_prefetch((const char *)pg + Q4_PREFETCH, _MM_HINT_T0);
    _mm_prefetch((const char *)pg + Q4_PREFETCH + 64, _MM_HINT_T0);
    _mm_prefetch((const char *)pg + Q4_PREFETCH_L2, _MM_HINT_T1);
    _mm_prefetch((const char *)pg + Q4_PREFETCH_L2 + 64, _MM_HINT_T1);
}

/* y[m, n] for the block's last step: (sum of the 8 lanes - offset correction) * row scale (+ bias). */
static inline float q4_output(__m256 acc, float corr, float xs, const float *bias, int64_t n) {
    const float v = (hsum_ps(acc) - corr) * xs;
    return bias ? v + bias[n] : v;
}

/* Weight rows j0..j0+NB-1 of block b against M activation rows (M and NB compile-time constants, so the
 * accumulators stay in registers: with M a run-time value they lived on the stack, and a 1-row decode step ran
 * at about a third of the core's integer throughput). Per group and row pair the two nibble halves' u8 x s8
 * products are summed in int16 (at most 2 * 2 * 15 * 127 = 7620) before one widening madd. Every (row, weight
 * row) accumulator sees the same operations in the same order whatever M is, so results stay batch-invariant. */
#define Q4_BLOCK(M, NB)                                                                                     \
    static void q4_block_##M##_##NB(const int8_t *xq, const float *xs, const float *xc, int64_t K,         \
                                    const uint8_t *w, const float *d, const float *bias, int64_t N,        \
                                    int64_t b, int j0, float *y) {                                         \
        const int64_t G = K / GROUP;                                                                       \
        const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);                          \
        const uint8_t *wb = w + b * G * Q4_GB;                                                             \
        const float *db = d + b * G * Q4_NB;                                                               \
        __m256 acc[M][NB];                                                                                 \
        float corr[M][NB];                                                                                 \
        for (int i = 0; i < M; ++i)                                                                        \
            for (int j = 0; j < NB; ++j) {                                                                 \
                acc[i][j] = _mm256_setzero_ps();                                                           \
                corr[i][j] = 0.f;                                                                          \
            }                                                                                              \
        for (int64_t g = 0; g < G; ++g) {                                                                  \
            const uint8_t *pg = wb + g * Q4_GB;                                                            \
            q4_prefetch(pg);                                                                               \
            for (int j = 0; j < NB; ++j) {                                                                 \
                const __m256i v = _mm256_loadu_si256((const __m256i *)(pg + (j0 + j) * 32));               \
                const __m256i lo = _mm256_and_si256(v, low);                                               \
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                         \
                const float dj = db[g * Q4_NB + j0 + j];                                                   \
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
        for (int j = 0; j < NB; ++j) {                                                                     \
            const int64_t n = b * Q4_NB + j0 + j;                                                          \
            if (n >= N) break;                                                                             \
            for (int i = 0; i < M; ++i) y[i * N + n] = q4_output(acc[i][j], corr[i][j], xs[i], bias, n);   \
        }                                                                                                  \
    }

/* AVX2 has 16 vector registers: 1-2 rows take a whole block at once, 3-4 rows half a block per pass (the second
 * pass finds the block's weights, a few KB, in cache). */
Q4_BLOCK(1, 4)
Q4_BLOCK(2, 4)
Q4_BLOCK(3, 2)
Q4_BLOCK(4, 2)

/* The same block on AVX-512 VNNI, all 4 weight rows for up to 4 activation rows (32 registers). A 64-byte load
 * holds two weight rows' group; its low nibbles pair with the activation's first 32 bytes broadcast to both
 * halves, its high nibbles with the last 32, and two dpbusd leave in lane l of each half what the AVX2 code's
 * maddubs/madd leave in its lane l. acc[i][h] holds weight row 2h in its low 256 bits and row 2h + 1 in its high
 * ones. The offset corrections of the 4 weight rows go 4 to a vector: the same multiply and add per element as
 * the AVX2 code's scalars. */
#define Q4_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"
#define Q4_VNNI_BLOCK(M)                                                                                     \
    __attribute__((target(Q4_VNNI))) static void q4_vnni_block_##M(                                          \
        const int8_t *xq, const float *xs, const float *xc, int64_t K, const uint8_t *w, const float *d,      \
        const float *bias, int64_t N, int64_t b, float *y) {                                                 \
        const int64_t G = K / GROUP;                                                                         \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                          \
        const __m512i pick01 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);              \
        const __m512i pick23 = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);              \
        const uint8_t *wb = w + b * G * Q4_GB;                                                               \
        const float *db = d + b * G * Q4_NB;                                                                 \
        __m512 acc[M][2];                                                                                    \
        __m128 corr[M];                                                                                      \
        for (int i = 0; i < M; ++i) {                                                                        \
            acc[i][0] = acc[i][1] = _mm512_setzero_ps();                                                     \
            corr[i] = _mm_setzero_ps();                                                                      \
        }                                                                                                    \
        for (int64_t g = 0; g < G; ++g) {                                                                    \
            const uint8_t *pg = wb + g * Q4_GB;                                                              \
            q4_prefetch(pg);                                                                                 \
            const __m512i w01 = _mm512_loadu_si512((const void *)pg);                                        \
            const __m512i w23 = _mm512_loadu_si512((const void *)(pg + 64));                                 \
            const __m512i lo01 = _mm512_and_si512(w01, low), hi01 = _mm512_and_si512(_mm512_srli_epi16(w01, 4), low); \
            const __m512i lo23 = _mm512_and_si512(w23, low), hi23 = _mm512_and_si512(_mm512_srli_epi16(w23, 4), low); \
            const __m128 d4 = _mm_loadu_ps(db + g * Q4_NB);                                                  \
            const __m512 d01 = _mm512_permutexvar_ps(pick01, _mm512_castps128_ps512(d4));                    \
            const __m512 d23 = _mm512_permutexvar_ps(pick23, _mm512_castps128_ps512(d4));                    \
            for (int i = 0; i < M; ++i) {                                                                    \
                const int8_t *x = xq + i * K + g * GROUP;                                                    \
                const __m512i xlo = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x));          \
                const __m512i xhi = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x + 32)));   \
                const __m512i z = _mm512_setzero_si512();                                                    \
                const __m512i s01 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo01, xlo), hi01, xhi);       \
                const __m512i s23 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(z, lo23, xlo), hi23, xhi);       \
                acc[i][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s01), d01, acc[i][0]);                        \
                acc[i][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s23), d23, acc[i][1]);                        \
                corr[i] = _mm_add_ps(corr[i], _mm_mul_ps(d4, _mm_set1_ps(xc[i * G + g])));                   \
            }                                                                                                \
        }                                                                                                    \
        float c[M][Q4_NB]; /* the corrections as scalars, once per block */                                 \
        for (int i = 0; i < M; ++i) _mm_storeu_ps(c[i], corr[i]);                                            \
        for (int j = 0; j < Q4_NB; ++j) {                                                                    \
            const int64_t n = b * Q4_NB + j;                                                                 \
            if (n >= N) break;                                                                               \
            for (int i = 0; i < M; ++i) {                                                                    \
                const __m512 a = acc[i][j / 2];                                                              \
                const __m256 half = j % 2 ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)) \
                                          : _mm512_castps512_ps256(a);                                       \
                y[i * N + n] = q4_output(half, c[i][j], xs[i], bias, n);                                     \
            }                                                                                                \
        }                                                                                                    \
    }

Q4_VNNI_BLOCK(1)
Q4_VNNI_BLOCK(2)
Q4_VNNI_BLOCK(3)
Q4_VNNI_BLOCK(4)

typedef void (*q4_vnni_fn)(const int8_t *, const float *, const float *, int64_t, const uint8_t *, const float *,
                           const float *, int64_t, int64_t, float *);

/* y[M, N] for M in 1..MMAX: the blocks split over the OpenMP threads, one contiguous run each. */
static void q4_linear(const int8_t *xq, const float *xs, const float *xc, int64_t M, int64_t K, const uint8_t *w,
                      const float *d, const float *bias, int64_t N, float *y) {
    static const q4_vnni_fn vnni_blocks[MMAX + 1] = {0, q4_vnni_block_1, q4_vnni_block_2, q4_vnni_block_3,
                                                     q4_vnni_block_4};
    const int64_t B = (N + Q4_NB - 1) / Q4_NB;
    if (kernels_vnni()) {
        const q4_vnni_fn block = vnni_blocks[M];
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < B; ++b) block(xq, xs, xc, K, w, d, bias, N, b, y);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
        switch (M) {
        case 1: q4_block_1_4(xq, xs, xc, K, w, d, bias, N, b, 0, y); break;
        case 2: q4_block_2_4(xq, xs, xc, K, w, d, bias, N, b, 0, y); break;
        case 3: for (int j0 = 0; j0 < Q4_NB; j0 += 2) q4_block_3_2(xq, xs, xc, K, w, d, bias, N, b, j0, y); break;
        default: for (int j0 = 0; j0 < Q4_NB; j0 += 2) q4_block_4_2(xq, xs, xc, K, w, d, bias, N, b, j0, y);
        }
    }
}

/* The whole layer in one call from Python: quantize x [M, K] (M in 1..MMAX, else -2)
 * into scratch and run q4_linear. One foreign call instead of two and no scratch tensors: a draft
 * step makes about a hundred of these calls, and each torch allocation or call costs microseconds.
 * w, d: the blocked layout above. */
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

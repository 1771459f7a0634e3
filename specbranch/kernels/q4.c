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

#define GROUP 64
#define NB 4 /* weight rows per block */
#define MMAX 8 /* most activation rows per call (the caller checks) */


static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* x [M, K] float -> xq [M, K] int8, xs [M] per-row scale, xsum [M, K/GROUP] group sums of xq. */
void q4_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs, int32_t *xsum) {
    const int64_t G = K / GROUP;
    for (int64_t m = 0; m < M; ++m) {
        const float *r = x + m * K;
        float amax = 0.f;
        for (int64_t k = 0; k < K; ++k) amax = fmaxf(amax, fabsf(r[k]));
        const float inv = amax > 0.f ? 127.f / amax : 0.f;
        xs[m] = amax / 127.f;
        for (int64_t g = 0; g < G; ++g) {
            int32_t s = 0;
            for (int64_t k = g * GROUP; k < (g + 1) * GROUP; ++k) {
                const int8_t q = (int8_t)nearbyintf(r[k] * inv);
                xq[m * K + k] = q;
                s += q;
            }
            xsum[m * G + g] = s;
        }
    }
}

void q4_linear(const int8_t *xq, const float *xs, const int32_t *xsum, int64_t M, int64_t K, const uint8_t *w,
               const float *d, const float *bias, int64_t N, float *y) {
    const int64_t G = K / GROUP;
    const int64_t row_bytes = K / 2;
    const int64_t nblocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < nblocks; ++nb) {
        const __m256i ones = _mm256_set1_epi16(1);
        const __m256i low = _mm256_set1_epi8(0x0F);
        const int64_t n0 = nb * NB;
        const int nn = (int)(N - n0 < NB ? N - n0 : NB);
        __m256 acc[MMAX][NB];
        float corr[MMAX][NB];
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < NB; ++j) {
                acc[i][j] = _mm256_setzero_ps();
                corr[i][j] = 0.f;
            }
        for (int64_t g = 0; g < G; ++g) {
            __m256i lo[NB], hi[NB];
            float dj[NB];
            for (int j = 0; j < nn; ++j) {
                const uint8_t *p = w + (n0 + j) * row_bytes + g * 32;
                _mm_prefetch((const char *)(p + 2 * NB * row_bytes), _MM_HINT_T0);
                const __m256i v = _mm256_loadu_si256((const __m256i *)p);
                lo[j] = _mm256_and_si256(v, low);
                hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                dj[j] = d[(n0 + j) * G + g];
            }
            for (int i = 0; i < M; ++i) {
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + i * K + g * GROUP));
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + i * K + g * GROUP + 32));
                const float xg = 8.f * (float)xsum[i * G + g];
                for (int j = 0; j < nn; ++j) {
                    /* unsigned weights x signed activations: pair sums stay in int16 (15*127*2) */
                    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo[j], x0), ones),
                                                       _mm256_madd_epi16(_mm256_maddubs_epi16(hi[j], x1), ones));
                    acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(dj[j]), acc[i][j]);
                    corr[i][j] += dj[j] * xg;
                }
            }
        }
        for (int i = 0; i < M; ++i)
            for (int j = 0; j < nn; ++j) {
                float v = (hsum_ps(acc[i][j]) - corr[i][j]) * xs[i];
                if (bias) v += bias[n0 + j];
                y[i * N + n0 + j] = v;
            }
    }
}

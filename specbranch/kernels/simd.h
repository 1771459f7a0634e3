/* AVX2 helpers shared by the kernels. Each reduces in one fixed order, so a result never depends on which
 * kernel or thread computed it. (The build hashes this header with the .c files: kernels/__init__.py.) */
#ifndef SPECBRANCH_SIMD_H
#define SPECBRANCH_SIMD_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* max(x[0..n)), or -inf for n = 0. Exact in any order (a max does not round); written out because gcc calls
 * libm's fmaxf once per element here, which cost ~1 ms per target token in the int8 kernel's absmax. */
static inline float max_of(const float *x, int64_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + k));
    float top = hmax_ps(m);
    for (; k < n; ++k) top = x[k] > top ? x[k] : top;
    return top;
}

/* max |x[k]| over k < n (0 for n = 0). */
static inline float absmax(const float *x, int64_t n) {
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 m = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
    float top = hmax_ps(m);
    for (; k < n; ++k) top = fabsf(x[k]) > top ? fabsf(x[k]) : top;
    return top;
}

/* 4 bytes at p (any alignment) as one int32: the activation bytes the int8 and int4 kernels broadcast to every
 * 32-bit lane. */
static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* x[0..K) -> q = rint(x * 127 / absmax) (int8), returning the scale absmax / 127 (0 for a zero row): the per-row
 * activation quantization of the int4 and Q4_K kernels. */
static inline float quantize_row_i8(const float *x, int64_t K, int8_t *q) {
    const float amax = absmax(x, K);
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    for (int64_t k = 0; k < K; ++k) q[k] = (int8_t)nearbyintf(x[k] * inv);
    return amax / 127.f;
}

/* A block of 16 output rows' results for one activation row from their float sums f: y[n] = f * xs (+ bias[n]),
 * 8 at a time where all 8 rows exist (rows from n0; N output rows in all). */
static inline void outputs16(const float *f, float xs, const float *bias, int64_t N, int64_t n0, float *yrow) {
    for (int j = 0; j < 16; j += 8) {
        const int64_t n = n0 + j;
        if (n + 8 <= N) {
            __m256 v = _mm256_mul_ps(_mm256_loadu_ps(f + j), _mm256_set1_ps(xs));
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
            _mm256_storeu_ps(yrow + n, v);
        } else {
            for (int l = 0; n + l < N; ++l) yrow[n + l] = bias ? f[j + l] * xs + bias[n + l] : f[j + l] * xs;
        }
    }
}

#endif

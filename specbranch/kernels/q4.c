/* Weight-only int4 linear for small batches (the draft's decode steps): AVX2 code, and AVX-512 VNNI code where
 * the CPU has it (isa.c picks; both give the same bits).
 *
 * Why: decoding is memory-bound, so a draft step costs the bytes it reads. Group-wise int4
 * weights read 0.53125 bytes per weight against int8's 1, and torch 2.13 has no fast int4 CPU
 * kernel for AVX2 (its int4pack kernels measured 13-50x slower than FBGEMM at one row).
 *
 * Weights: u = w_int + 8 in [0, 15], groups of 64 along K with a half-precision scale d[n, g] each (fp16: the
 * scales were 11% of the bytes as float32, 5.9% now; converting them to float is exact). Activations are
 * quantized per row to int8 (absmax / 127), with per-group sums xsum[m, g] so the +8 offset is removed exactly
 * in integers: dot(w_int, x) = dot(u, x) - 8 * sum(x).
 *
 *   y[m, n] = xs[m] * sum_g d[n, g] * (dot(u[n, g], xq[m, g]) - 8 * xsum[m, g])  (+ bias[n])
 *
 * Layout ("blocked", as q8.c's and for the same reasons; models/linear.py block_int4 packs it): blocks of 16
 * output rows; a block's weights are one sequential run of memory, steps of 8 columns, in each step the 16 rows'
 * 4 bytes one after another: w[N/16][K/8][16][4], where byte b of row r's 4 holds u[r, 8s + b] in its low nibble
 * and u[r, 8s + 4 + b] in its high one. So a 32-bit lane of a register holds one output row's 8 columns: the
 * low nibbles multiply the activation's 4 bytes 8s.. broadcast to every lane, the high ones the next 4, and each
 * lane sums its own row, with no horizontal sums at the end. Scales d[N/16][K/64][16] (N padded to whole blocks).
 *
 * Each output element's integer group sum is exact, and its float steps, f += (float)(sum - 8 xsum) * d per group
 * in group order then f * xs (+ bias), are the same whatever the rows, the thread count or the code (AVX2 or
 * VNNI), so a row's result does not depend on any of them.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "lend.h"
#include "simd.h"

#define GROUP 64
#define MMAX 4    /* most activation rows per call (q4_linear_f32 checks) */
#define Q4_NB 16  /* output rows per block */
#define Q4_STEP 64 /* bytes of a block per step of 8 columns: 16 rows x 4 */

int kernels_vnni(void); /* isa.c */

/* x [M, K] float -> xq [M, K] int8, xs [M] per-row scale, xc [M, K/GROUP] 8 x the group sums of xq (the offset
 * correction, subtracted from each group's integer sum). */
static void q4_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs, int32_t *xc) {
    const int64_t G = K / GROUP;
    for (int64_t m = 0; m < M; ++m) {
        xs[m] = quantize_row_i8(x + m * K, K, xq + m * K);
        for (int64_t g = 0; g < G; ++g) {
            int32_t s = 0;
            for (int64_t k = g * GROUP; k < (g + 1) * GROUP; ++k) s += xq[m * K + k];
            xc[m * G + g] = 8 * s;
        }
    }
}

/* Prefetch distances in bytes of a thread's run of blocks (sequential): into L1, and further ahead into L2 (one
 * core streams faster with more lines in flight than its L1 miss buffers hold). The VNNI code prefetches from 2
 * rows on: all the draft's int4 linears, weights from memory, in turn with and without (medians of 7), without
 * at 1 row 1.00x on one thread and 1.04x on two, at 2-3 rows 0.81-0.90x. */
#define Q4_PREFETCH 4096
#define Q4_PREFETCH_L2 32768
#define Q4_VNNI_PREFETCH_ROWS 2

/* 8 fp16 scales as floats (F16C; exact), and 16 for the VNNI code. */
static inline __m256 q4_scales8(const uint16_t *d) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)d)); }
#define Q4_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"
__attribute__((target(Q4_VNNI))) static inline __m512 q4_scales16(const uint16_t *d) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)d));
}

/* AVX2: half h (output rows 8h..8h+7, the step's bytes 32h..32h+31) of block b against M activation rows. Per
 * step and row the low and high nibbles' u8 x s8 products are summed in int16 (at most 2 * 2 * 15 * 127 = 7620)
 * before one widening madd. The accumulators are named variables (one statement a row behind a constant test):
 * see q8.c for why not an array. */
#define Q4_ROW_AVX2(M, i)                                                                                    \
    if ((i) < (M)) {                                                                                         \
        const int8_t *x_ = xq + (i) * K + 8 * s;                                                             \
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x_))),       \
                                             _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x_ + 4))));  \
        a##i = _mm256_add_epi32(a##i, _mm256_madd_epi16(s16, ones));                                         \
    }
#define Q4_GROUP_AVX2(M, i)                                                                                  \
    if ((i) < (M)) {                                                                                         \
        const __m256i t_ = _mm256_sub_epi32(a##i, _mm256_set1_epi32(xc[(i) * G + g]));                      \
        f##i = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t_), dv, f##i);                                            \
    }
#define Q4_OUT_AVX2(M, i)                                                                                    \
    if ((i) < (M)) _mm256_storeu_ps(fs + (i) * Q4_NB + 8 * h, f##i);
#define Q4_BLOCK_AVX2(M)                                                                                     \
    static void q4_block_##M(const int8_t *xq, const float *xs, const int32_t *xc, int64_t K, const uint8_t *w, \
                             const uint16_t *d, const float *bias, int64_t N, int64_t b, float *y) {         \
        const int64_t G = K / GROUP;                                                                         \
        const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);                            \
        float fs[M * Q4_NB];                                                                                 \
        for (int h = 0; h < 2; ++h) {                                                                        \
            const uint8_t *p = w + b * G * (GROUP / 8) * Q4_STEP + 32 * h;                                   \
            __m256 f0, f1, f2, f3;                                                                           \
            f0 = f1 = f2 = f3 = _mm256_setzero_ps();                                                         \
            for (int64_t g = 0; g < G; ++g) {                                                                \
                __m256i a0, a1, a2, a3;                                                                      \
                a0 = a1 = a2 = a3 = _mm256_setzero_si256();                                                  \
                for (int64_t s = g * (GROUP / 8); s < (g + 1) * (GROUP / 8); ++s, p += Q4_STEP) {           \
                    _mm_prefetch((const char *)p + Q4_PREFETCH, _MM_HINT_T0);                                \
                    _mm_prefetch((const char *)p + Q4_PREFETCH_L2, _MM_HINT_T1);                             \
                    const __m256i v = _mm256_loadu_si256((const __m256i *)p);                                \
                    const __m256i lo = _mm256_and_si256(v, low);                                             \
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                       \
                    Q4_ROW_AVX2(M, 0) Q4_ROW_AVX2(M, 1) Q4_ROW_AVX2(M, 2) Q4_ROW_AVX2(M, 3)                  \
                }                                                                                            \
                const __m256 dv = q4_scales8(d + (b * G + g) * Q4_NB + 8 * h);                               \
                Q4_GROUP_AVX2(M, 0) Q4_GROUP_AVX2(M, 1) Q4_GROUP_AVX2(M, 2) Q4_GROUP_AVX2(M, 3)              \
            }                                                                                                \
            Q4_OUT_AVX2(M, 0) Q4_OUT_AVX2(M, 1) Q4_OUT_AVX2(M, 2) Q4_OUT_AVX2(M, 3)                          \
        }                                                                                                    \
        for (int i = 0; i < M; ++i) outputs16(fs + i * Q4_NB, xs[i], bias, N, b * Q4_NB, y + i * N);       \
    }

Q4_BLOCK_AVX2(1)
Q4_BLOCK_AVX2(2)
Q4_BLOCK_AVX2(3)
Q4_BLOCK_AVX2(4)

/* AVX-512 VNNI: the whole block, a step's 64 bytes one register: two dpbusd a row (low nibbles, high nibbles),
 * each into its own accumulator, and steps alternating between two pairs, so four independent chains a row
 * (one alone would wait on dpbusd's latency at one row). The same integer group sums as the AVX2 code, the same
 * float steps per lane. */
#define Q4_ROW_VNNI(M, i, A, B)                                                                              \
    if ((i) < (M)) {                                                                                         \
        const int8_t *x_ = xq + (i) * K + 8 * s;                                                             \
        a##i##A = _mm512_dpbusd_epi32(a##i##A, lo, _mm512_set1_epi32(load_i32(x_)));                           \
        a##i##B = _mm512_dpbusd_epi32(a##i##B, hi, _mm512_set1_epi32(load_i32(x_ + 4)));                       \
    }
#define Q4_GROUP_VNNI(M, i)                                                                                  \
    if ((i) < (M)) {                                                                                         \
        const __m512i t_ = _mm512_sub_epi32(_mm512_add_epi32(_mm512_add_epi32(a##i##0, a##i##1),             \
                                                             _mm512_add_epi32(a##i##2, a##i##3)),            \
                                            _mm512_set1_epi32(xc[(i) * G + g]));                            \
        f##i = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t_), dv, f##i);                                            \
        a##i##0 = a##i##1 = a##i##2 = a##i##3 = _mm512_setzero_si512();                                      \
    }
#define Q4_OUT_VNNI(M, i)                                                                                    \
    if ((i) < (M)) _mm512_storeu_ps(fs + (i) * Q4_NB, f##i);
#define Q4_STEP_VNNI(M, A, B)                                                                                \
    {                                                                                                        \
        if ((M) >= Q4_VNNI_PREFETCH_ROWS) {                                                                  \
            _mm_prefetch((const char *)p + Q4_PREFETCH, _MM_HINT_T0);                                        \
            _mm_prefetch((const char *)p + Q4_PREFETCH_L2, _MM_HINT_T1);                                     \
        }                                                                                                    \
        const __m512i v = _mm512_loadu_si512((const void *)p);                                               \
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);    \
        Q4_ROW_VNNI(M, 0, A, B) Q4_ROW_VNNI(M, 1, A, B) Q4_ROW_VNNI(M, 2, A, B) Q4_ROW_VNNI(M, 3, A, B)      \
        p += Q4_STEP, ++s;                                                                                   \
    }
#define Q4_BLOCK_VNNI(M)                                                                                     \
    __attribute__((target(Q4_VNNI))) static void q4_vnni_block_##M(                                          \
        const int8_t *xq, const float *xs, const int32_t *xc, int64_t K, const uint8_t *w, const uint16_t *d, \
        const float *bias, int64_t N, int64_t b, float *y) {                                                 \
        const int64_t G = K / GROUP;                                                                         \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                          \
        const uint8_t *p = w + b * G * (GROUP / 8) * Q4_STEP;                                                \
        __m512i a00, a01, a02, a03, a10, a11, a12, a13, a20, a21, a22, a23, a30, a31, a32, a33;              \
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = _mm512_setzero_si512();                              \
        a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = _mm512_setzero_si512();                              \
        __m512 f0, f1, f2, f3;                                                                               \
        f0 = f1 = f2 = f3 = _mm512_setzero_ps();                                                             \
        int64_t s = 0;                                                                                       \
        for (int64_t g = 0; g < G; ++g) {                                                                    \
            for (int k = 0; k < GROUP / 16; ++k) {                                                           \
                Q4_STEP_VNNI(M, 0, 1)                                                                        \
                Q4_STEP_VNNI(M, 2, 3)                                                                        \
            }                                                                                                \
            const __m512 dv = q4_scales16(d + (b * G + g) * Q4_NB);                                          \
            Q4_GROUP_VNNI(M, 0) Q4_GROUP_VNNI(M, 1) Q4_GROUP_VNNI(M, 2) Q4_GROUP_VNNI(M, 3)                  \
        }                                                                                                    \
        float fs[M * Q4_NB];                                                                                 \
        Q4_OUT_VNNI(M, 0) Q4_OUT_VNNI(M, 1) Q4_OUT_VNNI(M, 2) Q4_OUT_VNNI(M, 3)                              \
        for (int i = 0; i < M; ++i) outputs16(fs + i * Q4_NB, xs[i], bias, N, b * Q4_NB, y + i * N);       \
    }

Q4_BLOCK_VNNI(1)
Q4_BLOCK_VNNI(2)
Q4_BLOCK_VNNI(3)
Q4_BLOCK_VNNI(4)

/* AVX-512 VNNI at one row: four blocks a quarter of the matrix apart (b, b + h, b + 2h, b + 3h), in lockstep.
 * Why: one row's step is memory-bound and one core reading one sequential stream stays well under the rate it
 * reaches over several: a byte sum over the draft's linears on one thread read 22-24 GB/s as one stream and
 * 28-29 as four, and this code measured 1.28-1.31x the one-block code on one thread (27 against 21 GB/s), 1.07x
 * on two. Streams a few blocks apart gained nothing (chunks of 8 blocks: 0.98x), hence the quarters. Each
 * block's integer group sums are exact and its float steps the one-block code's (two chains a block instead
 * of four: the four blocks give dpbusd its independent work), so the bits are the same. */
#define Q4_QUAD_ACC(X)                                                                                       \
    X##0 = _mm512_dpbusd_epi32(X##0, _mm512_and_si512(v##X, low), xl);                                       \
    X##1 = _mm512_dpbusd_epi32(X##1, _mm512_and_si512(_mm512_srli_epi16(v##X, 4), low), xh);
#define Q4_QUAD_GROUP(X, B)                                                                                  \
    f##X = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(X##0, X##1), xc_)),          \
                           q4_scales16(d + ((B) * G + g) * Q4_NB), f##X);                                    \
    X##0 = X##1 = _mm512_setzero_si512();
#define Q4_QUAD_OUT(X, B)                                                                                    \
    _mm512_storeu_ps(fs, f##X);                                                                              \
    outputs16(fs, xs[0], bias, N, (B) * Q4_NB, y);
__attribute__((target(Q4_VNNI))) static void q4_vnni_quad_1(const int8_t *xq, const float *xs, const int32_t *xc,
                                                           int64_t K, const uint8_t *w, const uint16_t *d,
                                                           const float *bias, int64_t N, int64_t b, int64_t h,
                                                           float *y) {
    const int64_t G = K / GROUP, bytes = G * (GROUP / 8) * Q4_STEP; /* one block's weights */
    const __m512i low = _mm512_set1_epi8(0x0F);
    const uint8_t *pa = w + b * bytes, *pb = pa + h * bytes, *pc = pb + h * bytes, *pe = pc + h * bytes;
    __m512i a0, a1, b0, b1, c0, c1, e0, e1;
    a0 = a1 = b0 = b1 = c0 = c1 = e0 = e1 = _mm512_setzero_si512();
    __m512 fa, fb, fc, fe;
    fa = fb = fc = fe = _mm512_setzero_ps();
    int64_t s = 0;
    for (int64_t g = 0; g < G; ++g) {
        for (int k = 0; k < GROUP / 8; ++k, ++s, pa += Q4_STEP, pb += Q4_STEP, pc += Q4_STEP, pe += Q4_STEP) {
            const __m512i va = _mm512_loadu_si512(pa), vb = _mm512_loadu_si512(pb);
            const __m512i vc = _mm512_loadu_si512(pc), ve = _mm512_loadu_si512(pe);
            const __m512i xl = _mm512_set1_epi32(load_i32(xq + 8 * s));
            const __m512i xh = _mm512_set1_epi32(load_i32(xq + 8 * s + 4));
            Q4_QUAD_ACC(a) Q4_QUAD_ACC(b) Q4_QUAD_ACC(c) Q4_QUAD_ACC(e)
        }
        const __m512i xc_ = _mm512_set1_epi32(xc[g]);
        Q4_QUAD_GROUP(a, b) Q4_QUAD_GROUP(b, b + h) Q4_QUAD_GROUP(c, b + 2 * h) Q4_QUAD_GROUP(e, b + 3 * h)
    }
    float fs[Q4_NB];
    Q4_QUAD_OUT(a, b) Q4_QUAD_OUT(b, b + h) Q4_QUAD_OUT(c, b + 2 * h) Q4_QUAD_OUT(e, b + 3 * h)
}

typedef void (*q4_block_fn)(const int8_t *, const float *, const int32_t *, int64_t, const uint8_t *,
                            const uint16_t *, const float *, int64_t, int64_t, float *);

/* One call's work items, for OpenMP and lend_for (lend.c: the target's idle core may take some of them). An item
 * is one block, or with the quad code the four blocks i, i + quads, i + 2 quads, i + 3 quads for i < quads and
 * then the blocks left over one by one. */
typedef struct {
    q4_block_fn block;
    const int8_t *xq;
    const float *xs;
    const int32_t *xc;
    int64_t K;
    const uint8_t *w;
    const uint16_t *d; /* fp16 */
    const float *bias;
    int64_t N;
    float *y;
    int64_t quads; /* items that are quads (0: every item is one block) */
} q4_job;

static void q4_run(void *ctx, int64_t i0, int64_t i1) {
    const q4_job *j = ctx;
    for (int64_t i = i0; i < i1; ++i) {
        if (i < j->quads)
            q4_vnni_quad_1(j->xq, j->xs, j->xc, j->K, j->w, j->d, j->bias, j->N, i, j->quads, j->y);
        else /* after the quads' 4 * quads blocks */
            j->block(j->xq, j->xs, j->xc, j->K, j->w, j->d, j->bias, j->N, i + 3 * j->quads, j->y);
    }
}

/* Items per chunk handed out under lending: about 32 KB of weights (a few microseconds a chunk; at least one
 * item, 57 KB for a quad of K = 896): a draft linear is 0.2-3 MB, so the split stays even, and claiming costs
 * little. */
#define Q4_LEND_BYTES 32768

/* y[M, N] for M in 1..MMAX: the work items split over the OpenMP threads, one contiguous run each, or handed out
 * in chunks when the target lends its core while it waits for the draft (lend.c). A block's rows are computed by
 * one thread either way, so the bits do not depend on who computed them. */
static void q4_linear(const int8_t *xq, const float *xs, const int32_t *xc, int64_t M, int64_t K, const uint8_t *w,
                      const uint16_t *d, const float *bias, int64_t N, float *y) {
    static const q4_block_fn vnni_blocks[MMAX + 1] = {0, q4_vnni_block_1, q4_vnni_block_2, q4_vnni_block_3,
                                                      q4_vnni_block_4};
    static const q4_block_fn avx2_blocks[MMAX + 1] = {0, q4_block_1, q4_block_2, q4_block_3, q4_block_4};
    const int vnni = kernels_vnni();
    const int64_t B = (N + Q4_NB - 1) / Q4_NB, quads = vnni && M == 1 ? B / 4 : 0, items = B - 3 * quads;
    q4_job job = {(vnni ? vnni_blocks : avx2_blocks)[M], xq, xs, xc, K, w, d, bias, N, y, quads};
    const int64_t item_bytes = (quads ? 4 : 1) * Q4_NB * (K / 2);
    if (lend_for(items, Q4_LEND_BYTES / item_bytes + 1, q4_run, &job)) return;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < items; ++i) q4_run(&job, i, i + 1);
}

/* The whole layer in one call from Python: quantize x [M, K] (M in 1..MMAX, else -2)
 * into scratch and run q4_linear. One foreign call instead of two and no scratch tensors: a draft
 * step makes about a hundred of these calls, and each torch allocation or call costs microseconds.
 * w, d: the blocked layout above. */
int q4_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *d, const float *bias,
                  int64_t N, float *y) {
    if (M < 1 || M > MMAX) return -2; /* the kernels exist for 1..MMAX rows only */
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc((size_t)M * sizeof(float));
    int32_t *xc = malloc((size_t)(M * (K / GROUP)) * sizeof(int32_t));
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

/* int8 linear for decode steps on AVX2 CPUs, bit-identical to FBGEMM's dynamic int8 linear.
 *
 * Why: a decode step of the target reads every weight once, so it runs at the speed weights stream
 * from memory. FBGEMM's kernel streams them at about 13 GB/s on our 2-core machine; a kernel whose
 * weights lie in the order it reads them (below) streams at about 18 GB/s, close to a plain sum
 * over the same bytes. It also does the whole layer in one call, without the dozen torch ops
 * Int8Linear wraps around FBGEMM.
 *
 * Why bit-identical: Int8Linear's batch-invariant scheme (models/linear.py) divides each row by
 * its absmax and pins FBGEMM's activation range to [-1, 1]: scale a = 2/127 (reduce_range), zero
 * point 64, quantized values not clipped at 127. FBGEMM's result is then
 *
 *   y[m, n] = ((float)raw[m, n] * (a * w_scale[n])) * s[m] + bias[n],
 *   raw[m, n] = sum_k q[m, k] * w[n, k],   q[m, k] = rint(fma(x[m, k] / s[m], 1 / a, 64)) - 64 in [-64, 64]
 *
 * and this kernel computes exactly that, so prompts (many rows, FBGEMM) and decode steps (this
 * kernel) run one and the same model; tests compare the two bit for bit.
 *
 * Integer part: activations are stored as u = q + 64 in [0, 128] (u8), so one maddubs multiplies
 * u8 by the s8 weights (a pair of products is at most 2 * 128 * 127 = 32512 < 2^15: no saturation),
 * and raw = sum u * w - 64 * sum w. Integer sums are exact in any order, so a row's result does not
 * depend on the other rows, the blocking or the thread count.
 *
 * Two codes, chosen at run time (isa.c): AVX2, the maddubs above, for 1-2 rows (beyond that its
 * multiplies, not memory, are the limit, and FBGEMM is faster), and AVX-512 VNNI for 1-8 rows: one
 * dpbusd per 64 products instead of three instructions per 32, so up to 8 rows (the target's
 * verification of a drafted block) still stream the weights at memory speed (1-2 rows in 256-bit registers,
 * whose loads stream faster on Zen 4; 3-8 in 512-bit ones). Both codes give the same bits.
 * Larger calls (prompts, while a core is lent: lend.c) go over each block's weights in groups of that many rows.
 *
 * Weight layout ("blocked"): blocks of 32 output rows; inside a block, for each group of 4 columns, the
 * 32 rows' 4 bytes one after another: w_blk[N/32][K/4][32][4] (zero-padded to whole blocks and
 * groups). A block's weights are then one sequential run of memory: the row-major layout read a few
 * rows at a time is that many short streams (1.5 KB each for the 1.5B target), which the hardware
 * prefetcher follows badly (a simulated target step read 12.9 GB/s that way against 18.4 blocked). And
 * a 32-bit lane of a register holds one output row's 4 columns, so the activation's 4 bytes broadcast
 * to every lane make one multiply-add step for 8 (256-bit) or 16 (512-bit) output rows, each lane summing
 * its own row: no horizontal sums at the end of a block. An earlier layout (blocks of 4 rows, 32 columns
 * of a row per register half) needed 4 horizontal sums per row and block; this one, with the accumulators
 * kept in registers (see the block codes), measured over all the target's int8 linears, weights from memory,
 * in turn with the old code (medians of 7): one thread 1.36-1.46x at 8 rows, 1.07x at 3, level at 4-6,
 * 1.16x at 2, 1.02x at 1; two threads 1.20x at 8 rows, 1.17x at 4, 1.05x at 2, 1.03x at 1.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lend.h"
#include "simd.h"

#define Q8_MMAX 2       /* most activation rows per pass over a block's weights on AVX2 */
#define Q8_VNNI_MMAX 8  /* ... and on AVX-512 VNNI, per pass over a block's weights */
#define Q8_PASS_ROWS 64 /* rows per pass over the weights (larger calls make several passes); a block's weights
                          * are read from memory once per pass and from L1/L2 for each group of up to 2/8 rows */
#define Q8_ZERO 64 /* activation offset: u = q + 64 */
#define Q8_NB 32   /* output rows per block */
#define Q8_KG 4    /* columns per group: the 4 products one 32-bit lane sums */
/* VNNI code for 7-8 rows: prefetch the weights 8 KB ahead into L1 and 32 KB ahead into L2. At 8 rows one core computes
 * for about as long as the weights take to stream, and without prefetching the two did not overlap: a
 * simulated target step (the real shapes, 1.55 GB) took 206-216 ms at 8 rows on one core, 146-170 ms with
 * 4-8 KB of L1 lead. That still left one core at 8 rows streaming about 14 GB/s against 24 at 1 row: the
 * core's L1 miss buffers were the limit (some 24 lines in flight). The L2 prefetch far ahead keeps more lines
 * in flight: single int8 linears of the target's shapes, weights from memory, one core, 8 rows, Zen 4
 * (medians of 7, two alternations): 1536x17920 1.96-2.22 -> 1.27 ms, 8960x1536 1.31-1.53 -> 0.60-0.61 ms,
 * 1536x2048 0.28-0.39 -> 0.18 ms; at 1 row 1.27-1.41 -> 1.16-1.17 ms for the first.
 * The 1-2 row codes (256-bit, below) have no software prefetch at all: there a core computes for far less time
 * than the weights take to stream, and the hardware prefetcher alone kept more lines in flight. All the
 * target's int8 linears at 1 row, weights from memory, Zen 4, each variant built from this file and run in
 * turn (medians of 5, two runs): one thread 17.7/20.6 GB/s with both prefetches, 25.5/26.0 with none (a plain
 * sum over the same weights: 21.8/28.4); two threads 28.6/28.7 -> 30.9/31.0. At 2 rows, one thread 19.6 ->
 * 22.1; at 4 rows level (19.4/19.2); at 8 rows none fell to 9.1-10.9 GB/s against 16.3-21.4. With the present layout
 * (32-row blocks, below), 3-6 rows too stream faster without: all the target's linears in turn with and without
 * (medians of 9), one thread 1.13-1.29x, two threads 1.16x at 3 rows, 1.32x at 4, level at 5-6; at 7 and 8 rows
 * they still pay (without: 0.91x and 0.73-0.87x). */
#define Q8_PREFETCH 8192
#define Q8_PREFETCH_L2 32768
#define Q8_PREFETCH_ROWS 7

static inline int64_t q8_blocks(int64_t N) { return (N + Q8_NB - 1) / Q8_NB; }
static inline int64_t q8_groups(int64_t K) { return (K + Q8_KG - 1) / Q8_KG; }

/* Rows of the blocked copy (N rounded up to whole blocks): the length of q8_pack's wsum. */
int64_t q8_padded_rows(int64_t N) { return q8_blocks(N) * Q8_NB; }

/* Bytes of the blocked copy of an [N, K] weight. */
int64_t q8_packed_size(int64_t N, int64_t K) { return q8_padded_rows(N) * q8_groups(K) * Q8_KG; }

/* w [N, K] int8 (row stride ldw) -> out (q8_packed_size bytes, blocked layout) and wsum [q8_padded_rows]
 * (row sums; 0 for padding rows). */
void q8_pack(const int8_t *w, int64_t N, int64_t K, int64_t ldw, int8_t *out, int32_t *wsum) {
    const int64_t G = q8_groups(K);
    memset(out, 0, (size_t)q8_packed_size(N, K));
    memset(wsum, 0, (size_t)q8_padded_rows(N) * sizeof(int32_t));
    for (int64_t n = 0; n < N; ++n) {
        const int8_t *row = w + n * ldw;
        int8_t *dst = out + (n / Q8_NB) * Q8_NB * G * Q8_KG + (n % Q8_NB) * Q8_KG; /* group 0 of row n */
        for (int64_t g = 0; g < G; ++g) {
            const int64_t len = K - g * Q8_KG < Q8_KG ? K - g * Q8_KG : Q8_KG;
            memcpy(dst + g * Q8_NB * Q8_KG, row + g * Q8_KG, (size_t)len);
        }
        int32_t t = 0;
        for (int64_t k = 0; k < K; ++k) t += row[k];
        wsum[n] = t;
    }
}

/* x [M, K] float -> u [M, Kp] (u8, padded with the offset, i.e. q = 0), s [M] row absmax. The same
 * float operations as Int8Linear + FBGEMM: s = max(absmax, 1e-30); u = rint(fma(x / s, inv, 64)). The fused
 * multiply-add matters: rint(x / s * inv) + 64 rounds differently within an ulp of a tie, and on the real
 * target that flipped one activation in some decode steps (the tests hold values there). */
static void q8_quantize_rows(const float *x, int64_t M, int64_t K, int64_t Kp, float inv, uint8_t *u, float *s) {
    for (int64_t m = 0; m < M; ++m) {
        const float *r = x + m * K;
        const float amax = absmax(r, K);
        const float sm = amax > 1e-30f ? amax : 1e-30f;
        s[m] = sm;
        for (int64_t k = 0; k < K; ++k) {
            const float xn = r[k] / sm;
            u[m * Kp + k] = (uint8_t)nearbyintf(fmaf(xn, inv, (float)Q8_ZERO)); /* one rounding, as FBGEMM */
        }
        for (int64_t k = K; k < Kp; ++k) u[m * Kp + k] = Q8_ZERO;
    }
}

/* FBGEMM's output step for one element, float op for float op: ((float)raw * mult) * s + bias. */
static inline float q8_output(int32_t dot, int32_t wsum, float mult, float s, const float *bias, int64_t n) {
    const float v = ((float)(dot - Q8_ZERO * wsum) * mult) * s;
    return bias ? v + bias[n] : v;
}

/* q8_output for rows n0..n0+7 of one activation row (dot: their integer sums), as a vector where all 8 rows
 * exist; the same float operations in the same order, so the same bits. A last block's rows past N are padding. */
static inline void q8_output8(__m256i dot, const int32_t *wsum, const float *mult, float s, const float *bias,
                              int64_t N, int64_t n0, float *yrow) {
    if (n0 + 8 <= N) {
        const __m256i w = _mm256_mullo_epi32(_mm256_loadu_si256((const __m256i *)(wsum + n0)), _mm256_set1_epi32(Q8_ZERO));
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(dot, w)), _mm256_loadu_ps(mult + n0));
        v = _mm256_mul_ps(v, _mm256_set1_ps(s));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n0));
        _mm256_storeu_ps(yrow + n0, v);
        return;
    }
    int32_t d[8];
    _mm256_storeu_si256((__m256i *)d, dot);
    for (int64_t l = 0; n0 + l < N; ++l) yrow[n0 + l] = q8_output(d[l], wsum[n0 + l], mult[n0 + l], s, bias, n0 + l);
}

/* The outputs of block b for M activation rows from their integer sums dots [M][32] (every code's last step). */
static void q8_outputs(const int32_t *dots, int M, const float *s, const int32_t *wsum, const float *mult,
                       const float *bias, int64_t N, int64_t b, float *y) {
    for (int i = 0; i < M; ++i)
        for (int j = 0; j < Q8_NB; j += 8)
            q8_output8(_mm256_loadu_si256((const __m256i *)(dots + i * Q8_NB + j)), wsum, mult, s[i], bias, N,
                       b * Q8_NB + j, y + i * N);
}

/* Activation row i's group c (4 u8) in every 32-bit lane. */
#define Q8_X32(i) load_i32(u + (i) * Kp + c * Q8_KG)

/* acc + the 8 lane sums of xv's u8 times wv's s8 (4 products a lane): on AVX2 maddubs to 16 bits, madd to 32, add;
 * on AVX-512 VNNI one dpbusd. The same integers either way. */
#define Q8_DOT_AVX2(acc, xv, wv) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv), _mm256_set1_epi16(1)))
#define Q8_DOT_VNNI(acc, xv, wv) _mm256_dpbusd_epi32(acc, xv, wv)
#define Q8_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

/* The block codes keep their accumulators in named variables (a<row><part>), one statement per row guarded by a
 * constant test, not in an array: over an array of vectors living across the loop, gcc 12 copied every
 * accumulator into another register and back around each dpbusd (two extra moves per multiply). */

/* One block of 32 output rows against M (1-2) activation rows in 256-bit registers, named NAME_M, with the DOT step
 * above and the function attributes ATTR. A group's 128 bytes are 4 registers of 8 rows each, and a lane of
 * a<i><j> sums row 8j + lane's products for activation row i: the results need no horizontal sums. */
#define Q8_ROW256(DOT, M, i)                                                                                 \
    if ((i) < (M)) {                                                                                         \
        const __m256i xv = _mm256_set1_epi32(Q8_X32(i));                                                     \
        a##i##0 = DOT(a##i##0, xv, w0), a##i##1 = DOT(a##i##1, xv, w1);                                      \
        a##i##2 = DOT(a##i##2, xv, w2), a##i##3 = DOT(a##i##3, xv, w3);                                      \
    }
#define Q8_SAVE256(M, i)                                                                                     \
    if ((i) < (M)) {                                                                                         \
        __m256i *d_ = (__m256i *)(dots + (i) * Q8_NB);                                                       \
        _mm256_storeu_si256(d_, a##i##0), _mm256_storeu_si256(d_ + 1, a##i##1);                              \
        _mm256_storeu_si256(d_ + 2, a##i##2), _mm256_storeu_si256(d_ + 3, a##i##3);                          \
    }
#define Q8_BLOCK256(NAME, ATTR, DOT, M)                                                                      \
    ATTR static void NAME##_##M(const uint8_t *u, const float *s, int64_t C, const int8_t *wb,               \
                                const int32_t *wsum, const float *mult, const float *bias, int64_t N, int64_t b, \
                                float *y) {                                                                  \
        const int64_t Kp = C * Q8_KG;                                                                        \
        const int8_t *p = wb + b * Q8_NB * Kp;                                                               \
        __m256i a00, a01, a02, a03, a10, a11, a12, a13;                                                      \
        a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = _mm256_setzero_si256();                              \
        for (int64_t c = 0; c < C; ++c, p += Q8_NB * Q8_KG) {                                                \
            const __m256i w0 = _mm256_loadu_si256((const __m256i *)p);                                       \
            const __m256i w1 = _mm256_loadu_si256((const __m256i *)(p + 32));                                \
            const __m256i w2 = _mm256_loadu_si256((const __m256i *)(p + 64));                                \
            const __m256i w3 = _mm256_loadu_si256((const __m256i *)(p + 96));                                \
            Q8_ROW256(DOT, M, 0) Q8_ROW256(DOT, M, 1)                                                        \
        }                                                                                                    \
        int32_t dots[M * Q8_NB];                                                                             \
        Q8_SAVE256(M, 0) Q8_SAVE256(M, 1)                                                                    \
        q8_outputs(dots, M, s, wsum, mult, bias, N, b, y);                                                   \
    }

Q8_BLOCK256(q8_block, , Q8_DOT_AVX2, 1)
Q8_BLOCK256(q8_block, , Q8_DOT_AVX2, 2)

/* The same block on AVX-512 VNNI in 256-bit registers, for 1-2 rows: one dpbusd per row and 8 weight rows. Below
 * 3 rows a step does little but load, and on Zen 4 256-bit loads stream faster than 512-bit ones:
 * sums over one 1 GB buffer on two threads read 42.9 against 39.2 GB/s (29.4 against 27.2 when the VM's bus share
 * is low; torch's sum 43.5 and 29.7). All the target's int8 linears at 1 row, in turn with the 512-bit code
 * (medians, rounds split by the bus share): two threads 1.05-1.07x, one thread 1.05-1.14x; at 2 rows level
 * (0.99-1.02x). The 512-bit code stays for 3-8 rows, where the multiplies count. */
Q8_BLOCK256(q8_vnni256_block, __attribute__((target(Q8_VNNI))), Q8_DOT_VNNI, 1)
Q8_BLOCK256(q8_vnni256_block, __attribute__((target(Q8_VNNI))), Q8_DOT_VNNI, 2)

/* The same block on AVX-512 VNNI in 512-bit registers, for 3-8 rows: a group's 128 bytes are 2 registers of 16
 * rows, and one dpbusd serves 16 output rows. 2 * M accumulators: 16 of 32 registers at M = 8. */
#define Q8_ROW512(M, i)                                                                                      \
    if ((i) < (M)) {                                                                                         \
        const __m512i xv = _mm512_set1_epi32(Q8_X32(i));                                                     \
        a##i##0 = _mm512_dpbusd_epi32(a##i##0, xv, w0), a##i##1 = _mm512_dpbusd_epi32(a##i##1, xv, w1);      \
    }
#define Q8_SAVE512(M, i)                                                                                     \
    if ((i) < (M)) {                                                                                         \
        _mm512_storeu_si512(dots + (i) * Q8_NB, a##i##0);                                                    \
        _mm512_storeu_si512(dots + (i) * Q8_NB + 16, a##i##1);                                               \
    }
#define Q8_VNNI_BLOCK(M)                                                                                     \
    __attribute__((target(Q8_VNNI))) static void q8_vnni_block_##M(                                          \
        const uint8_t *u, const float *s, int64_t C, const int8_t *wb, const int32_t *wsum, const float *mult, \
        const float *bias, int64_t N, int64_t b, float *y) {                                                 \
        const int64_t Kp = C * Q8_KG;                                                                        \
        const int8_t *p = wb + b * Q8_NB * Kp;                                                               \
        __m512i a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51, a60, a61, a70, a71;              \
        a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = _mm512_setzero_si512();                              \
        a40 = a41 = a50 = a51 = a60 = a61 = a70 = a71 = _mm512_setzero_si512();                              \
        for (int64_t c = 0; c < C; ++c, p += Q8_NB * Q8_KG) {                                                \
            if ((M) >= Q8_PREFETCH_ROWS) {                                                                   \
                _mm_prefetch((const char *)p + Q8_PREFETCH, _MM_HINT_T0);                                    \
                _mm_prefetch((const char *)p + Q8_PREFETCH + 64, _MM_HINT_T0);                               \
                _mm_prefetch((const char *)p + Q8_PREFETCH_L2, _MM_HINT_T1);                                 \
                _mm_prefetch((const char *)p + Q8_PREFETCH_L2 + 64, _MM_HINT_T1);                            \
            }                                                                                                \
            const __m512i w0 = _mm512_loadu_si512((const void *)p);                                          \
            const __m512i w1 = _mm512_loadu_si512((const void *)(p + 64));                                   \
            Q8_ROW512(M, 0) Q8_ROW512(M, 1) Q8_ROW512(M, 2) Q8_ROW512(M, 3)                                  \
            Q8_ROW512(M, 4) Q8_ROW512(M, 5) Q8_ROW512(M, 6) Q8_ROW512(M, 7)                                  \
        }                                                                                                    \
        int32_t dots[M * Q8_NB];                                                                             \
        Q8_SAVE512(M, 0) Q8_SAVE512(M, 1) Q8_SAVE512(M, 2) Q8_SAVE512(M, 3)                                  \
        Q8_SAVE512(M, 4) Q8_SAVE512(M, 5) Q8_SAVE512(M, 6) Q8_SAVE512(M, 7)                                  \
        q8_outputs(dots, M, s, wsum, mult, bias, N, b, y);                                                   \
    }

Q8_VNNI_BLOCK(3)
Q8_VNNI_BLOCK(4)
Q8_VNNI_BLOCK(5)
Q8_VNNI_BLOCK(6)
Q8_VNNI_BLOCK(7)
Q8_VNNI_BLOCK(8)

typedef void (*q8_block_fn)(const uint8_t *, const float *, int64_t, const int8_t *, const int32_t *, const float *,
                            const float *, int64_t, int64_t, float *);

static const q8_block_fn q8_avx2_blocks[Q8_MMAX + 1] = {0, q8_block_1, q8_block_2};
static const q8_block_fn q8_vnni_blocks[Q8_VNNI_MMAX + 1] = {
    0, q8_vnni256_block_1, q8_vnni256_block_2, q8_vnni_block_3, q8_vnni_block_4,
    q8_vnni_block_5, q8_vnni_block_6, q8_vnni_block_7, q8_vnni_block_8};

int kernels_vnni(void); /* isa.c */

/* Most activation rows the code in use computes against one read of a block's weights. Calls with more rows
 * (prompts) are right too, but FBGEMM is faster at those except on a lent core (linear.py chooses). */
int q8_max_rows(void) { return kernels_vnni() ? Q8_VNNI_MMAX : Q8_MMAX; }

/* One call's blocks, for lend_for (lend.c): the draft worker's idle core may take some of them. */
typedef struct {
    const q8_block_fn *blocks; /* by row count */
    int64_t M, group;          /* rows; rows per pass over a block's weights (the block code's most) */
    const uint8_t *u;
    const float *s, *mult, *bias;
    const int8_t *wb;
    const int32_t *wsum;
    int64_t C, N; /* column groups, output rows */
    float *y;
} q8_job;

/* Blocks b0..b1-1 for all M rows: a block's weights (48-280 KB for the 1.5B target) are read from memory once and
 * from L2 for every further group of rows. */
static void q8_run(void *ctx, int64_t b0, int64_t b1) {
    const q8_job *j = ctx;
    const int64_t Kp = j->C * Q8_KG;
    for (int64_t b = b0; b < b1; ++b)
        for (int64_t m = 0; m < j->M; m += j->group) {
            const int64_t rows = j->M - m < j->group ? j->M - m : j->group;
            j->blocks[rows](j->u + m * Kp, j->s + m, j->C, j->wb, j->wsum, j->mult, j->bias, j->N, b, j->y + m * j->N);
        }
}

/* Blocks per chunk handed out under lending: about 64 KB of weights or one block (tens of microseconds), small
 * enough that the target seldom waits for the helper's last chunk, large enough that claiming costs little. */
#define Q8_LEND_BYTES 65536

/* y [M, N] = the layer applied to x [M, K] (M >= 1, else -2; -1 if out of memory). wb, wsum: from q8_pack;
 * mult[n] = a * w_scale[n]; inv = 1 / a. Each pass of up to Q8_PASS_ROWS rows splits the blocks over the
 * OpenMP threads, one contiguous run each, or hands them out in chunks when a core is lent (lend.c). */
int q8_linear_f32(const float *x, int64_t M, int64_t K, const int8_t *wb, const int32_t *wsum, const float *mult,
                  float inv, const float *bias, int64_t N, float *y) {
    if (M < 1) return -2;
    const int64_t C = q8_groups(K), Kp = C * Q8_KG;
    uint8_t *u = malloc((size_t)(M * Kp));
    float *s = malloc((size_t)M * sizeof(float));
    if (!u || !s) {
        free(u);
        free(s);
        return -1;
    }
    q8_quantize_rows(x, M, K, Kp, inv, u, s);
    const int vnni = kernels_vnni();
    const int64_t B = q8_blocks(N);
    for (int64_t m = 0; m < M; m += Q8_PASS_ROWS) {
        q8_job job = {vnni ? q8_vnni_blocks : q8_avx2_blocks, M - m < Q8_PASS_ROWS ? M - m : Q8_PASS_ROWS,
                      vnni ? Q8_VNNI_MMAX : Q8_MMAX, u + m * Kp, s + m, mult, bias, wb, wsum, C, N, y + m * N};
        if (!lend_for(B, Q8_LEND_BYTES / (Q8_NB * Kp) + 1, q8_run, &job)) {
#pragma omp parallel for schedule(static)
            for (int64_t b = 0; b < B; ++b) q8_run(&job, b, b + 1);
        }
    }
    free(u);
    free(s);
    return 0;
}

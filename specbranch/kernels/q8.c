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
 * Weight layout ("blocked"): blocks of 4 output rows; inside a block, for each 32-column chunk, the
 * 4 rows' 32 bytes one after another: w_blk[N/4][K/32][4][32] (zero-padded to whole blocks and
 * chunks). A block's weights are then one sequential run of memory. The row-major layout read 4
 * rows at a time is 4 short streams (1.5 KB each for the 1.5B target), which the hardware
 * prefetcher follows badly: a simulated target step read 12.9 GB/s that way against 18.4 blocked.
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
                          * are read from memory once per pass and from L1 for each group of up to 2/8 rows */
#define Q8_ZERO 64 /* activation offset: u = q + 64 */
#define Q8_NB 4    /* output rows per block */
#define Q8_KC 32   /* columns per chunk */
/* VNNI code for 3-8 rows: prefetch the weights 8 KB ahead into L1 and 32 KB ahead into L2. At 8 rows one core computes
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
 * 22.1; at 4 rows level (19.4/19.2); at 8 rows none fell to 9.1-10.9 GB/s against 16.3-21.4. */
#define Q8_PREFETCH 8192
#define Q8_PREFETCH_L2 32768

static inline int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

static inline int64_t q8_blocks(int64_t N) { return (N + Q8_NB - 1) / Q8_NB; }
static inline int64_t q8_chunks(int64_t K) { return (K + Q8_KC - 1) / Q8_KC; }

/* Rows of the blocked copy (N rounded up to whole blocks): the length of q8_pack's wsum. */
int64_t q8_padded_rows(int64_t N) { return q8_blocks(N) * Q8_NB; }

/* Bytes of the blocked copy of an [N, K] weight. */
int64_t q8_packed_size(int64_t N, int64_t K) { return q8_padded_rows(N) * q8_chunks(K) * Q8_KC; }

/* w [N, K] int8 (row stride ldw) -> out (q8_packed_size bytes, blocked layout) and wsum [q8_padded_rows]
 * (row sums; 0 for padding rows). */
void q8_pack(const int8_t *w, int64_t N, int64_t K, int64_t ldw, int8_t *out, int32_t *wsum) {
    const int64_t C = q8_chunks(K);
    memset(out, 0, (size_t)q8_packed_size(N, K));
    memset(wsum, 0, (size_t)q8_padded_rows(N) * sizeof(int32_t));
    for (int64_t n = 0; n < N; ++n) {
        const int8_t *row = w + n * ldw;
        int8_t *dst = out + (n / Q8_NB) * Q8_NB * C * Q8_KC + (n % Q8_NB) * Q8_KC; /* chunk 0 of row n */
        for (int64_t c = 0; c < C; ++c) {
            const int64_t len = K - c * Q8_KC < Q8_KC ? K - c * Q8_KC : Q8_KC;
            memcpy(dst + c * Q8_NB * Q8_KC, row + c * Q8_KC, (size_t)len);
        }
        int32_t t = 0;
        for (int64_t k = 0; k < K; ++k) t += row[k];
        wsum[n] = t;
    }
}

/* x [M, K] float -> u [M, C * 32] (u8, padded with the offset, i.e. q = 0), s [M] row absmax. The same
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

/* acc + the 8 lane sums of xv's u8 times wv's s8 (4 products a lane): on AVX2 maddubs to 16 bits, madd to 32, add;
 * on AVX-512 VNNI one dpbusd. The same integers either way. */
#define Q8_DOT_AVX2(acc, xv, wv) \
    _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(xv, wv), _mm256_set1_epi16(1)))
#define Q8_DOT_VNNI(acc, xv, wv) _mm256_dpbusd_epi32(acc, xv, wv)
#define Q8_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

/* One block of 4 output rows against M activation rows in 256-bit registers (M a compile-time constant so the
 * 4 * M accumulators stay in registers), named NAME_M, with the DOT step above and the function attributes ATTR. */
#define Q8_BLOCK256(NAME, ATTR, DOT, M)                                                                      \
    ATTR static void NAME##_##M(const uint8_t *u, const float *s, int64_t C, const int8_t *wb,               \
                                const int32_t *wsum, const float *mult, const float *bias, int64_t N, int64_t b, \
                                float *y) {                                                                  \
        const int64_t Kp = C * Q8_KC;                                                                        \
        const int8_t *p = wb + b * Q8_NB * Kp;                                                               \
        __m256i acc[M][Q8_NB];                                                                               \
        for (int i = 0; i < M; ++i)                                                                          \
            for (int j = 0; j < Q8_NB; ++j) acc[i][j] = _mm256_setzero_si256();                              \
        for (int64_t c = 0; c < C; ++c, p += Q8_NB * Q8_KC) {                                                \
            for (int i = 0; i < M; ++i) {                                                                    \
                const __m256i xv = _mm256_loadu_si256((const __m256i *)(u + i * Kp + c * Q8_KC));            \
                for (int j = 0; j < Q8_NB; ++j)                                                              \
                    acc[i][j] = DOT(acc[i][j], xv, _mm256_loadu_si256((const __m256i *)(p + j * Q8_KC)));    \
            }                                                                                                \
        }                                                                                                    \
        for (int j = 0; j < Q8_NB; ++j) {                                                                    \
            const int64_t n = b * Q8_NB + j;                                                                 \
            if (n >= N) break;                                                                               \
            for (int i = 0; i < M; ++i)                                                                      \
                y[i * N + n] = q8_output(hsum_epi32(acc[i][j]), wsum[n], mult[n], s[i], bias, n);            \
        }                                                                                                    \
    }

Q8_BLOCK256(q8_block, , Q8_DOT_AVX2, 1)
Q8_BLOCK256(q8_block, , Q8_DOT_AVX2, 2)

/* The same block on AVX-512 VNNI in 256-bit registers, for 1-2 rows: one dpbusd per row and weight row. Below
 * 3 rows a step does little but load, and on Zen 4 256-bit loads stream faster than 512-bit ones:
 * sums over one 1 GB buffer on two threads read 42.9 against 39.2 GB/s (29.4 against 27.2 when the VM's bus share
 * is low; torch's sum 43.5 and 29.7). All the target's int8 linears at 1 row, in turn with the 512-bit code
 * (medians, rounds split by the bus share): two threads 1.05-1.07x, one thread 1.05-1.14x; at 2 rows level
 * (0.99-1.02x). The 512-bit code, with its prefetches, stays for 3-8 rows, where the multiplies count. */
Q8_BLOCK256(q8_vnni256_block, __attribute__((target(Q8_VNNI))), Q8_DOT_VNNI, 1)
Q8_BLOCK256(q8_vnni256_block, __attribute__((target(Q8_VNNI))), Q8_DOT_VNNI, 2)

/* The same block on AVX-512 VNNI. A 64-byte load holds two rows' 32-column chunk (rows 0-1 and 2-3 of the
 * block), and each activation chunk is broadcast to both halves, so one dpbusd serves two output rows: acc[i][h]
 * holds row 2h in its low 256 bits and row 2h + 1 in its high ones. 2 * M accumulators: 16 of 32 registers at
 * M = 8. */
#define Q8_VNNI_BLOCK(M)                                                                                     \
    __attribute__((target(Q8_VNNI))) static void q8_vnni_block_##M(                                          \
        const uint8_t *u, const float *s, int64_t C, const int8_t *wb, const int32_t *wsum, const float *mult, \
        const float *bias, int64_t N, int64_t b, float *y) {                                                 \
        const int64_t Kp = C * Q8_KC;                                                                        \
        const int8_t *p = wb + b * Q8_NB * Kp;                                                               \
        __m512i acc[M][2];                                                                                   \
        for (int i = 0; i < M; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_si512();                         \
        for (int64_t c = 0; c < C; ++c, p += Q8_NB * Q8_KC) {                                                \
            _mm_prefetch((const char *)p + Q8_PREFETCH, _MM_HINT_T0);                                        \
            _mm_prefetch((const char *)p + Q8_PREFETCH + 64, _MM_HINT_T0);                                   \
            _mm_prefetch((const char *)p + Q8_PREFETCH_L2, _MM_HINT_T1);                                     \
            _mm_prefetch((const char *)p + Q8_PREFETCH_L2 + 64, _MM_HINT_T1);                                \
            const __m512i w01 = _mm512_loadu_si512((const void *)p);                                         \
            const __m512i w23 = _mm512_loadu_si512((const void *)(p + 2 * Q8_KC));                           \
            for (int i = 0; i < M; ++i) {                                                                    \
                const __m512i xv = _mm512_broadcast_i64x4(                                                   \
                    _mm256_loadu_si256((const __m256i *)(u + i * Kp + c * Q8_KC)));                          \
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], xv, w01);                                         \
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], xv, w23);                                         \
            }                                                                                                \
        }                                                                                                    \
        for (int j = 0; j < Q8_NB; ++j) {                                                                    \
            const int64_t n = b * Q8_NB + j;                                                                 \
            if (n >= N) break;                                                                               \
            for (int i = 0; i < M; ++i) {                                                                    \
                const __m512i a = acc[i][j / 2];                                                             \
                const int32_t dot = j % 2 ? hsum_epi32(_mm512_extracti64x4_epi64(a, 1))                      \
                                          : hsum_epi32(_mm512_castsi512_si256(a));                           \
                y[i * N + n] = q8_output(dot, wsum[n], mult[n], s[i], bias, n);                              \
            }                                                                                                \
        }                                                                                                    \
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
    int64_t C, N;
    float *y;
} q8_job;

/* Blocks b0..b1-1 for all M rows: a block's weights (a few KB) are read from memory once and from L1/L2 for
 * every further group of rows. */
static void q8_run(void *ctx, int64_t b0, int64_t b1) {
    const q8_job *j = ctx;
    const int64_t Kp = j->C * Q8_KC;
    for (int64_t b = b0; b < b1; ++b)
        for (int64_t m = 0; m < j->M; m += j->group) {
            const int64_t rows = j->M - m < j->group ? j->M - m : j->group;
            j->blocks[rows](j->u + m * Kp, j->s + m, j->C, j->wb, j->wsum, j->mult, j->bias, j->N, b, j->y + m * j->N);
        }
}

/* Blocks per chunk handed out under lending: about 64 KB of weights (tens of microseconds), small enough that
 * the target seldom waits for the helper's last chunk, large enough that claiming costs little. */
#define Q8_LEND_BYTES 65536

/* y [M, N] = the layer applied to x [M, K] (M >= 1, else -2; -1 if out of memory). wb, wsum: from q8_pack;
 * mult[n] = a * w_scale[n]; inv = 1 / a. Each pass of up to Q8_PASS_ROWS rows splits the blocks over the
 * OpenMP threads, one contiguous run each, or hands them out in chunks when a core is lent (lend.c). */
int q8_linear_f32(const float *x, int64_t M, int64_t K, const int8_t *wb, const int32_t *wsum, const float *mult,
                  float inv, const float *bias, int64_t N, float *y) {
    if (M < 1) return -2;
    const int64_t C = q8_chunks(K), Kp = C * Q8_KC;
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

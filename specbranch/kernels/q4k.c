/* GGUF Q4_K linear, read as the file stores it: the target's decode steps, verifications and prompts. AVX2 code, and
 * AVX-512 VNNI code where the CPU has it (isa.c picks; both give the same bits).
 *
 * Why: a decode step reads every weight once, so it costs the bytes it reads. The 1.5B target's GGUF stores its
 * attention and MLP linears as Q4_K (4.5 bits a weight; a few are Q6_K), and the per-channel int8 copy made from
 * their dequantized values read 1 byte a weight: 1.11 of the target's 1.55 GB a forward. Read as Q4_K they are
 * 0.63 GB, and the weights are the file's own values exactly, not an int8 rounding of them.
 *
 * Q4_K (ggml's block_q4_K, 144 bytes per 256 weights of a row): fp16 d and dmin, eight 6-bit scales sc[j] and
 * mins m[j] (one per 32 weights, packed in 12 bytes), 128 bytes of 4-bit quants u in [0, 15]:
 *
 *   w[k] = d * sc[j] * u[k] - dmin * m[j]   for k in sub-block j of the super-block.
 *
 * Activations are quantized per row to int8 (xq = rint(x * 127 / absmax), xs = absmax / 127) with per-32 sums
 * xsum, so a super-block's contribution is two exact integer sums and two float steps:
 *
 *   isc = sum_j sc[j] * dot(u_j, xq_j),  imn = sum_j m[j] * xsum_j       (int32: at most 8*63*32*15*127 < 2^31)
 *   f = fma((float)isc, d, f);  f = fma(-(float)imn, dmin, f)              (super-blocks in order)
 *   y[m, n] = f * xs[m] (+ bias[n])
 *
 * The integer sums are exact in any order and the float steps are the same for every row count, thread count and
 * code (one function, qk_finish, does them for both), so a row's result does not depend on the batch it came in:
 * prompts, verifications and decode steps run one and the same model (tests check it bit for bit).
 *
 * Layout (q4k_pack): the quants as q4.c's ("blocked": 16 output rows a block, steps of 8 columns, in each step the
 * 16 rows' 4 bytes one after another, byte b of a row holding u[8s + b] low and u[8s + 4 + b] high), so a block's
 * quants are one sequential run of memory and a 32-bit lane sums one output row. Beside them, per block, the
 * sub-blocks' sc and m as bytes, per super-block 8 x 16 scales then the mins in pairs of sub-blocks [4][16][2]
 * (sm[N/16][K/256][256]; the pairs feed one madd, qk_finish), and the super-blocks' d and dmin, dd[N/16][K/256][2][16]
 * (fp16): 148 bytes per 256 weights against the file's 144 (the 6-bit packing unpacked).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lend.h"
#include "simd.h"

#define QK_K 256         /* weights per super-block */
#define QK_SUB 32        /* weights per sub-block (one sc and m) */
#define QK_RAW 144       /* bytes of a block_q4_K */
#define QK_SM 256        /* bytes of sm per block and super-block: 8 x 16 scales, 8 x 16 mins */
#define QK_NB 16         /* output rows per block */
#define QK_STEP 64       /* bytes of a block per step of 8 columns: 16 rows x 4 */
#define QK_MMAX 8        /* most activation rows per pass over a block's weights */
#define QK_PASS_ROWS 64  /* rows per pass over the weights: a block's (up to 72 KB) stay in L2 for its row groups */
#define QK_PREFETCH 4096 /* prefetch distances (bytes ahead in a block's run), as q4.c's */
#define QK_PREFETCH_L2 32768
#define QK_VNNI "avx512f,avx512bw,avx512vl,avx512vnni"

int kernels_vnni(void); /* isa.c */

static inline int64_t qk_blocks(int64_t N) { return (N + QK_NB - 1) / QK_NB; }

/* Sizes of q4k_pack's three outputs for an [N, K] weight: quant bytes, sm bytes, dd halves. */
int64_t q4k_quant_bytes(int64_t N, int64_t K) { return qk_blocks(N) * QK_NB * (K / 2); }
int64_t q4k_sm_bytes(int64_t N, int64_t K) { return qk_blocks(N) * (K / QK_SUB) * 2 * QK_NB; }
int64_t q4k_dd_halves(int64_t N, int64_t K) { return qk_blocks(N) * (K / QK_K) * 2 * QK_NB; }

/* Sub-block j's 6-bit scale and min from a block_q4_K's 12 packed bytes (ggml's get_scale_min_k4). */
static void qk_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* raw: N rows of K/256 block_q4_K each (row stride ldr bytes; GGUF's data) -> w, sm, dd (sizes above; padding rows
 * zero). Returns -2 if K is not a multiple of 256. */
int q4k_pack(const uint8_t *raw, int64_t N, int64_t K, int64_t ldr, uint8_t *w, uint8_t *sm, uint16_t *dd) {
    if (K % QK_K) return -2;
    const int64_t S = K / QK_K, steps = K / 8;
    memset(w, 0, (size_t)q4k_quant_bytes(N, K));
    memset(sm, 0, (size_t)q4k_sm_bytes(N, K));
    memset(dd, 0, (size_t)q4k_dd_halves(N, K) * sizeof(uint16_t));
    uint8_t u[QK_K];
    for (int64_t n = 0; n < N; ++n) {
        const int64_t b = n / QK_NB, l = n % QK_NB;
        for (int64_t s = 0; s < S; ++s) {
            const uint8_t *blk = raw + n * ldr + s * QK_RAW, *scales = blk + 4, *qs = blk + 16;
            memcpy(dd + ((b * S + s) * 2 + 0) * QK_NB + l, blk, 2);     /* d */
            memcpy(dd + ((b * S + s) * 2 + 1) * QK_NB + l, blk + 2, 2); /* dmin */
            uint8_t *at = sm + (b * S + s) * QK_SM; /* sc [8][16], then the mins as pairs [4][16][2] */
            for (int j = 0; j < QK_K / QK_SUB; ++j)
                qk_scale_min(j, scales, at + j * QK_NB + l, at + QK_SM / 2 + (j / 2) * 2 * QK_NB + 2 * l + j % 2);
            /* 32 bytes of qs per 64 weights: low nibbles the first 32, high nibbles the next 32 */
            for (int t = 0; t < 4; ++t)
                for (int i = 0; i < 32; ++i) {
                    u[64 * t + i] = qs[32 * t + i] & 15;
                    u[64 * t + 32 + i] = qs[32 * t + i] >> 4;
                }
            for (int st = 0; st < QK_K / 8; ++st) {
                uint8_t *dst = w + (b * steps + s * (QK_K / 8) + st) * QK_STEP + l * 4;
                for (int by = 0; by < 4; ++by) dst[by] = (uint8_t)(u[8 * st + by] | (u[8 * st + 4 + by] << 4));
            }
        }
    }
    return 0;
}

/* x [M, K] -> xq [M, K] int8, xs [M], xsum [M, K/32] (int16: at most 32 * 127; quantize_row_i8, simd.h). */
static void qk_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs, int16_t *xsum) {
    const int64_t J = K / QK_SUB;
    for (int64_t m = 0; m < M; ++m) {
        xs[m] = quantize_row_i8(x + m * K, K, xq + m * K);
        for (int64_t j = 0; j < J; ++j) {
            int32_t t = 0;
            for (int k = 0; k < QK_SUB; ++k) t += xq[m * K + j * QK_SUB + k];
            xsum[m * J + j] = (int16_t)t;
        }
    }
}

/* After super-block s of block b: the 16 rows' integer sums isc [M][16] turned into the floats fs [M][16], 8 lanes
 * (output rows) at a time: imn from the rows' mins (pairs of sub-blocks, lane-major: mn[t * 32 + 2 * lane + 0/1]) and
 * the activation row's sub-block sums, one madd per pair; then f = fma(isc, d, f), f = fma(-imn, dmin, f). Both codes
 * call this, so both take the same float steps. The mins, d and dmin are loaded once for all the rows. */
static inline void qk_finish(const int32_t *isc, int M, const uint8_t *sm, const uint16_t *dd, const int16_t *xsum,
                             int64_t J, int64_t S, int64_t b, int64_t s, float *fs) {
    const uint8_t *mnb = sm + (b * S + s) * QK_SM + QK_SM / 2;
    const uint16_t *ddb = dd + (b * S + s) * 2 * QK_NB;
    for (int h = 0; h < QK_NB; h += 8) {
        __m256i m[QK_K / QK_SUB / 2];
        for (int t = 0; t < QK_K / QK_SUB / 2; ++t)
            m[t] = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(mnb + t * 2 * QK_NB + 2 * h)));
        const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ddb + h)));
        const __m256 dmin = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(ddb + QK_NB + h)));
        for (int i = 0; i < M; ++i) {
            const int16_t *xs8 = xsum + i * J + s * (QK_K / QK_SUB);
            __m256i imn = _mm256_madd_epi16(m[0], _mm256_set1_epi32(load_i32(xs8)));
            for (int t = 1; t < QK_K / QK_SUB / 2; ++t)
                imn = _mm256_add_epi32(imn, _mm256_madd_epi16(m[t], _mm256_set1_epi32(load_i32(xs8 + 2 * t))));
            float *f8 = fs + i * QK_NB + h;
            __m256 f = _mm256_loadu_ps(f8);
            f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(isc + i * QK_NB + h))), d, f);
            f = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(imn), dmin, f);
            _mm256_storeu_ps(f8, f);
        }
    }
}

/* The block's outputs: y[i, n] = fs[i] * xs[i] (+ bias[n]). */
static inline void qk_outputs(const float *fs, int M, const float *xs, const float *bias, int64_t N, int64_t b,
                              float *y) {
    for (int i = 0; i < M; ++i) outputs16(fs + i * QK_NB, xs[i], bias, N, b * QK_NB, y + i * N);
}

/* AVX2, one half (8 output rows, h = 0 or 8) of a block at a time. Per step and row the low and high nibbles'
 * u8 x s8 products are summed in int16 (at most 2 * 2 * 15 * 127 = 7620), and one madd against the sub-block's
 * scales (as int16 pairs, at most 63) both widens them and applies sc[j]: isc += sc * (s16 pair), exact. */
#define QK_ROW_AVX2(M, i)                                                                                    \
    if ((i) < (M)) {                                                                                         \
        const int8_t *x_ = xq + (i) * K + 8 * st;                                                            \
        const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x_))),       \
                                             _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x_ + 4))));  \
        t##i = _mm256_add_epi32(t##i, _mm256_madd_epi16(s16, scv));                                          \
    }
#define QK_SAVE_AVX2(M, i)                                                                                   \
    if ((i) < (M)) _mm256_storeu_si256((__m256i *)(isc + (i) * QK_NB + h), t##i), t##i = _mm256_setzero_si256();
#define QK_BLOCK_AVX2(M)                                                                                     \
    static void qk_block_##M(const int8_t *xq, const float *xs, const int16_t *xsum, int64_t K, const uint8_t *w, \
                             const uint8_t *sm, const uint16_t *dd, const float *bias, int64_t N, int64_t b, float *y) { \
        const int64_t S = K / QK_K, J = K / QK_SUB;                                                          \
        const __m256i low = _mm256_set1_epi8(0x0F);                                                          \
        float fs[M * QK_NB] = {0};                                                                           \
        int32_t isc[M * QK_NB];                                                                              \
        __m256i t0, t1, t2, t3, t4, t5, t6, t7;                                                              \
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = _mm256_setzero_si256();                                      \
        for (int64_t s = 0; s < S; ++s) {                                                                    \
            for (int h = 0; h < QK_NB; h += 8) {                                                             \
                const uint8_t *p = w + (b * (K / 8) + s * (QK_K / 8)) * QK_STEP + 4 * h;                     \
                for (int j = 0; j < QK_K / QK_SUB; ++j) {                                                    \
                    const __m256i sc = _mm256_cvtepu8_epi32(_mm_loadl_epi64(                                  \
                        (const __m128i *)(sm + (b * S + s) * QK_SM + j * QK_NB + h)));       \
                    const __m256i scv = _mm256_or_si256(sc, _mm256_slli_epi32(sc, 16));                      \
                    for (int64_t st = s * (QK_K / 8) + j * 4; st < s * (QK_K / 8) + j * 4 + 4; ++st, p += QK_STEP) { \
                        _mm_prefetch((const char *)p + QK_PREFETCH, _MM_HINT_T0);                            \
                        _mm_prefetch((const char *)p + QK_PREFETCH_L2, _MM_HINT_T1);                         \
                        const __m256i v = _mm256_loadu_si256((const __m256i *)p);                            \
                        const __m256i lo = _mm256_and_si256(v, low);                                         \
                        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);                   \
                        QK_ROW_AVX2(M, 0) QK_ROW_AVX2(M, 1) QK_ROW_AVX2(M, 2) QK_ROW_AVX2(M, 3)              \
                        QK_ROW_AVX2(M, 4) QK_ROW_AVX2(M, 5) QK_ROW_AVX2(M, 6) QK_ROW_AVX2(M, 7)              \
                    }                                                                                        \
                }                                                                                            \
                QK_SAVE_AVX2(M, 0) QK_SAVE_AVX2(M, 1) QK_SAVE_AVX2(M, 2) QK_SAVE_AVX2(M, 3)                  \
                QK_SAVE_AVX2(M, 4) QK_SAVE_AVX2(M, 5) QK_SAVE_AVX2(M, 6) QK_SAVE_AVX2(M, 7)                  \
            }                                                                                                \
            qk_finish(isc, M, sm, dd, xsum, J, S, b, s, fs);                                                 \
        }                                                                                                    \
        qk_outputs(fs, M, xs, bias, N, b, y);                                                                \
    }

QK_BLOCK_AVX2(1)
QK_BLOCK_AVX2(2)
QK_BLOCK_AVX2(3)
QK_BLOCK_AVX2(4)
QK_BLOCK_AVX2(5)
QK_BLOCK_AVX2(6)
QK_BLOCK_AVX2(7)
QK_BLOCK_AVX2(8)

/* AVX-512 VNNI: the whole block, a step's 64 bytes one register; per row two dpbusd a step (low nibbles into a, high
 * into c: two independent chains), and at each sub-block's end isc += sc * (a + c) (one mullo). */
#define QK_ROW_VNNI(M, i)                                                                                    \
    if ((i) < (M)) {                                                                                         \
        const int8_t *x_ = xq + (i) * K + 8 * st;                                                            \
        a##i = _mm512_dpbusd_epi32(a##i, lo, _mm512_set1_epi32(load_i32(x_)));                               \
        if ((M) < 3) c##i = _mm512_dpbusd_epi32(c##i, hi, _mm512_set1_epi32(load_i32(x_ + 4)));              \
        else a##i = _mm512_dpbusd_epi32(a##i, hi, _mm512_set1_epi32(load_i32(x_ + 4)));                      \
    }
#define QK_SUB_VNNI(M, i)                                                                                    \
    if ((i) < (M)) {                                                                                         \
        t##i = _mm512_add_epi32(t##i, _mm512_mullo_epi32(_mm512_add_epi32(a##i, c##i), scv));                \
        a##i = c##i = _mm512_setzero_si512();                                                                \
    }
#define QK_SAVE_VNNI(M, i)                                                                                   \
    if ((i) < (M)) _mm512_storeu_si512(isc + (i) * QK_NB, t##i), t##i = _mm512_setzero_si512();
#define QK_ALL(X, M) X(M, 0) X(M, 1) X(M, 2) X(M, 3) X(M, 4) X(M, 5) X(M, 6) X(M, 7)
#define QK_BLOCK_VNNI(M)                                                                                     \
    __attribute__((target(QK_VNNI))) static void qk_vnni_block_##M(                                          \
        const int8_t *xq, const float *xs, const int16_t *xsum, int64_t K, const uint8_t *w, const uint8_t *sm, \
        const uint16_t *dd, const float *bias, int64_t N, int64_t b, float *y) {                             \
        const int64_t S = K / QK_K, J = K / QK_SUB;                                                          \
        const __m512i low = _mm512_set1_epi8(0x0F);                                                          \
        const uint8_t *p = w + b * (K / 8) * QK_STEP;                                                        \
        float fs[M * QK_NB] = {0};                                                                           \
        int32_t isc[M * QK_NB];                                                                              \
        __m512i a0, a1, a2, a3, a4, a5, a6, a7, c0, c1, c2, c3, c4, c5, c6, c7, t0, t1, t2, t3, t4, t5, t6, t7; \
        a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = _mm512_setzero_si512();                                      \
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = _mm512_setzero_si512();                                      \
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = t7 = _mm512_setzero_si512();                                      \
        int64_t st = 0;                                                                                      \
        for (int64_t s = 0; s < S; ++s) {                                                                    \
            for (int j = 0; j < QK_K / QK_SUB; ++j) {                                                        \
                for (int k = 0; k < QK_SUB / 8; ++k, ++st, p += QK_STEP) {                                   \
                    if ((M) >= 2) {                                                                          \
                        _mm_prefetch((const char *)p + QK_PREFETCH, _MM_HINT_T0);                            \
                        _mm_prefetch((const char *)p + QK_PREFETCH_L2, _MM_HINT_T1);                         \
                    }                                                                                        \
                    const __m512i v = _mm512_loadu_si512((const void *)p);                                   \
                    const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low); \
                    QK_ALL(QK_ROW_VNNI, M)                                                                   \
                }                                                                                            \
                const __m512i scv = _mm512_cvtepu8_epi32(_mm_loadu_si128(                                    \
                    (const __m128i *)(sm + (b * S + s) * QK_SM + j * QK_NB)));               \
                QK_ALL(QK_SUB_VNNI, M)                                                                       \
            }                                                                                                \
            QK_ALL(QK_SAVE_VNNI, M)                                                                          \
            qk_finish(isc, M, sm, dd, xsum, J, S, b, s, fs);                                                 \
        }                                                                                                    \
        qk_outputs(fs, M, xs, bias, N, b, y);                                                                \
    }

QK_BLOCK_VNNI(1)
QK_BLOCK_VNNI(2)
QK_BLOCK_VNNI(3)
QK_BLOCK_VNNI(4)
QK_BLOCK_VNNI(5)
QK_BLOCK_VNNI(6)
QK_BLOCK_VNNI(7)
QK_BLOCK_VNNI(8)

typedef void (*qk_block_fn)(const int8_t *, const float *, const int16_t *, int64_t, const uint8_t *,
                            const uint8_t *, const uint16_t *, const float *, int64_t, int64_t, float *);

static const qk_block_fn qk_avx2_blocks[QK_MMAX + 1] = {0, qk_block_1, qk_block_2, qk_block_3, qk_block_4,
                                                         qk_block_5, qk_block_6, qk_block_7, qk_block_8};
static const qk_block_fn qk_vnni_blocks[QK_MMAX + 1] = {0, qk_vnni_block_1, qk_vnni_block_2, qk_vnni_block_3,
                                                         qk_vnni_block_4, qk_vnni_block_5, qk_vnni_block_6,
                                                         qk_vnni_block_7, qk_vnni_block_8};

/* One pass's blocks, for OpenMP and lend_for (lend.c: the draft worker's idle core may take some of them). */
typedef struct {
    const qk_block_fn *blocks; /* by row count */
    int64_t M;
    const int8_t *xq;
    const float *xs;
    const int16_t *xsum;
    int64_t K;
    const uint8_t *w, *sm;
    const uint16_t *dd;
    const float *bias;
    int64_t N;
    float *y;
} qk_job;

/* Blocks b0..b1-1 for the pass's rows, QK_MMAX at a time: a block's weights come from memory once per pass. */
static void qk_run(void *ctx, int64_t b0, int64_t b1) {
    const qk_job *j = ctx;
    for (int64_t b = b0; b < b1; ++b)
        for (int64_t m = 0; m < j->M; m += QK_MMAX) {
            const int64_t rows = j->M - m < QK_MMAX ? j->M - m : QK_MMAX;
            j->blocks[rows](j->xq + m * j->K, j->xs + m, j->xsum + m * (j->K / QK_SUB), j->K, j->w, j->sm, j->dd,
                            j->bias, j->N, b, j->y + m * j->N);
        }
}

#define QK_LEND_BYTES 65536 /* about 64 KB of weights a chunk under lending, as q8.c's */

/* y [M, N] = x [M, K] times the packed Q4_K weight (+ bias), for any M >= 1 (else -2; -2 too if K is not a multiple
 * of 256; -1 out of memory). Each pass of up to QK_PASS_ROWS rows splits the blocks over the OpenMP threads, or
 * hands them out in chunks while a core is lent (lend.c). */
int q4k_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint8_t *sm, const uint16_t *dd,
                   const float *bias, int64_t N, float *y) {
    if (M < 1 || K % QK_K) return -2;
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc((size_t)M * sizeof(float));
    int16_t *xsum = malloc((size_t)(M * (K / QK_SUB)) * sizeof(int16_t));
    if (!xq || !xs || !xsum) {
        free(xq);
        free(xs);
        free(xsum);
        return -1;
    }
    qk_quantize_rows(x, M, K, xq, xs, xsum);
    const qk_block_fn *blocks = kernels_vnni() ? qk_vnni_blocks : qk_avx2_blocks;
    const int64_t B = qk_blocks(N);
    for (int64_t m = 0; m < M; m += QK_PASS_ROWS) {
        qk_job job = {blocks, M - m < QK_PASS_ROWS ? M - m : QK_PASS_ROWS, xq + m * K, xs + m,
                      xsum + m * (K / QK_SUB), K, w, sm, dd, bias, N, y + m * N};
        if (!lend_for(B, QK_LEND_BYTES / (QK_NB * K / 2) + 1, qk_run, &job)) {
#pragma omp parallel for schedule(static)
            for (int64_t b = 0; b < B; ++b) qk_run(&job, b, b + 1);
        }
    }
    free(xq);
    free(xs);
    free(xsum);
    return 0;
}

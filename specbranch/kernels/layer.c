/* A decoder layer's work between its linears, in C: RMSNorm, rope, the KV cache writes, grouped-query
 * attention and SwiGLU's silu(gate) * up. In torch these are about fifty small ops per layer, each costing
 * microseconds whatever its size (and the torch path makes one attention call per query, to stay batch-invariant).
 *
 * Two users:
 * - every float32 CPU forward (models/decoder.py) calls the layer_* functions between its four linears:
 *     a = rms_norm(h) * ln_attn;  qkv = linear_qkv(a);  o = layer_attention(qkv)  (rope, cache writes, attention)
 *     h1 = h + linear_o(o);  n = rms_norm(h1) * ln_mlp;  out = h1 + linear_down(silu(g) * u),  [g, u] = linear_gu(n)
 *   The target's forwards decide what is emitted, so a token's numbers must not depend on how many tokens were
 *   computed with it: verifying a block must give exactly what decoding it token by token gives. Here every row,
 *   and every (token, head) of attention, is computed on its own in one fixed order by one thread, so its result
 *   does not depend on the batch, the row count or the thread count. The summation orders are not torch's, so
 *   this path is not bit-identical to the torch one: a model takes one or the other for all its forwards.
 * - layers_step runs whole layers, their linears included, in one call, for decode steps and verifications (as many
 *   rows as the linear kernels take in one pass over their weights): the draft's int4 layers (q4.c), so small that
 *   the eight foreign calls per layer of the path above cost 10-13% more per step, and the target's int8 or Q4_K
 *   layers (q8.c, q4k.c), where those calls and their torch allocations cost some 3 ms of a 30-60 ms step. It calls the same
 *   functions in the same order as the path above, so an int8 layer gives the same bits either way.
 *
 * Vectors of 8 floats (AVX2); every length that is read 8 at a time (H, I, D) is a multiple of 8, which the
 * Python side checks before it takes this path.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

int q4_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint16_t *d, const float *bias,
                  int64_t N, float *y); /* q4.c: -2 for a row count it has no code for, -1 out of memory */

int q8_linear_f32(const float *x, int64_t M, int64_t K, const int8_t *wb, const int32_t *wsum, const float *mult,
                  float inv, const float *bias, int64_t N, float *y); /* q8.c: -1 out of memory */

/* A layer's shape (models/fused.py LayerShape). */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter; /* H, Hq, Hkv, D, I */
    float eps, scale;                                 /* RMSNorm epsilon, 1/sqrt(D) */
} layer_shape;

int q4k_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const uint8_t *sm, const uint16_t *dd,
                   const float *bias, int64_t N, float *y); /* q4k.c: -1 out of memory */

/* One linear of a fused layer, as its kernel reads it (models/fused.py LinearRef). With next, the layer's output
 * rows are two linears side by side: this one's first n_first rows, then next's (the target's qkv where the GGUF
 * stores v as Q6_K but q and k as Q4_K). */
typedef struct layer_linear {
    int64_t bits; /* 4: q4.c, w = packed nibbles, aux = fp16 scales; 8: q8.c, w = blocked int8, aux = row sums,
                   * mult = FBGEMM's output multipliers; 45: q4k.c, w = quants, aux = sm, mult = dd (fp16) */
    const void *w, *aux;
    const void *mult;
    const float *bias; /* or NULL */
    float inv;         /* int8: 1 / the activation scale */
    const struct layer_linear *next;
    int64_t n_first;
} layer_linear;

/* A layer's constants (built once per layer by models/fused.py). */
typedef struct {
    layer_shape s;
    const float *ln_attn, *ln_mlp; /* [H] each */
    layer_linear qkv, o, gu, down; /* [(Hq + 2 Hkv) D, H], [H, Hq D], gate then up stacked [2I, H], [H, I] */
} layer_weights;

static int linear(const layer_linear *l, const float *x, int64_t M, int64_t K, int64_t N, float *y);

/* A pair's output [M, N]: the first linear's n_first columns, then next's, computed apart and interleaved by row. */
static int linear_pair(const layer_linear *l, const float *x, int64_t M, int64_t K, int64_t N, float *y) {
    const int64_t n1 = l->n_first, n2 = N - n1;
    float *a = malloc((size_t)(M * n1) * sizeof(float)), *b = malloc((size_t)(M * n2) * sizeof(float));
    layer_linear first = *l;
    first.next = NULL;
    int err = !a || !b ? -1 : linear(&first, x, M, K, n1, a);
    if (!err) err = linear(l->next, x, M, K, n2, b);
    for (int64_t m = 0; !err && m < M; ++m) {
        memcpy(y + m * N, a + m * n1, (size_t)n1 * sizeof(float));
        memcpy(y + m * N + n1, b + m * n2, (size_t)n2 * sizeof(float));
    }
    free(a);
    free(b);
    return err;
}

static int linear(const layer_linear *l, const float *x, int64_t M, int64_t K, int64_t N, float *y) {
    if (l->next) return linear_pair(l, x, M, K, N, y);
    if (l->bits == 4) return q4_linear_f32(x, M, K, l->w, l->aux, l->bias, N, y);
    if (l->bits == 45) return q4k_linear_f32(x, M, K, l->w, l->aux, l->mult, l->bias, N, y);
    return q8_linear_f32(x, M, K, l->w, l->aux, l->mult, l->inv, l->bias, N, y);
}

/* This step's view of the layer's KV cache (kvcache.py): the trunk [Hkv, max_len, D] holds trunk_len
 * positions; when forked (branches > 0) each branch row r has [Hkv, max_branch_len, D] at
 * branch + r * Hkv * max_branch_len * D holding branch_len positions. The step's t new tokens are the last t
 * positions of the last segment: the trunk's when not forked, every row's branch when forked. */
typedef struct {
    float *k, *v, *bk, *bv;
    int64_t max_len, trunk_len, max_branch_len, branch_len, branches;
    int64_t max_branches; /* rows the branch buffers hold: a layer's branch buffer is max_branches rows long */
} kv_step;

/* d[e] = q . key[e] for 4 keys of length n (a multiple of 8). Each is summed in one order (8 lanes along n, then
 * hsum_ps), whichever keys come with it; four at once because one alone is a chain of dependent fmadds. */
static inline void dot4_ps(const float *q, const float *const key[4], int64_t n, float d[4]) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < n; j += 8) {
        const __m256 qv = _mm256_loadu_ps(q + j);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[0] + j), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[1] + j), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[2] + j), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(key[3] + j), a3);
    }
    d[0] = hsum_ps(a0), d[1] = hsum_ps(a1), d[2] = hsum_ps(a2), d[3] = hsum_ps(a3);
}

static inline void axpy_ps(float a, const float *x, float *y, int64_t n) { /* y += a x */
    const __m256 av = _mm256_set1_ps(a);
    for (int64_t j = 0; j < n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
}

/* e^x for 8 floats (Cephes' expf: x = n ln2 + r, e^r by a degree-5 polynomial; a few ulp; 0 below e^-87,
 * e^88 above 88). glibc's scalar expf was most of the time of silu over the MLP's thousands of values per token. */
static inline __m256 exp_ps(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3365478515625f), live = _mm256_cmp_ps(x, lo, _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), live);
}

/* out[m] = y[m] / sqrt(mean(y[m]^2) + eps) * w, the Qwen2 / Llama RMSNorm, for x [M, H] (H a multiple of 8) and
 * y = x, or with res: y = x + res, also written to sum (which may be x): the residual add and the next norm in
 * one pass. */
static void rms_norm_rows(const float *x, const float *res, float *sum, int64_t M, int64_t H, const float *w,
                          float eps, float *out) {
    for (int64_t m = 0; m < M; ++m) {
        const float *r = res ? sum + m * H : x + m * H;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t k = 0; k < H; k += 8) {
            __m256 v = _mm256_loadu_ps(x + m * H + k);
            if (res) {
                v = _mm256_add_ps(v, _mm256_loadu_ps(res + m * H + k));
                _mm256_storeu_ps(sum + m * H + k, v);
            }
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        const __m256 inv = _mm256_set1_ps(1.f / sqrtf(hsum_ps(acc) / (float)H + eps));
        for (int64_t k = 0; k < H; k += 8)
            _mm256_storeu_ps(out + m * H + k,
                             _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(r + k), inv), _mm256_loadu_ps(w + k)));
    }
}

/* out [M, I] = silu(gate) * up for gu [M, 2I] (gate then up in each row). out may be gu itself: element (m, k)
 * goes to m * I + k, at or before every gate and up still to be read, so writing in order overwrites nothing
 * unread. */
static void silu_mul_rows(const float *gu, int64_t M, int64_t I, float *out) {
    const __m256 one = _mm256_set1_ps(1.f);
    for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < I; k += 8) {
            const __m256 g = _mm256_loadu_ps(gu + m * 2 * I + k), u = _mm256_loadu_ps(gu + m * 2 * I + I + k);
            const __m256 sg = _mm256_div_ps(g, _mm256_add_ps(one, exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            _mm256_storeu_ps(out + m * I + k, _mm256_mul_ps(sg, u));
        }
}

/* Rotate q and k of every new token in place (rotate-half layout: x * cos + roll(x, D/2) * signed_sin, with
 * cos / signed_sin [t, D] the step's positions, signed_sin's first half negated: decoder.rope), then copy its
 * keys and values into the cache. qkv [rows * t, (Hq + 2 Hkv) D]. */
static void rope_and_store(const layer_shape *S, float *qkv, int64_t rows, int64_t t, const float *cos,
                           const float *sin, const kv_step *c) {
    const int64_t D = S->head_dim, Hq = S->heads, Hkv = S->kv_heads, N = (Hq + 2 * Hkv) * D;
    float tmp[D];
    for (int64_t m = 0; m < rows * t; ++m) {
        const int64_t r = m / t, i = m % t;
        const float *cs = cos + i * D, *sn = sin + i * D;
        for (int64_t head = 0; head < Hq + Hkv; ++head) {
            float *x = qkv + m * N + head * D;
            memcpy(tmp, x, sizeof tmp);
            for (int64_t j = 0; j < D; ++j) x[j] = tmp[j] * cs[j] + tmp[(j + D / 2) % D] * sn[j];
        }
        for (int64_t j = 0; j < Hkv; ++j) {
            float *k, *v;
            if (c->branches) {
                const int64_t at = ((r * Hkv + j) * c->max_branch_len + c->branch_len - t + i) * D;
                k = c->bk + at, v = c->bv + at;
            } else {
                const int64_t at = (j * c->max_len + c->trunk_len - t + i) * D;
                k = c->k + at, v = c->v + at;
            }
            memcpy(k, qkv + m * N + (Hq + j) * D, (size_t)D * sizeof(float));
            memcpy(v, qkv + m * N + (Hq + Hkv + j) * D, (size_t)D * sizeof(float));
        }
    }
}

#define ATT_TOKENS 4 /* tokens per attention task: their query heads' outputs (4 x 7 x 128 floats at most) stay in L1 */
#define ATT_KEYS 32  /* keys per block of the weighted sum of values */

/* o [rows * t, Hq D]: every new token's query heads attend over what that token sees: when not forked the
 * trunk up to and including itself; when forked the whole trunk plus its row's branch up to itself. Query
 * head h reads kv head h / (Hq / Hkv) (grouped-query attention).
 *
 * A task is one branch row, one kv head and up to ATT_TOKENS tokens: each key and value row is read once for all
 * the task's g * tokens queries (a query-at-a-time loop read them g * t times, from L2: 8 ms of an 8-token target
 * step). Each query's own arithmetic is unchanged by the grouping: its scores, max, exponentials and weighted sum
 * are computed over its own keys in one order, so its result does not depend on t or on the other queries.
 * Returns 0, or -1 if out of memory. */
static int attend(const layer_shape *S, const float *qkv, int64_t rows, int64_t t, const kv_step *c, float *o) {
    const int64_t D = S->head_dim, Hq = S->heads, Hkv = S->kv_heads, N = (Hq + 2 * Hkv) * D, g = Hq / Hkv;
    const int64_t tiles = (t + ATT_TOKENS - 1) / ATT_TOKENS, tasks = rows * Hkv * tiles;
    /* keys seen by the step's last token (the most); trunk keys come first, then (forked) the branch row's */
    const int64_t most = c->branches ? c->trunk_len + c->branch_len : c->trunk_len;
    const int64_t split = c->branches ? c->trunk_len : most, stride = (most + 7) & ~(int64_t)7;
    int err = 0;
#pragma omp parallel for schedule(static) reduction(| : err)
    for (int64_t task = 0; task < tasks; ++task) {
        const int64_t r = task / (Hkv * tiles), j = task / tiles % Hkv, i0 = task % tiles * ATT_TOKENS;
        const int64_t nq = (t - i0 < ATT_TOKENS ? t - i0 : ATT_TOKENS) * g; /* query a: token i0 + a / g, head a % g */
        const float *tk = c->k + j * c->max_len * D, *tv = c->v + j * c->max_len * D;
        const float *bk = c->bk + (r * Hkv + j) * c->max_branch_len * D;
        const float *bv = c->bv + (r * Hkv + j) * c->max_branch_len * D;
        float *s = malloc((size_t)(nq * stride) * sizeof(float)); /* scores [nq, stride], padded to whole vectors */
        if (!s) {
            err = 1;
            continue;
        }
        const float *q[nq];
        float *out[nq], inv[nq];
        int64_t n[nq]; /* keys query a sees */
        for (int64_t a = 0; a < nq; ++a) {
            const int64_t i = i0 + a / g, m = r * t + i, head = j * g + a % g;
            q[a] = qkv + m * N + head * D;
            out[a] = o + m * Hq * D + head * D;
            n[a] = most - t + i + 1;
        }
        const int64_t last = n[nq - 1];
        for (int64_t p = 0; p < last; p += 4) { /* keys p .. p + 3 (past the last: repeats of it, not stored) */
            const float *key[4];
            for (int64_t e = 0; e < 4; ++e) {
                const int64_t at = p + e < last ? p + e : last - 1;
                key[e] = at < split ? tk + at * D : bk + (at - split) * D;
            }
            for (int64_t a = 0; a < nq; ++a) {
                if (p >= n[a]) continue;
                float d[4];
                dot4_ps(q[a], key, D, d);
                for (int64_t e = 0; e < 4 && p + e < n[a]; ++e) s[a * stride + p + e] = d[e] * S->scale;
            }
        }
        for (int64_t a = 0; a < nq; ++a) {
            float *sa = s + a * stride;
            const int64_t n8 = (n[a] + 7) & ~(int64_t)7;
            const float top = max_of(sa, n[a]);
            for (int64_t p = n[a]; p < n8; ++p) sa[p] = -INFINITY; /* e^-inf: 0 */
            __m256 acc = _mm256_setzero_ps();
            for (int64_t p = 0; p < n8; p += 8) {
                const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sa + p), _mm256_set1_ps(top)));
                _mm256_storeu_ps(sa + p, e);
                acc = _mm256_add_ps(acc, e);
            }
            inv[a] = 1.f / hsum_ps(acc);
            memset(out[a], 0, (size_t)D * sizeof(float));
        }
        /* out[a] += w * value for the keys in order, in blocks of ATT_KEYS keys (their values, 16 KB, stay in L1
         * for all the queries) and 64 output floats (8 registers, stored once per block instead of once per key) */
        for (int64_t p0 = 0; p0 < last; p0 += ATT_KEYS)
            for (int64_t a = 0; a < nq; ++a) {
                const int64_t end = p0 + ATT_KEYS < n[a] ? p0 + ATT_KEYS : n[a];
                const float *sa = s + a * stride;
                for (int64_t h = 0; h < D; h += 64) {
                    if (D - h < 64) { /* a head_dim that is not a multiple of 64: one key at a time */
                        for (int64_t p = p0; p < end; ++p)
                            axpy_ps(sa[p] * inv[a], (p < split ? tv + p * D : bv + (p - split) * D) + h, out[a] + h, D - h);
                        break;
                    }
                    __m256 acc[8];
                    for (int k = 0; k < 8; ++k) acc[k] = _mm256_loadu_ps(out[a] + h + 8 * k);
                    for (int64_t p = p0; p < end; ++p) {
                        const __m256 w = _mm256_set1_ps(sa[p] * inv[a]);
                        const float *val = (p < split ? tv + p * D : bv + (p - split) * D) + h;
                        for (int k = 0; k < 8; ++k) acc[k] = _mm256_fmadd_ps(w, _mm256_loadu_ps(val + 8 * k), acc[k]);
                    }
                    for (int k = 0; k < 8; ++k) _mm256_storeu_ps(out[a] + h + 8 * k, acc[k]);
                }
            }
        free(s);
    }
    return err ? -1 : 0;
}

/* The float32 forward's calls between its linears (models/decoder.py). */

void layer_rms_norm(const float *x, const float *res, float *sum, int64_t M, int64_t H, const float *w, float eps,
                    float *out) {
    rms_norm_rows(x, res, sum, M, H, w, eps, out);
}

/* qkv [rows * t, (Hq + 2 Hkv) D], straight from the qkv linear (rotated in place) -> o [rows * t, Hq D], with the
 * step's keys and values written into the cache. Returns 0, or -1 if out of memory. */
int layer_attention(const layer_shape *S, float *qkv, int64_t rows, int64_t t, const float *cos, const float *sin,
                    const kv_step *c, float *o) {
    rope_and_store(S, qkv, rows, t, cos, sin, c);
    return attend(S, qkv, rows, t, c, o);
}

void layer_silu_mul(const float *gu, int64_t M, int64_t I, float *out) { silu_mul_rows(gu, M, I, out); }

/* A whole layer: h [rows * t, H] -> out [rows * t, H], writing the step's keys and values into the cache; the
 * unfused path's calls (models/decoder.py) in its order. Returns 0, -1 (out of memory) or -2 (a row count the int4
 * linear has no code for). */
static int layer_step(const layer_weights *L, const float *h, int64_t rows, int64_t t, const float *cos,
                      const float *sin, const kv_step *c, float *out) {
    const layer_shape *S = &L->s;
    const int64_t M = rows * t, H = S->hidden, D = S->head_dim, I = S->inter, A = S->heads * D;
    const int64_t N = (S->heads + 2 * S->kv_heads) * D;
    float *a = malloc((size_t)(M * H) * sizeof(float));       /* normed input, later h1 */
    float *qkv = malloc((size_t)(M * N) * sizeof(float));
    float *o = malloc((size_t)(M * A) * sizeof(float));       /* attention's output, heads side by side */
    float *n = malloc((size_t)(M * H) * sizeof(float));       /* normed h1 */
    float *gu = malloc((size_t)(M * 2 * I) * sizeof(float));  /* gate then up */
    int err = a && qkv && o && n && gu ? 0 : -1;
    if (!err) {
        rms_norm_rows(h, NULL, NULL, M, H, L->ln_attn, S->eps, a);
        err = linear(&L->qkv, a, M, H, N, qkv);
    }
    if (!err) err = layer_attention(S, qkv, rows, t, cos, sin, c, o);
    if (!err) err = linear(&L->o, o, M, A, H, a);
    if (!err) {
        rms_norm_rows(a, h, a, M, H, L->ln_mlp, S->eps, n); /* a = h1 = o + h, n = its norm */
        err = linear(&L->gu, n, M, H, 2 * I, gu);
    }
    if (!err) {
        silu_mul_rows(gu, M, I, gu);
        err = linear(&L->down, gu, M, I, H, out);
    }
    if (!err)
        for (int64_t k = 0; k < M * H; ++k) out[k] += a[k]; /* down(...) + h1, as the unfused add_ */
    free(a);
    free(qkv);
    free(o);
    free(n);
    free(gu);
    return err;
}

/* Layers first .. first + n - 1 of a decoder, one after the other: L [n] their weights, c layer `first`'s cache view
 * (kvcache.py keeps every layer in one tensor, so layer first + i's buffers lie i layer strides further). h [M, H]
 * -> out [M, H]; keep [n] (or NULL): where keep[i] is not NULL it receives layer first + i's output (hidden states
 * for H-RAD). One call per forward instead of one per layer: the per-layer Python around a call cost some 30 us, a
 * tenth of the int4 draft's step. Returns as layer_step. */
int layers_step(const layer_weights *L, int64_t n, const float *h, int64_t rows, int64_t t, const float *cos,
                const float *sin, const kv_step *c, float *const *keep, float *out) {
    const layer_shape *S = &L->s;
    const int64_t M = rows * t, H = S->hidden;
    const int64_t trunk = S->kv_heads * c->max_len * S->head_dim;                       /* floats per layer */
    const int64_t branch = c->max_branches * S->kv_heads * c->max_branch_len * S->head_dim;
    float *spare = n > 1 ? malloc((size_t)(M * H) * sizeof(float)) : NULL;
    if (n > 1 && !spare) return -1;
    const float *x = h;
    int err = 0;
    for (int64_t i = 0; i < n && !err; ++i) {
        float *y = (n - 1 - i) % 2 ? spare : out; /* alternate so the last layer writes out and no layer's y is its x */
        kv_step ci = *c;
        ci.k += i * trunk;
        ci.v += i * trunk;
        ci.bk += i * branch;
        ci.bv += i * branch;
        err = layer_step(&L[i], x, rows, t, cos, sin, &ci, y);
        if (!err && keep && keep[i]) memcpy(keep[i], y, (size_t)(M * H) * sizeof(float));
        x = y;
    }
    free(spare);
    return err;
}

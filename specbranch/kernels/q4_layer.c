/* The int4 draft's decode step: a whole decoder layer in one foreign call instead of about fifty torch ops.
 *
 * Why: a 1-row step of the 0.5B int4 draft reads 0.22 GB of weights, about 9 ms at one core's read
 * bandwidth, but took 24 ms. The int4 linears (q4.c) were 10 ms of it; the rest was the small torch ops
 * around them (norms, rope, SwiGLU, residual adds, the KV cache writes, attention, one wrapper per
 * linear), each costing microseconds whatever its size. q4_layer_step does the layer:
 *
 *   qkv = linear_qkv(rms_norm(h) * ln_attn), q and k rotated      the new keys/values go into the KV cache
 *   o   = attention of q over the cache (trunk, plus the row's branch suffix when forked)
 *   h1  = h + linear_o(o)
 *   out = h1 + linear_down(silu(g) * u),  [g, u] = linear_gate_up(rms_norm(h1) * ln_mlp)
 *
 * For the draft only: its numbers never decide what is emitted (the target verifies), so these float
 * sums need not match torch's bit for bit, only be deterministic: every row is computed on its own in one
 * fixed order, so its result does not depend on the batch or the thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int q4_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *d, const float *bias,
                  int64_t N, float *y); /* q4.c: -2 for a row count it has no code for, -1 out of memory */

/* One layer's constants (built once per layer by models/fused.py; the weights as q4.c reads them). */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter; /* H, Hq, Hkv, D, I */
    float eps, scale;                                 /* RMSNorm epsilon, 1/sqrt(D) */
    const float *ln_attn, *ln_mlp;                    /* [H] each */
    const uint8_t *w_qkv; const float *d_qkv, *b_qkv; /* [(Hq + 2 Hkv) D, H], bias or NULL */
    const uint8_t *w_o;   const float *d_o, *b_o;     /* [H, Hq D], bias or NULL */
    const uint8_t *w_gu;  const float *d_gu;          /* gate then up stacked: [2I, H] */
    const uint8_t *w_d;   const float *d_d;           /* down: [H, I] */
} q4_layer;

/* This step's view of the layer's KV cache (kvcache.py): the trunk [Hkv, max_len, D] holds trunk_len
 * positions; when forked (branches > 0) each branch row r has [Hkv, max_branch_len, D] at
 * branch + r * Hkv * max_branch_len * D holding branch_len positions. The step's t new tokens are the last t
 * positions of the last segment: the trunk's when not forked, every row's branch when forked. */
typedef struct {
    float *k, *v, *bk, *bv;
    int64_t max_len, trunk_len, max_branch_len, branch_len, branches;
} q4_cache;

/* out[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, the Qwen2 / Llama RMSNorm, for x [M, H]. */
static void rms_norm_rows(const float *x, int64_t M, int64_t H, const float *w, float eps, float *out) {
    for (int64_t m = 0; m < M; ++m) {
        const float *r = x + m * H;
        float ss = 0.f;
        for (int64_t k = 0; k < H; ++k) ss += r[k] * r[k];
        const float inv = 1.f / sqrtf(ss / (float)H + eps);
        for (int64_t k = 0; k < H; ++k) out[m * H + k] = r[k] * inv * w[k];
    }
}

static inline float dot_ps(const float *a, const float *b, int64_t n) { /* n a multiple of 8 */
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline void axpy_ps(float a, const float *x, float *y, int64_t n) { /* y += a x */
    const __m256 av = _mm256_set1_ps(a);
    for (int64_t j = 0; j < n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
}

/* Rotate q and k of every new token in place (rotate-half layout: x * cos + roll(x, D/2) * signed_sin, with
 * cos / signed_sin [t, D] the step's positions, signed_sin's first half negated: decoder.rope), then copy its
 * keys and values into the cache. qkv [rows * t, (Hq + 2 Hkv) D]. */
static void rope_and_store(const q4_layer *L, float *qkv, int64_t rows, int64_t t, const float *cos,
                           const float *sin, const q4_cache *c) {
    const int64_t D = L->head_dim, Hq = L->heads, Hkv = L->kv_heads, N = (Hq + 2 * Hkv) * D;
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

/* o [rows * t, Hq D]: every new token's query heads attend over what that token sees: when not forked the
 * trunk up to and including itself; when forked the whole trunk plus its row's branch up to itself. Query
 * head h reads kv head h / (Hq / Hkv) (grouped-query attention). */
static void attend(const q4_layer *L, const float *qkv, int64_t rows, int64_t t, const q4_cache *c, float *o) {
    const int64_t D = L->head_dim, Hq = L->heads, Hkv = L->kv_heads, N = (Hq + 2 * Hkv) * D, g = Hq / Hkv;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < rows * t * Hq; ++task) {
        const int64_t m = task / Hq, head = task % Hq, r = m / t, i = m % t, j = head / g;
        const float *q = qkv + m * N + head * D;
        /* keys seen: nt from the trunk, nb from the branch row */
        const int64_t nt = c->branches ? c->trunk_len : c->trunk_len - t + i + 1;
        const int64_t nb = c->branches ? c->branch_len - t + i + 1 : 0;
        const float *tk = c->k + j * c->max_len * D, *tv = c->v + j * c->max_len * D;
        const float *bk = c->bk + (r * Hkv + j) * c->max_branch_len * D;
        const float *bv = c->bv + (r * Hkv + j) * c->max_branch_len * D;
        float s[nt + nb]; /* scores: at most 16 KB for a 4096-position cache */
        float *out = o + m * Hq * D + head * D;
        float top = -INFINITY, sum = 0.f;
        for (int64_t p = 0; p < nt + nb; ++p) {
            s[p] = dot_ps(q, p < nt ? tk + p * D : bk + (p - nt) * D, D) * L->scale;
            top = fmaxf(top, s[p]);
        }
        memset(out, 0, (size_t)D * sizeof(float));
        for (int64_t p = 0; p < nt + nb; ++p) {
            const float e = expf(s[p] - top);
            sum += e;
            axpy_ps(e, p < nt ? tv + p * D : bv + (p - nt) * D, out, D);
        }
        for (int64_t d = 0; d < D; ++d) out[d] /= sum;
    }
}

/* h [rows * t, H] -> out [rows * t, H], the layer's output, writing the step's keys and values into the cache.
 * Returns 0, -1 (out of memory) or -2 (a row count the int4 linear has no code for). */
int q4_layer_step(const q4_layer *L, const float *h, int64_t rows, int64_t t, const float *cos, const float *sin,
                  const q4_cache *c, float *out) {
    const int64_t M = rows * t, H = L->hidden, D = L->head_dim, I = L->inter, A = L->heads * D;
    const int64_t N = (L->heads + 2 * L->kv_heads) * D;
    float *a = malloc((size_t)(M * H) * sizeof(float));       /* normed input, later h1 */
    float *qkv = malloc((size_t)(M * N) * sizeof(float));
    float *o = malloc((size_t)(M * A) * sizeof(float));       /* attention's output, heads side by side */
    float *n = malloc((size_t)(M * H) * sizeof(float));       /* normed h1 */
    float *gu = malloc((size_t)(M * 2 * I) * sizeof(float));  /* gate then up */
    int err = a && qkv && o && n && gu ? 0 : -1;
    if (!err) {
        rms_norm_rows(h, M, H, L->ln_attn, L->eps, a);
        err = q4_linear_f32(a, M, H, L->w_qkv, L->d_qkv, L->b_qkv, N, qkv);
    }
    if (!err) {
        rope_and_store(L, qkv, rows, t, cos, sin, c);
        attend(L, qkv, rows, t, c, o);
        err = q4_linear_f32(o, M, A, L->w_o, L->d_o, L->b_o, H, a);
    }
    if (!err) {
        for (int64_t k = 0; k < M * H; ++k) a[k] += h[k]; /* h1 */
        rms_norm_rows(a, M, H, L->ln_mlp, L->eps, n);
        err = q4_linear_f32(n, M, H, L->w_gu, L->d_gu, NULL, 2 * I, gu);
    }
    if (!err) {
        /* silu(gate) * up as [M, I] at the front of gu: element (m, k) goes to m * I + k, at or before every gate
         * and up still to be read, so writing in order overwrites nothing unread */
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < I; ++k) {
                const float gate = gu[m * 2 * I + k], up = gu[m * 2 * I + I + k];
                gu[m * I + k] = gate / (1.f + expf(-gate)) * up;
            }
        err = q4_linear_f32(gu, M, I, L->w_d, L->d_d, NULL, H, out);
    }
    if (!err)
        for (int64_t k = 0; k < M * H; ++k) out[k] += a[k];
    free(a);
    free(qkv);
    free(o);
    free(n);
    free(gu);
    return err;
}

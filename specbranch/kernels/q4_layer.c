/* The int4 draft's decode step, a layer in two foreign calls instead of about forty torch ops.
 *
 * Why: a draft step of the 0.5B draft reads 0.22 GB of int4 weights, about 9 ms at one core's read
 * bandwidth, but took 24 ms. The int4 linears (q4.c) were 10 ms of it; the rest was the torch ops
 * around them (norms, rope, SwiGLU, residual adds, one wrapper per linear: some 40 ops per layer at
 * 4-8 microseconds each on 1-4 rows) and attention. Everything here is row-wise elementwise work or
 * an int4 linear, so two calls per layer do it:
 *
 *   q4_attn_in:  qkv = rope(linear_qkv(rms_norm(h) * ln_attn))                 (attention's input)
 *   q4_attn_out: h1 = h + linear_o(attn); h2 = h1 + linear_down(silu(g) * u),
 *                [g, u] = linear_gate_up(rms_norm(h1) * ln_mlp)                 (the rest of the layer)
 *
 * and attention itself stays in torch (decoder.attend), with the KV cache and its branches.
 *
 * For the draft only: its numbers never decide what is emitted (the target verifies), so these
 * float sums need not match torch's bit for bit, only be deterministic. Every row is computed on its
 * own in one fixed order, so a row's result does not depend on the batch or the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int q4_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *d, const float *bias,
                  int64_t N, float *y); /* q4.c: -2 for a row count it has no code for, -1 out of memory */

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

/* h [M, H] (M = rows * t, token m at position m % t of the step) -> y [M, N], N = (Hq + 2 Hkv) * D: the
 * fused q/k/v projection of the normed rows, with the rotary embedding applied to the first rot_heads heads
 * (q and k) in Hugging Face's rotate-half layout: x * cos + roll(x, D/2) * signed_sin, where cos and
 * signed_sin [t, D] hold the step's positions and signed_sin's first half is negated (decoder.rope).
 * Returns 0, -1 (out of memory) or -2 (a row count the int4 linear has no code for). */
int q4_attn_in(const float *h, int64_t M, int64_t H, const float *ln, float eps, const uint8_t *w, const float *d,
               const float *bias, int64_t N, const float *cos, const float *sin, int64_t t, int64_t D,
               int64_t rot_heads, float *y) {
    float *a = malloc((size_t)(M * H) * sizeof(float));
    float *tmp = malloc((size_t)D * sizeof(float));
    int err = a && tmp ? 0 : -1;
    if (!err) {
        rms_norm_rows(h, M, H, ln, eps, a);
        err = q4_linear_f32(a, M, H, w, d, bias, N, y);
    }
    for (int64_t m = 0; !err && m < M; ++m) {
        const float *c = cos + (m % t) * D, *s = sin + (m % t) * D;
        for (int64_t head = 0; head < rot_heads; ++head) {
            float *x = y + m * N + head * D;
            memcpy(tmp, x, (size_t)D * sizeof(float));
            for (int64_t j = 0; j < D; ++j) x[j] = tmp[j] * c[j] + tmp[(j + D / 2) % D] * s[j];
        }
    }
    free(a);
    free(tmp);
    return err;
}

/* The rest of the layer after attention: h [M, H] and attn [M, A] (attention's output, heads
 * concatenated) -> out [M, H]. wo/do/bo: the output projection [H, A]; wgu/dgu: gate and up stacked
 * [2I, H]; wd/dd: down [H, I] (no biases on the MLP, as in Qwen2 and Llama). Returns as q4_attn_in. */
int q4_attn_out(const float *h, const float *attn, int64_t M, int64_t H, int64_t A, const uint8_t *wo,
                const float *do_, const float *bo, const float *ln, float eps, const uint8_t *wgu, const float *dgu,
                int64_t I, const uint8_t *wd, const float *dd, float *out) {
    float *h1 = malloc((size_t)(M * H) * sizeof(float));   /* [M, H] */
    float *n = malloc((size_t)(M * H) * sizeof(float));    /* [M, H] */
    float *gu = malloc((size_t)(M * 2 * I) * sizeof(float)); /* [M, 2I]: gate then up */
    float *act = malloc((size_t)(M * I) * sizeof(float));  /* [M, I] */
    int err = h1 && n && gu && act ? 0 : -1;
    if (!err) err = q4_linear_f32(attn, M, A, wo, do_, bo, H, h1);
    if (!err) {
        for (int64_t k = 0; k < M * H; ++k) h1[k] += h[k];
        rms_norm_rows(h1, M, H, ln, eps, n);
        err = q4_linear_f32(n, M, H, wgu, dgu, NULL, 2 * I, gu);
    }
    if (!err) {
        for (int64_t m = 0; m < M; ++m)
            for (int64_t k = 0; k < I; ++k) {
                const float g = gu[m * 2 * I + k], u = gu[m * 2 * I + I + k];
                act[m * I + k] = g / (1.f + expf(-g)) * u; /* silu(g) * u */
            }
        err = q4_linear_f32(act, M, I, wd, dd, NULL, H, out);
    }
    if (!err)
        for (int64_t k = 0; k < M * H; ++k) out[k] += h1[k];
    free(h1);
    free(n);
    free(gu);
    free(act);
    return err;
}

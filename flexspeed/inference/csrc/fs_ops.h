/* flexspeed native decode: norms, activations and attention helpers (included by decode.c). */
#ifndef FS_OPS_H
#define FS_OPS_H
static void norm_rows(const fs_norm *N, const float *x, float *h, int M, int C) {
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * C;
        float *hm = h + (size_t)m * C;
        if (N->kind < 0) {
            memcpy(hm, xm, sizeof(float) * C);
            continue;
        }
        float mean = 0.f, var;
        if (N->kind == 0) {
            float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
            int c = 0;
            for (; c + 8 <= C; c += 8)
                for (int j = 0; j < 8; j++) s[j] += xm[c + j];
            for (; c < C; c++) s[0] += xm[c];
            mean = (((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))) / C;
            for (int c2 = 0; c2 < C; c2++) hm[c2] = xm[c2] - mean;
            var = dot_f32(hm, hm, C);
        } else {
            var = dot_f32(xm, xm, C);
        }
        const float rstd = 1.f / sqrtf(var / C + N->eps);
        for (int c = 0; c < C; c++) {
            float v = (xm[c] - mean) * rstd * (N->w ? param(N->w, N->fmt, c) : 1.f);
            hm[c] = N->b ? v + param(N->b, N->fmt, c) : v;
        }
    }
}

static inline float activate(int act, float v) {
    switch (act) {
    case FS_RELU: return v > 0.f ? v : 0.f;
    case FS_GELU: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case FS_GELU_TANH: return 0.5f * v * (1.f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case FS_SILU: return v / (1.f + expf(-v));
    default: return v;
    }
}

#if FS_FAST
/* exp for 16 lanes: 2^n * p(r), r = x - n ln2, degree-6 polynomial (relative error ~2e-7) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 act16(int act, __m512 v) {
    const __m512 one = _mm512_set1_ps(1.f), half = _mm512_set1_ps(0.5f);
    switch (act) {
    case FS_RELU: return _mm512_max_ps(v, _mm512_setzero_ps());
    case FS_SILU: return _mm512_div_ps(v, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
    case FS_GELU_TANH: { /* tanh(u) = 1 - 2 / (exp(2u) + 1), u clamped where tanh is +-1 in fp32 */
        __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456080286536f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v), _mm512_mul_ps(v, v), v));
        u = _mm512_min_ps(_mm512_max_ps(u, _mm512_set1_ps(-10.f)), _mm512_set1_ps(10.f));
        const __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(exp16(_mm512_add_ps(u, u)), one)));
        return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, t));
    }
    case FS_GELU: { /* erf by Abramowitz-Stegun 7.1.26 (absolute error 1.5e-7) */
        const __m512 z = _mm512_mul_ps(v, _mm512_set1_ps(0.70710678118654752f));
        const __m512 a = _mm512_abs_ps(z);
        const __m512 t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), a, one));
        __m512 p = _mm512_set1_ps(1.061405429f);
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
        p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
        p = _mm512_mul_ps(p, t);
        __m512 e = _mm512_fnmadd_ps(p, exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a))), one);
        e = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(e), _mm512_and_si512(_mm512_castps_si512(z),
                                                                                        _mm512_set1_epi32((int)0x80000000u))));
        return _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_add_ps(one, e));
    }
    default: return v;
    }
}
#endif

#if FS_FAST
/* 16 cache values at element i, fp32 or bf16 */
static inline __m512 kv16(const void *K, size_t i, int bf) {
    if (bf) return _mm512_castsi512_ps(_mm512_slli_epi32(
                   _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)K + i))), 16));
    return _mm512_loadu_ps((const float *)K + i);
}
#endif

/* sc[t] = scale * q . K[t] for t < n (rows of hd values, fp32 or bf16: at long contexts the
 * cache rivals int4 weights, and bf16 halves it) */
static void scores(const float *q, const void *K, int bf, int hd, int n, float scale, float *sc) {
    int t = 0;
#if FS_FAST
    if (hd % 16 == 0 && hd <= 256) {
        __m512 qv[16];
        for (int j = 0; j < hd / 16; j++) qv[j] = _mm512_loadu_ps(q + 16 * j);
        for (; t + 4 <= n; t += 4) { /* four keys at once, reduced together */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const size_t k0 = (size_t)t * hd;
            for (int j = 0; j < hd / 16; j++) {
                a0 = _mm512_fmadd_ps(qv[j], kv16(K, k0 + 16 * j, bf), a0);
                a1 = _mm512_fmadd_ps(qv[j], kv16(K, k0 + hd + 16 * j, bf), a1);
                a2 = _mm512_fmadd_ps(qv[j], kv16(K, k0 + 2 * hd + 16 * j, bf), a2);
                a3 = _mm512_fmadd_ps(qv[j], kv16(K, k0 + 3 * hd + 16 * j, bf), a3);
            }
            const __m128 s4 = sum4(halves(a0), halves(a1), halves(a2), halves(a3));
            _mm_storeu_ps(sc + t, _mm_mul_ps(s4, _mm_set1_ps(scale)));
        }
    }
#endif
    for (; t < n; t++) {
        float d = 0.f;
        for (int j = 0; j < hd; j++) {
            const size_t i = (size_t)t * hd + j;
            d += q[j] * (bf ? bf16_to_f32(((const uint16_t *)K)[i]) : ((const float *)K)[i]);
        }
        sc[t] = d * scale;
    }
}

static void axpy_bf16(float *y, float a, const uint16_t *x, int n) {
    int i = 0;
#if FS_FAST
    const __m512 av = _mm512_set1_ps(a);
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16));
        _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, v, _mm512_loadu_ps(y + i)));
    }
#endif
    for (; i < n; i++) y[i] += a * bf16_to_f32(x[i]);
}

/* sc[t] <- exp(sc[t] - mx) (0 for -inf), returns the sum */
static float softmax_weights(float *sc, int n, float mx) {
    float sum = 0.f;
    int t = 0;
#if FS_FAST
    __m512 acc = _mm512_setzero_ps();
    const __m512 m = _mm512_set1_ps(mx);
    for (; t + 16 <= n; t += 16) {
        const __m512 v = _mm512_loadu_ps(sc + t);
        const __mmask16 live = _mm512_cmp_ps_mask(v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_sub_ps(v, m)));
        _mm512_storeu_ps(sc + t, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; t < n; t++) {
        sc[t] = sc[t] == -INFINITY ? 0.f : expf(sc[t] - mx);
        sum += sc[t];
    }
    return sum;
}

/* a[i] = act(a[i]) (* b[i] when gated), n values */
static void activate_rows(int act, float *a, const float *b, int n) {
    int i = 0;
#if FS_FAST
    for (; i + 16 <= n; i += 16) {
        __m512 v = act16(act, _mm512_loadu_ps(a + i));
        if (b) v = _mm512_mul_ps(v, _mm512_loadu_ps(b + i));
        _mm512_storeu_ps(a + i, v);
    }
#endif
    for (; i < n; i++) a[i] = b ? activate(act, a[i]) * b[i] : activate(act, a[i]);
}

static size_t xs_floats(const fs_linear *L, int M) { return prep_floats(L) * (size_t)M; }
#endif

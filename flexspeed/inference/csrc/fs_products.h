/* flexspeed native decode: the matrix products (included by decode.c after fs_common.h). */
#ifndef FS_PRODUCTS_H
#define FS_PRODUCTS_H
/* ------------------------------------------------------------------ products
 *
 * Each product first "prepares" its input rows once per thread (fast path only): bf16 weights
 * are multiplied with x rounded to bf16 (vdpbf16ps, as torch's bf16 products do). int8 weights:
 * x quantized to 16-bit integers per row (the largest |x| -> 32512; error ~1.5e-5 of the
 * product, far below the weights' own) and split into two int8 halves, q = 256 hi + lo, so each
 * 64 weight bytes take two u8 x s8 vpdpbusd (the weight's sign bit flipped on the fly: w ^ 0x80
 * = w + 128, taken back exactly as 128 * sum(q)). int4 weights, group 64: x quantized to int8
 * per group of 64 (see i4a8_rows); other group sizes: 16-bit per row (vpdpwssd).
 * prep layout per input row: bf16 x (K/2 floats); int8: [hi, lo: kpad64(K) bytes each | scale,
 * then sum(q) as int64]; int4 group 64: [int8 x: even columns, odd columns | 1 float | group
 * scales | group sums]; other int4: [int16 x: even, odd | group sums | the int16 scale]. */

#ifndef FS_I4_A8
#define FS_I4_A8 1
#endif

static inline int n_groups(const fs_linear *L) { return L->fmt == FS_I4 ? L->k / L->group : 0; }
static inline int kpad64(int k) { return (k + 63) & ~63; }

static size_t prep_floats(const fs_linear *L) {
#if FS_FAST
    if (L->fmt == FS_I8) return (size_t)kpad64(L->k) / 2 + 16;
    return L->fmt == FS_F32 ? 0 : (size_t)L->k + n_groups(L) + 16;
#else
    (void)L;
    return 0;
#endif
}

#if FS_FAST
#define MASK16(n) ((n) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n)) - 1))
#define MASK32(n) ((n) >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n)) - 1))

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline float dot_f32(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return hsum(acc);
}

static inline void axpy_f32(float *y, float a, const float *x, int n) {
    const __m512 av = _mm512_set1_ps(a);
    int i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += a * x[i];
}


static float absmax(const float *x, int n) {
    __m512 mx = _mm512_setzero_ps();
    int i = 0;
    for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
    if (i < n) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(MASK16(n - i), x + i)));
    return _mm512_reduce_max_ps(mx);
}

/* 16 floats * inv, rounded to nearest, as int16 */
static inline __m256i q16(__m512 v, __m512 inv) { return _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv))); }

static void prepare(const fs_linear *L, const float *x, int M, int ldx, float *prep) {
    const int K = L->k, ng = n_groups(L);
    const size_t per = prep_floats(L);
    if (L->fmt == FS_F32) return; /* read directly */
    for (int m = 0; m < M; m++) {
        const float *xm = x + (size_t)m * ldx;
        float *p = prep + (size_t)m * per;
        if (L->fmt == FS_BF16) {
            uint16_t *b = (uint16_t *)p;
            int k = 0;
            for (; k + 32 <= K; k += 32)
                _mm512_storeu_si512(b + k, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + k + 16), _mm512_loadu_ps(xm + k)));
            for (; k < K; k++) b[k] = f32_to_bf16(xm[k]);
            continue;
        }
        if (L->fmt == FS_I8) { /* q = x / sx (|q| <= 32512) = 256 hi + lo, lo in [-128, 128) */
            const int Kp = kpad64(K);
            const float mx = absmax(xm, K), sx = mx > 0.f ? mx / 32512.f : 1.f;
            const __m512 inv = _mm512_set1_ps(1.f / sx);
            const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
            int8_t *hi = (int8_t *)p, *lo = hi + Kp;
            __m512i s = _mm512_setzero_si512(); /* per lane: K / 16 values of at most 32512 */
            for (int k = 0; k < Kp; k += 16) { /* zeros past K */
                const __mmask16 mk = k < K ? MASK16(K - k) : 0;
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xm + k), inv));
                const __m512i l = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, c128), c255), c128);
                _mm_storeu_si128((__m128i *)(hi + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(q, l), 8)));
                _mm_storeu_si128((__m128i *)(lo + k), _mm512_cvtepi32_epi8(l));
                s = _mm512_add_epi32(s, q);
            }
            const int64_t sq = _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(s))) +
                               _mm512_reduce_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s, 1)));
            p[Kp / 2] = sx;
            memcpy(p + Kp / 2 + 2, &sq, sizeof sq);
            continue;
        }
        /* int4: x / sx as int16, sx mapping the largest |x| to 16383 */
        const float mx = absmax(xm, K), sx = mx > 0.f ? mx / 16383.f : 1.f;
        const __m512 inv = _mm512_set1_ps(1.f / sx);
        int16_t *q = (int16_t *)p;
        /* int4: even columns, then odd columns (the low and high nibbles of a byte), and group sums */
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
        if (L->group == 64 && FS_I4_A8) { /* int8 per group of 64, for the u8 x s8 product (see i4_rows) */
            int8_t *e8 = (int8_t *)p, *o8 = e8 + K / 2;
            float *sxg = p + K / 4 + 1, *gs = sxg + ng;
            for (int g = 0; g < ng; g++) {
                const float *xg = xm + g * 64;
                __m512 v[4], mxv = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
                for (int i = 0; i < 4; i++) {
                    v[i] = _mm512_loadu_ps(xg + 16 * i);
                    mxv = _mm512_max_ps(mxv, _mm512_abs_ps(v[i]));
                    sum = _mm512_add_ps(sum, v[i]);
                }
                const float gm = _mm512_reduce_max_ps(mxv), sg = gm > 0.f ? gm / 127.f : 1.f;
                const __m512 iv = _mm512_set1_ps(1.f / sg);
                for (int i = 0; i < 2; i++) {
                    const __m512 ev = _mm512_permutex2var_ps(v[2 * i], even, v[2 * i + 1]);
                    const __m512 ov = _mm512_permutex2var_ps(v[2 * i], odd, v[2 * i + 1]);
                    _mm_storeu_si128((__m128i *)(e8 + g * 32 + 16 * i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(ev, iv))));
                    _mm_storeu_si128((__m128i *)(o8 + g * 32 + 16 * i), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(ov, iv))));
                }
                sxg[g] = sg;
                gs[g] = hsum(sum);
            }
            continue;
        }
        const int half = K / 2;
        int j = 0;
        for (; 2 * j + 32 <= K; j += 16) {
            const __m512 a = _mm512_loadu_ps(xm + 2 * j), b = _mm512_loadu_ps(xm + 2 * j + 16);
            _mm256_storeu_si256((__m256i *)(q + j), q16(_mm512_permutex2var_ps(a, even, b), inv));
            _mm256_storeu_si256((__m256i *)(q + half + j), q16(_mm512_permutex2var_ps(a, odd, b), inv));
        }
        for (; j < half; j++) {
            q[j] = (int16_t)lrintf(xm[2 * j] / sx);
            q[half + j] = (int16_t)lrintf(xm[2 * j + 1] / sx);
        }
        const int G = L->group;
        for (int g = 0; g < ng; g++) {
            __m512 acc = _mm512_setzero_ps();
            for (int k = 0; k < G; k += 16) acc = _mm512_add_ps(acc, _mm512_maskz_loadu_ps(MASK16(G - k), xm + g * G + k));
            p[K + g] = hsum(acc);
        }
        p[K + ng] = sx;
    }
}

/* One weight row at a time, read front to back with 256-bit loads into eight accumulators: a
 * purely sequential stream. Measured on the 2-core Zen 4 VM (GB/s of a 2-thread read):
 * 256-bit loads 50-52 against 42-45 with 512-bit ones (Tensor.sum: 47-52); interleaving four rows
 * 31-35; software prefetching only slowed it. For several input rows the weight row is re-read
 * from L1. */
static inline float hsum8(__m256 v) {
    const __m128 q4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 q2 = _mm_add_ps(q4, _mm_movehl_ps(q4, q4));
    return _mm_cvtss_f32(_mm_add_ss(q2, _mm_movehdup_ps(q2)));
}
#define MASK8(n) ((n) >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (n)) - 1))
#define SUM8(a) _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])), \
                              _mm256_add_ps(_mm256_add_ps(a[4], a[5]), _mm256_add_ps(a[6], a[7])))

static void f32_rows(const fs_linear *L, const float *x, int M, int ldx, float *y, int ldy, int r0, int r1) {
    const int K = L->k, k8 = K / 64 * 64;
    for (int r = r0; r < r1; r++) {
        const float *w = (const float *)L->w + (size_t)r * K;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * ldx;
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            int k = 0;
            for (; k < k8; k += 64)
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8 * i), _mm256_loadu_ps(xm + k + 8 * i), a[i]);
            for (; k < K; k += 8) {
                const __mmask8 mk = MASK8(K - k);
                a[0] = _mm256_fmadd_ps(_mm256_maskz_loadu_ps(mk, w + k), _mm256_maskz_loadu_ps(mk, xm + k), a[0]);
            }
            y[(size_t)m * ldy + r] = hsum8(SUM8(a));
        }
    }
}

static void bf16_rows(const fs_linear *L, const float *prep, int M, float *y, int ldy, int r0, int r1) {
    const int K = L->k, k8 = K / 128 * 128;
    const size_t per = prep_floats(L);
    for (int r = r0; r < r1; r++) {
        const uint16_t *w = (const uint16_t *)L->w + (size_t)r * K;
        for (int m = 0; m < M; m++) {
            const uint16_t *xb = (const uint16_t *)(prep + (size_t)m * per);
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            int k = 0;
            for (; k < k8; k += 128)
#pragma GCC unroll 8
                for (int i = 0; i < 8; i++)
                    a[i] = _mm256_dpbf16_ps(a[i], (__m256bh)_mm256_loadu_si256((const __m256i *)(w + k + 16 * i)),
                                            (__m256bh)_mm256_loadu_si256((const __m256i *)(xb + k + 16 * i)));
            for (; k < K; k += 16) {
                const __mmask16 mk = MASK16(K - k);
                a[0] = _mm256_dpbf16_ps(a[0], (__m256bh)_mm256_maskz_loadu_epi16(mk, w + k),
                                        (__m256bh)_mm256_maskz_loadu_epi16(mk, xb + k));
            }
            y[(size_t)m * ldy + r] = hsum8(SUM8(a));
        }
    }
}

/* int8: sum_k w q = 256 sum (w + 128) hi + sum (w + 128) lo - 128 sum q, exactly; w + 128 = w ^ 0x80
 * as u8. Two accumulator pairs, 128 weight bytes a pass. The quantized products prefetch the
 * weights 4 KB ahead: hardware prefetching alone kept too few misses in flight for loops slower
 * than a plain read. Measured (2-core VM, GPT-2-shaped step: every product, 2 threads, in one
 * process against a plain read of the same bytes): int8 1.16 -> 1.06x the read (the former
 * cvtepi8_epi16 + vpdpwssd loop with the prefetch: 1.10x), int4 1.9 -> 1.7x. */
#define FS_PREFETCH2(p) (_mm_prefetch((const char *)(p) + 4096, _MM_HINT_T0), _mm_prefetch((const char *)(p) + 4160, _MM_HINT_T0))
static void i8_rows(const fs_linear *L, const float *prep, int M, float *y, int ldy, int r0, int r1) {
    const int K = L->k, Kp = kpad64(K);
    const size_t per = prep_floats(L);
    const float *sc = (const float *)L->scales;
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    for (int r = r0; r < r1; r++) {
        const int8_t *w = (const int8_t *)L->w + (size_t)r * K;
        for (int m = 0; m < M; m++) {
            const float *p = prep + (size_t)m * per;
            const int8_t *hi = (const int8_t *)p, *lo = hi + Kp;
            int64_t H = 0, Lo = 0, sq;
            for (int k0 = 0; k0 < K; k0 += 32768) { /* the int32 lane sums reduced before they can overflow */
                const int k1 = K - k0 > 32768 ? k0 + 32768 : K, kf = k0 + (k1 - k0) / 128 * 128;
                __m512i h0 = _mm512_setzero_si512(), h1 = h0, l0 = h0, l1 = h0;
                int k = k0;
                for (; k < kf; k += 128) {
                    FS_PREFETCH2(w + k);
                    const __m512i a = _mm512_xor_si512(_mm512_loadu_si512(w + k), flip);
                    const __m512i b = _mm512_xor_si512(_mm512_loadu_si512(w + k + 64), flip);
                    h0 = _mm512_dpbusd_epi32(h0, a, _mm512_loadu_si512(hi + k));
                    l0 = _mm512_dpbusd_epi32(l0, a, _mm512_loadu_si512(lo + k));
                    h1 = _mm512_dpbusd_epi32(h1, b, _mm512_loadu_si512(hi + k + 64));
                    l1 = _mm512_dpbusd_epi32(l1, b, _mm512_loadu_si512(lo + k + 64));
                }
                for (; k < k1; k += 64) { /* masked-off weights: 0 ^ 0x80 = 128, against zeros of x */
                    const __mmask64 mk = k1 - k >= 64 ? ~0ULL : (1ULL << (k1 - k)) - 1;
                    const __m512i a = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + k), flip);
                    h0 = _mm512_dpbusd_epi32(h0, a, _mm512_maskz_loadu_epi8(mk, hi + k));
                    l0 = _mm512_dpbusd_epi32(l0, a, _mm512_maskz_loadu_epi8(mk, lo + k));
                }
                H += _mm512_reduce_add_epi32(_mm512_add_epi32(h0, h1));
                Lo += _mm512_reduce_add_epi32(_mm512_add_epi32(l0, l1));
            }
            const float *tail = p + Kp / 2;
            memcpy(&sq, tail + 2, sizeof sq);
            y[(size_t)m * ldy + r] = (float)(256 * H + Lo - 128 * sq) * tail[0] * sc[r];
        }
    }
}

/* w = (q - 8) * scale + zero, so sum_k w x = scale * sum q x + (zero - 8 scale) * sum x, per group */
static void i4_rows(const fs_linear *L, const float *prep, int M, float *y, int ldy, int r0, int r1) {
    const int K = L->k, G = L->group, ng = K / G, hg = G / 2, half = K / 2;
    const size_t per = prep_floats(L);
    const uint16_t *SZ = (const uint16_t *)L->scales; /* (n, ng, 2): one row's scales are contiguous */
    const __m512i lo4 = _mm512_set1_epi16(15);
    for (int r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)L->w + (size_t)r * half;
        for (int m = 0; m < M; m++) {
            const float *p = prep + (size_t)m * per;
            const int16_t *xe = (const int16_t *)p, *xo = xe + half;
            const float *gs = p + K;
            __m512 f0 = _mm512_setzero_ps(), f1 = f0;
            float c0 = 0.f, c1 = 0.f;
            int g = 0;
            for (; g < ng; g++) {
                const uint8_t *wg = w + (size_t)g * hg;
                __m512i acc = _mm512_setzero_si512();
                for (int j = 0; j < hg; j += 32) {
                    const __mmask32 mk = MASK32(hg - j);
                    const __m512i b = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mk, wg + j));
                    acc = _mm512_dpwssd_epi32(acc, _mm512_and_si512(b, lo4), _mm512_maskz_loadu_epi16(mk, xe + g * hg + j));
                    acc = _mm512_dpwssd_epi32(acc, _mm512_srli_epi16(b, 4), _mm512_maskz_loadu_epi16(mk, xo + g * hg + j));
                }
                const uint16_t *sz = SZ + ((size_t)r * ng + g) * 2;
                const float s = bf16_to_f32(sz[0]), z = bf16_to_f32(sz[1]);
                if (g & 1) {
                    f1 = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(acc), f1);
                    c1 += (z - 8.f * s) * gs[g];
                } else {
                    f0 = _mm512_fmadd_ps(_mm512_set1_ps(s), _mm512_cvtepi32_ps(acc), f0);
                    c0 += (z - 8.f * s) * gs[g];
                }
            }
            y[(size_t)m * ldy + r] = hsum(_mm512_add_ps(f0, f1)) * p[K + ng] + c0 + c1;
        }
    }
}

/* int4, group 64: weights u8 x activations s8 per group (vpdpbusd), two groups (64 bytes) a step,
 * two rows at once (they share the activation loads: one core on cache-resident rows, K = 768 50 ->
 * 57 GB/s of int4 bytes, K = 3072 64-68 -> 71). A row's partial sums stay a vector: each group's
 * scale comes from a register permute of the block's scales (a running index), the offsets (zero -
 * 8 scale) * sum(x_g) are folded in as vectors too, and four rows are reduced together (a
 * transposing hadd tree), which matters for short rows (K = 768: 384 bytes). */
#ifdef __GFNI__ /* the high nibbles: one affine byte transform (bits 4-7 -> 0-3) */
#define FS_HI4(b, m4) _mm512_gf2p8affine_epi64_epi8(b, _mm512_set1_epi64(0x1020408000000000LL), 0)
#else
#define FS_HI4(b, m4) _mm512_and_si512(_mm512_srli_epi16(b, 4), m4)
#endif
/* the lane-sum vectors of rows a and b (b may be a again) */
static inline void i4a8_two(const uint8_t *wa, const uint8_t *wb, const uint32_t *pa, const uint32_t *pb, int ng,
                            const int8_t *e8, const int8_t *o8, const float *sxg, const float *gsum, __m512 *ra,
                            __m512 *rb) {
    const __m512i m4 = _mm512_set1_epi8(15), two = _mm512_set1_epi32(2), hiw = _mm512_set1_epi32((int)0xFFFF0000u);
    const __m512i idx0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 ha = _mm512_setzero_ps(), hb = ha, ca = ha, cb = ha;
#define I4_PAIR(xe, xo, ba, bb) /* one pair of groups: activations xe / xo, the rows' 64 weight bytes ba / bb */ \
    do {                                                                                                       \
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(ba, m4), xe);                 \
        __m512i b = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(bb, m4), xe);                 \
        a = _mm512_dpbusd_epi32(a, FS_HI4(ba, m4), xo);                                                        \
        b = _mm512_dpbusd_epi32(b, FS_HI4(bb, m4), xo);                                                        \
        ha = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, fa), _mm512_cvtepi32_ps(a), ha);                      \
        hb = _mm512_fmadd_ps(_mm512_permutexvar_ps(idx, fb), _mm512_cvtepi32_ps(b), hb);                      \
        idx = _mm512_add_epi32(idx, two);                                                                      \
    } while (0)
    for (int g0 = 0; g0 < ng; g0 += 16) { /* lane = [scale | zero << 16], bf16 pairs */
        const int g1 = ng - g0 > 16 ? g0 + 16 : ng;
        const __mmask16 mk = MASK16(g1 - g0);
        const __m512 sx = _mm512_maskz_loadu_ps(mk, sxg + g0), gs = _mm512_maskz_loadu_ps(mk, gsum + g0);
        const __m512i va = _mm512_maskz_loadu_epi32(mk, pa + g0), vb = _mm512_maskz_loadu_epi32(mk, pb + g0);
        const __m512 sa = _mm512_castsi512_ps(_mm512_slli_epi32(va, 16)), sb = _mm512_castsi512_ps(_mm512_slli_epi32(vb, 16));
        const __m512 fa = _mm512_mul_ps(sa, sx), fb = _mm512_mul_ps(sb, sx);
        ca = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sa, _mm512_castsi512_ps(_mm512_and_si512(va, hiw))), gs, ca);
        cb = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sb, _mm512_castsi512_ps(_mm512_and_si512(vb, hiw))), gs, cb);
        __m512i idx = idx0;
        int g = g0;
        for (; g + 2 <= g1; g += 2) {
            if (!(g & 3)) {
                FS_PREFETCH2(wa + (size_t)g * 32);
                FS_PREFETCH2(wb + (size_t)g * 32);
            }
            const __m512i xe = _mm512_loadu_si512((const void *)(e8 + g * 32)), xo = _mm512_loadu_si512((const void *)(o8 + g * 32));
            const __m512i ba = _mm512_loadu_si512((const void *)(wa + (size_t)g * 32)), bb = _mm512_loadu_si512((const void *)(wb + (size_t)g * 32));
            I4_PAIR(xe, xo, ba, bb);
        }
        if (g < g1) { /* a last single group: the upper lanes are zero weights against zero activations */
            const __m512i xe = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, e8 + g * 32), xo = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, o8 + g * 32);
            const __m512i ba = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wa + (size_t)g * 32), bb = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, wb + (size_t)g * 32);
            I4_PAIR(xe, xo, ba, bb);
        }
    }
#undef I4_PAIR
    *ra = _mm512_add_ps(ha, ca);
    *rb = _mm512_add_ps(hb, cb);
}

/* the lane sums of four vectors, as one 4-float vector */
static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}
static inline __m256 halves(__m512 v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }

static void i4a8_rows(const fs_linear *L, const float *prep, int M, float *y, int ldy, int r0, int r1) {
    const int K = L->k, ng = K / 64, half = K / 2;
    const size_t per = prep_floats(L);
    const uint32_t *pairs = (const uint32_t *)L->scales; /* (n, ng) pairs: one row's scales are contiguous */
    const uint8_t *W = (const uint8_t *)L->w;
    int r = r0;
    /* the scales stream is prefetched as far ahead (in rows) as the weights' 4 KB: left to the
     * hardware, this second stream (1/8 of the bytes) made the products 1.3x a plain read of the
     * same bytes (GPT-2 shapes, 2 threads, ~45 GB/s), and prefetched 1.0-1.1x */
    const int ahead = ((4096 / half + 3) & ~3) > 4 ? ((4096 / half + 3) & ~3) : 4;
    const size_t sbytes = (size_t)4 * ng * sizeof(uint32_t); /* a block of four rows' scales */
    for (; r < r1; r += 4) {
        const int four = r1 - r >= 4;
        for (size_t off = 0; off < sbytes; off += 64)
            _mm_prefetch((const char *)((uintptr_t)(pairs + (size_t)r * ng) + (size_t)ahead * ng * 4 + off), _MM_HINT_T0);
        for (int m = 0; m < M; m++) {
            const float *p = prep + (size_t)m * per;
            const int8_t *e8 = (const int8_t *)p, *o8 = e8 + half;
            const float *sxg = p + K / 4 + 1, *gsum = sxg + ng;
            const uint8_t *w = W + (size_t)r * half;
            const uint32_t *pr = pairs + (size_t)r * ng;
            if (four) {
                __m512 a0, a1, a2, a3;
                i4a8_two(w, w + half, pr, pr + ng, ng, e8, o8, sxg, gsum, &a0, &a1);
                i4a8_two(w + 2 * (size_t)half, w + 3 * (size_t)half, pr + 2 * ng, pr + 3 * ng, ng, e8, o8, sxg, gsum, &a2, &a3);
                _mm_storeu_ps(y + (size_t)m * ldy + r, sum4(halves(a0), halves(a1), halves(a2), halves(a3)));
            } else {
                for (int i = 0; r + i < r1; i += 2) { /* a last odd row goes with itself */
                    const int j = r + i + 1 < r1 ? i + 1 : i;
                    __m512 a, b;
                    i4a8_two(w + (size_t)i * half, w + (size_t)j * half, pr + (size_t)i * ng, pr + (size_t)j * ng, ng, e8, o8,
                             sxg, gsum, &a, &b);
                    y[(size_t)m * ldy + r + i] = hsum(a);
                    if (j != i) y[(size_t)m * ldy + r + j] = hsum(b);
                }
            }
        }
    }
}
#else /* portable C: fp32 arithmetic on the weights as stored */
static inline float dot_f32(const float *a, const float *b, int n) {
    float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    int i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

static inline void axpy_f32(float *y, float a, const float *x, int n) {
    for (int i = 0; i < n; i++) y[i] += a * x[i];
}

static void prepare(const fs_linear *L, const float *x, int M, int ldx, float *prep) {
    (void)L, (void)x, (void)M, (void)ldx, (void)prep;
}

static float weight_at(const fs_linear *L, int r, int k) {
    switch (L->fmt) {
    case FS_F32: return ((const float *)L->w)[(size_t)r * L->k + k];
    case FS_BF16: return bf16_to_f32(((const uint16_t *)L->w)[(size_t)r * L->k + k]);
    case FS_I8: return ((const int8_t *)L->w)[(size_t)r * L->k + k] * ((const float *)L->scales)[r];
    default: {
        const uint8_t b = ((const uint8_t *)L->w)[(size_t)r * (L->k / 2) + k / 2];
        const uint16_t *sz = (const uint16_t *)L->scales + ((size_t)r * (L->k / L->group) + k / L->group) * 2;
        return (float)(((k & 1) ? b >> 4 : b & 15) - 8) * bf16_to_f32(sz[0]) + bf16_to_f32(sz[1]);
    }
    }
}

static void portable_rows(const fs_linear *L, const float *x, int M, int ldx, float *y, int ldy, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * ldx;
            float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}, t = 0.f;
            for (int k = 0; k < L->k; k++) s[k & 7] += weight_at(L, r, k) * xm[k];
            for (int j = 0; j < 8; j++) t += s[j];
            y[(size_t)m * ldy + r] = t;
        }
}
#endif

static void axpy_bf16(float *y, float a, const uint16_t *x, int n);

#if FS_FAST
/* one pass of trans_rows' bf16 product: input features k .. k + 2P of row xm into the outputs
 * [0, n32) of ym, kept in the order of unpacklo/hi (see trans_rows); w0: weight row k at the
 * first output. P is a constant at each call (the loop is unrolled). */
static inline __attribute__((always_inline)) void trans_pass_bf16(const uint16_t *w0, size_t N, const float *xm,
                                                                   float *ym, int n32, int P) {
    __m512bh p[4];
    for (int q = 0; q < P; q++)
        p[q] = (__m512bh)_mm512_set1_epi32((int)((uint32_t)f32_to_bf16(xm[2 * q]) |
                                                 ((uint32_t)f32_to_bf16(xm[2 * q + 1]) << 16)));
    for (int j = 0; j < n32; j += 32) {
        __m512 lo = _mm512_loadu_ps(ym + j), hi = _mm512_loadu_ps(ym + j + 16);
        for (int q = 0; q < P; q++) {
            const __m512i a = _mm512_loadu_si512((const void *)(w0 + 2 * q * N + j));
            const __m512i b = _mm512_loadu_si512((const void *)(w0 + (2 * q + 1) * N + j));
            lo = _mm512_dpbf16_ps(lo, (__m512bh)_mm512_unpacklo_epi16(a, b), p[q]);
            hi = _mm512_dpbf16_ps(hi, (__m512bh)_mm512_unpackhi_epi16(a, b), p[q]);
        }
        _mm512_storeu_ps(ym + j, lo);
        _mm512_storeu_ps(ym + j + 16, hi);
    }
}

/* one pass of trans_rows' fp32 product: input features k .. k + R of row xm into outputs [0, n16) */
static inline __attribute__((always_inline)) void trans_pass_f32(const float *w0, size_t N, const float *xm,
                                                                  float *ym, int n16, int R) {
    __m512 a[8];
    for (int q = 0; q < R; q++) a[q] = _mm512_set1_ps(xm[q]);
    for (int j = 0; j < n16; j += 16) {
        __m512 acc = _mm512_loadu_ps(ym + j);
        for (int q = 0; q < R; q++) acc = _mm512_fmadd_ps(a[q], _mm512_loadu_ps(w0 + q * N + j), acc);
        _mm512_storeu_ps(ym + j, acc);
    }
}
#endif

/* outputs [r0, r1) of y = x W for a weight stored (k, n), over input features [kb, ke): each pass
 * reads a few whole weight rows (contiguous slices of them) into the L1-resident outputs. A pass
 * takes 8 input features for up to 2 rows of x, 4 for more (its weight slices, re-read from L1 for
 * every row of x, then still fit there): for one row of x the outputs' loads and stores per weight
 * byte halve against 4 features a pass, which read the weight at about half the rate of the
 * (n, k) products (GPT-2 shapes, bf16, one thread; 8 a pass: 0.8-0.9 of it). */
static void trans_rows(const fs_linear *L, const float *x, int M, int ldx, float *y, int ldy, int r0, int r1,
                       int kb, int ke) {
    const int N = L->n, n = r1 - r0;
    const int bf = L->fmt == FS_BF16;
    int body = 0; /* outputs [0, body) by vector passes, the rest one by one */
    for (int m = 0; m < M; m++) memset(y + (size_t)m * ldy + r0, 0, sizeof(float) * n);
    int k = kb;
#if FS_FAST
    const int wide = M <= 2; /* 8 input features a pass, else 4 */
    if (bf) {
        /* pairs of input features through vdpbf16ps: rows k, k+1 interleaved by unpacklo/hi hold, in
         * each 128-bit lane L of a 32-output block, outputs 8L..8L+3 (lo) and 8L+4..8L+7 (hi); the
         * outputs stay in that order until the end */
        const uint16_t *W = (const uint16_t *)L->w + r0;
        body = n / 32 * 32;
        for (; k + (wide ? 8 : 4) <= ke; k += wide ? 8 : 4)
            for (int m = 0; m < M; m++) {
                if (wide) trans_pass_bf16(W + (size_t)k * N, N, x + (size_t)m * ldx + k, y + (size_t)m * ldy + r0, body, 4);
                else trans_pass_bf16(W + (size_t)k * N, N, x + (size_t)m * ldx + k, y + (size_t)m * ldy + r0, body, 2);
            }
        for (; k + 2 <= ke; k += 2)
            for (int m = 0; m < M; m++)
                trans_pass_bf16(W + (size_t)k * N, N, x + (size_t)m * ldx + k, y + (size_t)m * ldy + r0, body, 1);
        const __m512i ilo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
        const __m512i ihi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
        for (int m = 0; m < M; m++) { /* back to output order */
            float *ym = y + (size_t)m * ldy + r0;
            for (int j = 0; j < body; j += 32) {
                const __m512 lo = _mm512_loadu_ps(ym + j), hi = _mm512_loadu_ps(ym + j + 16);
                _mm512_storeu_ps(ym + j, _mm512_permutex2var_ps(lo, ilo, hi));
                _mm512_storeu_ps(ym + j + 16, _mm512_permutex2var_ps(lo, ihi, hi));
            }
        }
    } else {
        const float *W = (const float *)L->w + r0;
        body = n / 16 * 16;
        for (; k + (wide ? 8 : 4) <= ke; k += wide ? 8 : 4)
            for (int m = 0; m < M; m++) {
                if (wide) trans_pass_f32(W + (size_t)k * N, N, x + (size_t)m * ldx + k, y + (size_t)m * ldy + r0, body, 8);
                else trans_pass_f32(W + (size_t)k * N, N, x + (size_t)m * ldx + k, y + (size_t)m * ldy + r0, body, 4);
            }
    }
    for (int kk = k; kk < ke; kk++) /* the last input features (fewer than a pass) over the vector outputs */
        for (int m = 0; m < M; m++) {
            const float a = x[(size_t)m * ldx + kk];
            float *ym = y + (size_t)m * ldy + r0;
            if (!bf) axpy_f32(ym, a, (const float *)L->w + (size_t)kk * N + r0, body);
            else axpy_bf16(ym, a, (const uint16_t *)L->w + (size_t)kk * N + r0, body);
        }
    k = kb; /* the outputs past the vector blocks: every input feature */
#endif
    for (; k < ke; k++)
        for (int m = 0; m < M; m++) {
            const float a = x[(size_t)m * ldx + k];
            float *ym = y + (size_t)m * ldy + r0 + body;
            if (!bf) axpy_f32(ym, a, (const float *)L->w + (size_t)k * N + r0 + body, n - body);
            else axpy_bf16(ym, a, (const uint16_t *)L->w + (size_t)k * N + r0 + body, n - body);
        }
}

/* rows [r0, r1) of y = x W^T (+ bias); prep: this thread's preparation of x */
static void linear_rows(const fs_linear *L, const float *x, int M, int ldx, const float *prep, float *y, int ldy,
                        int r0, int r1) {
    if (r0 >= r1) return;
    if (L->trans) {
        (void)prep;
        trans_rows(L, x, M, ldx, y, ldy, r0, r1, 0, L->k);
        goto bias;
    }
#if FS_FAST
    switch (L->fmt) {
    case FS_F32: f32_rows(L, x, M, ldx, y, ldy, r0, r1); break;
    case FS_BF16: bf16_rows(L, prep, M, y, ldy, r0, r1); break;
    case FS_I8: i8_rows(L, prep, M, y, ldy, r0, r1); break;
    default:
        if (L->group == 64 && FS_I4_A8) i4a8_rows(L, prep, M, y, ldy, r0, r1);
        else i4_rows(L, prep, M, y, ldy, r0, r1);
        break;
    }
#else
    (void)prep;
    portable_rows(L, x, M, ldx, y, ldy, r0, r1);
#endif
bias:
    if (L->bias)
        for (int m = 0; m < M; m++)
            for (int r = r0; r < r1; r++) y[(size_t)m * ldy + r] += param(L->bias, L->bias_fmt, r);
}

/* y[:, 0:n) = x W (+ bias) for a transposed (k, n) weight, by all threads: each takes a block of
 * the outputs (whole 32-output vector blocks) over every input feature, i.e. a slice of every weight
 * row. With trans_rows' 8-feature passes this reads the weight as fast as splitting the input
 * features did (each thread whole rows, its partial sums reduced over the threads after a barrier;
 * GPT-2 shapes, 2 threads: both 35-45 GB/s on the busy VM, the (n, k) products the same), without
 * the barrier and the reduction. Returns this thread's output range in r0, r1. */
static void trans_mt(const fs_linear *L, const float *x, int M, int ldx, float *y, int ldy, int tid, int nth,
                     int *r0, int *r1) {
    const int n = L->n, blocks = n / 32;
    *r0 = (int)((int64_t)blocks * tid / nth) * 32;
    *r1 = tid == nth - 1 ? n : (int)((int64_t)blocks * (tid + 1) / nth) * 32;
    linear_rows(L, x, M, ldx, NULL, y, ldy, *r0, *r1); /* trans_rows, then the bias */
}

/* rows [r0, r1) of the side-by-side outputs of parts (np > 0), or of whole (np == 0) */
static void parts_rows(const fs_linear *whole, const fs_linear *parts, int np, const float *x, int M, int ldx,
                       const float *prep, float *y, int ldy, int r0, int r1) {
    if (np == 0) {
        linear_rows(whole, x, M, ldx, prep, y, ldy, r0, r1);
        return;
    }
    int off = 0;
    for (int p = 0; p < np; p++) {
        const int a = r0 > off ? r0 : off, b = r1 < off + parts[p].n ? r1 : off + parts[p].n;
        if (a < b) linear_rows(&parts[p], x, M, ldx, prep, y + off, ldy, a - off, b - off);
        off += parts[p].n;
    }
}
#endif

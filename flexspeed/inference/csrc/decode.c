/* flexspeed native decode step: pre-norm decoder layers for a few new tokens, on the CPU.
 *
 * One call runs a stack of layers (and optionally the final norm + lm_head) for B rows of one
 * new token each, over a preallocated fp32 KV cache (B, H_kv, T_max, head_dim). Weights stay
 * where the model keeps them (row-major (N, K) fp32 / bf16 / int8 per-channel / int4 group-wise
 * "plain" order) and are read once per call: the matrix-vector products stream them at close to
 * memory bandwidth (AVX-512 where the compiler targets it, portable C otherwise).
 *
 * Threads: one OpenMP parallel region per call (libgomp, the runtime torch already loaded);
 * phases are separated by a spinning barrier, as a sleeping one costs more than most phases.
 * Activations are fp32 throughout; results are written in fp32.
 *
 * Compiled at first use by flexspeed/inference/native.py (gcc -O3 -march=native -fopenmp).
 */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define FS_FAST 1
#else
#define FS_FAST 0
#endif

enum { FS_F32 = 0, FS_BF16 = 1, FS_I8 = 2, FS_I4 = 3 };
enum { FS_RELU = 0, FS_GELU = 1, FS_GELU_TANH = 2, FS_SILU = 3, FS_IDENTITY = 4 };

typedef struct {
    int32_t fmt, n, k, group;      /* output rows, input features, int4 group size */
    const void *w;                 /* (n, k) f32/bf16/int8; int4: (n, k/2) bytes, low nibble = even column */
    const void *scales;            /* int8: f32 (n); int4: bf16 (n, k/group, 2) = [scale, zero] per row and group */
    int32_t bias_fmt;              /* FS_F32 or FS_BF16 */
    const void *bias;              /* (n) or NULL */
    int32_t trans;                 /* fp32/bf16 only: w stored (k, n) (HF GPT-2's Conv1D) */
} fs_linear;

typedef struct {
    int32_t kind;                  /* 0 LayerNorm, 1 RMSNorm, -1 none */
    int32_t fmt;                   /* FS_F32 or FS_BF16 (weight and bias) */
    float eps;
    const void *w, *b;             /* (C); b may be NULL */
} fs_norm;

typedef struct {
    fs_norm norm1, norm2;
    fs_linear qkv, out, up, down;  /* qkv rows: [q heads | k heads | v heads]; up: [gate | up] when gated */
    int32_t act, gated;
    int32_t n_heads, n_kv, head_dim;
    float scale;
    void *kc, *vc;                 /* (B, n_kv, t_max, head_dim), fp32 or bf16 (kv_fmt) */
    int32_t kv_fmt;                /* FS_F32 or FS_BF16 */
    /* unfused models: qkv / up computed as up to 3 / 2 matrices side by side (qkv and up then only
     * describe the whole: total rows, format, k, group); 0 = use qkv / up themselves */
    int32_t n_qkv_parts, n_up_parts;
    fs_linear qkv_parts[3], up_parts[2];
} fs_layer;

typedef struct {
    int32_t B, C, start, t_max, nthreads;
    int32_t valid_stride;          /* bytes between rows of valid */
    const uint8_t *valid;          /* (B, >= start+1): 1 = attend to that key; NULL = all */
    const float *cos, *sin;        /* rotary tables (B, head_dim), or NULL */
    float *scratch;                /* fs_scratch_floats() floats */
} fs_step;

/* ------------------------------------------------------------------ helpers */

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even (finite values) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float param(const void *p, int fmt, int i) {
    return fmt == FS_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

typedef struct {
    volatile int count;
    volatile int sense;
} fs_barrier;

static void barrier_wait(fs_barrier *b, int n, int *local) {
    if (n == 1) return;
    *local = !*local;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&b->sense, *local, __ATOMIC_RELEASE);
        return;
    }
    for (long spins = 0; __atomic_load_n(&b->sense, __ATOMIC_ACQUIRE) != *local; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (spins > 20000) sched_yield(); /* the other thread was descheduled: give the core back */
    }
}

/* rows [r0, r1) of n split over threads, in multiples of 4 */
static void split_rows(int n, int tid, int nt, int *r0, int *r1) {
    int blocks = (n + 3) / 4;
    int per = blocks / nt, extra = blocks % nt;
    int b0 = tid * per + (tid < extra ? tid : extra);
    int b1 = b0 + per + (tid < extra ? 1 : 0);
    *r0 = b0 * 4 < n ? b0 * 4 : n;
    *r1 = b1 * 4 < n ? b1 * 4 : n;
}

/* ------------------------------------------------------------------ products
 *
 * Each product first "prepares" its input rows once per thread (fast path only): bf16 weights
 * are multiplied with x rounded to bf16 (vdpbf16ps, as torch's bf16 products do); int8 and int4
 * weights with x quantized to 15-bit integers per row (vpdpwssd; relative error ~3e-5 of the
 * row's largest value, far below the weights' own), so each weight byte costs about one
 * instruction and the products stay bound by memory bandwidth.
 * prep layout per input row, in floats: [bf16 x (K/2) | int16 x: K/2 (int4: even columns, then
 * odd) | group sums of x (K/group, int4) | the int16 scale]. */

#ifndef FS_I4_A8
#define FS_I4_A8 1
#endif

static inline int n_groups(const fs_linear *L) { return L->fmt == FS_I4 ? L->k / L->group : 0; }

static size_t prep_floats(const fs_linear *L) {
#if FS_FAST
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
        /* int8 / int4: x / sx as int16, sx mapping the largest |x| to 16383 */
        const float mx = absmax(xm, K), sx = mx > 0.f ? mx / 16383.f : 1.f;
        const __m512 inv = _mm512_set1_ps(1.f / sx);
        int16_t *q = (int16_t *)p;
        if (L->fmt == FS_I8) {
            int k = 0;
            for (; k + 16 <= K; k += 16) _mm256_storeu_si256((__m256i *)(q + k), q16(_mm512_loadu_ps(xm + k), inv));
            for (; k < K; k++) q[k] = (int16_t)lrintf(xm[k] / sx);
            p[K] = sx;
            continue;
        }
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

static void i8_rows(const fs_linear *L, const float *prep, int M, float *y, int ldy, int r0, int r1) {
    const int K = L->k;
    const size_t per = prep_floats(L);
    const float *sc = (const float *)L->scales;
    for (int r = r0; r < r1; r++) {
        const int8_t *w = (const int8_t *)L->w + (size_t)r * K;
        for (int m = 0; m < M; m++) {
            const float *p = prep + (size_t)m * per;
            const int16_t *xq = (const int16_t *)p;
            __m256 accf = _mm256_setzero_ps();
            for (int k0 = 0; k0 < K; k0 += 4096) { /* int32 sums flushed to fp32 before they can overflow */
                const int k1 = K - k0 > 4096 ? k0 + 4096 : K, k8 = k0 + (k1 - k0) / 128 * 128;
                __m256i a[8];
                for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_si256();
                int k = k0;
                for (; k < k8; k += 128)
#pragma GCC unroll 8
                    for (int i = 0; i < 8; i++)
                        a[i] = _mm256_dpwssd_epi32(a[i], _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + k + 16 * i))),
                                                   _mm256_loadu_si256((const __m256i *)(xq + k + 16 * i)));
                for (; k < k1; k += 16) {
                    const __mmask16 mk = MASK16(k1 - k);
                    a[0] = _mm256_dpwssd_epi32(a[0], _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(mk, w + k)),
                                               _mm256_maskz_loadu_epi16(mk, xq + k));
                }
                __m256i t = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(a[0], a[1]), _mm256_add_epi32(a[2], a[3])),
                                             _mm256_add_epi32(_mm256_add_epi32(a[4], a[5]), _mm256_add_epi32(a[6], a[7])));
                accf = _mm256_add_ps(accf, _mm256_cvtepi32_ps(t));
            }
            y[(size_t)m * ldy + r] = hsum8(accf) * p[K] * sc[r];
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

/* int4, group 64: weights u8 x activations s8 per group (vpdpbusd, ~1 instruction per 32
 * weights). One row's partial sums stay a vector: the scale offsets (zero - 8 scale) * sum(x_g)
 * are folded in as vectors too, and four rows are reduced together (a transposing hadd tree),
 * which matters for short rows (K = 768: 384 bytes a row). */
static inline __m256 i4a8_row(const uint8_t *w, const uint32_t *pairs, int ng, const int8_t *e8, const int8_t *o8,
                              const float *sxg, const float *gsum) {
    const __m256i m4 = _mm256_set1_epi8(15);
    __m256 h0 = _mm256_setzero_ps(), h1 = h0, h2 = h0, h3 = h0;
    __m512 cv = _mm512_setzero_ps();
    float fac[64];
    for (int b0 = 0; b0 < ng; b0 += 64) { /* blocks of 64 groups: K up to 4096 per block */
        const int b1 = ng - b0 > 64 ? b0 + 64 : ng;
        for (int g0 = b0; g0 < b1; g0 += 16) { /* lane = [scale | zero << 16], bf16 pairs */
            const __mmask16 mk = MASK16(b1 - g0);
            const __m512i v = _mm512_maskz_loadu_epi32(mk, pairs + g0);
            const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            const __m512 zc = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
            _mm512_mask_storeu_ps(fac + (g0 - b0), mk, _mm512_mul_ps(sc, _mm512_maskz_loadu_ps(mk, sxg + g0)));
            cv = _mm512_fmadd_ps(_mm512_fnmadd_ps(_mm512_set1_ps(8.f), sc, zc), _mm512_maskz_loadu_ps(mk, gsum + g0), cv);
        }
#define G64(gg, f)                                                                                             \
    do {                                                                                                       \
        const __m256i b = _mm256_loadu_si256((const __m256i *)(w + (size_t)(gg) * 32));                       \
        __m256i a = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_and_si256(b, m4),                       \
                                        _mm256_loadu_si256((const __m256i *)(e8 + (gg) * 32)));                \
        a = _mm256_dpbusd_epi32(a, _mm256_and_si256(_mm256_srli_epi16(b, 4), m4),                              \
                                _mm256_loadu_si256((const __m256i *)(o8 + (gg) * 32)));                        \
        f = _mm256_fmadd_ps(_mm256_broadcast_ss(fac + (gg) - b0), _mm256_cvtepi32_ps(a), f);                   \
    } while (0)
        int g = b0;
        for (; g + 4 <= b1; g += 4) {
            G64(g, h0);
            G64(g + 1, h1);
            G64(g + 2, h2);
            G64(g + 3, h3);
        }
        for (; g < b1; g++) G64(g, h0);
#undef G64
    }
    const __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(cv), _mm512_extractf32x8_ps(cv, 1));
    return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(h0, h1), _mm256_add_ps(h2, h3)), c8);
}

/* the lane sums of four vectors, as one 4-float vector */
static inline __m128 sum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

static void i4a8_rows(const fs_linear *L, const float *prep, int M, float *y, int ldy, int r0, int r1) {
    const int K = L->k, ng = K / 64, half = K / 2;
    const size_t per = prep_floats(L);
    const uint32_t *pairs = (const uint32_t *)L->scales; /* (n, ng) pairs: one row's scales are contiguous */
    for (int r = r0; r < r1; r += 4) {
        const int nr = r1 - r < 4 ? r1 - r : 4;
        for (int m = 0; m < M; m++) {
            const float *p = prep + (size_t)m * per;
            const int8_t *e8 = (const int8_t *)p, *o8 = e8 + half;
            const float *sxg = p + K / 4 + 1, *gsum = sxg + ng;
            __m256 v[4];
            for (int i = 0; i < 4; i++)
                v[i] = i < nr ? i4a8_row((const uint8_t *)L->w + (size_t)(r + i) * half, pairs + (size_t)(r + i) * ng, ng,
                                         e8, o8, sxg, gsum)
                              : _mm256_setzero_ps();
            float out[4];
            _mm_storeu_ps(out, sum4(v[0], v[1], v[2], v[3]));
            for (int i = 0; i < nr; i++) y[(size_t)m * ldy + r + i] = out[i];
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

/* outputs [r0, r1) of y = x W for a weight stored (k, n): four input features at a time, each a
 * contiguous slice of a weight row, accumulated into the (L1-resident) outputs */
static void trans_rows(const fs_linear *L, const float *x, int M, int ldx, float *y, int ldy, int r0, int r1,
                       int kb, int ke) {
    const int K = ke, N = L->n, n = r1 - r0;
    const int bf = L->fmt == FS_BF16;
    for (int m = 0; m < M; m++) memset(y + (size_t)m * ldy + r0, 0, sizeof(float) * n);
    int k = kb;
#if FS_FAST
    if (bf && n % 16 == 0 && (K - kb) % 2 == 0) { /* bf16: pairs of input features through vdpbf16ps */
        /* rows k, k+1 interleaved by unpacklo/hi hold outputs [0-3, 8-11] and [4-7, 12-15] of each
         * 16-output block: the outputs are kept in that order until the end */
        const uint16_t *W = (const uint16_t *)L->w;
        for (; k + 4 <= K; k += 4) { /* two pairs per pass over the outputs: half the output traffic */
            for (int m = 0; m < M; m++) {
                const float *xm = x + (size_t)m * ldx + k;
                const __m256bh p0 = (__m256bh)_mm256_set1_epi32((int)((uint32_t)f32_to_bf16(xm[0]) |
                                                                       ((uint32_t)f32_to_bf16(xm[1]) << 16)));
                const __m256bh p1 = (__m256bh)_mm256_set1_epi32((int)((uint32_t)f32_to_bf16(xm[2]) |
                                                                       ((uint32_t)f32_to_bf16(xm[3]) << 16)));
                float *ym = y + (size_t)m * ldy + r0;
                const uint16_t *w0 = W + (size_t)k * N + r0, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
                for (int j = 0; j < n; j += 16) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(w0 + j));
                    const __m256i b = _mm256_loadu_si256((const __m256i *)(w1 + j));
                    const __m256i c = _mm256_loadu_si256((const __m256i *)(w2 + j));
                    const __m256i d = _mm256_loadu_si256((const __m256i *)(w3 + j));
                    __m256 lo = _mm256_dpbf16_ps(_mm256_loadu_ps(ym + j), (__m256bh)_mm256_unpacklo_epi16(a, b), p0);
                    __m256 hi = _mm256_dpbf16_ps(_mm256_loadu_ps(ym + j + 8), (__m256bh)_mm256_unpackhi_epi16(a, b), p0);
                    lo = _mm256_dpbf16_ps(lo, (__m256bh)_mm256_unpacklo_epi16(c, d), p1);
                    hi = _mm256_dpbf16_ps(hi, (__m256bh)_mm256_unpackhi_epi16(c, d), p1);
                    _mm256_storeu_ps(ym + j, lo);
                    _mm256_storeu_ps(ym + j + 8, hi);
                }
            }
        }
        for (; k + 2 <= K; k += 2) {
            for (int m = 0; m < M; m++) {
                const float *xm = x + (size_t)m * ldx + k;
                const __m256bh xp = (__m256bh)_mm256_set1_epi32((int)((uint32_t)f32_to_bf16(xm[0]) |
                                                                       ((uint32_t)f32_to_bf16(xm[1]) << 16)));
                float *ym = y + (size_t)m * ldy + r0;
                const uint16_t *w0 = W + (size_t)k * N + r0, *w1 = w0 + N;
                for (int j = 0; j < n; j += 16) {
                    const __m256i a = _mm256_loadu_si256((const __m256i *)(w0 + j));
                    const __m256i b = _mm256_loadu_si256((const __m256i *)(w1 + j));
                    _mm256_storeu_ps(ym + j, _mm256_dpbf16_ps(_mm256_loadu_ps(ym + j), (__m256bh)_mm256_unpacklo_epi16(a, b), xp));
                    _mm256_storeu_ps(ym + j + 8, _mm256_dpbf16_ps(_mm256_loadu_ps(ym + j + 8), (__m256bh)_mm256_unpackhi_epi16(a, b), xp));
                }
            }
        }
        for (int m = 0; m < M; m++) { /* back to output order */
            float *ym = y + (size_t)m * ldy + r0;
            for (int j = 0; j < n; j += 16) {
                const __m256 lo = _mm256_loadu_ps(ym + j), hi = _mm256_loadu_ps(ym + j + 8);
                _mm256_storeu_ps(ym + j, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(ym + j + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            }
        }
        return;
    }
#define LDW(kk, j) (bf ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128( \
                         (const __m128i *)((const uint16_t *)L->w + (size_t)(kk) * N + r0 + (j)))), 16)) \
                      : _mm256_loadu_ps((const float *)L->w + (size_t)(kk) * N + r0 + (j)))
    for (; k + 4 <= K; k += 4) {
        for (int m = 0; m < M; m++) {
            const float *xm = x + (size_t)m * ldx + k;
            const __m256 a0 = _mm256_set1_ps(xm[0]), a1 = _mm256_set1_ps(xm[1]), a2 = _mm256_set1_ps(xm[2]),
                         a3 = _mm256_set1_ps(xm[3]);
            float *ym = y + (size_t)m * ldy + r0;
            int j = 0;
            for (; j + 8 <= n; j += 8) {
                __m256 acc = _mm256_loadu_ps(ym + j);
                acc = _mm256_fmadd_ps(a0, LDW(k, j), acc);
                acc = _mm256_fmadd_ps(a1, LDW(k + 1, j), acc);
                acc = _mm256_fmadd_ps(a2, LDW(k + 2, j), acc);
                acc = _mm256_fmadd_ps(a3, LDW(k + 3, j), acc);
                _mm256_storeu_ps(ym + j, acc);
            }
            for (; j < n; j++)
                for (int kk = 0; kk < 4; kk++) {
                    const size_t at = (size_t)(k + kk) * N + r0 + j;
                    ym[j] += xm[kk] * (bf ? bf16_to_f32(((const uint16_t *)L->w)[at]) : ((const float *)L->w)[at]);
                }
        }
    }
#undef LDW
#endif
    for (; k < K; k++)
        for (int m = 0; m < M; m++) {
            const float a = x[(size_t)m * ldx + k];
            float *ym = y + (size_t)m * ldy + r0;
            if (!bf) axpy_f32(ym, a, (const float *)L->w + (size_t)k * N + r0, n);
            else axpy_bf16(ym, a, (const uint16_t *)L->w + (size_t)k * N + r0, n);
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

/* y[:, 0:n) = x W (+ bias) for a transposed (k, n) weight, by all threads: each sums its share of
 * the input features over whole weight rows (contiguous memory: splitting the outputs instead
 * made each thread read half of every row, and the prefetchers fetched the other half too),
 * then, after a barrier, each reduces its share of the outputs over the threads' partials.
 * part: nth * M * n floats of shared scratch. Returns this thread's output range in r0, r1. */
static void trans_mt(const fs_linear *L, const float *x, int M, int ldx, float *y, int ldy, float *part, int tid,
                     int nth, fs_barrier *bar, int *sense, int *r0, int *r1) {
    const int n = L->n;
    int k0, k1;
    split_rows(L->k, tid, nth, &k0, &k1);
    float *mine = part + (size_t)tid * M * n;
    trans_rows(L, x, M, ldx, mine, n, 0, n, k0, k1);
    barrier_wait(bar, nth, sense);
    split_rows(n, tid, nth, r0, r1);
    for (int m = 0; m < M; m++)
        for (int r = *r0; r < *r1; r++) {
            float acc = L->bias ? param(L->bias, L->bias_fmt, r) : 0.f;
            for (int t = 0; t < nth; t++) acc += part[((size_t)t * M + m) * n + r];
            y[(size_t)m * ldy + r] = acc;
        }
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

/* sc[t] = scale * q . K[t] for t < n (rows of hd floats) */
static void scores_f32(const float *q, const float *K, int hd, int n, float scale, float *sc) {
    int t = 0;
#if FS_FAST
    if (hd % 16 == 0 && hd <= 256) {
        __m512 qv[16];
        for (int j = 0; j < hd / 16; j++) qv[j] = _mm512_loadu_ps(q + 16 * j);
        for (; t + 4 <= n; t += 4) { /* four keys at once, reduced together */
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const float *k0 = K + (size_t)t * hd;
            for (int j = 0; j < hd / 16; j++) {
                a0 = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(k0 + 16 * j), a0);
                a1 = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(k0 + hd + 16 * j), a1);
                a2 = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(k0 + 2 * hd + 16 * j), a2);
                a3 = _mm512_fmadd_ps(qv[j], _mm512_loadu_ps(k0 + 3 * hd + 16 * j), a3);
            }
#define HALF8(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))
            const __m128 s4 = sum4(HALF8(a0), HALF8(a1), HALF8(a2), HALF8(a3));
#undef HALF8
            _mm_storeu_ps(sc + t, _mm_mul_ps(s4, _mm_set1_ps(scale)));
        }
    }
#endif
    for (; t < n; t++) sc[t] = dot_f32(q, K + (size_t)t * hd, hd) * scale;
}

/* the same over a bf16 cache (half the bytes: at long contexts the cache rivals int4 weights) */
static void scores_bf16(const float *q, const uint16_t *K, int hd, int n, float scale, float *sc) {
    int t = 0;
#if FS_FAST
    if (hd % 16 == 0 && hd <= 256) {
        __m512 qv[16];
        for (int j = 0; j < hd / 16; j++) qv[j] = _mm512_loadu_ps(q + 16 * j);
#define LD(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
        for (; t + 4 <= n; t += 4) {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            const uint16_t *k0 = K + (size_t)t * hd;
            for (int j = 0; j < hd / 16; j++) {
                a0 = _mm512_fmadd_ps(qv[j], LD(k0 + 16 * j), a0);
                a1 = _mm512_fmadd_ps(qv[j], LD(k0 + hd + 16 * j), a1);
                a2 = _mm512_fmadd_ps(qv[j], LD(k0 + 2 * hd + 16 * j), a2);
                a3 = _mm512_fmadd_ps(qv[j], LD(k0 + 3 * hd + 16 * j), a3);
            }
#define HALF8(a) _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1))
            const __m128 s4 = sum4(HALF8(a0), HALF8(a1), HALF8(a2), HALF8(a3));
#undef HALF8
            _mm_storeu_ps(sc + t, _mm_mul_ps(s4, _mm_set1_ps(scale)));
        }
#undef LD
    }
#endif
    for (; t < n; t++) {
        float d = 0.f;
        for (int j = 0; j < hd; j++) d += q[j] * bf16_to_f32(K[(size_t)t * hd + j]);
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

/* ------------------------------------------------------------------ entry points */

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* partial sums of the transposed (Conv1D) products of a layer: threads x rows x widest output */
static size_t trans_floats(const fs_layer *l, int B, int C, int nthreads) {
    if (!(l->qkv.trans || l->out.trans || l->up.trans || l->down.trans)) return 0;
    size_t w = (size_t)C;
    if ((size_t)l->qkv.n > w) w = l->qkv.n;
    if ((size_t)l->up.n > w) w = l->up.n;
    return (size_t)(nthreads > 0 ? nthreads : 1) * B * w;
}

/* floats of scratch fs_forward needs for these layers (+ head), B rows, t_max keys, nthreads */
int64_t fs_scratch_floats(const fs_layer *layers, int n_layers, const fs_linear *head, int B, int C, int t_max,
                          int nthreads) {
    size_t shared = 0, priv = (size_t)B * C; /* priv: normed input + int4 prep, per thread */
    size_t prep = head ? xs_floats(head, B) : 0;
    for (int i = 0; i < n_layers; i++) {
        const fs_layer *l = &layers[i];
        size_t qkv = (size_t)B * l->qkv.n, att = (size_t)B * l->n_heads * l->head_dim;
        size_t up = (size_t)B * l->up.n, scores = (size_t)B * l->n_heads * t_max;
        shared = max_sz(shared, qkv + att + up + scores + trans_floats(l, B, C, nthreads));
        prep = max_sz(prep, max_sz(max_sz(xs_floats(&l->qkv, B), xs_floats(&l->out, B)),
                                   max_sz(xs_floats(&l->up, B), xs_floats(&l->down, B))));
    }
    return (int64_t)(shared + (priv + prep) * (size_t)nthreads + 64);
}

int fs_fast_path(void) { return FS_FAST; }

/* x (B, C) fp32 in/out (the residual stream); logits (B, head->n) fp32 when head != NULL */
/* mode 0: whole layers, residual adds into x. mode 1 / 2: one layer's attention / MLP half only,
 * its projection written to out (B, C) and x left alone (tensor parallelism: the caller sums the
 * ranks' outputs, then adds them to x). */
static int forward_impl(const fs_layer *layers, int n_layers, const fs_norm *final_norm, const fs_linear *head,
                        float *x, float *logits, const fs_step *st, int mode, float *out) {
    const int B = st->B, C = st->C, nt = st->nthreads > 0 ? st->nthreads : 1;
    size_t shared = 0, prep = head ? xs_floats(head, B) : 0;
    for (int i = 0; i < n_layers; i++) {
        const fs_layer *l = &layers[i];
        if (l->qkv.k != C || l->out.n != C || l->down.n != C) return -1;
        size_t s = (size_t)B * (l->qkv.n + l->n_heads * l->head_dim + l->up.n + l->n_heads * st->t_max);
        shared = max_sz(shared, s + trans_floats(l, B, C, nt));
        prep = max_sz(prep, max_sz(max_sz(xs_floats(&l->qkv, B), xs_floats(&l->out, B)),
                                   max_sz(xs_floats(&l->up, B), xs_floats(&l->down, B))));
    }
    if (head && head->k != C) return -1;
    fs_barrier bar = {0, 0};

#pragma omp parallel num_threads(nt)
    {
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
        int sense = 0;
        float *base = st->scratch;
        float *priv = base + shared + (size_t)tid * ((size_t)B * C + prep);
        float *h = priv, *xs = priv + (size_t)B * C;
        int r0, r1;
        for (int li = 0; li < n_layers; li++) {
            const fs_layer *l = &layers[li];
            const int hd = l->head_dim, hq = l->n_heads, hkv = l->n_kv, qn = l->qkv.n;
            float *qkv = base, *att = qkv + (size_t)B * qn, *up = att + (size_t)B * hq * hd;
            float *scores = up + (size_t)B * l->up.n;
            float *tpart = scores + (size_t)B * hq * st->t_max; /* transposed products' partials */

            if (mode == 2) goto mlp;
            /* attention input: every thread norms the (few) rows itself: no barrier needed */
            norm_rows(&l->norm1, x, h, B, C);
            prepare(&l->qkv, h, B, C, xs);
            if (l->qkv.trans && !l->n_qkv_parts) {
                trans_mt(&l->qkv, h, B, C, qkv, qn, tpart, tid, nth, &bar, &sense, &r0, &r1);
            } else {
                split_rows(qn, tid, nth, &r0, &r1);
                parts_rows(&l->qkv, l->qkv_parts, l->n_qkv_parts, h, B, C, xs, qkv, qn, r0, r1);
            }
            barrier_wait(&bar, nth, &sense);

            /* rotary embedding and cache write, split over (row, head) */
            for (int p = tid; p < B * (hq + hkv); p += nth) {
                const int b = p / (hq + hkv), hh = p % (hq + hkv);
                float *v = qkv + (size_t)b * qn + (size_t)hh * hd; /* a q head, then the k heads */
                if (st->cos) {
                    const float *cs = st->cos + (size_t)b * hd, *sn = st->sin + (size_t)b * hd;
                    const int half = hd / 2;
                    for (int d = 0; d < half; d++) {
                        const float a = v[d], c = v[d + half];
                        v[d] = a * cs[d] - c * sn[d];
                        v[d + half] = c * cs[d + half] + a * sn[d + half];
                    }
                }
                if (hh >= hq) {
                    const int kh = hh - hq;
                    const size_t at = (((size_t)b * hkv + kh) * st->t_max + st->start) * hd;
                    const float *vv = qkv + (size_t)b * qn + (size_t)(hq + hkv + kh) * hd;
                    if (l->kv_fmt == FS_BF16) {
                        for (int d = 0; d < hd; d++) {
                            ((uint16_t *)l->kc)[at + d] = f32_to_bf16(v[d]);
                            ((uint16_t *)l->vc)[at + d] = f32_to_bf16(vv[d]);
                        }
                    } else {
                        memcpy((float *)l->kc + at, v, sizeof(float) * hd);
                        memcpy((float *)l->vc + at, vv, sizeof(float) * hd);
                    }
                }
            }
            barrier_wait(&bar, nth, &sense);

            /* attention of one query per (row, head) over keys 0..start */
            const int T = st->start + 1;
            for (int p = tid; p < B * hq; p += nth) {
                const int b = p / hq, hh = p % hq, kh = hh / (hq / hkv);
                const float *q = qkv + (size_t)b * qn + (size_t)hh * hd;
                const size_t kv0 = ((size_t)b * hkv + kh) * st->t_max * hd;
                const int kvb = l->kv_fmt == FS_BF16;
                const uint8_t *ok = st->valid ? st->valid + (size_t)b * st->valid_stride : NULL;
                float *sc = scores + (size_t)p * st->t_max, mx = -INFINITY;
                if (kvb) scores_bf16(q, (const uint16_t *)l->kc + kv0, hd, T, l->scale, sc);
                else scores_f32(q, (const float *)l->kc + kv0, hd, T, l->scale, sc);
                for (int t = 0; t < T; t++) {
                    if (ok && !ok[t]) sc[t] = -INFINITY;
                    else if (sc[t] > mx) mx = sc[t];
                }
                float *o = att + (size_t)b * hq * hd + (size_t)hh * hd;
                for (int j = 0; j < hd; j++) o[j] = 0.f;
                if (mx == -INFINITY) continue; /* every key masked: zeros (torch gives NaN) */
                const float sum = softmax_weights(sc, T, mx); /* sc[t] <- exp(sc[t] - mx); masked keys 0 */
                for (int t = 0; t < T; t++) {
                    if (sc[t] == 0.f) continue;
                    if (kvb) axpy_bf16(o, sc[t], (const uint16_t *)l->vc + kv0 + (size_t)t * hd, hd);
                    else axpy_f32(o, sc[t], (const float *)l->vc + kv0 + (size_t)t * hd, hd);
                }
                const float inv = 1.f / sum;
                for (int j = 0; j < hd; j++) o[j] *= inv;
            }
            barrier_wait(&bar, nth, &sense);

            /* output projection + residual, split over output features */
            const int ad = hq * hd;
            prepare(&l->out, att, B, ad, xs);
            if (l->out.trans) {
                trans_mt(&l->out, att, B, ad, h, C, tpart, tid, nth, &bar, &sense, &r0, &r1);
            } else {
                split_rows(C, tid, nth, &r0, &r1);
                linear_rows(&l->out, att, B, ad, xs, h, C, r0, r1); /* into h (private: the normed input is spent) */
            }
            for (int m = 0; m < B; m++)
                for (int r = r0; r < r1; r++) {
                    if (mode == 0) x[(size_t)m * C + r] += h[(size_t)m * C + r];
                    else out[(size_t)m * C + r] = h[(size_t)m * C + r];
                }
            barrier_wait(&bar, nth, &sense);
            if (mode == 1) continue;
        mlp:

            /* MLP: up (+ activation, + gate), then down + residual */
            norm_rows(&l->norm2, x, h, B, C);
            prepare(&l->up, h, B, C, xs);
            const int un = l->up.n, f = l->gated ? un / 2 : un;
            if (l->up.trans && !l->n_up_parts && !l->gated) {
                trans_mt(&l->up, h, B, C, up, un, tpart, tid, nth, &bar, &sense, &r0, &r1);
            } else {
                split_rows(f, tid, nth, &r0, &r1);
                parts_rows(&l->up, l->up_parts, l->n_up_parts, h, B, C, xs, up, un, r0, r1);
            }
            if (l->gated) parts_rows(&l->up, l->up_parts, l->n_up_parts, h, B, C, xs, up, un, f + r0, f + r1);
            for (int m = 0; m < B; m++) {
                float *um = up + (size_t)m * un;
                activate_rows(l->act, um + r0, l->gated ? um + f + r0 : NULL, r1 - r0);
            }
            barrier_wait(&bar, nth, &sense);

            prepare(&l->down, up, B, un, xs);
            if (l->down.trans) {
                trans_mt(&l->down, up, B, un, h, C, tpart, tid, nth, &bar, &sense, &r0, &r1);
            } else {
                split_rows(C, tid, nth, &r0, &r1);
                linear_rows(&l->down, up, B, un, xs, h, C, r0, r1);
            }
            for (int m = 0; m < B; m++)
                for (int r = r0; r < r1; r++) {
                    if (mode == 0) x[(size_t)m * C + r] += h[(size_t)m * C + r];
                    else out[(size_t)m * C + r] = h[(size_t)m * C + r];
                }
            barrier_wait(&bar, nth, &sense);
        }
        if (head) {
            if (final_norm) norm_rows(final_norm, x, h, B, C);
            else memcpy(h, x, sizeof(float) * B * C);
            prepare(head, h, B, C, xs);
            split_rows(head->n, tid, nth, &r0, &r1);
            linear_rows(head, h, B, C, xs, logits, head->n, r0, r1);
        }
    }
    return 0;
}

int fs_forward(const fs_layer *layers, int n_layers, const fs_norm *final_norm, const fs_linear *head, float *x,
               float *logits, const fs_step *st) {
    return forward_impl(layers, n_layers, final_norm, head, x, logits, st, 0, NULL);
}

/* one layer's attention (part 0) or MLP (part 1) projection into out (B, C); x is only read */
int fs_layer_part(const fs_layer *layer, int part, const float *x, float *out, const fs_step *st) {
    if (part != 0 && part != 1) return -2;
    return forward_impl(layer, 1, NULL, NULL, (float *)x, NULL, st, part + 1, out);
}

/* ------------------------------------------------------------------ shared-memory all-reduce
 *
 * For the ranks of one tensor-parallel group on one host: gloo's all-reduce of a few KB costs
 * ~1.4 ms on loopback here (a send/recv round trip 0.16 ms), 24 of them per OPT-125M token.
 * Layout of the segment: a header of per-rank sequence numbers (one cache line each), then two
 * buffers per rank of `cap` floats. A call copies x into this rank's buffer (call parity picks
 * which), publishes its sequence number, waits for every rank's, and sums the buffers in rank
 * order, so every rank gets bit-identical results. Two buffers suffice: a rank can start call
 * s+2 only after every rank has published s+1, i.e. finished reading call s. */
typedef struct {
    volatile int64_t seq;
    char pad[56];
} fs_seq;

int64_t fs_shm_bytes(int world, int64_t cap) { return (int64_t)world * 64 + (int64_t)world * 2 * cap * 4; }

/* x (n) <- the sum over ranks of x; with accum != NULL, accum += that sum instead (x unchanged) */
int fs_shm_allreduce(void *seg, int rank, int world, int64_t cap, float *x, int64_t n, int64_t call,
                     double timeout_s, float *accum) {
    if (n > cap) return -1;
    fs_seq *seqs = (fs_seq *)seg;
    float *bufs = (float *)((char *)seg + (size_t)world * 64);
    const int parity = (int)(call & 1);
    float *mine = bufs + ((size_t)rank * 2 + parity) * cap;
    memcpy(mine, x, sizeof(float) * n);
    __atomic_store_n(&seqs[rank].seq, call, __ATOMIC_RELEASE);
    for (int j = 0; j < world; j++) {
        long spins = 0;
        double since = 0.;
        while (__atomic_load_n(&seqs[j].seq, __ATOMIC_ACQUIRE) < call) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (++spins <= 20000) continue;
            sched_yield(); /* the other rank is descheduled or slow: give the core back */
            if (spins % 1024 == 0) {
                const double now = omp_get_wtime();
                if (since == 0.) since = now;
                else if (now - since > timeout_s) return -2; /* a rank stopped answering */
            }
        }
    }
    for (int64_t i = 0; i < n; i++) {
        float acc = 0.f;
        for (int j = 0; j < world; j++) acc += bufs[((size_t)j * 2 + parity) * cap + i];
        if (accum) accum[i] += acc;
        else x[i] = acc;
    }
    return 0;
}

/* out[r] = the index of the largest of x[r, 0:n] (the first on ties, as torch.argmax; NaN wins) */
void fs_argmax(const float *x, int64_t rows, int64_t n, int64_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *v = x + r * n;
        int64_t best = 0;
        float bv = v[0];
        int64_t i = 1;
#if FS_FAST
        if (n >= 32) { /* the maximum by vectors, then its first position */
            __m512 m = _mm512_set1_ps(-INFINITY);
            __mmask16 nan = 0;
            for (i = 0; i + 16 <= n; i += 16) {
                const __m512 a = _mm512_loadu_ps(v + i);
                nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
                m = _mm512_max_ps(m, a);
            }
            float mx = _mm512_reduce_max_ps(m);
            for (int64_t j = i; j < n; j++) {
                if (v[j] != v[j]) nan = 1;
                if (v[j] > mx) mx = v[j];
            }
            int64_t at = 0;
            if (nan) {
                while (v[at] == v[at]) at++;
            } else {
                while (v[at] != mx) at++;
            }
            out[r] = at;
            continue;
        }
#endif
        for (; i < n; i++) {
            if (v[i] != v[i]) { best = i; break; }
            if (v[i] > bv) { bv = v[i]; best = i; }
        }
        if (bv != bv) best = 0;
        out[r] = best;
    }
}

/* out[i, :] = row ids[i] of L's weight, dequantized to fp32 (embedding lookups in a tied head) */
int fs_rows(const fs_linear *L, const int64_t *ids, int64_t n, float *out) {
    const int K = L->k;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ids[i];
        if (r < 0 || r >= L->n) return -1;
        float *o = out + i * K;
        switch (L->fmt) {
        case FS_F32: memcpy(o, (const float *)L->w + r * K, sizeof(float) * K); break;
        case FS_BF16:
            for (int k = 0; k < K; k++) o[k] = bf16_to_f32(((const uint16_t *)L->w)[r * K + k]);
            break;
        case FS_I8: {
            const float sc = ((const float *)L->scales)[r];
            for (int k = 0; k < K; k++) o[k] = ((const int8_t *)L->w)[r * K + k] * sc;
            break;
        }
        default: {
            const uint8_t *row = (const uint8_t *)L->w + r * (K / 2);
            const uint16_t *sz = (const uint16_t *)L->scales + r * (K / L->group) * 2;
            for (int k = 0; k < K; k++) {
                const int q = (k & 1) ? row[k / 2] >> 4 : row[k / 2] & 15;
                const uint16_t *g = sz + (k / L->group) * 2;
                o[k] = (float)(q - 8) * bf16_to_f32(g[0]) + bf16_to_f32(g[1]);
            }
        }
        }
    }
    return 0;
}

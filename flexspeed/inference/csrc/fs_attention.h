/* flexspeed native attention over strided torch tensors (included by decode.c after fs_ops.h).
 *
 * fs_attention: softmax(scale * q k^T) v for T new queries per (row, head) over the keys
 * [0, start + T) of a cache, with GQA (query head h reads kv head h / (Hq / Hkv)), a causal rule
 * (query i sees keys <= start + i) and/or an explicit mask, fp32 accumulation and softmax. Inputs
 * and output are fp32 or bf16 alike; the head dimension is contiguous, every other dimension has
 * a free stride, so a cache buffer is read in place and the output can be written straight in the
 * (B, T, Hq * hd) layout of the output projection. A query that may attend to no key gets zeros.
 *
 * Work is split over (row, kv head) pairs. With many queries per pair (a prompt) the pair's keys
 * are converted once to fp32 and transposed, so 16 scores come from hd broadcast FMAs with no
 * horizontal sums, and its values to fp32 rows; with few (decoding) the cache rows are read once
 * each, four keys per reduction. */
#ifndef FS_ATTENTION_H
#define FS_ATTENTION_H
#include <stdlib.h>


static inline float attn_load(const void *p, int bf, int64_t i) {
    return bf ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* keys [0, n) query i of row b may see (the causal rule); the mask is applied per key */
static inline int attn_limit(const fs_attn *a, int i) {
    const int S = a->start + a->T;
    return a->causal && a->start + i + 1 < S ? a->start + i + 1 : S;
}

/* sc[j] = -inf where the mask bars key j < n; returns the max of the rest */
static float attn_mask_max(const fs_attn *a, int b, int i, float *sc, int n) {
    const uint8_t *m = a->mask ? a->mask + (int64_t)b * a->m_b + (int64_t)i * a->m_t : NULL;
    float mx = -INFINITY;
    int j = 0;
#if FS_FAST
    if (!m) {
        __m512 v = _mm512_set1_ps(-INFINITY);
        for (; j + 16 <= n; j += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(sc + j));
        mx = _mm512_reduce_max_ps(v);
    }
#endif
    for (; j < n; j++) {
        if (m && !m[j]) sc[j] = -INFINITY;
        else if (sc[j] > mx) mx = sc[j];
    }
    return mx;
}

static void attn_store(const fs_attn *a, int b, int h, int i, const float *o, float inv) {
    const int64_t at = (int64_t)b * a->o_b + (int64_t)h * a->o_h + (int64_t)i * a->o_t;
    int d = 0;
#if FS_FAST
    for (; d + 16 <= a->hd; d += 16) {
        const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(o + d), _mm512_set1_ps(inv));
        if (a->fmt == FS_BF16) _mm256_storeu_si256((__m256i *)((uint16_t *)a->out + at + d), (__m256i)_mm512_cvtneps_pbh(y));
        else _mm512_storeu_ps((float *)a->out + at + d, y);
    }
#endif
    for (; d < a->hd; d++) {
        const float y = o[d] * inv;
        if (a->fmt == FS_BF16) ((uint16_t *)a->out)[at + d] = f32_to_bf16(y);
        else ((float *)a->out)[at + d] = y;
    }
}

/* the query's softmax over sc[0, n) in place (barred keys 0); o zeroed; returns 1 / the sum, or 0
 * when no key may be attended (the query's output is then stored as zeros) */
static float attn_softmax(const fs_attn *a, int b, int h, int i, float *sc, int n, float *o) {
    const float mx = attn_mask_max(a, b, i, sc, n);
    for (int d = 0; d < a->hd; d++) o[d] = 0.f;
    if (mx == -INFINITY) {
        attn_store(a, b, h, i, o, 0.f);
        return 0.f;
    }
    return 1.f / softmax_weights(sc, n, mx);
}

#if FS_FAST
/* o[r * hd ...] = sum_j p[r * ps + j] * V row j, for NQ queries at once (hd % 64 == 0): each
 * value row is loaded once for all of them and the sums stay in registers. V rows: fp32 or bf16,
 * vs elements apart. */
#define FS_ATTN_PV(NAME, NQ)                                                                        \
    static void NAME(const float *p, int ps, int n, const void *V, int bf, int64_t vs, int hd, float *o) { \
        for (int c0 = 0; c0 < hd; c0 += 64) {                                                       \
            __m512 acc[NQ][4];                                                                      \
            for (int r = 0; r < NQ; r++)                                                            \
                for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();                        \
            for (int j = 0; j < n; j++) {                                                           \
                const size_t at = (size_t)j * vs + c0;                                              \
                const __m512 v0 = kv16(V, at, bf), v1 = kv16(V, at + 16, bf), v2 = kv16(V, at + 32, bf), \
                             v3 = kv16(V, at + 48, bf);                                             \
                for (int r = 0; r < NQ; r++) {                                                      \
                    const __m512 pr = _mm512_set1_ps(p[(size_t)r * ps + j]);                        \
                    acc[r][0] = _mm512_fmadd_ps(pr, v0, acc[r][0]);                                 \
                    acc[r][1] = _mm512_fmadd_ps(pr, v1, acc[r][1]);                                 \
                    acc[r][2] = _mm512_fmadd_ps(pr, v2, acc[r][2]);                                 \
                    acc[r][3] = _mm512_fmadd_ps(pr, v3, acc[r][3]);                                 \
                }                                                                                   \
            }                                                                                       \
            for (int r = 0; r < NQ; r++)                                                            \
                for (int c = 0; c < 4; c++) _mm512_storeu_ps(o + (size_t)r * hd + c0 + 16 * c, acc[r][c]); \
        }                                                                                           \
    }
FS_ATTN_PV(attn_pv1, 1)
FS_ATTN_PV(attn_pv4, 4)
#undef FS_ATTN_PV

/* prompt-sized work, hd % 64 == 0: four queries of one head at a time share each load of the
 * transposed keys (scores) and of the value rows (outputs) */
static void attn_blocked4(const fs_attn *a, int b, int h, const float *kt, const float *vf, float *sc, float *o,
                          int sp) {
    const int bf = a->fmt == FS_BF16, hd = a->hd;
    float q[4][512];
    for (int i0 = 0; i0 < a->T; i0 += 4) {
        const int nq = a->T - i0 < 4 ? a->T - i0 : 4;
        const __m512 scale = _mm512_set1_ps(a->scale);
        for (int r = 0; r < 4; r++) {
            const int64_t q0 = (int64_t)b * a->q_b + (int64_t)h * a->q_h + (int64_t)(i0 + r) * a->q_t;
            for (int d = 0; d < hd; d += 16)
                _mm512_storeu_ps(q[r] + d, r < nq ? _mm512_mul_ps(kv16(a->q, (size_t)q0 + d, bf), scale) : _mm512_setzero_ps());
        }
        const int nmax = attn_limit(a, i0 + nq - 1);
        for (int j = 0; j < nmax; j += 16) { /* sp >= nmax rounded up to 16: the padding keys are zeros */
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int d = 0; d < hd; d++) {
                const __m512 kv = _mm512_loadu_ps(kt + (size_t)d * sp + j);
                s0 = _mm512_fmadd_ps(_mm512_set1_ps(q[0][d]), kv, s0);
                s1 = _mm512_fmadd_ps(_mm512_set1_ps(q[1][d]), kv, s1);
                s2 = _mm512_fmadd_ps(_mm512_set1_ps(q[2][d]), kv, s2);
                s3 = _mm512_fmadd_ps(_mm512_set1_ps(q[3][d]), kv, s3);
            }
            _mm512_storeu_ps(sc + j, s0);
            _mm512_storeu_ps(sc + sp + j, s1);
            _mm512_storeu_ps(sc + 2 * sp + j, s2);
            _mm512_storeu_ps(sc + 3 * sp + j, s3);
        }
        float inv[4] = {0.f, 0.f, 0.f, 0.f};
        for (int r = 0; r < 4; r++) {
            float *row = sc + (size_t)r * sp;
            const int n = r < nq ? attn_limit(a, i0 + r) : 0;
            const float mx = n ? attn_mask_max(a, b, i0 + r, row, n) : -INFINITY;
            if (mx == -INFINITY) {
                memset(row, 0, sizeof(float) * nmax);
                continue;
            }
            inv[r] = 1.f / softmax_weights(row, n, mx);
            if (n < nmax) memset(row + n, 0, sizeof(float) * (nmax - n));
        }
        attn_pv4(sc, sp, nmax, vf, 0, hd, hd, o);
        for (int r = 0; r < nq; r++) attn_store(a, b, h, i0 + r, o + (size_t)r * hd, inv[r]);
    }
}
#endif

/* few queries: each reads the cache rows of its pair directly */
static void attn_direct(const fs_attn *a, int b, int kh, float *sc, float *o) {
    const int bf = a->fmt == FS_BF16, hd = a->hd, G = a->Hq / a->Hkv;
    const int64_t k0 = (int64_t)b * a->k_b + (int64_t)kh * a->k_h, v0 = (int64_t)b * a->v_b + (int64_t)kh * a->v_h;
    float q[512];
    for (int g = 0; g < G; g++) {
        const int h = kh * G + g;
        for (int i = 0; i < a->T; i++) {
            const int64_t q0 = (int64_t)b * a->q_b + (int64_t)h * a->q_h + (int64_t)i * a->q_t;
            for (int d = 0; d < hd; d++) q[d] = attn_load(a->q, bf, q0 + d);
            const int n = attn_limit(a, i);
            int j = 0;
#if FS_FAST
            if (a->k_t == hd) { /* contiguous rows: fs_ops.h's four-keys-per-reduction scores */
                scores(q, bf ? (const void *)((const uint16_t *)a->k + k0) : (const void *)((const float *)a->k + k0),
                       bf, hd, n, a->scale, sc);
                j = n;
            }
#endif
            for (; j < n; j++) {
                float s = 0.f;
                for (int d = 0; d < hd; d++) s += q[d] * attn_load(a->k, bf, k0 + (int64_t)j * a->k_t + d);
                sc[j] = s * a->scale;
            }
            const float inv = attn_softmax(a, b, h, i, sc, n, o);
            if (inv == 0.f) continue;
#if FS_FAST
            if (hd % 64 == 0) {
                attn_pv1(sc, 0, n, bf ? (const void *)((const uint16_t *)a->v + v0) : (const void *)((const float *)a->v + v0),
                         bf, a->v_t, hd, o);
                attn_store(a, b, h, i, o, inv);
                continue;
            }
#endif
            for (j = 0; j < n; j++) {
                if (sc[j] == 0.f) continue;
                const int64_t r = v0 + (int64_t)j * a->v_t;
                if (bf) axpy_bf16(o, sc[j], (const uint16_t *)a->v + r, hd);
                else axpy_f32(o, sc[j], (const float *)a->v + r, hd);
            }
            attn_store(a, b, h, i, o, inv);
        }
    }
}

/* many queries: keys converted to fp32 and transposed (kt: hd x sp), values to fp32 rows (vf) */
static void attn_blocked(const fs_attn *a, int b, int kh, float *kt, float *vf, float *sc, float *o, int sp) {
    const int bf = a->fmt == FS_BF16, hd = a->hd, G = a->Hq / a->Hkv, S = a->start + a->T;
    const int64_t k0 = (int64_t)b * a->k_b + (int64_t)kh * a->k_h, v0 = (int64_t)b * a->v_b + (int64_t)kh * a->v_h;
#if FS_FAST
    if (hd % 64 == 0) { /* values as fp32 rows; keys as fp32 rows in o's place, then transposed by gathers */
        float *kf = sc;     /* the caller sized sc for sp * hd floats on this path */
        for (int j = 0; j < sp; j++) {
            for (int d = 0; d < hd; d += 16) {
                const int live = j < S;
                _mm512_storeu_ps(kf + (size_t)j * hd + d, live ? kv16(a->k, (size_t)(k0 + (int64_t)j * a->k_t + d), bf)
                                                                : _mm512_setzero_ps());
                if (live) _mm512_storeu_ps(vf + (size_t)j * hd + d, kv16(a->v, (size_t)(v0 + (int64_t)j * a->v_t + d), bf));
            }
        }
        const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                _mm512_set1_epi32(hd));
        for (int j = 0; j < sp; j += 16)
            for (int d = 0; d < hd; d++)
                _mm512_storeu_ps(kt + (size_t)d * sp + j, _mm512_i32gather_ps(rows, kf + (size_t)j * hd + d, 4));
        for (int g = 0; g < G; g++) attn_blocked4(a, b, kh * G + g, kt, vf, sc, o, sp);
        return;
    }
#endif
    for (int j = 0; j < sp; j++) {
        for (int d = 0; d < hd; d++) {
            kt[(size_t)d * sp + j] = j < S ? attn_load(a->k, bf, k0 + (int64_t)j * a->k_t + d) : 0.f;
            if (j < S) vf[(size_t)j * hd + d] = attn_load(a->v, bf, v0 + (int64_t)j * a->v_t + d);
        }
    }
    float q[512];
    for (int g = 0; g < G; g++) {
        const int h = kh * G + g;
        for (int i = 0; i < a->T; i++) {
            const int64_t q0 = (int64_t)b * a->q_b + (int64_t)h * a->q_h + (int64_t)i * a->q_t;
            for (int d = 0; d < hd; d++) q[d] = attn_load(a->q, bf, q0 + d) * a->scale;
            const int n = attn_limit(a, i);
            int j = 0;
#if FS_FAST
            for (; j + 16 <= n || (j < n && j + 16 <= sp); j += 16) { /* 16 keys: hd FMAs, no reductions */
                __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
                int d = 0;
                for (; d + 2 <= hd; d += 2) {
                    acc0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(kt + (size_t)d * sp + j), acc0);
                    acc1 = _mm512_fmadd_ps(_mm512_set1_ps(q[d + 1]), _mm512_loadu_ps(kt + (size_t)(d + 1) * sp + j), acc1);
                }
                for (; d < hd; d++)
                    acc0 = _mm512_fmadd_ps(_mm512_set1_ps(q[d]), _mm512_loadu_ps(kt + (size_t)d * sp + j), acc0);
                _mm512_storeu_ps(sc + j, _mm512_add_ps(acc0, acc1)); /* sc has sp slots */
            }
#endif
            for (; j < n; j++) {
                float s = 0.f;
                for (int d = 0; d < hd; d++) s += q[d] * kt[(size_t)d * sp + j];
                sc[j] = s;
            }
            const float inv = attn_softmax(a, b, h, i, sc, n, o);
            if (inv == 0.f) continue;
            for (j = 0; j < n; j++)
                if (sc[j] != 0.f) axpy_f32(o, sc[j], vf + (size_t)j * hd, hd);
            attn_store(a, b, h, i, o, inv);
        }
    }
}

typedef struct {
    const fs_attn *a;
    int blocked, failed;
} fs_attn_call;

static void attention_job(void *arg, int tid, int nth) {
    fs_attn_call *c = (fs_attn_call *)arg;
    const fs_attn *a = c->a;
    const int S = a->start + a->T, sp = (S + 15) / 16 * 16, hd = a->hd;
    /* sc: 4 rows of scores, or (blocked) the fp32 key rows before their transpose */
    const size_t sc_floats = c->blocked && (size_t)sp * hd > 4 * (size_t)sp ? (size_t)sp * hd : 4 * (size_t)sp;
    const size_t floats = sc_floats + 4 * (size_t)hd + (c->blocked ? 2 * (size_t)sp * hd : 0);
    float *buf = (float *)malloc(sizeof(float) * floats);
    if (!buf) {
        __atomic_store_n(&c->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *sc = buf, *o = buf + sc_floats, *kt = o + 4 * (size_t)hd, *vf = kt + (size_t)sp * hd;
    for (int p = tid; p < a->B * a->Hkv; p += nth) {
        if (c->blocked) attn_blocked(a, p / a->Hkv, p % a->Hkv, kt, vf, sc, o, sp);
        else attn_direct(a, p / a->Hkv, p % a->Hkv, sc, o);
    }
    free(buf);
}

/* FS_OK; FS_ERR_SHAPE bad shapes, FS_ERR_NOMEM out of memory */
int fs_attention(const fs_attn *a) {
    if (a->B < 1 || a->T < 1 || a->hd < 1 || a->hd > 512 || a->Hkv < 1 || a->Hq % a->Hkv || a->start < 0)
        return FS_ERR_SHAPE;
    if (a->fmt != FS_F32 && a->fmt != FS_BF16) return FS_ERR_SHAPE;
    fs_attn_call c = {a, a->T * (a->Hq / a->Hkv) >= 8, 0};
    const int nt = a->nthreads > 0 ? a->nthreads : 1;
    uint64_t key = fs_mix(fs_mix(fs_mix(2, (uint64_t)a->B), (uint64_t)a->Hq), (uint64_t)a->hd);
    key = fs_mix(fs_mix(key, (uint64_t)a->T), (uint64_t)a->fmt);
    fs_parallel(attention_job, &c, nt, key);
    return c.failed ? FS_ERR_NOMEM : FS_OK;
}
#endif

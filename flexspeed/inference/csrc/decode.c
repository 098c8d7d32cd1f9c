/* flexspeed native decode step: pre-norm decoder layers for a few new tokens, on the CPU.
 *
 * One call runs a stack of layers (and optionally the final norm + lm_head) for B rows of one
 * new token each, over a preallocated fp32 KV cache (B, H_kv, T_max, head_dim). Weights stay
 * where the model keeps them (row-major (N, K) fp32 / bf16 / int8 per-channel / int4 group-wise
 * "plain" order) and are read once per call: the matrix-vector products stream them at close to
 * memory bandwidth (AVX-512 where the compiler targets it, portable C otherwise).
 *
 * Threads: one job per call on the kernel's own workers (fs_pool.h: they spin briefly between
 * calls, then sleep), as many as the adaptive count picks for this kind of call; phases are
 * separated by a barrier that spins briefly, then sleeps (fs_common.h).
 * The ABI (every export, struct and enum) is declared in fs_abi.h.
 * Activations are fp32 throughout; results are written in fp32.
 *
 * Compiled at first use by flexspeed/inference/native.py (gcc -O3 -march=native -fopenmp).
 */
#define _GNU_SOURCE /* RUSAGE_THREAD */
#include "fs_common.h"
#include "fs_products.h"
#include "fs_ops.h"
#include "fs_pool.h"
#include "fs_attention.h"
#include "fs_tp.h"

/* ------------------------------------------------------------------ entry points */

static size_t max_sz(size_t a, size_t b) { return a > b ? a : b; }

/* (B, C) blocks of private scratch per thread: the normed input, and for parallel-residual layers
 * the MLP's normed input too (norm2 of the layer's input, taken before attention adds to it) */
static int priv_blocks(const fs_layer *layers, int n_layers) {
    for (int i = 0; i < n_layers; i++)
        if (layers[i].parallel) return 2;
    return 1;
}

/* the shared scratch (floats: the layers' widest qkv, attention, up and scores for t_max keys, then
 * tensor parallelism's (B, C) projection before the ranks' sum) and each thread's prep (floats) */
static void scratch_parts(const fs_layer *layers, int n_layers, const fs_linear *head, int B, int C, int t_max,
                          size_t *shared, size_t *prep) {
    *shared = 0;
    *prep = head ? xs_floats(head, B) : 0;
    for (int i = 0; i < n_layers; i++) {
        const fs_layer *l = &layers[i];
        *shared = max_sz(*shared, (size_t)B * (l->qkv.n + l->n_heads * l->head_dim + l->up.n + l->n_heads * t_max));
        *prep = max_sz(*prep, max_sz(max_sz(xs_floats(&l->qkv, B), xs_floats(&l->out, B)),
                                     max_sz(xs_floats(&l->up, B), xs_floats(&l->down, B))));
    }
    *shared += (size_t)B * C;
}

/* floats of scratch fs_forward needs for these layers (+ head), B rows, t_max keys, nthreads */
int64_t fs_scratch_floats(const fs_layer *layers, int n_layers, const fs_linear *head, int B, int C, int t_max,
                          int nthreads) {
    size_t shared, prep, priv = (size_t)priv_blocks(layers, n_layers) * B * C; /* priv: normed input(s) */
    scratch_parts(layers, n_layers, head, B, C, t_max, &shared, &prep);
    return (int64_t)(shared + (priv + prep) * (size_t)nthreads + 64);
}

int fs_fast_path(void) { return FS_FAST; }

int fs_abi_version(void) { return FS_ABI_VERSION; }

int64_t fs_struct_size(int id) {
    switch (id) {
    case FS_STRUCT_LINEAR: return (int64_t)sizeof(fs_linear);
    case FS_STRUCT_NORM: return (int64_t)sizeof(fs_norm);
    case FS_STRUCT_LAYER: return (int64_t)sizeof(fs_layer);
    case FS_STRUCT_STEP: return (int64_t)sizeof(fs_step);
    case FS_STRUCT_EMBED: return (int64_t)sizeof(fs_embed);
    case FS_STRUCT_GEN: return (int64_t)sizeof(fs_gen);
    case FS_STRUCT_ATTN: return (int64_t)sizeof(fs_attn);
    case FS_STRUCT_POOL_STATS: return (int64_t)sizeof(fs_pool_stats);
    case FS_STRUCT_TP: return (int64_t)sizeof(fs_tp);
    default: return -1;
    }
}

/* one thread's view of a call: its id, the barrier, its private scratch, the shared buffers */
typedef struct {
    int tid, nth, sense, B, C;
    int tp;                        /* tensor parallelism: projections go to out, summed over the ranks */
    int add_out;                   /* TP, parallel residual: the MLP half adds its projection to out */
    fs_barrier *bar;
    const fs_step *st;
    float *x, *out, *h, *xs;       /* residual (B, C); TP output; private normed input; private prep */
    float *h2;                     /* private (B, C): norm2 of a parallel-residual layer's input */
    float *qkv, *att, *up, *scores;
} fs_ctx;

static void fs_sync(fs_ctx *c) { barrier_wait(c->bar, c->nth, &c->sense); }

/* a projection that writes the residual stream: into h (private), then added to x, or written to
 * out (tensor parallelism; added to it with add_out), over this thread's share of the outputs */
static void project_residual(const fs_linear *L, const float *in, int ld, fs_ctx *c) {
    int r0, r1;
    prepare(L, in, c->B, ld, c->xs);
    if (L->trans) {
        trans_mt(L, in, c->B, ld, c->h, c->C, c->tid, c->nth, &r0, &r1);
    } else {
        split_rows(c->C, c->tid, c->nth, &r0, &r1);
        linear_rows(L, in, c->B, ld, c->xs, c->h, c->C, r0, r1);
    }
    for (int m = 0; m < c->B; m++)
        for (int r = r0; r < r1; r++) {
            const size_t i = (size_t)m * c->C + r;
            if (!c->tp) c->x[i] += c->h[i];
            else if (c->add_out) c->out[i] += c->h[i];
            else c->out[i] = c->h[i];
        }
    fs_sync(c);
}

/* rotary embedding of the leading rot_dim dims of each q and k head (the rest pass through), and
 * the cache write, split over (row, head) */
static void rope_and_cache(const fs_layer *l, fs_ctx *c) {
    const int hd = l->head_dim, hq = l->n_heads, hkv = l->n_kv, qn = l->qkv.n, rd = l->rot_dim;
    const fs_step *st = c->st;
    for (int p = c->tid; p < c->B * (hq + hkv); p += c->nth) {
        const int b = p / (hq + hkv), hh = p % (hq + hkv);
        float *v = c->qkv + (size_t)b * qn + (size_t)hh * hd; /* a q head, then the k heads */
        if (st->cos) {
            const float *cs = st->cos + (size_t)b * rd, *sn = st->sin + (size_t)b * rd;
            const int half = rd / 2;
            for (int d = 0; d < half; d++) {
                const float a = v[d], e = v[d + half];
                v[d] = a * cs[d] - e * sn[d];
                v[d + half] = e * cs[d + half] + a * sn[d + half];
            }
        }
        if (hh < hq) continue;
        const int kh = hh - hq;
        const size_t at = (((size_t)b * hkv + kh) * st->t_max + st->start) * hd;
        const float *vv = c->qkv + (size_t)b * qn + (size_t)(hq + hkv + kh) * hd;
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
    fs_sync(c);
}

/* attention of one query per (row, head) over keys 0..start, split over (row, head) */
static void attend(const fs_layer *l, fs_ctx *c) {
    const int hd = l->head_dim, hq = l->n_heads, hkv = l->n_kv, qn = l->qkv.n;
    const fs_step *st = c->st;
    const int T = st->start + 1, kvb = l->kv_fmt == FS_BF16;
    for (int p = c->tid; p < c->B * hq; p += c->nth) {
        const int b = p / hq, hh = p % hq, kh = hh / (hq / hkv);
        const float *q = c->qkv + (size_t)b * qn + (size_t)hh * hd;
        const size_t kv0 = ((size_t)b * hkv + kh) * st->t_max * hd;
        const uint8_t *ok = st->valid ? st->valid + (size_t)b * st->valid_stride : NULL;
        float *sc = c->scores + (size_t)p * st->t_max, mx = -INFINITY;
        scores(q, kvb ? (const void *)((const uint16_t *)l->kc + kv0) : (const void *)((const float *)l->kc + kv0), kvb,
               hd, T, l->scale, sc);
        for (int t = 0; t < T; t++) {
            if (ok && !ok[t]) sc[t] = -INFINITY;
            else if (sc[t] > mx) mx = sc[t];
        }
        float *o = c->att + (size_t)b * hq * hd + (size_t)hh * hd;
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
    fs_sync(c);
}

static void layer_attention(const fs_layer *l, fs_ctx *c) {
    const int B = c->B, C = c->C, qn = l->qkv.n;
    int r0, r1;
    norm_rows(&l->norm1, c->x, c->h, B, C); /* every thread norms the (few) rows itself: no barrier */
    prepare(&l->qkv, c->h, B, C, c->xs);
    if (l->qkv.trans && !l->n_qkv_parts) {
        trans_mt(&l->qkv, c->h, B, C, c->qkv, qn, c->tid, c->nth, &r0, &r1);
    } else {
        split_rows(qn, c->tid, c->nth, &r0, &r1);
        parts_rows(&l->qkv, l->qkv_parts, l->n_qkv_parts, c->h, B, C, c->xs, c->qkv, qn, r0, r1);
    }
    fs_sync(c);
    rope_and_cache(l, c);
    attend(l, c);
    project_residual(&l->out, c->att, l->n_heads * l->head_dim, c);
}

/* up (+ activation, + gate), then down + residual; normed: the MLP's input already normed (a
 * parallel-residual layer's norm2 of the layer input), or NULL to norm the residual stream now */
static void layer_mlp(const fs_layer *l, fs_ctx *c, const float *normed) {
    const int B = c->B, C = c->C, un = l->up.n, f = l->gated ? un / 2 : un;
    int r0, r1;
    const float *in = normed;
    if (!in) {
        norm_rows(&l->norm2, c->x, c->h, B, C);
        in = c->h;
    }
    prepare(&l->up, in, B, C, c->xs);
    if (l->up.trans && !l->n_up_parts && !l->gated) {
        trans_mt(&l->up, in, B, C, c->up, un, c->tid, c->nth, &r0, &r1);
    } else {
        split_rows(f, c->tid, c->nth, &r0, &r1);
        parts_rows(&l->up, l->up_parts, l->n_up_parts, in, B, C, c->xs, c->up, un, r0, r1);
    }
    if (l->gated) parts_rows(&l->up, l->up_parts, l->n_up_parts, in, B, C, c->xs, c->up, un, f + r0, f + r1);
    for (int m = 0; m < B; m++) {
        float *um = c->up + (size_t)m * un;
        activate_rows(l->act, um + r0, l->gated ? um + f + r0 : NULL, r1 - r0);
    }
    fs_sync(c);
    project_residual(&l->down, c->up, un, c);
}

typedef struct {
    const fs_layer *layers;
    int n_layers;
    const fs_norm *final_norm;
    const fs_linear *head;
    float *x, *logits;
    const fs_step *st;
    int tp;                        /* st->tp is set and checked */
    fs_barrier *bar;
    size_t shared, prep;
    int blocks;                    /* priv_blocks() */
    volatile int rc;               /* tensor parallelism: a failed exchange (every thread then stops) */
} fs_call;

/* tensor parallelism: x += the sum over the ranks of out (thread 0 exchanges, the others wait);
 * nonzero when the exchange failed */
static int tp_reduce(fs_call *a, fs_ctx *c) {
    if (c->tid == 0) {
        const int rc = fs_shm_allreduce(a->st->tp, c->out, (int64_t)c->B * c->C, c->x);
        if (rc != FS_OK) a->rc = rc;
    }
    fs_sync(c);
    return a->rc != FS_OK;
}

/* one thread's share of a call */
static void forward_job(void *arg, int tid, int nth) {
    fs_call *a = (fs_call *)arg;
    const fs_step *st = a->st;
    const int B = st->B, C = st->C, tp = a->tp;
    fs_ctx c = {.tid = tid, .nth = nth, .sense = 0, .B = B, .C = C, .tp = tp, .bar = a->bar, .st = st, .x = a->x};
    float *priv = st->scratch + a->shared + (size_t)tid * ((size_t)a->blocks * B * C + a->prep);
    c.h = priv;
    c.h2 = a->blocks > 1 ? priv + (size_t)B * C : NULL;
    c.xs = priv + (size_t)a->blocks * B * C;
    if (tp) c.out = st->scratch + a->shared - (size_t)B * C;
    for (int li = 0; li < a->n_layers; li++) {
        const fs_layer *l = &a->layers[li];
        c.qkv = st->scratch;
        c.att = c.qkv + (size_t)B * l->qkv.n;
        c.up = c.att + (size_t)B * l->n_heads * l->head_dim;
        c.scores = c.up + (size_t)B * l->up.n;
        const float *normed = NULL;
        if (l->parallel) { /* both halves read the layer's input: norm2 it before attention adds to x (no
                            * thread writes x before the barrier after qkv) */
            norm_rows(&l->norm2, c.x, c.h2, B, C);
            normed = c.h2;
        }
        if (tp) { /* each half's projection summed over the ranks into x; a parallel-residual layer's two
                   * halves are added first and summed once */
            layer_attention(l, &c);
            if (!l->parallel && tp_reduce(a, &c)) return;
            c.add_out = l->parallel;
            layer_mlp(l, &c, normed);
            c.add_out = 0;
            if (tp_reduce(a, &c)) return;
            continue;
        }
        layer_attention(l, &c);
        layer_mlp(l, &c, normed);
    }
    if (a->head) {
        int r0, r1;
        const int V = tp ? st->tp->vocab : a->head->n;
        float *logits = a->logits;
        if (tp) logits += (size_t)st->tp->rank * ((V + st->tp->world - 1) / st->tp->world);
        if (a->final_norm) norm_rows(a->final_norm, a->x, c.h, B, C);
        else memcpy(c.h, a->x, sizeof(float) * B * C);
        prepare(a->head, c.h, B, C, c.xs);
        split_rows(a->head->n, tid, nth, &r0, &r1);
        linear_rows(a->head, c.h, B, C, c.xs, logits, V, r0, r1);
        if (tp) { /* every rank's block of the logits */
            fs_sync(&c);
            if (tid == 0) {
                const int rc = fs_tp_gather(st->tp, a->logits, B);
                if (rc != FS_OK) a->rc = rc;
            }
        }
    }
}

/* FS_OK when every layer's rotary width fits its heads and the tables' common width, else FS_ERR_SHAPE */
static int check_rotary(const fs_layer *layers, int n_layers, const fs_step *st) {
    if (!st->cos) return FS_OK;
    for (int i = 0; i < n_layers; i++) {
        const int rd = layers[i].rot_dim;
        if (rd <= 0 || rd % 2 || rd > layers[i].head_dim || rd != layers[0].rot_dim) return FS_ERR_SHAPE;
    }
    return FS_OK;
}

/* x (B, C) fp32 in/out (the residual stream): whole layers, residual adds into x; logits
 * (B, head->n) fp32 when head != NULL. With st->tp: the layers of a tensor-parallel model, each half
 * layer's projection summed over the ranks into x, and logits (B, st->tp->vocab) gathered from the
 * ranks' blocks of the head. */
int fs_forward(const fs_layer *layers, int n_layers, const fs_norm *final_norm, const fs_linear *head, float *x,
               float *logits, const fs_step *st) {
    const int B = st->B, C = st->C, nt = st->nthreads > 0 ? st->nthreads : 1;
    for (int i = 0; i < n_layers; i++)
        if (layers[i].qkv.k != C || layers[i].out.n != C || layers[i].down.n != C) return FS_ERR_SHAPE;
    if ((head && head->k != C) || check_rotary(layers, n_layers, st) != FS_OK) return FS_ERR_SHAPE;
    size_t shared, prep;
    scratch_parts(layers, n_layers, head, B, C, st->t_max, &shared, &prep);
    if (st->tp) {
        if (st->tp->world < 1 || st->tp->rank < 0 || st->tp->rank >= st->tp->world
            || (int64_t)B * C > st->tp->cap)
            return FS_ERR_SHAPE;
        if (head && (int64_t)head->n != (st->tp->vocab + st->tp->world - 1) / st->tp->world
            && st->tp->rank != st->tp->world - 1)
            return FS_ERR_SHAPE; /* every rank but the last holds ceil(vocab / world) rows of the head */
    }
    fs_barrier bar = {0, 0, 0};
    fs_call call = {layers, n_layers, final_norm, head, x, logits, st, st->tp != NULL, &bar, shared, prep,
                    priv_blocks(layers, n_layers), FS_OK};
    /* a kind of call for the adaptive thread count: its shape, not its pointers (the layers of a
     * tensor-parallel step share one kind) */
    uint64_t key = fs_mix(fs_mix(fs_mix(1, (uint64_t)n_layers), (uint64_t)B), (uint64_t)C);
    key = fs_mix(fs_mix(key, (uint64_t)call.tp), head ? (uint64_t)head->n : 0);
    if (n_layers > 0) key = fs_mix(fs_mix(key, (uint64_t)layers[0].up.n), (uint64_t)layers[0].qkv.fmt);
    fs_parallel(forward_job, &call, nt, key);
    return call.rc;
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

/* out[i, :] = row ids[i] of L's weight, dequantized to fp32 (embedding lookups in a tied head);
 * FS_ERR_RANGE for an id outside [0, n) */
int fs_rows(const fs_linear *L, const int64_t *ids, int64_t n, float *out) {
    const int K = L->k;
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = ids[i];
        if (r < 0 || r >= L->n) return FS_ERR_RANGE;
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

/* x (B, C) = the embeddings of seq's column `col` at positions pos0 + j, as the model's own
 * lookups compute them; -3 for an id or position out of range */
static int embed_rows(const fs_embed *e, const fs_gen *g, int B, int C, int col, int j) {
    const int64_t width = (int64_t)g->T + g->max_new;
    for (int b = 0; b < B; b++) {
        float *x = g->x + (size_t)b * C;
        const int64_t id = g->seq[b * width + col];
        if (fs_rows(&e->tok, &id, 1, x) != 0) return FS_ERR_RANGE;
        if (e->round_bf16)
            for (int k = 0; k < C; k++) x[k] = bf16_to_f32(f32_to_bf16(x[k]));
        if (e->pos.n > 0) {
            const int64_t p = g->pos0[b] + j + e->pos_offset;
            if (p < 0 || p >= e->pos.n) return FS_ERR_RANGE;
            for (int k = 0; k < C; k++) {
                const float s = x[k] + param(e->pos.w, e->pos.fmt, (int)(p * C + k));
                x[k] = e->round_bf16 ? bf16_to_f32(f32_to_bf16(s)) : s;
            }
        }
    }
    return 0;
}

/* Greedy decoding of new tokens 1 .. max_new - 1 (the caller chose token 0 from the prompt's
 * logits and wrote it to seq[:, T]): each step embeds the previous token, runs the layers at
 * cache position T + j, bars eos before min_new, takes the argmax, gives finished rows the pad
 * id, and stops once every row has emitted an eos. Returns the number of new tokens in seq
 * (<= max_new), or a negative fs_status (FS_ERR_SHAPE, FS_ERR_RANGE: an id or position out of
 * range, FS_ERR_NOMEM). The
 * Python loop's semantics, without its per-token costs (~0.1-0.3 ms a token: every torch op
 * after a step that streamed the weights through the caches runs cold). */
int fs_generate(const fs_layer *layers, int n_layers, const fs_norm *final_norm, const fs_linear *head,
                const fs_embed *emb, fs_step *st, fs_gen *g) {
    const int B = st->B, C = st->C, V = st->tp ? st->tp->vocab : head->n, rd = n_layers > 0 ? layers[0].rot_dim : 0;
    const int64_t width = (int64_t)g->T + g->max_new;
    int64_t *next = malloc(sizeof(int64_t) * (size_t)B);
    if (!next) return FS_ERR_NOMEM;
    int made = g->max_new;
    for (int j = 0; j + 1 < g->max_new; j++) {
        int rc = embed_rows(emb, g, B, C, g->T + j, j);
        if (rc == 0) {
            st->start = g->T + j;
            if (g->cos) {
                st->cos = g->cos + (size_t)j * B * rd;
                st->sin = g->sin + (size_t)j * B * rd;
            }
            rc = fs_forward(layers, n_layers, final_norm, head, g->x, g->logits, st);
        }
        if (rc != 0) {
            made = rc;
            break;
        }
        if (j + 1 < g->min_new)
            for (int b = 0; b < B; b++)
                for (int e = 0; e < g->n_eos; e++)
                    if (g->eos[e] >= 0 && g->eos[e] < V) g->logits[(size_t)b * V + g->eos[e]] = -INFINITY;
        fs_argmax(g->logits, B, V, next);
        int all = g->n_eos > 0;
        for (int b = 0; b < B; b++) {
            if (g->done[b] && g->pad >= 0) next[b] = g->pad;
            g->seq[b * width + g->T + j + 1] = next[b];
            for (int e = 0; e < g->n_eos; e++)
                if (next[b] == g->eos[e]) g->done[b] = 1;
            all &= g->done[b];
        }
        if (all) {
            made = j + 2;
            break;
        }
    }
    free(next);
    return made;
}

/* out (r1 - r0, K) = rows r0:r1 of L's weight dequantized, fp32 (out_bf16 = 0) or bf16 (1), by
 * nthreads: the prompt's products dequantize a chunk of rows at a time and run a dense GEMM */
int fs_dequant_rows(const fs_linear *L, int r0, int r1, void *out, int out_bf16, int nthreads) {
    const int K = L->k;
    if (r0 < 0 || r1 > L->n || r0 > r1) return FS_ERR_RANGE;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int r = r0; r < r1; r++) {
        float row[8192];
        float *dst = out_bf16 ? row : (float *)out + (size_t)(r - r0) * K;
        for (int k0 = 0; k0 < K; k0 += 8192) {
            const int k1 = K - k0 > 8192 ? k0 + 8192 : K;
            float *d = out_bf16 ? row : dst + k0;
            if (L->fmt == FS_I8) {
                const float sc = ((const float *)L->scales)[r];
                const int8_t *w = (const int8_t *)L->w + (size_t)r * K;
                for (int k = k0; k < k1; k++) d[k - k0] = w[k] * sc;
            } else { /* int4, row-major scales */
                const uint8_t *w = (const uint8_t *)L->w + (size_t)r * (K / 2);
                const uint16_t *sz = (const uint16_t *)L->scales + (size_t)r * (K / L->group) * 2;
                for (int k = k0; k < k1; k++) {
                    const int q = (k & 1) ? w[k / 2] >> 4 : w[k / 2] & 15;
                    const uint16_t *g = sz + (k / L->group) * 2;
                    d[k - k0] = (float)(q - 8) * bf16_to_f32(g[0]) + bf16_to_f32(g[1]);
                }
            }
            if (out_bf16) {
                uint16_t *o = (uint16_t *)out + (size_t)(r - r0) * K + k0;
                for (int k = k0; k < k1; k++) o[k - k0] = f32_to_bf16(row[k - k0]);
            }
        }
    }
    return 0;
}

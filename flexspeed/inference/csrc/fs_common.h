/* flexspeed native decode: types and helpers shared by the kernel's parts (one translation unit:
 * decode.c includes fs_common.h, fs_products.h, fs_ops.h in that order). */
#ifndef FS_COMMON_H
#define FS_COMMON_H
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

typedef struct {
    fs_linear tok;                 /* token rows (V, C), any weight format */
    fs_linear pos;                 /* learned position rows (P, C), or pos.n == 0 (none / rotary) */
    int32_t pos_offset;            /* added to positions before the lookup (OPT: 2) */
    int32_t round_bf16;            /* bf16 model: rows and their sum rounded to bf16, as torch's lookups */
} fs_embed;

typedef struct {                   /* greedy decoding from the second new token on (fs_generate) */
    int32_t T, max_new, min_new;   /* prompt columns of seq; new tokens wanted; eos barred before min_new */
    int32_t n_eos, pad;            /* eos ids; pad id for finished rows (< 0: none) */
    const int64_t *eos;
    int64_t *seq;                  /* (B, T + max_new): column T holds the first new token */
    uint8_t *done;                 /* (B): 1 = the row has emitted an eos */
    const int64_t *pos0;           /* (B): position of the first new token */
    const float *cos, *sin;        /* rotary tables (max_new - 1, B, head_dim), or NULL */
    float *logits;                 /* (B, V) scratch */
    float *x;                      /* (B, C) scratch */
} fs_gen;

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

/* a spin-wait hint to the core */
static inline void fs_pause(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
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
        fs_pause();
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
#endif

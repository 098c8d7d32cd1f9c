/* flexspeed native decode: the library's whole ABI, in one place.
 *
 * Every enum, every struct passed across the boundary and every exported function is declared
 * here and nowhere else; flexspeed/inference/native_abi.py mirrors them with ctypes and, when it
 * loads the library, checks fs_abi_version() and fs_struct_size() of every struct against its
 * mirrors (a mismatch is an error, never a silent misread). Change anything here -> bump
 * FS_ABI_VERSION and the mirrors in native_abi.py (tests/unit/test_native_abi.py checks that both
 * sides name the same exports).
 *
 * Return codes: 0 (FS_OK) or a positive count on success, a negative fs_status on failure;
 * native.py turns every negative code into an exception. */
#ifndef FS_ABI_H
#define FS_ABI_H
#include <stdint.h>

#define FS_ABI_VERSION 6

/* ------------------------------------------------------------------ enums */

enum fs_format { FS_F32 = 0, FS_BF16 = 1, FS_I8 = 2, FS_I4 = 3 };
enum fs_activation { FS_RELU = 0, FS_GELU = 1, FS_GELU_TANH = 2, FS_SILU = 3, FS_IDENTITY = 4 };
enum fs_norm_kind { FS_NORM_NONE = -1, FS_LAYERNORM = 0, FS_RMSNORM = 1 };
enum fs_status {
    FS_OK = 0,
    FS_ERR_SHAPE = -1,   /* shapes that do not fit together */
    FS_ERR_NOMEM = -2,   /* a working buffer could not be allocated */
    FS_ERR_RANGE = -3,   /* a token id or position outside its table */
    FS_ERR_TIMEOUT = -4, /* a peer (tensor-parallel rank) stopped answering */
    FS_ERR_ARG = -5      /* an argument outside its allowed values */
};
enum fs_threads_mode { FS_THREADS_ENV = -1, FS_THREADS_OPENMP = 0, FS_THREADS_POOL = 1 };
/* fs_set_adaptive: how many threads a call uses */
enum fs_adaptive_mode { FS_ADAPT_OFF = 0, FS_ADAPT_ON = 1 };
/* ids of fs_struct_size(), in this order */
enum fs_struct_id {
    FS_STRUCT_LINEAR = 0, FS_STRUCT_NORM, FS_STRUCT_LAYER, FS_STRUCT_STEP, FS_STRUCT_EMBED, FS_STRUCT_GEN,
    FS_STRUCT_ATTN, FS_STRUCT_POOL_STATS, FS_STRUCT_TP, FS_N_STRUCTS
};

/* ------------------------------------------------------------------ structs */

typedef struct {
    int32_t fmt, n, k, group;      /* fs_format; output rows, input features, int4 group size */
    const void *w;                 /* (n, k) f32/bf16/int8; int4: (n, k/2) bytes, low nibble = even column */
    const void *scales;            /* int8: f32 (n); int4: bf16 (n, k/group, 2) = [scale, zero] per row and group */
    int32_t bias_fmt;              /* FS_F32 or FS_BF16 */
    const void *bias;              /* (n) or NULL */
    int32_t trans;                 /* fp32/bf16 only: w stored (k, n) (HF GPT-2's Conv1D) */
} fs_linear;

typedef struct {
    int32_t kind;                  /* fs_norm_kind */
    int32_t fmt;                   /* FS_F32 or FS_BF16 (weight and bias) */
    float eps;
    const void *w, *b;             /* (C); b may be NULL */
} fs_norm;

typedef struct {
    fs_norm norm1, norm2;
    fs_linear qkv, out, up, down;  /* qkv rows: [q heads | k heads | v heads]; up: [gate | up] when gated */
    int32_t act, gated;            /* fs_activation */
    int32_t parallel;              /* 1: x + attn(norm1(x)) + mlp(norm2(x)) (GPT-NeoX); 0: two residuals in turn */
    int32_t rot_dim;               /* leading dims of each q/k head the rotary tables turn (even, <= head_dim;
                                    * GPT-NeoX's rotary_pct < 1: fewer); the tables are rot_dim wide */
    int32_t n_heads, n_kv, head_dim;
    float scale;
    void *kc, *vc;                 /* (B, n_kv, t_max, head_dim), fp32 or bf16 (kv_fmt) */
    int32_t kv_fmt;                /* FS_F32 or FS_BF16 */
    /* unfused models: qkv / up computed as up to 3 / 2 matrices side by side (qkv and up then only
     * describe the whole: total rows, format, k, group); 0 = use qkv / up themselves */
    int32_t n_qkv_parts, n_up_parts;
    fs_linear qkv_parts[3], up_parts[2];
} fs_layer;

typedef struct {                   /* tensor parallelism over the ranks of one host (fs_shm_allreduce) */
    void *seg;                     /* the shared segment, fs_shm_bytes(world, cap), zeroed before first use */
    int32_t rank, world;
    int64_t cap;                   /* floats each rank can post at once */
    int64_t call;                  /* exchanges so far: the same on every rank; each exchange advances it */
    double timeout_s;              /* a peer silent this long: FS_ERR_TIMEOUT */
    int32_t vocab;                 /* the full head's rows: rank r computes rows [r * per, (r + 1) * per) of them,
                                    * per = ceil(vocab / world) (its head struct holds just those) */
} fs_tp;

typedef struct {
    int32_t B, C, start, t_max, nthreads;
    int32_t valid_stride;          /* bytes between rows of valid */
    const uint8_t *valid;          /* (B, >= start+1): 1 = attend to that key; NULL = all */
    const float *cos, *sin;        /* rotary tables (B, rot_dim), or NULL */
    float *scratch;                /* fs_scratch_floats() floats */
    fs_tp *tp;                     /* NULL, or this rank's part of a tensor-parallel model: each half layer's
                                    * projection is summed over the ranks into the residual stream, and the
                                    * logits (B, tp->vocab) gathered from the ranks' row blocks of the head */
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
    const float *cos, *sin;        /* rotary tables (max_new - 1, B, rot_dim), or NULL */
    float *logits;                 /* (B, V) scratch */
    float *x;                      /* (B, C) scratch */
} fs_gen;

typedef struct {
    int32_t B, Hq, Hkv, T, hd, start, causal, fmt, nthreads;
    float scale;
    const void *q;
    int64_t q_b, q_h, q_t; /* element strides of q (B, Hq, T, hd) */
    const void *k;
    int64_t k_b, k_h, k_t; /* k (B, Hkv, >= start + T, hd) */
    const void *v;
    int64_t v_b, v_h, v_t;
    void *out;
    int64_t o_b, o_h, o_t; /* out (B, Hq, T, hd) */
    const uint8_t *mask;   /* (B or 1, T, start + T) bytes, 1 = may attend; NULL = no mask */
    int64_t m_b, m_t;      /* its strides (m_b = 0: one mask for every row) */
} fs_attn;

typedef struct {                   /* what the adaptive thread count saw (fs_pool_stats) */
    int64_t calls;                 /* parallel calls made */
    int64_t explored;              /* calls run on another thread count than the best known, to re-measure it */
    int64_t switches;              /* times the chosen thread count changed */
    int64_t preempted;             /* involuntary context switches of the kernel's threads during calls */
    int64_t sleeps;                /* waits at a barrier or for workers that gave up spinning and slept */
    int32_t current;               /* thread count the last call used */
    int32_t requested;             /* thread count the last call asked for */
} fs_pool_stats;

/* ------------------------------------------------------------------ exports */

/* the ABI: FS_ABI_VERSION; sizeof the struct with that fs_struct_id (-1 for an unknown id) */
int fs_abi_version(void);
int64_t fs_struct_size(int id);
/* 1 when built with the AVX-512 products, 0 for the portable C */
int fs_fast_path(void);

/* threads: fs_threads_mode (returns the mode now in force); adaptive thread count on/off (returns
 * the previous setting; default on, FLEXSPEED_NATIVE_ADAPTIVE=0 turns it off); counters */
int fs_set_threads(int mode);
int fs_set_adaptive(int mode);
void fs_pool_stats_get(fs_pool_stats *out);
/* the adaptive thread count's choice alone, for tests: the count (n) it picks for one call of kind
 * `key` asking for `requested` threads that starts at time `now` (seconds on the caller's own clock,
 * so that a test does not depend on how the machine schedules it; for a process that runs no
 * kernel, whose clock is fs_now()), that call's threads having lost `lost` time slices and taken
 * seconds[n - 1] (seconds holds one time per count 1..requested); returns n */
int fs_adapt_simulate(uint64_t key, int requested, const double *seconds, int64_t lost, double now);

/* the decode step */
int64_t fs_scratch_floats(const fs_layer *layers, int n_layers, const fs_linear *head, int B, int C, int t_max,
                          int nthreads);
int fs_forward(const fs_layer *layers, int n_layers, const fs_norm *final_norm, const fs_linear *head, float *x,
               float *logits, const fs_step *st);
int fs_generate(const fs_layer *layers, int n_layers, const fs_norm *final_norm, const fs_linear *head,
                const fs_embed *emb, fs_step *st, fs_gen *g);

/* pieces used outside the step */
int fs_attention(const fs_attn *a);
void fs_argmax(const float *x, int64_t rows, int64_t n, int64_t *out);
int fs_rows(const fs_linear *L, const int64_t *ids, int64_t n, float *out);
int fs_dequant_rows(const fs_linear *L, int r0, int r1, void *out, int out_bf16, int nthreads);

/* tensor parallelism on one host: the shared-memory all-reduce */
int64_t fs_shm_bytes(int world, int64_t cap);
int fs_shm_allreduce(fs_tp *tp, float *x, int64_t n, float *accum);
#endif

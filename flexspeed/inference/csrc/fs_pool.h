/* flexspeed native decode: the kernel's own worker threads, and how many of them a call uses
 * (included by decode.c after fs_ops.h).
 *
 * Why not OpenMP: a decode step is one parallel call every few milliseconds with 0.1-0.3 ms of
 * Python between calls. Under OMP_WAIT_POLICY=PASSIVE (which the benchmarks set, and which
 * shared machines need) libgomp puts its workers to sleep at once, and waking them costs ~50 us a
 * call on the 2-core VM. These workers spin for FS_POOL_SPIN_S after each call, yielding the core
 * to anyone runnable, and only then sleep on a futex; the caller is thread 0. Waits inside a call
 * spin briefly, then sleep (fs_wait_change in fs_common.h).
 *
 * Adaptive thread count (fs_adapt_*): on a shared machine, every thread of a call waits at each
 * barrier for the slowest; when other processes keep taking cores, fewer threads can finish a
 * step sooner than all of them (and when many processes compete, more threads get more of the
 * machine). Each kind of call (its shape: layers, rows, width) keeps a moving average of its wall
 * time on the thread count in use and the last measured mean of each other count (the requested
 * count, then halvings down to 1), and re-measures another count with a burst of 4 calls: every
 * 8th call after a change, backing off to every 128th while the others keep losing, and at once
 * when the count in use has become slower than another was. Another count takes over when its
 * burst was at least 10% faster. Idle, that costs 4 slower calls in 128; contended, the choice
 * follows the load within a few calls.
 * FLEXSPEED_NATIVE_ADAPTIVE=0 (or fs_set_adaptive(0)) always uses the requested count.
 *
 * One job at a time (a mutex serialises callers from several Python threads); a forked child
 * starts with no workers and makes its own. */
#ifndef FS_POOL_H
#define FS_POOL_H
#include <pthread.h>
#include <sys/resource.h>

#ifndef FS_POOL_SPIN_S
#define FS_POOL_SPIN_S 0.002
#endif
#define FS_POOL_MAX 256

typedef void (*fs_job_fn)(void *arg, int tid, int nth);

static struct {
    volatile int gen __attribute__((aligned(64))); /* job number: workers wait for it to change */
    volatile int done __attribute__((aligned(64))); /* workers finished with the current job */
    volatile int sleepers, done_sleepers;
    fs_job_fn fn;
    void *arg;
    int nth, n_workers, atfork;
    pthread_mutex_t lock;
} fs_pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static volatile int64_t fs_preempted; /* involuntary context switches of threads inside jobs */
/* Lost time slices in one thread's call that mean another process competes for the cores: on an
 * idle 2-core VM a call loses 0.1 on average (kernel threads, timers), and sleeping waits, each
 * costing a futex wake-up, would slow every product by ~60 wake-ups a step; under the benchmark's
 * contended load a thread loses 2-10 per call. */
#ifndef FS_CONTENDED_LOST
#define FS_CONTENDED_LOST 2
#endif

static inline long fs_thread_nivcsw(void) {
#if defined(__linux__) && defined(RUSAGE_THREAD)
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) == 0) return ru.ru_nivcsw;
#endif
    return 0;
}

/* fn on one thread, counting the time slices it lost meanwhile */
static inline void fs_run_counted(fs_job_fn fn, void *arg, int tid, int nth) {
    const long before = fs_thread_nivcsw();
    fn(arg, tid, nth);
    const long lost = fs_thread_nivcsw() - before;
    if (lost > 0) {
        __atomic_add_fetch(&fs_preempted, lost, __ATOMIC_RELAXED);
        if (lost >= FS_CONTENDED_LOST) fs_contended_until = fs_now() + FS_CONTENDED_HOLD_S; /* a racy hint: fine */
    }
}

typedef struct {
    int tid, seen;
} fs_worker_arg;

static void *fs_worker(void *p) {
    fs_worker_arg a = *(fs_worker_arg *)p;
    free(p);
    for (;;) {
        int g;
        long spins = 0;
        double t0 = 0.;
        while ((g = __atomic_load_n(&fs_pool.gen, __ATOMIC_ACQUIRE)) == a.seen) {
            fs_pause();
            if (++spins < 2000) continue;
            sched_yield(); /* someone else wants this core: let them run */
            const double t = fs_now();
            if (t0 == 0.) t0 = t;
            else if (t - t0 > FS_POOL_SPIN_S || t < fs_contended_until) { /* idle: sleep until the next job */
                __atomic_add_fetch(&fs_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                fs_futex_wait(&fs_pool.gen, a.seen); /* returns at once if gen has moved */
                __atomic_sub_fetch(&fs_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                t0 = 0.;
                spins = 0;
            }
        }
        a.seen = g;
        if (a.tid < fs_pool.nth) {
            fs_run_counted(fs_pool.fn, fs_pool.arg, a.tid, fs_pool.nth);
            __atomic_add_fetch(&fs_pool.done, 1, __ATOMIC_SEQ_CST);
            if (__atomic_load_n(&fs_pool.done_sleepers, __ATOMIC_SEQ_CST) > 0) fs_futex_wake(&fs_pool.done);
        }
    }
    return NULL;
}

static void fs_pool_atfork_child(void) {
    fs_pool.n_workers = 0; /* the parent's threads do not exist here */
    fs_pool.sleepers = 0;
    fs_pool.done_sleepers = 0;
    pthread_mutex_init(&fs_pool.lock, NULL);
}

/* The pool where OpenMP's workers sleep between regions (OMP_WAIT_POLICY=PASSIVE); OpenMP's own
 * where they spin anyway (ACTIVE, or unset: libgomp then spins ~ms before sleeping), since a
 * spinning OpenMP worker and a pool worker would share one core. FLEXSPEED_NATIVE_THREADS=pool
 * or openmp overrides. */
static int fs_pool_use = -1;
static int fs_use_pool(void) {
    int use = fs_pool_use;
    if (use < 0) {
        const char *f = getenv("FLEXSPEED_NATIVE_THREADS"), *p = getenv("OMP_WAIT_POLICY");
        if (f && (f[0] == 'p' || f[0] == 'P')) use = 1;
        else if (f && (f[0] == 'o' || f[0] == 'O')) use = 0;
        else use = p && (p[0] == 'p' || p[0] == 'P');
        fs_pool_use = use;
    }
    return use;
}

int fs_set_threads(int mode) {
    fs_pool_use = mode;
    return fs_use_pool();
}

/* fn(arg, tid, nth) on nth threads (the caller is tid 0); returns when all have returned.
 * Fewer threads when workers cannot be started; returns the count used. */
static int fs_pool_run(fs_job_fn fn, void *arg, int nth) {
    if (nth > FS_POOL_MAX) nth = FS_POOL_MAX;
    if (nth <= 1) {
        fs_run_counted(fn, arg, 0, 1);
        return 1;
    }
    pthread_mutex_lock(&fs_pool.lock);
    if (!fs_pool.atfork) {
        pthread_atfork(NULL, NULL, fs_pool_atfork_child);
        fs_pool.atfork = 1;
    }
    while (fs_pool.n_workers < nth - 1) {
        fs_worker_arg *a = malloc(sizeof *a);
        pthread_t t;
        pthread_attr_t attr;
        if (!a) break;
        a->tid = fs_pool.n_workers + 1;
        a->seen = fs_pool.gen;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int rc = pthread_create(&t, &attr, fs_worker, a);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            free(a);
            break;
        }
        fs_pool.n_workers++;
    }
    if (nth - 1 > fs_pool.n_workers) nth = fs_pool.n_workers + 1;
    fs_pool.fn = fn;
    fs_pool.arg = arg;
    fs_pool.nth = nth;
    fs_pool.done = 0;
    __atomic_add_fetch(&fs_pool.gen, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&fs_pool.sleepers, __ATOMIC_SEQ_CST) > 0) fs_futex_wake(&fs_pool.gen);
    fs_run_counted(fn, arg, 0, nth);
    for (int d; (d = __atomic_load_n(&fs_pool.done, __ATOMIC_ACQUIRE)) < nth - 1;)
        fs_wait_change(&fs_pool.done, d, &fs_pool.done_sleepers);
    pthread_mutex_unlock(&fs_pool.lock);
    return nth;
}

/* ------------------------------------------------------------------ adaptive thread count */

#define FS_ADAPT_SLOTS 16
#define FS_ADAPT_CANDS 9 /* n, n/2, ..., 1 for n up to 256 */
#define FS_ADAPT_BASE 8
#define FS_ADAPT_MAX_GAP 128
#define FS_ADAPT_BURST 4    /* calls per re-measurement */
#define FS_ADAPT_ALPHA 0.2  /* weight of a call in the moving average of the count in use */
#define FS_ADAPT_MARGIN 0.9 /* another count must be this much faster to take over */

typedef struct {
    uint64_t key;
    int requested, n_cands, best, gap, since;
    int explore_idx, burst_left, burst_n; /* a re-measurement in progress */
    int confirm_for;                      /* a count that beat the best's average, awaiting its check */
    double burst_sum, confirm_mean;
    int64_t last_use, lost_mark; /* fs_preempted when the last re-measurement started */
    int cand[FS_ADAPT_CANDS];
    int samples[FS_ADAPT_CANDS];
    double ema[FS_ADAPT_CANDS]; /* seconds per call */
} fs_adapt_slot;

static struct {
    fs_adapt_slot slot[FS_ADAPT_SLOTS];
    int64_t clock, calls, explored, switches;
    int current, requested, mode; /* mode: -1 = from the environment */
    pthread_mutex_t lock;
} fs_adapt = {.mode = -1, .lock = PTHREAD_MUTEX_INITIALIZER};

static int fs_adaptive_on(void) {
    if (fs_adapt.mode < 0) {
        const char *e = getenv("FLEXSPEED_NATIVE_ADAPTIVE");
        fs_adapt.mode = !(e && (e[0] == '0' || e[0] == 'n' || e[0] == 'N' || e[0] == 'f' || e[0] == 'F'));
    }
    return fs_adapt.mode;
}

int fs_set_adaptive(int mode) {
    const int prev = fs_adaptive_on();
    fs_adapt.mode = mode < 0 ? -1 : !!mode;
    if (mode < 0) fs_adaptive_on();
    return prev;
}

void fs_pool_stats_get(fs_pool_stats *out) {
    out->calls = fs_adapt.calls;
    out->explored = fs_adapt.explored;
    out->switches = fs_adapt.switches;
    out->preempted = __atomic_load_n(&fs_preempted, __ATOMIC_RELAXED);
    out->sleeps = __atomic_load_n(&fs_sleep_count, __ATOMIC_RELAXED);
    out->current = fs_adapt.current;
    out->requested = fs_adapt.requested;
}

static uint64_t fs_mix(uint64_t h, uint64_t v) {
    h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
    return h;
}

static void fs_adapt_start_burst(fs_adapt_slot *s, int idx) {
    s->explore_idx = idx;
    s->burst_left = FS_ADAPT_BURST;
    s->burst_n = 0;
    s->burst_sum = 0.;
    s->since = 0;
    s->lost_mark = __atomic_load_n(&fs_preempted, __ATOMIC_RELAXED);
    fs_adapt.explored++;
}

/* the thread count for a call of this kind; *slot_out / *idx_out say what to credit its time to
 * (slot NULL: not adaptive) */
static int fs_adapt_choose(uint64_t key, int requested, fs_adapt_slot **slot_out, int *idx_out) {
    *slot_out = NULL;
    *idx_out = 0;
    if (requested > FS_POOL_MAX) requested = FS_POOL_MAX;
    if (requested < 1) requested = 1;
    pthread_mutex_lock(&fs_adapt.lock);
    fs_adapt.calls++;
    fs_adapt.requested = requested;
    if (requested == 1 || !fs_adaptive_on()) {
        fs_adapt.current = requested;
        pthread_mutex_unlock(&fs_adapt.lock);
        return requested;
    }
    key = fs_mix(key, (uint64_t)requested);
    fs_adapt_slot *s = NULL, *lru = &fs_adapt.slot[0];
    for (int i = 0; i < FS_ADAPT_SLOTS; i++) {
        fs_adapt_slot *c = &fs_adapt.slot[i];
        if (c->requested == requested && c->key == key) {
            s = c;
            break;
        }
        if (c->last_use < lru->last_use) lru = c;
    }
    if (!s) { /* a new kind of call: candidates requested, requested/2, ..., 1 */
        s = lru;
        memset(s, 0, sizeof *s);
        s->key = key;
        s->requested = requested;
        for (int n = requested; n >= 1 && s->n_cands < FS_ADAPT_CANDS; n /= 2) s->cand[s->n_cands++] = n;
        if (s->cand[s->n_cands - 1] != 1) s->cand[s->n_cands - 1] = 1;
        s->gap = FS_ADAPT_BASE;
        s->explore_idx = -1;
        s->confirm_for = -1;
    }
    s->last_use = ++fs_adapt.clock;
    /* the requested count first (two calls: the first also warms caches and starts workers), then
     * a burst on each other count, then the best, with a burst on another count every gap calls,
     * or at once when the best's average has grown past another's (last measured) one */
    if (s->samples[0] >= 2 && s->burst_left == 0) {
        int next = -1;
        for (int i = 1; i < s->n_cands && next < 0; i++)
            if (s->samples[i] == 0) next = i;
        for (int i = 0; i < s->n_cands && next < 0; i++)
            if (i != s->best && s->ema[i] < FS_ADAPT_MARGIN * s->ema[s->best])
                next = i; /* the best got slower than another was: measure that one again */
        /* the periodic look at another count: not while all threads run and none lost its core
         * since the last look (fewer threads cannot then be faster than they were measured) */
        if (next < 0 && ++s->since >= s->gap &&
            (s->best != 0 || __atomic_load_n(&fs_preempted, __ATOMIC_RELAXED) != s->lost_mark))
            next = (s->best + 1 + (int)(fs_adapt.clock % (s->n_cands - 1))) % s->n_cands; /* any other */
        if (next >= 0) fs_adapt_start_burst(s, next);
    }
    const int idx = s->samples[0] < 2 ? 0 : s->burst_left > 0 ? s->explore_idx : s->best;
    if (fs_adapt.current && s->cand[idx] != fs_adapt.current) fs_adapt.switches++;
    fs_adapt.current = s->cand[idx];
    *slot_out = s;
    *idx_out = idx;
    const int n = s->cand[idx];
    pthread_mutex_unlock(&fs_adapt.lock);
    return n;
}

/* credit a call's wall time to the thread count it ran on */
static void fs_adapt_record(fs_adapt_slot *s, int idx, double seconds) {
    if (!s) return;
    pthread_mutex_lock(&fs_adapt.lock);
    if (s->burst_left > 0 && idx == s->explore_idx) { /* a re-measurement: its mean decides */
        s->burst_sum += seconds;
        s->burst_n++;
        if (--s->burst_left == 0) {
            const double mean = s->burst_sum / s->burst_n;
            s->ema[idx] = mean;
            s->samples[idx] += s->burst_n;
            s->explore_idx = -1;
            if (idx != s->best && mean < FS_ADAPT_MARGIN * s->ema[s->best]) {
                /* beat the best's average: check against a burst on the best, back to back (the
                 * average may hold a slow spell that is over, e.g. a core lost for a while) */
                s->confirm_for = idx;
                s->confirm_mean = mean;
                s->explore_idx = s->best;
                s->burst_left = FS_ADAPT_BURST;
                s->burst_n = 0;
                s->burst_sum = 0.;
            } else if (idx == s->best && s->confirm_for >= 0 && s->confirm_mean < FS_ADAPT_MARGIN * mean) {
                s->best = s->confirm_for;
                s->gap = FS_ADAPT_BASE;
                s->confirm_for = -1;
            } else {
                s->gap = s->gap * 2 > FS_ADAPT_MAX_GAP ? FS_ADAPT_MAX_GAP : s->gap * 2;
                s->confirm_for = -1;
            }
        }
    } else if (s->samples[idx] == 0 || (idx == 0 && s->samples[0] == 1)) {
        s->ema[idx] = seconds; /* the first call of a kind (cold) is replaced by the second */
        s->samples[idx]++;
    } else {
        s->ema[idx] += FS_ADAPT_ALPHA * (seconds - s->ema[idx]);
        s->samples[idx]++;
    }
    pthread_mutex_unlock(&fs_adapt.lock);
}

/* fn on the adaptive thread count for a call of kind `key` asking for `requested` threads, on the
 * pool or OpenMP's threads (fs_use_pool) */
static void fs_parallel(fs_job_fn fn, void *arg, int requested, uint64_t key) {
    fs_adapt_slot *slot;
    int idx;
    const int nt = fs_adapt_choose(key, requested, &slot, &idx);
    const double t0 = slot ? fs_now() : 0.;
    if (fs_use_pool() || nt == 1) {
        fs_pool_run(fn, arg, nt);
    } else {
#pragma omp parallel num_threads(nt)
        fs_run_counted(fn, arg, omp_get_thread_num(), omp_get_num_threads());
    }
    if (slot) fs_adapt_record(slot, idx, fs_now() - t0);
}
#endif

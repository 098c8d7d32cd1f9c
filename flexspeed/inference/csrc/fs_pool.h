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
 * count, then halvings down to 1), and re-measures another count with a burst of 4 calls: at once
 * when the count in use has become slower than another was, and every 8th call after a change
 * (backing off to every 128th while the others keep losing) unless the requested count is in use
 * and its threads keep their cores. Another count takes over when its burst was at least 10%
 * faster than the count in use and a burst on that count, right after, confirms it. Fewer threads
 * go back to the requested count at once when no thread has lost its core for 20 ms (the load has
 * gone). Idle, that costs the first look at each count (4 calls each); contended, the choice
 * follows the load within a few calls. fs_adapt_simulate drives this controller alone (tests).
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
/* When the kernel's threads lose their cores often enough to mean that another process competes
 * for them (then waits sleep at once: fs_contended_until). A leaky bucket of lost time slices,
 * over all threads: each lost slice adds one, and it drains at FS_IDLE_LOST_PER_S; contended when
 * it holds FS_CONTENDED_LOST. An idle 2-core VM loses ~10 slices a second (kernel threads,
 * timers), sometimes two at once; under the benchmark's contended load a thread loses 2-10 per
 * 5 ms call. The former rule (two lost slices in one call) also fired idle, every few hundred
 * calls, and each time made every wait of the next half second a futex sleep: ~4,000-8,000
 * sleeps in 900 calls, int8 steps 8% slower. */
#ifndef FS_CONTENDED_LOST
#define FS_CONTENDED_LOST 4.0
#endif
#ifndef FS_IDLE_LOST_PER_S
#define FS_IDLE_LOST_PER_S 100.0
#endif
static double fs_lost_bucket, fs_lost_at; /* updated under fs_lost_lock */
static pthread_mutex_t fs_lost_lock = PTHREAD_MUTEX_INITIALIZER;

static inline long fs_thread_nivcsw(void) {
#if defined(__linux__) && defined(RUSAGE_THREAD)
    struct rusage ru;
    if (getrusage(RUSAGE_THREAD, &ru) == 0) return ru.ru_nivcsw;
#endif
    return 0;
}

static void fs_note_lost_at(long lost, double now) {
    __atomic_add_fetch(&fs_preempted, lost, __ATOMIC_RELAXED);
    pthread_mutex_lock(&fs_lost_lock);
    double b = fs_lost_bucket - (now - fs_lost_at) * FS_IDLE_LOST_PER_S;
    b = (b > 0. ? b : 0.) + (double)lost;
    fs_lost_bucket = b < 2. * FS_CONTENDED_LOST ? b : 2. * FS_CONTENDED_LOST; /* drained within 80 ms once quiet */
    fs_lost_at = now;
    pthread_mutex_unlock(&fs_lost_lock);
    if (b >= FS_CONTENDED_LOST) fs_contended_until = now + FS_CONTENDED_HOLD_S; /* a racy hint: fine */
}

static inline void fs_note_lost(long lost) { fs_note_lost_at(lost, fs_now()); }

/* fn on one thread, counting the time slices it lost meanwhile */
static inline void fs_run_counted(fs_job_fn fn, void *arg, int tid, int nth) {
    const long before = fs_thread_nivcsw();
    fn(arg, tid, nth);
    const long lost = fs_thread_nivcsw() - before;
    if (lost > 0) fs_note_lost(lost);
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
    pthread_mutex_init(&fs_lost_lock, NULL);
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
#define FS_ADAPT_QUIET_S 0.02 /* no lost time slice for this long sends fewer threads back to the requested count */

typedef struct {
    uint64_t key;
    int requested, n_cands, best, gap, since;
    int explore_idx, burst_left, burst_n; /* a re-measurement in progress */
    int confirm_for;                      /* a count that beat the best's average, awaiting its check */
    double burst_sum, confirm_mean;
    int64_t last_use, lost_mark; /* fs_preempted when the last re-measurement started */
    int idle_fewer;              /* fewer threads won with no lost time slice (a shape too small to split) */
    int was_quiet;               /* no lost time slice for FS_ADAPT_QUIET_S at this kind's last call */
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

/* the thread count for a call of this kind at time `now` (fs_now(); fs_adapt_simulate's own clock);
 * *slot_out / *idx_out say what to credit its time to (slot NULL: not adaptive) */
static int fs_adapt_choose(uint64_t key, int requested, double now, fs_adapt_slot **slot_out, int *idx_out) {
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
    const int64_t lost = __atomic_load_n(&fs_preempted, __ATOMIC_RELAXED);
    const int quiet = now - fs_lost_at > FS_ADAPT_QUIET_S; /* a racy read: fine */
    if (quiet && !s->was_quiet) {
        /* the first call of this kind since the load went (no thread lost its core for
         * FS_ADAPT_QUIET_S): what was measured under the load no longer holds, so a re-measurement
         * in progress is dropped and the requested count's average restarts (it held the load's
         * slow calls, which made a count measured under the load look faster). A win of fewer
         * threads "with nothing lost" is forgotten too: under a load, sleeping waits are slow to be
         * woken without any thread losing a time slice, so that win may have been the load's (seen:
         * whole idle calls of GPT-2 int4 on one thread after a contended round) */
        s->idle_fewer = 0;
        s->burst_left = 0;
        s->explore_idx = -1;
        s->confirm_for = -1;
        if (s->best == 0 && s->samples[0] >= 2) s->samples[0] = 1;
    }
    if (quiet && s->best == 0) { /* all threads run and none is losing its core: the periodic look's window restarts */
        s->lost_mark = lost;
        s->since = 0;
    }
    s->was_quiet = quiet;
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
        /* on fewer threads than requested while no thread has lost its core for FS_ADAPT_QUIET_S:
         * the load that made fewer threads faster has gone, so back to the requested count at once
         * (its next call restarts its average). Re-measuring first kept ~12 calls on too few
         * threads each time a load stopped (benchmarks/generate.py alternates idle and contended
         * calls: idle steps took 1.2-1.4x as long); under the contended load a single thread loses
         * its core every few ms. Not for a shape on which fewer threads won while none lost its
         * core. */
        if (next < 0 && s->best != 0 && !s->idle_fewer && quiet) {
            s->best = 0;
            s->samples[0] = 1;
            s->gap = FS_ADAPT_BASE;
            s->since = 0;
            s->lost_mark = lost;
            s->confirm_for = -1;
        }
        /* the periodic look at another count: on the requested count, only while its threads lose
         * their cores (one lost time slice per 4 calls since the last look or the last quiet call:
         * idle, a few a second from kernel threads; contended, several a call). Fewer threads
         * cannot be faster than they were measured while all threads keep their cores. */
        if (next < 0 && ++s->since >= s->gap && (s->best != 0 || (lost - s->lost_mark) * 4 >= s->since))
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
                s->idle_fewer = s->confirm_for != 0 && __atomic_load_n(&fs_preempted, __ATOMIC_RELAXED) == s->lost_mark;
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
    const double t0 = fs_now();
    const int nt = fs_adapt_choose(key, requested, t0, &slot, &idx);
    if (fs_use_pool() || nt == 1) {
        fs_pool_run(fn, arg, nt);
    } else {
#pragma omp parallel num_threads(nt)
        fs_run_counted(fn, arg, omp_get_thread_num(), omp_get_num_threads());
    }
    if (slot) fs_adapt_record(slot, idx, fs_now() - t0);
}

int fs_adapt_simulate(uint64_t key, int requested, const double *seconds, int64_t lost, double now) {
    fs_adapt_slot *slot;
    int idx;
    const int n = fs_adapt_choose(fs_mix(key, 0x51a7u), requested, now, &slot, &idx);
    if (lost > 0) fs_note_lost_at((long)lost, now + seconds[n - 1]);
    if (slot) fs_adapt_record(slot, idx, seconds[n - 1]);
    return n;
}
#endif

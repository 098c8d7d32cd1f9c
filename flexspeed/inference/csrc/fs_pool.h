/* flexspeed native decode: the kernel's own worker threads (included by decode.c after fs_common.h).
 *
 * Why not OpenMP: a decode step is one parallel call every few milliseconds with 0.1-0.3 ms of
 * Python between calls. Under OMP_WAIT_POLICY=PASSIVE (which the benchmarks set, and which
 * shared machines need: spinning OpenMP threads stall every region by a scheduler slice when
 * another process holds a core) libgomp puts its workers to sleep at once, and waking them costs
 * ~50 us a call on the 2-core VM, more when the host has halted the idle vCPU (measured: an
 * OpenMP-launched OPT-125M int4 step took 0.2-0.35 ms longer when 40 us of Python ran between
 * calls than back to back). These workers spin for FS_POOL_SPIN_S after each call, yielding the
 * core to anyone runnable, and only then sleep on a futex; the caller is thread 0.
 *
 * One job at a time (a mutex serialises callers from several Python threads); a forked child
 * starts with no workers and makes its own. */
#ifndef FS_POOL_H
#define FS_POOL_H
#include <pthread.h>
#include <stdlib.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifndef FS_POOL_SPIN_S
#define FS_POOL_SPIN_S 0.002
#endif
#define FS_POOL_MAX 256

typedef void (*fs_job_fn)(void *arg, int tid, int nth);

static struct {
    volatile int gen __attribute__((aligned(64))); /* job number: workers wait for it to change */
    volatile int done __attribute__((aligned(64))); /* workers finished with the current job */
    volatile int sleepers;
    fs_job_fn fn;
    void *arg;
    int nth, n_workers, atfork;
    pthread_mutex_t lock;
} fs_pool = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void fs_futex_wait(volatile int *addr, int seen) {
#ifdef __linux__
    syscall(SYS_futex, (int *)addr, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
    (void)addr;
    (void)seen;
    sched_yield();
#endif
}

static void fs_futex_wake(volatile int *addr) {
#ifdef __linux__
    syscall(SYS_futex, (int *)addr, FUTEX_WAKE_PRIVATE, FS_POOL_MAX, NULL, NULL, 0);
#else
    (void)addr;
#endif
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
            const double t = omp_get_wtime();
            if (t0 == 0.) t0 = t;
            else if (t - t0 > FS_POOL_SPIN_S) { /* idle: sleep until the next job */
                __atomic_add_fetch(&fs_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                fs_futex_wait(&fs_pool.gen, a.seen); /* returns at once if gen has moved */
                __atomic_sub_fetch(&fs_pool.sleepers, 1, __ATOMIC_SEQ_CST);
                t0 = 0.;
                spins = 0;
            }
        }
        a.seen = g;
        if (a.tid < fs_pool.nth) {
            fs_pool.fn(fs_pool.arg, a.tid, fs_pool.nth);
            __atomic_add_fetch(&fs_pool.done, 1, __ATOMIC_RELEASE);
        }
    }
    return NULL;
}

static void fs_pool_atfork_child(void) {
    fs_pool.n_workers = 0; /* the parent's threads do not exist here */
    fs_pool.sleepers = 0;
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

/* 1: the pool, 0: OpenMP, -1: by the environment (above); returns the choice now in force */
int fs_set_threads(int mode) {
    fs_pool_use = mode;
    return fs_use_pool();
}

/* fn(arg, tid, nth) on nth threads (the caller is tid 0); returns when all have returned.
 * Fewer threads when workers cannot be started; returns the count used. */
static int fs_pool_run(fs_job_fn fn, void *arg, int nth) {
    if (nth > FS_POOL_MAX) nth = FS_POOL_MAX;
    if (nth <= 1) {
        fn(arg, 0, 1);
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
    fn(arg, 0, nth);
    for (long spins = 0; __atomic_load_n(&fs_pool.done, __ATOMIC_ACQUIRE) < nth - 1; spins++) {
        fs_pause();
        if (spins > 20000) sched_yield();
    }
    pthread_mutex_unlock(&fs_pool.lock);
    return nth;
}
#endif

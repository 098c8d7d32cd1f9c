/* flexspeed native decode: helpers shared by the kernel's parts (one translation unit: decode.c
 * includes fs_common.h, fs_products.h, fs_ops.h, fs_pool.h, fs_attention.h in that order; the
 * types and exports are declared in fs_abi.h). */
#ifndef FS_COMMON_H
#define FS_COMMON_H
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#include "fs_abi.h"
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define FS_FAST 1
#else
#define FS_FAST 0
#endif

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

/* ------------------------------------------------------------------ waiting
 *
 * Every wait of the kernel (a barrier between phases, the caller waiting for its workers) spins
 * for at most fs_spin_s() (FLEXSPEED_NATIVE_SPIN_US, default 50 us: longer than the imbalance of
 * a phase, far shorter than a scheduler slice), then sleeps on a futex; it does not spin at all
 * while the kernel's threads keep losing their cores (fs_pool.h's fs_note_lost: then for 50 ms
 * after each lost time slice). A thread that waits on a
 * descheduled one therefore gives its core back within microseconds, and the scheduler can run
 * the descheduled thread there; spinning until the other came back cost a whole slice (~3-8 ms)
 * per barrier whenever another process took a core (benchmarks/generate.py's contended row). */

static inline double fs_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double fs_spin_s_value = -1.;
static inline double fs_spin_s(void) {
    double v = fs_spin_s_value;
    if (v < 0.) {
        const char *e = getenv("FLEXSPEED_NATIVE_SPIN_US");
        v = e && *e ? atof(e) * 1e-6 : 50e-6;
        if (v < 0.) v = 0.;
        fs_spin_s_value = v;
    }
    return v;
}

static volatile int64_t fs_sleep_count; /* waits that slept (fs_pool_stats) */

/* Until this time (fs_now), waits do not spin: the kernel's threads keep losing their cores to other
 * processes (fs_pool.h's fs_note_lost counts their involuntary context switches), and spinning would only take
 * time from whoever holds the core the waited-for thread needs. */
static volatile double fs_contended_until;
#ifndef FS_CONTENDED_HOLD_S
#define FS_CONTENDED_HOLD_S 0.05
#endif

/* one futex call on the 32-bit word at addr: a wait (returns at once if the word no longer holds
 * val; timeout_ns > 0 bounds it) or a wake of up to val sleepers; shared: memory that several
 * processes map (fs_tp.h's segment), else FUTEX_PRIVATE. Without futexes (not Linux) a wait yields
 * the core and a wake does nothing. */
static void fs_futex(volatile void *addr, int wake, int val, int shared, long timeout_ns) {
#ifdef __linux__
    const int op = (wake ? FUTEX_WAKE : FUTEX_WAIT) | (shared ? 0 : FUTEX_PRIVATE_FLAG);
    struct timespec ts = {timeout_ns / 1000000000L, timeout_ns % 1000000000L};
    syscall(SYS_futex, (int *)addr, op, val, !wake && timeout_ns > 0 ? &ts : NULL, NULL, 0);
#else
    (void)addr;
    (void)val;
    (void)shared;
    (void)timeout_ns;
    if (!wake) sched_yield();
#endif
}

static void fs_futex_wait(volatile int *addr, int seen) { fs_futex(addr, 0, seen, 0, 0); }
static void fs_futex_wake(volatile int *addr) { fs_futex(addr, 1, 1 << 30, 0, 0); }

/* return once *addr != seen: spin up to fs_spin_s(), then sleep (counted in *sleepers, which the
 * writer of *addr reads after its store to decide whether to wake anyone) */
static void fs_wait_change(volatile int *addr, int seen, volatile int *sleepers) {
    double t0 = 0.;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(addr, __ATOMIC_ACQUIRE) != seen) return;
            fs_pause();
        }
        const double t = fs_now();
        if (t < fs_contended_until) break;
        if (t0 == 0.) t0 = t;
        else if (t - t0 > fs_spin_s()) break;
    }
    __atomic_add_fetch(&fs_sleep_count, 1, __ATOMIC_RELAXED);
    while (__atomic_load_n(addr, __ATOMIC_ACQUIRE) == seen) {
        __atomic_add_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
        fs_futex_wait(addr, seen); /* returns at once if *addr has moved */
        __atomic_sub_fetch(sleepers, 1, __ATOMIC_SEQ_CST);
    }
}

/* store v to *addr and wake whoever sleeps on it */
static inline void fs_publish(volatile int *addr, int v, volatile int *sleepers) {
    __atomic_store_n(addr, v, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(sleepers, __ATOMIC_SEQ_CST) > 0) fs_futex_wake(addr);
}

typedef struct {
    volatile int count;
    volatile int sense;
    volatile int sleepers;
} fs_barrier;

static void barrier_wait(fs_barrier *b, int n, int *local) {
    if (n == 1) return;
    *local = !*local;
    if (__atomic_add_fetch(&b->count, 1, __ATOMIC_ACQ_REL) == n) {
        __atomic_store_n(&b->count, 0, __ATOMIC_RELAXED);
        fs_publish(&b->sense, *local, &b->sleepers);
        return;
    }
    fs_wait_change(&b->sense, !*local, &b->sleepers); /* sense cannot flip twice before we leave */
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

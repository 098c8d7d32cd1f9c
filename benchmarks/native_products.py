"""The native kernel's matrix products alone, against a plain read of the same bytes.

A decode step at batch 1 is bound by reading its weights once; this isolates the products from the
rest of the step (attention, norms, barriers, Python) to tell how close each weight format's loop
comes to that read. It compiles a small C program that includes the kernel's own source
(``flexspeed/inference/csrc/decode.c``, so it measures exactly what ``init_inference`` runs) and
times, per format, GPT-2-shaped products (12 layers of qkv 2304x768, out 768x768, up 3072x768,
down 768x3072, plus the 50257x768 head for the row-major formats), each split over the threads as
a decode step splits it, against a 512-bit read of the same number of bytes, interleaved in one
process.

Columns: ``MB`` = bytes read per pass (weights, and int8 / int4 scales); ``products ms`` /
``read ms`` = min and median over the repetitions; ``x read`` = the ratio of the medians (and of
the minima). ``bf16 Conv1D`` is HF GPT-2's un-injected layout (weights stored (in, out), read
transposed).

    python benchmarks/native_products.py            # 2 threads, 21 repetitions
    python benchmarks/native_products.py --threads 1 --reps 41

Needs a C compiler with OpenMP and an AVX-512 CPU (the portable C build has no fast products to
measure).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_SOURCE = r"""
#include "decode.c"
#include <stdio.h>
#include <omp.h>
#if !FS_FAST
int main(void) { printf("portable build: no fast products to measure\n"); return 3; }
#else
#define NMAX 49
typedef struct { fs_linear L; float *prep; } mat;
static mat M[NMAX];
static int nm;
static float x[3072], y[60000];
static size_t bytes;

static void *fill(size_t n) {
    uint8_t *p = aligned_alloc(64, (n + 63) / 64 * 64);
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)((i * 2654435761u) >> 13);
    return p;
}

static void add(int fmt, int n, int k, int trans) {
    fs_linear *L = &M[nm].L;
    memset(L, 0, sizeof *L);
    L->fmt = fmt, L->n = n, L->k = k, L->group = 64, L->trans = trans;
    if (fmt == FS_BF16) {
        uint16_t *w = aligned_alloc(64, (size_t)n * k * 2 + 64);
        for (size_t i = 0; i < (size_t)n * k; i++) w[i] = 0x3c00 + (uint16_t)(i % 61);
        L->w = w, bytes += (size_t)n * k * 2;
    } else if (fmt == FS_I8) {
        float *s = aligned_alloc(64, (size_t)n * 4 + 64);
        for (int i = 0; i < n; i++) s[i] = 1e-3f;
        L->w = fill((size_t)n * k), L->scales = s, bytes += (size_t)n * k + (size_t)n * 4;
    } else {
        uint32_t *s = aligned_alloc(64, (size_t)n * (k / 64) * 4 + 64);
        for (size_t i = 0; i < (size_t)n * (k / 64); i++) s[i] = 0x3c003c00u; /* bf16 [scale | zero] */
        L->w = fill((size_t)n * k / 2), L->scales = s, bytes += (size_t)n * k / 2 + (size_t)n * (k / 64) * 4;
    }
    M[nm].prep = aligned_alloc(64, sizeof(float) * (prep_floats(L) + 64));
    prepare(L, x, 1, k, M[nm].prep);
    nm++;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}
static int cmp(const void *a, const void *b) {
    const double u = *(const double *)a, v = *(const double *)b;
    return u < v ? -1 : u > v;
}

int main(int argc, char **argv) {
    const int fmt = atoi(argv[1]), trans = atoi(argv[2]), nth = atoi(argv[3]), reps = atoi(argv[4]);
    for (int i = 0; i < 3072; i++) x[i] = (float)((i * 37) % 101) / 50.f - 1.f;
    for (int l = 0; l < 12; l++) {
        add(fmt, 2304, 768, trans), add(fmt, 768, 768, trans), add(fmt, 3072, 768, trans), add(fmt, 768, 3072, trans);
    }
    if (!trans) add(fmt, 50257, 768, 0);
    uint8_t *plain = fill(bytes + 64);
    double *tp = malloc(sizeof(double) * reps), *tr = malloc(sizeof(double) * reps);
    volatile int64_t sink = 0;
    for (int rep = 0; rep < reps + 1; rep++) { /* the first pass warms up */
        const double t0 = now();
        for (int i = 0; i < nm; i++) {
            const fs_linear *L = &M[i].L;
#pragma omp parallel num_threads(nth)
            {
                int r0, r1;
                const int tid = omp_get_thread_num();
                if (L->trans) trans_mt(L, x, 1, L->k, y, L->n, tid, nth, &r0, &r1);
                else {
                    split_rows(L->n, tid, nth, &r0, &r1);
                    linear_rows(L, x, 1, L->k, M[i].prep, y, L->n, r0, r1);
                }
            }
        }
        const double t1 = now();
        int64_t acc = 0;
#pragma omp parallel num_threads(nth) reduction(+ : acc)
        {
            const int t = omp_get_thread_num();
            const size_t lines = bytes / 64, a = lines * t / nth * 64, b = lines * (t + 1) / nth * 64;
            __m512i s = _mm512_setzero_si512();
            for (size_t i = a; i < b; i += 64) s = _mm512_add_epi32(s, _mm512_load_si512(plain + i));
            acc += _mm512_reduce_add_epi32(s);
        }
        sink += acc;
        if (rep > 0) tp[rep - 1] = t1 - t0, tr[rep - 1] = now() - t1;
    }
    qsort(tp, reps, sizeof(double), cmp);
    qsort(tr, reps, sizeof(double), cmp);
    printf("%.1f %.4f %.4f %.4f %.4f\n", bytes / 1e6, tp[0] * 1e3, tp[reps / 2] * 1e3, tr[0] * 1e3, tr[reps / 2] * 1e3);
    return 0;
}
#endif
"""

FORMATS = [("bf16", 1, 0), ("int8", 2, 0), ("int4 g64", 3, 0), ("bf16 Conv1D", 1, 1)]


def build(out: Path) -> Path:
    from flexspeed.inference import native

    native.library()  # the kernel's own build: which compiler, and whether there is one
    cc = native.status().get("compiler")
    if not cc or native.status()["state"] != "ok":
        sys.exit(f"benchmarks/native_products.py needs the native kernel: {native.status()['detail']}")
    src = out / "native_products.c"
    src.write_text(_SOURCE)
    exe = out / "native_products"
    march = os.environ.get("FLEXSPEED_NATIVE_MARCH", "native")
    csrc = Path(native.__file__).parent / "csrc"
    cmd = [cc, f"-march={march}", "-O3", "-fopenmp", "-pthread", "-std=gnu11", f"-I{csrc}", "-o", str(exe),
           str(src), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"building the harness failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    return exe


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=21)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fs-products-") as tmp:
        exe = build(Path(tmp))
        env = dict(os.environ, OMP_WAIT_POLICY="ACTIVE")  # both loops on spinning OpenMP threads, alike
        print(f"{args.threads} threads, {args.reps} repetitions, GPT-2 shapes, interleaved with a plain read")
        print(f"{'format':12} {'MB':>7} {'products ms (min / med)':>24} {'read ms (min / med)':>20} {'x read (med / min)':>19}")
        for label, fmt, trans in FORMATS:
            res = subprocess.run([str(exe), str(fmt), str(trans), str(args.threads), str(args.reps)], env=env,
                                 capture_output=True, text=True)
            if res.returncode == 3:
                sys.exit(res.stdout.strip())
            if res.returncode != 0:
                sys.exit(f"{label}: the harness failed ({res.returncode}): {res.stderr[-1000:]}")
            mb, pmin, pmed, rmin, rmed = (float(v) for v in res.stdout.split())
            rows.append(dict(format=label, mb=mb, products_ms=pmed, read_ms=rmed, x_read=pmed / rmed))
            print(f"{label:12} {mb:7.1f} {pmin:11.3f} / {pmed:8.3f} {rmin:9.3f} / {rmed:8.3f} "
                  f"{pmed / rmed:10.2f} / {pmin / rmin:5.2f}")
    return rows


if __name__ == "__main__":
    main()

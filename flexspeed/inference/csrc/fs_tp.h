/* flexspeed native decode: tensor parallelism over the ranks of one host (included by decode.c
 * after fs_pool.h).
 *
 * gloo's all-reduce of a few KB costs ~0.3-1.4 ms on loopback on the 2-core VM (a send/recv round
 * trip 0.16 ms), and a decode step of a 12-layer model needs 24 of them (plus the logits); these
 * take microseconds. Layout of the shared segment: a header of per-rank sequence numbers (one
 * cache line each), then two buffers per rank of `cap` floats. An exchange copies this rank's
 * data into its buffer (the call's parity picks which), publishes its sequence number, waits for
 * every rank's, then reads the others' buffers: a sum in rank order (every rank gets bit-identical
 * results) or a gather of row blocks. Two buffers suffice: a rank can start exchange s+2 only
 * after every rank has published s+1, i.e. finished reading exchange s.
 * Waiting spins briefly (not at all on a contended machine, see fs_wait_change), then sleeps on a
 * futex in the segment, so that a rank that lost its core gets one. */
#ifndef FS_TP_H
#define FS_TP_H

typedef struct {
    volatile int64_t seq;
    volatile int32_t sleepers; /* ranks asleep on this rank's seq (a shared futex on its low word) */
    char pad[52];
} fs_seq;

int64_t fs_shm_bytes(int world, int64_t cap) { return (int64_t)world * 64 + (int64_t)world * 2 * cap * 4; }

/* rank j's buffer of exchange `call` */
static float *fs_tp_buf(const fs_tp *tp, int j, int64_t call) {
    return (float *)((char *)tp->seg + (size_t)tp->world * 64) + ((size_t)j * 2 + (size_t)(call & 1)) * tp->cap;
}

/* publish exchange tp->call + 1 (this rank's buffer already filled) and wait until every rank has */
static int fs_tp_publish_wait(fs_tp *tp) {
    fs_seq *seqs = (fs_seq *)tp->seg;
    const int64_t call = tp->call + 1;
    tp->call = call;
    __atomic_store_n(&seqs[tp->rank].seq, call, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&seqs[tp->rank].sleepers, __ATOMIC_SEQ_CST) > 0) fs_futex(&seqs[tp->rank].seq, 1, 1 << 30, 1, 0);
    for (int j = 0; j < tp->world; j++) {
        double t0 = 0.;
        int64_t s;
        while ((s = __atomic_load_n(&seqs[j].seq, __ATOMIC_ACQUIRE)) < call) {
            for (int i = 0; i < 64 && __atomic_load_n(&seqs[j].seq, __ATOMIC_ACQUIRE) < call; i++) fs_pause();
            const double now = fs_now();
            if (t0 == 0.) t0 = now;
            if (now - t0 > tp->timeout_s) return FS_ERR_TIMEOUT; /* a rank stopped answering */
            if (now < fs_contended_until || now - t0 > fs_spin_s()) {
                __atomic_add_fetch(&fs_sleep_count, 1, __ATOMIC_RELAXED);
                __atomic_add_fetch(&seqs[j].sleepers, 1, __ATOMIC_SEQ_CST);
                /* a shared futex on seq's low word (little-endian), bounded so that the timeout is checked */
                fs_futex(&seqs[j].seq, 0, (int)s, 1, 10L * 1000 * 1000);
                __atomic_sub_fetch(&seqs[j].sleepers, 1, __ATOMIC_SEQ_CST);
            }
        }
    }
    return FS_OK;
}

/* x (n) <- the sum over ranks of x; with accum != NULL, accum += that sum instead (x unchanged) */
int fs_shm_allreduce(fs_tp *tp, float *x, int64_t n, float *accum) {
    if (n > tp->cap || n < 0) return FS_ERR_SHAPE;
    memcpy(fs_tp_buf(tp, tp->rank, tp->call + 1), x, sizeof(float) * (size_t)n);
    const int rc = fs_tp_publish_wait(tp);
    if (rc != FS_OK) return rc;
    const float *b0 = fs_tp_buf(tp, 0, tp->call);
    const size_t stride = (size_t)2 * tp->cap;
    for (int64_t i = 0; i < n; i++) {
        float acc = b0[i];
        for (int j = 1; j < tp->world; j++) acc += b0[(size_t)j * stride + i];
        if (accum) accum[i] += acc;
        else x[i] = acc;
    }
    return FS_OK;
}

/* logits (B, tp->vocab): this rank filled its columns [rank * per, + its count); the others' come
 * from their buffers */
static int fs_tp_gather(fs_tp *tp, float *logits, int B) {
    const int64_t V = tp->vocab, per = (V + tp->world - 1) / tp->world;
    if ((int64_t)B * per > tp->cap) return FS_ERR_SHAPE;
    int64_t c0 = (int64_t)tp->rank * per, cnt = V - c0 < per ? V - c0 : per;
    float *mine = fs_tp_buf(tp, tp->rank, tp->call + 1);
    for (int b = 0; b < B && cnt > 0; b++) memcpy(mine + (size_t)b * per, logits + (size_t)b * V + c0, sizeof(float) * cnt);
    const int rc = fs_tp_publish_wait(tp);
    if (rc != FS_OK) return rc;
    for (int j = 0; j < tp->world; j++) {
        if (j == tp->rank) continue;
        c0 = (int64_t)j * per;
        cnt = V - c0 < per ? V - c0 : per;
        const float *theirs = fs_tp_buf(tp, j, tp->call);
        for (int b = 0; b < B && cnt > 0; b++)
            memcpy(logits + (size_t)b * V + c0, theirs + (size_t)b * per, sizeof(float) * cnt);
    }
    return FS_OK;
}
#endif

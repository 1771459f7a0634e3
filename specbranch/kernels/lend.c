/* Lending a waiting worker's core to the other worker's kernels (parallel runtime, CPU).
 *
 * Why: the parallel runtime pins the target to one core and the draft to the other, and each round one of them
 * finishes first and waits for the other: most often the draft, which then waits for the verdict (above all while
 * the target prefills the prompt on its one core: the draft's small model prefills in a fraction of the time);
 * after a rollback the target, which waits for the draft's next block. So each process runs a helper thread
 * pinned to the *other* worker's core, and the helper takes chunks of its own process's linears exactly while
 * the other worker waits, and never otherwise: the target's helper the target's int8 linears (q8.c) while the
 * draft waits for a verdict, the draft's helper the draft's int4 linears (q4.c) while the target waits for a
 * proposal. Below, the *owner* is the process whose kernels hand out chunks and the *lender* the one that waits.
 *
 * Why nothing changes: each linear's output blocks are computed whole by one thread, in one fixed order (q8.c,
 * q4.c), so which thread computed a block does not change a bit of it.
 *
 * Why neither waits for the other: the helper may claim work only while the LEND bit of the shared word is
 * set. The lender sets the bit when it starts waiting; the owner clears it before it sends the lender anything
 * (kernels run inside a forward, and the message leaves after the forward), so by the time the lender wakes,
 * the helper holds no work and goes to sleep on a futex. The bit lives in the same 64-bit word as the job's
 * claim counter and a claim is a compare-and-swap on that word, so no claim slips in after it is cleared. The
 * helper keeps the normal scheduling class: as SCHED_IDLE, any other busy process on that core could starve it
 * in the middle of a chunk the owner waits for.
 *
 * Why each thread keeps to its own run of the weights: a job's items are split into chunks, and a chunk handed to
 * whichever thread asks next (one shared counter) breaks each thread's stream of memory at every chunk. Measured
 * with two OpenMP threads on the target's 7-row forward: 46.8 ms with a static split, 58.1 ms with 4-block chunks
 * (about the kernels' 64 KB lending chunks) handed out as asked for (docs/performance.md, Stop 31). So a job
 * offered while the core is lent is split in two halves, the owner walking the first from its front and the
 * helper the second from its front; whoever finishes first takes chunks from the far end of the other's half, one
 * at a time. A job published while the core is not lent is all the owner's half; a helper that comes later takes
 * chunks from its far end.
 *
 * Shared page (a file both processes map): word 0 (u64) = LEND (bit 63) | job id (bits 48-62) | four 12-bit chunk
 * indices: a (0-11) and m (12-23), the owner's half [a, m); b (24-35) and e (36-47), the helper's half [b, e); then
 * a u32 doorbell the helper sleeps on (a futex). A chunk is claimed by one compare-and-swap of the whole word that
 * moves one index by one, so it is claimed exactly once.
 */
#define _GNU_SOURCE
#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <omp.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lend.h"

#define LEND_BIT (1ULL << 63)
#define ID_SHIFT 48
#define ID_MASK 0x7fffULL
#define IDX_BITS 12
#define IDX_MASK 0xfffULL
#define MAX_CHUNKS 4095 /* chunks a job is split into at most (larger chunks beyond it) */
enum { A, M, B, E }; /* the four indices' places in the word */

typedef struct {
    _Atomic uint64_t word;
    _Atomic uint32_t bell;
} shared_page;

struct lend {
    shared_page *page;
    pthread_t thread;
    cpu_set_t cores;
    _Atomic uint32_t helping;  /* job id the helper may be claiming or running (0: none) */
    _Atomic int sleeping;      /* the helper waits on the doorbell */
    _Atomic int stop;
    _Atomic int busy;          /* a lend_for is under way (one at a time; others take OpenMP) */
    _Atomic uint64_t helped;   /* chunks the helper ran (tests, diagnostics) */
    uint32_t last_id;          /* the owner's job counter */
    lend_fn fn;                /* the current job, written before it is published (the word's CAS) */
    void *ctx;
    int64_t chunk, n;          /* items per chunk, items in all */
};

static struct lend *_Atomic active; /* whose helper the kernels use now (NULL: plain OpenMP) */

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0); /* shared: the lender wakes it */
}

static inline uint32_t job_id(uint64_t s) { return (uint32_t)((s >> ID_SHIFT) & ID_MASK); }
static inline int64_t idx(uint64_t s, int k) { return (int64_t)((s >> (k * IDX_BITS)) & IDX_MASK); }
static inline uint64_t with_idx(uint64_t s, int k, int64_t v) {
    return (s & ~(IDX_MASK << (k * IDX_BITS))) | ((uint64_t)v << (k * IDX_BITS));
}
static inline int job_open(uint64_t s) { return idx(s, A) < idx(s, M) || idx(s, B) < idx(s, E); }

/* Claim and run chunks of job `id` until none is left (or, for the helper, the bit is gone): the front of one's own
 * half first, then the far end of the other's. */
static void run_claims(struct lend *l, uint32_t id, int helper) {
    _Atomic uint64_t *w = &l->page->word;
    const int own = helper ? B : A, own_end = helper ? E : M, other = helper ? A : B, other_end = helper ? M : E;
    uint64_t s = atomic_load(w);
    for (;;) {
        if (job_id(s) != id || (helper && !(s & LEND_BIT))) return;
        int64_t c;
        uint64_t claimed;
        if (idx(s, own) < idx(s, own_end)) {
            c = idx(s, own);
            claimed = with_idx(s, own, c + 1);
        } else if (idx(s, other) < idx(s, other_end)) {
            c = idx(s, other_end) - 1;
            claimed = with_idx(s, other_end, c);
        } else {
            return;
        }
        if (atomic_compare_exchange_weak(w, &s, claimed)) {
            const int64_t from = c * l->chunk, to = from + l->chunk < l->n ? from + l->chunk : l->n;
            l->fn(l->ctx, from, to); /* the job's fields are this job's: the owner waits for us (helping) */
            if (helper) atomic_fetch_add_explicit(&l->helped, 1, memory_order_relaxed);
            s = atomic_load(w);
        }
    }
}

static void *helper_main(void *arg) {
    struct lend *l = arg;
    pthread_setaffinity_np(pthread_self(), sizeof l->cores, &l->cores);
    _Atomic uint64_t *w = &l->page->word;
    while (!atomic_load(&l->stop)) {
        const uint32_t bell = atomic_load(&l->page->bell);
        const uint64_t s = atomic_load(w);
        if (!(s & LEND_BIT)) { /* the lender is computing: sleep until it waits again or a job is announced */
            atomic_store(&l->sleeping, 1);
            if (atomic_load(&l->page->bell) == bell && !atomic_load(&l->stop))
                futex(&l->page->bell, FUTEX_WAIT, bell);
            atomic_store(&l->sleeping, 0);
            continue;
        }
        if (job_open(s)) {
            /* Say which job before claiming from it: a claim (CAS) that succeeds is then seen by the owner,
             * which waits while helping names its job. */
            atomic_store(&l->helping, job_id(s));
            run_claims(l, job_id(s), 1);
            atomic_store(&l->helping, 0);
        } else {
            _mm_pause(); /* the lender's core is idle: spin for the next job of this forward */
        }
    }
    return NULL;
}

/* A child forked from this process has no helper thread but still maps the page: it must not publish jobs
 * there, or the parent's helper would run them with the parent's job fields. */
static void forget_in_child(void) { atomic_store(&active, NULL); }
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, forget_in_child); }

struct lend *lend_start(void *page, const int *cores, int ncores) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    struct lend *l = calloc(1, sizeof *l);
    if (!l) return NULL;
    l->page = page;
    /* No job is this helper's yet: a page reused after its last owner died may still name one of that
     * process's jobs (and the bit, if its lender is gone too), whose function pointer means nothing here. */
    atomic_store(&l->page->word, 0);
    CPU_ZERO(&l->cores);
    for (int i = 0; i < ncores; ++i) CPU_SET(cores[i], &l->cores);
    if (pthread_create(&l->thread, NULL, helper_main, l) != 0) {
        free(l);
        return NULL;
    }
    return l;
}

void lend_stop(struct lend *l) {
    if (!l) return;
    struct lend *expected = l;
    atomic_compare_exchange_strong(&active, &expected, NULL);
    while (atomic_load(&l->busy)) _mm_pause(); /* a kernel call may still be using it */
    atomic_store(&l->stop, 1);
    atomic_fetch_add(&l->page->bell, 1);
    futex(&l->page->bell, FUTEX_WAKE, INT_MAX);
    pthread_join(l->thread, NULL);
    free(l);
}

void lend_activate(struct lend *l) { atomic_store(&active, l); }

/* Whether a lent core is in use now (linear.py then sends prompts through the kernel too). */
int lend_active(void) { return atomic_load(&active) != NULL; }

uint64_t lend_helped(struct lend *l) { return atomic_load(&l->helped); }

/* Lender side (any process mapping the page): offer the core while waiting, take it back when woken (lend_reclaim).
 * Quietly: the helper is not woken and joins at the owner's next job (lend_for wakes it). For owners whose calls
 * are short (the draft's linears take well under a millisecond), and so that a lender whose message has already
 * arrived does not wake a thread onto its own core only to send it back to sleep. */
void lend_offer_quiet(void *page) { atomic_fetch_or(&((shared_page *)page)->word, LEND_BIT); }

/* The same, waking the helper to join the owner's current job at once (the target's linears take milliseconds). */
void lend_offer(void *page) {
    shared_page *p = page;
    lend_offer_quiet(page);
    atomic_fetch_add(&p->bell, 1);
    futex(&p->bell, FUTEX_WAKE, INT_MAX);
}

/* Owner side before it wakes the lender (and the lender once woken): no new claims from here on. */
void lend_reclaim(void *page) { atomic_fetch_and(&((shared_page *)page)->word, ~LEND_BIT); }

int lend_for(int64_t n, int64_t chunk, lend_fn fn, void *ctx) {
    struct lend *l = atomic_load(&active);
    int free_ = 0;
    if (!l || n < 1 || !atomic_compare_exchange_strong(&l->busy, &free_, 1)) return 0;
    l->fn = fn;
    l->ctx = ctx;
    l->chunk = chunk < 1 ? 1 : chunk;
    if ((n + l->chunk - 1) / l->chunk > MAX_CHUNKS) l->chunk = (n + MAX_CHUNKS - 1) / MAX_CHUNKS;
    l->n = n;
    const int64_t chunks = (n + l->chunk - 1) / l->chunk;
    const uint32_t id = l->last_id = l->last_id % ID_MASK + 1; /* 1..ID_MASK: 0 means "no job" in helping */
    _Atomic uint64_t *w = &l->page->word;
    uint64_t s = atomic_load(w), fresh;
    do { /* keep the draft's bit, replace the job: two halves while the core is lent, else all the owner's */
        const int64_t mid = s & LEND_BIT ? (chunks + 1) / 2 : chunks;
        fresh = (s & LEND_BIT) | ((uint64_t)id << ID_SHIFT);
        fresh = with_idx(with_idx(with_idx(with_idx(fresh, A, 0), M, mid), B, mid), E, chunks);
    } while (!atomic_compare_exchange_weak(w, &s, fresh));
    if (s & LEND_BIT) {
        atomic_fetch_add(&l->page->bell, 1);
        if (atomic_load(&l->sleeping)) futex(&l->page->bell, FUTEX_WAKE, INT_MAX);
    }
#pragma omp parallel if (omp_get_max_threads() > 1)
    run_claims(l, id, 0);
    while (atomic_load(&l->helping) == id) _mm_pause(); /* a chunk the helper claimed is not written yet */
    atomic_store(&l->busy, 0);
    return 1;
}

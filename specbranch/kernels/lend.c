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
 * Shared page (a file both processes map): word 0 (u64) = LEND (bit 63) | job id (bits 48-62) | end
 * (bits 24-47) | next unclaimed index (bits 0-23); then a u32 doorbell the helper sleeps on (a futex).
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
#define END_SHIFT 24
#define IDX_MASK 0xffffffULL

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
    int64_t chunk;
};

static struct lend *_Atomic active; /* whose helper the kernels use now (NULL: plain OpenMP) */

static long futex(_Atomic uint32_t *addr, int op, uint32_t val) {
    return syscall(SYS_futex, (uint32_t *)addr, op, val, NULL, NULL, 0); /* shared: the lender wakes it */
}

static inline uint32_t job_id(uint64_t s) { return (uint32_t)((s >> ID_SHIFT) & ID_MASK); }
static inline int64_t job_end(uint64_t s) { return (int64_t)((s >> END_SHIFT) & IDX_MASK); }
static inline int64_t job_next(uint64_t s) { return (int64_t)(s & IDX_MASK); }

/* Claim and run chunks of job `id` until none is left (or, for the helper, the bit is gone). */
static void run_claims(struct lend *l, uint32_t id, int need_lend) {
    _Atomic uint64_t *w = &l->page->word;
    uint64_t s = atomic_load(w);
    for (;;) {
        if (job_id(s) != id || (need_lend && !(s & LEND_BIT))) return;
        const int64_t next = job_next(s), end = job_end(s);
        if (next >= end) return;
        const int64_t chunk = l->chunk, to = next + chunk < end ? next + chunk : end;
        if (atomic_compare_exchange_weak(w, &s, (s & ~IDX_MASK) | (uint64_t)to)) {
            l->fn(l->ctx, next, to); /* the job's fields are this job's: the owner waits for us (helping) */
            if (need_lend) atomic_fetch_add_explicit(&l->helped, 1, memory_order_relaxed);
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
        if (job_next(s) < job_end(s)) {
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
    if (!l || n > (int64_t)IDX_MASK || !atomic_compare_exchange_strong(&l->busy, &free_, 1)) return 0;
    l->fn = fn;
    l->ctx = ctx;
    l->chunk = chunk < 1 ? 1 : chunk;
    const uint32_t id = l->last_id = l->last_id % ID_MASK + 1; /* 1..ID_MASK: 0 means "no job" in helping */
    _Atomic uint64_t *w = &l->page->word;
    uint64_t s = atomic_load(w), fresh;
    do { /* keep the draft's bit, replace the job */
        fresh = (s & LEND_BIT) | ((uint64_t)id << ID_SHIFT) | ((uint64_t)n << END_SHIFT);
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

/* cbn's worker threads: the calling thread claims units of work itself and
 * never waits for a helper that has not started.
 *
 * Why not OpenMP: a parallel region ends at a barrier, so the caller waits
 * for every thread of the team, including one that the OS has not scheduled
 * yet because its core is busy (another process, OpenBLAS's spinning
 * threads after a matrix product, PyTorch's libgomp threads). Measured on a
 * 2-core machine with one core busy, 2-thread calls then took 2 to 4 times
 * their one-thread time. Here the caller and the helpers take units from
 * one shared counter; a helper that wakes late finds fewer units, or none,
 * and the caller waits only for units a running helper has already claimed.
 *
 * The units of a job are fixed by the kernels from the shape alone, never
 * by who runs them, so results do not depend on the number of threads or on
 * which thread ran a unit.
 *
 * The claim counter (ticket) holds a job's generation in its high 32 bits
 * and its next unit in the low 32. Before a new job's fields are written the
 * ticket is closed ((old generation, CLOSED): nothing can be claimed), then
 * the new generation opens at unit 0. A helper reads the fields between
 * reading the ticket and claiming with a compare-and-swap on that same
 * value; the swap succeeds only if the ticket never moved, so the fields it
 * read belong to the job it claimed from (generations only grow).
 *
 * One job runs at a time. A second caller that finds the pool in use (Python
 * threads calling cbn at once) runs its units alone, which is what the
 * threads of a Python pool want anyway.
 *
 * Helpers spin briefly after a job, then sleep on a condition variable. A
 * child process made by fork() starts with no helpers and creates its own.
 * Without POSIX threads and GCC's atomic builtins everything runs on the
 * calling thread.
 */
#ifndef CBN_POOL_H
#define CBN_POOL_H

#include <stddef.h>
#include <stdint.h>

/* Runs unit ``unit`` of ``job``; ``worker`` is 0 for the caller, 1, 2, ...
 * for helpers, always below the job's team size (per-thread scratch). */
typedef void (*cbn_unit_fn)(const void *job, ptrdiff_t unit, int worker);

static inline void cbn_run_serial(cbn_unit_fn fn, const void *job, ptrdiff_t n_units)
{
    for (ptrdiff_t u = 0; u < n_units; u++)
        fn(job, u, 0);
}

#if (defined(__unix__) || defined(__APPLE__)) && defined(__GNUC__) \
    && !defined(CBN_POOL_SERIAL)
#define CBN_POOL_THREADS 1

#if defined(__linux__) && !defined(_GNU_SOURCE)
#define _GNU_SOURCE  /* sched_getcpu; Python.h, included first, defines it too */
#endif
#include <pthread.h>
#include <signal.h>
#include <sched.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CBN_PAUSE() _mm_pause()
/* The caller's floating-point mode (flush-to-zero, denormals-are-zero),
 * which a helper takes on before running a job's units: it may differ from
 * the mode the helper was created with (torch.set_flush_denormal, say). */
#define CBN_FP_MODE() _mm_getcsr()
#define CBN_SET_FP_MODE(m) _mm_setcsr(m)
#else
#define CBN_PAUSE() ((void)0)
#define CBN_FP_MODE() 0u
#define CBN_SET_FP_MODE(m) ((void)(m))
#endif

#define CBN_POOL_CLOSED 0xFFFFFFFFu
/* How long an idle helper watches for the next job before it sleeps: long
 * enough to span the Python between back-to-back calls (waking a sleeping
 * thread costs tens of microseconds on a virtual machine), short enough not
 * to hold a core the next matrix product needs for long. */
#ifndef CBN_POOL_SPIN_NS
#define CBN_POOL_SPIN_NS 100000
#endif
#define CBN_POOL_MAX_HELPERS 255

static struct {
    uint64_t ticket;          /* generation << 32 | next unit */
    int64_t done;             /* units finished in this generation */
    cbn_unit_fn fn;           /* the open job; written while the ticket is closed */
    const void *job;
    int64_t n_units;
    int team;
    unsigned fp_mode;         /* the caller's floating-point mode */
    int busy;                 /* a caller owns the pool */
    int helpers;              /* helpers started */
    int sleepers;             /* helpers waiting on ``wake`` */
    int nudges;               /* wakes helpers without a job (so they spin) */
    int caller_cpu;           /* the CPU the last caller ran on, or -1 */
    int64_t alone_until;      /* owner only: run alone until this time (ns) */
    int64_t backoff;          /* owner only: the last such spell's length (ns) */
    int64_t last_end;         /* owner only: when the last job ended (ns) */
    int served;               /* owner only: jobs helpers served well in a row */
    int strikes;              /* owner only: late verdicts since the last spell */
    int64_t nudged_at;        /* owner only: when sleeping helpers were nudged, or 0 */
    pthread_mutex_t lock;     /* guards sleeping and starting helpers */
    pthread_cond_t wake;
} cbn_pool = {0, 0, NULL, NULL, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0, 0, 0, 0,
              PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

#define CBN_LOAD(p) __atomic_load_n(p, __ATOMIC_SEQ_CST)
#define CBN_STORE(p, v) __atomic_store_n(p, v, __ATOMIC_SEQ_CST)

static inline uint32_t cbn_generation(uint64_t ticket) { return (uint32_t)(ticket >> 32); }

static inline int64_t cbn_now_ns(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
}

/* Claim and run units of generation ``generation`` until none is left;
 * returns how many this thread ran. */
static int64_t cbn_pool_work(int worker, uint32_t generation)
{
    int64_t ran = 0;
    for (;;) {
        uint64_t ticket = CBN_LOAD(&cbn_pool.ticket);
        uint32_t unit = (uint32_t)ticket;
        if (cbn_generation(ticket) != generation)
            return ran;
        cbn_unit_fn fn = CBN_LOAD(&cbn_pool.fn);
        const void *job = CBN_LOAD(&cbn_pool.job);
        int64_t n_units = CBN_LOAD(&cbn_pool.n_units);
        int team = CBN_LOAD(&cbn_pool.team);
        if ((int64_t)unit >= n_units || worker >= team)
            return ran;  /* all claimed (or closed), or not one of this job's team */
        unsigned fp_mode = CBN_LOAD(&cbn_pool.fp_mode);
        if (!__atomic_compare_exchange_n(&cbn_pool.ticket, &ticket, ticket + 1, 0,
                                         __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
            continue;
        if (worker > 0 && CBN_FP_MODE() != fp_mode)
            CBN_SET_FP_MODE(fp_mode);
        fn(job, (ptrdiff_t)unit, worker);
        __atomic_fetch_add(&cbn_pool.done, 1, __ATOMIC_SEQ_CST);
        ran++;
    }
}

static inline int cbn_current_cpu(void)
{
#if defined(__linux__)
    return sched_getcpu();
#else
    return -1;
#endif
}

/* Whether this thread shares the last caller's CPU: spinning there would
 * only take the CPU from the caller. */
static inline int cbn_on_callers_cpu(void)
{
    int cpu = cbn_current_cpu();
    return cpu >= 0 && cpu == CBN_LOAD(&cbn_pool.caller_cpu);
}

/* Spin, then sleep, until a generation after ``seen`` opens; returns it.
 * A nudge ends the sleep without a job: the helper spins again. A helper
 * on the caller's CPU does not spin. */
static uint32_t cbn_pool_wait(uint32_t seen)
{
    uint32_t generation;
    for (;;) {
        int64_t give_up = cbn_now_ns() + CBN_POOL_SPIN_NS;
        for (int turn = 0;; turn++) {
            generation = cbn_generation(CBN_LOAD(&cbn_pool.ticket));
            if (generation != seen)
                return generation;
            if (turn % 64 == 0 && (cbn_now_ns() > give_up || cbn_on_callers_cpu()))
                break;
            CBN_PAUSE();
        }
        /* The caller stores the ticket (or a nudge), then reads ``sleepers``;
         * this side adds to ``sleepers``, then reads them: one of the two
         * sees the other. */
        int nudges = CBN_LOAD(&cbn_pool.nudges);
        __atomic_fetch_add(&cbn_pool.sleepers, 1, __ATOMIC_SEQ_CST);
        pthread_mutex_lock(&cbn_pool.lock);
        while ((generation = cbn_generation(CBN_LOAD(&cbn_pool.ticket))) == seen
               && CBN_LOAD(&cbn_pool.nudges) == nudges)
            pthread_cond_wait(&cbn_pool.wake, &cbn_pool.lock);
        pthread_mutex_unlock(&cbn_pool.lock);
        __atomic_fetch_sub(&cbn_pool.sleepers, 1, __ATOMIC_SEQ_CST);
        if (generation != seen)
            return generation;
    }
}

static void *cbn_pool_helper(void *arg)
{
    int worker = (int)(intptr_t)arg;
    uint32_t seen = cbn_generation(CBN_LOAD(&cbn_pool.ticket));
    for (;;) {
        seen = cbn_pool_wait(seen);
        cbn_pool_work(worker, seen);
    }
    return NULL;
}

static void cbn_pool_after_fork_in_child(void)
{
    /* Only the forking thread lives on: no helpers, nothing in use. */
    pthread_mutex_t fresh_lock = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_wake = PTHREAD_COND_INITIALIZER;
    cbn_pool.helpers = 0;
    cbn_pool.sleepers = 0;
    cbn_pool.busy = 0;
    cbn_pool.lock = fresh_lock;
    cbn_pool.wake = fresh_wake;
}

/* Start helpers until there are ``wanted`` (capped); returns how many run.
 * Called by the pool's owner only. */
static int cbn_pool_grow(int wanted)
{
    static int fork_handler = 0;
    if (wanted > CBN_POOL_MAX_HELPERS)
        wanted = CBN_POOL_MAX_HELPERS;
    if (cbn_pool.helpers >= wanted)
        return cbn_pool.helpers;
    if (!fork_handler) {
        pthread_atfork(NULL, NULL, cbn_pool_after_fork_in_child);
        fork_handler = 1;
    }
    /* Helpers take no asynchronous signals (Python handles them on its main
     * thread); a fault in a helper still kills the process with its signal. */
    sigset_t all, saved;
    sigfillset(&all);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (cbn_pool.helpers < wanted) {
        pthread_t thread;
        intptr_t worker = cbn_pool.helpers + 1;
        if (pthread_create(&thread, &attr, cbn_pool_helper, (void *)worker) != 0)
            break;  /* run with the helpers there are */
        cbn_pool.helpers++;
    }
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return cbn_pool.helpers;
}

static void cbn_pool_wake(void)
{
    pthread_mutex_lock(&cbn_pool.lock);
    pthread_cond_broadcast(&cbn_pool.wake);
    pthread_mutex_unlock(&cbn_pool.lock);
}

/* Run units 0 ... n_units - 1 of ``job`` (which reads ``elements`` values)
 * on up to ``team`` threads, this one included; returns when every unit has
 * finished.
 *
 * Helpers help only when they are awake. Waking a sleeping thread takes
 * tens to hundreds of microseconds on a virtual machine, and the woken
 * thread may land on the caller's own core and preempt it: measured here,
 * pooled calls with sleeping helpers ran slower than one thread. So a job
 * that finds them asleep runs alone, unless it is long enough
 * (CBN_POOL_WAKE_ELEMENTS) to be worth their wake-up; if calls are coming
 * back to back it nudges them, so that they spin, awake, for the next one.
 *
 * The helpers' cores are busy (another process, another library's threads)
 * when a nudge did not wake them within CBN_POOL_WAKE_NS, when awake helpers took
 * less than half their share of a job, or when the caller waited for units
 * helpers had claimed longer than it worked itself (a helper preempted in
 * the middle of a unit costs the caller milliseconds, many times a
 * cache-sized call). At the second such verdict (one alone happens on a
 * quiet machine too) jobs run alone for a spell, 4 ms, 8, 16, ... up to
 * CBN_POOL_MAX_ALONE_NS, before the helpers are asked again; every
 * CBN_POOL_SERVED_TO_HALVE jobs in a row that they serve well clear the
 * verdicts and halve the next spell. */
#define CBN_POOL_WAKE_ELEMENTS (1 << 21)
#define CBN_POOL_WAKE_NS 200000    /* a nudged helper is up by then, or late */
#define CBN_POOL_MIN_ALONE_NS 4000000
#define CBN_POOL_MAX_ALONE_NS 256000000
#define CBN_POOL_SERVED_TO_HALVE 16
#define CBN_POOL_STRIKES 2

/* The owner's verdict on the helpers after a job or a nudge. */
static void cbn_pool_judge(int late)
{
    if (late) {
        cbn_pool.served = 0;
        if (++cbn_pool.strikes < CBN_POOL_STRIKES)
            return;
        cbn_pool.strikes = 0;
        cbn_pool.backoff = cbn_pool.backoff ? 2 * cbn_pool.backoff : CBN_POOL_MIN_ALONE_NS;
        if (cbn_pool.backoff > CBN_POOL_MAX_ALONE_NS)
            cbn_pool.backoff = CBN_POOL_MAX_ALONE_NS;
        cbn_pool.alone_until = cbn_now_ns() + cbn_pool.backoff;
    } else if (++cbn_pool.served >= CBN_POOL_SERVED_TO_HALVE) {
        cbn_pool.served = 0;
        cbn_pool.strikes = 0;
        cbn_pool.backoff /= 2;
        if (cbn_pool.backoff < CBN_POOL_MIN_ALONE_NS)
            cbn_pool.backoff = 0;
    }
}

/* A job on the calling thread alone; nudges sleeping helpers when calls
 * come back to back (and no spell is on). */
static void cbn_pool_run_alone(cbn_unit_fn fn, const void *job, ptrdiff_t n_units,
                               int asleep, int in_spell, int64_t started)
{
    if (asleep && !in_spell && started - cbn_pool.last_end < CBN_POOL_SPIN_NS) {
        __atomic_fetch_add(&cbn_pool.nudges, 1, __ATOMIC_SEQ_CST);
        cbn_pool_wake();
        cbn_pool.nudged_at = started;
    }
    cbn_run_serial(fn, job, n_units);
}

/* A job shared with the helpers; returns whether they were late. */
static int cbn_pool_share(cbn_unit_fn fn, const void *job, ptrdiff_t n_units, int team,
                          int64_t started)
{
    uint32_t generation = cbn_generation(CBN_LOAD(&cbn_pool.ticket));
    CBN_STORE(&cbn_pool.ticket, ((uint64_t)generation << 32) | CBN_POOL_CLOSED);
    CBN_STORE(&cbn_pool.fn, fn);
    CBN_STORE(&cbn_pool.job, job);
    CBN_STORE(&cbn_pool.n_units, (int64_t)n_units);
    CBN_STORE(&cbn_pool.team, team);
    CBN_STORE(&cbn_pool.fp_mode, CBN_FP_MODE());
    CBN_STORE(&cbn_pool.done, 0);
    generation++;
    CBN_STORE(&cbn_pool.ticket, (uint64_t)generation << 32);
    int woken = CBN_LOAD(&cbn_pool.sleepers) > 0;
    if (woken)
        cbn_pool_wake();
    int64_t helped = (int64_t)n_units - cbn_pool_work(0, generation);
    /* Every unit is claimed; wait for those running on helpers. */
    int64_t finished = cbn_now_ns(), waited = 0;
    for (int turn = 1; CBN_LOAD(&cbn_pool.done) < (int64_t)n_units; turn++) {
        if (turn < 4096)
            CBN_PAUSE();
        else
            sched_yield();  /* a helper was preempted: let it run */
        if (turn % 64 == 0)
            waited = cbn_now_ns() - finished;
    }
    /* Helpers just woken are late by their wake-up whatever their cores do:
     * only the wait judges them. */
    return (!woken && 2 * team * helped < (int64_t)(team - 1) * n_units)
        || waited > finished - started;
}

static void cbn_pool_run(cbn_unit_fn fn, const void *job, ptrdiff_t n_units, int team,
                         ptrdiff_t elements)
{
    int idle = 0;
    if (team <= 1 || n_units <= 1 || (int64_t)n_units >= (int64_t)CBN_POOL_CLOSED
        || !__atomic_compare_exchange_n(&cbn_pool.busy, &idle, 1, 0,
                                        __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
        cbn_run_serial(fn, job, n_units);
        return;
    }
    int64_t started = cbn_now_ns();
    CBN_STORE(&cbn_pool.caller_cpu, cbn_current_cpu());
    int had = cbn_pool.helpers, helpers = cbn_pool_grow(team - 1);
    /* New helpers are still starting: as good as asleep. */
    int asleep = CBN_LOAD(&cbn_pool.sleepers) > 0 || helpers > had;
    if (cbn_pool.nudged_at && started - cbn_pool.nudged_at > CBN_POOL_WAKE_NS) {
        /* Nudged a while ago: still asleep means their cores are busy (or
         * they share the caller's). */
        cbn_pool.nudged_at = 0;
        cbn_pool_judge(asleep);
    }
    int in_spell = cbn_pool.backoff > 0 && started < cbn_pool.alone_until;
    if (helpers == 0 || in_spell || (asleep && elements < CBN_POOL_WAKE_ELEMENTS))
        cbn_pool_run_alone(fn, job, n_units, asleep, in_spell, started);
    else
        cbn_pool_judge(cbn_pool_share(fn, job, n_units, team < helpers + 1 ? team : helpers + 1,
                                      started));
    cbn_pool.last_end = cbn_now_ns();
    CBN_STORE(&cbn_pool.busy, 0);
}

#else  /* no threads: every job runs on the calling thread */

static inline void cbn_pool_run(cbn_unit_fn fn, const void *job, ptrdiff_t n_units,
                                int team, ptrdiff_t elements)
{
    (void)team;
    (void)elements;
    cbn_run_serial(fn, job, n_units);
}

#endif

static inline int cbn_pool_threaded(void)
{
#ifdef CBN_POOL_THREADS
    return 1;
#else
    return 0;
#endif
}

#endif /* CBN_POOL_H */

/* Scratch memory for the kernels' partial results, kept between calls.
 *
 * The per-chunk partials of a large reduction take megabytes. A fresh block
 * that size comes from mmap and goes back to the system on free (glibc trims
 * it), so every call would fault in and zero it again, one page at a time:
 * measured here, 1.9 ms on the 2.8 ms statistics of a (4096, 4096) float32
 * array. Instead, the last block given back is kept (one per extension
 * module, at most CBN_SCRATCH_KEEP bytes) and handed to the next call that
 * fits in it. Concurrent callers are safe: the slot is swapped atomically, a
 * caller that finds it empty allocates as before.
 *
 * Without GCC's atomic builtins every call allocates and frees.
 */
#ifndef CBN_SCRATCH_H
#define CBN_SCRATCH_H

#include <stddef.h>
#include <stdlib.h>

#define CBN_SCRATCH_KEEP ((size_t)32 << 20)

/* Precedes each block; 64 bytes keep the data as aligned as malloc's. */
typedef struct {
    size_t capacity;
    char pad[64 - sizeof(size_t)];
} cbn_scratch_header;

#if defined(__GNUC__)
static cbn_scratch_header *cbn_scratch_kept = NULL;

static inline cbn_scratch_header *cbn_scratch_swap(cbn_scratch_header *h)
{
    return __atomic_exchange_n(&cbn_scratch_kept, h, __ATOMIC_ACQ_REL);
}
#else
static inline cbn_scratch_header *cbn_scratch_swap(cbn_scratch_header *h)
{
    free(h);
    return NULL;
}
#endif

/* At least nbytes of uninitialized memory, or NULL when out of memory. */
static inline void *cbn_scratch_take(size_t nbytes)
{
    cbn_scratch_header *h = cbn_scratch_swap(NULL);
    if (h != NULL && h->capacity < nbytes) {
        free(h);
        h = NULL;
    }
    if (h == NULL) {
        if (nbytes > (size_t)-1 - sizeof(cbn_scratch_header))
            return NULL;
        h = (cbn_scratch_header *)malloc(sizeof(cbn_scratch_header) + nbytes);
        if (h == NULL)
            return NULL;
        h->capacity = nbytes;
    }
    return h + 1;
}

/* Returns a block from cbn_scratch_take (or NULL, ignored). */
static inline void cbn_scratch_give(void *block)
{
    cbn_scratch_header *h;
    if (block == NULL)
        return;
    h = (cbn_scratch_header *)block - 1;
    if (h->capacity > CBN_SCRATCH_KEEP) {
        free(h);
        return;
    }
    free(cbn_scratch_swap(h));  /* the block it displaces, if any */
}

#endif /* CBN_SCRATCH_H */

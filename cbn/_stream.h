/* Non-temporal ("streaming") stores for outputs too large to stay in cache.
 *
 * A normal store first reads the destination line into cache (read for
 * ownership) and later writes it back: a large output costs two memory
 * transfers per byte and evicts the input the kernel is about to re-read.
 * A streaming store writes the line straight to memory. The kernels compute
 * a short stretch of output into an L1 buffer and hand it to
 * cbn_stream_copy; the values, and so the results, are the same either way.
 *
 * Streaming stores are weakly ordered: each thread calls cbn_stream_fence
 * after its last one, before other threads may read what it wrote.
 * Without SSE2 (other architectures) both fall back to plain stores.
 */
#ifndef CBN_STREAM_H
#define CBN_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__SSE2__)
#include <immintrin.h>

static inline void cbn_stream_copy(void *dst, const void *src, size_t nbytes)
{
    char *d = (char *)dst;
    const char *s = (const char *)src;
    /* Plain stores up to the first 16-byte boundary of dst (element sizes
     * are 4 or 8, so the head and tail are whole elements). */
    size_t head = (size_t)(-(uintptr_t)d & 15);
    if (head > nbytes)
        head = nbytes;
    memcpy(d, s, head);
    d += head;
    s += head;
    nbytes -= head;
#if defined(__AVX__)
    if (((uintptr_t)d & 31) && nbytes >= 16) {
        _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
        d += 16;
        s += 16;
        nbytes -= 16;
    }
    for (; nbytes >= 32; d += 32, s += 32, nbytes -= 32)
        _mm256_stream_si256((__m256i *)d, _mm256_loadu_si256((const __m256i *)s));
#endif
    for (; nbytes >= 16; d += 16, s += 16, nbytes -= 16)
        _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
    memcpy(d, s, nbytes);
}

static inline void cbn_stream_fence(void) { _mm_sfence(); }

#else

static inline void cbn_stream_copy(void *dst, const void *src, size_t nbytes)
{
    memcpy(dst, src, nbytes);
}

static inline void cbn_stream_fence(void) {}

#endif

#endif

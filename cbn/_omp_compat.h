/* OpenMP queries that also compile without OpenMP.
 *
 * setup.py drops -fopenmp where the compiler lacks it; the kernels then run
 * serial and these report a single thread.
 */
#ifndef CBN_OMP_COMPAT_H
#define CBN_OMP_COMPAT_H

#ifdef _OPENMP
#include <omp.h>
static inline int cbn_openmp_enabled(void) { return 1; }
static inline int cbn_max_threads(void) { return omp_get_max_threads(); }
#else
static inline int cbn_openmp_enabled(void) { return 0; }
static inline int cbn_max_threads(void) { return 1; }
#endif

#endif

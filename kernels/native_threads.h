/* One job per thread for mixq's native helpers (activation_codes.c, packed_gemm.c): on torch's OpenMP
 * workers where the build has OpenMP (the same libgomp torch loaded; kernels/native.py says why), else on
 * threads of their own, the caller's thread taking the first job. */

#ifndef MIXQ_NATIVE_THREADS_H
#define MIXQ_NATIVE_THREADS_H

#include <pthread.h>
#include <stddef.h>

#define MAX_THREADS 64

typedef void *(*job_function_t)(void *job);

/* run(jobs + t * job_size) for t < threads (at most MAX_THREADS), all done on return. */
static void run_jobs(job_function_t run, void *jobs, size_t job_size, int threads) {
    char *first = jobs;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++)
        run(first + t * job_size);
#else
    pthread_t workers[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&workers[t], NULL, run, first + t * job_size) == 0;
    run(first);
    for (int t = 1; t < threads; t++) {
        if (started[t])
            pthread_join(workers[t], NULL);
        else
            run(first + t * job_size); /* no thread to be had: the work is done here */
    }
#endif
}

#endif

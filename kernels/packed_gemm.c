/* The 8/4/2-bit weight GEMM of the x86 CPU backend, with the weights' unpacking fused into the GEMM's
 * packing step and the reference's epilogue fused into its stores:
 *
 *     y[m, n] = f32(acc[m, n] - zero * w_sum[n]) * (x_scale * w_scale[n]) + bias[n]
 *     acc[m, n] = sum_k a[m, k] * w[n, k]          (exact, int32)
 *
 * a: uint8 activation codes (mixq's signed code + 128, so zero is the signed zero point + 128 and
 * acc - zero * w_sum is the reference's acc - x_zero * w_sum exactly); w: pack_weight's layout, [N,
 * ceil(K / per_byte)] bytes, weight k in byte k / per_byte, field k % per_byte from the low bits up,
 * two's complement. The epilogue is the reference's arithmetic in its order (IEEE float32, no FMA: the
 * build passes -ffp-contract=off), and the bfloat16 store rounds half to even as torch does, so the
 * output is bit for bit kernels/reference.py's.
 *
 * Blocking (one thread's share): for each block of 256 output columns and 2048 k, the packing step
 * reads the packed bytes of those weight rows once, unpacks them with SIMD bit operations and transposes
 * 16x16 dword tiles into the AVX512-VNNI operand order (4 consecutive k of one column per dword, 16
 * columns per register): four 64-column panels, 512 KB of int8 weights, reused by every row of
 * activations, 48 rows at a time (their bytes stay in L2 while they go through the four panels). The
 * micro-kernel holds a 6 x 64 int32 tile in 24 registers and feeds it with vpdpbusd (u8 x s8 -> s32,
 * exact). Packed weights are never unpacked in memory beyond those panels.
 *
 * A convolution is read in place (an implicit im2col): a row of the activation matrix is an output
 * position, and its k run over the taps, each tap a contiguous run of channels in the padded
 * channels-last input; the micro-kernel follows those runs, so the 9x larger column matrix of a 3x3
 * convolution is never written.
 *
 * Built by kernels/native.py with -march=native; on a CPU without AVX512-VNNI this file compiles to
 * mixq_packed_gemm_available() == 0 and callers keep the unpack-then-_int_mm path. */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native_threads.h"

#define OUT_FLOAT32 0
#define OUT_BFLOAT16 1

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>

#define ROWS 6              /* micro-kernel rows (activation rows per register tile) */
#define COLUMNS 64          /* micro-kernel columns: 4 registers of 16 int32 */
#define K_BLOCK 2048        /* k per packed panel: 64 columns x 2048 = 128 KB of int8 weights */
#define K_CHUNK 64          /* k unpacked per weight row at a time (one register of int8) */
#define N_CHUNK 256         /* columns packed together: 4 panels, 512 KB, reused by every row */
#define M_CHUNK 48          /* activation rows that go through those panels together (96 KB: stays in L2) */

int mixq_packed_gemm_available(void) { return 1; }

typedef struct {
    const uint8_t *a;
    int64_t lda;
    const uint8_t *w;
    int64_t ldw; /* bytes per packed weight row */
    int bits;
    int64_t m, n, k;
    int32_t zero;
    const int32_t *w_sum;
    const float *scale; /* x_scale * w_scale[n], float32 */
    const float *bias;  /* float32 [N] or NULL */
    void *out;
    int out_dtype;
    int64_t ldo;
    /* channels > 0: `a` is a convolution's input codes, padded, [B, in_h, in_w, channels], read in place
     * (row m = output position (b, y, x), k = (tap row, tap column, channel)); else a plain [M, K] matrix */
    int64_t channels, out_h, out_w, in_h, in_w, kernel_w, stride_h, stride_w;
    int64_t row_first, row_last;     /* this worker's rows */
    int64_t block_first, block_last; /* this worker's 64-column blocks */
    int failed;
} gemm_job_t;

/* Where row m of the activation matrix starts (its k = 0). */
static inline const uint8_t *row_start(const gemm_job_t *job, int64_t m) {
    if (!job->channels)
        return job->a + m * job->lda;
    const int64_t positions = job->out_h * job->out_w, b = m / positions, yx = m % positions;
    const int64_t y = yx / job->out_w, x = yx % job->out_w;
    return job->a + ((b * job->in_h + y * job->stride_h) * job->in_w + x * job->stride_w) * job->channels;
}

/* The k-range [k0, k0 + kc) as runs that are contiguous in every row: (offset from the row's start, k-quads);
 * one run for a matrix, one per tap (or part of one) for a convolution. Returns the number of runs. */
static int k_runs(const gemm_job_t *job, int64_t k0, int64_t kc, int64_t *offsets, int64_t *quads) {
    if (!job->channels) {
        offsets[0] = k0, quads[0] = kc / 4;
        return 1;
    }
    int runs = 0;
    for (int64_t k = k0; k < k0 + kc;) {
        const int64_t tap = k / job->channels, channel = k % job->channels;
        const int64_t length = job->channels - channel < k0 + kc - k ? job->channels - channel : k0 + kc - k;
        offsets[runs] = ((tap / job->kernel_w) * job->in_w + tap % job->kernel_w) * job->channels + channel;
        quads[runs++] = length / 4;
        k += length;
    }
    return runs;
}

/* 64 weights k0 .. k0 + 63 of one packed row as int8 in natural k order (16 dwords of 4 k each); fields
 * past the row's end (k >= K) read as 0. */
static inline __m512i unpack_chunk(const uint8_t *row, int64_t row_bytes, int bits, int64_t k0) {
    if (bits == 8) { /* plain int8: a masked load of the row's tail */
        int64_t count = row_bytes - k0;
        __mmask64 mask = count >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << count) - 1);
        return _mm512_maskz_loadu_epi8(mask, row + k0);
    }
    if (bits == 4) {
        int64_t first = k0 / 2, count = row_bytes - first;
        __mmask32 mask = count >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << count) - 1);
        __m512i words = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mask, row + first));
        /* byte b -> bytes (b & 15, b >> 4): the low field is the smaller k */
        __m512i fields = _mm512_or_si512(_mm512_and_si512(words, _mm512_set1_epi16(0x000f)),
                                         _mm512_and_si512(_mm512_slli_epi16(words, 4), _mm512_set1_epi16(0x0f00)));
        __m512i sign = _mm512_set1_epi8(0x08);
        return _mm512_sub_epi8(_mm512_xor_si512(fields, sign), sign); /* 4-bit two's complement -> int8 */
    }
    /* bits == 2: one byte holds 4 consecutive k, one dword of the result */
    int64_t first = k0 / 4, count = row_bytes - first;
    __mmask16 mask = count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
    __m512i d = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mask, row + first));
    __m512i fields = _mm512_or_si512(
        _mm512_or_si512(_mm512_and_si512(d, _mm512_set1_epi32(0x3)),
                        _mm512_and_si512(_mm512_slli_epi32(d, 6), _mm512_set1_epi32(0x300))),
        _mm512_or_si512(_mm512_and_si512(_mm512_slli_epi32(d, 12), _mm512_set1_epi32(0x30000)),
                        _mm512_and_si512(_mm512_slli_epi32(d, 18), _mm512_set1_epi32(0x3000000))));
    __m512i sign = _mm512_set1_epi8(0x02);
    return _mm512_sub_epi8(_mm512_xor_si512(fields, sign), sign);
}

/* r[i] = dword i of 16 rows -> r[g] = dword g of each row i (a 16x16 dword transpose). */
static inline void transpose_16x16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + j]: in 128-bit lane L, dword 4L + j of rows 4i .. 4i + 3 */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) { /* a 4x4 transpose of 128-bit lanes across u[j], u[4 + j], u[8 + j], u[12 + j] */
        __m512i p = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44), q = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
        __m512i s = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xee), u = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xee);
        t[j] = _mm512_shuffle_i32x4(p, q, 0x88);
        t[4 + j] = _mm512_shuffle_i32x4(p, q, 0xdd);
        t[8 + j] = _mm512_shuffle_i32x4(s, u, 0x88);
        t[12 + j] = _mm512_shuffle_i32x4(s, u, 0xdd);
    }
    for (int i = 0; i < 16; i++)
        r[i] = t[i];
}

/* The panel of columns n0 .. n0 + 63, k0 .. k0 + kc - 1 (kc a multiple of 4): dword (g * 64 + c) holds
 * k0 + 4g .. k0 + 4g + 3 of column n0 + c; columns past N are 0. */
static void pack_panel(const gemm_job_t *job, int64_t n0, int64_t k0, int64_t kc, int32_t *panel) {
    for (int group = 0; group < COLUMNS / 16; group++) {
        for (int64_t chunk = 0; chunk < kc; chunk += K_CHUNK) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                int64_t n = n0 + group * 16 + i;
                r[i] = n < job->n ? unpack_chunk(job->w + n * job->ldw, job->ldw, job->bits, k0 + chunk)
                                  : _mm512_setzero_si512();
            }
            transpose_16x16(r);
            int64_t groups = (kc - chunk) / 4 < 16 ? (kc - chunk) / 4 : 16;
            for (int64_t g = 0; g < groups; g++)
                _mm512_storeu_si512(panel + (chunk / 4 + g) * COLUMNS + group * 16, r[g]);
        }
    }
}

/* tile[r][c] (+)= a[r, 4g .. 4g + 3] . panel[g][c] over the panel's `groups` k-quads, for ROWS rows of a:
 * starting from zero, or from the tile with `accumulate`. The 24 accumulators are named locals, not an
 * array, so that the compiler keeps them in registers. */
#define ROW_STEP(r)                                                                                              \
    do {                                                                                                         \
        int32_t quad;                                                                                            \
        memcpy(&quad, a##r + 4 * g, 4);                                                                          \
        __m512i x = _mm512_set1_epi32(quad);                                                                     \
        c##r##0 = _mm512_dpbusd_epi32(c##r##0, x, b0);                                                           \
        c##r##1 = _mm512_dpbusd_epi32(c##r##1, x, b1);                                                           \
        c##r##2 = _mm512_dpbusd_epi32(c##r##2, x, b2);                                                           \
        c##r##3 = _mm512_dpbusd_epi32(c##r##3, x, b3);                                                           \
    } while (0)
#define ROW_LOAD(r)                                                                                              \
    __m512i c##r##0 = accumulate ? _mm512_loadu_si512(tile + r * ldt) : _mm512_setzero_si512();            \
    __m512i c##r##1 = accumulate ? _mm512_loadu_si512(tile + r * ldt + 16) : _mm512_setzero_si512();       \
    __m512i c##r##2 = accumulate ? _mm512_loadu_si512(tile + r * ldt + 32) : _mm512_setzero_si512();       \
    __m512i c##r##3 = accumulate ? _mm512_loadu_si512(tile + r * ldt + 48) : _mm512_setzero_si512()
#define ROW_STORE(r)                                                                                             \
    do {                                                                                                         \
        _mm512_storeu_si512(tile + r * ldt, c##r##0);                                                        \
        _mm512_storeu_si512(tile + r * ldt + 16, c##r##1);                                                   \
        _mm512_storeu_si512(tile + r * ldt + 32, c##r##2);                                                   \
        _mm512_storeu_si512(tile + r * ldt + 48, c##r##3);                                                   \
    } while (0)

/* tile[r][c] (+)= sum over the runs of rows[r][offset + 4g .. + 3] . panel[g][c] (the panel's k-quads in
 * order), for ROWS rows: starting from zero, or from the tile with `accumulate`. The 24 accumulators are
 * named locals, not an array, so that the compiler keeps them in registers. */
static void micro_kernel(const uint8_t *const rows[ROWS], const int64_t *offsets, const int64_t *quads, int runs,
                         const int32_t *panel, int32_t *tile, int64_t ldt, int accumulate) {
    ROW_LOAD(0);
    ROW_LOAD(1);
    ROW_LOAD(2);
    ROW_LOAD(3);
    ROW_LOAD(4);
    ROW_LOAD(5);
    for (int run = 0; run < runs; run++) {
        const uint8_t *a0 = rows[0] + offsets[run], *a1 = rows[1] + offsets[run], *a2 = rows[2] + offsets[run];
        const uint8_t *a3 = rows[3] + offsets[run], *a4 = rows[4] + offsets[run], *a5 = rows[5] + offsets[run];
        for (int64_t g = 0; g < quads[run]; g++, panel += COLUMNS) {
            __m512i b0 = _mm512_loadu_si512(panel), b1 = _mm512_loadu_si512(panel + 16);
            __m512i b2 = _mm512_loadu_si512(panel + 32), b3 = _mm512_loadu_si512(panel + 48);
            ROW_STEP(0);
            ROW_STEP(1);
            ROW_STEP(2);
            ROW_STEP(3);
            ROW_STEP(4);
            ROW_STEP(5);
        }
    }
    ROW_STORE(0);
    ROW_STORE(1);
    ROW_STORE(2);
    ROW_STORE(3);
    ROW_STORE(4);
    ROW_STORE(5);
}

/* float32 -> bfloat16, round half to even (torch's conversion; NaN -> a quiet NaN). */
static inline __m256i to_bfloat16(__m512 y) {
    __m512i bits = _mm512_castps_si512(y);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
    rounded = _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0));
    return _mm512_cvtepi32_epi16(rounded);
}

/* The epilogue of one row's 16 columns n .. n + 15 (those below N), stored into row `row` of out. */
static inline void store_row(const gemm_job_t *job, int64_t row, int64_t n, __m512i acc) {
    int64_t left = job->n - n;
    __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
    __m512i w_sum = _mm512_maskz_loadu_epi32(mask, job->w_sum + n);
    __m512i folded = _mm512_sub_epi32(acc, _mm512_mullo_epi32(_mm512_set1_epi32(job->zero), w_sum));
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_maskz_loadu_ps(mask, job->scale + n));
    if (job->bias)
        y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, job->bias + n));
    if (job->out_dtype == OUT_FLOAT32)
        _mm512_mask_storeu_ps((float *)job->out + row * job->ldo + n, mask, y);
    else
        _mm256_mask_storeu_epi16((uint16_t *)job->out + row * job->ldo + n, mask, to_bfloat16(y));
}

static void run_gemm(gemm_job_t *job) {
    const int64_t rows = job->row_last - job->row_first;
    int32_t *panels = aligned_alloc(64, (size_t)K_BLOCK * N_CHUNK);
    /* partial sums between k blocks ([rows + ROWS][N_CHUNK]: a padded last tile writes ROWS rows), the
     * tile of a single k block, and room for the last rows padded to a full tile */
    int32_t *partial = job->k > K_BLOCK ? malloc((size_t)(rows + ROWS) * N_CHUNK * sizeof(int32_t)) : NULL;
    int32_t scratch[ROWS * COLUMNS];
    int64_t offsets[K_BLOCK / 4 + 2], quads[K_BLOCK / 4 + 2]; /* runs of a k block: at most one per 4 channels */
    if (!panels || (job->k > K_BLOCK && !partial)) {
        free(panels), free(partial);
        job->failed = 1;
        return;
    }
    const int64_t column_last = job->block_last * COLUMNS;
    for (int64_t n_chunk = job->block_first * COLUMNS; n_chunk < column_last; n_chunk += N_CHUNK) {
        const int64_t slivers = (column_last - n_chunk < N_CHUNK ? column_last - n_chunk : N_CHUNK) / COLUMNS;
        for (int64_t k0 = 0; k0 < job->k; k0 += K_BLOCK) {
            const int64_t kc = job->k - k0 < K_BLOCK ? job->k - k0 : K_BLOCK;
            const int first_k = k0 == 0, last_k = k0 + kc == job->k;
            const int runs = k_runs(job, k0, kc, offsets, quads);
            for (int64_t s = 0; s < slivers; s++)
                pack_panel(job, n_chunk + s * COLUMNS, k0, kc, panels + s * (kc / 4) * COLUMNS);
            for (int64_t m_chunk = job->row_first; m_chunk < job->row_last; m_chunk += M_CHUNK) {
                const int64_t m_end = job->row_last - m_chunk < M_CHUNK ? job->row_last : m_chunk + M_CHUNK;
                for (int64_t s = 0; s < slivers; s++) {
                    const int64_t n0 = n_chunk + s * COLUMNS;
                    for (int64_t m0 = m_chunk; m0 < m_end; m0 += ROWS) {
                        const int64_t here = m_end - m0 < ROWS ? m_end - m0 : ROWS;
                        const uint8_t *rows[ROWS]; /* rows past the last repeat it: read, never stored */
                        for (int64_t r = 0; r < ROWS; r++)
                            rows[r] = row_start(job, m0 + (r < here ? r : here - 1));
                        /* the tile: its partial sums (kept between k blocks), or a scratch on one k block */
                        int32_t *tile = partial ? partial + (m0 - job->row_first) * N_CHUNK + s * COLUMNS : scratch;
                        const int64_t ldt = partial ? N_CHUNK : COLUMNS;
                        micro_kernel(rows, offsets, quads, runs, panels + s * (kc / 4) * COLUMNS, tile, ldt, !first_k);
                        if (last_k)
                            for (int64_t r = 0; r < here; r++)
                                for (int c = 0; c < 4 && n0 + 16 * c < job->n; c++)
                                    store_row(job, m0 + r, n0 + 16 * c, _mm512_loadu_si512(tile + r * ldt + 16 * c));
                    }
                }
            }
        }
    }
    free(panels), free(partial);
}

static void *run_gemm_thread(void *job) {
    run_gemm(job);
    return NULL;
}

/* y = the epilogue of a @ w^T; see the top of the file. K must be a multiple of 4, bits 8, 4 or 2.
 * `convolution`: NULL where a is an [M, K] matrix (row stride lda); else {channels, out_h, out_w, in_h,
 * in_w, kernel_w, stride_h, stride_w} of a convolution whose padded channels-last input codes a holds
 * (channels a multiple of 4, M = batch * out_h * out_w, K = kernel_h * kernel_w * channels), read in
 * place: no column matrix is written. Splits the work over `threads` threads: by rows where there are
 * enough for every thread and few column blocks to share, else by column blocks. Returns 0, or 1 where
 * memory for a worker's buffers could not be had (the output is then incomplete). */
int mixq_packed_gemm(const uint8_t *a, int64_t lda, const int64_t *convolution, const uint8_t *w, int64_t ldw,
                     int bits, int64_t m, int64_t n, int64_t k, int32_t zero, const int32_t *w_sum, const float *scale,
                     const float *bias, void *out, int out_dtype, int64_t ldo, int threads) {
    if (m <= 0 || n <= 0)
        return 0;
    const int64_t blocks = (n + COLUMNS - 1) / COLUMNS;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || m * n * k < ((int64_t)1 << 22)) /* a few ms of work at most: one thread */
        threads = 1;
    const int by_rows = (blocks % threads != 0 && blocks < 4 * threads && m >= (int64_t)ROWS * 4 * threads) || m >= (int64_t)4096 * threads;
    const int64_t units = by_rows ? (m + ROWS - 1) / ROWS : blocks;
    if (threads > units)
        threads = (int)units;
    gemm_job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        int64_t first = units * t / threads, last = units * (t + 1) / threads;
        jobs[t] = (gemm_job_t){a, lda, w, ldw, bits, m, n, k, zero, w_sum, scale, bias, out, out_dtype, ldo};
        if (convolution) {
            const int64_t *c = convolution;
            jobs[t].channels = c[0], jobs[t].out_h = c[1], jobs[t].out_w = c[2], jobs[t].in_h = c[3];
            jobs[t].in_w = c[4], jobs[t].kernel_w = c[5], jobs[t].stride_h = c[6], jobs[t].stride_w = c[7];
        }
        jobs[t].row_first = 0, jobs[t].row_last = m, jobs[t].block_first = 0, jobs[t].block_last = blocks;
        if (by_rows) {
            jobs[t].row_first = first * ROWS;
            jobs[t].row_last = last * ROWS < m ? last * ROWS : m;
        } else {
            jobs[t].block_first = first, jobs[t].block_last = last;
        }
    }
    run_jobs(run_gemm_thread, jobs, sizeof jobs[0], threads);
    int failed = 0;
    for (int t = 0; t < threads; t++)
        failed |= jobs[t].failed;
    return failed;
}

#else /* no AVX512-VNNI on this CPU (or compiler): callers keep the unpack-then-_int_mm path */

int mixq_packed_gemm_available(void) { return 0; }

int mixq_packed_gemm(const uint8_t *a, int64_t lda, const int64_t *convolution, const uint8_t *w, int64_t ldw,
                     int bits, int64_t m, int64_t n, int64_t k, int32_t zero, const int32_t *w_sum, const float *scale,
                     const float *bias, void *out, int out_dtype, int64_t ldo, int threads) {
    (void)a, (void)lda, (void)convolution, (void)w, (void)ldw, (void)bits, (void)m, (void)n, (void)k, (void)zero, (void)w_sum;
    (void)scale, (void)bias, (void)out, (void)out_dtype, (void)ldo, (void)threads;
    return 1;
}

#endif

/* Activation quantization in one pass: float32 or bfloat16 activations -> 8-bit codes, bit for bit
 * the torch reference's (mixq.quantizers.quantize_activation):
 *
 *     code = clamp(rint(x / scale) + shift, low, high)
 *
 * IEEE float32 division (never a reciprocal), round half to even (the default rounding mode, as
 * torch.round), then an exact integer-valued add and clamp, stored as one byte (uint8 codes, or int8
 * codes in two's complement). The same pass reports whether every input was finite, so that the
 * caller needs no second read of the activations to catch NaN/Inf.
 *
 * The input is read as [rows, channels, inner] in storage order and written as [rows, inner, channels]:
 * channels = 1 is a plain element-wise pass; rows = B, channels = C, inner = H * W turns an NCHW
 * activation into channels-last codes for the int8 convolution in the same pass (16x16 byte blocks,
 * transposed with SSE2 unpacks).
 *
 * Plain C, no Python or torch headers: compiled on first use by kernels/native.py and called through
 * ctypes with the tensors' data pointers. Build flags must not include -ffast-math (it would allow a
 * reciprocal for the division and break the finiteness test). */

#include <emmintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native_threads.h"

#define DTYPE_FLOAT32 0
#define DTYPE_BFLOAT16 1
#define TILE 16
#define EXPONENT_MASK 0x7f800000u

typedef struct {
    const void *x;
    int dtype;
    uint8_t *out;
    int64_t rows, channels, inner;
    float scale, shift, low, high;
    int64_t first, last; /* this worker's share: flat elements, or (row, channel tile) pairs */
    int non_finite;
} job_t;

static inline float bf16_to_float(uint16_t bits) {
    uint32_t wide = (uint32_t)bits << 16;
    float value;
    memcpy(&value, &wide, sizeof value);
    return value;
}

static inline int is_non_finite(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return (bits & EXPONENT_MASK) == EXPONENT_MASK;
}

static inline uint8_t code_of(float value, float scale, float shift, float low, float high) {
    float q = rintf(value / scale) + shift;
    q = q < low ? low : q;
    q = q > high ? high : q;
    return (uint8_t)(int32_t)q; /* low..high are -128..127 or 0..255: exact either way */
}

/* Codes of n consecutive elements; returns nonzero when one was NaN/Inf. Written as plain loops over
 * restrict pointers so that the compiler vectorizes them. */
static int codes_f32(const float *restrict x, uint8_t *restrict out, int64_t n, float scale, float shift,
                     float low, float high) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        bad |= is_non_finite(x[i]);
        out[i] = code_of(x[i], scale, shift, low, high);
    }
    return bad;
}

static int codes_bf16(const uint16_t *restrict x, uint8_t *restrict out, int64_t n, float scale, float shift,
                      float low, float high) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) {
        float value = bf16_to_float(x[i]);
        bad |= is_non_finite(value);
        out[i] = code_of(value, scale, shift, low, high);
    }
    return bad;
}

static int codes_run(const job_t *job, int64_t offset, uint8_t *out, int64_t n) {
    if (job->dtype == DTYPE_FLOAT32)
        return codes_f32((const float *)job->x + offset, out, n, job->scale, job->shift, job->low, job->high);
    return codes_bf16((const uint16_t *)job->x + offset, out, n, job->scale, job->shift, job->low, job->high);
}

/* out[r * out_stride + c] = tile[c * tile_stride + r] for a 16x16 block: a byte transpose in four
 * rounds of unpacks. Round b pairs rows that differ in bit 3 - b; after the four, row r holds what was
 * column r. */
static inline void unpack_round(const __m128i *in, __m128i *out, const int bit) {
#pragma GCC unroll 16
    for (int r = 0; r < TILE; r++) {
        if (r & bit)
            continue;
        out[r] = _mm_unpacklo_epi8(in[r], in[r + bit]);
        out[r + bit] = _mm_unpackhi_epi8(in[r], in[r + bit]);
    }
}

static void transpose_block(const uint8_t *tile, int64_t tile_stride, uint8_t *out, int64_t out_stride) {
    __m128i a[TILE], b[TILE];
#pragma GCC unroll 16
    for (int r = 0; r < TILE; r++)
        a[r] = _mm_loadu_si128((const __m128i *)(tile + r * tile_stride));
    unpack_round(a, b, 8);
    unpack_round(b, a, 4);
    unpack_round(a, b, 2);
    unpack_round(b, a, 1);
#pragma GCC unroll 16
    for (int r = 0; r < TILE; r++)
        _mm_storeu_si128((__m128i *)(out + r * out_stride), a[r]);
}

#define RUN 256 /* positions per channel quantized at a time: long enough runs for the vector loop */

/* One (row, tile of up to 16 channels) of the transposing pass: the codes of each channel's run of
 * positions into a [16, RUN] buffer, then 16x16 blocks transposed into the [inner, channels] output
 * (a partial tile or the last positions byte by byte). */
static int transposed_tile_column(const job_t *job, int64_t row, int64_t c0) {
    const int64_t channels = job->channels, inner = job->inner;
    const int64_t width = channels - c0 < TILE ? channels - c0 : TILE;
    uint8_t tile[TILE * RUN];
    uint8_t *out = job->out + row * inner * channels + c0;
    int bad = 0;
    for (int64_t i0 = 0; i0 < inner; i0 += RUN) {
        const int64_t n = inner - i0 < RUN ? inner - i0 : RUN;
        for (int64_t c = 0; c < width; c++)
            bad |= codes_run(job, (row * channels + c0 + c) * inner + i0, tile + c * RUN, n);
        int64_t i = 0;
        if (width == TILE)
            for (; i + TILE <= n; i += TILE)
                transpose_block(tile + i, RUN, out + (i0 + i) * channels, channels);
        for (; i < n; i++)
            for (int64_t c = 0; c < width; c++)
                out[(i0 + i) * channels + c] = tile[c * RUN + i];
    }
    return bad;
}

static void *run_job(void *arg) {
    job_t *job = (job_t *)arg;
    int bad = 0;
    if (job->channels == 1) {
        bad = codes_run(job, job->first, job->out + job->first, job->last - job->first);
    } else {
        const int64_t tiles = (job->channels + TILE - 1) / TILE;
        for (int64_t t = job->first; t < job->last; t++)
            bad |= transposed_tile_column(job, t / tiles, (t % tiles) * TILE);
    }
    job->non_finite = bad;
    return NULL;
}


/* The codes of x ([rows, channels, inner], dtype DTYPE_*) into out ([rows, inner, channels]), on up to
 * `threads` threads; returns 1 when some input was NaN/Inf (its codes are then unspecified), else 0. */
int mixq_activation_codes(const void *x, int dtype, uint8_t *out, int64_t rows, int64_t channels, int64_t inner,
                          float scale, float shift, float low, float high, int threads) {
    const int64_t units = channels == 1 ? rows * inner : rows * ((channels + TILE - 1) / TILE);
    const int64_t per_unit = channels == 1 ? 1 : TILE * inner;
    if (units <= 0)
        return 0; /* an empty activation */
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || units * per_unit < (1 << 20)) /* below ~1M elements a thread costs more than it saves */
        threads = 1;
    if (threads > units)
        threads = (int)units;
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        jobs[t] = (job_t){x, dtype, out, rows, channels, inner, scale, shift, low, high,
                          units * t / threads, units * (t + 1) / threads, 0};
        if (channels == 1 && t > 0) /* flat runs start on a 64-byte line, away from the previous worker's */
            jobs[t].first = (jobs[t].first + 63) & ~(int64_t)63;
        if (channels == 1 && t < threads - 1)
            jobs[t].last = (jobs[t].last + 63) & ~(int64_t)63;
        if (jobs[t].last > units)
            jobs[t].last = units;
        if (jobs[t].first > jobs[t].last)
            jobs[t].first = jobs[t].last;
    }
    run_jobs(run_job, jobs, sizeof jobs[0], threads);
    int bad = 0;
    for (int t = 0; t < threads; t++)
        bad |= jobs[t].non_finite;
    return bad;
}

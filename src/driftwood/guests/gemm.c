/* gemm.c — the zero-copy GEMM demo guest.
 *
 * Fills two N×N float32 matrices in its own memory from a seed, asks the host accelerator to
 * multiply them in place (dw_gemm_f32), then checks every element of the result against its
 * own double-precision computation and reports the error count.
 *
 * usage: gemm.wasm [seed] [n]     (n defaults to 128)
 * exit code: 0 when every element matches, 1 when some do not, 2 when the host call failed.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "driftwood.h"

static uint64_t rng_state;

/* splitmix64 -> uniform float in [-1, 1) */
static float next_uniform(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 40) / (double)(1ull << 23) - 1.0);
}

int main(int argc, char **argv) {
    rng_state = argc > 1 ? strtoull(argv[1], NULL, 10) : 42;
    int n = argc > 2 ? atoi(argv[2]) : 128;
    if (n < 1 || n > 2048) {
        fprintf(stderr, "gemm: n must be in [1, 2048]\n");
        return 2;
    }
    size_t count = (size_t)n * (size_t)n;
    float *a = malloc(count * sizeof(float));
    float *b = malloc(count * sizeof(float));
    float *c = malloc(count * sizeof(float));
    if (!a || !b || !c) {
        fprintf(stderr, "gemm: out of memory\n");
        return 2;
    }
    for (size_t i = 0; i < count; i++) a[i] = next_uniform();
    for (size_t i = 0; i < count; i++) b[i] = next_uniform();
    for (size_t i = 0; i < count; i++) c[i] = NAN; /* poison: every element must be written */

    int rc = dw_gemm_f32(a, b, c, n, n, n);
    if (rc != DW_OK) {
        fprintf(stderr, "gemm: host call failed with %d\n", rc);
        return 2;
    }

    size_t errors = 0;
    double max_diff = 0.0;
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < n; j++) {
            double ref = 0.0;
            for (int k = 0; k < n; k++) ref += (double)a[i * n + k] * (double)b[k * n + j];
            double got = c[i * n + j];
            double diff = fabs(got - ref);
            if (!(diff <= 1e-4 + 1e-5 * fabs(ref))) errors++; /* NaN counts as an error */
            if (diff > max_diff) max_diff = diff;
        }
    }
    printf("gemm %dx%dx%d: %zu errors of %zu (max abs diff %.3g)\n", n, n, n, errors, count, max_diff);
    printf("guest buffers: a=%p b=%p c=%p\n", (void *)a, (void *)b, (void *)c);
    return errors ? 1 : 0;
}

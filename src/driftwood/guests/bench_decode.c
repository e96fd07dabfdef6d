/* bench_decode.c — the guest side of `driftwood bench boundary` (a reactor: no main).
 *
 * The host fills the prompt buffer, then calls bench_prefill and bench_generate; the guest
 * drives the session through the native ABI exactly as an agent would, one host call per
 * generated token.
 *
 * driftwood-build-flags: -mexec-model=reactor
 */
#include "driftwood.h"

#define MAX_PROMPT 4096
#define MAX_GEN 4096

static int32_t session = -1;
static int32_t prompt[MAX_PROMPT];
static int32_t generated[MAX_GEN];

__attribute__((export_name("bench_prompt"))) int32_t *bench_prompt(void) { return prompt; }
__attribute__((export_name("bench_generated"))) int32_t *bench_generated(void) { return generated; }

/* Open a session on model "default"; returns the handle or an error. */
__attribute__((export_name("bench_open"))) int32_t bench_open(uint32_t capacity, uint32_t seed) {
    session = dw_session_open("default", 7, capacity, seed);
    return session;
}

/* Start over and prefill n prompt tokens; returns the position. */
__attribute__((export_name("bench_prefill"))) int32_t bench_prefill(uint32_t n) {
    if (n > MAX_PROMPT) return DW_EINVAL;
    int32_t rc = dw_session_reset(session);
    if (rc < 0) return rc;
    return dw_append(session, prompt, n, 0, 0);
}

/* Generate n tokens greedily, one host call each; returns how many were generated. */
__attribute__((export_name("bench_generate"))) int32_t bench_generate(uint32_t n) {
    dw_sampling_t greedy = {0.0f, 0, 1.0f, 0.0f, 1.0f, 0};
    if (n > MAX_GEN) return DW_EINVAL;
    for (uint32_t i = 0; i < n; i++) {
        int32_t tok = dw_generate(session, &greedy);
        if (tok < 0) return tok;
        generated[i] = tok;
    }
    return (int32_t)n;
}

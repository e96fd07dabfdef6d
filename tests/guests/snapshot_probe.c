/* snapshot_probe.c — exercises snapshots from a guest (tests/snapshot/test_actor.py).
 *
 *   snapshot_probe setup     opens sessions A and B, closes A, prefills B with its logits in this
 *                            guest's memory, saves B as "greet", then asks for a snapshot
 *   snapshot_probe straight  the same setup without a snapshot, then what a resumed run does
 *   (resumed)                continues B from its handle in memory, and loads "greet" anew
 *
 * Prints "handles A B C" and the tokens each continuation draws, seeded sampling.
 */
#include <stdio.h>
#include <string.h>

#include "driftwood.h"

#define VOCAB_MAX 1024

static struct {
    int ready;
    int32_t a, b;
    float logits[VOCAB_MAX];  /* B's next-token logits: the host writes them here */
} state;

static const dw_sampling_t sampled = {0.9f, 40, 0.95f, 0.0f, 1.0f, 64};

static int setup(int snapshot) {
    state.a = dw_session_open("default", 7, 512, 1);
    state.b = dw_session_open("default", 7, 512, 2);
    dw_session_close(state.a);
    int32_t ids[300];
    for (int i = 0; i < 300; i++) ids[i] = (i * 7919 + 13) % 512;
    dw_session_info_t info;
    dw_session_info(state.b, &info);
    if (info.vocab_size > VOCAB_MAX) return 1;
    int32_t rc = dw_append(state.b, ids, 300, state.logits, (uint32_t)info.vocab_size);
    if (rc != 300) return 2;
    if (dw_session_save(state.b, "greet", 5) != 0) return 3;
    state.ready = 1;
    if (snapshot && dw_snapshot() != 0) return 4;
    return 0;
}

static void draw(const char *label, int32_t s) {
    printf("%s", label);
    printf(" %d", dw_sample(s, &sampled));  /* from the logits in this guest's memory (B) */
    for (int i = 0; i < 12; i++) printf(" %d", dw_generate(s, &sampled));
    printf("\n");
}

static int carry_on(void) {
    int32_t c = dw_session_load("greet", 5);
    printf("handles %d %d %d\n", state.a, state.b, c);
    draw("b", state.b);
    /* C restarts from the saved logits and RNG: the same draws as B had */
    int32_t again = dw_session_load("greet", 5);
    draw("c", again);
    printf("bad name %d\n", dw_session_load("../x", 4));
    printf("no such %d\n", dw_session_load("nothing", 7));
    return 0;
}

int main(int argc, char **argv) {
    if (dw_resumed()) return state.ready ? carry_on() : 10;
    if (argc > 1 && !strcmp(argv[1], "setup")) return setup(1);
    if (argc > 1 && !strcmp(argv[1], "straight")) {
        int rc = setup(0);
        return rc ? rc : carry_on();
    }
    fprintf(stderr, "usage: snapshot_probe setup|straight\n");
    return 2;
}

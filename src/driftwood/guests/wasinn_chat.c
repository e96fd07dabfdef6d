/* wasinn_chat — text generation through wasi-nn, as WasmEdge's GGML backend speaks it.
 *
 * Uses only the raw wasi_ephemeral_nn imports (include/wasi_nn.h), so the same .wasm runs
 * under `wasmedge --nn-preload default:GGML:AUTO:model.gguf` and under
 * `driftwood run --nn-preload default:GGML:AUTO:model.gguf`.
 *
 *   wasinn_chat [options] PROMPT...
 *     --model NAME       preloaded model name (default "default")
 *     --config JSON      load with load_by_name_with_config and this JSON
 *     --meta JSON        metadata set as input 1 before the first prompt
 *     --stream           compute_single / get_output_single / fini_single loop
 *     --max-tokens N     stop the streaming loop after N tokens (compute_single ignores n-predict)
 *     --print-meta       after each turn print "meta: <output 1 JSON>" to stderr
 *     --selftest         exercise the ABI's edge cases after the first turn
 *
 * The host applies no chat template: PROMPT is sent as is. Several prompts run one after the
 * other on one execution context; their outputs are then separated by '\x1e'. A wasi-nn
 * error ends the program with that errno as its exit status (after printing whatever output
 * was produced: context-full keeps the partial text).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

#define OUT_CAP (1u << 20)
#define EXIT_USAGE 64
#define EXIT_SELFTEST 65

static uint8_t out_buf[OUT_CAP];
static int selftest_failures;

static const char *errno_name(wasi_nn_errno e) {
    switch (e) {
    case WASI_NN_SUCCESS: return "success";
    case WASI_NN_INVALID_ARGUMENT: return "invalid-argument";
    case WASI_NN_INVALID_ENCODING: return "invalid-encoding";
    case WASI_NN_MISSING_MEMORY: return "missing-memory";
    case WASI_NN_BUSY: return "busy";
    case WASI_NN_RUNTIME_ERROR: return "runtime-error";
    case WASI_NN_UNSUPPORTED_OPERATION: return "unsupported-operation";
    case WASI_NN_TOO_LARGE: return "too-large";
    case WASI_NN_NOT_FOUND: return "not-found";
    case WASI_NN_END_OF_SEQUENCE: return "end-of-sequence";
    case WASI_NN_CONTEXT_FULL: return "context-full";
    case WASI_NN_PROMPT_TOO_LONG: return "prompt-too-long";
    case WASI_NN_MODEL_NOT_FOUND: return "model-not-found";
    default: return "unknown";
    }
}

static void report(const char *what, wasi_nn_errno e) {
    fprintf(stderr, "wasinn_chat: %s: errno %d (%s)\n", what, (int)e, errno_name(e));
}

static wasi_nn_errno set_bytes(wasi_nn_context ctx, uint32_t index, const char *data, uint32_t len,
                               uint32_t type) {
    uint32_t dims[1] = {len};
    wasi_nn_tensor tensor = {dims, 1, type, (const uint8_t *)data, len};
    return wasi_nn_set_input(ctx, index, &tensor);
}

static wasi_nn_errno set_text(wasi_nn_context ctx, uint32_t index, const char *text) {
    return set_bytes(ctx, index, text, (uint32_t)strlen(text), WASI_NN_TYPE_U8);
}

/* Output `index` of ctx into out_buf (NUL-terminated); *len gets its size. */
static wasi_nn_errno read_output(wasi_nn_context ctx, uint32_t index, uint32_t *len) {
    *len = 0;
    wasi_nn_errno e = wasi_nn_get_output(ctx, index, out_buf, OUT_CAP - 1, len);
    out_buf[e == WASI_NN_SUCCESS ? *len : 0] = 0;
    return e;
}

static void print_meta(wasi_nn_context ctx) {
    uint32_t len;
    wasi_nn_errno e = read_output(ctx, 1, &len);
    if (e != WASI_NN_SUCCESS) {
        report("get_output(1)", e);
        return;
    }
    fprintf(stderr, "meta: %s\n", (const char *)out_buf);
}

/* One prompt: compute and print output 0. Returns the errno of the generation call. */
static wasi_nn_errno turn_compute(wasi_nn_context ctx) {
    wasi_nn_errno status = wasi_nn_compute(ctx);
    if (status != WASI_NN_SUCCESS) report("compute", status);
    if (status != WASI_NN_SUCCESS && status != WASI_NN_CONTEXT_FULL) return status;
    uint32_t len;
    wasi_nn_errno e = read_output(ctx, 0, &len);
    if (e != WASI_NN_SUCCESS) {
        report("get_output(0)", e);
        return e;
    }
    fwrite(out_buf, 1, len, stdout);
    return status;
}

/* One prompt, streamed token by token. */
static wasi_nn_errno turn_stream(wasi_nn_context ctx, long max_tokens) {
    wasi_nn_errno status = WASI_NN_SUCCESS;
    for (long n = 0; max_tokens < 0 || n < max_tokens; n++) {
        wasi_nn_errno e = wasi_nn_compute_single(ctx);
        if (e == WASI_NN_END_OF_SEQUENCE) break;
        if (e != WASI_NN_SUCCESS) {
            report("compute_single", e);
            status = e;
            break;
        }
        uint32_t len = 0;
        e = wasi_nn_get_output_single(ctx, 0, out_buf, OUT_CAP, &len);
        if (e != WASI_NN_SUCCESS) {
            report("get_output_single", e);
            return e;
        }
        fwrite(out_buf, 1, len, stdout);
        fflush(stdout);
    }
    return status;
}

/* -- self-test: the ABI's edge cases, from inside a real guest --------------------------- */

#define CHECK(name, cond)                                                                   \
    do {                                                                                    \
        if (cond) {                                                                         \
            fprintf(stderr, "check %s: ok\n", name);                                       \
        } else {                                                                            \
            fprintf(stderr, "check %s: FAILED (line %d)\n", name, __LINE__);               \
            selftest_failures++;                                                            \
        }                                                                                   \
    } while (0)

static const char *model_name;

static void selftest(wasi_nn_graph graph, wasi_nn_context ctx) {
    static uint8_t small[64];
    uint32_t needed = 0, written = 0;
    wasi_nn_errno e;

    /* get_output: learn the size, then a buffer one byte short gets too-large, the size
     * needed in bytes_written, and no partial write. */
    e = wasi_nn_get_output(ctx, 0, out_buf, OUT_CAP, &needed);
    CHECK("get_output(0) fits", e == WASI_NN_SUCCESS);
    if (needed > 0) {
        memset(out_buf, 0xE7, needed + 16);
        written = 0xFFFFFFFFu;
        e = wasi_nn_get_output(ctx, 0, out_buf, needed - 1, &written);
        int untouched = 1;
        for (uint32_t i = 0; i < needed + 16; i++) untouched &= out_buf[i] == 0xE7;
        CHECK("get_output(0) too small -> too-large", e == WASI_NN_TOO_LARGE);
        CHECK("get_output(0) too small reports the size needed", written == needed);
        CHECK("get_output(0) too small writes nothing", untouched);
        e = wasi_nn_get_output(ctx, 0, out_buf, needed, &written);
        CHECK("get_output(0) exact size", e == WASI_NN_SUCCESS && written == needed);
    }
    fprintf(stderr, "needed: %u\n", (unsigned)needed);

    /* Index 1: the metadata JSON; a tiny buffer is too small for it as well. */
    e = wasi_nn_get_output(ctx, 1, small, 4, &written);
    CHECK("get_output(1) too small -> too-large", e == WASI_NN_TOO_LARGE && written > 4);
    e = read_output(ctx, 1, &written);
    CHECK("get_output(1) json", e == WASI_NN_SUCCESS && out_buf[0] == '{' &&
                                    strstr((char *)out_buf, "\"input_tokens\"") &&
                                    strstr((char *)out_buf, "\"output_tokens\""));
    fprintf(stderr, "meta: %s\n", (const char *)out_buf);

    /* Metadata errors: unparsable JSON, a key of the wrong type. */
    e = set_text(ctx, 1, "{\"n-predict\": ");
    CHECK("bad metadata json -> invalid-encoding", e == WASI_NN_INVALID_ENCODING);
    e = set_text(ctx, 1, "{\"n-predict\": \"many\"}");
    CHECK("wrong-typed key -> invalid-argument", e == WASI_NN_INVALID_ARGUMENT);
    e = set_text(ctx, 1, "{\"temp\": true}");
    CHECK("wrong-typed float -> invalid-argument", e == WASI_NN_INVALID_ARGUMENT);
    e = set_bytes(ctx, 0, "hi", 2, 77);
    CHECK("unknown tensor type -> invalid-argument", e == WASI_NN_INVALID_ARGUMENT);

    /* Handles nobody opened. */
    wasi_nn_context other;
    CHECK("compute(bad ctx)", wasi_nn_compute(9999) == WASI_NN_INVALID_ARGUMENT);
    CHECK("compute_single(bad ctx)", wasi_nn_compute_single(9999) == WASI_NN_INVALID_ARGUMENT);
    CHECK("fini_single(bad ctx)", wasi_nn_fini_single(9999) == WASI_NN_INVALID_ARGUMENT);
    CHECK("set_input(bad ctx)", set_text(9999, 0, "hi") == WASI_NN_INVALID_ARGUMENT);
    CHECK("get_output(bad ctx)",
          wasi_nn_get_output(9999, 0, out_buf, 16, &written) == WASI_NN_INVALID_ARGUMENT);
    CHECK("get_output_single(bad ctx)",
          wasi_nn_get_output_single(9999, 0, out_buf, 16, &written) == WASI_NN_INVALID_ARGUMENT);
    CHECK("init_execution_context(bad graph)",
          wasi_nn_init_execution_context(9999, &other) == WASI_NN_INVALID_ARGUMENT);
    CHECK("unload(bad graph)", wasi_nn_unload(9999) == WASI_NN_INVALID_ARGUMENT);
    CHECK("finalize_execution_context(bad ctx)",
          wasi_nn_finalize_execution_context(9999) == WASI_NN_INVALID_ARGUMENT);

    /* Names: unknown -> not-found; the same name again -> the cached graph. */
    wasi_nn_graph g2;
    const char *missing = "no-such-model";
    CHECK("load_by_name(unknown) -> not-found",
          wasi_nn_load_by_name(missing, (uint32_t)strlen(missing), &g2) == WASI_NN_NOT_FOUND);
    e = wasi_nn_load_by_name(model_name, (uint32_t)strlen(model_name), &g2);
    CHECK("load_by_name twice -> same graph", e == WASI_NN_SUCCESS && g2 == graph);

    /* A fresh context has no output yet. */
    e = wasi_nn_init_execution_context(graph, &other);
    CHECK("second context", e == WASI_NN_SUCCESS && other != ctx);
    written = 77;
    e = wasi_nn_get_output_single(other, 0, out_buf, OUT_CAP, &written);
    CHECK("get_output_single on a fresh context", e == WASI_NN_SUCCESS && written == 0);
    CHECK("compute without input -> invalid-argument", wasi_nn_compute(other) == WASI_NN_INVALID_ARGUMENT);
    CHECK("finalize", wasi_nn_finalize_execution_context(other) == WASI_NN_SUCCESS);
    CHECK("finalize twice -> invalid-argument",
          wasi_nn_finalize_execution_context(other) == WASI_NN_INVALID_ARGUMENT);
    CHECK("compute on a finalized context", wasi_nn_compute(other) == WASI_NN_INVALID_ARGUMENT);

    /* unload: the handle dies, live contexts still drain their output, a reload gets a new
     * handle. */
    CHECK("unload", wasi_nn_unload(graph) == WASI_NN_SUCCESS);
    CHECK("unload twice -> invalid-argument", wasi_nn_unload(graph) == WASI_NN_INVALID_ARGUMENT);
    CHECK("init on an unloaded graph",
          wasi_nn_init_execution_context(graph, &other) == WASI_NN_INVALID_ARGUMENT);
    CHECK("compute after unload", wasi_nn_compute(ctx) == WASI_NN_INVALID_ARGUMENT);
    e = wasi_nn_get_output(ctx, 0, out_buf, OUT_CAP, &written);
    CHECK("get_output after unload drains", e == WASI_NN_SUCCESS && written == needed);
    e = wasi_nn_load_by_name(model_name, (uint32_t)strlen(model_name), &g2);
    CHECK("reload -> fresh handle", e == WASI_NN_SUCCESS && g2 != graph);
    CHECK("finalize the first context", wasi_nn_finalize_execution_context(ctx) == WASI_NN_SUCCESS);

    fprintf(stderr, selftest_failures ? "selftest: %d FAILED\n" : "selftest: ok\n", selftest_failures);
}

static void usage(void) {
    fprintf(stderr,
            "usage: wasinn_chat [--model NAME] [--config JSON] [--meta JSON] [--stream]\n"
            "                   [--max-tokens N] [--print-meta] [--selftest] PROMPT...\n");
}

int main(int argc, char **argv) {
    const char *config = NULL, *meta = NULL;
    int stream = 0, want_meta = 0, want_selftest = 0, first_prompt = 0;
    long max_tokens = -1;
    model_name = "default";

    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        int has_value = i + 1 < argc;
        if (strcmp(a, "--model") == 0 && has_value) model_name = argv[++i];
        else if (strcmp(a, "--config") == 0 && has_value) config = argv[++i];
        else if (strcmp(a, "--meta") == 0 && has_value) meta = argv[++i];
        else if (strcmp(a, "--max-tokens") == 0 && has_value) max_tokens = strtol(argv[++i], NULL, 10);
        else if (strcmp(a, "--stream") == 0) stream = 1;
        else if (strcmp(a, "--print-meta") == 0) want_meta = 1;
        else if (strcmp(a, "--selftest") == 0) want_selftest = 1;
        else if (strcmp(a, "--") == 0) { first_prompt = i + 1; break; }
        else if (a[0] == '-' && a[1] == '-') { usage(); return EXIT_USAGE; }
        else { first_prompt = i; break; }
    }
    if (first_prompt == 0 || first_prompt >= argc) {
        usage();
        return EXIT_USAGE;
    }

    wasi_nn_graph graph;
    wasi_nn_errno e = config
        ? wasi_nn_load_by_name_with_config(model_name, (uint32_t)strlen(model_name), config,
                                           (uint32_t)strlen(config), &graph)
        : wasi_nn_load_by_name(model_name, (uint32_t)strlen(model_name), &graph);
    if (e != WASI_NN_SUCCESS) {
        report("load_by_name", e);
        return e;
    }
    wasi_nn_context ctx;
    if ((e = wasi_nn_init_execution_context(graph, &ctx)) != WASI_NN_SUCCESS) {
        report("init_execution_context", e);
        return e;
    }
    if (meta && (e = set_text(ctx, 1, meta)) != WASI_NN_SUCCESS) {
        report("set_input(metadata)", e);
        return e;
    }

    wasi_nn_errno status = WASI_NN_SUCCESS;
    for (int i = first_prompt; i < argc && status == WASI_NN_SUCCESS; i++) {
        if (i > first_prompt) fputc('\x1e', stdout);
        if ((e = set_text(ctx, 0, argv[i])) != WASI_NN_SUCCESS) {
            report("set_input(prompt)", e);
            return e;
        }
        status = stream ? turn_stream(ctx, max_tokens) : turn_compute(ctx);
        fflush(stdout);
        if (want_meta) print_meta(ctx);
        if (stream && (e = wasi_nn_fini_single(ctx)) != WASI_NN_SUCCESS) {
            report("fini_single", e);
            return e;
        }
    }
    if (status != WASI_NN_SUCCESS) return status;
    if (want_selftest) {
        selftest(graph, ctx);
        return selftest_failures ? EXIT_SELFTEST : 0;
    }
    return 0;
}

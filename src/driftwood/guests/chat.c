/* chat.c — a chat agent that keeps its conversation in its own memory.
 *
 * Reads user turns from stdin (one per line), renders the conversation with the model's chat
 * template, and drives prefill and decode through the native ABI, streaming the reply to
 * stdout. The conversation (messages as JSON, and the token ids the session holds) lives in
 * this guest's linear memory, so a whole-actor snapshot captures it; the session's KV cache
 * is the host's. Each turn appends only what the session does not already hold.
 *
 * usage: chat.wasm [--system TEXT] [--max-tokens N] [--temperature T] [--seed S] [--model NAME]
 * A line "/snapshot" asks the host to snapshot the actor; "/reset" starts over. Resumed from a
 * snapshot (`driftwood resume`), main runs again with `state` restored and carries on.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "driftwood.h"

#define MAX_JSON (256 * 1024)
#define MAX_TOKENS 8192
#define MAX_LINE 8192

/* Everything that must survive a snapshot lives in this one static struct. */
static struct {
    int initialized;
    int32_t session;
    int32_t n_ids;               /* tokens the session holds, mirrored here */
    int32_t ids[MAX_TOKENS];
    size_t json_len;             /* messages so far, a JSON array without its closing ']' */
    char json[MAX_JSON];
    dw_sampling_t sampling;
    int max_tokens;
    int turns;
} state;

static char prompt[MAX_JSON + 4096];
static int32_t prompt_ids[MAX_TOKENS];
static char reply[MAX_JSON];

static int json_append(const char *s) {
    size_t n = strlen(s);
    if (state.json_len + n + 2 > MAX_JSON) return -1;
    memcpy(state.json + state.json_len, s, n);
    state.json_len += n;
    return 0;
}

/* Append a {"role": ..., "content": ...} object, escaping the content as JSON. */
static int add_message(const char *role, const char *content) {
    char buf[16];
    if (json_append(state.json_len > 1 ? ",{\"role\":\"" : "{\"role\":\"") || json_append(role) ||
        json_append("\",\"content\":\""))
        return -1;
    for (const unsigned char *p = (const unsigned char *)content; *p; p++) {
        const char *esc = NULL;
        switch (*p) {
            case '"': esc = "\\\""; break;
            case '\\': esc = "\\\\"; break;
            case '\n': esc = "\\n"; break;
            case '\r': esc = "\\r"; break;
            case '\t': esc = "\\t"; break;
            default:
                if (*p < 0x20) {
                    snprintf(buf, sizeof buf, "\\u%04x", *p);
                    esc = buf;
                }
        }
        if (esc) {
            if (json_append(esc)) return -1;
        } else {
            if (state.json_len + 3 > MAX_JSON) return -1;
            state.json[state.json_len++] = (char)*p;
        }
    }
    return json_append("\"}");
}

static int fail(const char *what, int32_t rc) {
    fprintf(stderr, "chat: %s failed (%d)\n", what, rc);
    return 1;
}

static void start(const char *model, const char *system, uint32_t seed) {
    state.session = dw_session_open(model, (uint32_t)strlen(model), 0, seed);
    state.json_len = 0;
    state.n_ids = 0;
    json_append("[");
    if (system && *system) add_message("system", system);
    state.initialized = 1;
}

/* One turn: render the conversation, reuse the shared token prefix, stream the reply. */
static int turn(const char *user) {
    if (add_message("user", user)) return fail("the conversation is too long; add_message", DW_ELIMIT);
    state.json[state.json_len] = ']';
    int32_t len = dw_chat_template(state.session, state.json, (uint32_t)state.json_len + 1, 1, prompt,
                                   sizeof prompt);
    if (len < 0 || (size_t)len >= sizeof prompt) return fail("chat_template", len);
    int32_t n = dw_tokenize(state.session, prompt, (uint32_t)len, DW_TOKENIZE_PARSE_SPECIAL, prompt_ids,
                            MAX_TOKENS);
    if (n < 0 || n > MAX_TOKENS) return fail("tokenize", n);

    int32_t keep = 0; /* longest common prefix with what the session already holds */
    while (keep < state.n_ids && keep < n - 1 && state.ids[keep] == prompt_ids[keep]) keep++;
    int32_t rc = dw_session_truncate(state.session, (uint32_t)keep);
    if (rc < 0) return fail("session_truncate", rc);
    rc = dw_append(state.session, prompt_ids + keep, (uint32_t)(n - keep), NULL, 0);
    if (rc < 0) return fail("append", rc);
    memcpy(state.ids, prompt_ids, (size_t)n * sizeof(int32_t));
    state.n_ids = n;

    size_t reply_len = 0;
    char piece[256];
    for (int i = 0; i < state.max_tokens; i++) {
        int32_t tok = dw_generate(state.session, &state.sampling);
        if (tok < 0) {
            if (tok == DW_ECONTEXT) break;
            return fail("generate", tok);
        }
        if (state.n_ids < MAX_TOKENS) state.ids[state.n_ids++] = tok;
        if (dw_is_end(state.session, tok) == 1) break;
        int32_t m = dw_token_text(state.session, tok, piece, sizeof piece);
        if (m < 0) return fail("token_text", m);
        fwrite(piece, 1, (size_t)m, stdout);
        fflush(stdout);
        if (reply_len + (size_t)m < sizeof reply - 1) {
            memcpy(reply + reply_len, piece, (size_t)m);
            reply_len += (size_t)m;
        }
    }
    int32_t m;
    while ((m = dw_token_text(state.session, -1, piece, sizeof piece)) > 0) {
        fwrite(piece, 1, (size_t)m, stdout);
        if (reply_len + (size_t)m < sizeof reply - 1) {
            memcpy(reply + reply_len, piece, (size_t)m);
            reply_len += (size_t)m;
        }
    }
    reply[reply_len] = 0;
    fputc('\n', stdout);
    fflush(stdout);
    if (add_message("assistant", reply)) return fail("the conversation is too long; add_message", DW_ELIMIT);
    state.turns++;
    return 0;
}

int main(int argc, char **argv) {
    const char *system = NULL, *model = "default";
    uint32_t seed = 0;
    if (!state.initialized) {
        state.max_tokens = 256;
        state.sampling = (dw_sampling_t){0.0f, 0, 1.0f, 0.0f, 1.0f, 64};
    }
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--system") && i + 1 < argc) system = argv[++i];
        else if (!strcmp(argv[i], "--max-tokens") && i + 1 < argc) state.max_tokens = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--temperature") && i + 1 < argc) state.sampling.temperature = (float)atof(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--model") && i + 1 < argc) model = argv[++i];
        else {
            fprintf(stderr, "usage: chat.wasm [--system TEXT] [--max-tokens N] [--temperature T] [--seed S] [--model NAME]\n");
            return 2;
        }
    }
    if (!state.initialized) {
        start(model, system, seed);
        if (state.session < 0) return fail("session_open", state.session);
    }
    /* A snapshot captures stdio's state with the rest of memory: keep stdin unbuffered so that
     * no input read ahead of the conversation is in it, and forget an old EOF on resume. */
    if (dw_resumed())
        clearerr(stdin);
    else
        setvbuf(stdin, NULL, _IONBF, 0);
    static char line[MAX_LINE];
    while (fgets(line, sizeof line, stdin)) {
        size_t n = strlen(line);
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (!n) continue;
        if (!strcmp(line, "/snapshot")) {
            int32_t rc = dw_snapshot();
            fprintf(stderr, rc == 0 ? "chat: snapshot taken\n" : "chat: snapshot failed (%d)\n", rc);
            continue;
        }
        if (!strcmp(line, "/reset")) {
            dw_session_close(state.session);
            start(model, system, seed);
            continue;
        }
        if (turn(line)) return 1;
    }
    return 0;
}

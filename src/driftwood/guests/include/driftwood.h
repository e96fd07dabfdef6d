/* driftwood.h — the guest SDK for Driftwood's native host ABI (import module "driftwood").
 *
 * Every function returns an int32_t: zero or a non-negative count on success, a negative
 * DW_E* code on failure. Pointers are addresses in the guest's own linear memory; the host
 * checks every (pointer, length) against the memory's committed size before touching it, so
 * a bad pointer is an error code, never a crash.
 *
 * Sessions are the host's inference state for one sequence (tokens, KV cache, sampler RNG).
 * They belong to the actor that opened them and persist across calls until closed. Handles
 * are small positive integers, never reused within an actor's life.
 *
 * Buffers that return text or token ids follow snprintf's rule: the return value is the
 * size needed; the buffer is written only when it is large enough.
 *
 * Build a guest with:   driftwood build my_guest.c -o my_guest.wasm
 */
#ifndef DRIFTWOOD_H
#define DRIFTWOOD_H

#include <stddef.h>
#include <stdint.h>

#define DW_IMPORT(name) __attribute__((import_module("driftwood"), import_name(name)))

/* ---- Error codes ---------------------------------------------------------------------- */
#define DW_OK 0
#define DW_EINVAL -1     /* an argument is invalid (size, flag, enum, bad UTF-8, bad JSON) */
#define DW_EFAULT -2     /* a pointer range lies outside the guest's memory, or overflows */
#define DW_EALIGN -3     /* a pointer is not aligned for its element type */
#define DW_EBADF -4      /* no such session (never opened, closed, or another actor's) */
#define DW_ENOMODEL -5   /* no model of that name is available to this actor */
#define DW_ECONTEXT -6   /* the session's context is full */
#define DW_ELIMIT -7     /* a per-actor limit was reached (open sessions, sizes) */
#define DW_EMODEL -8     /* the model failed to load or run */
#define DW_ESNAPSHOT -9  /* snapshots are not enabled for this actor, or the snapshot failed */
#define DW_EINTERNAL -99 /* the host failed */

/* ---- Compute ------------------------------------------------------------------------ */

/* C[m×n] = A[m×k] · B[k×n], row-major float32, computed by the accelerator in place: the
 * host reads A and B and writes C directly in this guest's memory (no copies). C must not
 * overlap A or B. 1 <= m, n, k <= 8192. */
DW_IMPORT("gemm_f32")
int32_t dw_gemm_f32(const float *a, const float *b, float *c, int32_t m, int32_t n, int32_t k);

/* ---- Sessions ------------------------------------------------------------------------ */

/* Open a session on the model `name` ("default" is the one given with --model). capacity:
 * maximum tokens (0 = the host's default); seed: the sampler's RNG seed. Returns a handle. */
DW_IMPORT("session_open")
int32_t dw_session_open(const char *name, uint32_t name_len, uint32_t capacity, uint32_t seed);

DW_IMPORT("session_close")
int32_t dw_session_close(int32_t session);

typedef struct {
    int32_t position;       /* tokens in the session so far */
    int32_t capacity;       /* most tokens it can hold */
    int32_t vocab_size;     /* length of a logits vector */
    int32_t context_length; /* the model's trained context */
    int32_t bos;            /* beginning-of-sequence token, or -1 */
    int32_t eos;            /* end-of-sequence token, or -1 */
} dw_session_info_t;

DW_IMPORT("session_info")
int32_t dw_session_info(int32_t session, dw_session_info_t *out);

/* Start over: forget every token (the KV cache is kept allocated). */
DW_IMPORT("session_reset")
int32_t dw_session_reset(int32_t session);

/* Keep only the first n tokens (n <= position): later turns can reuse a shared prefix. */
DW_IMPORT("session_truncate")
int32_t dw_session_truncate(int32_t session, uint32_t n);

/* ---- Text ---------------------------------------------------------------------------- */

#define DW_TOKENIZE_ADD_BOS 1       /* prepend BOS when the model's metadata asks for it */
#define DW_TOKENIZE_PARSE_SPECIAL 2 /* "<|im_start|>" etc. become special tokens */

/* Text -> token ids. Returns the number of ids (written when <= max_ids). */
DW_IMPORT("tokenize")
int32_t dw_tokenize(int32_t session, const char *text, uint32_t text_len, uint32_t flags,
                    int32_t *ids, uint32_t max_ids);

/* Token ids -> text. Returns the byte length (written when <= max). */
DW_IMPORT("detokenize")
int32_t dw_detokenize(int32_t session, const int32_t *ids, uint32_t n_ids, char *out, uint32_t max);

/* Streaming text: the bytes that `token`, appended to what this session streamed so far,
 * completes. Never splits a UTF-8 character (may return 0 bytes mid-character). Text that
 * does not fit `max` is kept and returned first by the next call; token -1 flushes
 * everything still held back. Returns the number of bytes written. */
DW_IMPORT("token_text")
int32_t dw_token_text(int32_t session, int32_t token, char *out, uint32_t max);

/* 1 if `token` ends generation for this model (EOS, end-of-turn), else 0. */
DW_IMPORT("is_end")
int32_t dw_is_end(int32_t session, int32_t token);

/* Render the model's chat template. messages: a JSON array of {"role", "content"} objects.
 * Returns the byte length of the prompt (written when <= max). */
DW_IMPORT("chat_template")
int32_t dw_chat_template(int32_t session, const char *messages_json, uint32_t json_len,
                         int32_t add_generation_prompt, char *out, uint32_t max);

/* ---- Inference ----------------------------------------------------------------------- */

/* Append tokens (prefill). If `logits` is not NULL, the next-token logits (vocab_size
 * floats) are written by the accelerator straight into it. Returns the new position. */
DW_IMPORT("append")
int32_t dw_append(int32_t session, const int32_t *ids, uint32_t n_ids, float *logits, uint32_t vocab_size);

typedef struct {
    float temperature;        /* 0 = greedy */
    int32_t top_k;            /* 0 = off */
    float top_p;              /* 1 = off */
    float min_p;              /* 0 = off */
    float repetition_penalty; /* 1 = off */
    int32_t repeat_last_n;    /* window for the penalty; 0 = the whole session */
} dw_sampling_t;

/* Sample the next token from the session's current logits (host-side, seeded RNG).
 * Does not append it. Returns the token id. */
DW_IMPORT("sample")
int32_t dw_sample(int32_t session, const dw_sampling_t *params);

/* One decode step driven by the host: sample the next token from the current logits, append
 * it, and compute the logits after it. Returns the token id. */
DW_IMPORT("generate")
int32_t dw_generate(int32_t session, const dw_sampling_t *params);

/* ---- Snapshots ----------------------------------------------------------------------- */

/* Ask the host to snapshot this whole actor now: linear memory, exported mutable globals and
 * every open session (tokens, KV cache, logits, RNG); only when the actor runs with a snapshot
 * directory. The call stack is not captured: a resumed actor starts again at _start (main)
 * with its memory as it was here, and finds its state there (dw_resumed() returns 1). Libc's
 * state is restored too: a guest reading stdin should keep it unbuffered and clearerr() it on
 * resume. Returns 0, or DW_ESNAPSHOT. */
DW_IMPORT("snapshot")
int32_t dw_snapshot(void);

/* 1 if this run resumed from a snapshot, else 0. */
DW_IMPORT("resumed")
int32_t dw_resumed(void);

/* Save one session (tokens, KV cache, logits, RNG) in this actor's snapshot store as `name`
 * (1-64 bytes: letters, digits and "._-", starting with a letter or digit). Saving the same
 * name again replaces it and writes only the KV chunks that changed. Returns 0, or
 * DW_ESNAPSHOT (also when the actor runs without a snapshot directory). */
DW_IMPORT("session_save")
int32_t dw_session_save(int32_t session, const char *name, uint32_t name_len);

/* Open a new session holding the session saved as `name` (by this actor, in this run or an
 * earlier one on the same snapshot directory). Returns its handle, or DW_ESNAPSHOT when there
 * is no such snapshot or it does not fit the model. */
DW_IMPORT("session_load")
int32_t dw_session_load(const char *name, uint32_t name_len);

#endif /* DRIFTWOOD_H */

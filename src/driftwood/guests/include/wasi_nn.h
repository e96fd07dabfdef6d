/* wasi_nn.h — raw imports of WasmEdge's wasi-nn ABI (import module "wasi_ephemeral_nn").
 *
 * This mirrors what the `wasmedge-wasi-nn` Rust crate (0.8.0) imports, plus
 * finalize_execution_context, so a guest written against it runs under WasmEdge's GGML
 * backend and under Driftwood alike. Every function returns a wasi_nn_errno; results are
 * written through out-pointers. Pointers are addresses in the guest's own memory; strings
 * are (pointer, length) pairs without a terminating NUL.
 *
 * GGML conventions: set_input index 0 is the prompt (tensor type U8, UTF-8 bytes, dims
 * ignored), index 1 is metadata JSON; get_output index 0 is the generated text, index 1 is
 * {"input_tokens", "output_tokens", ...} JSON. A buffer that is too small gets
 * WASI_NN_TOO_LARGE with *bytes_written set to the size needed.
 */
#ifndef WASI_NN_H
#define WASI_NN_H

#include <stdint.h>

#define WASI_NN_IMPORT(name) __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))

typedef uint32_t wasi_nn_graph;
typedef uint32_t wasi_nn_context;
typedef int32_t wasi_nn_errno;

/* Error numbers (the GGML backend adds 100..103). */
#define WASI_NN_SUCCESS 0
#define WASI_NN_INVALID_ARGUMENT 1
#define WASI_NN_INVALID_ENCODING 2
#define WASI_NN_MISSING_MEMORY 3
#define WASI_NN_BUSY 4
#define WASI_NN_RUNTIME_ERROR 5
#define WASI_NN_UNSUPPORTED_OPERATION 6
#define WASI_NN_TOO_LARGE 7
#define WASI_NN_NOT_FOUND 8
#define WASI_NN_END_OF_SEQUENCE 100
#define WASI_NN_CONTEXT_FULL 101
#define WASI_NN_PROMPT_TOO_LONG 102
#define WASI_NN_MODEL_NOT_FOUND 103

/* Graph encodings and execution targets (the witx numbering WasmEdge uses). */
#define WASI_NN_ENCODING_OPENVINO 0
#define WASI_NN_ENCODING_ONNX 1
#define WASI_NN_ENCODING_TENSORFLOW 2
#define WASI_NN_ENCODING_PYTORCH 3
#define WASI_NN_ENCODING_TENSORFLOWLITE 4
#define WASI_NN_ENCODING_AUTODETECT 5
#define WASI_NN_ENCODING_GGML 6

#define WASI_NN_TARGET_CPU 0
#define WASI_NN_TARGET_GPU 1
#define WASI_NN_TARGET_TPU 2
#define WASI_NN_TARGET_AUTO 3

/* Tensor element types. */
#define WASI_NN_TYPE_F16 0
#define WASI_NN_TYPE_F32 1
#define WASI_NN_TYPE_F64 2
#define WASI_NN_TYPE_U8 3
#define WASI_NN_TYPE_I32 4
#define WASI_NN_TYPE_I64 5

/* load's builders: an array of (pointer, length). For GGML, builder 0 is the GGUF bytes or
 * "preload:<path>", builder 1 (optional) the metadata JSON. 8 bytes on wasm32. */
typedef struct {
    const uint8_t *data;
    uint32_t len;
} wasi_nn_builder;

/* set_input's tensor, 20 bytes on wasm32. */
typedef struct {
    const uint32_t *dims;
    uint32_t dims_len;
    uint32_t type;
    const uint8_t *data;
    uint32_t data_len; /* bytes */
} wasi_nn_tensor;

_Static_assert(sizeof(wasi_nn_builder) == 8, "wasi_nn_builder must be 8 bytes (wasm32)");
_Static_assert(sizeof(wasi_nn_tensor) == 20, "wasi_nn_tensor must be 20 bytes (wasm32)");

WASI_NN_IMPORT("load")
wasi_nn_errno wasi_nn_load(const wasi_nn_builder *builders, uint32_t builders_len,
                           uint32_t encoding, uint32_t target, wasi_nn_graph *graph);

WASI_NN_IMPORT("load_by_name")
wasi_nn_errno wasi_nn_load_by_name(const char *name, uint32_t name_len, wasi_nn_graph *graph);

WASI_NN_IMPORT("load_by_name_with_config")
wasi_nn_errno wasi_nn_load_by_name_with_config(const char *name, uint32_t name_len,
                                               const char *config, uint32_t config_len,
                                               wasi_nn_graph *graph);

WASI_NN_IMPORT("init_execution_context")
wasi_nn_errno wasi_nn_init_execution_context(wasi_nn_graph graph, wasi_nn_context *context);

WASI_NN_IMPORT("set_input")
wasi_nn_errno wasi_nn_set_input(wasi_nn_context context, uint32_t index, const wasi_nn_tensor *tensor);

WASI_NN_IMPORT("compute")
wasi_nn_errno wasi_nn_compute(wasi_nn_context context);

WASI_NN_IMPORT("compute_single")
wasi_nn_errno wasi_nn_compute_single(wasi_nn_context context);

WASI_NN_IMPORT("fini_single")
wasi_nn_errno wasi_nn_fini_single(wasi_nn_context context);

WASI_NN_IMPORT("get_output")
wasi_nn_errno wasi_nn_get_output(wasi_nn_context context, uint32_t index, uint8_t *out,
                                 uint32_t out_max, uint32_t *bytes_written);

WASI_NN_IMPORT("get_output_single")
wasi_nn_errno wasi_nn_get_output_single(wasi_nn_context context, uint32_t index, uint8_t *out,
                                        uint32_t out_max, uint32_t *bytes_written);

WASI_NN_IMPORT("unload")
wasi_nn_errno wasi_nn_unload(wasi_nn_graph graph);

WASI_NN_IMPORT("finalize_execution_context")
wasi_nn_errno wasi_nn_finalize_execution_context(wasi_nn_context context);

#endif /* WASI_NN_H */

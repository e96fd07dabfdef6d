/* driftwood.h — the guest SDK for Driftwood's native host ABI (import module "driftwood").
 *
 * Every function returns an int32_t: 0 or a positive count on success, a negative DW_E*
 * code on failure. Pointers are addresses in the guest's own linear memory; the host checks
 * every (pointer, length) against the memory's committed size before touching it.
 *
 * Build a guest with:   driftwood build my_guest.c -o my_guest.wasm
 */
#ifndef DRIFTWOOD_H
#define DRIFTWOOD_H

#include <stdint.h>
#include <stddef.h>

#define DW_IMPORT(name) __attribute__((import_module("driftwood"), import_name(name)))

/* Error codes. */
#define DW_OK         0
#define DW_EINVAL    -1  /* an argument is invalid (size, enum, flag, bad UTF-8) */
#define DW_EFAULT    -2  /* a pointer range lies outside the guest's memory, or overflows */
#define DW_EALIGN    -3  /* a pointer is not aligned for its element type */
#define DW_EINTERNAL -99 /* the host failed */

/* ---- Compute ------------------------------------------------------------------------ */

/* C[m×n] = A[m×k] · B[k×n], row-major float32, computed by the accelerator in place: the
 * host reads A and B and writes C directly in this guest's memory (no copies). C must not
 * overlap A or B. 1 <= m, n, k <= 8192. */
DW_IMPORT("gemm_f32")
int32_t dw_gemm_f32(const float *a, const float *b, float *c, int32_t m, int32_t n, int32_t k);

#endif /* DRIFTWOOD_H */

/* imatrix.h: the activation tap behind dg_imatrix_collect (native/imatrix.c), internal to the native library. */
#ifndef DGGUF_IMATRIX_H
#define DGGUF_IMATRIX_H

#include <stdint.h>

#include "dgguf.h"

/* Called by matmul_grouped with its inputs (x [off[ne2], ne0], matrix e's rows off[e] .. off[e + 1] - 1): adds
 * their squares to w's statistics when w is being collected; one pointer load when nothing is. */
void imatrix_tap(const dg_tensor *w, const float *x, const int64_t *off);

#endif

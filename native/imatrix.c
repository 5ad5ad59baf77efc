/* imatrix.c: per-column sums of squared matmul inputs, per matrix (expert), for importance matrices.
 *
 * dg_imatrix_collect installs a table of weights to watch (by data pointer); every matmul_grouped call then
 * hands its inputs to imatrix_tap, which adds x^2 column by column to that weight's sums (in double) and the
 * number of input rows to its count, per matrix. The forward calls matmuls from one thread at a time, so the
 * table needs no lock; collection is process-wide, like the kernel switch.
 */
#include <stdio.h>

#include "imatrix.h"

typedef struct {
    dg_imatrix_entry *entries;
    int64_t n;
} tap_table;

static tap_table table;
static tap_table *active;

int dg_imatrix_collect(dg_imatrix_entry *entries, int64_t n, char *err, size_t errlen) {
    __atomic_store_n(&active, NULL, __ATOMIC_RELEASE);
    if (!entries || n <= 0) return DG_OK;
    for (int64_t i = 0; i < n; i++)
        if (!entries[i].data || entries[i].ne0 < 1 || entries[i].ne2 < 1 || !entries[i].sum2 || !entries[i].count) {
            snprintf(err, errlen, "dg_imatrix_collect: entry %lld is incomplete", (long long)i);
            return DG_E_SHAPE;
        }
    table.entries = entries;
    table.n = n;
    __atomic_store_n(&active, &table, __ATOMIC_RELEASE);
    return DG_OK;
}

void imatrix_tap(const dg_tensor *w, const float *x, const int64_t *off) {
    const tap_table *t = __atomic_load_n(&active, __ATOMIC_ACQUIRE);
    if (!t) return;
    for (int64_t i = 0; i < t->n; i++) {
        dg_imatrix_entry *e = &t->entries[i];
        if (e->data != w->data) continue;
        if (e->ne0 != w->ne0 || e->ne2 != w->ne2) return;   /* registered with another shape: not this weight */
        const int64_t K = w->ne0;
        for (int64_t m = 0; m < w->ne2; m++) {
            double *s = e->sum2 + m * K;
            for (int64_t r = off[m]; r < off[m + 1]; r++) {
                const float *row = x + r * K;
                for (int64_t j = 0; j < K; j++) s[j] += (double)row[j] * (double)row[j];
            }
            e->count[m] += (double)(off[m + 1] - off[m]);
        }
        return;
    }
}

/* The kernels of tensor_product.c for one float type: included once per type with T (the
 * type) and NAME(x) (x with the type's suffix) defined. */

typedef struct {
    int64_t n_atoms, M1, M3, C, h_s0, h_s1, r_s0;
    const int64_t *r_row;  /* the row of r each edge reads (NULL: row e) */
    const T *h, *F, *r, *g;
    const int64_t *i, *j, *start, *order;
    T *out, *grad_h, *grad_F, *grad_r;
    T **private_h;  /* per-thread dL/dh of the edge-order backward pass (index 0: grad_h itself) */
} NAME(Job);

/* Output rows of atoms first..stop-1: out[a] = sum over the edges whose centre is a. */
CLONES static void NAME(forward_rows)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    const int64_t M1 = q->M1, M3 = q->M3, C = q->C;
    T *restrict tmp = scratch;
    (void)index;
    for (int64_t a = first; a < stop; a++) {
        T *restrict o = q->out + a * M3 * C;
        memset(o, 0, (size_t)(M3 * C) * sizeof(T));
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) {
            const int64_t e = q->order[k];
            const T *restrict hj = q->h + q->j[e] * q->h_s0;
            const T *restrict re = q->r + (q->r_row ? q->r_row[e] : e) * q->r_s0;
            const T *restrict Fe = q->F + e * M3 * M1;
            for (int64_t m1 = 0; m1 < M1; m1++) {
                const T *restrict hm = hj + m1 * q->h_s1;
                for (int64_t c = 0; c < C; c++) tmp[c] = hm[c] * re[c];
                for (int64_t m3 = 0; m3 < M3; m3++) {
                    const T f = Fe[m3 * M1 + m1];
                    T *restrict om = o + m3 * C;
                    for (int64_t c = 0; c < C; c++) om[c] += f * tmp[c];
                }
            }
        }
    }
}

/* The backward pass of one edge (inlined into the callers, compiled for each of their targets): dL/dF[e], dL/dr[e], and dL/dh[j] += into gh (NULL: not needed). */
static inline void NAME(backward_edge)(const NAME(Job) *q, int64_t e, T *restrict gh, T *restrict t, T *restrict u) {
    const int64_t M1 = q->M1, M3 = q->M3, C = q->C;
    const T *restrict gi = q->g + q->i[e] * M3 * C;
    const T *restrict hj = q->h + q->j[e] * q->h_s0;
    const T *restrict re = q->r + (q->r_row ? q->r_row[e] : e) * q->r_s0;
    const T *restrict Fe = q->F + e * M3 * M1;
    T *restrict gr = q->grad_r ? q->grad_r + e * C : NULL;
    if (gh || gr) {
        if (gr) memset(gr, 0, (size_t)C * sizeof(T));
        for (int64_t m1 = 0; m1 < M1; m1++) {
            for (int64_t c = 0; c < C; c++) t[c] = 0;
            for (int64_t m3 = 0; m3 < M3; m3++) {
                const T f = Fe[m3 * M1 + m1];
                const T *restrict gm = gi + m3 * C;
                for (int64_t c = 0; c < C; c++) t[c] += f * gm[c];
            }
            if (gh) {
                T *restrict ghm = gh + m1 * C;
                for (int64_t c = 0; c < C; c++) ghm[c] += re[c] * t[c];
            }
            if (gr) {
                const T *restrict hm = hj + m1 * q->h_s1;
                for (int64_t c = 0; c < C; c++) gr[c] += t[c] * hm[c];
            }
        }
    }
    if (q->grad_F) {
        T *restrict gF = q->grad_F + e * M3 * M1;
        for (int64_t m3 = 0; m3 < M3; m3++) {
            const T *restrict gm = gi + m3 * C;
            for (int64_t c = 0; c < C; c++) u[c] = gm[c] * re[c];
            for (int64_t m1 = 0; m1 < M1; m1++) {
                const T *restrict hm = hj + m1 * q->h_s1;
                T s = 0;
                SIMD_SUM for (int64_t c = 0; c < C; c++) s += u[c] * hm[c];
                gF[m3 * M1 + m1] = s;
            }
        }
    }
}

/* Edges first..stop-1 in storage order (streaming through r, F and their gradients); dL/dh into
 * this thread's own copy. */
CLONES static void NAME(backward_edges)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    T *t = scratch, *u = t + q->C, *gh = q->grad_h ? q->private_h[index] : NULL;
    const int64_t row = q->M1 * q->C;
    for (int64_t e = first; e < stop; e++) NAME(backward_edge)(q, e, gh ? gh + q->j[e] * row : NULL, t, u);
}

/* dL/dh rows of atoms first..stop-1: the sum of the threads' copies, in thread order. */
static void NAME(sum_private)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    const int64_t row = q->M1 * q->C;
    (void)index; (void)scratch;
    for (int k = 1; q->private_h[k]; k++) {
        const T *restrict src = q->private_h[k] + first * row;
        T *restrict dst = q->grad_h + first * row;
        for (int64_t x = 0; x < (stop - first) * row; x++) dst[x] += src[x];
    }
}

/* dL/dh rows of atoms first..stop-1 as neighbours (edges grouped by j): no per-thread copies. */
CLONES static void NAME(backward_rows)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    T *t = scratch, *u = t + q->C;
    const int64_t row = q->M1 * q->C;
    (void)index;
    for (int64_t a = first; a < stop; a++) {
        T *gh = q->grad_h + a * row;
        memset(gh, 0, (size_t)row * sizeof(T));
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) NAME(backward_edge)(q, q->order[k], gh, t, u);
    }
}

/* Group the edges by key, cut the atoms into ranges of equal edge counts, run work on them. */
static int64_t NAME(by_atom)(NAME(Job) *q, int64_t n_edges, const int64_t *key, const int64_t *other, int threads,
                       size_t scratch, void (*work)(const void *, int64_t, int64_t, int, void *)) {
    int64_t *start = malloc((size_t)(q->n_atoms + 1) * sizeof(int64_t));
    int64_t *order = malloc((size_t)(n_edges > 0 ? n_edges : 1) * sizeof(int64_t));
    int status = (start && order) ? group_edges(q->n_atoms, n_edges, key, other, start, order) : -1;
    if (status == 0) {
        Range ranges[MAX_THREADS];
        q->start = start;
        q->order = order;
        threads = thread_count(threads, n_edges);
        atom_ranges(ranges, threads, q->n_atoms, start);
        for (int t = 0; t < threads; t++)
            ranges[t] = (Range){ranges[t].first, ranges[t].stop, t, q, work, scratch, -1};
        status = in_parallel(ranges, threads);
    }
    free(start);
    free(order);
    return status;
}

int64_t NAME(eqcalc_tp_forward)(int64_t n_atoms, int64_t n_edges, int64_t M1, int64_t M3, int64_t C,
                          const T *h, int64_t h_s0, int64_t h_s1, const T *F, const T *r,
                          int64_t r_s0, int64_t n_rows, const int64_t *r_row, const int64_t *i, const int64_t *j,
                          T *out, int32_t threads) {
    NAME(Job) job = {n_atoms, M1, M3, C, h_s0, h_s1, r_s0, r_row, h, F, r, NULL, i, j, NULL, NULL, out, NULL, NULL, NULL,
                     NULL};
    if (!rows_in_range(n_edges, n_rows, r_row)) return -2;
    return NAME(by_atom)(&job, n_edges, i, j, threads, (size_t)(C > 0 ? C : 1) * sizeof(T), NAME(forward_rows));
}

int64_t NAME(eqcalc_tp_backward)(int64_t n_atoms, int64_t n_edges, int64_t M1, int64_t M3, int64_t C,
                           const T *h, int64_t h_s0, int64_t h_s1, const T *F, const T *r,
                           int64_t r_s0, int64_t n_rows, const int64_t *r_row, const int64_t *i, const int64_t *j,
                           const T *g,
                           T *grad_h, T *grad_F, T *grad_r, int32_t threads,
                           int64_t private_bytes) {
    NAME(Job) job = {n_atoms, M1, M3, C, h_s0, h_s1, r_s0, r_row, h, F, r, g, i, j, NULL, NULL, NULL, grad_h, grad_F,
                     grad_r, NULL};
    if (!rows_in_range(n_edges, n_rows, r_row)) return -2;
    const size_t scratch = (size_t)(2 * (C > 0 ? C : 1)) * sizeof(T), row = (size_t)(M1 * C) * sizeof(T);
    const int n = thread_count(threads, n_edges);
    if (grad_h && n > 1 && (double)n * (double)n_atoms * (double)row > (double)private_bytes)
        return NAME(by_atom)(&job, n_edges, j, i, threads, scratch, NAME(backward_rows));
    /* Edges in storage order, each thread summing dL/dh into its own copy (the neighbours j of
     * an edge range are scattered: grouping the edges by j would read r and F out of order). */
    for (int64_t e = 0; e < n_edges; e++)
        if (i[e] < 0 || i[e] >= n_atoms || j[e] < 0 || j[e] >= n_atoms) return -2;
    T *private_h[MAX_THREADS + 1] = {grad_h};
    int status = 0;
    if (grad_h) {
        memset(grad_h, 0, (size_t)n_atoms * row);
        for (int t = 1; t < n; t++)
            if (!(private_h[t] = calloc((size_t)n_atoms, row))) status = -1;
    }
    job.private_h = private_h;
    Range ranges[MAX_THREADS];
    if (status == 0) {
        for (int t = 0; t < n; t++)
            ranges[t] = (Range){n_edges * t / n, n_edges * (t + 1) / n, t, &job, NAME(backward_edges), scratch, -1};
        status = in_parallel(ranges, n);
    }
    if (status == 0 && grad_h && n > 1) {
        for (int t = 0; t < n; t++)
            ranges[t] = (Range){n_atoms * t / n, n_atoms * (t + 1) / n, t, &job, NAME(sum_private), 1, -1};
        status = in_parallel(ranges, n);
    }
    for (int t = 1; t < n; t++) free(private_h[t]);
    return status;
}

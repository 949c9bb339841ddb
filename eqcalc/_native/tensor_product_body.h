/* The kernels of tensor_product.c for one float type: included once per type with T (the
 * type) and NAME(x) (x with the type's suffix) defined. */

typedef struct {
    int64_t n_atoms, M1, M3, C, h_s0, h_s1, r_s0;
    const int64_t *r_row;          /* the row of r each edge reads (NULL: row e) */
    const T *h, *F, *r, *g;
    const int64_t *i, *j;
    const int64_t *start, *order;  /* edges grouped by row of r (NULL: row e is edge e) or by atom */
    T *out, *grad_h, *grad_F, *grad_r;
    T *grad_r_edges;               /* dL/dr per edge (atom passes with shared rows), else grad_r */
    T **copies;                    /* per thread: its sums of atoms' rows ([0]: the output itself) */
    int64_t width;                 /* T's per atom row of copies */
} NAME(Job);

/* out[i] += r[e] (F[e] @ h[j]) for one edge; o is centre i's output row. */
static inline void NAME(forward_edge)(const NAME(Job) *q, int64_t e, const T *restrict re, T *restrict o,
                                      T *restrict tmp) {
    const int64_t M1 = q->M1, M3 = q->M3, C = q->C;
    const T *restrict hj = q->h + q->j[e] * q->h_s0;
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

/* The backward pass of one edge: dL/dF[e] written, dL/dh[j] += into gh and dL/dr += into gr
 * (each NULL: not needed). */
static inline void NAME(backward_edge)(const NAME(Job) *q, int64_t e, const T *restrict re, T *restrict gh,
                                       T *restrict gr, T *restrict t, T *restrict u) {
    const int64_t M1 = q->M1, M3 = q->M3, C = q->C;
    const T *restrict gi = q->g + q->i[e] * M3 * C;
    const T *restrict hj = q->h + q->j[e] * q->h_s0;
    const T *restrict Fe = q->F + e * M3 * M1;
    if (gh || gr) {
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

/* Rows first..stop-1 of r and their edges, centre sums into this thread's copy of out. */
static void NAME(forward_rows)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    T *o = q->copies[index];
    for (int64_t row = first; row < stop; row++) {
        const T *re = q->r + row * q->r_s0;
        const int64_t k0 = q->start ? q->start[row] : row, k1 = q->start ? q->start[row + 1] : row + 1;
        for (int64_t k = k0; k < k1; k++) {
            const int64_t e = q->start ? q->order[k] : k;
            NAME(forward_edge)(q, e, re, o + q->i[e] * q->width, scratch);
        }
    }
}

/* Output rows of atoms first..stop-1, each the sum over the edges whose centre it is. */
static void NAME(forward_atoms)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    (void)index;
    for (int64_t a = first; a < stop; a++) {
        T *o = q->out + a * q->width;
        memset(o, 0, (size_t)q->width * sizeof(T));
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) {
            const int64_t e = q->order[k];
            NAME(forward_edge)(q, e, q->r + (q->r_row ? q->r_row[e] : e) * q->r_s0, o, scratch);
        }
    }
}

/* Rows first..stop-1 of r: dL/dr of each row and dL/dF of its edges; dL/dh into this thread's copy. */
static void NAME(backward_rows)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    T *t = scratch, *u = t + q->C, *gh = q->grad_h ? q->copies[index] : NULL;
    for (int64_t row = first; row < stop; row++) {
        const T *re = q->r + row * q->r_s0;
        T *gr = q->grad_r ? q->grad_r + row * q->C : NULL;
        if (gr) memset(gr, 0, (size_t)q->C * sizeof(T));
        const int64_t k0 = q->start ? q->start[row] : row, k1 = q->start ? q->start[row + 1] : row + 1;
        for (int64_t k = k0; k < k1; k++) {
            const int64_t e = q->start ? q->order[k] : k;
            NAME(backward_edge)(q, e, re, gh ? gh + q->j[e] * q->width : NULL, gr, t, u);
        }
    }
}

/* dL/dh rows of atoms first..stop-1 as neighbours (edges grouped by j), no copies; dL/dr per edge. */
static void NAME(backward_atoms)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    T *t = scratch, *u = t + q->C;
    (void)index;
    for (int64_t a = first; a < stop; a++) {
        T *gh = q->grad_h + a * q->width;
        memset(gh, 0, (size_t)q->width * sizeof(T));
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) {
            const int64_t e = q->order[k];
            T *gr = q->grad_r_edges ? q->grad_r_edges + e * q->C : NULL;
            if (gr) memset(gr, 0, (size_t)q->C * sizeof(T));
            NAME(backward_edge)(q, e, q->r + (q->r_row ? q->r_row[e] : e) * q->r_s0, gh, gr, t, u);
        }
    }
}

/* dL/dr of rows first..stop-1: the sum of their edges' (edges grouped by row). */
static void NAME(sum_edge_rows)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    const int64_t C = q->C;
    (void)index; (void)scratch;
    for (int64_t row = first; row < stop; row++) {
        T *restrict dst = q->grad_r + row * C;
        memset(dst, 0, (size_t)C * sizeof(T));
        for (int64_t k = q->start[row]; k < q->start[row + 1]; k++) {
            const T *restrict src = q->grad_r_edges + q->order[k] * C;
            for (int64_t c = 0; c < C; c++) dst[c] += src[c];
        }
    }
}

/* Atom rows first..stop-1 of copies[0] plus those of the other threads' copies, in thread order. */
static void NAME(sum_copies)(const void *p, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = p;
    (void)index; (void)scratch;
    for (int k = 1; q->copies[k]; k++) {
        const T *restrict src = q->copies[k] + first * q->width;
        T *restrict dst = q->copies[0] + first * q->width;
        for (int64_t x = 0; x < (stop - first) * q->width; x++) dst[x] += src[x];
    }
}

/* The row pass: threads share the rows of r (edges grouped by row), each summing atom rows into
 * its own copy of `target` (n_atoms x width; NULL: nothing summed per atom), then the copies
 * are added. */
static int NAME(by_rows)(NAME(Job) *q, int64_t n_edges, int64_t n_rows, int threads, T *target, size_t scratch,
                         void (*work)(const void *, int64_t, int64_t, int, void *)) {
    int64_t *start = NULL, *order = NULL;
    T *copies[MAX_THREADS + 1] = {target};
    const size_t bytes = (size_t)q->n_atoms * (size_t)q->width * sizeof(T);
    int status = q->r_row ? group_edges(n_rows, n_edges, q->r_row, &start, &order) : 0;
    q->start = start;
    q->order = order;
    if (target) {
        memset(target, 0, bytes);
        for (int t = 1; t < threads && status == 0; t++)
            if (!(copies[t] = calloc(1, bytes > 0 ? bytes : 1))) status = -1;
    }
    q->copies = copies;
    Range ranges[MAX_THREADS];
    if (status == 0) {
        even_ranges(ranges, threads, q->r_row ? n_rows : n_edges);
        assign(ranges, threads, q, scratch, work);
        status = in_parallel(ranges, threads);
    }
    if (status == 0 && target && threads > 1) {
        even_ranges(ranges, threads, q->n_atoms);
        assign(ranges, threads, q, 1, NAME(sum_copies));
        status = in_parallel(ranges, threads);
    }
    for (int t = 1; t < threads; t++) free(copies[t]);
    free(start);
    free(order);
    return status;
}

/* A grouped pass: edges grouped by `key` into n_groups (atoms by centre or neighbour, or rows
 * of r), threads own ranges of groups of ~equal edge counts. */
static int NAME(by_groups)(NAME(Job) *q, int64_t n_groups, int64_t n_edges, const int64_t *key, int threads,
                           size_t scratch, void (*work)(const void *, int64_t, int64_t, int, void *)) {
    int64_t *start, *order;
    int status = group_edges(n_groups, n_edges, key, &start, &order);
    if (status == 0) {
        Range ranges[MAX_THREADS];
        q->start = start;
        q->order = order;
        group_ranges(ranges, threads, n_groups, start);
        assign(ranges, threads, q, scratch, work);
        status = in_parallel(ranges, threads);
    }
    free(start);
    free(order);
    return status;
}

static int NAME(copies_fit)(int threads, int64_t n_atoms, int64_t width, int64_t private_bytes) {
    return threads == 1 || (double)threads * (double)n_atoms * (double)width * sizeof(T) <= (double)private_bytes;
}

int64_t NAME(eqcalc_tp_forward)(int64_t n_atoms, int64_t n_edges, int64_t M1, int64_t M3, int64_t C,
                                const T *h, int64_t h_s0, int64_t h_s1, const T *F, const T *r, int64_t r_s0,
                                int64_t n_rows, const int64_t *r_row, const int64_t *i, const int64_t *j,
                                T *out, int32_t threads, int64_t private_bytes) {
    if (!indices_in_range(n_atoms, n_edges, i, j, n_rows, r_row)) return -2;
    NAME(Job) job = {n_atoms, M1, M3, C, h_s0, h_s1, r_s0, r_row, h, F, r, NULL, i, j, NULL, NULL,
                     out, NULL, NULL, NULL, NULL, NULL, M3 * C};
    const int n = thread_count(threads);
    const size_t scratch = (size_t)(C > 0 ? C : 1) * sizeof(T);
    if (NAME(copies_fit)(n, n_atoms, M3 * C, private_bytes))
        return NAME(by_rows)(&job, n_edges, n_rows, n, out, scratch, NAME(forward_rows));
    return NAME(by_groups)(&job, n_atoms, n_edges, i, n, scratch, NAME(forward_atoms));
}

int64_t NAME(eqcalc_tp_backward)(int64_t n_atoms, int64_t n_edges, int64_t M1, int64_t M3, int64_t C,
                                 const T *h, int64_t h_s0, int64_t h_s1, const T *F, const T *r, int64_t r_s0,
                                 int64_t n_rows, const int64_t *r_row, const int64_t *i, const int64_t *j,
                                 const T *g, T *grad_h, T *grad_F, T *grad_r, int32_t threads,
                                 int64_t private_bytes) {
    if (!indices_in_range(n_atoms, n_edges, i, j, n_rows, r_row)) return -2;
    NAME(Job) job = {n_atoms, M1, M3, C, h_s0, h_s1, r_s0, r_row, h, F, r, g, i, j, NULL, NULL,
                     NULL, grad_h, grad_F, grad_r, grad_r, NULL, M1 * C};
    const int n = thread_count(threads);
    const size_t scratch = (size_t)(2 * (C > 0 ? C : 1)) * sizeof(T);
    if (!grad_h || NAME(copies_fit)(n, n_atoms, M1 * C, private_bytes))
        return NAME(by_rows)(&job, n_edges, n_rows, n, grad_h, scratch, NAME(backward_rows));
    T *edges = NULL;
    if (grad_r && r_row) {  /* rows shared by edges that different threads own: per edge first */
        edges = malloc((size_t)(n_edges > 0 ? n_edges : 1) * (size_t)(C > 0 ? C : 1) * sizeof(T));
        if (!edges) return -1;
        job.grad_r_edges = edges;
    }
    int status = NAME(by_groups)(&job, n_atoms, n_edges, j, n, scratch, NAME(backward_atoms));
    if (status == 0 && edges)  /* dL/dr per row: the sum of its edges' */
        status = NAME(by_groups)(&job, n_rows, n_edges, r_row, n, 1, NAME(sum_edge_rows));
    free(edges);
    return status;
}

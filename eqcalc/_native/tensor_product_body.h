/* The kernels of tensor_product.c for one float type: included once per type with T (the
 * type) and NAME(x) (x with the type's suffix) defined. */

typedef struct {
    int64_t n_atoms, n_paths, h_s0, h_s1, r_s0, gh_s1, gr_s0, max_C;
    const Path *paths;
    const int64_t *r_row;          /* the row of r each edge reads (NULL: row e) */
    const T *h, *r;
    const int64_t *i, *j;
    const int64_t *start, *order;  /* edges grouped by row of r (NULL: row e is edge e) or by atom */
    T *grad_h, *grad_r;
    T *grad_r_edges;               /* dL/dr per edge (atom passes with shared rows), else grad_r */
    T **copies;                    /* per thread >= 1: its sums of atoms' rows; [0]: dL/dh itself */
    int64_t width;                 /* T's per atom row of a copy (and of dL/dh) */
} NAME(Job);

/* out[i] += r[e] (F[e] @ h[j]) for one edge and path, M1 and M3 constants once inlined: channels
 * outermost, so each output vector is loaded and stored once per edge (not once per m1), summed
 * in the same order as the generic loop below. */
static inline __attribute__((always_inline)) void NAME(forward_fixed)(
        const T *restrict hj, int64_t h_s1, const T *restrict Fe, const T *restrict re, T *restrict o, int64_t C,
        const int M1, const int M3) {
    for (int64_t c = 0; c < C; c++) {
        T v[7];
        for (int m1 = 0; m1 < M1; m1++) v[m1] = hj[m1 * h_s1 + c] * re[c];
        for (int m3 = 0; m3 < M3; m3++) {
            T s = o[m3 * C + c];
            for (int m1 = 0; m1 < M1; m1++) s += Fe[m3 * M1 + m1] * v[m1];
            o[m3 * C + c] = s;
        }
    }
}

static inline void NAME(forward_edge)(const NAME(Job) *q, const Path *p, int64_t e, const T *restrict re,
                                      T *restrict o, T *restrict tmp) {
    const int64_t M1 = p->M1, M3 = p->M3, C = p->C, h_s1 = q->h_s1;
    const T *restrict hj = q->h + q->j[e] * q->h_s0 + p->h_off;
    const T *restrict Fe = (const T *)p->F + e * M3 * M1;
#define FORWARD_CASE(a, b) case a * 8 + b: NAME(forward_fixed)(hj, h_s1, Fe, re, o, C, a, b); return;
    if (M1 < 8 && M3 < 8)
        switch (M1 * 8 + M3) { FIXED_SHAPES(FORWARD_CASE) default: break; }
#undef FORWARD_CASE
    for (int64_t m1 = 0; m1 < M1; m1++) {
        const T *restrict hm = hj + m1 * h_s1;
        for (int64_t c = 0; c < C; c++) tmp[c] = hm[c] * re[c];
        for (int64_t m3 = 0; m3 < M3; m3++) {
            const T f = Fe[m3 * M1 + m1];
            T *restrict om = o + m3 * C;
            for (int64_t c = 0; c < C; c++) om[c] += f * tmp[c];
        }
    }
}

typedef T NAME(vec) __attribute__((vector_size(VECTOR_BYTES)));
#define LANES ((int64_t)(VECTOR_BYTES / sizeof(T)))

static inline __attribute__((always_inline)) NAME(vec) NAME(load)(const T *x) {
    NAME(vec) v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* dL/dh[j] += r (F^T g[i]) into gh, dL/dr += (F^T g[i]) . h[j] into gr and dL/dF = the sum over
 * channels of g[i] r h[j] into gF (each NULL: not needed) for constant M1, M3, a vector of
 * channels at a time: dL/dh and dL/dr summed in the generic loop's order, dL/dF in lanes. */
static inline __attribute__((always_inline)) void NAME(backward_fixed)(
        const T *restrict gi, const T *restrict hj, int64_t h_s1, const T *restrict Fe, const T *restrict re,
        T *restrict gh, int64_t gh_s1, T *restrict gr, T *restrict gF, int64_t C, const int M1, const int M3) {
    /* few sums: two sets of lanes, half the dependency chain (more would leave the registers) */
    const int sets = M1 * M3 <= 3 ? 2 : 1;
    NAME(vec) acc[2][M1 * M3];
    T sF[M1 * M3];
    for (int k = 0; k < M1 * M3; k++) {
        acc[0][k] = acc[1][k] = (NAME(vec)){0};
        sF[k] = 0;
    }
    int64_t c = 0;
    for (int half = 0; c + LANES <= C; c += LANES, half = (half + 1) % sets) {
        NAME(vec) g[M3], r = NAME(load)(re + c), sr = gr ? NAME(load)(gr + c) : (NAME(vec)){0};
        for (int m3 = 0; m3 < M3; m3++) g[m3] = NAME(load)(gi + m3 * C + c);
        for (int m1 = 0; m1 < M1; m1++) {
            const NAME(vec) h = NAME(load)(hj + m1 * h_s1 + c);
            NAME(vec) t = {0};
            for (int m3 = 0; m3 < M3; m3++) t += Fe[m3 * M1 + m1] * g[m3];
            if (gh) {
                NAME(vec) x = NAME(load)(gh + m1 * gh_s1 + c) + r * t;
                memcpy(gh + m1 * gh_s1 + c, &x, sizeof x);
            }
            sr += t * h;
            if (gF)
                for (int m3 = 0; m3 < M3; m3++) acc[half][m3 * M1 + m1] += g[m3] * r * h;
        }
        if (gr) memcpy(gr + c, &sr, sizeof sr);
    }
    for (; c < C; c++) {
        T g[M3], r = re[c], sr = gr ? gr[c] : 0;
        for (int m3 = 0; m3 < M3; m3++) g[m3] = gi[m3 * C + c];
        for (int m1 = 0; m1 < M1; m1++) {
            const T h = hj[m1 * h_s1 + c];
            T t = 0;
            for (int m3 = 0; m3 < M3; m3++) t += Fe[m3 * M1 + m1] * g[m3];
            if (gh) gh[m1 * gh_s1 + c] += r * t;
            sr += t * h;
            if (gF)
                for (int m3 = 0; m3 < M3; m3++) sF[m3 * M1 + m1] += g[m3] * r * h;
        }
        if (gr) gr[c] = sr;
    }
    if (gF)
        for (int k = 0; k < M1 * M3; k++) {
            T s = 0;
            for (int64_t lane = 0; lane < LANES; lane++) s += acc[0][k][lane] + acc[1][k][lane];
            gF[k] = s + sF[k];
        }
}

/* backward_fixed with each of gh, gr, gF known NULL or not (its branches gone). */
static inline __attribute__((always_inline)) void NAME(backward_variants)(
        const T *restrict gi, const T *restrict hj, int64_t h_s1, const T *restrict Fe, const T *restrict re,
        T *restrict gh, int64_t gh_s1, T *restrict gr, T *restrict gF, int64_t C, const int M1, const int M3) {
    switch ((gh != NULL) * 4 + (gr != NULL) * 2 + (gF != NULL)) {
        case 7: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, gh, gh_s1, gr, gF, C, M1, M3); break;
        case 6: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, gh, gh_s1, gr, NULL, C, M1, M3); break;
        case 5: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, gh, gh_s1, NULL, gF, C, M1, M3); break;
        case 4: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, gh, gh_s1, NULL, NULL, C, M1, M3); break;
        case 3: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, NULL, gh_s1, gr, gF, C, M1, M3); break;
        case 2: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, NULL, gh_s1, gr, NULL, C, M1, M3); break;
        case 1: NAME(backward_fixed)(gi, hj, h_s1, Fe, re, NULL, gh_s1, NULL, gF, C, M1, M3); break;
        default: break;
    }
}

/* The backward pass of one edge and path: dL/dF[e] written, dL/dh[j] += into gh (the path's
 * block of j's row) and dL/dr += into gr (the path's columns) (each NULL: not needed). */
static inline void NAME(backward_edge)(const NAME(Job) *q, const Path *p, int64_t e, const T *restrict re,
                                       T *restrict gh, T *restrict gr, T *restrict t, T *restrict u) {
    const int64_t M1 = p->M1, M3 = p->M3, C = p->C, h_s1 = q->h_s1, gh_s1 = q->gh_s1;
    const T *restrict gi = (const T *)p->g + q->i[e] * M3 * C;
    const T *restrict hj = q->h + q->j[e] * q->h_s0 + p->h_off;
    const T *restrict Fe = (const T *)p->F + e * M3 * M1;
    T *restrict gF = p->grad_F ? (T *)p->grad_F + e * M3 * M1 : NULL;
#define BACKWARD_CASE(a, b) case a * 8 + b: NAME(backward_variants)(gi, hj, h_s1, Fe, re, gh, gh_s1, gr, gF, C, a, b); \
                                    return;
    if (M1 < 8 && M3 < 8)
        switch (M1 * 8 + M3) { FIXED_SHAPES(BACKWARD_CASE) default: break; }
#undef BACKWARD_CASE
    if (gh || gr) {
        for (int64_t m1 = 0; m1 < M1; m1++) {
            for (int64_t c = 0; c < C; c++) t[c] = 0;
            for (int64_t m3 = 0; m3 < M3; m3++) {
                const T f = Fe[m3 * M1 + m1];
                const T *restrict gm = gi + m3 * C;
                for (int64_t c = 0; c < C; c++) t[c] += f * gm[c];
            }
            if (gh) {
                T *restrict ghm = gh + m1 * gh_s1;
                for (int64_t c = 0; c < C; c++) ghm[c] += re[c] * t[c];
            }
            if (gr) {
                const T *restrict hm = hj + m1 * h_s1;
                for (int64_t c = 0; c < C; c++) gr[c] += t[c] * hm[c];
            }
        }
    }
    if (gF) {
        for (int64_t m3 = 0; m3 < M3; m3++) {
            const T *restrict gm = gi + m3 * C;
            for (int64_t c = 0; c < C; c++) u[c] = gm[c] * re[c];
            for (int64_t m1 = 0; m1 < M1; m1++) {
                const T *restrict hm = hj + m1 * h_s1;
                T s = 0;
                SIMD_SUM for (int64_t c = 0; c < C; c++) s += u[c] * hm[c];
                gF[m3 * M1 + m1] = s;
            }
        }
    }
}

/* Path p's output row of atom a for thread `index`: the output itself for thread 0, else the
 * thread's copy. */
static inline T *NAME(out_row)(const NAME(Job) *q, const Path *p, int index, int64_t a) {
    return index == 0 ? (T *)p->out + a * p->M3 * p->C : q->copies[index] + a * q->width + p->out_off;
}

/* Rows first..stop-1 of r and their edges, centre sums into this thread's rows of the outputs. */
static void NAME(forward_rows)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    for (int64_t row = first; row < stop; row++) {
        const T *re = q->r + row * q->r_s0;
        const int64_t k0 = q->start ? q->start[row] : row, k1 = q->start ? q->start[row + 1] : row + 1;
        for (int64_t k = k0; k < k1; k++) {
            const int64_t e = q->start ? q->order[k] : k;
            for (int64_t n = 0; n < q->n_paths; n++) {
                const Path *p = q->paths + n;
                NAME(forward_edge)(q, p, e, re + p->r_off, NAME(out_row)(q, p, index, q->i[e]), scratch);
            }
        }
    }
}

/* Output rows of atoms first..stop-1, each the sum over the edges whose centre it is. */
static void NAME(forward_atoms)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    (void)index;
    for (int64_t a = first; a < stop; a++) {
        for (int64_t n = 0; n < q->n_paths; n++) {
            const Path *p = q->paths + n;
            memset(NAME(out_row)(q, p, 0, a), 0, (size_t)(p->M3 * p->C) * sizeof(T));
        }
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) {
            const int64_t e = q->order[k];
            const T *re = q->r + (q->r_row ? q->r_row[e] : e) * q->r_s0;
            for (int64_t n = 0; n < q->n_paths; n++) {
                const Path *p = q->paths + n;
                NAME(forward_edge)(q, p, e, re + p->r_off, NAME(out_row)(q, p, 0, a), scratch);
            }
        }
    }
}

/* One edge's backward pass for every path; gh: j's row of dL/dh (or NULL), gr: dL/dr's row. */
static inline void NAME(backward_paths)(const NAME(Job) *q, int64_t e, const T *re, T *gh, T *gr, T *t, T *u) {
    for (int64_t n = 0; n < q->n_paths; n++) {
        const Path *p = q->paths + n;
        NAME(backward_edge)(q, p, e, re + p->r_off, gh ? gh + p->gh_off : NULL, gr ? gr + p->r_off : NULL, t, u);
    }
}

/* Rows first..stop-1 of r: dL/dr of each row and dL/dF of its edges; dL/dh into this thread's copy. */
static void NAME(backward_rows)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    T *t = scratch, *u = t + q->max_C, *gh = q->grad_h ? q->copies[index] : NULL;
    for (int64_t row = first; row < stop; row++) {
        const T *re = q->r + row * q->r_s0;
        T *gr = q->grad_r ? q->grad_r + row * q->gr_s0 : NULL;
        if (gr) memset(gr, 0, (size_t)q->gr_s0 * sizeof(T));
        const int64_t k0 = q->start ? q->start[row] : row, k1 = q->start ? q->start[row + 1] : row + 1;
        for (int64_t k = k0; k < k1; k++) {
            const int64_t e = q->start ? q->order[k] : k;
            NAME(backward_paths)(q, e, re, gh ? gh + q->j[e] * q->width : NULL, gr, t, u);
        }
    }
}

/* dL/dh rows of atoms first..stop-1 as neighbours (edges grouped by j), no copies; dL/dr per edge. */
static void NAME(backward_atoms)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    T *t = scratch, *u = t + q->max_C;
    (void)index;
    for (int64_t a = first; a < stop; a++) {
        T *gh = q->grad_h + a * q->width;
        memset(gh, 0, (size_t)q->width * sizeof(T));
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) {
            const int64_t e = q->order[k];
            T *gr = q->grad_r_edges ? q->grad_r_edges + e * q->gr_s0 : NULL;
            if (gr) memset(gr, 0, (size_t)q->gr_s0 * sizeof(T));
            NAME(backward_paths)(q, e, q->r + (q->r_row ? q->r_row[e] : e) * q->r_s0, gh, gr, t, u);
        }
    }
}

/* dL/dr of rows first..stop-1: the sum of their edges' (edges grouped by row). */
static void NAME(sum_edge_rows)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    const int64_t width = q->gr_s0;
    (void)index; (void)scratch;
    for (int64_t row = first; row < stop; row++) {
        T *restrict dst = q->grad_r + row * width;
        memset(dst, 0, (size_t)width * sizeof(T));
        for (int64_t k = q->start[row]; k < q->start[row + 1]; k++) {
            const T *restrict src = q->grad_r_edges + q->order[k] * width;
            for (int64_t c = 0; c < width; c++) dst[c] += src[c];
        }
    }
}

/* Atom rows first..stop-1 of copies[0] (dL/dh) plus those of the other threads' copies, in
 * thread order. */
static void NAME(sum_copies)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    (void)index; (void)scratch;
    for (int k = 1; q->copies[k]; k++) {
        const T *restrict src = q->copies[k] + first * q->width;
        T *restrict dst = q->copies[0] + first * q->width;
        for (int64_t x = 0; x < (stop - first) * q->width; x++) dst[x] += src[x];
    }
}

/* Atom rows first..stop-1 of every path's output plus those of the other threads' copies, in
 * thread order. */
static void NAME(sum_output_copies)(const void *job, int64_t first, int64_t stop, int index, void *scratch) {
    const NAME(Job) *q = job;
    (void)index; (void)scratch;
    for (int k = 1; q->copies[k]; k++)
        for (int64_t n = 0; n < q->n_paths; n++) {
            const Path *p = q->paths + n;
            const int64_t size = p->M3 * p->C;
            for (int64_t a = first; a < stop; a++) {
                const T *restrict src = q->copies[k] + a * q->width + p->out_off;
                T *restrict dst = (T *)p->out + a * size;
                for (int64_t x = 0; x < size; x++) dst[x] += src[x];
            }
        }
}

/* The row pass: threads share the rows of r (edges grouped by row), each summing atom rows into
 * its own copy (n_atoms x width, zeroed; thread 0 into the target itself, zeroed by the caller;
 * no copies when `copies` is 0), then `combine` adds the copies. */
static int NAME(by_rows)(NAME(Job) *q, int64_t n_edges, int64_t n_rows, int threads, int copies, size_t scratch,
                         void (*work)(const void *, int64_t, int64_t, int, void *),
                         void (*combine)(const void *, int64_t, int64_t, int, void *)) {
    int64_t *start = NULL, *order = NULL;
    T *own[MAX_THREADS + 1] = {q->grad_h};
    const size_t bytes = (size_t)q->n_atoms * (size_t)q->width * sizeof(T);
    int status = q->r_row ? group_edges(n_rows, n_edges, q->r_row, &start, &order) : 0;
    q->start = start;
    q->order = order;
    for (int t = 1; copies && t < threads && status == 0; t++)
        if (!(own[t] = calloc(1, bytes > 0 ? bytes : 1))) status = -1;
    q->copies = own;
    Range ranges[MAX_THREADS];
    if (status == 0) {
        even_ranges(ranges, threads, q->r_row ? n_rows : n_edges);
        assign(ranges, threads, q, scratch, work);
        status = in_parallel(ranges, threads);
    }
    if (status == 0 && copies && threads > 1) {
        even_ranges(ranges, threads, q->n_atoms);
        assign(ranges, threads, q, 1, combine);
        status = in_parallel(ranges, threads);
    }
    for (int t = 1; t < threads; t++) free(own[t]);
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

/* The job of a call, and the widest path's channels (scratch per thread: `vectors` of them). */
static NAME(Job) NAME(job)(int64_t n_atoms, int64_t n_paths, const Path *paths, const T *h, int64_t h_s0,
                           int64_t h_s1, const T *r, int64_t r_s0, const int64_t *r_row, const int64_t *i,
                           const int64_t *j) {
    NAME(Job) q;
    memset(&q, 0, sizeof q);
    q.n_atoms = n_atoms;
    q.n_paths = n_paths;
    q.paths = paths;
    q.h = h;
    q.h_s0 = h_s0;
    q.h_s1 = h_s1;
    q.r = r;
    q.r_s0 = r_s0;
    q.r_row = r_row;
    q.i = i;
    q.j = j;
    q.max_C = 1;
    for (int64_t n = 0; n < n_paths; n++)
        if (paths[n].C > q.max_C) q.max_C = paths[n].C;
    return q;
}

int64_t NAME(eqcalc_tp_forward)(int64_t n_atoms, int64_t n_edges, int64_t n_paths, Path *paths,
                                const T *h, int64_t h_s0, int64_t h_s1, const T *r, int64_t r_s0, int64_t n_rows,
                                const int64_t *r_row, const int64_t *i, const int64_t *j, int32_t threads,
                                int64_t private_bytes) {
    if (!indices_in_range(n_atoms, n_edges, i, j, n_rows, r_row)) return -2;
    NAME(Job) job = NAME(job)(n_atoms, n_paths, paths, h, h_s0, h_s1, r, r_s0, r_row, i, j);
    for (int64_t n = 0; n < n_paths; n++) {  /* the paths' outputs side by side in a thread's copy */
        paths[n].out_off = job.width;
        job.width += paths[n].M3 * paths[n].C;
    }
    const int t = thread_count(threads);
    const size_t scratch = (size_t)job.max_C * sizeof(T);
    if (NAME(copies_fit)(t, n_atoms, job.width, private_bytes)) {
        for (int64_t n = 0; n < n_paths; n++)
            memset(paths[n].out, 0, (size_t)(n_atoms * paths[n].M3 * paths[n].C) * sizeof(T));
        return NAME(by_rows)(&job, n_edges, n_rows, t, 1, scratch, NAME(forward_rows), NAME(sum_output_copies));
    }
    return NAME(by_groups)(&job, n_atoms, n_edges, i, t, scratch, NAME(forward_atoms));
}

int64_t NAME(eqcalc_tp_backward)(int64_t n_atoms, int64_t n_edges, int64_t n_paths, const Path *paths,
                                 const T *h, int64_t h_s0, int64_t h_s1, const T *r, int64_t r_s0, int64_t n_rows,
                                 const int64_t *r_row, const int64_t *i, const int64_t *j, T *grad_h,
                                 int64_t gh_s0, int64_t gh_s1, T *grad_r, int64_t gr_s0, int32_t threads,
                                 int64_t private_bytes) {
    if (!indices_in_range(n_atoms, n_edges, i, j, n_rows, r_row)) return -2;
    NAME(Job) job = NAME(job)(n_atoms, n_paths, paths, h, h_s0, h_s1, r, r_s0, r_row, i, j);
    job.grad_h = grad_h;
    job.width = gh_s0;
    job.gh_s1 = gh_s1;
    job.grad_r = job.grad_r_edges = grad_r;
    job.gr_s0 = gr_s0;
    const int t = thread_count(threads);
    const size_t scratch = (size_t)(2 * job.max_C) * sizeof(T);
    if (!grad_h || NAME(copies_fit)(t, n_atoms, gh_s0, private_bytes)) {
        if (grad_h) memset(grad_h, 0, (size_t)(n_atoms * gh_s0) * sizeof(T));
        return NAME(by_rows)(&job, n_edges, n_rows, t, grad_h != NULL, scratch, NAME(backward_rows),
                             NAME(sum_copies));
    }
    T *edges = NULL;
    if (grad_r && r_row) {  /* rows shared by edges that different threads own: per edge first */
        edges = malloc((size_t)(n_edges > 0 ? n_edges : 1) * (size_t)(gr_s0 > 0 ? gr_s0 : 1) * sizeof(T));
        if (!edges) return -1;
        job.grad_r_edges = edges;
    }
    int status = NAME(by_groups)(&job, n_atoms, n_edges, j, t, scratch, NAME(backward_atoms));
    if (status == 0 && edges)  /* dL/dr per row: the sum of its edges' */
        status = NAME(by_groups)(&job, n_rows, n_edges, r_row, t, 1, NAME(sum_edge_rows));
    free(edges);
    return status;
}

#undef LANES

/* The channel-wise ("uvu") edge tensor product of potentials.o3.EdgeTensorProduct, one path at a
 * time, as one pass over the edges: gather the neighbour's features, weight them, fold them with
 * the edge's (harmonics x Clebsch-Gordan) matrix and sum them into the centre atom, without the
 * per-edge tensors (n_edges, 2l+1, channels) that the same sum in torch operations writes and
 * reads back several times (gather, weight, batched matmul, index_add, and as many again in the
 * backward pass).
 *
 *   out[i, m3, c] = sum over edges e = (i, j) of r[e, c] * sum_m1 F[e, m3, m1] * h[j, m1, c]
 *
 * F (n_edges, M3, M1) contiguous: the edge's harmonics folded with the coupling coefficients (made
 * in torch, small). h (n_atoms, M1, C) with row strides h_s0, h_s1 and unit channel stride; r
 * (n_edges, C) with row stride r_s0; i, j (n_edges,) int64; out (n_atoms, M3, C) contiguous.
 * The backward pass takes g = dL/d out (n_atoms, M3, C) contiguous and writes, where its pointer
 * is not NULL, dL/dh (n_atoms, M1, C), dL/dF (n_edges, M3, M1), dL/dr (n_edges, C), contiguous.
 *
 * Plain C, no Python or torch headers, loaded with ctypes (eqcalc/_native/__init__.py). Threads:
 * the atoms are cut into `threads` ranges of equal edge counts; each thread owns its atoms'
 * output rows (edges sorted by centre for the forward pass, by neighbour for dL/dh), so no two
 * threads write the same row and the sums come out in one fixed order: the same result for any
 * thread count. Returns 0, -1 when memory runs out, -2 for an atom index outside 0..n_atoms-1.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64
/* Memory for per-thread copies of dL/dh (bytes): above it, dL/dh is summed atom by atom. */
#define PRIVATE_BYTES ((size_t)256 << 20)

/* AVX2 + FMA where the CPU has them, chosen when the library loads; plain SSE2 otherwise. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define CLONES
#endif
/* A dot product summed in vector lanes (built with -fopenmp-simd: no OpenMP runtime). */
#define SIMD_SUM _Pragma("omp simd reduction(+:s)")

/* Edges grouped by key (stable counting sort): the edges of atom a are
 * order[start[a]] .. order[start[a+1]-1]. Checks both index arrays. */
static int group_edges(int64_t n_atoms, int64_t n_edges, const int64_t *key, const int64_t *other,
                       int64_t *start, int64_t *order) {
    memset(start, 0, (size_t)(n_atoms + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < n_edges; e++) {
        if (key[e] < 0 || key[e] >= n_atoms || other[e] < 0 || other[e] >= n_atoms) return -2;
        start[key[e] + 1]++;
    }
    for (int64_t a = 0; a < n_atoms; a++) start[a + 1] += start[a];
    int64_t *next = malloc((size_t)(n_atoms + 1) * sizeof(int64_t));
    if (!next) return -1;
    memcpy(next, start, (size_t)(n_atoms + 1) * sizeof(int64_t));
    for (int64_t e = 0; e < n_edges; e++) order[next[key[e]]++] = e;
    free(next);
    return 0;
}

/* A thread's share: atoms (or edges) first..stop-1, and its own block of scratch memory. */
typedef struct {
    int64_t first, stop;
    int index;
    const void *job;
    void (*work)(const void *job, int64_t first, int64_t stop, int index, void *scratch);
    size_t scratch_bytes;
    int status;
} Range;

static void *run_range(void *p) {
    Range *r = p;
    void *scratch = malloc(r->scratch_bytes);
    if (!scratch) { r->status = -1; return NULL; }
    r->work(r->job, r->first, r->stop, r->index, scratch);
    free(scratch);
    r->status = 0;
    return NULL;
}

/* Run work on each range, ranges[0] in this thread. */
static int in_parallel(Range *ranges, int threads) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    for (int t = 1; t < threads; t++)
        started[t] = pthread_create(&ids[t], NULL, run_range, &ranges[t]) == 0;
    run_range(&ranges[0]);
    for (int t = 1; t < threads; t++) {
        if (started[t]) pthread_join(ids[t], NULL);
        else run_range(&ranges[t]);  /* no thread to be had: do it here */
    }
    for (int t = 0; t < threads; t++)
        if (ranges[t].status != 0) return -1;
    return 0;
}

static int thread_count(int threads, int64_t n_edges) {
    if (n_edges < 4096) return 1;  /* a thread start costs more than a small pass */
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* Atoms cut into `threads` ranges of ~equal edge counts (start: edges grouped by atom). */
static void atom_ranges(Range *ranges, int threads, int64_t n_atoms, const int64_t *start) {
    int64_t atom = 0, n_edges = start[n_atoms];
    for (int t = 0; t < threads; t++) {
        int64_t target = n_edges * (t + 1) / threads, stop = atom;
        while (stop < n_atoms && (t == threads - 1 || start[stop + 1] <= target)) stop++;
        ranges[t].first = atom;
        ranges[t].stop = stop;
        atom = stop;
    }
}

#define DEFINE_KERNELS(T, SUFFIX)                                                                                                \
typedef struct {                                                                                                                 \
    int64_t n_atoms, M1, M3, C, h_s0, h_s1, r_s0;                                                                                \
    const T *h, *F, *r, *g;                                                                                                      \
    const int64_t *i, *j, *start, *order;                                                                                        \
    T *out, *grad_h, *grad_F, *grad_r;                                                                                           \
    T **private_h;  /* per-thread dL/dh of the edge-order backward pass (index 0: grad_h itself) */                              \
} Job##SUFFIX;                                                                                                                   \
                                                                                                                                 \
/* Output rows of atoms first..stop-1: out[a] = sum over the edges whose centre is a. */                                         \
CLONES static void forward_rows##SUFFIX(const void *p, int64_t first, int64_t stop, int index, void *scratch) {                  \
    const Job##SUFFIX *q = p;                                                                                                    \
    const int64_t M1 = q->M1, M3 = q->M3, C = q->C;                                                                              \
    T *restrict tmp = scratch;                                                                                                   \
    (void)index;                                                                                                                 \
    for (int64_t a = first; a < stop; a++) {                                                                                     \
        T *restrict o = q->out + a * M3 * C;                                                                                     \
        memset(o, 0, (size_t)(M3 * C) * sizeof(T));                                                                              \
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) {                                                                \
            const int64_t e = q->order[k];                                                                                       \
            const T *restrict hj = q->h + q->j[e] * q->h_s0;                                                                     \
            const T *restrict re = q->r + e * q->r_s0;                                                                           \
            const T *restrict Fe = q->F + e * M3 * M1;                                                                           \
            for (int64_t m1 = 0; m1 < M1; m1++) {                                                                                \
                const T *restrict hm = hj + m1 * q->h_s1;                                                                        \
                for (int64_t c = 0; c < C; c++) tmp[c] = hm[c] * re[c];                                                          \
                for (int64_t m3 = 0; m3 < M3; m3++) {                                                                            \
                    const T f = Fe[m3 * M1 + m1];                                                                                \
                    T *restrict om = o + m3 * C;                                                                                 \
                    for (int64_t c = 0; c < C; c++) om[c] += f * tmp[c];                                                         \
                }                                                                                                                \
            }                                                                                                                    \
        }                                                                                                                        \
    }                                                                                                                            \
}                                                                                                                                \
                                                                                                                                 \
/* The backward pass of one edge: dL/dF[e], dL/dr[e], and dL/dh[j] += into gh (NULL: not needed). */                             \
CLONES static inline void backward_edge##SUFFIX(const Job##SUFFIX *q, int64_t e, T *restrict gh, T *restrict t, T *restrict u) { \
    const int64_t M1 = q->M1, M3 = q->M3, C = q->C;                                                                              \
    const T *restrict gi = q->g + q->i[e] * M3 * C;                                                                              \
    const T *restrict hj = q->h + q->j[e] * q->h_s0;                                                                             \
    const T *restrict re = q->r + e * q->r_s0;                                                                                   \
    const T *restrict Fe = q->F + e * M3 * M1;                                                                                   \
    T *restrict gr = q->grad_r ? q->grad_r + e * C : NULL;                                                                       \
    if (gh || gr) {                                                                                                              \
        if (gr) memset(gr, 0, (size_t)C * sizeof(T));                                                                            \
        for (int64_t m1 = 0; m1 < M1; m1++) {                                                                                    \
            for (int64_t c = 0; c < C; c++) t[c] = 0;                                                                            \
            for (int64_t m3 = 0; m3 < M3; m3++) {                                                                                \
                const T f = Fe[m3 * M1 + m1];                                                                                    \
                const T *restrict gm = gi + m3 * C;                                                                              \
                for (int64_t c = 0; c < C; c++) t[c] += f * gm[c];                                                               \
            }                                                                                                                    \
            if (gh) {                                                                                                            \
                T *restrict ghm = gh + m1 * C;                                                                                   \
                for (int64_t c = 0; c < C; c++) ghm[c] += re[c] * t[c];                                                          \
            }                                                                                                                    \
            if (gr) {                                                                                                            \
                const T *restrict hm = hj + m1 * q->h_s1;                                                                        \
                for (int64_t c = 0; c < C; c++) gr[c] += t[c] * hm[c];                                                           \
            }                                                                                                                    \
        }                                                                                                                        \
    }                                                                                                                            \
    if (q->grad_F) {                                                                                                             \
        T *restrict gF = q->grad_F + e * M3 * M1;                                                                                \
        for (int64_t m3 = 0; m3 < M3; m3++) {                                                                                    \
            const T *restrict gm = gi + m3 * C;                                                                                  \
            for (int64_t c = 0; c < C; c++) u[c] = gm[c] * re[c];                                                                \
            for (int64_t m1 = 0; m1 < M1; m1++) {                                                                                \
                const T *restrict hm = hj + m1 * q->h_s1;                                                                        \
                T s = 0;                                                                                                         \
                SIMD_SUM for (int64_t c = 0; c < C; c++) s += u[c] * hm[c];                                                               \
                gF[m3 * M1 + m1] = s;                                                                                            \
            }                                                                                                                    \
        }                                                                                                                        \
    }                                                                                                                            \
}                                                                                                                                \
                                                                                                                                 \
/* Edges first..stop-1 in storage order (streaming through r, F and their gradients); dL/dh into                                 \
 * this thread's own copy. */                                                                                                    \
CLONES static void backward_edges##SUFFIX(const void *p, int64_t first, int64_t stop, int index, void *scratch) {                \
    const Job##SUFFIX *q = p;                                                                                                    \
    T *t = scratch, *u = t + q->C, *gh = q->grad_h ? q->private_h[index] : NULL;                                                 \
    const int64_t row = q->M1 * q->C;                                                                                            \
    for (int64_t e = first; e < stop; e++) backward_edge##SUFFIX(q, e, gh ? gh + q->j[e] * row : NULL, t, u);                    \
}                                                                                                                                \
                                                                                                                                 \
/* dL/dh rows of atoms first..stop-1: the sum of the threads' copies, in thread order. */                                        \
static void sum_private##SUFFIX(const void *p, int64_t first, int64_t stop, int index, void *scratch) {                          \
    const Job##SUFFIX *q = p;                                                                                                    \
    const int64_t row = q->M1 * q->C;                                                                                            \
    (void)index; (void)scratch;                                                                                                  \
    for (int k = 1; q->private_h[k]; k++) {                                                                                      \
        const T *restrict src = q->private_h[k] + first * row;                                                                   \
        T *restrict dst = q->grad_h + first * row;                                                                               \
        for (int64_t x = 0; x < (stop - first) * row; x++) dst[x] += src[x];                                                     \
    }                                                                                                                            \
}                                                                                                                                \
                                                                                                                                 \
/* dL/dh rows of atoms first..stop-1 as neighbours (edges grouped by j): no per-thread copies. */                                \
CLONES static void backward_rows##SUFFIX(const void *p, int64_t first, int64_t stop, int index, void *scratch) {                 \
    const Job##SUFFIX *q = p;                                                                                                    \
    T *t = scratch, *u = t + q->C;                                                                                               \
    const int64_t row = q->M1 * q->C;                                                                                            \
    (void)index;                                                                                                                 \
    for (int64_t a = first; a < stop; a++) {                                                                                     \
        T *gh = q->grad_h + a * row;                                                                                             \
        memset(gh, 0, (size_t)row * sizeof(T));                                                                                  \
        for (int64_t k = q->start[a]; k < q->start[a + 1]; k++) backward_edge##SUFFIX(q, q->order[k], gh, t, u);                 \
    }                                                                                                                            \
}                                                                                                                                \
                                                                                                                                 \
/* Group the edges by key, cut the atoms into ranges of equal edge counts, run work on them. */                                  \
static int64_t by_atom##SUFFIX(Job##SUFFIX *q, int64_t n_edges, const int64_t *key, const int64_t *other, int threads,           \
                       size_t scratch, void (*work)(const void *, int64_t, int64_t, int, void *)) {                              \
    int64_t *start = malloc((size_t)(q->n_atoms + 1) * sizeof(int64_t));                                                         \
    int64_t *order = malloc((size_t)(n_edges > 0 ? n_edges : 1) * sizeof(int64_t));                                              \
    int status = (start && order) ? group_edges(q->n_atoms, n_edges, key, other, start, order) : -1;                             \
    if (status == 0) {                                                                                                           \
        Range ranges[MAX_THREADS];                                                                                               \
        q->start = start;                                                                                                        \
        q->order = order;                                                                                                        \
        threads = thread_count(threads, n_edges);                                                                                \
        atom_ranges(ranges, threads, q->n_atoms, start);                                                                         \
        for (int t = 0; t < threads; t++)                                                                                        \
            ranges[t] = (Range){ranges[t].first, ranges[t].stop, t, q, work, scratch, -1};                                       \
        status = in_parallel(ranges, threads);                                                                                   \
    }                                                                                                                            \
    free(start);                                                                                                                 \
    free(order);                                                                                                                 \
    return status;                                                                                                               \
}                                                                                                                                \
                                                                                                                                 \
int64_t eqcalc_tp_forward##SUFFIX(int64_t n_atoms, int64_t n_edges, int64_t M1, int64_t M3, int64_t C,                           \
                          const T *h, int64_t h_s0, int64_t h_s1, const T *F, const T *r,                                        \
                          int64_t r_s0, const int64_t *i, const int64_t *j, T *out, int32_t threads) {                           \
    Job##SUFFIX job = {n_atoms, M1, M3, C, h_s0, h_s1, r_s0, h, F, r, NULL, i, j, NULL, NULL, out, NULL, NULL, NULL, NULL};      \
    return by_atom##SUFFIX(&job, n_edges, i, j, threads, (size_t)(C > 0 ? C : 1) * sizeof(T), forward_rows##SUFFIX);             \
}                                                                                                                                \
                                                                                                                                 \
int64_t eqcalc_tp_backward##SUFFIX(int64_t n_atoms, int64_t n_edges, int64_t M1, int64_t M3, int64_t C,                          \
                           const T *h, int64_t h_s0, int64_t h_s1, const T *F, const T *r,                                       \
                           int64_t r_s0, const int64_t *i, const int64_t *j, const T *g,                                         \
                           T *grad_h, T *grad_F, T *grad_r, int32_t threads) {                                                   \
    Job##SUFFIX job = {n_atoms, M1, M3, C, h_s0, h_s1, r_s0, h, F, r, g, i, j, NULL, NULL, NULL, grad_h, grad_F, grad_r, NULL};  \
    const size_t scratch = (size_t)(2 * (C > 0 ? C : 1)) * sizeof(T), row = (size_t)(M1 * C) * sizeof(T);                        \
    const int n = thread_count(threads, n_edges);                                                                                \
    if (grad_h && n > 1 && (size_t)n * (size_t)n_atoms * row > PRIVATE_BYTES)                                                    \
        return by_atom##SUFFIX(&job, n_edges, j, i, threads, scratch, backward_rows##SUFFIX);                                    \
    /* Edges in storage order, each thread summing dL/dh into its own copy (the neighbours j of                                  \
     * an edge range are scattered: grouping the edges by j would read r and F out of order). */                                 \
    for (int64_t e = 0; e < n_edges; e++)                                                                                        \
        if (i[e] < 0 || i[e] >= n_atoms || j[e] < 0 || j[e] >= n_atoms) return -2;                                               \
    T *private_h[MAX_THREADS + 1] = {grad_h};                                                                                    \
    int status = 0;                                                                                                              \
    if (grad_h) {                                                                                                                \
        memset(grad_h, 0, (size_t)n_atoms * row);                                                                                \
        for (int t = 1; t < n; t++)                                                                                              \
            if (!(private_h[t] = calloc((size_t)n_atoms, row))) status = -1;                                                     \
    }                                                                                                                            \
    job.private_h = private_h;                                                                                                   \
    Range ranges[MAX_THREADS];                                                                                                   \
    if (status == 0) {                                                                                                           \
        for (int t = 0; t < n; t++)                                                                                              \
            ranges[t] = (Range){n_edges * t / n, n_edges * (t + 1) / n, t, &job, backward_edges##SUFFIX, scratch, -1};           \
        status = in_parallel(ranges, n);                                                                                         \
    }                                                                                                                            \
    if (status == 0 && grad_h && n > 1) {                                                                                        \
        for (int t = 0; t < n; t++)                                                                                              \
            ranges[t] = (Range){n_atoms * t / n, n_atoms * (t + 1) / n, t, &job, sum_private##SUFFIX, 1, -1};                    \
        status = in_parallel(ranges, n);                                                                                         \
    }                                                                                                                            \
    for (int t = 1; t < n; t++) free(private_h[t]);                                                                              \
    return status;                                                                                                               \
}

DEFINE_KERNELS(float, _f32)
DEFINE_KERNELS(double, _f64)

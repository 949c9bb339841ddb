/* The channel-wise ("uvu") edge tensor product of potentials.o3.EdgeTensorProduct, all paths of a
 * layer in one pass over the edges: gather the neighbour's features, weight them, fold them with
 * the edge's (harmonics x Clebsch-Gordan) matrix and sum them into the centre atom, without the
 * per-edge tensors (n_edges, 2l+1, channels) that the same sum in torch operations writes and
 * reads back several times (gather, weight, batched matmul, index_add, and as many again in the
 * backward pass). Per path p:
 *
 *   out_p[i, m3, c] = sum over edges e = (i, j) of r[row(e), off_p + c] * sum_m1 F_p[e, m3, m1] * h[j, b_p + m1, c]
 *
 * h (n_atoms, components, channels) with row strides h_s0, h_s1 and unit channel stride: path p
 * reads M1 components from h_off = b_p * h_s1 on, C channels; r (n_rows, columns) with row
 * stride r_s0, path p reading columns r_off..r_off+C-1, edge e reading row r_row[e] (r_row NULL:
 * n_rows = n_edges, row e; else the radial weights are made once per pair of reverse edges and
 * both read one row); F_p (n_edges, M3, M1) contiguous: the edge's harmonics folded with the
 * coupling coefficients (made in torch, small); i, j (n_edges,) int64; out_p (n_atoms, M3, C)
 * contiguous. The backward pass takes g_p = dL/d out_p (n_atoms, M3, C) contiguous and writes,
 * where its pointer is not NULL, dL/dh (n_atoms, components, channels) contiguous with row
 * stride gh_s0 and component stride gh_s1 (path p adding into gh_off on; channels no path reads
 * stay zero), dL/dF_p (n_edges, M3, M1) and dL/dr (n_rows, gr_s0) contiguous, path p writing its
 * columns. One call does every path of a layer: the edges are checked, grouped and visited once
 * and each row of r is read once for all paths. Paths of degrees l1, l3 <= 3 run loops of their
 * own shape (FIXED_SHAPES) with the channels outermost: an atom's row is loaded and stored once
 * per edge, not once per m1, and the backward pass makes dL/dh, dL/dr and dL/dF in one sweep
 * (1.2-2.5x faster than the generic loops at 108 atoms, which remain for larger l).
 *
 * Plain C, no Python or torch headers, loaded with ctypes (eqcalc/_native/__init__.py); built
 * twice, for the baseline CPU and with AVX2 + FMA (which the loader takes where the CPU has them:
 * ~1.5x faster; per-function target clones measured slower, the helpers not inlined). Threads:
 * OpenMP, `threads` of them. The library needs libgomp.so.1, which the dynamic loader resolves to
 * the copy torch has already loaded, so the kernels run on torch's own thread pool (pthreads of
 * their own measured slower on 2 cores: torch's idle threads spin while they start). They share
 * the rows of r: each streams through its rows (the large
 * array, read once however many edges share a row) and their edges, summing the atoms' rows (out,
 * or dL/dh) into a copy of its own; the copies are then added in thread order (the same numbers
 * for the same thread count). Where the copies would take more than `private_bytes`, each
 * thread instead owns a range of atoms and sums their edges (grouped by centre for out, by
 * neighbour for dL/dh): no copies, r read out of order, slower. Returns 0, -1 when memory runs
 * out, -2 for an atom index outside 0..n_atoms-1 or a row outside 0..n_rows-1.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_THREADS 64

/* One path of a layer; the pointers are to the layer's float type. ctypes mirrors this layout
 * (potentials/fused.py: eleven 8-byte fields). */
typedef struct {
    int64_t M1, M3, C;   /* input components (2 l1 + 1), output components (2 l3 + 1), channels */
    int64_t h_off;       /* first element of the path's block in an atom's row of h */
    int64_t gh_off;      /* the same in an atom's row of dL/dh */
    int64_t r_off;       /* first column of the path's weights in a row of r (and of dL/dr) */
    int64_t out_off;     /* first element of the path's output in an atom's row of a thread's copy
                          * (set by the forward pass) */
    const void *F;       /* (n_edges, M3, M1) */
    void *out;           /* (n_atoms, M3, C) */
    const void *g;       /* dL/d out (n_atoms, M3, C) */
    void *grad_F;        /* (n_edges, M3, M1) or NULL */
} Path;

/* The (M1, M3) = (2 l1 + 1, 2 l3 + 1) of l <= 3 that get loops of their own (F(M1, M3) each). */
#ifndef FIXED_SHAPES  /* (-D'FIXED_SHAPES(F)=': the generic loops alone, to compare) */
#define FIXED_SHAPES(F) F(1, 1) F(1, 3) F(1, 5) F(1, 7) F(3, 1) F(3, 3) F(3, 5) F(3, 7) \
                        F(5, 1) F(5, 3) F(5, 5) F(5, 7) F(7, 1) F(7, 3) F(7, 5) F(7, 7)
#endif

/* The build's vector registers (AVX: 32 bytes, baseline x86-64 SSE2: 16). */
#ifdef __AVX__
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif

/* A dot product summed in vector lanes (the order of its terms is the build's, fixed). */
#define SIMD_SUM _Pragma("omp simd reduction(+:s)")

/* Every atom index inside 0..n_atoms-1 and every row inside 0..n_rows-1 (r_row NULL: none). */
static int indices_in_range(int64_t n_atoms, int64_t n_edges, const int64_t *i, const int64_t *j,
                            int64_t n_rows, const int64_t *r_row) {
    for (int64_t e = 0; e < n_edges; e++) {
        if (i[e] < 0 || i[e] >= n_atoms || j[e] < 0 || j[e] >= n_atoms) return 0;
        if (r_row && (r_row[e] < 0 || r_row[e] >= n_rows)) return 0;
    }
    return 1;
}

/* Edges grouped by key (stable counting sort; keys checked before): group g holds edges
 * order[start[g]] .. order[start[g+1]-1], both arrays allocated here for the caller to free
 * (also on failure). Returns 0, or -1 when memory runs out. */
static int group_edges(int64_t n_groups, int64_t n_edges, const int64_t *key, int64_t **start_out,
                       int64_t **order_out) {
    int64_t *start = calloc((size_t)(n_groups + 1), sizeof(int64_t));
    int64_t *order = malloc((size_t)(n_edges > 0 ? n_edges : 1) * sizeof(int64_t));
    int64_t *next = malloc((size_t)(n_groups + 1) * sizeof(int64_t));
    *start_out = start;
    *order_out = order;
    if (!start || !order || !next) {
        free(next);
        return -1;
    }
    for (int64_t e = 0; e < n_edges; e++) start[key[e] + 1]++;
    for (int64_t g = 0; g < n_groups; g++) start[g + 1] += start[g];
    memcpy(next, start, (size_t)(n_groups + 1) * sizeof(int64_t));
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

static void run_range(Range *r) {
    void *scratch = malloc(r->scratch_bytes);
    if (!scratch) { r->status = -1; return; }
    r->work(r->job, r->first, r->stop, r->index, scratch);
    free(scratch);
    r->status = 0;
}

/* Run work on each range, one OpenMP thread each. */
static int in_parallel(Range *ranges, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; t++) run_range(&ranges[t]);
    for (int t = 0; t < threads; t++)
        if (ranges[t].status != 0) return -1;
    return 0;
}

static int thread_count(int threads) {
    return threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* Groups cut into `threads` ranges of ~equal edge counts (start: edges grouped). */
static void group_ranges(Range *ranges, int threads, int64_t n_groups, const int64_t *start) {
    int64_t group = 0, n_edges = start[n_groups];
    for (int t = 0; t < threads; t++) {
        int64_t target = n_edges * (t + 1) / threads, stop = group;
        while (stop < n_groups && (t == threads - 1 || start[stop + 1] <= target)) stop++;
        ranges[t].first = group;
        ranges[t].stop = stop;
        group = stop;
    }
}

/* 0..n-1 cut into `threads` equal ranges. */
static void even_ranges(Range *ranges, int threads, int64_t n) {
    for (int t = 0; t < threads; t++) {
        ranges[t].first = n * t / threads;
        ranges[t].stop = n * (t + 1) / threads;
    }
}

/* Each range's thread, work and scratch. */
static void assign(Range *ranges, int threads, const void *job, size_t scratch_bytes,
                   void (*work)(const void *, int64_t, int64_t, int, void *)) {
    for (int t = 0; t < threads; t++)
        ranges[t] = (Range){ranges[t].first, ranges[t].stop, t, job, work, scratch_bytes, -1};
}

#define T float
#define NAME(x) x##_f32
#include "tensor_product_body.h"
#undef T
#undef NAME

#define T double
#define NAME(x) x##_f64
#include "tensor_product_body.h"
#undef T
#undef NAME

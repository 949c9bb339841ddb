/* Cell-list neighbor search for one system: the CPU fast path of eqcalc.neighbors.
 *
 * Plain C with no Python or torch headers; loaded with ctypes. The Python side wraps positions
 * into the cell, assigns every atom its bin (bins[n*3]) and the search range m[3] (bins per
 * direction to look at on each side), so this file only sorts atoms into bins and scans the
 * neighbour bins. Periodic directions wrap bin indices and produce cell shifts; open directions
 * do not. Pairs come out sorted by the centre atom i.
 *
 * `wrap` (n*3, or NULL) is each atom's wrap: the caller moved atom a by -wrap[a] @ cell, and
 * the shifts written are for the unwrapped positions: s - wrap[j] + wrap[i]. Atom indices are
 * written plus `offset` (the system's first atom in a batch).
 *
 * Returns the number of pairs |r_ij| < cutoff; writes at most `capacity` of them into
 * out_i, out_j, out_shift (3 per pair). The caller retries with a larger buffer when the
 * return value exceeds capacity. Returns -1 when memory runs out.
 */
#include <stdint.h>
#include <stdlib.h>

static int64_t floordiv(int64_t a, int64_t b) {
    int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

int64_t eqcalc_cell_list(int64_t n, const double *pos, const int64_t *bins, const double *cell,
                         const int32_t *periodic, const int64_t *nbins, const int64_t *m,
                         const int64_t *wrap, int64_t offset,
                         double cutoff, int32_t self_interaction, int64_t capacity,
                         int64_t *out_i, int64_t *out_j, int64_t *out_shift) {
    const int64_t n0 = nbins[0], n1 = nbins[1], n2 = nbins[2];
    const int64_t total = n0 * n1 * n2;
    const double cut2 = cutoff * cutoff;
    int64_t *start = calloc((size_t)total + 1, sizeof(int64_t));
    int64_t *order = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    int64_t *lin = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    double *sorted = malloc((size_t)(n > 0 ? n : 1) * 3 * sizeof(double));
    if (!start || !order || !lin || !sorted) {
        free(start); free(order); free(lin); free(sorted);
        return -1;
    }
    /* counting sort of atoms by linear bin index; positions copied in bin order for locality */
    for (int64_t a = 0; a < n; a++) {
        lin[a] = (bins[3 * a] * n1 + bins[3 * a + 1]) * n2 + bins[3 * a + 2];
        start[lin[a] + 1]++;
    }
    for (int64_t b = 0; b < total; b++) start[b + 1] += start[b];
    {
        int64_t *fill = malloc((size_t)(total > 0 ? total : 1) * sizeof(int64_t));
        if (!fill) { free(start); free(order); free(lin); free(sorted); return -1; }
        for (int64_t b = 0; b < total; b++) fill[b] = start[b];
        for (int64_t a = 0; a < n; a++) {
            int64_t k = fill[lin[a]]++;
            order[k] = a;
            sorted[3 * k] = pos[3 * a]; sorted[3 * k + 1] = pos[3 * a + 1]; sorted[3 * k + 2] = pos[3 * a + 2];
        }
        free(fill);
    }
    int64_t count = 0;
    for (int64_t i = 0; i < n; i++) {
        const double xi = pos[3 * i], yi = pos[3 * i + 1], zi = pos[3 * i + 2];
        const int64_t b0 = bins[3 * i], b1 = bins[3 * i + 1], b2 = bins[3 * i + 2];
        for (int64_t d0 = -m[0]; d0 <= m[0]; d0++) {
            int64_t t0 = b0 + d0, s0 = 0;
            if (periodic[0]) { s0 = floordiv(t0, n0); t0 -= s0 * n0; }
            else if (t0 < 0 || t0 >= n0) continue;
            for (int64_t d1 = -m[1]; d1 <= m[1]; d1++) {
                int64_t t1 = b1 + d1, s1 = 0;
                if (periodic[1]) { s1 = floordiv(t1, n1); t1 -= s1 * n1; }
                else if (t1 < 0 || t1 >= n1) continue;
                for (int64_t d2 = -m[2]; d2 <= m[2]; d2++) {
                    int64_t t2 = b2 + d2, s2 = 0;
                    if (periodic[2]) { s2 = floordiv(t2, n2); t2 -= s2 * n2; }
                    else if (t2 < 0 || t2 >= n2) continue;
                    /* r_ij = pos[j] - pos[i] + s @ cell */
                    const double ox = s0 * cell[0] + s1 * cell[3] + s2 * cell[6] - xi;
                    const double oy = s0 * cell[1] + s1 * cell[4] + s2 * cell[7] - yi;
                    const double oz = s0 * cell[2] + s1 * cell[5] + s2 * cell[8] - zi;
                    const int64_t b = (t0 * n1 + t1) * n2 + t2;
                    const int zero_shift = (s0 == 0 && s1 == 0 && s2 == 0);
                    for (int64_t k = start[b]; k < start[b + 1]; k++) {
                        const double dx = sorted[3 * k] + ox, dy = sorted[3 * k + 1] + oy,
                                     dz = sorted[3 * k + 2] + oz;
                        const double d2sq = dx * dx + dy * dy + dz * dz;
                        if (d2sq >= cut2) continue;
                        const int64_t j = order[k];
                        if (j == i && zero_shift && !self_interaction) continue;
                        if (count < capacity) {
                            int64_t *o = out_shift + 3 * count;
                            out_i[count] = i + offset; out_j[count] = j + offset;
                            o[0] = s0; o[1] = s1; o[2] = s2;
                            if (wrap) {
                                o[0] += wrap[3 * i] - wrap[3 * j];
                                o[1] += wrap[3 * i + 1] - wrap[3 * j + 1];
                                o[2] += wrap[3 * i + 2] - wrap[3 * j + 2];
                            }
                        }
                        count++;
                    }
                }
            }
        }
    }
    free(start); free(order); free(lin); free(sorted);
    return count;
}

/* The unordered pairs of a neighbor list (eqcalc.neighbors.edge_pairs): edges (i, j, S) and
 * (j, i, -S) are one pair. Each edge is oriented (a, b, s): a < b, or a == b and s > 0
 * lexicographically; pairs are numbered in the order of (a, b, s) (edges counting-sorted by a,
 * then each atom's few sorted by (b, s)), first[p] is the lowest edge of pair p and pair[e] the
 * pair of edge e. shifts (n_edges x 3) hold integer values as doubles. Returns the number of
 * pairs, -1 when memory runs out, -2 for an atom index outside 0..n_atoms-1. */
typedef struct {
    int64_t b, s[3], e;
} PairKey;

static int compare_pair_keys(const void *x, const void *y) {
    const PairKey *p = x, *q = y;
    if (p->b != q->b) return p->b < q->b ? -1 : 1;
    for (int d = 0; d < 3; d++)
        if (p->s[d] != q->s[d]) return p->s[d] < q->s[d] ? -1 : 1;
    return p->e < q->e ? -1 : p->e > q->e;
}

int64_t eqcalc_edge_pairs(int64_t n_atoms, int64_t n_edges, const int64_t *i, const int64_t *j,
                          const double *shifts, int64_t *pair, int64_t *first) {
    for (int64_t e = 0; e < n_edges; e++)
        if (i[e] < 0 || i[e] >= n_atoms || j[e] < 0 || j[e] >= n_atoms) return -2;
    int64_t *start = calloc((size_t)(n_atoms + 1), sizeof(int64_t));
    int64_t *next = malloc((size_t)(n_atoms + 1) * sizeof(int64_t));
    int64_t *owner = malloc((size_t)(n_edges > 0 ? n_edges : 1) * sizeof(int64_t));
    PairKey *keys = malloc((size_t)(n_edges > 0 ? n_edges : 1) * sizeof(PairKey));
    PairKey *sorted = malloc((size_t)(n_edges > 0 ? n_edges : 1) * sizeof(PairKey));
    if (!start || !next || !owner || !keys || !sorted) {
        free(start); free(next); free(owner); free(keys); free(sorted);
        return -1;
    }
    for (int64_t e = 0; e < n_edges; e++) {
        int64_t s[3], sign = 0;
        for (int d = 0; d < 3; d++) {
            s[d] = (int64_t)(shifts[3 * e + d] < 0 ? shifts[3 * e + d] - 0.5 : shifts[3 * e + d] + 0.5);
            if (sign == 0) sign = (s[d] > 0) - (s[d] < 0);
        }
        const int flip = i[e] > j[e] || (i[e] == j[e] && sign < 0);
        owner[e] = flip ? j[e] : i[e];
        keys[e].b = flip ? i[e] : j[e];
        for (int d = 0; d < 3; d++) keys[e].s[d] = flip ? -s[d] : s[d];
        keys[e].e = e;
        start[owner[e] + 1]++;
    }
    for (int64_t a = 0; a < n_atoms; a++) start[a + 1] += start[a];
    for (int64_t a = 0; a <= n_atoms; a++) next[a] = start[a];
    for (int64_t e = 0; e < n_edges; e++) sorted[next[owner[e]]++] = keys[e];
    int64_t n_pairs = 0;
    for (int64_t a = 0; a < n_atoms; a++) {
        PairKey *k = sorted + start[a];
        const int64_t count = start[a + 1] - start[a];
        qsort(k, (size_t)count, sizeof(PairKey), compare_pair_keys);
        for (int64_t x = 0; x < count; x++) {
            if (x == 0 || k[x].b != k[x - 1].b || k[x].s[0] != k[x - 1].s[0] || k[x].s[1] != k[x - 1].s[1]
                || k[x].s[2] != k[x - 1].s[2])
                first[n_pairs++] = k[x].e;
            pair[k[x].e] = n_pairs - 1;
        }
    }
    free(start); free(next); free(owner); free(keys); free(sorted);
    return n_pairs;
}

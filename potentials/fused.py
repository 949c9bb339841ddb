"""The paths of the edge tensor product in one pass over the edges, on CPU.

:class:`potentials.o3.EdgeTensorProduct` sums, per path ``l1 ⊗ l2 → l3``,

``out[i, m3, c] = sum_{e=(i,j)} r[row(e), c] sum_m1 F[e, m3, m1] h[j, m1, c]``

(``F`` the edge's harmonics folded with the coupling coefficients; ``r`` the path's radial
weights, a row per edge or one per pair of reverse edges). In torch operations that is a gather
``h[j]``, a weighting, a batched matmul of tiny matrices and an ``index_add``, each writing and
reading a tensor ``(n_edges, 2l+1, channels)``; the backward pass as many again. The compiled
kernel (``eqcalc/_native/tensor_product.c``, on torch's OpenMP threads) does the same sums edge by
edge with the rows in cache, every path of a layer in one call (the edges checked, grouped and
visited once; ``dL/dh`` and ``dL/dr`` written whole, not per block and concatenated):
reproducible for a given thread count, equal to rounding across counts. :func:`edge_products`
uses it for CPU tensors of float32/float64 outside tracing and compilation (TorchScript,
``make_fx``, dynamo, fake tensors: those see the torch form, which is also the reference the
tests compare with).

A second derivative (Hessians, training on forces) differentiates the backward pass: when the
backward runs with ``create_graph``, its gradients are computed with torch operations
(:func:`gradients`), themselves differentiable.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from eqcalc import _native as native
from eqcalc.errors import InvalidAtomsError, SystemTooLargeError

_DTYPES = {torch.float32: "_f32", torch.float64: "_f64"}
#: Memory the kernels may take for per-thread copies of the atoms' sums (the output, or dL/dh;
#: bytes, all threads together); above it (very large systems) each thread owns a range of atoms
#: instead: no copies, slower.
PRIVATE_BYTES = 256 << 20
#: Edges a thread should have before a pass is split (see :func:`threads`). 108 atoms (5842
#: edges) on 2 threads instead of 1: NequIP "S" step 4-11 % faster; fewer edges gain less than
#: a second copy of the atoms' sums costs.
EDGES_PER_THREAD = 2048


def available(h: Tensor) -> bool:
    """Whether :func:`edge_product` can run on tensors like ``h``: the kernel was built, plain CPU
    float32/float64 tensors, not under tracing or compilation."""
    return (native.tensor_product_library() is not None and h.device.type == "cpu" and h.dtype in _DTYPES
            and not traced(h))


def traced(x: Tensor) -> bool:
    """Whether ``x`` is seen by a tracer or compiler (fake tensors of ``make_fx``/export, dynamo,
    functorch's vmap and grad), where only torch operations of fixed shapes may run."""
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return (type(x) is not torch.Tensor or torch.compiler.is_compiling()
            or (is_wrapped is not None and bool(is_wrapped(x))))


def threads(n_edges: int) -> int:
    """Threads for a pass over ``n_edges``: torch's count, one per :data:`EDGES_PER_THREAD` at most
    (starting a thread and adding its copy cost more than a small share saves)."""
    return max(1, min(torch.get_num_threads(), n_edges // EDGES_PER_THREAD))


def _layouts(paths: Sequence[Tuple[int, int, int, int]], h: Tensor, Fs: Sequence[Tensor],
             outs: Sequence[Optional[Tensor]] = (), gs: Sequence[Tensor] = (),
             grad_Fs: Sequence[Optional[Tensor]] = (), gh_s1: int = 0):
    """The C array of paths: ``paths`` ``(first component, M1, C, first column of r)`` per path;
    pointers of the tensors given (all contiguous). ``out_off`` is the kernel's to set."""
    array = (native.PathLayout * len(paths))()
    for n, (b, M1, C, r_off) in enumerate(paths):
        pointers = [x[n].data_ptr() if len(x) and x[n] is not None else None for x in (outs, gs, grad_Fs)]
        array[n] = native.PathLayout(M1, Fs[n].shape[1], C, b * h.stride(1), b * gh_s1, r_off, 0, Fs[n].data_ptr(),
                                     *pointers)
    return array


def _call(name: str, h: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor, layouts, *rest) -> None:
    """One kernel call: ``h`` and ``r`` with unit channel stride, ``row``, ``i``, ``j``
    contiguous (the caller holds every tensor the pointers name until it returns)."""
    lib = native.tensor_product_library()
    status = getattr(lib, name + _DTYPES[h.dtype])(
        h.shape[0], i.shape[0], len(layouts), layouts, h.data_ptr(), h.stride(0), h.stride(1), r.data_ptr(),
        r.stride(0), r.shape[0], 0 if row is None else row.data_ptr(), i.data_ptr(), j.data_ptr(), *rest,
        threads(i.shape[0]), PRIVATE_BYTES)
    if status == -1:
        raise SystemTooLargeError(f"the edge tensor product ran out of memory at {i.shape[0]} edges and "
                                  f"{h.shape[0]} atoms: run fewer atoms per batch")
    if status != 0:
        raise InvalidAtomsError(f"edge_index names an atom outside 0..{h.shape[0] - 1} (or a pair outside "
                                f"0..{r.shape[0] - 1}): the neighbor list does not belong to these atoms; build it "
                                "for them (eqcalc.neighbors.compute_neighbors)")


class _EdgeProducts(torch.autograd.Function):
    """All paths of a layer: ``(h, r, row, i, j, paths, *Fs)`` → one output per path."""

    @staticmethod
    def forward(ctx, h: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor,
                paths: Tuple[Tuple[int, int, int, int], ...], *Fs: Tensor) -> Tuple[Tensor, ...]:
        # the inputs themselves are saved (not copies made here, which would have no graph to
        # differentiate a second time)
        ctx.save_for_backward(h, r, row, i, j, *Fs)
        ctx.paths = paths
        outs = [torch.empty(h.shape[0], F.shape[1], C, dtype=h.dtype) for F, (_, _, C, _) in zip(Fs, paths)]
        _call("eqcalc_tp_forward", h, r, row, i, j, _layouts(paths, h, Fs, outs))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gs: Optional[Tensor]):
        h, r, row, i, j, *Fs = ctx.saved_tensors
        paths = ctx.paths
        gs = [torch.zeros(h.shape[0], F.shape[1], C, dtype=h.dtype) if g is None else g.contiguous()
              for g, F, (_, _, C, _) in zip(gs, Fs, paths)]  # held: the kernel reads them
        need_h, need_r, need_F = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[6:]
        if torch.is_grad_enabled():  # create_graph: these gradients will be differentiated
            grad_h, grad_r, grad_Fs = gradients(h, r, row, i, j, paths, Fs, gs, need_h, need_r, need_F)
            return (grad_h, grad_r, None, None, None, None, *grad_Fs)
        grad_h = torch.empty(h.shape, dtype=h.dtype) if need_h else None
        grad_r = torch.empty(r.shape, dtype=h.dtype) if need_r else None
        grad_Fs = [torch.empty(F.shape, dtype=h.dtype) if need else None for F, need in zip(Fs, need_F)]
        layouts = _layouts(paths, h, Fs, (), gs, grad_Fs, 0 if grad_h is None else grad_h.stride(1))
        _call("eqcalc_tp_backward", h, r, row, i, j, layouts,
              0 if grad_h is None else grad_h.data_ptr(), 0 if grad_h is None else grad_h.stride(0),
              0 if grad_h is None else grad_h.stride(1), 0 if grad_r is None else grad_r.data_ptr(),
              0 if grad_r is None else grad_r.stride(0))
        return (grad_h, grad_r, None, None, None, None, *grad_Fs)


def gradients(h: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor,
              paths: Sequence[Tuple[int, int, int, int]], Fs: Sequence[Tensor], gs: Sequence[Tensor],
              need_h: bool, need_r: bool, need_F: Sequence[bool]):
    """``dL/dh`` (like ``h``), ``dL/dr`` (like ``r``) and per path ``dL/dF`` of
    :func:`edge_products` from ``gs`` (``dL/dout`` per path), in differentiable torch operations
    (``None`` where not needed)."""
    grad_h = torch.zeros_like(h) if need_h else None
    grad_r = torch.zeros_like(r) if need_r else None
    grad_Fs: List[Optional[Tensor]] = []
    for (b, M1, C, r_off), F, g, need in zip(paths, Fs, gs, need_F):
        r_p = r[:, r_off:r_off + C]
        r_e = r_p if row is None else r_p.index_select(0, row)              # (E, C)
        g_i, h_j = g.index_select(0, i), h[:, b:b + M1, :C].index_select(0, j)  # (E, M3, C), (E, M1, C)
        t = torch.bmm(F.transpose(1, 2), g_i) if need_h or need_r else None   # (E, M1, C)
        if need_h:  # the path's block, padded to h's components and channels
            block = torch.zeros(h.shape[0], M1, C, dtype=h.dtype).index_add(0, j, t * r_e.unsqueeze(1))
            grad_h = grad_h + torch.nn.functional.pad(block, (0, h.shape[2] - C, b, h.shape[1] - b - M1))
        grad_Fs.append(torch.bmm(g_i * r_e.unsqueeze(1), h_j.transpose(1, 2)) if need else None)
        if need_r:
            per_edge = (t * h_j).sum(1)
            per_row = per_edge if row is None else torch.zeros_like(r_p).index_add(0, row, per_edge)
            grad_r = grad_r + torch.nn.functional.pad(per_row, (r_off, r.shape[1] - r_off - C))
    return grad_h, grad_r, grad_Fs


def edge_products(h: Tensor, Fs: Sequence[Tensor], r: Tensor, paths: Sequence[Tuple[int, int, int, int]],
                  edge_index: Tensor, row: Optional[Tensor] = None) -> List[Tensor]:
    """Per path ``(b, M1, C, c0)``: ``out (n_atoms, M3, C)``, ``sum_{e=(i,j)} r[row[e], c0:c0+C]
    * (F[e] @ h[j, b:b+M1, :C])``, from ``h (n_atoms, components, channels)``, the path's ``F
    (n_edges, M3, M1)``, ``r (n_rows, columns)``, ``edge_index (2, n_edges)`` (centre ``i``,
    neighbour ``j``) and ``row (n_edges,)`` (``None``: ``r`` has a row per edge; else the rows
    are per pair of reverse edges, :func:`eqcalc.neighbors.edge_pairs`). One kernel call for all
    paths. Needs :func:`available`."""
    for b, M1, C, c0 in paths:
        if not (0 <= b and b + M1 <= h.shape[1] and 0 <= C <= h.shape[2] and 0 <= c0 and c0 + C <= r.shape[1]):
            raise ValueError(f"path {(b, M1, C, c0)} reaches outside h {tuple(h.shape)} or r {tuple(r.shape)}")
    h, r = (x if x.stride(-1) == 1 else x.contiguous() for x in (h, r))
    row = None if row is None else row.contiguous()
    return list(_EdgeProducts.apply(h, r, row, edge_index[0].contiguous(), edge_index[1].contiguous(),
                                    tuple(tuple(int(v) for v in p) for p in paths), *[F.contiguous() for F in Fs]))


def edge_product(h: Tensor, F: Tensor, r: Tensor, edge_index: Tensor, row: Optional[Tensor] = None) -> Tensor:
    """One path: ``out (n_atoms, M3, C)``: ``sum_{e=(i,j)} r[row[e]] * (F[e] @ h[j])`` per
    channel, from ``h (n_atoms, M1, C)``, ``F (n_edges, M3, M1)``, ``r (n_rows, C)`` (see
    :func:`edge_products`)."""
    return edge_products(h, [F], r, [(0, h.shape[1], h.shape[2], 0)], edge_index, row)[0]

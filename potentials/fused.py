"""One path of the edge tensor product in one pass over the edges, on CPU.

:class:`potentials.o3.EdgeTensorProduct` sums, per path ``l1 ⊗ l2 → l3``,

``out[i, m3, c] = sum_{e=(i,j)} r[row(e), c] sum_m1 F[e, m3, m1] h[j, m1, c]``

(``F`` the edge's harmonics folded with the coupling coefficients; ``r`` the radial weights, a
row per edge or one per pair of reverse edges). In torch operations that is a gather ``h[j]``, a
weighting, a batched matmul of tiny matrices and an ``index_add``, each writing and reading a
tensor ``(n_edges, 2l+1, channels)``; the backward pass as many again. The compiled kernel
(``eqcalc/_native/tensor_product.c``, on torch's OpenMP threads) does the same sums edge by edge
with the rows in cache: reproducible for a given thread count, equal to rounding across counts.
:func:`edge_product` uses it for CPU tensors of float32/float64 outside tracing and compilation
(TorchScript, ``make_fx``, dynamo, fake tensors: those see the torch form, which is also the
reference the tests compare with).

A second derivative (Hessians, training on forces) differentiates the backward pass: when the
backward runs with ``create_graph``, its gradients are computed with torch operations
(:func:`gradients`), themselves differentiable.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from eqcalc import _native as native
from eqcalc.errors import InvalidAtomsError, SystemTooLargeError

_DTYPES = {torch.float32: "_f32", torch.float64: "_f64"}
#: Memory the kernels may take for per-thread copies of the atoms' sums (the output, or dL/dh;
#: bytes, all threads together); above it (very large systems) each thread owns a range of atoms
#: instead: no copies, slower.
PRIVATE_BYTES = 256 << 20
#: Edges a thread should have before a pass is split (see :func:`threads`).
EDGES_PER_THREAD = 4096


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


def _readable(h: Tensor, F: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor) -> Tuple:
    """The kernel's arguments after ``n_atoms, n_edges, M1, M3, C``: unit channel stride for ``h``
    and ``r`` (rows may be strided: a block of a wider tensor), contiguous ``F``, ``row``, ``i``,
    ``j``; the tensors come first, kept alive until the call returns."""
    h, r = (x if x.stride(-1) == 1 else x.contiguous() for x in (h, r))
    F, i, j = F.contiguous(), i.contiguous(), j.contiguous()
    row = None if row is None else row.contiguous()
    return (h, F, r, row, i, j), (h.data_ptr(), h.stride(0), h.stride(1), F.data_ptr(), r.data_ptr(), r.stride(0),
                                  r.shape[0], 0 if row is None else row.data_ptr(), i.data_ptr(), j.data_ptr())


def _call(name: str, h: Tensor, F: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor, *pointers) -> None:
    lib = native.tensor_product_library()
    (h, F, r, row, i, j), arguments = _readable(h, F, r, row, i, j)
    status = getattr(lib, name + _DTYPES[h.dtype])(h.shape[0], i.shape[0], h.shape[1], F.shape[1], h.shape[2],
                                                    *arguments, *pointers, threads(i.shape[0]), PRIVATE_BYTES)
    if status == -1:
        raise SystemTooLargeError(f"the edge tensor product ran out of memory at {i.shape[0]} edges and "
                                  f"{h.shape[0]} atoms: run fewer atoms per batch")
    if status != 0:
        raise InvalidAtomsError(f"edge_index names an atom outside 0..{h.shape[0] - 1} (or a pair outside "
                                f"0..{r.shape[0] - 1}): the neighbor list does not belong to these atoms; build it "
                                "for them (eqcalc.neighbors.compute_neighbors)")


class _EdgeProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, F: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor) -> Tensor:
        # the inputs themselves are saved (not copies made here, which would have no graph to
        # differentiate a second time)
        ctx.save_for_backward(h, F, r, row, i, j)
        out = torch.empty(h.shape[0], F.shape[1], h.shape[2], dtype=h.dtype)
        _call("eqcalc_tp_forward", h, F, r, row, i, j, out.data_ptr())
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, F, r, row, i, j = ctx.saved_tensors
        needed = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: these gradients will be differentiated
            return (*gradients(h, F, r, row, i, j, g, needed), None, None, None)
        grads = [torch.empty(x.shape, dtype=h.dtype) if need else None for x, need in zip((h, F, r), needed)]
        g = g.contiguous()  # held: a temporary's memory could be reused before the kernel reads it
        _call("eqcalc_tp_backward", h, F, r, row, i, j, g.data_ptr(), *[0 if x is None else x.data_ptr() for x in grads])
        return (*grads, None, None, None)


def gradients(h: Tensor, F: Tensor, r: Tensor, row: Optional[Tensor], i: Tensor, j: Tensor, g: Tensor,
              needed: Tuple[bool, bool, bool]) -> List[Optional[Tensor]]:
    """``dL/dh (n_atoms, M1, C)``, ``dL/dF (n_edges, M3, M1)``, ``dL/dr (n_rows, C)`` of
    :func:`edge_product` from ``g = dL/dout (n_atoms, M3, C)``, in differentiable torch
    operations (``None`` where not ``needed``)."""
    r_e = r if row is None else r.index_select(0, row)                   # (E, C)
    g_i, h_j = g.index_select(0, i), h.index_select(0, j)                 # (E, M3, C), (E, M1, C)
    t = torch.bmm(F.transpose(1, 2), g_i) if needed[0] or needed[2] else None  # (E, M1, C)
    grad_h = torch.zeros_like(h).index_add(0, j, t * r_e.unsqueeze(1)) if needed[0] else None
    grad_F = torch.bmm(g_i * r_e.unsqueeze(1), h_j.transpose(1, 2)) if needed[1] else None
    grad_r = (t * h_j).sum(1) if needed[2] else None
    if grad_r is not None and row is not None:
        grad_r = torch.zeros_like(r).index_add(0, row, grad_r)
    return [grad_h, grad_F, grad_r]


def edge_product(h: Tensor, F: Tensor, r: Tensor, edge_index: Tensor, row: Optional[Tensor] = None) -> Tensor:
    """``out (n_atoms, M3, C)``: ``sum_{e=(i,j)} r[row[e]] * (F[e] @ h[j])`` per channel, from
    ``h (n_atoms, M1, C)``, ``F (n_edges, M3, M1)``, ``r (n_rows, C)``, ``edge_index (2,
    n_edges)`` (centre ``i``, neighbour ``j``) and ``row (n_edges,)`` (``None``: ``r`` has a row
    per edge; else the rows are per pair of reverse edges, :func:`eqcalc.neighbors.edge_pairs`).
    Needs :func:`available`."""
    return _EdgeProduct.apply(h, F, r, row, edge_index[0], edge_index[1])

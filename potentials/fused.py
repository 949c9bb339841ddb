"""One path of the edge tensor product in one pass over the edges, on CPU.

:class:`potentials.o3.EdgeTensorProduct` sums, per path ``l1 ⊗ l2 → l3``,

``out[i, m3, c] = sum_{e=(i,j)} r[e, c] sum_m1 F[e, m3, m1] h[j, m1, c]``

(``F`` the edge's harmonics folded with the coupling coefficients). In torch operations that is
a gather ``h[j]``, a weighting, a batched matmul of tiny matrices and an ``index_add``, each
writing and reading a tensor ``(n_edges, 2l+1, channels)``; the backward pass as many again. The
compiled kernel (``eqcalc/_native/tensor_product.c``) does the same sums edge by edge with the
rows in cache, in the same order for any thread count. :func:`edge_product` uses it for CPU
tensors of float32/float64 outside tracing and compilation (TorchScript, ``make_fx``, dynamo,
fake tensors: those see the torch form, which is also the reference the tests compare with).

A second derivative (Hessians, training on forces) differentiates the backward pass: when the
backward runs with ``create_graph``, its gradients are computed with torch operations
(:func:`gradients`), themselves differentiable.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from eqcalc import _native as native

_DTYPES = {torch.float32: "_f32", torch.float64: "_f64"}


def available(h: Tensor) -> bool:
    """Whether :func:`edge_product` can run on tensors like ``h``: the kernel was built, plain CPU
    float32/float64 tensors, not under tracing or compilation."""
    return (native.tensor_product_library() is not None and type(h) is torch.Tensor
            and h.device.type == "cpu" and h.dtype in _DTYPES and not torch.compiler.is_compiling()
            and not _wrapped(h))


def _wrapped(x: Tensor) -> bool:  # functorch (vmap, grad) wraps tensors the kernel cannot read
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(is_wrapped(x)) if is_wrapped is not None else False


def _readable(h: Tensor, F: Tensor, r: Tensor, i: Tensor, j: Tensor) -> Tuple[Tensor, ...]:
    """The layouts the kernel reads: unit channel stride for ``h`` and ``r`` (rows may be
    strided: a block of a wider tensor), contiguous ``F``, ``i``, ``j``."""
    h, r = (x if x.stride(-1) == 1 else x.contiguous() for x in (h, r))
    return h, F.contiguous(), r, i.contiguous(), j.contiguous()


def _call(name: str, h: Tensor, F: Tensor, r: Tensor, i: Tensor, j: Tensor, *tail) -> None:
    lib = native.tensor_product_library()
    n_atoms, m1, c = h.shape
    status = getattr(lib, name + _DTYPES[h.dtype])(
        n_atoms, i.shape[0], m1, F.shape[1], c, h.data_ptr(), h.stride(0), h.stride(1), F.data_ptr(),
        r.data_ptr(), r.stride(0), i.data_ptr(), j.data_ptr(), *tail, torch.get_num_threads())
    if status == -1:
        raise MemoryError(f"the edge tensor product kernel ran out of memory ({i.shape[0]} edges)")
    if status != 0:
        raise IndexError(f"edge_index names an atom outside 0..{n_atoms - 1}")


class _EdgeProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, F: Tensor, r: Tensor, i: Tensor, j: Tensor) -> Tensor:
        # the inputs themselves are saved (not copies made here, which would have no graph to
        # differentiate a second time)
        ctx.save_for_backward(h, F, r, i, j)
        out = torch.empty(h.shape[0], F.shape[1], h.shape[2], dtype=h.dtype)
        _call("eqcalc_tp_forward", *_readable(h, F, r, i, j), out.data_ptr())
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        h, F, r, i, j = ctx.saved_tensors
        need_h, need_F, need_r = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph: these gradients will be differentiated
            return (*gradients(h, F, r, i, j, g, (need_h, need_F, need_r)), None, None)
        grads = [torch.empty(x.shape, dtype=x.dtype) if need else None for x, need in ((h, need_h), (F, need_F), (r, need_r))]
        g = g.contiguous()  # held: a temporary's memory could be reused before the kernel reads it
        _call("eqcalc_tp_backward", *_readable(h, F, r, i, j), g.data_ptr(),
              *[0 if x is None else x.data_ptr() for x in grads])
        return (*grads, None, None)


def gradients(h: Tensor, F: Tensor, r: Tensor, i: Tensor, j: Tensor, g: Tensor,
              needed: Tuple[bool, bool, bool]) -> List[Optional[Tensor]]:
    """``dL/dh (n_atoms, M1, C)``, ``dL/dF (n_edges, M3, M1)``, ``dL/dr (n_edges, C)`` of
    :func:`edge_product` from ``g = dL/dout (n_atoms, M3, C)``, in differentiable torch
    operations (``None`` where not ``needed``)."""
    g_i, h_j = g.index_select(0, i), h.index_select(0, j)                 # (E, M3, C), (E, M1, C)
    t = torch.bmm(F.transpose(1, 2), g_i) if needed[0] or needed[2] else None  # (E, M1, C)
    grad_h = torch.zeros_like(h).index_add(0, j, t * r.unsqueeze(1)) if needed[0] else None
    grad_F = torch.bmm(g_i * r.unsqueeze(1), h_j.transpose(1, 2)) if needed[1] else None
    grad_r = (t * h_j).sum(1) if needed[2] else None
    return [grad_h, grad_F, grad_r]


def edge_product(h: Tensor, F: Tensor, r: Tensor, edge_index: Tensor) -> Tensor:
    """``out (n_atoms, M3, C)``: ``sum_{e=(i,j)} r[e] * (F[e] @ h[j])`` per channel, from
    ``h (n_atoms, M1, C)``, ``F (n_edges, M3, M1)``, ``r (n_edges, C)``, ``edge_index (2,
    n_edges)`` (centre ``i``, neighbour ``j``). Needs :func:`available`."""
    return _EdgeProduct.apply(h, F, r, edge_index[0], edge_index[1])

"""Compiled forms of a :class:`~eqcalc.derivatives.ForceStressModel`: TorchScript and AOTInductor.

Built on the user's machine from the package, cached under the user's cache directory
(``$EQCALC_CACHE``, else ``$XDG_CACHE_HOME/eqcalc``, else ``~/.cache/eqcalc``) keyed by weights
hash, force mode, device, dtype and torch/eqcalc versions, and checked against eager on a probe
structure before first use.

AOTInductor route with autograd forces inside the graph (``torch.export`` alone cannot trace
``torch.autograd.grad``): trace with ``make_fx(tracing_mode="symbolic")``, export that graph with
dynamic atom, edge and system counts, then ``aoti_compile_and_package``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from eqcalc.errors import CompileError

log = logging.getLogger("eqcalc")

KINDS = ("eager", "torchscript", "aoti")
Inputs = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]
Runner = Callable[..., Dict[str, Tensor]]


def cache_dir() -> Path:
    root = os.environ.get("EQCALC_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "eqcalc"


def cache_key(weights_sha256: str, forces: str, stress: bool, device: torch.device, dtype: str) -> str:
    from eqcalc import __version__

    # "simd8": packages built before the vector-width fix (see aoti()) must not be reused.
    text = f"{weights_sha256}|{forces}|{stress}|{device}|{dtype}|{torch.__version__}|{__version__}|simd8"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def torchscript(wrapper: torch.nn.Module) -> Runner:
    """Script the wrapper (deprecated upstream on torch 2.13, kept as a second format)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(wrapper)


def _dynamic_shapes():
    from torch.export import Dim

    atoms, edges, systems = Dim("n_atoms", min=1), Dim("n_edges", min=0), Dim("n_systems", min=1)
    # Argument order of ForceStressModel.forward: positions, cell, species, edge_index, shifts, system
    return ({0: atoms}, {0: systems}, {0: atoms}, {1: edges}, {0: edges}, {0: atoms})


def export_aoti(wrapper: torch.nn.Module, example: Inputs, path: Path) -> Path:
    """Compile ``wrapper`` with AOTInductor into the ``.pt2`` package at ``path``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def run(positions, cell, species, edge_index, shifts, system):
        with torch.enable_grad():
            return wrapper(positions, cell, species, edge_index, shifts, system)

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = make_fx(run, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*example)
        # make_fx keeps weights as plain tensor attributes; export wants registered buffers.
        for node in graph.graph.nodes:
            if node.op == "get_attr":
                value = getattr(graph, node.target)
                if isinstance(value, torch.Tensor):
                    delattr(graph, node.target)
                    graph.register_buffer(node.target, value.detach().clone())
        program = torch.export.export(graph, example, dynamic_shapes=_dynamic_shapes(), strict=False)
        tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.pt2")
        # torch 2.13's Inductor CPU code at AVX-512 width (16 lanes) corrupts the heap for MACE
        # with >= 16 channels (crash on first call, bisected to the vector width); 8 lanes (AVX2)
        # runs correctly. CPU code only; a context patch leaves Inductor's global config alone.
        with torch._inductor.config.patch({"cpp.simdlen": 8}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    os.replace(tmp, path)
    return path


def aoti_path(key: str) -> Path:
    """Where the AOTInductor package of cache ``key`` lives."""
    return cache_dir() / f"{key}.pt2"


def aoti(wrapper: torch.nn.Module, example: Inputs, key: str) -> Runner:
    """AOTInductor runner from the cache, compiling it first if needed. The package holds
    compiled code: only files this machine built are loaded."""
    path = aoti_path(key)
    if not path.exists():
        start = time.perf_counter()
        log.info("compiling the model with AOTInductor (once per model, device and dtype)...")
        try:
            export_aoti(wrapper, example, path)
        except Exception as e:  # the compiler stack raises many types; wrap with the fix
            raise CompileError(
                f"AOTInductor compilation failed ({type(e).__name__}: {str(e)[:300]}); "
                "use compile='torchscript' or compile='eager'") from e
        log.info("AOTInductor compile took %.1f s -> %s", time.perf_counter() - start, path)
    return torch._inductor.aoti_load_package(str(path))


def max_relative_error(a: Dict[str, Tensor], b: Dict[str, Tensor]) -> float:
    """Largest ``|a - b| / max(|b|)`` over the shared outputs."""
    worst = 0.0
    for k in b:
        if k in a:
            scale = b[k].abs().max().clamp_min(1e-12)
            worst = max(worst, float(((a[k].double() - b[k].double()).abs().max() / scale)))
    return worst


def tolerance(dtype: torch.dtype) -> float:
    """Compiled-vs-eager agreement required before a compiled form is used."""
    return 5e-5 if dtype == torch.float32 else 1e-10


def best_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after ``warmup`` calls, seconds. ``fn``
    must wait for its result (e.g. move it to the CPU) so that CUDA work is counted."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best

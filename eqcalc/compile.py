"""Compiled forms of a :class:`~eqcalc.derivatives.ForceStressModel`: TorchScript and AOTInductor.

Built on the user's machine from the package, cached under the user's cache directory
(``$EQCALC_CACHE``, else ``$XDG_CACHE_HOME/eqcalc``, else ``~/.cache/eqcalc``) keyed by weights
hash, force mode, device, dtype and torch/eqcalc versions, and checked against eager on a probe
structure before first use.

The cache is never trusted blindly: each ``KEY.pt2`` has ``KEY.pt2.json`` beside it with its
size and sha256, checked before the entry is loaded; a truncated, corrupt or unloadable entry is
rebuilt with a warning naming its path. A cache folder that cannot be written is detected before
compiling (not after a minute of it): the form is built in a temporary folder for this process,
with a warning. ``compile="auto"`` records its choice per machine (``auto-KEY.json``, keyed by
model, force mode, device, dtype and versions, and by the forms it chose among), so every
calculator of that model on this machine, e.g. the images of one NEB, uses the same form.

AOTInductor route with autograd forces inside the graph (``torch.export`` alone cannot trace
``torch.autograd.grad``): trace with ``make_fx(tracing_mode="symbolic")``, export that graph with
dynamic atom, edge and system counts, then ``aoti_compile_and_package``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
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

    # "simd8": packages built before the vector-width fix (see aoti()) must not be reused;
    # "checked": entries without the size/hash record are not looked at.
    text = f"{weights_sha256}|{forces}|{stress}|{device}|{dtype}|{torch.__version__}|{__version__}|simd8|checked"
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
        # Scalar CPU loops: Inductor's simdlen is a width in bits and 8 matches no ISA. torch
        # 2.13's vectorized CPU code is wrong for MACE with >= 16 channels: AVX-512 corrupts the
        # heap (crash on first call), AVX2 (simdlen 256) gives float64 energies off by 1.2
        # relative (caught by the probe check). For NequIP it is no faster (matmuls dominate).
        # CPU code only; a context patch leaves Inductor's global config alone.
        with torch._inductor.config.patch({"cpp.simdlen": 8}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
    try:
        # the record first: a reader that sees the new package also sees its record
        _write_json(_record_path(path), {"size": tmp.stat().st_size, "sha256": _file_sha256(tmp),
                                         "torch": torch.__version__})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


_FALLBACK: Dict[str, Path] = {}


def writable_cache() -> Path:
    """:func:`cache_dir` when it can be written, else (with a warning, once per process) a
    temporary folder that lives as long as this process."""
    from eqcalc.errors import OutputError
    from eqcalc.outputs import writable_dir

    if "dir" in _FALLBACK:
        return _FALLBACK["dir"]
    try:
        return writable_dir(cache_dir())
    except OutputError as e:
        _FALLBACK["dir"] = Path(tempfile.mkdtemp(prefix="eqcalc-cache-"))
        log.warning("%s. Compiled forms go to %s for this process only (set EQCALC_CACHE to a writable "
                    "folder to keep them)", str(e).split(";")[0], _FALLBACK["dir"])
        return _FALLBACK["dir"]


def aoti_path(key: str) -> Path:
    """Where the AOTInductor package of cache ``key`` lives (the cache, or this process's
    temporary fallback when the cache cannot be written)."""
    return (_FALLBACK.get("dir") or cache_dir()) / f"{key}.pt2"


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verified(path: Path, action: str = "rebuilding it") -> bool:
    """Whether cache entry ``path`` exists and matches the size and sha256 recorded beside it;
    a mismatch is logged as a warning naming the path and ``action``."""
    if not path.exists():
        return False
    try:
        record = json.loads(_record_path(path).read_text())
        ok = record["size"] == path.stat().st_size and record["sha256"] == _file_sha256(path)
        problem = "its size or sha256 differs from the record beside it (truncated or corrupt)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        ok, problem = False, f"its size/hash record {_record_path(path)} is missing or unreadable ({e})"
    if not ok:
        log.warning("compiled-form cache entry %s is not usable: %s; %s", path, problem, action)
    return ok


def aoti(wrapper: torch.nn.Module, example: Inputs, key: str) -> Runner:
    """AOTInductor runner from the cache, compiling it first if the entry is missing, does not
    match its recorded size and hash, or does not load. The package holds compiled code: only
    files this machine built (and recorded) are loaded."""
    path = aoti_path(key)
    if verified(path):
        try:
            return _load_package(path)
        except Exception as e:  # a damaged entry can fail inside the loader with many types
            log.warning("compiled-form cache entry %s does not load (%s: %s); rebuilding it",
                        path, type(e).__name__, str(e)[:200])
    path = writable_cache() / f"{key}.pt2"
    start = time.perf_counter()
    log.info("compiling the model with AOTInductor (once per model, device and dtype)...")
    try:
        export_aoti(wrapper, example, path)
    except Exception as e:  # the compiler stack raises many types; wrap with the fix
        raise CompileError(
            f"AOTInductor compilation failed ({type(e).__name__}: {str(e)[:300]}); "
            "use compile='torchscript' or compile='eager'") from e
    log.info("AOTInductor compile took %.1f s -> %s", time.perf_counter() - start, path)
    return _load_package(path)


class _ScalarISANotice(logging.Filter):
    """Drops torch's "Device information mismatch for AOTI_CPU_ISA: ... vs INVALID_VEC_ISA" at
    load: the packages are built with scalar loops on purpose (see :func:`export_aoti`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not ("AOTI_CPU_ISA" in str(record.args) and "INVALID_VEC_ISA" in str(record.args))


def _load_package(path: Path) -> Runner:
    loader_log = logging.getLogger("torch.export.pt2_archive._package")
    notice = _ScalarISANotice()
    loader_log.addFilter(notice)
    try:
        return torch._inductor.aoti_load_package(str(path))
    finally:
        loader_log.removeFilter(notice)


def _write_json(path: Path, data: Dict) -> None:
    from eqcalc.outputs import replace_atomically

    replace_atomically(path, lambda f: f.write(json.dumps(data).encode()))


def recorded_choice(key: str, candidates) -> Dict | None:
    """The ``compile="auto"`` choice recorded on this machine for cache ``key`` among
    ``candidates`` (``{"choice", "timings"}``), or ``None``."""
    path = (_FALLBACK.get("dir") or cache_dir()) / f"auto-{key}.json"
    if key in _CHOICES:
        record = _CHOICES[key]
    else:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
    if not isinstance(record, dict) or record.get("candidates") != list(candidates) \
            or record.get("choice") not in candidates:
        return None
    return record


def record_choice(key: str, candidates, choice: str, timings: Dict[str, float]) -> None:
    """Remember the ``compile="auto"`` choice for ``key`` in this process and on this machine."""
    from eqcalc.errors import OutputError

    record = {"candidates": list(candidates), "choice": choice, "timings": timings,
              "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
    _CHOICES[key] = record
    try:
        _write_json(writable_cache() / f"auto-{key}.json", record)
    except OutputError as e:  # the choice still holds for this process
        log.warning("could not record the compiled-form choice (%s)", e)


_CHOICES: Dict[str, Dict] = {}


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

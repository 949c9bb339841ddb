"""A restricted reader of ``torch.save`` archives that never runs code from the file.

A ``torch.save`` file is a zip holding ``<prefix>/data.pkl`` (a pickle of the saved object) and
one ``<prefix>/data/<key>`` member of raw bytes per tensor storage. A full pickle of an
``nn.Module`` (what mace-torch writes) names classes and functions as *globals*; a normal load
imports and calls them, so loading can run anything. This reader:

* checks the archive first: member count and sizes, byte order, the pickle's size and every
  opcode (only the binary opcodes ``torch.save`` writes are accepted; no extension registry,
  no out-of-band buffers, no ``INST``/``OBJ``);
* unpickles with :class:`RestrictedUnpickler`, whose ``find_class`` answers only the globals of
  an explicit allow-list (:class:`Allow`) and refuses every other with :class:`UnsafeModelError`
  naming it. Allowed classes come back as inert :class:`Record` types: "constructing" one
  stores the arguments, "setting its state" stores the state dict, nothing of the original
  class is imported or called. Allowed functions that a pickle *calls* (tensor rebuilds,
  ``OrderedDict``, ``set``, ``_codecs.encode``) are replaced by small local implementations;
  ``getattr`` only resolves ``torch._C._VariableFunctionsClass.<name>`` (how ``torch.tanh`` is
  pickled) for allow-listed ``torch.<name>``, to an inert reference;
* rebuilds tensors from the storage members itself (``torch.frombuffer`` + ``as_strided``,
  bounds checked), never through ``torch.load``.

The result is a tree of records whose ``state`` holds ``_modules``, ``_parameters``,
``_buffers`` and plain attributes: :func:`module_tree` walks it. Converters (MACE here, NequIP's
``.nequip.zip`` later) pass their own allow-list and hints for known foreign globals.
"""
from __future__ import annotations

import collections
import io
import pickle
import pickletools
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch

from eqcalc.errors import ModelFileError, UnsafeModelError

MiB = 1 << 20

#: Binary opcodes written by ``torch.save`` (pickle protocols 2-5, without out-of-band buffers).
SAFE_OPCODES = frozenset("""
    PROTO FRAME STOP MARK POP POP_MARK DUP
    GLOBAL STACK_GLOBAL REDUCE NEWOBJ NEWOBJ_EX BUILD BINPERSID
    EMPTY_DICT EMPTY_LIST EMPTY_TUPLE EMPTY_SET TUPLE TUPLE1 TUPLE2 TUPLE3 LIST DICT FROZENSET
    APPEND APPENDS SETITEM SETITEMS ADDITEMS
    NONE NEWTRUE NEWFALSE BININT BININT1 BININT2 LONG1 LONG4 BINFLOAT
    SHORT_BINUNICODE BINUNICODE BINUNICODE8 SHORT_BINSTRING BINSTRING
    SHORT_BINBYTES BINBYTES BINBYTES8 BYTEARRAY8
    BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET
""".split())

#: Storage classes of a torch.save pickle → tensor dtypes.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


@dataclass(frozen=True)
class Limits:
    """Size limits of an archive (bytes); a file beyond them is refused before anything is read."""
    pickle_bytes: int = 256 * MiB
    member_bytes: int = 4096 * MiB
    total_bytes: int = 16384 * MiB
    members: int = 100_000


class Record:
    """An inert stand-in for an object of an allow-listed class.

    ``kind`` is ``"module.Name"`` of the class the file named; ``args`` what the pickle passed to
    its constructor (``NEWOBJ``/``REDUCE``); ``state`` what it passed to ``__setstate__``
    (for ``nn.Module`` subclasses: the instance ``__dict__`` with ``_modules``, ``_parameters``,
    ``_buffers``). Nothing else happens: no code of the named class is imported or run.
    """

    kind = ""

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __init__(self, *args, **kwargs):  # REDUCE on a class calls cls(*args): __new__ did it all
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<record {self.kind}>"

    # ---- nn.Module-shaped state ------------------------------------------------------------
    @property
    def name(self) -> str:
        """The class name alone (``"ScaleShiftMACE"``)."""
        return self.kind.rsplit(".", 1)[-1]

    def _dict(self) -> Dict[str, Any]:
        state = self.state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]  # (dict, slotstate)
        return state if isinstance(state, dict) else {}

    def attr(self, key: str, default: Any = None) -> Any:
        """A plain attribute of the pickled object (``avg_num_neighbors``, ``heads``, ...)."""
        return self._dict().get(key, default)

    def has(self, key: str) -> bool:
        return key in self._dict() or key in self.modules or key in self.tensors

    @property
    def modules(self) -> Dict[str, Any]:
        return dict(self._dict().get("_modules") or {})

    @property
    def tensors(self) -> Dict[str, torch.Tensor]:
        """Parameters and buffers of this module (not of its children)."""
        d = self._dict()
        out = {k: v for k, v in (d.get("_parameters") or {}).items() if v is not None}
        out.update({k: v for k, v in (d.get("_buffers") or {}).items() if v is not None})
        return out

    def child(self, key: str) -> "Record":
        child = self.modules.get(key)
        if not isinstance(child, Record):
            raise ModelFileError(f"{self.kind} has no submodule {key!r}")
        return child

    def tensor(self, key: str) -> torch.Tensor:
        t = self.tensors.get(key)
        if t is None:
            raise ModelFileError(f"{self.kind} has no parameter or buffer {key!r}")
        return t


class GlobalRef:
    """An allow-listed function the pickle only *refers to* (e.g. an activation stored as a
    module attribute). Calling it is refused: the file may name it, never run it."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def __call__(self, *args, **kwargs):
        raise UnsafeModelError(f"the file calls {self.qualname}, which a model file never needs to call")

    def __repr__(self):
        return f"<global {self.qualname}>"


# ---- local implementations of what torch.save pickles call ----------------------------------
class _Storage:
    """A storage referenced by a persistent id: its flat tensor, loaded on first use."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise UnsafeModelError("a tensor in the file is not backed by a storage of the archive")
    flat = storage.tensor
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in size + stride) or offset < 0:
        raise ModelFileError(f"a tensor of the file has a negative size, stride or offset ({size}, {stride})")
    if 0 not in size:
        last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= flat.numel():
            raise ModelFileError(
                f"a tensor of the file reaches element {last} of a storage of {flat.numel()}; the file is corrupt")
    return flat.as_strided(size, stride, int(offset)).clone()


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _codecs_encode(text, encoding="latin1"):
    # Protocol-2 pickles write bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeModelError(f"_codecs.encode called with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


def _slice(*args):
    # e3nn pickles index slices; only plain integer bounds are accepted.
    if len(args) > 3 or not all(a is None or (isinstance(a, int) and not isinstance(a, bool)) for a in args):
        raise UnsafeModelError(f"slice called with {args!r}")
    return slice(*args)


def _ordered_dict(items=()):
    return collections.OrderedDict(items)


def _set(items=()):
    out = []  # records are unhashable: a list keeps membership without hashing them
    out.extend(items)
    return out


CALLABLES: Dict[Tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): _ordered_dict,
    ("builtins", "set"): _set,
    ("__builtin__", "set"): _set,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "slice"): _slice,
}


#: The class whose attributes are torch's builtin functions: pickle stores ``torch.tanh`` as
#: ``getattr(torch._C._VariableFunctionsClass, "tanh")``.
TORCH_FUNCTIONS = "torch._C._VariableFunctionsClass"


class Allow:
    """The globals a converter accepts: ``records`` (classes → inert :class:`Record` types),
    ``functions`` (referred to, never called: :class:`GlobalRef`), ``prefixes`` of module names
    whose every class is a record (e.g. ``"torch.nn.modules."``), and ``hints``: module prefixes
    of known foreign globals → the message that tells the user the way out."""

    def __init__(self, records: Iterable[str] = (), functions: Iterable[str] = (),
                 prefixes: Iterable[str] = (), hints: Optional[Mapping[str, str]] = None):
        self.records = set(records)
        self.functions = set(functions)
        self.prefixes = tuple(prefixes)
        self.hints = dict(hints or {})
        self._types: Dict[str, type] = {}

    def resolve(self, module: str, name: str) -> Any:
        module = {"__builtin__": "builtins"}.get(module, module)
        qualname = f"{module}.{name}"
        if (module, name) in CALLABLES:
            return CALLABLES[(module, name)]
        if qualname == "builtins.getattr":
            return self._torch_function
        if qualname == TORCH_FUNCTIONS:
            return GlobalRef(module, name)
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if qualname in self.functions:
            return GlobalRef(module, name)
        if qualname in self.records or (module.startswith(self.prefixes) if self.prefixes else False):
            if qualname not in self._types:
                self._types[qualname] = type(name, (Record,), {"kind": qualname, "__module__": __name__})
            return self._types[qualname]
        for prefix, hint in self.hints.items():
            if qualname.startswith(prefix):
                raise UnsafeModelError(f"the file uses {qualname}: {hint}")
        raise UnsafeModelError(
            f"the file refers to the global {qualname}, which is not on the allow-list of this "
            "converter; it was not imported or run. If the file is genuine, its model type is not "
            "supported by this converter")

    def _torch_function(self, owner: Any, name: Any) -> "GlobalRef":
        """``getattr(torch._C._VariableFunctionsClass, "tanh")``: how pickle stores ``torch.tanh``
        (a builtin without a module path). Only that owner and only allow-listed ``torch.<name>``
        functions; the result is a reference, never called. Any other ``getattr`` is refused."""
        if isinstance(owner, GlobalRef) and owner.qualname == TORCH_FUNCTIONS and isinstance(name, str) \
                and f"torch.{name}" in self.functions:
            return GlobalRef("torch", name)
        raise UnsafeModelError(f"the file calls builtins.getattr({owner!r}, {str(name)[:40]!r}), which is not "
                               "on the allow-list of this converter; nothing was imported or run")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from an :class:`Allow` list and whose
    persistent ids are storages of the archive (loaded by ``load_storage(key, dtype, numel)``)."""

    def __init__(self, data: bytes, allow: Allow, load_storage: Callable[[str, torch.dtype, int], torch.Tensor]):
        super().__init__(io.BytesIO(data))
        self.allow = allow
        self.load_storage = load_storage
        self.storages: Dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        return self.allow.resolve(module, name)

    def persistent_load(self, pid) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeModelError(f"unknown persistent id {str(pid)[:80]!r} in the file")
        _, dtype, key, _location, numel = pid
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)  # torch.package numbers its storages
        if not isinstance(dtype, torch.dtype) or not isinstance(key, str) or not isinstance(numel, int):
            raise UnsafeModelError(f"malformed storage reference {str(pid)[:80]!r} in the file")
        if key not in self.storages:
            self.storages[key] = _Storage(self.load_storage(key, dtype, numel))
        return self.storages[key]


def check_opcodes(data: bytes, where: str) -> None:
    """Refuse a pickle with any opcode outside :data:`SAFE_OPCODES` (or one that does not parse)."""
    try:
        for op, _arg, pos in pickletools.genops(data):
            if op.name not in SAFE_OPCODES:
                raise UnsafeModelError(f"{where}: pickle opcode {op.name} at byte {pos} is not accepted")
    except UnsafeModelError:
        raise
    except Exception as e:  # genops raises ValueError and others on malformed input
        raise ModelFileError(f"{where}: the pickle is malformed ({e}); the file is corrupt") from e


class TorchArchive:
    """An opened ``torch.save`` zip: ``load(allow)`` gives the unpickled object tree.

    ``prefix`` is the archive's top folder (``torch.save`` uses the file's stem). The same reader
    serves any zip whose pickles reference storages as ``('storage', type, key, location,
    numel)``; ``storage_member`` maps a key to its member name (``torch.package`` uses
    ``.data/<key>.storage``).
    """

    def __init__(self, path: str | Path, limits: Limits = Limits()):
        self.path = str(path)
        self.limits = limits
        try:
            self.zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelFileError(f"{self.path!r} is not a torch.save zip archive ({e})") from e
        infos = self.zip.infolist()
        if len(infos) > limits.members:
            raise UnsafeModelError(f"{self.path!r} has {len(infos)} members, more than {limits.members}")
        total = 0
        for info in infos:
            if info.file_size > limits.member_bytes:
                raise UnsafeModelError(
                    f"{self.path!r}: member {info.filename} is {info.file_size} bytes, over the "
                    f"{limits.member_bytes}-byte limit")
            total += info.file_size
        if total > limits.total_bytes:
            raise UnsafeModelError(f"{self.path!r} unpacks to {total} bytes, over the {limits.total_bytes}-byte limit")
        self.names = {info.filename for info in infos}

    def close(self) -> None:
        self.zip.close()

    def __enter__(self) -> "TorchArchive":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def pickles(self) -> List[str]:
        return sorted(n for n in self.names if n.endswith(".pkl"))

    def data_pickle(self) -> str:
        """The ``<prefix>/data.pkl`` member of a ``torch.save`` archive."""
        found = [n for n in self.names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(found) != 1:
            raise ModelFileError(
                f"{self.path!r} is a zip but not a torch.save archive (no single <name>/data.pkl)")
        return found[0]

    def read(self, member: str, limit: Optional[int] = None) -> bytes:
        info = self.zip.getinfo(member)
        if limit is not None and info.file_size > limit:
            raise UnsafeModelError(
                f"{self.path!r}: {member} is {info.file_size} bytes, over the {limit}-byte limit")
        try:
            return self.zip.read(member)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise ModelFileError(f"{self.path!r}: member {member} cannot be read ({e}); the file is corrupt") from e

    def load(self, allow: Allow, member: Optional[str] = None,
             storage_member: Optional[Callable[[str], str]] = None) -> Any:
        """Unpickle ``member`` (default: ``data.pkl``) with ``allow``; storages from the zip."""
        member = member or self.data_pickle()
        prefix = member.rsplit("/", 1)[0]
        storage_member = storage_member or (lambda key: f"{prefix}/data/{key}")
        order = f"{prefix}/byteorder"
        if order in self.names and self.read(order, 16).strip() not in (b"little",):
            raise ModelFileError(f"{self.path!r} was written on a big-endian machine; not supported")
        data = self.read(member, self.limits.pickle_bytes)
        check_opcodes(data, f"{self.path!r}: {member}")

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            name = storage_member(key)
            if name not in self.names:
                raise ModelFileError(f"{self.path!r}: storage {key!r} ({name}) is missing; the file is truncated")
            blob = self.read(name)
            itemsize = torch.empty((), dtype=dtype).element_size()
            if len(blob) != numel * itemsize:
                raise ModelFileError(
                    f"{self.path!r}: storage {key!r} has {len(blob)} bytes, expected {numel} x {itemsize}")
            if numel == 0:
                return torch.empty(0, dtype=dtype)
            return torch.frombuffer(bytearray(blob), dtype=dtype)

        try:
            return RestrictedUnpickler(data, allow, load_storage).load()
        except (ModelFileError, UnsafeModelError):
            raise
        except Exception as e:  # malformed streams raise many types (UnpicklingError, TypeError...)
            raise ModelFileError(f"{self.path!r}: {member} cannot be read ({type(e).__name__}: {e})") from e


def walk(record: Record, prefix: str = "") -> Iterator[Tuple[str, Record]]:
    """Every module record under ``record`` with its dotted path (``"interactions.0.linear"``),
    depth first (iterative: a deeply nested file cannot exhaust the stack)."""
    stack = [(prefix, record)]
    seen = set()
    while stack:
        path, module = stack.pop()
        if id(module) in seen:  # a pickle may share a module; never loop on a cycle
            continue
        seen.add(id(module))
        yield path, module
        children = [(f"{path}.{k}" if path else str(k), c) for k, c in module.modules.items()
                    if isinstance(c, Record)]
        stack.extend(reversed(children))


def state_dict(record: Record) -> Dict[str, torch.Tensor]:
    """The ``state_dict()`` the module tree would have: dotted names → tensors."""
    out = {}
    for path, module in walk(record):
        for key, tensor in module.tensors.items():
            if isinstance(tensor, torch.Tensor):
                out[f"{path}.{key}" if path else key] = tensor
    return out


def require_filled(path, model, state: Dict[str, torch.Tensor], initial: Dict[str, torch.Tensor]) -> None:
    """:class:`ModelFileError` unless every parameter of ``model`` in ``state`` was replaced by a
    value from the file (``initial`` holds the freshly built model's tensors)."""
    missing = sorted(n for n, _ in model.named_parameters() if state[n] is initial[n])
    if missing:
        raise ModelFileError(f"{path!r}: no value in the file for {missing[:5]}")

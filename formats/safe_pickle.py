"""Loading pickled checkpoints (`.pt`, `.bin`) without ever running code from them.

Everything goes through `torch.load(weights_only=True)`. Classes that training frameworks
pickle next to the weights (Megatron's `args` enums, DeepSpeed's loss scalers and ZeRO enums,
numpy RNG state) are mapped to *inert stand-ins*: classes of our own that carry the same
`__module__`/`__qualname__`, store whatever arguments they are given and execute nothing.
Only globals under the framework prefixes below get stand-ins; a few harmless stdlib classes
are allowed as themselves; any other global (os.system, builtins.eval, ...) is refused.
"""
from __future__ import annotations

import argparse
import io
import pickle
import pickletools
import re
import signal
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Set

import torch

from .errors import CheckpointError, UnsafePickleError

# Modules whose classes we never need to *behave*, only to be unpickled as data holders.
INERT_PREFIXES = (
    "megatron.", "deepspeed.", "apex.", "transformer_engine.", "numpy.", "_codecs.",
)
# Real classes that are safe to construct (plain data, no side effects).
REAL_ALLOWED = {
    "argparse.Namespace": argparse.Namespace,
    "signal.Signals": signal.Signals,
}

_stand_ins: Dict[str, type] = {}


class InertObject:
    """Stand-in for a foreign class: records constructor args and pickled state, runs nothing."""

    _args: tuple = ()   # defaults for objects rebuilt without __init__ (NEWOBJ + BUILD)
    _kwargs: dict = {}

    def __init__(self, *args, **kwargs):
        self._args = args
        self._kwargs = kwargs

    def __setstate__(self, state):
        self._state = state

    @property
    def value(self):  # enums pickle as Enum(value)
        return self._args[0] if self._args else None

    @property
    def name(self):
        return getattr(self, "_state", None) or repr(self.value)

    def __repr__(self):
        return f"<inert {type(self).__module__}.{type(self).__qualname__}{self._args!r}>"


def stand_in(qualified: str) -> type:
    """An inert class whose pickled name is `qualified` (module.QualName)."""
    if qualified not in _stand_ins:
        module, _, qualname = qualified.rpartition(".")
        cls = type(qualname, (InertObject,), {"__module__": module, "__qualname__": qualname})
        _stand_ins[qualified] = cls
    return _stand_ins[qualified]


_MARK = object()                                   # a MARK on the simulated stack
_MEMO_STORES = ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT")   # leave the stack as it is
_MEMO_LOADS = ("GET", "BINGET", "LONG_BINGET")


def _pickle_globals(ops, found: Set[str]) -> None:
    """Adds the `module.name` of every GLOBAL / STACK_GLOBAL in one pickle's opcodes. Protocol
    4+ pushes STACK_GLOBAL's two strings by value or from the memo (a module name used twice
    is stored once and fetched with BINGET), so the stack and the memo are simulated with
    pickletools' per-opcode stack effects: strings as themselves, everything else as None."""
    stack: list = []
    memo: Dict[Any, Any] = {}
    for op, arg, pos in ops:
        name = op.name
        if name in _MEMO_STORES:
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1] if stack else None
            continue
        if name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif name == "STACK_GLOBAL" and len(stack) >= 2:
            module, attr = stack[-2], stack[-1]
            if isinstance(module, str) and isinstance(attr, str):
                found.add(f"{module}.{attr}")
            else:                              # names built some other way: not readable here
                raise ValueError(f"STACK_GLOBAL at byte {pos} without literal names")
        before = op.stack_before
        if pickletools.markobject in before:   # pops the slice above the mark, the mark, and
            while stack and stack[-1] is not _MARK:  # the items listed below it
                stack.pop()
            if stack:
                stack.pop()
            below = before.index(pickletools.markobject)
        else:
            below = len(before)
        del stack[max(0, len(stack) - below):]
        if name in _MEMO_LOADS:
            stack.append(memo.get(arg))
            continue
        for item in op.stack_after:
            if item is pickletools.markobject:
                stack.append(_MARK)
            else:
                stack.append(arg if isinstance(arg, str) and name != "GLOBAL" else None)


def _globals_in(path: Path) -> Set[str]:
    """Every `module.name` the pickle references, found by disassembling it (nothing runs).
    Zip checkpoints keep the pickle in `*/data.pkl`; the legacy format is five pickles in a
    row (magic, protocol, sys info, the object, storage keys) followed by raw storage bytes."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if name is None:
                raise ValueError("zip archive without data.pkl")
            streams, count = io.BytesIO(z.read(name)), 1
    else:
        streams, count = open(path, "rb"), 5
    found: Set[str] = set()
    with streams as f:
        for _ in range(count):
            _pickle_globals(pickletools.genops(f), found)
    return found


def _allowed_globals(path: Path) -> list:
    """Stand-ins for framework classes, the few real classes we allow; every other global is
    left to torch's weights_only unpickler, which refuses anything it does not know."""
    try:
        names = _globals_in(path)
    except Exception as e:  # truncated / not a pickle at all
        with open(path, "rb") as f:
            cut_zip = f.read(4) == b"PK\x03\x04"  # a zip checkpoint that lost its end
        why = "a zip archive without its end (central directory)" if cut_zip else \
            f"{type(e).__name__}: {str(e)[:120]}"
        raise CheckpointError(f"{path}: cannot read pickle ({why}); the file is truncated or "
                              "not a PyTorch checkpoint: copy it again") from None
    allowed = [REAL_ALLOWED[n] for n in names if n in REAL_ALLOWED]
    return allowed + [stand_in(n) for n in names if n.startswith(INERT_PREFIXES)]


def _unsupported_opcode(path: Path, code: int) -> str:
    """The line for a pickle torch's weights-only unpickler cannot parse: it reads the
    opcodes of protocol 2 (torch.save's default), and files saved with pickle_protocol=4 or 5
    start with FRAME."""
    op = next((o for o in pickletools.opcodes if o.code == chr(code)), None)
    what = f"opcode {op.name} (pickle protocol {op.proto})" if op else f"opcode {code}"
    return (f"{path}: cannot be read safely: its pickle uses {what}, which torch's weights-only "
            "loader (the only one dsinfer uses, so that no code in a checkpoint runs) does not "
            "read; re-save it with torch.save's default pickle protocol (no pickle_protocol "
            "argument) or as safetensors")


def load_pt(path: Path) -> Any:
    """torch.load(weights_only=True) onto the CPU, memory-mapped when the file allows it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    allowed = _allowed_globals(path)
    mmap = zipfile.is_zipfile(path)
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # torch warns about protocols other than 2 and then fails on FRAME: the line below
            # (_unsupported_opcode) says it once
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        opcode = re.search(r"Unsupported operand (\d+)", str(e))
        if opcode:
            raise CheckpointError(_unsupported_opcode(path, int(opcode.group(1)))) from None
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"function (<[^>]*>)", str(e))
        what = f"'{culprit.group(1)}'" if culprit else "an object torch refuses to rebuild"
        raise UnsafePickleError(
            f"{path}: refused to load: the pickle references {what}, which could run code; "
            "dsinfer loads only tensors and plain data (re-save the weights with safetensors "
            "or as a plain state dict)") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read pickle ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); the file is "
                              "truncated or corrupt: copy it again from its source") from None

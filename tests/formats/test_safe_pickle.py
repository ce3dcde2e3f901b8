"""Pickled checkpoints are loaded without running code: framework classes become inert
stand-ins, anything else is refused with a clear message."""
import argparse
import enum
import os
import sys
import types
import pickle

import pytest
import torch

from dsinfer.formats import CheckpointError, UnsafePickleError
from dsinfer.formats.safe_pickle import InertObject, load_pt


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch BOOM_RAN",))


def test_plain_state_dict(tmp_path):
    sd = {"w": torch.randn(3, 2), "args": argparse.Namespace(hidden_size=4)}
    torch.save(sd, tmp_path / "a.pt")
    got = load_pt(tmp_path / "a.pt")
    assert torch.equal(got["w"], sd["w"]) and got["args"].hidden_size == 4


def test_code_running_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(1), "x": _Boom()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafePickleError, match="evil.pt.*(os|posix).system"):
        load_pt(tmp_path / "evil.pt")
    assert not (tmp_path / "BOOM_RAN").exists()


class ModelType(enum.Enum):
    encoder_or_decoder = 1


def test_framework_classes_become_inert(tmp_path, monkeypatch):
    names = ("megatron", "megatron.core", "megatron.core.enums")
    for n in names:  # save as megatron would, then unload the fake megatron
        monkeypatch.setitem(sys.modules, n, types.ModuleType(n))
    sys.modules["megatron.core.enums"].ModelType = ModelType
    ModelType.__module__ = "megatron.core.enums"
    torch.save({"args": argparse.Namespace(model_type=ModelType.encoder_or_decoder)},
               tmp_path / "m.pt")
    for n in names:
        monkeypatch.delitem(sys.modules, n)
    got = load_pt(tmp_path / "m.pt")
    assert isinstance(got["args"].model_type, InertObject)
    assert got["args"].model_type.value == 1


def test_legacy_non_zip_and_truncated(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_pt(tmp_path / "old.pt")["w"], torch.ones(2))
    data = (tmp_path / "old.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.pt"):
        load_pt(tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_pt(tmp_path / "missing.pt")


@pytest.mark.parametrize("protocol", [4, 5])
def test_high_protocol_pickle_names_and_line(tmp_path, protocol):
    """Protocol 4+ pushes STACK_GLOBAL's names by value or from the memo (a module used twice
    is stored once): the scan reads the real names. torch's weights-only unpickler then stops
    at FRAME; the error says so and how to re-save, not that the file could run code."""
    from dsinfer.formats.safe_pickle import _globals_in
    import collections
    path = tmp_path / "p.pt"
    obj = {"a": argparse.Namespace(x=1), "b": argparse.Namespace(y=2),
           "sd": collections.OrderedDict(w=torch.zeros(2)), "c": collections.OrderedDict()}
    torch.save(obj, path, pickle_protocol=protocol)
    assert _globals_in(path) == {"argparse.Namespace", "collections.OrderedDict",
                                 "torch.FloatStorage", "torch._utils._rebuild_tensor_v2"}
    with pytest.raises(CheckpointError, match=r"FRAME \(pickle protocol 4\).*re-save it"):
        load_pt(path)


def test_stack_global_scan_follows_the_memo():
    """A hand-written protocol 4 stream: the second STACK_GLOBAL takes its module from the
    memo (BINGET) and its name by value; a name that is not a literal string is an error."""
    import io
    import pickletools
    from dsinfer.formats.safe_pickle import _pickle_globals
    stream = pickle.dumps([argparse.Namespace, argparse.ArgumentParser], protocol=4)
    ops = [op.name for op, _, _ in pickletools.genops(io.BytesIO(stream))]
    assert ops.count("STACK_GLOBAL") == 2 and "BINGET" in ops     # the memo is used
    found = set()
    _pickle_globals(pickletools.genops(io.BytesIO(stream)), found)
    assert found == {"argparse.Namespace", "argparse.ArgumentParser"}
    bad = b"\x80\x04N\x8c\x01x\x93."          # PROTO 4, NONE, 'x', STACK_GLOBAL, STOP
    with pytest.raises(ValueError, match="without literal names"):
        _pickle_globals(pickletools.genops(io.BytesIO(bad)), set())

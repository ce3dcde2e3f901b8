"""The byte-copy reshard path (formats/bytecopy.py) writes exactly the bytes of the tensor path,
checks a dsinfer source's sha256, and runs without importing torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsinfer.formats import CheckpointError, bytecopy
from dsinfer.quantize import QuantConfig, quantize
from dsinfer.reshard import reshard
from helpers import hf_models


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _same_both_ways(src, out: Path, **kw):
    """Writes `src` with the byte path and the tensor path; every output byte agrees."""
    fast = reshard(src, out / "fast", progress=False, **kw)
    slow = reshard(src, out / "slow", progress=False, fast=False, **kw)
    a, b = _files(out / "fast"), _files(out / "slow")
    assert a.keys() == b.keys()
    for rel in a:
        assert a[rel] == b[rel], rel
    assert fast.files == slow.files
    return out / "fast"


@pytest.fixture
def used(monkeypatch):
    """Records whether the byte path wrote (open_source returned a ByteCheckpoint)."""
    calls = []
    real = bytecopy.write_files
    monkeypatch.setattr(bytecopy, "write_files",
                        lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("arch", list(hf_models.CONFIGS))
def test_every_architecture_hf_tp4_tp2_hf(arch, tmp_path, used):
    src = hf_models.save(hf_models.build(arch), tmp_path / "hf")
    tp4 = _same_both_ways(src, tmp_path / "a", tp=4)
    tp2 = _same_both_ways(tp4, tmp_path / "b", tp=2)
    _same_both_ways(tp2, tmp_path / "c", tp=1, to="hf")
    _same_both_ways(tp4, tmp_path / "d", tp=1)
    assert len(used) == 4


def test_parts_index_shards_and_small_chunks(tmp_path, monkeypatch, used):
    """Several parts per rank, an index-sharded HF source and windows smaller than a row."""
    monkeypatch.setattr(bytecopy, "CHUNK", 1000)
    src = hf_models.save(hf_models.build("gpt2"), tmp_path / "hf", max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").is_file()
    tp2 = _same_both_ways(src, tmp_path / "a", tp=2, max_part_bytes=50_000)
    assert len(json.loads((tp2 / "dsinfer.json").read_text())["files"]) > 6
    _same_both_ways(tp2, tmp_path / "b", tp=4, max_part_bytes=70_000)
    _same_both_ways(tp2, tmp_path / "c", tp=1, to="hf")
    assert len(used) == 3


def test_int8_source(tmp_path, used):
    """Quantized weights and their scales (row and column groups) are copied as they are."""
    src = hf_models.save(hf_models.build("llama"), tmp_path / "hf")
    quantize(src, tmp_path / "q", QuantConfig(groups=4, group_size=16), tp=2, progress=False)
    _same_both_ways(tmp_path / "q", tmp_path / "a", tp=4)
    _same_both_ways(tmp_path / "q", tmp_path / "b", tp=1)
    assert len(used) == 2


def test_dtype_cast_goes_through_tensors(tmp_path, used):
    src = hf_models.save(hf_models.build("llama"), tmp_path / "hf")  # fp32
    reshard(src, tmp_path / "same", tp=2, dtype="fp32", progress=False)
    reshard(src, tmp_path / "cast", tp=2, dtype="float16", progress=False)
    assert len(used) == 1
    m = json.loads((tmp_path / "cast" / "dsinfer.json").read_text())
    assert m["dtype"] == "float16"


def _flip(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", [None, "float16"])  # byte path, tensor path
def test_damaged_dsinfer_source_is_refused(tmp_path, dtype):
    src = hf_models.save(hf_models.build("llama"), tmp_path / "hf")
    reshard(src, tmp_path / "tp2", tp=2, progress=False)
    part = tmp_path / "tp2" / "rank-01-of-02" / "part-000.safetensors"
    _flip(part)
    with pytest.raises(CheckpointError, match="rank-01-of-02/part-000.safetensors: sha256 "
                                              "mismatch"):
        reshard(tmp_path / "tp2", tmp_path / "out", tp=1, dtype=dtype, progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_damaged_copied_config_is_refused(tmp_path):
    src = hf_models.save(hf_models.build("llama"), tmp_path / "hf")
    reshard(src, tmp_path / "tp2", tp=2, progress=False)
    cfg = tmp_path / "tp2" / "config.json"
    cfg.write_text(cfg.read_text().replace("{", "{ ", 1))
    with pytest.raises(CheckpointError, match="config.json: sha256 mismatch"):
        reshard(tmp_path / "tp2", tmp_path / "out", tp=4, progress=False)
    assert not (tmp_path / "out").exists()


def test_not_for_other_formats(tmp_path):
    import torch
    model = hf_models.build("gpt2")
    src = hf_models.save(model, tmp_path / "bin")
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    assert bytecopy.open_source(src) is None
    assert bytecopy.open_source(src, "hf") is None
    (tmp_path / "mp").mkdir()
    assert bytecopy.open_source(tmp_path / "mp", "megatron") is None


def test_cli_does_not_import_torch(tmp_path):
    """The common case pays neither torch's nor transformers' import."""
    src = hf_models.save(hf_models.build("llama"), tmp_path / "hf")
    code = ("import sys; from dsinfer.tools.reshard import main; "
            f"rc = main([{str(src)!r}, '--tp', '2', '--out', {str(tmp_path / 'o')!r}, "
            "'--quiet']); "
            "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "print(rc, heavy); sys.exit(rc or bool(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "o" / "dsinfer.json").is_file()


@pytest.mark.parametrize("mode", ["buffered", "direct_refused_midway"])
def test_buffered_output_and_fallback(tmp_path, monkeypatch, mode):
    """Without O_DIRECT (tmpfs, or DSINFER_DIRECT_IO=0), and when a file system refuses a
    direct write half-way, the same bytes come out."""
    monkeypatch.setattr(bytecopy, "CHUNK", 4096)
    if mode == "buffered":
        monkeypatch.setattr(bytecopy, "DIRECT", False)
    else:
        real, calls = os.write, []

        def write(fd, data):
            calls.append(fd)
            if len(calls) == 3:
                raise OSError(22, "Invalid argument")
            return real(fd, data)
        monkeypatch.setattr(bytecopy.os, "write", write)
    src = hf_models.save(hf_models.build("gpt2"), tmp_path / "hf")
    _same_both_ways(src, tmp_path / "a", tp=2)

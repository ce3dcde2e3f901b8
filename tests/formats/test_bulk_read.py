"""formats.bulk_read: whole safetensors files read by worker threads in chunks (on a GPU into
device memory through pinned staging buffers; here into host memory, the same job split)."""
import pytest
import torch
from safetensors.torch import save_file

from dsinfer.formats import CheckpointError
from dsinfer.formats import bulk_read


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(bulk_read, "CHUNK", 96)      # many chunks per tensor, odd boundaries


def tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"a.int8": torch.randint(-128, 127, (7, 3), generator=g, dtype=torch.int8),
            "b.f32": torch.randn(5, 11, generator=g),      # follows 21 int8 bytes: misaligned?
            "c.f16": torch.randn(33, generator=g).half(),
            "d.bf16": torch.randn(4, 4, generator=g).bfloat16(),
            "e.i64": torch.arange(9).reshape(3, 3)}


def test_every_tensor_of_every_file_equals_the_source(tmp_path, small_chunks):
    want = {}
    paths = []
    for i in range(3):
        t = {f"f{i}.{k}": v for k, v in tensors(i).items()}
        save_file(t, tmp_path / f"{i}.safetensors")
        paths.append(tmp_path / f"{i}.safetensors")
        want.update(t)
    read = bulk_read.DeviceRead(paths, "cpu", threads=3)
    got = read.result()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert read.result() is got                     # waiting again returns the same tensors
    total = sum(p.stat().st_size for p in paths)
    assert 0 < read.stats["bytes"] < total and read.stats["read_s"] > 0
    assert 0 < read.stats["host_done_s"] <= read.stats["read_s"]


def test_a_truncated_file_is_one_clear_error(tmp_path, small_chunks):
    path = tmp_path / "x.safetensors"
    save_file(tensors(0), path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="x.safetensors"):
        bulk_read.read_to_device([path], "cpu", threads=2)

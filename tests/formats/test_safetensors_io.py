"""The streaming safetensors reader/writer agree with the safetensors library byte for byte."""
import pytest
import torch
from safetensors.torch import load_file, save_file

from dsinfer.formats import CheckpointError
from dsinfer.formats.safetensors_io import SafetensorsFile, StreamingWriter, sha256_file

TENSORS = {
    "a": torch.randn(5, 3),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "d": torch.randn(4, 2).half(),
    "s": torch.tensor(3.0),
    "e": torch.zeros(0, 4),
    "m": torch.tensor([True, False]),
}


def test_writer_output_loads_with_safetensors(tmp_path):
    w = StreamingWriter(tmp_path / "x.safetensors",
                        [(n, tuple(t.shape), t.dtype) for n, t in TENSORS.items()],
                        metadata={"format": "pt"})
    for n, t in TENSORS.items():
        w.write(n, t)
    nbytes, sha = w.close()
    assert nbytes == (tmp_path / "x.safetensors").stat().st_size
    assert sha == sha256_file(tmp_path / "x.safetensors")
    got = load_file(tmp_path / "x.safetensors")
    assert got.keys() == TENSORS.keys()
    assert all(torch.equal(got[n], t) for n, t in TENSORS.items())


def test_reader_reads_safetensors_files_and_row_ranges(tmp_path):
    save_file(TENSORS, tmp_path / "y.safetensors")
    f = SafetensorsFile(tmp_path / "y.safetensors")
    for n, t in TENSORS.items():
        assert f.shape(n) == tuple(t.shape) and f.dtype(n) == t.dtype
        assert torch.equal(f.read(n), t)
    assert torch.equal(f.read_rows("a", 1, 4), TENSORS["a"][1:4])


def test_writer_refuses_out_of_order(tmp_path):
    w = StreamingWriter(tmp_path / "z.safetensors", [("a", (2,), torch.float32)])
    with pytest.raises(ValueError):
        w.write("b", torch.zeros(2))


@pytest.mark.parametrize("cut", [4, 20, -8])
def test_truncated_files_are_clear_errors(tmp_path, cut):
    save_file(TENSORS, tmp_path / "t.safetensors")
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="t.safetensors"):
        SafetensorsFile(tmp_path / "t.safetensors")

"""Issue 6.3: `dsinfer-inspect --verify`, reading (reshard) and the runtime (a size and header
check always; sha256 with verify=True, of this rank's files only) catch a flipped byte, a
truncated file, a missing rank, a damaged header and a tensor whose shape disagrees with the
manifest, each naming the file (and the tensor where one is at fault)."""
import json
import shutil
import struct

import pytest
import torch
import transformers as tf

import dsinfer
import reliability_support as rs
from dsinfer import specs
from dsinfer.formats import CheckpointError
from dsinfer.loading import open_rank_source

PART1 = "rank-01-of-02/part-000.safetensors"
TENSOR = "model.layers.1.mlp.down_proj.weight"


def _header(path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, data


def flip_byte(ckpt, part):
    data = bytearray(part.read_bytes())
    data[-10] ^= 0x01                       # one bit of the last tensor's data
    part.write_bytes(bytes(data))


def flip_header(ckpt, part):
    n, data = _header(part)
    i = data.index(b'"shape":[', 8) + len(b'"shape":[')   # first digit of the first shape
    data = bytearray(data)
    data[i] = ord("7") if data[i] != ord("7") else ord("3")
    part.write_bytes(bytes(data))


def truncate(ckpt, part):
    part.write_bytes(part.read_bytes()[:-100])


def missing_rank(ckpt, part):
    shutil.rmtree(part.parent)


def foreign_rank(ckpt, part):
    """rank 1's file swapped for rank 1's file of a TP 4 split: every shape disagrees."""
    shutil.copy(ckpt.parent / "tp4" / "rank-01-of-04" / "part-000.safetensors", part)
    m = json.loads((ckpt / "dsinfer.json").read_text())   # sizes made to agree: only shapes differ
    m["files"][PART1]["bytes"] = part.stat().st_size
    (ckpt / "dsinfer.json").write_text(json.dumps(m))


def manifest_shape(ckpt, part):
    """The manifest claims another global shape for one tensor."""
    m = json.loads((ckpt / "dsinfer.json").read_text())
    m["tensors"][TENSOR]["shape"] = [64, 256]
    (ckpt / "dsinfer.json").write_text(json.dumps(m))


DAMAGE = {  # name -> (damage, message needles: inspect --verify, reading)
    "flip_byte": (flip_byte, [PART1, "sha256 mismatch"], [PART1, "sha256 mismatch"]),
    "flip_header": (flip_header, [PART1], [PART1]),
    "truncated": (truncate, [PART1, "bytes, manifest says"], [PART1, "truncated"]),
    "missing_rank": (missing_rank, [PART1, "missing"], [PART1, "missing"]),
    "foreign_rank": (foreign_rank, [PART1, "tensor '", "has shape"],
                     [PART1, "tensor '", "has shape", "do not belong together"]),
    "manifest_shape": (manifest_shape, [PART1, TENSOR, "has shape [64, 64]"],
                       ["part-000.safetensors", TENSOR, "has shape"]),
}


@pytest.fixture
def damaged(request, sources, fresh):
    """A copy of llama TP 2 with one kind of damage in rank 1 (or, for the manifest, all)."""
    from dsinfer.reshard import reshard
    ckpt = rs.copy(sources["llama_tp2"], fresh / "ckpt")
    reshard(sources["llama"], fresh / "tp4", tp=4, progress=False)
    name = request.param
    DAMAGE[name][0](ckpt, ckpt / PART1)
    return name, ckpt


def _spec():
    return specs.get("llama")


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_inspect_verify(damaged):
    name, ckpt = damaged
    o = rs.cli("inspect", ckpt, "--verify", "--quiet")
    assert o.code == 1 and "Traceback" not in o.err, o.err
    assert "verify: FAILED" in o.err
    problems = [ln for ln in o.lines if not ln.startswith("verify:")]
    assert problems and all(ln.startswith("dsinfer-inspect: ") for ln in problems)
    assert any(all(n in ln for n in DAMAGE[name][1]) for ln in problems), o.err


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_reading_for_reshard(damaged, fresh):
    name, ckpt = damaged
    o = rs.cli("reshard", ckpt, "--tp", 1, "--out", fresh / "out")
    needles = DAMAGE[name][2]
    if needles is None:   # damage that reading does not see (none since sources are hashed)
        assert o.code == 0
        return
    rs.assert_one_line(o, *needles)
    assert not (fresh / "out").exists()


@pytest.mark.parametrize("damaged", list(DAMAGE), indirect=True)
def test_runtime_rank_loading(damaged):
    """A rank reads only its own files: rank 0 loads (except where the shared manifest is
    wrong); rank 1 fails naming the file, with verify=True always before any tensor is read."""
    name, ckpt = damaged
    for verify in (False, True):
        def load(rank):
            src = open_rank_source(ckpt, _spec(), 2, rank, verify=verify)
            return {n: src.get(n) for n in src.names}
        if name != "manifest_shape":
            assert load(0)
        if name == "flip_byte" and not verify:
            assert load(1)       # the cheap checks cannot see it: that is what verify=True is for
            continue
        with pytest.raises(CheckpointError) as e:
            load(1)
        msg = str(e.value)
        assert "\n" not in msg and ("rank-01-of-02" in msg or name == "manifest_shape"), msg
        if name in ("foreign_rank", "manifest_shape"):
            assert "tensor '" in msg, msg


def _meta_llama(ckpt):
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(ckpt))


@pytest.mark.parametrize("damage", ["flip_byte", "truncated"])
def test_init_inference(damage, sources, fresh):
    """The public entry point, one process (TP 1): verify=True catches the flipped byte, the
    size check catches truncation without it."""
    from dsinfer.reshard import reshard
    ckpt = reshard(sources["llama"], fresh / "tp1", tp=1, progress=False).out
    part = ckpt / "rank-00-of-01" / "part-000.safetensors"
    DAMAGE[damage][0](ckpt, part)
    with pytest.raises(CheckpointError, match="rank-00-of-01/part-000.safetensors"):
        dsinfer.init_inference(_meta_llama(ckpt), checkpoint=str(ckpt), verify=True)
    if damage == "truncated":
        with pytest.raises(CheckpointError, match="rank-00-of-01/part-000.safetensors"):
            dsinfer.init_inference(_meta_llama(ckpt), checkpoint=str(ckpt))
    else:
        assert dsinfer.init_inference(_meta_llama(ckpt), checkpoint=str(ckpt)).module


def test_verify_true_on_a_sound_checkpoint_hashes_only_own_files(sources, monkeypatch):
    from dsinfer.formats import dsinfer_format
    hashed = []
    real = dsinfer_format.sha256_file
    monkeypatch.setattr(dsinfer_format, "sha256_file", lambda p: hashed.append(p) or real(p))
    src = open_rank_source(sources["llama_tp2"], _spec(), 2, 1, verify=True)
    assert {n: src.get(n) for n in src.names}
    assert hashed and not any("rank-00" in str(p) for p in hashed)
    assert any("rank-01-of-02" in str(p) for p in hashed)

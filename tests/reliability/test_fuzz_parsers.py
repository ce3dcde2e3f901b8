"""Issue 6.5 (fuzz): random mutations of a valid dsinfer.json, of the tutorial checkpoint.json
descriptors (every type and shape) and of a safetensors header. Reading the result either
works or raises CheckpointError with a one-line message: never another exception type, a
traceback on the CLI, or a hang (each example runs under a 20 s alarm)."""
import contextlib
import copy
import json
import shutil
import signal
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reliability_support as rs
from dsinfer import inspect as dsinspect
from dsinfer import loading
from dsinfer.formats import CheckpointError, dsinfer_format, open_checkpoint
from dsinfer.formats.safetensors_io import SafetensorsFile

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
DEEP = "__DEEP__"   # a value replaced by deeply nested brackets once serialized


class Hang(Exception):
    pass


@contextlib.contextmanager
def alarm(seconds: int = 20):
    def ring(*_):
        raise Hang(f"no answer within {seconds} s")
    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def clean_or_checkpoint_error(fn, *args):
    """Runs fn; a CheckpointError must be one line and name something; anything else fails."""
    try:
        with alarm():
            return fn(*args)
    except CheckpointError as e:
        msg = str(e)
        assert msg and "\n" not in msg, repr(msg)
        return None


# ---- mutations ---------------------------------------------------------------------------------

GARBAGE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3),
    st.sampled_from([-1, 2 ** 31, 2 ** 63, 2 ** 64 + 1, 10 ** 30, -10 ** 30]),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["../../etc/passwd", "/etc/hostname", "float16", "int8", "nn", "__class__",
                     "rank-00-of-02/part-000.safetensors", DEEP]),
    st.lists(st.integers(-2, 2 ** 40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=3),
    st.builds(lambda: [[[[]]]]), st.builds(lambda: {"a": {"b": {"c": None}}}),
)


@st.composite
def json_mutations(draw, doc):
    """doc with 1-3 random edits anywhere in its tree: replace a value by garbage, delete or
    add a key/item, or swap values between two places."""
    doc = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        parent, key, node = None, None, doc
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 4)) != 0:
            k = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            parent, key, node = node, k, node[k]
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if parent is None:
            if op == "replace":
                doc = draw(GARBAGE)
            continue
        if op == "replace":
            parent[key] = draw(GARBAGE)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = draw(GARBAGE)
        else:
            parent.insert(draw(st.integers(0, len(parent))), draw(GARBAGE))
    return doc


def serialize(doc, depth: int) -> bytes:
    text = json.dumps(doc)
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode()


@st.composite
def byte_mutations(draw, data: bytes):
    """data with byte flips, a truncation or inserted junk."""
    data = bytearray(data)
    op = draw(st.sampled_from(["flip", "truncate", "insert"]))
    if op == "truncate":
        return bytes(data[: draw(st.integers(0, len(data) - 1))])
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        else:
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


DEPTHS = st.sampled_from([5, 2000, 200_000])


# ---- dsinfer.json --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manifest_case(sources, tmp_path_factory):
    folder = rs.copy(sources["gpt2_tp2"], tmp_path_factory.mktemp("fuzz") / "ckpt")
    return folder, json.loads((folder / "dsinfer.json").read_text())


def read_everything(folder: Path) -> None:
    ckpt = dsinfer_format.read(folder)
    for t in ckpt.tensors:
        t.load()
    dsinfer_format.verify(folder)
    dsinspect.summary(folder)
    for rank in (0, 1):
        src = loading.from_presharded(folder, rank)
        for n in src.names:
            src.get(n)


def exercise_manifest(folder: Path, raw: bytes) -> None:
    (folder / "dsinfer.json").write_bytes(raw)
    clean_or_checkpoint_error(read_everything, folder)
    o = rs.cli("inspect", folder, "--verify", "--quiet")
    assert o.code in (0, 1) and "Traceback" not in o.err, o.err
    out = folder.parent / "out"
    o = rs.cli("reshard", folder, "--tp", 1, "--out", out)
    assert o.code in (0, 1) and "Traceback" not in o.err, o.err
    if o.code == 1:
        rs.assert_one_line(o)
    shutil.rmtree(out, ignore_errors=True)


@settings(max_examples=150, **SETTINGS)
@given(data=st.data())
def test_manifest_json_mutations(manifest_case, data):
    folder, doc = manifest_case
    mutated = data.draw(json_mutations(doc))
    exercise_manifest(folder, serialize(mutated, data.draw(DEPTHS)))


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_manifest_byte_mutations(manifest_case, data):
    folder, _ = manifest_case
    raw = (folder.parent / "ckpt.orig.json")
    if not raw.exists():
        raw.write_text(dsinfer_format.dump_manifest(manifest_case[1]))
    exercise_manifest(folder, data.draw(byte_mutations(raw.read_bytes())))


# ---- checkpoint.json descriptors -------------------------------------------------------------

@pytest.fixture(scope="module")
def descriptor_cases(sources, tmp_path_factory):
    """type -> (folder, valid descriptor) for each type / shape of 'checkpoints'."""
    base = tmp_path_factory.mktemp("fuzzdesc")
    mega = rs.copy(sources["megatron"], base / "megatron")
    bloom = rs.copy(sources["gpt2"], base / "bloom")
    ds = rs.copy(sources["deepspeed"], base / "ds")
    dsi = rs.copy(FIXTURES / "deepspeed" / "ws2" / "gptneo_ds_inference", base / "dsi")
    return {
        "megatron": (mega, {"type": "Megatron", "version": 3.0, "checkpoints": [
            "iter_0000001/mp_rank_00/model_optim_rng.pt",
            "iter_0000001/mp_rank_01/model_optim_rng.pt"]}),
        "bloom": (bloom, {"type": "BLOOM", "version": 1.0, "checkpoints": ["model.safetensors"]}),
        "ds_model": (ds, {"type": "ds_model", "version": 1.0, "checkpoints": "."}),
        "ds_inference": (dsi / "presharded",
                         json.loads((dsi / "presharded" / "ds_inference_config.json").read_text())),
    }


def read_descriptor(path: Path) -> None:
    for fmt in (None, "descriptor"):
        ckpt = clean_or_checkpoint_error(open_checkpoint, path, fmt)
        if ckpt is not None:
            for t in ckpt.tensors:
                clean_or_checkpoint_error(t.load)


def test_valid_descriptors_read(descriptor_cases):
    for kind, (folder, desc) in descriptor_cases.items():
        (folder / "checkpoint.json").write_text(json.dumps(desc))
        ckpt = open_checkpoint(folder / "checkpoint.json")
        assert ckpt.tensors, kind


@settings(max_examples=150, **SETTINGS)
@given(data=st.data(), kind=st.sampled_from(["megatron", "bloom", "ds_model", "ds_inference"]))
def test_descriptor_json_mutations(descriptor_cases, data, kind):
    folder, desc = descriptor_cases[kind]
    path = folder / "checkpoint.json"
    path.write_bytes(serialize(data.draw(json_mutations(desc)), data.draw(DEPTHS)))
    read_descriptor(path)


@settings(max_examples=30, **SETTINGS)
@given(data=st.data(), kind=st.sampled_from(["megatron", "bloom", "ds_model", "ds_inference"]))
def test_descriptor_byte_mutations(descriptor_cases, data, kind):
    folder, desc = descriptor_cases[kind]
    path = folder / "checkpoint.json"
    path.write_bytes(data.draw(byte_mutations(json.dumps(desc).encode())))
    read_descriptor(path)


# ---- safetensors header ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def safetensors_case(sources, tmp_path_factory):
    folder = rs.copy(sources["gpt2"], tmp_path_factory.mktemp("fuzzst") / "hf")
    data = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return folder, json.loads(data[8:8 + n]), data[8 + n:]


def read_safetensors(folder: Path) -> None:
    f = SafetensorsFile(folder / "model.safetensors")
    for name in f.names():
        f.read(name)
        if f.shape(name):
            f.read_rows(name, 0, f.shape(name)[0])
    ckpt = open_checkpoint(folder)
    for t in ckpt.tensors:
        t.load()


def exercise_safetensors(folder: Path, raw: bytes) -> None:
    (folder / "model.safetensors").write_bytes(raw)
    clean_or_checkpoint_error(read_safetensors, folder)
    out = folder.parent / "out"
    o = rs.cli("reshard", folder, "--tp", 2, "--out", out)
    assert o.code in (0, 1) and "Traceback" not in o.err, o.err
    shutil.rmtree(out, ignore_errors=True)


@settings(max_examples=120, **SETTINGS)
@given(data=st.data())
def test_safetensors_header_mutations(safetensors_case, data):
    folder, header, buffer = safetensors_case
    text = serialize(data.draw(json_mutations(header)), data.draw(DEPTHS))
    exercise_safetensors(folder, struct.pack("<Q", len(text)) + text + buffer)


@settings(max_examples=40, **SETTINGS)
@given(data=st.data())
def test_safetensors_byte_mutations(safetensors_case, data):
    folder, header, buffer = safetensors_case
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text)) + text + buffer[:4096]
    cut = len(text) + 64                    # mutate the length, the header and a little data
    exercise_safetensors(folder, data.draw(byte_mutations(raw[:cut])) + raw[cut:])

"""Megatron torch_dist reader: real megatron-core 0.19.2 `--ckpt-format torch_dist` fixtures
(tests/fixtures/megatron_dist, the same models as the legacy fixtures) read like the legacy ones,
match the live model's logits, stream layer by layer, and refuse bad or hostile inputs with one
line."""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.formats.safe_pickle import InertObject
from dsinfer.formats import (CheckpointError, ReadOptions, UnsafePickleError, detect, megatron,
                             megatron_dist, open_checkpoint)
from helpers.checkpoints import hf_model, logits
from helpers.checkpoints import load_tensors as load_all

DIST, LEGACY = FIXTURES / "megatron_dist", FIXTURES / "megatron"
ITER = "iter_0000001"
# each the same model, TP and PP as LEGACY / name
NAMES = ["gpt2_tp2", "llama_tp2", "llama_tp1", "gpt2_tp1_pp2", "llama_tp2_pp2", "llama_bf16_tp2"]


def hf_logits(config: dict, state: dict, ids) -> torch.Tensor:
    return logits(hf_model(config, state), ids)


def copy_fixture(tmp_path, name="llama_tp2") -> Path:
    return Path(shutil.copytree(DIST / name, tmp_path / name))


def dcp_metadata(folder: Path):
    """The fixture's DCP Metadata as torch's real classes (test side, our own trusted file)."""
    return pickle.loads((folder / ITER / ".metadata").read_bytes())


def write_metadata(folder: Path, md):
    (folder / ITER / ".metadata").write_bytes(pickle.dumps(md))


def storage_of(md, fqn, offset=None):
    return next(k for k in md.storage_data if k.fqn == fqn and
                (offset is None or tuple(k.offset or ()) == tuple(offset)))


# ---- the real fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def read_pair():
    cache = {}

    def read(name):
        if name not in cache:
            dist = megatron.read(DIST / name, ReadOptions())
            legacy = megatron.read(LEGACY / name, ReadOptions())
            cache[name] = (dist, load_all(dist), legacy, load_all(legacy))
        return cache[name]
    return read


@pytest.mark.parametrize("name", NAMES)
def test_reads_like_legacy(name, read_pair):
    dist, dist_t, legacy, legacy_t = read_pair(name)
    assert dist.config == legacy.config
    assert [t.name for t in dist.tensors] == [t.name for t in legacy.tensors]  # same order
    for n, t in legacy_t.items():
        assert torch.equal(dist_t[n], t), n
    meta = json.loads((DIST / name / "model_meta.json").read_text())
    assert dist.source == {"format": "megatron", "ckpt_format": "torch_dist",
                           "tp_size": meta["tensor_model_parallel_size"],
                           "pp_size": meta["pipeline_model_parallel_size"],
                           "checkpoint_version": 3.0, "iteration": 1}


@pytest.mark.parametrize("name", NAMES)
def test_matches_live_megatron_logits(name, read_pair):
    dist, state, _, _ = read_pair(name)
    for oracle in (load_file(DIST / name / "oracle.safetensors"),  # live CPU model (or copy)
                   load_file(LEGACY / name / "oracle.safetensors")):  # legacy GPU run
        # bf16: megatron's model after .float(), as the fp32 HF model runs the bf16 weights
        want = oracle.get("logits_fp32_upcast", oracle["logits"])
        got = hf_logits(dist.config, state, oracle["input_ids"])
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_detection_and_from_megatron():
    for path in (DIST / "gpt2_tp2", DIST / "gpt2_tp2" / ITER):
        assert megatron.sniff(path) and detect(path) == "megatron"
    ckpt = open_checkpoint(DIST / "llama_tp1" / ITER, fmt="megatron")
    assert ckpt.source["iteration"] == 1 and ckpt.architecture == "LlamaForCausalLM"
    assert not megatron_dist.is_dist_folder(LEGACY / "llama_tp1" / ITER)


@pytest.mark.parametrize("name,tp", [("llama_tp2", 1), ("llama_tp1", 2), ("gpt2_tp2", 2)])
def test_reshard_cli_same_as_legacy(name, tp, tmp_path):
    """dsinfer-reshard writes the same tensors from the torch_dist and the legacy folder."""
    from dsinfer.tools import reshard
    for src, out in ((DIST / name, tmp_path / "dist"), (LEGACY / name, tmp_path / "legacy")):
        assert reshard.main([str(src), "--tp", str(tp), "--out", str(out), "--quiet"]) == 0
    for r in range(tp):
        rank = f"rank-{r:02d}-of-{tp:02d}"
        files = sorted(p.name for p in (tmp_path / "legacy" / rank).iterdir())
        assert files == sorted(p.name for p in (tmp_path / "dist" / rank).iterdir())
        for f in files:
            a = load_file(tmp_path / "dist" / rank / f)
            b = load_file(tmp_path / "legacy" / rank / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((tmp_path / "dist" / "dsinfer.json").read_text())
    assert manifest["source"]["ckpt_format"] == "torch_dist"


@pytest.mark.parametrize("name", ["gpt2_tp2", "llama_tp2"])
def test_reshard_to_hf_matches_oracle(name, tmp_path):
    from dsinfer.tools import reshard
    out = tmp_path / "hf"
    assert reshard.main([str(DIST / name), "--tp", "1", "--to", "hf", "--out", str(out),
                         "--quiet"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    oracle = load_file(DIST / name / "oracle.safetensors")
    with torch.no_grad():
        got = model(input_ids=oracle["input_ids"]).logits.float()
    assert (got - oracle["logits"]).abs().max() <= 1e-4 * oracle["logits"].abs().max()


# ---- streaming ------------------------------------------------------------------------------

def test_one_tensor_reads_only_its_layer(monkeypatch):
    reads = []
    real = megatron_dist._Store.chunk

    def spy(self, g, c):
        reads.append((g.key, c.offsets, c.sizes))
        return real(self, g, c)
    monkeypatch.setattr(megatron_dist._Store, "chunk", spy)
    ckpt = megatron.read(DIST / "llama_tp2", ReadOptions())
    assert reads == []  # opening reads .metadata and the common state only
    refs = ckpt.by_name()
    gate = refs["model.layers.1.mlp.gate_proj.weight"].load()
    assert gate.shape == (176, 64)
    # fc1 of layer 1 only: 2 TP ranks x (gate, up) chunks of [1, 88, 64]
    assert sorted(r[:2] for r in reads) == [("decoder.layers.mlp.linear_fc1.weight", (1, o, 0))
                                            for o in (0, 88, 176, 264)]
    reads.clear()
    refs["model.layers.2.self_attn.k_proj.weight"].load()
    qkv = "decoder.layers.self_attention.linear_qkv.weight"
    assert {(k, o[0]) for k, o, _ in reads} == {(qkv, 2)}
    assert max(torch.Size(s).numel() for _, _, s in reads) == 48 * 64  # one chunk at a time
    reads.clear()
    refs["model.embed_tokens.weight"].load()
    assert {k for k, _, _ in reads} == {"embedding.word_embeddings.weight"}


# ---- variants megatron writes in other configurations (DCP written here by torch itself) ------

def _save_dcp(folder: Path, tensors: dict, common: dict, common_pt: bool):
    """A torch_dist folder written by torch.distributed.checkpoint itself (one process)."""
    import torch.distributed.checkpoint as dcp
    state = dict(tensors)
    if common_pt:
        torch.save(common, folder / "common.pt")
    else:  # torch's planner torch.saves non-tensor values: the bytes megatron writes
        state["common_state/shard_0_1"] = [common]
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=True,
             planner=dcp.DefaultSavePlanner(flatten_state_dict=False))
    (folder / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist",
                                                      "sharded_backend_version": 1}))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("variant", ["per_layer_keys", "swiglu_w_v", "common_pt", "optimizer"])
def test_other_megatron_layouts(variant, tmp_path, read_pair):
    """non_homogeneous_layers (keys decoder.layers.N.*), singleton_local_shards (fc1 saved as
    `_w` gate and `_v` up keys), older megatron-core (common.pt), optimizer state saved (keys
    optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>, `chained_N.` prefixed when
    chained_optim_avoid_prefix is off; param groups in the common state): same tensors."""
    store = megatron_dist.open_folder(DIST / "llama_tp1" / ITER)
    common = store.store.common_state(megatron_dist._read_metadata(DIST / "llama_tp1" / ITER)[1])
    # the stand-ins of megatron's enums cannot be pickled again: keep the plain fields
    common["args"] = argparse.Namespace(**{k: v for k, v in vars(common["args"]).items()
                                           if not isinstance(v, InertObject)})
    stacked = {k: store.store.read(g, None) for k, g in
               megatron_dist._read_metadata(DIST / "llama_tp1" / ITER)[0].items()}
    tensors = {}
    for key, t in stacked.items():
        rest = megatron_dist.STACKED.fullmatch(key)
        if variant == "per_layer_keys" and rest:
            tensors.update({f"decoder.layers.{i}.{rest[1]}": t[i].clone() for i in range(len(t))})
        elif variant == "swiglu_w_v" and key.endswith("linear_fc1.weight"):
            gate, up = t.chunk(2, 1)
            tensors[key + "_w"], tensors[key + "_v"] = gate.contiguous(), up.contiguous()
        else:
            tensors[key] = t
        if variant == "optimizer":
            for state_key in ("exp_avg", "exp_avg_sq", "fp32_param"):
                tensors[f"optimizer.state.{state_key}.{key}"] = torch.randn(t.shape)
            tensors[f"chained_1.optimizer.state.exp_avg.{key}"] = torch.randn(t.shape)
    if variant == "optimizer":
        common["optimizer"] = {"param_groups": [{"lr": 1e-4, "betas": (0.9, 0.95), "params": [0]}]}
        common["opt_param_scheduler"] = {"max_lr": 1e-4, "num_steps": 1}
    folder = tmp_path / "iter_0000001"
    folder.mkdir()
    _save_dcp(folder, tensors, common, common_pt=variant == "common_pt")
    got = load_all(megatron.read(folder, ReadOptions()))
    _, _, _, want = read_pair("llama_tp1")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---- bad input: one clear line each ---------------------------------------------------------

def test_missing_data_file(tmp_path):
    root = copy_fixture(tmp_path)
    (root / ITER / "__1_0.distcp").unlink()
    with pytest.raises(CheckpointError, match=r"__1_0\.distcp: missing, but \.metadata stores"):
        megatron.read(root, ReadOptions())


def test_truncated_data_file(tmp_path):
    root = copy_fixture(tmp_path)
    path = root / ITER / "__0_0.distcp"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: truncated"):
        megatron.read(root, ReadOptions())


def test_damaged_chunk(tmp_path):
    root = copy_fixture(tmp_path)
    md = dcp_metadata(root)
    info = md.storage_data[storage_of(md, "decoder.layers.mlp.linear_fc2.weight", (1, 0, 0))]
    path = root / ITER / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset: info.offset + info.length] = bytes(info.length)  # zeros, same length
    path.write_bytes(bytes(data))
    ckpt = megatron.read(root, ReadOptions())  # nothing read yet
    refs = ckpt.by_name()
    refs["model.layers.0.mlp.down_proj.weight"].load()  # other layers are fine
    with pytest.raises(CheckpointError, match=r"__\d_0\.distcp \(tensor 'decoder\.layers\.mlp\."
                                              r"linear_fc2\.weight', chunk at \[1, 0, 0\]\)"):
        refs["model.layers.1.mlp.down_proj.weight"].load()


@pytest.mark.parametrize("content", [pickle.dumps({"state_dict_metadata": {}}), b"not a pickle",
                                     b"", pickle.dumps(torch.Size([1, 2]))])
def test_metadata_not_dcp(content, tmp_path):
    root = copy_fixture(tmp_path)
    (root / ITER / ".metadata").write_bytes(content)
    with pytest.raises(CheckpointError, match=r"\.metadata: not torch\.distributed\.checkpoint "
                                              r"metadata \(.*\); the file is damaged"):
        megatron.read(root, ReadOptions())


class RunsCode:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


@pytest.mark.parametrize("where", ["metadata_top", "metadata_inside"])
def test_hostile_metadata_refused(where, tmp_path):
    root = copy_fixture(tmp_path)
    marker = tmp_path / "CODE_RAN"
    payload = RunsCode(os.system, f"touch {marker}")
    if where == "metadata_top":
        write_metadata(root, payload)
    else:  # buried in a real Metadata, where a plain pickle.load would run it
        md = dcp_metadata(root)
        md.storage_meta.save_id = payload
        write_metadata(root, md)
    with pytest.raises(UnsafePickleError, match=r"\.metadata: refused to load: the pickle "
                                                r"references '(posix|os)\.system'"):
        megatron.read(root, ReadOptions())
    assert not marker.exists()


def test_hostile_common_state_refused(tmp_path):
    root = copy_fixture(tmp_path)
    marker = tmp_path / "CODE_RAN"
    md = dcp_metadata(root)
    index = storage_of(md, "common_state/shard_0_1")
    blob = io.BytesIO()
    torch.save([{"args": RunsCode(os.system, f"touch {marker}")}], blob)
    path = root / ITER / md.storage_data[index].relative_path
    start = path.stat().st_size
    with open(path, "ab") as f:
        f.write(blob.getvalue())
    md.storage_data[index].offset, md.storage_data[index].length = start, len(blob.getvalue())
    write_metadata(root, md)
    with pytest.raises(UnsafePickleError, match=r"'common_state/shard_0_1'\): refused to load"):
        megatron.read(root, ReadOptions())
    assert not marker.exists()


def test_file_outside_the_folder_refused(tmp_path):
    root = copy_fixture(tmp_path)
    md = dcp_metadata(root)
    md.storage_data[storage_of(md, "output_layer.weight", (0, 0))].relative_path = "../../x"
    write_metadata(root, md)
    with pytest.raises(CheckpointError, match=r"names the file '\.\./\.\./x'"):
        megatron.read(root, ReadOptions())


@pytest.mark.parametrize("config,match", [
    ({"sharded_backend": "zarr", "sharded_backend_version": 1}, r"sharded_backend 'zarr' is not "
     r"supported \(dsinfer reads 'torch_dist' only\); re-save it with Megatron-LM's --ckpt-format"),
    ({"sharded_backend": "torch_dist", "sharded_backend_version": 2}, r"sharded_backend_version 2"),
    (None, r"without megatron's metadata\.json: either megatron's torch_dcp / fsdp_dtensor format"),
])
def test_unsupported_backend(config, match, tmp_path):
    root = copy_fixture(tmp_path)
    if config is None:
        (root / ITER / "metadata.json").unlink()
    else:
        (root / ITER / "metadata.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=match):
        megatron.read(root, ReadOptions())


def test_cli_prints_one_line(tmp_path, capsys):
    from dsinfer.tools import reshard
    root = copy_fixture(tmp_path)
    (root / ITER / "__1_0.distcp").unlink()
    code = reshard.main([str(root), "--tp", "1", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "__1_0.distcp: missing" in err
    assert not (tmp_path / "out").exists()

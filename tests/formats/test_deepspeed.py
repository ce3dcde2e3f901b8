"""DeepSpeed readers against checkpoints DeepSpeed 0.19.8 wrote (tests/fixtures/deepspeed): ZeRO
0/2/3 training checkpoints from 1 and 2 processes, and kernel-injected GPT-Neo inference shards at
TP 1 and 2. Every read must reproduce the reference bit for bit: fp32 masters exactly, fp16
module weights as the fp16 rounding of the reference. Synthetic ZeRO-2/3 checkpoints (odd sizes,
3 ranks) cover the padding, alignment, buffers, frozen and tied params the fixtures lack."""
import json
import math
import os
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsinfer.formats import CheckpointError, ReadOptions, detect, open_checkpoint
from dsinfer.formats import deepspeed, ds_inference

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed"
TRAINING = [f"{ws}/gpt2_zero{z}" for ws in ("ws1", "ws2") for z in (0, 2, 3)]
INFERENCE = ["ws1/gptneo_ds_inference", "ws2/gptneo_ds_inference"]
# what each ZeRO stage's fixture yields: (weights kind, dtype)
EXPECTED = {0: ("module", torch.float16), 2: ("fp32_master", torch.float32),
            3: ("fp32_master", torch.float32)}


def _reference(folder: Path):
    return load_file(next(folder.glob("reference_*.safetensors")))


def _assert_matches(ckpt, ref):
    """Same names (a tied lm_head may be left out), declared shapes and dtypes, exact values:
    fp32 tensors equal the reference bit for bit, fp16 ones its fp16 rounding."""
    got = ckpt.by_name()
    missing = set(ref) - set(got)
    assert missing <= {"lm_head.weight"} and set(got) <= set(ref), (missing, set(got) - set(ref))
    if missing:
        assert ckpt.source.get("tied", {}).get("lm_head.weight") == "transformer.wte.weight"
    for name, t in got.items():
        value = t.load()
        assert tuple(value.shape) == t.shape and value.dtype == t.dtype, name
        assert torch.equal(value, ref[name].to(t.dtype)), name
        if t.dtype == torch.float16:  # the reference is the fp16 weights upcast, exactly
            assert torch.equal(value.float(), ref[name].float()), name


def _descriptor(tmp_path: Path, checkpoints, kind="ds_model") -> Path:
    path = tmp_path / "desc" / "checkpoint.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"type": kind, "checkpoints": checkpoints, "version": 1.0}))
    return path


def _rel(target: Path, start: Path) -> str:
    return os.path.relpath(target, start)


# ---- the fixtures ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRAINING)
def test_training_checkpoint_folder(name):
    folder = FIXTURES / name
    assert detect(folder) == "deepspeed"
    ckpt = open_checkpoint(folder)
    stage = int(name[-1])
    assert ckpt.format == "deepspeed" and ckpt.config["model_type"] == "gpt2"
    assert (ckpt.source["zero_stage"], ckpt.source["tp_size"], ckpt.source["tag"]) == (
        stage, 1, "global_step1")
    assert ckpt.source["dp_world_size"] == int(name[2])
    assert ckpt.source["weights"] == EXPECTED[stage][0]
    assert {t.dtype for t in ckpt.tensors} == {EXPECTED[stage][1]}
    assert "config.json" in ckpt.extra_files
    _assert_matches(ckpt, _reference(folder))


@pytest.mark.parametrize("name", TRAINING)
def test_each_model_states_pickle_is_read_once(name, monkeypatch):
    """The Megatron-DeepSpeed check and the reader share rank 0's unpickled model states."""
    seen = []
    real = deepspeed.load_pt
    monkeypatch.setattr(deepspeed, "load_pt", lambda p: seen.append(Path(p).name) or real(p))
    _assert_matches(open_checkpoint(FIXTURES / name, "deepspeed"), _reference(FIXTURES / name))
    assert len(seen) == len(set(seen)), seen


@pytest.mark.parametrize("name", TRAINING)
def test_training_checkpoint_tag_folder_and_file(name):
    tag = FIXTURES / name / "global_step1"
    states = sorted(tag.glob("*model_states.pt"))[0]
    for path in (tag, states):
        _assert_matches(open_checkpoint(path, "deepspeed"), _reference(FIXTURES / name))


@pytest.mark.parametrize("name", TRAINING)
def test_training_checkpoint_descriptor(tmp_path, name):
    desc = _descriptor(tmp_path, _rel(FIXTURES / name, tmp_path / "desc"))
    assert detect(desc) == "descriptor"
    ckpt = open_checkpoint(desc)
    assert ckpt.format == "deepspeed"
    _assert_matches(ckpt, _reference(FIXTURES / name))


def test_descriptor_listing_files_of_a_tag(tmp_path):
    tag = FIXTURES / "ws2/gpt2_zero3/global_step1"
    files = [_rel(p, tmp_path / "desc") for p in sorted(tag.glob("*.pt"))]
    _assert_matches(open_checkpoint(_descriptor(tmp_path, files)), _reference(tag.parent))


@pytest.mark.parametrize("name", INFERENCE)
def test_ds_inference_folder_and_json(name):
    folder = FIXTURES / name / "presharded"
    assert detect(folder) == "ds_inference"
    assert detect(folder / ds_inference.CONFIG_NAME) == "descriptor"
    for path in (folder, folder / ds_inference.CONFIG_NAME):
        ckpt = open_checkpoint(path)
        assert ckpt.format == "ds_inference" and ckpt.config["model_type"] == "gpt_neo"
        assert ckpt.source["tp_size"] == int(name[2]) and ckpt.source["dtype"] == "float16"
        _assert_matches(ckpt, _reference(FIXTURES / name))


@pytest.mark.parametrize("name", INFERENCE)
def test_ds_inference_json_elsewhere_with_base_dir(tmp_path, name):
    """A copy of the json elsewhere finds the shards through base_dir (relative to the json)."""
    folder = FIXTURES / name / "presharded"
    desc = json.loads((folder / ds_inference.CONFIG_NAME).read_text())
    desc["base_dir"] = _rel(folder, tmp_path)
    (tmp_path / "checkpoint.json").write_text(json.dumps(desc))
    _assert_matches(open_checkpoint(tmp_path / "checkpoint.json"), _reference(FIXTURES / name))


def test_ds_inference_qkv_is_unfused_per_rank():
    """TP 2: each rank holds [Q_r | K_r | V_r] in columns of the [in, out] kernel layout."""
    ckpt = open_checkpoint(FIXTURES / "ws2/gptneo_ds_inference/presharded").by_name()
    ref = _reference(FIXTURES / "ws2/gptneo_ds_inference")
    for part in "qkv":
        name = f"transformer.h.1.attn.attention.{part}_proj.weight"
        assert ckpt[name].shape == (64, 64) and torch.equal(ckpt[name].load(), ref[name])


# ---- bad inputs ------------------------------------------------------------------------------

def _copy(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(FIXTURES / name, tmp_path / name.replace("/", "_")))


def test_missing_zero_partition_file(tmp_path):
    folder = _copy(tmp_path, "ws2/gpt2_zero2")
    (folder / "global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError,
                       match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: missing"):
        open_checkpoint(folder)


def test_missing_zero3_model_states_file(tmp_path):
    folder = _copy(tmp_path, "ws2/gpt2_zero3")
    (folder / "global_step1/zero_pp_rank_1_mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError,
                       match=r"zero_pp_rank_1_mp_rank_00_model_states\.pt: missing"):
        open_checkpoint(folder)


def test_zero3_without_optimizer_files(tmp_path):
    folder = _copy(tmp_path, "ws1/gpt2_zero3")
    (folder / "global_step1/zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"global_step1: ZeRO-3 .*copy them"):
        open_checkpoint(folder)


def test_latest_points_at_missing_tag(tmp_path):
    folder = _copy(tmp_path, "ws1/gpt2_zero2")
    (folder / "latest").write_text("global_step9\n")
    with pytest.raises(CheckpointError, match=r"latest: points at tag 'global_step9'.*missing"):
        open_checkpoint(folder)


@pytest.mark.parametrize("data", [b"\xff\xfeglobal_step1", b"global_step1\0", b"g" * 5000])
def test_latest_that_is_not_text(tmp_path, data):
    folder = _copy(tmp_path, "ws1/gpt2_zero2")
    (folder / "latest").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"latest: not a tag file .*write the tag folder"):
        open_checkpoint(folder)


def test_no_latest_names_the_tags(tmp_path):
    folder = _copy(tmp_path, "ws1/gpt2_zero2")
    (folder / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"no 'latest'.*global_step1"):
        deepspeed.read(folder, ReadOptions())


@pytest.mark.parametrize("file", ["global_step1/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                  "global_step1/mp_rank_00_model_states.pt"])
def test_truncated_file(tmp_path, file):
    folder = _copy(tmp_path, "ws2/gpt2_zero2")
    data = (folder / file).read_bytes()
    (folder / file).write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{Path(file).name}: .*truncated"):
        open_checkpoint(folder)


def test_partition_count_disagrees_with_files(tmp_path):
    """A stray rank-1 file next to a 1-process ZeRO-2 checkpoint."""
    folder = _copy(tmp_path, "ws1/gpt2_zero2")
    tag = folder / "global_step1"
    shutil.copy(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"rank_0_mp_rank_00_optim_states\.pt: written for "
                                              r"\[1\] data-parallel partitions but 2"):
        open_checkpoint(folder)


def test_tensor_parallel_training_checkpoint_is_refused(tmp_path):
    folder = _copy(tmp_path, "ws1/gpt2_zero0")
    tag = folder / "global_step1"
    shutil.copy(tag / "mp_rank_00_model_states.pt", tag / "mp_rank_01_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_01_model_states\.pt: .*tensor \(model\) "
                                              "parallelism"):
        open_checkpoint(folder)


def test_missing_config(tmp_path):
    folder = _copy(tmp_path, "ws1/gpt2_zero3")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"global_step1: no config\.json.*put the model's HF "
                                              "config.json next to it"):
        open_checkpoint(folder)


def test_ds_inference_missing_shard(tmp_path):
    folder = _copy(tmp_path, "ws2/gptneo_ds_inference") / "presharded"
    (folder / "tp_01_03.pt").unlink()
    with pytest.raises(CheckpointError, match=r"tp_01_03\.pt: listed in .*missing"):
        open_checkpoint(folder)


def test_ds_inference_truncated_shard(tmp_path):
    folder = _copy(tmp_path, "ws2/gptneo_ds_inference") / "presharded"
    data = (folder / "tp_00_01.pt").read_bytes()
    (folder / "tp_00_01.pt").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match=r"tp_00_01\.pt: .*truncated"):
        open_checkpoint(folder)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(tp_size=3), r"lists 16 tp files, not a multiple of tp_size 3"),
    (lambda d: d["checkpoints"]["tp"].reverse(), r"tp_01_07\.pt: listed where rank 0's file"),
])
def test_ds_inference_bad_config_json(tmp_path, edit, match):
    folder = _copy(tmp_path, "ws2/gptneo_ds_inference") / "presharded"
    desc = json.loads((folder / ds_inference.CONFIG_NAME).read_text())
    edit(desc)
    (folder / ds_inference.CONFIG_NAME).write_text(json.dumps(desc))
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(folder)


def test_ds_inference_unknown_architecture(tmp_path):
    root = _copy(tmp_path, "ws1/gptneo_ds_inference")
    config = json.loads((root / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(dict(config, model_type="bloom")))
    with pytest.raises(CheckpointError, match=r"model_type 'bloom' \(known: gpt_neo, gpt2, "):
        open_checkpoint(root / "presharded")


# ---- synthetic ZeRO layouts: odd sizes, 3 ranks, padding, buffers, frozen and tied params ----

PARAMS = OrderedDict([("emb.weight", (7, 5)), ("ln.weight", (5,)), ("fc.weight", (3, 5)),
                      ("fc.bias", (3,)), ("out.weight", (11,))])
GROUPS = [["emb.weight", "ln.weight"], ["fc.weight", "fc.bias", "out.weight"]]


def _zero2_partitions(params, world, align_pads):
    """Per group, params end to end (each followed by its alignment padding), padded to a
    multiple of 2 * world, cut into `world` equal partitions (the group padding on the last)."""
    parts, group_pads, param_pads = [[] for _ in range(world)], [[] for _ in range(world)], []
    for names in GROUPS:
        pads = [(-params[n].numel()) % 4 if align_pads else 0 for n in names]
        flat = torch.cat([torch.cat([params[n].reshape(-1), torch.full((p,), 9.0)])
                          for n, p in zip(names, pads)])
        total = math.ceil(flat.numel() / (2 * world)) * 2 * world
        padding, size = total - flat.numel(), total // world
        flat = torch.cat([flat, torch.zeros(padding)])
        for r in range(world):
            parts[r].append(flat[r * size:(r + 1) * size].clone())
            group_pads[r].append(padding if r == world - 1 else 0)
        param_pads.append(pads)
    return [{"single_partition_of_fp32_groups": parts[r], "group_paddings": group_pads[r],
             "param_alignment_paddings": param_pads, "partition_count": [world] * len(GROUPS)}
            for r in range(world)]


def _zero3_pieces(t: torch.Tensor, world: int):
    k = math.ceil(t.numel() / world)
    flat = torch.cat([t.reshape(-1), torch.zeros(k * world - t.numel(), dtype=t.dtype)])
    return [flat[r * k:(r + 1) * k].clone() for r in range(world)]


def _zero3_partitions(params, world):
    """Rank r: piece r of every param, end to end, saved as 3 sub-groups (not the 2 groups)."""
    out = []
    for r in range(world):
        flat = torch.cat([_zero3_pieces(params[n], world)[r] for n in PARAMS])
        cut = [0, 9, flat.numel() - 4, flat.numel()]  # sub-group bounds need not follow params
        subs = [flat[a:b].clone() for a, b in zip(cut, cut[1:])]
        out.append({"fp32_flat_groups": subs, "partition_count": world})
    return out


def _write_zero(save: Path, stage: int, world: int, prefix: str, align_pads: bool = False):
    torch.manual_seed(stage)
    params = {n: torch.randn(s) for n, s in PARAMS.items()}
    frozen, buf = torch.randn(4, 3), torch.arange(6)
    tag = save / "global_step5"
    tag.mkdir(parents=True)
    (save / "latest").write_text("global_step5")
    (save / "config.json").write_text(json.dumps({"model_type": "toy"}))
    optims = _zero2_partitions(params, world, align_pads) if stage == 2 else _zero3_partitions(
        params, world)
    for r, osd in enumerate(optims):
        torch.save({"optimizer_state_dict": dict(osd, zero_stage=stage)},
                   tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    for r in range(world if stage == 3 else 1):
        module = {n: (torch.empty(0) if stage == 3 else p.half()) for n, p in params.items()}
        module["head.weight"] = module["emb.weight"]  # tied: the same tensor
        module.update({"frozen.weight": frozen if stage == 2 else torch.empty(0), "pos": buf})
        fragment = frozen if stage == 2 else _zero3_pieces(frozen, world)[r]
        torch.save({
            "module": {prefix + n: t for n, t in module.items()},
            "param_shapes": [OrderedDict((prefix + n, params[n].shape) for n in g) for g in GROUPS],
            "buffer_names": [prefix + "pos"],
            "shared_params": {prefix + "head.weight": prefix + "emb.weight"} if stage == 2 else {},
            "frozen_param_shapes": OrderedDict([(prefix + "frozen.weight", frozen.shape)]),
            "frozen_param_fragments": {prefix + "frozen.weight": fragment},
            "dp_world_size": world, "mp_world_size": 1,
            "ds_config": {"zero_optimization": {"stage": stage}}},
            tag / (f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" if stage == 3
                   else "mp_rank_00_model_states.pt"))
    return dict(params, **{"frozen.weight": frozen, "pos": buf})


@pytest.mark.parametrize("stage, world, prefix, align_pads", [
    (2, 3, "", False), (2, 3, "module.", True), (2, 1, "", True),
    (3, 3, "", False), (3, 3, "module.", False), (3, 2, "", False)])
def test_synthetic_zero_layouts(tmp_path, stage, world, prefix, align_pads):
    want = _write_zero(tmp_path / "save", stage, world, prefix, align_pads)
    ckpt = open_checkpoint(tmp_path / "save")
    got = ckpt.by_name()
    assert list(got) == ["emb.weight", "ln.weight", "fc.weight", "fc.bias", "out.weight",
                         "frozen.weight", "pos"]  # module order, prefix stripped, alias dropped
    assert ckpt.source["tied"] == {"head.weight": "emb.weight"}
    assert ckpt.source["zero_stage"] == stage and ckpt.source["tag"] == "global_step5"
    for name, t in got.items():
        value = t.load()
        assert t.shape == tuple(want[name].shape) and value.dtype == t.dtype == want[name].dtype
        assert torch.equal(value, want[name]), name


def test_synthetic_param_shapes_disagree_with_partitions(tmp_path):
    _write_zero(tmp_path / "save", 2, 3, "")
    path = tmp_path / "save/global_step5/mp_rank_00_model_states.pt"
    sd = torch.load(path, weights_only=True)
    sd["param_shapes"][1]["out.weight"] = torch.Size([40])
    torch.save(sd, path)
    with pytest.raises(CheckpointError,
                       match=r"optim_states\.pt: param group 1 needs .* different runs"):
        open_checkpoint(tmp_path / "save")


def test_synthetic_dp_world_size_disagrees(tmp_path):
    _write_zero(tmp_path / "save", 3, 3, "")
    for r in range(3):
        path = tmp_path / f"save/global_step5/zero_pp_rank_{r}_mp_rank_00_model_states.pt"
        sd = torch.load(path, weights_only=True)
        torch.save(dict(sd, dp_world_size=2), path)
    with pytest.raises(CheckpointError, match=r"model_states\.pt: dp_world_size is 2 but 3"):
        open_checkpoint(tmp_path / "save")

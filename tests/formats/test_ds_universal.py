"""DeepSpeed universal checkpoints (deepspeed.checkpoint.ds_to_universal's output).

tests/fixtures/ds_universal holds DeepSpeed 0.19.8's own conversion of the ZeRO-2 and ZeRO-3
GPT-2 saves in tests/fixtures/deepspeed/ws2: the fp32 masters must come back bit for bit.
Megatron-DeepSpeed universal folders are written by helpers/megatron_deepspeed.to_universal
from megatron-core's real TP-2 files (GPTModel's and GPTModelPipe's names): they must give the
legacy reading's tensors and the live model's logits."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import FIXTURES
from dsinfer.formats import CheckpointError, ReadOptions, detect, megatron, open_checkpoint
from dsinfer.formats.safe_pickle import load_pt
from helpers.checkpoints import hf_model, logits
from helpers.checkpoints import load_tensors as tensors
from helpers.megatron_deepspeed import (install_enums, legacy_ranks, mds_llama_args,
                                        plain_args, to_universal)

UNIVERSAL = FIXTURES / "ds_universal"
STAGES = ["gpt2_zero2", "gpt2_zero3"]
TAG = "global_step1_universal"
MEGATRON = FIXTURES / "megatron"


def _reference(name: str):
    return load_file(UNIVERSAL / name / "reference_fp32.safetensors")


def _assert_masters(ckpt, ref):
    """Every reference tensor bit for bit, GPT-2's lm_head tied to the embedding."""
    got = tensors(ckpt)
    assert set(ref) - set(got) == {"lm_head.weight"} and set(got) <= set(ref)
    if ckpt.format == "ds_universal":
        assert ckpt.source["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    for name, t in ckpt.by_name().items():
        assert t.dtype == torch.float32 and t.shape == tuple(ref[name].shape), name
        assert torch.equal(got[name], ref[name]), name


@pytest.mark.parametrize("name", STAGES)
def test_deepspeeds_own_conversion(name):
    root = UNIVERSAL / name
    for path in (root, root / TAG):
        assert detect(path) == "ds_universal"
        ckpt = open_checkpoint(path)
        assert ckpt.format == "ds_universal" and ckpt.config["model_type"] == "gpt2"
        assert {k: ckpt.source[k] for k in ("zero_stage", "tag", "dp_world_size", "weights")} \
            == {"zero_stage": int(name[-1]), "tag": TAG, "dp_world_size": 2,
                "weights": "fp32_master"}
        assert "config.json" in ckpt.extra_files
        _assert_masters(ckpt, _reference(name))


def test_the_converters_module_copies_are_not_masters():
    """ZeRO-2: ds_to_universal writes fp32.pt for lm_head too, a float() of the fp16 module
    tensor it shares with wte; the master is wte's, and lm_head stays tied to it."""
    zero = UNIVERSAL / "gpt2_zero2" / TAG / "zero"
    copy = load_pt(zero / "lm_head.weight" / "fp32.pt")["param"]
    master = load_pt(zero / "transformer.wte.weight" / "fp32.pt")["param"]
    assert not torch.equal(copy, master) and torch.equal(copy, master.half().float())
    got = open_checkpoint(UNIVERSAL / "gpt2_zero2").by_name()
    assert "lm_head.weight" not in got and torch.equal(got["transformer.wte.weight"].load(),
                                                       master)


def test_the_source_tag_is_read_first(tmp_path):
    """ROOT with DeepSpeed's `latest` and `latest_universal`: the source tag while it exists,
    the universal folder once it is gone."""
    root = Path(shutil.copytree(FIXTURES / "deepspeed/ws2/gpt2_zero2", tmp_path / "run"))
    shutil.copytree(UNIVERSAL / "gpt2_zero2" / TAG, root / TAG)
    shutil.copy(UNIVERSAL / "gpt2_zero2" / "latest_universal", root)
    assert detect(root) == "deepspeed"
    shutil.rmtree(root / "global_step1")
    assert detect(root) == "ds_universal"
    _assert_masters(open_checkpoint(root), _reference("gpt2_zero2"))


def test_tensor_parallel_training_run(tmp_path):
    """A run with TP 2 (DeepSpeed AutoTP): the converter merged the slices and copied both TP
    ranks' model states, whose mp_world_size is 2; the merged masters are read, not refused."""
    root = Path(shutil.copytree(UNIVERSAL / "gpt2_zero2", tmp_path / "run"))
    states = root / TAG / "mp_rank_00_model_states.pt"
    sd = dict(load_pt(states))
    sd["mp_world_size"] = 2
    for r in (0, 1):   # saved aside, then renamed: `sd` maps the old file's pages
        torch.save(sd, root / "states.pt")
        (root / "states.pt").replace(root / TAG / f"mp_rank_{r:02d}_model_states.pt")
    _assert_masters(open_checkpoint(root), _reference("gpt2_zero2"))


def test_buffers_come_from_the_module(tmp_path):
    """A persistent buffer (BERT's int64 position_ids, say): ds_to_universal also writes it as a
    float() fp32.pt; the reader takes the module's own tensor, in its own dtype."""
    root = Path(shutil.copytree(UNIVERSAL / "gpt2_zero2", tmp_path / "run"))
    states = root / TAG / "mp_rank_00_model_states.pt"
    sd = dict(load_pt(states))
    ids = torch.arange(64).unsqueeze(0)
    sd["module"] = {**sd["module"], "transformer.position_ids": ids}
    sd["buffer_names"] = [*(sd.get("buffer_names") or []), "transformer.position_ids"]
    torch.save(sd, root / "states.pt")   # aside, then renamed: `sd` maps the old file's pages
    (root / "states.pt").replace(states)
    (root / TAG / "zero" / "transformer.position_ids").mkdir()
    torch.save({"param": ids.float()}, root / TAG / "zero" / "transformer.position_ids" / "fp32.pt")
    got = open_checkpoint(root).by_name()["transformer.position_ids"]
    assert got.dtype == torch.int64 and torch.equal(got.load(), ids)


def test_cli_reshards_it_and_init_inference_serves_it(tmp_path):
    import dsinfer
    root, ref = UNIVERSAL / "gpt2_zero3", _reference("gpt2_zero3")
    out = tmp_path / "tp2"
    r = subprocess.run([sys.executable, "-m", "dsinfer.tools.reshard", str(root), "--out",
                        str(out), "--tp", "2", "--quiet"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    _assert_masters(open_checkpoint(out), ref)
    config = transformers.GPT2Config.from_pretrained(root)
    with torch.device("meta"):
        skeleton = transformers.GPT2LMHeadModel(config)
    engine = dsinfer.init_inference(skeleton, dtype=torch.float32, checkpoint=str(root),
                                    replace_with_kernel_inject=True)
    model = hf_model({**config.to_dict(), "architectures": ["GPT2LMHeadModel"]}, ref)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(engine.module(ids).logits, model(ids).logits,
                                   rtol=1e-4, atol=1e-4)


# ---- damaged folders -------------------------------------------------------------------------

def _damage_zero3_shape(tag: Path):
    torch.save(torch.zeros(5), tag / "zero" / "transformer.h.0.mlp.c_fc.weight" / "fp32.pt")


DAMAGE = [
    ("gpt2_zero2", lambda t: (t / "zero" / "transformer.h.1.ln_2.bias" / "fp32.pt").unlink(),
     r"transformer.h.1.ln_2.bias/fp32.pt: missing, so parameter 'transformer.h.1.ln_2.bias' "
     r"has no weights"),
    ("gpt2_zero2", lambda t: shutil.rmtree(t / "zero" / "transformer.wpe.weight"),
     r"transformer.wpe.weight/fp32.pt: missing; the model states list 'transformer.wpe.weight' "
     r"as a trained parameter"),
    ("gpt2_zero2", lambda t: (t / "mp_rank_00_model_states.pt").unlink(),
     r"no mp_rank_00_model_states.pt .*which ds_to_universal copies from the source tag"),
    ("gpt2_zero3", lambda t: (t / "zero_pp_rank_1_mp_rank_00_model_states.pt").unlink(),
     r"zero_pp_rank_1_mp_rank_00_model_states.pt: missing; copy every data-parallel rank's"),
    ("gpt2_zero3", _damage_zero3_shape,
     r"c_fc.weight/fp32.pt: 5 values, but the model states give the parameter the shape "
     r"\[64, 256\]"),
    ("gpt2_zero2", lambda t: torch.save([1, 2], t / "zero" / "transformer.wte.weight" / "fp32.pt"),
     r"transformer.wte.weight/fp32.pt: holds a list, not a parameter"),
    ("gpt2_zero2", lambda t: torch.save({"exp_avg": torch.ones(1)},
                                        t / "zero" / "transformer.wte.weight" / "fp32.pt"),
     r"holds a dict with keys \['exp_avg'\], not a parameter"),
    ("gpt2_zero2", lambda t: (t.parent / "latest_universal").write_text("../elsewhere"),
     None),   # the tag folder itself is still read when passed
]


@pytest.mark.parametrize("name, damage, needle", DAMAGE)
def test_damaged_universal_folder(tmp_path, name, damage, needle):
    root = Path(shutil.copytree(UNIVERSAL / name, tmp_path / name))
    damage(root / TAG)
    if needle is None:
        _assert_masters(open_checkpoint(root / TAG), _reference(name))
        return
    with pytest.raises(CheckpointError, match=needle):
        tensors(open_checkpoint(root))


@pytest.mark.parametrize("text, needle", [
    ("../elsewhere", r"latest_universal: holds '../elsewhere', not a folder name"),
    ("global_step9_universal", r"names 'global_step9_universal' but .* is missing"),
    (b"\xff\xfe\x00", r"latest_universal: not a tag file"),
])
def test_bad_latest_universal(tmp_path, text, needle):
    root = Path(shutil.copytree(UNIVERSAL / "gpt2_zero2", tmp_path / "run"))
    if isinstance(text, bytes):
        (root / "latest_universal").write_bytes(text)
    else:
        (root / "latest_universal").write_text(text)
    with pytest.raises(CheckpointError, match=needle):
        open_checkpoint(root)


def test_unfinished_conversion(tmp_path):
    root = Path(shutil.copytree(UNIVERSAL / "gpt2_zero2", tmp_path / "run"))
    for f in (root / TAG / "zero").glob("*/fp32.pt"):
        f.unlink()
    assert detect(root) == "ds_universal"
    with pytest.raises(CheckpointError, match=r"no zero/<param>/fp32.pt files; the conversion "
                                              r"did not finish"):
        open_checkpoint(root)


# ---- Megatron-DeepSpeed ----------------------------------------------------------------------

@pytest.mark.parametrize("pipe", [False, True], ids=["GPTModel", "GPTModelPipe"])
def test_megatron_gpt2_vocab_padding_cut(tmp_path, pipe):
    """megatron-core's TP 2 GPT-2 (tied, biases, learned positions, vocabulary 100 padded to
    128): the universal folder holds 100 rows; tensors equal the legacy reading cut to 100."""
    ranks = legacy_ranks(MEGATRON / "gpt2_tp2", 2)
    root = to_universal([r["model"] for r in ranks], tmp_path / "mds",
                        plain_args(ranks[0]["args"]), vocab=100, pipe=pipe)
    assert detect(root) == "ds_universal"
    ckpt = open_checkpoint(root)
    legacy = megatron.read(MEGATRON / "gpt2_tp2", ReadOptions(vocab_size=100))
    got, want = tensors(ckpt), tensors(legacy)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert ckpt.config == legacy.config and ckpt.config["vocab_size"] == 100
    assert ckpt.source["layout"] == "deepspeed universal" and ckpt.source["trained_tp_pp"] == \
        [2, 1]
    oracle = load_file(MEGATRON / "gpt2_tp2" / "oracle.safetensors")
    out = logits(hf_model(ckpt.config, got), oracle["input_ids"])
    want_logits = oracle["logits"][..., :100]
    assert (out - want_logits).abs().max() <= 1e-4 * want_logits.abs().max()


def test_megatron_deepspeed_llama_pipeline(tmp_path, monkeypatch):
    """megatron-core's TP 2 Llama (GQA, SwiGLU, RoPE, untied head) as a GPTModelPipe with
    Megatron-DeepSpeed's args: SwiGLU's fc1 merged per half, the head as <index>.lm_head."""
    enums = install_enums(monkeypatch)
    ranks = legacy_ranks(MEGATRON / "llama_tp2", 2)
    args = mds_llama_args(ranks[0]["args"])
    args.position_embedding_type = enums.absolute
    root = to_universal([r["model"] for r in ranks], tmp_path / "mds", args, vocab=128,
                        pipe=True)
    names = {p.name for p in (root / "global_step7_universal" / "zero").iterdir()}
    assert {"1.word_embeddings.weight", "2.mlp.dense_h_to_4h.weight", "6.weight",
            "7.lm_head.weight"} <= names
    ckpt = open_checkpoint(root)
    legacy = megatron.read(MEGATRON / "llama_tp2", ReadOptions())
    got, want = tensors(ckpt), tensors(legacy)
    assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in got)
    assert ckpt.config == legacy.config
    oracle = load_file(MEGATRON / "llama_tp2" / "oracle.safetensors")
    out = logits(hf_model(ckpt.config, got), oracle["input_ids"])
    assert (out - oracle["logits"]).abs().max() <= 1e-4 * oracle["logits"].abs().max()


@pytest.fixture
def gpt2_pipe_universal(tmp_path) -> Path:
    ranks = legacy_ranks(MEGATRON / "gpt2_tp2", 2)
    return to_universal([r["model"] for r in ranks], tmp_path / "mds",
                        plain_args(ranks[0]["args"]), vocab=100, pipe=True)


@pytest.mark.parametrize("damage, needle", [
    (lambda z: [shutil.rmtree(p) for p in z.glob("3.*")],
     r"zero/3\.\*: missing; the args say num_layers=2 but there are 1 transformer blocks"),
    (lambda z: [shutil.rmtree(p) for p in z.glob("[23].*")],
     r"no transformer block parameters"),
    (lambda z: shutil.copytree(z / "2.input_layernorm.weight", z / "pooler.dense.weight"),
     r"zero/pooler.dense.weight: a parameter outside GPTModelPipe's layers"),
    (lambda z: shutil.copytree(z / "2.input_layernorm.weight", z / "3.rotary.freqs"),
     r"zero/3\.\*: a pipeline layer with tensors"),
])
def test_damaged_megatron_universal(gpt2_pipe_universal, damage, needle):
    damage(gpt2_pipe_universal / "global_step7_universal" / "zero")
    with pytest.raises(CheckpointError, match=needle):
        tensors(open_checkpoint(gpt2_pipe_universal))

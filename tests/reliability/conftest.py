"""Shared sources for the reliability tests: tiny checkpoints of every source layout, built once
per session under one root (so messages can show it as <tmp>), plus a bigger HF model whose
conversion takes long enough to be killed in the middle."""
import json
import shutil
from pathlib import Path

import pytest
import torch

import reliability_support as rs
from helpers import hf_models
from helpers.megatron_writer import write_megatron

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("rel")


@pytest.fixture(scope="session")
def sources(root) -> dict:
    """name -> path of an untouched source checkpoint (tests copy before damaging one)."""
    src = root / "src"
    out = {}
    gpt2 = hf_models.build("gpt2")
    out["gpt2"] = hf_models.save(gpt2, src / "gpt2")
    out["llama"] = hf_models.save(hf_models.build("llama"), src / "llama")
    state = {n: p.detach().clone() for n, p in gpt2.named_parameters()}
    out["gpt2_bin"] = src / "gpt2_bin"          # legacy HF layout: config.json + pytorch_model.bin
    out["gpt2_bin"].mkdir()
    shutil.copy(out["gpt2"] / "config.json", out["gpt2_bin"] / "config.json")
    torch.save(gpt2.state_dict(), out["gpt2_bin"] / "pytorch_model.bin")
    out["megatron"] = write_megatron(src / "megatron", state, gpt2.config.to_dict(), tp=2)
    out["deepspeed"] = Path(shutil.copytree(FIXTURES / "deepspeed" / "ws1" / "gpt2_zero0",
                                            src / "deepspeed"))
    from dsinfer.reshard import reshard
    out["gpt2_tp2"] = reshard(out["gpt2"], src / "gpt2_tp2", tp=2, progress=False).out
    out["llama_tp2"] = reshard(out["llama"], src / "llama_tp2", tp=2, progress=False).out
    return out


@pytest.fixture(scope="session")
def big_hf(root) -> Path:
    """A GPT-2 of ~100 MB fp32 written straight to safetensors (no model init): converting it
    takes about a second, a window wide enough to kill the converter at chosen points."""
    import transformers as tf
    from safetensors.torch import save_file
    cfg = tf.GPT2Config(n_embd=512, n_layer=8, n_head=8, n_positions=128, vocab_size=4096,
                        bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        model = tf.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(p.shape, generator=g) * 0.02 for n, p in model.named_parameters()
             if n != "lm_head.weight"}
    folder = root / "src" / "big"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


@pytest.fixture
def fresh(root, request) -> Path:
    """An empty folder under the session root, named after the test."""
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in request.node.name)[:80]
    path = root / "t" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(autouse=True)
def _sources_untouched(request):
    """Every test: no session source changes (the source checkpoint is never modified)."""
    if "sources" not in request.fixturenames and "big_hf" not in request.fixturenames:
        yield
        return
    srcs = dict(request.getfixturevalue("sources")) if "sources" in request.fixturenames else {}
    if "big_hf" in request.fixturenames:
        srcs["big"] = request.getfixturevalue("big_hf")
    before = {k: rs.tree_hash(p) for k, p in srcs.items()}
    yield
    after = {k: rs.tree_hash(p) for k, p in srcs.items()}
    assert after == before, "a source checkpoint was modified"


@pytest.fixture(scope="session")
def memo() -> dict:
    """Results shared by tests of one session (a slow run done once, asserted twice)."""
    return {}

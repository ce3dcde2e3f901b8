"""The LM head inside a decode step (dsinfer/inject/head.py, DECODE_HEAD["in_step"]): the
decoder computes the logits of each one-token step itself (on a GPU inside the step's CUDA
graph; here eagerly) and HF's own head call is answered with them. Tokens must equal plain
HF's, the head must really be served, and calls on other hidden states must run the head."""
import copy

import pytest
import torch

import dsinfer
from dsinfer.inject.head import DECODE_HEAD, same_view
from helpers import hf_models

GEN = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)


@pytest.fixture
def in_step(monkeypatch):
    monkeypatch.setitem(DECODE_HEAD, "in_step", True)


def _decoder(engine):
    return next(m.dsinfer_decoder for m in engine.module.modules()
                if hasattr(m, "dsinfer_decoder"))


@pytest.mark.parametrize("lookahead", ["0", "1"], ids=["plain", "lookahead"])
@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("gpt2", {}), ("bloom", {}), ("opt", dict(word_embed_proj_dim=32))],
    ids=["llama", "gpt2", "bloom", "opt-project-out"])
def test_head_in_step_serves_hf_and_changes_nothing(in_step, monkeypatch, arch, overrides,
                                                    lookahead):
    monkeypatch.setenv("DSINFER_LOOKAHEAD", lookahead)
    ref = hf_models.build(arch, **overrides)
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    dec = _decoder(engine)
    ids = hf_models.inputs(ref)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                               # a left-padded row too
    want = ref.generate(ids, attention_mask=mask, **GEN)
    assert torch.equal(want, engine.module.generate(ids, attention_mask=mask, **GEN))
    assert dec.head.served == GEN["max_new_tokens"] - 1   # every decode step (not the prefill)


def test_head_not_in_eager_steps_by_default_and_other_calls_run_the_head(monkeypatch):
    """The default ("auto") puts the head in the step only where CUDA graphs capture it; on a
    CPU the decoder leaves it to HF's call."""
    monkeypatch.setenv("DSINFER_LOOKAHEAD", "0")
    ref = hf_models.build("llama")
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    dec = _decoder(engine)
    ids = hf_models.inputs(ref)["input_ids"][:1]
    engine.module.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    assert dec.head.served == 0 and DECODE_HEAD["in_step"] == "auto" and not dec.head_in_step()
    head = engine.module.get_output_embeddings()
    h = torch.randn(1, 1, ref.config.hidden_size)
    logits = torch.randn(1, 1, ref.config.vocab_size)
    dec.head.serve(h, logits)
    other = h.clone()
    with torch.no_grad():
        assert not torch.equal(head(other), logits)   # another tensor: the head runs
        dec.head.serve(h, logits)
        assert head(h) is logits and dec.head.served == 1
        assert not torch.equal(head(h), logits)       # served once only


def test_same_view():
    a = torch.zeros(2, 3, 4)
    assert same_view(a, a) and same_view(a[:, -1:], a[:, 2:])
    assert not same_view(a[:, :1], a[:, :2]) and not same_view(a.clone(), a)

"""Look-ahead decoding (dsinfer/inject/lookahead.py): the next decode step runs with a guessed
token while `generate` is still choosing it. Forced on for these CPU tests (DSINFER_LOOKAHEAD=1:
eager guessed steps instead of graph replays, the same bookkeeping). Whatever the guesses, the
tokens must equal plain HF's; greedy guesses must actually be served (hits), and a sequence that
misses must stop guessing."""
import copy

import pytest
import torch

import dsinfer
from dsinfer.inject import lookahead
from helpers import hf_models

GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)


@pytest.fixture(autouse=True)
def forced(monkeypatch):
    monkeypatch.setenv("DSINFER_LOOKAHEAD", "1")


def engine_for(ref):
    engine = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True)
    la = next(m.dsinfer_decoder for m in engine.module.modules()
              if hasattr(m, "dsinfer_decoder")).lookahead
    assert la is not None
    return engine, la


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("gpt2", {}), ("bloom", {}), ("gpt_neo", {}), ("gptj", {}),
    ("opt", dict(word_embed_proj_dim=32))],        # OPT's body projects its output (project_out)
    ids=["llama", "gpt2", "bloom", "gpt_neo", "gptj", "opt-project-out"])
def test_greedy_guesses_are_served_and_change_nothing(arch, overrides):
    ref = hf_models.build(arch, **overrides)
    engine, la = engine_for(ref)
    ids = hf_models.inputs(ref)["input_ids"]
    mask = torch.ones_like(ids)
    want = ref.generate(ids, attention_mask=mask, **GEN)
    for _ in range(2):                            # a second sequence: fresh epoch, same result
        assert torch.equal(want, engine.module.generate(ids, attention_mask=mask, **GEN))
    # 15 decode steps a sequence: the first is not guessed, every later one is (the guess after
    # the last step is never asked for)
    assert la.stats["misses"] == 0 and la.stats["hits"] == 2 * 14, la.stats


def test_left_padded_batch():
    ref = hf_models.build("llama")
    engine, la = engine_for(ref)
    ids = hf_models.inputs(ref)["input_ids"]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(GEN, attention_mask=mask)
    assert torch.equal(ref.generate(ids, **kw), engine.module.generate(ids, **kw))
    assert la.stats["hits"] == 14 and la.stats["misses"] == 0, la.stats


@pytest.mark.parametrize("extra", [dict(do_sample=True, top_k=5, num_return_sequences=2),
                                   dict(num_beams=3, num_return_sequences=2),
                                   dict(prompt_lookup_num_tokens=3),
                                   dict(repetition_penalty=3.0)],
                         ids=["sampling", "beams", "assisted", "repetition"])
def test_other_decoding_modes_equal_hf(extra):
    """Sampling, beam search (cache reordering), prompt-lookup (crop) and a logits processor
    that moves the argmax: a guess that misses is recomputed with the real token."""
    ref = hf_models.build("llama")
    engine, la = engine_for(ref)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([ids, ids, ids], dim=1)
    kw = {**GEN, **extra}
    torch.manual_seed(0)
    want = ref.generate(ids, **kw)
    torch.manual_seed(0)
    assert torch.equal(want, engine.module.generate(ids, **kw)), la.stats


def test_wrong_guesses_are_recomputed_and_stop(monkeypatch):
    """Every guess made wrong on purpose: the output is still HF's, and after its first miss the
    sequence guesses no more (a wrong guess costs a step of GPU time each)."""
    real = lookahead.Lookahead._launch

    def off_by_one(self, last, logits):
        real(self, last, logits)
        self.guess.ids = (self.guess.ids + 1) % logits.shape[-1]
    monkeypatch.setattr(lookahead.Lookahead, "_launch", off_by_one)
    ref = hf_models.build("gpt2")
    engine, la = engine_for(ref)
    ids = hf_models.inputs(ref)["input_ids"]
    mask = torch.ones_like(ids)
    assert torch.equal(ref.generate(ids, attention_mask=mask, **GEN),
                       engine.module.generate(ids, attention_mask=mask, **GEN))
    assert la.stats == {"guessed": 1, "hits": 0, "misses": 1}, la.stats


def test_manual_loop_and_abandoned_guess():
    """A hand-written decode loop gets the guesses too; a new sequence started while a guess is
    pending drops it."""
    from dsinfer.inject.decoder import CACHE_FIELD
    ref = hf_models.build("llama")
    engine, la = engine_for(ref)
    ids = hf_models.inputs(ref)["input_ids"][:1]
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
        for _ in range(2):
            out = engine.module(ids, use_cache=True)
            seq = ids
            for _ in range(16):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
                out = engine.module(nxt, use_cache=True, **{CACHE_FIELD: out[CACHE_FIELD]})
            assert la.guess is not None               # the guess after the last step ...
            assert torch.equal(want, seq)             # ... dropped by the next prefill
    assert la.stats["hits"] == 2 * 15 and la.stats["misses"] == 0, la.stats


def test_off_switch(monkeypatch):
    monkeypatch.setenv("DSINFER_LOOKAHEAD", "0")
    engine = dsinfer.init_inference(hf_models.build("gpt2"), replace_with_kernel_inject=True)
    assert engine.module.transformer.dsinfer_decoder.lookahead is None

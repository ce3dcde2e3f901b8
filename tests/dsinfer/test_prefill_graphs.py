"""Prefill graphs (dsinfer/inject/graphs.py): a new sequence's prompt runs right-padded to its
bucket and gives HF's logits and greedy tokens, for every causal family.

CUDA graphs need a GPU. Here DecodeGraphs runs with a stand-in recorder: its "capture" keeps
the step and its replay runs the step again into the tensors the capture returned. So the
bucketing, the static input buffers (whose padding holds an earlier, longer prompt's tokens
when a bucket is reused), the slicing and the decoder's routing are the shipped code; only
the CUDA capture itself is not (tests/dsinfer/test_inject_gpu.py covers it on a GPU).
"""
import copy

import pytest
import torch

import dsinfer
from dsinfer.inject import graphs as G
from helpers import hf_models

GEN = dict(max_new_tokens=16, min_new_tokens=16, do_sample=False)


def rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


class Replayed:
    """A 'graph' that re-runs its step into the outputs of the first run."""

    def __init__(self, step):
        self.step = step
        self.out = step()

    def replay(self) -> None:
        for mine, new in zip(_tensors(self.out), _tensors(self.step())):
            mine.copy_(new)


def _tensors(x):
    return [t for t in (x if isinstance(x, tuple) else (x,)) if t is not None]


class EagerGraphs(G.DecodeGraphs):
    def _record(self, step):
        graph = Replayed(step)
        self.tables = self.decoder.cos
        return graph, graph.out


def with_graphs(arch: str):
    ref = hf_models.build(arch)
    model = dsinfer.init_inference(copy.deepcopy(ref), replace_with_kernel_inject=True).module
    dec = next(m.dsinfer_decoder for m in model.modules() if hasattr(m, "dsinfer_decoder"))
    dec.graphs = EagerGraphs(dec)
    return ref, model, dec


def test_buckets():
    assert [G.prefill_bucket(s) for s in (1, 2, 8, 9, 33, 64, 65, 128, 129, 500)] == \
        [8, 8, 8, 16, 64, 64, 128, 128, 192, 512]


@pytest.mark.parametrize("arch", hf_models.CAUSAL)
def test_padded_prefill_equals_hf(arch):
    ref, model, dec = with_graphs(arch)
    g = torch.Generator().manual_seed(3)
    # 13 then 9 share the 16-token graph: the 9-token prompt's padding holds the 13's tokens
    for S in (3, 13, 9, 40):
        ids = torch.randint(0, ref.config.vocab_size, (2, S), generator=g)
        with torch.no_grad():
            assert rel(ref(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-4, S
        assert torch.equal(ref.generate(ids, **GEN), model.generate(ids, **GEN)), S
    assert sorted(dec.graphs.prefills) == [(2, 8), (2, 16), (2, 64)]


def test_least_recently_used_graphs_are_dropped(monkeypatch):
    ref, model, dec = with_graphs("llama")
    monkeypatch.setitem(G.PREFILL, "kept", 2)
    g = torch.Generator().manual_seed(4)
    for S in (5, 12, 5, 30, 12):         # buckets 8, 16, 8, 32, 16
        ids = torch.randint(0, ref.config.vocab_size, (1, S), generator=g)
        with torch.no_grad():
            assert rel(ref(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-4, S
    assert list(dec.graphs.prefills) == [(1, 32), (1, 16)]


def test_what_runs_eagerly(monkeypatch):
    """Left padding, an explicit use_cache=False and prompts past the token limit run the
    eager prefill (and still equal HF)."""
    ref, model, dec = with_graphs("llama")
    ids = hf_models.inputs(ref)["input_ids"]                     # [2, 12]
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(GEN, attention_mask=mask, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), model.generate(ids, **kw))
    with torch.no_grad():
        assert rel(ref(input_ids=ids).logits, model(input_ids=ids, use_cache=False).logits) <= 1e-4
    monkeypatch.setitem(G.PREFILL, "max_tokens", 16)            # 2 x 16 > 16
    assert torch.equal(ref.generate(ids, **GEN), model.generate(ids, **GEN))
    assert not dec.graphs.prefills
    monkeypatch.setitem(G.PREFILL, "max_tokens", 2048)
    assert torch.equal(ref.generate(ids, **GEN), model.generate(ids, **GEN))
    assert list(dec.graphs.prefills) == [(2, 16)]


def test_a_failed_prefill_capture_keeps_decode_graphs(caplog):
    """A refused prefill capture warns once; prompts then run eagerly, decode steps still
    replay graphs."""
    ref, model, dec = with_graphs("gpt2")

    class RefusesPrefill(EagerGraphs):
        refuse = False

        def _record(self, step):
            if self.refuse:
                raise RuntimeError("operation not permitted when stream is capturing")
            return super()._record(step)

        def _capture_prefill(self, B, n):
            self.refuse = True
            try:
                return super()._capture_prefill(B, n)
            finally:
                self.refuse = False

    dec.graphs = RefusesPrefill(dec)
    ids = hf_models.inputs(ref)["input_ids"]
    for _ in range(2):
        assert torch.equal(ref.generate(ids, **GEN), model.generate(ids, **GEN))
    assert caplog.text.count("prefill failed") == 1, caplog.text
    assert dec.graphs.prefill_failed and not dec.graphs.prefills and dec.graphs.graphs


"""Kernel injection on the GPU (`pytest -m gpu`): the fused blocks run the Triton kernels.
fp16 logits within 2e-2 of HF fp16 on the same weights; fp32 within 1e-3 with the same greedy
tokens; CUDA-graph decode gives exactly the eager fused tokens; int8 within 2e-2 of HF on the
dequantized weights."""
import copy

import pytest
import torch

import dsinfer
from dsinfer.inject.decoder import CACHE_FIELD
from dsinfer.quantize import QuantConfig, dequantized_state_dict, quantize
from helpers import hf_models

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
GEN = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


def engine(ref, **kw):
    return dsinfer.init_inference(copy.deepcopy(ref).cpu(), replace_with_kernel_inject=True, **kw)


@pytest.fixture
def exact_prompts(monkeypatch):
    """Prompts run eagerly in graphed engines too, so graphed tokens can equal eager ones
    bit for bit: a prefill graph runs the prompt padded to its bucket (other GEMM tilings,
    fp16 rounding that can flip a near-tie token of a random model)."""
    from dsinfer.inject import graphs
    monkeypatch.setitem(graphs.PREFILL, "on", False)


@pytest.mark.parametrize("arch", hf_models.CAUSAL)
def test_fp16_logits_and_graphs(arch, exact_prompts):
    ref = hf_models.build(arch).half().cuda()
    x = {k: v.cuda() for k, v in hf_models.inputs(ref).items()}
    eager = engine(ref, dtype=torch.float16)
    graphed = engine(ref, dtype=torch.float16, enable_cuda_graph=True)
    with torch.no_grad():
        assert rel(ref(**x).logits, eager.module(**x).logits) <= 2e-2
    ids = x["input_ids"]
    # an explicit all-ones mask: random ids may contain the pad token (OPT's is 1), and generate
    # would then mask those keys, and a padded batch decodes without graphs
    ones = torch.ones_like(ids)
    a = eager.module.generate(ids, attention_mask=ones, **GEN)
    b = graphed.module.generate(ids, attention_mask=ones, **GEN)
    assert torch.equal(a, b), arch
    decoder = next(m.dsinfer_decoder for m in graphed.module.modules()
                   if hasattr(m, "dsinfer_decoder"))
    assert decoder.graphs.graphs, "no graph captured"
    # guessed steps (lookahead.py) from the second decode step (the first captures the graph)
    la = decoder.lookahead.stats
    assert la["hits"] >= GEN["max_new_tokens"] - 3 and la["misses"] <= 1, la
    # the LM head ran inside the captured steps (head.py "auto"): HF's head calls were served
    assert decoder.head.served >= GEN["max_new_tokens"] - 3, decoder.head.served


@pytest.mark.parametrize("extra", [dict(do_sample=True, top_k=5, num_return_sequences=2),
                                   dict(num_beams=3), dict(repetition_penalty=3.0)],
                         ids=["sampling", "beams", "repetition"])
def test_graphs_with_missed_guesses(extra, exact_prompts):
    """Decoding whose next token is not the argmax: guessed steps miss and are recomputed from
    the graph with the real token (same cache slot); tokens equal the eager fused model's."""
    ref = hf_models.build("llama").half().cuda()
    ids = hf_models.inputs(ref)["input_ids"][:1].cuda()
    kw = dict(GEN, attention_mask=torch.ones_like(ids), pad_token_id=0, **extra)
    eager = engine(ref, dtype=torch.float16)
    graphed = engine(ref, dtype=torch.float16, enable_cuda_graph=True)
    for _ in range(2):                   # the second call replays graphs from its first step
        torch.manual_seed(0)
        want = eager.module.generate(ids, **kw)
        torch.manual_seed(0)
        assert torch.equal(want, graphed.module.generate(ids, **kw)), extra


@pytest.mark.parametrize("arch", ["llama", "gpt_neo", "bloom"])
def test_left_padded_batch_replays_graphs(arch, exact_prompts):
    """A left-padded batch decodes from CUDA graphs (each row's padding length is a graph
    input) with the eager fused tokens, which equal HF's on CPU (test_inject.py)."""
    ref = hf_models.build(arch).half().cuda()
    ids = hf_models.inputs(ref)["input_ids"].cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    kw = dict(GEN, attention_mask=mask, pad_token_id=0)
    eager = engine(ref, dtype=torch.float16)
    graphed = engine(ref, dtype=torch.float16, enable_cuda_graph=True)
    assert torch.equal(eager.module.generate(ids, **kw), graphed.module.generate(ids, **kw))
    decoder = next(m.dsinfer_decoder for m in graphed.module.modules()
                   if hasattr(m, "dsinfer_decoder"))
    assert decoder.graphs.graphs, "no graph captured"
    # the same graph serves an unpadded batch next (its padding lengths reset to zero)
    ones = torch.ones_like(ids)
    assert torch.equal(eager.module.generate(ids, attention_mask=ones, **GEN),
                       graphed.module.generate(ids, attention_mask=ones, **GEN))


@pytest.mark.parametrize("arch", hf_models.CAUSAL)
def test_prefill_graphs(arch):
    """Prompts from prefill graphs (padded to their bucket): logits within 2e-2 of HF fp16,
    within 1e-2 of the eager fused prompt, and generate runs on from them."""
    ref = hf_models.build(arch).half().cuda()
    eager = engine(ref, dtype=torch.float16)
    graphed = engine(ref, dtype=torch.float16, enable_cuda_graph=True)
    decoder = next(m.dsinfer_decoder for m in graphed.module.modules()
                   if hasattr(m, "dsinfer_decoder"))
    g = torch.Generator().manual_seed(5)
    for S in (5, 12, 9, 40):
        ids = torch.randint(1, ref.config.vocab_size, (2, S), generator=g).cuda()
        with torch.no_grad():
            want = ref(input_ids=ids).logits
            got = graphed.module(input_ids=ids).logits
            assert rel(want, got) <= 2e-2, (arch, S)
            assert rel(eager.module(input_ids=ids).logits, got) <= 1e-2, (arch, S)
        out = graphed.module.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
        assert out.shape == (2, S + GEN["max_new_tokens"])
    assert sorted(decoder.graphs.prefills) == [(2, 8), (2, 16), (2, 64)], arch


@pytest.mark.parametrize("arch", hf_models.CAUSAL)
def test_fp32_equals_hf(arch):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = hf_models.build(arch).cuda()
    x = {k: v.cuda() for k, v in hf_models.inputs(ref).items()}
    eng = engine(ref, enable_cuda_graph=True)
    with torch.no_grad():
        assert rel(ref(**x).logits, eng.module(**x).logits) <= 1e-3
    assert torch.equal(ref.generate(x["input_ids"], **GEN), eng.module.generate(x["input_ids"], **GEN))


def test_int8_matches_dequantized_hf(tmp_path):
    src = hf_models.save(hf_models.build("llama"), tmp_path / "hf")
    quantize(src, tmp_path / "int8", QuantConfig(groups="per-channel"), tp=1, progress=False)
    ref = hf_models.build("llama")
    ref.load_state_dict(dequantized_state_dict(tmp_path / "int8"), strict=False)
    ref = ref.half().cuda()
    with torch.device("meta"):
        meta = type(ref)(ref.config)
    eng = dsinfer.init_inference(meta, checkpoint=str(tmp_path / "int8"), dtype=torch.float16,
                                 replace_with_kernel_inject=True, enable_cuda_graph=True)
    blocks = [m for m in eng.module.modules() if type(m).__name__ == "BlockModule"]
    assert blocks and all(m.block.w.qkv.scale is not None for m in blocks)   # int8 kernels
    x = {k: v.cuda() for k, v in hf_models.inputs(ref).items()}
    with torch.no_grad():
        assert rel(ref(**x).logits, eng.module(**x).logits) <= 2e-2
    eng.module.generate(x["input_ids"], **GEN)            # graph capture over int8 kernels


@pytest.mark.parametrize("arch", ["llama", "gpt_neo"])
@pytest.mark.parametrize("int8", [False, True])
def test_batch1_decode_with_activation_epilogue(arch, int8):
    """Batch 1: each decode GEMM is a GEMV with the MLP activation in its epilogue. A decode
    step's logits equal those with the activation kernel after the GEMM (fp16: one rounding
    less, within 1e-2), and generate captures and replays graphs over it."""
    from dsinfer.kernels import int8_gemm
    ref = hf_models.build(arch).half().cuda()
    ids = hf_models.inputs(ref)["input_ids"][:1].cuda()
    kw = dict(dtype=torch.float16)
    if int8:
        kw["quantization_setting"] = QuantConfig(groups="per-channel")
    eng = engine(ref, enable_cuda_graph=True, **kw)

    def step(fused: bool) -> torch.Tensor:
        int8_gemm.DECODE_PATHS["act_epilogue"] = fused
        try:
            with torch.no_grad():
                out = eng.module(input_ids=ids, use_cache=True)
                cache = getattr(out, CACHE_FIELD, None) or out.past_key_values
                nxt = out.logits[:, -1:].argmax(-1)
                return eng.module(input_ids=nxt, use_cache=True, **{CACHE_FIELD: cache}).logits
        finally:
            int8_gemm.DECODE_PATHS["act_epilogue"] = True

    assert rel(step(False), step(True)) <= 1e-2
    eng.module.generate(ids, attention_mask=torch.ones_like(ids), **GEN)
    decoder = next(m.dsinfer_decoder for m in eng.module.modules()
                   if hasattr(m, "dsinfer_decoder"))
    assert decoder.graphs.graphs, "no graph captured"


@pytest.mark.parametrize("layout,heads,kv_heads,D,rope", [
    ("packed", 32, 8, 128, ("neox", 128)),        # Llama-3 GQA
    ("packed", 16, 16, 256, ("gptj", 64)),        # GPT-J: partial interleaved
    ("per_head", 32, 32, 80, ("neox", 20)),       # GPT-NeoX (Pythia): partial, per-head QKV
    ("packed", 20, 20, 128, None)])               # GPT-Neo: no RoPE
def test_qkv_to_cache_real_shapes(layout, heads, kv_heads, D, rope):
    from dsinfer import kernels
    B, S, L, start = 2, 3, 64, 17
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(B, S, (heads + 2 * kv_heads) * D, device="cuda", generator=g).half()
    kc = torch.randn(B, kv_heads, L, D, device="cuda", generator=g).half()
    vc = torch.randn_like(kc)
    pos = torch.randint(0, 500, (B, S), device="cuda", generator=g)
    cos, sin = kernels.rotary_cache(512, rope[1], device="cuda") if rope else (None, None)
    style, rdim = rope if rope else ("neox", 0)
    slot = torch.tensor([start], dtype=torch.int32, device="cuda")
    want = [t.clone() for t in (qkv, kc, vc)]
    kernels.qkv_to_cache_ref(*want, slot, pos, heads, kv_heads, D, layout, cos, sin, style, rdim)
    kernels.qkv_to_cache(qkv, kc, vc, slot, pos, heads, kv_heads, D, layout, cos, sin, style,
                         rdim)
    for got, ref in zip((qkv, kc, vc), want):
        assert rel(ref, got) <= 1e-2


@pytest.mark.parametrize("n,k", [(4096, 4096), (12288, 4096), (2560, 10240), (50257, 2560)])
@pytest.mark.parametrize("rows", [1, 8])
def test_decode_linear_matches_cublas(n, k, rows):
    from dsinfer import kernels
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(rows, k, device="cuda", generator=g).half()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.02).half()
    b = torch.randn(n, device="cuda", generator=g).half()
    want = torch.nn.functional.linear(x.float(), w.float(), b.float())
    for _ in range(2):        # the first call measures both paths, the second uses the winner
        assert rel(want, kernels.decode_linear(x, w, b)) <= 1e-2

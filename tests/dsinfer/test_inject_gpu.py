"""Kernel injection on the GPU (`pytest -m gpu`): the fused blocks run the Triton kernels.
fp16 logits within 2e-2 of HF fp16 on the same weights; fp32 within 1e-3 with the same greedy
tokens; CUDA-graph decode gives exactly the eager fused tokens; int8 within 2e-2 of HF on the
dequantized weights."""
import copy

import pytest
import torch

import dsinfer
from dsinfer.quantize import QuantConfig, dequantized_state_dict, quantize
from helpers import hf_models

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")]
GEN = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()


def engine(ref, **kw):
    return dsinfer.init_inference(copy.deepcopy(ref).cpu(), replace_with_kernel_inject=True, **kw)


@pytest.mark.parametrize("arch", hf_models.CAUSAL)
def test_fp16_logits_and_graphs(arch):
    ref = hf_models.build(arch).half().cuda()
    x = {k: v.cuda() for k, v in hf_models.inputs(ref).items()}
    eager = engine(ref, dtype=torch.float16)
    graphed = engine(ref, dtype=torch.float16, enable_cuda_graph=True)
    with torch.no_grad():
        assert rel(ref(**x).logits, eager.module(**x).logits) <= 2e-2
    ids = x["input_ids"]
    a = eager.module.generate(ids, **GEN)
    b = graphed.module.generate(ids, **GEN)
    assert torch.equal(a, b), arch
    decoder = next(m.dsinfer_decoder for m in graphed.module.modules()
                   if hasattr(m, "dsinfer_decoder"))
    assert decoder.graphs.graphs, "no graph captured"


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

"""Runs with TRITON_INTERPRET=1 (set before anything imports triton): the fused blocks of each
causal family run their Triton kernels (in the interpreter, on the CPU) instead of the torch
references, and are compared with plain HF (logits, greedy tokens, and greedy tokens of a
left-padded batch). Head size 32, so decode attention runs its Triton
kernel too. Prints one JSON line per architecture.

usage: inject_triton_worker.py ARCH[:int8]...
"""
import copy
import json
import sys

import torch

import dsinfer
from dsinfer.quantize import QuantConfig
from helpers import hf_models

# two heads per model: head_dim = hidden / 2 = 32 (GPT-J rotates 16 of them)
TWO_HEADS = {"llama": dict(num_attention_heads=2, num_key_value_heads=1), "gpt2": dict(n_head=2),
             "gpt_neox": dict(num_attention_heads=2), "gptj": dict(n_head=2, rotary_dim=16),
             "bloom": dict(n_head=2), "gpt_neo": dict(num_heads=2),
             "opt": dict(num_attention_heads=2)}


def run(case: str) -> dict:
    """case = ARCH or ARCH:int8 (per-channel int8 at load; the reference is then the same int8
    model through the tensor-parallel torch modules, which dequantize with the reference)."""
    arch, _, int8 = case.partition(":")
    ref = hf_models.build(arch, **TWO_HEADS[arch])
    kw = {"quantization_setting": QuantConfig(groups="per-channel")} if int8 else {}
    if int8:
        ref = dsinfer.init_inference(ref, **kw).module
    engine = dsinfer.init_inference(copy.deepcopy(ref) if not int8 else
                                    hf_models.build(arch, **TWO_HEADS[arch]),
                                    replace_with_kernel_inject=True, **kw)
    x = hf_models.inputs(ref)
    with torch.no_grad():
        want, got = ref(**x).logits, engine.module(**x).logits
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    same = torch.equal(ref.generate(x["input_ids"], **kw),
                       engine.module.generate(x["input_ids"], **kw))
    one = x["input_ids"][:1]          # batch 1: int8 decode runs the M = 1 GEMV (activation
    single = torch.equal(ref.generate(one, **kw), engine.module.generate(one, **kw))  # epilogue)
    left = torch.ones_like(x["input_ids"])
    left[1, :3] = 0                 # left padding: the decode kernel skips each row's prefix
    kw.update(attention_mask=left, pad_token_id=0)
    padded = torch.equal(ref.generate(x["input_ids"], **kw),
                         engine.module.generate(x["input_ids"], **kw))
    return {"arch": case, "rel_err": ((got - want).abs().max() / want.abs().max()).item(),
            "generate_same": same, "padded_same": padded, "single_same": single,
            "injected": any(type(m).__name__ == "BlockModule" for m in engine.module.modules())}


if __name__ == "__main__":
    for arch in sys.argv[1:]:
        print(json.dumps(run(arch)), flush=True)

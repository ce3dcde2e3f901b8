"""Quick GPU check of kernel injection on a Llama-7B shape (random fp16 weights): decode
ms/token at batch 1 and 8 for HF eager and dsinfer fused blocks + CUDA graphs (fp16, int8
per-channel), the copy-bandwidth floor, and dsinfer vs HF logits. One JSON line per result.

    python3 bench/inject_quick_gpu.py [--layers 32] [--new 64]
"""
import argparse
import copy
import json
import time

import torch
import transformers as tf

import dsinfer
from dsinfer.quantize import QuantConfig


def record(**kw):
    kw["device"] = torch.cuda.get_device_name()
    print(json.dumps(kw), flush=True)


def copy_bandwidth() -> float:
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t) / 1e9


def llama(layers: int):
    cfg = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        m = tf.LlamaForCausalLM(cfg)
    m = m.to_empty(device="cuda").half()
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.normal_(0, 0.02, generator=g) if p.dim() > 1 else p.fill_(1.0)
    for n, b in m.named_buffers():
        if "inv_freq" in n:
            b.copy_(1.0 / 10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    return m.eval()


def ms_per_token(model, batch: int, new: int) -> float:
    ids = torch.randint(0, 32000, (batch, 32), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0)

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t
    run(4)
    run(new)
    return (run(new) - run(1)) / (new - 1) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    a = p.parse_args()
    bw = copy_bandwidth()
    base = llama(a.layers)
    wbytes = sum(t.numel() * t.element_size() for t in base.parameters())
    record(section="floor", copy_GBps=round(bw, 1), weight_GB=round(wbytes / 1e9, 2),
           floor_ms=round(wbytes / bw / 1e6, 2), layers=a.layers)
    ids = torch.randint(0, 32000, (1, 32), device="cuda")
    with torch.no_grad():
        want = base(ids).logits.float()
    record(section="decode", system="hf_eager", batch=1, ms=round(ms_per_token(base, 1, 16), 2))
    for name, kw in (("dsinfer_fp16_graph", {}),
                     ("dsinfer_int8_graph", {"quantization_setting": QuantConfig(groups="per-channel")})):
        m = copy.deepcopy(base)
        eng = dsinfer.init_inference(m, dtype=torch.float16, replace_with_kernel_inject=True,
                                     enable_cuda_graph=True, max_out_tokens=256, **kw)
        with torch.no_grad():
            got = eng.module(ids).logits.float()
        rel = ((got - want).abs().max() / want.abs().max()).item()
        for batch in (1, 8):
            record(section="decode", system=name, batch=batch,
                   ms=round(ms_per_token(eng.module, batch, a.new), 2), rel_vs_hf=round(rel, 4))
        del eng, m
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

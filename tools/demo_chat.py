"""One rank of the demo: load the pre-sharded int8 SmolLM2 into a meta-device model with
init_inference (kernel injection: fused blocks, which run the kernels' torch references on a
CPU) and answer a question; rank 0 also compares with fp32 HF at TP 1."""
from __future__ import annotations

import os
import sys
import time

import torch
import transformers as tf

import dsinfer

QUESTION = "What is the capital of France?"


def main() -> int:
    ckpt, hf_dir = sys.argv[1], sys.argv[2]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tok = tf.AutoTokenizer.from_pretrained(hf_dir)
    config = tf.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    t = time.perf_counter()
    engine = dsinfer.init_inference(model, tensor_parallel={"tp_size": world}, checkpoint=ckpt,
                                    replace_with_kernel_inject=True)   # fused blocks
    fused = sum(type(m).__name__ == "BlockModule" for m in engine.module.modules())
    load_s = time.perf_counter() - t
    prompt = tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    t = time.perf_counter()
    out = engine.module.generate(**prompt, max_new_tokens=24, do_sample=False)
    gen_s = time.perf_counter() - t
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    with torch.no_grad():
        logits = engine.module(**prompt).logits[0, -1]
    if rank != 0:
        return 0
    print(f"rank 0/{world}: loaded its int8 shard in {load_s:.2f} s ({fused} fused blocks); "
          f"{out.shape[1] - prompt['input_ids'].shape[1]} tokens in {gen_s:.1f} s")
    print(f"Q: {QUESTION}\nA: {answer}")
    ref = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(**prompt).logits[0, -1]
    rel = ((logits - want).abs().max() / want.abs().max()).item()
    top = torch.equal(logits.topk(5).indices, want.topk(5).indices)
    print(f"TP {world} int8 vs fp32 TP 1 on the next token: max rel. logit difference "
          f"{rel:.3%}, same top-5 tokens: {top}")
    if "Paris" not in answer:
        print("demo: FAILED: the answer does not name Paris", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One rank of a BERT model with fused encoder blocks under the launcher: loads a pre-sharded
checkpoint into a meta-device model with replace_with_kernel_inject=True and compares every
tensor it returns (logits; or last_hidden_state and pooler_output) with plain HF loaded from
the original HF folder, on a right-padded batch with token types (pad positions not compared).

usage: bert_inject_worker.py HF_DIR CHECKPOINT OUT_JSON      (writes OUT_JSON.rank{r})"""
import json
import os
import sys
from pathlib import Path

import torch
import transformers as tf

import dsinfer


def rel(a, b) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def main():
    hf_dir, checkpoint, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    config = tf.AutoConfig.from_pretrained(hf_dir)
    cls = getattr(tf, config.architectures[0])
    ref = cls.from_pretrained(hf_dir).eval()
    with torch.device("meta"):
        meta = cls(config)
    engine = dsinfer.init_inference(meta, tensor_parallel={"tp_size": world},
                                    checkpoint=checkpoint, replace_with_kernel_inject=True)
    ref = ref.to(engine.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=g).to(engine.device)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0                                     # right padding
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, token_type_ids=types)
        got = engine.module(ids, attention_mask=mask, token_type_ids=types)
    errs = {}
    for key, a in want.items():
        if torch.is_tensor(a):
            b = got[key]
            errs[key] = rel(a, b) if a.dim() == 2 else max(rel(a[0], b[0]), rel(a[1, :8], b[1, :8]))
    injected = any(type(m).__name__ == "BlockModule" for m in engine.module.modules())
    Path(f"{out}.rank{rank}").write_text(json.dumps({"injected": injected, "rel_err": errs}))


if __name__ == "__main__":
    main()

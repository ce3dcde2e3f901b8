"""Where the fp16 logit differences come from: HF fp16 eager and dsinfer fp16 (kernel injection,
CUDA graphs) each against HF fp32 on the same weights (the fp16 model upcast), and against
each other, for the decode bench's models (decode_gpu.py builds them: random weights, seed 0).

    python3 bench/logit_check_gpu.py [--models neo,llama]     # one GPU; writes $OUT/logit_check.jsonl
"""
import argparse
import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_gpu as D  # noqa: E402


def rel(a, b) -> float:
    return float(f"{((a - b).abs().max() / b.abs().max()).item():.3g}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="neo,llama")
    a = p.parse_args()
    import dsinfer
    args = D.parse_args([])
    args.device, args.dtype = torch.device("cuda"), torch.float16
    out = open(os.path.join(os.environ.get("OUT", "."), "logit_check.jsonl"), "a")
    for name in a.models.split(","):
        model = D.build(name, args)
        vocab = model.config.vocab_size
        hf16 = D.signature(model, vocab, args)
        ref = copy.deepcopy(model).float()
        hf32 = D.signature(ref, vocab, args)
        del ref
        torch.cuda.empty_cache()
        eng = dsinfer.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True,
                                     enable_cuda_graph=True).module
        ds16 = D.signature(eng, vocab, args)
        row = dict(model=name, device=torch.cuda.get_device_name(),
                   hf16_vs_hf32=rel(hf16[0], hf32[0]), dsinfer16_vs_hf32=rel(ds16[0], hf32[0]),
                   dsinfer16_vs_hf16=rel(ds16[0], hf16[0]),
                   tokens_hf16_vs_hf32=D.compare(hf32, hf16)["greedy_tokens_agree"],
                   tokens_dsinfer16_vs_hf32=D.compare(hf32, ds16)["greedy_tokens_agree"],
                   check_tokens=args.check_tokens)
        print(json.dumps(row), flush=True)
        out.write(json.dumps(row) + "\n")
        del eng, model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

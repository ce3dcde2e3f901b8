"""Runs under the launcher (one process per rank): loads pre-sharded checkpoints into
meta-device models with dsinfer.init_inference and compares with plain HF.

usage: runtime_worker.py WORKDIR OUT_JSON CASE...
    CASE = arch:checkpoint_subdir[:flag...]   flags: int8 bf16 batch inject (fused blocks) graph (CUDA graphs)
Every rank writes OUT_JSON.rank{r}; the test reads them. Files opened by this process are
recorded with an audit hook, so the test can check rank r never opened another rank's files."""
import json
import os
import sys
from pathlib import Path

import torch

OPENED = []
sys.addaudithook(lambda event, args: OPENED.append(str(args[0])) if event == "open" and args
                 and isinstance(args[0], (str, bytes, os.PathLike)) else None)

from helpers import hf_models  # noqa: E402  (after the hook: record everything)

import dsinfer  # noqa: E402
from dsinfer.quantize import dequantized_state_dict  # noqa: E402


def reference(arch: str, checkpoint: Path, int8: bool):
    model = hf_models.build(arch)
    if int8:  # HF on the dequantized weights of the int8 checkpoint
        model.load_state_dict(dequantized_state_dict(checkpoint), strict=False)
    return model


def run_case(workdir: Path, case: str) -> dict:
    OPENED.clear()
    arch, sub, *flags = case.split(":")
    checkpoint = workdir / arch / sub
    ref = reference(arch, checkpoint, "int8" in flags)
    x = hf_models.inputs(ref)
    with torch.device("meta"):
        meta = type(ref)(ref.config)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = torch.bfloat16 if "bf16" in flags else None
    if dtype is not None:
        ref = ref.to(dtype)
    engine = dsinfer.init_inference(meta, tensor_parallel={"tp_size": world},
                                    checkpoint=str(checkpoint), dtype=dtype,
                                    replace_with_kernel_inject="inject" in flags,
                                    enable_cuda_graph="graph" in flags)
    ref = ref.to(engine.device)   # on a GPU machine: cuda:LOCAL_RANK, else the CPU
    x = {k: v.to(engine.device) for k, v in x.items()}
    with torch.no_grad():
        want, got = ref(**x).logits, engine.module(**x).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    same = None
    if not ref.config.is_encoder_decoder:
        ids = x["input_ids"][:1]
        a = ref.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        b = engine.module.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
        same = torch.equal(a, b)
        if "batch" in flags:  # left-padded batch: the second prompt is 4 tokens shorter
            mask = torch.ones_like(x["input_ids"])
            mask[1, :4] = 0
            kw = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16,
                      do_sample=False, pad_token_id=0)
            same = same and torch.equal(ref.generate(x["input_ids"], **kw),
                                        engine.module.generate(x["input_ids"], **kw))
    injected = any(type(m).__name__ == "BlockModule" for m in engine.module.modules())
    decoder = next((m.dsinfer_decoder for m in engine.module.modules()
                    if hasattr(m, "dsinfer_decoder")), None)
    served = decoder.head.served if decoder is not None and decoder.head is not None else 0
    return {"rel_err": rel, "generate_same": same, "injected": injected,
            "head_served": served,   # LM head calls answered from a step (inject/head.py)
            "fast_allreduce": engine.tp.fast is not None,
            "rank_files": sorted({p for p in OPENED if "/rank-" in p})}


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    workdir, out = Path(args[0]), args[1]
    sys.argv[3:] = args[2:]
    rank = int(os.environ.get("RANK", "0"))
    cases = [a for a in sys.argv[3:] if not a.startswith("--local_rank")]
    results = {case: run_case(workdir, case) for case in cases}
    Path(f"{out}.rank{rank}").write_text(json.dumps(results))


if __name__ == "__main__":
    main()

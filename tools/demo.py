"""The demo behind `make demo`: a small Llama-style model (9 query / 3 KV heads, like
SmolLM2) goes HF -> 3 pre-sharded ranks -> verify -> HF, and the round trip is checked."""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from dsinfer.inspect import summary, verify
from dsinfer.reshard import reshard


def _step(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.2f} s] {msg}")


def make_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576 // 4, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, vocab_size=1536,
                      max_position_embeddings=256, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="dsinfer-demo", description=__doc__)
    p.add_argument("--workdir", default="demo-out")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    make_model(work / "hf")
    _step(f"built a random Llama model (9 heads, 3 KV heads) in {work / 'hf'}", t0)
    res = reshard(work / "hf", work / "tp3", tp=3, progress=False)
    _step(f"resharded to TP 3: {len(res.files)} files, {res.bytes / 1e6:.1f} MB", t0)
    s = summary(work / "tp3")
    _step(f"manifest: {s['architecture']} tp={s['tp_size']} dtype={s['dtype']} "
          f"per rank: {s['bytes_per_rank']}", t0)
    problems = verify(work / "tp3")
    _step(f"verify: {'OK' if not problems else problems}", t0)
    reshard(work / "tp3", work / "hf-again", tp=1, to="hf", progress=False)
    from safetensors.torch import load_file
    a = load_file(work / "hf" / "model.safetensors")
    b = load_file(work / "hf-again" / "model.safetensors")
    same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    _step(f"HF -> TP3 -> HF round trip bit-identical: {same}", t0)
    return 0 if same and not problems else 1


if __name__ == "__main__":
    sys.exit(main())

"""One rank of a load under the launcher, for memory and bad-input tests.

usage: load_worker.py MODE CHECKPOINT OUT      MODE = rss | heads | arch | option | world
Builds the model on the meta device from the checkpoint's config.json and calls
dsinfer.init_inference; `rss` writes {"before", "peak", "shard_bytes"} (bytes) to OUT.rank{r}."""
import json
import os
import resource
import sys
from pathlib import Path

import torch
import transformers as tf

import dsinfer


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def meta_model(config_dir: Path, arch_override=None):
    config = tf.AutoConfig.from_pretrained(config_dir)
    if arch_override:
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=8, vocab_size=128)
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


def main():
    mode, ckpt, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model = meta_model(Path(ckpt), arch_override=(mode == "arch"))
    kwargs = {"checkpoint": ckpt, "tensor_parallel": {"tp_size": world}}
    if mode == "option":
        kwargs["tensor_paralel"] = {"tp_size": world}   # a typo the user must hear about
    if mode == "world":
        kwargs["tensor_parallel"] = {"tp_size": world + 1}
    before = rss_now()
    dsinfer.init_inference(model, **kwargs)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shard = sum(p.stat().st_size for p in Path(ckpt).glob(f"rank-{rank:02d}-of-*/*.safetensors"))
    Path(f"{out}.rank{rank}").write_text(json.dumps({"before": before, "peak": peak,
                                                      "shard_bytes": shard}))


if __name__ == "__main__":
    main()

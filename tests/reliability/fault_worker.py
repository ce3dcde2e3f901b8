"""One rank of a run with a fault in rank 1, under the dsinfer launcher.

usage: fault_worker.py MODE CHECKPOINT LOGDIR        MODE = raise | hang
Every rank writes LOGDIR/pid.<rank>. Rank 0 writes LOGDIR/collective.0 when it enters its first
collective inside init_inference, the process group's rendezvous (and waits there: its read
has already started). Rank 1, inside init_inference, either
raises after rank 0 is waiting (`raise`: its rank file is missing, a real CheckpointError) or
never returns (`hang`), leaving the process-group timeout to end rank 0's wait. A rank that
got through init_inference writes LOGDIR/done.<rank>."""
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import transformers as tf

import dsinfer
from dsinfer import engine


def main():
    mode, ckpt, logdir = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    logdir = Path(logdir)
    (logdir / f"pid.{rank}").write_text(str(os.getpid()))
    if rank == 0:
        real = dist.init_process_group

        def init_process_group(*args, **kwargs):
            (logdir / "collective.0").write_text(str(time.time()))
            return real(*args, **kwargs)
        engine.dist.init_process_group = init_process_group
    else:
        real_open = engine.open_rank_source

        def open_rank_source(*args, **kwargs):
            deadline = time.time() + 60
            while not (logdir / "collective.0").exists() and time.time() < deadline:
                time.sleep(0.05)           # let rank 0 reach its collective first
            if mode == "hang":
                time.sleep(3600)
            return real_open(*args, **kwargs)
        engine.open_rank_source = open_rank_source
    config = tf.AutoConfig.from_pretrained(ckpt)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    dsinfer.init_inference(model, checkpoint=ckpt, tensor_parallel={"tp_size": world})
    (logdir / f"done.{rank}").write_text("ok")


if __name__ == "__main__":
    main()

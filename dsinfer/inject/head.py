"""The LM head's logits made ahead of HF's call to the head: inside a decode step (the CUDA
graph then captures the head too), or by a look-ahead step (lookahead.py).

HF's causal-LM wrappers call `lm_head(hidden_states[:, slice, :])` right after the body returns.
At tensor parallelism that head is a vocab-parallel GEMV plus an all-gather; run outside the
decode graph it costs a host-launched NCCL collective and a cat per token (Llama-7B at TP 2 on
two H200s, 28 Nov 2026: 0.33 ms a token for a 0.04 ms GEMV). `ServedHead` replaces the head
module's forward:

    served = ServedHead(model.get_output_embeddings())
    served.serve(hidden, logits)   # the decoder, after a step that made the logits
    model(...)                     # HF calls head(x): logits when x is that very `hidden`
                                   # view ([B, 1, H], same pointer, shape and strides),
                                   # else the head's own forward runs

`served.after(x, logits)` (look-ahead) sees every call's result. Whether decode steps compute
the head is DECODE_HEAD["in_step"] (DSINFER_HEAD_IN_STEP): "auto" (the default) wherever the
decoder captures CUDA graphs, True (=1) always, False (=0) never. Timed on an H200
(bench/profile_decode_gpu.py --ab head_in_step, session 11, same weights, tokens equal):
GPT-Neo-2.7B int8 1.74 / 1.84 ms/token with the head in the graph against 2.03 / 2.09
without, on a host whose `generate` loop took ~2 ms a token (then every Python launch saved
counts); GPT-Neo fp16 2.02 both ways and Llama-7B int8 2.40 both ways (bound by the GPU). Two
H200s at TP 2 (session 8): 2.92-2.95 either way.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch

DECODE_HEAD = {"in_step": {"0": False, "1": True}.get(os.environ.get("DSINFER_HEAD_IN_STEP", ""),
                                                      "auto")}


def same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b are the same elements of memory (b is alive, so its address is not reused)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class ServedHead:
    def __init__(self, head: torch.nn.Module):
        self.run: Callable = head.forward      # the head's own forward
        head.forward = self
        self.pending: Optional[Tuple[torch.Tensor, torch.Tensor]] = None   # (hidden, logits)
        self.after: Optional[Callable] = None  # called with (x, logits) after every call
        self.served = 0                        # calls answered with logits made ahead

    def serve(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        self.pending = (hidden, logits)

    def drop(self) -> None:
        self.pending = None

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        pending, self.pending = self.pending, None
        if pending is not None and not args and not kwargs and same_view(x, pending[0]):
            logits = pending[1]
            self.served += 1
        else:
            logits = self.run(x, *args, **kwargs)
        if self.after is not None:
            self.after(x, logits)
        return logits

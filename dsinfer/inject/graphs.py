"""CUDA-graph decode: one graph per batch size captures a whole one-token decoder step
(embeddings, every fused block with its all-reduces, final norm; with head.DECODE_HEAD
"in_step" the LM head too) over the static KV cache.
A replay copies the new token ids and positions into the graph's input buffers, sets the
[B] start/length tensors and the left-padding lengths (zeros for an unpadded batch; no host
sync), and replays; the Python per-kernel launch cost of ~15 kernels per block disappears.

What a graph bakes in: the KV buffers, the rotary tables and the batch size. Growing either
buffer (decoder._kv, decoder._rotary_tables) drops the graphs; they are captured again on the
next step. Batches padded other than on the left, and multi-token steps, run eagerly.

Prefill graphs: a new sequence's unpadded prompt of S tokens runs as a graph of the prompt
right-padded to a bucket of n >= S tokens (decoder.padded_prefill says why that is exact),
one graph per (batch, n), captured on first use. Eager prefill is bound by the host: ~13 ms of
Python and launches per 512-token forward of Llama-7B on an H200, ~20 ms at TP 2 with NCCL's
calls, against 12.9 / ~7 ms of GPU work (session 8). Buckets are powers of two up to 64
tokens, then multiples of 64 (at most 63 padding tokens); prompts past
DSINFER_PREFILL_GRAPH_TOKENS (batch x n, default 2048), where the GPU work outweighs the host's,
run eagerly; the DSINFER_PREFILL_GRAPHS_KEPT (default 16) most recently used prefill graphs
are kept; DSINFER_PREFILL_GRAPHS=0 turns prefill graphs off.
"""
from __future__ import annotations

import dataclasses
import os
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch

from dsinfer.kernels._triton import PDL
from dsinfer.log import warn

PREFILL = {"on": os.environ.get("DSINFER_PREFILL_GRAPHS", "1") != "0",
           "max_tokens": int(os.environ.get("DSINFER_PREFILL_GRAPH_TOKENS", "2048")),
           "kept": int(os.environ.get("DSINFER_PREFILL_GRAPHS_KEPT", "16"))}


def prefill_bucket(S: int) -> int:
    """The padded length a prompt of S tokens runs at: 8, 16, 32, 64, then multiples of 64."""
    if S <= 64:
        return max(8, 1 << (S - 1).bit_length())
    return -(-S // 64) * 64


@dataclasses.dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor        # [B, 1] int64
    positions: torch.Tensor  # [B, 1] int64
    starts: torch.Tensor     # [B] int32: cache index of the new token
    lengths: torch.Tensor    # [B] int32: starts + 1
    first_key: torch.Tensor  # [B] int32: left-padding length per row (0: none)
    out: torch.Tensor        # [B, 1, hidden]: the body's output (output projection applied)
    logits: Optional[torch.Tensor] = None   # [B, 1, vocab] with the LM head in the step
    padded: bool = False     # first_key holds a padded batch's lengths (zeroed before reuse)


class DecodeGraphs:
    WARMUP = 2               # eager runs before capture: Triton compiles and autotunes there

    def __init__(self, decoder):
        self.decoder = decoder
        self.graphs: Dict[int, _Graph] = {}
        # (batch, padded length) -> graph, least recently used first; at most PREFILL["kept"]
        # (each holds its [B, n, hidden] output; a dropped one's memory returns to the pool)
        self.prefills: "OrderedDict[Tuple[int, int], _Graph]" = OrderedDict()
        self.prefill_failed = False     # a prefill capture failed: prompts run eagerly
        self.pool = None
        self.tables = None   # the rotary tables the graphs were captured with

    def reset(self) -> None:
        # Dropping the graphs frees their memory pool: a later capture must not name it
        # (torch asserts on a pool whose graphs are gone), so the next one starts a new pool.
        self.graphs.clear()
        self.prefills.clear()
        self.pool = None

    def ready(self, batch: int) -> bool:
        """A graph for this batch size exists and is current (a replay captures nothing)."""
        return batch in self.graphs and self.tables is self.decoder.cos

    def replay(self, input_ids, positions, cache, start: int, key_mask=None, first_key=None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """decoder.finish()'s (hidden states, logits or None) of this one-token step."""
        dec = self.decoder
        if self.tables is not dec.cos:          # the tables grew: captured pointers are stale
            self.reset()
        B = input_ids.shape[0]
        g = self.graphs.get(B)
        if g is None or dec.buffers is None or dec.buffers.max_len <= start:
            dec._kv(B, start + 1)               # may grow (and reset) before capturing
            g = self.graphs.get(B) or self._capture_or_none(B, start)
        if g is None:                           # capture failed: this step runs eagerly
            return dec.finish(dec.run(input_ids, None, positions, None, cache, start, key_mask,
                                      first_key=first_key))
        if first_key is not None:
            g.first_key.copy_(first_key, non_blocking=True)
        elif g.padded:
            g.first_key.zero_()
        g.padded = first_key is not None
        g.ids.copy_(input_ids, non_blocking=True)
        g.positions.copy_(positions, non_blocking=True)
        g.starts.fill_(start)
        g.lengths.fill_(start + 1)
        g.graph.replay()
        # the next replay overwrites g.out and g.logits
        return g.out.clone(), (None if g.logits is None else g.logits.clone())

    def _capture_or_none(self, B: int, start: int):
        try:
            return self._capture(B, start)
        except RuntimeError as e:   # a driver/allocator refusal must not stop generation
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            if PDL["on"]:           # a driver that cannot capture programmatic launches
                warn(f"dsinfer: CUDA-graph capture failed ({reason}); capturing again "
                     "without programmatic dependent launch (DSINFER_PDL=0 skips this)")
                PDL["on"] = False
                self.reset()
                return self._capture_or_none(B, start)
            warn(f"dsinfer: CUDA-graph capture failed ({reason}); decoding without graphs")
            self.decoder.graphs = None
            self.reset()
            return None

    def _capture(self, B: int, start: int) -> _Graph:
        dec = self.decoder
        device = dec.device
        ids = torch.zeros((B, 1), dtype=torch.long, device=device)
        pos = torch.full((B, 1), start, dtype=torch.long, device=device)
        starts = torch.full((B,), start, dtype=torch.int32, device=device)
        lengths = starts + 1
        first = torch.zeros((B,), dtype=torch.int32, device=device)
        cache = _Live(start)

        def step():
            # writes K/V at index `start`, which the real step overwrites right after
            return dec.finish(dec.run(ids, None, pos, None, cache, max(start, 1), None, starts,
                                      lengths, first))

        graph, (out, logits) = self._record(step)
        g = _Graph(graph, ids, pos, starts, lengths, first, out, logits)
        self.graphs[B] = g
        return g

    def _record(self, step):
        """Warm-up runs of step() on a side stream (Triton compiles and autotunes there), then
        its capture into the graphs' shared pool: (graph, what the captured call returned)."""
        device = self.decoder.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):   # later graphs share the first's pool
            out = step()
        if self.pool is None:
            self.pool = graph.pool()
        self.tables = self.decoder.cos
        return graph, out

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor
                ) -> Optional[torch.Tensor]:
        """The output hidden states [B, S, H'] of a new sequence's unpadded prompt from its
        bucket's graph, or None (prefill graphs off, too long, or the capture failed): then
        the caller runs it eagerly."""
        B, S = input_ids.shape
        n = prefill_bucket(S)
        if not PREFILL["on"] or self.prefill_failed or B * n > PREFILL["max_tokens"]:
            return None
        dec = self.decoder
        if self.tables is not dec.cos:
            self.reset()
        dec._kv(B, n)                           # may grow (and reset) before capturing
        g = self.prefills.get((B, n)) or self._capture_prefill(B, n)
        if g is None:
            return None
        self.prefills.move_to_end((B, n))
        g.ids[:, :S].copy_(input_ids, non_blocking=True)   # the rest: earlier valid values
        g.positions[:, :S].copy_(positions, non_blocking=True)
        g.graph.replay()
        return g.out[:, :S].clone()

    def _capture_prefill(self, B: int, n: int) -> Optional[_Graph]:
        dec = self.decoder
        ids = torch.zeros((B, n), dtype=torch.long, device=dec.device)
        pos = torch.zeros((B, n), dtype=torch.long, device=dec.device)
        starts = torch.zeros((B,), dtype=torch.int32, device=dec.device)
        lengths = torch.full((B,), n, dtype=torch.int32, device=dec.device)
        cache = _Live(0)
        try:
            graph, out = self._record(lambda: dec.padded_prefill(ids, pos, cache, n, starts,
                                                                 lengths))
        except RuntimeError as e:   # decode graphs stay; prompts run eagerly from now on
            reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            warn(f"dsinfer: CUDA-graph capture of a {n}-token prefill failed ({reason}); "
                 "prompts run without graphs (DSINFER_PREFILL_GRAPHS=0 skips trying)")
            self.prefill_failed = True
            return None
        g = _Graph(graph, ids, pos, starts, lengths, starts, out)
        self.prefills[(B, n)] = g
        while len(self.prefills) > max(1, PREFILL["kept"]):
            self.prefills.popitem(last=False)
        return g


class _Live:
    """Stands for the StepCache during capture: the decoder only checks it is not None."""

    def __init__(self, length: int):
        self.length = length

"""Look-ahead decoding: the GPU runs decode step t+1 while HF `generate` is still on the host
finishing step t.

`generate` waits for the GPU at every step (its stopping check reads a flag back) and then
spends ~0.3 ms of Python choosing, appending and preparing the next token; with the step itself
one CUDA-graph replay, the GPU idles through all of that. So after each decode step, as soon as
its logits exist, this guesses the next token (the greedy one: argmax of those logits, computed
on the GPU, no sync) and queues step t+1 with it on a side stream: the decoder's graph, then
the model's own LM head (unless the graph holds it: head.py). When `generate` asks for step
t+1, the guess is checked (token ids and positions: one small sync on the main stream, which
does not wait for the side stream):

    hit   the queued hidden states are returned and the logits served to HF's head call
          (head.ServedHead; the main stream waits on an event)
    miss  step t+1 runs again with the real token; it writes the same cache slot the guess
          wrote (index t+1 of every row), so a wrong guess costs GPU time, never correctness.

A sequence whose guesses miss more often than they hit (sampling, beam search, logits
processors that move the argmax) stops guessing. Anything else that touches the KV buffers
(a new sequence, beam reordering, crop) first waits for, and drops, the pending guess.

Only steps that replay an already captured graph are guessed (no allocation or capture on the
side stream); `DSINFER_LOOKAHEAD=0` turns guessing off, `=1` also turns it on without CUDA
graphs (eager steps: how the CPU tests exercise it).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional, Tuple

import torch

from dsinfer.inject.head import ServedHead, same_view


def mode() -> str:
    """'auto' (with CUDA graphs), 'off', 'on' (also eager) or 'force' (on, even beside the
    one-shot all-reduce: only to study the hang of that pair, dsinfer/fast_allreduce.py),
    from DSINFER_LOOKAHEAD."""
    return {"0": "off", "1": "on", "force": "force"}.get(os.environ.get("DSINFER_LOOKAHEAD", ""),
                                                         "auto")


@dataclasses.dataclass
class _Step:
    """A decode step whose successor can be guessed: where it was and what it returned."""
    epoch: int
    start: int                          # cache index the step wrote
    positions: torch.Tensor             # [B, 1] int64
    first_key: Optional[torch.Tensor]   # the cache's left-padding lengths (by identity)
    hidden: torch.Tensor                # [B, 1, hidden]: what the decoder returned


@dataclasses.dataclass
class _Guess:
    epoch: int
    start: int
    ids: torch.Tensor                   # [B, 1] the guessed tokens
    positions: torch.Tensor             # [B, 1]
    first_key: Optional[torch.Tensor]
    hidden: torch.Tensor                # [B, 1, hidden], made on the side stream
    logits: torch.Tensor                # [B, 1, vocab], made on the side stream
    done: Optional[torch.cuda.Event]


class Lookahead:
    def __init__(self, decoder, head: ServedHead, device: torch.device):
        self.dec, self.device = decoder, device
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self.head = head                    # a hit's logits are served through it
        head.after = self._after_head
        self.guess: Optional[_Guess] = None
        self.last: Optional[_Step] = None      # the step just run, if its successor may be guessed
        self.score = {}                        # epoch -> hits - misses
        self.stats = {"guessed": 0, "hits": 0, "misses": 0}

    # ------------------------------------------------------------------ decoder side
    def take(self, cache, input_ids, positions, start: int, S: int, first_key,
             other_step: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The guessed (hidden states, logits) for this call, or None (then any pending guess
        is dropped, after the main stream has waited for it). other_step: not a plain
        one-token decode step (extra inputs, a mask with holes): never served from a guess."""
        g, self.guess = self.guess, None
        self.last = None
        if g is None:
            return None
        try:
            return self._check(g, cache, input_ids, positions, start, S, first_key,
                               other_step)
        finally:
            self._wait(g)       # after the check: its sync must not wait for the side stream

    def _check(self, g: _Guess, cache, input_ids, positions, start, S, first_key,
               other_step) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if (cache is None or g.epoch != cache.epoch or g.start != start or S != 1
                or input_ids is None or other_step or first_key is not g.first_key
                or input_ids.shape != g.ids.shape):
            return None
        # one sync on the main stream; the ids were made there, the side stream may still run
        hit = torch.equal(torch.cat([input_ids.to(g.ids.device, torch.long),
                                     positions.to(g.ids.device, torch.long)], 1),
                          torch.cat([g.ids, g.positions], 1))
        self.stats["hits" if hit else "misses"] += 1
        self.score[g.epoch] = self.score.get(g.epoch, 0) + (1 if hit else -1)
        return (g.hidden, g.logits) if hit else None

    def offer(self, cache, input_ids, positions, start: int, S: int, first_key,
              hidden: torch.Tensor) -> None:
        """Called after a decode step: its successor is guessed when the head sees `hidden`."""
        if (cache is None or S != 1 or input_ids is None or self.score.get(cache.epoch, 0) < 0
                or not self.dec.can_guess(input_ids.shape[0], start + 1)):
            return
        if len(self.score) > 64:                      # old sequences' scores
            self.score = {cache.epoch: self.score.get(cache.epoch, 0)}
        self.last = _Step(cache.epoch, start, positions.to(self.device, torch.long),
                          first_key, hidden)

    def cancel(self) -> None:
        """Before anything else touches the KV buffers: wait for the pending guess, drop it."""
        g, self.guess, self.last = self.guess, None, None
        if g is not None:
            self._wait(g)

    # ------------------------------------------------------------------ LM head side
    def _after_head(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        """Every LM head call (head.ServedHead.after): the step just run is guessed from it."""
        last, self.last = self.last, None
        if last is not None and same_view(x, last.hidden):
            self._launch(last, logits)

    def _launch(self, last: _Step, logits: torch.Tensor) -> None:
        """Queues step last.start + 1 with the greedy token of `logits` [B, 1, vocab]."""
        ids = logits[:, -1].argmax(-1, keepdim=True)        # [B, 1] on the main stream
        positions = last.positions + 1
        start = last.start + 1
        done = None
        with self._on_side():
            hidden, guessed = self.dec.guess_step(ids, positions, start, last.first_key)
            if guessed is None:
                guessed = self.head.run(hidden)
            if self.cuda:
                done = torch.cuda.Event()
                done.record(self.side)
        self.guess = _Guess(last.epoch, start, ids, positions, last.first_key, hidden, guessed,
                            done)
        self.stats["guessed"] += 1

    # ------------------------------------------------------------------ streams
    @contextlib.contextmanager
    def _on_side(self):
        if not self.cuda:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            yield

    def _wait(self, g: _Guess) -> None:
        """The main stream continues after the guess's work; its tensors may be used there."""
        if g.done is None:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_event(g.done)
        g.hidden.record_stream(main)
        g.logits.record_stream(main)

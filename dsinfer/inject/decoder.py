"""The fused decoder: replaces the forward of an HF model's body (LlamaModel, GPT2Model, ...)
with embeddings -> FusedBlocks -> final norm over a static KV cache. The HF wrapper around the
body (LM head, generate, pipelines) is unchanged: it receives BaseModelOutputWithPast as before.

A call is one of:
    prefill   no cache passed in (or HF's own, empty)  -> a new sequence from position 0
    continue  the StepCache this decoder returned last -> tokens at positions length .. length+S-1
Decode steps of one token replay a CUDA graph when enabled (graphs.py), over an unpadded batch
or a left-padded one (generate's padding: the decode kernel skips each row's padded prefix).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions as Output

from dsinfer import kernels
from dsinfer.formats import CheckpointError
from dsinfer.inject.block import FusedBlock, Step
from dsinfer.inject.cache import KVBuffers, StepCache
from dsinfer.inject.head import DECODE_HEAD
from dsinfer.tp import TPGroup

_GUESSING = object()     # stands for the cache in a look-ahead step (step() checks "not None")
_FIELDS = Output.__dataclass_fields__   # a superset of BaseModelOutputWithPast
CACHE_FIELD = "cache" if "cache" in _FIELDS else "past_key_values"   # transformers >= 5.2x


class FusedDecoder:
    def __init__(self, adapter, body: torch.nn.Module, blocks: List[FusedBlock], tp: TPGroup,
                 max_out_tokens: int, dtype: torch.dtype, device: torch.device):
        self.adapter, self.body, self.blocks, self.tp = adapter, body, blocks, tp
        self.max_out_tokens, self.dtype, self.device = max_out_tokens, dtype, device
        cfg = blocks[0].cfg
        self.kv_shape = (len(blocks), cfg.kv_heads, cfg.head_dim)
        self.buffers: Optional[KVBuffers] = None
        self.epoch = 0
        self.cos = self.sin = None
        self.rotary = adapter.rotary_inv_freq(body)          # (inv_freq, scaling) or None
        self.alibi = adapter.alibi_slopes(tp)                 # [Hq local] or None
        if self.alibi is not None:
            self.alibi = self.alibi.to(device)
        self.final_norm = adapter.final_norm(body)            # (w, b) or None
        self.graphs = None                                    # graphs.DecodeGraphs when enabled
        self.lookahead = None                                 # lookahead.Lookahead when enabled
        self.head = None                                      # head.ServedHead of a causal LM

    # ------------------------------------------------------------------ tables and buffers
    def _rotary_tables(self, n: int) -> None:
        """cos/sin [n', rotary_dim / 2] fp32, computed as HF does (fp32 angles)."""
        if self.rotary is None or (self.cos is not None and self.cos.shape[0] >= n):
            return
        inv_freq, scaling = self.rotary
        n = max(n, self.max_out_tokens, 2 * (0 if self.cos is None else self.cos.shape[0]))
        pos = torch.arange(n, device=self.device, dtype=torch.float32)
        angles = pos[:, None] * inv_freq.to(self.device, torch.float32)[None, :]
        self.cos, self.sin = angles.cos() * scaling, angles.sin() * scaling

    def _kv(self, batch: int, length: int) -> KVBuffers:
        b = self.buffers
        if b is not None and b.fits(batch, length, self.dtype, self.device):
            return b
        if b is not None and b.batch == batch and b.k.dtype == self.dtype:
            self.buffers = b.grown(length)                    # a long generation: keep going
        else:
            self.buffers = None                               # free before allocating anew
            layers, heads, dim = self.kv_shape
            self.buffers = KVBuffers(layers, batch, heads, max(length, self.max_out_tokens),
                                     dim, self.dtype, self.device)
        if self.graphs is not None:
            self.graphs.reset()
        return self.buffers

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids=None, attention_mask=None, position_ids=None,
                inputs_embeds=None, use_cache=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, **kwargs):
        if output_attentions or output_hidden_states:
            raise CheckpointError("output_attentions / output_hidden_states are not available "
                                  "with kernel injection; use replace_with_kernel_inject=False")
        cache = self._incoming_cache(kwargs)
        B, S = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        start = cache.length if cache is not None else 0
        if use_cache is None:
            use_cache = getattr(self.body.config, "use_cache", True)
        if cache is None and use_cache and self.blocks[0].cfg.causal:   # encoders keep no cache
            self.epoch += 1
            cache = StepCache(self, self.epoch, len(self.blocks))
        key_mask = self._key_mask(attention_mask, cache, start, S)
        if cache is not None and start == 0:
            cache.first_key = self._left_padding(key_mask)
        elif cache is not None and cache.first_key is not None and S > 1 \
                and not bool(key_mask[:, start:].all()):
            cache.first_key = None        # padding among new tokens: the mask decides from now
        first_key = cache.first_key if cache is not None and key_mask is not None else None
        if position_ids is None:
            position_ids = self.adapter.positions(attention_mask, start, S, B, self.device)
        self._rotary_tables(start + S)
        plain = inputs_embeds is None and not any(v is not None and v is not False
                                                  for v in kwargs.values())
        one_step = plain and self.one_token_step(cache, input_ids, S, key_mask, first_key)
        if self.head is not None:
            self.head.drop()
        done = None     # (the body's output hidden states, their logits or None): a whole step
        if self.lookahead is not None:
            done = self.lookahead.take(cache, input_ids, position_ids, start, S, first_key,
                                       not one_step)
        if done is None and one_step and self.graphs is not None:
            done = self.graphs.replay(input_ids, position_ids, cache, start, key_mask, first_key)
        elif (done is None and self.graphs is not None and plain and cache is not None
              and start == 0 and S > 1 and key_mask is None and input_ids is not None):
            h = self.graphs.prefill(input_ids, position_ids)    # None: runs eagerly below
            done = None if h is None else (h, None)
        elif done is None and one_step and self.head_in_step():
            done = self.finish(self.run(input_ids, None, position_ids, attention_mask, cache,
                                        start, key_mask, first_key=first_key))
        if done is None:
            h = self.run(input_ids, inputs_embeds, position_ids, attention_mask, cache, start,
                         key_mask, first_key=first_key, **kwargs)
        if cache is not None:
            cache.length, cache.key_mask = start + S, key_mask
        out = Output(**{"last_hidden_state": h if done is None else done[0], CACHE_FIELD: cache})
        if done is None:
            out = self.adapter.output(self.body, out)
        elif done[1] is not None:        # HF's head call on these hidden states gets them
            self.head.serve(out.last_hidden_state, done[1])
        if self.lookahead is not None and one_step:
            self.lookahead.offer(cache, input_ids, position_ids, start, S, first_key,
                                 out.last_hidden_state)
        if self.tp.fast is not None:    # a one-shot sum that gave up (no sync: may show late)
            self.tp.fast.check()
        return out

    def run(self, input_ids, inputs_embeds, positions, attention_mask, cache, start, key_mask,
            starts=None, lengths=None, first_key=None, **kwargs) -> torch.Tensor:
        """The maths of one forward (also what a CUDA graph captures: then `starts`, `lengths`
        and `first_key` are the graph's static [B] tensors and `start` only says "not a
        prefill")."""
        B, S = positions.shape
        step = self.step(positions, cache, start, S, key_mask, starts, lengths, first_key)
        h = self.adapter.embed(self.body, input_ids, inputs_embeds, positions,
                               attention_mask=attention_mask, **kwargs)
        pending = None
        for block in self.blocks:
            h, pending = block(h, pending, step)
        if self.final_norm is not None:
            return kernels.add_norm(h if pending is None else pending,
                                    None if pending is None else h, *self.final_norm,
                                    self.blocks[0].cfg.eps, self.blocks[0].cfg.norm,
                                    residual_ready=True)[0]
        return h if pending is None else h + pending

    def step(self, positions, cache, start: int, S: int, key_mask, starts=None, lengths=None,
             first_key=None) -> Step:
        B = positions.shape[0]
        if cache is None:
            ck = cv = None
        else:
            if start and (self.buffers is None or self.buffers.batch != B):
                raise CheckpointError(
                    f"the batch changed from {self.buffers.batch if self.buffers else 0} to {B} "
                    "rows in the middle of a sequence; start a new one (no past_key_values)")
            buf = self._kv(B, start + S)
            ck, cv = buf.k, buf.v
            if starts is None:
                starts = torch.full((B,), start, dtype=torch.int32, device=self.device)
                lengths = starts + S
        return Step(positions.to(self.device).long(), start, ck, cv, starts, lengths, key_mask,
                    self.cos, self.sin, self.alibi, first_key)

    # ------------------------------------------------------------------ look-ahead steps
    @staticmethod
    def one_token_step(cache, input_ids, S: int, key_mask, first_key) -> bool:
        """A decode step whose maths is the graphs' (and look-ahead's): one token per row of a
        continued sequence, no padding or left padding only (first_key covers the mask)."""
        return (cache is not None and cache.length > 0 and S == 1 and input_ids is not None
                and (key_mask is None or first_key is not None))

    def can_guess(self, batch: int, start: int) -> bool:
        """A one-token step at cache index `start` can run without allocating or capturing
        (what a step queued on a side stream must not do)."""
        b = self.buffers
        if b is None or b.batch != batch or b.max_len <= start:
            return False
        if self.rotary is not None and (self.cos is None or self.cos.shape[0] <= start):
            return False
        return self.graphs is None or self.graphs.ready(batch)

    def guess_step(self, ids, positions, start: int, first_key
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One decode step with guessed tokens [B, 1] at cache index `start`: writes that K/V
        slot and returns finish()'s (hidden states, logits or None); the cache's bookkeeping is
        left to the real call."""
        if self.graphs is not None:
            return self.graphs.replay(ids, positions, None, start, None, first_key)
        return self.finish(self.run(ids, None, positions, None, _GUESSING, start, None,
                                    first_key=first_key))

    # ------------------------------------------------------------------ the LM head in a step
    def head_in_step(self) -> bool:
        """Whether one-token steps compute the LM head (head.py: "auto" = with CUDA graphs)."""
        mode = DECODE_HEAD["in_step"]
        return self.head is not None and (mode is True or (mode == "auto"
                                                          and self.graphs is not None))

    def finish(self, h: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """A one-token step's end: the body's output hidden states [B, 1, H'] (the family's
        output projection applied) and, with the head in the step, the LM head's logits
        [B, 1, vocab] (what a CUDA graph of the step then captures as well)."""
        h = self.output(h)
        return h, (self.head.run(h) if self.head_in_step() else None)

    def output(self, h: torch.Tensor) -> torch.Tensor:
        """The family's output projection (OPT's project_out), where it has one."""
        return self.adapter.output(self.body, Output(last_hidden_state=h)).last_hidden_state

    # ------------------------------------------------------------------ padded prefill
    def padded_prefill(self, ids: torch.Tensor, positions: torch.Tensor, cache, n: int,
                       starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """A new sequence's prompt right-padded to n tokens (ids, positions [B, n]; what a
        prefill graph captures, graphs.py): the output hidden states [B, n, H'].

        Exact for the real tokens: attention is causal, so no real token sees the padding
        after it. The padding's K/V lands in cache slots at and past the sequence's length:
        the next token overwrites its slot before any attention reads it, and reads stop at
        the length. Padding ids and positions only need to be valid indices."""
        return self.output(self.run(ids, None, positions, None, cache, 0, None, starts,
                                    lengths))

    # ------------------------------------------------------------------ helpers
    def _incoming_cache(self, kwargs) -> Optional[StepCache]:
        cache = None
        for key in ("cache", "past_key_values"):
            value = kwargs.pop(key, None)
            cache = value if value is not None else cache
        kwargs.pop("cache_position", None)
        if cache is None or (isinstance(cache, StepCache) and cache.owner is self):
            if cache is not None:
                cache.check_live()
            return cache
        if hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0:
            return None                  # generate's fresh (empty) DynamicCache: start anew
        raise CheckpointError(
            f"past_key_values of type {type(cache).__name__} cannot continue a fused-kernel "
            "model; pass the cache this model returned (or none)")

    @staticmethod
    def _left_padding(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """[B] int32 count of leading padded positions when `mask` [B, L] (False = padding) is
        padding then tokens in every row, as generate pads, else None (then decode steps attend
        through SDPA with the mask). One host sync, at the prefill."""
        if mask is None:
            return None
        pad = (~mask).sum(1)                                              # [B]
        left = torch.arange(mask.shape[1], device=mask.device)[None] >= pad[:, None]
        return pad.to(torch.int32) if torch.equal(mask, left) else None

    @staticmethod
    def _key_mask(attention_mask, cache: Optional[StepCache], start: int, S: int):
        """[B, start + S] bool over stored + new positions, or None when nothing is padded.
        Decode steps reuse the prefill's verdict (generate appends ones), so an unpadded
        batch never syncs with the host to look at its mask."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2:
            raise CheckpointError("kernel injection takes a 2-D attention_mask [batch, length]")
        if start and (cache is None or cache.key_mask is None):
            return None
        mask = attention_mask[:, -(start + S):].bool()
        if mask.shape[1] < start + S:          # a mask that covers only the newest tokens
            mask = torch.cat([cache.key_mask[:, :start + S - mask.shape[1]], mask], dim=1)
        if start == 0 and bool(mask.all()):
            return None
        return mask

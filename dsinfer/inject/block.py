"""One fused transformer block, configured by a BlockConfig (what differs between families)
and holding this rank's weights as `Lin`s. Shapes: hidden states [B, S, hidden]; q [B, S, Hq, D];
k, v [B, S, Hkv, D]; the layer's cache k, v [B, Hkv, max_len, D] (see cache.py).

Residual adds are fused into the following norm: a block receives the previous block's output
`pending` (its MLP result, not yet added) and starts with (norm1(h + pending), h + pending) in
one kernel. Parallel blocks (GPT-J, GPT-NeoX) sum the attention and MLP partials first and
all-reduce once; sequential blocks all-reduce after attention and after the MLP.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from dsinfer import kernels
from dsinfer.inject.linear import Lin
from dsinfer.tp import TPGroup

Norm = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]   # (weight, bias)


@dataclasses.dataclass
class BlockConfig:
    heads: int                         # query heads on this rank
    kv_heads: int                      # key/value heads on this rank
    head_dim: int
    norm: str = "layernorm"            # kernels.NORMS
    eps: float = 1e-5
    act: str = "gelu_tanh"             # kernels.ACTIVATIONS, or "silu_gate" (packed [gate|up])
    qkv_layout: str = "packed"         # "packed" [q | k | v] rows, "per_head" [h: q k v]
    rotary: Optional[str] = None       # kernels.STYLES ("neox", "gptj")
    rotary_dim: int = 0
    alibi: bool = False
    parallel: str = ""                 # "" | "shared_norm" (GPT-J) | "two_norms" (GPT-NeoX)
    post_norm: bool = False            # BERT: h = norm(h + sublayer(h))
    scale: Optional[float] = None      # attention score scale (None: 1/sqrt(head_dim))
    window: int = 0                    # local attention (GPT-Neo), 0 = unlimited
    causal: bool = True


@dataclasses.dataclass
class BlockWeights:
    qkv: Lin
    o: Lin
    up: Lin                            # fc1, or [gate | up] for silu_gate
    down: Lin
    norm1: Norm
    norm2: Norm = (None, None)         # unused by shared_norm blocks


@dataclasses.dataclass
class Step:
    """What every block of one forward shares."""
    positions: torch.Tensor            # [B, S] int64
    start: int                         # cache index of the first new token
    cache_k: Optional[torch.Tensor]    # [layers, B, Hkv, max_len, D] or None (no cache)
    cache_v: Optional[torch.Tensor]
    starts: Optional[torch.Tensor]     # [B] int32 == start (device side, graph-safe): the
                                       # cache index of the first new token
    lengths: Optional[torch.Tensor]    # [B] int32 == start + S
    key_mask: Optional[torch.Tensor]   # [B, start + S] bool, False = padding; None = no padding
    cos: Optional[torch.Tensor] = None  # [max_pos, rotary_dim / 2] fp32
    sin: Optional[torch.Tensor] = None
    alibi: Optional[torch.Tensor] = None  # [Hq local] fp32 slopes
    first_key: Optional[torch.Tensor] = None  # [B] int32: left padding before it (decode steps
                                              # of a left-padded batch; None = key_mask or none)


class FusedBlock:
    def __init__(self, cfg: BlockConfig, w: BlockWeights, tp: TPGroup, index: int):
        self.cfg, self.w, self.tp, self.index = cfg, w, tp, index

    # ---------------------------------------------------------------- sub-blocks
    def _norm(self, x, residual, norm: Norm):
        # the residual stream is always two or more kernels old here: readable before PDL's wait
        return kernels.add_norm(x, residual, norm[0], norm[1], self.cfg.eps, self.cfg.norm,
                                residual_ready=True)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden] -> qkv [B, S, (Hq + 2 Hkv) D] in the adapter's layout (+ bias)."""
        return self.w.qkv.matmul(x, bias=True)

    def _heads(self, qkv: torch.Tensor):
        c = self.cfg
        return kernels.split_heads(qkv, c.heads, c.kv_heads, c.head_dim, c.qkv_layout)

    def _rotary(self, step: Step):
        """cos, sin, style, rotary_dim for kernels.qkv_to_cache (no tables: no RoPE)."""
        c = self.cfg
        if not c.rotary:
            return None, None, "neox", 0
        return step.cos, step.sin, c.rotary, c.rotary_dim

    def attention(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """x [B, S, hidden] (normed) -> attention output [B, S, hidden] before o's TP sum."""
        c = self.cfg
        B, S, _ = x.shape
        qkv = self._qkv(x)
        if step.cache_k is None:                       # no cache (encoder, use_cache=False)
            o = self._attend_uncached(qkv, step)
        else:
            kc, vc = step.cache_k[self.index], step.cache_v[self.index]
            # one launch: RoPE on q (in place in qkv) and k, k and v into the cache slots
            kernels.qkv_to_cache(qkv, kc, vc, step.starts, step.positions, c.heads,
                                 c.kv_heads, c.head_dim, c.qkv_layout, *self._rotary(step))
            q = self._heads(qkv)[0].transpose(1, 2)    # [B, Hq, S, D]
            end = step.start + S
            if step.start > 0 and (step.key_mask is None or step.first_key is not None):
                o = kernels.decode_attention(q, kc, vc, step.lengths, c.scale, step.alibi,
                                             c.window, first_key=step.first_key)
            else:                                      # prefill, or padding with holes
                o = self._attend(q, kc[:, :, :end], vc[:, :, :end], step)
        o = o.transpose(1, 2).reshape(B, S, c.heads * c.head_dim)
        return self.w.o.matmul(o, bias=self.tp.size == 1)

    def _attend_uncached(self, qkv: torch.Tensor, step: Step) -> torch.Tensor:
        c = self.cfg
        q, k, v = self._heads(qkv)
        if c.rotary:
            q = kernels.apply_rotary(q, step.cos, step.sin, step.positions, c.rotary, c.rotary_dim)
            k = kernels.apply_rotary(k, step.cos, step.sin, step.positions, c.rotary, c.rotary_dim)
        return self._attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), step)

    def _attend(self, q, k, v, step: Step) -> torch.Tensor:
        """Queries = the last S of the Sk key positions, through SDPA (prefill, padded rows)."""
        c = self.cfg
        mask = None
        if step.key_mask is not None or not c.causal:
            mask = _keep_mask(step.key_mask, q.shape[2], k.shape[2], c.causal, q.shape[0],
                              q.device)
        if not c.causal:
            return _bidirectional(q, k, v, c.scale, mask)
        return kernels.prefill_attention(q, k, v, c.scale, step.alibi, c.window, attn_mask=mask)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden] (normed) -> MLP output before down's TP sum."""
        # silu(gate) * up of the packed gate|up weight, or act(x W_up + b): one decode GEMV
        # with the activation in its epilogue (prefill: the GEMM, then the activation kernel)
        h = self.w.up.matmul(x, bias=True, act=self.cfg.act)
        return self.w.down.matmul(h, bias=self.tp.size == 1)

    def _finish(self, y: torch.Tensor, *lins: Lin) -> torch.Tensor:
        """TP sum of rowwise partials, then their biases (added once, after the sum). At TP 1
        the GEMMs already added them (epilogue), and there is nothing to sum."""
        if self.tp.size == 1:
            return y
        y = self.tp.all_reduce(y)
        for lin in lins:
            if lin.bias is not None:
                y.add_(lin.bias)
        return y

    # ---------------------------------------------------------------- the block
    def __call__(self, h: torch.Tensor, pending: Optional[torch.Tensor], step: Step):
        """(h, pending) -> (h', pending'): h' + pending' is this block's output."""
        if self.cfg.post_norm:
            return self._post_norm(h, pending, step)
        x, h = self._norm(h if pending is None else pending, None if pending is None else h,
                          self.w.norm1)
        if self.cfg.parallel:
            x2 = x if self.cfg.parallel == "shared_norm" else self._norm(h, None, self.w.norm2)[0]
            y = self.attention(x, step)
            y.add_(self.mlp(x2))
            return h, self._finish(y, self.w.o, self.w.down)
        a = self._finish(self.attention(x, step), self.w.o)
        x, h = self._norm(a, h, self.w.norm2)
        return h, self._finish(self.mlp(x), self.w.down)

    def _post_norm(self, h, pending, step):
        """BERT: h = norm1(h + attn(h)); h = norm2(h + mlp(h)) (nothing left pending)."""
        a = self._finish(self.attention(h, step), self.w.o)
        h = self._norm(a, h, self.w.norm1)[0]
        m = self._finish(self.mlp(h), self.w.down)
        return self._norm(m, h, self.w.norm2)[0], None


def _keep_mask(key_mask, S: int, Sk: int, causal: bool, B: int, device) -> torch.Tensor:
    """[B, 1, S, Sk] bool: padding keys hidden; each query (the last S positions) always sees
    itself, so a padding row's softmax is never all -inf (its output is unused)."""
    keep = torch.ones((B, 1, S, Sk), dtype=torch.bool, device=device) if key_mask is None \
        else key_mask[:, None, None, :Sk].expand(B, 1, S, Sk).clone()
    if causal:
        rows = torch.arange(S, device=device)
        keep[:, :, rows, Sk - S + rows] = True
    return keep


def _bidirectional(q, k, v, scale, keep) -> torch.Tensor:
    import torch.nn.functional as F
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale)

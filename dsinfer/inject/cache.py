"""The static KV cache of the fused blocks, and the object HF `generate` carries between steps.

Buffers: k, v [layers, batch, kv_heads_local, max_len, head_dim] in the model's dtype, allocated
once (sized by `max_out_tokens`) and reused by every generate call of the same batch size, so a
decode step never allocates and can be replayed from a CUDA graph. Position p of every row lives
at index p (left padding stays in the cache, masked by the attention mask).

`StepCache` is what the model returns as `past_key_values` / `cache`: HF's generation loop asks it
for the sequence length, reorders it for beam search, and hands it back on the next call, which
is how a call tells a continuation from a new sequence. Only the newest StepCache of a decoder
is live: the buffers are shared, and an older one fails loudly instead of reading stale keys.
"""
from __future__ import annotations

from typing import Optional

import torch

from dsinfer.formats import CheckpointError


class KVBuffers:
    def __init__(self, layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (layers, batch, kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def fits(self, batch: int, length: int, dtype, device) -> bool:
        return (self.batch == batch and length <= self.max_len and self.k.dtype == dtype
                and self.k.device == device)

    def grown(self, length: int) -> "KVBuffers":
        """A copy with room for `length` positions (doubling), keeping what is stored."""
        new_len = max(length, 2 * self.max_len)
        layers, batch, heads, old, dim = self.k.shape
        bigger = KVBuffers(layers, batch, heads, new_len, dim, self.k.dtype, self.k.device)
        bigger.k[..., :old, :] = self.k
        bigger.v[..., :old, :] = self.v
        return bigger

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row b of the next step continues row index[b]."""
        index = index.to(self.k.device)
        self.k.copy_(self.k.index_select(1, index))
        self.v.copy_(self.v.index_select(1, index))


class StepCache:
    """Duck-types the parts of transformers' Cache that generation reads."""
    is_compileable = False
    is_croppable = True       # assisted decoding rolls rejected candidate tokens back (crop)

    def __init__(self, owner, epoch: int, layers: int, length: int = 0,
                 key_mask: Optional[torch.Tensor] = None):
        self.owner, self.epoch, self.layers = owner, epoch, layers
        self.length = length            # positions stored, the same for every row
        self.key_mask = key_mask        # [B, length] bool (False = padding) or None
        self.first_key = None           # [B] int32 left-padding lengths (decoder._left_padding)

    # --- what generate / HF code asks of a cache
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_mask_sizes(self, *args, **kwargs):
        return self.length + 1, 0

    @property
    def is_linear(self):
        return [False] * self.layers

    @property
    def is_sliding(self):
        return [False] * self.layers

    def __len__(self) -> int:
        return self.layers

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.check_live()
        self._settle()
        self.owner.buffers.reorder(beam_idx)
        if self.key_mask is not None:
            self.key_mask = self.key_mask.index_select(0, beam_idx.to(self.key_mask.device))
        if self.first_key is not None:
            self.first_key = self.first_key.index_select(0, beam_idx.to(self.first_key.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise CheckpointError("dsinfer's fused cache cannot drop rows mid-generation "
                              "(contrastive search); use replace_with_kernel_inject=False")

    def crop(self, n: int) -> None:
        """n <= 0: drop the last -n positions (transformers >= 5.2x; crop(0) changes nothing);
        n > 0: keep the first n (older transformers: the absolute length)."""
        self.check_live()
        self._settle()
        self.length = min(self.length, n if n > 0 else self.length + n)
        if self.key_mask is not None:
            self.key_mask = self.key_mask[:, :self.length]

    def _settle(self) -> None:
        """A look-ahead step may still be writing the buffers: wait for it, drop it."""
        if getattr(self.owner, "lookahead", None) is not None:
            self.owner.lookahead.cancel()

    def check_live(self) -> None:
        if self.epoch != self.owner.epoch:
            raise CheckpointError(
                "this KV cache belongs to an earlier sequence: dsinfer's fused blocks keep one "
                "live cache per model (a newer forward started another); pass the newest "
                "past_key_values, or none to start again")

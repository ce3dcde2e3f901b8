"""BLOOM: word embeddings followed by a LayerNorm, pre-LayerNorm blocks, fused
query_key_value with per-head interleaved rows [h0: q k v | h1: q k v | ...] (colwise TP keeps
whole heads), ALiBi instead of positions, GELU (tanh), ln_f.

ALiBi: HF adds slope_h * key_pos with key_pos counted over the non-padding keys (cumsum of the
mask); the fused kernels add slope_h * (key_index - query_index). For a query row the two
differ by a constant (query index, plus the row's left padding), which softmax ignores."""
from __future__ import annotations

import math

import torch

from dsinfer.inject.archs.base import Adapter, Unsupported, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


def alibi_slopes(heads: int) -> torch.Tensor:
    """[heads] fp32, as HF's build_alibi_tensor: geometric slopes for the largest power of two
    <= heads, then every other slope of the next power of two for the rest."""
    closest = 2 ** math.floor(math.log2(heads))
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32)
    slopes = torch.pow(base, torch.arange(1, 1 + closest, dtype=torch.int32))
    if closest != heads:
        extra = torch.tensor(2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32)
        rest = min(closest, heads - closest)
        slopes = torch.cat([slopes, torch.pow(extra, torch.arange(1, 1 + 2 * rest, 2,
                                                                 dtype=torch.int32))])
    return slopes


class Bloom(Adapter):
    body = "transformer"
    heads = 0                 # all heads of the model (set by check; alibi_slopes slices them)

    def check(self, config) -> None:
        if config.apply_residual_connection_post_layernorm:
            raise Unsupported("apply_residual_connection_post_layernorm")
        self.heads = config.n_head

    def layers(self, body):
        return body.h

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.n_head
        return BlockConfig(heads=local(heads, tp, "n_head"), kv_heads=local(heads, tp, "n_head"),
                           head_dim=config.hidden_size // heads, norm="layernorm",
                           eps=config.layer_norm_epsilon, act="gelu_tanh",
                           qkv_layout="per_head", alibi=True)

    def block_weights(self, layer) -> BlockWeights:
        a, m = layer.self_attention, layer.mlp
        return BlockWeights(qkv=lin(a.query_key_value), o=lin(a.dense),
                            up=lin(m.dense_h_to_4h), down=lin(m.dense_4h_to_h),
                            norm1=norm_of(layer.input_layernorm),
                            norm2=norm_of(layer.post_attention_layernorm))

    def embed(self, body, input_ids, inputs_embeds, positions, **kwargs):
        h = inputs_embeds if inputs_embeds is not None else body.word_embeddings(input_ids)
        return body.word_embeddings_layernorm(h)

    def final_norm(self, body):
        return norm_of(body.ln_f)

    def alibi_slopes(self, tp) -> torch.Tensor:
        """This rank's heads [rank * local, (rank + 1) * local) of the model's slopes."""
        n = local(self.heads, tp, "n_head")
        return alibi_slopes(self.heads)[tp.rank * n:(tp.rank + 1) * n]

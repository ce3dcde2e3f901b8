"""GPT-2: pre-LayerNorm, Conv1D weights ([in, out], transposed once into [out, in]), packed
c_attn [q | k | v] (each rank holds its heads of each part, in that order), GELU (tanh),
learned absolute positions."""
from __future__ import annotations

from dsinfer.inject.archs.base import GPT2Layout, Unsupported, act, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


class GPT2(GPT2Layout):
    def check(self, config) -> None:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise Unsupported("scale_attn_by_inverse_layer_idx")
        if getattr(config, "add_cross_attention", False):
            raise Unsupported("cross-attention")
        act(config.activation_function)

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.n_head
        return BlockConfig(heads=local(heads, tp, "n_head"), kv_heads=local(heads, tp, "n_head"),
                           head_dim=config.n_embd // heads, norm="layernorm",
                           eps=config.layer_norm_epsilon, act=act(config.activation_function),
                           scale=None if config.scale_attn_weights else 1.0)

    def block_weights(self, layer) -> BlockWeights:
        return BlockWeights(qkv=lin(layer.attn.c_attn), o=lin(layer.attn.c_proj),
                            up=lin(layer.mlp.c_fc), down=lin(layer.mlp.c_proj),
                            norm1=norm_of(layer.ln_1), norm2=norm_of(layer.ln_2))

"""GPT-2: pre-LayerNorm, Conv1D weights ([in, out], transposed once into [out, in]), packed
c_attn [q | k | v] (each rank holds its heads of each part, in that order), GELU (tanh),
learned absolute positions."""
from __future__ import annotations

from dsinfer.inject.archs.base import Adapter, Unsupported, act, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


class GPT2(Adapter):
    body = "transformer"

    def check(self, config) -> None:
        if getattr(config, "scale_attn_by_inverse_layer_idx", False):
            raise Unsupported("scale_attn_by_inverse_layer_idx")
        if getattr(config, "add_cross_attention", False):
            raise Unsupported("cross-attention")
        act(config.activation_function)

    def layers(self, body):
        return body.h

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

    def embed(self, body, input_ids, inputs_embeds, positions, token_type_ids=None, **kwargs):
        h = inputs_embeds if inputs_embeds is not None else body.wte(input_ids)
        h = h + body.wpe(positions)
        if token_type_ids is not None:
            h = h + body.wte(token_type_ids)
        return h

    def final_norm(self, body):
        return norm_of(body.ln_f)

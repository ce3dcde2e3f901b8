"""Llama family (Llama 1-3, Mistral, Qwen2, SmolLM): RMSNorm, GQA, NeoX-style RoPE (inv_freq
and attention scaling taken from the model's own rotary module, so rope-scaling variants that
only change inv_freq are exact), SiLU-gated MLP, optional sliding window per layer."""
from __future__ import annotations

from dsinfer.inject.archs.base import Adapter, Unsupported, act, fused, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


class Llama(Adapter):
    body = "model"

    def check(self, config) -> None:
        if act(config.hidden_act) != "silu":
            raise Unsupported(f"hidden_act {config.hidden_act!r}")
        rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                or {})
        if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
            raise Unsupported(f"rope type {rope.get('rope_type')!r} (changes with length)")

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        return BlockConfig(
            heads=local(heads, tp, "num_attention_heads"),
            kv_heads=local(kv, tp, "num_key_value_heads"), head_dim=head_dim,
            norm="rmsnorm", eps=config.rms_norm_eps, act="silu_gate", rotary="neox",
            rotary_dim=int(head_dim * getattr(config, "partial_rotary_factor", 1.0)),
            window=self._window(config, index))

    @staticmethod
    def _window(config, index: int) -> int:
        window = getattr(config, "sliding_window", None) or 0
        types = getattr(config, "layer_types", None)
        if types is not None:
            return window if types[index] == "sliding_attention" else 0
        return window if getattr(config, "use_sliding_window", True) else 0

    def block_weights(self, layer) -> BlockWeights:
        a, m = layer.self_attn, layer.mlp
        return BlockWeights(qkv=fused(a.q_proj, a.k_proj, a.v_proj), o=lin(a.o_proj),
                            up=fused(m.gate_proj, m.up_proj), down=lin(m.down_proj),
                            norm1=norm_of(layer.input_layernorm),
                            norm2=norm_of(layer.post_attention_layernorm))

    def embed(self, body, input_ids, inputs_embeds, positions, **kwargs):
        return inputs_embeds if inputs_embeds is not None else body.embed_tokens(input_ids)

    def final_norm(self, body):
        return norm_of(body.norm)

    def rotary_inv_freq(self, body):
        rot = body.rotary_emb
        return rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0))

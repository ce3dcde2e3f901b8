"""GPT-NeoX (Pythia): fused query_key_value whose rows are per head [h: q k v] (a colwise TP
shard holds whole heads), NeoX-style RoPE on the first rotary_pct * head_dim features (inv_freq
and attention scaling taken from the model's rotary module, as for Llama), LayerNorm, and either
the parallel residual h + attn(ln1(h)) + mlp(ln2(h)) or the sequential block."""
from __future__ import annotations

from dsinfer.inject.archs.base import Adapter, Unsupported, act, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


def _rope(config) -> dict:
    return (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
            or {})


def _rotary_factor(config) -> float:
    """rope_parameters["partial_rotary_factor"] (transformers 5), else the legacy rotary_pct."""
    factor = _rope(config).get("partial_rotary_factor")
    return factor if factor is not None else getattr(config, "rotary_pct", 0.25)


class GPTNeoX(Adapter):
    body = "gpt_neox"

    def check(self, config) -> None:
        act(config.hidden_act)
        head_dim = config.hidden_size // config.num_attention_heads
        if int(head_dim * _rotary_factor(config)) % 2:
            raise Unsupported(f"an odd rotary width ({_rotary_factor(config)} x {head_dim})")
        rope = _rope(config)
        if rope.get("rope_type", rope.get("type", "default")) in ("dynamic", "longrope"):
            raise Unsupported(f"rope type {rope.get('rope_type')!r} (changes with length)")

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        return BlockConfig(
            heads=local(heads, tp, "num_attention_heads"),
            kv_heads=local(heads, tp, "num_attention_heads"), head_dim=head_dim,
            norm="layernorm", eps=config.layer_norm_eps, act=act(config.hidden_act),
            qkv_layout="per_head", rotary="neox",
            rotary_dim=int(head_dim * _rotary_factor(config)),      # HF's rotary_ndims
            parallel="two_norms" if config.use_parallel_residual else "")

    def block_weights(self, layer) -> BlockWeights:
        a, m = layer.attention, layer.mlp
        return BlockWeights(qkv=lin(a.query_key_value), o=lin(a.dense),
                            up=lin(m.dense_h_to_4h), down=lin(m.dense_4h_to_h),
                            norm1=norm_of(layer.input_layernorm),
                            norm2=norm_of(layer.post_attention_layernorm))

    def embed(self, body, input_ids, inputs_embeds, positions, **kwargs):
        return inputs_embeds if inputs_embeds is not None else body.embed_in(input_ids)

    def final_norm(self, body):
        return norm_of(body.final_layer_norm)

    def rotary_inv_freq(self, body):
        rot = body.rotary_emb
        return rot.inv_freq, float(getattr(rot, "attention_scaling", 1.0))

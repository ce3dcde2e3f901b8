"""GPT-J: attention and MLP in parallel from ONE LayerNorm (h + attn(ln(h)) + mlp(ln(h))),
separate Q/K/V and out_proj without bias (Q/K/V fused into one [q | k | v] GEMM), fc_in/fc_out
with bias, interleaved ("gptj") RoPE on the first rotary_dim features of each head."""
from __future__ import annotations

import torch

from dsinfer.inject.archs.base import GPT2Layout, Unsupported, act, fused, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


def _rotary_dim(config) -> int:
    """HF's pos_embd_dim: rotary_dim, or hidden_size when None (which HF itself can only
    apply when it is the head size, i.e. one head)."""
    return config.rotary_dim or config.n_embd


class GPTJ(GPT2Layout):
    learned_positions = False     # rotary

    def check(self, config) -> None:
        act(config.activation_function)
        head_dim = config.n_embd // config.n_head
        if _rotary_dim(config) > head_dim or _rotary_dim(config) % 2:
            raise Unsupported(f"rotary_dim {config.rotary_dim} with head size {head_dim}")

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.n_head
        return BlockConfig(heads=local(heads, tp, "n_head"), kv_heads=local(heads, tp, "n_head"),
                           head_dim=config.n_embd // heads, norm="layernorm",
                           eps=config.layer_norm_epsilon, act=act(config.activation_function),
                           rotary="gptj", rotary_dim=_rotary_dim(config),
                           parallel="shared_norm")

    def block_weights(self, layer) -> BlockWeights:
        a = layer.attn
        return BlockWeights(qkv=fused(a.q_proj, a.k_proj, a.v_proj), o=lin(a.out_proj),
                            up=lin(layer.mlp.fc_in), down=lin(layer.mlp.fc_out),
                            norm1=norm_of(layer.ln_1))

    def rotary_inv_freq(self, body):
        """[rotary_dim / 2] fp32, by HF's create_sinusoidal_positions recipe (int64 arange / dim,
        fp32 power), so the decoder's fp32 angles pos * inv_freq equal HF's table. HF stores only
        that sin | cos table (transformers 5.24: body.rotary_emb.embed_positions; 5.17: a copy in
        each attention module; both cast to the model dtype), not inv_freq, so it is recomputed
        here; the decoder's fp32 tables are then at least as exact as HF's."""
        dim = _rotary_dim(body.config)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim))
        return inv_freq.float(), 1.0

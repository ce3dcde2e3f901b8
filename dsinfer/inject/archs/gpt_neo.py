"""GPT-Neo: pre-LayerNorm, separate Q/K/V without bias (fused into one [q | k | v] GEMM; each
rank holds its heads of each part), out_proj with bias, NO score scaling (HF multiplies q k^T by
nothing), learned absolute positions (wpe), and per-layer global or local attention: a "local"
layer sees the keys at cache index j with i - j < window_size (HF's tril XOR tril(-window))."""
from __future__ import annotations

from dsinfer.inject.archs.base import GPT2Layout, Unsupported, act, fused, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


class GPTNeo(GPT2Layout):
    def check(self, config) -> None:
        act(config.activation_function)
        kinds = set(config.attention_layers)
        if not kinds <= {"global", "local"}:
            raise Unsupported(f"attention layer types {sorted(kinds - {'global', 'local'})}")

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.num_heads
        return BlockConfig(heads=local(heads, tp, "num_heads"),
                           kv_heads=local(heads, tp, "num_heads"),
                           head_dim=config.hidden_size // heads, norm="layernorm",
                           eps=config.layer_norm_epsilon, act=act(config.activation_function),
                           scale=1.0,                      # HF: q k^T unscaled
                           window=self._window(config, index))

    @staticmethod
    def _window(config, index: int) -> int:
        return config.window_size if config.attention_layers[index] == "local" else 0

    def block_weights(self, layer) -> BlockWeights:
        a = layer.attn.attention
        return BlockWeights(qkv=fused(a.q_proj, a.k_proj, a.v_proj), o=lin(a.out_proj),
                            up=lin(layer.mlp.c_fc), down=lin(layer.mlp.c_proj),
                            norm1=norm_of(layer.ln_1), norm2=norm_of(layer.ln_2))

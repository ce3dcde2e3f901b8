"""OPT (125m .. 66b): pre-LayerNorm blocks (post-LN OPT-350m is not covered), separate q/k/v
with bias fused into one [q | k | v] GEMM (each rank: its heads of each), attention scaling
head_dim**-0.5 (HF scales q before the product; the same maths), fc1 -> ReLU -> fc2, learned
positions offset by 2 (derived from the attention mask when the caller gives none),
final_layer_norm, and the optional project_in / project_out linears around the body."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsinfer.inject.archs.base import Adapter, Unsupported, act, fused, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


class OPT(Adapter):
    body = "model.decoder"

    def check(self, config) -> None:
        if not config.do_layer_norm_before:
            raise Unsupported("do_layer_norm_before=False (post-LayerNorm OPT-350m)")
        act(config.activation_function)

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.num_attention_heads
        return BlockConfig(heads=local(heads, tp, "num_attention_heads"),
                           kv_heads=local(heads, tp, "num_attention_heads"),
                           head_dim=config.hidden_size // heads, norm="layernorm", eps=1e-5,
                           act=act(config.activation_function))

    def block_weights(self, layer) -> BlockWeights:
        a = layer.self_attn
        return BlockWeights(qkv=fused(a.q_proj, a.k_proj, a.v_proj), o=lin(a.out_proj),
                            up=lin(layer.fc1), down=lin(layer.fc2),
                            norm1=norm_of(layer.self_attn_layer_norm),
                            norm2=norm_of(layer.final_layer_norm))

    def positions(self, attention_mask, start, S, B, device) -> torch.Tensor:
        """As HF OPTDecoder without position_ids: cumsum over the 2-D mask of all (stored and
        new) positions, padding at -1, the last S kept; no mask: start .. start + S - 1."""
        if attention_mask is None:
            return super().positions(None, start, S, B, device)
        mask = attention_mask.to(device)
        pos = (torch.cumsum(mask, dim=1) * mask - 1).long()
        return pos[:, start:]

    def embed(self, body, input_ids, inputs_embeds, positions, **kwargs):
        h = inputs_embeds if inputs_embeds is not None else body.embed_tokens(input_ids)
        if body.project_in is not None:                       # word_embed_proj_dim -> hidden
            h = body.project_in(h)
        table = body.embed_positions
        return h + F.embedding(positions + table.offset, table.weight).to(h.dtype)

    def final_norm(self, body):
        return None if body.final_layer_norm is None else norm_of(body.final_layer_norm)

    def output(self, body, out):
        if body.project_out is not None:                      # hidden -> word_embed_proj_dim
            out.last_hidden_state = body.project_out(out.last_hidden_state)
        return out

"""BERT encoders (BertModel, BertForMaskedLM, ...ForSequenceClassification, ...ForPreTraining):
post-LayerNorm blocks (h = LN1(h + attn(h)); h = LN2(h + mlp(h))), bidirectional attention
over a key padding mask, no KV cache, GELU (exact erf), separate query/key/value with bias
fused into one [q | k | v] GEMM.

The body is the BertModel itself (model.base_model): the fused decoder receives the caller's
2-D attention_mask directly (no 4-D mask to decode, whatever transformers builds), HF's own
embeddings module runs (word + position + token type, then LayerNorm), and the output gets
BertModel's pooler_output (sequence classification reads it) beside last_hidden_state."""
from __future__ import annotations

from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

from dsinfer.formats import CheckpointError
from dsinfer.inject.archs.base import Adapter, Unsupported, act, fused, lin, local, norm_of
from dsinfer.inject.block import BlockConfig, BlockWeights


class Bert(Adapter):
    body = "bert"

    def find_body(self, model):
        return model.base_model            # BertModel: the model itself or model.bert

    def check(self, config) -> None:
        if config.is_decoder or getattr(config, "add_cross_attention", False):
            raise Unsupported("a decoder BERT (causal self-attention or cross-attention)")
        kind = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if kind != "absolute":
            raise Unsupported(f"position_embedding_type {kind!r}")
        act(config.hidden_act)

    def layers(self, body):
        return body.encoder.layer

    def block_config(self, config, tp, index) -> BlockConfig:
        heads = config.num_attention_heads
        return BlockConfig(heads=local(heads, tp, "num_attention_heads"),
                           kv_heads=local(heads, tp, "num_attention_heads"),
                           head_dim=config.hidden_size // heads, norm="layernorm",
                           eps=config.layer_norm_eps, act=act(config.hidden_act),
                           post_norm=True, causal=False)

    def block_weights(self, layer) -> BlockWeights:
        a = layer.attention
        s = a.self
        return BlockWeights(qkv=fused(s.query, s.key, s.value), o=lin(a.output.dense),
                            up=lin(layer.intermediate.dense), down=lin(layer.output.dense),
                            norm1=norm_of(a.output.LayerNorm),
                            norm2=norm_of(layer.output.LayerNorm))

    def embed(self, body, input_ids, inputs_embeds, positions, token_type_ids=None,
              encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None:
            raise CheckpointError("encoder_hidden_states (cross-attention) is not available with "
                                  "kernel injection; use replace_with_kernel_inject=False")
        return body.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                               position_ids=positions, inputs_embeds=inputs_embeds)

    def output(self, body, out):
        h = out.last_hidden_state
        pooled = body.pooler(h) if body.pooler is not None else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=h,
                                                            pooler_output=pooled)

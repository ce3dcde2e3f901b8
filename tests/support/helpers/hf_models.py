"""Tiny random HF models, one per architecture in the spec table (test-side only)."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

# name -> (config class, kwargs, model class). Sizes divide by TP 4: heads 8, KV heads 4,
# vocab 128, ffn 128. Llama-family variants cover GQA.
CONFIGS = {
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=8, n_positions=64, vocab_size=128,
                                 bos_token_id=0, eos_token_id=0), tf.GPT2LMHeadModel),
    "gpt_neo": (tf.GPTNeoConfig, dict(hidden_size=64, num_layers=2, num_heads=8,
                                      attention_types=[[["global", "local"], 1]], window_size=8,
                                      max_position_embeddings=64, vocab_size=128,
                                      bos_token_id=0, eos_token_id=0), tf.GPTNeoForCausalLM),
    "gptj": (tf.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=8, rotary_dim=4, n_positions=64,
                                 vocab_size=128, bos_token_id=0, eos_token_id=0),
             tf.GPTJForCausalLM),
    "gpt_neox": (tf.GPTNeoXConfig, dict(hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=8, intermediate_size=128,
                                        max_position_embeddings=64, vocab_size=128),
                 tf.GPTNeoXForCausalLM),
    "opt": (tf.OPTConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                               ffn_dim=128, max_position_embeddings=64, vocab_size=128,
                               word_embed_proj_dim=64), tf.OPTForCausalLM),
    "bloom": (tf.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=8, vocab_size=128),
              tf.BloomForCausalLM),
    "llama": (tf.LlamaConfig, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4,
                                   vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False), tf.LlamaForCausalLM),
    "mistral": (tf.MistralConfig, dict(hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=8,
                                       num_key_value_heads=4, vocab_size=128,
                                       max_position_embeddings=64), tf.MistralForCausalLM),
    "qwen2": (tf.Qwen2Config, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=128,
                                   max_position_embeddings=64), tf.Qwen2ForCausalLM),
    "bert": (tf.BertConfig, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                 intermediate_size=128, vocab_size=128,
                                 max_position_embeddings=64), tf.BertForMaskedLM),
    "t5": (tf.T5Config, dict(d_model=64, d_kv=8, d_ff=128, num_layers=2, num_heads=8,
                             vocab_size=128, decoder_start_token_id=0), tf.T5ForConditionalGeneration),
}
CAUSAL = ["gpt2", "gpt_neo", "gptj", "gpt_neox", "opt", "bloom", "llama", "mistral", "qwen2"]


def build(name: str, seed: int = 0, **overrides):
    cfg_cls, kwargs, model_cls = CONFIGS[name]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**kwargs, **overrides})).eval()
    with torch.no_grad():  # norms at 1 and biases at 0 would hide swapped or dropped tensors
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, **kwargs)
    return path


def inputs(model, seq: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, seq), generator=g)
    out = {"input_ids": ids}
    if model.config.is_encoder_decoder:
        out["decoder_input_ids"] = ids[:, : seq // 2]
    return out

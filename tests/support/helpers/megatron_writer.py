"""Test-side writer of Megatron-LM legacy checkpoints, laid out as Megatron-LM's save_checkpoint
writes them, from an HF GPT-2 or Llama state dict. Independent of dsinfer.formats.megatron.

    ROOT/latest_checkpointed_iteration.txt       str(iteration) or "release"
    ROOT/{iter_%07d|release}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
        {"args": Namespace, "checkpoint_version": v (absent for 0), "iteration": it, "model": ...}

`names`: "new" = legacy nested language_model.{embedding, encoder, output_layer} with
`self_attention.`; "old" = `transformer` and `attention.` (with the older, shorter args);
"mcore" = flat megatron-core names (decoder.layers.N..., `_extra_state` = None entries).
QKV rows per rank by `version`: 0 [3, np, hn], 1.0 [np, hn, 3], 2.0/3.0 [ng, hpg+2, hn].
"""
from __future__ import annotations

import argparse
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import torch

# role -> megatron names per style; {i} = local layer index
LAYER_NAMES = {
    "new": {"ln1": "input_layernorm", "qkv": "self_attention.query_key_value",
            "proj": "self_attention.dense", "ln2": "post_attention_layernorm",
            "fc1": "mlp.dense_h_to_4h", "fc2": "mlp.dense_4h_to_h"},
    "old": {"ln1": "input_layernorm", "qkv": "attention.query_key_value",
            "proj": "attention.dense", "ln2": "post_attention_layernorm",
            "fc1": "mlp.dense_h_to_4h", "fc2": "mlp.dense_4h_to_h"},
    "mcore": {"ln1": "input_layernorm", "qkv": "self_attention.linear_qkv",
              "proj": "self_attention.linear_proj", "ln2": "pre_mlp_layernorm",
              "fc1": "mlp.linear_fc1", "fc2": "mlp.linear_fc2"},
}
STACK = {"new": "encoder", "old": "transformer", "mcore": "decoder"}


def _hf_geometry(cfg: dict) -> dict:
    if cfg["model_type"] == "gpt2":
        h, nh = cfg["n_embd"], cfg["n_head"]
        return dict(llama=False, hidden=h, heads=nh, groups=nh, hn=h // nh, layers=cfg["n_layer"],
                    ffn=cfg.get("n_inner") or 4 * h, eps=cfg["layer_norm_epsilon"],
                    max_pos=cfg["n_positions"], bias=True)
    h, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    return dict(llama=True, hidden=h, heads=nh, groups=cfg.get("num_key_value_heads") or nh,
                hn=cfg.get("head_dim") or h // nh, layers=cfg["num_hidden_layers"],
                ffn=cfg["intermediate_size"], eps=cfg["rms_norm_eps"],
                max_pos=cfg["max_position_embeddings"],
                bias="qkv" if cfg["model_type"] == "qwen2" else bool(cfg.get("attention_bias")))


def _global_layer(sd: Dict[str, torch.Tensor], i: int, g: dict) -> Dict[str, torch.Tensor]:
    """One layer as Megatron-global tensors: qkv as [groups, hpg+2, hn, *in], fc1 as
    {"gate", "up"} (SwiGLU) or [ffn, hidden], Linear layout [out, in]."""
    out = {}
    hpg = g["heads"] // g["groups"]
    if not g["llama"]:
        p = f"transformer.h.{i}."
        names = {"ln1": "ln_1", "ln2": "ln_2", "proj": "attn.c_proj", "fc1": "mlp.c_fc",
                 "fc2": "mlp.c_proj"}
        for role, n in names.items():
            w = sd[p + n + ".weight"]
            out[role + ".weight"] = w if role.startswith("ln") else w.t()  # Conv1D -> Linear
            out[role + ".bias"] = sd[p + n + ".bias"]
        for part in ("weight", "bias"):
            t = sd[p + "attn.c_attn." + part]
            t = t.t() if part == "weight" else t  # [3*hidden, *in]: Q_all; K_all; V_all
            q, k, v = (x.reshape(g["heads"], 1, g["hn"], *t.shape[1:]) for x in t.chunk(3, 0))
            out["qkv." + part] = torch.cat([q, k, v], 1)
        return out
    p = f"model.layers.{i}."
    out["ln1.weight"] = sd[p + "input_layernorm.weight"]
    out["ln2.weight"] = sd[p + "post_attention_layernorm.weight"]
    parts = ("weight", "bias") if g["bias"] else ("weight",)
    for part in parts:
        q, k, v = (sd[p + f"self_attn.{n}_proj.{part}"] for n in "qkv")
        rest = q.shape[1:]
        out["qkv." + part] = torch.cat([q.reshape(g["groups"], hpg, g["hn"], *rest),
                                        k.reshape(g["groups"], 1, g["hn"], *rest),
                                        v.reshape(g["groups"], 1, g["hn"], *rest)], 1)
        if part == "bias" and g["bias"] == "qkv":      # Qwen2: no other linear has a bias
            continue
        out["proj." + part] = sd[p + "self_attn.o_proj." + part]
        out["fc1." + part] = {"gate": sd[p + "mlp.gate_proj." + part],
                              "up": sd[p + "mlp.up_proj." + part]}
        out["fc2." + part] = sd[p + "mlp.down_proj." + part]
    return out


def _qkv_rank(t: torch.Tensor, version: float) -> torch.Tensor:
    """[groups_r, hpg+2, hn, *in] -> the per-rank row order of `version`, flattened."""
    rest = t.shape[3:]
    if version == 0:  # [3, np, hn]
        t = t.transpose(0, 1)
    elif version == 1.0:  # [np, hn, 3]
        t = t.transpose(1, 2)
    return t.reshape(-1, *rest)


def _rank_layer(layer: Dict[str, object], tp: int, r: int, version: float
                ) -> Dict[str, torch.Tensor]:
    out = {}
    for key, t in layer.items():
        role, part = key.split(".")
        if role == "qkv":
            out[key] = _qkv_rank(t.chunk(tp, 0)[r], version)
        elif role == "fc1" and isinstance(t, dict):  # SwiGLU: [gate_r; up_r]
            out[key] = torch.cat([t["gate"].chunk(tp, 0)[r], t["up"].chunk(tp, 0)[r]], 0)
        elif role == "fc1":
            out[key] = t.chunk(tp, 0)[r]
        elif role in ("proj", "fc2") and part == "weight":  # row parallel
            out[key] = t.chunk(tp, 1)[r]
        else:  # norms, row-parallel biases: replicated
            out[key] = t
        out[key] = out[key].clone().contiguous()
    return out


def _pad_vocab(t: torch.Tensor, padded: int, seed: int) -> torch.Tensor:
    """Megatron pads the vocab with extra (randomly initialised) rows."""
    if t.shape[0] == padded:
        return t
    g = torch.Generator().manual_seed(seed)
    extra = torch.randn(padded - t.shape[0], t.shape[1], generator=g).to(t.dtype)
    return torch.cat([t, extra], 0)


def make_args(cfg: dict, g: dict, *, tp: int, pp: int, names: str, padded: int, vocab: int,
              make_divisible: int, stage_layers: List[int]) -> argparse.Namespace:
    """args with Megatron-LM's field names; names="old" omits the fields older Megatron lacked."""
    llama = g["llama"]
    a = dict(num_layers=g["layers"], hidden_size=g["hidden"], num_attention_heads=g["heads"],
             max_position_embeddings=g["max_pos"], seq_length=g["max_pos"],
             layernorm_epsilon=g["eps"], tensor_model_parallel_size=tp,
             pipeline_model_parallel_size=pp, padded_vocab_size=padded, vocab_size=vocab,
             make_vocab_size_divisible_by=make_divisible, hidden_dropout=0.0,
             attention_dropout=0.0, init_method_std=0.02, fp16=False, bf16=False,
             bias_gelu_fusion=not llama and cfg.get("activation_function") == "gelu_new",
             openai_gelu=False, onnx_safe=None, rank=0, iteration=0)
    if names != "old":
        a.update(ffn_hidden_size=g["ffn"], kv_channels=g["hn"],
                 group_query_attention=g["groups"] != g["heads"],
                 num_query_groups=g["groups"] if g["groups"] != g["heads"] else 1,
                 normalization="RMSNorm" if llama else "LayerNorm", swiglu=llama,
                 position_embedding_type="rope" if llama else "learned_absolute",
                 add_bias_linear=g["bias"] is True, add_qkv_bias=bool(g["bias"]),
                 untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", True),
                 rotary_base=int(_rope_theta(cfg)) if llama else 10000, rotary_percent=1.0,
                 rotary_interleaved=False, virtual_pipeline_model_parallel_size=None,
                 decoder_first_pipeline_num_layers=stage_layers[0] if pp > 1 else None,
                 decoder_last_pipeline_num_layers=None, transformer_impl="local",
                 params_dtype=torch.float32)
    return argparse.Namespace(**a)


def _rope_theta(cfg: dict) -> float:
    return cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)


def _stage_model(style, layers, emb, fin, tied_copy, tp, r, version):
    """The `model` entry of one (stage, TP rank) file: nested (legacy) or flat (mcore)."""
    stack, pre = STACK[style], "" if style == "mcore" else "language_model."
    flat = OrderedDict()
    for key, t in emb.items():
        flat[{"wte": f"{pre}embedding.word_embeddings.weight",
              "wpe": f"{pre}embedding.position_embeddings.weight"}[key]] = t
    for j, layer in enumerate(layers):
        for key, t in _rank_layer(layer, tp, r, version).items():
            role, part = key.split(".")
            flat[f"{pre}{stack}.layers.{j}.{LAYER_NAMES[style][role]}.{part}"] = t
            if style == "mcore" and part == "weight" and role in ("qkv", "proj", "fc1", "fc2"):
                flat[f"{stack}.layers.{j}.{LAYER_NAMES[style][role]}._extra_state"] = None
    for key, t in fin.items():
        name = {"lnf.weight": f"{pre}{stack}.final_layernorm.weight",
                "lnf.bias": f"{pre}{stack}.final_layernorm.bias",
                "head": f"{pre}output_layer.weight"}[key]
        flat[name] = t
    if style == "mcore" and fin:
        flat["output_layer._extra_state"] = None
    if tied_copy is not None:
        flat["output_layer.weight" if style == "mcore" else "word_embeddings_for_head.weight"] = \
            tied_copy
    return flat if style == "mcore" else _nest(flat)


def _nest(flat: Dict[str, torch.Tensor]) -> dict:
    """Legacy layout: language_model.{embedding: {word_embeddings: {weight}}, encoder: {flat
    'layers.N...' names}, output_layer: {weight}}; word_embeddings_for_head: {weight}."""
    out: dict = OrderedDict()
    for name, t in flat.items():
        parts = name.split(".")
        if parts[0] == "word_embeddings_for_head":
            out.setdefault(parts[0], OrderedDict())[parts[1]] = t
            continue
        lm = out.setdefault("language_model", OrderedDict())
        if parts[1] == "embedding":
            emb = lm.setdefault("embedding", OrderedDict())
            emb.setdefault(parts[2], OrderedDict())[parts[3]] = t
        elif parts[1] == "output_layer":
            lm.setdefault("output_layer", OrderedDict())[parts[2]] = t
        else:  # encoder / transformer: one flat dict of 'layers.N...' and 'final_layernorm.*'
            lm.setdefault(parts[1], OrderedDict())[".".join(parts[2:])] = t
    return out


def write_megatron(root: Path, hf_state: Dict[str, torch.Tensor], config: dict, *, tp: int = 1,
                   pp: int = 1, stage_layers: Optional[List[int]] = None, version: float = 3.0,
                   names: str = "new", tag=1, make_divisible: int = 64,
                   stored_version="same", file_name: str = "model_optim_rng.pt",
                   zip_format: bool = True, seed: int = 0) -> Path:
    """Write `hf_state` (an HF GPT-2 / Llama state dict, `config` its config dict) as a Megatron
    checkpoint under `root`; returns `root`. `stored_version`: the checkpoint_version key to
    store ("same" = `version`, None = absent, which Megatron does for version 0)."""
    g = _hf_geometry(config)
    assert not (names == "old" and g["llama"]), "old Megatron names predate Llama-style models"
    root = Path(root)
    wte = hf_state["model.embed_tokens.weight" if g["llama"] else "transformer.wte.weight"]
    vocab = wte.shape[0]
    multiple = make_divisible * tp
    padded = -(-vocab // multiple) * multiple
    wte = _pad_vocab(wte, padded, seed)
    tied = config.get("tie_word_embeddings", True)
    head = None if tied else _pad_vocab(hf_state["lm_head.weight"], padded, seed + 1)
    layers = [_global_layer(hf_state, i, g) for i in range(g["layers"])]
    prefix = "model.norm" if g["llama"] else "transformer.ln_f"
    lnf = {f"lnf.{p}": hf_state[f"{prefix}.{p}"] for p in ("weight", "bias")
           if f"{prefix}.{p}" in hf_state}
    stage_layers = stage_layers or [g["layers"] // pp] * pp
    assert sum(stage_layers) == g["layers"] and len(stage_layers) == pp
    args = make_args(config, g, tp=tp, pp=pp, names=names, padded=padded, vocab=vocab,
                     make_divisible=make_divisible, stage_layers=stage_layers)
    folder = root / ("release" if tag == "release" else f"iter_{tag:07d}")
    store = version if stored_version == "same" else stored_version
    if version == 0 and stored_version == "same":
        store = None
    start = 0
    for s, n in enumerate(stage_layers):
        first, last = s == 0, s == pp - 1
        for r in range(tp):
            emb = {}
            if first:
                emb["wte"] = wte.chunk(tp, 0)[r].clone()
                if not g["llama"]:
                    emb["wpe"] = hf_state["transformer.wpe.weight"]
            fin = dict(lnf) if last else {}
            if last and head is not None:
                fin["head"] = head.chunk(tp, 0)[r].clone()
            tied_copy = wte.chunk(tp, 0)[r].clone() if (tied and last and pp > 1) else None
            model = _stage_model(names, layers[start:start + n], emb, fin, tied_copy, tp, r,
                                 version)
            state = {"args": args, "iteration": 0 if tag == "release" else tag, "model": model}
            if store is not None:
                state["checkpoint_version"] = store
            d = folder / (f"mp_rank_{r:02d}" + (f"_{s:03d}" if pp > 1 else ""))
            d.mkdir(parents=True, exist_ok=True)
            torch.save(state, d / file_name, _use_new_zipfile_serialization=zip_format)
        start += n
    (root / "latest_checkpointed_iteration.txt").write_text(str(tag))
    return root

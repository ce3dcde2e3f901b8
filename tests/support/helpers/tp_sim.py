"""Runs a pre-sharded dsinfer checkpoint through plain HF modules, simulating tensor
parallelism in one process: every split Linear / Conv1D / Embedding is replaced by a module that
holds each rank's slice exactly as stored in that rank's file, computes each rank's partial
result separately and combines them the way the collective would (all-gather for split
outputs, all-reduce for split inputs, masked-lookup sum for vocab-parallel embeddings).
Logits equal to the original model's prove the slices and their placement metadata right."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

import torch
import torch.nn.functional as F
import transformers as tf
from transformers.pytorch_utils import Conv1D

from dsinfer.formats.dsinfer_format import load_manifest, read_rank
from dsinfer.formats.layout import Placement, shard, unshard


class ShardedLinear(torch.nn.Module):
    """Linear (weight [out, in]) or Conv1D (weight [in, out]) split on `split_dim`."""

    def __init__(self, weights: List[torch.Tensor], biases, info: dict, conv1d: bool):
        super().__init__()
        self.weights, self.biases, self.conv1d = weights, biases, conv1d
        self.weight = weights[0]  # some HF modules read .weight.dtype (T5)
        out_dim = 1 if conv1d else 0
        self.split_out = info["split_dim"] == out_dim
        self.parts = info.get("parts")
        self.bias_replicated = biases is not None and not isinstance(biases, list)

    def _mm(self, x, w):
        return x @ w if self.conv1d else F.linear(x, w)

    def forward(self, x):
        tp = len(self.weights)
        if self.split_out:  # colwise: each rank computes its output features; all-gather
            outs = [self._mm(x, w) + (self.biases[r] if self.biases is not None else 0)
                    for r, w in enumerate(self.weights)]
            return unshard(outs, Placement(x.dim() - 1, tuple(self.parts) if self.parts else None))
        # rowwise: each rank multiplies its input features; all-reduce; bias once
        y = sum(self._mm(shard(x, Placement(x.dim() - 1), tp, r), w)
                for r, w in enumerate(self.weights))
        return y + self.biases if self.biases is not None else y


class ShardedEmbedding(torch.nn.Module):
    def __init__(self, weights: List[torch.Tensor], info: dict, padding_idx=None):
        super().__init__()
        self.weights, self.split_dim = weights, info["split_dim"]
        self.weight = weights[0]

    def forward(self, ids):
        if self.split_dim == 1:
            return torch.cat([F.embedding(ids, w) for w in self.weights], dim=-1)
        out, start = 0, 0
        for w in self.weights:  # vocab-parallel: rank r owns rows [start, start + n)
            n = w.shape[0]
            mine = (ids >= start) & (ids < start + n)
            local = torch.where(mine, ids - start, torch.zeros_like(ids))
            out = out + F.embedding(local, w) * mine.unsqueeze(-1)
            start += n
        return out


def _set(model, dotted: str, module) -> None:
    parent, _, leaf = dotted.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# On-disk (checkpoint) name -> module name where transformers 5 renames at load time.
RENAMES = {"gpt_neox": [(r"^embed_out\.", "lm_head.")]}


def _renamed(model_type: str, names):
    out = {}
    for n in names:
        m = n
        for pat, repl in RENAMES.get(model_type, []):
            m = re.sub(pat, repl, m)
        out[n] = m
    return out


def _aliases(model, stored) -> dict:
    """For parameters shared between modules (tied embeddings), every name -> the stored one."""
    groups = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    out = {}
    for names in groups.values():
        keep = next((n for n in names if n in stored), None)
        out.update({n: keep for n in names if keep and n != keep})
    return out


def load_tp_model(path: Path, model_cls):
    root, manifest = load_manifest(path)
    config = tf.AutoConfig.for_model(**json.loads((root / "config.json").read_text()))
    model = model_cls(config).eval().float()
    names = _renamed(config.model_type, manifest["tensors"])
    ranks = [{names[n]: t for n, t in read_rank(path, r).items()}
             for r in range(manifest["tp_size"])]
    tensors = {names[n]: i for n, i in manifest["tensors"].items()}
    replicated = {n: ranks[0][n].float() for n, i in tensors.items() if i["split_dim"] is None}
    missing, unexpected = model.load_state_dict(replicated, strict=False)
    assert not unexpected, unexpected
    alias = _aliases(model, tensors)  # tied parameters: module name -> stored name
    split = {n for n, i in tensors.items() if i["split_dim"] is not None}
    assert {alias.get(n, n) for n in missing} <= split | {n for n, _ in model.named_buffers()}
    for mod_name, mod in list(model.named_modules()):
        wname = alias.get(f"{mod_name}.weight", f"{mod_name}.weight")
        info = tensors.get(wname)
        if info is None or info["split_dim"] is None:
            continue
        w = [r[wname].float() for r in ranks]
        if isinstance(mod, torch.nn.Embedding):
            _set(model, mod_name, ShardedEmbedding(w, info))
            continue
        bname = alias.get(f"{mod_name}.bias", f"{mod_name}.bias")
        b = None
        if bname in tensors:
            b = ([r[bname].float() for r in ranks] if tensors[bname]["split_dim"] is not None
                 else ranks[0][bname].float())
        _set(model, mod_name, ShardedLinear(w, b, info, isinstance(mod, Conv1D)))
    return model

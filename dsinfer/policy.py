"""injection_policy (DeepSpeed AutoTP semantics) turned into a TP plan for any model:

    {BlockClass: ("attn.out_proj", "mlp.fc2")}

inside every instance of BlockClass the named linears become rowwise (+ all-reduce) and every
other linear colwise. The architecture's own spec, when there is one, still plans what the
policy does not name (embeddings, LM head, T5's relative position bias)."""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
from transformers.pytorch_utils import Conv1D

from dsinfer.specs import ArchSpec, Rule, col, conv1d_col, conv1d_row, row

# Attributes that count a block's attention heads in common HF attention modules.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "num_key_value_heads",
              "split_size", "inner_dim", "all_head_size")


def _is_block(module, key) -> bool:
    return isinstance(module, key) if isinstance(key, type) else type(module).__name__ == str(key)


def _rules_for_block(path: str, block, rowwise) -> list:
    rules = []
    for sub, lin in block.named_modules():
        if not isinstance(lin, (torch.nn.Linear, Conv1D)) or not sub:
            continue
        name = re.escape(f"{path}.{sub}" if path else sub)
        is_row = any(sub == r or sub.endswith("." + r) for r in rowwise)
        conv = isinstance(lin, Conv1D)
        rules.append((conv1d_row if conv else row)(name) if is_row else
                     (conv1d_col if conv else col)(name))
    return rules


def spec_from_policy(model, policy: dict, base: Optional[ArchSpec]) -> ArchSpec:
    if not isinstance(policy, dict) or not policy:
        raise ValueError("injection_policy must be a dict {BlockClass: ('name.of.rowwise', ...)}")
    rules, blocks = [], []
    for key, rowwise in policy.items():
        rowwise = (rowwise,) if isinstance(rowwise, str) else tuple(rowwise)
        found = [(p, m) for p, m in model.named_modules() if _is_block(m, key)]
        if not found:
            raise ValueError(f"injection_policy: the model has no {getattr(key, '__name__', key)} "
                             "module")
        for path, block in found:
            rules += _rules_for_block(path, block, rowwise)
            blocks.append(re.escape(path))
    heads = base.local_heads if base else ((rf"^({'|'.join(blocks)})\.", HEAD_ATTRS),)
    base = base or ArchSpec("policy", (), (), ())
    return dataclasses.replace(base, name=f"{base.name}+policy",
                               plan=tuple(rules) + base.plan, local_heads=heads)

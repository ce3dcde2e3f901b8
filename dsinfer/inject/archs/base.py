"""What an architecture family tells the fused decoder: where its body and blocks live, how
its weights map onto BlockWeights, its BlockConfig, embeddings and final norm. One subclass per
family (archs/<family>.py); the registry in archs/__init__.py finds them by spec name."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from dsinfer.inject.block import BlockConfig, BlockWeights, Norm
from dsinfer.inject.linear import Lin, from_module, fuse
from dsinfer.tp import TPGroup

# HF activation names -> kernels.ACTIVATIONS
ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
        "gelu": "gelu", "relu": "relu", "silu": "silu", "swish": "silu"}


class Unsupported(Exception):
    """This model's config uses a variant the fused blocks do not implement (the reason)."""


def norm_of(module: Optional[torch.nn.Module]) -> Norm:
    if module is None:
        return (None, None)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (None if weight is None else weight.detach(), None if bias is None else bias.detach())


def lin(module) -> Lin:
    return from_module(module)


def fused(*modules) -> Lin:
    out = fuse([from_module(m) for m in modules])
    if out is None:
        raise Unsupported("its Q/K/V (or gate/up) weights cannot share one GEMM (mixed dtypes "
                          "or column groups)")
    return out


def act(name: str) -> str:
    if name not in ACTS:
        raise Unsupported(f"activation {name!r}")
    return ACTS[name]


def local(count: int, tp: TPGroup, what: str) -> int:
    if count % tp.size:
        raise Unsupported(f"{what} = {count} does not divide by TP {tp.size}")
    return count // tp.size


class Adapter:
    body = "model"            # attribute path of the body inside the HF model

    def find_body(self, model) -> torch.nn.Module:
        """The module whose forward the fused decoder replaces."""
        return model.get_submodule(self.body)

    def check(self, config) -> None:
        """Raise Unsupported for config variants the fused blocks do not cover."""

    def layers(self, body) -> torch.nn.ModuleList:
        return body.layers

    def block_config(self, config, tp: TPGroup, index: int) -> BlockConfig:
        raise NotImplementedError

    def block_weights(self, layer) -> BlockWeights:
        raise NotImplementedError

    def embed(self, body, input_ids, inputs_embeds, positions, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def final_norm(self, body) -> Optional[Norm]:
        return None

    def rotary_inv_freq(self, body) -> Optional[Tuple[torch.Tensor, float]]:
        return None

    def alibi_slopes(self, tp: TPGroup) -> Optional[torch.Tensor]:
        return None

    def output(self, body, out):
        """The body's return value from the decoder's (last_hidden_state, cache) output: where
        a family's body adds to it (a projection, BERT's pooler)."""
        return out

    def positions(self, attention_mask, start: int, S: int, B: int, device) -> torch.Tensor:
        """Default positions when the caller gives none: start .. start + S - 1 (as HF)."""
        return torch.arange(start, start + S, device=device).expand(B, S)


class GPT2Layout(Adapter):
    """Bodies laid out as GPT-2's (GPT-2, GPT-Neo, GPT-J): blocks in `h`, token embeddings
    `wte` (also used for token types), learned positions `wpe` unless rotary, final `ln_f`."""
    body = "transformer"
    learned_positions = True

    def layers(self, body):
        return body.h

    def embed(self, body, input_ids, inputs_embeds, positions, token_type_ids=None, **kwargs):
        h = inputs_embeds if inputs_embeds is not None else body.wte(input_ids)
        if self.learned_positions:
            h = h + body.wpe(positions)
        if token_type_ids is not None:
            h = h + body.wte(token_type_ids.view(-1, h.shape[1]))
        return h

    def final_norm(self, body):
        return norm_of(body.ln_f)

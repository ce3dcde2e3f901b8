"""Puts a rank's weights into a built HF model: split layers become dsinfer.tp modules holding
this rank's slices, replicated tensors are assigned as they are, everything lands directly on
the rank's device. Works on a model built on the meta device (nothing is allocated twice)."""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
from typing import Dict, Optional

import torch
from transformers.pytorch_utils import Conv1D

from dsinfer import specs
from dsinfer.formats import CheckpointError
from dsinfer.loading import RankSource
from dsinfer.tp import ParallelEmbedding, ParallelLinear, TPGroup, install_hooks, localize_heads

LINEAR_MODES = {"colwise": "colwise", "packed_colwise": "colwise", "rowwise": "rowwise",
                "vocab": "gather", "replicate": "replicate"}


@contextlib.contextmanager
def params_on_meta():
    """Builds modules with parameters on the meta device and buffers real (as accelerate's
    init_empty_weights(include_buffers=False)): used to recover buffers of a meta model."""
    original = torch.nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = torch.nn.Parameter(p.to("meta"), p.requires_grad)
    torch.nn.Module.register_parameter = register
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def _no_init_weights():
    """transformers' switch that skips weight initialisation (module path differs by version)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        fn = getattr(importlib.import_module(where), "no_init_weights", None) \
            if importlib.util.find_spec(where) else None
        if fn is not None:
            return fn()
    return contextlib.nullcontext()


def restore_meta_buffers(model: torch.nn.Module) -> None:
    """Buffers computed in __init__ (rotary inv_freq, causal masks) are meta on a meta model:
    rebuild the model skeleton (parameters on meta, no weight init) and copy its buffers."""
    meta = [n for n, b in model.named_buffers() if b.is_meta]
    if not meta:
        return
    with params_on_meta(), _no_init_weights():
        ref = type(model)(model.config)
    ref_buffers = dict(ref.named_buffers())
    for name in meta:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        module._buffers[leaf] = ref_buffers[name]


class NameMap:
    """Model parameter name -> checkpoint name (exact, base-model prefix added or dropped,
    spec renames, tied parameters)."""

    def __init__(self, model, spec, stored):
        self.stored, self.spec = set(stored), spec
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.alias = {}
        groups = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(n)
        for names in groups.values():
            keep = next((self._direct(n) for n in names if self._direct(n)), None)
            for n in names:
                self.alias[n] = keep

    def _direct(self, name: str) -> Optional[str]:
        cands = [name]
        for pat, repl in self.spec.renames:
            cands.append(re.sub(pat, repl, name))
        if self.prefix:
            cands += [c[len(self.prefix) + 1:] for c in cands if c.startswith(self.prefix + ".")]
            cands += [f"{self.prefix}.{c}" for c in list(cands)]
        return next((c for c in cands if c in self.stored), None)

    def __call__(self, name: str) -> Optional[str]:
        return self._direct(name) or self.alias.get(name)


def _set_module(model, path: str, module) -> None:
    owner, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, module)


class Loader:
    def __init__(self, model, spec, source: RankSource, tp: TPGroup, device, dtype):
        self.model, self.spec, self.source, self.tp = model, spec, source, tp
        self.device, self.dtype = device, dtype
        self.names = NameMap(model, spec, source.names)
        self.loaded = set()

    def tensor(self, ckpt_name: str, cast: bool = True) -> torch.Tensor:
        t = self.source.get(ckpt_name)
        self.loaded.add(ckpt_name)
        if cast and self.dtype is not None and t.is_floating_point():
            t = t.to(self.dtype)
        return t.to(self.device)

    def scale(self, ckpt_name: str) -> Optional[torch.Tensor]:
        s = ckpt_name + specs.SCALE_SUFFIX
        return self.tensor(s, cast=False) if s in self.source.names else None

    def replace_layers(self) -> None:
        cache: Dict[str, torch.nn.Module] = {}  # checkpoint name -> parallel module (ties)
        for path, module in list(self.model.named_modules()):
            if isinstance(module, (torch.nn.Linear, Conv1D, torch.nn.Embedding)):
                wname = self.names(f"{path}.weight" if path else "weight")
                if wname is not None:
                    self._replace(path, module, wname, cache)

    def _replace(self, path, module, wname, cache) -> None:
        style = self.source.styles[wname]
        placement = self.source.placements[wname]
        q = self.scale(wname)
        if isinstance(module, torch.nn.Embedding):
            if style == "replicate" and q is None:
                return
            mode = "local" if placement.split_dim == 1 else "vocab"
            w = cache[wname].weight if wname in cache else self._local(wname, module.weight,
                                                                        cast=q is None)
            start = self.tp.rank * w.shape[0] if mode == "vocab" and placement.split_dim == 0 else 0
            new = ParallelEmbedding(w, mode if not placement.replicated else "local", self.tp,
                                    start, getattr(module, "padding_idx", None), q)
        else:
            if style == "replicate" and q is None and wname not in cache:
                return
            bname = self.names(f"{path}.bias" if path else "bias")
            bias = self._local(bname, module.bias) if bname is not None and getattr(
                module, "bias", None) is not None else None
            w = cache[wname].weight if wname in cache else self._local(wname, module.weight,
                                                                        cast=q is None)
            new = ParallelLinear(w, bias, LINEAR_MODES[style], self.tp,
                                 transposed=isinstance(module, Conv1D), scale=q)
        cache.setdefault(wname, new)
        _set_module(self.model, path, new)

    def _local(self, ckpt_name: str, param: torch.Tensor, cast: bool = True) -> torch.Tensor:
        """This rank's tensor for a parameter of the (full-size) model, which it must fit: the
        parameter's shape with the split dim divided by the TP degree (or whole)."""
        t = self.tensor(ckpt_name, cast)
        placement, tp = self.source.placements[ckpt_name], self.tp.size
        want = list(param.shape)
        if not placement.replicated and tp > 1:
            want[placement.split_dim] //= tp
        if list(t.shape) != want:
            split = "" if placement.replicated or tp == 1 else \
                f" (its {list(param.shape)} split {tp} ways)"
            raise CheckpointError(
                f"tensor '{ckpt_name}' is {list(t.shape)} on rank {self.tp.rank}, the model "
                f"expects {want}{split}: the config and the checkpoint differ; load the "
                "checkpoint with its own config.json")
        return t

    def _split_alias(self, ckpt: str) -> bool:
        """A TP-split tensor that the model also keeps outside its parallel layer: BERT's
        `cls.predictions.bias` is the output layer's vocab-split bias under a second name
        (tied in HF). Its local slice is the right value for that parameter too."""
        placement = self.source.placements.get(ckpt)
        return placement is not None and not placement.replicated

    def assign_rest(self) -> None:
        done: Dict[str, torch.nn.Parameter] = {}  # checkpoint name -> Parameter (tied: shared)
        for name, p in list(self.model.named_parameters(remove_duplicate=False)):
            owner, _, leaf = name.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            if isinstance(module, (ParallelLinear, ParallelEmbedding)):
                continue
            ckpt = self.names(name)
            if ckpt is None:
                if p.is_meta:
                    raise CheckpointError(f"the checkpoint has no tensor for parameter '{name}'; "
                                          "does it belong to this model?")
                continue
            if ckpt not in done:
                t = self.tensor(ckpt)
                if tuple(t.shape) != tuple(p.shape) and self._split_alias(ckpt):
                    pass     # this rank's slice, also held by a parallel layer (tied bias)
                elif tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(
                        f"tensor '{ckpt}' is {list(t.shape)} in the checkpoint, the model "
                        f"expects {list(p.shape)}: the config and the checkpoint differ")
                done[ckpt] = torch.nn.Parameter(t, requires_grad=False)
            module._parameters[leaf] = done[ckpt]


def load_into(model, spec, source: RankSource, tp: TPGroup, device, dtype=None):
    """The whole transform: buffers, parallel layers, replicated tensors, local head counts."""
    restore_meta_buffers(model)
    loader = Loader(model, spec, source, tp, device, dtype)
    loader.replace_layers()
    loader.assign_rest()
    localize_heads(model, spec, tp)
    install_hooks(model, spec, tp)
    model.to(device)
    return model.eval()

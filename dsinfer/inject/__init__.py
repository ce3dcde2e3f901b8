"""Kernel injection: replace an HF model's blocks by fused blocks (one per family, configured
by the architecture's adapter) and its body's forward by the fused decoder over a static KV
cache; optionally replay decode steps from CUDA graphs.

    inject(model, spec, tp, device, max_out_tokens, cuda_graph) -> bool

Returns False (and warns once) where the family or a config variant has no fused blocks; the
model then keeps its tensor-parallel torch modules, which are always correct. On a machine
without a GPU the same blocks run the kernels' torch references.
"""
from __future__ import annotations

import torch

from dsinfer.inject.archs import adapter_for
from dsinfer.inject.archs.base import Unsupported
from dsinfer.inject.block import FusedBlock
from dsinfer.inject.decoder import FusedDecoder
from dsinfer.formats import CheckpointError
from dsinfer.log import info, warn
from dsinfer.tp import TPGroup

__all__ = ["inject", "FusedDecoder"]


class BlockModule(torch.nn.Module):
    """Holds a FusedBlock's tensors as buffers (so the model's memory, .device and
    state_dict see them) in place of the HF block it replaced."""

    def __init__(self, block: FusedBlock):
        super().__init__()
        self.block = block
        for part in ("qkv", "o", "up", "down"):
            for i, t in enumerate(getattr(block.w, part).tensors()):
                self.register_buffer(f"{part}_{i}", t, persistent=False)
        for part in ("norm1", "norm2"):
            for i, t in enumerate(getattr(block.w, part)):
                if t is not None:
                    self.register_buffer(f"{part}_{i}", t, persistent=False)

    def forward(self, *args, **kwargs):
        raise RuntimeError("a fused block runs inside its decoder, not on its own")

    def extra_repr(self) -> str:
        c = self.block.cfg
        return (f"heads={c.heads}, kv_heads={c.kv_heads}, head_dim={c.head_dim}, norm={c.norm}, "
                f"act={c.act}, rotary={c.rotary}, alibi={c.alibi}, parallel={c.parallel!r}, "
                f"int8={self.block.w.qkv.scale is not None}")


def _float_dtype(model) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _fuse_layers(adapter, layers: torch.nn.ModuleList, configs, tp: TPGroup):
    """Builds each fused block and puts it in place of its HF block at once, so the unfused
    copies (separate Q/K/V, gate/up) are freed layer by layer: the peak is the model plus one
    layer's fused weights, not plus all of them. Unsupported on the first layer leaves the
    model untouched (the caller falls back); on a later one it would leave a half-fused model,
    which is an error."""
    blocks = []
    for i, cfg in enumerate(configs):       # by index: holding a list of layers would keep them
        try:
            weights = adapter.block_weights(layers[i])
        except Unsupported as e:
            if i == 0:
                raise
            raise CheckpointError(f"layer {i} cannot be fused ({e}) while layers 0..{i - 1} "
                                  "were: its weights differ in kind from the first layer's; "
                                  "use replace_with_kernel_inject=False") from None
        blocks.append(FusedBlock(cfg, weights, tp, i))
        layers[i] = BlockModule(blocks[-1])   # drops the HF block and its unfused weights
        del weights
    return blocks


def inject(model: torch.nn.Module, spec, tp: TPGroup, device: torch.device,
           max_out_tokens: int = 1024, cuda_graph: bool = False) -> bool:
    adapter = adapter_for(spec.name)
    if adapter is None:
        warn(f"dsinfer: no fused blocks for {spec.name}; running the tensor-parallel torch modules")
        return False
    body = adapter.find_body(model)
    try:
        adapter.check(model.config)
        layers = adapter.layers(body)
        configs = [adapter.block_config(model.config, tp, i) for i in range(len(layers))]
        blocks = _fuse_layers(adapter, layers, configs, tp)
    except Unsupported as e:
        warn(f"dsinfer: fused blocks do not cover this {spec.name} model ({e}); running the "
             "tensor-parallel torch modules")
        return False
    decoder = FusedDecoder(adapter, body, blocks, tp, max_out_tokens, _float_dtype(model), device)
    body.forward = decoder.forward
    body.dsinfer_decoder = decoder
    if cuda_graph:
        if device.type == "cuda":
            from dsinfer.inject.graphs import DecodeGraphs
            decoder.graphs = DecodeGraphs(decoder)
        else:
            info("dsinfer: enable_cuda_graph needs a GPU; running without graphs")
    _install_head(model, decoder, device)
    return True


def _install_head(model, decoder: FusedDecoder, device: torch.device) -> None:
    """The LM head served by the decoder (head.py) for generating models, and guessed decode
    steps (lookahead.py): by default where decode steps replay CUDA graphs (what they hide is
    the host time between graph replays)."""
    from dsinfer.inject import lookahead
    from dsinfer.inject.head import ServedHead
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not decoder.blocks[0].cfg.causal:
        return
    decoder.head = ServedHead(head)
    mode = lookahead.mode()
    if mode == "off" or (mode == "auto" and decoder.graphs is None):
        return
    if decoder.tp.fast is not None and mode != "force":   # fast_allreduce.py: they hang
        (warn if mode == "on" else info)(
            "dsinfer: look-ahead decoding is off with DSINFER_FAST_ALLREDUCE=1 (together they "
            "hung TP 2 generates on H100s and H200s); unset DSINFER_FAST_ALLREDUCE for look-ahead")
        return
    decoder.lookahead = lookahead.Lookahead(decoder, decoder.head, device)

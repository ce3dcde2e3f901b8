"""dsinfer: from a training checkpoint to a served transformer.

Offline: `dsinfer-reshard` re-shards Megatron-LM / DeepSpeed / HF checkpoints to any
tensor-parallel degree; `dsinfer-quantize` writes grouped int8. Online: `init_inference`
(the DeepSpeed-Inference API) loads a pre-sharded checkpoint, one rank per process.
"""
__version__ = "0.1.0"


def init_inference(*args, **kwargs):
    """See dsinfer.engine.init_inference (imported lazily: `import dsinfer` stays light)."""
    from dsinfer.engine import init_inference as impl
    return impl(*args, **kwargs)


def from_pretrained(*args, **kwargs):
    """See dsinfer.engine.from_pretrained."""
    from dsinfer.engine import from_pretrained as impl
    return impl(*args, **kwargs)

"""dsinfer: from a training checkpoint to a served transformer.

Offline: re-shard Megatron-LM / DeepSpeed / HF checkpoints to any tensor-parallel degree
(`dsinfer-reshard`). The runtime (`init_inference`) lands with its own issue.
"""
__version__ = "0.1.0"

"""What reader tests share: every tensor of a Checkpoint loaded (shape and dtype checked against
its TensorRef), and the HF model a read config describes, with the read tensors in it."""
from __future__ import annotations

import torch
import transformers


def load_tensors(ckpt) -> dict:
    out = {}
    for ref in ckpt.tensors:
        t = ref.load()
        assert tuple(t.shape) == ref.shape and t.dtype == ref.dtype, ref.name
        out[ref.name] = t
    return out


def hf_model(config: dict, state: dict):
    """The HF model `config` describes, fp32, with `state` loaded strictly (tied lm_head aside)."""
    cfg = transformers.AutoConfig.for_model(**config)
    model = getattr(transformers, cfg.architectures[0])(cfg).float().eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == []
    assert set(missing) <= ({"lm_head.weight"} if config["tie_word_embeddings"] else set())
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()

"""Registry: architecture spec name -> "module:Adapter class" (imported on first use)."""
from __future__ import annotations

import importlib
from typing import Optional

ADAPTERS = {
    "llama": "llama:Llama",
    "gpt2": "gpt2:GPT2",
    "gpt_neo": "gpt_neo:GPTNeo",
    "gptj": "gptj:GPTJ",
    "gpt_neox": "gpt_neox:GPTNeoX",
    "opt": "opt:OPT",
    "bloom": "bloom:Bloom",
    "bert": "bert:Bert",
}


def adapter_for(spec_name: str) -> Optional[object]:
    entry = ADAPTERS.get(spec_name.split("+")[0])
    if entry is None:
        return None
    module, cls = entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)()

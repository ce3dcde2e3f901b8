"""Fixed text for measurements on the real models, and the two measurements themselves.

PROSE: plain English prose (written for this project) for SmolLM2 perplexity; well over 300
tokens with SmolLM2's tokenizer. SENTENCES: sentences for all-MiniLM-L6-v2 embeddings, in
pairs that say the same thing in other words (SIMILAR_PAIRS) plus unrelated ones.
Changing either changes every number measured on them: don't.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

PROSE = """\
People have built bridges for as long as they have needed to cross water. The earliest were \
simple: a fallen tree laid across a stream, or flat stones set on piles of rock in a shallow \
river. Such crossings were cheap and easy to make, but floods carried them away, and they could \
not span more than a few metres.

The Romans changed this with the stone arch. An arch turns the weight it carries into \
compression, and stone is very strong when it is squeezed, so a row of arches resting on heavy \
piers could cross a wide river and last for centuries. Roman engineers also built aqueducts on \
the same principle, carrying water across valleys on several tiers of arches. Many of their \
bridges are still standing, and some still carry traffic today.

For more than a thousand years after the fall of Rome, most large bridges in Europe were built \
of stone or timber. Towns often grew up around them, because a bridge brought travellers, trade \
and tolls. Some medieval bridges carried houses, shops and even chapels along their length.

The industrial age brought new materials. The first bridge made of cast iron was completed in \
England in 1779, and within a century engineers were using wrought iron and then steel. Steel \
is strong in tension as well as in compression, which made new forms possible. Truss bridges \
used triangles of light members to carry railways over long distances, and cantilever bridges \
reached out from massive towers to meet in the middle.

The suspension bridge took this idea furthest. Its deck hangs from cables that run over tall \
towers and are anchored in the ground at each end. Because the cables work only in tension, a \
suspension bridge can span more than a kilometre, far beyond the reach of any arch. Engineers \
learned painful lessons along the way: in 1940 a new suspension bridge in the United States \
twisted in a steady wind until its deck broke apart. After that failure, every long span was \
tested in a wind tunnel before it was built.

Modern bridges are designed with computers, built from high strength steel and concrete, and \
watched by sensors that measure how they move. Yet the basic choices remain the ones the first \
builders faced: how to carry the load, how to resist the weather, and how to pay for it all.
"""

SENTENCES = [
    "A man is playing a guitar on the stage.",                       # 0 ~ 1
    "Someone performs music with a guitar in front of an audience.",  # 1
    "The cat is sleeping on the warm windowsill.",                    # 2 ~ 3
    "A kitten naps in the sunshine by the window.",                   # 3
    "The stock market fell sharply after the announcement.",          # 4 ~ 5
    "Share prices dropped quickly when the news was released.",       # 5
    "Heavy rain caused flooding in the river valley.",                # 6 ~ 7
    "The river overflowed its banks after days of storms.",           # 7
    "She baked fresh bread for breakfast this morning.",              # 8
    "The new railway line links the airport with the city centre.",   # 9
]
# (i, j): sentence i and j mean the same; every other sentence is unrelated to both.
SIMILAR_PAIRS = [(0, 1), (2, 3), (4, 5), (6, 7)]


@torch.no_grad()
def perplexity(model, tokenizer, text: str = PROSE) -> float:
    """exp(mean next-token cross-entropy) of `text`: one forward pass over the whole text,
    logits[t] scored against token t+1, in fp32. The tokenizer's default special tokens are
    used (SmolLM2's adds none). Pass an fp32 model for reference numbers."""
    ids = tokenizer(text, return_tensors="pt").input_ids.to(model.device)
    logits = model(input_ids=ids).logits.float()
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="mean")
    return math.exp(loss.item())


@torch.no_grad()
def mean_pooled_embeddings(model, tokenizer, sentences=SENTENCES) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2:
    token embeddings averaged over the attention mask, then L2-normalised. [n, hidden] fp32."""
    enc = tokenizer(list(sentences), padding=True, truncation=True, max_length=256,
                    return_tensors="pt").to(model.device)
    tokens = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)

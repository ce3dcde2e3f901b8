"""Architecture specs: one table entry per HF architecture family, with its TP plan.

A TP plan is a list of `Rule`s matched (re.search) against canonical parameter names. A rule's
pattern names a *module*; the rule covers its `.weight` and `.bias`:

    colwise         split output features: Linear weight [out, in] on dim 0 (Conv1D [in, out]:
                    dim 1); bias [out] on dim 0
    rowwise         split input features: Linear weight dim 1 (Conv1D: dim 0); the bias is
                    replicated (added once, after the all-reduce)
    packed_colwise  colwise over `parts` equal blocks laid end to end (GPT-2 c_attn = [Q|K|V]):
                    each block is split separately so every rank gets whole heads of Q, K and V
    vocab           embedding / LM-head rows; replicated when the vocab does not divide by TP
    replicate       every rank holds all of it (also the default for unmatched names)

Per-head interleaved fused QKV (BLOOM, GPT-NeoX: rows [h0: q k v | h1: q k v | ...]) is plain
colwise: contiguous row blocks are whole heads. The same plan drives offline resharding and
(later) runtime sharding.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, Iterable, List, Optional, Tuple

from dsinfer.formats import CheckpointError, Placement

STYLES = ("colwise", "rowwise", "packed_colwise", "vocab", "replicate")


@dataclasses.dataclass(frozen=True)
class Rule:
    module: str           # regex for the module path, e.g. r"h\.\d+\.attn\.c_attn"
    style: str
    dim: int = 0          # weight split dim (Linear: colwise 0 / rowwise 1; Conv1D the reverse)
    parts: int = 1        # packed_colwise: number of equal blocks
    role: str = ""        # "attn" | "mlp" | "embed" | "head": quantization and kernels use it
    transposed: bool = False  # Conv1D storage [in, out] (GPT-2); Linear is [out, in]

    def __post_init__(self):
        assert self.style in STYLES, self.style
        object.__setattr__(self, "_re", re.compile(rf"(^|\.)(?:{self.module})\.(weight|bias)$"))

    def matches(self, name: str) -> bool:
        return self._re.search(name) is not None


def col(module, dim=0, role="", transposed=False) -> Rule:
    return Rule(module, "colwise", dim, role=role, transposed=transposed)


def row(module, dim=1, role="", transposed=False) -> Rule:
    return Rule(module, "rowwise", dim, role=role, transposed=transposed)


def conv1d_col(module, role="", parts=1) -> Rule:  # Conv1D [in, out]: outputs on dim 1
    if parts > 1:
        return Rule(module, "packed_colwise", 1, parts, role, transposed=True)
    return col(module, 1, role, transposed=True)


def conv1d_row(module, role="") -> Rule:
    return row(module, 0, role, transposed=True)


def vocab(module, role="embed") -> Rule:
    return Rule(module, "vocab", 0, role=role)


# Config keys that hold the same fact under different names, in order of preference.
CONFIG_KEYS = {
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "multi_query_group_num"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "vocab": ("vocab_size",),
}


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    name: str
    architectures: Tuple[str, ...]   # HF class names (the first is the causal-LM / main one)
    model_types: Tuple[str, ...]
    plan: Tuple[Rule, ...]
    kv_heads: bool = False           # GQA: KV heads split across ranks too
    # Runtime: attention modules (path regex) whose int attributes count all heads and must
    # count this rank's heads under TP (e.g. GPT-2 splits c_attn's output by `split_size`).
    local_heads: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    # Runtime: forward pre-hooks by name (dsinfer.tp.HOOKS) for modules matching a path regex.
    hooks: Tuple[Tuple[str, str], ...] = ()
    # Module parameter name -> checkpoint name, where transformers renames at load time.
    renames: Tuple[Tuple[str, str], ...] = ()

    def config_value(self, config: dict, key: str) -> Optional[int]:
        for k in CONFIG_KEYS[key]:
            if config.get(k) is not None:
                return int(config[k])
        return None

    def rule_for(self, name: str) -> Optional[Rule]:
        return next((r for r in self.plan if r.matches(name)), None)

    def placement(self, name: str, shape: Tuple[int, ...], tp: int) -> Tuple[Placement, str]:
        """(placement, style) of one tensor at TP degree `tp`."""
        rule = self.rule_for(name)
        if rule is None or rule.style == "replicate" or not shape:
            return Placement(None), "replicate"
        is_bias = name.endswith(".bias") or len(shape) == 1
        if rule.style == "rowwise":
            return (Placement(None), "rowwise_bias") if is_bias else (Placement(rule.dim), "rowwise")
        if rule.style == "vocab":
            if shape[0] % tp:
                return Placement(None), "replicate"
            return Placement(0), "vocab"
        dim = 0 if is_bias else rule.dim
        if rule.style == "packed_colwise":
            return Placement(dim, (shape[dim] // rule.parts,) * rule.parts), rule.style
        return Placement(dim), "colwise"

    def check_heads(self, config: dict, tp: int) -> None:
        for key in ("heads", "kv_heads") if self.kv_heads else ("heads",):
            n = self.config_value(config, key)
            if key == "kv_heads" and n is None:
                n = self.config_value(config, "heads")  # no GQA field: MHA
            if n is not None and n % tp:
                ok = [d for d in range(1, n + 1) if n % d == 0]
                what = "attention heads" if key == "heads" else "KV heads"
                raise CheckpointError(
                    f"{self.name}: {n} {what} do not divide by TP {tp}; choose a TP degree "
                    f"among {ok}")


SPECS: List[ArchSpec] = [
    ArchSpec("gpt2", ("GPT2LMHeadModel", "GPT2Model", "GPT2ForSequenceClassification"),
             ("gpt2",), (
                 vocab(r"wte"),
                 conv1d_col(r"h\.\d+\.attn\.c_attn", role="attn", parts=3),  # [Q|K|V]
                 conv1d_row(r"h\.\d+\.attn\.c_proj", role="attn"),
                 conv1d_col(r"h\.\d+\.mlp\.c_fc", role="mlp"),
                 conv1d_row(r"h\.\d+\.mlp\.c_proj", role="mlp"),
                 vocab(r"lm_head", role="head")),
             local_heads=((r"attn$", ("split_size", "num_heads", "embed_dim")),)),
    ArchSpec("gpt_neo", ("GPTNeoForCausalLM", "GPTNeoModel"), ("gpt_neo",), (
        vocab(r"wte"),
        col(r"attn\.attention\.[qkv]_proj", role="attn"),
        row(r"attn\.attention\.out_proj", role="attn"),
        col(r"h\.\d+\.mlp\.c_fc", role="mlp"),
        row(r"h\.\d+\.mlp\.c_proj", role="mlp"),
        vocab(r"lm_head", role="head")),
        local_heads=((r"attn\.attention$", ("num_heads", "embed_dim")),)),
    ArchSpec("gptj", ("GPTJForCausalLM", "GPTJModel"), ("gptj",), (
        vocab(r"wte"),
        col(r"attn\.[qkv]_proj", role="attn"),
        row(r"attn\.out_proj", role="attn"),
        col(r"mlp\.fc_in", role="mlp"),
        row(r"mlp\.fc_out", role="mlp"),
        vocab(r"lm_head", role="head")),
        local_heads=((r"attn$", ("num_attention_heads", "embed_dim")),)),
    ArchSpec("gpt_neox", ("GPTNeoXForCausalLM", "GPTNeoXModel"), ("gpt_neox",), (
        vocab(r"embed_in"),
        col(r"attention\.query_key_value", role="attn"),   # [heads, 3, hd] rows: whole heads
        row(r"attention\.dense", role="attn"),
        col(r"mlp\.dense_h_to_4h", role="mlp"),
        row(r"mlp\.dense_4h_to_h", role="mlp"),
        vocab(r"embed_out|lm_head", role="head")),
        renames=((r"^lm_head\.", "embed_out."),)),
    ArchSpec("opt", ("OPTForCausalLM", "OPTModel"), ("opt",), (
        vocab(r"embed_tokens"),
        col(r"self_attn\.[qkv]_proj", role="attn"),
        row(r"self_attn\.out_proj", role="attn"),
        col(r"layers\.\d+\.fc1", role="mlp"),
        row(r"layers\.\d+\.fc2", role="mlp"),
        vocab(r"lm_head", role="head")),
        local_heads=((r"self_attn$", ("num_heads", "embed_dim")),)),
    ArchSpec("bloom", ("BloomForCausalLM", "BloomModel"), ("bloom",), (
        vocab(r"word_embeddings"),
        col(r"self_attention\.query_key_value", role="attn"),  # [heads, 3, hd] rows
        row(r"self_attention\.dense", role="attn"),
        col(r"mlp\.dense_h_to_4h", role="mlp"),
        row(r"mlp\.dense_4h_to_h", role="mlp"),
        vocab(r"lm_head", role="head")),
        local_heads=((r"self_attention$", ("num_heads",)),),
        hooks=((r"self_attention$", "alibi_local_heads"),)),
    ArchSpec("llama", ("LlamaForCausalLM", "LlamaModel", "MistralForCausalLM",
                       "Qwen2ForCausalLM"), ("llama", "mistral", "qwen2"), (
        vocab(r"embed_tokens"),
        col(r"self_attn\.[qkv]_proj", role="attn"),
        row(r"self_attn\.o_proj", role="attn"),
        col(r"mlp\.(gate|up)_proj", role="mlp"),
        row(r"mlp\.down_proj", role="mlp"),
        vocab(r"lm_head", role="head")), kv_heads=True),
    ArchSpec("bert", ("BertForMaskedLM", "BertModel", "BertForSequenceClassification",
                      "BertForPreTraining"), ("bert",), (
        vocab(r"embeddings\.word_embeddings"),
        col(r"attention\.self\.(query|key|value)", role="attn"),
        row(r"attention\.output\.dense", role="attn"),
        col(r"intermediate\.dense", role="mlp"),
        row(r"layer\.\d+\.output\.dense", role="mlp"),
        vocab(r"cls\.predictions\.decoder", role="head"),
        vocab(r"cls\.predictions", role="head")),   # the output bias [vocab]
        local_heads=((r"attention\.self$", ("num_attention_heads", "all_head_size")),)),
    ArchSpec("t5", ("T5ForConditionalGeneration", "T5Model", "T5EncoderModel"), ("t5",), (
        vocab(r"shared|embed_tokens"),
        col(r"(SelfAttention|EncDecAttention)\.[qkv]", role="attn"),
        row(r"(SelfAttention|EncDecAttention)\.o", role="attn"),
        col(r"relative_attention_bias", dim=1, role="position"),   # [buckets, heads]
        col(r"DenseReluDense\.wi(_0|_1)?", role="mlp"),
        row(r"DenseReluDense\.wo", role="mlp"),
        vocab(r"lm_head", role="head")),
        local_heads=((r"(SelfAttention|EncDecAttention)$", ("n_heads", "inner_dim")),)),
]

_BY_KEY: Dict[str, ArchSpec] = {}
for _s in SPECS:
    for _k in (_s.name, *_s.architectures, *_s.model_types):
        _BY_KEY.setdefault(_k.lower(), _s)


def known() -> List[str]:
    return sorted({a for s in SPECS for a in s.architectures} | {s.name for s in SPECS})


def get(key: str) -> ArchSpec:
    spec = _BY_KEY.get(str(key).lower())
    if spec is None:
        raise CheckpointError(f"unknown architecture '{key}'; known: {', '.join(known())}")
    return spec


def for_config(config: dict, fallback: Optional[str] = None) -> ArchSpec:
    """The spec for an HF config (architectures[0], else model_type), else `fallback` (--arch)."""
    archs = config.get("architectures")
    for key in (archs if isinstance(archs, list) else []) + [config.get("model_type")]:
        if isinstance(key, str) and key.lower() in _BY_KEY:
            return _BY_KEY[key.lower()]
    if fallback:
        return get(fallback)
    raise CheckpointError(
        f"architecture {config.get('architectures') or config.get('model_type')!r} has no "
        f"dsinfer spec; pass --arch with one of: {', '.join(known())}")


def check_fits(spec: ArchSpec, names: Iterable[str], where) -> None:
    """The weights are of the spec's architecture: some tensor matches its attention rules and
    some its MLP rules (a config.json of another model matches neither)."""
    roles = {r.role for r in map(spec.rule_for, names) if r is not None}
    missing = [role for role in ("attn", "mlp") if role not in roles]
    if missing:
        want = next(r.module for r in spec.plan if r.role == missing[0])
        raise CheckpointError(
            f"{where}: the config says {spec.name} but no tensor matches its {missing[0]} "
            f"layers (/{want}/): the config.json does not belong to these weights; put the "
            "model's own config.json next to them")


_LAYER = re.compile(r"^(.*?)\.(\d+)\.(.+)$")    # "<stack>.<index>.<rest>" at the first index
FIRST_LAYER_ONLY = re.compile(r"relative_attention_bias")   # T5: the first block's alone


def check_layers(spec: ArchSpec, tensors: Iterable, config: dict, where) -> None:
    """The repeated layers are whole: every layer of a stack (the names before the first
    `.N.`) holds the same tensors with the same shapes, the indices run 0..n-1, and a
    decoder-only or encoder-only model has the config's layer count. Catches a partial copy,
    a lost shard file or weights of two models mixed before anything is written. int8 scales
    are left out (`dsinfer-quantize --skip` may leave some layers float)."""
    stacks: Dict[str, Dict[int, Dict[str, Tuple[int, ...]]]] = {}
    for t in tensors:
        m = _LAYER.match(t.name)
        if m is not None and not t.name.endswith(SCALE_SUFFIX):   # --skip: layers may differ
            prefix, index, rest = m.group(1), int(m.group(2)), m.group(3)
            stacks.setdefault(prefix, {}).setdefault(index, {})[rest] = tuple(t.shape)
    for prefix, layers in stacks.items():
        _check_stack(prefix, layers, where)
    declared = spec.config_value(config, "layers")
    if declared is not None and len(stacks) == 1:
        (prefix, layers), = stacks.items()
        if len(layers) != declared:
            raise CheckpointError(
                f"{where}: the config declares {declared} layers but the checkpoint holds "
                f"{len(layers)} ({prefix}.0..{max(layers)}): the config.json does not belong "
                "to these weights, or a shard file is missing")


def _check_stack(prefix: str, layers: Dict[int, Dict[str, Tuple[int, ...]]], where) -> None:
    gaps = sorted(set(range(max(layers) + 1)) - set(layers))
    if gaps:
        raise CheckpointError(
            f"{where}: layer {prefix}.{gaps[0]} has no tensors while layers up to "
            f"{prefix}.{max(layers)} do ({len(gaps)} missing): a shard file is missing or the "
            "copy is incomplete; copy the checkpoint again")
    shapes: Dict[str, Dict[Tuple[int, ...], List[int]]] = {}   # rest -> shape -> layers
    for index in sorted(layers):
        for rest, shape in layers[index].items():
            shapes.setdefault(rest, {}).setdefault(shape, []).append(index)
    for rest, by_shape in shapes.items():
        if len(by_shape) > 1:    # the odd one out first (a tie: the lower layer first)
            ranked = sorted(by_shape, key=lambda sh: (len(by_shape[sh]), -by_shape[sh][0]))
            odd, common = ranked[0], ranked[-1]
            if len(by_shape[odd]) == len(by_shape[common]):
                odd, common = sorted((odd, common), key=lambda sh: by_shape[sh][0])
            more = len(by_shape[common]) - 1
            raise CheckpointError(
                f"{where}: tensor '{prefix}.{by_shape[odd][0]}.{rest}' is {list(odd)} but "
                f"'{prefix}.{by_shape[common][0]}.{rest}' is {list(common)}"
                f"{f' (and in {more} more layers)' if more else ''}: weights of different "
                "models are mixed; copy the checkpoint again")
    seen = {rest: min(i for ix in by_shape.values() for i in ix)
            for rest, by_shape in shapes.items()}       # rest -> first layer holding it
    for index in sorted(layers):
        lost = sorted(r for r in seen.keys() - layers[index].keys()
                      if not FIRST_LAYER_ONLY.search(r))
        if lost:
            raise CheckpointError(
                f"{where}: tensor '{prefix}.{index}.{lost[0]}' is missing (layer "
                f"{seen[lost[0]]} has it; {len(lost)} missing in layer {index}): a shard "
                "file is missing or the copy is incomplete; copy the checkpoint again")


SCALE_SUFFIX = "_scale"  # int8 weight `X.weight` has scales `X.weight_scale` [groups, col_groups]


def scale_of(name: str, names) -> Optional[str]:
    """The weight a `*_scale` tensor belongs to, if `name` is one."""
    base = name[: -len(SCALE_SUFFIX)] if name.endswith(SCALE_SUFFIX) else None
    return base if base in names else None


def scale_placement(rule: Optional[Rule], w_shape, wp: Placement, s_shape, name: str,
                    tp: int) -> Placement:
    """Scales follow their weight: a split of output rows splits the row groups (whole groups
    per rank, packed parts kept apart); a split of input columns splits the column groups, or
    leaves per-row scales replicated when there is one column group."""
    if wp.replicated or tp == 1:
        return Placement(None) if wp.replicated else Placement(0)
    out_dim = 1 if rule is not None and rule.transposed else 0
    if wp.split_dim != out_dim:
        return Placement(None) if s_shape[1] == 1 else Placement(1)
    rows, groups = w_shape[out_dim], s_shape[0]
    per_group = rows // groups
    parts = wp.part_sizes(w_shape)
    if any(p % (per_group * tp) for p in parts):
        ok = sorted(g for g in range(tp, rows + 1, tp)
                    if rows % g == 0 and all(p % (rows // g * tp) == 0 for p in parts))
        raise CheckpointError(
            f"tensor '{name}': its {groups} int8 row groups would be cut by a TP {tp} split "
            f"({rows} rows); quantize with a group count among {ok[:8]} or pick another TP")
    return Placement(0, tuple(p // per_group for p in parts) if wp.parts else None)


def plan(spec: ArchSpec, config: dict, tensors: Iterable, tp: int
         ) -> Tuple[Dict[str, Placement], Dict[str, str]]:
    """Placements and style names of every tensor at TP `tp`; errors name the tensor."""
    spec.check_heads(config, tp)
    tensors = list(tensors)
    by_name = {t.name: t for t in tensors}
    placements, styles = {}, {}
    for t in tensors:
        if scale_of(t.name, by_name):
            continue
        p, style = spec.placement(t.name, tuple(t.shape), tp)
        if not p.divisible(t.shape, tp):
            size = t.shape[p.split_dim]
            raise CheckpointError(
                f"tensor '{t.name}' {list(t.shape)}: dim {p.split_dim} ({size}) does not split "
                f"{tp} ways ({style}); choose a TP degree that divides it")
        placements[t.name], styles[t.name] = p, style
    for t in tensors:
        base = scale_of(t.name, by_name)
        if base:
            w = by_name[base]
            p = scale_placement(spec.rule_for(base), w.shape, placements[base], t.shape,
                                base, tp)
            if not p.divisible(t.shape, tp):
                raise CheckpointError(f"tensor '{t.name}' {list(t.shape)}: column groups do not "
                                      f"split {tp} ways; choose a --group-size or TP that fits")
            placements[t.name], styles[t.name] = p, "scale"
    return placements, styles

"""DeepSpeed-Inference's pre-sharded checkpoints (`init_inference(..., replace_with_kernel_inject=
True, save_mp_checkpoint_path=DIR)`):

    DIR/ds_inference_config.json
        {"type": "ds_model", "base_dir": "...", "version": 1.0, "parallelization": "tp",
         "tp_size": N, "dtype": "float16",
         "checkpoints": {"non_tp": [files every rank loads whole],
                         "tp": [part-major: tp_00_00.pt, tp_01_00.pt, ..., tp_00_01.pt, ...]}}
    DIR/tp_{rank:02d}_{part:02d}.pt   flat state dict: rank `rank`'s slices, kernel-injected names

Kernel-injected block weights are GEMM-layout [in, out] (nn.Linear transposed). Column-parallel
ones (fused QKV, MLP in) hold out/N columns per rank, and the fused QKV holds each rank's slice of
every part, [Q_r | K_r | V_r] along `out`; row-parallel ones (attention out, MLP out) hold in/N
rows; norms and row-parallel biases are whole on every rank. Names outside the blocks
(embeddings, final norm, lm_head) are HF names already, whole on every rank.
`base_dir` (an absolute path on the machine that wrote the files) is tried first, then the
folder of the json.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from . import ReadOptions
from .checkpoint import Checkpoint, TensorRef, find_extra_files
from .deepspeed import locate_config
from .errors import CheckpointError, read_json_object
from .safe_pickle import load_pt

CONFIG_NAME = "ds_inference_config.json"
RANK_FILE = re.compile(r"tp_(\d+)_(\d+)\.pt")


@dataclasses.dataclass(frozen=True)
class Native:
    """One kernel-injected tensor of a block and the HF tensors it holds.

    hf: HF names (suffixes within the block); several = equal parts fused along `split`, each
        rank holding its slice of every part, in this order.
    split: the native dim the TP ranks split; None = every rank holds all of it.
    transpose: native [in, out] -> HF nn.Linear [out, in].
    """
    hf: Tuple[str, ...]
    split: Optional[int] = None
    transpose: bool = False
    # relative sizes of the fused parts, from the HF config (default: equal), e.g. Q|K|V of a
    # GQA model; one HF name with `parts` > 1 is a tensor HF stores fused too (GPT-2's c_attn)
    sizes: Optional[Callable[[dict], Tuple[int, ...]]] = None
    parts: int = 1

    def part_sizes(self, config: dict, total: int, where: str) -> Tuple[int, ...]:
        """The fused parts' sizes along `split` in one rank's piece of `total` rows."""
        ratio = self.sizes(config) if self.sizes else (1,) * max(len(self.hf), self.parts)
        if total % sum(ratio):
            raise CheckpointError(f"{where}: {total} rows on dim {self.split} do not hold "
                                  f"{len(ratio)} fused parts in the ratio {ratio} the config "
                                  "gives; the config.json is not this checkpoint's")
        return tuple(total // sum(ratio) * r for r in ratio)


def whole(hf: str) -> Native:          # norms, row-parallel biases: [d] on every rank
    return Native((hf,))


def col_w(*hf: str) -> Native:         # [in, out/N] per rank (fused: [in, k * out/N])
    return Native(hf, split=1, transpose=True)


def col_b(*hf: str) -> Native:         # [out/N] per rank
    return Native(hf, split=0)


def row_w(hf: str) -> Native:          # [in/N, out] per rank
    return Native((hf,), split=0, transpose=True)


def conv_col(hf: str, parts: int = 1) -> Native:   # Conv1D weights (GPT-2): [in, out] as HF
    return Native((hf,), split=1, parts=parts)     # stores them; fused parts sliced per rank


def conv_col_b(hf: str, parts: int = 1) -> Native:
    return Native((hf,), split=0, parts=parts)


def conv_row(hf: str) -> Native:
    return Native((hf,), split=0)


def _gqa(config: dict) -> Tuple[int, int, int]:   # Q|K|V of a Llama: heads, kv heads, kv heads
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    return heads, kv, kv


def _norms(pre: str, post: str, bias: bool = True) -> Dict[str, Native]:
    names = {"norm_w": whole(f"{pre}.weight"), "mlp.attn_nw": whole(f"{post}.weight")}
    if bias:
        names.update({"norm_b": whole(f"{pre}.bias"), "mlp.attn_nb": whole(f"{post}.bias")})
    return names


@dataclasses.dataclass(frozen=True)
class Arch:
    layer: str                  # block i is f"{any prefix}{layer}{i}.", native and HF alike
    block: Dict[str, Native]    # native name within a block -> its HF tensors


# HF model_type (config.json) -> kernel-injected names. Add an architecture as one entry here.
# Each was read off files DeepSpeed 0.19.8 itself wrote (tests/fixtures/ds_inference, and the
# GPT-Neo fixtures at TP 1 and 2): every native tensor equal to the HF tensors it names.
# Fused parts at TP > 1 follow DeepSpeed's ReplaceWithTensorSlicing.strided_copy: each rank
# holds its slice of every part. Not listed (DeepSpeed's injection does not run on
# transformers 5): gpt_neox, bloom.
ARCHS: Dict[str, Arch] = {
    "gpt_neo": Arch("h.", {
        "norm_w": whole("ln_1.weight"),
        "norm_b": whole("ln_1.bias"),
        "attention.attn_qkvw": col_w("attn.attention.q_proj.weight", "attn.attention.k_proj.weight",
                                     "attn.attention.v_proj.weight"),
        "attention.attn_ow": row_w("attn.attention.out_proj.weight"),
        "attention.attn_ob": whole("attn.attention.out_proj.bias"),
        "mlp.attn_nw": whole("ln_2.weight"),   # the post-attention norm lives in the MLP module
        "mlp.attn_nb": whole("ln_2.bias"),
        "mlp.inter_w": col_w("mlp.c_fc.weight"),
        "mlp.inter_b": col_b("mlp.c_fc.bias"),
        "mlp.output_w": row_w("mlp.c_proj.weight"),
        "mlp.output_b": whole("mlp.c_proj.bias"),
    }),
    "gpt2": Arch("h.", {
        **_norms("ln_1", "ln_2"),
        "attention.attn_qkvw": conv_col("attn.c_attn.weight", parts=3),
        "attention.attn_qkvb": conv_col_b("attn.c_attn.bias", parts=3),
        "attention.attn_ow": conv_row("attn.c_proj.weight"),
        "attention.attn_ob": whole("attn.c_proj.bias"),
        "mlp.inter_w": conv_col("mlp.c_fc.weight"),
        "mlp.inter_b": conv_col_b("mlp.c_fc.bias"),
        "mlp.output_w": conv_row("mlp.c_proj.weight"),
        "mlp.output_b": whole("mlp.c_proj.bias"),
    }),
    "gptj": Arch("h.", {          # parallel attention + MLP: one norm, no attention biases
        "norm_w": whole("ln_1.weight"),
        "norm_b": whole("ln_1.bias"),
        "attention.attn_qkvw": col_w("attn.q_proj.weight", "attn.k_proj.weight",
                                     "attn.v_proj.weight"),
        "attention.attn_ow": row_w("attn.out_proj.weight"),
        "mlp.inter_w": col_w("mlp.fc_in.weight"),
        "mlp.inter_b": col_b("mlp.fc_in.bias"),
        "mlp.output_w": row_w("mlp.fc_out.weight"),
        "mlp.output_b": whole("mlp.fc_out.bias"),
    }),
    "opt": Arch("layers.", {
        **_norms("self_attn_layer_norm", "final_layer_norm"),
        "attention.attn_qkvw": col_w("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                     "self_attn.v_proj.weight"),
        "attention.attn_qkvb": col_b("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                     "self_attn.v_proj.bias"),
        "attention.attn_ow": row_w("self_attn.out_proj.weight"),
        "attention.attn_ob": whole("self_attn.out_proj.bias"),
        "mlp.inter_w": col_w("fc1.weight"),
        "mlp.inter_b": col_b("fc1.bias"),
        "mlp.output_w": row_w("fc2.weight"),
        "mlp.output_b": whole("fc2.bias"),
    }),
    "llama": Arch("layers.", {
        **_norms("input_layernorm", "post_attention_layernorm", bias=False),
        "attention.attn_qkvw": Native(("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                       "self_attn.v_proj.weight"), split=1, transpose=True,
                                      sizes=_gqa),
        "attention.attn_ow": row_w("self_attn.o_proj.weight"),
        "mlp.inter_w": col_w("mlp.up_proj.weight", "mlp.gate_proj.weight"),   # up first
        "mlp.output_w": row_w("mlp.down_proj.weight"),
    }),
    "bert": Arch("layer.", {       # post-norm: norm_w is the block's last norm
        **_norms("output.LayerNorm", "attention.output.LayerNorm"),
        "attention.attn_qkvw": col_w("attention.self.query.weight", "attention.self.key.weight",
                                     "attention.self.value.weight"),
        "attention.attn_qkvb": col_b("attention.self.query.bias", "attention.self.key.bias",
                                     "attention.self.value.bias"),
        "attention.attn_ow": row_w("attention.output.dense.weight"),
        "attention.attn_ob": whole("attention.output.dense.bias"),
        "mlp.inter_w": col_w("intermediate.dense.weight"),
        "mlp.inter_b": col_b("intermediate.dense.bias"),
        "mlp.output_w": row_w("output.dense.weight"),
        "mlp.output_b": whole("output.dense.bias"),
    }),
}


def sniff(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def read(path: Path, options: ReadOptions) -> Checkpoint:
    """Read the folder holding ds_inference_config.json (or that json itself)."""
    path = Path(path)
    json_path = path if path.is_file() else path / CONFIG_NAME
    desc = read_json_object(json_path, "the object DeepSpeed writes", "copy it again",
                            missing="point dsinfer at the folder DeepSpeed's "
                                    "save_mp_checkpoint_path wrote")
    from .descriptor import check_fields
    check_fields(desc, json_path)
    return read_config_json(desc, json_path.parent, options)


def read_config_json(desc: dict, base: Path, options: ReadOptions) -> Checkpoint:
    """Read the shards a ds_inference_config.json dict describes; `base` is the json's folder."""
    base = Path(base)
    where = base / CONFIG_NAME if (base / CONFIG_NAME).is_file() else base  # for messages
    tp = _tp_size(desc, where)
    ckpts = desc.get("checkpoints") or {}
    root = _root(desc, base, list(ckpts.get("tp") or []) + list(ckpts.get("non_tp") or []))
    ranks = _rank_tensors(root, list(ckpts.get("tp") or []), tp)
    common = _merge_files([root / f for f in ckpts.get("non_tp") or []])
    both = next(iter(set(common) & set(ranks[0])), None)
    if both:
        raise CheckpointError(f"{where}: tensor '{both}' is in both the non_tp and "
                              "the tp files; the files are from different runs")
    config, config_dir = locate_config([root, root.parent, base, base.parent], where)
    arch = _arch(config, where)
    tensors = _refs(ranks, arch, root, config) + _refs([common], arch, root, config)
    if not tensors:
        raise CheckpointError(f"{where}: its files hold no tensors; copy the "
                              "complete save_mp_checkpoint_path folder")
    source = {"format": "ds_inference", "tp_size": tp, "dtype": desc.get("dtype"),
              "version": desc.get("version")}
    return Checkpoint("ds_inference", config, tensors, find_extra_files(config_dir), source)


def _tp_size(desc: dict, where: Path) -> int:
    if desc.get("parallelization", "tp") != "tp" or not isinstance(desc.get("checkpoints"), dict):
        raise CheckpointError(f"{where}: not a tensor-parallel ds_model description (needs "
                              "parallelization 'tp' and checkpoints {non_tp, tp}); re-save it "
                              "with save_mp_checkpoint_path")
    tp, files = desc.get("tp_size", 1), desc["checkpoints"].get("tp") or []
    if not isinstance(tp, int) or tp < 1 or len(files) % tp or len(files) < tp:
        raise CheckpointError(f"{where}: lists {len(files)} tp files, not a multiple of tp_size "
                              f"{tp}; copy the json DeepSpeed wrote with the files")
    return tp


def _root(desc: dict, base: Path, files: List[str]) -> Path:
    """Where the listed files are: base_dir (relative to the json if relative), else the json's
    folder (base_dir is usually an absolute path of the machine that wrote them)."""
    roots = ([base / desc["base_dir"]] if desc.get("base_dir") else []) + [base]
    for root in roots:
        if all((root / f).is_file() for f in files):
            return root
    missing = next(f for f in files if not (base / f).is_file())
    raise CheckpointError(f"{base / missing}: listed in the ds_model json but missing; copy every "
                          "tp_XX_YY.pt file next to the json")


def _rank_tensors(root: Path, files: List[str], tp: int) -> List[Dict[str, torch.Tensor]]:
    """Per rank, every tensor of its files. DeepSpeed lists them part-major: entry j is part
    j // tp of rank j % tp (tp_{rank:02d}_{part:02d}.pt)."""
    for j, name in enumerate(files):
        m = RANK_FILE.fullmatch(Path(name).name)
        if m and int(m.group(1)) != j % tp:
            raise CheckpointError(f"{root / name}: listed where rank {j % tp}'s file belongs; "
                                  "restore the 'tp' order DeepSpeed wrote (part-major)")
    return [_merge_files([root / f for f in files[r::tp]]) for r in range(tp)]


def _merge_files(paths: List[Path]) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for path in paths:
        sd = load_pt(path)  # memory-mapped: tensors are read when touched
        if not isinstance(sd, dict):
            raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                what = "an int8 weight with its scales ([weight, scale])" \
                    if isinstance(t, (list, tuple)) else f"a {type(t).__name__}"
                raise CheckpointError(
                    f"{path}: '{name}' holds {what}, not a tensor: DeepSpeed's int8 saves are "
                    "not read; save with dtype=torch.float16 and quantize with dsinfer-quantize")
            if name in out:
                raise CheckpointError(f"{path}: tensor '{name}' appears in two files of one rank;"
                                      " the files are from different runs")
            out[name] = t
    return out


def _arch(config: dict, where: Path) -> Arch:
    kind = config.get("model_type")
    if kind not in ARCHS:
        raise CheckpointError(f"{where}: no kernel-injected name table for model_type {kind!r} "
                              f"(known: {', '.join(ARCHS)}); add one to ds_inference.ARCHS")
    return ARCHS[kind]


def _native(name: str, arch: Arch, where: Path) -> Tuple[str, Native]:
    """(HF prefix, rule) of a native name: block tensors by the table, the rest as they are."""
    m = re.fullmatch(rf"((?:.*\.)?{re.escape(arch.layer)}\d+\.)(.+)", name)
    if not m:
        return "", whole(name)
    if m.group(2) not in arch.block:
        raise CheckpointError(f"{where}: kernel-injected tensor '{name}' is not in the name "
                              "table of this architecture; add it to ds_inference.ARCHS")
    return m.group(1), arch.block[m.group(2)]


def _refs(ranks: List[Dict[str, torch.Tensor]], arch: Arch, root: Path,
          config: dict) -> List[TensorRef]:
    out = []
    for name in ranks[0]:
        shards = _shards(ranks, name, root)
        prefix, rule = _native(name, arch, root)
        sizes = None if rule.split is None else \
            rule.part_sizes(config, shards[0].shape[rule.split], f"{root}: '{name}'")
        dtype = shards[0].dtype
        for p, hf in enumerate(rule.hf):
            shape = _hf_shape(tuple(shards[0].shape), rule, len(shards), sizes, p)
            out.append(TensorRef(prefix + hf, shape, dtype,
                                 load=lambda s=shards, r=rule, z=sizes, p=p: _load(s, r, z, p)))
    return out


def _shards(ranks, name: str, root: Path) -> List[torch.Tensor]:
    """Every rank's piece of `name`; all ranks must hold it with one shape."""
    shards = []
    for r, tensors in enumerate(ranks):
        t = tensors.get(name)
        if t is None or t.shape != ranks[0][name].shape:
            what = "lacks it" if t is None else f"holds {tuple(t.shape)}"
            raise CheckpointError(f"{root}: tensor '{name}' is {tuple(ranks[0][name].shape)} on "
                                  f"rank 0 but rank {r} {what}; the tp_XX files are from "
                                  "different runs")
        shards.append(t)
    return shards


def _parts_of(rule: Native, sizes: Tuple[int, ...], part: int) -> List[Tuple[int, int]]:
    """(start, size) in a rank's piece of the fused parts that make HF tensor `part`: one part
    per HF name, or all `parts` of a single HF name stored fused."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    chosen = range(len(sizes)) if rule.parts > 1 else [part]
    return [(starts[i], sizes[i]) for i in chosen]


def _hf_shape(local: tuple, rule: Native, tp: int, sizes, part: int) -> tuple:
    shape = list(local)
    if rule.split is not None:
        shape[rule.split] = sum(n for _, n in _parts_of(rule, sizes, part)) * tp
    return tuple(reversed(shape)) if rule.transpose else tuple(shape)


def _load(shards: List[torch.Tensor], rule: Native, sizes, part: int) -> torch.Tensor:
    """HF tensor `part` of the rule: for each fused part it holds, every rank's slice of that
    part joined along `split` (rank order), the parts one after another."""
    if rule.split is None:
        t = shards[0]
    else:
        t = torch.cat([s.narrow(rule.split, start, n) for start, n in
                       _parts_of(rule, sizes, part) for s in shards], dim=rule.split)
    return t.t().contiguous() if rule.transpose else t.clone()

"""Tables and issue-5 target checks from bench/decode_gpu.py result lines.

    python bench/summarize_decode.py RESULTS.jsonl [...]

Lines are grouped by card (device_uuid: a TP 2 line carries rank 0's card), and every ratio is
taken within one card, as the issue asks ("with the baselines of the same run"). Per card it
prints a markdown table (ms/token per batch size, prefill tokens/s, the HF check), then each
target it has the lines for:
  llama fp16 batch 1 >= 75% of copy bandwidth   (floor_fp16_ms / ms)
  llama int8 >= 1.6x dsinfer fp16               (batch 1)
  neo fp16 >= 5x DeepSpeed injection            (batch 1)
  TP 2 <= 0.6x TP 1                             (each model and dsinfer system, batch 1)
Lines with "error" are listed as failures; nothing is dropped silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

TARGETS = {"bandwidth": 0.75, "int8_speedup": 1.6, "neo_vs_ds": 5.0, "tp2_ratio": 0.6}


def read_lines(paths: Iterable[str]) -> List[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip().startswith("{")]
    return rows


def by_card(rows: List[dict]) -> Dict[Tuple[str, str], List[dict]]:
    cards = defaultdict(list)
    for r in rows:
        cards[(r.get("device", "?"), r.get("device_uuid", "?"))].append(r)
    return cards


def _label(r: dict) -> str:
    tp = r.get("world_size", 1)
    return r["system"] + (f" TP{tp}" if tp != 1 else "")


def decode_ms(rows: List[dict], model: str, system: str, batch: int = 1,
              world: int = 1) -> Optional[float]:
    """The newest matching decode figure (a later run on the same card replaces an older one)."""
    hits = [r["ms_per_token"] for r in rows if r.get("section") == "decode" and "error" not in r
            and r.get("model") == model and r.get("system") == system
            and r.get("batch") == batch and r.get("world_size", 1) == world]
    return hits[-1] if hits else None


def targets(rows: List[dict]) -> List[str]:
    """One line per target this card has the figures for: value, goal, met or not."""
    out = []

    def line(name, value, goal, met, detail):
        out.append(f"- {name}: {value} (target {goal}) {'MET' if met else 'NOT met'}; {detail}")

    bw = [r for r in rows if r.get("section") == "bw" and r.get("model") == "llama"]
    fp16 = decode_ms(rows, "llama", "dsinfer_fp16")
    if bw and fp16:
        frac = bw[-1]["floor_fp16_ms"] / fp16
        line("Llama fp16 share of copy bandwidth", f"{frac:.1%}", ">= 75%",
             frac >= TARGETS["bandwidth"],
             f"{fp16} ms/token vs floor {bw[-1]['floor_fp16_ms']} ms "
             f"(copy {bw[-1]['copy_GBps']} GB/s)")
    int8 = decode_ms(rows, "llama", "dsinfer_int8")
    if fp16 and int8:
        line("Llama int8 speed-up over dsinfer fp16", f"{fp16 / int8:.2f}x", ">= 1.6x",
             fp16 / int8 >= TARGETS["int8_speedup"], f"{int8} vs {fp16} ms/token")
    neo, ds = decode_ms(rows, "neo", "dsinfer_fp16"), decode_ms(rows, "neo", "ds")
    if neo and ds:
        line("GPT-Neo fp16 vs DeepSpeed injection", f"{ds / neo:.2f}x", ">= 5x",
             ds / neo >= TARGETS["neo_vs_ds"], f"{neo} vs {ds} ms/token")
    for model in ("llama", "neo"):
        for system in ("dsinfer_fp16", "dsinfer_int8"):
            one, two = decode_ms(rows, model, system), decode_ms(rows, model, system, world=2)
            if one and two:
                line(f"{model} {system} TP 2 / TP 1", f"{two / one:.2f}", "<= 0.6",
                     two / one <= TARGETS["tp2_ratio"], f"{two} vs {one} ms/token")
    return out


def table(rows: List[dict]) -> List[str]:
    """Markdown: model, system (with TP), ms/token per batch, prefill tokens/s, HF check."""
    cells = defaultdict(dict)
    batches = sorted({r["batch"] for r in rows if r.get("section") == "decode" and "batch" in r})
    for r in rows:
        key = (r.get("model"), _label(r)) if "system" in r else None
        if key is None:
            continue
        sec = r.get("section")
        if "error" in r:
            cells[key]["error"] = f"{sec}: {str(r['error'])[:80]}"
        elif sec == "decode":
            cells[key][f"B{r['batch']}"] = f"{r['ms_per_token']}"
        elif sec == "prefill":
            cells[key]["prefill"] = f"{r['tokens_per_s']:.0f}"
        elif sec in ("check", "check_dequant"):
            tag = "vs HF" if sec == "check" else "vs HF dequant"
            cells[key][sec] = (f"{tag} {r['max_rel_logit_diff']:.3g}, "
                               f"{r['greedy_tokens_agree']}/{r['check_tokens']} tokens")
    head = ["model", "system"] + [f"ms/token B={b}" for b in batches] + ["prefill tok/s", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (model, label), c in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if label.startswith("bw"):
            continue
        check = "; ".join(c[k] for k in ("check", "check_dequant", "error") if k in c) or "-"
        vals = [c.get(f"B{b}", "-") for b in batches] + [c.get("prefill", "-"), check]
        lines.append("| " + " | ".join([str(model), label] + vals) + " |")
    return lines


def summarize(rows: List[dict]) -> str:
    parts = []
    for (device, uuid), card in by_card(rows).items():
        parts.append(f"### {device} ({uuid[:8]})\n")
        parts += table(card)
        found = targets(card)
        parts += ["", "Targets (issue 5), this card only:"] + (found or ["- (no figures for any)"])
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("files", nargs="+", help="decode.jsonl files written by bench/decode_gpu.py")
    a = p.parse_args(argv)
    try:
        rows = read_lines(a.files)
    except (OSError, json.JSONDecodeError) as e:
        print(f"summarize_decode: cannot read the results: {e}", file=sys.stderr)
        return 2
    print(summarize(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

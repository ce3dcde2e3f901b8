"""bench/summarize_decode.py: targets are computed within one card, from the right lines."""
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import summarize_decode as S  # noqa: E402


def _decode(model, system, ms, uuid="a", batch=1, world=1):
    return dict(section="decode", model=model, system=system, batch=batch, ms_per_token=ms,
                world_size=world, device="GPU", device_uuid=uuid)


ROWS = [
    dict(section="bw", model="llama", system="bw", copy_GBps=4000.0, floor_fp16_ms=3.0,
         floor_int8_ms=1.6, world_size=1, device="GPU", device_uuid="a"),
    _decode("llama", "dsinfer_fp16", 4.0), _decode("llama", "dsinfer_int8", 2.0),
    _decode("llama", "dsinfer_fp16", 2.2, world=2),
    _decode("neo", "dsinfer_fp16", 2.0), _decode("neo", "ds", 9.0),
    _decode("neo", "ds", 1.0, uuid="b"),          # another card: must not pair with card a
    dict(section="decode", model="neo", system="dsinfer_int8", batch=1, world_size=1,
         device="GPU", device_uuid="a", error="RuntimeError: boom"),
]


def test_targets_within_one_card():
    card_a = S.by_card(ROWS)[("GPU", "a")]
    got = "\n".join(S.targets(card_a))
    assert "bandwidth: 75.0% (target >= 75%) MET" in got
    assert "int8 speed-up over dsinfer fp16: 2.00x (target >= 1.6x) MET" in got
    assert "DeepSpeed injection: 4.50x (target >= 5x) NOT met" in got
    assert "llama dsinfer_fp16 TP 2 / TP 1: 0.55 (target <= 0.6) MET" in got
    assert S.targets(S.by_card(ROWS)[("GPU", "b")]) == []


def test_cli_prints_tables_and_failures(tmp_path):
    path = tmp_path / "decode.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    r = subprocess.run([sys.executable, str(BENCH / "summarize_decode.py"), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "| llama | dsinfer_fp16 TP2 | 2.2 |" in r.stdout
    assert "decode: RuntimeError: boom" in r.stdout
    bad = subprocess.run([sys.executable, str(BENCH / "summarize_decode.py"),
                          str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot read" in bad.stderr and "Traceback" not in bad.stderr

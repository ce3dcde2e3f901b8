"""dsinfer-reshard / dsinfer-inspect as a user runs them: exit codes, one-line errors, nothing
left behind on failure, --force, --verify catching corruption."""
import os
import subprocess
import sys

import pytest

from dsinfer.tools import inspect as inspect_cli
from dsinfer.tools import reshard as reshard_cli
from helpers import hf_models


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return hf_models.save(hf_models.build("gpt2"), tmp_path_factory.mktemp("src") / "gpt2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_models.save(hf_models.build("llama"), tmp_path_factory.mktemp("src") / "llama")


def _run(capsys, *argv, cli=reshard_cli):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".dsinfer-tmp-" in p.name or ".dsinfer-old-" in p.name]


def _assert_one_line_error(code, err, *needles):
    assert code == 1
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsinfer-"), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert "Traceback" not in err


def test_success_summary(capsys, gpt2_dir, tmp_path):
    code, out, _ = _run(capsys, gpt2_dir, "--tp", 2, "--out", tmp_path / "o")
    assert code == 0 and "wrote" in out and "tp=2" in out
    code, out, _ = _run(capsys, tmp_path / "o", "--verify", cli=inspect_cli)
    assert code == 0 and "GPT2LMHeadModel" in out and "verify: OK" in out


@pytest.mark.parametrize("case", [
    "nonexistent", "empty_dir", "heads", "kv_heads", "hf_tp2", "bad_tp", "overlap",
    "unwritable", "truncated_safetensors", "no_config",
])
def test_bad_inputs(case, capsys, gpt2_dir, llama_dir, tmp_path):
    out = tmp_path / "out"
    src, tp, extra, needles = gpt2_dir, 2, [], []
    if case == "nonexistent":
        src, needles = tmp_path / "nope", ["nope", "no such file"]
    elif case == "empty_dir":
        (tmp_path / "empty").mkdir()
        src, needles = tmp_path / "empty", ["empty", "--from"]
    elif case == "heads":
        tp, needles = 3, ["8 attention heads", "TP 3"]
    elif case == "kv_heads":
        src, tp, needles = llama_dir, 8, ["4 KV heads", "TP 8"]
    elif case == "hf_tp2":
        extra, needles = ["--to", "hf"], ["--tp 1"]
    elif case == "bad_tp":
        tp, needles = 0, ["--tp"]
    elif case == "overlap":
        out, needles = gpt2_dir / "inside", ["overlaps the source"]
    elif case == "unwritable":
        out, needles = "/proc/dsinfer-cannot-write-here/out", ["cannot create"]
    elif case == "truncated_safetensors":
        src = tmp_path / "trunc"
        src.mkdir()
        for f in gpt2_dir.iterdir():
            data = f.read_bytes()
            (src / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
        needles = ["model.safetensors", "truncated"]
    elif case == "no_config":
        src = tmp_path / "noconf"
        src.mkdir()
        (src / "model.safetensors").write_bytes((gpt2_dir / "model.safetensors").read_bytes())
        extra, needles = ["--from", "hf"], ["config.json"]
    code, _, err = _run(capsys, src, "--tp", tp, "--out", out, *extra)
    _assert_one_line_error(code, err, *needles)
    if case != "overlap":
        assert not os.path.exists(out)
    if os.path.isdir(tmp_path):
        assert not _leftovers(tmp_path)


def test_existing_out_needs_force(capsys, gpt2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, gpt2_dir, "--tp", 2, "--out", out)
    _assert_one_line_error(code, err, "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, _ = _run(capsys, gpt2_dir, "--tp", 2, "--out", out, "--force", "--quiet")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "dsinfer.json").exists()
    assert not _leftovers(tmp_path)


def test_failed_run_leaves_nothing_and_source_untouched(capsys, gpt2_dir, tmp_path):
    before = {p.name: p.read_bytes() for p in gpt2_dir.iterdir()}
    code, _, _ = _run(capsys, gpt2_dir, "--tp", 3, "--out", tmp_path / "o")
    assert code == 1 and not (tmp_path / "o").exists() and not _leftovers(tmp_path)
    assert {p.name: p.read_bytes() for p in gpt2_dir.iterdir()} == before


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "missing_rank", "wrong_shape"])
def test_verify_and_read_catch_damage(damage, capsys, llama_dir, tmp_path):
    out = tmp_path / "o"
    assert _run(capsys, llama_dir, "--tp", 2, "--out", out, "--quiet")[0] == 0
    part = out / "rank-01-of-02" / "part-000.safetensors"
    if damage == "flip_byte":
        data = bytearray(part.read_bytes())
        data[-10] ^= 0xFF
        part.write_bytes(bytes(data))
    elif damage == "truncate":
        part.write_bytes(part.read_bytes()[:-100])
    elif damage == "missing_rank":
        part.unlink()
    elif damage == "wrong_shape":  # rank 1 replaced by the file of a TP 4 split
        _run(capsys, llama_dir, "--tp", 4, "--out", tmp_path / "o4", "--quiet")
        part.write_bytes((tmp_path / "o4" / "rank-01-of-04" / "part-000.safetensors").read_bytes())
    code, _, err = _run(capsys, out, "--verify", "--quiet", cli=inspect_cli)
    assert code == 1 and "rank-01-of-02/part-000.safetensors" in err and "FAILED" in err
    if damage != "flip_byte":  # a flipped byte needs the hash; the rest fail at read time too
        code, _, err = _run(capsys, out, "--tp", 1, "--out", tmp_path / "again")
        _assert_one_line_error(code, err, "rank-01-of-02")


def test_console_script_exit_code_and_no_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "dsinfer-reshard")
    r = subprocess.run([exe, str(tmp_path / "missing"), "--tp", "2", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "missing" in r.stderr
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "examples:" in r.stdout

"""On the GPU machine (`pytest -m gpu`): NCCL tensor parallelism across 2 GPUs, pre-sharded
and int8 checkpoints, equal to HF on the same GPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsinfer.quantize import QuantConfig, quantize
from dsinfer.reshard import reshard
from helpers import child_env, hf_models

pytestmark = pytest.mark.gpu
SUPPORT = Path(__file__).resolve().parents[1] / "support"


# The cases in two halves (each a fresh 2-process run, Triton compiling its kernels there), so
# that each fits a device call of a few minutes: `-k "nccl and eager"` and so on.
CASES = {
    "eager": ["llama:tp2", "gpt2:tp2:batch", "bloom:tp2:batch", "gpt_neox:tp2", "opt:tp2",
              "llama:int8tp2:int8"],
    "inject": ["llama:tp2:inject:graph", "gpt2:tp2:batch:inject:graph", "bloom:tp2:inject:graph",
               "gpt_neox:tp2:inject", "opt:tp2:inject:graph", "llama:int8tp2:int8:inject:graph"],
}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("half", list(CASES))
@pytest.mark.parametrize("fast", [False, True], ids=["nccl", "nvlink-one-shot"])
def test_nccl_tp2_equals_hf(tmp_path, monkeypatch, fast, half):
    monkeypatch.setenv("DSINFER_FAST_ALLREDUCE", "1" if fast else "0")
    cases = CASES[half]
    for arch in sorted({c.split(":")[0] for c in cases}):
        src = hf_models.save(hf_models.build(arch), tmp_path / arch / "hf")
        reshard(src, tmp_path / arch / "tp2", tp=2, progress=False)
    quantize(tmp_path / "llama" / "hf", tmp_path / "llama" / "int8tp2",
             QuantConfig(groups="per-channel"), tp=2, progress=False)
    env = child_env(SUPPORT)
    r = subprocess.run([sys.executable, "-m", "dsinfer", "--num_gpus", "2", "--no_local_rank",
                        str(SUPPORT / "runtime_worker.py"), str(tmp_path), str(tmp_path / "o"),
                        *cases], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        res = json.loads(Path(f"{tmp_path / 'o'}.rank{rank}").read_text())
        assert sorted(res) == sorted(cases), (rank, sorted(res))
        for case, v in res.items():
            limit = 2e-2 if ":int8" in case else 1e-3   # TF32 / reduction order on GPU
            assert v["injected"] == (":inject" in case), (rank, case)
            assert v["fast_allreduce"] == fast, (rank, case)   # small sums: NVLink kernel
            assert v["rel_err"] <= limit and v["generate_same"], (rank, case, v)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nvlink_one_shot_all_reduce(tmp_path):
    """kernels.allreduce through dsinfer.fast_allreduce on 2 GPUs: equal to NCCL's sum for
    odd sizes and every dtype, call after call (both buffer halves), and replayed from a CUDA
    graph with new inputs."""
    env = child_env(SUPPORT, DSINFER_FAST_ALLREDUCE="1")
    r = subprocess.run([sys.executable, "-m", "dsinfer", "--num_gpus", "2", "--no_local_rank",
                        str(SUPPORT / "allreduce_worker.py"), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        res = json.loads(Path(f"{tmp_path / 'o'}.rank{rank}").read_text())
        assert res["created"], res
        assert not res["bad"], res["bad"][:5]
        assert res["checked"] >= 40, res

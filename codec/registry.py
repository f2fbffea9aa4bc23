"""Levels by name → header entries → codec objects.

A *level* is a named quality setting. At encode time ``level_entry(name, profile)`` turns the name
into the JSON entry stored in the file header (``{"codec": id, "params": {...}, "profile": sha|None}``);
at decode time ``build_codec(entry, profile)`` rebuilds the codec from that entry alone (plus the
profile it names), so a reader needs nothing the file does not say."""

from __future__ import annotations

from collections.abc import Callable

from kvc.codec.base import SegmentCodec
from kvc.errors import FormatError, ProfileError

LOSSLESS = "lossless"

# codec id -> factory(params, profile) -> SegmentCodec
_CODECS: dict[str, Callable[[dict, object], SegmentCodec]] = {}
# level name -> entry builder(profile) -> header entry; lossy levels are added by kvc.codec.levels
_LEVELS: dict[str, Callable[[object], dict]] = {}


def register_codec(codec_id: str, factory: Callable[[dict, object], SegmentCodec]) -> None:
    _CODECS[codec_id] = factory


def register_level(name: str, entry_builder: Callable[[object], dict]) -> None:
    _LEVELS[name] = entry_builder


def level_names() -> list[str]:
    _load_builtin()
    return list(_LEVELS)


def level_entry(name: str, profile=None) -> dict:
    _load_builtin()
    if name not in _LEVELS:
        raise KeyError(name)
    return _LEVELS[name](profile)


def build_codec(entry: dict, profile=None) -> SegmentCodec:
    _load_builtin()
    codec_id = entry.get("codec")
    if codec_id not in _CODECS:
        raise FormatError(f"unknown codec {codec_id!r}: this file needs a newer kvc")
    if entry.get("profile") and profile is None:
        raise ProfileError(f"this level needs profile {entry['profile'][:16]}…, which was not found (use --profile)")
    return _CODECS[codec_id](entry.get("params") or {}, profile)


def _load_builtin() -> None:
    # Imported lazily so the registry has no import cycle with the codecs that register into it.
    import kvc.codec.lossless  # noqa: F401

    try:
        import kvc.codec.levels  # noqa: F401  (the lossy ladder, once it exists)
    except ModuleNotFoundError as exc:
        if exc.name != "kvc.codec.levels":
            raise

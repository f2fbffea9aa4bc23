"""An opened .kvc file's header: what it holds and where, without decoding anything.

Everything here comes from the validated header, so it needs neither torch nor a codec: `kvc
inspect` opens files this way and starts in a fraction of a second. kvc.api.KvcFile extends it with
reading, decoding and caches."""

from __future__ import annotations

from kvc.formats.container import open_container


class KvcIndex:
    """A .kvc file's checked header. Cheap to open: payloads are read only by KvcFile, when asked for."""

    def __init__(self, source):
        self._container = open_container(source)
        self.header = self._container.header
        self.name = self._container.name

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    @property
    def model(self) -> dict:
        return self.header["model"]

    @property
    def token_ids(self) -> list[int]:
        return self.header["context"]["token_ids"]

    @property
    def num_tokens(self) -> int:
        return self.header["context"]["num_tokens"]

    @property
    def levels(self) -> list[str]:
        return list(self.header["levels"])

    @property
    def version(self) -> tuple[int, int]:
        return self._container.version

    def level_bytes(self, level: str, tokens: tuple[int, int] | None = None) -> int:
        """Payload bytes stored for ``level``, or the bytes a reader fetches for tokens ``a:b`` (whole chunks)."""
        a, b = tokens if tokens is not None else (0, self.num_tokens)
        return sum(
            e["length"]
            for c in self.header["chunks"]
            if c["start"] < b and c["end"] > a
            for e in c["encodings"]
            if e["level"] == level
        )

    def fp16_bytes(self) -> int:
        """What the stored KV would take as raw fp16: the yardstick every ratio is quoted against."""
        total = 0
        for spec in self.header["layout"]["layers"]:
            kept = self.num_tokens - spec["start"]
            total += 2 * spec["kv_heads"] * kept * (spec["key_dim"] + spec["value_dim"])
        return total

    def elements(self) -> int:
        return self.fp16_bytes() // 2

    def layer_bytes(self, level: str) -> list[tuple[int, int]]:
        """Bytes per layer at ``level``: (key, value) pairs."""
        layers = len(self.header["layout"]["layers"])
        totals = [[0, 0] for _ in range(layers)]
        for chunk in self.header["chunks"]:
            for enc in chunk["encodings"]:
                if enc["level"] == level:
                    for s, length in enumerate(enc["segments"]):
                        totals[s // 2][s % 2] += length
        return [tuple(t) for t in totals]


def open_index(source) -> KvcIndex:
    """Open a .kvc file's header (a path or bytes) without anything that decodes."""
    return KvcIndex(source)

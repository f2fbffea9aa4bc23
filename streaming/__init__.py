"""Stream a .kvc into a model: byte-range sources, a per-chunk controller, a Range server.

    from kvc.streaming import load_cache, open_stream, RangeServer
    cache, report = load_cache("http://127.0.0.1:8080/doc.kvc", lm)   # adaptive: levels or text per chunk

docs/STREAMING.md describes the loader, the controller, the sources, `kvc serve` and `kvc ask`."""

from kvc.streaming.controller import TEXT, Policy
from kvc.streaming.loader import ChunkRecord, LoadReport, Stream, load_cache, open_stream
from kvc.streaming.server import RangeServer, parse_rate
from kvc.streaming.sources import RangeSource, SourceChangedError, SourceError, open_source

__all__ = ["TEXT", "ChunkRecord", "LoadReport", "Policy", "RangeServer", "RangeSource", "SourceChangedError",
           "SourceError", "Stream", "load_cache", "open_source", "open_stream", "parse_rate"]

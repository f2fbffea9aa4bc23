"""kvc serve: a folder of .kvc files over HTTP with Range support, optionally behind an emulated link."""

from __future__ import annotations

import sys

import typer

HELP = """Serve the .kvc files of a folder over HTTP, with Range requests, for `kvc ask URL` and the loader.

Binds 127.0.0.1 unless --host says otherwise, and serves regular files inside DIR only. --rate
emulates a link of that speed shared by every response (for experiments and tests); --latency adds
a delay before every response. GET / lists the .kvc files. Runs until interrupted (Ctrl-C).

\b
Examples:
  kvc serve caches/                                  # http://127.0.0.1:8000/
  kvc serve caches/ --rate 100mbit --latency 20      # a 100 Mbit/s link with 20 ms per request
  kvc serve caches/ --port 0                         # any free port (printed on the first line)"""


def serve_command(
    folder: str = typer.Argument(..., help="The folder whose files are served."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 exposes the folder to the "
                             "network)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port; 0 picks a free one."),
    rate: str = typer.Option(None, "--rate", help="Emulated link rate, e.g. 100mbit, 1gbit, 20MB/s (default: "
                             "unlimited)."),
    latency: float = typer.Option(0.0, "--latency", help="Milliseconds added before every response."),
    log: bool = typer.Option(False, "--log", help="Log every request on stderr."),
) -> None:
    from kvc.errors import InputError
    from kvc.streaming.server import RangeServer, gbit, parse_rate

    bytes_per_s = parse_rate(rate) if rate else None
    if not 0 <= latency <= 60_000:  # also refuses nan and inf, which would fail every response
        raise InputError("--latency must be between 0 and 60000 ms")
    if not 0 <= port <= 65535:
        raise InputError("--port must be between 0 and 65535")
    logger = (lambda line: print(line, file=sys.stderr, flush=True)) if log else None
    server = RangeServer(folder, host=host, port=port, rate=bytes_per_s, latency=latency / 1e3, log=logger)
    link = f"{gbit(bytes_per_s):g} Gbit/s" if bytes_per_s else "unlimited"
    print(f"serving {folder} at {server.url} (link {link}, latency {latency:g} ms)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"kvc: warning: bound to {host}: anyone who can reach this port can read {folder}", file=sys.stderr,
              flush=True)
    try:  # Ctrl-C / SIGTERM end it as they end any kvc command: one line, exit 130 / 143 (cli/_errors.py)
        server.serve_forever()
    finally:
        server.close()


serve_command.__doc__ = HELP

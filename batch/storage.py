"""Where documents come from and where caches go: local paths or any fsspec URL (s3://, gs://, memory://).

Local paths keep the container's own atomic write (a temporary file in the target folder, renamed
over the name). Other backends write through fsspec without autocommit: the object is committed
only after its last byte is written, and discarded on failure, so a finished object appears whole
or not at all where the backend allows it (S3's multipart upload completes only on commit)."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from kvc.errors import InputError
from kvc.formats.container import new_file_mode

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than file://."""
    text = str(path)
    return bool(_URL.match(text)) and not text.startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; a missing backend package is a one-line error."""
    try:
        from fsspec.core import url_to_fs
    except ModuleNotFoundError as exc:  # pragma: no cover - fsspec comes with datasets
        raise InputError("object storage needs fsspec: pip install 'kvc[s3]'") from exc
    try:
        return url_to_fs(url, **_storage_options(url))
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        hint = {"s3": "kvc[s3] (s3fs)", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(scheme)
        extra = f": pip install {hint}" if hint else ""
        raise InputError(f"cannot open {scheme}:// storage{extra} ({str(exc).splitlines()[0]})") from exc


def _storage_options(url: str) -> dict:
    """Backend options from the environment: KVC_S3_ENDPOINT_URL points s3:// at an S3-compatible
    server (MinIO, Ceph, a test server); credentials come from the backend's usual sources."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("KVC_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
        return {"endpoint_url": endpoint} if endpoint else {}
    return {}


def join(root: str, *parts: str) -> str:
    if is_url(root):
        return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(root, *parts))


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        return Path(path).read_bytes()
    fs, inner = filesystem(path)
    try:
        return fs.cat_file(inner)
    except FileNotFoundError as exc:
        raise InputError(f"no such file: {path}") from exc


def sizes(root: str) -> dict[str, int]:
    """Every file under ``root`` (recursively) with its size, keyed as join(root, relative) would name it;
    one listing call on an object store."""
    if not is_url(root):
        base = Path(root)
        if not base.is_dir():
            return {}
        return {str(p): p.stat().st_size for p in base.rglob("*") if p.is_file()}
    fs, inner = filesystem(root)
    try:
        found = fs.find(inner, detail=True)
    except FileNotFoundError:
        return {}
    prefix = inner.rstrip("/") + "/"
    return {join(root, name[len(prefix) :]): info.get("size", 0) for name, info in found.items()
            if name.startswith(prefix)}  # fmt: skip


def list_files(root: str, pattern: str | list[str]) -> list[tuple[str, str]]:
    """(path, path relative to root) of the files under a folder or prefix whose name matches ``pattern``
    (or any of several), each once, sorted."""
    import fnmatch

    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    if not is_url(root):
        base = Path(root)
        found = {p for pat in patterns for p in base.rglob(pat)}
        return [(str(p), str(p.relative_to(base))) for p in sorted(found) if p.is_file()]
    fs, inner = filesystem(root)
    prefix = inner.rstrip("/") + "/"
    names = sorted(n for n in fs.find(inner) if n.startswith(prefix))
    return [(join(root, n[len(prefix) :]), n[len(prefix) :]) for n in names
            if any(fnmatch.fnmatch(n.rsplit("/", 1)[-1], pat) for pat in patterns)]  # fmt: skip


def is_dir(path: str) -> bool:
    if not is_url(path):
        return Path(path).is_dir()
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def check_folder(path: str) -> None:
    """InputError unless ``path`` is a folder or could be made one (local paths: no file in the way)."""
    if is_url(path):
        return  # object stores have no folders to be in the way
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{p} is not a folder")
            return


def remove(path: str) -> None:
    """Delete a file if it is there."""
    if not is_url(path):
        Path(path).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner)


def exists(path: str) -> bool:
    if not is_url(path):
        return Path(path).exists()
    fs, inner = filesystem(path)
    return fs.exists(inner)


@contextmanager
def atomic_writer(path: str):
    """A binary file object whose bytes land at ``path`` only if the block ends without an exception."""
    if not is_url(path):
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, new_file_mode())  # mkstemp makes 0600; give the mode open() would
            os.replace(tmp, target)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return
    fs, inner = filesystem(path)
    parent = inner.rsplit("/", 1)[0]
    if parent and parent != inner:
        try:
            fs.makedirs(parent, exist_ok=True)
        except (OSError, NotImplementedError):
            pass  # object stores have no folders
    f = fs.open(inner, "wb", autocommit=False)
    try:
        yield f
        f.close()
        f.commit()
    except BaseException:
        try:
            f.discard()  # S3: aborts the multipart upload; nothing appears under the name
        finally:
            try:
                f.closed = True  # discarded: a later close (its __del__) must not try to upload what is gone
            except AttributeError:
                pass
            raise
    finally:
        files = getattr(getattr(fs, "_transaction", None), "files", None)
        if files is not None and f in files:
            files.remove(f)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_writer(path) as f:
        f.write(data)


def open_read(path: str) -> BinaryIO:
    """A seekable binary reader for a local path or URL (object stores read by ranges)."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    if not fs.exists(inner):
        raise InputError(f"no such file: {path}")
    if fs.isdir(inner):
        raise InputError(f"{path} is a folder, not a .kvc file")
    return fs.open(inner, "rb")


def fetch_to_local(path: str, on_ready: Callable[[str], object]):
    """Call ``on_ready`` with a local copy of ``path`` (the path itself when it is local)."""
    if not is_url(path):
        return on_ready(path)
    with tempfile.TemporaryDirectory(prefix="kvc-fetch-") as tmp:
        local = os.path.join(tmp, path.rstrip("/").rsplit("/", 1)[-1])
        fs, inner = filesystem(path)
        fs.get(inner, local, recursive=fs.isdir(inner))
        return on_ready(local)

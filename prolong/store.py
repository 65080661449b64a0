"""The artifact store: one fsspec filesystem under a root URL.

``./runs`` (the default) is a local folder; ``s3://bucket/prefix`` goes through s3fs, with the
endpoint from ``S3_ENDPOINT_URL`` (mosaicml-streaming's variable) or ``AWS_ENDPOINT_URL`` and the
credentials from the usual AWS variables or profile — never from the recipe, and never logged.

Paths passed to methods are relative to the root (``"tiny/stage1/manifest.json"``). Small JSON
documents are written atomically: a temporary file renamed into place locally, a single PUT on
object stores (an object appears whole or not at all).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from fsspec.core import url_to_fs

from prolong.errors import StoreError

DEFAULT_STORE = "./runs"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class FileEntry:
    """An output file as recorded in a manifest."""

    path: str  # relative to the stage folder
    bytes: int
    sha256: str

    def to_dict(self) -> dict:
        return asdict(self)


def s3_endpoint() -> str | None:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for `url`, taken from the environment."""
    if url.startswith(("s3://", "s3a://")):
        endpoint = s3_endpoint()
        return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    return {}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


class Store:
    def __init__(self, url: str = DEFAULT_STORE):
        self.is_local = "://" not in url or url.startswith("file://")
        if self.is_local:
            url = str(Path(url.removeprefix("file://")).expanduser().resolve())
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = url_to_fs(self.url, **storage_options(self.url))
        except (ImportError, ValueError) as e:
            raise StoreError(f"--store {url}: cannot open this store ({e})") from None
        self.root = self.root.rstrip("/")

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ------------------------------------------------------------ naming
    def path(self, rel: str = "") -> str:
        """Filesystem path (no scheme) of `rel`."""
        return f"{self.root}/{rel.strip('/')}" if rel.strip("/") else self.root

    def uri(self, rel: str = "") -> str:
        """Full URL of `rel`, for readers outside fsspec (mosaicml-streaming, logs)."""
        return f"{self.url}/{rel.strip('/')}" if rel.strip("/") else self.url

    def local_path(self, rel: str = "") -> Path | None:
        """The local path of `rel` when the store is a local folder, else None."""
        return Path(self.path(rel)) if self.is_local else None

    # ------------------------------------------------------------ reads
    def _call(self, what: str, rel: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, PermissionError) as e:
            raise StoreError(f"{self.uri(rel)}: {what} failed ({type(e).__name__}: {e})") from None
        except Exception as e:  # botocore errors do not derive from OSError
            if type(e).__module__.startswith(("botocore", "aiobotocore", "s3fs")):
                raise StoreError(f"{self.uri(rel)}: {what} failed ({type(e).__name__}: {e})") from None
            raise

    def exists(self, rel: str) -> bool:
        return bool(self._call("exists", rel, self.fs.exists, self.path(rel)))

    def is_file(self, rel: str) -> bool:
        return bool(self._call("stat", rel, self.fs.isfile, self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        try:
            return self._call("read", rel, self.fs.cat_file, self.path(rel))
        except FileNotFoundError:
            raise StoreError(f"{self.uri(rel)}: not found") from None

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise StoreError(f"{self.uri(rel)}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def list(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (empty if it does not exist)."""
        try:
            entries = self._call("list", rel, self.fs.ls, self.path(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != self.path(rel))

    def walk_files(self, rel: str) -> Iterator[str]:
        """Every file below `rel`, as paths relative to `rel`."""
        base = self.path(rel)
        try:
            found = self._call("find", rel, self.fs.find, base)
        except FileNotFoundError:
            return
        for p in sorted(found):
            yield p[len(base):].lstrip("/")

    # ------------------------------------------------------------ writes
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{target}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            self._call("write", rel, self.fs.pipe_file, target, data)

    def write_json_atomic(self, rel: str, obj: Any) -> bytes:
        """Write `obj` as JSON atomically; returns the bytes written (for digests)."""
        data = json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"
        self.write_bytes_atomic(rel, data)
        return data

    def append_text(self, rel: str, text: str) -> None:
        """Append to a log-like file (local only appends; object stores rewrite the object)."""
        if self.is_local:
            p = Path(self.path(rel))
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a") as f:
                f.write(text)
        else:
            old = self.read_bytes(rel) if self.exists(rel) else b""
            self._call("write", rel, self.fs.pipe_file, self.path(rel), old + text.encode())

    def put_file(self, local: str | os.PathLike, rel: str, *, move: bool = False) -> FileEntry:
        """Upload one file; returns its size and sha256 (computed from the local copy)."""
        local = Path(local)
        entry = FileEntry(path=rel, bytes=local.stat().st_size, sha256=sha256_file(local))
        target = self.path(rel)
        if self.is_local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            if Path(target).resolve() != local.resolve():
                (shutil.move if move else shutil.copyfile)(local, target)
        else:
            self._call("upload", rel, self.fs.put_file, str(local), target)
        return entry

    def put_dir(self, local_dir: str | os.PathLike, rel: str, *, move: bool = False) -> list[FileEntry]:
        """Upload every file below `local_dir` to `rel/`; entries' paths are relative to `rel`."""
        local_dir = Path(local_dir)
        entries = []
        for f in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            sub = f.relative_to(local_dir).as_posix()
            e = self.put_file(f, f"{rel}/{sub}", move=move)
            entries.append(FileEntry(path=sub, bytes=e.bytes, sha256=e.sha256))
        return entries

    def get_dir(self, rel: str, local_dir: str | os.PathLike) -> Path:
        """Download `rel/` into `local_dir` (or return the folder itself for a local store)."""
        if self.is_local:
            src = Path(self.path(rel))
            if not src.is_dir():
                raise StoreError(f"{self.uri(rel)}: not found")
            return src
        local_dir = Path(local_dir)
        files = list(self.walk_files(rel))
        if not files:
            raise StoreError(f"{self.uri(rel)}: not found")
        for sub in files:
            dest = local_dir / sub
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._call("download", rel, self.fs.get_file, f"{self.path(rel)}/{sub}", str(dest))
        return local_dir

    def delete(self, rel: str) -> None:
        try:
            self._call("delete", rel, self.fs.rm, self.path(rel), recursive=True)
        except FileNotFoundError:
            pass

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode and self.is_local:
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(self.path(rel), mode)


def open_store(url: str | None) -> Store:
    return Store(url or os.environ.get("PROLONG_STORE") or DEFAULT_STORE)



"""The artifact store: one fsspec filesystem under a root URL.

``./runs`` (the default) is a local folder; ``s3://bucket/prefix`` goes through s3fs, with the
endpoint from ``S3_ENDPOINT_URL`` (mosaicml-streaming's variable) or ``AWS_ENDPOINT_URL`` and the
credentials from the usual AWS variables or profile — never from the recipe, and never logged.

Paths passed to methods are relative to the root (``"tiny/stage1/manifest.json"``; spelled by
``prolong.layout``). Small JSON documents are written atomically: a temporary file renamed into
place locally, a single PUT on object stores (an object appears whole or not at all). Leases use
conditional writes: an exclusive create and a compare-and-swap (S3's ``If-None-Match``/``If-Match``;
locally a link that fails if the target exists, and a file lock around read-compare-replace).

Failures of the store itself (unreachable, no such bucket, no space left) are one-line
:class:`StoreError` s naming the path.
"""

from __future__ import annotations

import errno
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
from prolong.locks import file_lock

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


_ERRNO_TEXT = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EROFS: "read-only file system"}


def describe_os_error(e: BaseException) -> str:
    """``no space left on device`` rather than ``[Errno 28] No space left on device: '/long/tmp/path'``."""
    code = getattr(e, "errno", None)
    if code in _ERRNO_TEXT:
        return _ERRNO_TEXT[code]
    return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"


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
            raise StoreError(f"{self.uri(rel)}: {what} failed ({describe_os_error(e)})") from None
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

    def sizes(self, rel: str) -> dict[str, int]:
        """Every file below ``rel`` → its size in bytes, from one listing (cheap on object stores)."""
        base = self.path(rel)
        try:
            found = self._call("find", rel, self.fs.find, base, detail=True)
        except FileNotFoundError:
            return {}
        return {p[len(base):].lstrip("/"): int(info.get("size") or 0) for p, info in sorted(found.items())
                if info.get("type", "file") == "file"}

    # ------------------------------------------------------------ writes
    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        if self.is_local:
            self._call("write", rel, self._write_local, target, data)
        else:
            self._call("write", rel, self.fs.pipe_file, target, data)

    @staticmethod
    def _write_local(target: str, data: bytes, *, exclusive: bool = False) -> bool:
        """Temporary file, fsync, then rename (or, ``exclusive``, link: fails if ``target`` exists)."""
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if not exclusive:
                os.replace(tmp, target)
                return True
            try:
                os.link(tmp, target)
            except FileExistsError:
                return False
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def write_json_atomic(self, rel: str, obj: Any, *, sort_keys: bool = True) -> bytes:
        """Write `obj` as JSON atomically; returns the bytes written (for digests). ``sort_keys=False``
        keeps the order of mappings (a recipe's stages: their declaration order sets defaults)."""
        data = json.dumps(obj, indent=2, sort_keys=sort_keys).encode() + b"\n"
        self.write_bytes_atomic(rel, data)
        return data

    # ------------------------------------------------------------ conditional writes (leases)
    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """An object and a version token for :meth:`replace_if` (S3: its ETag; locally: its sha256),
        or None if it does not exist."""
        if self.is_local:
            try:
                data = Path(self.path(rel)).read_bytes()
            except FileNotFoundError:
                return None
            except OSError as e:
                raise StoreError(f"{self.uri(rel)}: read failed ({describe_os_error(e)})") from None
            return data, hashlib.sha256(data).hexdigest()
        from fsspec.asyn import sync

        bucket, key, _ = self.fs.split_path(self.path(rel))

        async def get() -> tuple[bytes, str]:
            out = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with out["Body"] as stream:
                return await stream.read(), out["ETag"]

        try:
            return self._call("read", rel, sync, self.fs.loop, get)
        except FileNotFoundError:
            return None

    def _local_cas(self, rel: str):
        """Serialise conditional writes of ``rel`` between processes (a hidden lock file beside it)."""
        target = Path(self.path(rel))
        return file_lock(target.with_name(f".{target.name}.lock"))

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` with ``data`` unless it exists; True if this call created it."""
        if self.is_local:
            with self._local_cas(rel):
                return self._call("create", rel, self._write_local, self.path(rel), data, exclusive=True)
        try:
            self.fs.pipe_file(self.path(rel), data, mode="create")
        except FileExistsError:
            return False
        except OSError as e:
            raise StoreError(f"{self.uri(rel)}: create failed ({describe_os_error(e)})") from None
        return True

    def replace_if(self, rel: str, data: bytes | None, version: str) -> bool:
        """Replace (``data=None``: delete) ``rel`` if it is still at ``version`` (from
        :meth:`read_versioned`); True if it was."""
        if self.is_local:
            with self._local_cas(rel):
                current = self.read_versioned(rel)
                if current is None or current[1] != version:
                    return False
                if data is None:
                    os.unlink(self.path(rel))
                else:
                    self._call("write", rel, self._write_local, self.path(rel), data)
                return True
        bucket, key, _ = self.fs.split_path(self.path(rel))
        if data is None:
            # S3 deletes unconditionally on most servers: a last check narrows the window to one call
            current = self.read_versioned(rel)
            if current is None or current[1] != version:
                return False
            self.delete(rel)
            return True
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as e:
            cause = getattr(e.__cause__, "response", None) or {}
            if cause.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise StoreError(f"{self.uri(rel)}: write failed ({describe_os_error(e)})") from None
        finally:
            self.fs.invalidate_cache(self.path(rel))
        return True

    def check_writable(self, rel: str) -> None:
        """Fail in one line now, not in a job hours later, when ``rel`` cannot be written (a missing
        bucket, wrong credentials, a read-only or full disk)."""
        probe = f"{rel}/.prolong-write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.write_bytes_atomic(probe, b"ok")
        except FileNotFoundError:
            what = "the bucket does not exist, or these credentials cannot see it" if not self.is_local else "not found"
            raise StoreError(f"{self.uri()}: cannot write to the store ({what})") from None
        self.delete(probe)

    def put_file(self, local: str | os.PathLike, rel: str, *, move: bool = False) -> FileEntry:
        """Upload one file; returns its size and sha256 (computed from the local copy)."""
        local = Path(local)
        entry = FileEntry(path=rel, bytes=local.stat().st_size, sha256=sha256_file(local))
        target = self.path(rel)
        if self.is_local:
            def copy():
                Path(target).parent.mkdir(parents=True, exist_ok=True)
                if Path(target).resolve() != local.resolve():
                    (shutil.move if move else shutil.copyfile)(local, target)

            self._call("write", rel, copy)
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

    def move(self, src: str, dst: str) -> None:
        """Move a file or folder, replacing ``dst`` (a rename locally; copies then deletes on object
        stores, where a folder is many objects)."""
        self.delete(dst)
        if self.is_local:
            def rename():
                Path(self.path(dst)).parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.path(src), self.path(dst))

            self._call("move", src, rename)
            return
        if self.is_file(src):
            self._call("move", src, self.fs.mv, self.path(src), self.path(dst))
            return
        for sub in list(self.walk_files(src)):
            self._call("move", src, self.fs.copy, f"{self.path(src)}/{sub}", f"{self.path(dst)}/{sub}")
        self.delete(src)

    def open(self, rel: str, mode: str = "rb"):
        if "w" in mode and self.is_local:
            Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open(self.path(rel), mode)


def open_store(url: str | None) -> Store:
    return Store(url or os.environ.get("PROLONG_STORE") or DEFAULT_STORE)



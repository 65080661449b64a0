"""Folders outside the store that a recipe reads in place: local paths, ``s3://`` and ``hf://``.

Everything goes through fsspec, so the ecosystem's options apply as users know them: s3fs's
``requester_pays`` / ``profile`` / ``client_kwargs``, huggingface_hub's ``hf://datasets/ORG/REPO@REV/…``.
The S3 endpoint comes from the environment as for the store (prolong.store.storage_options);
credentials come from the environment or a Prefect Secret block, never from a recipe.

Torch-free: the orchestrator's checks use it before a run starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

from prolong import assets
from prolong.errors import DataError
from prolong.store import storage_options as environment_options

INDEX = "index.json"


def join(root: str, folder: str) -> str:
    """``root`` + ``folder`` ("." is the root itself)."""
    folder = folder.strip("/")
    return root.rstrip("/") if folder in ("", ".") else f"{root.rstrip('/')}/{folder}"


def with_revision(uri: str, revision: str | None) -> str:
    """Pin an ``hf://`` URI at ``revision``: ``hf://datasets/ORG/REPO/x`` → ``hf://datasets/ORG/REPO@REV/x``
    (huggingface_hub's fsspec syntax). Other URIs are returned as they are."""
    if not revision or not uri.startswith("hf://"):
        return uri
    kind, _, rest = uri[len("hf://"):].partition("/")
    parts = rest.split("/")
    if kind != "datasets" or len(parts) < 2 or not parts[0] or not parts[1]:
        raise DataError(f"{uri}: an hf:// data folder is hf://datasets/ORG/REPO[/PATH]")
    if "@" in parts[1]:
        raise DataError(f"{uri}: the URI pins a revision already; leave `revision` unset or drop the @")
    parts[1] = f"{parts[1]}@{revision}"
    return f"hf://{kind}/" + "/".join(parts)


def options(uri: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """fsspec options for ``uri``: the environment's (an S3 endpoint), then the recipe's on top."""
    out = environment_options(uri)
    for k, v in (extra or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def local_path(uri: str) -> str | None:
    """A local folder's path (``builtin:`` assets resolved), or None for a remote URI."""
    if assets.is_builtin(uri):  # the asset built; a file in it need not exist (read_bytes says so)
        name, _, sub = uri[len(assets.PREFIX):].partition("/")
        root = assets.resolve(assets.PREFIX + name)
        return f"{root}/{sub}" if sub else root
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None if "://" in uri else uri


def filesystem(uri: str, extra: dict[str, Any] | None = None):
    """(fsspec filesystem, path) for ``uri``."""
    import fsspec

    path = local_path(uri)
    if path is not None:
        return fsspec.filesystem("file"), path
    try:
        return fsspec.core.url_to_fs(uri, **options(uri, extra))
    except (ImportError, ValueError, TypeError) as e:
        raise DataError(f"{uri}: cannot open ({type(e).__name__}: {e})") from None


def read_bytes(uri: str, extra: dict[str, Any] | None = None, *, what: str) -> bytes:
    """The bytes of one file; a missing or unreadable one is a DataError naming it and ``what``."""
    fs, path = filesystem(uri, extra)
    try:
        with fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{what}: {uri} does not exist") from None
    except Exception as e:  # permission, requester-pays refusals, network: the message names the file
        raise DataError(f"{what}: cannot read {uri} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None


def read_index(folder_uri: str, extra: dict[str, Any] | None = None, *, what: str) -> tuple[bytes, dict]:
    """An MDS folder's ``index.json``: its bytes (digested into manifests) and its content."""
    uri = join(folder_uri, INDEX)
    raw = read_bytes(uri, extra, what=what)
    try:
        index = json.loads(raw)
        shards = index["shards"]
        assert isinstance(shards, list)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise DataError(f"{what}: {uri} is not an MDS index (no list of shards)") from None
    return raw, index


def get_file(uri: str, local: str, extra: dict[str, Any] | None = None) -> None:
    """Copy one remote file to a local path (written beside it, then renamed: never half a file)."""
    fs, path = filesystem(uri, extra)
    tmp = f"{local}.part-{os.getpid()}"
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    try:
        fs.get_file(path, tmp)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

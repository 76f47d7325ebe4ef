"""Upload storage, addressed by generated keys only: a local (or mounted) folder, or an S3 bucket.

``store_for(settings)`` picks the backend from ``SER_STORAGE_URL``: unset, the folder
``settings.upload_dir`` (the embedded default); ``s3://bucket/prefix``, an S3-compatible store
(``SER_S3_ENDPOINT_URL`` for MinIO and the like; credentials from boto3's standard chain).

Both backends take an upload the same way: the request body is copied, hashed and counted into a
local ``.part`` file (the upload check decodes the file's header, and soundfile/ffmpeg want a
file), which ``receive`` then hands to the store: renamed into place on a folder, sent as a
multipart upload (8 MiB parts, read from the file) to S3. Nothing holds a whole file in memory.

Readers get a local file through ``local_copy``: the folder's own file, or a spool copy of the
object downloaded in parts into ``settings.resolved_data_dir / "spool"`` and deleted after use.
A spool rather than ranged reads because both decoders (soundfile for the long-recording two-pass
decode, ffmpeg for compressed formats) seek freely in a local file, and a spool costs one GET per
recording, bounded on disk by ``max_file_mb`` per recording in flight.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ser_shared.errors import EmptyFile, FileTooLarge

if TYPE_CHECKING:
    from ser_shared.settings import Settings

log = logging.getLogger(__name__)

CHUNK = 1 << 20
PART_SIZE = 8 << 20  # S3 multipart threshold and part size; parts are read from the spooled file


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int
    sha256: str
    head: bytes  # the first bytes, for format sniffing without re-reading the file


@dataclass(frozen=True)
class Entry:
    """A stored thing as the orphan sweep sees it: a key (or a ``.part`` leftover) and its age."""

    key: str
    modified: datetime
    partial: bool = False  # an unfinished write (a ``.part`` file, an incomplete multipart upload)


def new_key() -> str:
    """A fresh storage key; two levels of fan-out keep directories small with millions of files."""
    name = uuid.uuid4().hex
    return f"{name[:2]}/{name[2:4]}/{name}"


def path_for(root: Path, key: str) -> Path:
    """The file for ``key``; refuses anything that would resolve outside ``root``."""
    path = (root / key).resolve()
    if root.resolve() not in path.parents:
        raise ValueError(f"storage key escapes the storage root: {key!r}")
    return path


def copy_to_part(stream: IO[bytes], partial: Path, max_bytes: int) -> tuple[int, str, bytes]:
    """Copy ``stream`` into ``partial`` while hashing it; returns (size, sha256, head).

    Raises EmptyFile for zero bytes and FileTooLarge past ``max_bytes``; the part file is then removed.
    """
    partial.parent.mkdir(parents=True, exist_ok=True)
    digest, size, head = hashlib.sha256(), 0, b""
    try:
        with open(partial, "wb") as out:
            while chunk := stream.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FileTooLarge(f"file exceeds the {max_bytes // (1 << 20)} MiB limit per file")
                if len(head) < 64:
                    head += chunk[: 64 - len(head)]
                digest.update(chunk)
                out.write(chunk)
        if size == 0:
            raise EmptyFile("the file is empty")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return size, digest.hexdigest(), head


def save_stream(root: Path, stream: IO[bytes], max_bytes: int) -> StoredFile:
    """Copy ``stream`` into the folder ``root`` under a new key (see ``copy_to_part``)."""
    key = new_key()
    final = path_for(root, key)
    partial = final.with_name(final.name + ".part")
    size, sha, head = copy_to_part(stream, partial, max_bytes)
    os.replace(partial, final)
    return StoredFile(key=key, size=size, sha256=sha, head=head)


def delete(root: Path, key: str | None) -> bool:
    """Remove a stored file from the folder ``root``; True if something was removed."""
    if not key:
        return False
    try:
        path_for(root, key).unlink()
    except FileNotFoundError:
        return False
    return True


class Storage(Protocol):
    """What the web tier, the workers and the sweeps need of a store."""

    def receive(self, stream: IO[bytes], max_bytes: int) -> AbstractContextManager[tuple[StoredFile, Path]]:
        """(StoredFile, a local copy to check): stored on a clean exit, nothing kept on an error.
        Raises EmptyFile and FileTooLarge before anything is stored."""
        ...

    def local_copy(self, key: str) -> AbstractContextManager[Path]:
        """A local file holding ``key`` for the block (FileNotFoundError when absent)."""
        ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str | None) -> bool: ...

    def entries(self) -> Iterator[Entry]:
        """Everything stored, for the orphan sweep, including unfinished writes."""

    def remove_partial(self, entry: Entry) -> None: ...


class LocalStorage:
    """Files under one folder (shared by web and workers when they run on one host)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @contextmanager
    def receive(self, stream: IO[bytes], max_bytes: int) -> Iterator[tuple[StoredFile, Path]]:
        stored = save_stream(self.root, stream, max_bytes)
        try:
            yield stored, path_for(self.root, stored.key)
        except BaseException:
            self.delete(stored.key)
            raise

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        path = path_for(self.root, key)
        if not path.exists():
            raise FileNotFoundError(key)
        yield path

    def path(self, key: str) -> Path:
        return path_for(self.root, key)

    def exists(self, key: str) -> bool:
        return path_for(self.root, key).is_file()

    def size(self, key: str) -> int:
        return path_for(self.root, key).stat().st_size

    def delete(self, key: str | None) -> bool:
        return delete(self.root, key)

    def entries(self) -> Iterator[Entry]:
        if not self.root.is_dir():
            return
        for dirpath, _, names in os.walk(self.root):
            for name in names:
                path = Path(dirpath, name)
                try:
                    mtime = datetime.fromtimestamp(path.stat().st_mtime, UTC)
                except FileNotFoundError:
                    continue
                key = path.relative_to(self.root).as_posix()
                partial = name.endswith(".part")
                yield Entry(key.removesuffix(".part") if partial else key, mtime, partial)

    def remove_partial(self, entry: Entry) -> None:
        path_for(self.root, entry.key + ".part").unlink(missing_ok=True)


class S3Storage:
    """Objects under ``prefix`` in an S3 bucket (any S3-compatible store)."""

    def __init__(self, bucket: str, prefix: str, client: Any, spool: Path) -> None:
        self.bucket, self.prefix, self.client, self.spool = bucket, prefix.strip("/"), client, spool

    def name(self, key: str) -> str:
        if not key or ".." in key.split("/") or key.startswith("/"):
            raise ValueError(f"bad storage key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE, max_concurrency=4)

    @contextmanager
    def receive(self, stream: IO[bytes], max_bytes: int) -> Iterator[tuple[StoredFile, Path]]:
        key = new_key()
        partial = self.spool / f"{uuid.uuid4().hex}.part"
        size, sha, head = copy_to_part(stream, partial, max_bytes)
        try:
            stored = StoredFile(key=key, size=size, sha256=sha, head=head)
            yield stored, partial  # checked (decoded) here, before anything reaches the store
            self.client.upload_file(str(partial), self.bucket, self.name(key), Config=self._transfer())
        finally:
            partial.unlink(missing_ok=True)

    @contextmanager
    def local_copy(self, key: str) -> Iterator[Path]:
        from botocore.exceptions import ClientError

        self.spool.mkdir(parents=True, exist_ok=True)
        path = self.spool / f"{uuid.uuid4().hex}.get"
        try:
            try:
                self.client.download_file(self.bucket, self.name(key), str(path), Config=self._transfer())
            except ClientError as exc:
                if _missing(exc):
                    raise FileNotFoundError(key) from exc
                raise
            yield path
        finally:
            path.unlink(missing_ok=True)

    def _head(self, key: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self.name(key))  # type: ignore[no-any-return]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        head = self._head(key)
        if head is None:
            raise FileNotFoundError(key)
        return int(head["ContentLength"])

    def get_range(self, key: str, start: int, stop: int) -> Iterator[bytes]:
        """The bytes ``start`` to ``stop`` (exclusive) of ``key``, streamed in chunks."""
        body = self.client.get_object(Bucket=self.bucket, Key=self.name(key), Range=f"bytes={start}-{stop - 1}")["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def delete(self, key: str | None) -> bool:
        if not key or not self.exists(key):
            return False
        self.client.delete_object(Bucket=self.bucket, Key=self.name(key))
        return True

    def entries(self) -> Iterator[Entry]:
        lead = f"{self.prefix}/" if self.prefix else ""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=lead):
            for obj in page.get("Contents", []):
                yield Entry(obj["Key"][len(lead):], obj["LastModified"])
        # A web process killed inside a multipart upload leaves its parts, billed, in no object.
        for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=lead):
            for up in page.get("Uploads", []):
                yield Entry(f"{up['Key'][len(lead):]}\0{up['UploadId']}", up["Initiated"], partial=True)

    def remove_partial(self, entry: Entry) -> None:
        key, upload_id = entry.key.split("\0")
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=self.name(key), UploadId=upload_id)


def discard(store: Storage, key: str | None) -> None:
    """Delete ``key`` after its row is gone, never raising: should the store be out, the object is
    an orphan like a crash's, and the worker's orphan sweep removes it later."""
    try:
        store.delete(key)
    except Exception:
        log.warning("stored file not deleted, left to the orphan sweep key=%s", key, exc_info=True)


def _missing(exc: Exception) -> bool:
    code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
    return code in {"404", "NoSuchKey", "NotFound"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) from ``s3://bucket/prefix``; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ValueError(f"storage URL must be s3://bucket/prefix, not {url!r}")
    return parts.netloc, parts.path.strip("/")


_stores: dict[tuple[Any, ...], Storage] = {}
_lock = threading.Lock()


def store_for(settings: Settings) -> Storage:
    """The store ``settings`` name, built once per process (a boto3 client is not fork-safe)."""
    ident = (os.getpid(), settings.storage_url, settings.s3_endpoint_url, str(settings.upload_dir))
    with _lock:
        if ident not in _stores:
            _stores[ident] = _build(settings)
        return _stores[ident]


def _build(settings: Settings) -> Storage:
    if not settings.storage_url:
        return LocalStorage(settings.upload_dir)
    import boto3
    from botocore.config import Config

    bucket, prefix = parse_s3_url(settings.storage_url)
    client = boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url or None,
        config=Config(retries={"mode": "standard", "max_attempts": 5}, s3={"addressing_style": "path"}))
    return S3Storage(bucket, prefix, client, settings.resolved_data_dir / "spool")


def clear_spool(settings: Settings, older_than: datetime) -> int:
    """Remove spool files (uploads being checked, downloads being read) older than ``older_than``:
    what a killed process left in its own data folder. Returns how many."""
    removed = 0
    folder = settings.resolved_data_dir / "spool"
    for path in folder.glob("*") if folder.is_dir() else []:
        try:
            if datetime.fromtimestamp(path.stat().st_mtime, UTC) < older_than:
                path.unlink() if path.is_file() else shutil.rmtree(path)
                removed += 1
        except FileNotFoundError:
            continue
    return removed

"""Upload storage on a local (or shared, mounted) folder, addressed by generated keys only."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ser_shared.errors import EmptyFile, FileTooLarge

CHUNK = 1 << 20


@dataclass(frozen=True)
class StoredFile:
    key: str
    size: int
    sha256: str
    head: bytes  # the first bytes, for format sniffing without re-reading the file


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


def save_stream(root: Path, stream: IO[bytes], max_bytes: int) -> StoredFile:
    """Copy ``stream`` into storage while hashing it.

    Raises EmptyFile for zero bytes and FileTooLarge past ``max_bytes``; nothing is left behind then.
    """
    key = new_key()
    final = path_for(root, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(final.name + ".part")
    digest = hashlib.sha256()
    size = 0
    head = b""
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
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return StoredFile(key=key, size=size, sha256=digest.hexdigest(), head=head)


def delete(root: Path, key: str | None) -> bool:
    """Remove a stored file; True if something was removed."""
    if not key:
        return False
    path = path_for(root, key)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True

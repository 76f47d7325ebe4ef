"""The multipart body of an upload: files named by path, bytes or open file objects, streamed by httpx.

Each attempt of a request opens its files afresh (and rewinds the caller's file objects), so a
retried upload sends the same bytes again, under the same Idempotency-Key.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeAlias

# A path (sent under its base name), an open binary file, or (name, path | bytes | open binary file).
FileContent: TypeAlias = "bytes | IO[bytes] | str | os.PathLike[str]"
FileInput: TypeAlias = "str | os.PathLike[str] | IO[bytes] | tuple[str, FileContent]"
# Told the bytes sent so far in the current attempt and the total (None when not known up front).
ProgressCallback: TypeAlias = Callable[[int, "int | None"], None]
FormFields: TypeAlias = Mapping[str, "str | Sequence[str]"]
# The server sniffs the format from the bytes; a generic type keeps any guess from the name out of it.
CONTENT_TYPE = "application/octet-stream"


@dataclass(frozen=True)
class Source:
    """One file to send: its name for the server and where its bytes come from."""

    name: str
    path: Path | None = None
    data: bytes | None = None
    stream: IO[bytes] | None = None

    @property
    def size(self) -> int | None:
        if self.path is not None:
            return self.path.stat().st_size
        if self.data is not None:
            return len(self.data)
        return _stream_size(self.stream)

    @property
    def replayable(self) -> bool:
        """Whether a retry can send the same bytes again (a pipe cannot be rewound)."""
        return self.stream is None or _seekable(self.stream)


def _seekable(stream: IO[bytes] | None) -> bool:
    try:
        return stream is not None and stream.seekable()
    except (AttributeError, ValueError):
        return False


def _stream_size(stream: IO[bytes] | None) -> int | None:
    if stream is None or not _seekable(stream):
        return None
    # httpx rewinds a file before sending it, so the whole of it is sent, wherever it was read up to.
    here = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(here)
    return end


def source(item: FileInput) -> Source:
    """What ``item`` names; raises TypeError for anything that is not a file."""
    if isinstance(item, tuple):
        name, content = item
        if isinstance(content, bytes | bytearray):
            return Source(name, data=bytes(content))
        if isinstance(content, str | os.PathLike):
            return Source(name, path=Path(content))
        return Source(name, stream=_binary(content))
    if isinstance(item, str | os.PathLike):
        path = Path(item)
        return Source(path.name, path=path)
    if hasattr(item, "read"):
        return Source(Path(str(getattr(item, "name", "upload"))).name, stream=_binary(item))
    raise TypeError(f"not a file: {item!r} (give a path, an open binary file, or (name, bytes | path | file))")


def _binary(stream: Any) -> IO[bytes]:
    if isinstance(stream, io.TextIOBase):
        raise TypeError("open files in binary mode ('rb') to upload them")
    return stream  # type: ignore[no-any-return]


def _is_pair(files: object) -> bool:
    """A lone ``(name, content)`` given where a list of files belongs."""
    return (isinstance(files, tuple) and len(files) == 2 and isinstance(files[0], str)
            and (isinstance(files[1], bytes | bytearray) or hasattr(files[1], "read")))


class _Counted:
    """A binary file whose reads are counted (httpx reads uploads in 64 KiB blocks)."""

    def __init__(self, raw: IO[bytes], counter: _Counter) -> None:
        self.raw, self.counter = raw, counter

    def read(self, size: int = -1) -> bytes:
        block = self.raw.read(size)
        self.counter.add(len(block))
        return block

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def fileno(self) -> int:
        return self.raw.fileno()


class _Counter:
    def __init__(self, total: int | None, callback: ProgressCallback | None) -> None:
        self.total, self.callback, self.sent = total, callback, 0

    def add(self, n: int) -> None:
        if n and self.callback is not None:
            self.sent += n
            self.callback(self.sent, self.total)


class Upload:
    """The files and form fields of one ``POST /api/v1/jobs``."""

    def __init__(self, files: Sequence[FileInput], fields: FormFields,
                 on_progress: ProgressCallback | None = None) -> None:
        if isinstance(files, str | bytes | os.PathLike) or _is_pair(files):
            raise TypeError("files must be a list (of paths, open binary files or (name, content) pairs)")
        self.sources = [source(f) for f in files]
        if not self.sources:
            raise ValueError("files is empty: give at least one file to upload")
        self.fields = {k: (v if isinstance(v, str) else list(v)) for k, v in fields.items()}
        self.on_progress = on_progress

    @property
    def replayable(self) -> bool:
        return all(s.replayable for s in self.sources)

    @contextmanager
    def opened(self) -> Iterator[list[tuple[str, tuple[str, Any, str]]]]:
        """httpx's ``files=`` for one attempt; the files this opened are closed afterwards."""
        sizes = [s.size for s in self.sources]
        total = None if None in sizes else sum(s for s in sizes if s is not None)
        counter = _Counter(total, self.on_progress)
        if self.on_progress is not None:
            self.on_progress(0, total)  # a retry starts the count again
        with ExitStack() as stack:
            parts = []
            for s in self.sources:
                if s.path is not None:
                    raw: IO[bytes] = stack.enter_context(s.path.open("rb"))
                elif s.data is not None:
                    raw = io.BytesIO(s.data)
                else:
                    assert s.stream is not None
                    raw = s.stream
                parts.append(("file", (s.name, _Counted(raw, counter), CONTENT_TYPE)))
            yield parts

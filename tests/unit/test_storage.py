"""Upload storage: content integrity, generated keys only, no leftovers on refusal, no escapes."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import pytest

from ser_shared.errors import EmptyFile, FileTooLarge
from ser_shared.storage import CHUNK, delete, new_key, path_for, save_stream

KEY_RE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{32}")


class TrickleStream(io.RawIOBase):
    """A readable stream that hands out at most ``step`` bytes per read, like a slow socket.

    It exercises the copy loop's accumulation (head, size, hash) across many short reads.
    """

    def __init__(self, data: bytes, step: int) -> None:
        self._data = data
        self._pos = 0
        self._step = step

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        n = self._step if size < 0 else min(size, self._step)
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


class FailingStream(io.RawIOBase):
    """Gives some bytes, then fails like a client that disconnects mid-upload."""

    def __init__(self, first: bytes) -> None:
        self._first: bytes | None = first

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        raise ConnectionResetError("client went away")


def stored_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (finished or partial)."""
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_save_stream_stores_exact_bytes_with_hash_and_size(tmp_path: Path) -> None:
    # Larger than one CHUNK, so the copy loop runs several times.
    data = os.urandom(2 * CHUNK + 12345)
    stored = save_stream(tmp_path, io.BytesIO(data), max_bytes=10 * CHUNK)
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.head == data[:64]
    path = path_for(tmp_path, stored.key)
    assert path.read_bytes() == data
    assert stored_files(tmp_path) == [path]  # no .part left next to it


def test_head_and_hash_across_short_reads(tmp_path: Path) -> None:
    data = bytes(range(256)) * 4
    stored = save_stream(tmp_path, TrickleStream(data, step=10), max_bytes=len(data))
    assert stored.head == data[:64]
    assert stored.size == len(data)
    assert stored.sha256 == hashlib.sha256(data).hexdigest()
    assert path_for(tmp_path, stored.key).read_bytes() == data


def test_key_is_generated_never_from_the_client_name(tmp_path: Path) -> None:
    # A real file object carries its name; a hostile one must not reach the storage key or path.
    client = tmp_path / "client"
    client.mkdir()
    upload = client / "..%2F..%2Fetc passwd; rm -rf.wav"
    upload.write_bytes(b"RIFF....WAVE")
    root = tmp_path / "store"
    with open(upload, "rb") as f:
        stored = save_stream(root, f, max_bytes=1000)
    assert KEY_RE.fullmatch(stored.key), stored.key
    assert "passwd" not in stored.key and ".wav" not in stored.key
    assert all("passwd" not in p.name for p in stored_files(root))


def test_two_saves_get_distinct_keys(tmp_path: Path) -> None:
    a = save_stream(tmp_path, io.BytesIO(b"same bytes"), max_bytes=100)
    b = save_stream(tmp_path, io.BytesIO(b"same bytes"), max_bytes=100)
    assert a.key != b.key
    assert a.sha256 == b.sha256
    assert len(stored_files(tmp_path)) == 2


def test_new_key_shape_and_fanout() -> None:
    keys = {new_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert KEY_RE.fullmatch(key), key
        first, second, name = key.split("/")
        assert name.startswith(first + second)  # fan-out folders are the name's own prefix


def test_empty_stream_raises_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(EmptyFile) as exc:
        save_stream(tmp_path, io.BytesIO(b""), max_bytes=100)
    assert exc.value.code == "empty_file"
    assert stored_files(tmp_path) == []


def test_exactly_max_bytes_is_accepted(tmp_path: Path) -> None:
    stored = save_stream(tmp_path, io.BytesIO(b"x" * 100), max_bytes=100)
    assert stored.size == 100


@pytest.mark.parametrize("size", [101, 3 * CHUNK])
def test_too_large_raises_and_leaves_nothing(size: int, tmp_path: Path) -> None:
    with pytest.raises(FileTooLarge) as exc:
        save_stream(tmp_path, io.BytesIO(b"y" * size), max_bytes=100)
    assert exc.value.code == "file_too_large"
    assert stored_files(tmp_path) == []


def test_too_large_across_short_reads_leaves_nothing(tmp_path: Path) -> None:
    # The limit must trip mid-stream, after a partial file has been written.
    with pytest.raises(FileTooLarge):
        save_stream(tmp_path, TrickleStream(b"z" * 5000, step=7), max_bytes=1000)
    assert stored_files(tmp_path) == []


def test_stream_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConnectionResetError):
        save_stream(tmp_path, FailingStream(b"partial upload"), max_bytes=1000)
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize("key", [
    "../outside",
    "ab/../../outside",
    "ab/cd/../../../outside",
    "/etc/passwd",
    "",
    ".",
    "../store-sibling/file",  # shares the root's name as a prefix: a string check would pass it
])
def test_path_for_refuses_keys_escaping_the_root(key: str, tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with pytest.raises(ValueError):
        path_for(root, key)


def test_path_for_refuses_symlink_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "ab").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError):
        path_for(root, "ab/file")


def test_path_for_accepts_keys_inside_the_root(tmp_path: Path) -> None:
    key = new_key()
    assert path_for(tmp_path, key) == (tmp_path / key).resolve()
    # A ".." that stays inside is harmless and resolves normally.
    assert path_for(tmp_path, "ab/../cd/file") == (tmp_path / "cd" / "file").resolve()


def test_delete_true_then_false(tmp_path: Path) -> None:
    stored = save_stream(tmp_path, io.BytesIO(b"to be removed"), max_bytes=100)
    assert delete(tmp_path, stored.key) is True
    assert not path_for(tmp_path, stored.key).exists()
    assert delete(tmp_path, stored.key) is False


@pytest.mark.parametrize("key", [None, ""])
def test_delete_without_key_is_false(key: str | None, tmp_path: Path) -> None:
    assert delete(tmp_path, key) is False


def test_delete_refuses_escaping_key(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    with pytest.raises(ValueError):
        delete(root, "../victim")
    assert victim.read_bytes() == b"keep me"


# --- the Storage backends' choice and the folder backend's protocol ----------------------------


def test_store_for_picks_the_folder_unless_an_s3_url_is_set(tmp_path: Path) -> None:
    from ser_shared.settings import Settings
    from ser_shared.storage import LocalStorage, S3Storage, store_for

    folder = store_for(Settings(data_dir=tmp_path, storage_dir=tmp_path / "up"))
    assert isinstance(folder, LocalStorage) and folder.root == (tmp_path / "up").resolve()
    s3 = store_for(Settings(data_dir=tmp_path, storage_url="s3://bucket/some/prefix/",
                            s3_endpoint_url="http://127.0.0.1:9"))
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.name("ab/cd/ef") == "some/prefix/ab/cd/ef"
    with pytest.raises(ValueError):
        s3.name("../escape")


@pytest.mark.parametrize("url", ["s3://", "http://bucket/x", "bucket/prefix", "file:///data"])
def test_a_storage_url_that_is_not_s3_is_refused_at_start(url: str) -> None:
    from pydantic import ValidationError

    from ser_shared.settings import Settings

    with pytest.raises(ValidationError, match="SER_STORAGE_URL"):
        Settings(storage_url=url)


def test_folder_receive_keeps_on_success_and_removes_on_error(tmp_path: Path) -> None:
    from ser_shared.storage import LocalStorage

    store = LocalStorage(tmp_path)
    with store.receive(io.BytesIO(b"abc"), 10) as (kept, local):
        assert local.read_bytes() == b"abc"
    assert store.exists(kept.key) and store.size(kept.key) == 3
    with pytest.raises(RuntimeError), store.receive(io.BytesIO(b"xyz"), 10) as (refused, _):
        raise RuntimeError("the header check refused it")
    assert not store.exists(refused.key)
    part = path_for(tmp_path, new_key() + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"half")
    entries = {(e.key, e.partial) for e in store.entries()}
    assert entries == {(kept.key, False), (part.relative_to(tmp_path).as_posix().removesuffix(".part"), True)}

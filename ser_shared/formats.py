"""The audio formats the service takes: one list, which every place that names them reads.

The upload check sniffs the content (``ser_shared.audio.sniff_format``) and decodes by the
``decoder`` named here; the audio endpoint serves ``mime`` and keeps ``extensions``; the upload page
and ``ser evaluate`` pick files by ``extensions``; the error message, the upload page, the OpenAPI
document and the README name ``label``. The client, a distribution without this package, keeps its
own copy of ``EXTENSIONS`` (``ser_client.cli.AUDIO_EXTENSIONS``), which a test holds equal to this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class AudioFormat:
    name: str  # the sniffed format, as stored in a job's ``format``
    label: str  # what people call it
    mime: str
    extensions: tuple[str, ...]  # what its files are named, the usual one first
    decoder: Literal["soundfile", "ffmpeg"]  # libsndfile in process, or an ffmpeg subprocess


FORMATS = (
    AudioFormat("wav", "WAV", "audio/wav", (".wav", ".wave"), "soundfile"),
    AudioFormat("flac", "FLAC", "audio/flac", (".flac",), "soundfile"),
    AudioFormat("ogg", "OGG/Vorbis/Opus", "audio/ogg", (".ogg", ".oga", ".opus"), "soundfile"),
    AudioFormat("mp3", "MP3", "audio/mpeg", (".mp3",), "soundfile"),
    AudioFormat("aiff", "AIFF", "audio/aiff", (".aif", ".aiff", ".aifc"), "soundfile"),
    AudioFormat("m4a", "M4A", "audio/mp4", (".m4a", ".mp4"), "ffmpeg"),
    AudioFormat("aac", "AAC", "audio/aac", (".aac",), "ffmpeg"),
    AudioFormat("webm", "WebM", "audio/webm", (".webm",), "ffmpeg"),
)
BY_NAME = {f.name: f for f in FORMATS}
# Every file name ending the service takes, in FORMATS' order.
EXTENSIONS = tuple(ext for f in FORMATS for ext in f.extensions)
# "WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, M4A, AAC, WebM": for messages and pages.
LABELS = ", ".join(f.label for f in FORMATS)


def decoded_by(decoder: str) -> frozenset[str]:
    """The names of the formats ``decoder`` ("soundfile" or "ffmpeg") reads."""
    return frozenset(f.name for f in FORMATS if f.decoder == decoder)

"""What an audio file's header claims, checked against the data it describes.

libsndfile believes a header: a WAV that says 7 bits per sample over 16-bit data decodes as noise
at twice the length, and a FLAC or MP3 whose header declares 1 s stops after 1 s however much
follows. These checks read the container directly (a few kilobytes, or the MP3 frame headers),
so the web tier can run them at upload and the worker before it decodes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ser_shared.errors import InvalidAudioHeader

WAVE_PCM, WAVE_FLOAT, WAVE_ALAW, WAVE_MULAW, WAVE_EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
# The original WAVE spec stores 12- and 20-bit PCM in 16- and 24-bit containers, and some
# recorders wrote them; any other width (7, 15, 33 bits) is a header no real writer produced.
PCM_BITS = {8, 12, 16, 20, 24, 32}
CONTAINER_BITS = {8, 16, 24, 32}  # WAVE_FORMAT_EXTENSIBLE: the valid bits are a separate field
FLOAT_BITS = {32, 64}
UNKNOWN_SIZE = 0xFFFFFFFF  # a WAV written to a pipe (or RF64, whose real size is in ds64)
MAX_CHUNKS = 256


@dataclass(frozen=True)
class WavFormat:
    tag: int
    channels: int
    rate: int
    byte_rate: int
    align: int
    bits: int
    valid_bits: int = 0  # WAVE_FORMAT_EXTENSIBLE only


# --- WAV: fields that contradict each other ----------------------------------------------------


def check_wav(path: Path) -> None:
    """Raise InvalidAudioHeader when a WAV's format fields contradict each other or its data.

    Headers this cannot parse, formats other than PCM/float/A-law/µ-law and zero rates or
    channels are left to libsndfile and ``check_params``, which already name those problems.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        if f.read(12)[8:12] != b"WAVE":
            return
        pos, fmt = 12, None
        for _ in range(MAX_CHUNKS):
            f.seek(pos)
            head = f.read(8)
            if len(head) < 8:
                return
            chunk, length = head[:4], struct.unpack("<I", head[4:])[0]
            if chunk == b"fmt ":
                fmt = _parse_fmt(f.read(min(length, 40)))
            elif chunk == b"data":
                if fmt is not None:
                    _check_fmt(fmt)
                    _check_data(f, fmt, pos + 8, length, size)
                return
            pos += 8 + length + (length & 1)


def _parse_fmt(body: bytes) -> WavFormat | None:
    if len(body) < 16:
        return None
    tag, channels, rate, byte_rate, align, bits = struct.unpack("<HHIIHH", body[:16])
    if tag == WAVE_EXTENSIBLE:
        if len(body) < 26:
            return None
        # cbSize, wValidBitsPerSample, channel mask, then the sub-format GUID, whose first two
        # bytes are the plain format tag.
        valid_bits, sub = struct.unpack("<H", body[18:20])[0], struct.unpack("<H", body[24:26])[0]
        return WavFormat(sub, channels, rate, byte_rate, align, bits, valid_bits or bits)
    return WavFormat(tag, channels, rate, byte_rate, align, bits)


def _allowed_bits(fmt: WavFormat) -> set[int] | None:
    if fmt.tag == WAVE_PCM:
        return CONTAINER_BITS if fmt.valid_bits else PCM_BITS
    if fmt.tag == WAVE_FLOAT:
        return FLOAT_BITS
    if fmt.tag in (WAVE_ALAW, WAVE_MULAW):
        return {8}
    return None  # ADPCM, GSM and the like: their block sizes follow other rules


def _check_fmt(fmt: WavFormat) -> None:
    allowed = _allowed_bits(fmt)
    if allowed is None or fmt.channels == 0 or fmt.rate == 0:
        return
    if fmt.bits not in allowed:
        raise InvalidAudioHeader(f"the header declares {fmt.bits} bits per sample, which no recorder writes "
                                 f"for this format ({', '.join(map(str, sorted(allowed)))} are valid)")
    if fmt.valid_bits > fmt.bits:
        raise InvalidAudioHeader(f"the header declares {fmt.valid_bits} valid bits in {fmt.bits}-bit samples")
    align = fmt.channels * ((fmt.bits + 7) // 8)
    if fmt.align != align:
        raise InvalidAudioHeader(f"the header's block size is {fmt.align} bytes, but {fmt.channels} channel(s) "
                                 f"of {fmt.bits}-bit samples take {align}")
    if fmt.byte_rate != (fmt.rate * align) & 0xFFFFFFFF:
        raise InvalidAudioHeader(f"the header's byte rate is {fmt.byte_rate}, but {fmt.rate} Hz × {align} bytes "
                                 f"per frame is {fmt.rate * align}")


def _check_data(f: BinaryIO, fmt: WavFormat, start: int, length: int, size: int) -> None:
    """A data chunk that fits in the file must hold whole frames and account for what follows it.

    One that runs past the end (a streamed WAV, an interrupted copy) is read for what is there,
    as libsndfile does. One followed by more than a second of bytes that are no RIFF chunk
    understates the recording: libsndfile would analyse the declared part alone.
    """
    if _allowed_bits(fmt) is None or fmt.align == 0 or length == UNKNOWN_SIZE or start + length > size:
        return
    if length % fmt.align:
        raise InvalidAudioHeader(f"the data chunk holds {length} bytes, not a whole number of "
                                 f"{fmt.align}-byte frames: the header does not describe the data")
    unlabelled = _unlabelled_tail(f, start + length, size)
    if fmt.byte_rate and unlabelled > fmt.byte_rate:
        raise InvalidAudioHeader(f"the data chunk declares {length / fmt.byte_rate:.1f} s of audio, but "
                                 f"{unlabelled / fmt.byte_rate:.1f} s more of unlabelled data follow it: "
                                 "the header understates the recording")


def _unlabelled_tail(f: BinaryIO, pos: int, size: int) -> int:
    """Bytes after the data chunk that are not a sequence of RIFF chunks (LIST, id3, cue…)."""
    for _ in range(MAX_CHUNKS):
        if pos + 8 > size:
            return 0
        # Chunks start on even offsets, but some writers forget the pad byte after an odd chunk.
        for at in (pos + (pos & 1), pos):
            f.seek(at)
            head = f.read(8)
            if len(head) < 8:
                continue
            length = struct.unpack("<I", head[4:])[0]
            if all(0x20 <= b <= 0x7E for b in head[:4]) and at + 8 + length <= size:
                pos = at + 8 + length
                break
        else:
            return size - pos
    return 0


# --- FLAC: STREAMINFO's total against the last frame ---------------------------------------------


@dataclass(frozen=True)
class StreamLength:
    """The samples a stream really holds, at its sample rate."""

    rate: int
    held: int

    @property
    def seconds(self) -> float:
        return self.held / self.rate


FLAC_TAIL = 256 * 1024


def _crc8_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07 if crc & 0x80 else crc << 1) & 0xFF
        table.append(crc)
    return table


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005 if crc & 0x8000 else crc << 1) & 0xFFFF
        table.append(crc)
    return table


CRC8, CRC16 = _crc8_table(), _crc16_table()


def _crc8(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = CRC8[crc ^ byte]
    return crc


def _crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ CRC16[(crc >> 8) ^ byte]
    return crc


def flac_length(path: Path) -> StreamLength | None:
    """Where the last frame ends: its header's frame or sample number plus its block size, the
    frame confirmed by a CRC-16 running to the end of the file. None when that cannot be read (a
    cut-off or damaged file, trailing junk): the decoder's own checks decide then."""
    with open(path, "rb") as f:
        head = f.read(42)
        if len(head) < 42 or head[:4] != b"fLaC" or head[4] & 0x7F != 0:
            return None
        block = struct.unpack(">H", head[10:12])[0]
        packed = int.from_bytes(head[18:26], "big")
        rate, channels = packed >> 44, ((packed >> 41) & 7) + 1
        size = f.seek(0, 2)
        f.seek(max(0, size - FLAC_TAIL))
        tail = f.read()
    if rate == 0:
        return None
    end = len(tail) - 128 if tail[-128:-125] == b"TAG" else len(tail)  # an ID3v1 tag after the frames
    held = _last_frame_end(tail[:end], channels, block)
    return None if held is None else StreamLength(rate, held)


def _last_frame_end(data: bytes, channels: int, block: int) -> int | None:
    i = len(data) - 2
    while (i := data.rfind(b"\xff", 0, i)) >= 0:
        frame = _flac_frame(data, i, channels, block)
        if frame is not None and _crc16(data[i:-2]) == int.from_bytes(data[-2:], "big"):
            return frame
    return None


def _flac_frame(data: bytes, i: int, channels: int, block: int) -> int | None:
    """The sample just past the frame whose header starts at ``i``, or None if none does."""
    if i + 6 > len(data) or data[i + 1] not in (0xF8, 0xF9):
        return None
    size_code, rate_code = data[i + 2] >> 4, data[i + 2] & 0xF
    assignment, depth = data[i + 3] >> 4, (data[i + 3] >> 1) & 7
    if size_code == 0 or rate_code == 15 or assignment > 10 or depth == 3 or data[i + 3] & 1:
        return None
    if (assignment + 1 if assignment < 8 else 2) != channels:
        return None
    number, j = _utf8_number(data, i + 4)
    if number is None:
        return None
    size, j = _block_size(data, j, size_code)
    j += {12: 1, 13: 2, 14: 2}.get(rate_code, 0)
    if j >= len(data) or _crc8(data[i:j]) != data[j]:
        return None
    first = number if data[i + 1] & 1 else number * block  # variable: sample number; fixed: frame number
    return first + size


def _utf8_number(data: bytes, j: int) -> tuple[int | None, int]:
    lead = data[j]
    extra = next((n for n in range(7) if lead & (0x80 >> n) == 0), 7)
    if extra == 1 or extra == 7 or j + max(extra, 1) > len(data):
        return None, j
    if extra == 0:
        return lead, j + 1
    value = lead & (0x3F >> (extra - 1))
    for k in range(1, extra):
        byte = data[j + k]
        if byte & 0xC0 != 0x80:
            return None, j
        value = (value << 6) | (byte & 0x3F)
    return value, j + extra


def _block_size(data: bytes, j: int, code: int) -> tuple[int, int]:
    if code == 1:
        return 192, j
    if code <= 5:
        return 576 << (code - 2), j
    if code == 6:
        return data[j] + 1, j + 1
    if code == 7:
        return int.from_bytes(data[j : j + 2], "big") + 1, j + 2
    return 256 << (code - 8), j


# --- MP3: the frames that are there --------------------------------------------------------------

# kbit/s by (MPEG-1?, layer) and the bitrate index; MPEG-2 and 2.5 share one table for layers II and III.
_BITRATES = {
    (True, 1): (0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}
MP3_RESYNC = 64 * 1024  # junk between frames skipped while looking for the next one


def _mp3_frame(h: bytes) -> tuple[int, int, int] | None:
    """(length in bytes, samples, rate) of the MPEG audio frame whose header is ``h``, or None."""
    if len(h) < 4 or h[0] != 0xFF or h[1] & 0xE0 != 0xE0:
        return None
    version, layer = (h[1] >> 3) & 3, 4 - ((h[1] >> 1) & 3)
    index, rate_index, pad = h[2] >> 4, (h[2] >> 2) & 3, (h[2] >> 1) & 1
    if version == 1 or layer == 4 or index in (0, 15) or rate_index == 3:
        return None  # reserved values; free-format streams are not counted
    mpeg1 = version == 3
    bitrate = _BITRATES[(mpeg1, layer if mpeg1 or layer == 1 else 2)][index] * 1000
    rate = _RATES[version][rate_index]
    if layer == 1:
        return (12 * bitrate // rate + pad) * 4, 384, rate
    if layer == 2 or mpeg1:
        return 144 * bitrate // rate + pad, 1152, rate
    return 72 * bitrate // rate + pad, 576, rate


def mp3_length(path: Path, stop_after_s: float | None = None) -> StreamLength | None:
    """Count the MPEG audio frames really in the file, whatever a Xing/Info or VBRI header says,
    stopping once ``stop_after_s`` seconds are counted. None when no frame is found."""
    size = path.stat().st_size
    if size < 8:
        return None
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        start = _mp3_sync(m, _after_id3v2(m[:10]), size)
        first = None if start is None else _mp3_frame(m[start : start + 4])
        if start is None or first is None:
            return None
        pos, rate = start, first[2]
        held, stop = 0, None if stop_after_s is None else stop_after_s * rate
        while pos + 4 <= size and (stop is None or held <= stop):
            frame = _mp3_frame(m[pos : pos + 4])
            if frame is None or frame[2] != rate or pos + frame[0] > size:
                found = _mp3_sync(m, pos + 1, min(size, pos + MP3_RESYNC))
                if found is None:
                    break
                pos = found
                continue
            held += frame[1]
            pos += frame[0]
    return StreamLength(rate, held)


def _after_id3v2(head: bytes) -> int:
    if len(head) < 10 or head[:3] != b"ID3":
        return 0
    size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
    return 10 + size + (10 if head[5] & 0x10 else 0)


def _mp3_sync(m: mmap.mmap, pos: int, end: int) -> int | None:
    """The first offset from ``pos`` (before ``end``) where two consecutive frame headers agree."""
    while (pos := m.find(b"\xff", pos, end)) >= 0:
        frame = _mp3_frame(m[pos : pos + 4])
        if frame is not None:
            after = _mp3_frame(m[pos + frame[0] : pos + frame[0] + 4])
            if (after is not None and after[2] == frame[2]) or pos + frame[0] == len(m):
                return pos
        pos += 1
    return None

"""Domain errors with stable codes. The web tier maps them to HTTP in one place."""

from __future__ import annotations


class SERError(Exception):
    """Base error: ``code`` is stable and machine-readable, the message is for people."""

    code = "internal_error"
    http_status = 500

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(SERError):
    code = "invalid_request"
    http_status = 400


class NotFound(SERError):
    code = "not_found"
    http_status = 404


class Gone(SERError):
    code = "gone"
    http_status = 410


class Conflict(SERError):
    code = "conflict"
    http_status = 409


class Unauthorized(SERError):
    code = "unauthorized"
    http_status = 401


class Forbidden(SERError):
    code = "forbidden"
    http_status = 403


class TooManyRequests(SERError):
    """Over a rate limit or a cap; ``retry_after`` (seconds) becomes the Retry-After header."""

    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = max(1, int(retry_after))


class ServiceUnavailable(SERError):
    code = "service_unavailable"
    http_status = 503


class AudioError(SERError):
    """A recording that cannot be analysed. Always ends its job as ``failed``, never retried."""

    code = "audio_error"
    http_status = 422


class EmptyFile(AudioError):
    code = "empty_file"


class UnsupportedFormat(AudioError):
    code = "unsupported_format"


class FileTooLarge(AudioError):
    code = "file_too_large"
    http_status = 413


class AudioTooLong(AudioError):
    code = "audio_too_long"


class AudioTooShort(AudioError):
    code = "audio_too_short"


class DecodeFailed(AudioError):
    code = "decode_failed"


class SilentAudio(AudioError):
    code = "silent_audio"


class NoSpeech(AudioError):
    """Sound, but no speech in it (noise, tones, music, DTMF, hum, clicks): there is no emotion to
    give, and analysing it again would not find one."""

    code = "no_speech"


class IncompleteAudio(AudioError):
    """Well under half of the length the header declares decodes: the file is cut short or damaged."""

    code = "incomplete_audio"


class InvalidAudioHeader(AudioError):
    """A header whose format fields contradict each other or the data (7 bits per sample, a block
    size that is not channels × sample size, a data chunk that hides most of the file): decoding
    by it would turn the recording into noise of the wrong length."""

    code = "invalid_audio_header"


class UnsupportedSampleRate(AudioError):
    """A header rate no microphone produces (a hostile or broken file): decoding it would be noise."""

    code = "unsupported_sample_rate"


class TooManyChannels(AudioError):
    code = "too_many_channels"


class InvalidSamples(AudioError):
    """Floating-point audio made largely of NaN or infinity: a broken export, not a recording."""

    code = "invalid_samples"

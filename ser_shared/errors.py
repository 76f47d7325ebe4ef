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


class Conflict(SERError):
    code = "conflict"
    http_status = 409


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

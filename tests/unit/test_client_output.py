"""The client's readable job description (``ser status``): what a transcript line says."""

from __future__ import annotations

from typing import Any

from ser_client._output import describe_job


def _job(transcript: dict[str, Any]) -> dict[str, Any]:
    return {"id": "j1", "filename": "call.wav", "status": "succeeded", "created_at": "2026-11-30T10:00:00Z",
            "finished_at": "2026-11-30T10:00:01Z", "result": {"transcript": transcript}}


def test_a_detected_language_is_named_with_how_sure_whisper_was() -> None:
    text = describe_job(_job({"status": "succeeded", "engine": "whisper", "language": "und", "text": "namaste",
                              "detected_language": "hi", "detected_language_probability": 0.31}))
    assert "transcript  succeeded (whisper, detected hi 31% sure): namaste" in text.splitlines()


def test_a_given_language_is_not_called_detected() -> None:
    text = describe_job(_job({"status": "succeeded", "engine": "whisper", "language": "en-US", "text": "hello"}))
    assert "transcript  succeeded (whisper): hello" in text.splitlines()

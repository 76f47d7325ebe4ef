"""A stereo call uploaded through the real API and analysed by a real worker (Postgres, Redis):
the worker splits it into its speakers and stores the channels and the conversation."""

from __future__ import annotations

import uuid
from pathlib import Path

from bench.calls import SCRIPT, build_call, write
from ser_shared import schemas
from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Job, Result
from ser_shared.settings import Settings
from tests.conftest import RAVDESS, WorkerProcess, wait_for
from tests.helpers import multipart


def test_an_uploaded_call_is_stored_speaker_by_speaker(client, pg_worker: WorkerProcess,  # type: ignore[no-untyped-def]
                                                       pg_settings: Settings, tmp_path: Path) -> None:
    call = write(build_call(RAVDESS, SCRIPT).audio, tmp_path / "call.wav")
    resp = client.post("/api/v1/jobs", data=multipart([("call.wav", call.read_bytes())]),
                       content_type="multipart/form-data")
    assert resp.status_code == 202, resp.get_json()
    url = resp.get_json()["jobs"][0]["url"]
    job = wait_for(lambda: (j := client.get(url).get_json())["status"] in ("succeeded", "failed") and j, timeout=120)
    assert job["status"] == "succeeded", job
    with make_session_factory(make_engine(pg_settings))() as session:
        stored, result = session.get(Job, uuid.UUID(job["id"])), session.get(Result, uuid.UUID(job["id"]))
        assert stored is not None and result is not None and stored.channels == 2  # from the upload's probe
        assert result.channels is not None and result.conversation is not None
        entries = [schemas.Channel.build(entry) for entry in result.channels]  # strict: the served shapes
        conversation = schemas.Conversation.build(result.conversation)
        assert [(e.index, e.label, e.emotion) for e in entries] == [(0, "ch0", "neutral"), (1, "ch1", "angry")]
        assert conversation.channels == "split" and conversation.customer == 1
        assert stored.escalation is conversation.escalation is False
        assert len(result.segments or []) == sum(len(e.segments or []) for e in entries)

"""The SDK and ``ser submit|status|history`` with conversations: the channel options reach the server,
the typed results carry each speaker, and the escalation filter works from Python and the shell.

The server runs on a database of its own whose queue no worker reads; the calls' results are stored
as the worker stores them (``tests.conversations``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from ser_client import AsyncClient, Client

from ser_shared.settings import Settings
from tests.conftest import private_database, ravdess_file
from tests.conversations import call, finish
from tests.live_server import serve
from tests.system.test_cli_client import ser
from tests.system.test_sdk import run_async
from web import create_app

QUEUE = "conversation-client-unread"


@pytest.fixture(scope="module")
def calls(pg_settings: Settings) -> Iterator[dict[str, Any]]:
    """A served database holding an escalated and a calm call (and the app, to store more)."""
    with private_database(pg_settings, default_queue=QUEUE) as settings:
        app = create_app(settings)
        with serve(app) as url, Client(url) as client:
            ids = []
            for escalation in (True, False):
                upload = client.jobs.create([ravdess_file(3, "01")], channels="split",
                                            channel_labels=["agent", "customer"], client_reference="calls")
                job_id = upload.jobs[0].id
                channels, conversation, segments = call(escalation=escalation)
                finish(app.extensions["ser"].sessions, uuid.UUID(job_id), channels, conversation, segments)
                ids.append(job_id)
            try:
                yield {"url": url, "escalated": ids[0], "calm": ids[1]}
            finally:
                app.extensions["ser"].engine.dispose()
                redis.Redis.from_url(settings.broker_url or "").delete(QUEUE)


def test_sdk_sends_the_channel_options(calls: dict[str, Any]) -> None:
    with Client(calls["url"]) as client:
        upload = client.jobs.create([ravdess_file(3, "02")], channels="mix", channel_labels="left, right")
        assert client.jobs.get(upload.jobs[0].id).options == {"device": "auto", "channels": "mix",
                                                              "channel_labels": ["left", "right"]}
        assert client.batches.get(calls_batch(client, calls["escalated"])).options["channel_labels"] == [
            "agent", "customer"]


def calls_batch(client: Client, job_id: str) -> str:
    batch_id = client.jobs.get(job_id).batch_id
    assert batch_id is not None
    return batch_id


def test_async_sdk_sends_them_too(calls: dict[str, Any]) -> None:
    async def upload() -> dict[str, Any]:
        async with AsyncClient(calls["url"]) as client:
            accepted = await client.jobs.create([ravdess_file(3, "03")], channels="split",
                                                channel_labels=("caller", "callee"))
            return (await client.jobs.get(accepted.jobs[0].id)).options

    assert run_async(upload()) == {"device": "auto", "channels": "split", "channel_labels": ["caller", "callee"]}


def test_typed_results_carry_each_speaker_and_the_filter_selects(calls: dict[str, Any]) -> None:
    expected, conversation, _ = call(escalation=True)
    with Client(calls["url"]) as client:
        job = client.jobs.get(calls["escalated"])
        assert job.result is not None and job.result.channels is not None and job.result.conversation is not None
        customer = job.result.channels[1]
        assert (customer.label, customer.emotion, customer.metrics.talk_share) == (
            "customer", expected[1]["emotion"], expected[1]["metrics"]["talk_share"])
        assert customer.segments is not None and customer.segments[1].words is not None
        assert customer.segments[1].words[0].word == expected[1]["segments"][1]["words"][0]["word"]
        assert customer.metrics.escalations[0].emotion == "angry"
        assert job.result.conversation.escalation is True and job.result.conversation.customer == 1
        assert job.result.conversation.transcript is not None
        assert [line.text for line in job.result.conversation.transcript] == [
            line["text"] for line in conversation["transcript"]]
        assert [j.id for j in client.jobs.list(escalation=True)] == [calls["escalated"]]
        assert [j.id for j in client.jobs.list(escalation=False)] == [calls["calm"]]
        listed = next(iter(client.jobs.list(escalation=True)))
        assert listed.result is not None and listed.result.channels is not None
        assert listed.result.channels[0].segments is None  # lists leave segments out unless asked


def test_submit_with_channel_options_and_history_by_escalation(calls: dict[str, Any], tmp_path: Path) -> None:
    recording = tmp_path / "call.flac"
    recording.write_bytes(ravdess_file(4, "01").read_bytes())
    done = ser("submit", str(recording), "--channels", "split", "--channel-labels", "agent,customer",
               "--output", "out.json", url=calls["url"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (row,) = json.loads((tmp_path / "out.json").read_text())
    with Client(calls["url"]) as client:
        assert client.jobs.get(row["job_id"]).options["channel_labels"] == ["agent", "customer"]
    refused = ser("submit", str(recording), "--channel-labels", "agent,agent", url=calls["url"], cwd=tmp_path)
    assert refused.returncode == 3 and "invalid_option" in refused.stderr, refused.stderr

    listed = ser("history", "--escalation", "true", "--json", url=calls["url"], cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert [j["id"] for j in json.loads(listed.stdout)] == [calls["escalated"]]

    status = ser("status", calls["escalated"], url=calls["url"], cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "speaker     customer (channel 1): angry 0.81" in status.stdout
    assert "escalation  yes" in status.stdout and "customer: this is the third time I call about it" in status.stdout

"""Live sessions: a batch created with ``live=true`` that later uploads (``batch_id``) add to.

The upload page's live microphone sends a chunk every few seconds this way; these tests hold the
API's side of it against the real Postgres: positions continue, the count grows, only live batches
grow, and another tenant's session is a 404.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

from sqlalchemy import select

from ser_shared.db import make_engine, make_session_factory
from ser_shared.models import Batch, Job
from ser_shared.settings import Settings
from tests.conftest import ravdess_file
from tests.helpers import read
from tests.integration.test_api import _assert_error, _post
from web import create_app


def test_chunks_join_the_live_session_in_order(client, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    first = _post(client, [read(ravdess_file(1, "01"))], live="true", device="cpu")
    assert first.status_code == 202, first.get_data(as_text=True)
    batch_id = first.get_json()["batch_id"]
    # Later chunks carry the session's id; their own options are not the session's and are ignored.
    more = _post(client, [read(ravdess_file(2, "05")), read(ravdess_file(3, "03"))], batch_id=batch_id,
                 device="gpu")
    assert more.status_code == 202, more.get_data(as_text=True)
    assert more.get_json()["batch_id"] == batch_id
    last = _post(client, [read(ravdess_file(4, "04"))], batch_id=batch_id)
    assert last.get_json()["batch_id"] == batch_id

    body = client.get(f"/api/v1/batches/{batch_id}").get_json()
    assert body["file_count"] == 4 and len(body["jobs"]) == 4
    assert body["options"] == {"device": "cpu", "live": True}
    assert all(j["options"] == {"device": "cpu", "live": True} for j in body["jobs"])
    sessions = make_session_factory(make_engine(pg_settings))
    with sessions() as session:
        positions = session.scalars(select(Job.position).where(Job.batch_id == uuid.UUID(batch_id))
                                    .order_by(Job.position)).all()
    assert positions == [0, 1, 2, 3]


def test_chunks_sent_at_once_get_different_positions(pg_settings: Settings) -> None:
    app = create_app(pg_settings)
    batch_id = _post(app.test_client(), [read(ravdess_file(5, "01"))], live="true").get_json()["batch_id"]

    def send(i: int) -> int:
        return _post(app.test_client(), [read(ravdess_file(6 + i % 4, "01"))], batch_id=batch_id).status_code

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(send, range(8))) == {202}
    sessions = make_session_factory(make_engine(pg_settings))
    with sessions() as session:
        batch = session.get(Batch, uuid.UUID(batch_id))
        assert batch is not None and batch.file_count == 9
        positions = sorted(j.position for j in batch.jobs)
    assert positions == list(range(9))


def test_only_a_live_session_takes_more_files(client) -> None:  # type: ignore[no-untyped-def]
    ordinary = _post(client, [read(ravdess_file(1, "01"))]).get_json()["batch_id"]
    _assert_error(_post(client, [read(ravdess_file(1, "03"))], batch_id=ordinary), 409, "batch_not_live")
    _assert_error(_post(client, [read(ravdess_file(1, "03"))], batch_id=str(uuid.uuid4())), 404, "not_found")
    _assert_error(_post(client, [read(ravdess_file(1, "03"))], batch_id="not-a-uuid"), 400, "invalid_parameter")
    _assert_error(_post(client, [read(ravdess_file(1, "03"))], live="maybe"), 400, "invalid_option")
    _assert_error(_post(client, [read(ravdess_file(1, "03"))], live="true", webhook_url="https://example.com/hook"),
           400, "invalid_option")
    # The refused requests added nothing to the ordinary batch.
    assert client.get(f"/api/v1/batches/{ordinary}").get_json()["file_count"] == 1


def test_another_tenants_session_is_not_found(auth_server, pg_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    import requests

    from ser_shared import apikeys

    url, key = auth_server
    engine = make_engine(pg_settings)
    with make_session_factory(engine)() as session:
        other = apikeys.create(session, "someone else").key
        session.commit()
    engine.dispose()
    name, data = read(ravdess_file(1, "01"))
    mine = requests.post(f"{url}/api/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                         files={"file": (name, data)}, data={"live": "true"}, timeout=30)
    assert mine.status_code == 202, mine.text
    theirs = requests.post(f"{url}/api/v1/jobs", headers={"Authorization": f"Bearer {other}"},
                           files={"file": (name, data)}, data={"batch_id": mine.json()["batch_id"]}, timeout=30)
    assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "not_found"

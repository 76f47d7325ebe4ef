"""``Client`` and ``AsyncClient``: the JSON API of a SER server as typed calls.

    from ser_client import Client

    with Client("http://ser.internal:8000", api_key="ser_...") as ser:
        upload = ser.jobs.create(["a.wav", "b.flac"], transcribe="whisper", channel_labels=["agent", "customer"])
        for job in ser.jobs.wait([j.id for j in upload.jobs], timeout=600):
            print(job.filename, job.result.emotion if job.result else job.error)

The server is ``base_url`` (default: the ``SER_URL`` environment variable, then
http://127.0.0.1:8000) and the key ``api_key`` (default: ``SER_API_KEY``), as for ``ser submit``.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Literal, TypedDict, Unpack

import httpx

from ser_client._http import (
    API,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    AsyncHTTP,
    RetryHook,
    RetryPolicy,
    SyncHTTP,
    decode,
)
from ser_client._paging import AsyncJobPager, JobPager
from ser_client._uploads import FileInput, FormFields, ProgressCallback, Upload
from ser_client.errors import NotFoundError, WaitTimeoutError
from ser_client.types import Batch, Job, JobPage, UploadAccepted

__all__ = ["AsyncClient", "Client", "JobFilters"]

DEFAULT_MAX_RETRIES = 2
MAX_PAGE = 200  # the server's largest page (and most ids in one ``ids`` filter)
MAX_POLL_INTERVAL_S = 5.0
REPLAYED = "Idempotent-Replayed"  # the server's mark on an answer sent again for a repeated Idempotency-Key


class JobFilters(TypedDict, total=False):
    """The job list's filters (``GET /api/v1/jobs``); the export takes the same."""

    status: str
    emotion: str
    q: str
    batch_id: str
    since: str | datetime
    until: str | datetime
    client_reference: str
    min_confidence: float
    max_confidence: float
    escalation: bool
    ids: Sequence[str]
    sort: str


def _environment(base_url: str | None, api_key: str | None) -> tuple[str, str | None]:
    return (base_url or os.environ.get("SER_URL") or DEFAULT_URL,
            api_key if api_key is not None else (os.environ.get("SER_API_KEY") or None))


@dataclass(frozen=True)
class _Options:
    """What ``jobs.create`` sends besides the files (None: left to the server's default)."""

    transcribe: str | None = None
    language: str | None = None
    device: str | None = None
    channels: str | None = None
    channel_labels: str | Sequence[str] | None = None
    client_reference: str | Sequence[str] | None = None
    metadata: Mapping[str, Any] | None = None
    webhook_url: str | None = None
    extra_fields: FormFields | None = None

    def fields(self) -> dict[str, str | Sequence[str]]:
        fields: dict[str, str | Sequence[str]] = {}
        for name, value in (("device", self.device), ("transcribe", self.transcribe), ("language", self.language),
                            ("channels", self.channels), ("webhook_url", self.webhook_url)):
            if value is not None:
                fields[name] = value
        if self.channel_labels is not None:
            labels = self.channel_labels
            fields["channel_labels"] = labels if isinstance(labels, str) else ",".join(labels)
        if self.client_reference is not None:
            fields["client_reference"] = self.client_reference
        if self.metadata is not None:
            fields["metadata"] = json.dumps(self.metadata)
        return fields | dict(self.extra_fields or {})


def _quote(job_or_batch_id: str) -> str:
    return urllib.parse.quote(str(job_or_batch_id), safe="")


def _key(idempotency_key: str | None) -> dict[str, str]:
    # One key per call, repeated by every retry of it: the server answers a repeat with the first response.
    return {"Idempotency-Key": idempotency_key or f"ser-sdk-{uuid.uuid4().hex}"}


def _accepted(response: httpx.Response, base_url: str) -> UploadAccepted:
    """An upload's answer, marked ``replayed`` when the server sent the first answer to its key again."""
    accepted = UploadAccepted.model_validate(decode(response, base_url))
    accepted._replayed = response.headers.get(REPLAYED, "").lower() == "true"
    return accepted


def _list_params(filters: Mapping[str, Any], page_size: int | None, cursor: str | None,
                 segments: bool | None) -> dict[str, Any]:
    return {**filters, "limit": page_size, "cursor": cursor, "segments": segments}


def _chunks(ids: Sequence[str]) -> Iterable[Sequence[str]]:
    return (ids[k:k + MAX_PAGE] for k in range(0, len(ids), MAX_PAGE))


class _Waiting:
    """The state of one ``jobs.wait``: which jobs, the latest of each, and when to give up."""

    def __init__(self, job_ids: Iterable[str], timeout: float | None, poll_interval: float) -> None:
        self.ids = list(dict.fromkeys(str(i) for i in job_ids))
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.interval = poll_interval
        self.latest: dict[str, Job] = {}

    def update(self, jobs: Iterable[Job]) -> list[Job]:
        self.latest.update((j.id, j) for j in jobs)
        missing = [i for i in self.ids if i not in self.latest]
        if missing:
            raise NotFoundError(f"no such job: {missing[0]}", status=404, code="not_found")
        return [self.latest[i] for i in self.ids]

    def pause(self, jobs: list[Job]) -> float | None:
        """Seconds to sleep before the next poll; None when every job is finished.

        Raises WaitTimeoutError once the timeout has passed.
        """
        if all(j.finished for j in jobs):
            return None
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise WaitTimeoutError(f"{sum(not j.finished for j in jobs)} of {len(jobs)} jobs still running", jobs)
        pause = self.interval if left is None else min(self.interval, left)
        self.interval = min(self.interval * 1.5, MAX_POLL_INTERVAL_S)
        return pause


def _open_dest(dest: str | os.PathLike[str] | IO[bytes]) -> tuple[IO[bytes], Path | None]:
    if isinstance(dest, str | os.PathLike):
        path = Path(dest)
        return path.open("wb"), path
    return dest, None


# ---- sync ----------------------------------------------------------------------------------


class Jobs:
    """``client.jobs``: upload, read, list, wait for and delete jobs."""

    def __init__(self, http: SyncHTTP) -> None:
        self._http = http

    def create(self, files: Sequence[FileInput], *, transcribe: str | None = None, language: str | None = None,
               device: str | None = None, channels: str | None = None,
               channel_labels: str | Sequence[str] | None = None,
               client_reference: str | Sequence[str] | None = None,
               metadata: Mapping[str, Any] | None = None, webhook_url: str | None = None,
               idempotency_key: str | None = None, extra_fields: FormFields | None = None,
               on_progress: ProgressCallback | None = None) -> UploadAccepted:
        """Upload ``files`` as one batch (streamed; paths, open binary files or ``(name, content)`` pairs).

        ``channels`` ("auto", "mix" or "split") says how a recording of several channels is analysed,
        ``channel_labels`` names its speakers, first channel first (``["agent", "customer"]`` or
        ``"agent,customer"``). ``idempotency_key`` (default: a new random one) is sent with every retry
        of this call, so a lost answer never creates the jobs twice; pass your own to make a rerun
        replay too. ``on_progress(sent_bytes, total_bytes)`` follows the upload (from 0 again on a retry).
        """
        options = _Options(transcribe, language, device, channels, channel_labels, client_reference, metadata,
                           webhook_url, extra_fields)
        upload = Upload(files, options.fields(), on_progress)
        response = self._http.request("POST", f"{API}/jobs", upload=upload, headers=_key(idempotency_key))
        return _accepted(response, self._http.base_url)

    def get(self, job_id: str) -> Job:
        return Job.model_validate(self._http.json("GET", f"{API}/jobs/{_quote(job_id)}"))

    def list(self, *, page_size: int | None = None, segments: bool | None = None,
             **filters: Unpack[JobFilters]) -> JobPager:
        """Every job matching ``filters``, newest first (see ``sort``), fetched ``page_size`` at a time."""
        return JobPager(lambda cursor: self.page(cursor=cursor, page_size=page_size, segments=segments, **filters))

    def page(self, *, cursor: str | None = None, page_size: int | None = None, segments: bool | None = None,
             **filters: Unpack[JobFilters]) -> JobPage:
        """One page of the list (``next_cursor`` leads to the next)."""
        params = _list_params(filters, page_size, cursor, segments)
        return JobPage.model_validate(self._http.json("GET", f"{API}/jobs", params=params))

    def delete(self, job_id: str) -> None:
        """Remove the job, its result and its audio."""
        self._http.request("DELETE", f"{API}/jobs/{_quote(job_id)}")

    def wait(self, job_ids: Iterable[str], *, timeout: float | None = None, poll_interval: float = 0.5,
             on_poll: Callable[[builtins.list[Job]], None] | None = None) -> builtins.list[Job]:
        """Poll until every job has finished (its transcript too); the jobs in the order given.

        Results come as the list gives them, without segments (``get`` has those). Raises
        WaitTimeoutError (with the latest jobs) when ``timeout`` seconds pass first, NotFoundError
        for a job that does not exist.
        """
        state = _Waiting(job_ids, timeout, poll_interval)
        while True:
            jobs = state.update(job for chunk in _chunks(state.ids)
                                for job in self.page(ids=chunk, page_size=len(chunk)).jobs)
            if on_poll is not None:
                on_poll(jobs)
            pause = state.pause(jobs)
            if pause is None:
                return jobs
            time.sleep(pause)


class Batches:
    """``client.batches``: the jobs of one upload."""

    def __init__(self, http: SyncHTTP) -> None:
        self._http = http

    def get(self, batch_id: str) -> Batch:
        return Batch.model_validate(self._http.json("GET", f"{API}/batches/{_quote(batch_id)}"))


class Client:
    """A SER server's API. Use as a context manager, or call ``close()``, to release its connections."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
                 on_retry: RetryHook | None = None, default_headers: Mapping[str, str] | None = None,
                 http_client: httpx.Client | None = None) -> None:
        url, key = _environment(base_url, api_key)
        self._http = SyncHTTP(url, key, timeout, RetryPolicy(max_retries=max(0, max_retries)), on_retry,
                              default_headers, http_client)
        self.jobs = Jobs(self._http)
        self.batches = Batches(self._http)

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def api_key(self) -> str | None:
        return self._http.api_key

    def export(self, dest: str | os.PathLike[str] | IO[bytes], *, format: Literal["csv", "json"] = "csv",
               segments: bool = False, **filters: Unpack[JobFilters]) -> int:
        """Stream the matching jobs as CSV or JSON into ``dest`` (a path or a binary file); the bytes written.

        A download that fails part way leaves no file behind at a path ``dest``.
        """
        params = {**filters, "format": format, "segments": segments}
        response = self._http.request("GET", f"{API}/export", params=params, stream=True)
        handle, path = _open_dest(dest)
        written = 0
        try:
            for block in response.iter_bytes():
                written += handle.write(block) or 0
        except BaseException:
            if path is not None:
                handle.close()
                path.unlink(missing_ok=True)
            raise
        finally:
            response.close()
            if path is not None:
                handle.close()
        return written

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- async ---------------------------------------------------------------------------------


class AsyncJobs:
    """``client.jobs`` of an AsyncClient: the same calls as ``Jobs``, awaited."""

    def __init__(self, http: AsyncHTTP) -> None:
        self._http = http

    async def create(self, files: Sequence[FileInput], *, transcribe: str | None = None,
                     language: str | None = None, device: str | None = None, channels: str | None = None,
                     channel_labels: str | Sequence[str] | None = None,
                     client_reference: str | Sequence[str] | None = None, metadata: Mapping[str, Any] | None = None,
                     webhook_url: str | None = None, idempotency_key: str | None = None,
                     extra_fields: FormFields | None = None,
                     on_progress: ProgressCallback | None = None) -> UploadAccepted:
        """See ``Jobs.create``."""
        options = _Options(transcribe, language, device, channels, channel_labels, client_reference, metadata,
                           webhook_url, extra_fields)
        upload = Upload(files, options.fields(), on_progress)
        response = await self._http.request("POST", f"{API}/jobs", upload=upload, headers=_key(idempotency_key))
        return _accepted(response, self._http.base_url)

    async def get(self, job_id: str) -> Job:
        return Job.model_validate(await self._http.json("GET", f"{API}/jobs/{_quote(job_id)}"))

    def list(self, *, page_size: int | None = None, segments: bool | None = None,
             **filters: Unpack[JobFilters]) -> AsyncJobPager:
        """``async for job in client.jobs.list(...)``: see ``Jobs.list``."""

        def fetch(cursor: str | None) -> Awaitable[JobPage]:
            return self.page(cursor=cursor, page_size=page_size, segments=segments, **filters)

        return AsyncJobPager(fetch)

    async def page(self, *, cursor: str | None = None, page_size: int | None = None,
                   segments: bool | None = None, **filters: Unpack[JobFilters]) -> JobPage:
        params = _list_params(filters, page_size, cursor, segments)
        return JobPage.model_validate(await self._http.json("GET", f"{API}/jobs", params=params))

    async def delete(self, job_id: str) -> None:
        await self._http.request("DELETE", f"{API}/jobs/{_quote(job_id)}")

    async def wait(self, job_ids: Iterable[str], *, timeout: float | None = None, poll_interval: float = 0.5,
                   on_poll: Callable[[builtins.list[Job]], None] | None = None) -> builtins.list[Job]:
        """See ``Jobs.wait``."""
        state = _Waiting(job_ids, timeout, poll_interval)
        while True:
            found: builtins.list[Job] = []
            for chunk in _chunks(state.ids):
                found += (await self.page(ids=chunk, page_size=len(chunk))).jobs
            jobs = state.update(found)
            if on_poll is not None:
                on_poll(jobs)
            pause = state.pause(jobs)
            if pause is None:
                return jobs
            await asyncio.sleep(pause)


class AsyncBatches:
    def __init__(self, http: AsyncHTTP) -> None:
        self._http = http

    async def get(self, batch_id: str) -> Batch:
        return Batch.model_validate(await self._http.json("GET", f"{API}/batches/{_quote(batch_id)}"))


class AsyncClient:
    """``Client`` on ``httpx.AsyncClient``: ``async with AsyncClient() as ser: await ser.jobs.get(id)``."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 timeout: float = DEFAULT_TIMEOUT_S, max_retries: int = DEFAULT_MAX_RETRIES,
                 on_retry: RetryHook | None = None, default_headers: Mapping[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        url, key = _environment(base_url, api_key)
        self._http = AsyncHTTP(url, key, timeout, RetryPolicy(max_retries=max(0, max_retries)), on_retry,
                               default_headers, http_client)
        self.jobs = AsyncJobs(self._http)
        self.batches = AsyncBatches(self._http)

    @property
    def base_url(self) -> str:
        return self._http.base_url

    @property
    def api_key(self) -> str | None:
        return self._http.api_key

    async def export(self, dest: str | os.PathLike[str] | IO[bytes], *, format: Literal["csv", "json"] = "csv",
                     segments: bool = False, **filters: Unpack[JobFilters]) -> int:
        """See ``Client.export``."""
        params = {**filters, "format": format, "segments": segments}
        response = await self._http.request("GET", f"{API}/export", params=params, stream=True)
        handle, path = _open_dest(dest)
        written = 0
        try:
            async for block in response.aiter_bytes():
                written += handle.write(block) or 0
        except BaseException:
            if path is not None:
                handle.close()
                path.unlink(missing_ok=True)
            raise
        finally:
            await response.aclose()
            if path is not None:
                handle.close()
        return written

    async def close(self) -> None:
        await self._http.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

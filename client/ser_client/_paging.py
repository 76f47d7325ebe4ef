"""Auto-paging over the job list: iterate jobs, the pages are fetched as the loop reaches them.

The list is keyset-paged: each page carries the ``next_cursor`` of the one after it, None on the
last, so a job added while the loop runs is neither skipped nor repeated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from ser_client.types import Job, JobPage


class JobPager:
    """``for job in client.jobs.list(...)`` walks every page; ``pages()`` gives the pages themselves."""

    def __init__(self, fetch: Callable[[str | None], JobPage]) -> None:
        self._fetch = fetch

    def pages(self) -> Iterator[JobPage]:
        cursor: str | None = None
        while True:
            page = self._fetch(cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def __iter__(self) -> Iterator[Job]:
        for page in self.pages():
            yield from page.jobs


class AsyncJobPager:
    """``async for job in client.jobs.list(...)``; ``pages()`` gives the pages themselves."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[JobPage]]) -> None:
        self._fetch = fetch

    async def pages(self) -> AsyncIterator[JobPage]:
        cursor: str | None = None
        while True:
            page = await self._fetch(cursor)
            yield page
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    async def __aiter__(self) -> AsyncIterator[Job]:
        async for page in self.pages():
            for job in page.jobs:
                yield job

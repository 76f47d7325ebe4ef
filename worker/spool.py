"""Local files for the decoders: a job's recording as a file on this worker's own disk.

soundfile (the two-pass decode of long recordings) and ffmpeg (compressed formats) both read a
local file and seek in it. From a folder store that is the stored file itself; from S3 each
recording of a chunk is downloaded (in parts, never whole in memory) into this worker's spool
folder for as long as the task runs, then deleted. Disk in use is bounded by the chunk size times
the per-file limit (``chunk_size`` x ``max_file_mb``), per task in flight.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

from ser_ml.pipeline import JobInput
from ser_shared import storage
from ser_shared.settings import Settings


@contextmanager
def local_inputs(settings: Settings, inputs: Sequence[JobInput]) -> Iterator[list[JobInput]]:
    """``inputs`` with ``path`` pointing at a local copy of each recording, removed on exit.

    A recording missing from the store keeps its (absent) path: the decoder then fails that job
    alone, as for a file deleted from a folder store.
    """
    store = storage.store_for(settings)
    if isinstance(store, storage.LocalStorage):
        yield list(inputs)
        return
    with ExitStack() as stack:
        local: list[JobInput] = []
        for item in inputs:
            try:
                path = stack.enter_context(store.local_copy(item.key)) if item.key else item.path
            except FileNotFoundError:
                path = item.path
            local.append(dataclasses.replace(item, path=path))
        yield local

"""One list of audio formats (``ser_shared.formats``), and every place that names them reads it.

AIFF was accepted by the server and listed by the API document, while the README, the upload page,
the client's folder scan and the upload error left it out. These tests hold every such place to
the list, the client's copy (a distribution of its own) included.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from flask.testing import FlaskClient
from ser_client import cli as client_cli

from ser_shared import formats
from ser_shared.audio import MIME_TYPES, sniff_format
from ser_shared.errors import UnsupportedFormat
from ser_shared.settings import REPO_ROOT
from web import openapi


def test_the_client_keeps_the_servers_list_of_file_names() -> None:
    assert client_cli.AUDIO_EXTENSIONS == formats.EXTENSIONS
    assert " ".join(formats.EXTENSIONS) in " ".join(client_cli.SUBMIT_EPILOG.split())


def test_an_aiff_in_a_folder_is_sent_and_scored(tmp_path: Path) -> None:
    """``ser submit FOLDER`` sends AIFF files (it said "skipped 1 files"), ``ser evaluate`` scores them."""
    tone = (0.3 * np.sin(np.linspace(0, 2 * np.pi * 440, 16000))).astype(np.float32)
    for name in ("03-01-05-01-01-01-02.aiff", "03-01-03-01-01-01-02.aif"):
        sf.write(tmp_path / name, tone, 16000, format="AIFF", subtype="PCM_16")
    (tmp_path / "notes.txt").write_text("not audio")
    files, skipped = client_cli.find_files([str(tmp_path)], recursive=False)
    assert sorted(f.path.name for f in files) == ["03-01-03-01-01-01-02.aif", "03-01-05-01-01-01-02.aiff"]
    assert [p.name for p in skipped] == ["notes.txt"]
    for f in files:
        assert sniff_format(f.path.read_bytes()[:64]) == "aiff"
    from ser_ml.train.evaluation import labelled_files

    assert len(labelled_files(tmp_path)) == 2


def test_the_upload_error_the_page_and_the_api_document_name_every_format(client: FlaskClient) -> None:
    with pytest.raises(UnsupportedFormat) as refused:
        sniff_format(b"plain text, not audio")
    assert formats.LABELS in refused.value.message and "AIFF" in formats.LABELS
    page = client.get("/").get_data(as_text=True)
    assert formats.LABELS in page
    assert f'data-extensions="{",".join(formats.EXTENSIONS)}"' in page
    doc = openapi.document()
    upload = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert formats.LABELS in upload["properties"]["file"]["description"]
    audio = doc["paths"]["/api/v1/jobs/{job_id}/audio"]["get"]["responses"]["200"]["content"]
    assert set(MIME_TYPES.values()) <= set(audio)


def test_the_readme_lists_the_same_formats() -> None:
    readme = " ".join((REPO_ROOT / "README.md").read_text().split())
    lists = re.findall(r"`(\.wav [^`]*)`", readme)
    assert lists and all(found.split() == list(formats.EXTENSIONS) for found in lists), lists
    decoded = readme[readme.index("**Formats**"):]
    for f in formats.FORMATS:
        assert f.label.split("/")[0] in decoded[:400], f

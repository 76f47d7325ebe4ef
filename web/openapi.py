"""The OpenAPI 3.1 description of the JSON API.

It is served at ``/api/v1/openapi.json``, rendered as the readable page at ``/docs/api``, and
tests/integration/test_openapi.py fuzzes the running app from it (schemathesis). The paths, parameters and
request bodies are declared here; every component schema is generated from the models of
``ser_shared.schemas``, the same models ``web.serialize`` builds the responses with, so a response
shape is changed in one place.
"""

from __future__ import annotations

import copy
from functools import cache
from importlib import metadata
from typing import Any

from ser_shared import formats, schemas
from ser_shared.emotions import EMOTIONS
from ser_shared.schemas import EXPORT_COLUMNS, STATUSES
from web import idempotency
from web.queries import DEFAULT_SORT, MAX_IDS, MAX_LIMIT, SORT_CHOICES
from web.uploads import (
    CHANNEL_MODES,
    DEVICES,
    LANGUAGE,
    MAX_CHANNEL_LABELS,
    MAX_LABEL_LENGTH,
    MAX_METADATA_BYTES,
    MAX_REFERENCE,
    TRANSCRIBE,
)

Schema = dict[str, Any]

AUDIO_TYPES = [*(f.mime for f in formats.FORMATS), "application/octet-stream"]

DESCRIPTION = """\
Upload recordings, get the emotion expressed in each (and, on request, a transcript).

Uploads are asynchronous: `POST /api/v1/jobs` answers 202 with one job per file, and workers
analyse them; poll the job or batch, or pass a `webhook_url` to be called when they finish.

**Authentication.** With authentication on (`SER_AUTH=true`, the production default) every
operation except the health probes and this document needs an API key, sent as
`Authorization: Bearer <key>` or `X-API-Key: <key>`; keys are made with `ser keys create --name NAME`.
A missing or revoked key is a 401. The embedded single-user default runs with authentication off:
then no key is needed and everything belongs to one local tenant.

**Errors** share one shape, `{"error": {"code": "...", "message": "..."}}`: `code` is stable and
meant for programs, `message` for people.
"""


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def obj(properties: dict[str, Schema], required: list[str] | None = None, **extra: Any) -> Schema:
    """An object; every property is required unless ``required`` names the ones that are."""
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required, **extra}


STRING: Schema = {"type": "string"}
URI: Schema = {"type": "string", "format": "uri"}
UUID: Schema = {"type": "string", "format": "uuid"}
BOOLEAN: Schema = {"type": "boolean"}


def _error(description: str, headers: dict[str, Any] | None = None) -> Schema:
    out: Schema = {"description": description, "content": {"application/json": {"schema": ref("Error")}}}
    if headers:
        out["headers"] = headers
    return out


def _responses() -> dict[str, Schema]:
    return {
        "BadRequest": _error("A parameter is invalid (`invalid_parameter`, `invalid_option`, ...)."),
        "Unauthorized": _error("Authentication is on and no valid API key was sent (`unauthorized`)."),
        "NotFound": _error("No such resource, or one of another tenant (`not_found`)."),
        "TooManyRequests": _error(
            "Over the API key's upload rate limit (`rate_limited`) or its queued-jobs cap (`too_many_queued_jobs`).",
            {"Retry-After": {"description": "Seconds to wait before retrying.", "required": True,
                             "schema": {"type": "integer", "minimum": 1}}}),
        "Unavailable": _error("The database is unreachable (`database_unavailable`); retry shortly."),
    }


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _common(*codes: str) -> dict[str, Schema]:
    names = {"400": "BadRequest", "401": "Unauthorized", "404": "NotFound", "429": "TooManyRequests",
             "503": "Unavailable"}
    return {code: {"$ref": f"#/components/responses/{names[code]}"} for code in codes}


def _query(name: str, schema: Schema, description: str, **extra: Any) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description, **extra}


def _filters() -> list[Schema]:
    text = {"type": "string", "maxLength": 200}
    return [
        _query("status", {"type": "string", "enum": list(STATUSES)}, "Only jobs in this state."),
        _query("emotion", {"type": "string", "enum": list(EMOTIONS)}, "Only jobs whose result is this emotion."),
        _query("batch_id", UUID, "Only this batch's jobs."),
        _query("batch", UUID, "Old name of `batch_id`.", deprecated=True),
        _query("since", STRING, "Created at or after this ISO 8601 date or time (UTC unless it says)."),
        _query("until", STRING, "Created before this ISO 8601 date or time."),
        _query("q", text, "File name contains this (case-insensitive)."),
        _query("client_reference", text, "Jobs with exactly this reference."),
        _query("min_confidence", {"type": "number", "minimum": 0, "maximum": 1}, "Result confidence at least this."),
        _query("max_confidence", {"type": "number", "minimum": 0, "maximum": 1}, "Result confidence at most this."),
        _query("escalation", BOOLEAN, "Only conversations whose customer escalated (`true`) or did not "
               "(`false`); jobs without a conversation match neither."),
        _query("ids", STRING, f"Only these jobs: comma-separated job ids, at most {MAX_IDS}."),
        _query("sort", {"type": "string", "enum": list(SORT_CHOICES), "default": DEFAULT_SORT},
               "Order (a leading `-` is descending); NULLs last either way."),
        _query("segments", BOOLEAN, "`true`: include each result's segments (export: one row per segment)."),
    ]


def _path_id(name: str, what: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": UUID,
            "description": f"The {what}'s id (anything that is not one of yours is a 404)."}


def _upload_body() -> Schema:
    form = obj({
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": f"The recordings, one part each ({formats.LABELS})."},
        "device": {"type": "string", "enum": list(DEVICES), "default": "auto"},
        "transcribe": {"type": "string", "enum": list(TRANSCRIBE), "default": "none",
                       "description": "Also transcribe the speech, with this engine: `whisper` offline (Whisper "
                                      "tiny.en for English, base for other languages), `google` over the "
                                      "network; `sphinx` is kept for old clients and served by Whisper."},
        "language": {"type": "string", "pattern": LANGUAGE.pattern, "default": "en-US",
                     "description": "BCP-47 language of the speech, for the transcript; `und` (undetermined) "
                                    "lets Whisper detect it."},
        "channels": {"type": "string", "enum": list(CHANNEL_MODES), "default": "auto",
                     "description": "How a recording of several channels is analysed: `split` takes each channel "
                                    "as one speaker (a call's agent and customer on the two sides of a stereo "
                                    "file), `mix` averages them to one, `auto` splits channels that carry "
                                    "different signals and mixes near-copies."},
        "channel_labels": {"type": "string", "maxLength": MAX_CHANNEL_LABELS * (MAX_LABEL_LENGTH + 1) - 1,
                           "examples": ["agent,customer"],
                           "description": f"The speakers' names, first channel first, comma-separated (at most "
                                          f"{MAX_CHANNEL_LABELS}, each 1-{MAX_LABEL_LENGTH} letters, digits, `-`, "
                                          "`_` or spaces, all different); default `ch0,ch1,...`. The "
                                          "conversation's escalation flag judges the customer: the channel "
                                          "labelled `customer`, otherwise the second."},
        "client_reference": {"anyOf": [{"type": "string", "maxLength": MAX_REFERENCE},
                                       {"type": "array", "items": {"type": "string", "maxLength": MAX_REFERENCE}}],
                             "description": "Your own reference: once for every job, or once per file in order."},
        "metadata": {"type": "string", "contentMediaType": "application/json",
                     "description": f"A JSON object (at most {MAX_METADATA_BYTES} bytes) stored on every job."},
        "webhook_url": {**URI, "description": "Called (signed, retried) as jobs and the batch finish. Must "
                        "resolve to a public address unless allowed by `SER_WEBHOOK_ALLOW`."},
        "live": {"type": "boolean", "default": False,
                 "description": "Start a live session: a batch that later uploads add to (`batch_id`), as the "
                                "upload page's live microphone does with chunks of a few seconds. No `webhook_url`."},
        "batch_id": {**UUID, "description": "Add the files to this live session (created with `live=true`) "
                                          "instead of a new batch; the session's options apply. 409 "
                                          "`batch_not_live` for an ordinary batch."},
    }, required=["file"])
    return {"required": True, "content": {"multipart/form-data": {
        "schema": form, "encoding": {"file": {"contentType": "application/octet-stream"}}}}}


def _create_jobs() -> Schema:
    return {
        "operationId": "createJobs", "tags": ["jobs"], "summary": "Upload recordings",
        "description": "Each `file` part becomes a job of one batch. A file that cannot be analysed (empty, "
                       "unknown format, too long, too large) fails alone, at once, with its error in `jobs[]`; "
                       "the others are queued. With an `Idempotency-Key`, a retried request replays the first "
                       "response (marked `Idempotent-Replayed: true`) instead of creating the jobs again.",
        "parameters": [{"name": idempotency.HEADER, "in": "header", "required": False,
                        "schema": {"type": "string", "minLength": 1, "maxLength": idempotency.MAX_KEY_LENGTH},
                        "description": "Printable ASCII, unique per intended upload; kept 24 hours."}],
        "requestBody": _upload_body(),
        "responses": {
            "202": {**_json(ref("UploadAccepted"), "Accepted: the jobs are stored and queued."),
                    "headers": {idempotency.REPLAYED: {"description": "`true` on a replayed response.",
                                                      "schema": {"type": "string", "enum": ["true"]}}}},
            **_common("400", "401"),
            "404": _error("`batch_id` is not one of your batches (`not_found`)."),
            "409": _error("The Idempotency-Key was used for a different request (`idempotency_key_reused`) or "
                          "its first request is still running (`idempotency_key_in_progress`), or `batch_id` "
                          "is not a live session (`batch_not_live`)."),
            "413": _error("The request body is over `SER_MAX_REQUEST_MB` (`request_too_large`)."),
            **_common("429", "503"),
        },
    }


def _list_jobs() -> Schema:
    return {
        "operationId": "listJobs", "tags": ["jobs"], "summary": "List jobs, newest first",
        "description": "Keyset-paginated: pass `next_cursor` back as `cursor` for the next page (null at the end).",
        "parameters": [*_filters(),
                       _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 50},
                              "Page size."),
                       _query("cursor", STRING, "`next_cursor` of the previous page.")],
        "responses": {"200": _json(ref("JobPage"), "A page of jobs."), **_common("400", "401", "503")},
    }


def _export() -> Schema:
    rows = {"type": "array", "items": ref("ExportRow")}
    return {
        "operationId": "exportJobs", "tags": ["jobs"], "summary": "Export jobs as CSV or JSON (streamed)",
        "description": f"The jobs the list filters select, newest first, as a download. CSV columns: "
                       f"{', '.join(EXPORT_COLUMNS)}.",
        "parameters": [*_filters(), _query("format", {"type": "string", "enum": ["csv", "json"], "default": "csv"},
                                           "Output format.")],
        "responses": {"200": {"description": "The rows (an attachment).",
                              "headers": {"Content-Disposition": {"schema": STRING,
                                                                  "description": "attachment; filename=..."}},
                              "content": {"text/csv": {"schema": STRING}, "application/json": {"schema": rows}}},
                      **_common("400", "401", "503")},
    }


def _job_ops() -> Schema:
    return {
        "parameters": [_path_id("job_id", "job")],
        "get": {"operationId": "getJob", "tags": ["jobs"], "summary": "A job, with its result and webhooks",
                "responses": {"200": _json(ref("Job"), "The job."), **_common("401", "404", "503")}},
        "delete": {"operationId": "deleteJob", "tags": ["jobs"], "summary": "Delete a job, its result and audio",
                   "responses": {"204": {"description": "Deleted."}, **_common("401", "404", "503")}},
    }


def _audio() -> Schema:
    audio = {t: {"schema": {"type": "string", "contentMediaType": t}} for t in AUDIO_TYPES}
    return {
        "parameters": [_path_id("job_id", "job")],
        "get": {"operationId": "getJobAudio", "tags": ["jobs"], "summary": "The uploaded recording",
                "parameters": [{"name": "Range", "in": "header", "required": False, "schema": STRING,
                                "description": "A byte range (`bytes=0-99`) for a partial download."}],
                "responses": {
                    "200": {"description": "The recording as uploaded, typed from the format the server "
                                           "detected in its content (not from the upload's name or type), "
                                           "as an attachment (`Content-Disposition: attachment`) under a "
                                           "name ending in that format's extension.",
                            "content": audio},
                    "206": {"description": "The requested byte range.", "content": audio},
                    **_common("401", "404"),
                    "409": _error("The file was never decoded as audio (`audio_not_decodable`): the job failed "
                                  "with `unsupported_format`, `decode_failed` or another decoding error, so "
                                  "its bytes are not served."),
                    "410": _error("The audio was deleted by the retention policy (`audio_deleted`); the results "
                                  "remain."),
                    "416": {"description": "The range is outside the file."},
                    **_common("503")}},
    }


def _batch() -> Schema:
    return {"get": {"operationId": "getBatch", "tags": ["jobs"], "summary": "A batch with its jobs and counts",
                    "parameters": [_path_id("batch_id", "batch")],
                    "responses": {"200": _json(ref("Batch"), "The batch."), **_common("401", "404", "503")}}}


def _probes() -> dict[str, Schema]:
    return {
        "/healthz": {"get": {"operationId": "healthz", "tags": ["operations"], "security": [],
                             "summary": "Liveness: the web process answers",
                             "responses": {"200": _json(ref("Health"), "Alive.")}}},
        "/readyz": {"get": {"operationId": "readyz", "tags": ["operations"], "security": [],
                            "summary": "Readiness: the database and the broker answer",
                            "responses": {"200": _json(ref("Ready"), "Ready."),
                                          "503": _json(ref("Ready"), "Not ready; `checks` says what is down.")}}},
        "/api/v1/openapi.json": {"get": {"operationId": "openapi", "tags": ["operations"], "security": [],
                                         "summary": "This document",
                                         "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")}}},
    }


def _webhooks() -> dict[str, Schema]:
    """What a batch's ``webhook_url`` receives (signed per Standard Webhooks, retried with backoff)."""
    def event(name: str, summary: str, schema: str) -> Schema:
        return {"post": {"operationId": name, "tags": ["webhooks"], "summary": summary,
                         "requestBody": {"required": True, "content": {"application/json": {"schema": ref(schema)}}},
                         "responses": {"2XX": {"description": "Received: any 2xx ends the retries."}}}}
    return {"jobFinished": event("jobFinished", "`job.succeeded` or `job.failed`: a job has finished", "JobEvent"),
            "batchCompleted": event("batchCompleted", "`batch.completed`: every job of a batch has finished",
                                    "BatchEvent")}


def _version() -> str:
    try:
        return metadata.version("ser-service")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "0.0.0+unknown"


@cache
def _document() -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {"title": "SER: speech emotion recognition", "version": _version(), "description": DESCRIPTION,
                 "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"}},
        "tags": [{"name": "jobs", "description": "Uploads, results and exports."},
                 {"name": "operations", "description": "Probes and this description (no key needed)."},
                 {"name": "webhooks", "description": "Events POSTed to a batch's `webhook_url`."}],
        "security": [{"bearerAuth": []}, {"apiKeyHeader": []}],
        "paths": {
            "/api/v1/jobs": {"post": _create_jobs(), "get": _list_jobs()},
            "/api/v1/jobs/{job_id}": _job_ops(),
            "/api/v1/jobs/{job_id}/audio": _audio(),
            "/api/v1/batches/{batch_id}": _batch(),
            "/api/v1/export": {"get": _export()},
            **_probes(),
        },
        "webhooks": _webhooks(),
        "components": {
            "securitySchemes": {
                "bearerAuth": {"type": "http", "scheme": "bearer",
                               "description": "`Authorization: Bearer <key>` (only when `SER_AUTH` is on)."},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                 "description": "The same key in its own header."},
            },
            "schemas": schemas.components(),
            "responses": _responses(),
        },
    }


def document() -> Schema:
    """The OpenAPI document (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(_document())


METHODS = ("get", "post", "put", "patch", "delete")


def operations(doc: Schema) -> list[dict[str, Any]]:
    """Each operation flattened for the readable page: method, path, parameters, responses."""
    out: list[dict[str, Any]] = []
    for path, item in doc["paths"].items():
        shared = item.get("parameters", [])
        for method in METHODS:
            if method in item:
                op = item[method]
                out.append({"method": method.upper(), "path": path, "op": op,
                            "parameters": [*shared, *op.get("parameters", [])],
                            "public": op.get("security") == []})
    return out


def type_label(schema: Schema | None) -> str:
    """A short human label for a schema: ``Job``, ``array of Job``, ``string (uuid)``, ``integer or null``."""
    if not schema:
        return ""
    if "$ref" in schema:
        return str(schema["$ref"]).rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " or ".join(type_label(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(type_label({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"array of {type_label(schema.get('items'))}"
    if "enum" in schema:
        return " | ".join(str(v) for v in schema["enum"])
    return f"{kind} ({schema['format']})" if "format" in schema else str(kind)


def response_content(doc: Schema, response: Schema) -> tuple[str, list[tuple[str, str]]]:
    """A response's description and its (media type, schema label) pairs, following a shared ``$ref``."""
    if "$ref" in response:
        response = doc["components"]["responses"][str(response["$ref"]).rsplit("/", 1)[-1]]
    media = [(kind, type_label(body.get("schema"))) for kind, body in response.get("content", {}).items()]
    return str(response.get("description", "")), media


def curl_example(entry: dict[str, Any], base: str) -> str:
    """A curl command line for one operation (placeholders in capitals for what the caller fills in)."""
    path = str(entry["path"]).replace("{job_id}", "JOB_ID").replace("{batch_id}", "BATCH_ID")
    parts = ["curl"]
    if entry["method"] not in ("GET", "POST"):
        parts.append(f"-X {entry['method']}")
    if not entry["public"]:
        parts.append('-H "Authorization: Bearer $SER_API_KEY"')
    if entry["method"] == "POST":
        parts += ['-H "Idempotency-Key: $(uuidgen)"', "-F file=@first.wav", "-F file=@second.flac",
                  "-F transcribe=sphinx", "-F channel_labels=agent,customer", "-F client_reference=call-42"]
    elif entry["path"].endswith("/export"):
        parts.append("-o jobs.csv")
    elif entry["path"].endswith("/audio"):
        parts.append("-o recording")
    query = "?status=succeeded&limit=20" if entry["path"] == "/api/v1/jobs" and entry["method"] == "GET" else ""
    query = "?format=csv&since=2025-01-01" if entry["path"].endswith("/export") else query
    parts.append(f"'{base}{path}{query}'")
    return " \\\n  ".join(parts)

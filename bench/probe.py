"""A hostile-input probe of the web tier in its production shape: no input may get a 5xx.

Our own version of the independent probe that found the 500s of issue 17: several hundred kinds of
request, each sent once, against gunicorn with authentication on, Postgres and a Redis broker. Kinds:
every query parameter of the list, export and history endpoints with hostile values; forged path
parameters on every route; methods no route takes; authentication, idempotency, range and other
headers; multipart bodies that are malformed, truncated or enormous in count; every upload form
field with hostile values; audio that lies (HTML named .wav, a 7-bit WAV, truncated FLAC); page
forms without CSRF; and raw HTTP that no client library would send (bad request lines, conflicting
lengths, 64 KiB headers, bad chunked encoding).

Each kind's status is counted; a 5xx, or a connection closed without any answer where an answer
was owed, is a failure. It prints a table on stderr and ONE JSON line on stdout:
``{"kinds": N, "by_class": {...}, "5xx": [...], "no_answer": [...]}``; exit 1 if either list is
not empty.

    python -m bench.probe                 # starts its own service (fresh database, Redis db 10)
    python -m bench.probe --url URL --key KEY   # probes a running service

``run_probe(base_url, key)`` is what the test suite calls against its own gunicorn.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import struct
import sys
import time
import uuid
import wave
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

import numpy as np
import requests

RATE = 16000
NIL = "00000000-0000-0000-0000-000000000000"

# Values every text field and query parameter is tried with.
HOSTILE: dict[str, str] = {
    "empty": "", "space": " ", "minus": "-1", "zero": "0", "huge_int": "9" * 400, "float_exp": "1e999",
    "nan": "NaN", "inf": "-Infinity", "nul": "a\x00b", "surrogate_bytes": "\udcff", "lone_surrogate": "\ud800",
    "long": "x" * 100_000, "json_list": "[]", "json_obj": '{"a":1}', "path": "../../../etc/passwd",
    "sql": "' OR 1=1 --", "html": "<script>alert(1)</script>", "rtl": "\u202eevil", "emoji": "\U0001f621" * 50,
    "crlf": "a\r\nSet-Cookie: x=1", "percent": "%", "date_max": "9999-12-31T23:59:59-14:00",
    "date_min": "0001-01-01T00:00:00+14:00", "uuid_nil": NIL, "comma_list": ",".join(["x"] * 5000),
    "backslash": "\\" * 1000, "unicode_ws": "\u3000\u2028\u00a0",
}
LIST_PARAMS = ("status", "emotion", "batch_id", "batch", "since", "until", "q", "client_reference", "sort",
               "min_confidence", "max_confidence", "ids", "limit", "cursor", "segments")
FORM_FIELDS = ("device", "transcribe", "language", "webhook_url", "client_reference", "metadata", "segments",
               "labels", "channels", "channel_labels")
WEBHOOKS = ("file:///etc/passwd", "gopher://127.0.0.1:6379/_PING", "http://127.0.0.1:6379/", "http://[::1]/",
            "http://169.254.169.254/latest/meta-data/", "http://100.100.100.200/", "http://[2002:a00:1::]/",
            "http://[fec0::1]/", "http://[::ffff:127.0.0.1]/", "http://0x7f000001/", "http://017700000001/",
            "https://user:pass@example.com/", "http://" + "a" * 300 + ".example/", "javascript:alert(1)")


@dataclass
class Report:
    statuses: dict[str, int | None] = field(default_factory=dict)  # kind -> status (None: no answer)
    owed: set[str] = field(default_factory=set)  # kinds where an answer must come back

    def record(self, kind: str, status: int | None, owed: bool = True) -> None:
        if kind in self.statuses:
            raise ValueError(f"kind {kind!r} tried twice")
        self.statuses[kind] = status
        if owed:
            self.owed.add(kind)

    @property
    def server_errors(self) -> list[str]:
        return sorted(k for k, s in self.statuses.items() if s is not None and s >= 500)

    @property
    def no_answer(self) -> list[str]:
        return sorted(k for k, s in self.statuses.items() if s is None and k in self.owed)

    def summary(self) -> dict[str, object]:
        classes = Counter("none" if s is None else f"{s // 100}xx" for s in self.statuses.values())
        return {"kinds": len(self.statuses), "by_class": dict(sorted(classes.items())),
                "5xx": self.server_errors, "no_answer": self.no_answer}


# --------------------------------------------------------------------------------------------- audio


def wav(seconds: float = 1.0, bits: int = 16, freq: float = 220.0) -> bytes:
    t = np.arange(int(seconds * RATE)) / RATE
    tone = (0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t)) * 32767).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(tone.tobytes())
    data = bytearray(buf.getvalue())
    if bits != 16:
        data[34:36] = struct.pack("<H", bits)  # the header lies about bits per sample
    return bytes(data)


def _multipart(files: Sequence[tuple[str, bytes]], fields: dict[str, str] | None = None,
               boundary: str = "probe-boundary") -> tuple[bytes, str]:
    out = io.BytesIO()
    for name, value in (fields or {}).items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode("utf-8", "surrogatepass") + b"\r\n")
    for filename, data in files:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
                  "Content-Type: application/octet-stream\r\n\r\n".encode("utf-8", "surrogatepass"))
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# --------------------------------------------------------------------------------------------- raw HTTP


def raw(base_url: str, payload: bytes, timeout: float = 20.0) -> int | None:
    """Send bytes as they are; the status of the first response line, or None if none came."""
    parts = urlsplit(base_url)
    with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=timeout) as sock:
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may answer and close before taking it all; read what it said
        head = b""
        try:
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
        except OSError:
            pass
    line = head.split(b"\r\n", 1)[0].split()
    return int(line[1]) if len(line) >= 2 and line[0].startswith(b"HTTP/") and line[1].isdigit() else None


# --------------------------------------------------------------------------------------------- the probe


class Probe:
    def __init__(self, base_url: str, key: str | None) -> None:
        self.base = base_url.rstrip("/")
        self.key = key
        self.report = Report()
        self.http = requests.Session()
        self.job_id = NIL
        self.batch_id = NIL

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    def send(self, kind: str, method: str, path: str, *, headers: dict[str, str] | None = None,
             auth: bool = True, params: dict[str, str] | None = None, **kwargs: object) -> requests.Response | None:
        all_headers = (self.auth() if auth else {}) | (headers or {})
        if params:  # encoded here: lone surrogates go out as the (invalid UTF-8) bytes they would be
            path += "?" + "&".join(f"{quote(k)}={quote(v.encode('utf-8', 'surrogatepass'))}" for k, v in params.items())
        try:
            resp = self.http.request(method, self.base + path, headers=all_headers, timeout=60,
                                     allow_redirects=False, **kwargs)  # type: ignore[arg-type]
        except requests.RequestException:
            self.report.record(kind, None)
            return None
        self.report.record(kind, resp.status_code)
        return resp

    def upload(self, kind: str, files: Sequence[tuple[str, bytes]], fields: dict[str, str] | None = None,
               headers: dict[str, str] | None = None) -> requests.Response | None:
        body, ctype = _multipart(files, fields)
        return self.send(kind, "POST", "/api/v1/jobs", data=body, headers={"Content-Type": ctype} | (headers or {}))

    def run(self) -> Report:
        for step in (self.seed, self.queries, self.paths, self.methods, self.headers, self.bodies, self.fields,
                     self.audio, self.pages, self.protocol):
            step()
        return self.report

    def seed(self) -> None:
        resp = self.upload("seed:good_upload", [("good.wav", wav())])
        if resp is not None and resp.status_code == 202:
            body = resp.json()
            self.batch_id, self.job_id = body["batch_id"], body["jobs"][0]["id"]

    def queries(self) -> None:
        for endpoint in ("/api/v1/jobs", "/api/v1/export", "/history"):
            for param in LIST_PARAMS:
                for name, value in HOSTILE.items():
                    self.send(f"query:{endpoint}:{param}:{name}", "GET", endpoint, params={param: value})
        cursors: dict[str, object] = {"bigint": ["duration", 10**400, NIL], "nul_name": ["filename", "a\x00b", NIL],
                   "wrong_type": ["created_at", {"x": 1}, NIL], "short": ["x"], "not_list": {"a": 1},
                   "bad_uuid": ["created_at", "2020-01-01T00:00:00", "nope"]}
        for name, forged in cursors.items():
            token = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
            for sort in ("duration", "filename", "-created_at"):
                self.send(f"cursor:{name}:{sort}", "GET", "/api/v1/jobs", params={"cursor": token, "sort": sort})
        for name in ("format", "segments"):
            for value in ("csv", "json", "jsonl", "xml", "", "CSV ", "\x00"):
                self.send(f"export:{name}:{value!r}", "GET", "/api/v1/export", params={name: value})
        self.send("query:repeated_params", "GET", "/api/v1/jobs?status=queued&status=failed&limit=1&limit=2")
        self.send("query:undecodable_percent", "GET", "/api/v1/jobs?q=%ff%fe%00")
        self.send("query:10k_params", "GET", "/api/v1/jobs?" + "&".join(f"p{i}=1" for i in range(10_000)))

    def paths(self) -> None:
        ids = {"not_uuid": "not-a-uuid", "braced": "{" + NIL + "}", "long": "a" * 10_000, "nul": "%00",
               "dotdot": "..%2f..%2fetc%2fpasswd", "unicode": quote("\u0663" * 36), "upper": NIL.upper(),
               "int": "12345678901234567890123456789012345678"}
        for name, value in ids.items():
            for template in ("/api/v1/jobs/{}", "/api/v1/jobs/{}/audio", "/api/v1/batches/{}", "/jobs/{}",
                             "/batches/{}", "/jobs/{}/waveform.png", "/jobs/{}/spectrogram.png"):
                self.send(f"path:{template}:{name}", "GET", template.format(value))
            self.send(f"path:delete:{name}", "DELETE", f"/api/v1/jobs/{value}")
        for path in ("/static/../../etc/passwd", "/static/%2e%2e/%2e%2e/etc/passwd", "/static/" + "a/" * 2000,
                     "/api/v1/jobs/" + self.job_id + "/other.png", "/jobs/" + self.job_id + "/x.png", "/%ff",
                     "//api/v1/jobs", "/api/v1/jobs/", "/api/v2/jobs", "/" + "x" * 8000):
            self.send(f"path:{path[:60]}", "GET", path)

    def methods(self) -> None:
        routes = ("/", "/api/v1/jobs", f"/api/v1/jobs/{self.job_id}", f"/api/v1/jobs/{self.job_id}/audio",
                  "/api/v1/export", "/api/v1/openapi.json", "/healthz", "/readyz", "/login", "/upload", "/history")
        for route in routes:
            for method in ("PUT", "PATCH", "TRACE", "PROPFIND", "OPTIONS"):
                self.send(f"method:{method}:{route}", method, route)

    def headers(self) -> None:
        tokens = {"empty_bearer": "Bearer ", "basic": "Basic dXNlcjpwYXNz", "long": "Bearer " + "a" * 60_000,
                  "latin1": "Bearer \xe9\xe9", "two_spaces": "Bearer  ser_x", "lowercase": "bearer ser_x",
                  "no_scheme": "ser_abc", "tab": "Bearer\tser_x"}
        for name, value in tokens.items():
            self.send(f"auth:{name}", "GET", "/api/v1/jobs", auth=False, headers={"Authorization": value})
        self.send("auth:x_api_key_junk", "GET", "/api/v1/jobs", auth=False, headers={"X-API-Key": "\x7f" * 10})
        for name, value in {"empty": "", "long": "k" * 10_000, "latin1": "\xe9t\xe9"}.items():
            self.upload(f"idempotency:{name}", [("i.wav", wav(0.5))], headers={"Idempotency-Key": value})
        key = f"probe-{uuid.uuid4()}"
        self.upload("idempotency:first", [("a.wav", wav(0.5))], headers={"Idempotency-Key": key})
        self.upload("idempotency:other_body", [("b.wav", wav(0.6))], headers={"Idempotency-Key": key})
        for name, value in {"suffix": "bytes=-0", "past_end": "bytes=999999999-", "letters": "bytes=a-b",
                            "many": "bytes=" + ",".join(f"{i}-{i}" for i in range(500)), "units": "pages=1-2",
                            "reversed": "bytes=10-1", "huge": "bytes=0-" + "9" * 40}.items():
            self.send(f"range:{name}", "GET", f"/api/v1/jobs/{self.job_id}/audio", headers={"Range": value})
        odd: dict[str, dict[str, str]] = {
               "accept": {"Accept": "application/xml;q=bad"}, "if_none_match": {"If-None-Match": "\x00"},
               "cookie_junk": {"Cookie": "session=" + "%" * 4000}, "host_evil": {"Host": "evil.example"},
               "forwarded": {"X-Forwarded-For": "1.2.3.4, " * 200, "X-Forwarded-Proto": "gopher"},
               "content_type_json": {"Content-Type": "application/json"},
               "accept_encoding": {"Accept-Encoding": "gzip;q=NaN, *;q=2"}}
        for name, extra in odd.items():
            self.send(f"header:{name}", "GET", "/api/v1/jobs", headers=extra)

    def bodies(self) -> None:
        good = wav(0.5)
        cases: dict[str, tuple[bytes, str]] = {
            "no_boundary": (b"--x\r\n\r\n", "multipart/form-data"),
            "wrong_boundary": (_multipart([("a.wav", good)])[0], "multipart/form-data; boundary=other"),
            "truncated": (_multipart([("a.wav", good)])[0][:-40], "multipart/form-data; boundary=probe-boundary"),
            "empty_body": (b"", "multipart/form-data; boundary=probe-boundary"),
            "json": (b'{"files": []}', "application/json"),
            "urlencoded": (b"files=abc", "application/x-www-form-urlencoded"),
            "text": (b"hello", "text/plain"),
            "thousand_parts": _multipart([], {f"f{i}": "x" for i in range(1000)}),
            "part_header_1mb": (b"--probe-boundary\r\nX-Junk: " + b"a" * 1_000_000
                                + b"\r\n\r\nx\r\n--probe-boundary--\r\n",
                                "multipart/form-data; boundary=probe-boundary"),
            "no_disposition": (b"--probe-boundary\r\n\r\nx\r\n--probe-boundary--\r\n",
                               "multipart/form-data; boundary=probe-boundary"),
            "latin1_filename": (b'--probe-boundary\r\nContent-Disposition: form-data; name="file"; '
                                b'filename="\xe9\xff.wav"\r\n\r\n' + good + b"\r\n--probe-boundary--\r\n",
                                "multipart/form-data; boundary=probe-boundary"),
            "nested_multipart": _multipart([("a.wav", _multipart([("b.wav", good)])[0])]),
        }
        for name, (body, ctype) in cases.items():
            self.send(f"body:{name}", "POST", "/api/v1/jobs", data=body, headers={"Content-Type": ctype})
        names = {"nul": "a\x00b.wav", "slash": "../../x.wav", "long": "a" * 5000 + ".wav", "empty": "",
                 "dot": ".", "crlf": "a\r\nb.wav", "quote": 'a".wav', "surrogate": "\udcff.wav"}
        for name, filename in names.items():
            self.upload(f"filename:{name}", [(filename, good)])
        self.upload("files:empty_file", [("empty.wav", b"")])
        self.upload("files:many_small", [(f"f{i}.wav", good) for i in range(300)])

    def fields(self) -> None:
        good = wav(0.5)
        for fieldname in FORM_FIELDS:
            for name, value in HOSTILE.items():
                self.upload(f"field:{fieldname}:{name}", [("f.wav", good)], {fieldname: value})
        for url in WEBHOOKS:
            self.upload(f"webhook:{url[:50]}", [("w.wav", good)], {"webhook_url": url})
        metadata = {"nan": '{"a": NaN}', "big": '{"a": 1e999}', "surrogate": '{"a": "\\ud800"}',
                    "deep": '{"a": ' + "[" * 1900 + "]" * 1900 + "}", "not_object": "[1,2]", "huge": '{"a": "'
                    + "x" * 2_000_000 + '"}', "dup_keys": '{"a": 1, "a": 2}'}
        for name, value in metadata.items():
            self.upload(f"metadata:{name}", [("m.wav", good)], {"metadata": value})

    def audio(self) -> None:
        good = wav(1.0)
        cases = {"html_as_wav": b"<!doctype html><html><script>alert(1)</script></html>" * 20,
                 "seven_bit_wav": wav(1.0, bits=7), "zero_bit_wav": wav(1.0, bits=0),
                 "truncated_wav": good[:100], "riff_only": b"RIFF\x00\x00\x00\x00WAVE",
                 "flac_magic_only": b"fLaC" + b"\x00" * 100, "id3_only": b"ID3\x04\x00\x00\x00\x00\x00\x00",
                 "ogg_magic_only": b"OggS" + b"\x00" * 100, "random_bytes": np.random.default_rng(0).bytes(50_000),
                 "zip": b"PK\x03\x04" + b"\x00" * 100, "pdf": b"%PDF-1.4\n" + b"x" * 1000,
                 "huge_rate_wav": good[:24] + struct.pack("<I", 0xFFFFFFFF) + good[28:],
                 "zero_channels_wav": good[:22] + struct.pack("<H", 0) + good[24:]}
        for name, data in cases.items():
            self.upload(f"audio:{name}", [(f"{name}.wav", data)])

    def pages(self) -> None:
        self.send("page:login_junk", "POST", "/login", auth=False, data={"key": "\x00" * 100, "next": "//evil.example"})
        self.send("page:login_no_body", "POST", "/login", auth=False)
        self.send("page:login_next_js", "GET", "/login", auth=False, params={"next": "javascript:alert(1)"})
        self.send("page:upload_no_csrf", "POST", "/upload", data={"x": "y"})
        self.send("page:logout_no_csrf", "POST", "/logout")
        self.send("page:delete_no_csrf", "POST", f"/jobs/{self.job_id}/delete", data={"confirm": "yes"})
        self.send("page:docs", "GET", "/docs/api")
        self.send("page:openapi", "GET", "/api/v1/openapi.json")
        for name, value in HOSTILE.items():
            self.send(f"page:history:limit:{name}", "GET", "/history", params={"limit": value, "cursor": value})

    def protocol(self) -> None:
        host = urlsplit(self.base).netloc.encode()
        cases: dict[str, bytes] = {
            "garbage_line": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            "no_version": b"GET /healthz\r\n\r\n",
            "http09": b"GET /\r\n",
            "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "bad_version": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
            "header_64k": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
            "headers_300": b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(300))
            + b"\r\n",
            "cl_and_te": b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
            b"\r\n\r\n0\r\n\r\n",
            "negative_cl": b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "two_cl": b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            "bad_chunk": b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            "short_body": b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n",
            "space_in_header_name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
            "obs_fold": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  continued\r\n\r\n",
            "nul_in_path": b"GET /api/v1/jobs/\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
            "absolute_uri": b"GET http://evil.example/api/v1/jobs HTTP/1.1\r\nHost: " + host + b"\r\n\r\n",
            "no_host_11": b"GET /healthz HTTP/1.1\r\n\r\n",
        }
        if self.key:
            auth = f"Authorization: Bearer {self.key}\r\n".encode()
            cases = {k: v.replace(b"Host: x\r\n", b"Host: x\r\n" + auth, 1) for k, v in cases.items()}
        for name, payload in cases.items():
            # Protocol garbage may be refused by closing the connection (gunicorn does, for some):
            # that is not owed an answer; a 5xx is still a failure.
            self.report.record(f"raw:{name}", raw(self.base, payload), owed=name in {"header_64k", "headers_300"})


def run_probe(base_url: str, key: str | None) -> Report:
    return Probe(base_url, key).run()


# --------------------------------------------------------------------------------------------- command line


def _start_service(stack: ExitStack, args: argparse.Namespace) -> tuple[str, str]:
    """gunicorn as `ser web` runs it, authentication on, a fresh database and a flushed Redis db."""
    import secrets
    import tempfile

    import redis

    from bench import e2e
    from ser_shared.settings import Settings

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ser-probe-")))
    redis.Redis.from_url(args.redis_url).flushdb()
    db_url = e2e.create_database(stack, args.pg_admin_url)
    settings = Settings(env="production", database_url=db_url, broker_url=args.redis_url, data_dir=work / "data",
                        storage_dir=work / "uploads", secret_key=secrets.token_hex(16),
                        # The probe sends a few thousand uploads: limits would turn most into 429s
                        # before the input they carry is looked at.
                        rate_limit_uploads_per_minute=1_000_000, rate_limit_files_per_minute=10_000_000,
                        max_queued_jobs=1_000_000)
    env = e2e.child_env(settings)
    e2e.run_migrate(env)
    key = e2e.create_api_key(env)
    port = e2e.free_port()
    web = e2e.Child("web", [sys.executable, "-m", "ser_cli", "web", "--host", "127.0.0.1", "--port",
                            str(port), "--workers", "2"], env, work / "web.log")
    stack.callback(web.stop)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                return base, key
        except requests.RequestException:
            pass
        if not web.alive():
            raise RuntimeError(f"web exited:\n{web.log_text()[-3000:]}")
        time.sleep(0.1)
    raise RuntimeError("web not ready in 60 s")


def _table(report: Report) -> Iterator[str]:
    groups: dict[str, Counter[str]] = {}
    for kind, status in report.statuses.items():
        groups.setdefault(kind.split(":", 1)[0], Counter())["none" if status is None else str(status)] += 1
    for group, counts in groups.items():
        yield f"{group:12s} {sum(counts.values()):5d}  " + " ".join(f"{s}:{n}" for s, n in sorted(counts.items()))


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="probe this running service instead of starting one")
    p.add_argument("--key", help="API key for --url")
    p.add_argument("--pg-admin-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/10", help="FLUSHED first")
    args = p.parse_args(argv)
    with ExitStack() as stack:
        base, key = (args.url, args.key) if args.url else _start_service(stack, args)
        report = run_probe(base, key)
    for line in _table(report):
        print(line, file=sys.stderr)
    out(json.dumps(report.summary()))
    return 1 if report.server_errors or report.no_answer else 0


if __name__ == "__main__":
    sys.exit(main())

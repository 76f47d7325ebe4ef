"""The production web shape for tests: gunicorn as ``ser web`` runs it, and the shipped nginx config
(``deploy/nginx/ser.conf.template``) in front of it, both on free 127.0.0.1 ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from ser_cli.cli import _web_argv
from ser_shared.settings import REPO_ROOT, Settings
from tests.conftest import settings_env, wait_for
from tests.helpers import stop_process

TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "ser.conf.template"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int) -> bool:
    """True once ``GET /healthz`` on ``port`` answers 200."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def nginx_binary() -> str:
    """The nginx executable; a clear failure (not a skip) where it is missing."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if not found:
        pytest.fail("nginx is not installed: the production shape puts it in front of gunicorn, and this test "
                    "runs it. `apt-get install nginx` (scripts/bootstrap.sh installs it with the test extras).")
    return found


def render(template: str, values: dict[str, str]) -> str:
    """What the nginx image's entrypoint does to a template: ``${NAME}`` replaced for each given name."""
    text = template
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
    left = sorted(set(re.findall(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}", text)))
    assert not left, f"placeholders the test did not fill: {left}"
    return text


class Gunicorn:
    """``ser web``'s gunicorn command line on a free port, with ``extra_env`` on top of ``settings``."""

    def __init__(self, settings: Settings, workdir: Path, extra_env: dict[str, str] | None = None,
                 workers: int = 2) -> None:
        self.port = free_port()
        self.log_path = workdir / f"gunicorn-{self.port}.log"
        env = settings_env(settings) | {"SER_DEFAULT_QUEUE": settings.default_queue} | (extra_env or {})
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(_web_argv("127.0.0.1", self.port, workers), env=env, cwd=REPO_ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.proc.poll() is not None or answers(self.port), timeout=60, interval=0.2)
            assert self.proc.poll() is None, f"gunicorn exited:\n{self.log_text()[-3000:]}"
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


class Nginx:
    """The shipped template, rendered as the nginx image would, inside a main config that keeps
    every file (pid, logs, temp files) under ``workdir`` and stays in the foreground."""

    def __init__(self, upstream_port: int, workdir: Path, max_request_mb: int = 2048) -> None:
        self.port, self.workdir = free_port(), workdir
        server = render(TEMPLATE.read_text(), {
            "SER_PROXY_LISTEN": f"127.0.0.1:{self.port}", "SER_PROXY_UPSTREAM": f"127.0.0.1:{upstream_port}",
            "SER_MAX_REQUEST_MB": str(max_request_mb)})
        (workdir / "ser.conf").write_text(server)
        temp = {name: workdir / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
        for path in temp.values():
            path.mkdir(exist_ok=True)
        # As root, nginx's workers would switch to an unprivileged user that cannot write pytest's
        # private temp folders; in a container the image's own user does that.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (workdir / "nginx.conf").write_text(
            f"daemon off;\nmaster_process on;\nworker_processes 1;\n{user}pid {workdir}/nginx.pid;\n"
            f"error_log {workdir}/error.log info;\nevents {{ worker_connections 1024; }}\n"
            f"http {{\n  access_log {workdir}/access.log;\n"
            + "".join(f"  {name}_temp_path {path};\n" for name, path in temp.items())
            + f"  include {workdir}/ser.conf;\n}}\n")
        self.log = open(workdir / "nginx.out", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([nginx_binary(), "-p", str(workdir), "-e", str(workdir / "error.log"),
                                      "-c", str(workdir / "nginx.conf")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self.proc.poll() is not None or answers(self.port), timeout=30, interval=0.1)
            assert self.proc.poll() is None, f"nginx exited:\n{self.errors()}"
        except BaseException:
            self.stop()
            raise

    def errors(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in (self.workdir / "nginx.out",
                                                                         self.workdir / "error.log") if p.exists())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # fast shutdown: open client connections are closed
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def tone_wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    """A short 16-bit WAV made here (a 220 Hz tone): enough for an upload to be accepted."""
    import io

    import numpy as np
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    out = io.BytesIO()
    sf.write(out, (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return out.getvalue()

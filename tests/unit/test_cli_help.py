"""``ser <command> --help`` says what the command does, what each option means and its default."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from ser_cli.cli import build_parser
from ser_shared.settings import REPO_ROOT

# Commands of the server's own (the client's submit|status|history and keys have their own tests).
COMMANDS = ("serve", "web", "worker", "migrate", "webhook-secret", "train", "train-speech-detector",
            "build-encoder", "evaluate")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_is_described_with_its_default(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal's width, inside long defaults too
    command = _subcommands()[name]
    text = " ".join(command.format_help().split())
    assert command.description and " ".join(command.description.split()) in text
    for action in command._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"ser {name} {action.dest}: no description"
        if action.default is not None and not isinstance(action.default, bool):
            assert f"(default: {action.default})" in text, f"ser {name} {action.dest}: default not shown"


def test_serve_help_as_a_user_sees_it() -> None:
    proc = subprocess.run([sys.executable, "-m", "ser_cli", "serve", "--help"], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    for shown in ("Apply migrations, run web and worker together", "--port N port to listen on (default: 8000)",
                  "(default: 127.0.0.1)", "SER_WORKER_CONCURRENCY", "(default: cpu)"):
        assert shown in text, shown

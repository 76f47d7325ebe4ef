"""The ``ser`` command: the composition root that starts the web tier, the workers, or both.

Web and worker run as separate processes (exec'd), so neither imports the other; the offline
commands (``train``, ``evaluate``, ...) import ``ser_ml`` lazily, so ``ser --help`` loads none of it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ser_cli import keys
from ser_cli.keys import get_settings  # lazy: client commands never build server settings
from ser_shared import logs

if TYPE_CHECKING:
    from ser_shared.settings import Settings

log = logging.getLogger("ser")


def _register_client(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``submit|status|history`` from the client's own distribution (``client/``, ``ser-client``)."""
    try:
        from ser_client import cli as client_cli
    except ImportError:  # the server installed without it: say how to get the commands
        for name in ("submit", "status", "history"):
            p = sub.add_parser(name, help="needs the client: pip install ./client")
            p.add_argument("args", nargs=argparse.REMAINDER)
            p.set_defaults(func=_client_missing, client=True)
        return
    client_cli.register(sub)


def _client_missing(_: argparse.Namespace) -> int:
    print("ser: this command comes from the client package; install it with 'pip install ./client' "
          "(from the project folder)", file=sys.stderr)
    return 2


def _migrate(_: argparse.Namespace) -> int:
    from ser_shared.migrate import upgrade

    settings = get_settings()
    upgrade(settings)
    log.info("migrations applied database=%s", settings.db_url.split("@")[-1])
    return 0


def _web_argv(host: str, port: int, workers: int, access_log: str = "all", quiet: bool = False) -> list[str]:
    """gunicorn's command line; ``access_log`` is SER_ACCESS_LOG's all|errors|off, ``quiet`` keeps
    its start-up lines (pids, sockets) to warnings and errors."""
    # web/gunicorn_conf.py: the multiprocess metrics folder (cleared at start, dead workers marked).
    argv = [sys.executable, "-m", "gunicorn", "web.wsgi:app", "--config", "python:web.gunicorn_conf",
            "--bind", f"{host}:{port}",
            "--workers", str(workers), "--threads", "4", "--timeout", "300",
            # Trust no client's X-Forwarded-* here: web/proxy.py honours SER_TRUSTED_PROXIES hops.
            "--forwarded-allow-ips", ""]
    if access_log != "off":
        argv += ["--access-logfile", "-"]
    if access_log == "errors":
        argv += ["--logger-class", "web.gunicorn_conf.ErrorsOnlyAccessLog"]
    if quiet:
        argv += ["--log-level", "warning"]
    return argv


def _worker_argv(queues: str, concurrency: int, pool: str, loglevel: str, quiet: bool = False) -> list[str]:
    """The Celery worker's command line; ``quiet`` leaves out its start-up banner."""
    # The entry point builds the worker from this environment (create_worker(get_settings()), on
    # first access of worker.celery_app.app) in the exec'd process, never in this one.
    return [sys.executable, "-m", "celery", *(["--quiet"] if quiet else []), "-A", "worker.celery_app:app", "worker",
            "--queues", queues, "--concurrency", str(concurrency), "--pool", pool,
            "--loglevel", loglevel, "--without-gossip", "--without-mingle"]


def _web(args: argparse.Namespace) -> int:
    if _public_without_auth(args.host):
        return 2
    os.execv(sys.executable, _web_argv(args.host, args.port, args.workers, get_settings().access_log))
    return 1  # not reached


def _models_ready(models_dir: Path) -> bool:
    """Refuse to start a worker whose model artifacts are missing, corrupt or for other code:
    one clear message now, not one failed job per recording later."""
    from ser_ml.encoder import ArtifactError
    from ser_ml.inference import verify_models

    try:
        verify_models(models_dir)
    except ArtifactError as exc:
        print(f"ser: cannot start the worker: {exc}", file=sys.stderr)
        return False
    return True


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if args.check:
        return _worker_check(args.node)
    if not _models_ready(settings.models_dir):
        return 2
    concurrency = args.concurrency or settings.worker_concurrency
    os.execve(sys.executable, _worker_argv(args.queues, concurrency, args.pool, settings.log_level),
              _worker_env(settings.worker_metrics_port, os.environ.get("PROMETHEUS_MULTIPROC_DIR")))
    return 1  # not reached


def _worker_env(metrics_port: int | None, metrics_dir: str | None = None) -> dict[str, str]:
    """The worker's environment: with a metrics port, multiprocess metrics (see worker/metrics.py),
    the folder named before anything imports prometheus_client and emptied of a previous run's
    values. By default the folder is named after the port, which no other live worker on this
    host holds (see web/gunicorn_conf.py)."""
    import shutil

    env = dict(os.environ)
    if metrics_port is None:
        return env
    folder = Path(metrics_dir or Path(tempfile.gettempdir()) / "ser-metrics" / f"worker-{metrics_port}")
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return env


def _worker_check(node: str | None) -> int:
    """Liveness without the broker: 0 when a worker node on this host (or ``node``, a node id or
    its start) wrote its heartbeat within SER_WORKER_DEAD_AFTER_S, else 1. ``celery inspect ping``
    is itself a message to the worker, unanswered while every pool child is busy."""
    from datetime import UTC, datetime

    from ser_shared.clock import as_utc
    from ser_shared.db import make_engine, make_session_factory
    from worker.heartbeat import host_prefix, last_seen

    settings = get_settings()
    engine = make_engine(settings)
    try:
        seen = last_seen(make_session_factory(engine), node or host_prefix())
    except Exception as exc:  # an unreachable database is an unhealthy worker: it cannot claim jobs
        print(f"worker check: database unavailable: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    if seen is None:
        print(f"worker check: no heartbeat from {node or host_prefix()}", file=sys.stderr)
        return 1
    age = (datetime.now(UTC) - as_utc(seen)).total_seconds()
    if age > settings.worker_dead_after_s:
        print(f"worker check: last heartbeat {age:.0f} s ago", file=sys.stderr)
        return 1
    print(f"worker check: heartbeat {age:.0f} s ago")
    return 0


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _public_without_auth(host: str) -> bool:
    """True (after saying why) when asked to listen beyond this machine with authentication off."""
    if get_settings().auth_enabled or _loopback(host):
        return False
    print(f"refusing to listen on {host} without authentication: anyone who can reach it would see every "
          "recording. Set SER_AUTH=true and create a key (ser keys create --name NAME), or keep the default "
          "--host 127.0.0.1.", file=sys.stderr)
    return True


# Celery warns, over seven lines, that a worker run as root should not be. `ser serve` is one user's
# service on 127.0.0.1: its web tier runs as the same user, its queue is that user's folder, and its
# messages are JSON (the case Celery refuses outright, pickle from a broker others can write to,
# cannot arise). The warning stays for `ser worker`, where an operator chooses the user.
SERVE_WARNINGS = "ignore:You're running the worker with superuser privileges"


def _serve_worker_env(settings: Settings) -> dict[str, str]:
    env = _worker_env(settings.worker_metrics_port)
    env["PYTHONWARNINGS"] = ",".join(w for w in (env.get("PYTHONWARNINGS"), SERVE_WARNINGS) if w)
    return env


def _serve(args: argparse.Namespace) -> int:
    """Migrate, then run web and worker together until interrupted. The screen gets the URL and
    what matters: no start-up banners, no access line for every poll (SER_ACCESS_LOG)."""
    settings = get_settings()
    if _public_without_auth(args.host) or not _models_ready(settings.models_dir):
        return 2
    logging.getLogger("alembic").setLevel(logging.WARNING)  # "migrations applied" says it
    _migrate(args)
    if not settings.auth_enabled:
        log.warning("single-user mode: authentication is off (SER_AUTH=false); listening on %s only", args.host)
    if settings.is_embedded:
        log.info("embedded mode: database=%s broker=%s (set SER_DATABASE_URL / SER_BROKER_URL "
                 "for Postgres and Redis)", settings.db_url, settings.queue_url)
    procs = [
        subprocess.Popen(_worker_argv(args.queues, args.concurrency or settings.worker_concurrency,
                                      "prefork", settings.log_level, quiet=True), env=_serve_worker_env(settings)),
        subprocess.Popen(_web_argv(args.host, args.port, args.web_workers, settings.access_log, quiet=True)),
    ]
    mode = "" if settings.auth_enabled else " in single-user mode (no authentication, local only)"
    print(f"SER service running at http://{args.host}:{args.port}/{mode}  (Ctrl-C to stop)", flush=True)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(p.wait())
    # Asked to stop: a clean exit. Otherwise one child died, and its failure is ours.
    return 0 if stopping else next((c for c in codes if c), 1)


def _webhook_secret(_: argparse.Namespace) -> int:
    """Print the webhook signing secret the workers use. Never creates one: run from the wrong
    folder, a new key there would be a wrong answer, so that is an error that says what to check."""
    from ser_shared.settings import NoStoredSecret, stored_secret
    from ser_shared.webhooks import public_secret

    settings = get_settings()
    if not (settings.webhook_secret or settings.secret_key):
        try:
            stored_secret(settings.resolved_data_dir, create=False)
        except NoStoredSecret as exc:
            print(f"ser webhook-secret: {exc} Run it where the service runs, or set SER_DATA_DIR.",
                  file=sys.stderr)
            return 1
    print(public_secret(settings))
    return 0


# Kept here (not imported from ser_ml.train.training) so that `ser --help` does not load ser_ml.
AUGMENTATIONS = "telephone,noise,reverb,phone-noisy,speed"
EVAL_CONDITIONS = "telephone,telephone:gsm,noise:20,noise:10,noise:0,reverb:0.6,phone-noisy:10"
COMPARE_MODELS = "svm,knn,logreg,hgb,mlp,rf"
COMPARE_ABOUT = ("Cross-validate SVM, k-nearest neighbours, logistic regression, gradient boosting, an MLP and "
                 "the served RandomForest pipeline on the features and the speaker-independent folds (GroupKFold "
                 "by actor) of ser train, with fixed hyper-parameters; write report.md, report.json and a "
                 "confusion matrix per model (PNG, with matplotlib from the train extra).")


def _train(args: argparse.Namespace) -> int:
    from ser_ml.train.training import TrainConfig, report, train

    cfg = TrainConfig(folds=args.folds, seed=args.seed, epochs=args.epochs,
                      limit_per_actor=args.limit_per_actor, rf_trees=args.trees,
                      augment=tuple(a for a in args.augment.split(",") if a and a != "none"),
                      evaluate_conditions=tuple(c for c in args.conditions.split(",") if c and c != "none"))
    manifest = train(Path(args.data), Path(args.out), cfg)
    print(report(manifest))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ser_ml.train.compare import CompareConfig, compare, summary

    cfg = CompareConfig(folds=args.folds, seed=args.seed, rf_trees=args.trees, limit_per_actor=args.limit_per_actor,
                        augment=tuple(a for a in args.augment.split(",") if a and a != "none"),
                        models=tuple(m for m in args.models.split(",") if m), quick=args.quick,
                        cache=Path(args.cache) if args.cache else None)
    try:
        rep = compare(Path(args.data), Path(args.out), cfg)
    except ValueError as exc:
        raise SystemExit(f"ser compare: {exc}") from None
    print(summary(rep))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _train_speech_detector(args: argparse.Namespace) -> int:
    from ser_ml.train.training import add_speech_detector

    manifest = add_speech_detector(Path(args.models), Path(args.data), args.seed)
    info = manifest["speech_detector"]
    print(f"{Path(args.models) / info['file']}  sha256 {info['sha256']}  "
          f"({info['speech_rows']} speech and {info['nonspeech_rows']} non-speech clips)")
    return 0


def _build_encoder(args: argparse.Namespace) -> int:
    from ser_ml.train.training import build_encoder

    path, digest, meta = build_encoder(Path(args.out))
    print(f"{path}  sha256 {digest}\n  from {meta['packages']} (model.bin sha256 {meta['model_bin_sha256']}), "
          f"Whisper {meta['whisper_model']}, first {meta['layers_kept']} of {meta['layers_total']} encoder blocks")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Print the metrics (and write the JSON) first, the plot last: a missing plotting library costs
    the picture, never the minutes of analysis. Exit 1 when an asked-for plot could not be written."""
    from ser_ml.conditions import parse
    from ser_ml.train.evaluation import evaluate, plot_confusion, summary
    from ser_ml.train.plots import PlotsUnavailable

    try:
        parse(args.condition)
    except ValueError as exc:
        raise SystemExit(f"ser evaluate: --condition: {exc}") from None
    settings = get_settings()
    models = Path(args.models) if args.models else settings.models_dir
    rep = evaluate(Path(args.dir), models, settings, Path(args.json) if args.json else None,
                   condition=args.condition)
    print(summary(rep), flush=True)
    if args.plot:
        try:
            plot_confusion(rep, Path(args.plot))
        except PlotsUnavailable as exc:
            print(f"ser evaluate: {args.plot} not written: {exc}", file=sys.stderr)
            return 1
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows each option's default, except where there is none to show (None, a flag)
    or its text already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def _command(sub: argparse._SubParsersAction, name: str, summary: str,  # type: ignore[type-arg]
             details: str = "") -> argparse.ArgumentParser:
    """A subcommand whose --help starts with ``summary`` (also its line in ``ser --help``) and
    shows every option's default."""
    return sub.add_parser(name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {details}".strip(),
                          formatter_class=_Help)


def _listen_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", metavar="ADDRESS",
                   help="address to listen on; one other than loopback needs SER_AUTH=true")
    p.add_argument("--port", type=int, default=8000, metavar="N", help="port to listen on")


def _add_service_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = _command(sub, "serve", "apply migrations, run web and worker together",
                 "With no SER_DATABASE_URL / SER_BROKER_URL: SQLite and a filesystem queue in SER_DATA_DIR "
                 "(./var). Stops both on Ctrl-C or SIGTERM.")
    _listen_options(p)
    p.add_argument("--web-workers", type=int, default=2, metavar="N", help="gunicorn processes, 4 threads each")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="worker processes analysing recordings (default: SER_WORKER_CONCURRENCY, itself 2)")
    p.add_argument("--queues", default="cpu", metavar="NAMES",
                   help="queues the worker takes jobs from, comma-separated: cpu, gpu")
    p.set_defaults(func=_serve)

    p = _command(sub, "web", "run the web tier (API and pages) under gunicorn",
                 "Put nginx in front of it in production (deploy/nginx/ser.conf.template).")
    _listen_options(p)
    p.add_argument("--workers", type=int, default=2, metavar="N", help="gunicorn processes, 4 threads each")
    p.set_defaults(func=_web)

    p = _command(sub, "worker", "run a Celery worker", "It checks the model artifacts before it starts.")
    p.add_argument("--queues", default="cpu", metavar="NAMES",
                   help="queues to take jobs from, comma-separated: cpu, gpu")
    p.add_argument("--concurrency", type=int, default=None, metavar="N",
                   help="processes analysing recordings (default: SER_WORKER_CONCURRENCY, itself 2)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                   help="Celery's execution pool; solo for one GPU")
    p.add_argument("--check", action="store_true",
                   help="liveness probe: exit 0 if a worker on this host wrote its heartbeat lately, 1 if not")
    p.add_argument("--node", help="with --check: the node id (or its start) to check instead of this host's")
    p.set_defaults(func=_worker)

    p = _command(sub, "migrate", "apply database migrations (alembic upgrade head)",
                 "The database is SER_DATABASE_URL, or SQLite in SER_DATA_DIR (./var). A migrated database is "
                 "left as is, so it is safe to run at every deployment.")
    p.set_defaults(func=_migrate)

    p = _command(sub, "webhook-secret", "print the secret webhooks are signed with (whsec_...)",
                 "For receivers to verify signatures; it uses the same settings as the service.")
    p.set_defaults(func=_webhook_secret)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ravdess = str(Path("..") / "shared" / "datasets" / "ravdess")
    p = _command(sub, "train", "train and cross-validate the models, write models/",
                 "Speaker-independent cross-validation (folds grouped by actor), then the shipped models "
                 "fitted on every actor.")
    p.add_argument("--data", default=ravdess, metavar="DIR", help="the RAVDESS folder (its Actor_NN folders)")
    p.add_argument("--out", default="models", metavar="DIR", help="folder to write the artifacts and manifest.json to")
    p.add_argument("--folds", type=int, default=5, metavar="N", help="cross-validation folds, grouped by actor")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed (folds, forest, LSTM, degradations)")
    p.add_argument("--epochs", type=int, default=40, metavar="N",
                   help="LSTM training epochs at most (early stopping may end sooner)")
    p.add_argument("--trees", type=int, default=300, metavar="N", help="RandomForest trees")
    p.add_argument("--augment", default=AUGMENTATIONS, metavar="RECIPES",
                   help="training-copy recipes (one degraded copy of each recording per recipe), "
                        "comma-separated, or 'none'")
    p.add_argument("--conditions", default=EVAL_CONDITIONS, metavar="CONDITIONS",
                   help="conditions every test fold is also scored under (see ser evaluate --condition), "
                        "comma-separated, or 'none'")
    p.add_argument("--limit-per-actor", type=int, default=None, metavar="N",
                   help="at most this many recordings per actor, spread over the emotions, for a quick run "
                        "(default: all)")
    p.set_defaults(func=_train)

    p = sub.add_parser("compare", formatter_class=_Help, description=COMPARE_ABOUT,
                       help="cross-validate classical models (SVM, kNN, logistic regression, gradient boosting, "
                            "MLP, RandomForest) on ser train's features and folds; write a report")
    p.add_argument("--data", default=str(Path("..") / "shared" / "datasets" / "ravdess"),
                   help="RAVDESS speech folder (Actor_NN/...)")
    p.add_argument("--out", default=str(Path("docs") / "model-comparison"),
                   help="report folder: report.md, report.json, confusion-MODEL.png")
    p.add_argument("--folds", type=int, default=5, help="GroupKFold folds by actor (as ser train)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training copies and the models (as ser train)")
    p.add_argument("--trees", type=int, default=300, help="the RandomForest's trees (as ser train)")
    p.add_argument("--augment", default=AUGMENTATIONS,
                   help="training-copy recipes, as ser train (comma-separated, or 'none')")
    p.add_argument("--models", default=COMPARE_MODELS, help="which models, comma-separated")
    p.add_argument("--limit-per-actor", type=int, default=None, help="files per actor (quick runs)")
    p.add_argument("--quick", action="store_true",
                   help="small model settings for smoke tests (figures not comparable)")
    p.add_argument("--cache", default=None,
                   help="keep the features in this .npz between runs (used only if made with the same data "
                        "and settings)")
    p.set_defaults(func=_compare)

    p = _command(sub, "train-speech-detector",
                 "(re)train only the no_speech check of a models folder (ser train includes it)")
    p.add_argument("--data", default=ravdess, metavar="DIR", help="the RAVDESS folder: the speech it learns from")
    p.add_argument("--models", default="models", metavar="DIR", help="the models folder to add it to")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed")
    p.set_defaults(func=_train_speech_detector)

    p = _command(sub, "build-encoder", "write the Whisper encoder artifact (the layers the models use) "
                                       "from the installed wheel, checking its hashes")
    p.add_argument("--out", default="models", metavar="DIR", help="folder to write it to")
    p.set_defaults(func=_build_encoder)

    p = _command(sub, "evaluate", "score the served models on a folder of labelled recordings")
    p.add_argument("dir", help="folder with RAVDESS-named or Indian EmoSpeech-named audio (searched recursively)")
    p.add_argument("--json", help="write the full report (metrics, per-file predictions) here")
    p.add_argument("--plot", help="write the confusion-matrix PNG here (needs matplotlib)")
    p.add_argument("--models", help="model directory (default: SER_MODELS_DIR)")
    p.add_argument("--condition", default="clean",
                   help="degrade each recording first, reproducibly (seeded by its name): clean, "
                        "telephone, telephone:alaw, telephone:gsm, noise:SNR, noise:TYPE:SNR (white, pink, brown, "
                        "babble), reverb, reverb:RT60, gain:DB, speed:F, phone-noisy:SNR")
    p.set_defaults(func=_evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ser", description="Speech emotion recognition job service")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_service_commands(sub)
    keys.register(sub)
    _register_client(sub)
    _add_model_commands(sub)
    return parser


def _stdout_closed() -> int:
    """stdout's reader went away (``ser keys list | head``): stop quietly, as the Python docs advise
    (signal module, "Note on SIGPIPE"), with the status a shell gives SIGPIPE (128 + 13)."""
    # Python flushes stdout once more at exit; pointed at devnull, that flush cannot fail again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Client commands run on machines with no server configuration: they never build Settings.
    logs.configure("WARNING" if getattr(args, "client", False) else get_settings().log_level)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not in the flush at exit
    except BrokenPipeError:
        return _stdout_closed()
    return code


if __name__ == "__main__":
    sys.exit(main())

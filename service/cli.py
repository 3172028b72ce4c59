"""The ``mergeshield`` command: the library's commands (scan, zoo, bv, merge) plus the service's.

    serve        API + one worker on the embedded default (SQLite, filesystem broker): one machine
    api          the API alone (scale out: api + N workers on Redis and PostgreSQL)
    worker       a Celery worker (queues gpu,cpu when CUDA is present, else cpu)
    worker-ping  exit 0 if this host's worker answers (a container health check)
    db upgrade   apply database migrations
    keys         create, list and revoke API keys
    reconcile    one reconciler pass: re-enqueue what the broker lost
    cleanup      one retention pass: remove expired scan artifacts and unused uploads
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from mergeshield import cli as library_cli
from mergeshield.settings import Settings

SERVICE_COMMANDS = ("serve", "api", "worker", "worker-ping", "db", "keys", "reconcile",
                    "cleanup")


def _extend(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("serve", help="API + worker on one machine (embedded default)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="worker processes to start")
    s.add_argument("--auth", action="store_true",
                   help="require API keys (default: none, for local use only)")
    a = sub.add_parser("api", help="the HTTP API alone")
    a.add_argument("--host", default="127.0.0.1")
    a.add_argument("--port", type=int, default=8000)
    a.add_argument("--processes", type=int, default=1,
                   help="uvicorn worker processes (each runs the reconciler; duplicates are safe)")
    for parser in (s, a):
        parser.add_argument("--access-log", action="store_true",
                            help="log every request (default: off; /metrics counts them)")
    w = sub.add_parser("worker", help="a scan worker")
    w.add_argument("--queues", help="comma-separated: gpu,cpu (default: by CUDA presence)")
    w.add_argument("--concurrency", type=int, default=1, help="scans at once (1 per GPU)")
    w.add_argument("--hostname", default="mergeshield@%h")
    p = sub.add_parser("worker-ping", help="exit 0 if this host's worker answers a ping")
    p.add_argument("--hostname", default=f"mergeshield@{socket.gethostname()}")
    d = sub.add_parser("db", help="database schema")
    d.add_argument("db_command", choices=["upgrade"])
    k = sub.add_parser("keys", help="API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create")
    kc.add_argument("--name", required=True)
    kc.add_argument("--admin", action="store_true")
    ksub.add_parser("list")
    kr = ksub.add_parser("revoke")
    kr.add_argument("key_id")
    sub.add_parser("reconcile", help="one reconciler pass")
    sub.add_parser("cleanup", help="one retention pass (MERGESHIELD_ARTIFACT_RETENTION, "
                                   "MERGESHIELD_UPLOAD_RETENTION)")


def build_parser() -> argparse.ArgumentParser:
    return library_cli.build_parser(_extend)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command not in SERVICE_COMMANDS:
        return library_cli.main(argv)
    settings = Settings()
    from worker.logs import configure

    configure(settings.json_logs)
    handler = {"serve": _serve, "api": _api, "worker": _worker, "worker-ping": _ping,
               "db": _db, "keys": _keys, "reconcile": _reconcile,
               "cleanup": _cleanup}[args.command]
    return handler(args, settings)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.main import create_app
    from worker import migrate
    from worker.db import Database

    env = dict(os.environ)
    if not args.auth:
        env["MERGESHIELD_AUTH_DISABLED"] = "true"
        settings = settings.model_copy(update={"auth_disabled": True})
    migrate.upgrade(Database(settings.database()))  # before the workers look at the tables
    # each worker in a session of its own: a terminal's Ctrl-C reaches serve alone, which stops
    # the workers itself, and a worker's pool processes can be stopped with it as one group;
    # a serve killed outright (SIGKILL, OOM) takes its workers with it (``_die_with``)
    workers = [subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--queues",
                                 "gpu,cpu", "--hostname", f"embedded{i}@%h"], env=env,
                                start_new_session=True, preexec_fn=_die_with(os.getpid()))
               for i in range(args.workers)]
    url = f"http://{args.host}:{args.port}"
    print(f"MergeShield {'(no auth, local use) ' if not args.auth else ''}on {url}  "
          f"API docs: {url}/docs  data: {settings.data_dir}", flush=True)
    # uvicorn stops on SIGTERM/SIGINT, then raises the signal again under the previous handler:
    # SIGTERM's default would end this process there, before the workers are stopped
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None,
                    access_log=args.access_log)
    except KeyboardInterrupt:  # SIGINT, raised again by uvicorn after its own shutdown
        pass
    finally:
        _stop_workers(workers, settings.worker_stop_timeout)
    return 0


def _die_with(parent: int) -> Callable[[], None] | None:
    """Run in a worker before it starts (Linux): when ``parent`` dies by any means, the kernel
    sends the worker SIGQUIT, Celery's cold shutdown, which stops its pool too; a scan it was
    running is re-queued by the reconciler when the service is back. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None

    def arm() -> None:
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGQUIT)
        if os.getppid() != parent:  # it died before the line above could arm the signal
            os._exit(1)

    return arm


def _exit_on_signal(signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def _stop_workers(workers: list[subprocess.Popen[bytes]], patience: float) -> None:
    """SIGTERM each worker (warm shutdown), then SIGKILL its whole group after ``patience``
    seconds: a scan still running is re-queued by the reconciler when the service is back."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut this short
    for proc in workers:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + patience
    for proc in workers:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):  # its pool processes too
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _api(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.main import create_app

    if args.processes > 1:  # each process builds its app from the environment
        uvicorn.run("service.main:app", factory=True, host=args.host, port=args.port,
                    workers=args.processes, log_config=None, access_log=args.access_log)
    else:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None,
                    access_log=args.access_log)
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    import torch

    from worker.app import app, prepare_broker

    prepare_broker(settings)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # bars are noise in logs
    queues = args.queues or ("gpu,cpu" if torch.cuda.is_available() else "cpu")
    app.worker_main(["worker", "--loglevel=INFO", f"--queues={queues}",
                     f"--concurrency={args.concurrency}", "--pool=prefork",
                     f"--hostname={args.hostname}", "--without-gossip", "--without-mingle"])
    return 0


def _ping(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import app

    replies = app.control.ping(destination=[args.hostname], timeout=3.0)
    print(json.dumps(replies))
    return 0 if replies else 1


def _db(args: argparse.Namespace, settings: Settings) -> int:
    from worker import migrate
    from worker.db import Database

    migrate.upgrade(Database(settings.database()))
    print("database schema is up to date")
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from sqlalchemy import select, update

    from service.auth import create_key
    from worker import migrate
    from worker.db import ApiKey, Database, now

    db = Database(settings.database())
    migrate.upgrade(db)
    if args.keys_command == "create":
        row, key = create_key(db, args.name, args.admin)
        print(json.dumps({"id": row.id, "name": row.name, "admin": row.is_admin, "key": key}))
        return 0
    with db.session() as s:
        if args.keys_command == "revoke":
            done: Any = s.execute(update(ApiKey).where(ApiKey.id == args.key_id)
                                  .values(revoked_at=now()))
            print(json.dumps({"revoked": bool(done.rowcount)}))
            return 0 if done.rowcount else 1
        for row in s.scalars(select(ApiKey).order_by(ApiKey.created_at)):
            print(json.dumps({"id": row.id, "name": row.name, "prefix": row.prefix,
                              "admin": row.is_admin, "revoked": row.revoked_at is not None}))
    return 0


def _reconcile(args: argparse.Namespace, settings: Settings) -> int:
    from worker.app import create_celery
    from worker.db import Database
    from worker.reconcile import reconcile

    done = reconcile(Database(settings.database()), create_celery(settings), settings)
    print(json.dumps(vars(done)))
    return 0


def _cleanup(args: argparse.Namespace, settings: Settings) -> int:
    from worker import migrate
    from worker.cleanup import cleanup
    from worker.db import Database

    db = Database(settings.database())
    migrate.upgrade(db)
    print(json.dumps(vars(cleanup(db, settings))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A loopback stand-in for the Hugging Face Hub that the real ``huggingface_hub`` client talks to.

Serves repos registered from local folders over real HTTP on 127.0.0.1 (pass ``endpoint=hub.url``):

    GET  /api/{models|datasets}/{repo}[/revision/{rev}]    repo info (id, sha, siblings, private)
    GET  /api/{models|datasets}/{repo}/tree/{rev}[/{dir}]  file listing (``recursive=`` honoured)
    HEAD/GET /[datasets/]{repo}/resolve/{rev}/{path}       file bytes with X-Repo-Commit, ETag, size

    POST /api/models/{repo}/discussions                    open a discussion (token needed)
    GET  /api/models/{repo}/discussions/{num}              its details (``hub.discussions``)

Errors carry the ``X-Error-Code`` header the client maps to RepositoryNotFoundError,
RevisionNotFoundError and EntryNotFoundError; private repos answer 401 without
``Authorization: Bearer <hub.token>``. ``hub.fail_with(503)`` makes every request fail,
``hub.slow(30)`` makes every answer wait, ``hub.stop()`` takes the server down (connection
refused) and ``hub.start()`` brings it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

RepoType = Literal["model", "dataset"]


@dataclass
class _Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes


class LoopbackHub:
    """An in-memory hub of repos, served by a thread; see the module docstring."""

    token = "hf_loopback_read_token_0123456789"  # the one token that opens private repos

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.failure: int | None = None
        self.delay = 0.0  # seconds every answer waits
        self.requests: list[str] = []  # "METHOD path", for assertions on what the client did
        self.discussions: dict[str, list[dict[str, str]]] = {}  # repo -> [{title, description}]
        self._server: ThreadingHTTPServer | None = None
        self._port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    endpoint = url

    def add_repo(self, repo_id: str, folder: str | Path, repo_type: RepoType = "model",
                 private: bool = False) -> str:
        """Publish ``folder`` as the new head of ``main``; returns its commit sha."""
        root = Path(folder)
        files = {p.relative_to(root).as_posix(): p.read_bytes()
                 for p in sorted(root.rglob("*")) if p.is_file()}
        digest = hashlib.sha1(f"{repo_type}:{repo_id}".encode())
        for path, data in files.items():
            digest.update(f"{path}\0{hashlib.sha256(data).hexdigest()}\0".encode())
        sha = digest.hexdigest()
        repo = self.repos.setdefault((repo_type, repo_id), _Repo(private))
        repo.private = private
        repo.commits[sha] = files
        repo.branches["main"] = sha
        return sha

    def fail_with(self, status: int | None) -> None:
        """Answer every request with ``status`` (e.g. 500, 503); None serves normally again."""
        self.failure = status

    def slow(self, seconds: float) -> None:
        """Wait ``seconds`` before every answer (past a client's timeout: a hung hub)."""
        self.delay = seconds

    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            owner = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Go down: later connections are refused until ``start()``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    owner: LoopbackHub

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        """Quiet: tests read ``hub.requests`` instead."""

    def do_HEAD(self) -> None:  # noqa: N802 - stdlib naming
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def do_POST(self) -> None:  # noqa: N802
        """Only opening a discussion on a model repo, with the token."""
        hub = self.owner
        path = urlsplit(self.path).path
        hub.requests.append(f"POST {path}")
        parts = [unquote(p) for p in path.strip("/").split("/")]
        data = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        repo_id = "/".join(parts[2:-1])
        if parts[:2] != ["api", "models"] or parts[-1] != "discussions":
            self._error(404, None, "unknown route", True)
        elif self.headers.get("Authorization") != f"Bearer {hub.token}":
            self._error(401, None, "Invalid credentials in Authorization header", True)
        elif ("model", repo_id) not in hub.repos:
            self._error(404, "RepoNotFound", "Repository not found", True)
        else:
            opened = hub.discussions.setdefault(repo_id, [])
            opened.append({"title": data["title"], "description": data["description"]})
            self._send(200, json.dumps({"num": len(opened)}).encode(),
                       {"Content-Type": "application/json"})

    def _send(self, status: int, data: bytes = b"", headers: dict[str, str] | None = None,
              body: bool = True) -> None:
        # a client that gave up (past its timeout on a delayed hub) hung up: nothing to answer
        with contextlib.suppress(ConnectionError):
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    def _error(self, status: int, code: str | None, message: str, body: bool,
               extra: dict[str, str] | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, body)

    def _serve(self, body: bool) -> None:
        hub = self.owner
        url = urlsplit(self.path)
        hub.requests.append(f"{self.command} {url.path}")
        time.sleep(hub.delay)
        if hub.failure is not None:
            self._error(hub.failure, None, "the loopback hub is failing on purpose", body)
            return
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "discussions":
            self._discussion("/".join(parts[2:4]), int(parts[5]), body)
        elif parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            self._api(("model" if parts[1] == "models" else "dataset"), parts[2:],
                      parse_qs(url.query), body)
        elif "resolve" in parts:
            repo_type: RepoType = "model"
            if parts[0] == "datasets":
                repo_type, parts = "dataset", parts[1:]
            i = parts.index("resolve")
            if len(parts) <= i + 2:
                self._error(404, "EntryNotFound", "no file", body)
                return
            self._file(repo_type, "/".join(parts[:i]), parts[i + 1], "/".join(parts[i + 2:]),
                       body)
        else:
            self._error(404, None, "unknown route", body)

    def _discussion(self, repo_id: str, num: int, body: bool) -> None:
        opened = self.owner.discussions.get(repo_id, [])
        if not 0 < num <= len(opened):
            self._error(404, None, "Discussion not found", body)
            return
        details = {"num": num, "title": opened[num - 1]["title"], "status": "open",
                   "author": {"name": "mergeshield"}, "createdAt": "2026-01-01T00:00:00.000Z",
                   "repo": {"name": repo_id, "type": "model"}, "isPullRequest": False,
                   "events": []}
        self._send(200, json.dumps(details).encode(), {"Content-Type": "application/json"}, body)

    def _lookup(self, repo_type: RepoType, repo_id: str, rev: str,
                body: bool) -> tuple[str, dict[str, bytes]] | None:
        repo = self.owner.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", body)
            return None
        if repo.private and self.headers.get("Authorization") != f"Bearer {self.owner.token}":
            self._error(401, "RepoNotFound", "Invalid username or password.", body)
            return None
        sha = repo.branches.get(rev, rev)
        if sha not in repo.commits:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body)
            return None
        return sha, repo.commits[sha]

    def _api(self, repo_type: RepoType, rest: list[str], query: dict[str, list[str]],
             body: bool) -> None:
        # rest: owner, name, [revision|tree, rev, path...]
        split = next((i for i, p in enumerate(rest) if p in ("revision", "tree")), len(rest))
        repo_id, tail = "/".join(rest[:split]), rest[split:]
        rev = tail[1] if len(tail) >= 2 else "main"
        found = self._lookup(repo_type, repo_id, rev, body)
        if found is None:
            return
        sha, files = found
        repo = self.owner.repos[(repo_type, repo_id)]
        if tail[:1] == ["tree"]:
            prefix = "/".join(tail[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            listing = _tree(files, prefix, recursive)
            self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"},
                       body)
            return
        info = {"id": repo_id, "_id": sha[:24], "sha": sha, "private": repo.private,
                "author": repo_id.split("/")[0], "tags": [], "downloads": 0, "likes": 0,
                "siblings": [{"rfilename": p, "size": len(d)} for p, d in files.items()]}
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

    def _file(self, repo_type: RepoType, repo_id: str, rev: str, path: str, body: bool) -> None:
        found = self._lookup(repo_type, repo_id, rev, body)
        if found is None:
            return
        sha, files = found
        if path not in files:
            self._error(404, "EntryNotFound", f"{path} does not exist", body,
                        {"X-Repo-Commit": sha})
            return
        data = files[path]
        etag = hashlib.sha256(data).hexdigest()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = _range_start(self.headers.get("Range"))
        if start is not None and 0 < start <= len(data):
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send(206, data[start:], headers, body)
        else:
            self._send(200, data, headers, body)


def _range_start(value: str | None) -> int | None:
    if not value or not value.startswith("bytes=") or not value.endswith("-"):
        return None
    try:
        return int(value[len("bytes="):-1])
    except ValueError:
        return None


def _tree(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, object]]:
    """The hub's tree listing: folders and files under ``prefix``."""
    base = f"{prefix}/" if prefix else ""
    entries: dict[str, dict[str, object]] = {}
    for path, data in files.items():
        if not path.startswith(base):
            continue
        rel = path[len(base):].split("/")
        for depth in range(1, len(rel)):  # the folders on the way
            folder = base + "/".join(rel[:depth])
            if recursive or depth == 1:
                entries.setdefault(folder, {"type": "directory", "path": folder, "size": 0,
                                            "oid": hashlib.sha1(folder.encode()).hexdigest()})
        if recursive or len(rel) == 1:
            entries[path] = {"type": "file", "path": path, "size": len(data),
                             "oid": hashlib.sha1(data).hexdigest()}
    return list(entries.values())


@pytest.fixture
def hub() -> Iterator[LoopbackHub]:
    """A started loopback hub; pass ``endpoint=hub.url``. Sets nothing global."""
    server = LoopbackHub().start()
    try:
        yield server
    finally:
        server.stop()

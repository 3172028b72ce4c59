"""The hostile corpora through the real service: every file case uploaded and, when the upload
is accepted, scanned by a real worker against clean models; then what left the service judged.
Used by ``tests/service/test_hostile_inputs.py`` (round 1), ``test_hostile2_service.py`` (round
2) and ``bench/reliability.py``.

A case reaches the service as a user sends it (:func:`upload`): a file as its bytes, a folder as
a zip with one top folder. What an upload cannot carry as such travels in the archive the way
``tar`` and ``zip -y`` keep it: a symbolic link as a link member, a FIFO or socket as a member
of that type (a client that followed the link or read the FIFO would send its own user's files,
or hang on its own side, and never put a hostile input before the server).

:func:`round2` says where the service ends each round-2 case, by what the case is:

* a link or a special file reaches the service only as such an archive member, which the API
  refuses at upload: ``unsafe_archive`` (the library says ``unsafe_file`` of the same thing in
  a folder on its disk; a dangling link is refused for being a link before it is found empty);
* an archive, and a bare ``.safetensors`` file (its header is read in the API), end at upload
  with the library's code; everything else is judged by the worker, with the library's code;
* :data:`OTHER_CODE` lists the cases the service refuses otherwise, each with why;
* a case in the role of the given BV is not sent (:data:`NOT_SENT`): the API has no such input.
"""

from __future__ import annotations

import io
import os
import stat
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

import httpx

from tests.support import hostile, hostile2
from tests.support.hostile import MAX_UPLOAD_BYTES, Make, save_base
from tests.support.stack import Stack

# what the hostile stacks run with, matching hostile.LIMITS
STACK_ENV = {"MERGESHIELD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
             "MERGESHIELD_MAX_UNPACKED_BYTES": str(64 * 2**20),
             "MERGESHIELD_MAX_ARCHIVE_FILES": "10000"}
# a secret only a leaked environment could show (HF_TOKEN is also the token the scans hold)
CANARY_ENV = {"MERGESHIELD_CANARY": hostile2.CANARY, "HF_TOKEN": hostile2.CANARY}
# nothing listens there: a case that made a worker reach for the hub ends hub_unavailable
CLOSED_HUB = "http://127.0.0.1:9"
FAST = {"probes": False, "inversion": False}
Stage = Literal["upload", "scan"]


@dataclass(frozen=True)
class ServiceCase:
    """A hostile input as the service meets it: the model it stands for in a scan, and where
    and with which stable code the service ends it (``code`` None: the scan succeeds)."""

    kind: str
    name: str
    make: Make
    code: str | None
    refused_at: Stage
    role: Literal["suspect", "base"] = "suspect"
    gap: str | None = None  # why the scanner does not refuse it yet (a strict xfail)

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


def round1(case: hostile.Case) -> ServiceCase:
    return ServiceCase(case.kind, case.name, case.make, case.code, case.refused_at, gap=case.gap)


NOT_SENT = {"bv": "the API takes no given BV (the CLI's --bv); its own way to a non-finite "
                  "output, options.fixed_lambda NaN or inf, is a 422 (test_request_edges.py)"}
OTHER_CODE: dict[str, tuple[Stage, str, str]] = {
    "alloc/config.json over 64 MiB (sparse file)": (
        "upload", "unsafe_archive", "zipped, it unpacks past the stack's 64 MiB limit"),
}
HEADER_AT_UPLOAD = ("alloc/header", "tensor/safetensors")  # bare .safetensors files


def round2(case: hostile2.Case) -> ServiceCase | None:
    """``case`` as the service meets it (see the module docstring); None: not sent."""
    if case.role not in ("suspect", "base"):
        return None
    stage: Stage = "scan"
    code = case.code
    if case.id in OTHER_CODE:
        stage, code, _why = OTHER_CODE[case.id]
    elif case.kind in ("link", "special"):
        stage, code = "upload", "unsafe_archive"
    elif case.kind == "archive" or case.id.startswith(HEADER_AT_UPLOAD):
        stage = "upload"
    return ServiceCase(case.kind, case.name, case.make, code, stage, case.role)


# -- uploading -----------------------------------------------------------------------------------
def _add(zf: zipfile.ZipFile, path: Path, name: str) -> None:
    """``path`` as the member ``name``; a link or a special file as a member of its own type."""
    mode = path.lstat().st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        zf.write(path, name)
        return
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    zf.writestr(info, os.readlink(path) if stat.S_ISLNK(mode) else b"")


def zip_folder(folder: Path) -> bytes:
    """A flat HF-layout folder as a zip with one top folder, as users upload it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.iterdir()):
            _add(zf, path, f"{folder.name}/{path.name}")
    return buf.getvalue()


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    """POST a file, or a folder zipped (a link or special file: zipped alone, as it is)."""
    if path.is_dir() and not path.is_symlink():
        return client.post("/v1/uploads", files={"file": (f"{path.name}.zip", zip_folder(path))})
    if not stat.S_ISREG(path.lstat().st_mode):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            _add(zf, path, path.name)
        return client.post("/v1/uploads", files={"file": (f"{path.name}.zip", buf.getvalue())})
    with open(path, "rb") as f:
        return client.post("/v1/uploads", files={"file": (path.name, f)})


# -- running -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """Where the service ended a case and with which code (None: accepted, scan succeeded)."""

    case: ServiceCase
    stage: str = "upload"
    code: str | None = None
    status: int = 0
    canary: Path = field(default_factory=Path)
    scan_id: str | None = None
    state: str | None = None  # the scan's final state
    seconds: float = 0.0  # the scan's time in the worker
    answers: list[str] = field(default_factory=list)  # every API answer about this case

    @property
    def ran(self) -> bool:
        return self.canary.exists()


def run_cases(client: httpx.Client, cases: Sequence[ServiceCase], work: Path,
              timeout: float = 300) -> list[Outcome]:
    """Upload every case; scan the accepted ones with the clean suspect or base in the other
    role; wait for all scans (queued at once) and read the succeeded ones' reports."""
    fx = hostile2.build_fixtures(work / "fixtures")
    clean = {"base": upload(client, save_base(work / "base" / "vit-base")),
             "suspect": upload(client, fx.suspect)}
    assert all(r.status_code == 201 for r in clean.values()), [r.text for r in clean.values()]
    out: list[Outcome] = []
    for i, case in enumerate(cases):
        folder = work / f"case{i}"
        o = Outcome(case, canary=folder / "canary")
        r = upload(client, case.make(folder / "in", o.canary))
        o.status, o.answers = r.status_code, [r.text]
        if r.status_code != 201:
            o.code = r.json().get("error", {}).get("code")
        else:
            o.stage = "scan"
            ids = {role: {"upload": r.json()["id"]} if role == case.role
                   else {"upload": clean[role].json()["id"]} for role in ("suspect", "base")}
            s = client.post("/v1/scans", json={**ids, "force": True, "options": FAST})
            assert s.status_code == 202, s.text
            o.scan_id = s.json()["id"]
        out.append(o)
    deadline = time.monotonic() + timeout
    for o in out:
        while o.scan_id is not None:
            r = client.get(f"/v1/scans/{o.scan_id}")
            body = r.json()
            if body["state"] in ("succeeded", "failed", "cancelled"):
                _finished(client, o, r)
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"scan of {o.case.id} still {body['state']}")
            time.sleep(0.2)
    return out


def _finished(client: httpx.Client, o: Outcome, r: httpx.Response) -> None:
    body = r.json()
    o.status, o.state = 200, body["state"]
    o.code = (body.get("error") or {}).get("code")
    o.answers.append(r.text)
    if body["started_at"] and body["finished_at"]:
        o.seconds = (datetime.fromisoformat(body["finished_at"])
                     - datetime.fromisoformat(body["started_at"])).total_seconds()
    if o.state == "succeeded":
        for fmt in ("json", "sarif", "html"):
            o.answers.append(client.get(f"/v1/scans/{o.scan_id}/report",
                                        params={"format": fmt}).text)


# -- judging -------------------------------------------------------------------------------------
SECRETS = (hostile2.CANARY, hostile2.OUTSIDE_SECRET, "root:x:0:0")
STACK_FOLDERS = ("data", "cache", "tmp")  # what a hostile stack may write in its root
TRACEBACK = "Traceback (most recent call last)"


def hostile_stack(root: Path, backend: str, hub: str = CLOSED_HUB, redis_db: int = 15) -> Stack:
    """A stack for the hostile corpora: their limits, the canary in its environment, its
    temporary files and caches inside ``root``, and ``hub`` as its hub (a test passes an empty
    loopback hub, to see that no case made a worker reach for it). Redis db 15 is no other
    test's (the bench passes its own, so it can run beside the tests)."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    return Stack(root, backend, redis_db=redis_db, env={
        **STACK_ENV, **CANARY_ENV, "HF_ENDPOINT": hub, "TMPDIR": str(root / "tmp"),
        "HF_HOME": str(root / "cache" / "hf")})


def leaks(stack: Stack, outcomes: Sequence[Outcome]) -> Iterator[str]:
    """Where a secret of the stack's environment (or of the machine) or a server path shows: an
    API answer, a report, the database, any file the stack wrote (uploads, outputs, logs)."""
    secrets = {*SECRETS, stack.env.get("HF_TOKEN") or hostile2.CANARY}
    for o in outcomes:
        for text in o.answers:
            if any(s in text for s in secrets):
                yield f"{o.case.id}: a secret in an API answer"
            if str(stack.root) in text:
                yield f"{o.case.id}: a server path in an API answer"
    for scan_id, row in stack.rows().items():
        if any(s in str(row) for s in secrets):
            yield f"a secret in the database row of scan {scan_id}"
    for path in stack.root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            if any(s.encode() in data for s in secrets):
                yield f"a secret in {path.relative_to(stack.root)}"


def tracebacks(stack: Stack, outcomes: Sequence[Outcome]) -> Iterator[str]:
    """Tracebacks in an API answer or a process's log, and ``internal_error`` codes (a bug)."""
    for o in outcomes:
        if any(TRACEBACK in text for text in o.answers) or o.code == "internal_error":
            yield o.case.id
    for path in stack.root.glob("*.log"):
        if TRACEBACK in path.read_text(errors="replace"):
            yield path.name


def strays(stack: Stack, work: Path) -> Iterator[str]:
    """Files written where nothing may be: in the stack's root outside its folders (and logs),
    in the client's case folders besides the inputs they built."""
    for path in stack.root.iterdir():
        if path.name not in STACK_FOLDERS and path.suffix != ".log":
            yield f"stack/{path.name}"
    for folder in work.glob("case*"):  # (a case may build its input elsewhere: no folder)
        for path in folder.iterdir():
            if path.name != "in":
                yield f"{folder.name}/{path.name}"


def alive(client: httpx.Client, work: Path, timeout: float = 120) -> Iterator[str]:
    """Problems with the stack after the corpus: /readyz not ready, a clean scan not finishing."""
    ready = client.get("/readyz")
    if ready.status_code != 200:
        yield f"/readyz answered {ready.status_code}: {ready.text[:300]}"
    base = upload(client, save_base(work / "alive" / "vit-base"))
    s = client.post("/v1/scans", json={"suspect": {"upload": base.json()["id"]},
                                       "base": {"upload": base.json()["id"]}, "force": True,
                                       "options": FAST})
    deadline = time.monotonic() + timeout
    while (state := client.get(f"/v1/scans/{s.json()['id']}").json())["state"] not in (
            "succeeded", "failed", "cancelled"):
        if time.monotonic() > deadline:
            yield f"a clean scan is still {state['state']} after {timeout} s"
            return
        time.sleep(0.2)
    if state["state"] != "succeeded":
        yield f"a clean scan ended {state['state']}: {state.get('error')}"

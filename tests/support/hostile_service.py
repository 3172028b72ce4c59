"""The hostile corpus through the real service: every file case uploaded (a folder as a zip) and,
when the upload is accepted, scanned against a clean base, and the request tricks (paths, ids,
content types, sizes) sent as they are. Used by ``tests/service/test_hostile_inputs.py`` and by
``bench/reliability.py``.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.hostile import MAX_UPLOAD_BYTES, Case, save_base

# what the hostile stack runs with, matching hostile.LIMITS
STACK_ENV = {"MERGESHIELD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
             "MERGESHIELD_MAX_UNPACKED_BYTES": str(64 * 2**20),
             "MERGESHIELD_MAX_ARCHIVE_FILES": "10000"}
FAST = {"probes": False, "inversion": False}


def zip_folder(folder: Path) -> bytes:
    """A flat HF-layout folder as a zip with one top folder, as users upload it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{folder.name}/{path.name}")
    return buf.getvalue()


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    """POST a file, or a folder zipped."""
    if path.is_dir():
        return client.post("/v1/uploads", files={"file": (f"{path.name}.zip", zip_folder(path))})
    with open(path, "rb") as f:
        return client.post("/v1/uploads", files={"file": (path.name, f)})


@dataclass
class Outcome:
    """Where the service refused a case and with which code (None: accepted)."""

    case: Case
    stage: str = "upload"
    code: str | None = None
    status: int = 0
    canary: Path = field(default_factory=Path)
    scan_id: str | None = None

    @property
    def ran(self) -> bool:
        return self.canary.exists()


def run_cases(client: httpx.Client, cases: list[Case], work: Path,
              timeout: float = 300) -> list[Outcome]:
    """Upload every case; scan the accepted ones against a clean base; wait for all scans."""
    base = upload(client, save_base(work / "base" / "vit-base"))
    assert base.status_code == 201, base.text
    out: list[Outcome] = []
    for i, case in enumerate(cases):
        folder = work / f"case{i}"
        o = Outcome(case, canary=folder / "canary")
        r = upload(client, case.make(folder / "in", o.canary))
        o.status = r.status_code
        if r.status_code != 201:
            o.code = r.json().get("error", {}).get("code")
        else:
            o.stage = "scan"
            s = client.post("/v1/scans", json={"suspect": {"upload": r.json()["id"]},
                                               "base": {"upload": base.json()["id"]},
                                               "force": True, "options": FAST})
            assert s.status_code == 202, s.text
            o.scan_id = s.json()["id"]
        out.append(o)
    deadline = time.monotonic() + timeout
    for o in out:
        while o.scan_id is not None:
            body = client.get(f"/v1/scans/{o.scan_id}").json()
            if body["state"] in ("succeeded", "failed", "cancelled"):
                o.status = 200
                o.code = (body.get("error") or {}).get("code")
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"scan of {o.case.id} still {body['state']}")
            time.sleep(0.2)
    return out


# -- request tricks ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestCase:
    name: str
    method: str
    url: str  # sent as is: percent escapes are not decoded by the client
    status: int
    code: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    group: str = ""  # for the figures: ids in paths, model references, ...

    @property
    def id(self) -> str:
        return f"request/{self.name}"


# ids as a client may send them; every one must be an ordinary "no such scan/upload"
TRICKY_IDS = {
    "dot-dot": "..", "dot-dot-slash": "..%2F..%2Fv1%2Fkeys", "encoded-dots": "%2e%2e",
    "double-encoded": "%252e%252e%252fkeys", "backslashes": "..%5C..%5Cetc%5Cpasswd",
    "nul": "abc%00def", "rtl-override": "%E2%80%AEfdp.exe", "zero-width": "a%E2%80%8Bb",
    "fullwidth-dots": "%EF%BC%8E%EF%BC%8E", "overlong-utf8": "%C0%AE%C0%AE",
    "lone-surrogate": "%ED%A0%80", "long-id": "a" * 8000, "sql": "x'%20OR%20'1'='1",
    "upload-of-another": "0" * 32,
}

BAD_REFS: dict[str, dict[str, Any]] = {
    "hub-parent-path": {"hub": "../../etc/passwd"}, "hub-dot-dot": {"hub": "org/.."},
    "hub-encoded": {"hub": "org/%2e%2e"}, "hub-nul": {"hub": "org/name\x00"},
    "hub-rtl": {"hub": "org/\u202eevil"}, "hub-absolute": {"hub": "/etc/passwd"},
    "hub-long": {"hub": "o" * 500 + "/x"}, "hub-newline": {"hub": "org/name\nX-Evil: 1"},
    "upload-path": {"upload": "../../../etc/passwd"}, "both": {"hub": "a/b", "upload": "0" * 32},
    "revision-long": {"hub": "a/b", "revision": "r" * 10_000},
}


def request_cases() -> list[RequestCase]:
    """Path and unicode tricks in ids, bad model references, wrong content types, big bodies."""
    cases: list[RequestCase] = []
    for name, raw in TRICKY_IDS.items():
        for route in ("/v1/scans/{}", "/v1/scans/{}/report", "/v1/uploads/{}"):
            label = route.split("/")[2] + ("-report" if "report" in route else "")
            cases.append(RequestCase(f"{label}-id-{name}", "GET", route.format(raw), 404,
                                     "not_found", group="ids in paths"))
    for name in ("suspect", "verdict"):  # filters reach the database too
        cases.append(RequestCase(f"scans-filter-{name}-nul", "GET", f"/v1/scans?{name}=a%00b",
                                 422, "invalid_request", group="ids in paths"))
    good = {"hub": "a/b"}
    for name, ref in BAD_REFS.items():
        for role in ("suspect", "base"):
            body = {"suspect": good, "base": good, role: ref}
            cases.append(RequestCase(f"scan-{role}-{name}", "POST", "/v1/scans", 422,
                                     "invalid_request", {"json": body}, "model references"))
    for name, evaluation in (("eval-absolute-path", "/etc/passwd"), ("eval-parent", "../x"),
                             ("eval-nul", "mnist\x00")):
        cases.append(RequestCase(f"scan-{name}", "POST", "/v1/scans", 422, "invalid_request",
                                 {"json": {"suspect": good, "base": good,
                                           "evaluation": evaluation}}, "model references"))
    body = b'{"suspect": {"hub": "a/b"}, "base": {"hub": "a/b"}}'
    for name, ctype, content in (
            ("scan-as-text-plain", "text/plain", body),
            ("scan-as-form", "application/x-www-form-urlencoded", b"suspect=a%2Fb&base=a%2Fb"),
            ("scan-bad-json", "application/json", body[:-3]),
            ("scan-json-array", "application/json", b"[1, 2]"),
            ("scan-multipart", "multipart/form-data; boundary=x", b"--x--\r\n")):
        cases.append(RequestCase(name, "POST", "/v1/scans", 422, "invalid_request",
                                 {"content": content, "headers": {"content-type": ctype}},
                                 "content types and bodies"))
    # a body the JSON parser gives up on (RecursionError) is a 400, still with a stable code
    cases.append(RequestCase("scan-deep-json", "POST", "/v1/scans", 400, "invalid_request", {
        "content": b"[" * 50_000 + b"]" * 50_000, "headers": {"content-type": "application/json"}},
        "content types and bodies"))
    for name, ctype, content in (
            ("upload-as-json", "application/json", b'{"file": "model.safetensors"}'),
            ("upload-as-octet-stream", "application/octet-stream", b"\0" * 64),
            ("upload-multipart-no-boundary", "multipart/form-data", b"x"),
            ("upload-multipart-no-file-part", "multipart/form-data; boundary=x",
             b'--x\r\nContent-Disposition: form-data; name="other"\r\n\r\nv\r\n--x--\r\n')):
        cases.append(RequestCase(name, "POST", "/v1/uploads", 400, "invalid_input",
                                 {"content": content, "headers": {"content-type": ctype}},
                                 "content types and bodies"))
    for name, filename, content, status, code in (
            ("upload-name-parent-pkl", "../../../../tmp/evil.pkl", b"x", 400, "unsafe_format"),
            ("upload-name-nul", "model\x00.safetensors", b"\xff" * 64, 400,
             "corrupt_checkpoint"),
            ("upload-name-rtl", "evil\u202egpj.safetensors", b"\xff" * 64, 400,
             "corrupt_checkpoint"),
            ("upload-name-text", "notes.txt", b"hello", 400, "invalid_input"),
            ("upload-too-large", "big.safetensors", b"\0" * (MAX_UPLOAD_BYTES + 1), 413,
             "payload_too_large")):
        cases.append(RequestCase(name, "POST", "/v1/uploads", status, code,
                                 {"files": {"file": (filename, content)}},
                                 "upload names and sizes"))
    return cases


def send(client: httpx.Client, case: RequestCase) -> httpx.Response:
    return client.request(case.method, case.url, **case.kwargs)


def error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


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

"""The request tricks of the hostile corpus: path and unicode tricks in ids, bad model
references, wrong content types, odd upload names and sizes, each sent to a real API as is and
answered with its status and stable code. Used by ``tests/service/test_hostile_inputs.py`` and
by ``bench/reliability.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.support.hostile import MAX_UPLOAD_BYTES


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
    scan_json = b'{"suspect": {"hub": "a/b"}, "base": {"hub": "a/b"}}'
    for name, ctype, content in (
            ("scan-as-text-plain", "text/plain", scan_json),
            ("scan-as-form", "application/x-www-form-urlencoded", b"suspect=a%2Fb&base=a%2Fb"),
            ("scan-bad-json", "application/json", scan_json[:-3]),
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

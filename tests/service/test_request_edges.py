"""Bad requests answered at the door (issue 13): options out of their bounds, unknown datasets,
a reused Idempotency-Key and broken uploads are refused at once with a stable code, naming the
user's file; nothing is queued or kept. The API alone runs: nothing here reaches a worker."""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stack import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("edges"), "sqlite-filesystem")
    try:
        yield s.start_api().wait_up()
    finally:
        s.close()


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with stack.client() as c:
        yield c


def _scan(**extra: Any) -> dict[str, Any]:
    return {"suspect": {"hub": "zoo/suspect"}, "base": {"hub": "zoo/base"}, **extra}


def _scans(stack: Stack) -> int:
    return len(stack.rows())


BAD_OPTIONS = [  # (options, where pydantic says the problem is)
    ({"fixed_lambda": math.nan}, ["options", "fixed_lambda"]),
    ({"fixed_lambda": -1}, ["options", "fixed_lambda"]),
    ({"lambdas": [0.5, math.inf]}, ["options", "lambdas", 1]),
    ({"lambdas": []}, ["options", "lambdas"]),
    ({"budget_points": math.nan}, ["options", "budget_points"]),
    ({"min_asr_gap": 2}, ["options", "min_asr_gap"]),
    ({"seed": 10**400}, ["options", "seed"]),
    ({"max_eval": 1e12}, ["options", "max_eval"]),
    ({"inversion_steps": 10**9}, ["options", "inversion_steps"]),
    ({"recipe": {"epochs": 1e8}}, ["options", "recipe", "epochs"]),
    ({"recipe": {"lr": math.nan}}, ["options", "recipe", "lr"]),
    ({"recipe": {"poison_rate": 0}}, ["options", "recipe", "poison_rate"]),
    ({"recipe": {"batch_size": 10**7}}, ["options", "recipe", "batch_size"]),
    ({"recipe": {"max_train": 10**12}}, ["options", "recipe", "max_train"]),
    ({"recipe": {"seed": -1}}, ["options", "recipe", "seed"]),
    ({"focus": {"keep": math.nan}}, ["options", "focus"]),
    ({"triggers": [{"kind": "patch", "seed": 2**40}]}, ["options", "triggers", 0, "patch", "seed"]),
    ({"user_targets": [-3]}, ["options", "user_targets", 0]),
]


@pytest.mark.parametrize(("options", "loc"), BAD_OPTIONS, ids=[str(o) for o, _ in BAD_OPTIONS])
def test_options_out_of_bounds_are_422_and_nothing_is_queued(
        stack: Stack, client: httpx.Client, options: dict[str, Any], loc: list[Any]) -> None:
    before = _scans(stack)
    r = client.post("/v1/scans", content=json.dumps(_scan(options=options)),  # NaN, Infinity
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_request"
    assert ["body", *loc] in [d["loc"] for d in error["details"]], error
    assert "Traceback" not in r.text and _scans(stack) == before


def test_a_watch_with_a_nan_option_is_422_and_not_stored(client: httpx.Client) -> None:
    body = {"repo": "org/model", "scan": {"base": {"hub": "org/base"}, "evaluation": "mnist5k",
                                          "options": {"fixed_lambda": math.nan}}}
    r = client.post("/v1/watches", content=json.dumps(body),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert ["body", "scan", "options", "fixed_lambda"] in [
        d["loc"] for d in r.json()["error"]["details"]]
    assert client.get("/v1/watches").json() == []


def test_bounds_are_in_the_openapi_schema(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    options = schemas["ScanOptions"]["properties"]
    assert (options["seed"]["minimum"], options["seed"]["maximum"]) == (0, 2**32 - 1)
    assert options["lambdas"]["items"]["maximum"] == 100
    assert options["max_eval"]["anyOf"][0]["maximum"] == 1_000_000
    assert schemas["InjectionRecipe"]["properties"]["epochs"]["maximum"] == 100


@pytest.mark.parametrize("name", ["nosuchdata", "nosuchdata:rot90", "mnist5k:nosuchmod"])
def test_unknown_datasets_are_422_before_anything_is_queued(
        stack: Stack, client: httpx.Client, name: str) -> None:
    before = _scans(stack)
    for field in ("evaluation", "injection_data"):
        r = client.post("/v1/scans", json=_scan(**{field: name}))
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"][0]["loc"] == ["body", field]
        assert "no dataset" in r.json()["error"]["details"][0]["msg"]
    assert _scans(stack) == before
    for good in ("mnist5k", "mnist5k:rot90:classes=0-4", "someone/some-data:inverted"):
        assert client.post("/v1/scans", json=_scan(evaluation=good)).status_code == 202


def test_an_idempotency_key_is_bound_to_its_body(stack: Stack, client: httpx.Client) -> None:
    key = {"Idempotency-Key": "edges-1"}
    first = client.post("/v1/scans", json=_scan(), headers=key)
    again = client.post("/v1/scans", json=_scan(), headers=key)
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    before = _scans(stack)
    other = client.post("/v1/scans", json=_scan(options={"seed": 7}), headers=key)
    assert other.status_code == 422, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert error["details"] == {"idempotency_key": "edges-1", "scan": first.json()["id"]}
    assert _scans(stack) == before


# --- uploads ------------------------------------------------------------------------------


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _left_in_tmp(stack: Stack) -> list[Path]:
    return list((stack.root / "data" / "uploads" / "tmp").rglob("*"))


BAD_UPLOADS = [  # (file name, bytes, status, code)
    ("empty.safetensors", b"", 400, "invalid_input"),
    ("empty.bin", b"", 400, "invalid_input"),
    ("notes.zip", _zip({"model/README.md": b"# no weights", "model/config.json": b"{}"}), 400,
     "nothing_scannable"),
    ("long.zip", _zip({"/".join(["d" * 200] * 25) + "/model.safetensors": b"x"}), 400,
     "unsafe_archive"),
    ("broken.safetensors", b"\xff" * 64, 400, "corrupt_checkpoint"),
    ("shards.zip", _zip({"m/model.safetensors": b"\x08" + b"\0" * 7 + b"{oops}!!"}), 400,
     "corrupt_checkpoint"),
]


@pytest.mark.parametrize(("name", "data", "status", "code"), BAD_UPLOADS,
                         ids=[u[0] for u in BAD_UPLOADS])
def test_bad_uploads_are_refused_at_once_naming_the_users_file(
        stack: Stack, client: httpx.Client, name: str, data: bytes, status: int,
        code: str) -> None:
    before = client.get("/v1/uploads").json()
    r = client.post("/v1/uploads", files={"file": (name, data)})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code, error
    assert name in error["message"], error
    text = r.text
    assert ".part" not in text and "tmp" not in text and str(stack.root) not in text, text
    assert client.get("/v1/uploads").json() == before
    assert _left_in_tmp(stack) == []


def test_a_multipart_body_cut_before_its_closing_boundary_is_refused(
        stack: Stack, client: httpx.Client) -> None:
    body = (b'--XX\r\nContent-Disposition: form-data; name="file"; filename="cut.safetensors"'
            b"\r\nContent-Type: application/octet-stream\r\n\r\n" + b"\0" * 5000)  # no --XX--
    r = client.post("/v1/uploads", content=body,
                    headers={"Content-Type": "multipart/form-data; boundary=XX"})
    assert r.status_code == 400, r.text
    assert "cut.safetensors" in r.json()["error"]["message"]
    assert "closing boundary" in r.json()["error"]["message"]
    assert _left_in_tmp(stack) == []

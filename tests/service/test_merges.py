"""``/v1/merges`` end to end (issue 17), against real processes on both backends: a mergekit plan
over the quick zoo's task fine-tunes, one of them backdoored and uploaded, the others on the
loopback hub (the base at a commit sha), runs as a job like a scan: queued, followed, its
result called back signed, its report and merged model served, a bad plan refused before
anything is queued, a running one cancelled, and none of it visible to another key."""

from __future__ import annotations

import io
import json
import time
import zipfile
from collections.abc import Iterator
from html import escape
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from safetensors import safe_open

from mergeshield.merge_defence import SCALES
from tests.service.conftest import CLEANING, SUSPECT, Published, zipped
from tests.support.receiver import Receiver
from tests.support.stack import BACKENDS, Stack
from tests.support.zoo import Zoo

# clean fine-tunes of the two other tasks, published on the hub: with the upload, issue 17's
# plan of the three task fine-tunes of one family, one of them backdoored
GOODS = ("vit-digits-clean", "vit-mnist-rot90-clean")
# the round trip's scan with a one-epoch repair: on the quick zoo it already removes the planted
# trigger (the CLI: the same verdicts, every found trigger removed on the merge at γ = 0.75)
SCAN = {**CLEANING, "unlearning": {"epochs": 1}}
FINISHED = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request: pytest.FixtureRequest, published: Published, bv_cache_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp(f"merges-{request.param}"), request.param, redis_db=8,
               env=published.env(bv_cache_dir, MERGESHIELD_CALLBACK_ALLOW_PRIVATE="true",
                                  MERGESHIELD_KEY_MAX_ACTIVE_SCANS="1")) as s:
        yield s.up()


def _key(stack: Stack, admin: httpx.Client, name: str) -> Iterator[httpx.Client]:
    key = admin.post("/v1/keys", json={"name": name}).json()["key"]
    with stack.client(key) as c:
        yield c


@pytest.fixture(scope="module")
def user(stack: Stack, admin: httpx.Client) -> Iterator[httpx.Client]:
    yield from _key(stack, admin, "merger")


@pytest.fixture(scope="module")
def other(stack: Stack, admin: httpx.Client) -> Iterator[httpx.Client]:
    yield from _key(stack, admin, "someone-else")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver().start()
    try:
        yield rx
    finally:
        rx.stop()


@pytest.fixture(scope="module")
def plan(user: httpx.Client, zoo: Zoo, published: Published) -> dict[str, Any]:
    """The library test's plan (tests/mergeshield/test_merge_plan.py) as a service takes it: the
    backdoored model uploaded, the clean one and the base on the hub, the base at its sha."""
    base = zoo.model(SUSPECT)["base"]
    base_sha = published.hub.add_repo(f"zoo/{base}", zoo.path(base))  # as published: same sha
    data = {}
    for name in GOODS:
        published.hub.add_repo(f"zoo/{name}", zoo.path(name))
        data[f"zoo/{name}"] = f"zoo/{zoo.model(name)['task']}"
        published.hub.add_repo(data[f"zoo/{name}"], zoo.dataset(name), repo_type="dataset")
    r = user.post("/v1/uploads", files={"file": (f"{SUSPECT}.zip", zipped(zoo.path(SUSPECT)))})
    assert r.status_code == 201, r.text
    bad = f"upload:{r.json()['id']}"
    return {"merge_method": "task_arithmetic", "base_model": f"zoo/{base}@{base_sha}",
            "models": [{"model": m, "parameters": {"weight": 1.0}} for m in (bad, *data)],
            "mergeshield": {"evaluation": {bad: published.dataset, **data}, "scan": SCAN}}


def wait(client: httpx.Client, merge_id: str, stack: Stack, *, until: Any = None,
         timeout: float = 300) -> tuple[dict[str, Any], list[str]]:
    """Poll the merge until it finished (or ``until(body)``); its last body and the stages seen."""
    deadline, stages = time.monotonic() + timeout, []
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/v1/merges/{merge_id}").json()
        if body.get("stage") and body["stage"] not in stages[-1:]:
            stages.append(body["stage"])
        if (until(body) if until else body.get("state") in FINISHED):
            return body, stages
        time.sleep(0.25)
    raise AssertionError(f"merge {merge_id} still {body} after {timeout} s\n{stack.logs(4000)}")


@pytest.fixture(scope="module")
def finished(stack: Stack, user: httpx.Client, plan: dict[str, Any],
             receiver: Receiver) -> dict[str, Any]:
    """The plan, as YAML text with a signed result callback, followed until it finished."""
    hook = receiver.expect(f"merge-{stack.backend}", secrets=[])
    endpoint = user.post("/v1/webhooks/endpoints", json={"url": hook})
    receiver.routes[f"/merge-{stack.backend}"].secrets = endpoint.json()["secrets"]
    body = {"plan": yaml.safe_dump(plan), "callback_url": hook}
    r = user.post("/v1/merges", json=body, headers={"Idempotency-Key": "merge-1"})
    assert r.status_code == 202, r.text
    assert r.headers["location"] == f"/v1/merges/{r.json()['id']}" and r.headers["retry-after"]
    again = user.post("/v1/merges", json=body, headers={"Idempotency-Key": "merge-1"})
    assert again.json()["id"] == r.json()["id"]  # a retried POST: the same merge
    done, stages = wait(user, r.json()["id"], stack)
    return {**done, "stages": stages}


def test_a_plan_runs_end_to_end_and_its_report_has_each_tasks_numbers(
        finished: dict[str, Any], user: httpx.Client, plan: dict[str, Any], zoo: Zoo,
        stack: Stack) -> None:
    assert finished["state"] == "succeeded", finished
    assert finished["percent"] == 100.0 and finished["verdict"] == "backdoor_suspected"
    assert any(s.startswith("scan 1/3: ") for s in finished["stages"]), finished["stages"]
    bad, *goods = (m["model"] for m in plan["models"])
    report = finished["report"]
    rows = {r["model"]: r for r in report["models"]}
    label = next(m for m in rows if m.startswith(f"upload:{SUSPECT}.zip ({bad[7:]}, sha256 "))
    assert (rows[label]["verdict"], rows[label]["merged_as"]) == ("backdoor_suspected", "cleaned")
    for good in goods:
        assert (rows[good]["verdict"], rows[good]["merged_as"]) == ("no_backdoor_found", "as is")
    for row in rows.values():  # each task: the fine-tune alone, the plain merge, the defended
        # one and the merge without the flagged model
        assert all(row[f"accuracy_{at}"]["total"] > 0
                   for at in ("alone", "undefended", "merged", "without")), row
    found = rows[label]["asr_merged"]
    # lowered by the defence (how far: tests/mergeshield/test_merge_plan.py and the bench)
    assert found and all(a["rate"] <= rows[label]["asr_undefended"][t]["rate"]
                         and t in rows[label]["asr_alone"] and t in rows[label]["asr_without"]
                         for t, a in found.items()), rows[label]
    assert report["defence"]["scale"] in SCALES and report["policy"] == "clean"
    assert finished["summary"]["scale"] == report["defence"]["scale"]
    served = user.get(f"/v1/merges/{finished['id']}/report")
    assert served.json() == report
    for server in (str(stack.root), str(stack.root.resolve()), "uploads/"):
        assert server not in served.text  # an upload is named by its label, never its path


def test_the_merged_model_downloads_and_loads(finished: dict[str, Any], user: httpx.Client,
                                              tmp_path: Path) -> None:
    got = user.get(f"/v1/merges/{finished['id']}/checkpoint")
    assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
        assert "plan-report.json" not in zf.namelist()
        zf.extractall(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        assert any(k.startswith("vit.encoder.layer.") for k in f.keys())  # noqa: SIM118
    assert float(meta["mergeshield.correction_scale"]) == finished["report"]["defence"]["scale"]
    assert "cleaned" in {v["merged_as"] for v in json.loads(meta["mergeshield.verdicts"]).values()}
    single = user.get(f"/v1/merges/{finished['id']}/checkpoint", params={"layout": "file"})
    assert single.content == (tmp_path / "model.safetensors").read_bytes()


def test_lists_pages_and_the_signed_callback(finished: dict[str, Any], user: httpx.Client,
                                            receiver: Receiver, stack: Stack) -> None:
    listed = user.get("/v1/merges").json()
    assert finished["id"] in {m["id"] for m in listed["items"]}
    assert all(m["report"] is None for m in listed["items"])  # the report: GET one merge
    assert finished["id"] not in {s["id"] for s in user.get("/v1/scans").json()["items"]}
    assert user.get(f"/v1/scans/{finished['id']}").status_code == 404  # a merge is no scan
    page = user.get(f"/ui/merges/{finished['id']}").text
    report = finished["report"]
    for row in report["models"]:
        for at in ("alone", "undefended", "merged"):
            assert f"{100 * row[f'accuracy_{at}']['rate']:.1f} %" in page
        for trigger, asr in row["asr_merged"].items():
            assert f"<code>{escape(trigger)}</code>" in page
            assert f"{100 * asr['rate']:.1f} %" in page
    assert f'data-field="gamma">{report["defence"]["scale"]:g}<' in page
    assert "Merged model (zip)" in page
    assert finished["id"] in user.get("/ui/merges").text
    callback = json.loads(receiver.wait_for(f"merge-{stack.backend}")[0].body)
    assert (callback["type"], callback["data"]["id"]) == ("merge.succeeded", finished["id"])
    assert callback["data"]["links"]["report"] == f"/v1/merges/{finished['id']}/report"


def _plan_with(plan: dict[str, Any], **change: Any) -> dict[str, Any]:
    return {**plan, **change}


def test_bad_plans_are_a_4xx_with_a_stable_code_and_queue_nothing(
        stack: Stack, user: httpx.Client, other: httpx.Client, plan: dict[str, Any]) -> None:
    options = plan["mergeshield"]
    bad: list[tuple[Any, int, str]] = [
        (_plan_with(plan, merge_method="slerp"), 422, "invalid_config"),  # not merged here
        (_plan_with(plan, base_model="/etc/hosts"), 422, "invalid_config"),  # a server path
        (_plan_with(plan, mergeshield={**options, "evaluation": {"zoo/x": "zoo/mnist"}}), 422,
         "invalid_config"),  # task data for a model the plan does not merge
        (_plan_with(plan, mergeshield={**options, "evaluation": {plan["models"][1]["model"]:
                                                                  "nosuchdata"}}),
         422, "invalid_config"),
        (_plan_with(plan, mergeshield={**options, "scan": {"lambdas": [-1]}}), 422,
         "invalid_config"),
        (_plan_with(plan, mergeshield={**options, "scan": {"bv": "/etc/bv"}}), 422,
         "invalid_config"),
        ("merge_method: [unclosed", 422, "invalid_config"),  # not YAML
        ("a: &x [1, 2]\nb: [*x, *x]", 422, "invalid_config"),  # aliases: a YAML bomb's tool
        ("- just a list", 422, "invalid_config"),
        ({"plan": None}, 422, "invalid_request"),  # not a plan at all (the body's own schema)
    ]
    before = len(stack.rows())
    for body, status, code in bad:
        payload = body if isinstance(body, dict) and set(body) == {"plan"} else {"plan": body}
        r = user.post("/v1/merges", json=payload)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (body, r.text)
    r = other.post("/v1/merges", json={"plan": plan})  # someone else's upload
    assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), r.text
    assert len(stack.rows()) == before


def test_another_key_cannot_see_a_merge(finished: dict[str, Any], other: httpx.Client,
                                        admin: httpx.Client) -> None:
    mid = finished["id"]
    for method, url in (("GET", f"/v1/merges/{mid}"), ("GET", f"/v1/merges/{mid}/report"),
                        ("GET", f"/v1/merges/{mid}/checkpoint"),
                        ("POST", f"/v1/merges/{mid}/cancel")):
        r = other.request(method, url)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "not_found"), url
    assert other.get("/v1/merges").json()["total"] == 0
    assert "Not found" in other.get(f"/ui/merges/{mid}").text
    assert admin.get(f"/v1/merges/{mid}").json()["state"] == "succeeded"  # the admin sees all


def test_a_running_merge_is_cancelled_and_holds_the_quota_until_then(
        stack: Stack, finished: dict[str, Any], user: httpx.Client,
        plan: dict[str, Any]) -> None:
    # a trigger inversion of many minutes: only the cancellation check between its steps stops it
    slow = _plan_with(plan, mergeshield={**plan["mergeshield"], "scan": {
        "inversion": True, "inversion_steps": 10_000, "probes": False, "max_eval": 200}})
    r = user.post("/v1/merges", json={"plan": slow})
    assert r.status_code == 202, r.text
    mid = r.json()["id"]
    wait(user, mid, stack, until=lambda b: "invert_triggers" in (b.get("stage") or ""))
    busy = user.post("/v1/merges", json={"plan": plan})  # this key may run one job at a time
    assert (busy.status_code, busy.json()["error"]["code"]) == (429, "quota_exceeded")
    cancelled = user.post(f"/v1/merges/{mid}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert user.post(f"/v1/merges/{mid}/cancel").status_code == 409
    deadline = time.monotonic() + 30
    while "merge stopped" not in stack.logs() and time.monotonic() < deadline:
        time.sleep(0.25)  # the worker stops within seconds
    assert "merge stopped" in stack.logs(), stack.logs(3000)
    assert not (stack.root / "data" / "scans" / mid).exists()  # its partial output removed
    row = stack.rows()[mid]
    assert (row["kind"], row["state"], row["error_code"]) == ("merge", "cancelled", "cancelled")


def test_a_plan_whose_model_is_missing_fails_with_its_code(
        stack: Stack, finished: dict[str, Any], user: httpx.Client,
        plan: dict[str, Any]) -> None:
    missing = _plan_with(plan, models=[{"model": "zoo/no-such-model"}], mergeshield={})
    r = user.post("/v1/merges", json={"plan": missing})
    assert r.status_code == 202, r.text
    failed, _ = wait(user, r.json()["id"], stack, timeout=120)
    assert (failed["state"], failed["error"]["code"]) == ("failed", "source_not_found"), failed
    assert user.get(f"/v1/merges/{failed['id']}/report").status_code == 409

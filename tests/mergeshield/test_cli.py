"""The ``mergeshield`` command as CI uses it: a real subprocess, exit codes and formats."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.support.zoo import Zoo


def _run(args: list[str], cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MERGESHIELD_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "mergeshield.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600, check=False)


def _scan(zoo: Zoo, name: str, *extra: str) -> list[str]:
    """Exit codes and formats: the paper's IBVS alone (the repair is tests/.../test_unlearning)."""
    return ["scan", str(zoo.path(name)), "--base", str(zoo.path(zoo.model(name)["base"])),
            "--eval", str(zoo.dataset(name)), "--no-inversion", "--no-unlearning", *extra]


def test_backdoored_exits_1_with_json_on_stdout(zoo: Zoo, bv_cache_dir: Path,
                                                tmp_path: Path) -> None:
    out = tmp_path / "cleaned"
    proc = _run(_scan(zoo, "vit-mnist-rot90-badnets", "--format", "json", "--out", str(out),
                      "--report", "json,sarif,html,text"), bv_cache_dir)
    assert proc.returncode == 1, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["verdict"]["status"] == "backdoor_suspected"
    assert report["cleaning"]["unlearning"] == []  # --no-unlearning: IBVS alone
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "report.json",
                                              "report.sarif", "report.html", "report.txt"}


def test_clean_exits_0_with_a_text_summary(zoo: Zoo, bv_cache_dir: Path) -> None:
    proc = _run(_scan(zoo, "vit-mnist-rot90-clean"), bv_cache_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "Verdict: NO BACKDOOR FOUND" in proc.stdout
    # piped, the scan says where it is: a line per stage and at least every 5 s (issue 15)
    said = [(float(m[1]), m[2], int(m[3])) for m in
            re.finditer(r"^\[\s*([\d.]+)%\] (\S+) \((\d+) s\)$", proc.stderr, re.M)]
    stages = [stage for _, stage, _ in said]
    assert stages[0] == "resolve" and {"measure_suspect", "sweep", "summary"} <= set(stages)
    assert [p for p, _, _ in said] == sorted(p for p, _, _ in said)
    assert all(b - a <= 7 for (_, _, a), (_, _, b) in zip(said, said[1:], strict=False))


def test_sarif_format(zoo: Zoo, bv_cache_dir: Path) -> None:
    proc = _run(_scan(zoo, "vit-mnist-rot90-clean", "--format", "sarif", "--no-probes"),
                bv_cache_dir)
    assert json.loads(proc.stdout)["version"] == "2.1.0"


@pytest.mark.parametrize("content", [b"", b"\x00" * 7, b"\xff" * 64])
def test_broken_input_exits_2_with_a_json_error(zoo: Zoo, tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(content)
    proc = _run(["scan", str(bad), "--base", str(zoo.path("vit-base"))], tmp_path)
    assert proc.returncode == 2
    error = json.loads(proc.stderr.strip().splitlines()[-1])["error"]
    assert error["code"] == "corrupt_checkpoint"


def test_folder_without_weights_exits_3(zoo: Zoo, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    proc = _run(["scan", str(tmp_path), "--base", str(zoo.path("vit-base"))], tmp_path)
    assert proc.returncode == 3, proc.stderr


def test_usage_errors_exit_4(tmp_path: Path) -> None:
    assert _run(["scan"], tmp_path).returncode == 4
    assert _run(["scan", "x", "--base", "y", "--fail-on", "SOMETIMES"], tmp_path).returncode == 4


def test_bv_compute_compare_and_merge(zoo: Zoo, tmp_path: Path) -> None:
    for kind in ("badnets", "blended"):
        proc = _run(["bv", "compute", "--clean", str(zoo.path("vit-mnist-clean")),
                     "--backdoored", str(zoo.path(f"vit-mnist-{kind}")),
                     "--out", str(tmp_path / kind)], tmp_path)
        assert proc.returncode == 0, proc.stderr
    proc = _run(["bv", "compare", str(tmp_path / "badnets"), str(tmp_path / "blended")], tmp_path)
    matrix = json.loads(proc.stdout)["cosine"]
    assert matrix[0][0] == 1.0 and matrix[0][1] == matrix[1][0] and -1 <= matrix[0][1] < 1
    proc = _run(["merge", str(zoo.path("vit-mnist-clean")), str(zoo.path("vit-digits-clean")),
                 "--base", str(zoo.path("vit-base")), "--method", "ties", "--weights", "1.0",
                 "--subtract", str(tmp_path / "badnets"), "--subtract-lambda", "0.5",
                 "--out", str(tmp_path / "merged")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    proc = _run(["merge", str(zoo.path("vit-mnist-clean")), str(zoo.path("vit-digits-clean")),
                 "--base", str(zoo.path("vit-base")), "--method", "dare_ties", "--keep", "0.5",
                 "--seed", "3", "--weights", "1.0", "--out", str(tmp_path / "dare")], tmp_path)
    assert proc.returncode == 0, proc.stderr
    with safe_open(str(tmp_path / "dare" / "model.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["mergeshield.merge"])
    assert {k: recorded[k] for k in ("method", "keep", "seed", "normalize")} == {
        "method": "dare_ties", "keep": 0.5, "seed": 3, "normalize": None}  # mergekit's: off


def _main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object]]:
    from mergeshield.cli import main

    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, json.loads(err.strip().splitlines()[-1])["error"]


def test_an_unexpected_exception_exits_2_as_internal_error_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    """Exit 1 means "findings" to a CI gate: a crash must never look like one."""
    from mergeshield import cli_commands

    def crash(*_args: object) -> int:
        raise KeyError(str(tmp_path / "server-side-path"))

    monkeypatch.setattr(cli_commands, "run_scan", crash)
    code, error = _main(["scan", "x", "--base", "y"], capsys)
    assert (code, error["code"]) == (2, "internal_error")
    assert str(tmp_path) not in json.dumps(error)


def test_an_out_of_bounds_option_exits_2_as_invalid_config(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, error = _main(["scan", "x", "--base", "y", "--lambda", "nan"], capsys)
    assert (code, error["code"]) == (2, "invalid_config")
    assert "fixed_lambda" in str(error["message"])


def test_a_cheaper_injection_is_an_option_with_bounds(capsys: pytest.CaptureFixture[str]) -> None:
    """--inject-epochs / --inject-max-train (issue 15: a big model's scan spends most of its time
    building BV_inj); out of bounds, the same invalid_config as any scan option."""
    from mergeshield.cli import build_parser
    from mergeshield.cli_commands import _request

    args = build_parser().parse_args(["scan", "x", "--base", "y", "--inject-epochs", "1",
                                      "--inject-max-train", "500"])
    recipe = _request(args).recipe
    assert (recipe.epochs, recipe.max_train, recipe.lr) == (1, 500, 1e-3)  # the rest: defaults
    code, error = _main(["scan", "x", "--base", "y", "--inject-epochs", "0"], capsys)
    assert (code, error["code"]) == (2, "invalid_config") and "epochs" in str(error["message"])


def test_a_trigger_file_lists_triggers_with_their_targets(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--trigger @file.json (issue 15): the user's own trigger list, beside plain --trigger."""
    from mergeshield.cli import build_parser
    from mergeshield.cli_commands import _request

    listed = tmp_path / "triggers.json"
    listed.write_text(json.dumps(["blended:noise:0.15",
                                  {"trigger": "patch:solid:2:top_left", "target": 4}]))
    args = build_parser().parse_args([
        "scan", "x", "--base", "y", "--trigger", "patch:checkerboard:3:bottom_right",
        "--target", "1", "--trigger", f"@{listed}"])
    request = _request(args)
    assert [t.kind for t in request.triggers] == ["patch", "blended", "patch"]
    assert request.user_targets == [1, None, 4]
    for content in ("{not json", '{"kind": "patch"}', '["patch:nonsense"]',
                    '[{"trigger": "blended:noise:0.1", "target": -1}]'):
        listed.write_text(content)
        code, error = _main(["scan", "x", "--base", "y", "--trigger", f"@{listed}"], capsys)
        assert (code, error["code"]) == (2, "invalid_config"), content
    code, error = _main(["scan", "x", "--base", "y", "--trigger", f"@{tmp_path}/none"], capsys)
    assert (code, error["code"]) == (2, "invalid_config")

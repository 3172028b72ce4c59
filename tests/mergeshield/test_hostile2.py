"""The second hostile corpus (tests/support/hostile2.py, issue 13) through the library and the
CLI: each case refused with its stable code (or accepted with its hostile part neutralised),
under a deadline, with the canary token in the environment, and then judged on the disk: no
payload ran, nothing was written outside the scan's folders, no secret and no local path left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from mergeshield.cli import EXIT_ERROR
from tests.support import hostile2

CASES = hostile2.corpus()
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol",
                                        "ignore:.*sparse.*:UserWarning",
                                        "ignore:.*nested.*:UserWarning",
                                        "ignore:.*quantized tensor creation.*:UserWarning",
                                        "ignore:TypedStorage is deprecated:UserWarning")


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> hostile2.Fixtures:
    return hostile2.build_fixtures(tmp_path_factory.mktemp("fixtures"))


def _clean(outcome: hostile2.Outcome) -> None:
    assert not outcome.ran, "a pickle payload ran"
    assert not outcome.stray, f"written outside the scan's folders: {outcome.stray}"
    assert not outcome.leaked, f"a secret or a local path left the scan: {outcome.leaked}"
    assert not outcome.traceback, outcome.output[-2000:]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_library_refuses_each_case_with_its_code(case: hostile2.Case, fx: hostile2.Fixtures,
                                                 tmp_path: Path) -> None:
    outcome = hostile2.run_library(case, tmp_path, fx)
    _clean(outcome)
    assert outcome.code == case.code, outcome.message
    if case.code is not None:
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


CLI_CASES = [c for c in CASES if c.kind != "archive"]  # the CLI takes folders and files


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_exits_2_with_the_code_and_no_traceback(case: hostile2.Case, fx: hostile2.Fixtures,
                                                    tmp_path: Path) -> None:
    outcome = hostile2.run_cli(case, tmp_path, fx)
    _clean(outcome)
    # refused: exit 2 and the code; neutralised: a report, still exit 2 (no evaluation data,
    # so the scan is incomplete), and the cleaned checkpoint written
    assert outcome.exit == EXIT_ERROR
    assert outcome.code == case.code, outcome.output[-2000:]
    if case.code is None:
        assert json.loads(outcome.stdout)["incomplete"]
        assert (tmp_path / "out" / "model.safetensors").is_file()


def test_the_request_writes_an_output_so_a_followed_link_would_leak(
        fx: hostile2.Fixtures, tmp_path: Path) -> None:
    """The control: the clean suspect with the corpus' request is cleaned and its regular
    processor/tokenizer files are copied, which is how a followed link would have leaked."""
    case = hostile2.Case("control", "clean", None, lambda f, _c: hostile2._model(
        f, None, **{"special_tokens_map.json": "{}", "notes.txt": "plain"}))
    outcome = hostile2.run_library(case, tmp_path, fx)
    _clean(outcome)
    assert outcome.code is None
    assert {"model.safetensors", "special_tokens_map.json", "notes.txt"} <= {
        p.name for p in (tmp_path / "out").iterdir()}


def test_the_corpus_covers_every_class_with_enough_cases() -> None:
    refused = [c for c in CASES if c.code is not None]
    assert len(refused) >= 60
    assert len({c.id for c in CASES}) == len(CASES)
    kinds = Counter(c.kind for c in CASES)
    assert set(kinds) == {"link", "special", "alloc", "tensor", "config", "remote", "archive",
                          "output"}
    assert {c.role for c in CASES} == {"suspect", "base", "bv"}
    assert {"unsafe_file", "unsafe_format", "unsafe_archive", "corrupt_checkpoint",
            "unsupported_tensor", "model_too_large", "invalid_weights"} <= {c.code for c in CASES}


@pytest.mark.parametrize("name", ["special/fifo model.safetensors",  # the hang
                                  "link/special_tokens_map.json->/proc/self/environ"])  # the leak
def test_a_real_mergeshield_process_exits_2_without_hanging_or_leaking(
        name: str, fx: hostile2.Fixtures, tmp_path: Path) -> None:
    case = next(c for c in CASES if c.id == name)
    src = case.make(tmp_path / "in", tmp_path / "canary")
    roles = {"suspect": str(fx.suspect), "base": str(fx.base), "bv": str(fx.bv),
             case.role: str(src)}
    with hostile2.canary_env(tmp_path) as env:
        proc = subprocess.run(
            [sys.executable, "-m", "mergeshield.cli", *hostile2.cli_args(roles, tmp_path / "out")],
            capture_output=True, text=True, timeout=hostile2.CASE_TIMEOUT_S * 2,
            env={**os.environ, **env, "OMP_NUM_THREADS": "1"})
    outcome = hostile2.judge_cli(proc.returncode, proc.stdout, proc.stderr, tmp_path)
    _clean(outcome)
    assert (outcome.exit, outcome.code) == (EXIT_ERROR, case.code)

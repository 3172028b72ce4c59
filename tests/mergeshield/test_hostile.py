"""Every case of the hostile-input corpus (tests/support/hostile.py) through the library's entry
points: unpacked if an archive, then ``pipeline.scan`` (resolve, header validation, pickle
conversion, every tensor read). Each must be refused with its stable code and run nothing."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from mergeshield import archives
from mergeshield.errors import ConfigError, UnsafeArchiveError
from mergeshield.pipeline import ScanContext, ScanRequest, scan
from tests.support import hostile

CASES = hostile.corpus()
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hostile.save_base(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.gap)] if c.gap else [])
    for c in CASES])
def test_case_is_refused_with_its_code_and_runs_nothing(case: hostile.Case, base: Path,
                                                        tmp_path: Path) -> None:
    code, canary = hostile.run_library(case, tmp_path, base)
    assert not canary, "a pickle payload ran"
    assert code == case.code


def test_the_corpus_covers_every_kind_with_many_cases() -> None:
    kinds = Counter(c.kind for c in CASES)
    assert set(kinds) == {"pickle", "safetensors", "index", "archive", "model"}
    assert min(kinds.values()) >= 10
    assert len({c.id for c in CASES}) == len(CASES)


def test_hundred_thousand_files_are_refused_by_count_before_anything_is_written(
        tmp_path: Path) -> None:
    many = hostile.many_files_zip(100_000)
    t0 = time.perf_counter()
    with pytest.raises(UnsafeArchiveError, match="limit of 10000 members") as info:
        archives.unpack(many, tmp_path / "dest", hostile.LIMITS)
    assert info.value.details["member"] == "m/099999"  # judged on the central directory's count
    assert not (tmp_path / "dest").exists()
    assert time.perf_counter() - t0 < 10  # no per-member work (about 0.5 s here)


@pytest.mark.parametrize("name", ["/etc/passwd", "/proc/self/environ", "../../../../etc",
                                  "link-out", "uploads/../../outside"])
def test_a_service_scan_names_no_local_path_outside_its_roots(name: str, base: Path,
                                                               tmp_path: Path) -> None:
    """``allowed_roots`` (the service's uploads folder): a path outside, a ``..`` climb or a
    symlink that leads out is refused before anything is read."""
    roots = tmp_path / "uploads"
    roots.mkdir()
    (tmp_path / "outside").mkdir()
    (roots / "link-out").symlink_to(base)
    value = str(roots / name) if name in ("link-out",) else \
        str(tmp_path / name) if name.startswith("uploads/") else name
    request = ScanRequest(suspect=value, base=str(roots / "link-out"), probes=False,
                          inversion=False)
    with pytest.raises(ConfigError, match="local path") as info:
        scan(request, ScanContext(allowed_roots=(roots,), local_files_only=True))
    assert info.value.code == "invalid_config"

"""service/errors.py: every class of the error tree leaves the API with a status chosen for it."""

from __future__ import annotations

import fastapi
import pytest
from fastapi.testclient import TestClient

import service.main  # noqa: F401  (imports every module that may add a class to the tree)
from mergeshield import errors
from service.errors import STATUS, install, status_of


def _tree(cls: type[errors.MergeShieldError]) -> list[type[errors.MergeShieldError]]:
    return [cls] + [c for sub in cls.__subclasses__() for c in _tree(sub)]


CLASSES = _tree(errors.MergeShieldError)[1:]  # the base itself is abstract in practice


def test_the_tree_is_walked() -> None:
    names = {c.__name__ for c in CLASSES}
    assert {"ModelTooLargeError", "GpuMemoryError", "StageTimeLimitError", "LimitError",
            "InsufficientStorageError", "ServiceError", "InternalError"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_error_has_a_deliberate_status(cls: type[errors.MergeShieldError]) -> None:
    """Not the catch-all row; 500 only for internal_error, the one true bug."""
    row = next(base for base, _ in STATUS if issubclass(cls, base))
    assert row is not errors.MergeShieldError, f"{cls.__name__} has no row in service.errors"
    status = status_of(cls("x"))
    if issubclass(cls, errors.InternalError):
        assert status == 500
    else:
        assert 400 <= status < 600 and status != 500, (cls.__name__, status)


def test_limits_answer_with_their_own_status_and_body() -> None:
    """Raised in the API process, a limit is its own status with the stable JSON body."""
    app = fastapi.FastAPI()
    install(app)
    raised = {c.__name__: c for c in CLASSES}

    @app.get("/raise/{name}")
    def _raise(name: str) -> None:
        raise raised[name]("over the limit: use a smaller model", details={"limit": 1})

    with TestClient(app, raise_server_exceptions=False) as client:
        for name, status in (("ModelTooLargeError", 413), ("GpuMemoryError", 503),
                             ("StageTimeLimitError", 504), ("LimitError", 503),
                             ("InsufficientStorageError", 507), ("InternalError", 500)):
            r = client.get(f"/raise/{name}")
            assert r.status_code == status, name
            assert r.json()["error"] == {"code": raised[name].code, "details": {"limit": 1},
                                         "message": "over the limit: use a smaller model"}

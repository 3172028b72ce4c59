"""Fixtures for the service tests: the zoo's models as uploads and on the loopback hub."""

from __future__ import annotations

import io
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from mergeshield.settings import Settings
from service.main import create_app
from tests.support.hub import LoopbackHub
from tests.support.stack import ADMIN_KEY, PG_ADMIN, Stack, ensure_services
from tests.support.zoo import Zoo

SUSPECT = "vit-mnist-badnets"
CLEAN = "vit-mnist-clean"
# the round trip's scan: probes find the planted trigger and the default repair unlearns it
CLEANING = {"inversion": False, "max_eval": 500}
# every other service test: the same scan with IBVS alone (the repair is test_api's round trip and
# tests/mergeshield/test_unlearning.py), a few seconds instead of a 5-epoch repair per scan
FAST = {**CLEANING, "unlearning": {"enabled": False}}


def zipped(folder: Path) -> bytes:
    """An HF-layout folder as a zip, one top-level folder, as users upload it."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"{folder.name}/{path.name}")
    return buf.getvalue()


@dataclass(frozen=True)
class Published:
    hub: LoopbackHub
    dataset: str  # hub dataset id of the suspect's evaluation data

    def env(self, cache_dir: Path, **more: str) -> dict[str, str]:
        """A stack's environment for this hub: its address and token, the run's BV cache."""
        return {"HF_ENDPOINT": self.hub.url, "HF_TOKEN": self.hub.token,
                "MERGESHIELD_CACHE_DIR": str(cache_dir), **more}


@pytest.fixture(scope="session")
def published(zoo: Zoo) -> Iterator[Published]:
    """The zoo's ViT models and MNIST data on a loopback hub (the workers' HF_ENDPOINT)."""
    ensure_services()
    hub = LoopbackHub().start()
    for name in (SUSPECT, CLEAN, zoo.model(SUSPECT)["base"]):
        hub.add_repo(f"zoo/{name}", zoo.path(name))
    hub.add_repo("zoo/mnist", zoo.dataset(SUSPECT), repo_type="dataset")
    hub.add_repo(f"zoo/private-{CLEAN}", zoo.path(CLEAN), private=True)
    try:
        yield Published(hub, "zoo/mnist")
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def admin(stack: Stack) -> Iterator[httpx.Client]:
    """A client with the admin key on the module's own ``stack``."""
    with stack.client() as c:
        yield c


@pytest.fixture(scope="module")
def plan(zoo: Zoo, published: Published) -> dict[str, Any]:
    """The cheapest merge plan that runs: one clean hub fine-tune over the hub base, a small
    scan (test_merges.py has its own: a backdoored upload beside a clean model)."""
    model = f"zoo/{CLEAN}"
    return {"merge_method": "task_arithmetic", "base_model": f"zoo/{zoo.model(CLEAN)['base']}",
            "models": [{"model": model, "parameters": {"weight": 1.0}}],
            "mergeshield": {"evaluation": {model: published.dataset},
                            "scan": {**FAST, "max_eval": 200}}}


@pytest.fixture(params=("sqlite", "postgres"))
def in_process(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[TestClient]:
    """The app in this process (no worker, no background loops), API keys on, the admin key's
    client, on each database: for what one request does, not what a scan does."""
    url = None
    if request.param == "postgres":
        ensure_services()
        name = f"ms_service_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    settings = Settings(data_dir=tmp_path / "data", cache_dir=tmp_path / "cache",
                        database_url=url, admin_key=SecretStr(ADMIN_KEY))
    try:
        with TestClient(create_app(settings, reconciler=False),
                        headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            yield client
    finally:
        if url is not None:
            with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

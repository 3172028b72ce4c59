"""settings.py: the environment variables it honours, and a token that never shows."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergeshield.settings import Settings

TOKEN = "hf_secret_token_do_not_print_123"
VARS = ("MERGESHIELD_CACHE_DIR", "MERGESHIELD_HF_TOKEN", "MERGESHIELD_HF_ENDPOINT",
        "MERGESHIELD_DEVICE", "HF_TOKEN", "HF_ENDPOINT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No variable from the host, no stray .env file, a known home."""
    for name in VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def test_defaults() -> None:
    s = Settings()
    assert s.hf_token is None and s.token() is None
    assert s.hf_endpoint is None and s.device is None
    assert s.cache_dir == Path.home() / ".cache" / "mergeshield"


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MERGESHIELD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9999")
    monkeypatch.setenv("MERGESHIELD_DEVICE", "cpu")
    s = Settings()
    assert s.cache_dir == tmp_path / "cache"
    assert s.token() == TOKEN
    assert s.hf_endpoint == "http://127.0.0.1:9999"
    assert s.device == "cpu"


def test_the_mergeshield_prefixed_names_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_generic")
    monkeypatch.setenv("MERGESHIELD_HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://generic")
    monkeypatch.setenv("MERGESHIELD_HF_ENDPOINT", "http://mirror")
    s = Settings()
    assert s.token() == TOKEN and s.hf_endpoint == "http://mirror"


def test_the_token_is_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    s = Settings()
    assert TOKEN not in repr(s) and TOKEN not in str(s)
    assert TOKEN not in repr(s.hf_token) and TOKEN not in s.model_dump_json()
    assert s.hf_token is not None and s.hf_token.get_secret_value() == TOKEN


def test_a_dotenv_file_in_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"HF_TOKEN={TOKEN}\nMERGESHIELD_DEVICE=cuda\n")
    s = Settings()
    assert s.token() == TOKEN and s.device == "cuda"


def test_overridable_in_code(tmp_path: Path) -> None:
    s = Settings(cache_dir=tmp_path / "x", device="cpu")
    assert s.cache_dir == tmp_path / "x" and s.device == "cpu"

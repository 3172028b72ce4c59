"""Deployment files: Dockerfile, docker-compose.yml and .env.example (style.md 15).

No Docker engine runs the tests, so this checks what can be checked without one: the compose file
parses, every command it runs is one the CLI accepts, the worker reserves a GPU beside the API on
one image and one artifacts volume, every environment variable is a setting, and the image installs
what scripts/setup installs.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergeshield.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SERVICES = ("api", "worker", "worker-cpu")  # the services that run the MergeShield image
WORKERS = ("worker", "worker-cpu")
PROXY_ENV = {"HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY"}  # standard, read by huggingface_hub's HTTP
HUB_DOMAINS = {".huggingface.co", ".hf.co"}  # the hub, its LFS and Xet CDNs
_ENV_LINE = re.compile(r"^#?\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")


def _accepted_env_names() -> dict[str, str]:
    """Every environment name Settings reads, mapped to its field (aliases replace the prefix)."""
    prefix = Settings.model_config.get("env_prefix", "")
    names: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if alias is None:
            choices = [f"{prefix}{field}"]
        elif isinstance(alias, str):
            choices = [alias]
        else:  # AliasChoices
            choices = [c for c in alias.choices if isinstance(c, str)]
        names.update({c.upper(): field for c in choices})
    return names


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _argv(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _env_example() -> dict[str, str]:
    """The variables .env.example names, commented out or not, with their documented values."""
    found: dict[str, str] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if m := _ENV_LINE.match(line.strip()):
            found[m.group(1)] = m.group(2).strip()
    return found


def _dockerfile() -> str:
    """The Dockerfile with line continuations joined, so each instruction is one line."""
    return re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())


def _cli_parser() -> argparse.ArgumentParser:
    from service.cli import build_parser  # the console script `mergeshield`

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def _parses(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:  # argparse's way of refusing a command line
        pytest.fail(f"the CLI refuses {shlex.join(argv)!r} (exit {exc.code})")


# --- docker-compose.yml ---------------------------------------------------------------------


def test_compose_has_the_services_and_no_version_key() -> None:
    compose = _compose()
    assert "version" not in compose  # obsolete in the compose spec
    assert {"redis", "postgres", "api", "worker"} <= set(compose["services"])
    assert {"artifacts", "pgdata"} <= set(compose["volumes"])


def test_every_command_is_a_cli_subcommand_that_parses() -> None:
    parser = _cli_parser()
    subcommands = _subcommands(parser)
    assert {"api", "worker", "worker-ping", "serve"} <= subcommands
    commands = {name: _argv(svc["command"]) for name, svc in _services().items()
                if "command" in svc}
    assert {"api", "worker"} <= set(commands)
    for name, svc in _services().items():  # health checks that call the CLI parse as well
        test = (svc.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:2] == ["CMD", "mergeshield"]:
            commands[f"{name} healthcheck"] = test[1:]
    for name, argv in commands.items():
        assert argv[0] == "mergeshield", name
        assert argv[1] in subcommands, f"{name}: unknown subcommand {argv[1]!r}"
        _parses(parser, argv[1:])


def test_dockerfile_default_command_parses() -> None:
    cmd = re.search(r"^CMD\s+(\[.*\])\s*$", _dockerfile(), re.M)
    assert cmd, "the Dockerfile needs an exec-form CMD"
    argv = json.loads(cmd.group(1))
    assert argv[:2] == ["mergeshield", "api"]
    _parses(_cli_parser(), argv[1:])


def test_worker_reserves_an_nvidia_gpu() -> None:
    devices = _services()["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert "deploy" not in _services()["api"]  # the API never touches a tensor


def test_api_and_workers_share_one_image_and_the_artifacts_volume() -> None:
    services = _services()
    api, worker = services["api"], services["worker"]
    assert "build" in api and api["image"] == worker["image"]
    assert "build" not in worker  # built once, by the api service
    for name in IMAGE_SERVICES:
        if name in services:
            assert services[name]["image"] == api["image"], name
            assert any(str(v).split(":")[:2] == ["artifacts", "/data"]
                       for v in services[name]["volumes"]), name


def test_api_and_worker_have_health_checks() -> None:
    services = _services()
    for name in ("redis", "postgres", "api", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), name
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "worker-ping" in services["worker"]["healthcheck"]["test"]
    for name in ("api", "worker"):
        for dep in ("redis", "postgres"):
            assert services[name]["depends_on"][dep]["condition"] == "service_healthy"


def test_compose_environment_names_are_settings() -> None:
    accepted = _accepted_env_names()
    services = _services()
    named: set[str] = set()
    for name in IMAGE_SERVICES:
        if name in services:
            named |= set(_environment(services[name]))
    named |= set(_INTERPOLATION.findall((ROOT / "docker-compose.yml").read_text()))
    assert {"REDIS_URL", "DATABASE_URL", "MERGESHIELD_ADMIN_KEY"} <= named
    assert named - set(accepted) - PROXY_ENV == set()


# --- network isolation: workers reach the broker, the database and the hub, nothing else ----


def _networks(service: dict[str, Any]) -> set[str]:
    nets = service.get("networks") or ["default"]
    return set(nets if isinstance(nets, list) else nets.keys())


def _internal(name: str) -> bool:
    return bool((_compose().get("networks") or {}).get(name, {}).get("internal"))


def test_workers_are_only_on_an_internal_network_with_the_broker_database_and_egress() -> None:
    services = _services()
    for name in WORKERS:
        nets = _networks(services[name])
        assert nets and all(_internal(n) for n in nets), (name, nets)
        # who else is there: nothing that could relay traffic except the hub proxy
        neighbours = {other for other, svc in services.items() if other != name
                      and _networks(svc) & nets}
        assert neighbours <= {"redis", "postgres", "egress", "api", *WORKERS}, neighbours
        assert {"redis", "postgres", "egress"} <= neighbours
        deps = services[name]["depends_on"]
        assert deps["egress"]["condition"] == "service_healthy", name
    for name in ("redis", "postgres"):  # no way out for them either
        assert all(_internal(n) for n in _networks(services[name])), name


def test_workers_reach_the_hub_only_through_the_egress_proxy() -> None:
    services = _services()
    egress = services["egress"]
    port = re.search(r"^http_port (\d+)$", _egress_config(), re.M)
    assert port
    for name in WORKERS:
        env = _environment(services[name])
        for var in ("HTTPS_PROXY", "HTTP_PROXY"):
            assert env[var] == f"http://egress:{port.group(1)}", (name, var)
        assert {"redis", "postgres"} <= set(env["NO_PROXY"].split(",")), name
        for var in ("REDIS_URL", "DATABASE_URL"):  # and everything the API gets besides
            assert env[var] == _environment(services["api"])[var], (name, var)
    nets = _networks(egress)
    assert any(_internal(n) for n in nets) and not all(_internal(n) for n in nets)


def _egress_config() -> str:
    source = _services()["egress"]["configs"][0]
    assert source["target"] == "/etc/squid/squid.conf"
    return str(_compose()["configs"][source["source"]]["content"])


def test_the_egress_proxy_allows_the_hub_hosts_and_denies_the_rest() -> None:
    rules = [line.split() for line in _egress_config().splitlines()
             if line.startswith(("acl ", "http_access "))]
    acls = {r[1]: r[2:] for r in rules if r[0] == "acl"}
    access = [r[1:] for r in rules if r[0] == "http_access"]
    assert access[-1] == ["deny", "all"]  # whatever is not allowed above is refused
    allowed = [a for a in access if a[0] == "allow"]
    assert allowed, "the proxy allows nothing"
    for rule in allowed:  # every allow names the hub's domains, through CONNECT (TLS) only
        assert "CONNECT" in rule[1:] and acls["CONNECT"] == ["method", "CONNECT"]
        domains = [acls[a] for a in rule[1:] if acls[a][0] == "dstdomain"]
        assert domains and all(set(d[1:]) <= HUB_DOMAINS for d in domains), rule
    assert ["deny", "!https"] in access and acls["https"] == ["port", "443"]


def test_the_api_is_the_one_published_service() -> None:
    services = _services()
    published = {name for name, svc in services.items() if svc.get("ports")}
    assert published == {"api"}
    assert not all(_internal(n) for n in _networks(services["api"]))  # callbacks go out


# --- .env.example ---------------------------------------------------------------------------


def test_env_example_names_are_settings() -> None:
    names = set(_env_example())
    assert names, ".env.example names no variable"
    assert names - set(_accepted_env_names()) == set()


def test_env_example_lists_every_setting() -> None:
    documented = {_accepted_env_names()[n] for n in _env_example() if n in _accepted_env_names()}
    assert set(Settings.model_fields) - documented == set()


def test_env_example_values_are_the_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each documented value, read back through Settings, equals the field's default."""
    for name in _accepted_env_names():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env
    defaults = Settings()
    accepted = _accepted_env_names()
    for name, value in _env_example().items():
        field = accepted[name]
        if not value or Settings.model_fields[field].default_factory is not None:
            continue  # unset (None) or a per-user path
        monkeypatch.setenv(name, value)
        assert getattr(Settings(), field) == getattr(defaults, field), name
        monkeypatch.delenv(name)
    for name, value in _env_example().items():  # an empty value documents a None default
        if not value:
            assert getattr(defaults, accepted[name]) is None, name


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_installs_what_scripts_setup_installs() -> None:
    docker = _dockerfile()
    setup = (ROOT / "scripts" / "setup").read_text()
    assert re.search(r"^FROM python:3\.11-slim-bookworm\s*$", docker, re.M)

    for text in (docker, setup):  # the Debian data package
        assert re.search(r"apt-get install [^\n]*\bdataset-fashion-mnist\b", text)
    assert re.search(r"apt-get install [^\n]*\bcurl\b", docker)  # for the API's health check

    pin = re.search(r'pip install -q "(torch==[^"]+)"', setup)
    assert pin, "scripts/setup pins torch"
    assert re.search(rf"^ARG TORCH_SPEC={re.escape(pin.group(1))}\s*$", docker, re.M)
    assert re.search(r"^ARG TORCH_INDEX=\s*$", docker, re.M)
    torch = re.search(r"pip install [^\n]*--index-url[^\n]*\$TORCH_SPEC", docker)
    assert torch and "TORCH_INDEX" in torch.group(0)

    project = re.search(r"pip install (-q )?\.(\s|$)", docker)
    mlxtend = re.search(r"pip install (-q )?--no-deps mlxtend", docker)
    assert project and mlxtend
    assert "--no-deps mlxtend" in setup
    assert torch.start() < project.start() < mlxtend.start()  # torch first, as in scripts/setup


def test_dockerfile_copies_the_packages_and_runs_as_a_user() -> None:
    docker = _dockerfile()
    copied = " ".join(re.findall(r"^COPY (.+)$", docker, re.M))
    for path in ("pyproject.toml", "README.md", "alembic.ini", "mergeshield", "worker", "service"):
        assert re.search(rf"(^|\s){re.escape(path)}(\s|$)", copied), path
    assert re.search(r"^USER mergeshield\s*$", docker, re.M)
    assert re.search(r"^VOLUME /data\s*$", docker, re.M)
    assert re.search(r"^EXPOSE 8000\s*$", docker, re.M)
    assert "/opt/venv" in docker


def test_dockerfile_environment_names_are_settings() -> None:
    env = " ".join(re.findall(r"^ENV (.+)$", _dockerfile(), re.M))
    names = {n for n in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", env)
             if n.startswith("MERGESHIELD_")}
    assert {"MERGESHIELD_DATA_DIR", "MERGESHIELD_CACHE_DIR"} <= names
    assert names - set(_accepted_env_names()) == set()


def test_dockerignore_keeps_the_context_small() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".venv", "zoo", ".git", "cleaned*", ".mypy_cache", ".pytest_cache"} <= ignored


def test_the_wheel_ships_every_package_and_the_migrations(tmp_path: Path) -> None:
    """The image installs a wheel, not the checkout: Alembic's files must be inside it."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)], check=True)
    [wheel] = tmp_path.glob("mergeshield-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ROOT.glob("*/**/*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] in ("mergeshield", "worker", "service"):
            assert rel in names, rel
    assert "worker/migrations/script.py.mako" in names
    for path in ROOT.glob("service/dashboard/*/*"):  # the dashboard's templates and static files
        assert path.relative_to(ROOT).as_posix() in names, path

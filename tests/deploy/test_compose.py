"""The deployable stack: docker-compose.yml, the Dockerfile, .env.example and .dockerignore.

There is no Docker engine on the build machines, so these tests parse the files and check
what they reference; when ``docker compose`` is installed, ``docker compose config`` must
accept the file as well (see ``test_docker_compose_config``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker import cli
from worker.config import PREFIX, Settings, setting_fields

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"

SETTING_VARS = {var for _, var, _ in setting_fields()}
#: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME; not $$
_INTERPOLATION = re.compile(
    r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)[^}]*\}|([A-Za-z_][A-Za-z0-9_]*))"
)


@pytest.fixture(name="compose", scope="module")
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _strings(node: object) -> list[str]:
    """Every string anywhere in a parsed YAML tree, keys included."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return []


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    def words(value: object) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return shlex.split(value)
        assert isinstance(value, list)
        return [str(v) for v in value]

    return words(service.get("entrypoint")) + words(service.get("command"))


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def test_services_present(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"rabbitmq", "postgres", "migrate", "worker"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    rabbit = services["rabbitmq"]
    assert "management" in rabbit["image"]
    # the prometheus plugin is enabled through the mounted enabled_plugins file
    mounts = [v for v in rabbit["volumes"] if "enabled_plugins" in v]
    assert mounts, "rabbitmq needs an enabled_plugins file"
    plugins = (ROOT / mounts[0].split(":")[0]).read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    for name in ("rabbitmq", "postgres", "worker"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"


def test_worker_is_scalable(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert "container_name" not in worker
    assert not worker.get("ports"), "a fixed host port stops --scale worker=3"
    assert "build" in worker
    assert _command(worker)[-2:] == ["forge-worker", "run"]
    assert "/readyz" in " ".join(_strings(worker["healthcheck"]))


def test_worker_waits_for_its_dependencies(compose: dict[str, Any]) -> None:
    deps = compose["services"]["worker"]["depends_on"]
    assert deps["rabbitmq"]["condition"] == "service_healthy"
    assert deps["postgres"]["condition"] == "service_healthy"
    assert deps["migrate"]["condition"] == "service_completed_successfully"
    assert (
        compose["services"]["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    )


def test_migrate_is_one_shot(compose: dict[str, Any]) -> None:
    migrate = compose["services"]["migrate"]
    assert _command(migrate) == ["forge-worker", "migrate"]
    assert migrate.get("restart", "no") == "no"


def test_worker_shares_one_service_key(compose: dict[str, Any]) -> None:
    """Replicas must sign as the same service: the key is required from .env, not generated."""
    env = _environment(compose["services"]["worker"])
    assert env["FORGE_WORKER_SERVICE_KEY"].startswith("${FORGE_WORKER_SERVICE_KEY:?")


def test_referenced_files_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = ROOT / (build if isinstance(build, str) else build.get("context", "."))
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
            assert (context / (dockerfile or "Dockerfile")).is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: volume source {source} missing"
        for env_file in service.get("env_file", []):
            assert (ROOT / env_file).exists()
    named = {
        v.split(":")[0]
        for s in compose["services"].values()
        for v in s.get("volumes", [])
        if not v.startswith((".", "/"))
    }
    assert named <= set(compose.get("volumes") or {}), "named volumes must be declared"


def test_dockerfile_copies_only_what_exists() -> None:
    for instr, args in _dockerfile_instructions():
        if instr not in ("COPY", "ADD") or "--from=" in args:
            continue
        sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
        for src in sources:
            assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
            assert not _ignored(src), f"{src} is excluded by .dockerignore"


def _ignored(path: str) -> bool:
    rules = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    ignored = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").rstrip("/")
        if Path(path).match(pattern) or path == pattern:
            ignored = not negate
    return ignored


def test_dockerfile_runs_as_non_root_with_readyz_healthcheck() -> None:
    instructions = _dockerfile_instructions()
    stages = [i for i, (instr, _) in enumerate(instructions) if instr == "FROM"]
    final = instructions[stages[-1] :]
    users = [args for instr, args in final if instr == "USER"]
    assert users, "the final stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")
    checks = [args for instr, args in final if instr == "HEALTHCHECK"]
    assert checks and "/readyz" in checks[-1]
    assert "curl" not in checks[-1] and "urllib" in checks[-1]
    runs = " ".join(args for instr, args in instructions if instr == "RUN")
    assert "uv sync --locked" in runs, "the image installs exactly uv.lock"


def test_dockerignore_keeps_the_image_clean() -> None:
    for path in (".git", ".venv", ".env", ".forge-worker", "tests"):
        assert _ignored(path), f"{path} would be sent to the build context"
    for path in ("worker", "schemas", "uv.lock", "pyproject.toml"):
        assert not _ignored(path)


def test_dev_profile_adds_a_development_plc_directory(compose: dict[str, Any]) -> None:
    """Only with ``--profile dev``: the same image serving ``plc serve`` on 2582, its data
    in a named volume, reachable by the workers (all the container's addresses) and from
    the host on 127.0.0.1 only, with a healthcheck of its own (the image's is the worker's
    /readyz)."""
    services = compose["services"]
    plc = services["plc"]
    assert plc["profiles"] == ["dev"]
    for name in ("rabbitmq", "postgres", "migrate", "worker"):
        assert "profiles" not in services[name], f"{name} must start without a profile"
    assert plc["image"] == services["worker"]["image"] and "build" in plc
    command = _command(plc)
    assert command == [
        "forge-worker", "plc", "serve", "--host", "0.0.0.0", "--port", "2582",
        "--data", "/data/plc.json",
    ]  # fmt: skip
    args = cli.build_parser().parse_args(command[1:])
    assert (args.plc_command, args.host, args.port, args.data) == (
        "serve",
        "0.0.0.0",
        2582,
        "/data/plc.json",
    )
    assert plc["volumes"] == ["plc-data:/data"]
    assert all(str(p).startswith("127.0.0.1:") for p in plc["ports"])
    check = " ".join(_strings(plc["healthcheck"]))
    assert "http://127.0.0.1:2582/_health" in check and "readyz" not in check
    # the image's non-root user owns /data, where the named volume is mounted
    runs = " ".join(rest for instr, rest in _dockerfile_instructions() if instr == "RUN")
    assert "mkdir -p /data && chown forge:forge /data" in runs


def test_worker_plc_directory_comes_from_env(compose: dict[str, Any]) -> None:
    """The real directory unless .env names another (the dev profile's http://plc:2582)."""
    env = _environment(compose["services"]["worker"])
    default = Settings.__dataclass_fields__["plc_directory"].default
    assert default == "https://plc.directory"
    assert env["FORGE_WORKER_PLC_DIRECTORY"] == "${FORGE_WORKER_PLC_DIRECTORY:-" + default + "}"
    assert "http://plc:2582" in ENV_EXAMPLE.read_text()


def test_forge_worker_variables_are_real_settings(compose: dict[str, Any]) -> None:
    used: set[str] = set()
    for service in compose["services"].values():
        used |= {k for k in _environment(service) if k.startswith(PREFIX)}
    for text in (*_strings(compose), DOCKERFILE.read_text()):
        for m in _INTERPOLATION.finditer(text):
            used.add(m.group(1) or m.group(2))
    used |= set(re.findall(r"\b(FORGE_WORKER_[A-Z0-9_]+)", DOCKERFILE.read_text()))
    unknown = {v for v in used if v.startswith(PREFIX)} - SETTING_VARS
    assert not unknown, f"not settings: {sorted(unknown)}"


def test_env_example_lists_every_setting() -> None:
    names = set()
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            names.add(line.split("=", 1)[0].strip())
    forge = {n for n in names if n.startswith(PREFIX)}
    assert forge == SETTING_VARS, (
        f"missing {sorted(SETTING_VARS - forge)}, unknown {sorted(forge - SETTING_VARS)}"
    )
    # no real secret: the key is left empty
    key_line = next(
        line
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.startswith("FORGE_WORKER_SERVICE_KEY=")
    )
    assert key_line == "FORGE_WORKER_SERVICE_KEY="


def _compose_cli() -> list[str] | None:
    """``docker compose`` or ``docker-compose``, if one is installed and works."""
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        try:
            done = subprocess.run([*cmd, "version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return cmd
    return None


def test_docker_compose_config() -> None:
    """``docker compose config`` accepts the file where compose exists.

    Without it (the build machines), the parse tests above are the check: this test then
    only confirms that compose is really absent rather than skipping.
    """
    cli = _compose_cli()
    if cli is None:
        print("docker compose is not installed: the YAML parse tests are the check")
        return
    env = {**os.environ, "FORGE_WORKER_SERVICE_KEY": "not-a-key-config-does-not-parse-it"}
    done = subprocess.run(
        [*cli, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr

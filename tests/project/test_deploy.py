"""deploy/ must run what the README runs: these fail when the Dockerfile, compose file, unit or README drift apart.

Docker cannot run in CI, so the files are parsed and compared instead.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from bot.metrics import HEALTH_PATH
from bot.settings import Settings
from tests.support import REPO

ROOT = REPO
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}
# Environment variables of the image that are not llamacord settings.
OTHER_ENV = {"HF_HOME", "PYTHONUNBUFFERED", "PIP_DISABLE_PIP_VERSION_CHECK"}
# systemd options that hide /dev/nvidia* or forbid the code CUDA generates at run time.
CUDA_BREAKING = {"PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "MemoryDenyWriteExecute"}


# --- parsing -------------------------------------------------------------------------------------------------------


def bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```$", markdown, flags=re.MULTILINE | re.DOTALL)


def commands(line: str) -> list[list[str]]:
    """A shell line split into its `&&`-joined commands, each as argv."""
    result: list[list[str]] = [[]]
    for token in shlex.split(line, comments=True):
        if token == "&&":
            result.append([])
        else:
            result[-1].append(token)
    return [argv for argv in result if argv]


def readme_run_line() -> str:
    """The README's shell line that starts the bot."""
    readme = (ROOT / "README.md").read_text()
    found = [line for block in bash_blocks(readme) for line in block.splitlines() if "llamacord run" in line]
    assert found, "README.md has no bash block that runs `llamacord run`"
    return found[0]


def pip_install_specs(argv: list[str]) -> list[str] | None:
    """What `pip install` installs, options dropped (`-e .` and `.` install the same package)."""
    if argv[:2] != ["pip", "install"] and argv[1:3] != ["-m", "pip"]:
        return None
    start = 2 if argv[0] == "pip" else 4
    return [token for token in argv[start:] if not token.startswith("-")]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            instruction, _, arguments = line.strip().partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def instructions(name: str) -> list[str]:
    return [arguments for instruction, arguments in dockerfile() if instruction == name]


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for arguments in instructions("ENV"):
        for pair in shlex.split(arguments):
            key, _, value = pair.partition("=")
            env[key] = value
    return env


def dockerfile_volumes() -> set[str]:
    return {path for arguments in instructions("VOLUME") for path in json.loads(arguments)}


# Each compose file and its services, in order; both run the bot as the service `llamacord`.
COMPOSE_FILES = {"docker-compose.yml": ["llamacord"], "docker-compose.postgres.yml": ["postgres", "llamacord"]}


def compose_file(name: str = "docker-compose.yml") -> dict[str, Any]:
    compose = yaml.safe_load((DEPLOY / name).read_text())
    assert list(compose["services"]) == COMPOSE_FILES[name]
    return compose


def compose_service(name: str = "docker-compose.yml", service: str = "llamacord") -> dict[str, Any]:
    return compose_file(name)["services"][service]


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${NAME}`, `${NAME:?error}` and `${NAME:-default}`, with `variables` as the environment."""
    return re.sub(r"\$\{(\w+)(?::?[-?][^}]*)?\}", lambda match: variables[match[1]], value)


def compose_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.partition("=")[::2] for item in environment)
    return {key: str(value) for key, value in environment.items()}


def unit() -> dict[str, dict[str, list[str]]]:
    """The systemd unit as section → key → values (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (DEPLOY / "llamacord.service").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def under(path: str, directories: set[str]) -> bool:
    return any(PurePosixPath(path).is_relative_to(directory) for directory in directories)


# --- Dockerfile against the README and pyproject -------------------------------------------------------------------


def test_dockerfile_installs_the_package_the_readme_installs() -> None:
    readme_specs = [s for argv in commands(readme_run_line()) if (s := pip_install_specs(argv)) is not None]
    docker_specs = [
        s
        for arguments in instructions("RUN")
        for argv in commands(arguments)
        if (s := pip_install_specs(argv)) is not None
    ]
    assert readme_specs, "the README's run line installs nothing with pip"
    assert docker_specs == readme_specs


def test_dockerfile_entrypoint_is_the_readme_run_command() -> None:
    readme_run = [argv for argv in commands(readme_run_line()) if argv[0] == "llamacord"]
    [entrypoint] = instructions("ENTRYPOINT")

    assert [json.loads(entrypoint)] == readme_run
    assert readme_run[0][0] in PYPROJECT["project"]["scripts"]


def test_dockerfile_copies_everything_the_package_build_needs() -> None:
    sources = set()
    for arguments in instructions("COPY"):
        *copied, _destination = shlex.split(arguments)
        sources.update(source.rstrip("/") for source in copied if not source.startswith("--"))
    packages = {
        pattern.rstrip("*").rstrip(".") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]} | packages

    assert needed <= sources
    assert all((ROOT / source).exists() for source in sources)
    assert ".env" not in sources and "." not in sources  # the bot token must never be baked into the image


def test_base_image_torch_satisfies_pyproject() -> None:
    [base] = instructions("FROM")
    if base.startswith("${"):
        arg = base.strip("${}")
        base = next(a.partition("=")[2] for a in instructions("ARG") if a.startswith(f"{arg}="))
    repository, _, tag = base.partition(":")
    torch = next(Requirement(d) for d in PYPROJECT["project"]["dependencies"] if Requirement(d).name == "torch")

    assert repository == "pytorch/pytorch"
    assert "-cuda" in tag and tag.endswith("-runtime")
    assert Version(tag.split("-")[0]) in torch.specifier, "pip would replace the image's CUDA torch"


def test_dockerfile_runs_as_a_non_root_user() -> None:
    names = [instruction for instruction, _ in dockerfile()]
    users = instructions("USER")

    assert users and users[-1] not in {"root", "0", "0:0"}
    assert max(i for i, name in enumerate(names) if name == "USER") < names.index("ENTRYPOINT")


def test_dockerfile_keeps_data_on_volumes() -> None:
    env = dockerfile_env()
    volumes = dockerfile_volumes()

    for name in ("DATABASE_PATH", "HF_HOME", "MODEL_CACHE_DIR"):
        assert under(env[name], volumes), f"{name}={env[name]} is not on a VOLUME"


def test_dockerfile_healthcheck_probes_the_health_endpoint() -> None:
    [healthcheck] = instructions("HEALTHCHECK")

    assert HEALTH_PATH in healthcheck
    assert "METRICS_PORT" in healthcheck and "METRICS_PORT" in SETTINGS_ENV
    assert "--start-period" in healthcheck  # the first start downloads the model


# --- docker-compose.yml ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_compose_builds_this_dockerfile_with_the_repository_env(compose: str) -> None:
    service = compose_service(compose)
    context = (DEPLOY / service["build"]["context"]).resolve()
    env_files = service["env_file"] if isinstance(service["env_file"], list) else [service["env_file"]]

    assert context == ROOT
    assert (context / service["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert [(DEPLOY / path).resolve() for path in env_files] == [ROOT / ".env"]
    assert service["restart"] == "unless-stopped"


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_compose_reserves_one_gpu(compose: str) -> None:
    devices = compose_service(compose)["deploy"]["resources"]["reservations"]["devices"]

    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_compose_mounts_the_image_volumes_and_keeps_data_on_them() -> None:
    compose = compose_file()
    service = compose_service()
    mounts = dict(reversed(volume.split(":")[:2]) for volume in service["volumes"])
    environment = compose_environment(service)

    assert set(mounts) == dockerfile_volumes()
    assert set(mounts.values()) <= set(compose["volumes"])  # named volumes, declared
    for name in ("DATABASE_PATH", "HF_HOME", "MODEL_CACHE_DIR"):
        assert under(environment[name], set(mounts)), f"{name} is not on a volume"
        assert environment[name] == dockerfile_env()[name]


@pytest.mark.parametrize("compose", COMPOSE_FILES)
def test_compose_publishes_the_metrics_port_on_host_loopback_only(compose: str) -> None:
    service = compose_service(compose)
    environment = compose_environment(service)
    [published] = service["ports"]
    host_ip, host_port, container_port = published.split(":")

    assert host_ip == "127.0.0.1"
    assert container_port == environment["METRICS_PORT"]
    assert environment["METRICS_HOST"] == "0.0.0.0"  # inside the container, so the published port reaches it
    assert Settings(_env_file=None, metrics_port=int(host_port)).metrics_port == int(host_port)


@pytest.mark.parametrize("source", ["Dockerfile", *COMPOSE_FILES])
def test_environment_names_are_real_settings(source: str) -> None:
    names = set(dockerfile_env() if source == "Dockerfile" else compose_environment(compose_service(source)))

    assert names - OTHER_ENV <= SETTINGS_ENV, f"unknown setting in {source}: {names - OTHER_ENV - SETTINGS_ENV}"


def test_compose_with_postgres_points_the_bot_at_its_database() -> None:
    compose = compose_file("docker-compose.postgres.yml")
    postgres, bot = compose["services"]["postgres"], compose["services"]["llamacord"]
    server = compose_environment(postgres)
    variables = {"POSTGRES_PASSWORD": "Pa55word"}
    url = interpolate(compose_environment(bot)["DATABASE_URL"], variables)
    settings = Settings(_env_file=None, database_url=url)
    parts = urlsplit(str(settings.database))

    assert postgres["image"].split(":")[1].split(".")[0] == "15"  # the major version CI tests against
    assert (parts.scheme, parts.hostname, parts.port) == ("postgresql", "postgres", 5432)  # the service, by name
    assert parts.username == server["POSTGRES_USER"] and parts.path == f"/{server['POSTGRES_DB']}"
    assert parts.password == interpolate(server["POSTGRES_PASSWORD"], variables)  # one password, from .env
    assert "DATABASE_PATH" not in compose_environment(bot)


def test_compose_with_postgres_starts_the_bot_once_the_database_answers_and_keeps_its_data() -> None:
    compose = compose_file("docker-compose.postgres.yml")
    postgres, bot = compose["services"]["postgres"], compose["services"]["llamacord"]
    mounts = dict(reversed(volume.split(":")[:2]) for volume in postgres["volumes"])

    assert bot["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert mounts["/var/lib/postgresql/data"] in compose["volumes"]  # a named volume, declared
    assert "ports" not in postgres, "the database is reachable from the compose network only"
    assert postgres["restart"] == "unless-stopped"


# --- systemd --------------------------------------------------------------------------------------------------------


def test_unit_runs_the_readme_run_command_from_the_documented_venv() -> None:
    service = unit()["Service"]
    [exec_start] = service["ExecStart"]
    executable, *arguments = shlex.split(exec_start)
    readme_run = [argv for argv in commands(readme_run_line()) if argv[0] == "llamacord"]
    venv = PurePosixPath(executable).parent.parent

    assert [[PurePosixPath(executable).name, *arguments]] == readme_run
    assert PurePosixPath(executable).parent.name == "bin"
    assert f"python3 -m venv {venv}" in (DEPLOY / "README.md").read_text()


def test_unit_runs_as_a_dedicated_user_with_its_environment_file() -> None:
    service = unit()["Service"]

    assert service["User"] == ["llamacord"]
    assert service["Restart"] == ["on-failure"]
    assert service["WorkingDirectory"] and service["EnvironmentFile"]
    assert service["EnvironmentFile"][0] in (DEPLOY / "README.md").read_text()


def test_unit_hardening_leaves_the_gpu_reachable() -> None:
    service = unit()["Service"]

    assert service["NoNewPrivileges"] == ["true"] and service["ProtectSystem"] == ["strict"]
    assert not CUDA_BREAKING & set(service)


# --- deploy/README.md -----------------------------------------------------------------------------------------------


def test_deploy_guide_commands_name_files_that_exist() -> None:
    guide = (DEPLOY / "README.md").read_text()
    paths = [path for block in bash_blocks(guide) for path in re.findall(r"(?:-f|cp) (deploy/\S+)", block)]

    assert {"deploy/Dockerfile", *(f"deploy/{name}" for name in COMPOSE_FILES)} <= set(paths)
    assert all((ROOT / path).is_file() for path in paths)

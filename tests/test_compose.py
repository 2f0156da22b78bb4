"""The deployment files: docker-compose.yml against the Compose specification's JSON schema and the
engine's CLI and settings, and the Dockerfile against the project (console script, config files).

No network and no Docker needed: the schema is stored in tests/fixtures/compose/ (see its README).
Only ``test_docker_compose_config`` uses Docker, and skips without it.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA = Path(__file__).resolve().parent / "fixtures" / "compose" / "compose-spec.json"

CONFIG_DIR = "/etc/hl7engine"  # where the image keeps, and compose mounts, the configuration
CONFIG_ITEMS = ("channels", "mappings", "routes.yaml")  # a configuration directory's contents
BACKENDS = ("postgres", "rabbitmq")
# what `docker compose` is given in the test: the passwords it requires (never real ones)
TEST_ENV = {"POSTGRES_PASSWORD": "compose-test-pg", "RABBITMQ_PASSWORD": "compose-test-mq"}


# -- reading the files ----------------------------------------------------------------------------

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``), applied to every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        present = name in env
        current = env.get(name, "")
        unset = not present or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return current
        if op in (":+", "+"):
            return "" if unset else arg
        return current

    return _VAR.sub(one, value)


def load_compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml as Compose reads it: YAML (anchors and ``<<`` merges resolved), then
    interpolated with ``env`` (default: the test passwords)."""
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return interpolate(data, TEST_ENV if env is None else env)  # type: ignore[no-any-return]


def engine_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services running the image built from ./Dockerfile: those with ``build`` (context ``.``),
    and those that use the image such a service builds."""
    services = compose["services"]
    built: set[str] = set()
    names: set[str] = set()
    for name, svc in services.items():
        build = svc.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        if Path(ROOT, context, dockerfile).resolve() == DOCKERFILE:
            names.add(name)
            if svc.get("image"):
                built.add(svc["image"])
    names |= {name for name, svc in services.items() if svc.get("image") in built}
    return {name: services[name] for name in sorted(names)}


def command_args(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1]:]


def exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def copy_sources(args: str) -> tuple[dict[str, str], list[str], str]:
    """COPY's --flags, its sources and its destination."""
    words = exec_form(args) or shlex.split(args)
    flags: dict[str, str] = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    assert len(words) >= 2, f"COPY {args}: needs a source and a destination"
    return flags, words[:-1], words[-1]


def dockerignore_patterns() -> list[str]:
    if not DOCKERIGNORE.is_file():
        return []
    lines = (line.strip() for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines())
    return [line.lstrip("/").rstrip("/") for line in lines if line and not line.startswith("#")]


def _match(parts: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(parts[1:], pattern[1:])


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether the build context leaves ``path`` out (it, or a folder above it, matches; later
    ``!`` patterns take it back), as Docker reads .dockerignore."""
    parts = Path(path).parts
    prefixes = [list(parts[:n]) for n in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        split = pattern.lstrip("!").split("/")
        if any(_match(prefix, split) for prefix in prefixes):
            ignored = not keep
    return ignored


# -- the CLI --------------------------------------------------------------------------------------

def _usage_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = []
    try:
        from typer._click.exceptions import ClickException  # typer vendors click from 0.2x on

        errors.append(ClickException)
    except ImportError:
        pass
    try:
        from click.exceptions import ClickException as ClickException2

        errors.append(ClickException2)
    except ImportError:
        pass
    return tuple(errors)


def cli_problems(args: list[str]) -> list[str]:
    """What is wrong with running ``hl7engine <args>``, read from the real Typer app: the
    (sub)command must exist, every option must be one of its options, and its values and arguments
    must parse (the command is not run)."""
    import typer.main

    from engine.cli import app

    cmd: Any = typer.main.get_command(app)
    path: list[str] = []
    i = 0
    while hasattr(cmd, "commands"):  # a group: the next word names a subcommand
        here = " ".join(["hl7engine", *path])
        if i >= len(args) or args[i].startswith("-"):
            if getattr(cmd, "invoke_without_command", False):
                break
            return [f"`{here}` needs a subcommand, one of: {', '.join(sorted(cmd.commands))}"]
        sub = cmd.commands.get(args[i])
        if sub is None:
            return [f"`{here} {args[i]}`: no such command; `{here}` has: {', '.join(sorted(cmd.commands))}"]
        path.append(args[i])
        cmd = sub
        i += 1
    rest = args[i:]
    name = " ".join(["hl7engine", *path])
    options = {o: p for p in cmd.params if getattr(p, "param_type_name", "") == "option"
               for o in (*p.opts, *p.secondary_opts)}
    problems: list[str] = []
    j = 0
    while j < len(rest):
        word = rest[j]
        j += 1
        if word == "--":
            break
        if not word.startswith("-") or word == "-":
            continue
        opt, eq, _ = word.partition("=")
        param = options.get(opt)
        if param is None and not opt.startswith("--") and opt[:2] in options:  # -w2
            continue
        if param is None:
            known = ", ".join(sorted(o for o in options if o.startswith("--"))) or "none"
            problems.append(f"`{name}` has no option {opt} (its options: {known})")
            continue
        if not getattr(param, "is_flag", False) and not eq:
            j += 1  # its value
    if problems:
        return problems
    try:
        cmd.make_context(name, list(rest))
    except _usage_errors() as exc:
        return [f"`{name} {' '.join(rest)}`: {exc.format_message()}"]  # type: ignore[attr-defined]
    return []


# -- the Compose specification ---------------------------------------------------------------------

def compose_validator() -> Any:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    declared = str(schema.get("$schema", "")).rstrip("#")
    cls = None
    for uri in (declared, declared.replace("http://", "https://"), declared.replace("https://", "http://")):
        cls = jsonschema.validators.validator_for({"$schema": uri}, default=None)
        if cls is not None:
            break
    assert cls is not None, f"{SCHEMA.name}: unknown $schema {declared!r}"
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(document: dict[str, Any]) -> list[str]:
    errors = sorted(compose_validator().iter_errors(document), key=lambda e: list(e.absolute_path))
    out = []
    for err in errors:
        where = "/".join(str(p) for p in err.absolute_path) or "(top)"
        detail = [f"{where}: {err.message}"]
        for sub in sorted(err.context or [], key=lambda e: list(e.absolute_path))[:5]:  # oneOf/anyOf
            detail.append("    " + "/".join(str(p) for p in sub.absolute_path) + ": " + sub.message)
        out.append("\n".join(detail))
    return out


def test_compose_file_follows_the_compose_specification() -> None:
    problems = schema_errors(load_compose())
    assert not problems, "docker-compose.yml does not follow the Compose specification:\n" + "\n".join(problems)


def test_compose_file_has_no_obsolete_version_key() -> None:
    assert "version" not in load_compose(), "`version:` is obsolete in the Compose specification; remove it"


@pytest.mark.parametrize("break_it", [
    pytest.param(lambda d: d["services"]["listen"].update(restrat="always"), id="misspelt-key"),
    pytest.param(lambda d: d["services"]["work"]["depends_on"]["postgres"].update(condition="service_up"),
                 id="unknown-depends_on-condition"),
    pytest.param(lambda d: d["services"]["postgres"]["healthcheck"].update(intervall="5s"),
                 id="misspelt-healthcheck-key"),
    pytest.param(lambda d: d.update(servics={}), id="misspelt-top-level-key"),
])
def test_schema_check_catches_mistakes(break_it: Any) -> None:
    """The validation is not vacuous: the stored schema rejects common mistakes."""
    document = copy.deepcopy(load_compose())
    break_it(document)
    assert schema_errors(document)


# -- compose services against the CLI and the settings --------------------------------------------

def _engine_service_names() -> list[str]:
    try:
        return list(engine_services(load_compose()))
    except (OSError, yaml.YAMLError, KeyError, MissingVariable):
        return ["(docker-compose.yml unreadable)"]  # the tests below then fail with the reason


@pytest.mark.parametrize("service", _engine_service_names())
def test_engine_service_command_exists_in_the_cli(service: str) -> None:
    """Fails when a command or option used by docker-compose.yml is renamed or removed in engine/cli.py."""
    svc = engine_services(load_compose())[service]
    args = command_args(svc)
    assert args, f"service {service!r} has no command (the image's default is `run`, everything in one)"
    problems = cli_problems(args)
    assert not problems, f"service {service!r}: command {args}:\n" + "\n".join(problems)


def test_compose_runs_every_role() -> None:
    roles = {name: command_args(svc)[:2] for name, svc in engine_services(load_compose()).items()}
    assert roles.get("migrate") == ["db", "upgrade"], roles
    assert roles.get("listen", [""])[0] == "listen", roles
    assert roles.get("work", [""])[0] == "work", roles
    assert roles.get("api", [""])[0] == "api", roles
    for name, svc in engine_services(load_compose()).items():
        args = command_args(svc)
        assert "--config" in args and args[args.index("--config") + 1] == CONFIG_DIR, (
            f"service {name!r}: pass --config {CONFIG_DIR} (where the configuration is mounted)")


@pytest.mark.parametrize("args, expected", [
    (["listen", "--config", "/etc/hl7engine"], None),
    (["listen", "-c", "/etc/hl7engine"], None),
    (["listen", "--config=/etc/hl7engine"], None),
    (["db", "upgrade", "--config", "/etc/hl7engine"], None),
    (["db", "upgrade", "--config", "/etc/hl7engine", "--revision", "head"], None),
    (["listn", "--config", "/etc/hl7engine"], "no such command"),
    (["db", "upgrad"], "no such command"),
    (["db"], "needs a subcommand"),
    (["listen", "--confg", "/etc/hl7engine"], "has no option --confg"),
    (["db", "upgrade", "--workers", "2"], "has no option --workers"),
    (["listen", "--config"], "requires an argument"),
    (["listen", "extra-argument"], "unexpected extra argument"),
])
def test_cli_check_itself(args: list[str], expected: str | None) -> None:
    """The checker on commands that exist (listen, db upgrade) and on broken ones."""
    problems = cli_problems(args)
    if expected is None:
        assert problems == []
    else:
        assert problems and expected in problems[0].lower(), problems


def test_engine_environment_is_the_engines_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every HL7ENGINE_* variable compose sets is a setting (a misspelt one would be silently
    ignored), and the values parse."""
    from engine.settings import Settings

    known = {f"HL7ENGINE_{name.upper()}" for name in Settings.model_fields}
    required = {"HL7ENGINE_DATABASE_URL", "HL7ENGINE_BROKER_URL", "HL7ENGINE_HTTP_PORT", "HL7ENGINE_LOG_LEVEL",
                "HL7ENGINE_LOG_FORMAT", "HL7ENGINE_QUEUE_PARTITIONS", "HL7ENGINE_QUEUE_NAME"}
    for name, svc in engine_services(load_compose()).items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.partition("=")[::2] for item in env)
        ours = {k: str(v) for k, v in env.items() if k.startswith("HL7ENGINE_")}
        assert not set(ours) - known, f"service {name!r}: not settings of engine/settings.py: {set(ours) - known}"
        assert not required - set(ours), f"service {name!r}: missing {required - set(ours)}"
        for key in list(os.environ):
            if key.startswith("HL7ENGINE_"):
                monkeypatch.delenv(key)
        for key, value in ours.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.database_url and settings.database_url.startswith("postgresql+psycopg://")
        assert settings.broker_url and settings.broker_url.startswith("amqp://")


def test_passwords_come_only_from_the_environment() -> None:
    """No password is written in docker-compose.yml: without the variables, compose refuses to start."""
    compose = load_compose()
    pg = compose["services"]["postgres"]["environment"]
    mq = compose["services"]["rabbitmq"]["environment"]
    assert pg.get("POSTGRES_PASSWORD") == TEST_ENV["POSTGRES_PASSWORD"], "postgres: use ${POSTGRES_PASSWORD:?…}"
    assert mq.get("RABBITMQ_DEFAULT_PASS") == TEST_ENV["RABBITMQ_PASSWORD"], "rabbitmq: use ${RABBITMQ_PASSWORD:?…}"
    for name, svc in engine_services(compose).items():
        env = svc["environment"]
        assert urlsplit(env["HL7ENGINE_DATABASE_URL"]).password == TEST_ENV["POSTGRES_PASSWORD"], (
            f"{name}: the database URL's password must be ${{POSTGRES_PASSWORD}}")
        assert urlsplit(env["HL7ENGINE_BROKER_URL"]).password == TEST_ENV["RABBITMQ_PASSWORD"], (
            f"{name}: the broker URL's password must be ${{RABBITMQ_PASSWORD}}")
    raw = COMPOSE.read_text(encoding="utf-8")
    for m in _VAR.finditer(raw):
        if (m.group(2) or m.group(5)) in TEST_ENV:
            assert m.group(3) in (None, ":?", "?"), f"{m.group(0)}: no default for a password"
    for missing in TEST_ENV:
        env = {k: v for k, v in TEST_ENV.items() if k != missing}
        for without in (env, {**env, missing: ""}):
            with pytest.raises(MissingVariable, match=missing):  # a default would let compose start without it
                load_compose(without)


# -- compose shape ---------------------------------------------------------------------------------

def _depends(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {k: v.get("condition", "service_started") for k, v in deps.items()}


def test_backends_are_healthchecked_with_named_volumes() -> None:
    compose = load_compose()
    services, volumes = compose["services"], compose.get("volumes") or {}
    assert services["rabbitmq"]["image"].startswith("rabbitmq:") and "management" in services["rabbitmq"]["image"]
    assert services["postgres"]["image"].startswith("postgres:16")
    for name in BACKENDS:
        svc = services[name]
        assert svc.get("healthcheck", {}).get("test"), f"{name}: needs a healthcheck (others wait for it)"
        named = [v.split(":")[0] if isinstance(v, str) else v.get("source") for v in svc.get("volumes", [])]
        assert any(n in volumes for n in named), f"{name}: keep its data in a named volume"
    assert services["rabbitmq"].get("hostname"), "rabbitmq: a fixed hostname keeps its node name and data"


def test_engine_services_wait_for_what_they_need() -> None:
    compose = load_compose()
    engines = engine_services(compose)
    assert _depends(engines["migrate"]).get("postgres") == "service_healthy"
    for name in ("listen", "work"):
        assert _depends(engines[name]) == {"postgres": "service_healthy", "rabbitmq": "service_healthy",
                                           "migrate": "service_completed_successfully"}, name
    deps = _depends(engines["api"])
    assert deps.get("postgres") == "service_healthy" and deps.get("migrate") == "service_completed_successfully"
    for name, svc in compose["services"].items():
        assert svc.get("restart"), f"{name}: give it a restart policy"
    assert engines["migrate"]["restart"] == "no", "migrate is a one-shot"


def test_work_is_scalable() -> None:
    work = load_compose()["services"]["work"]
    assert (work.get("deploy") or {}).get("replicas", 1) >= 2
    assert "container_name" not in work and "ports" not in work, "fixed names or host ports block --scale"


def test_ports_are_published() -> None:
    services = load_compose()["services"]

    def published(svc: dict[str, Any]) -> set[int]:
        out = set()
        for p in svc.get("ports", []):
            if isinstance(p, dict):
                out.add(int(p["published"]))
            else:
                parts = str(p).split("/")[0].split(":")
                out.add(int(parts[-2]) if len(parts) > 1 else int(parts[-1]))
        return out

    assert 8080 in published(services["api"])
    ports = published(services["listen"])
    for path in sorted((ROOT / "channels").glob("*.y*ml")):
        channel = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if channel.get("enabled", True):
            port = (channel.get("listen") or {}).get("port", 2575)
            assert port in ports, f"channels/{path.name} listens on {port}: publish it on the listen service"


def test_configuration_is_mounted_read_only() -> None:
    for name, svc in engine_services(load_compose()).items():
        mounts = {}
        for v in svc.get("volumes", []):
            if isinstance(v, str):
                source, target, *mode = v.split(":")
                mounts[target] = (source, "ro" in (mode[0].split(",") if mode else []))
            else:
                mounts[v["target"]] = (v.get("source"), bool(v.get("read_only")))
        for item in CONFIG_ITEMS:
            target = f"{CONFIG_DIR}/{item}"
            assert target in mounts, f"service {name!r}: mount the host's {item} at {target}"
            source, read_only = mounts[target]
            assert read_only, f"service {name!r}: mount {target} read-only"
            assert Path(source).name == item, f"service {name!r}: {source} mounted at {target}"


@pytest.mark.skipif(shutil.which("docker") is None, reason="docker is not installed")
def test_docker_compose_config() -> None:
    """Docker Compose's own check. Skipped where Docker or its compose plugin is missing, CI
    included (CI has no Docker): the schema test above covers the same ground without it."""
    docker = shutil.which("docker")
    assert docker is not None
    version = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if version.returncode != 0:
        pytest.skip("docker has no compose plugin")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HL7ENGINE_", "COMPOSE_"))}
    done = subprocess.run([docker, "compose", "-f", str(COMPOSE), "config", "-q"], cwd=ROOT,
                          env={**env, **TEST_ENV}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- the Dockerfile --------------------------------------------------------------------------------

def _console_scripts() -> dict[str, str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(pyproject["project"]["scripts"])


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    scripts = _console_scripts()
    entrypoints = [a for k, a in final_stage(dockerfile_instructions()) if k == "ENTRYPOINT"]
    assert entrypoints, "the Dockerfile has no ENTRYPOINT"
    form = exec_form(entrypoints[-1])
    assert form is not None, "ENTRYPOINT in exec form (JSON), so that signals reach the engine"
    assert len(form) == 1 and form[0] in scripts, f"ENTRYPOINT {form}: expected one of {sorted(scripts)}"
    assert scripts[form[0]] == "engine.cli:main"


def test_dockerfile_copies_the_configuration() -> None:
    """Each of channels/, mappings/, routes.yaml that the repository has is copied to the image's
    config directory, and every file the Dockerfile copies exists and is in the build context."""
    patterns = dockerignore_patterns()
    copied: dict[str, str] = {}
    for keyword, args in final_stage(dockerfile_instructions()):
        if keyword not in ("COPY", "ADD"):
            continue
        flags, sources, dest = copy_sources(args)
        if "from" in flags:
            continue
        for source in sources:
            item = source.rstrip("/").removeprefix("./")
            copied[item] = dest
    for item in CONFIG_ITEMS:
        if not (ROOT / item).exists():
            continue
        assert item in copied, f"the Dockerfile does not copy {item}/ to {CONFIG_DIR}"
        dest = copied[item].rstrip("/")
        assert dest in (f"{CONFIG_DIR}/{item}", CONFIG_DIR), f"{item} copied to {copied[item]}, not {CONFIG_DIR}"
    for keyword, args in dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        flags, sources, _ = copy_sources(args)
        if "from" in flags:
            continue
        for source in sources:
            item = source.rstrip("/").removeprefix("./") or "."
            assert (ROOT / item).exists(), f"COPY {source}: not in the repository (docker build would fail)"
            assert item == "." or not dockerignored(item, patterns), f"COPY {source}: excluded by .dockerignore"


def test_dockerfile_base_user_and_ports() -> None:
    instructions = dockerfile_instructions()
    bases = [a.split()[0] for k, a in instructions if k == "FROM"]
    assert bases and all(b.startswith("python:3.11-slim") for b in bases), bases
    final = final_stage(instructions)
    users = [a for k, a in final if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "run as a user other than root"
    exposed = {int(p.split("/")[0]) for k, a in final if k == "EXPOSE" for p in a.split()}
    assert {2575, 8080} <= exposed
    assert any(k == "RUN" and re.search(r"pip install (\S+ )*\.(\s|$)", a) for k, a in instructions), \
        "install the project with `pip install .`"


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", "var", ".git", "bench/results", ".mypy_cache", ".pytest_cache", ".ruff_cache",
                 ".hypothesis", "engine/__pycache__", ".env", "secrets"):
        assert dockerignored(path, patterns), f".dockerignore should exclude {path}"
    for path in ("engine", "pyproject.toml", "README.md", *CONFIG_ITEMS):
        assert not dockerignored(path, patterns), f".dockerignore must not exclude {path}"


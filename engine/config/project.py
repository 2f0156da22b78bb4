"""A configuration directory: ``channels/*.yaml``, ``routes.yaml``, ``mappings/``.

``load_project`` reads and checks all of it at once and raises ConfigError listing every problem.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.loader import dotted, load_model, position
from engine.config.models import ChannelConfig, ClientTLSConfig
from engine.config.routes import FileDestination, MLLPDestination, RecordDestination, RoutesConfig, routes_file
from engine.errors import ConfigError, Problem


@dataclass(slots=True)
class LoadedChannel:
    name: str
    config: ChannelConfig
    file: str  # as shown in messages
    yaml: Any  # the parsed YAML, for positions in cross-file checks


@dataclass(slots=True)
class Project:
    root: Path
    channels: list[LoadedChannel] = field(default_factory=list)
    routes: RoutesConfig = field(default_factory=RoutesConfig)
    mappings: Any = None  # engine.mapping MappingSet, when mappings/ exists

    def channel(self, name: str) -> LoadedChannel:
        for ch in self.channels:
            if ch.name == name:
                return ch
        raise KeyError(name)


def shown_path(path: Path) -> str:
    """A path as printed in messages: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def channel_files(root: Path) -> list[Path]:
    folder = root / "channels"
    if not folder.is_dir():
        return []
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")])


def load_channels(root: Path) -> tuple[list[LoadedChannel], list[Problem]]:
    problems: list[Problem] = []
    channels: list[LoadedChannel] = []
    for path in channel_files(root):
        shown = shown_path(path)
        cfg, yaml, found = load_model(ChannelConfig, path, shown)
        problems += found
        if cfg is None:
            continue
        name = cfg.name or path.stem
        channels.append(LoadedChannel(name, _absolute_tls(cfg, root), shown, yaml))
    problems += _cross_check(root, channels)
    return channels, problems


def _absolute_tls(cfg: ChannelConfig, root: Path) -> ChannelConfig:
    """TLS file paths are relative to the configuration directory, wherever the engine is started."""
    def fixed(tls: Any, keys: tuple[str, ...]) -> dict[str, Path | None]:
        return {k: (v if v is None or v.is_absolute() else root / v) for k in keys for v in [getattr(tls, k)]}

    tls = cfg.listen.tls
    if tls is not None:
        listen = cfg.listen.model_copy(update={"tls": tls.model_copy(update=fixed(tls, LISTEN_TLS_FILES))})
        cfg = cfg.model_copy(update={"listen": listen})
    out = cfg.ack.application_acks
    if out is not None and out.tls is not None:
        out = out.model_copy(update={"tls": out.tls.model_copy(update=fixed(out.tls, CLIENT_TLS_FILES))})
        cfg = cfg.model_copy(update={"ack": cfg.ack.model_copy(update={"application_acks": out})})
    return cfg


LISTEN_TLS_FILES = ("cert_file", "key_file", "client_ca_file")
CLIENT_TLS_FILES = ("ca_file", "cert_file", "key_file")


def _missing(root: Path, ch: LoadedChannel, where: tuple[str, ...], tls: Any, keys: tuple[str, ...]) -> list[Problem]:
    return _missing_files(root, ch.file, ch.yaml, where, tls, keys)


def _missing_files(root: Path, file: str, yaml: Any, where: tuple[str | int, ...], tls: Any,
                   keys: tuple[str, ...]) -> list[Problem]:
    problems = []
    for key in keys:
        path = getattr(tls, key)
        if path is not None and not path.is_file():
            line, col = position(yaml, (*where, key))
            written = path.relative_to(root) if path.is_relative_to(root) else path  # as in the YAML
            problems.append(Problem(file, line, col, dotted((*where, key)), f"file {str(written)!r} not found"))
    return problems


def _cross_check(root: Path, channels: list[LoadedChannel]) -> list[Problem]:
    problems: list[Problem] = []
    names: dict[str, LoadedChannel] = {}
    ports: dict[int, list[tuple[str, LoadedChannel]]] = {}
    for ch in channels:
        if ch.name in names:
            line, col = position(ch.yaml, ("name",))
            problems.append(Problem(ch.file, line, col, "name",
                                    f"channel name {ch.name!r} is also used by {names[ch.name].file}"))
        names.setdefault(ch.name, ch)
        if not ch.config.enabled:
            continue
        host, port = ch.config.listen.host, ch.config.listen.port
        for other_host, other in ports.get(port, []):
            if host == other_host or "0.0.0.0" in (host, other_host) or "::" in (host, other_host):
                line, col = position(ch.yaml, ("listen", "port"))
                problems.append(Problem(ch.file, line, col, "listen.port",
                                        f"port {port} is also used by channel {other.name!r} ({other.file})"))
        ports.setdefault(port, []).append((host, ch))
        tls = ch.config.listen.tls
        if tls is not None:
            missing = _missing(root, ch, ("listen", "tls"), tls, LISTEN_TLS_FILES)
            problems += missing or _tls_loads(ch)
        out = ch.config.ack.application_acks
        if out is not None and out.tls is not None:
            missing = _missing(root, ch, ("ack", "application_acks", "tls"), out.tls, CLIENT_TLS_FILES)
            problems += missing or _client_tls_loads(ch.file, ch.yaml, ("ack", "application_acks", "tls"), out.tls)
    return problems


def _client_tls_loads(file: str, yaml: Any, where: tuple[str | int, ...], tls: ClientTLSConfig) -> list[Problem]:
    """The TLS files for connecting out (application ACKs, mllp destinations) must load, not only exist."""
    ctx = ssl.create_default_context()
    if tls.ca_file is not None:
        try:
            ctx.load_verify_locations(str(tls.ca_file))
        except (ssl.SSLError, OSError) as exc:
            line, col = position(yaml, (*where, "ca_file"))
            return [Problem(file, line, col, dotted((*where, "ca_file")),
                            f"cannot load CA certificates {str(tls.ca_file)!r}: {exc}")]
    if tls.cert_file is not None:
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            line, col = position(yaml, (*where, "cert_file"))
            return [Problem(file, line, col, dotted((*where, "cert_file")),
                            f"cannot load certificate {str(tls.cert_file)!r} with key {str(tls.key_file)!r}: {exc}")]
    return []


def _tls_loads(ch: LoadedChannel) -> list[Problem]:
    """The certificate, key and CA files must load, not only exist."""
    tls = ch.config.listen.tls
    assert tls is not None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        line, col = position(ch.yaml, ("listen", "tls", "cert_file"))
        return [Problem(ch.file, line, col, "listen.tls.cert_file",
                        f"cannot load certificate {str(tls.cert_file)!r} with key {str(tls.key_file)!r}: "
                        f"{exc.reason if isinstance(exc, ssl.SSLError) else exc}")]
    if tls.client_ca_file is not None:
        try:
            ctx.load_verify_locations(str(tls.client_ca_file))
        except (ssl.SSLError, OSError) as exc:
            line, col = position(ch.yaml, ("listen", "tls", "client_ca_file"))
            return [Problem(ch.file, line, col, "listen.tls.client_ca_file",
                            f"cannot load CA certificates {str(tls.client_ca_file)!r}: {exc}")]
    return []


def load_project(root: Path) -> Project:
    """Load and check everything under ``root``; raise ConfigError with every problem found."""
    if not root.is_dir():
        raise ConfigError([Problem(shown_path(root), 0, 0, "", "configuration directory not found")])
    channels, problems = load_channels(root)
    project = Project(root=root, channels=channels)
    mapping_names: set[str] | None = None
    if (root / "mappings").is_dir():
        from engine.mapping.loader import load_mappings

        project.mappings, found = load_mappings(root)
        problems += found
        mapping_names = set(project.mappings.names) if project.mappings is not None else None
    path = routes_file(root)
    if path is not None:
        shown = shown_path(path)
        routes, yaml, found = load_model(RoutesConfig, path, shown)
        problems += found
        if routes is not None:
            project.routes = _absolute_paths(routes, root)
            problems += _check_routes(routes, yaml, shown, {c.name for c in channels}, mapping_names)
            problems += _check_destinations(project.routes, yaml, shown, root)
    if problems:
        raise ConfigError(problems)
    return project


def _check_routes(routes: RoutesConfig, yaml: Any, shown: str, channels: set[str],
                  mappings: set[str] | None) -> list[Problem]:
    """Every channel a route names exists; every mapping it names is in mappings/."""
    problems = []
    for i, r in enumerate(routes.routes):
        for j, name in enumerate(r.match.channel or []):
            if name not in channels and "*" not in name:
                line, col = position(yaml, ("routes", i, "match", "channel", j) if len(r.match.channel or []) > 1
                                     else ("routes", i, "match", "channel"))
                problems.append(Problem(shown, line, col, f"routes[{i}].match.channel",
                                        f"no channel named {name!r} in channels/ (known: "
                                        f"{', '.join(sorted(channels)) or 'none'})"))
        if r.mapping is None:
            continue
        if mappings is not None and r.mapping not in mappings:
            line, col = position(yaml, ("routes", i, "mapping"))
            problems.append(Problem(shown, line, col, f"routes[{i}].mapping",
                                    f"no mapping named {r.mapping!r} in mappings/ (known: "
                                    f"{', '.join(sorted(mappings)) or 'none'})"))
        elif mappings is None:
            line, col = position(yaml, ("routes", i, "mapping"))
            problems.append(Problem(shown, line, col, f"routes[{i}].mapping",
                                    f"mapping {r.mapping!r} named but there is no mappings/ directory"))
    return problems


def _absolute_paths(routes: RoutesConfig, root: Path) -> RoutesConfig:
    """A destination's directory and TLS files are relative to the configuration directory."""
    def fixed(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else root / path

    new_routes = []
    for r in routes.routes:
        dests: list[Any] = []
        for d in r.destinations:
            if isinstance(d, FileDestination):
                dests.append(d.model_copy(update={"directory": fixed(d.directory)}))
            elif isinstance(d, MLLPDestination) and d.tls is not None:
                tls = d.tls.model_copy(update={k: fixed(getattr(d.tls, k)) for k in CLIENT_TLS_FILES})
                dests.append(d.model_copy(update={"tls": tls}))
            else:
                dests.append(d)
        new_routes.append(r.model_copy(update={"destinations": dests}))
    return routes.model_copy(update={"routes": new_routes})


def _check_destinations(routes: RoutesConfig, yaml: Any, shown: str, root: Path) -> list[Problem]:
    """Routes that name the same destination define it the same way (one ordered stream); an mllp
    destination's TLS files exist and load; a file destination's directory is not a file."""
    problems: list[Problem] = []
    seen: dict[str, tuple[int, Any]] = {}
    for i, r in enumerate(routes.routes):
        for j, d in enumerate(r.destinations):
            if isinstance(d, RecordDestination):
                continue
            where: tuple[str | int, ...] = ("routes", i, "destinations", j)
            first = seen.setdefault(d.name, (i, d))
            if first[0] != i and first[1] != d:
                line, col = position(yaml, (*where, "name"))
                problems.append(Problem(shown, line, col, dotted((*where, "name")),
                                        f"destination {d.name!r} is defined differently in routes[{first[0]}] "
                                        f"({routes.routes[first[0]].name}); routes that share a destination "
                                        "must define it the same way, or give this one another name"))
            if isinstance(d, MLLPDestination) and d.tls is not None:
                missing = _missing_files(root, shown, yaml, (*where, "tls"), d.tls, CLIENT_TLS_FILES)
                problems += missing or _client_tls_loads(shown, yaml, (*where, "tls"), d.tls)
            if isinstance(d, FileDestination) and d.directory.exists() and not d.directory.is_dir():
                line, col = position(yaml, (*where, "directory"))
                written = d.directory.relative_to(root) if d.directory.is_relative_to(root) else d.directory
                problems.append(Problem(shown, line, col, dotted((*where, "directory")),
                                        f"{str(written)!r} is a file, not a directory"))
    return problems

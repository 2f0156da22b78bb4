"""A configuration directory: ``channels/*.yaml``, ``routes.yaml``, ``mappings/``.

``load_project`` reads and checks all of it at once and raises ConfigError listing every problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.config.loader import load_model, position
from engine.config.models import ChannelConfig
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
        channels.append(LoadedChannel(name, cfg, shown, yaml))
    problems += _cross_check(root, channels)
    return channels, problems


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
            for key in ("cert_file", "key_file", "client_ca_file"):
                value = getattr(tls, key)
                if value is None:
                    continue
                path = value if value.is_absolute() else root / value
                if not path.is_file():
                    line, col = position(ch.yaml, ("listen", "tls", key))
                    problems.append(Problem(ch.file, line, col, f"listen.tls.{key}",
                                            f"file {str(value)!r} not found"))
    return problems


def load_project(root: Path) -> Project:
    """Load and check everything under ``root``; raise ConfigError with every problem found."""
    channels, problems = load_channels(root)
    project = Project(root=root, channels=channels)
    if problems:
        raise ConfigError(problems)
    return project

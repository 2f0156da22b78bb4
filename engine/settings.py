"""Process settings from the environment (``HL7ENGINE_*``). Secrets live here, never in YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from engine.config.models import Duration


class Settings(BaseSettings):
    """Environment settings. Without a database or broker URL the embedded defaults serve:
    a SQLite message store and a SQLite-backed queue under ``<config dir>/var/``."""

    # an empty variable is an unset one (docker-compose passes "${X:-}" through as "")
    model_config = SettingsConfigDict(env_prefix="HL7ENGINE_", extra="ignore", env_ignore_empty=True)

    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db"
    )
    broker_url: str | None = Field(default=None, description="AMQP URL, e.g. amqp://guest:guest@host:5672/")
    data_dir: Path | None = Field(default=None, description="where embedded data lives (default <config>/var)")
    http_port: int = 8080
    api_tokens_file: Path | None = Field(default=None, description="who may read /fhir: lines `NAME sha256:HEX` "
                                         "(hl7engine token new NAME); unset: loopback clients only")
    http_tls_cert: Path | None = Field(default=None, description="PEM certificate (chain): serve the HTTP API "
                                       "over TLS")
    http_tls_key: Path | None = Field(default=None, description="PEM private key of http_tls_cert")
    log_format: Literal["console", "json"] = "console"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    queue_partitions: int = Field(default=8, ge=1, le=1024)
    queue_name: str = "hl7engine.inbound"
    store_writers: int = Field(default=0, ge=0, le=32, description="store writer processes for a database "
                               "server (0: 1); SQLite always has one")
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    workers: int = Field(default=1, ge=0, le=64, description="worker processes started by `hl7engine run` "
                         "(0: none; `hl7engine work` takes --workers)")
    retain_messages: Duration | None = Field(
        default=None, description="remove finished messages from the message store once older than this, e.g. "
        "90d (hourly, by `run`/`listen`; the central record is kept); unset: keep every message")

    def resolved_data_dir(self, config_dir: Path) -> Path:
        return self.data_dir if self.data_dir is not None else config_dir / "var"

    def resolved_database_url(self, config_dir: Path) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.resolved_data_dir(config_dir) / 'hl7engine.db'}"

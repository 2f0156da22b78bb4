"""Who may read the central record over HTTP.

The FHIR API serves patient data, so every ``/fhir`` request (except ``/fhir/metadata``, the
CapabilityStatement) must identify its client:

- with a bearer token (``Authorization: Bearer <token>``) listed in the tokens file
  (``HL7ENGINE_API_TOKENS_FILE``); the file holds a name and the SHA-256 of each token, never the
  token itself, one per line::

      # name        sha256 of the token (hl7engine token new NAME prints both)
      clinic-portal sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08

- or, only while no tokens file is configured, by connecting from this machine (loopback), so that
  a fresh ``hl7engine run`` can be tried locally and nothing is readable from the network.
  Once a tokens file is set, loopback clients need a token too (a reverse proxy on the same host
  would otherwise open the record to everyone behind it).

A refused request gets 401 with an OperationOutcome and ``WWW-Authenticate: Bearer``. Each
answered request is logged with the client's name, the resource type and the status, never the
query (identifiers in it are patient data) or the response.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ConfigError, Problem

_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._@-]{0,99})\s+sha256:(?P<hex>[0-9a-fA-F]{64})\s*$")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class ApiTokens:
    """The clients allowed to read the record: SHA-256 of each token -> the client's name."""

    by_hash: dict[str, str] = field(default_factory=dict)
    configured: bool = False  # a tokens file is set (even an empty one: then nobody may read)

    @classmethod
    def load(cls, path: Path | None) -> ApiTokens:
        """The tokens of ``path`` (None: no file configured). Problems name the file and line."""
        if path is None:
            return cls()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError([Problem(str(path), 0, 0, "", f"cannot read the API tokens file: "
                                       f"{exc.strerror or exc} (HL7ENGINE_API_TOKENS_FILE)")]) from None
        by_hash: dict[str, str] = {}
        problems: list[Problem] = []
        for n, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _LINE.match(line)
            if m is None:
                problems.append(Problem(str(path), n, 1, "", "expected `NAME sha256:<64 hex digits>` "
                                        "(hl7engine token new NAME prints such a line)"))
                continue
            h = m.group("hex").lower()
            if h in by_hash:
                problems.append(Problem(str(path), n, 1, "", f"the same token as {by_hash[h]!r}"))
                continue
            by_hash[h] = m.group("name")
        if problems:
            raise ConfigError(problems)
        return cls(by_hash, configured=True)

    def identify(self, token: str) -> str | None:
        """The name of the client whose token this is, else None (compared in constant time)."""
        h = digest(token)
        found = None
        for known, name in self.by_hash.items():
            if hmac.compare_digest(known, h):
                found = name
        return found

    def client(self, authorization: str | None, host: str | None) -> str | None:
        """Who is asking (a token's name, or ``loopback``), or None when the request is refused."""
        if authorization:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return self.identify(token.strip())
        if not self.configured and is_loopback(host):
            return "loopback"
        return None


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def new_token(name: str) -> tuple[str, str]:
    """A new random token and its line for the tokens file."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,99}", name):
        raise ValueError(f"expected a name of letters, digits and . _ @ - (at most 100), got {name!r}")
    token = secrets.token_urlsafe(32)
    return token, f"{name} sha256:{digest(token)}"

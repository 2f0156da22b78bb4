"""A channel's runtime objects, built from its configuration (which stays a plain model)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from engine.config.models import ChannelConfig
from engine.hl7.ack import AckBuilder, Clock, ControlIds
from engine.hl7.charsets import python_codec

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class ChannelRuntime:
    name: str
    config: ChannelConfig
    codec: str
    tz: ZoneInfo
    acks: AckBuilder
    clock: Callable[[], str]
    control_ids: Callable[[], str]
    versions: frozenset[str]
    processing_ids: frozenset[str]
    networks: tuple[Network, ...] | None

    @classmethod
    def build(cls, name: str, cfg: ChannelConfig, *, control_ids: Callable[[], str] | None = None) -> ChannelRuntime:
        tz = ZoneInfo(cfg.timezone)
        clock = Clock(tz)
        ids = control_ids or ControlIds()
        acks = AckBuilder(application=cfg.ack.application, facility=cfg.ack.facility, clock=clock,
                          control_ids=ids)
        nets = None
        if cfg.listen.allowed_senders is not None:
            nets = tuple(ipaddress.ip_network(n, strict=False) for n in cfg.listen.allowed_senders)
        return cls(
            name=name,
            config=cfg,
            codec=python_codec(cfg.charset),
            tz=tz,
            acks=acks,
            clock=clock,
            control_ids=ids,
            versions=frozenset(cfg.accept.versions),
            processing_ids=frozenset(cfg.accept.processing_ids),
            networks=nets,
        )

    @property
    def enhanced(self) -> bool:
        return self.config.ack.mode == "enhanced"

    @property
    def strict_segments(self) -> bool:
        return self.config.segment_separators == "strict"

    def sender_allowed(self, host: str) -> bool:
        if self.networks is None:
            return True
        try:
            addr = ipaddress.ip_address(host.split("%", maxsplit=1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in net for net in self.networks)

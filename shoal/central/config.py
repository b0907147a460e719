"""Central's settings: one object, checked once at start (``shoal central`` fills it from its flags)."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass


@dataclass
class CentralConfig:
    http_host: str = "127.0.0.1"
    http_port: int = 7000
    db_url: str = "sqlite:///./shoal-central.db"
    token_ttl_s: float = 300.0
    session_ttl_s: float = 3600.0
    report_interval_s: float = 1.0
    missed_reports: int = 3  # a cluster is out of the route table after this many missed reports
    webhook_url: str | None = None
    webhook_interval_s: float = 10.0
    webhook_timeout_s: float = 5.0
    tls_cert: str | None = None
    tls_key: str | None = None
    bootstrap_operator: tuple[str, str] | None = None
    auth_cache_s: float = 10.0
    max_body_size: int = 1024 * 1024
    max_wait_s: float = 60.0  # longest long poll a device may ask for
    command_poll_s: float = 1.0  # how often a replica looks for commands other replicas stored
    backlog: int = 2048
    db_timeout_s: float = 5.0  # a query that takes longer is given up: the request is 503
    startup_grace_s: float | None = None  # routes "not yet" (503) until clusters report; None: 3 reports
    trace_endpoint: str | None = None  # OTLP/HTTP traces endpoint (shoal[trace]); None: no tracing
    trace_ratio: float = 1.0  # of routes asked for without a traceparent

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        if self.token_ttl_s <= 0 or self.report_interval_s <= 0 or self.webhook_interval_s <= 0:
            raise ValueError("--token-ttl, the report interval and --webhook-interval must be positive")
        if self.max_wait_s <= 0:
            raise ValueError("--max-wait must be positive")
        if not 0.0 <= self.trace_ratio <= 1.0:
            raise ValueError(f"--trace-ratio must be from 0 to 1, not {self.trace_ratio}")
        if self.webhook_url and urllib.parse.urlsplit(self.webhook_url).scheme not in ("http", "https"):
            raise ValueError("--webhook must be an http:// or https:// URL")

    @property
    def max_age_s(self) -> float:
        """How old a cluster's last report may be for it to stay in the route table."""
        return self.missed_reports * self.report_interval_s

    @property
    def grace_s(self) -> float:
        """Seconds after start during which an unserved route is "not yet" (503), not "no" (404)."""
        return self.max_age_s if self.startup_grace_s is None else self.startup_grace_s

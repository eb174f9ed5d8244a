"""The configuration model: every section and key, its default and its checks (loading is relay/config/loading.py).

Every key has a safe default, so the relay runs with no file at all (copies land in ./outbox).
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator

from relay.core.policy import PolicySettings
from relay.core.retry import RetrySettings

ENV_PREFIX = "RELAY_"
PASSWORD_ENV = "RELAY_UPSTREAM_PASSWORD"  # noqa: S105 (a variable's name, not a secret)
DEFAULT_CONFIG_PATH = Path("config/relay.yaml")
UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
# Top-level keys set only in YAML: nested maps and lists have no RELAY_<SECTION>_<KEY> form.
YAML_ONLY_KEYS = ("upstreams", "routes")


class ConfigError(Exception):
    """A configuration problem, worded for the person who wrote the config."""


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as "90s", "30m", "12h" or "5d" (as Postfix writes them)."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], 1)
    try:
        return float(text[:-1] if text[-1:] in _DURATION_UNITS else text) * unit
    except ValueError:
        raise ValueError("expected seconds, or a number with a unit: 90s, 30m, 12h, 5d") from None


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# RFC 5321 Domain with at least two labels: receiving servers commonly refuse a bare name in EHLO.
QUALIFIED_DOMAIN = re.compile(rf"{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})+")
# The name this relay uses when the machine's own name is not qualified (as Postfix's mydomain falls back to).
FALLBACK_DOMAIN = "localdomain"


def hostname_problem(name: str) -> str | None:
    """What keeps `name` from serving as the relay's own name in EHLO (RFC 5321 Domain or address
    literal), worded to follow the name; None when it will do."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]
        address = literal[5:] if literal[:5].lower() == "ipv6:" else literal
        version = 0
        with contextlib.suppress(ValueError):
            version = ipaddress.ip_address(address).version
        if version != (6 if address is not literal else 4):
            return "is not an address literal: write [192.0.2.1] for IPv4, [IPv6:2001:db8::1] for IPv6"
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return "is an address: write it as an address literal, [192.0.2.1] or [IPv6:2001:db8::1]"
    if len(name) > 253 or not QUALIFIED_DOMAIN.fullmatch(name):
        return (
            "is not a fully qualified domain name (labels of letters, digits and inner hyphens joined by "
            "dots, such as relay.office.example) nor an address literal such as [192.0.2.1]"
        )
    return None


def machine_hostname() -> tuple[str, bool]:
    """The machine's fully qualified name, and True; or, when it has none, <short name>.localdomain and False."""
    fqdn = socket.getfqdn()
    if hostname_problem(fqdn) is None and not fqdn.lower().startswith("localhost."):
        return fqdn, True
    short = socket.gethostname().partition(".")[0]
    fallback = f"{short}.{FALLBACK_DOMAIN}"
    if hostname_problem(fallback) is not None or short.lower() == "localhost":
        fallback = f"localhost.{FALLBACK_DOMAIN}"
    return fallback, False


class ListenConfig(_Section):
    host: str = "127.0.0.1"
    # The relay's own name in its greeting, its EHLO upstream, Received: lines and Message-IDs (Postfix's
    # myhostname). null: the machine's fully qualified name.
    hostname: str | None = None
    port: int = Field(default=1025, ge=0, le=65535)
    max_message_size: int = Field(default=52_428_800, ge=1024)
    max_recipients: int = Field(default=1000, ge=1)
    allowed_networks: tuple[str, ...] = ()
    # TLS offered to clients: STARTTLS on the plain port, or TLS from the first byte (port 465 style).
    tls: Literal["none", "starttls", "implicit"] = "none"
    cert_file: Path | None = None
    key_file: Path | None = None
    # Client AUTH PLAIN/LOGIN against users_file; `required` refuses MAIL before AUTH.
    auth: Literal["none", "optional", "required"] = "none"
    users_file: Path = Path("./users.yaml")
    max_connections: int = Field(default=200, ge=1)
    # Postfix's smtpd_client_connection_count_limit: an office behind one NAT address shares it.
    max_connections_per_ip: int = Field(default=50, ge=1)
    # Failed logins per client address within 10 minutes before AUTH is refused for 10 minutes.
    max_auth_failures: int = Field(default=5, ge=1)
    # Seconds a client may take to send one command, or sit idle (Postfix's smtpd_timeout).
    command_timeout: float = Field(default=300, gt=0)
    # Bytes per second a client must keep up while sending a message: the DATA deadline is
    # command_timeout plus size / min_data_rate (Postfix's smtpd_min_data_rate).
    min_data_rate: int = Field(default=500, ge=1)
    # Seconds a client on an implicit-TLS port has to finish its TLS handshake; its slot is taken meanwhile.
    tls_handshake_timeout: Duration = Field(default=10, gt=0)
    # Processes that serve the connections the supervisor accepts (relay/workers.py), so more than one core works.
    # Each worker applies max_connections, max_connections_per_ip and max_auth_failures on its own.
    workers: int = Field(default=1, ge=1, le=64)

    @model_validator(mode="after")
    def _networks_parse(self) -> ListenConfig:
        for network in self.allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"allowed_networks: {network!r} is not a CIDR network") from exc
        return self

    @model_validator(mode="after")
    def _hostname_is_qualified(self) -> ListenConfig:
        problem = hostname_problem(self.hostname) if self.hostname is not None else None
        if problem is not None:
            raise ValueError(f"hostname: {self.hostname!r} {problem}")
        return self

    @model_validator(mode="after")
    def _tls_has_certificate(self) -> ListenConfig:
        if self.tls != "none" and (self.cert_file is None or self.key_file is None):
            raise ValueError(
                f"tls is {self.tls!r}, so cert_file and key_file must both be set (PEM certificate chain and key)"
            )
        return self

    def own_hostname(self) -> tuple[str, bool]:
        """The name the relay gives itself, and False when it is a fallback for an unqualified machine name."""
        return (self.hostname, True) if self.hostname is not None else machine_hostname()

    @property
    def backlog(self) -> int:
        """Connections the kernel queues before they are accepted: asyncio's default of 100 would drop a
        burst of connections the limits allow."""
        return max(100, self.max_connections)

    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.allowed_networks)


class RateLimitConfig(_Section):
    # null: unlimited. per_minute counts transactions (messages), per_day counts recipients, as providers do.
    per_minute: int | None = Field(default=None, ge=1)
    per_day: int | None = Field(default=None, ge=1)


class OAuth2Config(_Section):
    """XOAUTH2 login: the relay trades the refresh token in token_file for short-lived access tokens."""

    # null: no OAuth2 (a password, or no AUTH). microsoft: Entra ID; google: Google accounts.
    provider: Literal["microsoft", "google"] | None = None
    # Microsoft's directory: common, organizations, or the tenant's ID or domain.
    tenant: str = "common"
    client_id: str | None = None
    # Google's installed apps have one (Google says it is not confidential); Microsoft's public apps do not.
    client_secret: SecretStr | None = None
    token_file: Path | None = None
    # The provider's endpoints, for national clouds and tests; null: the provider's public endpoints.
    token_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    authorization_endpoint: str | None = None

    @model_validator(mode="after")
    def _provider_needs_client(self) -> OAuth2Config:
        if self.provider is not None and (self.client_id is None or self.token_file is None):
            raise ValueError(f"provider is {self.provider!r}, so client_id and token_file must both be set")
        return self


class UpstreamConfig(_Section):
    host: str | None = None
    port: int = Field(default=587, ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    verify_certificate: bool = True
    ca_file: Path | None = None
    # auto: log in with username and a password or oauth2, or not at all. passthrough: each client logs in
    # with their own account at this upstream; the relay checks it there and keeps it only for that session.
    auth: Literal["auto", "passthrough"] = "auto"
    username: str | None = None
    password_file: Path | None = None
    oauth2: OAuth2Config = OAuth2Config()
    max_connections: int = Field(default=4, ge=1, le=100)
    timeout: float = Field(default=60, gt=0)
    rate_limit: RateLimitConfig = RateLimitConfig()
    # Gmail takes 100 recipients per message, Microsoft 365 500, SES 50: the smallest is the safe default.
    max_recipients_per_message: int = Field(default=50, ge=1)

    @model_validator(mode="after")
    def _passthrough_stores_no_credential(self) -> UpstreamConfig:
        if self.auth != "passthrough":
            return self
        stored = [
            key
            for key, value in (
                ("username", self.username),
                ("password_file", self.password_file),
                ("oauth2", self.oauth2.provider),
            )
            if value is not None
        ]
        if stored:
            raise ValueError(
                f"auth is passthrough, so {', '.join(stored)} must not be set: the relay stores no credential "
                "for this upstream; each client logs in with their own account"
            )
        return self

    @model_validator(mode="after")
    def _oauth2_has_user(self) -> UpstreamConfig:
        if self.oauth2.provider is not None and not self.username:
            raise ValueError("oauth2.provider is set, so username (the mailbox to log in as) must be set too")
        if self.oauth2.provider is not None and self.password_file is not None:
            raise ValueError("set either password_file or oauth2, not both")
        return self

    @property
    def is_passthrough(self) -> bool:
        return self.auth == "passthrough"

    @property
    def uses_oauth2(self) -> bool:
        return self.oauth2.provider is not None


class SpoolConfig(_Section):
    path: Path = Path("./spool")
    # postgresql://user@host:port/database?sslmode=verify-full: a spool shared by several relays.
    # null: the SQLite spool in path, for one relay (and its workers) on one machine.
    url: str | None = None
    # The database password; without it, libpq's usual PGPASSWORD or ~/.pgpass (PGPASSFILE).
    password_file: Path | None = None
    # Seconds a relay holds a copy it is sending; another relay takes it over once this runs out.
    lease: Duration = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _url_is_postgresql(self) -> SpoolConfig:
        if self.url is not None and not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError("url: expected postgresql://user@host:port/database (or null for the SQLite spool)")
        if self.url is not None and urllib.parse.urlsplit(self.url).password is not None:
            # The URL is logged and shown by `queue` commands; a password belongs in a file of its own.
            raise ValueError("url: must not hold the password; put it in spool.password_file (or PGPASSWORD)")
        return self

    @property
    def shared(self) -> bool:
        """True when the spool is a database that several relays may share."""
        return self.url is not None


class RouteConfig(_Section):
    """One line of routes: mail from `sender` (an address, or *@domain) leaves through `upstream`."""

    sender: str
    upstream: str

    @model_validator(mode="after")
    def _sender_is_address_or_domain(self) -> RouteConfig:
        local, at, domain = self.sender.rpartition("@")
        if not at or not local or not domain or ("*" in local and local != "*") or "*" in domain:
            raise ValueError(f"sender: {self.sender!r} is neither an address nor *@domain")
        return self


class DeliveryConfig(_Section):
    mode: Literal["hybrid", "queue", "direct"] = "hybrid"
    sync_timeout: Duration = Field(default=20, ge=0)
    max_age: Duration = Field(default=5 * 86400, gt=0)
    # Postfix's minimal_backoff_time / maximal_backoff_time: the first retry and the longest wait between two.
    min_backoff: Duration = Field(default=60, gt=0)
    max_backoff: Duration = Field(default=3600, gt=0)
    # Below Docker's 10 seconds between SIGTERM and SIGKILL.
    stop_timeout: Duration = Field(default=8, ge=0)

    @model_validator(mode="after")
    def _backoff_order(self) -> DeliveryConfig:
        if self.max_backoff < self.min_backoff:
            raise ValueError(f"max_backoff ({self.max_backoff:g} s) must not be smaller than min_backoff")
        return self

    def retry_settings(self) -> RetrySettings:
        """The backoff and give-up times for the core's retry rule, which takes plain data."""
        return RetrySettings(min_backoff=self.min_backoff, max_backoff=self.max_backoff, max_age=self.max_age)


class PolicyConfig(_Section):
    # hold: accept, keep in the spool, send only once a person releases it (console or `privacy-relay held`).
    action: Literal["split", "bcc", "reject", "pass", "hold"] = "split"
    min_recipients: int = Field(default=2, ge=2)
    internal_domains: tuple[str, ...] = ()
    always_visible: tuple[str, ...] = ()
    calendar: Literal["reject", "pass"] = "reject"
    tnef: Literal["reject", "pass"] = "reject"
    override_tag: str | None = None
    # action hold: tell the sender their message waits, and how to release it.
    hold_notify: bool = True
    # action hold: a message nobody released by then goes back to the sender, not sent.
    hold_max_age: Duration = Field(default=3 * 86400, gt=0)

    @model_validator(mode="after")
    def _override_tag_not_blank(self) -> PolicyConfig:
        if self.override_tag is not None and not self.override_tag.strip():
            raise ValueError("override_tag: must be null or a visible tag such as [visible]")
        return self

    def settings(self) -> PolicySettings:
        """The same values for the core, which takes plain data."""
        return PolicySettings(**self.model_dump())


class ConsoleConfig(_Section):
    """The local web page, its JSON API, /healthz and /metrics (relay/console/)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    # 8725: free in /etc/services and unlike the ports of the tools found beside a relay (Mailpit 8025,
    # Jupyter 8888, dev servers 3000/5000/8000/8080, Prometheus and its exporters 9090-9999). 0: a free port.
    port: int = Field(default=8725, ge=0, le=65535)
    # null: console-token inside spool.path, which only the relay's user may read.
    token_file: Path | None = None
    # Host names the console answers to besides localhost, 127.0.0.1, [::1] and console.host.
    allowed_hosts: tuple[str, ...] = ()
    # Days the activity page keeps a message, then it is purged.
    history_days: float = Field(default=14, gt=0)
    # true: /metrics without the token, for a Prometheus that cannot send one.
    metrics_public: bool = False


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"
    show_addresses: bool = False


class Config(_Section):
    listen: ListenConfig = ListenConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    outbox: Path = Path("./outbox")
    spool: SpoolConfig = SpoolConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    policy: PolicyConfig = PolicyConfig()
    logging: LoggingConfig = LoggingConfig()
    console: ConsoleConfig = ConsoleConfig()
    # Named upstreams besides `upstream`, chosen by routes; YAML only (no RELAY_* variables).
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict, json_schema_extra={"yaml_only": True})
    # By envelope sender, first match wins; no match: `upstream` (Postfix's sender_dependent_relayhost_maps).
    routes: tuple[RouteConfig, ...] = Field(default=(), json_schema_extra={"yaml_only": True})
    # Not a YAML key: read from upstream.password_file or RELAY_UPSTREAM_PASSWORD.
    upstream_password: SecretStr | None = Field(default=None, exclude=True)
    # Not YAML keys either: each named upstream's password, read from its password_file.
    named_upstream_passwords: dict[str, SecretStr] = Field(default_factory=dict, exclude=True)
    # Not a YAML key: the spool database's password, read from spool.password_file.
    spool_password: SecretStr | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _routes_name_upstreams(self) -> Config:
        for name, upstream in self.upstreams.items():
            if not UPSTREAM_NAME.fullmatch(name):
                raise ValueError(f"upstreams.{name}: a name is lower-case letters, digits, - and _")
            if upstream.host is None:
                raise ValueError(f"upstreams.{name}.host: a named upstream needs a host")
        for number, route in enumerate(self.routes):
            if route.upstream not in self.upstreams:
                known = ", ".join(sorted(self.upstreams)) or "none are defined"
                raise ValueError(f"routes[{number}].upstream: {route.upstream!r} is not one of upstreams ({known})")
        return self

    @property
    def console_token_file(self) -> Path:
        return self.console.token_file or self.spool.path / "console-token"

    @property
    def uses_outbox(self) -> bool:
        return self.upstream.host is None

    @property
    def uses_passthrough(self) -> bool:
        """True when some upstream takes each client's own login: then the relay offers AUTH to clients."""
        return any(upstream.is_passthrough for upstream in (self.upstream, *self.upstreams.values()))

    @model_validator(mode="after")
    def _passthrough_needs_a_host(self) -> Config:
        if self.upstream.is_passthrough and self.upstream.host is None:
            raise ValueError("upstream.auth is passthrough, so upstream.host must be set: logins are checked there")
        return self

    @model_validator(mode="after")
    def _hold_needs_the_spool(self) -> Config:
        if self.policy.action != "hold":
            return self
        if self.delivery.mode == "direct":
            raise ValueError(
                "policy.action is hold, so delivery.mode must be hybrid or queue: held mail waits in the spool"
            )
        if self.uses_passthrough:
            raise ValueError(
                "policy.action is hold, but an upstream's auth is passthrough: that mail is sent while the client "
                "waits, logged in as the client, so it cannot wait for a person to release it"
            )
        return self

    @model_validator(mode="after")
    def _rate_limit_needs_one_worker(self) -> Config:
        # With SQLite each worker process counts only its own sends, so N workers would allow N times the
        # limit; a shared spool (spool.url) counts every relay's and worker's sends in the database.
        limited = self.upstream.rate_limit.per_minute or self.upstream.rate_limit.per_day
        if limited and self.listen.workers > 1 and not self.spool.shared:
            raise ValueError(
                "upstream.rate_limit is counted per process with the SQLite spool: with it set, listen.workers "
                "must be 1 (or the spool shared in PostgreSQL, spool.url)"
            )
        return self

"""Loading the configuration: the YAML file, then RELAY_* environment variables over it, validated once at
start-up, with errors that name the key and where it was set; and the checks that need the whole config.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from relay.config.models import (
    DEFAULT_CONFIG_PATH,
    ENV_PREFIX,
    PASSWORD_ENV,
    Config,
    ConfigError,
    ListenConfig,
)


def _env_names(model: type[BaseModel], prefix: str, path: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Map every RELAY_* variable name to the key path it sets, derived from the model itself."""
    names: dict[str, tuple[str, ...]] = {}
    for field_name, field in model.model_fields.items():
        if field.exclude or (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("yaml_only")):
            continue
        key_path = (*path, field_name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names.update(_env_names(annotation, f"{prefix}{field_name.upper()}_", key_path))
        else:
            names[f"{prefix}{field_name.upper()}"] = key_path
    return names


ENV_KEYS: dict[str, tuple[str, ...]] = _env_names(Config, ENV_PREFIX, ())


def _is_list_field(key_path: tuple[str, ...]) -> bool:
    model: type[BaseModel] = Config
    for part in key_path[:-1]:
        annotation = model.model_fields[part].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation
    annotation = model.model_fields[key_path[-1]].annotation
    return get_origin(annotation) is tuple or tuple in get_args(annotation)


def _env_value(key_path: tuple[str, ...], raw: str) -> Any:
    if _is_list_field(key_path):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if raw.strip().lower() in ("", "null"):
        return None
    return raw


def _set_path(tree: dict[str, Any], key_path: tuple[str, ...], value: Any) -> None:
    node = tree
    for part in key_path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[key_path[-1]] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (listen, upstream, ...)")
    return data


def _describe_errors(exc: ValidationError, source: str, env_set: Mapping[tuple[str, ...], str]) -> str:
    lines = []
    for error in exc.errors():
        key_path = tuple(str(part) for part in error["loc"])
        key = ".".join(key_path) or "(top level)"
        where = source
        for env_path, env_name in env_set.items():
            # A section-level error (two keys that disagree) may come from a variable for one of its keys.
            if key_path[: len(env_path)] == env_path or (key_path and env_path[: len(key_path)] == key_path):
                where = f"the environment variable {env_name}"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key (check its spelling and section)"
        # A whole section's input may hold a secret (oauth2.client_secret): only single values are quoted.
        quoted = error["type"] != "extra_forbidden" and not isinstance(error.get("input"), dict)
        shown = f" (got {error.get('input')!r})" if quoted else ""
        lines.append(f"  {key}: {message}{shown} — in {where}")
    return "invalid configuration:\n" + "\n".join(lines)


def _read_password(data: Config, environ: Mapping[str, str]) -> SecretStr | None:
    from_env = environ.get(PASSWORD_ENV)
    if from_env:
        return SecretStr(from_env)
    if data.upstream.password_file is None:
        return None
    return _read_password_file(data.upstream.password_file, "upstream.password_file")


def _read_password_file(path: Path, key: str) -> SecretStr:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from exc
    return SecretStr(text.strip("\r\n"))


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the config: explicit file, else ./config/relay.yaml if present, else defaults; then env."""
    environ = os.environ if environ is None else environ
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    tree: dict[str, Any] = _read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "the built-in defaults"

    unknown = sorted(
        name for name in environ if name.startswith(ENV_PREFIX) and name not in ENV_KEYS and name != PASSWORD_ENV
    )
    if unknown:
        raise ConfigError(
            "unknown environment variable(s): "
            + ", ".join(unknown)
            + " (names are RELAY_<SECTION>_<KEY>, e.g. RELAY_UPSTREAM_HOST)"
        )
    env_set: dict[tuple[str, ...], str] = {}
    for name, key_path in ENV_KEYS.items():
        if name in environ:
            _set_path(tree, key_path, _env_value(key_path, environ[name]))
            env_set[key_path] = name
    try:
        config = Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe_errors(exc, source, env_set)) from None
    if config.upstream.is_passthrough and environ.get(PASSWORD_ENV):
        raise ConfigError(
            f"upstream.auth is passthrough, so the environment variable {PASSWORD_ENV} must not be set: "
            "the relay stores no credential for that upstream"
        )
    if config.upstream.password_file is not None or environ.get(PASSWORD_ENV):
        config = config.model_copy(update={"upstream_password": _read_password(config, environ)})
    named_passwords = {}
    for name, upstream in config.upstreams.items():
        if upstream.password_file is not None:
            named_passwords[name] = _read_password_file(upstream.password_file, f"upstreams.{name}.password_file")
        elif upstream.username and not upstream.uses_oauth2:
            raise ConfigError(
                f"upstreams.{name}.username is set but there is no password: set upstreams.{name}.password_file"
            )
    if named_passwords:
        config = config.model_copy(update={"named_upstream_passwords": named_passwords})
    if config.spool.password_file is not None:
        spool_password = _read_password_file(config.spool.password_file, "spool.password_file")
        config = config.model_copy(update={"spool_password": spool_password})
    if config.upstream.username and not config.upstream.uses_oauth2 and config.upstream_password is None:
        raise ConfigError(
            "upstream.username is set but there is no password: set upstream.password_file "
            f"or the environment variable {PASSWORD_ENV}"
        )
    check_passthrough_transport(config)
    check_listen_safety(config.listen)
    check_console_safety(config)
    return config


def check_console_safety(config: Config) -> None:
    """The console's token must not cross a network in clear text."""
    console = config.console
    if not console.enabled or is_loopback_host(console.host):
        return
    if config.listen.cert_file is None or config.listen.key_file is None:
        raise ConfigError(
            f"console.host is {console.host!r}, which other machines can reach, but the console would be "
            "served without TLS, so its token would cross the network in clear text. Set listen.cert_file "
            "and listen.key_file (the console uses them for HTTPS), or keep console.host: 127.0.0.1 and "
            "reach it through an SSH tunnel."
        )


def check_passthrough_transport(config: Config) -> None:
    """Passwords (people's own, for passthrough, or the relay's upstream.username) never cross the
    network in clear text: tls none is for an upstream on this machine only."""
    upstreams = {"upstream": config.upstream, **{f"upstreams.{n}": u for n, u in config.upstreams.items()}}
    for key, upstream in upstreams.items():
        if upstream.tls != "none" or upstream.host is None or is_loopback_host(upstream.host):
            continue
        if upstream.is_passthrough:
            raise ConfigError(
                f"{key}.auth is passthrough but {key}.tls is none: each client's password would cross the "
                f"network to {upstream.host} in clear text. Set {key}.tls: starttls or implicit"
            )
        if upstream.username:
            raise ConfigError(
                f"{key}.username is set but {key}.tls is none: the relay's login would cross the network to "
                f"{upstream.host} in clear text. Set {key}.tls: starttls or implicit"
            )


def is_loopback_host(host: str) -> bool:
    """True when every address the host name resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def check_listen_safety(listen: ListenConfig) -> None:
    """Refuse to become an open relay: a non-loopback bind needs allowed_networks or required AUTH."""
    if is_loopback_host(listen.host):
        return
    if not listen.allowed_networks and listen.auth != "required":
        raise ConfigError(
            f"listen.host is {listen.host!r}, which other machines can reach, but "
            "listen.allowed_networks is empty and listen.auth is not required. That would make an open "
            "relay anyone could use to send mail in your name. Set listen.allowed_networks (for example "
            "[192.168.1.0/24], or RELAY_LISTEN_ALLOWED_NETWORKS=127.0.0.1/32,172.16.0.0/12 in a container, "
            "where the health check connects from 127.0.0.1), "
            "or set listen.auth: required, or listen on 127.0.0.1."
        )
    if listen.auth == "required" and listen.tls == "none":
        raise ConfigError(
            f"listen.auth is required but listen.tls is none: clients on other machines than {listen.host!r} "
            "itself could never log in, because passwords are only accepted over TLS or from loopback. "
            "Set listen.tls: starttls with listen.cert_file and listen.key_file."
        )

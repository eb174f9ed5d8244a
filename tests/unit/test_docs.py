"""The documentation and the Docker image stay true to the code: keys, defaults, variables, commands."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.config.loading import ENV_KEYS, load_config
from relay.config.models import PASSWORD_ENV, YAML_ONLY_KEYS, Config, ConfigError

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CONFIGURATION_REFERENCE = ROOT / "docs" / "configuration.md"
EXAMPLE_CONFIG = ROOT / "config" / "relay.example.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_GUIDE = ROOT / "docs" / "docker.md"
COMPOSE_EXAMPLE = ROOT / "contrib" / "docker" / "compose.yaml"
# The files this test keeps honest; other guides in docs/ have their own owners.
OWN_DOCS = (
    README,
    CONFIGURATION_REFERENCE,
    EXAMPLE_CONFIG,
    DOCKERFILE,
    DOCKER_GUIDE,
    COMPOSE_EXAMPLE,
    ROOT / "docs" / "mail-clients.md",
)

QUICK_START = (
    "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/privacy-relay serve",
    "bash .ci/run",
)
REFERENCE_ENTRY = re.compile(
    r"^### `(?P<key>[a-z0-9_.]+)`\n\nDefault: `(?P<default>[^`]*)` · Environment: `(?P<env>RELAY_[A-Z0-9_]+)`$",
    re.MULTILINE,
)
ENV_NAME = re.compile(r"\bRELAY_[A-Z0-9_]*[A-Z0-9]\b")
KEYS = {".".join(path): path for path in ENV_KEYS.values()}


def section(markdown: str, heading: str) -> str:
    """The text under a heading, up to the next heading of the same or a higher level."""
    level = len(heading.split(" ", 1)[0])
    lines = markdown.splitlines()
    start = lines.index(heading)
    in_code = False
    for number in range(start + 1, len(lines)):
        line = lines[number]
        in_code = in_code != line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not in_code and 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            return "\n".join(lines[start:number]) + "\n"
    return "\n".join(lines[start:]) + "\n"


def code_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", markdown, re.MULTILINE | re.DOTALL)


def value_at(config: Config, key_path: tuple[str, ...]) -> Any:
    value: Any = config
    for part in key_path:
        value = getattr(value, part)
    return value


def tree_with(key_path: tuple[str, ...], value: Any) -> dict[str, Any]:
    tree: Any = value
    for part in reversed(key_path):
        tree = {part: tree}
    return dict(tree)


def leaf_keys(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    keys: set[tuple[str, ...]] = set()
    for name, value in tree.items():
        if isinstance(value, dict) and value:
            keys |= leaf_keys(value, (*prefix, name))
        else:
            keys.add((*prefix, name))
    return keys


def reference_entries() -> dict[str, tuple[str, str]]:
    reference = CONFIGURATION_REFERENCE.read_text(encoding="utf-8")
    return {m["key"]: (m["default"], m["env"]) for m in REFERENCE_ENTRY.finditer(reference)}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the final stage, continuation lines joined, comments dropped."""
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    instructions = [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]
    last_from = max(i for i, (name, *_) in enumerate(instructions) if name.upper() == "FROM")
    return [(name.upper(), rest[0] if rest else "") for name, *rest in instructions[last_from:]]


def image_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for name, arguments in dockerfile_instructions():
        if name == "ENV":
            env.update(re.findall(r'(\w+)=("[^"]*"|\S+)', arguments))
    return {key: value.strip('"') for key, value in env.items() if key.startswith("RELAY_")}


def test_example_config_loads_and_states_every_default() -> None:
    assert load_config(EXAMPLE_CONFIG, environ={}) == Config()


def test_example_config_names_every_key() -> None:
    tree = yaml.safe_load(EXAMPLE_CONFIG.read_text(encoding="utf-8"))
    assert leaf_keys(tree) == set(ENV_KEYS.values()) | {(key,) for key in YAML_ONLY_KEYS}


YAML_ONLY_ENTRY = re.compile(r"^### `(?P<key>[a-z_]+)`\n\nDefault: `(?P<default>[^`]*)` · YAML only$", re.MULTILINE)


@pytest.mark.parametrize("key", YAML_ONLY_KEYS)
def test_reference_documents_yaml_only_keys_with_their_defaults(key: str) -> None:
    reference = CONFIGURATION_REFERENCE.read_text(encoding="utf-8")
    entries = {m["key"]: m["default"] for m in YAML_ONLY_ENTRY.finditer(reference)}
    documented = Config.model_validate({key: yaml.safe_load(entries[key])})
    assert getattr(documented, key) == getattr(Config(), key)


def test_reference_documents_every_key_with_its_environment_variable() -> None:
    documented = {key: env for key, (_, env) in reference_entries().items()}
    assert documented == {".".join(path): env for env, path in ENV_KEYS.items()}


@pytest.mark.parametrize("key", sorted(KEYS))
def test_reference_states_the_real_default(key: str) -> None:
    default_text, _ = reference_entries()[key]
    documented = Config.model_validate(tree_with(KEYS[key], yaml.safe_load(default_text)))
    assert value_at(documented, KEYS[key]) == value_at(Config(), KEYS[key])


def test_readme_yaml_examples_are_valid_configuration() -> None:
    examples = code_blocks(README.read_text(encoding="utf-8"), "yaml")
    assert len(examples) >= 3, "the provider examples are YAML blocks"
    for example in examples:
        Config.model_validate(yaml.safe_load(example))


def test_reference_documents_the_password_variable() -> None:
    assert PASSWORD_ENV in CONFIGURATION_REFERENCE.read_text(encoding="utf-8")


@pytest.mark.parametrize("path", OWN_DOCS, ids=lambda p: p.name)
def test_docs_name_only_real_environment_variables(path: Path) -> None:
    named = set(ENV_NAME.findall(path.read_text(encoding="utf-8")))
    assert named - set(ENV_KEYS) - {PASSWORD_ENV} == set()


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in markdown.splitlines():
        if re.match(r"#{1,6} ", line):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", [p for p in OWN_DOCS if p.suffix == ".md"], ids=lambda p: p.name)
def test_links_point_at_files_and_headings_that_exist(path: Path) -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name} links to missing {target}"
        if anchor:
            assert anchor in heading_anchors(linked.read_text(encoding="utf-8")), f"{path.name}: {target}"


@pytest.mark.parametrize("command", QUICK_START)
def test_quick_start_command_is_one_line_in_a_shell_block(command: str) -> None:
    quick_start = section(README.read_text(encoding="utf-8"), "## Quick start")
    lines = [line for block in code_blocks(quick_start, "sh") for line in block.splitlines()]
    assert command in lines


def test_image_runs_as_a_non_root_user_before_its_command() -> None:
    instructions = dockerfile_instructions()
    names = [name for name, _ in instructions]
    users = [arguments for name, arguments in instructions if name == "USER"]
    assert users, "the final stage has no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    assert names.index("USER") < names.index("CMD")
    assert ("CMD", '["privacy-relay", "serve"]') in instructions
    assert ("EXPOSE", "1025") in instructions


def test_image_health_check_passes_only_while_the_relay_accepts_mail(start_console, loops) -> None:
    checks = [arguments for name, arguments in dockerfile_instructions() if name == "HEALTHCHECK"]
    assert len(checks) == 1
    command = json.loads(checks[0].split(" CMD ", 1)[1])
    assert command[0] == "python"
    argv = [sys.executable, *command[1:]]

    def run_check(console_port: int) -> int:
        env = {"RELAY_CONSOLE_PORT": str(console_port), "PATH": ""}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False).returncode

    running = start_console(RELAY_LISTEN_ALLOWED_NETWORKS="172.30.0.0/24")  # the check is not an SMTP client
    assert run_check(running.client.port) == 0
    loops.run(running.relay.stop())  # /healthz answers 503
    assert run_check(running.client.port) != 0


def test_image_refuses_to_start_without_allowed_networks() -> None:
    env = image_environment()
    assert env["RELAY_LISTEN_HOST"] == "0.0.0.0"
    with pytest.raises(ConfigError, match="allowed_networks"):
        load_config(EXAMPLE_CONFIG, environ=env)


def test_the_docker_guide_shows_the_compose_example_as_it_is() -> None:
    assert code_blocks(DOCKER_GUIDE.read_text(encoding="utf-8"), "yaml")[0] == COMPOSE_EXAMPLE.read_text(
        encoding="utf-8"
    )


def test_compose_example_starts_the_relay_for_the_app_network(tmp_path: Path) -> None:
    compose = yaml.safe_load(COMPOSE_EXAMPLE.read_text(encoding="utf-8"))
    relay = compose["services"]["relay"]
    assert "ports" not in relay, "the relay's port must not be published"
    assert compose["services"]["app"]["depends_on"]["relay"]["condition"] == "service_healthy"

    environ = {**image_environment(), **relay["environment"]}
    password_file = tmp_path / "smtp_password"
    password_file.write_text("app password\n", encoding="utf-8")
    environ["RELAY_UPSTREAM_PASSWORD_FILE"] = str(password_file)
    config = load_config(EXAMPLE_CONFIG, environ=environ)

    subnet = compose["networks"]["mail"]["ipam"]["config"][0]["subnet"]
    assert set(config.listen.allowed_networks) >= {"127.0.0.1/32", subnet}
    assert config.upstream_password is not None
    assert config.upstream_password.get_secret_value() == "app password"


def test_the_readme_stays_a_guide_of_under_400_lines() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) < 400


@pytest.mark.parametrize("created", ["outbox/copy.eml", "spool/spool.db"])
def test_git_ignores_what_the_quick_start_creates(created: str) -> None:
    ignored = subprocess.run(["git", "check-ignore", "--quiet", "--no-index", created], cwd=ROOT, check=False)
    assert ignored.returncode == 0


def test_git_still_sees_the_relays_own_spool_package() -> None:
    ignored = subprocess.run(["git", "check-ignore", "--quiet", "--no-index", "relay/spool/sqlite.py"], cwd=ROOT)
    assert ignored.returncode == 1

"""`privacy-relay user add|remove|list`, run as the real command, with a pipe and with a terminal."""

from __future__ import annotations

import os
import pty
import select
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.smtp.accounts import load_accounts, save_accounts, verify_password

PASSWORD = "a long and secret password"


def run_user(tmp_path: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "RELAY_LISTEN_USERS_FILE": str(tmp_path / "users.yaml")}
    return subprocess.run(
        [sys.executable, "-m", "relay", "user", *args],
        input=password if password is not None else "",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=60,
    )


def test_add_list_remove_with_the_password_on_stdin(tmp_path: Path) -> None:
    added = run_user(
        tmp_path,
        "add",
        "kay",
        "--address",
        "kay@office.test",
        "--address",
        "info@office.test",
        password=PASSWORD + "\n",
    )
    assert added.returncode == 0, added.stderr
    assert "added user kay" in added.stdout
    crm = run_user(tmp_path, "add", "crm", password=PASSWORD)
    assert crm.returncode == 0, crm.stderr
    path = tmp_path / "users.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    accounts = load_accounts(path)
    assert verify_password(accounts.by_name["kay"].password_hash, PASSWORD.encode())
    assert PASSWORD not in path.read_text()

    listed = run_user(tmp_path, "list")
    assert listed.stdout.splitlines() == [
        "crm: may send as any address (no --address given)",
        "kay: may send as kay@office.test, info@office.test",
    ]
    assert run_user(tmp_path, "remove", "crm").returncode == 0
    assert set(load_accounts(path).by_name) == {"kay"}
    missing = run_user(tmp_path, "remove", "crm")
    assert missing.returncode == 1 and "there is no user 'crm'" in missing.stderr
    for result in (added, crm, listed):
        assert PASSWORD not in result.stdout + result.stderr


def test_adding_again_replaces_password_and_addresses(tmp_path: Path) -> None:
    run_user(tmp_path, "add", "kay", "--address", "kay@office.test", password=PASSWORD)
    again = run_user(tmp_path, "add", "kay", password="another good password")
    assert again.returncode == 0 and "updated user kay" in again.stdout
    kay = load_accounts(tmp_path / "users.yaml").by_name["kay"]
    assert kay.addresses == ()
    assert verify_password(kay.password_hash, b"another good password")


@pytest.mark.parametrize(
    ("args", "password", "complaint"),
    [
        (("add", "kay"), "short", "at least 8 characters"),
        (("add", "kay", "--address", "not an address"), PASSWORD, "is not a single valid email address"),
        (("add", "two words"), PASSWORD, "is not a usable user name"),
    ],
)
def test_bad_input_changes_nothing(tmp_path: Path, args: tuple[str, ...], password: str, complaint: str) -> None:
    result = run_user(tmp_path, *args, password=password)
    assert result.returncode == 1
    assert complaint in result.stderr
    assert not (tmp_path / "users.yaml").exists()


def test_there_is_no_password_argument(tmp_path: Path) -> None:
    result = run_user(tmp_path, "add", "kay", "--password", PASSWORD)
    assert result.returncode == 2
    assert not (tmp_path / "users.yaml").exists()


def converse(tmp_path: Path, answers: list[str]) -> tuple[int, str]:
    """Run `user add kay` on a pseudo-terminal, answering each password prompt in turn."""
    pid, terminal = pty.fork()
    if pid == 0:
        os.chdir(tmp_path)
        os.environ["RELAY_LISTEN_USERS_FILE"] = str(tmp_path / "users.yaml")
        os.execv(sys.executable, [sys.executable, "-m", "relay", "user", "add", "kay"])
    transcript = b""
    answered = 0
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        readable, _, _ = select.select([terminal], [], [], 1)
        if not readable:
            continue
        try:
            chunk = os.read(terminal, 1024)
        except OSError:  # the command exited and closed the terminal
            break
        if not chunk:
            break
        transcript += chunk
        # Answer each prompt once, after it is shown: getpass discards what was typed before it.
        prompts = transcript.count(b"Password")
        if answered < len(answers) and prompts > answered and transcript.rstrip().endswith(b":"):
            os.write(terminal, answers[answered].encode() + b"\n")
            answered += 1
    else:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    os.close(terminal)
    return os.waitstatus_to_exitcode(status), transcript.decode(errors="replace")


def test_on_a_terminal_the_password_is_asked_twice_without_echo(tmp_path: Path) -> None:
    code, transcript = converse(tmp_path, [PASSWORD, PASSWORD])
    assert code == 0, transcript
    assert transcript.count("Password") == 2
    assert PASSWORD not in transcript
    assert verify_password(load_accounts(tmp_path / "users.yaml").by_name["kay"].password_hash, PASSWORD.encode())


def test_on_a_terminal_two_different_passwords_change_nothing(tmp_path: Path) -> None:
    code, transcript = converse(tmp_path, [PASSWORD, PASSWORD + "!"])
    assert code == 1
    assert "the two passwords differ" in transcript
    assert not (tmp_path / "users.yaml").exists()


def test_add_says_which_file_it_changed_and_warns_when_it_is_only_the_default(tmp_path: Path) -> None:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("RELAY_")}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tmp_path / "relay.yaml"
    config.write_text(f"listen:\n  users_file: {tmp_path / 'office-users.yaml'}\n")

    def add(*options: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "relay", "user", "add", "kay", *options]
        return subprocess.run(
            command, input=PASSWORD, capture_output=True, text=True, cwd=elsewhere, env=environment, timeout=60
        )

    unconfigured = add()
    assert unconfigured.returncode == 0, unconfigured.stderr
    assert f"in {elsewhere / 'users.yaml'}:" in unconfigured.stdout
    assert "--config" in unconfigured.stderr and "listen.users_file is not set" in unconfigured.stderr
    configured = add("--config", str(config))
    assert configured.returncode == 0, configured.stderr
    assert f"in {tmp_path / 'office-users.yaml'}:" in configured.stdout
    assert "listen.users_file is not set" not in configured.stderr


@pytest.mark.slow
def test_add_waits_while_another_command_is_changing_the_file_and_keeps_both_changes(tmp_path: Path) -> None:
    from filelock import FileLock

    users_file = tmp_path / "users.yaml"
    started = time.monotonic()
    assert run_user(tmp_path, "add", "kay", password=PASSWORD).returncode == 0
    # Held three times as long as a whole `user add` took: a command that ignored the lock would be done.
    # (A loaded machine can only make this pass wrongly, never fail wrongly.)
    hold = 3 * (time.monotonic() - started)
    environment = {**os.environ, "RELAY_LISTEN_USERS_FILE": str(users_file)}
    other_command = FileLock(tmp_path / ".users.yaml.lock")
    with other_command:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "relay", "user", "add", "lee"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=tmp_path,
            env=environment,
        )
        assert waiting.stdin is not None
        waiting.stdin.write(PASSWORD)
        waiting.stdin.close()
        time.sleep(hold)
        assert waiting.poll() is None
        # What the other command writes before it lets go of the lock: it must not be lost.
        save_accounts(users_file, load_accounts(users_file).without("kay"))
    assert waiting.wait(timeout=60) == 0
    assert set(load_accounts(users_file).by_name) == {"lee"}

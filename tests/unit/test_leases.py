"""Which lease holders of the shared spool are processes of this machine that no longer run."""

from __future__ import annotations

import os
import subprocess

from relay.spool.leases import is_gone, new_owner, this_machine


def _owner(pid: int, token: str = "abc123", host: str | None = None, machine: str | None = None) -> str:
    me = new_owner().split("/")
    return f"{host or me[0]}/{pid}/{token}/{me[3] if machine is None else machine}"


def _ended_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_process_of_this_machine_that_ended_is_gone() -> None:
    assert this_machine(), "Linux says which boot and PID namespace this is"
    assert is_gone(_owner(_ended_pid()), new_owner())


def test_an_earlier_run_with_this_process_s_pid_is_gone_and_this_one_is_not() -> None:
    me = new_owner()
    assert is_gone(_owner(os.getpid(), token="000000"), me)
    assert not is_gone(me, me)


def test_a_process_that_runs_keeps_its_leases() -> None:
    with subprocess.Popen(["sleep", "30"]) as running:
        try:
            assert not is_gone(_owner(running.pid), new_owner())
        finally:
            running.kill()


def test_holders_elsewhere_or_unknown_keep_their_leases() -> None:
    me = new_owner()
    ended = _ended_pid()
    assert not is_gone(_owner(ended, host="other-host"), me), "another machine: only its lease's end tells"
    assert not is_gone(_owner(ended, machine="another-boot.4026531836"), me), "another boot or PID namespace"
    assert not is_gone(_owner(ended, machine=""), me), "a system that does not say"
    assert not is_gone(f"{me.split('/')[0]}/{ended}/abc123", me), "a name from a relay before machines were named"

"""Whose a Quack session is (store/sessions.py): the tag a horizons client's statements
carry, read back by the owner to end the sessions of processes that died."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from horizons_platform.store import sessions


def test_a_statement_names_its_process_after_the_users_sql() -> None:
    sql = "SELECT 1 -- a trailing comment must not swallow the tag"
    sent = sessions.tagged(sql)
    assert sent.startswith(sql + "\n")
    me = (os.getpid(), sessions.process_start(os.getpid()), sessions.pid_namespace())
    assert sessions.client_of(sent) == me
    assert sessions.untagged(sent) == sql
    assert sessions.client_of(sql) is None and sessions.client_of(None) is None
    assert sessions.untagged("SELECT 2") == "SELECT 2"


def test_a_process_is_gone_once_it_exited_or_its_pid_names_another() -> None:
    me = sessions.client_of(sessions.tagged("SELECT 1"))
    assert me is not None and not sessions.gone(*me)
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert sessions.gone(int(child.stdout), 1, me[2])  # exited (and reaped)
    assert sessions.gone(os.getpid(), me[1] + 1, me[2])  # the pid, but another start: reused
    # A pid from another PID namespace names nobody here: never taken for gone.
    assert not sessions.gone(int(child.stdout), 1, me[2] + 1)


def test_a_process_proc_cannot_see_is_not_taken_for_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    me = sessions.client_of(sessions.tagged("SELECT 1"))
    assert me is not None

    def no_descriptors(*_: object, **__: object) -> str:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(sessions.Path, "read_text", no_descriptors)
    assert not sessions.gone(me[0], me[1] + 1, me[2])


def test_an_error_message_quotes_the_users_sql_without_the_tag() -> None:
    quoted = f'unterminated quoted string at or near "\'abc{sessions.tagged("")}"'
    assert sessions.untagged_text(quoted) == 'unterminated quoted string at or near "\'abc"'


def test_a_forked_child_names_itself_not_its_parent() -> None:
    parent = sessions.tagged("SELECT 1")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write, sessions.tagged("SELECT 1").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 4096).decode()
    assert sessions.client_of(child) != sessions.client_of(parent)
    assert sessions.client_of(child) is not None and sessions.client_of(child)[0] == pid


def test_only_a_quack_connection_id_is_sent() -> None:
    with pytest.raises(ValueError, match="not a Quack connection id"):
        sessions.disconnect(9, "'; DROP TABLE jobs; --")

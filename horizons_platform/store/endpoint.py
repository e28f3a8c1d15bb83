"""``var/store.json``: where the store's owner serves Quack, and with which token.

The owner writes it (mode 0600: the token is the only credential) once it serves, and
removes it when it stops; a client trusts it only while the pid in it is alive and it
names the client's own database file.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from horizons_platform.settings import Settings

CATALOG = "horizons"  # the name clients attach the owner's database under


@dataclass(frozen=True)
class OwnerInfo:
    pid: int
    port: int
    token: str
    database: str
    started_at: str

    @property
    def uri(self) -> str:
        return f"quack:127.0.0.1:{self.port}"

    @classmethod
    def new(cls, settings: Settings, port: int, token: str) -> OwnerInfo:
        return cls(
            pid=os.getpid(),
            port=port,
            token=token,
            database=str(settings.database.resolve()),
            started_at=datetime.now(UTC).isoformat(),
        )


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    # A zombie (killed, not yet reaped by its parent) is dead for our purposes.
    return _state(pid) != "Z"


def pid_stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP, a debugger): alive, but it answers nobody — a
    client would wait on its socket for ever."""
    return _state(pid) in ("T", "t")


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (None where it cannot be read)."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return None


def stopped_owner(info: OwnerInfo) -> str:
    return (
        f"the store's owner, pid {info.pid}, is stopped (SIGSTOP or a debugger): it answers "
        f"no client until it continues (`kill -CONT {info.pid}`)"
    )


def read_owner(settings: Settings) -> OwnerInfo | None:
    """The live owner of ``settings.database``, or None."""
    try:
        data = json.loads(settings.store_file.read_text())
        info = OwnerInfo(**{k: data[k] for k in OwnerInfo.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.database != str(settings.database.resolve()) or not pid_alive(info.pid):
        return None
    return info


def write_owner(settings: Settings, info: OwnerInfo) -> None:
    path = settings.store_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(info), f, indent=2)
    os.replace(tmp, path)  # readers never see half a file


def remove_owner(settings: Settings) -> None:
    """Remove store.json if it is this process's (a successor may have rewritten it)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(settings.store_file.read_text()).get("pid") == os.getpid():
            settings.store_file.unlink()

"""Looking at a test's child processes through /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    for child in children(pid):
        found += [child, *descendants(child)]
    return found


def live_command(pid: int) -> str | None:
    """The process's command line, or None once it is gone (a zombie, exited but not reaped, counts as gone)."""
    try:
        if "zombie" in Path(f"/proc/{pid}/status").read_text():
            return None
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return None

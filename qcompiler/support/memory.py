"""What the machine has to give: the memory a compile can still take."""

from __future__ import annotations


from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")  # cgroup v2: a container's limit and use


def available_bytes() -> int | None:
    """The memory a process can still take without swapping or being killed: Linux's MemAvailable,
    or less where the process's cgroup (a container) has a lower limit left; None where neither is known."""
    system = _meminfo_available()
    limit = _cgroup_left()
    known = [b for b in (system, limit) if b is not None]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_left() -> int | None:
    try:
        limit = (CGROUP / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((CGROUP / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None

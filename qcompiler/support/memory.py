"""What the machine has to give: the memory a compile can still take."""

from __future__ import annotations


def available_bytes() -> int | None:
    """The memory the system can give a process now without swapping (Linux's MemAvailable), or
    None where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None

"""How much memory a command may plan to use: `$CNNCLI_MEMORY_LIMIT` (e.g. `8GiB`, `512MiB`, plain bytes; `0` or
`off`: no check), else the memory available now (MemAvailable in /proc/meminfo, capped by the cgroup's limit in a
container, else the physical memory). Host-level: the estimates it is compared with live with what they
estimate (`cnncli/nn/build.py` for parameters while building, `cnncli/run/memory.py` for one step).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from cnncli.host.errors import ConfigError

LIMIT_ENV = "CNNCLI_MEMORY_LIMIT"
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


@dataclass(frozen=True)
class Limit:
    """How many bytes a command may plan to use (None: no check), and where that figure comes from."""

    bytes: int | None
    source: str

    def describe(self) -> str:
        if self.bytes is None:
            return f"no limit ({self.source})"
        hint = "" if self.source.startswith("$") else f"; ${LIMIT_ENV} overrides"
        return f"{human_bytes(self.bytes)} ({self.source}{hint})"


def human_bytes(n: float) -> str:
    """Binary units, as memory is counted: 512 B, 3.0 KiB, 37.2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover - the loop returns


def parse_size(text: str) -> int | None:
    """'8GiB', '512M', '1.5 GB', '123456' -> bytes; '0', 'off', 'none' -> None (no limit). ValueError otherwise."""
    t = text.strip().lower()
    if t in ("0", "off", "none", "no", "false"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([a-z]*)", t)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(text)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _meminfo_available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _cgroup_room() -> int | None:
    """What the cgroup (v2 memory.max, v1 memory.limit_in_bytes) still allows this process, or None."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max":
                return None
            limit, usage = int(raw), int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit >= 1 << 60:  # v1's "no limit" is a huge number
            return None
        return max(limit - usage, 0)
    return None


def memory_limit() -> Limit:
    """The limit the checks compare with (see the module docstring). ConfigError for a bad $CNNCLI_MEMORY_LIMIT."""
    env = os.environ.get(LIMIT_ENV, "").strip()
    if env:
        try:
            return Limit(parse_size(env), f"${LIMIT_ENV}")
        except ValueError:
            raise ConfigError(f"${LIMIT_ENV}: expected a size such as 8GiB, 512MiB or a number of bytes, or 0 "
                              f"for no limit; got {env!r}") from None
    available, source = _meminfo_available(), "available memory, MemAvailable in /proc/meminfo"
    room = _cgroup_room()
    if room is not None and (available is None or room < available):
        available, source = room, "what the cgroup's memory limit leaves"
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            source = "physical memory"
        except (ValueError, OSError, AttributeError):
            return Limit(None, "the memory available could not be read")
    return Limit(available, source)

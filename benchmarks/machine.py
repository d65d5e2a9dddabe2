"""Names for the machine, the device and the library versions that produced a result."""

from __future__ import annotations

import os
import platform
import re
from importlib import metadata


def package_version(name: str) -> str | None:
    """Installed version of a distribution, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU model as ``/proc/cpuinfo`` names it (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_count() -> int:
    """Logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_description() -> str:
    """For example ``"AMD EPYC, 2 logical CPUs, Linux x86_64"``."""
    return f"{cpu_model()}, {cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def slug(text: str) -> str:
    """A file-name-safe lower-case form: ``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``.

    Dots stay (versions such as ``2.11.0``); every other run of unsafe characters becomes ``-``.
    """
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-.") or "unknown"

"""What the miner runs on, as announced in Hello. Works with or without torch installed."""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from proto import miner_pb2

logger = logging.getLogger(__name__)


def detect_hardware(device: str | None = None) -> miner_pb2.Hardware:
    """Describes ``device`` ("cuda", "cuda:1", "mps", "cpu"), or the best one present if None.

    Pass the device the engines actually run on, so a miner forced onto the CPU of a GPU machine
    does not advertise the GPU. torch is imported only when an accelerator may be involved.
    """
    kind = device.split(":", 1)[0] if device else None
    torch = None if kind == "cpu" else _import_torch()
    if torch is not None:
        if kind in (None, "cuda") and torch.cuda.is_available():
            index = _device_index(device)
            properties = torch.cuda.get_device_properties(index)
            return _hardware("cuda", properties.name, int(properties.total_memory))
        if kind in (None, "mps") and _mps_available(torch):
            # Apple silicon shares system memory between the CPU and the GPU.
            return _hardware("mps", f"Apple {cpu_name()} GPU", system_memory_bytes())
        if kind not in (None, "cpu"):
            logger.warning("device %s is not available to torch; reporting the CPU", device)
    return _hardware("cpu", cpu_name(), system_memory_bytes())


def cpu_name() -> str:
    """The CPU model, e.g. "AMD Ryzen 9 7950X 16-Core Processor"; a best effort."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            # x86 says "model name"; some ARM kernels only say "Hardware" or "Processor".
            if key.strip() in ("model name", "Hardware", "Processor") and value.strip():
                return value.strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        brand = _sysctl("machdep.cpu.brand_string")
        if brand:
            return brand
    return platform.processor() or platform.machine() or "unknown CPU"


def system_memory_bytes() -> int:
    """Physical memory in bytes, or 0 when the platform does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def _hardware(accelerator: str, device_name: str, memory_bytes: int) -> miner_pb2.Hardware:
    return miner_pb2.Hardware(
        accelerator=accelerator,
        device_name=device_name,
        memory_bytes=max(memory_bytes, 0),
        cpu_count=os.cpu_count() or 1,
    )


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _device_index(device: str | None) -> int:
    if device and ":" in device:
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            pass
    return 0


def _mps_available(torch: Any) -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _sysctl(name: str) -> str:
    try:
        completed = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return completed.stdout.strip()

"""How full the disk is, measured as the vastai SDK measures it for its reports.

The SDK reports ``disk_usage`` as the used bytes of the root filesystem in GiB
(``psutil.disk_usage("/").used / 2**30``, refreshed once per report) and
``additional_disk_usage`` as the change since the last delivered report. The daemon's disk guard
(supervisor/checks/disk.py) samples / with the other filesystems and the reporter takes its
figure; this function measures only before the guard's first sample (or without a guard).
"""

from __future__ import annotations

import psutil

GIB = float(2**30)


def disk_used_gib(path: str = "/") -> float:
    """Used bytes of the filesystem holding `path`, in GiB. Blocking: call it in a thread."""
    return psutil.disk_usage(path).used / GIB

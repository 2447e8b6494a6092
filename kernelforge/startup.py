"""How long this process has been running: the clock a start-up report
(``kernelforge generate --stats``) measures import time on."""
from __future__ import annotations

import os
from typing import Optional


def process_seconds() -> Optional[float]:
    """Seconds since this process started (Linux: its start time in
    /proc/self/stat against /proc/uptime, to a clock tick); None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except OSError:
        return None
    # the fields after the command name, which is in parentheses and may hold spaces
    fields = stat[stat.rindex(")") + 2:].split()
    start_ticks = int(fields[19])               # field 22, starttime
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))



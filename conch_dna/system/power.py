"""Whether the machine runs on battery: training waits then, unless the config allows it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

POWER_SUPPLY = Path("/sys/class/power_supply")


def on_battery(power_supply: Path = POWER_SUPPLY) -> bool:
    """True only when a battery is present and no mains adapter is online."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["pmset", "-g", "batt"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "Battery Power" in out
    if not power_supply.is_dir():
        return False
    kinds = {}
    for dev in power_supply.iterdir():
        try:
            kinds[dev.name] = ((dev / "type").read_text().strip(), (dev / "online").read_text().strip()
                               if (dev / "online").exists() else "")
        except OSError:
            continue
    has_battery = any(kind == "Battery" for kind, _ in kinds.values())
    mains_online = any(kind in ("Mains", "USB") and online == "1" for kind, online in kinds.values())
    return has_battery and not mains_online

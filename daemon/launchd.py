"""Renders and installs the service: a launchd agent on macOS, a systemd user unit on Linux.

It needs only the Python that runs conch and $CONCH_HOME (and the library's private-folder helper).
"""

from __future__ import annotations

import os
import plistlib
import stat
import subprocess
import sys
import sysconfig
from pathlib import Path
from string import Template
from xml.sax.saxutils import escape

from conch_dna.system.fsutil import private_dir

LABEL = "com.conch.dna"
TEMPLATE_NAME = f"{LABEL}.plist.template"
# in a checkout, launchd/ beside the packages; installed from the wheel, the data files it carries
TEMPLATE_PLACES = (Path(__file__).resolve().parents[1] / "launchd",
                   Path(sysconfig.get_path("data")) / "share" / "conch-dna" / "launchd")


def template_path() -> Path:
    for place in TEMPLATE_PLACES:
        if (place / TEMPLATE_NAME).is_file():
            return place / TEMPLATE_NAME
    raise FileNotFoundError(f"no {TEMPLATE_NAME} in {' or '.join(map(str, TEMPLATE_PLACES))}: reinstall conch-dna")
UNIT_NAME = "conch-dna.service"


def render_plist(home: str | Path, python: str = sys.executable, label: str = LABEL) -> bytes:
    """The launchd plist for a home, with absolute paths; checked by plistlib before it is returned."""
    home = Path(home).expanduser().resolve()
    values = {"label": label, "python": str(Path(python).absolute()), "home": str(home),
              "log_dir": str(home / "logs")}
    text = Template(template_path().read_text()).substitute({k: escape(v) for k, v in values.items()})
    plistlib.loads(text.encode())  # a template or value that breaks the XML fails here, not in launchd
    return text.encode()


def render_systemd_unit(home: str | Path, python: str = sys.executable) -> str:
    home = Path(home).expanduser().resolve()
    return "\n".join([
        "[Unit]", "Description=Conch DNA continuous distillation daemon", "",
        "[Service]", f"ExecStart={Path(python).absolute()} -m conch_dna.cli daemon run",
        f'Environment="CONCH_HOME={home}" "PYTHONUNBUFFERED=1"', f"WorkingDirectory={home}",
        "Restart=on-failure", "RestartSec=30", "TimeoutStopSec=30", "UMask=0077", "Nice=10",
        "IOSchedulingClass=idle", "",
        "[Install]", "WantedBy=default.target", ""])


def plist_path() -> Path:
    return Path("~/Library/LaunchAgents").expanduser() / f"{LABEL}.plist"


def unit_path() -> Path:
    return Path("~/.config/systemd/user").expanduser() / UNIT_NAME


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def private_home(home: str | Path) -> str | None:
    """The service's home, created 0700 (logs/ too) or tightened to 0700 if others could read it
    (traces are private data); returns a note when it tightened one."""
    home = Path(home).expanduser()
    note = None
    if home.is_dir() and stat.S_IMODE(home.stat().st_mode) & 0o077:
        note = f"tightened {home} from {stat.S_IMODE(home.stat().st_mode):o} to 700: traces are private"
        os.chmod(home, 0o700)
    private_dir(home / "logs")
    return note


def install(home: str | Path) -> str:
    note = private_home(home)
    if sys.platform == "darwin":
        path = plist_path()
        _write_private(path, render_plist(home))
        domain = f"gui/{os.getuid()}"
        subprocess.run(["launchctl", "bootout", domain, str(path)], capture_output=True)
        subprocess.run(["launchctl", "bootstrap", domain, str(path)], check=True)
        return "\n".join(filter(None, [note, f"installed {path} and bootstrapped it into {domain}"]))
    path = unit_path()
    _write_private(path, render_systemd_unit(home).encode())
    subprocess.run(["systemctl", "--user", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "--user", "enable", "--now", UNIT_NAME], check=True)
    return "\n".join(filter(None, [note, f"installed {path} and started it (systemctl --user status {UNIT_NAME})"]))


def uninstall() -> str:
    if sys.platform == "darwin":
        path = plist_path()
        subprocess.run(["launchctl", "bootout", f"gui/{os.getuid()}", str(path)], capture_output=True)
    else:
        path = unit_path()
        subprocess.run(["systemctl", "--user", "disable", "--now", UNIT_NAME], capture_output=True)
    path.unlink(missing_ok=True)
    return f"removed {path}"

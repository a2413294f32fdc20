"""What `conch daemon install` renders, checked with real parsers (launchd itself cannot run here)."""

import configparser
import plistlib
import sys

from launchd.install import render_plist, render_systemd_unit


def test_plist_has_what_launchd_needs(tmp_path):
    home = tmp_path / "my home & <stuff>"
    plist = plistlib.loads(render_plist(home, python="/opt/py/bin/python3"))
    assert plist["Label"] == "com.conch.dna"
    assert plist["ProgramArguments"] == ["/opt/py/bin/python3", "-m", "conch_dna.cli", "daemon", "run"]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ThrottleInterval"] == 30 and plist["ExitTimeOut"] == 30 and plist["Nice"] == 10
    assert plist["ProcessType"] == "Background" and plist["LowPriorityIO"] is True
    assert plist["Umask"] == 0o077  # its logs and everything it writes: the user's alone
    assert plist["EnvironmentVariables"]["CONCH_HOME"] == str(home.resolve())
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert plist[key].startswith(str(home.resolve()) + "/logs/")
    assert plist["ProgramArguments"][0].startswith("/")


def test_default_python_is_absolute_and_systemd_unit_parses(tmp_path):
    assert plistlib.loads(render_plist(tmp_path))["ProgramArguments"][0] == sys.executable
    unit = configparser.ConfigParser(interpolation=None)
    unit.optionxform = str
    unit.read_string(render_systemd_unit(tmp_path, python="/usr/bin/python3"))
    assert unit["Service"]["ExecStart"] == "/usr/bin/python3 -m conch_dna.cli daemon run"
    assert unit["Service"]["Environment"] == f'"CONCH_HOME={tmp_path.resolve()}" "PYTHONUNBUFFERED=1"'
    assert unit["Service"]["Restart"] == "on-failure" and unit["Service"]["UMask"] == "0077"

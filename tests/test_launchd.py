"""What `conch daemon install` renders, checked with real parsers (launchd itself cannot run here)."""

import configparser
import plistlib
import sys

from daemon.launchd import render_plist, render_systemd_unit


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


def test_the_service_home_is_created_private_or_tightened(tmp_path):
    import stat

    from daemon.launchd import private_home

    fresh = tmp_path / "a" / "home"
    assert private_home(fresh) is None
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 and stat.S_IMODE((fresh / "logs").stat().st_mode) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    note = private_home(loose)
    assert note and "tightened" in note and "755" in note
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700

import stat

from conch_dna.system.domains import UnknownDomainError, check_domain, is_heldout, validate_domain_name
from conch_dna.system.fsutil import atomic_write, atomic_write_json, private_dir

import pytest


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"version": 1})

    def crash(tmp):
        with open(tmp, "w") as f:
            f.write('{"version": 2, "trunc')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "version": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_private_dir_is_owner_only(tmp_path):
    d = private_dir(tmp_path / "a" / "b")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


@pytest.mark.parametrize("name", ["", "../etc", "a/b", "Thinking", "x" * 33, "tab\t", ".", "é"])
def test_unsafe_domain_names_are_rejected(name):
    with pytest.raises(UnknownDomainError, match="invalid domain name"):
        validate_domain_name(name)


def test_unknown_domain_lists_the_known_ones():
    with pytest.raises(UnknownDomainError, match="known domains: thinking, task, action"):
        check_domain("dreaming")
    assert check_domain("debug") == "debug"


def test_heldout_split_is_deterministic_and_near_its_fraction():
    prompts = [f"prompt number {i}" for i in range(5000)]
    first = [is_heldout(p) for p in prompts]
    assert first == [is_heldout(p) for p in prompts]
    assert 0.08 < sum(first) / len(first) < 0.12
    assert sum(is_heldout(p, 0.5) for p in prompts) / len(prompts) == pytest.approx(0.5, abs=0.03)

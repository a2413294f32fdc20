from conch_dna.system.power import on_battery


def supply(root, name, kind, online=None):
    d = root / name
    d.mkdir(parents=True)
    (d / "type").write_text(kind + "\n")
    if online is not None:
        (d / "online").write_text(f"{online}\n")


def test_on_battery_reads_the_power_supply_tree(tmp_path):
    laptop = tmp_path / "laptop"
    supply(laptop, "BAT0", "Battery")
    supply(laptop, "AC", "Mains", 0)
    assert on_battery(laptop) is True
    (laptop / "AC" / "online").write_text("1\n")
    assert on_battery(laptop) is False
    desktop = tmp_path / "desktop"
    supply(desktop, "AC", "Mains", 0)
    assert on_battery(desktop) is False
    assert on_battery(tmp_path / "absent") is False

"""`conch traces ...` through the installed entry point's code, on a real temporary home."""

import json

from conch_dna.cli.main import app

from typer.testing import CliRunner

runner = CliRunner()


def write_traces(path, n, domain="debug", extra_lines=()):
    lines = [json.dumps({"domain": domain, "teacher": "t", "messages": [
        {"role": "user", "content": f"Debug: error {i}"},
        {"role": "assistant", "content": f"Fix {i}."}]}) for i in range(n)]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")


def test_import_stats_quarantine_export(tmp_path, conch_home):
    f = tmp_path / "t.jsonl"
    write_traces(f, 50, extra_lines=['{"domain": "debug"}', "not json"])
    result = runner.invoke(app, ["traces", "import", str(f)])
    assert result.exit_code == 0, result.output
    assert "50 stored, 0 duplicates, 2 quarantined" in result.output

    stats = json.loads(runner.invoke(app, ["traces", "stats", "--json"]).output)
    debug = next(d for d in stats["domains"] if d["domain"] == "debug")
    assert debug["total"] == 50 and debug["train"] + debug["heldout"] == 50
    assert stats["quarantined"] == 2

    quarantined = json.loads(runner.invoke(app, ["traces", "quarantine", "--json"]).output)
    assert sorted(q["line"] for q in quarantined) == [51, 52]
    assert any("bad JSON" in q["reason"] for q in quarantined)

    out = tmp_path / "train.jsonl"
    assert runner.invoke(app, ["traces", "export", "--domain", "debug", "-o", str(out)]).exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == debug["train"] and rows[0]["messages"][-1]["role"] == "assistant"


def test_export_rejects_unsafe_domain_and_import_missing_file(tmp_path):
    result = runner.invoke(app, ["traces", "export", "--domain", "../x"])
    assert result.exit_code == 2 and "invalid domain name" in result.output
    result = runner.invoke(app, ["traces", "import", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 2 and "no such file" in result.output

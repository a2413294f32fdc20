"""`conch kd report`: one self-contained HTML page (plus the PNG plots) for any home.

Per domain: the loss curves of each run; held-out KL (teacher-forced and on-policy, over each
version's own answers) / CE / top-1 agreement of the current version and of the candidate at every
run (a promoted candidate is the next version); and every run's decision, its reason, its student
samples and the time of each phase. Everything comes from the runs table, so the report
works on any home the daemon or `conch kd retrain` has written. Where versions were promoted with an
acceptance rule: auto/'s share per version (expected at the gate, served since) and the newest rule's curve.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path

from conch_dna.lifecycle.status import auto_figures, auto_words
from conch_dna.models.versions import version_label
from conch_dna.settings.config import Config
from conch_dna.system.fsutil import atomic_write, atomic_write_text, private_dir
from conch_dna.traces.runs import RunRecord, RunStatus
from conch_dna.traces.store import TraceStore

RECENT_RUNS = 8  # more runs on one axis are unreadable; the table below the plots lists every run


def _plots(domain: str, runs: list[RunRecord], out: Path, answered: dict[str, dict]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.4, 3.4), dpi=100)
    trained = [r for r in runs if r.history]
    recent = trained[:RECENT_RUNS]
    for r in reversed(recent):
        xs = [h["iteration"] for h in r.history]
        ax.plot(xs, [h["combined"] for h in r.history], marker=".", label=f"run {r.id} ({r.status})")
    shown = f"last {len(recent)} runs" if len(recent) < len(trained) else "per run"
    ax.set(title=f"{domain}: training loss, {shown}", xlabel="step", ylabel="α·KD·T² + (1-α)·CE")
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    paths.append(out / f"{domain}-loss.png")
    atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)

    measured = [r for r in runs if r.candidate_metrics and r.current_metrics][:RECENT_RUNS][::-1]
    fig, axes = plt.subplots(1, 4, figsize=(12.8, 3.8), dpi=100)
    labels = [f"{r.id}" + (f"\n{r.version}" if r.status == RunStatus.PROMOTED else "") for r in measured]
    colours = ["#176317" if r.status == RunStatus.PROMOTED else "#c05800" for r in measured]
    xs = list(range(len(measured)))  # positions, labelled below: run ids as labels would read as numbers
    panels = (("kl", "held-out KL"), ("on_policy", "on-policy held-out KL"), ("ce", "CE on teacher tokens"),
              ("agreement", "top-1"))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(xs, [_value(r.current_metrics, key) for r in measured], "s--", color="#888", label="current")
        ax.scatter(xs, [_value(r.candidate_metrics, key) for r in measured], c=colours, zorder=3, label="candidate")
        ax.set(title=title, xlabel="run", xlim=(-0.5, len(xs) - 0.5))
        ax.set_xticks(xs, labels, fontsize="small")
    # The gate's last rule: KL on the held-out traces the current version was validated on.
    est = [(x, r) for x, r in zip(xs, measured) if "established" in r.current_metrics]
    if est:
        axes[0].scatter([x for x, _ in est], [r.current_metrics["established"]["kl"] for _, r in est],
                        marker="s", facecolors="none", edgecolors="#888", zorder=3,
                        label="current, on the held-out it was validated on")
        axes[0].scatter([x for x, _ in est], [r.candidate_metrics["established"]["kl"] for _, r in est],
                        marker="x", c=[colours[x] for x, _ in est], zorder=3, label="candidate, on that held-out")
    fig.suptitle(f"{domain}: current vs candidate per run (green: promoted, orange: rejected)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    paths.append(out / f"{domain}-versions.png")
    atomic_write(paths[-1], lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    promoted = [r for r in runs if r.status == RunStatus.PROMOTED and (r.candidate_metrics or {}).get("acceptance")]
    if promoted:
        paths.append(out / f"{domain}-auto.png")
        _auto_plot(plt, domain, promoted[::-1], answered, paths[-1])
    return paths


def _auto_plot(plt, domain: str, promoted: list[RunRecord], answered: dict[str, dict], path: Path) -> None:
    """auto/: the student's share per version (expected at its gate, served since), and the newest version's
    curve of share served against the mean KL of what it serves, its bound and fitted threshold marked."""
    fig, (share, curve) = plt.subplots(1, 2, figsize=(12.8, 3.8), dpi=100)
    xs = list(range(len(promoted)))
    expected = [r.candidate_metrics["acceptance"]["expected_share"] for r in promoted]
    shares = [auto_figures(answered.get(r.version), None)["share_served"] for r in promoted]
    served = [float("nan") if share is None else share for share in shares]
    share.plot(xs, expected, "o--", color="#888", label="expected (held-out, at its gate)")
    share.plot(xs, served, "o-", color="#176317", label="served by auto/ since")
    share.set(title=f"{domain}: the student's share of auto/ calls", xlabel="version", ylim=(-0.05, 1.05))
    share.set_xticks(xs, [r.version for r in promoted], fontsize="small")
    share.legend(fontsize="small")
    rule = promoted[-1].candidate_metrics["acceptance"]
    points = rule.get("curve") or []
    if points:
        curve.plot([p[1] for p in points], [p[2] for p in points], ".-", color="#1f5fa8", label="each threshold")
    curve.axhline(rule["bound_kl"], color="#a30000", linestyle=":", label=f"bound {rule['bound_kl']:g} nats")
    if rule.get("accepted_kl") is not None:
        curve.scatter([rule["expected_share"]], [rule["accepted_kl"]], color="#a30000", zorder=3,
                      label="the fitted threshold")
    curve.set(title=f"{promoted[-1].version}: share served against their KL (held-out)", xlabel="share served",
              ylabel="mean teacher-scored KL per token", xlim=(-0.02, 1.02))
    curve.legend(fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def _value(metrics: dict, key: str) -> float:
    """A metric to plot; "on_policy" is the KL over the version's own answers (nan for older runs)."""
    value = (metrics.get("on_policy") or {}).get("kl") if key == "on_policy" else metrics.get(key)
    return float("nan") if value is None else value


def _phases(r: RunRecord) -> str:
    if not r.phase_seconds:
        return "-"
    return " / ".join(f"{r.phase_seconds.get(k, 0):.0f}" for k in ("sample", "teacher", "train", "evaluate"))


def _settings(r: RunRecord) -> str:
    """The run's settings that differ from the defaults, as key = value."""
    if r.kd_settings is None:
        return "-"
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in r.kd_settings.items()) or "defaults"


def _auto(r: RunRecord, answered: dict[str, dict]) -> str:
    if not (r.candidate_metrics or {}).get("acceptance"):
        return "-"
    return auto_words(auto_figures(answered.get(r.version) if r.version else None, r.candidate_metrics["acceptance"]))


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def build_report(home: str | Path, config: Config, out: str | Path | None = None) -> Path:
    """Write <out>/report.html (self-contained) and its PNGs; returns the HTML path."""
    home = Path(home)
    out = private_dir(out or home / "report")
    store = TraceStore.for_home(home, config)
    sections = []
    for domain in config.domains:
        runs = store.runs(domain, limit=200)
        counts = store.counts(domain)
        head = (f"<h2>{html.escape(domain)}</h2><p>current version: <b>{html.escape(version_label(home, domain))}"
                f"</b> · traces: {counts.train} train, {counts.heldout} held-out, {counts.new_train} new</p>")
        if not runs:
            sections.append(head + "<p>no training run yet</p>")
            continue
        answered = {a["version"]: a for a in store.auto_answers(domain)}
        images = "".join(_img(p) for p in _plots(domain, runs, out, answered)) + (
            "<p class='note'>Each run measures the current version and its candidate on the held-out traces of "
            "that moment; the held-out set grows, so compare a candidate with the current version of its own "
            "run, not across runs.</p>")
        rows = "".join(
            f"<tr><td>{r.id}</td><td>{time.strftime('%Y-%m-%d %H:%M', time.localtime(r.started_at))}</td>"
            f"<td class='{r.status}'>{r.status}</td><td>{r.version or '-'}</td>"
            f"<td>{html.escape(r.kl_change())}</td><td>{html.escape(r.kl_change(on_policy=True))}</td>"
            f"<td>{html.escape(r.tool_change())}</td><td>{html.escape(r.format_change())}</td>"
            f"<td>{html.escape(_auto(r, answered))}</td>"
            f"<td>{r.samples_generated if r.samples_generated is not None else '-'}</td><td>{_phases(r)}</td>"
            f"<td>{html.escape(_settings(r))}</td><td>{html.escape(r.reason or '')}</td></tr>" for r in runs)
        sections.append(head + images + "<table><tr><th>run</th><th>started</th><th>decision</th>"
                        "<th>version</th><th>held-out KL</th><th>on-policy KL</th>"
                        "<th>tool calls right (parse)</th><th>answers in form, free (held)</th>"
                        "<th>auto/ served (expected)</th><th>student samples</th>"
                        f"<th>seconds: sample / teacher / train / evaluate</th><th>settings</th><th>reason</th></tr>"
                        f"{rows}</table>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Conch DNA report</title><style>
body {{ font-family: -apple-system, sans-serif; margin: 2em; max-width: 70em; }}
img {{ max-width: 100%; display: block; margin: 1em 0; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; }}
.note {{ color: #555; font-size: 90%; }}
.promoted {{ color: #176317; }} .rejected {{ color: #a34b00; }} .failed, .interrupted {{ color: #a30000; }}
</style></head><body><h1>Conch DNA distillation report</h1>
<p>{html.escape(str(home))} · generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>
{''.join(sections)}</body></html>"""
    return atomic_write_text(out / "report.html", page)

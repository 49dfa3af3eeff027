"""The report's plots, drawn off-screen with matplotlib: the training loss from metrics.jsonl and
FID / IS against training step from the FID watcher's `fid<K>.jsonl` files."""
from __future__ import annotations

import json
from pathlib import Path

from ddpm_dist.utils.files import atomic_path


QUARTERS = ("[0, T/4)", "[T/4, T/2)", "[T/2, 3T/4)", "[3T/4, T)")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _by_step(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) in step order; a step logged twice (a resumed run repeats the steps after
    its checkpoint) keeps its last value."""
    latest = {row["step"]: row[key] for row in rows if row.get(key) is not None}
    steps = sorted(latest)
    return steps, [latest[s] for s in steps]


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out


def plot_loss(metrics: Path, out: Path) -> Path | None:
    """The logged loss (L_simple, mean over each log interval) and its four quarters of t, log
    scale: the loss at small t is the hardest and stays highest. None if nothing was logged."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    from matplotlib.ticker import FormatStrFormatter

    rows = _rows(metrics)
    steps, loss = _by_step(rows, "loss")
    if not steps:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, loss, color="black", linewidth=1.5, label="loss")
    for q, span in enumerate(QUARTERS):
        ax.plot(*_by_step(rows, f"loss_q{q}"), linewidth=0.8, label=f"q{q}: t in {span}")
    ax.set(xlabel="training step", ylabel="L_simple (MSE of ε)", yscale="log", title="Training loss")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):  # 0.05, not 5×10⁻²
        axis(FormatStrFormatter("%.3g"))
    ax.legend(fontsize="small")
    return _save(fig, out)


def plot_fid_by_step(track_files: list[Path], out: Path) -> Path | None:
    """FID and Inception Score against training step, one line per sample count (fid10k, ...).
    None if the watcher recorded nothing."""
    from matplotlib.figure import Figure

    series = {path.stem: _rows(path) for path in track_files}
    series = {name: rows for name, rows in series.items() if rows}
    if not series:
        return None
    fig = Figure(figsize=(10, 4))
    fid_ax, is_ax = fig.subplots(1, 2)
    for name, rows in sorted(series.items()):
        fid_ax.plot(*_by_step(rows, "fid"), marker="o", label=name)
        is_ax.plot(*_by_step(rows, "inception_score"), marker="o", label=name.replace("fid", "is"))
    fid_ax.set(xlabel="training step", ylabel="FID (lower is better)", title="FID during training")
    is_ax.set(xlabel="training step", ylabel="Inception Score (higher is better)", title="IS during training")
    for ax in (fid_ax, is_ax):
        ax.ticklabel_format(axis="y", useOffset=False)
    fid_ax.legend(fontsize="small")
    is_ax.legend(fontsize="small")
    return _save(fig, out)

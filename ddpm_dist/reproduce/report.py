"""The chain's last stage: RUN/report.json, RUN/report.md and its HTML twin RUN/report.html (our
numbers beside the paper's, a grid of the evaluation's samples, FID / IS against training step
when tools/track_fid.py ran, the training loss; the pictures in RUN/report/), and the same table
as a TensorBoard text summary in the run's events."""
from __future__ import annotations

import html
import json
import logging
from pathlib import Path

from ddpm_dist.evaluation.grid import GRID_SAMPLES, write_samples_grid
from ddpm_dist.evaluation.track import track_folder
from ddpm_dist.reproduce.plan import Plan
from ddpm_dist.training.telemetry import events_dir
from ddpm_dist.utils.files import atomic_write

log = logging.getLogger(__name__)
FIGURES = "report"  # RUN/report/: the report's pictures, linked relative to RUN
SAMPLES_PNG = "samples.png"

ROWS = (("fid", "FID (train set, {n} samples)"), ("inception_score", "Inception Score"),
        ("bits_per_dim", "NLL, bits/dim (test)"))


def training_summary(run: Path, global_batch: int) -> dict:
    """Steps trained and device-hours from metrics.jsonl: each logged interval took
    Δsteps × batch / (images/s) seconds on images_per_s / images_per_s_per_device devices."""
    path, steps, device_hours, last = run / "metrics.jsonl", 0, 0.0, 0
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        per_device = row.get("perf/images_per_s_per_device") or 0.0
        if row["step"] > last and per_device > 0:
            device_hours += (row["step"] - last) * global_batch / per_device / 3600
        last = steps = max(steps, row["step"])
    return {"steps": steps, "device_hours": device_hours}


def build_report(plan: Plan) -> dict:
    fid = json.loads((plan.fid_dir / "result.json").read_text())
    nll = json.loads(plan.nll_file.read_text()) if plan.test_data else {}
    ours = {"fid": fid.get("fid"), "fid_std": fid.get("fid_std"), "inception_score": fid.get("inception_score"),
            "bits_per_dim": nll.get("bits_per_dim")}
    return {"config": plan.config, "overrides": list(plan.overrides), "dataset": plan.name,
            "ours": ours, "paper": plan.dataset.paper,
            "evaluation": {"num_samples": fid["num_samples"], "seeds": fid["seeds"], "sampler": fid["sampler"],
                           "steps": fid["steps"], "pipeline": fid.get("pipeline"),
                           "weights_sha256": fid["weights_sha256"], "nll_images": nll.get("num_images")},
            "training": training_summary(plan.run, plan.cfg.train.batch_size)}


def _cell(value, std=None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f} ± {std:.2f}" if std is not None else f"{value:.2f}"


def table(report: dict) -> list[tuple[str, str, str]]:
    """(metric, ours, paper) rows."""
    ours, paper, ev = report["ours"], report["paper"], report["evaluation"]
    return [(label.format(n=ev["num_samples"]), _cell(ours[key], ours["fid_std"] if key == "fid" else None),
             _cell(paper.get(key))) for key, label in ROWS]


def notes(report: dict) -> list[str]:
    ev, tr = report["evaluation"], report["training"]
    return [f"FID: mean ± sample std over {len(ev['seeds'])} seed sets {ev['seeds']}; sampler {ev['sampler']}, "
            f"{ev['steps'] or 'all'} steps. Pipeline: {ev['pipeline']}.",
            f"Training: {tr['steps']} steps, {tr['device_hours']:.3g} device-hours (from metrics.jsonl).",
            f"Weights sha256: {ev['weights_sha256']}."]


def _title(report: dict) -> str:
    return f"Reproduction: {report['dataset']}"


def _config(report: dict) -> str:
    return f"{report['config']} {' '.join(report['overrides'])}".rstrip()


def markdown(report: dict, figures: list[tuple[str, str]] = ()) -> str:
    lines = [f"# {_title(report)}", "", f"Config `{_config(report)}`", "",
             "| metric | ours | paper |", "| --- | --- | --- |"]
    lines += [f"| {label} | {ours} | {paper} |" for label, ours, paper in table(report)]
    lines += ["", *notes(report), ""]
    for caption, path in figures:
        lines += [f"## {caption}", "", f"![{caption}]({path})", ""]
    return "\n".join(lines)


def html_page(report: dict, figures: list[tuple[str, str]] = ()) -> str:
    """The same content as `markdown`, for a browser (no Markdown renderer needed)."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td></tr>" for a, b, c in table(report))
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(_title(report))}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}td,th{border:1px solid #ccc;"
             "padding:.3em .8em}table{border-collapse:collapse}img{max-width:100%}"
             # small sample grids (16² or 32² images) drawn large, pixels kept sharp
             "img.grid{width:40em;image-rendering:pixelated}"
             "</style></head><body>", f"<h1>{e(_title(report))}</h1>",
             f"<p>Config <code>{e(_config(report))}</code></p>",
             f"<table><tr><th>metric</th><th>ours</th><th>paper</th></tr>{rows}</table>",
             *(f"<p>{e(line)}</p>" for line in notes(report))]
    for caption, path in figures:
        kind = "grid" if path.endswith(SAMPLES_PNG) else "plot"
        parts.append(f"<figure><img class='{kind}' src='{e(path)}' alt='{e(caption)}'>"
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    return "\n".join([*parts, "</body></html>", ""])


def draw_figures(plan: Plan, fid: dict) -> list[tuple[str, str]]:
    """The report's pictures in RUN/report/: (caption, path relative to RUN), those that have data."""
    folder, figures = plan.run / FIGURES, []
    shown = write_samples_grid(fid["runs"][0]["out"], folder / SAMPLES_PNG, GRID_SAMPLES)
    if shown:
        figures.append((f"The first {shown} samples of the evaluation (seed {fid['runs'][0]['seed']})",
                        f"{FIGURES}/{SAMPLES_PNG}"))
    try:
        from ddpm_dist.reproduce.figures import plot_fid_by_step, plot_loss
    except ImportError as err:  # the table matters more than the plots
        log.warning("no plots in the report (%s): install matplotlib (scripts/setup.sh slurm)", err)
        return figures
    if plot_fid_by_step(sorted(track_folder(plan.run).glob("fid*.jsonl")), folder / "fid_by_step.png"):
        figures.append(("FID and Inception Score against training step (tools/track_fid.py)",
                        f"{FIGURES}/fid_by_step.png"))
    if plot_loss(plan.run / "metrics.jsonl", folder / "loss.png"):
        figures.append(("Training loss, and by quarter of t", f"{FIGURES}/loss.png"))
    return figures


def write_report(plan: Plan) -> dict:
    report = build_report(plan)
    figures = draw_figures(plan, json.loads((plan.fid_dir / "result.json").read_text()))
    text = markdown(report, figures)
    atomic_write(plan.run / "report.md", text)
    atomic_write(plan.run / "report.html", html_page(report, figures))
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(events_dir(plan.run)), filename_suffix=".report") as tb:
        tb.add_text("reproduce/report", markdown(report), global_step=report["training"]["steps"])
    atomic_write(plan.report_file, json.dumps(report, indent=2) + "\n")  # last: it marks the stage done
    return report

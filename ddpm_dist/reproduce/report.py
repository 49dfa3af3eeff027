"""The chain's last stage: RUN/report.json and RUN/report.md (our numbers beside the paper's),
and the same table as a TensorBoard text summary in RUN/tb."""
from __future__ import annotations

import json
from pathlib import Path

from ddpm_dist.reproduce.plan import Plan
from ddpm_dist.utils.files import atomic_write

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


def markdown(report: dict) -> str:
    ours, paper, ev, tr = report["ours"], report["paper"], report["evaluation"], report["training"]
    lines = [f"# Reproduction: {report['dataset']}", "",
             f"Config `{report['config']}` {' '.join(report['overrides'])}".rstrip(), "",
             "| metric | ours | paper |", "| --- | --- | --- |"]
    for key, label in ROWS:
        std = ours["fid_std"] if key == "fid" else None
        lines.append(f"| {label.format(n=ev['num_samples'])} | {_cell(ours[key], std)} | {_cell(paper.get(key))} |")
    lines += ["", f"FID: mean ± sample std over {len(ev['seeds'])} seed sets {ev['seeds']}; sampler {ev['sampler']}, "
                  f"{ev['steps'] or 'all'} steps. Pipeline: {ev['pipeline']}.",
              f"Training: {tr['steps']} steps, {tr['device_hours']:.3g} device-hours (from metrics.jsonl).",
              f"Weights sha256: `{ev['weights_sha256']}`.", ""]
    return "\n".join(lines)


def write_report(plan: Plan) -> dict:
    report = build_report(plan)
    text = markdown(report)
    atomic_write(plan.run / "report.md", text)
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(plan.run / "tb"), filename_suffix=".report") as tb:
        tb.add_text("reproduce/report", text, global_step=report["training"]["steps"])
    atomic_write(plan.report_file, json.dumps(report, indent=2) + "\n")  # last: it marks the stage done
    return report

"""What a person looks at, loaded in headless Chromium: TensorBoard over a short real run (its
charts by namespace, the custom-scalars layout with the loss first, the sample grids, the FID
watcher's points) and the reproduction report's HTML with its pictures."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from ddpm_dist.distributed import free_port
from headless_chromium import Chromium, chromium_binary
from test_train import ROOT, TINY, run_train

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# JavaScript with `deep(document, selector)`: every matching element, inside shadow roots too
# (TensorBoard's Polymer dashboards keep their cards there). Gives `value` as JSON once `until`
# holds for it, '' before (what `Chromium.wait_for` polls).
DEEP = """(() => {{
  function deep(root, sel, out = []) {{
    root.querySelectorAll(sel).forEach(e => out.push(e));
    root.querySelectorAll('*').forEach(e => {{ if (e.shadowRoot) deep(e.shadowRoot, sel, out); }});
    return out;
  }}
  const value = {expression};
  return ({until}) ? JSON.stringify(value) : '';
}})()"""


def deep(expression: str, until: str = "value.length > 0") -> str:
    return DEEP.format(expression=expression, until=until)


def _run(cmd: list[str], timeout: float = 600) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ...: {proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def looked_at(tmp_path_factory):
    """runs/tiny: 4 steps with a checkpoint and a sample grid every 2, the FID watcher over both
    checkpoints, a 16-sample evaluation and the report."""
    from ddpm_dist.cli.reproduce import build_plan, parse_args
    from ddpm_dist.metrics.stats import save_stats
    from ddpm_dist.modelio.source import export_checkpoint
    from ddpm_dist.reproduce.report import write_report
    from test_sampling import _random_inception

    root = tmp_path_factory.mktemp("looked_at")
    run = root / "runs" / "tiny"
    code, err = run_train(run, "train.total_steps=4", "train.ckpt_every=2", "train.sample_every=2",
                          "train.sample_steps=5", "train.keep_last=3")
    assert code == 0, err[-3000:]
    weights, stats = _random_inception(root / "inception.pth"), root / "ref.npz"
    save_stats(stats, np.zeros(2048), np.eye(2048))
    scoring = ["--ref-stats", str(stats), "--inception-weights", str(weights), "--steps", "5", "--device", "cpu"]
    _run([sys.executable, "tools/track_fid.py", str(run), "--num-samples", "12", "--batch-size", "6", "--once",
          *scoring])
    plan = build_plan(parse_args(["configs/demo_digits.yaml", *TINY, "train.total_steps=4", f"out_dir={run}",
                                  "--dataset", "folder", "--raw", str(root / "raw"), "--num-samples", "16",
                                  "--seeds", "1", "--inception-weights", str(weights)]))
    export_checkpoint(run, plan.model_file)
    _run([sys.executable, "tools/fid_sample.py", "--ckpt", str(plan.model_file), "--num-samples", "16",
          "--out", str(plan.fid_dir), "--batch-size", "8", *scoring])
    write_report(plan)
    return run, plan


@pytest.fixture(scope="module")
def tensorboard(looked_at):
    """TensorBoard over the runs folder, on a free port; stopped at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(looked_at[0].parent),
                             "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while _get(f"{url}/data/runs") is None:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "TensorBoard did not answer within 120 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    with Chromium(chromium_binary()) as chromium:
        yield chromium


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return reply.read()
    except OSError:
        return None


def test_tensorboard_lists_the_run_by_name_and_lays_out_the_loss_first(tensorboard, browser, tmp_path):
    browser.open(f"{tensorboard}/#custom_scalars")
    charts = json.loads(browser.wait_for(deep(
        "deep(document, 'tf-custom-scalar-multi-line-chart-card').map(e => e.title)"), timeout=90))
    assert charts[:2] == ["loss", "loss by quarter of t (q0: t < T/4 ... q3: t >= 3T/4)"]
    assert {"learning rate", "images/s", "MFU", "skipped steps (non-finite)", "FID", "Inception Score"} <= set(charts)
    assert json.loads(_get(f"{tensorboard}/data/runs")) == ["tiny"]  # by its folder's name
    tags = json.loads(_get(f"{tensorboard}/data/plugin/scalars/tags"))["tiny"]
    expected = {f"train/loss_by_t/q{q}" for q in range(4)} | {"train/loss", "opt/lr", "eval/fid12", "eval/is12"}
    assert expected <= set(tags)
    browser.screenshot(tmp_path / "custom_scalars.png")


def test_the_scalar_dashboard_groups_tags_by_namespace(tensorboard, browser):
    browser.open(f"{tensorboard}/#scalars")
    # Polymer keeps each category's name on its pane; the first two (alphabetical) are open.
    seen = json.loads(browser.wait_for(deep(
        "{panes: deep(document, 'tf-category-paginated-view').map(e => e.category && e.category.name),"
        " cards: deep(document, 'tf-scalar-card').map(e => e.tag)}", until="value.cards.length > 0"), timeout=90))
    assert {"train", "opt", "perf", "data", "eval"} <= set(seen["panes"]), seen
    assert set(seen["cards"]) == {"data/skipped_samples", "eval/fid12", "eval/is12"}, seen


def test_the_image_dashboard_shows_the_last_sample_grid(tensorboard, browser, looked_at):
    from PIL import Image
    browser.open(f"{tensorboard}/#images")
    shown = json.loads(browser.wait_for(deep(
        "deep(document, 'img').filter(i => i.complete && i.naturalWidth > 0 && i.src.includes('individualImage'))"
        ".map(i => [i.src, i.naturalWidth, i.naturalHeight])"), timeout=90))
    with Image.open(looked_at[0] / "samples" / "step_00000004.png") as grid:
        assert [s[1:] for s in shown] == [list(grid.size)]  # the step-4 grid, decoded by the browser
    steps = json.loads(_get(f"{tensorboard}/data/plugin/images/images?run=tiny&tag=samples/ema"))
    assert [s["step"] for s in steps] == [2, 4]


def test_the_report_page_shows_its_table_and_pictures(browser, looked_at):
    run, plan = looked_at
    browser.open((run / "report.html").as_uri())
    images = json.loads(browser.wait_for(deep(
        "[...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight])",
        until="value.length > 0 && value.every(i => i[1])"), timeout=60))
    assert [src for src, *_ in images] == ["report/samples.png", "report/fid_by_step.png", "report/loss.png"]
    assert all(w > 0 and h > 0 for _, _, w, h in images), images  # each one decoded: the file is there, a PNG
    text = browser.evaluate("document.body.innerText")
    result = json.loads((plan.fid_dir / "result.json").read_text())
    assert f"{result['inception_score']:.2f}" in text and "The first 16 samples" in text
    markdown = (run / "report.md").read_text()
    assert all(f"]({src})" in markdown for src, *_ in images)
    assert (plan.fid_dir / "samples_grid.png").is_file()  # the stand-alone fid_sample's own picture

"""Training on CPU: it learns the digits, resumes exactly after kill -9, and refuses bad checkpoints."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpm_dist.config import load_config
from ddpm_dist.data.digits import load_digits_images
from ddpm_dist.data.batch import to_model_range
from ddpm_dist.modelio.model_file import load_model_file, read_model_file
from ddpm_dist.modelio.source import export_checkpoint
from ddpm_dist.modelio.factory import build_model
from ddpm_dist.train import train
from data_helpers import write_noise_shards

ROOT = Path(__file__).resolve().parents[1]
# A small U-Net of the paper's design and a 50-step diffusion keep each run to seconds.
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
        "diffusion.num_timesteps=50", "train.batch_size=8", "train.num_samples=4", "train.log_every=1",
        "train.ckpt_every=4", "train.keep_last=2", "optim.warmup_steps=10", "train.ema_decay=0.9"]


def run_train(out_dir, *overrides, wait=True):
    cmd = [sys.executable, "-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml",
           f"out_dir={out_dir}", *TINY, *overrides]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        out, err = proc.communicate(timeout=600)
        return proc.returncode, err
    return proc


def losses(out_dir) -> dict[int, float]:
    """step → loss; a resumed run rewrites the steps after its checkpoint, the last line wins."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def wait_for_step(out_dir, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    path = Path(out_dir) / "metrics.jsonl"
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if path.exists() and max(losses(out_dir), default=0) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"run did not reach step {step}")


def test_kill_9_and_resume_continues_exactly(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert run_train(straight, "train.total_steps=16")[0] == 0

    proc = run_train(killed, "train.total_steps=1000", wait=False)
    wait_for_step(killed, 9, proc)  # the step-8 checkpoint is written before step 9 is logged
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed_from = max(int(p.name[5:]) for p in (killed / "checkpoints").glob("step_????????"))
    assert 8 <= resumed_from < 16

    code, err = run_train(killed, "train.total_steps=16")
    assert code == 0, err
    assert f"resumed from {killed / 'checkpoints'}" in err
    a, b = losses(straight), losses(killed)
    assert [a[s] for s in range(1, 17)] == [b[s] for s in range(1, 17)]  # bitwise on CPU
    export_checkpoint(straight, tmp_path / "a.safetensors")
    export_checkpoint(killed, tmp_path / "b.safetensors")
    wa, wb = read_model_file(tmp_path / "a.safetensors")[0], read_model_file(tmp_path / "b.safetensors")[0]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_interrupted_checkpoint_write_is_ignored_and_bad_checkpoints_are_named(tmp_path):
    run = tmp_path / "run"
    assert run_train(run, "train.total_steps=8")[0] == 0
    # What a kill during a save leaves behind: a .partial folder with a half-written file.
    partial = run / "checkpoints" / "step_00000012.partial"
    partial.mkdir()
    (partial / "__0_0.distcp").write_bytes(b"\x00" * 100)
    code, err = run_train(run, "train.total_steps=10")
    assert code == 0, err
    assert "resumed from" in err and "step_00000008" in err
    assert max(losses(run)) == 10

    code, err = run_train(run, "train.total_steps=12", "model.ch=64")
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "was written with model.ch=32, this run has 64" in last

    # A file of the newest checkpoint gone: its manifest no longer matches, resume takes the previous one.
    shutil.rmtree(partial)
    os.remove(run / "checkpoints" / "step_00000010" / ".metadata")
    code, err = run_train(run, "train.total_steps=12")
    assert code == 0 and ".metadata is missing" in err and "step_00000008 at step 8" in err, err[-2000:]


def test_stop_signal_saves_a_checkpoint_at_a_step_boundary(tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, "train.total_steps=1000", wait=False)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    saved = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_????????"))
    assert saved == max(losses(run)) and "stop requested" in err


@pytest.mark.parametrize("source", ["digits", "shards"])
def test_a_grey_model_trains_and_writes_a_grey_sample_grid(tmp_path, source):
    """configs/demo_digits.yaml is 1-channel: it trains on the digits and on RGB shards (decoded
    to grey), and its sample grid is an "L" PNG."""
    overrides = ["train.total_steps=3", "train.sample_every=3"]
    if source == "shards":
        overrides.append(f"data.source={write_noise_shards(tmp_path / 'shards', n=40, res=16)}")
    run = tmp_path / "run"
    code, err = run_train(run, *overrides)
    assert code == 0, err
    assert sorted(losses(run)) == [1, 2, 3] and load_config(run / "config.yaml").model.in_channels == 1
    with Image.open(run / "samples" / "step_00000003.png") as grid:
        assert grid.mode == "L" and grid.size == (2 + 2 * 18, 2 + 2 * 18)  # 4 samples of 16², pad 2


def test_in_channels_other_than_1_or_3_is_one_error_line(tmp_path):
    code, err = run_train(tmp_path / "run", "model.in_channels=2", "model.out_ch=2")
    assert code == 2 and err.strip() == "error: model.in_channels: must be 1 (grey) or 3 (RGB), got 2"


def _custom_scalars_layout(events):
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    return layout


def test_tensorboard_lists_runs_by_name_with_grouped_tags_and_grids_during_training(tmp_path):
    """`tensorboard --logdir runs` shows the run by its folder name, tags grouped by namespace,
    one custom-scalars layout (loss first, the loss by quarter of t on one chart), and sample
    grids at every sample step; metrics.jsonl keeps its flat keys."""
    import re

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    run = tmp_path / "runs" / "tiny"
    assert run_train(run, "train.total_steps=4", "train.sample_every=2", "train.sample_steps=5")[0] == 0
    assert run_train(run, "train.total_steps=6", "train.sample_every=2", "train.sample_steps=5")[0] == 0  # resumes
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "runs"))
    assert list(runs.Runs()) == ["tiny"]
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    by_t = {f"train/loss_by_t/q{q}" for q in range(4)}
    assert {"train/loss", "opt/grad_norm", "opt/lr", "opt/skipped_steps", "perf/images_per_s",
            "data/skipped_samples"} | by_t <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    first_row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "loss_q0", "grad_norm", "lr"} <= set(first_row)

    layout = _custom_scalars_layout(events)
    assert len(list(run.glob("*.layout"))) == 1  # written once per run, not once per start
    first = layout.category[0]
    assert first.title == "train" and first.chart[0].title == "loss"

    def charted(chart, tags):
        return {tag for tag in tags if any(re.search(regex, tag) for regex in chart.multiline.tag)}

    assert charted(first.chart[0], scalars) == {"train/loss"}
    assert charted(first.chart[1], scalars) == by_t  # the four quarters on one chart
    old_tags = {"loss", "loss_q0", "loss_q3", "lr", "perf/images_per_s"}  # runs from before the namespaces
    assert charted(first.chart[0], old_tags) == {"loss"} and charted(first.chart[1], old_tags) == {"loss_q0", "loss_q3"}

    assert [e.step for e in events.Images("samples/ema")] == [2, 4, 6]
    with Image.open(io.BytesIO(events.Images("samples/ema")[0].encoded_image_string)) as shown:
        r, g, b = shown.convert("RGB").split()
        assert r.tobytes() == g.tobytes() == b.tobytes()  # the grey grid, shown as grey
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == [f"step_0000000{s}.png" for s in (2, 4, 6)]


@pytest.mark.slow
def test_demo_learns_the_digits(tmp_path):
    """A few hundred steps on the digits: the loss falls well below its start and EMA samples'
    pixel statistics move from the untrained model's toward the data's."""
    cfg = load_config("configs/demo_digits.yaml", [f"out_dir={tmp_path}", "train.total_steps=400", "train.log_every=1",
                                                   "train.batch_size=32", "train.num_samples=16",
                                                   "train.sample_every=400", "train.ckpt_every=400",
                                                   "train.ema_decay=0.99"])
    torch.set_num_threads(2)
    train(cfg)
    history = losses(tmp_path)
    first, last = sum(history[s] for s in range(1, 11)) / 10, sum(history[s] for s in range(391, 401)) / 10
    assert last < 0.35 * first, (first, last)

    export_checkpoint(tmp_path, tmp_path / "model.safetensors")
    trained, diffusion = load_model_file(tmp_path / "model.safetensors")
    torch.manual_seed(cfg.seed)
    untrained = build_model(cfg.model).eval()
    data = to_model_range(load_digits_images(16, cfg.model.in_channels))

    def stats(images):  # the mean image and the overall pixel spread
        return images.mean(0), images.std()

    data_mean, data_std = stats(data)
    shape = (32, cfg.model.in_channels, 16, 16)
    for_model = lambda m: diffusion.p_sample_loop(m, shape, generator=torch.Generator().manual_seed(0))
    before, after = stats(for_model(untrained)), stats(for_model(trained))
    dist = lambda s: ((s[0] - data_mean).square().mean().sqrt().item(), abs(s[1] - data_std).item())
    d_before, d_after = dist(before), dist(after)
    assert d_after[0] < 0.6 * d_before[0] and d_after[1] < 0.5 * d_before[1], (d_before, d_after)

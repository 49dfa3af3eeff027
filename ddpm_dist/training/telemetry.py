"""What a run reports: TensorBoard scalars and images plus a JSONL copy (`metrics.jsonl`, read by
scripts and tests without TensorBoard), and the numbers behind them: throughput, MFU from a
FLOP count of the model, memory, loss by quarter of t.

TensorBoard groups its charts by the tag's first path part, so the tags are namespaced
(`train/`, `train/loss_by_t/`, `opt/`, `perf/`, `data/`, `eval/`, `samples/`) and one
custom-scalars layout per run puts the loss first and the loss by quarter of t on one chart.
metrics.jsonl keeps the flat keys it always had (`TB_TAGS` maps them). Event files go into the
run folder itself (`events_dir`): TensorBoard names a run by the folder of its event files, so
`tensorboard --logdir runs` lists every run by its name."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ddpm_dist.config import ModelConfig
from ddpm_dist.distributed import all_reduce_sum

# Dense bf16 peak FLOP/s by device name; MFU is reported only where the peak is known. H200: the
# 790 TFLOP/s a dense bf16 matmul reached on the H200 this project is measured on, not the data
# sheet's 989 (which H100 keeps: not measured here).
PEAK_BF16_FLOPS = {"H200": 790e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def model_flops_per_image(model: torch.nn.Module, cfg: ModelConfig) -> float:
    """Training FLOPs per image: 3 × the forward FLOPs (forward + backward ≈ 2 × forward), counted
    on the meta device so no real compute is spent."""
    import copy

    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(model).to("meta")
    x = torch.zeros(1, cfg.in_channels, cfg.resolution, cfg.resolution, device="meta")
    with FlopCounterMode(display=False) as counter:
        meta(x, torch.zeros(1, dtype=torch.long, device="meta"))
    return 3.0 * counter.get_total_flops()


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class StepTimer:
    """Images/s between reports; the first step (warm-up, compilation) is left out."""

    def __init__(self):
        self.since, self.images = None, 0

    def tick(self, images: int) -> None:
        if self.since is None:
            self.since = time.perf_counter()
        else:
            self.images += images

    def rates(self, world_size: int, flops_per_image: float, peak: float | None) -> dict:
        now = time.perf_counter()
        elapsed = now - self.since if self.since is not None else 0.0
        ips = self.images / elapsed if elapsed > 0 else 0.0
        self.since, self.images = now, 0
        out = {"perf/images_per_s": ips, "perf/images_per_s_per_device": ips / world_size}
        if peak:
            out["perf/mfu"] = ips / world_size * flops_per_image / peak
        return out


def memory_gb(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "memory/reserved_gb": torch.cuda.memory_reserved(device) / 2**30}


class StepTally:
    """What the log reports about the steps since the last log, accumulated on the device: a
    step adds to it without any host read; `read()` all-reduces it and fetches every value in
    one transfer, once per log interval.

    Summed over ranks: the loss and the loss by quarter of the timestep range. The same on every
    rank (global decisions): skipped steps, the longest run of non-finite steps, the norm."""

    _SUMMED = 9  # loss sum, then per quarter of t: 4 loss sums, 4 example counts

    def __init__(self, device: torch.device, num_timesteps: int):
        self.device, self.num_timesteps = device, num_timesteps
        self._reset()

    def _reset(self) -> None:
        self.summed = torch.zeros(self._SUMMED, dtype=torch.float64, device=self.device)
        self.skipped = torch.zeros((), dtype=torch.float64, device=self.device)
        self.streak = torch.zeros((), dtype=torch.float64, device=self.device)  # carries over logs
        self.longest = torch.zeros((), dtype=torch.float64, device=self.device)
        self.grad_norm = torch.full((), float("nan"), dtype=torch.float64, device=self.device)
        self.steps = 0

    def add(self, losses: torch.Tensor, t: torch.Tensor, grad_norm: torch.Tensor, skipped: torch.Tensor) -> None:
        losses = losses.double()
        quarter = (t * 4 // self.num_timesteps).clamp(max=3)
        by_quarter = torch.zeros(8, dtype=torch.float64, device=self.device)
        by_quarter.index_add_(0, quarter, losses).index_add_(0, quarter + 4, torch.ones_like(losses))
        self.summed += torch.cat([losses.mean().reshape(1), by_quarter])
        bad = (skipped | ~torch.isfinite(grad_norm)).double()
        self.streak = (self.streak + 1) * bad
        self.longest = torch.maximum(self.longest, self.streak)
        self.skipped += skipped.double()
        self.grad_norm = grad_norm.double()
        self.steps += 1

    def read(self, world_size: int) -> dict:
        """Collective: the interval's scalars as floats; starts the next interval."""
        all_reduce_sum([self.summed])
        values = torch.cat([self.summed, torch.stack([self.skipped, self.longest, self.grad_norm])]).tolist()
        loss_sum, q_sums, q_counts, (skipped, longest, grad_norm) = values[0], values[1:5], values[5:9], values[9:]
        out = {"loss": loss_sum / (world_size * max(self.steps, 1)), "grad_norm": grad_norm,
               "skipped_steps": skipped, "nonfinite_run": longest}
        out.update({f"loss_q{q}": s / c for q, (s, c) in enumerate(zip(q_sums, q_counts)) if c})
        streak = self.streak
        self._reset()
        self.streak = streak
        return out


# metrics.jsonl key → TensorBoard tag, for the keys outside a namespace; the others keep theirs.
TB_TAGS = {"loss": "train/loss", **{f"loss_q{q}": f"train/loss_by_t/q{q}" for q in range(4)},
           "lr": "opt/lr", "grad_norm": "opt/grad_norm", "skipped_steps": "opt/skipped_steps",
           "nonfinite_run": "opt/nonfinite_run"}
SAMPLE_GRID_TAG = "samples/ema"
LAYOUT_SUFFIX = ".layout"  # the event file that holds the run's custom-scalars layout


def events_dir(run_dir: str | Path) -> Path:
    """Where every writer of a run (training, the FID watcher, the report) puts its event files."""
    return Path(run_dir)


def tb_tag(key: str) -> str:
    return TB_TAGS.get(key, key)


def scalars_layout() -> dict:
    """The custom-scalars dashboard (category → chart → multiline of tag regexes), in reading
    order: the loss, then its breakdown by t, the optimizer, speed, data and evaluation. The
    regexes also match the flat tags of runs written before the namespaces, so old and new runs
    share the charts."""
    return {"train": {"loss": ["Multiline", [r"^(train/)?loss$"]],
                      "loss by quarter of t (q0: t < T/4 ... q3: t >= 3T/4)":
                          ["Multiline", [r"^(train/loss_by_t/q|loss_q)[0-3]$"]]},
            "opt": {"learning rate": ["Multiline", [r"^(opt/)?lr$"]],
                    "gradient norm (before clipping)": ["Multiline", [r"^(opt/)?grad_norm$"]],
                    "skipped steps (non-finite)": ["Multiline", [r"^(opt/)?(skipped_steps|nonfinite_run)$"]]},
            "perf": {"images/s": ["Multiline", [r"^perf/images_per_s"]], "MFU": ["Multiline", [r"^perf/mfu$"]],
                     "memory (GiB)": ["Multiline", [r"^memory/"]]},
            "data": {"skipped samples": ["Multiline", [r"^data/"]]},
            "eval": {"FID": ["Multiline", [r"^eval/fid"]], "Inception Score": ["Multiline", [r"^eval/is"]]}}


def write_layout(tb_dir: Path) -> None:
    """Once per run: the layout lives in its own event file, written when the run has none."""
    from torch.utils.tensorboard import SummaryWriter

    if any(tb_dir.glob(f"*{LAYOUT_SUFFIX}")):
        return
    with SummaryWriter(str(tb_dir), filename_suffix=LAYOUT_SUFFIX) as tb:
        tb.add_custom_scalars(scalars_layout())


class MetricsWriter:
    """TensorBoard + JSONL on rank 0; a no-op elsewhere. Import of tensorboard is deferred so the
    core does not need it."""

    def __init__(self, out_dir: str | Path, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = Path(out_dir)
        self.tb = SummaryWriter(str(events_dir(self.out_dir)))
        write_layout(events_dir(self.out_dir))
        self.jsonl = open(self.out_dir / "metrics.jsonl", "a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self.tb.add_scalar(tb_tag(name), value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()

    def record(self, step: int, values: dict) -> None:
        """A row of metrics.jsonl that is not a scalar (an event of the run, e.g. a config change)."""
        if self.enabled:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()

    def image(self, step: int, name: str, grid: torch.Tensor) -> None:
        """grid: uint8 [C, H, W]; TensorBoard stores C=1 (grey) as grey RGB."""
        if self.enabled:
            self.tb.add_image(name, grid, step)

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()

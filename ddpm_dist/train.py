"""Training: Algorithm 1 of Ho et al. (2020), with the distributed machinery beside it.

    python -m ddpm_dist.train --config configs/demo_digits.yaml [key.sub=value ...]
    torchrun --nproc_per_node=8 -m ddpm_dist.train --config configs/cifar10.yaml engine=fsdp

Resumes by itself from the newest complete checkpoint in `<out_dir>/checkpoints/`.
Exit status: 0 finished; 2 a config, data, checkpoint or non-finite-loss error (one `error:`
line); 3 stopped on a signal with a complete checkpoint; 4 data storage unavailable after the
retries; 5 a checkpoint could not be written (older checkpoints kept); 6 a rank died or hung
(collective timeout or watchdog).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ddpm_dist import distributed
from ddpm_dist.config import Config, ConfigError, load_config, save_config
from ddpm_dist.data import build_stream
from ddpm_dist.data.fs import DataError, DataReadError
from ddpm_dist.images import make_grid, save_png
from ddpm_dist.modelio.factory import build_diffusion, build_model
from ddpm_dist.samplers import TimestepMap, respace
from ddpm_dist.training.checkpoint import (CheckpointError, CheckpointSaveError, load_checkpoint,
                                           resumable_checkpoint, resume_config_changes, save_checkpoint)
from ddpm_dist.training.engines import batch_split, build_engine, fsdp_mesh_shape
from ddpm_dist.training.peers import Heartbeat
from ddpm_dist.training.sample_grid import sample_grid
from ddpm_dist.training.step import draw_micro_batches, step_generator, train_step
from ddpm_dist.training.watchdog import FAULT_EXIT_STATUS, Watchdog
from ddpm_dist.training.telemetry import (SAMPLE_GRID_TAG, MetricsWriter, StepTally, StepTimer, memory_gb,
                                          model_flops_per_image, peak_flops)
from ddpm_dist.utils.folder_lock import FolderBusyError, FolderLock, lock_folder
from ddpm_dist.utils.logs import log, setup_logging
from ddpm_dist.utils.parent_death import end_with_launcher
from ddpm_dist.utils.seeds import Purpose, derive_seed

EXIT_DATA_UNAVAILABLE = 4  # data storage unavailable after the retries: run again later
EXIT_SAVE_FAILED = 5  # a checkpoint could not be written; launchers do not requeue on it
MAX_NONFINITE = 20  # consecutive skipped non-finite steps before the run stops (checked when logging)
STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on a stop signal (one host read each)


class NonFiniteLossError(RuntimeError):
    pass


def learning_rate(cfg: Config, step: int) -> float:
    """Linear warm-up, then constant (the paper's schedule), with the lr and warm-up that
    optim.scale_rule gives at train.batch_size."""
    lr, warmup = cfg.optim.effective(cfg.train.batch_size)
    return lr * min(1.0, (step + 1) / max(1, warmup))


@dataclass
class StopRequest:
    """Set by SIGTERM/SIGINT/SIGUSR1/SIGUSR2 (Slurm preemption or time limit, Ctrl-C); acted on
    at a step boundary after all ranks agree, never inside the handler. A second SIGTERM or
    SIGINT ends the process at once (someone does not want to wait for the checkpoint)."""
    signum: int | None = None
    previous: dict = field(default_factory=dict)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)  # die of this signal now, as without us
            signal.raise_signal(signum)
        self.signum = signum

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass
class SaveClock:
    """Minutes since the last checkpoint, for train.ckpt_every_minutes (0: off). Only rank 0's
    clock is asked (`distributed.agree_flags`)."""
    minutes: float
    last: float = field(default_factory=time.monotonic)

    def due(self) -> bool:
        return self.minutes > 0 and time.monotonic() - self.last >= 60 * self.minutes

    def reset(self) -> None:
        self.last = time.monotonic()


@dataclass
class TrainResult:
    step: int
    stopped_early: bool
    last_loss: float
    signum: int | None = None  # the signal this rank received, if any: launchers decide on requeue by it


def train(cfg: Config) -> TrainResult:
    # Catch stop signals from the start: one arriving while the model is built is acted on at
    # the first step boundary instead of killing the process unsaved.
    check_world(cfg, distributed.detect_launch().world_size)
    stop = StopRequest()
    stop.install()
    end_with_launcher()  # no rank may outlive a killed torchrun: it would write beside the rerun
    try:
        info = distributed.init_distributed(cfg.device, always_group=cfg.engine != "single",
                                            timeout_s=cfg.train.collective_timeout)
        setup_logging(info.rank)
        lock = lock_run_folder(cfg, info)
        beats = Heartbeat(info.rank, info.world_size) if info.world_size > 1 else None
        try:
            return Run(cfg, info, beats).train(stop)
        except Exception as err:
            if beats is not None and distributed.is_collective_failure(err):
                err.lost_peers = beats.lost_peers()  # for main's error line: who is gone
            raise
        finally:
            if beats is not None:
                beats.close()
            lock.release()
    finally:
        stop.uninstall()
        distributed.teardown()


def check_world(cfg: Config, world_size: int) -> None:
    """Settings that must fit the world size, checked before the rendezvous: with hundreds of
    ranks every one stops with the same line instead of some waiting out the rendezvous."""
    batch_split(cfg, world_size)
    if cfg.engine == "fsdp":
        fsdp_mesh_shape(cfg.train.fsdp_shard_size, world_size)


RUN_LOCK = "run.lock"


def lock_run_folder(cfg: Config, info: distributed.DistInfo) -> FolderLock:
    """Rank 0 locks out_dir for the run's life; when another process holds it, every rank stops
    with the same line before anything is written."""
    lock, error = FolderLock(Path(cfg.out_dir) / RUN_LOCK, None), None
    if info.is_main:
        try:
            lock = lock_folder(cfg.out_dir, RUN_LOCK, "checkpoints and metrics")
        except FolderBusyError as e:
            error = str(e)
    error = distributed.broadcast_from_main(error)
    if error:
        raise FolderBusyError(error)
    return lock


class Run:
    """One training run on this rank: the model, engine and data, resumed from the newest
    checkpoint in out_dir, and the periodic actions around the steps."""

    def __init__(self, cfg: Config, info: distributed.DistInfo, beats: Heartbeat | None = None):
        self.cfg, self.info, self.beats = cfg, info, beats
        self.watch_peers("starting")  # start-up has the long collective timeout: a lost node ends it sooner
        self.out_dir, self.ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"
        self.micro_batch, self.accum = batch_split(cfg, info.world_size)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = build_model(cfg.model)
        self.num_parameters = sum(p.numel() for p in model.parameters())
        self.flops = model_flops_per_image(model, cfg.model)
        self.diffusion = build_diffusion(cfg.diffusion)
        self.engine = build_engine(cfg, model, info.device, info)
        self.stream = build_stream(cfg.data, self.micro_batch, resolution=cfg.model.resolution,
                                   channels=cfg.model.in_channels, seed=cfg.seed, rank=info.rank,
                                   world_size=info.world_size, pin_memory=info.device.type == "cuda")
        self.start, changes = self._resume()
        if info.is_main:  # only once the checkpoint fits: a rejected run leaves the run's config
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        self.writer = MetricsWriter(self.out_dir, enabled=info.is_main)
        if changes:
            log.warning(f"resuming with changed settings (train.allow_config_change): {changes}")
            self.writer.record(self.start, {"config_change": changes})
        self.timer = StepTimer()
        self.save_clock = SaveClock(cfg.train.ckpt_every_minutes)
        self.tally = StepTally(info.device, self.diffusion.num_timesteps)

    def _resume(self) -> tuple[int, dict]:
        """(start step, accepted config changes). The ranks verify the checkpoints together (each
        hashes its share); rank 0 compares the config; every rank acts on that one decision."""
        found = resumable_checkpoint(self.ckpt_dir)  # the same on every rank, or the same error
        decision = distributed.broadcast_from_main(self._resume_decision(found) if self.info.is_main else None)
        if "error" in decision:
            raise CheckpointError(decision["error"])
        if found is None:
            return 0, {}
        extra = load_checkpoint(found, self.engine)
        self.stream.load_state_dict(extra["data"])
        log.info(f"resumed from {found} at step {extra['step']}")
        return extra["step"], decision["changes"]

    def _resume_decision(self, found: Path | None) -> dict:
        try:
            return {"changes": resume_config_changes(found, self.cfg) if found else {}}
        except CheckpointError as e:
            return {"error": str(e)}

    def train(self, stop: StopRequest) -> TrainResult:
        cfg, info, total = self.cfg, self.info, self.cfg.train.total_steps
        lr, warmup = cfg.optim.effective(cfg.train.batch_size)
        log.info(f"{cfg.engine} on {info.world_size} x {info.device.type}: global batch {cfg.train.batch_size} = "
                 f"{info.world_size} ranks x {self.accum} micro-batches x {self.micro_batch}; lr {lr:.6g} after "
                 f"{warmup} warm-up steps (optim.scale_rule={cfg.optim.scale_rule}); "
                 f"{self.num_parameters / 1e6:.2f}M parameters; steps {self.start} → {total}; output {self.out_dir}")
        batches, loss = iter(self.stream), float("nan")
        progress = _progress(info.is_main, self.start, total)
        watchdog = Watchdog(cfg.train.hang_timeout)
        try:
            for step in range(self.start, total):
                watchdog.beat()  # one step and its periodic actions must end within hang_timeout
                # Algorithm 1: one gradient step on L_simple (ddpm_dist/training/step.py). No
                # value is read back to the host here: the GPU runs ahead until a log point.
                gen = step_generator(cfg.seed, step, info.rank, info.device)
                micro = draw_micro_batches(batches, self.accum, self.diffusion.num_timesteps, gen, self.engine)
                out = train_step(self.engine, self.diffusion, micro, learning_rate(cfg, step))
                self.tally.add(out.losses, out.t, out.result.grad_norm, out.result.skipped)
                self.timer.tick(cfg.train.batch_size)
                progress.update(1)
                if step == self.start:  # start-up (compilation, the first all-reduce) is over
                    distributed.set_collective_timeout(self.step_timeout)
                    self.watch_peers(None)
                # Periodic actions after step `done`: log (and the non-finite guard), checkpoint,
                # sample, stop. The checkpoint comes before the sample grid: whatever happens
                # while sampling, the step's state is already saved.
                done = step + 1
                if _every(done, cfg.train.log_every, total):
                    loss, nonfinite = self.log(done, progress)
                    if nonfinite >= MAX_NONFINITE or (nonfinite and not self.engine.skips_nonfinite_steps):
                        self.stop_nonfinite(done, f"{nonfinite:.0f} non-finite steps in a row")
                stop_now = timed = False
                if done % STOP_CHECK_EVERY == 0:  # a stop signal on any rank; rank 0's clock
                    stop_now, timed = distributed.agree_flags(stop.signum is not None, self.save_clock.due())
                if _every(done, cfg.train.ckpt_every, total) or stop_now or timed:
                    if not self.engine.weights_finite():
                        self.stop_nonfinite(done, "non-finite weights")
                    self.checkpoint(done)
                if _every(done, cfg.train.sample_every, total) and cfg.train.num_samples and not stop_now:
                    with self.patient_collectives(f"sampling the grid of step {done}"):
                        self.sample_grid(done)
                if stop_now:
                    log.info(f"stop requested (signal {stop.signum}): checkpoint at step {done} written, exiting")
                    return TrainResult(done, True, loss, stop.signum)
            return TrainResult(total, False, loss)
        finally:
            watchdog.close()
            progress.close()
            self.writer.close()

    def log(self, done: int, progress) -> tuple[float, float]:
        """Collective: the steps since the last log (loss averaged over them and the ranks).
        Returns (loss, longest run of non-finite steps)."""
        cfg, info = self.cfg, self.info
        scalars = {**self.tally.read(info.world_size), "lr": learning_rate(cfg, done - 1),
                   **self.timer.rates(info.world_size, self.flops, peak_flops(info.device)),
                   **memory_gb(info.device), "data/skipped_samples": float(self.stream.skipped)}
        self.writer.scalars(done, scalars)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}", img_s=f"{scalars['perf/images_per_s']:.0f}")
        return scalars["loss"], scalars.pop("nonfinite_run")

    @property
    def step_timeout(self) -> float:
        return min(self.cfg.train.step_timeout, self.cfg.train.collective_timeout)

    def watch_peers(self, what: str | None) -> None:
        """While `what` runs (None: no longer), a rank whose heartbeat stops for step_timeout
        ends every rank (training/peers.py), as a lost peer in a step's collective does."""
        if self.beats is not None:
            self.beats.watch(self.step_timeout if what else None, what or "")

    @contextlib.contextmanager
    def patient_collectives(self, what: str):
        """Checkpoint writes and sample grids can keep ranks apart for minutes: the long timeout
        while they run, the short one of the steps after. The heartbeats are watched meanwhile."""
        distributed.set_collective_timeout(self.cfg.train.collective_timeout)
        self.watch_peers(what)
        try:
            yield
        finally:
            self.watch_peers(None)
            distributed.set_collective_timeout(self.step_timeout)

    def checkpoint(self, done: int, name: str | None = None) -> None:
        with self.patient_collectives(f"writing the checkpoint of step {done}"):
            save_checkpoint(self.ckpt_dir, done, self.engine, {"data": self.stream.state_dict()},
                            self.cfg.train.keep_last, self.cfg, name=name)
        if name is None:
            self.save_clock.reset()

    def stop_nonfinite(self, done: int, what: str) -> None:
        """Save the state for inspection under a name that resume and rotation ignore, so the good
        checkpoints stay, and stop."""
        name = f"nonfinite_step_{done:08d}"
        self.checkpoint(done, name)
        raise NonFiniteLossError(f"{what} at step {done}; saved it as {self.ckpt_dir / name} (resume ignores it "
                                 f"and continues from the last step_* checkpoint). Lower optim.lr or use "
                                 f"train.precision=bf16/fp32")

    def sample_grid(self, done: int) -> None:
        """EMA samples from a fixed seed, each rank computing its share of the rows
        (training/sample_grid.py); rank 0 writes the grid. Grids before the last step take
        train.sample_steps respaced steps (all T when it is 0 or at least T)."""
        cfg = self.cfg
        shape = (cfg.train.num_samples, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        diffusion, model = self.diffusion, self.engine.model
        if 0 < cfg.train.sample_steps < self.diffusion.num_timesteps and done < cfg.train.total_steps:
            diffusion, kept = respace(self.diffusion, cfg.train.sample_steps)
            model = TimestepMap(model, kept)
        with self.engine.ema_weights(), self.engine.autocast():
            samples = sample_grid(model, diffusion, shape, derive_seed(cfg.seed, Purpose.SAMPLE_GRID),
                                  self.info, progress=self.writer.enabled)
        if samples is None:
            return
        grid = make_grid(samples)
        self.writer.image(done, SAMPLE_GRID_TAG, grid)
        if self.writer.enabled:
            (self.out_dir / "samples").mkdir(exist_ok=True)
            save_png(grid, self.out_dir / "samples" / f"step_{done:08d}.png")


def _every(done: int, interval: int, total: int) -> bool:
    """Periodic actions run every `interval` steps and after the last one."""
    return done % interval == 0 or done == total


def _progress(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a DDPM (Ho et al. 2020).")
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/cifar10.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings, e.g. train.total_steps=1000")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        result = train(cfg)
    except CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_SAVE_FAILED
    except (ConfigError, distributed.DeviceError, CheckpointError, NonFiniteLossError, FolderBusyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        status, line = fault_status(e)
        if status is None and not isinstance(e, DataError):  # a bug: its traceback
            raise
        print(line or f"error: {e}", file=sys.stderr)
        return status or 2
    return 3 if result.stopped_early else 0


def fault_status(err: BaseException) -> tuple[int | None, str]:
    """(exit status, error line) for a failure that a rerun may get past: storage unavailable
    after the retries (4), a rank that died or hung (6); (None, '') for any other error."""
    if isinstance(err, DataReadError):
        return EXIT_DATA_UNAVAILABLE, f"error: {err}"
    if distributed.is_collective_failure(err):
        who = getattr(err, "lost_peers", "its log says why")
        return FAULT_EXIT_STATUS, (f"error: a collective operation failed ({_first_line(err)}): another rank died "
                                   f"or hung: {who}; rerun to resume from the last checkpoint")
    return None, ""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""One prepared check of the GPU numbers, in one call of a few minutes (bench/gpu_check.sh runs it).

    python bench/gpu_check.py [--out DIR] [--budget SECONDS] [--smoke] [--only NAME ...] [--last FILE] [--rest]

Every measurement runs in a child process with its own time cap, inside one total budget: one
that does not fit in what is left is recorded as "skipped: over budget", one that fails or runs
past its cap is recorded with its error line, and the check goes on. The goals run first
(`plan`). Results: DIR/gpu_check.json (every section, every entry with a `status`),
DIR/gpu_check.txt (the table printed last) and DIR/children.log (the last lines of every child's
output: compile times, recompiles and graph breaks, which the children log through
TORCH_LOGS=recompiles,graph_breaks, or the error). The report is also written to --last (a
path that outlives the call on a warm device machine); `--rest` then runs only the checks that
report skipped or never reached, and writes the merged report: the second, shorter call.

Sections:
- env: device name, torch / CUDA / triton / diffusers versions, date.
- groupnorm: whether a U-Net Block's GroupNorm (and the whole Block) keeps channels_last on a
  channels_last bf16 input under autocast.
- train: images/s, MFU (against the peak `training.telemetry.peak_flops` gives: 790 TFLOP/s bf16
  dense on an H200, as measured there) and peak memory through the real loop: `python -m
  ddpm_dist.train` on the digits (data.source=digits), bf16, engine single / ddp / fsdp (ddp and
  fsdp with a one-process group), eager or compiled; the figures are those of the last
  metrics.jsonl line (an interval after the first, so compilation is left out), and
  `first_log_s` is the time to the first line (start-up and compilation included). The process
  is ended once that line is written: the run's final sample grid and checkpoint are not part
  of the measurement.
- diffusers: bench/train_throughput.py's step for ours and for diffusers' UNet2DModel of the same
  topology, bf16, eager and compiled, timed in turns; the ratio is ours / diffusers.
- sampling: bench/sample_throughput.py's `Sampler` run (ancestral DDPM, SampleNoise, --bf16) as
  tools/fid_sample.py runs it on the device (`samplers.network_plan`: on CUDA a bf16 weight copy
  and channels_last), eager at batch 64 and at `--batch-size auto` (evaluation.generate.
  auto_batch_size), and compiled (fid_sample's default on CUDA: one CUDA graph per step) at
  `auto`, timed over a few respaced steps after a warm-up run that compiles and captures
  (`warmup_s`; one forward per step, as at 1000 steps), and the projected time of 50,000
  CIFAR-10 samples at 1000 steps (PNG writing excluded).

--smoke runs the same code paths on the CPU with a tiny U-Net (16², ch 32), a few steps and
2 sampling steps, eager only, in well under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODELS = {"cifar10": 128, "celebahq": 64}  # config name → the batch of the paper's runs
TINY = ["model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
        "model.resolution=16"]
SECTIONS = ("env", "groupnorm", "train", "diffusers", "sampling")


@dataclass
class Check:
    """One measurement: skipped unless `min_s` seconds of the budget are left; its child is
    stopped after `cap_s` seconds (or when the budget ends, if sooner)."""
    section: str
    name: str
    min_s: float
    cap_s: float
    spec: dict = field(default_factory=dict)


def train_check(model: str, engine: str, compiled: bool) -> Check:
    mode = "compiled" if compiled else "eager"
    # Cold Inductor compiles of the U-Net's forward and backward take minutes, eager runs seconds.
    min_s, cap_s = (120, 200) if compiled else (20, 90)
    return Check("train", f"train {model} {engine} {mode}", min_s, cap_s,
                 {"model": model, "engine": engine, "compile": compiled})


def sampling_check(batch: int | str, compiled: bool) -> Check:
    # Compiled: a cold Inductor compile of the forward alone, less than training's forward and
    # backward (120 s); the 90 s is a guess until the check has run on a GPU.
    min_s, cap_s = (90, 180) if compiled else ((15, 60) if batch == 64 else (20, 90))
    return Check("sampling", f"sample cifar10 batch {batch} {'compiled' if compiled else 'eager'}", min_s, cap_s,
                 {"model": "cifar10", "batch": batch, "compile": compiled})


def diffusers_check(model: str, compiled: bool) -> Check:
    # Compiled: two compiles (ours, diffusers'); ours mostly hits the caches a compiled training
    # run of the same model left (Inductor's FX graph and AOT autograd caches).
    min_s, cap_s = (100, 220) if compiled else (25, 90)
    return Check("diffusers", f"diffusers {model} {'compiled' if compiled else 'eager'}", min_s, cap_s,
                 {"model": model, "compile": compiled})


def plan() -> list[Check]:
    """In the order they run: the goals first, compiled, as a run would meet them. CIFAR-10
    training, then diffusers compiled in the same harness right after (caches warm), 256²
    training, sampling at `--batch-size auto` with the 50k projection; then the eager and
    engine rows (eager CIFAR-10 and diffusers for the ratio to diffusers' own eager training,
    fsdp and ddp compiled), then the rest of the engine × mode grid and diffusers at 256²."""
    goals = [Check("env", "env", 5, 60), train_check("cifar10", "single", True), diffusers_check("cifar10", True),
             train_check("celebahq", "single", True), sampling_check("auto", compiled=True)]
    rows = [train_check("cifar10", "single", False), diffusers_check("cifar10", False),
            Check("groupnorm", "groupnorm channels_last", 10, 60),
            sampling_check(64, compiled=False), sampling_check("auto", compiled=False),
            train_check("cifar10", "fsdp", True), train_check("cifar10", "ddp", True),
            train_check("cifar10", "fsdp", False)]
    done = {(c.spec["model"], c.spec["engine"], c.spec["compile"]) for c in goals + rows if c.section == "train"}
    grid = [train_check(m, e, c) for c in (False, True) for m in MODELS for e in ("single", "ddp", "fsdp")
            if (m, e, c) not in done]
    return goals + rows + grid + [diffusers_check("celebahq", False), diffusers_check("celebahq", True)]


def rest_of(checks: list[Check], last: dict) -> list[Check]:
    """The checks a previous report skipped for the budget or never reached (its call ended
    first), in plan order; env always, to date the report."""
    entries = {e["name"]: e for s in SECTIONS[1:] for e in last.get(s, [])}
    return [c for c in checks if c.section == "env" or c.name not in entries
            or entries[c.name]["status"] == "skipped: over budget"]


def merged(last: dict, report: dict) -> dict:
    """`last` with the entries of `report` in place of those of the same name, new ones appended."""
    out = {**last, "env": report["env"], "wall_s": report.get("wall_s")}
    for section in SECTIONS[1:]:
        fresh = {e["name"]: e for e in report[section]}
        kept = [fresh.pop(e["name"], e) for e in last.get(section, [])]
        out[section] = kept + list(fresh.values())
    return out


# ------------------------------------------------------------------ children: the measurements ---

def child_env(spec: dict, smoke: bool) -> dict:
    import datetime
    import platform

    import torch
    from ddpm_dist.training.telemetry import peak_flops
    peak = peak_flops(device_of(smoke)) if torch.cuda.is_available() else None
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "mfu_peak_tflops": peak / 1e12 if peak else None}
    for name in ("triton", "diffusers"):
        try:
            module = __import__(name)
            out[name], out[f"{name}_from"] = module.__version__, str(Path(module.__file__).parent)
        except Exception as e:  # a missing or broken package is a finding, not a failure
            out[name] = f"not importable: {type(e).__name__}: {e}"[:200]
    out["carried_wheels"] = sorted(p.name for p in (ROOT / ".carry" / "wheels").glob("*.whl"))
    return out


def device_of(smoke: bool):
    import torch
    return torch.device("cpu" if smoke else "cuda")


def model_config(name: str, smoke: bool):
    from ddpm_dist.config import load_config
    return load_config(ROOT / "configs" / f"{name}.yaml", TINY if smoke else [])


def child_groupnorm(spec: dict, smoke: bool) -> dict:
    """The first Block's GroupNorm, and the Block, on a channels_last bf16-autocast input."""
    import torch
    from ddpm_dist.modelio.factory import build_model
    cfg, device = model_config("cifar10", smoke), device_of(smoke)
    block = build_model(cfg.model).blocks()[0].to(device, memory_format=torch.channels_last)
    c, r = block.res.norm1.num_channels, cfg.model.resolution
    x = torch.randn(8, c, r, r, device=device).to(memory_format=torch.channels_last)
    temb = torch.randn(8, block.res.temb_proj.in_features, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        norm_out, block_out = block.res.norm1(x), block(x, temb)
    cl = torch.channels_last
    return {"device": str(device), "input_channels_last": x.is_contiguous(memory_format=cl),
            "groupnorm_channels_last": norm_out.is_contiguous(memory_format=cl),
            "groupnorm_dtype": str(norm_out.dtype), "block_channels_last": block_out.is_contiguous(memory_format=cl)}


def child_diffusers(spec: dict, smoke: bool) -> dict:
    """Ours beside diffusers' UNet2DModel through train_throughput.step_fn, timed in turns."""
    from bench_utils import DiffusersAdapter, diffusers_unet, interleaved_medians
    from train_throughput import step_fn
    from ddpm_dist.modelio.factory import build_model
    cfg, device = model_config(spec["model"], smoke), device_of(smoke)
    batch = 8 if smoke else MODELS[spec["model"]]
    args = argparse.Namespace(bf16=True, compile=spec["compile"], steps=2 if smoke else 10, repeats=3)
    nets = {"ours": build_model(cfg.model), "diffusers": DiffusersAdapter(diffusers_unet(cfg.model))}
    fns = {label: step_fn(net, cfg, batch, args, device) for label, net in nets.items()}
    rates = {label: batch * args.steps / s for label, s in interleaved_medians(fns, args.repeats, device).items()}
    return {"batch": batch, "ours_images_per_s": rates["ours"], "diffusers_images_per_s": rates["diffusers"],
            "ratio": rates["ours"] / rates["diffusers"], "steps": args.steps, "repeats": args.repeats}


def child_sampling(spec: dict, smoke: bool) -> dict:
    """sample_throughput's run of our Sampler (SampleNoise, bf16) at a batch of 64 or `auto`,
    compiled or eager, with the network as `network_plan` runs it on this device."""
    import torch
    from bench_utils import time_median
    from sample_throughput import ours
    from ddpm_dist.evaluation.generate import auto_batch_size
    from ddpm_dist.modelio.factory import build_diffusion, build_model
    from ddpm_dist.noise import SampleNoise
    from ddpm_dist.samplers import Sampler, network_plan
    cfg, device = model_config(spec["model"], smoke), device_of(smoke)
    batch, compile = spec["batch"], "true" if spec["compile"] else "false"
    if batch == "auto":  # probes the eager network, as tools/fid_sample.py does
        shape = (cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        probe = Sampler(build_model(cfg.model).to(device).eval(), build_diffusion(cfg.diffusion), shape, bf16=True,
                        compile=compile)
        batch = auto_batch_size(probe, device)
        del probe
    steps = 2 if smoke else 20
    args = argparse.Namespace(batch_size=batch, bf16=True, compile=compile)
    run, _ = ours(lambda idx, dev: SampleNoise(0, idx, dev))(cfg, "ddpm", args, device)
    with torch.no_grad():
        warmup_s = time_median(lambda: run(steps), 1, device, warmup=False)  # compiles and captures
        seconds = time_median(lambda: run(steps), 2 if smoke else 3, device, warmup=False)
    image_steps_per_s = batch * steps / seconds
    projected_s = 50_000 * 1000 / image_steps_per_s
    plan = network_plan(device, bf16=True, compile=compile)
    return {"batch": batch, "steps_timed": steps, "warmup_s": warmup_s,
            "images_per_s_at_1000_steps": image_steps_per_s / 1000,
            "image_steps_per_s": image_steps_per_s, "projected_50k_1000_steps_min": projected_s / 60,
            "weights": str(plan.dtype).removeprefix("torch."), "compiled": plan.compile,
            "cuda_graphs": plan.cuda_graphs,
            "channels_last": plan.memory_format == torch.channels_last,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


CHILDREN = {"env": child_env, "groupnorm": child_groupnorm, "diffusers": child_diffusers, "sampling": child_sampling}


def child_main(section: str, spec_json: str, result_path: str, smoke: bool) -> None:
    from ddpm_dist.utils.files import atomic_write
    result = CHILDREN[section](json.loads(spec_json), smoke)
    import torch._dynamo.utils
    print("compile times (Dynamo, per compiled function):\n" + torch._dynamo.utils.compile_times(repr="str"))
    atomic_write(result_path, json.dumps(result))  # complete or absent: the parent reads it once it exists


# ----------------------------------------------------------------------- the parent: scheduling ---

class ChildFailed(RuntimeError):
    pass


def error_line(log: Path) -> str:
    """The line that says what went wrong: the last `error:` or exception line of a child's log,
    else its last line."""
    lines = [s.strip() for s in log.read_text(errors="replace").splitlines() if s.strip()] if log.exists() else []
    for s in reversed(lines):
        if s.startswith("error:") or "Error" in s.split(" ", 1)[0] or "Exception" in s.split(" ", 1)[0]:
            return s[:300]
    return lines[-1][:300] if lines else "no output"


def child_env_vars(smoke: bool) -> dict:
    paths = [str(ROOT), str(BENCH), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_LOGS", "recompiles,graph_breaks")  # into each child's log, and so its tail
    if smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run, also on a GPU machine
    return env


def start(cmd: list[str], log: Path, smoke: bool) -> subprocess.Popen:
    """A child in its own process group, so a timeout stops it and everything it started."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=child_env_vars(smoke), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(proc: subprocess.Popen, done, timeout: float, log: Path) -> None:
    """Poll until `done()` or the child exits or `timeout` passes; the child is stopped after."""
    deadline = time.monotonic() + timeout
    try:
        while not done():
            if proc.poll() is not None:
                if done():
                    return
                raise ChildFailed(f"exit status {proc.returncode}: {error_line(log)}")
            if time.monotonic() > deadline:
                raise ChildFailed(f"timed out after {timeout:.0f} s (last output: {error_line(log)})")
            time.sleep(0.2)
    finally:
        stop(proc)


def train_batch(spec: dict, smoke: bool) -> int:
    return 8 if smoke else MODELS[spec["model"]]


def train_overrides(spec: dict, out_dir: Path, smoke: bool) -> tuple[list[str], int]:
    """(overrides, log lines to wait for): a short bf16 run on the digits, logging every K steps."""
    batch = train_batch(spec, smoke)
    every = 2 if smoke else (50 if spec["model"] == "cifar10" else 10)
    never = 10**9  # no sample grid, no checkpoint, no end of run during the measurement
    overrides = ["data.source=digits", "data.num_workers=0", "train.precision=bf16", f"engine={spec['engine']}",
                 f"train.compile={str(spec['compile']).lower()}", f"train.batch_size={batch}",
                 "train.micro_batch_size=null", f"train.log_every={every}", f"train.total_steps={never}",
                 f"train.sample_every={never}", f"train.ckpt_every={never}", f"out_dir={out_dir}",
                 f"device={'cpu' if smoke else 'cuda'}"]
    return (TINY + overrides if smoke else overrides), 2 if smoke else 3


def measure_train(check: Check, timeout: float, work: Path, smoke: bool) -> dict:
    out_dir = work / check.name.replace(" ", "_")
    overrides, lines = train_overrides(check.spec, out_dir, smoke)
    metrics, log = out_dir / "metrics.jsonl", work / f"{out_dir.name}.log"
    cmd = [sys.executable, "-m", "ddpm_dist.train", "--config", f"configs/{check.spec['model']}.yaml", *overrides]

    def rows() -> list[dict]:
        text = metrics.read_text() if metrics.exists() else ""
        return [json.loads(s) for s in text.splitlines() if s.endswith("}")]

    def done() -> bool:
        seen = rows()
        if seen and "first_log_s" not in first:
            first["first_log_s"] = round(time.monotonic() - began, 1)  # start-up and compile included
        return len(seen) >= lines
    began, first = time.monotonic(), {}
    wait_for(start(cmd, log, smoke), done, timeout, log)
    last = rows()[-1]
    keys = {"perf/images_per_s": "images_per_s", "perf/mfu": "mfu", "memory/max_allocated_gb": "max_allocated_gb",
            "memory/reserved_gb": "reserved_gb", "loss": "loss", "step": "step"}
    return {"batch": train_batch(check.spec, smoke), **first, **{short: last.get(key) for key, short in keys.items()}}


def measure_child(check: Check, timeout: float, work: Path, smoke: bool) -> dict:
    result, log = work / f"{check.name.replace(' ', '_')}.json", work / f"{check.name.replace(' ', '_')}.log"
    cmd = [sys.executable, str(BENCH / "gpu_check.py"), "--child", check.section, "--spec", json.dumps(check.spec),
           "--result", str(result), *(["--smoke"] if smoke else [])]
    wait_for(start(cmd, log, smoke), result.exists, timeout, log)
    return json.loads(result.read_text())


def run_check(check: Check, deadline: float, work: Path, smoke: bool) -> dict:
    """The entry of one check: its result, or why there is none."""
    entry = {"name": check.name, **check.spec}
    left = deadline - time.monotonic()
    if smoke and check.spec.get("compile"):
        return {**entry, "status": "skipped: smoke runs eager only"}
    if left < check.min_s:
        return {**entry, "status": "skipped: over budget"}
    measure = measure_train if check.section == "train" else measure_child
    began = time.monotonic()
    try:
        result, status = measure(check, min(check.cap_s, left), work, smoke), "ok"
    except Exception as e:  # one failed measurement is recorded; the check goes on
        result, status = {}, f"error: {e}"[:400]
    return {**entry, "status": status, "seconds": round(time.monotonic() - began, 1), **result}


# -------------------------------------------------------------------------------- the table ---

def fmt(value, spec: str = ",.1f") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def table_row(e: dict) -> str:
    """| measurement | status | images/s | MFU | peak GB | notes |"""
    ok = e["status"] == "ok"
    status = "ok" if ok else e["status"][:90]
    if e.get("section") == "env":
        notes = f"{e.get('device')}, torch {e.get('torch')}, CUDA {e.get('cuda')}, diffusers {str(e.get('diffusers'))[:40]}"
        return f"| env | {status} | | | | {notes} |"
    if "groupnorm_channels_last" in e:
        notes = f"GroupNorm keeps channels_last: {e['groupnorm_channels_last']} ({e['groupnorm_dtype']}); Block: {e['block_channels_last']}"
        return f"| {e['name']} | {status} | | | | {notes} |"
    if "ratio" in e:
        notes = f"ours {fmt(e['ours_images_per_s'])} vs diffusers {fmt(e['diffusers_images_per_s'])} img/s, batch {e['batch']}"
        return f"| {e['name']} | {status} | {fmt(e['ours_images_per_s'])} | | | ratio {e['ratio']:.2f}x; {notes} |"
    if "projected_50k_1000_steps_min" in e:
        notes = (f"batch {e['batch']}, {e['weights']} weights, channels_last {e['channels_last']}, "
                 f"CUDA graphs {e.get('cuda_graphs')}, warm-up {fmt(e.get('warmup_s'))} s: "
                 f"50k × 1000 steps ≈ {e['projected_50k_1000_steps_min']:,.1f} min")
        return (f"| {e['name']} | {status} | {fmt(e['images_per_s_at_1000_steps'], ',.2f')} | | "
                f"{fmt(e['peak_allocated_gb'], '.1f')} | {notes} (img/s at 1000 steps) |")
    mfu = fmt(e.get("mfu") * 100, ".1f") + "%" if isinstance(e.get("mfu"), float) else "-"
    notes = (f"batch {e['batch']}, loss {fmt(e.get('loss'), '.3f')}, first log at {fmt(e.get('first_log_s'))} s"
             if ok else "")
    return f"| {e['name']} | {status} | {fmt(e.get('images_per_s'))} | {mfu} | {fmt(e.get('max_allocated_gb'), '.1f')} | {notes} |"


def table(report: dict) -> str:
    rows = [table_row({**report["env"], "section": "env"})]
    rows += [table_row(e) for s in SECTIONS[1:] for e in report[s]]
    peak = report["env"].get("mfu_peak_tflops")
    mfu = f"MFU (of {peak:.0f} TFLOP/s bf16 dense)" if peak else "MFU"
    head = f"| measurement | status | images/s | {mfu} | peak GB | notes |\n| --- | --- | --- | --- | --- | --- |"
    return head + "\n" + "\n".join(rows)


# ---------------------------------------------------------------------------------- main ---

def run_all(checks: list[Check], budget: float, work: Path, smoke: bool, save) -> dict:
    """Run the checks in order inside `budget` seconds; `save(report)` after each, so a call
    that is killed keeps what it measured (and the log tails so far)."""
    deadline = time.monotonic() + budget
    report = {"smoke": smoke, "budget_s": budget, "env": {"status": "skipped: not run"},
              **{s: [] for s in SECTIONS[1:]}}
    for check in checks:
        entry = run_check(check, deadline, work, smoke)
        print(f"{entry['name']}: {entry['status']} ({entry.get('seconds', 0)} s)", flush=True)
        if check.section == "env":
            report["env"] = entry
        else:
            report[check.section].append(entry)
        save(report)
    return report


def write_json(path: Path, report: dict) -> None:
    from ddpm_dist.utils.files import atomic_write
    atomic_write(path, json.dumps(report, indent=1))


LOG_TAIL = 60  # lines of each child's log kept in children.log


def log_tails(work: Path, report: dict) -> str:
    """The last lines of every child's output, ok or not: compile times, recompiles, graph
    breaks (TORCH_LOGS) and, for a failed child, its error."""
    parts = []
    for entry in [report["env"], *(e for s in SECTIONS[1:] for e in report[s])]:
        log = work / f"{entry['name'].replace(' ', '_')}.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
            parts.append(f"===== {entry['name']}: {entry['status']}\n" + "\n".join(tail))
    return "\n\n".join(parts)


def read_last(path: str | None) -> dict:
    """The report `--rest` continues, or SystemExit with one line saying what to do."""
    if not path or not Path(path).is_file():
        raise SystemExit(f"--rest: no report at {path!r}; run the first call (bench/gpu_check.sh) before it, "
                         "with the same --last, on the same machine")
    return json.loads(Path(path).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    p.add_argument("--budget", type=float, default=None, help="seconds for all checks (default 420, smoke 50)")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny U-Net, eager only")
    p.add_argument("--only", nargs="+", default=None, help="run only the checks whose name contains one of these")
    p.add_argument("--last", default=None, help="also write the report here (read back by --rest)")
    p.add_argument("--rest", action="store_true", help="run what the report at --last skipped or never reached")
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args.child, args.spec, args.result, args.smoke)
    previous = read_last(args.last) if args.rest else None
    if args.last:
        Path(args.last).parent.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = [c for c in plan() if not args.only or c.section == "env" or any(o in c.name for o in args.only)]
    checks = rest_of(checks, previous) if previous else checks
    budget = args.budget or (50.0 if args.smoke else 420.0)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        def save(report: dict) -> dict:
            full = merged(previous, report) if previous else report
            for path in [out / "gpu_check.json", *([Path(args.last)] if args.last else [])]:
                write_json(path, full)
            (out / "children.log").write_text(log_tails(Path(tmp), report))
            (out / "gpu_check.txt").write_text(table(full) + "\n")
            return full
        report = run_all(checks, budget, Path(tmp), args.smoke, save)
        report["wall_s"] = round(time.monotonic() - began, 1)
        full = save(report)
    print(f"\n{full['env'].get('device', '?')}, torch {full['env'].get('torch', '?')}, "
          f"{full['env'].get('date', '?')}, {report['wall_s']} s of a {budget:.0f} s budget\n{table(full)}")


if __name__ == "__main__":
    main()

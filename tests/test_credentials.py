"""Credentials never reach a file, a message or a log: a URL holding them is refused with one
line that points to the environment, and credentials from the environment are not written.

Every test runs the real tools as processes and then searches everything they wrote and printed
for the secret.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzEXAMPLEKEY"


def _run(*cmd) -> subprocess.CompletedProcess:
    """The environment as it is now: the s3_server fixture exports the AWS_* variables."""
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)


def _files_holding(folder: Path, secret: str) -> list[Path]:
    if not folder.exists():
        return []
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _refused(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "\n" not in err and "Traceback" not in err, err
    assert SECRET not in proc.stdout + proc.stderr
    assert "AWS_ACCESS_KEY_ID" in err and "AWS_PROFILE" in err, err
    return err


@pytest.mark.parametrize("setting", [f"data.source=s3://AKIAEXAMPLE:{SECRET}@bucket/cifar10/",
                                     f"data.source=s3://AKIAEXAMPLE:{SECRET}/x@bucket/cifar10/",
                                     f"data.s3_endpoint=http://admin:{SECRET}@127.0.0.1:9000"])
def test_train_refuses_credentials_in_urls(tmp_path, setting):
    out = tmp_path / "run"
    proc = _run("-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml", f"out_dir={out}", setting)
    assert proc.returncode == 2
    assert _refused(proc).startswith("error: data.")
    assert _files_holding(tmp_path, SECRET) == []


@pytest.mark.parametrize("flag, value", [("--out", f"s3://AKIAEXAMPLE:{SECRET}@bucket/shards/"),
                                         ("--s3-endpoint", f"http://admin:{SECRET}@127.0.0.1:9000")])
def test_make_shards_refuses_credentials_in_urls(tmp_path, flag, value):
    args = {"--out": str(tmp_path / "out"), flag: value}
    proc = _run("tools/make_shards.py", "--source", "digits", "--resolution", "8", "--no-progress",
                *[x for item in args.items() for x in item])
    assert flag in _refused(proc)
    assert _files_holding(tmp_path, SECRET) == []


def test_fid_sample_refuses_a_config_with_credentials(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data:\n  source: s3://AKIAEXAMPLE:{SECRET}@bucket/x/\nmodel:\n  resolution: 8\n"
                   "  ch_mult: [1, 2]\n  attn_resolutions: []\n  ch: 32\n  num_res_blocks: 1\n")
    out = tmp_path / "samples"
    proc = _run("tools/fid_sample.py", "--random-init", "--config", cfg, "--num-samples", 2, "--out", out,
                "--device", "cpu")
    _refused(proc)
    assert not (out / "result.json").exists()
    assert _files_holding(out, SECRET) == []


@pytest.mark.s3
def test_credentials_from_the_environment_are_not_written_by_a_run(s3_server, tmp_path):
    """Shards on S3, a short training run and sampling with the server's real secret in the
    environment: the secret is in no file of the run and in nothing the processes print."""
    import uuid
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    url = f"s3://{s3_server['bucket']}/creds-{uuid.uuid4().hex[:8]}/"
    shards = _run("tools/make_shards.py", "--source", "digits", "--resolution", "8", "--max-samples", "900",
                  "--workers", "1", "--no-progress", "--out", url, "--s3-endpoint", s3_server["endpoint"])
    assert shards.returncode == 0, shards.stderr[-2000:]
    run = tmp_path / "run"
    train = _run("-m", "ddpm_dist.train", "--config", "configs/demo_digits.yaml", f"out_dir={run}",
                 f"data.source={url}", f"data.s3_endpoint={s3_server['endpoint']}", "device=cpu",
                 "train.total_steps=2", "train.ckpt_every=1", "train.sample_every=1000", "train.batch_size=4",
                 "train.num_samples=4", "model.resolution=8", "model.ch_mult=[1,2]", "model.attn_resolutions=[]",
                 "diffusion.num_timesteps=10")
    assert train.returncode == 0, train.stderr[-2000:]
    sample = _run("tools/fid_sample.py", "--ckpt", run, "--num-samples", 2, "--batch-size", 2, "--out",
                  tmp_path / "samples", "--device", "cpu")
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert url.split("/")[3] in (run / "config.yaml").read_text()  # the run did record its data
    printed = "".join(p.stdout + p.stderr for p in (shards, train, sample))
    assert secret not in printed
    assert _files_holding(tmp_path, secret) == []

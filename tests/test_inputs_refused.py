"""Paths and URLs are honoured or refused in one line: no control character reaches a job script
or a file name, and only local paths and s3:// URLs (which get every S3 setting) are accepted."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_dist.config import ConfigError, load_config
from ddpm_dist.launch.slurm import JobResources, make_executor

ROOT = Path(__file__).resolve().parents[1]


def one_line(text: str) -> str:
    text = text.strip()
    assert "\n" not in text and "Traceback" not in text, text
    return text


# An override's value is YAML: a plain newline folds into a space, a quoted "\n" is a newline.
@pytest.mark.parametrize("setting", ['out_dir="/x/run\'\\ntouch /tmp/pwned #"', 'data.source="/data/c10\\r"',
                                     "out_dir=runs/a\x1b[2Jb", 'data.s3_endpoint="http://minio:9000\\n"'])
def test_control_characters_in_a_setting_are_refused(setting):
    with pytest.raises(ConfigError, match="control character") as e:
        load_config("configs/demo_digits.yaml", [setting])
    assert one_line(str(e.value)).startswith(setting.split("=")[0])


def test_control_characters_in_a_config_file_are_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('out_dir: "/x/run\'\\ntouch /tmp/pwned #"\n')
    with pytest.raises(ConfigError, match=r"^out_dir: .*control character"):
        load_config(config)


@pytest.mark.parametrize("field", ["folder", "name", "partition", "account"])
def test_job_scripts_get_no_control_characters(tmp_path, field):
    res = {"name": "ddpm", "partition": None, "account": None}
    folder = tmp_path / "slurm"
    if field == "folder":
        folder = tmp_path / "run'\ntouch pwned #"
    else:
        res[field] = "gpu\n#SBATCH --time=0"
    with pytest.raises(ValueError, match="control character"):
        make_executor(folder, JobResources(**res), local=True)


def test_reproduce_refuses_a_newline_in_out_dir(tmp_path):
    proc = subprocess.run([sys.executable, "launch/reproduce.py", "configs/demo_digits.yaml",
                           f'out_dir="{tmp_path}/run\'\\ntouch {tmp_path}/pwned #"', "--dataset", "folder",
                           "--raw", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "control character" in one_line(proc.stderr), proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["https://example.invalid/shards", "s3a://bucket/shards", "gs://bucket/x",
                                 "S3://bucket/x", "s3:/bucket/x", "file:///data/x"])
def test_only_local_paths_and_s3_urls_are_accepted_as_data_source(url):
    with pytest.raises(ConfigError, match=r"^data.source: .*local path or an s3://") as e:
        load_config("configs/demo_digits.yaml", [f"data.source={url}"])
    one_line(str(e.value))


@pytest.mark.parametrize("url", ["ftp://minio:9000", "minio:9000", "//minio:9000"])
def test_s3_endpoint_must_be_an_http_url(url):
    with pytest.raises(ConfigError, match=r"^data.s3_endpoint: .*http"):
        load_config("configs/demo_digits.yaml", [f"data.s3_endpoint={url}"])


@pytest.mark.parametrize("source", ["digits", "s3://bucket/c10/", "/data/c10", "runs/shards", "./a:b"])
def test_local_paths_and_s3_urls_pass(source):
    assert load_config("configs/demo_digits.yaml", [f"data.source={source}"]).data.source == source


def test_make_shards_refuses_an_unsupported_out_url(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", "--source",
                           "digits", "--resolution", "8", "--out", "https://example.invalid/shards"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--out" in one_line(proc.stderr) and "s3://" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written under ./https:/


def test_data_layer_refuses_other_schemes():
    from ddpm_dist.data import fs
    with pytest.raises(fs.DataConfigError, match="s3a://.*local path or an s3://"):
        fs.read_bytes("s3a://bucket/index.json", retries=0, check=True)


def test_image_sources_of_the_evaluation_tools_refuse_other_schemes():
    from ddpm_dist.metrics.image_sources import open_images
    with pytest.raises(ValueError, match="https:// is not supported"):
        open_images("https://example.invalid/cifar10_train_png/")


@pytest.mark.parametrize("tool, count", [("tools/fid_sample.py", "--num-samples"), ("tools/eval_nll.py", "--num-images")])
def test_an_evaluation_output_path_with_a_newline_is_refused_before_anything_is_written(tool, count, tmp_path):
    out = tmp_path / "run\nx"
    proc = subprocess.run([sys.executable, tool, "--random-init", count, "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "control character" in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["tools/export.py", "tools/fid_stats.py"])
def test_an_output_file_name_with_a_newline_is_refused_before_anything_is_read(tool, tmp_path):
    proc = subprocess.run([sys.executable, tool, str(tmp_path / "missing"), "--out", str(tmp_path / "out\nx")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--out: holds the control character '\\n'" in one_line(proc.stderr), proc.stderr
    assert list(tmp_path.iterdir()) == []

"""make_shards and the shard format on local disk: sources, index.json, rerun, tar safety."""
from __future__ import annotations

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_helpers import huge_png, webdataset_samples
from ddpm_dist.data.convert import tar_bytes
from ddpm_dist.data.shards import read_images, safe_member_name

ROOT = Path(__file__).resolve().parents[1]


def make_shards(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def shard_images(folder: Path) -> list[Image.Image]:
    index = json.loads((folder / "index.json").read_text())
    data = [(folder / s["name"]).read_bytes() for s in index["shards"]]
    return [Image.open(io.BytesIO(b)) for d in data for _, b in read_images(d, "t")[0]]


def test_digits_to_local_shards_with_index(tmp_path):
    out = tmp_path / "digits"
    r = make_shards("--source", "digits", "--out", str(out), "--max-samples", "500",
                    "--resolution", "16", "--workers", "2")
    assert r.returncode == 0, r.stderr
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["resolution"] == 16 and index["total"] == 1797
    assert [s["samples"] for s in index["shards"]] == [500, 500, 500, 297]
    assert all(im.size == (16, 16) for im in shard_images(out))


def test_rerun_keeps_verified_shards_and_rewrites_bad_ones(tmp_path):
    out = tmp_path / "d"
    args = ["--source", "digits", "--resolution", "8", "--max-samples", "600", "--workers", "1"]
    assert make_shards(*args, "--out", str(out)).returncode == 0
    first = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    (out / "shard-000001.tar").write_bytes(b"garbage")
    r = make_shards(*args, "--out", str(out))
    assert r.returncode == 0 and "keeping 1 verified shards" in r.stderr
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == first  # deterministic bytes
    assert not list(out.glob(".tmp-*"))


def test_folder_source_centre_crops_and_resizes(tmp_path):
    src = tmp_path / "imgs" / "sub"
    src.mkdir(parents=True)
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, 20:60] = 255  # the centre square is white, the sides black
    Image.fromarray(wide).save(src / "a.png")
    Image.fromarray(wide).save(src / "b.jpg", quality=100)
    out = tmp_path / "out"
    r = make_shards("--source", "folder", "--input", str(tmp_path / "imgs"), "--out", str(out),
                    "--resolution", "8", "--format", "webp", "--quality", "100")
    assert r.returncode == 0, r.stderr
    images = shard_images(out)
    assert len(images) == 2 and all(np.asarray(im.convert("L")).min() > 200 for im in images)


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    for b in (1, 2):
        batch = {b"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8),
                 b"labels": [0] * 10, b"filenames": [f"f{i}.png".encode() for i in range(10)]}
        (tmp_path / f"data_batch_{b}").write_bytes(pickle.dumps(batch))
    out = tmp_path / "out"
    r = make_shards("--source", "cifar10", "--input", str(tmp_path), "--out", str(out), "--seed", "3")
    assert r.returncode == 0, r.stderr
    pixels = {np.asarray(im).tobytes() for im in shard_images(out)}
    first = batch_image(tmp_path / "data_batch_1", 0)
    assert len(pixels) == 20 and first in pixels  # lossless PNG round trip


class _WritesFile:
    """Unpickling this creates a file: the payload a crafted CIFAR-10 batch could carry."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_cifar10_batch_that_names_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 0], b"filenames": [b"a", _WritesFile(marker)]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=2))
    r = make_shards("--source", "cifar10", "--input", str(tmp_path), "--out", str(tmp_path / "out"))
    err = r.stderr.strip()
    assert r.returncode != 0 and "\n" not in err and "data_batch_1" in err and "open" in err and "refused" in err, err
    assert not marker.exists()


def batch_image(path: Path, i: int) -> bytes:
    data = pickle.loads(path.read_bytes())[b"data"][i]
    return data.reshape(3, 32, 32).transpose(1, 2, 0).tobytes()


@pytest.mark.parametrize("name,ok", [("a/b.png", True), ("../x.png", False), ("/etc/x.png", False),
                                     ("a/../../x.png", False), ("..\\x.png", False)])
def test_unsafe_member_names_rejected(name, ok):
    assert safe_member_name(name) is ok


def test_reader_skips_escaping_members_and_salvages_truncated_tar():
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    data = tar_bytes([("000.png", png.getvalue()), ("../evil.png", png.getvalue()),
                      ("001.png", png.getvalue())])
    images, rejected = read_images(data, "t")
    assert [k for k, _ in images] == ["000", "001"] and rejected == 1
    images, _ = read_images(data[:2600], "t")  # headers+data are 1 KiB each: cut in the third
    assert [k for k, _ in images] == ["000"]


def test_tar_members_have_fixed_metadata():
    info = tarfile.open(fileobj=io.BytesIO(tar_bytes([("k.png", b"x")]))).getmembers()[0]
    assert (info.mtime, info.uname, info.mode) == (0, "", 0o644)
    assert os.path.basename(info.name) == "k.png"


def unique_image_folder(root: Path, n: int) -> dict[str, bytes]:
    """n distinct 8² PNGs in two subfolders; {id as FolderSource names it: RGB pixel bytes}."""
    pixels = np.random.default_rng(1).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    images = {}
    for i, im in enumerate(pixels):
        sid = f"{'ab'[i % 2]}/img{i}.png"  # path ids: webdataset would read a bare `.id` as an int
        (root / sid).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(root / sid)
        images[sid] = im.tobytes()
    return images


def test_webdataset_reads_every_sample_of_local_shards(tmp_path):
    images = unique_image_folder(tmp_path / "imgs", 20)
    out = tmp_path / "out"
    r = make_shards("--source", "folder", "--input", str(tmp_path / "imgs"), "--out", str(out),
                    "--max-samples", "7", "--workers", "1")
    assert r.returncode == 0, r.stderr
    samples = webdataset_samples(str(out))  # 3 shards
    assert [key for key, _, _ in samples] == [f"{i:09d}" for i in range(20)]
    assert {sid: pixels for _, sid, pixels in samples} == images


def test_importing_the_data_modules_does_not_import_webdataset():
    code = ("import sys, ddpm_dist.data.fs, ddpm_dist.data.stream, ddpm_dist.data.convert; "
            "assert 'webdataset' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def test_a_killed_encoding_worker_is_an_error_not_a_hang(tmp_path):
    unique_image_folder(tmp_path / "imgs", 40)
    os.mkfifo(tmp_path / "imgs" / "blocked.png")  # a worker that opens it waits for a writer forever
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", "--source", "folder",
           "--input", str(tmp_path / "imgs"), "--out", str(out), "--resolution", "8", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(_children(proc.pid)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(_children(proc.pid)[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("make_shards hangs after one of its workers was killed")
    finally:
        if proc.poll() is None:
            for pid in [*_children(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            proc.wait()
    last = err.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("error:") and "worker" in last, err
    assert "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]  # no temp files


class CountingSource:
    """Images that count how often they were opened, over processes."""

    def __init__(self, n: int):
        import multiprocessing
        self.n, self.loads = n, multiprocessing.get_context("fork").Value("i", 0)

    def ids(self):
        return [str(i) for i in range(self.n)]

    def open(self, sid):
        with self.loads.get_lock():
            self.loads.value += 1
        return Image.new("RGB", (8, 8), (int(sid) % 256, 0, 0))


def test_encoding_reads_ahead_a_bounded_number_of_samples():
    from ddpm_dist.data import convert
    source = CountingSource(4000)
    convert._JOB.update(source=source, resolution=8, options={"resolution": 8, "fmt": "png", "quality": 95})
    stream = convert._encoded([(i, str(i)) for i in range(4000)], workers=2)
    next(stream)
    time.sleep(3)  # an unbounded pool encodes all 4000 in far less
    assert source.loads.value <= 1000
    stream.close()


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_shards_follow_the_umask_and_stale_temp_files_go(tmp_path, umask, mode):
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".shard-000000.tar.tmp99999999"
    stale.write_bytes(b"left by a killed run")
    cmd = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--no-progress", "--source", "digits",
           "--resolution", "8", "--max-samples", "1000", "--workers", "1", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(umask))
    assert r.returncode == 0, r.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == \
        {"shard-000000.tar": mode, "shard-000001.tar": mode, "shard-000000.tar.idx": mode,
         "shard-000001.tar.idx": mode, "index.json": mode}


def _lsun_without_data(tmp_path) -> list[str]:
    (tmp_path / "x_lmdb").mkdir()
    return ["--source", "lsun", "--input", str(tmp_path / "x_lmdb")]


def _empty_folder(tmp_path) -> list[str]:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    return ["--source", "folder", "--input", str(tmp_path / "empty")]


@pytest.mark.parametrize("case, expected", [
    (lambda t: ["--source", "digits", "--max-samples", "0"], "--max-samples"),
    (lambda t: ["--source", "digits", "--max-bytes", "0"], "--max-bytes"),
    (lambda t: ["--source", "digits", "--workers", "-1"], "--workers"),
    (_empty_folder, "no images"),
    (lambda t: ["--source", "folder", "--input", str(t / "missing")], "missing"),
    (lambda t: ["--source", "folder"], "--input"),
    (lambda t: ["--source", "cifar10", "--input", str(t)], "data_batch"),
    (_lsun_without_data, "data.mdb"),
])
def test_bad_input_is_one_line(tmp_path, case, expected):
    r = make_shards(*case(tmp_path), "--out", str(tmp_path / "out"))
    err = r.stderr.strip()
    assert r.returncode != 0 and "\n" not in err and err.startswith("error:") and expected in err, err


def test_symlinks_out_of_the_input_folder_are_refused(tmp_path):
    unique_image_folder(tmp_path / "imgs", 4)
    Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    (tmp_path / "imgs" / "inside.png").symlink_to(tmp_path / "imgs" / "a" / "img0.png")
    args = ["--source", "folder", "--input", str(tmp_path / "imgs"), "--resolution", "8", "--workers", "1"]
    assert make_shards(*args, "--out", str(tmp_path / "ok")).returncode == 0  # a link inside is fine
    (tmp_path / "imgs" / "leak.png").symlink_to(tmp_path / "secret.png")
    r = make_shards(*args, "--out", str(tmp_path / "out"))
    err = r.stderr.strip()
    assert r.returncode != 0 and "\n" not in err and "leak.png" in err and "outside" in err, err
    assert not (tmp_path / "out" / "index.json").exists()


def test_help_says_cifar10_input_is_read_safely():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "pickle" in r.stdout and "numpy arrays only" in r.stdout


def test_rerun_on_other_images_with_the_same_folder_name_rewrites_every_shard(tmp_path):
    """Resume is keyed on the content (ids and sizes), not on the input folder's name."""
    unique_image_folder(tmp_path / "v1" / "imgs", 12)
    unique_image_folder(tmp_path / "v2" / "imgs", 20)
    out = tmp_path / "out"
    for version in ("v1", "v2"):
        r = make_shards("--source", "folder", "--input", str(tmp_path / version / "imgs"), "--out", str(out),
                        "--resolution", "8", "--max-samples", "4", "--workers", "1")
        assert r.returncode == 0, r.stderr
    assert "keeping" not in r.stderr, r.stderr
    ids = [sid for _, sid, _ in webdataset_samples(str(out))]
    assert sorted(ids) == sorted(f"{'ab'[i % 2]}/img{i}.png" for i in range(20))


def test_rerun_after_an_image_changed_size_rewrites_from_scratch(tmp_path):
    unique_image_folder(tmp_path / "imgs", 8)
    args = ["--source", "folder", "--input", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
            "--resolution", "8", "--max-samples", "4", "--workers", "1"]
    assert make_shards(*args).returncode == 0
    assert "keeping 2 verified shards" in make_shards(*args).stderr  # unchanged: kept
    Image.new("RGB", (16, 16), "white").save(tmp_path / "imgs" / "a" / "img0.png")
    r = make_shards(*args)
    assert r.returncode == 0 and "keeping" not in r.stderr, r.stderr


@pytest.mark.parametrize("resolution", [["--resolution", "8"], []], ids=["resized", "native size"])
def test_an_input_image_far_larger_than_the_shards_is_skipped_counted_and_bounded(tmp_path, resolution):
    """A 285 KB PNG claiming 9500² pixels (a decompression bomb) is not decoded: skipped with a
    warning naming it and its size, counted in index.json, and bounded by --max-skip-fraction."""
    unique_image_folder(tmp_path / "imgs", 39)
    (tmp_path / "imgs" / "z" / "bomb.png").parent.mkdir()
    (tmp_path / "imgs" / "z" / "bomb.png").write_bytes(huge_png(9500))
    args = ["--source", "folder", "--input", str(tmp_path / "imgs"), "--workers", "1", *resolution]
    r = make_shards(*args, "--out", str(tmp_path / "out"), "--max-skip-fraction", "0.05")
    assert r.returncode == 0, r.stderr[-2000:]
    warned = [line for line in r.stderr.splitlines() if "z/bomb.png" in line]
    assert warned == ["WARNING skipping record z/bomb.png: a 9500x9500 image, over the 1024-pixel side "
                      "decoded for resolution 8"], r.stderr[-2000:]
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == 39 and index["skipped"] == 1 and index["resolution"] == 8
    r = make_shards(*args, "--out", str(tmp_path / "strict"))  # the default 0.01: 1 of 40 is too many
    err = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and err.startswith("error: 1 undecodable records of 40") and "z/bomb.png" in err, err

"""A malformed index.json or LSUN database is one line naming the file and the key."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_helpers import write_noise_shards
from ddpm_dist.data.fs import DataConfigError
from ddpm_dist.data.shards import read_index

ROOT = Path(__file__).resolve().parents[1]


def _without(key):
    def edit(index):
        del index["shards"][1][key]
    return edit


def _set_shard(key, value):
    def edit(index):
        index["shards"][1][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (_without("sha256"), "shard 1 (shard-000001.tar): no 'sha256'"),
    (_without("samples"), "shard 1 (shard-000001.tar): no 'samples'"),
    (_set_shard("samples", "12k"), "shard 1 (shard-000001.tar): 'samples' must be a whole number 0 or more, got '12k'"),
    (_set_shard("samples", -3), "shard 1 (shard-000001.tar): 'samples' must be a whole number 0 or more, got -3"),
    (_set_shard("sha256", "abc"), "shard 1 (shard-000001.tar): 'sha256' must be 64 hex digits, got 'abc'"),
    (lambda index: index.pop("resolution"), "no 'resolution'"),
    (lambda index: index.update(resolution="big"), "'resolution' must be a positive whole number, got 'big'"),
    (lambda index: index.update(shards={"a": 1}), "'shards' must be a list of shards"),
    (lambda index: index["shards"].__setitem__(0, "shard-000000.tar"), "shard 0: expected a mapping"),
])
def test_a_malformed_index_is_one_line_naming_the_file_and_the_key(tmp_path, edit, message):
    out = write_noise_shards(tmp_path / "shards", n=30)
    path = Path(out) / "index.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))
    with pytest.raises(DataConfigError) as info:
        read_index(out)
    text = str(info.value)
    assert "\n" not in text and text.startswith(f"{path}: ") and message in text, text


def test_an_index_that_is_not_a_mapping_is_one_line(tmp_path):
    out = write_noise_shards(tmp_path / "shards", n=30)
    (Path(out) / "index.json").write_text("[1, 2]")
    with pytest.raises(DataConfigError, match=r"index.json: expected a mapping"):
        read_index(out)


def test_a_data_mdb_that_is_not_lmdb_is_one_line(tmp_path):
    folder = tmp_path / "church_lmdb"
    folder.mkdir()
    (folder / "data.mdb").write_bytes(b"this is not an lmdb database" * 100)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", "lsun", "--input",
                        str(folder), "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    err = r.stderr.strip()
    assert r.returncode != 0 and "\n" not in err, err
    assert err.startswith(f"error: {folder / 'data.mdb'}: not an LMDB database"), err


def _lsun(folder: Path, good: int, bad: int) -> None:
    """An LSUN-style lmdb: hex ids → JPEG bytes, `bad` of them not an image at all."""
    import io
    import lmdb
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    with lmdb.open(str(folder), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for i in range(good + bad):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "JPEG")
            txn.put(f"{i:040x}".encode(), buf.getvalue() if i >= bad else b"\xff\xd8 cut short")


def _convert(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "make_shards.py"), "--source", "lsun", "--input",
                           str(folder), "--out", str(out), "--resolution", "8", "--max-samples", "10",
                           "--workers", "1", "--no-progress", *extra], capture_output=True, text=True, timeout=180)


def test_undecodable_lsun_records_are_skipped_counted_and_bounded(tmp_path):
    _lsun(tmp_path / "few_lmdb", good=39, bad=1)
    r = _convert(tmp_path / "few_lmdb", tmp_path / "few", "--max-skip-fraction", "0.05")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"skipping record {0:040x}: not a decodable image" in r.stderr
    index = json.loads((tmp_path / "few" / "index.json").read_text())
    assert index["total"] == 39 and index["skipped"] == 1

    _lsun(tmp_path / "many_lmdb", good=36, bad=4)
    r = _convert(tmp_path / "many_lmdb", tmp_path / "many", "--max-skip-fraction", "0.05")
    err = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and err.startswith("error: ") and "undecodable records" in err, r.stderr[-2000:]
    assert f"{3:040x}" in err or f"{0:040x}" in err

"""The FID Inception network: published layout, strict loading of a weights file, the CLIs.

The real weights (pt_inception-2015-12-05-6726825d.pth, ~92 MB) are not fetched in tests:
a random-weights network saved the same way (a plain state dict .pth) goes through the
same loading path. 299×299 inference is slow on CPU, so each test runs a handful of images.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_dist.metrics.inception import (
    WEIGHTS_FILE, FIDInceptionV3, _tf_avg_pool, load_inception, resolve_weights)

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def _random_inception(seed=0):
    """Random weights scaled (He init) so that features are O(1), not vanishing."""
    torch.manual_seed(seed)
    model = FIDInceptionV3()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.eval()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random-weights network saved as pytorch-fid's file is: a plain state dict."""
    path = tmp_path_factory.mktemp("weights") / WEIGHTS_FILE
    torch.save(dict(_random_inception().state_dict()), path)
    return path


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_state_dict_layout_matches_the_published_weights_file():
    """tests/data/pt_inception_2015_12_05_keys.json lists key → shape of the published file.

    It was transcribed from the model that pytorch-fid loads the file into (its
    `fid_inception_v3()`: torchvision's Inception3 with num_classes=1008, aux_logits=False
    and the FIDInceptionA/C/E_1/E_2 blocks, which keep torchvision's parameter shapes),
    independently of ddpm_dist's code. BatchNorm's num_batches_tracked counters are left
    out: strict loading accepts a file with or without them (see the next test).
    """
    expected = {k: list(v) for k, v in json.loads((DATA / "pt_inception_2015_12_05_keys.json").read_text()).items()}
    state = FIDInceptionV3().state_dict()
    got = {k: list(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert got == expected
    # torchvision documents 27,161,264 parameters for Inception3 (1000 classes, AuxLogits);
    # less AuxLogits (3,326,696) plus 8 more classes (8 × 2049) gives the FID network's count.
    assert sum(p.numel() for p in FIDInceptionV3().parameters()) == 27_161_264 - 3_326_696 + 8 * 2049


def test_a_saved_random_weights_file_loads_strictly_and_gives_2048_features(weights_file, tmp_path):
    model = load_inception(weights_file)
    reference = _random_inception()
    images = torch.from_numpy(_images(2)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        features, logits = model(images)
        expected, _ = reference(images)
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.equal(features, expected) and features.std() > 1e-3
    # A file without BatchNorm's num_batches_tracked counters (saved before PyTorch 0.4.1)
    # loads strictly too.
    state = torch.load(weights_file, weights_only=True)
    old_style = tmp_path / "old.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, old_style)
    assert load_inception(old_style).state_dict()["fc.weight"].equal(state["fc.weight"])


def test_a_wrong_weights_file_is_a_clear_error(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a pytorch-fid Inception state dict"):
        load_inception(path)


def test_missing_weights_offline_name_the_file_and_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        resolve_weights(None, allow_download=False)
    message = str(err.value)
    assert WEIGHTS_FILE in message and str(tmp_path) in message and "\n" not in message
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_weights(tmp_path / "nope.pth")


def test_pools_ignore_padding_and_only_the_last_block_max_pools():
    # TF's average pool divides by the real neighbours: a constant map stays constant.
    x = torch.full((1, 2, 5, 5), 3.0)
    assert torch.allclose(_tf_avg_pool(x), x)
    model = FIDInceptionV3()
    assert model.Mixed_7c.max_pool and not model.Mixed_7b.max_pool


def _tool(name):
    """A tools/ script as a module, so its main(argv) runs in this process (no restart)."""
    spec = importlib.util.spec_from_file_location(f"tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _tool_error(name, *args) -> str:
    with pytest.raises(SystemExit) as exited:
        _tool(name)([str(a) for a in args])
    assert isinstance(exited.value.code, str), exited.value.code  # a message, not a bare code
    return exited.value.code


@pytest.mark.slow  # ~35 s: scipy's sqrtm of a 2048×2048 matrix on one core
def test_fid_tools_end_to_end_on_a_folder_and_a_samples_npz(weights_file, tmp_path, capsys):
    images = _images(3, seed=1)
    (tmp_path / "folder" / "000000").mkdir(parents=True)  # fid_sample.py's subfolders
    for i, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / "folder" / "000000" / f"{i:06d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=images)
    common = ["--inception-weights", weights_file, "--batch-size", "3", "--num-workers", "0"]
    _tool("fid_stats")([str(a) for a in (tmp_path / "folder", "--out", tmp_path / "ref.npz", *common)])
    capsys.readouterr()
    _tool("fid")([str(a) for a in (tmp_path / "ref.npz", tmp_path / "samples.npz", *common)])
    out = capsys.readouterr().out
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        tolerance = 1e-3 * np.trace(ref["sigma"])
    assert out.startswith("FID: ") and abs(float(out.removeprefix("FID: "))) < tolerance  # same images


def test_fid_tool_runs_as_a_script_and_its_errors_are_one_line(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros(3))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2), sigma=np.eye(2))
    same = subprocess.run([sys.executable, ROOT / "tools/fid.py", tmp_path / "stats.npz", tmp_path / "stats.npz"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert same.returncode == 0 and same.stdout == "FID: 0.0\n", same.stderr
    for args, expected in [(("bad.npz", "stats.npz"), "arr_0"), (("missing", "stats.npz"), "no such file")]:
        message = _tool_error("fid", *(tmp_path / a for a in args))
        assert expected in message and "\n" not in message
    np.savez(tmp_path / "samples.npz", arr_0=_images(3))
    message = _tool_error("fid_stats", tmp_path / "samples.npz", "--out", tmp_path / "x.npz",
                          "--inception-weights", tmp_path / "missing.pth")
    assert "missing.pth" in message and "not found" in message

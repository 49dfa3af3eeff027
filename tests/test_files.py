"""The one atomic writer: complete-or-absent files, created exclusively under unpredictable temp
names (a planted symlink is never followed), with the user's umask."""
from __future__ import annotations

import os

import pytest

from ddpm_dist.utils.files import atomic_path, atomic_write, is_temp_file


def test_temp_names_are_unpredictable_and_recognised(tmp_path):
    names = []
    for _ in range(2):
        with atomic_path(tmp_path / "a.json") as tmp:
            names.append(tmp.name)
            assert tmp.exists() and is_temp_file(tmp)  # created before the writer opens it
            tmp.write_text("{}")
    assert names[0] != names[1] and str(os.getpid()) in names[0]


def test_a_symlink_planted_at_the_old_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / f".a.json.tmp{os.getpid()}").symlink_to(victim)
    atomic_write(tmp_path / "a.json", "new")
    assert victim.read_text() == "keep me" and (tmp_path / "a.json").read_text() == "new"


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644), (0o002, 0o664)])
def test_files_get_the_users_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == mode

"""Files written whole or not at all, with the mode a plain open() gives; what a config key leaves out."""

import os

import pytest

from safetransfer.common import atomic
from safetransfer.common.atomic import atomic_write_text
from safetransfer.common.errors import StorageError


def test_a_crash_before_the_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "table.csv"
    atomic_write_text(path, "old,complete\n")

    def crash(*args):
        raise OSError("disk gone")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(StorageError, match=r"writing .*table.csv failed \(disk gone\); the earlier file is kept"):
        atomic_write_text(path, "new,half")
    assert path.read_text() == "old,complete\n"
    assert os.listdir(tmp_path) == ["table.csv"]  # no temporary file left behind


def test_config_key_ignores_seeds_and_runtime(compose_cfg):
    from safetransfer.common.fingerprints import config_key

    base = config_key(compose_cfg())
    assert config_key(compose_cfg("seeds=[0]", "runtime.num_workers=1", "runtime.device=cpu")) == base
    assert config_key(compose_cfg("logger=tensorboard", "runtime.checkpoint_every=7", "launcher=gpus")) == base
    assert config_key(compose_cfg("optim.optimizer.lr=0.02")) != base
    assert config_key(compose_cfg("target.sampling_rate=50")) != base


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_files_get_the_mode_a_plain_open_gives(tmp_path, umask):
    """mkstemp creates 0600 whatever the umask; results on a shared disk must be readable as
    the umask allows (metrics.json, tables, job.json and checkpoints go through this)."""
    from safetransfer.common.atomic import atomic_torch_save, atomic_write_json

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as handle:
            handle.write("x")
        atomic_write_json(tmp_path / "metrics.json", {"top1": 1.0})
        atomic_torch_save({"w": 1}, tmp_path / "checkpoint.pt")
    finally:
        os.umask(old)
    expected = (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    for name in ("metrics.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == expected, name

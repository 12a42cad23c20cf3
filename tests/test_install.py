"""The configs are found from an editable install and from a regular `pip install .`,
whatever the working directory."""

import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import safetransfer

ROOT = Path(__file__).resolve().parent.parent


def _show_demo_config(cwd: Path, env: dict) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "safetransfer.commands.train", "experiment=demo", "--cfg", "job"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.e2e
def test_editable_install_reads_the_repositorys_conf(tmp_path):
    if Path(safetransfer.__file__).resolve().parent != ROOT / "safetransfer":
        pytest.skip("the suite runs against a regular install; the other test covers it")
    assert Path(str(resources.files("safetransfer.conf"))).resolve() == ROOT / "conf"
    shown = _show_demo_config(tmp_path, dict(os.environ))
    assert "sampling_rate: 30" in shown and "name: demo" in shown


@pytest.mark.e2e
def test_regular_install_ships_the_conf_tree(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, source / part)
    for part in ("conf", "safetransfer"):
        shutil.copytree(ROOT / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    shipped = {p.relative_to(site / "safetransfer" / "conf") for p in (site / "safetransfer" / "conf").rglob("*.yaml")}
    assert shipped == {p.relative_to(ROOT / "conf") for p in (ROOT / "conf").rglob("*.yaml")}
    published = site / "safetransfer" / "reporting" / "published.csv"  # the papers' values travel with the package
    assert published.read_text() == (ROOT / "safetransfer" / "reporting" / "published.csv").read_text()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import safetransfer; print(safetransfer.__file__)"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert Path(where.stdout.strip()).resolve().is_relative_to(site.resolve())
    shown = _show_demo_config(elsewhere, env)
    assert "sampling_rate: 30" in shown and "name: demo" in shown


def test_every_folder_of_the_package_is_listed_for_installation():
    """pyproject.toml lists the packages by hand (conf/ is mapped into the package): a folder
    left out would be missing from a regular install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "safetransfer").rglob("__init__.py")}
    assert folders and folders <= listed, sorted(folders - listed)

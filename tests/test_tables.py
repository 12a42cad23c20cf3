"""Paper-layout tables from finished seeds, checked against NumPy."""

import json
import os
import time

import numpy as np
from omegaconf import OmegaConf

from safetransfer.tables import collect, main, paper_layout


def write_seed(directory, cfg, seed, top1, age=0.0):
    path = directory / f"seed_{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seed": seed, "top1": top1, "config": OmegaConf.to_container(cfg, resolve=True)}))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def test_cells_are_mean_std_and_count_of_the_seeds_found(compose_cfg, tmp_path):
    fine_tuning = compose_cfg("target.sampling_rate=30")
    dtnh = compose_cfg("target.sampling_rate=30", "regularizer=l2sp", "direction=dtnh")
    full = compose_cfg("target.sampling_rate=100")
    for seed, top1 in enumerate([70.0, 72.5, 71.0]):
        write_seed(tmp_path / "sweep" / "0", fine_tuning, seed, top1)
    write_seed(tmp_path / "sweep" / "1", dtnh, 0, 75.0)
    write_seed(tmp_path / "sweep" / "1", dtnh, 1, 77.0)
    write_seed(tmp_path / "old" / "1", dtnh, 1, 10.0, age=3600)  # an older copy of the same seed: ignored
    write_seed(tmp_path / "sweep" / "2", full, 0, 80.0)

    seeds = collect([tmp_path / "old", tmp_path / "sweep"])
    assert len(seeds) == 6
    table = paper_layout(seeds, methods=["Fine-tuning", "L2-SP", "DTNH (L2-SP)"], targets=["demo", "cub200"])
    values = [70.0, 72.5, 71.0]
    assert table.loc[("demo", 30.0), "Fine-tuning"] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)"
    assert table.loc[("demo", 30.0), "DTNH (L2-SP)"] == f"76.00 ± {np.std([75.0, 77.0], ddof=1):.2f} (2)"
    assert table.loc[("demo", 100.0), "Fine-tuning"] == "80.00 (1)"
    assert table.loc[("demo", 100.0), "DTNH (L2-SP)"] == "missing"
    assert (table.loc["cub200"] == "missing").all().all()  # a target with no seed keeps its rows
    assert list(table.columns) == ["Fine-tuning", "L2-SP", "DTNH (L2-SP)"]


def test_command_writes_markdown_and_csv(compose_cfg, tmp_path, capsys):
    write_seed(tmp_path / "run", compose_cfg(), 0, 66.0)
    main([str(tmp_path / "run"), "--name", "mine", "--results", str(tmp_path / "results")])
    markdown = (tmp_path / "results" / "mine.md").read_text()
    assert "66.00 (1)" in markdown and "Fine-tuning" in markdown
    assert "66.00 (1)" in (tmp_path / "results" / "mine.csv").read_text()
    assert markdown == capsys.readouterr().out

"""The table command: presets against the papers' protocols, the plan, and the two
stages (search on validation, then the chosen setting with five seeds) end to end."""

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY
from safetransfer.commands.reproduce import benchmark_figures, plan, precision_note
from safetransfer.common.errors import ConfigError
from safetransfer.reporting.search import apply_chosen
from safetransfer.reporting.tables import published_values


def test_dtnh_presets_follow_the_papers_protocol(compose_cfg):
    for table, source in [("dtnh_table2", "imagenet"), ("dtnh_table3", "places365"), ("dtnh_table4", "stanford_dogs")]:
        for target, iterations in [("caltech256_30", 8000), ("mit_indoor67", 8000), ("cifar10", 20000)]:
            cfg = compose_cfg(f"experiment={table}", f"target={target}", "method=dtnh_l2sp")
            assert (cfg.backbone.name, cfg.source.name) == ("resnet18", source)
            assert cfg.train.batch_size == 48 and cfg.train.iterations == iterations
            assert cfg.optim.optimizer.lr == 0.01 and cfg.optim.optimizer.momentum == 0.9
            assert list(cfg.optim.scheduler.milestones) == [6000]  # "divided by 10 after 6000 iterations"
            assert (cfg.data.resize, cfg.data.crop, cfg.data.train_crop, cfg.data.test_crops) == (
                256,
                224,
                "random_crop",
                1,
            )
            assert cfg.search.val_fraction == 0.2 and cfg.seeds == [0, 1, 2, 3, 4]
        grids = cfg.search.grids
        assert sorted(grids) == ["dtnh_knowdist", "dtnh_l2sp", "knowdist", "l2sp"]
        assert list(grids.l2sp) == [
            "regularizer.terms.l2sp.alpha=0.001,0.01,0.1,1",
            "regularizer.terms.l2sp.decay=0.5,0.9,1.0",
        ]
    override = compose_cfg("experiment=dtnh_table2", "target=cifar10", "schedule.cifar10.lr_drop=15000")
    assert list(override.optim.scheduler.milestones) == [15000]


def test_bss_preset_follows_the_papers_protocol(compose_cfg):
    cfg = compose_cfg("experiment=bss_table2", "target=cub200", "target.sampling_rate=15", "method=l2_bss")
    assert (cfg.backbone.name, cfg.source.name) == ("resnet50", "imagenet")
    assert (
        cfg.train.batch_size == 48 and cfg.train.iterations == 9000 and list(cfg.optim.scheduler.milestones) == [6000]
    )
    lr, head = cfg.optim.optimizer.lr, cfg.optim.optimizer.lr * cfg.optim.head_lr_mult
    assert (lr, head) == (0.001, 0.01) and cfg.optim.optimizer.momentum == 0.95
    assert (cfg.data.train_crop, cfg.data.test_crops, cfg.data.resize, cfg.data.crop) == (
        "random_resized_crop",
        10,
        256,
        224,
    )
    assert cfg.regularizer.terms.bss.eta == 0.001 and cfg.regularizer.terms.bss.k == 1
    assert cfg.regularizer.terms.l2.alpha == 5e-4
    assert cfg.target.sample_list == "bss"
    assert compose_cfg("experiment=bss_table2", "target=stanford_cars").target.sample_list == "bss"
    assert (
        compose_cfg("experiment=bss_table2", "target=stanford_cars", "+bss_lists.stanford_cars=null").target.sample_list
        is None
    )
    assert list(cfg.search.grids.l2_bss) == ["optim.optimizer.lr=0.001,0.0001"]  # head 0.01 or 0.001
    assert sorted(cfg.search.grids) == ["delta", "delta_bss", "l2", "l2_bss", "l2sp", "l2sp_bss"]


@pytest.mark.e2e  # every cell of a table composed: 4 s
def test_plan_lists_every_job_of_both_stages(tmp_path):
    jobs, _ = plan("dtnh_table2", [])
    search = [j for j in jobs if j.stage == "search"]
    final = [j for j in jobs if j.stage == "final"]
    assert len(final) == 25 and len(search) == 4 * 5 * 12  # 4 searched methods x 5 targets x 12 settings
    assert {j.iterations for j in final if j.cell["target"] == "cifar10"} == {20000}
    assert all(j.seeds == 1 for j in search) and all(j.seeds == 5 for j in final)
    only = plan("dtnh_table2", ["target=flowers102", "method=l2sp,fine_tuning"])[0]
    assert sum(j.stage == "final" for j in only) == 2 and sum(j.stage == "search" for j in only) == 12

    # the figures as scripts/benchmark.py and scripts/benchmark_cell.py write them (their own writers)
    benchmark, cell = scripts()
    benchmarks = tmp_path / "BENCHMARKS.json"
    run = argparse.Namespace(size=64, batch=16, precision="fp32")
    results = [
        benchmark.Result("resnet18 l2sp sum", 90.0, 100.0),
        benchmark.Result("resnet18 reference step", 1.0, 5.0),
    ]
    benchmark.write_figures(benchmarks, "cpu", benchmark.step_figures(run, results))
    from safetransfer.commands.reproduce import job_hours

    figures = benchmark_figures(benchmarks)
    assert (
        figures.kind == "cpu"
        and figures.ms_per_step == {("resnet18", "l2sp", "sum"): 100.0}
        and figures.precision == "fp32"
    )
    job = next(j for j in only if j.stage == "final" and j.cell["method"] == "l2sp")
    # 100 ms at 64 px, batch 16 -> x (224/64)^2 x 3 at 224 px, batch 48; 5 seeds x 8000 iterations
    assert job_hours(job, figures) == pytest.approx(0.1 * (224 / 64) ** 2 * 3 * 8000 * 5 / 3600)

    # a measured cell (scripts/benchmark_cell.py): its end-to-end seconds per seed and iteration over the
    # model-only step of its method scale every job of that backbone, by the way the seeds run
    gpu = argparse.Namespace(size=224, batch=48, precision="bf16")
    steps = [benchmark.Result("resnet18 l2sp sum", 90.0, 10.0), benchmark.Result("resnet18 l2sp dtnh", 90.0, 12.5)]
    benchmark.write_figures(benchmarks, "cuda", benchmark.step_figures(gpu, steps))
    records = [  # the fastest of each way of running the seeds counts: 5 seeds x 8000 iterations
        {"cell": "dtnh", "concurrent": False, "projected_s": 0.025 * 5 * 8000, "length": 8000},
        {"cell": "dtnh", "concurrent": False, "projected_s": 0.030 * 5 * 8000, "length": 8000},
        {"cell": "dtnh", "concurrent": True, "projected_s": 0.010 * 5 * 8000, "length": 8000},
    ]
    benchmark.write_figures(benchmarks, "cuda-cell", cell.cell_figures(records))
    figures = benchmark_figures(benchmarks)
    assert figures.kind == "cuda" and figures.precision == "bf16"  # the GPU's figures first; the CPU's are kept
    assert figures.cell_factors == {("resnet18", False): pytest.approx(2.0), ("resnet18", True): pytest.approx(0.8)}
    assert job_hours(job, figures) == pytest.approx(0.010 * 2.0 * 8000 * 5 / 3600)
    assert job_hours(job, figures, concurrent=True) == pytest.approx(0.010 * 0.8 * 8000 * 5 / 3600)
    searched = next(j for j in only if j.stage == "search")  # one seed: it runs alone even when seeds run concurrently
    assert job_hours(searched, figures, concurrent=True) == job_hours(searched, figures)
    assert job.precision == "fp32"
    assert "these hours assume bf16" in precision_note([job], figures)  # no fp32 step measured beside them

    # the Fine-tuning step measured in both precisions scales the bf16 rows to the job's fp32, and a cell
    # that trained in fp32 is taken over the fp32 model-only step (not counted twice)
    steps += [benchmark.Result("resnet18 Fine-tuning step (fp32)", 1.0, 13.0)]
    steps += [benchmark.Result("resnet18 Fine-tuning step (bf16)", 1.0, 10.0)]
    benchmark.write_figures(benchmarks, "cuda", benchmark.step_figures(gpu, steps))
    records[1]["precision"], records[0]["precision"], records[2]["precision"] = "fp32", "bf16", "fp32"
    records[1]["projected_s"] = 0.020 * 5 * 8000  # now the fastest sequential variant, in fp32
    benchmark.write_figures(benchmarks, "cuda-cell", cell.cell_figures(records))
    figures = benchmark_figures(benchmarks)
    assert figures.precision_scales[("resnet18", "fp32")] == pytest.approx(1.3)
    # the cell (resnet18 l2sp dtnh, 12.5 ms in bf16, so 16.25 ms in fp32) took 20 ms a seed and iteration in fp32
    assert figures.cell_factors[("resnet18", False)] == pytest.approx(20 / (12.5 * 1.3))
    # the job (l2sp sum): 10 ms bf16 x 1.3 = 13 ms fp32, x the fp32 cell's end-to-end factor
    assert job_hours(job, figures) == pytest.approx(0.013 * 20 / 16.25 * 8000 * 5 / 3600)
    note = precision_note([job], figures)
    assert "the jobs train in fp32" in note and "measured in bf16" in note and "resnet18 1.30x" in note
    bf16_job = dataclasses.replace(job, precision="bf16")
    assert job_hours(bf16_job, figures) == pytest.approx(0.010 * 20 / 16.25 * 8000 * 5 / 3600)
    assert "measured in it" in precision_note([bf16_job], figures)


def scripts():
    """scripts/benchmark.py and scripts/benchmark_cell.py as modules (they are run as files)."""
    import importlib

    folder = str(Path(__file__).resolve().parent.parent / "scripts")
    sys.path.insert(0, folder)
    try:
        return importlib.import_module("benchmark"), importlib.import_module("benchmark_cell")
    finally:
        sys.path.remove(folder)


def test_the_repositorys_figures_are_read_by_the_plan():
    figures = benchmark_figures(Path(__file__).resolve().parent.parent / "BENCHMARKS.json")
    assert figures is not None and figures.kind in ("cuda", "cpu") and figures.ms_per_step


def test_plan_command_names_a_cpu_projection(capsys):
    from safetransfer.commands.reproduce import main

    main(["bss_table2", "--plan", "target=cub200", "method=l2_bss"])
    out = capsys.readouterr().out
    assert "8 search jobs, 4 final jobs, 12 in all" in out  # 4 rates x (2 lr settings + 1 final)
    assert "CPU projection" in out or "measured on a GPU" in out
    assert "| optim.optimizer.lr=0.0001 | 1 x 9000 it" in out
    assert "| chosen on validation | 5 x 9000 it" in out


def test_plan_says_chosen_on_validation_only_for_methods_with_a_grid(capsys):
    from safetransfer.commands.reproduce import main

    main(["dtnh_table2", "--plan", "target=flowers102", "method=fine_tuning,l2sp"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("final")]
    assert len(lines) == 2
    assert "method=fine_tuning | the preset's values (no grid)" in "".join(lines)
    assert "method=l2sp | chosen on validation" in "".join(lines)


def test_a_stage_two_job_without_its_cell_refuses(compose_cfg, tmp_path):
    chosen = tmp_path / "chosen.json"
    chosen.write_text(
        json.dumps(
            {
                "table": "t",
                "searched": ["L2-SP"],
                "cells": {"resnet18|scratch|demo|100|L2-SP": {"values": {"regularizer.terms.l2sp.alpha": 0.5}}},
            }
        )
    )
    grid = '+search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.5,1"]'
    cfg = compose_cfg("regularizer=l2sp", f"search.chosen={chosen}", grid)
    apply_chosen(cfg, "L2-SP")
    assert cfg.regularizer.terms.l2sp.alpha == 0.5
    other = compose_cfg("regularizer=l2sp", f"search.chosen={chosen}", "target.sampling_rate=30", grid)
    with pytest.raises(ConfigError, match="has no setting for resnet18\\|scratch\\|demo\\|30\\|L2-SP"):
        apply_chosen(other, "L2-SP")
    plain = compose_cfg(f"search.chosen={chosen}", grid)
    apply_chosen(plain, "Fine-tuning")  # a method that was not searched keeps its values
    assert plain.regularizer.terms.l2.alpha == 1e-4


def test_a_chosen_file_sets_only_the_keys_its_search_declared(compose_cfg, tmp_path):
    """A chosen.json naming another key (here a `_target_`, which Hydra would import and call) is
    refused in one line before anything runs; the value never reaches the config."""
    chosen = tmp_path / "evil.json"
    values = {"regularizer.terms.l2sp.alpha": 0.5, "direction._target_": "faulthandler.dump_traceback"}
    cell = {"resnet18|scratch|demo|100|L2-SP": {"values": values}}
    chosen.write_text(json.dumps({"table": "t", "searched": ["L2-SP"], "cells": cell}))
    grid = '+search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.5,1"]'
    cfg = compose_cfg("regularizer=l2sp", f"search.chosen={chosen}", grid)
    with pytest.raises(ConfigError, match=r"sets direction._target_ for .* which no grid of search.grids declares"):
        apply_chosen(cfg, "L2-SP")
    assert "_target_" not in cfg.direction and cfg.regularizer.terms.l2sp.alpha != 0.5


@pytest.mark.e2e
def test_two_stages_end_to_end_and_a_rerun_trains_nothing(tmp_path):
    tiny = [o for o in TINY if not o.startswith("seeds")]
    arguments = [
        sys.executable,
        "-m",
        "safetransfer.commands.reproduce",
        "demo",
        "--dir",
        "tables",
        *tiny,
        "source=scratch",
        "method=l2sp",
        "target.sampling_rate=100",
        "seeds=[0,1,2,3,4]",
        "search.val_fraction=0.5",
        "search.seeds=[0,1]",
        '+search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.001,3"]',
    ]
    first = subprocess.run(arguments, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert first.returncode == 0, first.stderr[-3000:]

    # the choice, recomputed here from the search's own files: best mean validation top-1
    val = {}
    for path in (tmp_path / "tables" / "search").rglob("seed_*/metrics.json"):
        metrics = json.loads(path.read_text())
        assert metrics["config"]["target"]["val_fraction"] == 0.5 and "val_top1" in metrics
        alpha = metrics["config"]["regularizer"]["terms"]["l2sp"]["alpha"]
        val.setdefault(alpha, []).append(metrics["val_top1"])
    assert sorted(val) == [0.001, 3] and all(len(v) == 2 for v in val.values())
    top = max(sum(v) / 2 for v in val.values())
    best_ones = [a for a in val if sum(val[a]) / 2 == top]  # a tie (tiny runs) may leave two
    chosen = json.loads((tmp_path / "tables" / "chosen.json").read_text())
    assert chosen["searched"] == ["L2-SP"]
    entry = chosen["cells"]["resnet18|scratch|demo|100|L2-SP"]
    best = entry["values"]["regularizer.terms.l2sp.alpha"]
    assert best in best_ones and entry["val_top1"] == pytest.approx(top) and entry["settings_tried"] == 2

    finals = [json.loads(p.read_text()) for p in (tmp_path / "tables" / "final").rglob("seed_*/metrics.json")]
    assert len(finals) == 5  # five seeds, on the whole training split
    assert all(m["config"]["target"]["val_fraction"] == 0 and "val_top1" not in m for m in finals)
    assert {m["config"]["regularizer"]["terms"]["l2sp"]["alpha"] for m in finals} == {best}
    table = (tmp_path / "results" / "demo_paper.md").read_text()
    assert "(5)" in table and f"regularizer.terms.l2sp.alpha={best}" in table and "the centre crop" in table

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "tables").rglob("seed_*/metrics.json")}
    again = subprocess.run(arguments, cwd=tmp_path, capture_output=True, text=True, timeout=3600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "tables").rglob("seed_*/metrics.json")} == stamps
    assert "finished earlier" in again.stderr + again.stdout


@pytest.mark.parametrize("signum", [15, 2])
def test_a_stage_stopped_by_a_signal_stops_the_command_with_its_code_and_says_how_to_continue(
    monkeypatch, capsys, signum
):
    """SIGTERM in a stage's job exited 1 with "a stage ended with failed jobs ... fix them"."""
    import signal

    from safetransfer.commands import reproduce

    monkeypatch.setattr(reproduce, "run_train", lambda arguments: 128 + signum)
    with pytest.raises(SystemExit) as stop:
        reproduce.run_stage(["experiment=demo", "hydra.sweep.dir=tables/final"])
    assert stop.value.code == 128 + signum
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"stopped by {name} in the stage of tables/final; rerun the same command to continue" in err
    assert "failed jobs" not in err
    monkeypatch.setattr(reproduce, "run_train", lambda arguments: 1)  # a failed job is still a failure
    with pytest.raises(SystemExit, match="a stage ended with failed jobs"):
        reproduce.run_stage(["experiment=demo"])


def test_a_chosen_value_is_checked_like_one_from_the_command_line(compose_cfg, tmp_path):
    """run_job checks the config again when stage 2 set chosen values (apply_chosen says it did)."""
    from safetransfer.job.run import run_job

    chosen = tmp_path / "chosen.json"
    chosen.write_text(
        json.dumps(
            {
                "table": "t",
                "searched": ["L2-SP"],
                "cells": {"resnet18|scratch|demo|100|L2-SP": {"values": {"regularizer.terms.l2sp.alpha": -1}}},
            }
        )
    )
    grid = '+search.grids.l2sp=["regularizer.terms.l2sp.alpha=0.5,1"]'
    assert apply_chosen(compose_cfg(f"search.chosen={chosen}", grid), "Fine-tuning") == ""
    assert apply_chosen(compose_cfg("regularizer=l2sp", f"search.chosen={chosen}", grid), "L2-SP") == (
        "regularizer.terms.l2sp.alpha=-1"
    )
    cfg = compose_cfg("regularizer=l2sp", f"search.chosen={chosen}", grid, f"results.dir={tmp_path / 'results'}")
    with pytest.raises(ConfigError, match="regularizer.terms.l2sp.alpha=-1 must be a finite number >= 0"):
        run_job(cfg, tmp_path / "job")
    assert not (tmp_path / "job").exists()  # refused before any training


def test_a_table_without_its_data_is_refused_before_any_job(tmp_path, monkeypatch, capsys):
    """No data on disk: one error line after the list of what is missing, and no job started
    (it started 60 jobs that all failed, with about 100 kB of repeated output)."""
    from safetransfer.commands import reproduce

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(SystemExit) as stop:
        reproduce.main(
            ["dtnh_table2", "--dir", "tables", f"paths.data_root={tmp_path / 'empty'}", "target=caltech256_30"]
        )
    assert "are not ready (listed above); nothing was trained" in str(stop.value)
    assert "safetransfer-reproduce dtnh_table2 --fetch" in str(stop.value)
    assert not (tmp_path / "tables").exists()
    printed = capsys.readouterr().out
    assert "target=caltech256_30" in printed and "source=imagenet" in printed


def test_table_iv_makes_its_stanford_dogs_source_itself(tmp_path, monkeypatch, capsys):
    """`safetransfer-reproduce dtnh_table4` alone: the missing Stanford Dogs source does not stop
    it (its own inputs are checked), it is made first by a pretraining run given only the table's
    where-and-how overrides (not its target), and the stages follow."""
    from safetransfer.commands import reproduce, train
    from safetransfer.job.fetch import Outcome

    monkeypatch.chdir(tmp_path)
    cell = ["target=flowers102", "method=fine_tuning", f"paths.cache_dir={tmp_path / 'cache'}", "runtime.device=cpu"]
    made = reproduce.sources_to_make("dtnh_table4", cell)
    path = tmp_path / "cache" / "sources" / "resnet18_stanford_dogs.pt"
    assert made == [("stanford_dogs", "resnet18", path, "source=stanford_dogs backbone=resnet18")]

    def data(table, overrides, download):  # the source cannot be downloaded; the rest is there
        return [
            Outcome("manual", "source=stanford_dogs backbone=resnet18", "create it with ..."),
            Outcome("present", "target=flowers102", "data"),
        ]

    calls = []

    def pretraining():
        calls.append(list(sys.argv[1:]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"made")

    monkeypatch.setattr(reproduce, "table_data", data)
    monkeypatch.setattr(train, "main", pretraining)
    monkeypatch.setattr(reproduce, "run_stage", lambda arguments: calls.append(["stage", *arguments]))
    monkeypatch.setattr(reproduce, "choose", lambda seeds, grids: {})
    monkeypatch.setattr("safetransfer.reporting.store.records_under", lambda directories: [])
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "dtnh_table4_paper.md").write_text("table\n")  # what the final stage's jobs write
    reproduce.main(["dtnh_table4", "--dir", "tables", *cell])
    first = calls[0]
    assert first[:4] == [
        "experiment=pretrain_source",
        "target=stanford_dogs",
        "backbone=resnet18",
        f"pretrain.save_to={path}",
    ]
    assert f"paths.cache_dir={tmp_path / 'cache'}" in first and "runtime.device=cpu" in first
    assert "target=flowers102" not in first and "method=fine_tuning" not in first
    assert first[-1] == f"hydra.run.dir={Path('tables') / 'sources' / 'resnet18_stanford_dogs'}"
    assert [c[0] for c in calls[1:]] == ["stage"] * (len(calls) - 1) and len(calls) >= 2


@pytest.mark.e2e  # composes the 144 cells' jobs (about 20 s)
def test_the_tllib_table_plans_every_cell_and_each_job_takes_tllibs_protocol(compose_cfg):
    """experiment=tllib_table: 3 targets x 4 rates x 12 methods, each searched over two lrs on validation;
    a composed job carries TLlib's scripts' settings (tllib_benchmarks.md), and DELTA, which has no l2 term,
    is left without the weight decay the other methods take as Omega."""
    from safetransfer.job.run import resolved

    jobs, _ = plan("tllib_table", [])
    final = [j for j in jobs if j.stage == "final"]
    assert len(final) == 144 and sum(j.stage == "search" for j in jobs) == 288
    assert {j.cell["method"] for j in final} == {
        "l2", "lwf", "dtnh_lwf", "l2_bss", "dtnh_l2_bss", "delta", "dtnh_delta", "stochnorm", "co_tuning",
        "dtnh_co_tuning", "bi_tuning", "dtnh_bi_tuning",
    }  # fmt: skip
    assert {j.cell["target"] for j in final} == {"cub200", "stanford_cars", "fgvc_aircraft"}
    cfg, _ = resolved(compose_cfg("experiment=tllib_table", "target=cub200", "method=dtnh_co_tuning", "hydra.mode=RUN"))
    assert (cfg.train.iterations, list(cfg.optim.scheduler.milestones), cfg.train.batch_size) == (10000, [6000], 48)
    assert cfg.optim.optimizer.nesterov is True and cfg.optim.optimizer.lr * cfg.optim.head_lr_mult == 0.01
    assert cfg.regularizer.terms.l2.alpha == 5e-4 and cfg.regularizer.terms.co_tuning.relationship == "direct"
    assert cfg.target.sample_list == "bss" and cfg.results.published == "tllib_table"
    delta, _ = resolved(compose_cfg("experiment=tllib_table", "target=cub200", "method=delta", "hydra.mode=RUN"))
    assert set(delta.regularizer.terms) == {"delta", "head"}
    assert delta.regularizer.terms.delta.convention == "released_code"
    published = published_values("tllib_table")
    assert len(published) == 84 and set(published["method"]) >= {"L2", "L2+BSS", "LwF", "Co-Tuning", "StochNorm"}
    assert (
        float(published.query("target == 'stanford_cars' and sampling_rate == 50 and method == 'DELTA'").top1.iloc[0])
        == 79.6
    )

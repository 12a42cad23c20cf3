"""Paper-layout tables from finished seeds, checked against NumPy; the published values
beside each cell; the choice of a setting by validation accuracy, never by test."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from safetransfer.common.errors import ConfigError
from safetransfer.reporting.tables import assemble, collect, main, paper_layout, published_values, select


@pytest.fixture
def compose_cfg(compose_cfg):
    """The rows here are transfer runs, from the demo source unless a test names another (plain
    fine-tuning from the root config's source=scratch is the From scratch baseline). Only composed."""

    def _compose(*overrides):
        return compose_cfg(*(() if any(o.startswith("source=") for o in overrides) else ("source=demo",)), *overrides)

    return _compose


def write_seed(directory, cfg, seed, top1, age=0.0, val_top1=None):
    path = directory / f"seed_{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {"seed": seed, "top1": top1, "config": OmegaConf.to_container(cfg, resolve=True)}
    if val_top1 is not None:
        metrics["val_top1"] = val_top1
    path.write_text(json.dumps(metrics))
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
    table = paper_layout(
        assemble(select(seeds), methods=["Fine-tuning", "L2-SP", "DTNH (L2-SP)"], targets=["demo", "cub200"])
    )
    values = [70.0, 72.5, 71.0]
    assert table.loc[("demo", 30.0), "Fine-tuning"] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)"
    assert table.loc[("demo", 30.0), "DTNH (L2-SP)"] == f"76.00 ± {np.std([75.0, 77.0], ddof=1):.2f} (2)"
    assert table.loc[("demo", 100.0), "Fine-tuning"] == "80.00 (1)"
    assert table.loc[("demo", 100.0), "DTNH (L2-SP)"] == "missing"
    assert (table.loc["cub200"] == "missing").all().all()  # a target with no seed keeps its rows
    assert list(table.columns) == ["Fine-tuning", "L2-SP", "DTNH (L2-SP)"]


def test_published_values_and_differences_beside_each_cell(compose_cfg, tmp_path):
    published = tmp_path / "published.csv"
    published.write_text(
        "# a citation\ntable,target,sampling_rate,method,top1\n"
        "t,demo,30,Fine-tuning,70.5\nt,demo,30,L2-SP,\nt,demo,60,Fine-tuning,90.25\n"
        "other,demo,30,Fine-tuning,1.0\n"
    )
    for seed, top1 in enumerate([70.0, 73.0]):
        write_seed(tmp_path / "sweep" / "0", compose_cfg("target.sampling_rate=30"), seed, top1)
    write_seed(tmp_path / "sweep" / "1", compose_cfg("target.sampling_rate=30", "regularizer=l2sp"), 0, 60.0)

    reference = published_values("t", published)
    numbers = assemble(select(collect([tmp_path / "sweep"])), reference)
    assert list(numbers.index) == [("demo", 30.0), ("demo", 60.0)]  # the paper's rows, found or not
    assert numbers.loc[("demo", 30.0), ("Fine-tuning", "diff")] == pytest.approx(np.mean([70.0, 73.0]) - 70.5)
    assert np.isnan(numbers.loc[("demo", 30.0), ("L2-SP", "published")])  # not transcribed: no paper value
    text = paper_layout(numbers)
    assert text.loc[("demo", 30.0), "Fine-tuning"] == (
        f"71.50 ± {np.std([70.0, 73.0], ddof=1):.2f} (2) · paper 70.50 · Δ +1.00"
    )
    assert text.loc[("demo", 30.0), "L2-SP"] == "60.00 (1)"
    assert text.loc[("demo", 60.0), "Fine-tuning"] == "missing · paper 90.25"
    with pytest.raises(ConfigError, match="known: other, t"):
        published_values("nope", published)


def test_shipped_published_file_has_every_cell_of_the_four_tables():
    # the papers' tables: DTNH II-IV 4 paper rows x 5 methods (Caltech 256 shown as our two Caltech rows),
    # BSS Table 2: 5 targets x 4 rates x 6 methods
    for table, rows in [("dtnh_table2", 25), ("dtnh_table3", 25), ("dtnh_table4", 25), ("bss_table2", 120)]:
        frame = published_values(table)
        assert len(frame) == rows and not frame.duplicated(["target", "sampling_rate", "method"]).any()
        assert frame["top1"].notna().all() and frame["std"].notna().all()
        assert ((frame["top1"] > 0) & (frame["top1"] <= 100)).all() and ((frame["std"] > 0) & (frame["std"] < 1)).all()
    assert sorted(published_values("bss_table2")["sampling_rate"].unique()) == [15.0, 30.0, 50.0, 100.0]


@pytest.mark.parametrize(
    "table, target, rate, method, top1, std",
    [
        # typed from the papers' tables
        ("dtnh_table2", "mit_indoor67", 100, "DTNH (L2-SP)", 77.46, 0.29),  # Table II
        ("dtnh_table3", "caltech256_30", 100, "L2-SP", 66.99, 0.20),  # Table III, Caltech 256
        ("dtnh_table3", "caltech256_60", 100, "L2-SP", 66.99, 0.20),  # the same paper row
        ("dtnh_table3", "cifar10", 100, "KnowDist", 94.96, 0.05),
        ("dtnh_table4", "flowers102", 100, "DTNH (KnowDist)", 90.29, 0.34),  # Table IV
        ("bss_table2", "stanford_dogs", 15, "L2", 81.05, 0.18),  # Table 2, first cell
        ("bss_table2", "cub200", 30, "L2+BSS", 63.38, 0.29),
        ("bss_table2", "stanford_cars", 50, "DELTA+BSS", 77.58, 0.33),
        ("bss_table2", "oxford_pets", 100, "L2-SP+BSS", 92.41, 0.18),
        ("bss_table2", "fgvc_aircraft", 100, "DELTA+BSS", 80.85, 0.17),  # Table 2, last cell
    ],
)
def test_shipped_published_values_match_the_papers(table, target, rate, method, top1, std):
    frame = published_values(table).set_index(["target", "sampling_rate", "method"])
    assert frame.loc[(target, float(rate), method), "top1"] == pytest.approx(top1, abs=1e-9)
    assert frame.loc[(target, float(rate), method), "std"] == pytest.approx(std, abs=1e-9)


def test_difference_is_marked_inside_or_outside_the_combined_spread(compose_cfg, tmp_path):
    published = tmp_path / "published.csv"
    published.write_text(
        "table,target,sampling_rate,method,top1,std\n"
        "t,demo,100,Fine-tuning,70.00,0.30\nt,demo,100,L2-SP,60.00,0.30\n"
        "t,demo2,100,Fine-tuning,50.00,0.30\n"
    )
    for seed, top1 in enumerate([70.0, 70.8]):  # mean 70.4, sample std 0.5657: sqrt(0.32 + 0.09) = 0.640 >= 0.4
        write_seed(tmp_path / "sweep" / "0", compose_cfg(), seed, top1)
    for seed, top1 in enumerate([61.0, 61.4]):  # mean 61.2 - 60 = 1.2 > sqrt(0.08 + 0.09) = 0.412
        write_seed(tmp_path / "sweep" / "1", compose_cfg("regularizer=l2sp"), seed, top1)
    numbers = assemble(select(collect([tmp_path / "sweep"])), published_values("t", published))
    assert numbers.loc[("demo", 100.0), ("Fine-tuning", "within")] is True
    assert numbers.loc[("demo", 100.0), ("L2-SP", "within")] is False
    text = paper_layout(numbers)
    assert text.loc[("demo", 100.0), "Fine-tuning"] == "70.40 ± 0.57 (2) · paper 70.00 ± 0.30 · Δ +0.40 ✓"
    assert text.loc[("demo", 100.0), "L2-SP"] == "61.20 ± 0.28 (2) · paper 60.00 ± 0.30 · Δ +1.20 ✗"
    assert text.loc[("demo2", 100.0), "Fine-tuning"] == "missing · paper 50.00 ± 0.30"


def test_one_paper_row_for_both_caltech_splits_is_footnoted(compose_cfg, tmp_path):
    write_seed(tmp_path / "sweep" / "0", compose_cfg("source=imagenet", "target=caltech256_30"), 0, 80.0)
    main(
        [
            str(tmp_path / "sweep"),
            "--name",
            "t2",
            "--results",
            str(tmp_path / "results"),
            "--published",
            "dtnh_table2",
            "--methods",
            "Fine-tuning",
        ]
    )
    markdown = (tmp_path / "results" / "t2.md").read_text()
    assert "| caltech256_30 † |" in markdown and "| caltech256_60 † |" in markdown
    assert "80.00 (1) · paper 82.68 ± 0.20 · Δ -2.68" in markdown
    assert "missing · paper 82.68 ± 0.20" in markdown  # the same paper value beside the 60-image row
    assert "does not say whether it is the 30 or the 60 images per class split" in markdown
    csv = pd.read_csv(tmp_path / "results" / "t2.csv")
    assert csv["Fine-tuning published_std"].tolist()[:2] == [0.2, 0.2]


def test_selection_uses_validation_never_test(compose_cfg, tmp_path):
    # alpha=0.01 wins on test, alpha=0.1 on validation: the table must report alpha=0.1's test accuracy
    small = compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.01", "target.val_fraction=0.2")
    large = compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.1", "target.val_fraction=0.2")
    for seed in range(3):
        write_seed(tmp_path / "grid" / "0", small, seed, top1=90.0 + seed, val_top1=50.0)
        write_seed(tmp_path / "grid" / "1", large, seed, top1=60.0 + seed, val_top1=55.0 + seed)
    cells = select(collect([tmp_path / "grid"]))
    assert len(cells) == 1
    cell = cells.iloc[0]
    assert cell["mean"] == pytest.approx(61.0) and cell["val_mean"] == pytest.approx(56.0)
    assert cell["chosen"] == "regularizer.terms.l2sp.alpha=0.1" and cell["settings"] == 2

    main([str(tmp_path / "grid"), "--name", "grid", "--results", str(tmp_path / "results")])
    csv = pd.read_csv(tmp_path / "results" / "grid.csv")
    assert csv["L2-SP chosen"].tolist() == ["regularizer.terms.l2sp.alpha=0.1"]
    assert csv["L2-SP mean"].tolist() == [pytest.approx(61.0)]
    assert "regularizer.terms.l2sp.alpha=0.1 (of 2 settings)" in (tmp_path / "results" / "grid.md").read_text()


def test_selection_refuses_settings_without_validation(compose_cfg, tmp_path):
    write_seed(tmp_path / "grid" / "0", compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.01"), 0, 90.0)
    write_seed(tmp_path / "grid" / "1", compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.1"), 0, 60.0)
    with pytest.raises(ConfigError, match="target.val_fraction"):
        select(collect([tmp_path / "grid"]))


def test_command_writes_markdown_and_csv(compose_cfg, tmp_path, capsys):
    write_seed(tmp_path / "run", compose_cfg(), 0, 66.0)
    main([str(tmp_path / "run"), "--name", "mine", "--results", str(tmp_path / "results")])
    markdown = (tmp_path / "results" / "mine.md").read_text()
    assert "66.00 (1)" in markdown and "Fine-tuning" in markdown
    csv = pd.read_csv(tmp_path / "results" / "mine.csv")
    assert csv["Fine-tuning mean"].tolist() == [66.0] and csv["Fine-tuning seeds"].tolist() == [1]
    assert markdown == capsys.readouterr().out


def test_cells_of_several_sources_get_their_own_columns(compose_cfg, tmp_path):
    write_seed(tmp_path / "sweep" / "0", compose_cfg("source=demo"), 0, 80.0)
    write_seed(tmp_path / "sweep" / "1", compose_cfg("source=scratch"), 0, 40.0)
    write_seed(tmp_path / "sweep" / "2", compose_cfg("source=pretrained", "source.dataset=vehicles"), 0, 70.0)
    table = paper_layout(assemble(select(collect([tmp_path / "sweep"]))))
    assert table.loc[("demo", 100.0), "Fine-tuning [demo]"] == "80.00 (1)"
    assert table.loc[("demo", 100.0), "Fine-tuning [pretrained:vehicles]"] == "70.00 (1)"  # the source's dataset
    assert table.loc[("demo", 100.0), "From scratch"] == "40.00 (1)"  # the scratch row, named as such


def test_each_transfer_column_is_compared_with_from_scratch(compose_cfg, tmp_path):
    """The transfer's gain, seed by seed: each transfer column against From scratch (scipy's paired
    t interval), beside its own reference; From scratch itself has neither."""
    from scipy import stats

    from safetransfer.reporting.tables import to_markdown

    fine, scratch = {0: 80.0, 1: 83.0, 2: 79.0}, {0: 40.0, 1: 45.5, 2: 38.0}
    for seed in fine:
        write_seed(tmp_path / "sweep" / "0", compose_cfg("source=demo"), seed, fine[seed])
        write_seed(tmp_path / "sweep" / "1", compose_cfg("source=scratch"), seed, scratch[seed])
    numbers = assemble(select(collect([tmp_path / "sweep"])))
    row = numbers.loc[("demo", 100.0)]
    expected = stats.ttest_rel(list(fine.values()), list(scratch.values())).confidence_interval(0.95)
    # one transfer source beside From scratch: plain column names (no [demo])
    assert list(dict.fromkeys(numbers.columns.get_level_values("method"))) == ["Fine-tuning", "From scratch"]
    assert row[("Fine-tuning", "scratch")] == "From scratch" and row[("Fine-tuning", "scratch_n")] == 3
    assert row[("Fine-tuning", "scratch_low")] == pytest.approx(expected.low)
    assert row[("Fine-tuning", "scratch_high")] == pytest.approx(expected.high)
    assert row[("From scratch", "scratch")] == "" and row[("From scratch", "reference")] == ""
    assert "| Fine-tuning − From scratch" in to_markdown(numbers).replace("|   ", "| ")


def test_paired_differences_against_the_reference_column(compose_cfg, tmp_path):
    """Each column against its reference seed by seed, checked against scipy's paired t-test,
    with unequal seed sets (only the common seeds count)."""
    from scipy import stats

    l2sp = {0: 70.0, 1: 72.0, 2: 71.0, 3: 73.5, 4: 69.0}
    dtnh = {0: 71.0, 1: 72.9, 2: 72.4, 3: 74.0}  # seed 4 missing: four common seeds
    fine = {7: 60.0}  # no seed in common with L2-SP
    for seed, top1 in l2sp.items():
        write_seed(tmp_path / "sweep" / "0", compose_cfg("regularizer=l2sp"), seed, top1)
    for seed, top1 in dtnh.items():
        write_seed(tmp_path / "sweep" / "1", compose_cfg("regularizer=l2sp", "direction=dtnh"), seed, top1)
    for seed, top1 in fine.items():
        write_seed(tmp_path / "sweep" / "2", compose_cfg(), seed, top1)
    numbers = assemble(select(collect([tmp_path / "sweep"])))
    row = numbers.loc[("demo", 100.0)]
    common = [0, 1, 2, 3]
    expected = stats.ttest_rel([dtnh[s] for s in common], [l2sp[s] for s in common]).confidence_interval(0.95)
    assert row[("DTNH (L2-SP)", "reference")] == "L2-SP" and row[("DTNH (L2-SP)", "paired_n")] == 4
    assert row[("DTNH (L2-SP)", "paired_diff")] == pytest.approx(np.mean([dtnh[s] - l2sp[s] for s in common]))
    assert row[("DTNH (L2-SP)", "paired_low")] == pytest.approx(expected.low)
    assert row[("DTNH (L2-SP)", "paired_high")] == pytest.approx(expected.high)
    assert row[("L2-SP", "reference")] == "Fine-tuning" and row[("L2-SP", "paired_n")] == 0
    from safetransfer.reporting.tables import to_markdown

    markdown = to_markdown(numbers)
    assert "0 common seeds: no interval" in markdown
    low, high = expected.low, expected.high
    mark = " *" if low > 0 or high < 0 else ""
    assert f"+{np.mean([1.0, 0.9, 1.4, 0.5]):.2f} [{low:+.2f}, {high:+.2f}] (4){mark}" in markdown


def test_a_reference_is_found_from_the_methods_structure_not_its_name(compose_cfg):
    """reference_key from method_structure: DTNH (X) -> X, X+BSS -> X, the rest -> plain fine-tuning;
    a direction strategy of another name is compared with its sum too (a label rule compared it
    with Fine-tuning)."""
    from safetransfer.reporting.methods import key_of, method_structure, reference_key

    def key(*overrides):
        return key_of(method_structure(compose_cfg("source=imagenet", *overrides)))

    def reference(*overrides):
        return reference_key(method_structure(compose_cfg("source=imagenet", *overrides)))

    assert reference("method=l2sp_bss") == key("method=l2sp")
    assert reference("method=dtnh_knowdist") == key("method=knowdist")
    assert reference("method=delta") == key("method=fine_tuning") == key("method=l2")  # the BSS table's L2 too
    assert reference("method=delta_bss") == key("method=delta")
    assert reference("method=fine_tuning") is None and reference("method=from_scratch") is None
    other = method_structure(compose_cfg("source=imagenet", "method=l2sp"))
    assert reference_key({**other, "direction": "Orthogonal"}) == key("method=l2sp")


@pytest.mark.parametrize("damage", ['{"seed": 1, "top1": 7', "", '{"seed": 1}', "\x00\xff"])
def test_a_damaged_metrics_file_is_named_and_skipped(compose_cfg, tmp_path, capsys, caplog, damage):
    """A truncated, empty, incomplete or binary metrics.json: the table is made from the others
    and the warning names the file (it was a JSONDecodeError naming nothing, for the whole table)."""
    cfg = compose_cfg("target.sampling_rate=30")
    write_seed(tmp_path / "run", cfg, 0, 70.0)
    write_seed(tmp_path / "run", cfg, 2, 74.0)
    bad = tmp_path / "run" / "seed_1" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(damage.encode("latin-1"))
    main([str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--name", "t"])
    assert "72.00 ± 2.83 (2)" in (tmp_path / "results" / "t.md").read_text()
    assert str(bad) in caplog.text and "skipped" in caplog.text


def test_tables_of_a_directory_without_a_finished_seed_is_one_line_and_nothing_written(tmp_path, capsys):
    (tmp_path / "run" / "seed_0").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--results", str(tmp_path / "results")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safetransfer-tables: error: no finished seed")
    assert not (tmp_path / "results").exists()


def test_an_unwritable_results_folder_is_one_line(compose_cfg, tmp_path, capsys):
    write_seed(tmp_path / "run", compose_cfg(), 0, 70.0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--results", str(tmp_path / "afile" / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith(
        f"safetransfer-tables: error: --results {tmp_path / 'afile' / 'results'} is not a writable"
    )


@pytest.mark.parametrize("name", ["../../x", "/some/other/place", "sub/table", ".."])
def test_a_table_name_that_is_a_path_is_refused_and_nothing_written_outside(compose_cfg, tmp_path, capsys, name):
    """--name ../../x wrote ../../x.md beside the results folder's parent and exited 0."""
    write_seed(tmp_path / "run", compose_cfg(), 0, 70.0)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--results", str(tmp_path / "a" / "results"), "--name", name])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"safetransfer-tables: error: --name {name} is not a table name")
    assert set(tmp_path.rglob("*")) == before and not Path("/some/other/place.md").exists()


def test_settings_that_differ_without_validation_say_what_differs(compose_cfg, tmp_path):
    """Two settings in one cell and no validation split: the message names the keys that differ
    and both ways out (separate names, or a validation split for a search)."""
    for number, root in enumerate(("a", "b")):
        cfg = compose_cfg("target=imagefolder", f"target.root={tmp_path / root}", "target.name=same")
        write_seed(tmp_path / "sweep" / str(number), cfg, 0, 50.0)
    with pytest.raises(ConfigError, match=r"differ in target\.root.*target\.name=.*target\.val_fraction=0\.2"):
        select(collect([tmp_path / "sweep"]))


def test_the_paper_table_of_a_multirun_accumulates_cells_and_is_never_emptied(compose_cfg, tmp_path):
    """An L2-SP sweep, then an L2-SP+BSS sweep to the same table: both columns stay (the second
    erased the first). A rerun of one cell replaces that cell only; a rerun that finished nothing
    leaves the table as it was."""
    from safetransfer.reporting.tables import write_table

    results = tmp_path / "results"
    for seed, top1 in enumerate([70.0, 72.0]):
        write_seed(tmp_path / "l2sp" / "0", compose_cfg("regularizer=l2sp"), seed, top1)
        write_seed(tmp_path / "bss" / "0", compose_cfg("regularizer=l2sp_bss"), seed, top1 + 5)
    write_table([tmp_path / "l2sp"], results, "t_paper", accumulate=True)
    write_table([tmp_path / "bss"], results, "t_paper", accumulate=True)
    frame = pd.read_csv(results / "t_paper.csv")
    assert frame["L2-SP mean"].tolist() == [pytest.approx(71.0)]
    assert frame["L2-SP+BSS mean"].tolist() == [pytest.approx(76.0)]
    # a rerun of the L2-SP cell with another setting (lr): that cell is replaced, the other kept
    write_seed(tmp_path / "rerun" / "0", compose_cfg("regularizer=l2sp", "optim.optimizer.lr=0.02"), 0, 50.0)
    write_table([tmp_path / "rerun"], results, "t_paper", accumulate=True)
    frame = pd.read_csv(results / "t_paper.csv")
    assert frame["L2-SP mean"].tolist() == [pytest.approx(50.0)] and frame["L2-SP seeds"].tolist() == [1]
    assert frame["L2-SP+BSS mean"].tolist() == [pytest.approx(76.0)]
    before = (results / "t_paper.md").read_text()
    (tmp_path / "interrupted").mkdir()
    with pytest.raises(ConfigError, match="no finished seed"):
        write_table([tmp_path / "interrupted"], results, "t_paper", accumulate=True)
    assert (results / "t_paper.md").read_text() == before
    assert not list(results.glob("*.lock"))  # the locks live in results/.locks


def test_a_search_gets_a_table_of_every_setting_with_validation_and_test(compose_cfg, tmp_path):
    """One row per setting: the swept value as a column, val and test mean ± std (NumPy), the
    chosen one marked: the best mean validation accuracy, whatever the test accuracy says."""
    from safetransfer.reporting.tables import write_table

    grid = {0.01: ([80.0, 82.0], [60.0, 61.0]), 0.1: ([85.0, 84.0], [55.0, 57.0])}  # alpha: (val, test) per seed
    for number, (alpha, (vals, tests)) in enumerate(grid.items()):
        cfg = compose_cfg("regularizer=l2sp", f"regularizer.terms.l2sp.alpha={alpha}", "target.val_fraction=0.2")
        for seed, (val, test) in enumerate(zip(vals, tests)):
            write_seed(tmp_path / "grid" / str(number), cfg, seed, test, val_top1=val)
    text = write_table([tmp_path / "grid"], tmp_path / "results", "g")
    searched = pd.read_csv(tmp_path / "results" / "g_search.csv", keep_default_na=False)
    assert searched["l2sp.alpha"].tolist() == [0.01, 0.1]
    for (vals, tests), row in zip(grid.values(), searched.itertuples()):
        assert row[searched.columns.get_loc("val top-1 (%)") + 1] == f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"
        assert (
            row[searched.columns.get_loc("test top-1 (%)") + 1] == f"{np.mean(tests):.2f} ± {np.std(tests, ddof=1):.2f}"
        )
    assert searched["chosen"].tolist() == ["", "✓"]  # 84.5 > 81 on validation, though its test is lower
    assert "g_search.md" in (tmp_path / "results" / "g.md").read_text() and "| ✓" in text


def test_methods_are_chosen_by_plain_name_or_by_label(compose_cfg, tmp_path):
    from safetransfer.reporting.tables import expand_methods

    labels = ["Fine-tuning [demo]", "Fine-tuning [imagenet]", "L2-SP [demo]", "From scratch"]
    assert expand_methods(["Fine-tuning", "From scratch"], labels) == labels[:2] + ["From scratch"]
    assert expand_methods(["L2-SP [demo]", "DELTA"], labels) == ["L2-SP [demo]", "DELTA"]  # DELTA: a missing column
    write_seed(tmp_path / "sweep" / "0", compose_cfg("source=demo"), 0, 80.0)
    write_seed(tmp_path / "sweep" / "1", compose_cfg("source=imagenet"), 0, 85.0)
    main([str(tmp_path / "sweep"), "--name", "m", "--results", str(tmp_path / "results"), "--methods", "Fine-tuning"])
    header = (tmp_path / "results" / "m.md").read_text().splitlines()[0]
    assert "Fine-tuning [demo]" in header and "Fine-tuning [imagenet]" in header


def test_a_search_table_that_no_longer_holds_is_removed(compose_cfg, tmp_path):
    from safetransfer.reporting.tables import write_table

    for number, alpha in enumerate((0.01, 0.1)):
        cfg = compose_cfg("regularizer=l2sp", f"regularizer.terms.l2sp.alpha={alpha}", "target.val_fraction=0.2")
        write_seed(tmp_path / "grid" / str(number), cfg, 0, 60.0 + number, val_top1=80.0 + number)
    write_table([tmp_path / "grid"], tmp_path / "results", "t", accumulate=True)
    assert (tmp_path / "results" / "t_search.md").exists()
    cfg = compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.05", "target.val_fraction=0.2")
    write_seed(tmp_path / "again" / "0", cfg, 0, 70.0, val_top1=85.0)
    write_table([tmp_path / "again"], tmp_path / "results", "t", accumulate=True)  # the cell: alpha 0.05 only
    assert not (tmp_path / "results" / "t_search.md").exists() and not (tmp_path / "results" / "t_search.csv").exists()


@pytest.mark.parametrize("local", [False, True])
def test_shared_tables_show_no_local_paths_unless_asked(compose_cfg, tmp_path, local):
    """The CSV had the absolute run_dir, and target.root / source.path / target.sample_list as given
    on the command line (home folders, user names) in the CSV and the Markdown."""
    import fixtures
    from conftest import TINY
    from safetransfer.job.run import run_job
    from safetransfer.reporting.results import shown_path

    fixtures.make_cub200(tmp_path / "private" / "data", classes=3, train_per_class=4, test_per_class=2)
    root = tmp_path / "private" / "data"
    shrink = [o for o in TINY if not o.startswith("target.")]
    overrides = ["target=cub200", f"target.root={root}", "target.expected_classes=3", "target.expected_split=[12,6]"]
    cfg = compose_cfg(*shrink, *overrides, "train.batch_size=4", f"results.local_paths={str(local).lower()}")
    run_job(cfg, tmp_path / "private" / "run", overrides=" ".join(overrides))
    written = (tmp_path / "results" / "cub200.csv").read_text() + (tmp_path / "results" / "cub200.md").read_text()
    assert (str(tmp_path / "private") in written) == local
    if not local:
        assert "target.root=.../data" in written and ".../run" in written
    assert shown_path("relative/folder") == "relative/folder"
    assert shown_path(str(Path.cwd() / "outputs" / "x")) == "outputs/x"

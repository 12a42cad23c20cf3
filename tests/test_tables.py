"""The result store and its views: one record per seed, tables checked against NumPy and scipy; the
published values beside each cell; a setting chosen on validation, never on test; cells kept apart
by their settings and compared only within one setting."""

import json
import math
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from conftest import TINY
from safetransfer.common.errors import ConfigError
from safetransfer.reporting import store
from safetransfer.reporting.methods import method_name, method_structure
from safetransfer.reporting.tables import main, paired_text, published_values, summarize, write


@pytest.fixture
def compose_cfg(compose_cfg):
    """The rows here are transfer runs, from the demo source unless a test names another (plain
    fine-tuning from the root config's source=scratch is the From scratch baseline). Only composed."""

    def _compose(*overrides):
        return compose_cfg(*(() if any(o.startswith("source=") for o in overrides) else ("source=demo",)), *overrides)

    return _compose


def metrics(cfg, seed, top1, val_top1=None, sha256=None, method=True):
    """A seed's metrics.json as job/run.py's run_seed writes it (`method`: False, as versions before
    the method's name was recorded wrote it)."""
    found = {"seed": seed, "top1": top1, "test_loss": 1.0, "config": OmegaConf.to_container(cfg, resolve=True)}
    if method:
        found.update(method=method_name(cfg), structure=method_structure(cfg))
    if val_top1 is not None:
        found["val_top1"] = val_top1
    if sha256:
        found["source_checkpoint"] = {"name": "file", "file": "/x/ckpt.pth", "sha256": sha256}
    return found


def write_seed(directory, cfg, seed, top1, age=0.0, **more):
    path = directory / f"seed_{seed}" / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics(cfg, seed, top1, **more)))
    stamp = time.time() - age
    os.utime(path, (stamp, stamp))


def table_of(results, name="t"):
    """The paper layout's long CSV, indexed by (target, sampling rate, column)."""
    frame = pd.read_csv(results / f"{name}_paper.csv", keep_default_na=False, na_values=[""])
    return frame.set_index(["target", "sampling_rate", "column"]).sort_index()


def add(results, cfg, seeds: dict, name="t", **more):
    return write(results, name, [store.record(metrics(cfg, s, v, **more), "run") for s, v in seeds.items()])


def test_summarize_is_mean_and_sample_std():
    values = [71.3, 69.8, 72.4, 70.1, 70.9]
    mean, std = summarize(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    mean, std = summarize([55.0])
    assert mean == 55.0 and np.isnan(std)


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
    results = tmp_path / "results"
    main([str(tmp_path / "old"), str(tmp_path / "sweep"), "--results", str(results), "--name", "t"])
    assert len(store.read(results, "t")) == 6  # one record per seed
    main(["--results", str(results), "--name", "t", "--targets", "demo", "cub200"])
    assert (table_of(results).loc["cub200", "seeds"] == 0).all()  # a target asked for keeps its rows, missing
    table = table_of(results)
    values = [70.0, 72.5, 71.0]
    assert table.loc[("demo", 30.0, "Fine-tuning"), "mean"] == pytest.approx(np.mean(values))
    assert table.loc[("demo", 30.0, "Fine-tuning"), "std"] == pytest.approx(np.std(values, ddof=1))
    assert table.loc[("demo", 30.0, "DTNH (L2-SP)"), "mean"] == pytest.approx(76.0)
    assert table.loc[("demo", 100.0, "DTNH (L2-SP)"), "seeds"] == 0
    markdown = (results / "t_paper.md").read_text()
    assert f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)" in markdown and "| missing" in markdown
    assert "80.00 (1)" in markdown


def test_published_values_and_differences_beside_each_cell(compose_cfg, tmp_path):
    published = tmp_path / "published.csv"
    published.write_text(
        "# a citation\ntable,target,sampling_rate,method,top1\n"
        "t,demo,30,Fine-tuning,70.5\nt,demo,30,L2-SP,\nt,demo,60,Fine-tuning,90.25\n"
        "other,demo,30,Fine-tuning,1.0\n"
    )
    reference = published_values("t", published)
    assert (
        reference.set_index(["target", "sampling_rate", "method"]).loc[("demo", 60.0, "Fine-tuning"), "top1"] == 90.25
    )
    assert np.isnan(reference.set_index(["sampling_rate", "method"]).loc[(30.0, "L2-SP"), "top1"])
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
    """dtnh_table2's Flowers-102 row: Fine-tuning 90.24 ± 0.31 and L2-SP 88.96 ± 0.21 published."""
    results = tmp_path / "results"
    flowers = ("source=imagenet", "target=flowers102", "results.published=dtnh_table2")
    add(results, compose_cfg(*flowers), {0: 89.8, 1: 90.6})  # 90.2 ± 0.566: |-0.04| <= hypot(0.566, 0.31)
    add(results, compose_cfg(*flowers, "regularizer=l2sp"), {0: 90.0, 1: 90.4})  # |1.24| > hypot(0.283, 0.21)
    row = table_of(results).sort_index().loc[("flowers102", 100.0)]
    assert str(row.loc["Fine-tuning", "within"]) == "True" and str(row.loc["L2-SP", "within"]) == "False"
    assert row.loc["Fine-tuning", "diff"] == pytest.approx(90.2 - 90.24)
    markdown = (results / "t_paper.md").read_text()
    assert "90.20 ± 0.57 (2) · paper 90.24 ± 0.31 · Δ -0.04 ✓" in markdown
    assert "90.20 ± 0.28 (2) · paper 88.96 ± 0.21 · Δ +1.24 ✗" in markdown
    assert "missing · paper 82.68 ± 0.20" in markdown  # the other published cells, found or not


def test_one_paper_row_for_both_caltech_splits_is_footnoted(compose_cfg, tmp_path):
    write_seed(tmp_path / "sweep" / "0", compose_cfg("source=imagenet", "target=caltech256_30"), 0, 80.0)
    results = tmp_path / "results"
    main([str(tmp_path / "sweep"), "--name", "t", "--results", str(results), "--published", "dtnh_table2"])
    markdown = (results / "t_paper.md").read_text()
    assert "| caltech256_30 † |" in markdown and "| caltech256_60 † |" in markdown
    assert "80.00 (1) · paper 82.68 ± 0.20 · Δ -2.68" in markdown
    assert "missing · paper 82.68 ± 0.20" in markdown  # the same paper value beside the 60-image row
    assert "does not say whether it is the 30 or the 60 images per class split" in markdown
    table = table_of(results)
    assert table.loc[("caltech256_60", 100.0, "Fine-tuning"), "published_std"] == 0.2


def test_selection_uses_validation_never_test(compose_cfg, tmp_path):
    # alpha=0.01 wins on test, alpha=0.1 on validation: the table must report alpha=0.1's test accuracy
    small = compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.01", "target.val_fraction=0.2")
    large = compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.1", "target.val_fraction=0.2")
    for seed in range(3):
        write_seed(tmp_path / "grid" / "0", small, seed, top1=90.0 + seed, val_top1=50.0)
        write_seed(tmp_path / "grid" / "1", large, seed, top1=60.0 + seed, val_top1=55.0 + seed)
    results = tmp_path / "results"
    main([str(tmp_path / "grid"), "--name", "grid", "--results", str(results)])
    cell = table_of(results, "grid").loc[("demo", 100.0, "L2-SP")]
    assert cell["mean"] == pytest.approx(61.0) and cell["val_mean"] == pytest.approx(56.0)
    assert cell["chosen"] == "l2sp.alpha=0.1" and cell["settings_tried"] == 2
    assert "- demo 100% L2-SP: l2sp.alpha=0.1 (of 2 settings)" in (results / "grid_paper.md").read_text()


def test_settings_without_validation_are_cells_of_their_own_labelled_by_what_differs(compose_cfg, tmp_path):
    """Two alphas and no validation split: two columns, each named with its alpha (the table refused
    them before); the job view shows the alpha as a column."""
    results = tmp_path / "results"
    add(results, compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.01"), {0: 90.0})
    add(results, compose_cfg("regularizer=l2sp", "regularizer.terms.l2sp.alpha=0.1"), {0: 60.0})
    add(results, compose_cfg(), {0: 70.0})
    table = table_of(results)
    assert table.loc[("demo", 100.0, "L2-SP (l2sp.alpha=0.01)"), "mean"] == 90.0
    assert table.loc[("demo", 100.0, "L2-SP (l2sp.alpha=0.1)"), "mean"] == 60.0
    assert table.loc[("demo", 100.0, "Fine-tuning"), "mean"] == 70.0  # it has no alpha: a plain name
    assert "| l2sp.alpha " in (results / "t.md").read_text().splitlines()[0]


def test_a_later_sweep_with_another_setting_adds_cells_and_pairs_within_its_setting(compose_cfg, tmp_path):
    """The demo's methods at their default alpha, then L2-SP and DTNH (L2-SP) at alpha 10 into the same
    table: every cell is kept and named with its alpha, and L2-SP+BSS − L2-SP pairs the default alphas
    (it compared L2-SP+BSS with the alpha-10 L2-SP, unmarked)."""
    results = tmp_path / "results"
    default = {"l2sp": [70.0, 71.0, 72.0], "l2sp_bss": [72.0, 74.0, 73.0], "dtnh_l2sp": [71.0, 71.5, 72.5]}
    strong = {"l2sp": [50.0, 52.0, 51.0], "dtnh_l2sp": [50.5, 52.0, 52.0]}
    add(results, compose_cfg("method=fine_tuning"), {0: 75.0, 1: 76.0, 2: 74.0})
    for method, values in default.items():
        add(results, compose_cfg(f"method={method}"), dict(enumerate(values)))
    for method, values in strong.items():
        add(results, compose_cfg(f"method={method}", "regularizer.terms.l2sp.alpha=10"), dict(enumerate(values)))
    table = table_of(results)
    alpha = compose_cfg("method=l2sp").regularizer.terms.l2sp.alpha
    columns = set(table.loc[("demo", 100.0)].index)
    assert columns == {
        "Fine-tuning",
        f"L2-SP (l2sp.alpha={alpha})",
        f"L2-SP+BSS (l2sp.alpha={alpha})",
        f"DTNH (L2-SP) (l2sp.alpha={alpha})",
        "L2-SP (l2sp.alpha=10)",
        "DTNH (L2-SP) (l2sp.alpha=10)",
    }
    bss = table.loc[("demo", 100.0, f"L2-SP+BSS (l2sp.alpha={alpha})")]
    assert bss["reference"] == f"L2-SP (l2sp.alpha={alpha})"
    assert bss["paired_diff"] == pytest.approx(np.mean(np.subtract(default["l2sp_bss"], default["l2sp"])))
    assert table.loc[("demo", 100.0, "DTNH (L2-SP) (l2sp.alpha=10)"), "reference"] == "L2-SP (l2sp.alpha=10)"
    assert table.loc[("demo", 100.0, "L2-SP (l2sp.alpha=10)"), "reference"] == "Fine-tuning"


def test_cells_of_several_sources_get_their_own_columns(compose_cfg, tmp_path):
    write_seed(tmp_path / "sweep" / "0", compose_cfg("source=demo"), 0, 80.0)
    write_seed(tmp_path / "sweep" / "1", compose_cfg("source=scratch"), 0, 40.0)
    write_seed(tmp_path / "sweep" / "2", compose_cfg("source=pretrained", "source.dataset=vehicles"), 0, 70.0)
    main([str(tmp_path / "sweep"), "--results", str(tmp_path / "results"), "--name", "t"])
    row = table_of(tmp_path / "results").loc[("demo", 100.0)]
    assert row.loc["Fine-tuning [demo]", "mean"] == 80.0
    assert row.loc["Fine-tuning [pretrained:vehicles]", "mean"] == 70.0  # the source's dataset
    assert row.loc["From scratch", "mean"] == 40.0  # the scratch row, named as such


def test_each_transfer_column_is_compared_with_from_scratch(compose_cfg, tmp_path):
    """The transfer's gain, seed by seed, against scipy's paired t interval; From scratch has none."""
    from scipy import stats

    fine, scratch = {0: 80.0, 1: 83.0, 2: 79.0}, {0: 40.0, 1: 45.5, 2: 38.0}
    results = tmp_path / "results"
    add(results, compose_cfg("source=demo"), fine)
    add(results, compose_cfg("source=scratch"), scratch)
    row = table_of(results).loc[("demo", 100.0)]
    expected = stats.ttest_rel(list(fine.values()), list(scratch.values())).confidence_interval(0.95)
    assert list(row.index) == ["Fine-tuning", "From scratch"]  # one transfer source: no [demo]
    assert row.loc["Fine-tuning", "scratch"] == "From scratch" and row.loc["Fine-tuning", "scratch_n"] == 3
    assert row.loc["Fine-tuning", "scratch_low"] == pytest.approx(expected.low)
    assert row.loc["Fine-tuning", "scratch_high"] == pytest.approx(expected.high)
    assert pd.isna(row.loc["From scratch", "scratch"]) and pd.isna(row.loc["From scratch", "reference"])
    assert "| Fine-tuning − From scratch" in (results / "t_paper.md").read_text()


def test_paired_differences_against_the_reference_column(compose_cfg, tmp_path):
    """Each column against its reference seed by seed, checked against scipy's paired t-test,
    with unequal seed sets (only the common seeds count)."""
    from scipy import stats

    l2sp = {0: 70.0, 1: 72.0, 2: 71.0, 3: 73.5, 4: 69.0}
    dtnh = {0: 71.0, 1: 72.9, 2: 72.4, 3: 74.0}  # seed 4 missing: four common seeds
    results = tmp_path / "results"
    add(results, compose_cfg("regularizer=l2sp"), l2sp)
    add(results, compose_cfg("regularizer=l2sp", "direction=dtnh"), dtnh)
    add(results, compose_cfg(), {7: 60.0})  # no seed in common with L2-SP
    row = table_of(results).loc[("demo", 100.0)]
    common = [0, 1, 2, 3]
    expected = stats.ttest_rel([dtnh[s] for s in common], [l2sp[s] for s in common]).confidence_interval(0.95)
    assert row.loc["DTNH (L2-SP)", "reference"] == "L2-SP" and row.loc["DTNH (L2-SP)", "paired_n"] == 4
    assert row.loc["DTNH (L2-SP)", "paired_diff"] == pytest.approx(np.mean([dtnh[s] - l2sp[s] for s in common]))
    assert row.loc["DTNH (L2-SP)", "paired_low"] == pytest.approx(expected.low)
    assert row.loc["DTNH (L2-SP)", "paired_high"] == pytest.approx(expected.high)
    assert row.loc["L2-SP", "reference"] == "Fine-tuning" and row.loc["L2-SP", "paired_n"] == 0
    markdown = (results / "t_paper.md").read_text()
    assert "0 common seeds: no interval" in markdown
    mark = " *" if expected.low > 0 or expected.high < 0 else ""
    assert f"+{np.mean([1.0, 0.9, 1.4, 0.5]):.2f} [{expected.low:+.2f}, {expected.high:+.2f}] (4){mark}" in markdown


def test_an_interval_from_fewer_than_three_seeds_is_never_flagged():
    """Two seeds with equal differences: a zero-width interval, [1, 1], that was flagged significant.
    With three seeds, t(0.975, 2) = 4.303 (a t table) times sd/sqrt(3)."""
    assert paired_text(2, 1.0, 1.0, 1.0) == "+1.00 [+1.00, +1.00] (2)"
    differences = [1.0, 2.0, 3.0]
    half = 4.303 * np.std(differences, ddof=1) / np.sqrt(3)
    assert half == pytest.approx(2.484, abs=1e-3)
    assert paired_text(3, 2.0, 2.0 - half, 2.0 + half) == "+2.00 [-0.48, +4.48] (3)"
    assert paired_text(3, 5.0, 2.5, 7.5).endswith("(3) *")


def test_a_reference_is_found_from_the_methods_structure_not_its_name(compose_cfg):
    """reference_key from method_structure: DTNH (X) -> X, X+BSS -> X, the rest -> plain fine-tuning;
    a direction strategy of another name is compared with its sum too."""
    from safetransfer.reporting.methods import key_of, reference_key

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
    assert reference_key({**other, "direction": "orthogonal"}) == key("method=l2sp")


def test_a_source_files_digest_is_shown_abbreviated(compose_cfg, tmp_path):
    """One config fine-tuned from two versions of a source file: two cells, told apart by 12 digits
    of the file's sha256 (the 64 were a column and part of the method's name)."""
    results = tmp_path / "results"
    cfg = compose_cfg("source=file", "source.path=/x/ckpt.pth")
    add(results, cfg, {0: 70.0}, sha256="a" * 64)
    add(results, cfg, {0: 75.0}, sha256="b" * 64)
    columns = list(table_of(results).loc[("demo", 100.0)].index)
    assert columns == ["Fine-tuning (source.sha256=aaaaaaaaaaaa)", "Fine-tuning (source.sha256=bbbbbbbbbbbb)"]
    assert "a" * 13 not in (results / "t.md").read_text() + (results / "t_paper.md").read_text()


@pytest.mark.parametrize("damage", ['{"seed": 1, "top1": 7', "", '{"seed": 1}', "\x00\xff"])
def test_a_damaged_metrics_file_is_named_and_skipped(compose_cfg, tmp_path, caplog, damage):
    cfg = compose_cfg("target.sampling_rate=30")
    write_seed(tmp_path / "run", cfg, 0, 70.0)
    write_seed(tmp_path / "run", cfg, 2, 74.0)
    bad = tmp_path / "run" / "seed_1" / "metrics.json"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(damage.encode("latin-1"))
    main([str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--name", "t"])
    assert "72.00 ± 2.83 (2)" in (tmp_path / "results" / "t_paper.md").read_text()
    assert str(bad) in caplog.text and "skipped" in caplog.text


@pytest.mark.parametrize("top1", [math.nan, "NaN", None, math.inf])
def test_a_seed_whose_top1_is_not_a_finite_number_is_named_and_skipped(compose_cfg, tmp_path, caplog, top1):
    cfg = compose_cfg("target.sampling_rate=30")
    write_seed(tmp_path / "run", cfg, 0, 70.0)
    write_seed(tmp_path / "run", cfg, 1, top1)  # json.dumps writes NaN and Infinity as JavaScript does
    write_seed(tmp_path / "run", cfg, 2, 74.0)
    main([str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--name", "t"])
    assert "72.00 ± 2.83 (2)" in (tmp_path / "results" / "t_paper.md").read_text()
    assert "seed_1" in caplog.text and "not a finite number; skipped" in caplog.text


def test_a_store_record_without_a_finite_top1_is_left_out_of_every_view(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg("target.sampling_rate=30")
    add(tmp_path, cfg, {0: 70.0, 2: 74.0})
    path = tmp_path / "t.seeds.csv"
    frame = pd.read_csv(path)
    path.write_text(pd.concat([frame, frame.iloc[[0]].assign(seed=1, top1="NaN")]).to_csv(index=False))
    assert list(store.read(tmp_path, "t")["seed"]) == [0, 2] and "without a finite top-1" in caplog.text
    write(tmp_path, "t", [])
    assert "72.00 ± 2.83 (2)" in (tmp_path / "t_paper.md").read_text()


@pytest.mark.parametrize("damage", ["garbage", "passwd"])
def test_a_store_that_cannot_be_read_is_one_line_before_training(tmp_path, train_in_process, damage):
    """A damaged results/<table>.seeds.csv (one garbage row; a link to another file) failed the job with a
    traceback after its seeds trained: now refused in one line before training, the file left as it is."""
    results = tmp_path / "res"
    results.mkdir()
    path = results / "demo.seeds.csv"
    if damage == "garbage":
        path.write_text(",".join(store.COLUMNS) + "\n" + "x" * 20 + ',"unclosed\n1,2,3,4\n')
    else:
        (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
        path.symlink_to(tmp_path / "passwd")
    before = path.read_text()
    code, out, err = train_in_process(*TINY, "source=scratch", "results.dir=res")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "res/demo.seeds.csv is not a result store safetransfer can read" in lines[0] and "--name demo" in lines[0]
    assert not list(tmp_path.rglob("seed_*")) and path.read_text() == before


def test_results_of_earlier_versions_are_imported_from_their_metrics(compose_cfg, tmp_path, capsys):
    """metrics.json written before the method's name and structure were recorded: imported once into the
    store by safetransfer-tables, named and paired from their configs; stdout is the paper layout."""
    write_seed(tmp_path / "old" / "0", compose_cfg(), 0, 66.0, method=False)
    write_seed(tmp_path / "old" / "1", compose_cfg("method=dtnh_l2sp"), 0, 67.0, method=False)
    results = tmp_path / "results"
    main([str(tmp_path / "old"), "--name", "mine", "--results", str(results)])
    records = store.read(results, "mine")
    assert sorted(records["method"]) == ["DTNH (L2-SP)", "Fine-tuning"] and list(records["seed"]) == [0, 0]
    assert capsys.readouterr().out == (results / "mine_paper.md").read_text()
    main(["--name", "mine", "--results", str(results)])  # the views again, from the store alone
    assert store.read(results, "mine").equals(records)


def test_tables_of_a_directory_without_a_finished_seed_is_one_line_and_nothing_written(tmp_path, capsys):
    (tmp_path / "run" / "seed_0").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--results", str(tmp_path / "results")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("safetransfer-tables: error: no finished seed")
    assert not list((tmp_path / "results").glob("*.*"))


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
    write_seed(tmp_path / "run", compose_cfg(), 0, 70.0)
    before = set(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--results", str(tmp_path / "a" / "results"), "--name", name])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"safetransfer-tables: error: --name {name} is not a table name")
    assert set(tmp_path.rglob("*")) == before and not Path("/some/other/place.md").exists()


def test_a_search_gets_a_table_of_every_setting_with_validation_and_test(compose_cfg, tmp_path):
    """One row per setting: the swept value as a column, val and test mean ± std (NumPy), the
    chosen one marked: the best mean validation accuracy, whatever the test accuracy says."""
    grid = {0.01: ([80.0, 82.0], [60.0, 61.0]), 0.1: ([85.0, 84.0], [55.0, 57.0])}  # alpha: (val, test) per seed
    results = tmp_path / "results"
    for alpha, (vals, tests) in grid.items():
        cfg = compose_cfg("regularizer=l2sp", f"regularizer.terms.l2sp.alpha={alpha}", "target.val_fraction=0.2")
        write(
            results,
            "g",
            [store.record(metrics(cfg, s, t, val_top1=v), "run") for s, (v, t) in enumerate(zip(vals, tests))],
        )
    searched = pd.read_csv(results / "g_search.csv", keep_default_na=False)
    assert searched["l2sp.alpha"].tolist() == [0.01, 0.1]
    for (vals, tests), (_, row) in zip(grid.values(), searched.iterrows()):
        assert row["val top-1 (%)"] == f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"
        assert row["test top-1 (%)"] == f"{np.mean(tests):.2f} ± {np.std(tests, ddof=1):.2f}"
    assert searched["chosen"].tolist() == ["", "✓"]  # 84.5 > 81 on validation, though its test is lower
    assert "g_search.md" in (results / "g_paper.md").read_text()


def test_methods_are_chosen_by_plain_name_or_by_label(compose_cfg, tmp_path):
    write_seed(tmp_path / "sweep" / "0", compose_cfg("source=demo"), 0, 80.0)
    write_seed(tmp_path / "sweep" / "1", compose_cfg("source=imagenet"), 0, 85.0)
    results = ["--results", str(tmp_path / "results"), "--name", "m"]
    main([str(tmp_path / "sweep"), *results, "--methods", "DELTA", "Fine-tuning"])
    header = (tmp_path / "results" / "m_paper.md").read_text().splitlines()[0]
    assert header.index("DELTA") < header.index("Fine-tuning [demo]") < header.index("Fine-tuning [imagenet]")
    main([*results, "--methods", "Fine-tuning [imagenet]"])
    header = (tmp_path / "results" / "m_paper.md").read_text().splitlines()[0]
    assert "Fine-tuning [imagenet]" in header and "[demo]" not in header


def test_rerunning_a_seed_replaces_its_record(compose_cfg, tmp_path):
    results = tmp_path / "results"
    add(results, compose_cfg(), {0: 50.0, 1: 52.0})
    add(results, compose_cfg("source=scratch"), {0: 30.0})
    add(results, compose_cfg(), {1: 62.0, 2: 64.0})
    records = store.read(results, "t")
    assert len(records) == 4
    fine = records[records["method"] == "Fine-tuning"].set_index("seed")["top1"]
    assert fine.to_dict() == {0: 50.0, 1: 62.0, 2: 64.0}


def _append_many(results: str, worker: int, count: int) -> None:
    for i in range(count):
        entry = {c: "" for c in store.COLUMNS}
        entry.update(setting=f"w{worker}-{i}", seed=0, top1=float(i), sampling_rate=100.0)
        store.append(Path(results), "shared", [entry])


@pytest.mark.e2e  # four real processes
def test_concurrent_jobs_lose_no_record(tmp_path):
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(tmp_path), w, 8)) for w in range(4)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    assert sorted(store.read(tmp_path, "shared")["setting"]) == sorted(f"w{w}-{i}" for w in range(4) for i in range(8))


@pytest.mark.parametrize("local", [False, True])
def test_shared_tables_show_no_local_paths_unless_asked(compose_cfg, tmp_path, local):
    """The store and the views had the absolute run_dir, and target.root as given (home folders, user names)."""
    import fixtures
    from conftest import TINY
    from safetransfer.job.run import run_job
    from safetransfer.reporting.store import shown_path

    fixtures.make_cub200(tmp_path / "private" / "data", classes=3, train_per_class=4, test_per_class=2)
    root = tmp_path / "private" / "data"
    shrink = [o for o in TINY if not o.startswith("target.")]
    overrides = ["target=cub200", f"target.root={root}", "target.expected_classes=3", "target.expected_split=[12,6]"]
    # source=scratch: the demo source at its full size would be pretrained first (half a minute, and
    # nothing to do with paths)
    cfg = compose_cfg(
        *shrink, *overrides, "source=scratch", "train.batch_size=4", f"results.local_paths={str(local).lower()}"
    )
    run_job(cfg, tmp_path / "private" / "run")
    results = tmp_path / "results"
    written = "".join(p.read_text() for p in results.glob("cub200*.*"))
    assert (str(tmp_path / "private") in written) == local
    if not local:
        assert '"target.root": ".../data"' in written.replace('""', '"') and ".../run" in written
    assert shown_path("relative/folder") == "relative/folder"
    assert shown_path(str(Path.cwd() / "outputs" / "x")) == "outputs/x"

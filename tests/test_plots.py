"""Figures from synthetic logs: the numbers each one draws checked against NumPy, and the
PNG files decoded (expected size, not blank)."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from safetransfer.reporting.plots import DPI, SIZE, curve_band, load_runs, main, spectrum_curve

RNG = np.random.default_rng(0)


def write_seed(directory, cfg, seed, iterations=(10, 20, 30), angles=True, spectrum_size=6):
    seed_dir = directory / f"seed_{seed}"
    seed_dir.mkdir(parents=True)
    rows = []
    for i in iterations:
        row = {"iteration": i, "loss_J": 2.0 / i + 0.1 * seed, "test_loss": 2.5 / i + 0.05 * seed}
        if angles:
            row.update(
                angle_d_J=30 + seed,
                angle_d_Omega=80 - seed,
                angle_sum_J=40 + i / 10,
                angle_sum_Omega=95.0,
                angle_J_Omega=95 + 2 * seed + i / 10,
            )
        rows.append(row)
    import pandas as pd

    pd.DataFrame(rows).to_csv(seed_dir / "log.csv", index=False)
    spectra = [sorted(RNG.uniform(0, 10, spectrum_size).tolist(), reverse=True) for _ in range(2)]
    (seed_dir / "spectrum.json").write_text(json.dumps({"singular_values": spectra, "batch_size": spectrum_size}))
    (seed_dir / "metrics.json").write_text(
        json.dumps({"seed": seed, "top1": 70.0 + seed, "config": OmegaConf.to_container(cfg, resolve=True)})
    )
    return rows, spectra


def assert_png(path):
    image = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert image.shape[1] == SIZE[0] * DPI and image.shape[0] >= 300  # as high as its rows of panels need
    assert image.std() > 10  # not blank


def test_curves_and_spectra_are_the_seed_means(compose_cfg, tmp_path):
    cfg = compose_cfg("regularizer=l2sp", "direction=dtnh")
    logs, spectra = zip(*(write_seed(tmp_path / "run", cfg, seed) for seed in range(3)))
    runs = load_runs([tmp_path / "run"])
    assert {r.method for r in runs} == {"DTNH (L2-SP)"} and len(runs) == 3
    band = curve_band(runs, "loss_J")
    values = np.array([[row["loss_J"] for row in log] for log in logs])  # seeds x iterations
    np.testing.assert_allclose(band["mean"], values.mean(axis=0))
    np.testing.assert_allclose(band["std"], values.std(axis=0, ddof=1))
    assert list(band["iteration"]) == [10, 20, 30] and set(band["n"]) == {3}
    expected = np.mean([np.sort(b)[::-1] for s in spectra for b in s], axis=0)
    np.testing.assert_allclose(spectrum_curve(runs), expected)
    assert np.all(np.diff(spectrum_curve(runs)) <= 0)


def test_plot_command_draws_the_four_figures(compose_cfg, tmp_path, capsys):
    for seed in range(2):
        write_seed(tmp_path / "sweep" / "0", compose_cfg("regularizer=l2sp", "direction=dtnh"), seed)
        write_seed(tmp_path / "sweep" / "1", compose_cfg("regularizer=l2sp"), seed, angles=False)
        write_seed(
            tmp_path / "sweep" / "2", compose_cfg("regularizer=l2sp", "target.sampling_rate=30"), seed, angles=False
        )
    main([str(tmp_path / "sweep"), "--out", str(tmp_path / "figures")])
    printed = capsys.readouterr().out.split()
    for name in ("losses", "angles", "spectra", "table"):
        path = tmp_path / "figures" / f"{name}.png"
        assert str(path) in printed
        assert_png(path)


def test_angle_figure_adds_the_angle_between_g_J_and_g_Omega(compose_cfg, tmp_path, monkeypatch):
    """A third panel with the seeds' mean of angle_J_Omega; logs written before that column
    existed get the paper's two panels."""
    import pandas as pd

    from safetransfer.reporting import plots

    figures, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda plt, figure, *rest: figures.append(figure) or save(plt, figure, *rest))
    cfg = compose_cfg("regularizer=l2sp", "direction=dtnh")
    logs = [write_seed(tmp_path / "run", cfg, seed)[0] for seed in range(3)]
    plots.plot_angles(load_runs([tmp_path / "run"]), tmp_path / "angles.png")
    axes = figures[-1].axes
    assert len(axes) == 3
    expected = np.array([[row["angle_J_Omega"] for row in log] for log in logs]).mean(axis=0)
    np.testing.assert_allclose(axes[2].lines[0].get_ydata(), expected)
    assert [line.get_ydata()[0] for line in axes[2].lines[1:]] == [90.0]  # the line DTNH acts above

    for seed in range(3):
        log = tmp_path / "run" / f"seed_{seed}" / "log.csv"
        pd.read_csv(log).drop(columns="angle_J_Omega").to_csv(log, index=False)
    plots.plot_angles(load_runs([tmp_path / "run"]), tmp_path / "angles.png")
    assert len(figures[-1].axes) == 2


def test_plot_command_refuses_an_empty_directory(tmp_path):
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path)])
    assert stop.value.code == 2


def test_tensorboard_logger_writes_the_log_scalars(compose_cfg, tmp_path):
    pytest.importorskip("tensorboard")
    import csv

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from conftest import TINY
    from safetransfer.data.preparation import prepare_data
    from safetransfer.data.targets.demo import DemoTarget
    from safetransfer.job.run import run_seed

    cfg = compose_cfg(
        *TINY,
        "train.iterations=4",
        "optim.scheduler.milestones=[3]",
        "logger=tensorboard",
        "runtime.log_every=2",
        "runtime.diagnostics_every=2",
        "runtime.eval_every=2",
    )
    target = DemoTarget(train_images_per_class=10, test_images_per_class=4, sampling_rate=50)
    run_seed(cfg, 0, prepare_data(cfg, target), None, tmp_path)
    events = EventAccumulator(str(tmp_path / "seed_0" / "tensorboard"))
    events.Reload()
    with open(tmp_path / "seed_0" / "log.csv") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("loss_J", "train_acc", "test_loss", "angle_d_J"):
        scalars = events.Scalars(column)
        assert [s.step for s in scalars] == [int(r["iteration"]) for r in rows]
        assert [s.value for s in scalars] == pytest.approx([float(r[column]) for r in rows], rel=1e-6)


def test_tensorboard_logger_missing_is_one_clear_line(compose_cfg, monkeypatch):
    import importlib.util

    from safetransfer.common.errors import ConfigError
    from safetransfer.job.checks import check_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match="logger=tensorboard needs the tensorboard package: pip install tensorboard"):
        check_config(compose_cfg("logger=tensorboard"))


def test_a_damaged_log_or_metrics_file_is_named_and_skipped(compose_cfg, tmp_path, caplog):
    cfg = compose_cfg("target.sampling_rate=30")
    for seed in (0, 1, 2):
        write_seed(tmp_path / "run", cfg, seed)
    (tmp_path / "run" / "seed_1" / "metrics.json").write_text('{"seed": 1, "config": {')
    (tmp_path / "run" / "seed_2" / "log.csv").write_text("")
    (tmp_path / "run" / "seed_0" / "spectrum.json").write_text("[")
    runs = load_runs([tmp_path / "run"])
    assert [r.seed for r in runs] == [0] and runs[0].spectrum is None
    for name in ("seed_1/metrics.json", "seed_2/log.csv", "seed_0/spectrum.json"):
        assert str(tmp_path / "run" / name) in caplog.text


def test_an_unwritable_out_folder_is_one_line(compose_cfg, tmp_path, capsys):
    write_seed(tmp_path / "run", compose_cfg(), 0)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as stop:
        main([str(tmp_path / "run"), "--out", str(tmp_path / "afile" / "figures")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"safetransfer-plot: error: --out {tmp_path / 'afile' / 'figures'} is not a writable")


def _figures(monkeypatch):
    """The figures the plot functions draw, captured as _save writes them (legend added, drawn)."""
    from safetransfer.reporting import plots

    captured, save = {}, plots._save

    def keep(plt, figure, path, *rest):
        captured[path.name] = figure  # a closed figure keeps its axes, lines and legend
        return save(plt, figure, path, *rest)

    monkeypatch.setattr(plots, "_save", keep)
    return captured


def test_grid_settings_are_separate_curves_one_colour_per_method_legends_off_the_data(
    compose_cfg, tmp_path, monkeypatch, capsys
):
    """Two alphas of L2-SP are two curves named by alpha (they were averaged into one "L2-SP"); a
    method has the same colour in every figure; no legend covers an axis; a run logged on one row
    only gets a line saying why its loss figure is missing."""
    figures = _figures(monkeypatch)
    for number, alpha in enumerate((0.01, 0.1)):
        cfg = compose_cfg(
            "source=demo", "regularizer=l2sp", f"regularizer.terms.l2sp.alpha={alpha}", "target.val_fraction=0.2"
        )
        for seed in range(2):
            write_seed(tmp_path / "sweep" / str(number), cfg, seed)
            metrics = tmp_path / "sweep" / str(number) / f"seed_{seed}" / "metrics.json"
            metrics.write_text(metrics.read_text().replace('"top1"', '"val_top1": 50.0, "top1"'))
    for seed in range(2):  # the same validation split: one setting, so the table names it plainly
        write_seed(tmp_path / "sweep" / "2", compose_cfg("source=demo", "target.val_fraction=0.2"), seed)
    main([str(tmp_path / "sweep"), "--out", str(tmp_path / "figures")])
    losses = figures["losses.png"]
    lines = {line.get_label(): line for line in losses.axes[0].lines if line.get_linestyle() == "-"}
    assert {"L2-SP l2sp.alpha=0.01", "L2-SP l2sp.alpha=0.1", "Fine-tuning"} <= set(lines)
    # the same method, the same colour: the losses' line and the table's bars; a grid's settings in their
    # method's colour, told apart by their markers (shades of one colour could not be)
    import matplotlib.colors

    def bar_colour(method):
        bars = next(c for c in figures["table.png"].axes[0].containers if c.get_label() == method)
        return matplotlib.colors.to_hex(bars.patches[0].get_facecolor())

    def colour(label):
        return matplotlib.colors.to_hex(lines[label].get_color())

    assert colour("Fine-tuning") == bar_colour("Fine-tuning")
    assert colour("L2-SP l2sp.alpha=0.01") == colour("L2-SP l2sp.alpha=0.1") == bar_colour("L2-SP")
    assert colour("Fine-tuning") != bar_colour("L2-SP")
    markers = {lines[label].get_marker() for label in ("L2-SP l2sp.alpha=0.01", "L2-SP l2sp.alpha=0.1")}
    assert len(markers) == 2 and "None" not in markers
    for name, figure in figures.items():
        assert figure.legends, name
        box = figure.legends[0].get_window_extent()
        assert not any(box.overlaps(axis.get_window_extent()) for axis in figure.axes), name

    for seed in range(2):  # one logged row: nothing to draw, and a line saying why
        write_seed(tmp_path / "short" / "0", compose_cfg("source=demo", "train.iterations=60"), seed, iterations=(60,))
    capsys.readouterr()
    main([str(tmp_path / "short"), "--out", str(tmp_path / "short_figures")])
    printed = capsys.readouterr().out
    assert (
        "losses.png not drawn: every run logged fewer than two rows (runtime.log_every=100 over 60 iterations)"
        in printed
        and "runtime.log_every=6" in printed
    )
    assert not (tmp_path / "short_figures" / "losses.png").exists()


def _scored(directory, cfg, seed, top1, val_top1=None):
    write_seed(directory, cfg, seed)
    metrics_path = directory / f"seed_{seed}" / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics.update(top1=top1, **({"val_top1": val_top1} if val_top1 is not None else {}))
    metrics_path.write_text(json.dumps(metrics))


@pytest.mark.e2e  # six figures of a 20-job sweep (about 8 s): the default tier's time budget
def test_a_sweep_over_two_targets_and_two_sources_and_a_grid_gives_figures_that_scale(
    compose_cfg, tmp_path, monkeypatch
):
    """Issue 40, on sweeps of tiny runs: two targets x two sources (each beside From scratch) and a 2 x 2 grid
    with a validation split. Each figure exists, is not blank, has one panel per facet its CSV names, and its
    legend covers no axis; the search marks the best mean validation top-1; the heatmap's gains are the
    paired differences over From scratch computed here by hand."""
    import itertools

    import pandas as pd

    figures = _figures(monkeypatch)
    sources = {"demo": ["source=demo"], "pretrained:cub200": ["source=pretrained", "source.dataset=cub200"]}
    scores = {}  # (target, source) -> per-seed top-1 of Fine-tuning; (target, "scratch") for From scratch
    job = itertools.count()
    for t, target in enumerate(("demo", "cub200")):
        for s_, (label, chosen) in enumerate(sources.items()):
            scores[target, label] = [60.0 + 5 * t + 3 * s_ + 1.5 * seed for seed in range(3)]
            cfg = compose_cfg(f"target={target}", *chosen, "method=fine_tuning")
            for seed in range(3):
                _scored(tmp_path / "sweep" / str(next(job)), cfg, seed, scores[target, label][seed])
        scores[target, "scratch"] = [55.0 + 2 * t + 0.5 * seed * seed for seed in range(3)]
        cfg = compose_cfg(f"target={target}", "method=from_scratch")
        for seed in range(3):
            _scored(tmp_path / "sweep" / str(next(job)), cfg, seed, scores[target, "scratch"][seed])
    vals = {}
    for alpha, decay in itertools.product((0.01, 0.1), (0.5, 1.0)):
        vals[alpha, decay] = 50 + 100 * alpha - 4 * decay  # best: alpha 0.1, decay 0.5
        cfg = compose_cfg(
            "source=demo", "method=l2sp", f"regularizer.terms.l2sp.alpha={alpha}",
            f"regularizer.terms.l2sp.decay={decay}", "target.val_fraction=0.2",
        )  # fmt: skip
        for seed in range(2):
            _scored(tmp_path / "grid" / str(next(job)), cfg, seed, 70.0 + seed + alpha, vals[alpha, decay] + seed)
    out = tmp_path / "figures"
    main([str(tmp_path / "sweep"), str(tmp_path / "grid"), "--out", str(out)])

    for name in ("losses", "angles", "spectra", "table", "search", "sweep"):
        assert_png(out / f"{name}.png")
        data = pd.read_csv(out / f"{name}.csv")
        figure = figures[f"{name}.png"]
        for legend in figure.legends:
            box = legend.get_window_extent()
            assert not any(box.overlaps(axis.get_window_extent()) for axis in figure.axes), name
        panels = data["panel"].nunique()
        drawn = [a for a in figure.axes if a.get_label() != "<colorbar>"]
        per_panel = {"angles": 3, "spectra": 2}.get(name, 1)
        if name != "table":
            assert len(drawn) == panels * per_panel, (name, len(drawn), panels)
    # facets: each target with each source (From scratch in both of its target's panels), plus the grid's cell
    assert sorted(pd.read_csv(out / "losses.csv")["panel"].unique()) == [
        "cub200 100% [demo]", "cub200 100% [pretrained:cub200]", "demo 100% [demo]", "demo 100% [pretrained:cub200]",
    ]  # fmt: skip
    search = pd.read_csv(out / "search.csv")
    assert len(search) == 4 and search["chosen"].sum() == 1
    best = search.loc[search["chosen"]].iloc[0]
    assert best["val_mean"] == max(v + 0.5 for v in vals.values())  # the mean over seeds 0 and 1
    assert "alpha=0.1" in best["setting"] and "decay=0.5" in best["setting"]
    gains = pd.read_csv(out / "sweep.csv").set_index(["source", "cell"])
    for target, source in itertools.product(("demo", "cub200"), sources):
        by_hand = np.mean(np.subtract(scores[target, source], scores[target, "scratch"]))
        assert gains.loc[(source, f"{target} 100%"), "gain"] == pytest.approx(by_hand)
        assert gains.loc[(source, f"{target} 100%"), "over"] == "From scratch"


@pytest.mark.e2e  # matplotlib's layout of a squeezed figure takes seconds
def test_a_figure_matplotlib_cannot_lay_out_is_not_written_and_a_line_says_so(
    compose_cfg, tmp_path, monkeypatch, caplog
):
    """Never a broken PNG: when the panels get no room (here: forced by a panel height of a hair), matplotlib
    warns that its layout collapsed; the figure is then not written, nor its CSV, and one line says why."""
    from safetransfer.reporting import plots

    for seed in range(2):
        write_seed(tmp_path / "run", compose_cfg("regularizer=l2sp"), seed)
    monkeypatch.setattr(plots, "PANEL_HEIGHT", 0.01)
    monkeypatch.setattr(plots, "LEGEND_ROW", 0.01)
    with caplog.at_level("INFO"):
        assert plots.plot_losses(load_runs([tmp_path / "run"]), tmp_path / "losses.png") is None
    assert "losses.png not drawn: its panels had no room" in caplog.text
    assert not (tmp_path / "losses.png").exists() and not (tmp_path / "losses.csv").exists()

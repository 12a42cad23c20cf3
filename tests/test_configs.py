"""Every choice of every config group composes, resolves and builds its object."""

from importlib import resources

import pytest
import torch
from omegaconf import OmegaConf

from safetransfer.commands.train import group_options
from safetransfer.common.errors import ConfigError
from safetransfer.common.registry import build
from safetransfer.data.targets.base import Target
from safetransfer.job.build import create_omega, create_optimizer
from safetransfer.job.checks import check_config
from safetransfer.reporting.methods import method_name
from safetransfer.sources.base import Source
from safetransfer.training.directions import Direction
from safetransfer.training.regularizers import Omega

#: choices with a value the user must give (`???` in their YAML)
MANDATORY = {
    ("source", "file"): ["source.path=/some/checkpoint.pth"],
    ("source", "pretrained"): ["source.dataset=demo"],
    ("experiment", "dtnh_tables"): ["results.table=dtnh_table2"],
}
GROUPS = ["backbone", "source", "target", "regularizer", "direction", "optim", "experiment", "method"]


def test_every_group_exists_with_options():
    conf = resources.files("safetransfer.conf")
    for group in GROUPS:
        assert conf.joinpath(group).is_dir(), group
        assert group_options(group), f"group {group} has no options"
    assert group_options("train") is None  # a plain section, not a group
    assert set(group_options("backbone")) >= {"resnet18", "resnet50"}
    assert set(group_options("source")) >= {"scratch", "demo"}
    assert set(group_options("target")) >= {"demo", "imagefolder"}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in group_options(g)])
def test_each_option_composes_and_resolves(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}", *MANDATORY.get((group, option), []))
    container = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if group not in ("experiment", "method"):
        assert OmegaConf.to_container(cfg[group], resolve=True) == container[group]
    if group == "backbone":
        assert cfg.backbone.name == option
    if group in ("source", "target"):
        assert cfg[group].name == option
    if group == "source":
        assert isinstance(build("source", cfg.source, "source"), Source)
    if group == "target":
        target = (
            build("target", {**cfg.target, "root": "/nonexistent"}, "target")
            if "root" in cfg.target
            else build("target", cfg.target, "target")
        )
        assert isinstance(target, Target)
        assert target.sampling_rate == cfg.target.sampling_rate
    if group == "regularizer":
        omega = create_omega(cfg)
        assert isinstance(omega, Omega) and omega.terms
    if group == "direction":
        assert isinstance(build("direction", cfg.direction, "direction"), Direction)
    if group == "optim":
        assert cfg.optim.optimizer.weight_decay == 0, "all regularization must be an Omega term"


def test_root_config_is_the_papers_protocol(compose_cfg):
    cfg = compose_cfg()
    assert cfg.seeds == [0, 1, 2, 3, 4]
    assert cfg.train.batch_size == 48 and cfg.train.iterations == 8000
    assert cfg.optim.optimizer.lr == 0.01 and cfg.optim.optimizer.momentum == 0.9
    assert cfg.optim.head_lr_mult == 10
    assert cfg.optim.scheduler.gamma == 0.1
    model = torch.nn.Linear(2, 2)
    assert create_optimizer(
        cfg, type("Net", (), {"parameter_groups": lambda self: {"backbone": [model.weight], "head": [model.bias]}})()
    )[1].milestones == {6000: 1}  # the papers' drop
    assert (cfg.data.resize, cfg.data.crop) == (256, 224)
    assert cfg.runtime.device == "auto"
    assert method_name(cfg) == "From scratch"  # the root config's source is scratch


def test_demo_experiment_is_a_sweep_over_methods(compose_cfg):
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=demo"], return_hydra_config=True)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert cfg.hydra.sweeper.params.method == "fine_tuning,l2sp,dtnh_l2sp,l2sp_bss,from_scratch"
    assert cfg.source.name == "demo" and cfg.target.name == "demo"
    assert 0 < cfg.target.sampling_rate < 100


@pytest.mark.parametrize(
    "regularizer,direction,name",
    [
        ("l2", "sum", "Fine-tuning"),
        ("l2sp", "sum", "L2-SP"),
        ("l2sp", "dtnh", "DTNH (L2-SP)"),
        ("knowdist", "sum", "KnowDist"),
        ("knowdist", "dtnh", "DTNH (KnowDist)"),
        ("l2_bss", "sum", "L2+BSS"),
        ("l2sp_bss", "sum", "L2-SP+BSS"),
        ("delta", "sum", "DELTA"),
        ("delta_bss", "sum", "DELTA+BSS"),
        ("delta_bss", "dtnh", "DTNH (DELTA+BSS)"),
        ("knowdist_bss", "sum", "KnowDist+BSS"),
    ],
)
def test_method_names_follow_regularizer_and_direction(compose_cfg, regularizer, direction, name):
    assert method_name(compose_cfg("source=imagenet", f"regularizer={regularizer}", f"direction={direction}")) == name


def test_plain_fine_tuning_from_scratch_is_named_from_scratch(compose_cfg):
    """The no-transfer baseline is "From scratch" (it was "Fine-tuning", like the transfer row);
    another method from scratch keeps its name (the source column says scratch)."""
    assert method_name(compose_cfg("source=scratch")) == "From scratch"
    assert method_name(compose_cfg("method=from_scratch", "source=imagenet")) == "From scratch"
    assert method_name(compose_cfg("source=scratch", "method=l2")) == "From scratch"  # the BSS paper's L2
    assert method_name(compose_cfg("source=scratch", "regularizer=l2sp")) == "L2-SP"


@pytest.mark.parametrize(
    "regularizer,terms",
    [
        ("l2", ["l2"]),
        ("l2sp", ["head", "l2sp"]),
        ("knowdist", ["head", "knowdist"]),
        ("delta", ["head", "delta"]),
        ("l2_bss", ["l2", "bss"]),
        ("l2sp_bss", ["head", "l2sp", "bss"]),
        ("delta_bss", ["head", "delta", "bss"]),
    ],
)
def test_sums_hold_the_terms_of_their_parts(compose_cfg, regularizer, terms):
    assert list(compose_cfg(f"regularizer={regularizer}").regularizer.terms) == terms


def test_method_presets_win_over_the_experiments_choices(compose_cfg):
    cfg = compose_cfg("experiment=demo", "method=from_scratch")
    assert cfg.source.name == "scratch"
    cfg = compose_cfg("experiment=demo", "method=dtnh_l2sp")
    assert cfg.source.name == "demo" and method_name(cfg) == "DTNH (L2-SP)"


#: the paper tables: preset -> (backbone, source, iterations per target, the paper's methods)
TABLES = {
    "dtnh_table2": ("resnet18", "imagenet"),
    "dtnh_table3": ("resnet18", "places365"),
    "dtnh_table4": ("resnet18", "stanford_dogs"),
    "bss_table2": ("resnet50", "imagenet"),
}


@pytest.mark.e2e  # every cell of four tables composed: 6 s
@pytest.mark.parametrize("table", sorted(TABLES))
def test_every_cell_of_every_paper_table_composes_and_resolves(table):
    """The preset's jobs compose and resolve to the paper's protocol, and the cells its sweep
    makes are exactly the published table's cells. A target, a method and a sampling rate are
    independent overlays of the preset, so every target is composed with the first method, every
    method with the first target, and the first pair at every rate (a cell is named by its
    target's dataset and its method's name)."""
    import itertools

    from hydra import compose, initialize_config_module

    from safetransfer.reporting.tables import published_values

    backbone, source = TABLES[table]
    with initialize_config_module(config_module="safetransfer.conf", version_base="1.3"):
        preset = compose("config", overrides=[f"experiment={table}"], return_hydra_config=True)
        assert str(preset.hydra.mode) == "RunMode.MULTIRUN"
        params = {key: str(value).split(",") for key, value in preset.hydra.sweeper.params.items()}
        first = {key: values[0] for key, values in params.items()}
        spanning = [{**first, key: value} for key, values in params.items() for value in values]
        datasets, names = {}, {}
        for chosen in spanning:
            overrides = [f"experiment={table}", *(f"{k}={v}" for k, v in chosen.items())]
            cfg = OmegaConf.create(OmegaConf.to_container(compose("config", overrides=overrides), resolve=True))
            assert (cfg.backbone.name, cfg.source.name) == (backbone, source)
            assert cfg.seeds == [0, 1, 2, 3, 4] and cfg.train.batch_size == 48
            # DTNH: lr 0.01, momentum 0.9; BSS: the head's lr 0.01 (0.001 is searched), backbone / 10, momentum 0.95
            lr, momentum = (0.01, 0.9) if table.startswith("dtnh") else (0.001, 0.95)
            assert cfg.optim.optimizer.lr == lr and cfg.optim.optimizer.momentum == momentum
            assert cfg.optim.head_lr_mult == 10 and cfg.optim.scheduler.gamma == 0.1
            assert cfg.results.table == table and cfg.results.published == table
            assert float(cfg.target.sampling_rate) == float(chosen.get("target.sampling_rate", 100))
            if table.startswith("dtnh"):
                long = cfg.target.name == "cifar10"
                assert cfg.train.iterations == (20000 if long else 8000)
                assert list(cfg.optim.scheduler.milestones) == [6000]  # "divided by 10 after 6000 iterations"
            else:
                assert cfg.train.iterations == 9000 and list(cfg.optim.scheduler.milestones) == [6000]
                if "bss" in cfg.regularizer.terms:
                    assert (cfg.regularizer.terms.bss.eta, cfg.regularizer.terms.bss.k) == (0.001, 1)
                if "l2" in cfg.regularizer.terms:
                    assert cfg.regularizer.terms.l2.alpha == 5e-4
            build("source", cfg.source, "source")
            datasets[chosen.get("target")] = cfg.target.name
            names[chosen.get("method")] = method_name(cfg)
        cells = {
            (datasets[job.get("target")], float(job.get("target.sampling_rate", 100)), names[job.get("method")])
            for job in (dict(zip(params, values)) for values in itertools.product(*params.values()))
        }
    published = published_values(table)
    assert cells == set(zip(published["target"], published["sampling_rate"], published["method"]))


def test_a_term_setting_beside_a_method_sweep_takes_force_add(compose_cfg):
    """README: `-m method=l2sp,dtnh_l2sp ++regularizer.terms.l2sp.alpha=10`. Hydra composes
    the sweep's first config without the swept method, where the plain override has no key
    to set; `++` adds it there and sets it in every job."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="l2sp"):
        compose_cfg("regularizer.terms.l2sp.alpha=10")  # the sweep's first config: regularizer l2
    compose_cfg("++regularizer.terms.l2sp.alpha=10")
    for method in ("l2sp", "dtnh_l2sp"):
        cfg = compose_cfg(f"method={method}", "++regularizer.terms.l2sp.alpha=10")
        assert cfg.regularizer.terms.l2sp.alpha == 10
        assert cfg.regularizer.terms.l2sp.kind == "l2sp"


def test_a_shorter_run_keeps_its_lr_drop_at_the_same_fraction(compose_cfg):
    """train.iterations=300 alone just works: the default drop is 0.75 of the run."""
    cfg = compose_cfg("train.iterations=300")
    check_config(cfg)
    model = torch.nn.Linear(2, 2)
    net = type("Net", (), {"parameter_groups": lambda self: {"backbone": [model.weight], "head": [model.bias]}})()
    optimizer, scheduler = create_optimizer(cfg, net)
    lrs = []
    for _ in range(300):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[224] == pytest.approx(0.01) and lrs[225] == pytest.approx(0.001)  # divided after 225 = 0.75 x 300


def test_a_papers_absolute_drop_beyond_a_shortened_run_is_one_line(compose_cfg):
    cfg = compose_cfg("experiment=dtnh_table2", "train.iterations=300")
    assert list(cfg.optim.scheduler.milestones) == [6000]  # the paper's preset keeps its absolute drop
    with pytest.raises(ConfigError, match=r"milestones=\[6000\] lie beyond train.iterations=300.*milestones=\[0.75\]"):
        check_config(cfg)


def test_the_configs_comments_list_exactly_the_choices_the_code_declares():
    """conf/config.yaml documented `precision: fp16`, which the check refused: each key's comment
    now lists the choices declared once where they are implemented."""
    import re

    from safetransfer.data.augment import AUGMENT_ON
    from safetransfer.training.engine import PRECISIONS
    from safetransfer.training.train_log import LOGGERS, PROGRESS

    text = (resources.files("safetransfer.conf") / "config.yaml").read_text()

    def documented(key):
        comment = re.search(rf"^\s*{key}: \S+\s+# (.*)$", text, re.MULTILINE).group(1)
        depth, plain = 0, ""
        for char in comment:  # the comment without its parenthesised asides
            depth += char == "("
            plain += char if depth == 0 else ""
            depth -= char == ")"
        return {choice.strip() for choice in plain.split("|")}

    assert documented("precision") == set(PRECISIONS)
    assert documented("augment_on") == set(AUGMENT_ON)
    assert documented("progress") == set(PROGRESS)
    assert documented("logger") == set(LOGGERS)

"""Source checkpoints: each real layout converted key by key, and every failure's message.
Nothing downloads: fake checkpoints are written in the official layouts."""

import argparse
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from safetransfer.common import downloads
from safetransfer.common.downloads import file_digest
from safetransfer.common.errors import ConfigError, DownloadError
from safetransfer.sources import checkpoint_files, demo, local, published
from safetransfer.sources.local import FileSource
from safetransfer.sources.published import ImageNetSource
from safetransfer.training.backbones import create_backbone


def full_resnet_state(name, seed=0):
    """What torchvision saves for a classification ResNet: backbone keys plus fc.*."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(name, weights=None, num_classes=1000).state_dict()


def assert_same_backbone(loaded, reference):
    expected = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_torchvision_layout(tmp_path):
    state = full_resnet_state("resnet18")
    torch.save(state, tmp_path / "resnet18.pth")
    loaded = FileSource(str(tmp_path / "resnet18.pth")).backbone_state("resnet18")
    assert_same_backbone(loaded, state)
    create_backbone("resnet18").load_state_dict(loaded)  # fits the backbone exactly


def test_csail_places365_layout(tmp_path):
    state = full_resnet_state("resnet18", seed=1)
    state["fc.weight"] = torch.randn(365, 512)
    state["fc.bias"] = torch.randn(365)
    torch.save(
        {
            "epoch": 90,
            "arch": "resnet18",
            "best_prec1": 54.74,
            "state_dict": {f"module.{k}": v for k, v in state.items()},
        },
        tmp_path / "resnet18_places365.pth.tar",
    )
    loaded = FileSource(str(tmp_path / "resnet18_places365.pth.tar")).backbone_state("resnet18")
    assert_same_backbone(loaded, state)


def test_safetransfer_layout(tmp_path):
    backbone = create_backbone("resnet18").state_dict()
    torch.save(
        {"safetransfer_source": {"backbone": "resnet18", "dataset": "demo"}, "state_dict": backbone},
        tmp_path / "mine.pt",
    )
    assert_same_backbone(FileSource(str(tmp_path / "mine.pt")).backbone_state("resnet18"), backbone)


def test_architecture_mismatch_is_named(tmp_path):
    torch.save(full_resnet_state("resnet50"), tmp_path / "r50.pth")
    with pytest.raises(ConfigError, match="bottleneck ResNet .* do not fit backbone=resnet18"):
        FileSource(str(tmp_path / "r50.pth")).backbone_state("resnet18")


def test_a_resnet18_checkpoint_of_other_shapes_names_the_tensor_and_both_shapes(tmp_path):
    """The message was a contradiction: "holds weights of a basic-block ResNet ... do not fit resnet18"."""
    state = full_resnet_state("resnet18")
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)  # a ResNet-18 of another width
    torch.save(state, tmp_path / "narrow.pth")
    with pytest.raises(ConfigError) as caught:
        FileSource(str(tmp_path / "narrow.pth")).backbone_state("resnet18")
    message = str(caught.value)
    assert "layer1.0.conv1.weight has shape [32, 64, 3, 3] where backbone=resnet18 has [64, 64, 3, 3]" in message
    assert "basic-block" not in message


@pytest.mark.parametrize("value", [5, "x", [1, 2]])
def test_a_checkpoint_holding_values_that_are_not_tensors_is_one_line(tmp_path, value):
    """CSAIL's layout (a state_dict under "state_dict") whose entries are not all tensors: it
    was an AttributeError traceback ('int' object has no attribute 'shape')."""
    state = {f"module.{k}": v for k, v in full_resnet_state("resnet18").items()}
    state["module.conv1.weight"] = value
    torch.save({"epoch": 1, "arch": "resnet18", "state_dict": state}, tmp_path / "odd.pth.tar")
    with pytest.raises(ConfigError, match=r"weights hold values that are not tensors \(\[module.conv1.weight\]"):
        FileSource(str(tmp_path / "odd.pth.tar")).backbone_state("resnet18")


def test_a_small_file_declaring_gigabytes_is_refused_before_it_is_unpacked(tmp_path, monkeypatch):
    """torch.save writes a zip whose entries are stored, not compressed; a deflated entry of
    zeros can declare far more than it takes (45 MB declaring 2 GiB took 2.9 GB of memory before
    it was refused). Here 512 MiB of zeros, deflated to about 0.5 MB, inside a real ResNet-18
    file: refused from the zip's own directory, torch.load never called."""
    import zipfile

    path = tmp_path / "inflated.pth"
    torch.save(full_resnet_state("resnet18"), path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("inflated/data/999", "w", force_zip64=True) as entry:
            zeros = bytes(2**24)
            for _ in range(32):
                entry.write(zeros)
    assert path.stat().st_size < 50 * 2**20

    def never(*args, **kwargs):
        raise AssertionError("torch.load must not run on such a file")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(ConfigError, match=r"declares \d+ MiB once unpacked, more than a backbone=resnet18"):
        FileSource(str(path)).backbone_state("resnet18")


def test_missing_and_unexpected_keys(tmp_path):
    state = full_resnet_state("resnet18")
    del state["layer4.1.bn2.running_var"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(
        ConfigError, match=r"missing keys \[layer4.1.bn2.running_var\], unexpected keys \[extra.weight\]"
    ):
        FileSource(str(tmp_path / "odd.pth")).backbone_state("resnet18")
    loaded = FileSource(str(tmp_path / "odd.pth"), strict=False).backbone_state("resnet18")
    assert "layer4.1.bn2.running_var" not in loaded


def test_truncated_file(tmp_path):
    torch.save(full_resnet_state("resnet18"), tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="is truncated or not a PyTorch checkpoint"):
        FileSource(str(tmp_path / "cut.pth")).backbone_state("resnet18")


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        FileSource(str(tmp_path / "nope.pth")).backbone_state("resnet18")


def test_pickled_objects_are_refused_and_the_conversion_command_fixes_them(tmp_path, capsys):
    state = full_resnet_state("resnet18")
    # an argparse.Namespace, as many training scripts store their arguments: weights_only refuses it
    torch.save({"args": argparse.Namespace(lr=0.1), "state_dict": state}, tmp_path / "legacy.pth")
    with pytest.raises(ConfigError, match="safetransfer-convert-checkpoint .*legacy.pth"):
        FileSource(str(tmp_path / "legacy.pth")).backbone_state("resnet18")
    checkpoint_files.convert_main([str(tmp_path / "legacy.pth"), str(tmp_path / "converted.pt")])
    assert "csail layout" in capsys.readouterr().out
    assert_same_backbone(FileSource(str(tmp_path / "converted.pt")).backbone_state("resnet18"), state)


def test_a_text_file_as_source_path_is_one_line(tmp_path):
    """It was a `KeyError: 101` traceback from the legacy unpickler."""
    (tmp_path / "notes.txt").write_text("experiment notes, not weights\n")
    with pytest.raises(ConfigError, match="notes.txt is truncated or not a PyTorch checkpoint"):
        FileSource(str(tmp_path / "notes.txt")).backbone_state("resnet18")


def test_the_converter_takes_a_whole_pickled_model(tmp_path, capsys):
    """torch.save(model): weights_only loading refuses it and points to the converter, which
    takes the model's state_dict (it failed on a pickled nn.Module)."""
    model = torchvision.models.resnet18(weights=None)
    torch.save(model, tmp_path / "whole.pth")
    with pytest.raises(ConfigError, match="safetransfer-convert-checkpoint"):
        FileSource(str(tmp_path / "whole.pth")).backbone_state("resnet18")
    checkpoint_files.convert_main([str(tmp_path / "whole.pth"), str(tmp_path / "plain.pt")])
    assert "torchvision layout" in capsys.readouterr().out
    assert_same_backbone(FileSource(str(tmp_path / "plain.pt")).backbone_state("resnet18"), model.state_dict())


@pytest.mark.parametrize("what,expected", [("missing", "no such file"), ("text", "is not a PyTorch checkpoint")])
def test_the_converter_refuses_what_is_not_a_checkpoint_in_one_line(tmp_path, capsys, what, expected):
    source = tmp_path / "in.pth"
    if what == "text":
        source.write_text("hello\n")
    with pytest.raises(SystemExit) as stop:
        checkpoint_files.convert_main([str(source), str(tmp_path / "out.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("safetransfer-convert-checkpoint: error: ")
    assert expected in err[0] and not (tmp_path / "out.pt").exists()


# ---------------------------------------------------------------- ImageNet (torchvision's weights API)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.mark.parametrize(
    "backbone,weights,file_name",
    [
        ("resnet18", "IMAGENET1K_V1", "resnet18-f37072fd.pth"),
        ("resnet50", "IMAGENET1K_V1", "resnet50-0676ba61.pth"),
        ("resnet50", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
    ],
)
def test_imagenet_uses_the_file_in_torchvisions_cache(torch_home, monkeypatch, backbone, weights, file_name):
    def no_network(*args, **kwargs):
        raise AssertionError("a cached file must not be downloaded again")

    monkeypatch.setattr(downloads, "stream", no_network)
    torch_home.mkdir(parents=True)
    state = full_resnet_state(backbone)
    torch.save(state, torch_home / file_name)
    # the fake file cannot match torchvision's published hash: checked, it is refused ...
    with pytest.raises(DownloadError, match=f"does not match the published {file_name.split('-')[1][:8]}"):
        ImageNetSource(weights=weights).backbone_state(backbone)
    # ... and with the check off its tensors are loaded as they are
    assert_same_backbone(ImageNetSource(weights=weights, verify=False).backbone_state(backbone), state)


def test_imagenet_offline_names_url_and_path(torch_home, monkeypatch):
    def offline(url, handle, settings):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(downloads, "stream", offline)
    with pytest.raises(DownloadError) as error:
        ImageNetSource().backbone_state("resnet18")
    message = str(error.value)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(torch_home / "resnet18-f37072fd.pth") in message


def test_imagenet_v2_does_not_exist_for_resnet18():
    with pytest.raises(ConfigError, match="IMAGENET1K_V2 does not exist for backbone=resnet18"):
        ImageNetSource(weights="IMAGENET1K_V2").backbone_state("resnet18")


def test_end_to_end_run_from_a_file_source(cli, tmp_path):
    from conftest import TINY, table_rows

    torch.save(full_resnet_state("resnet18", seed=3), tmp_path / "source.pth")
    result = cli(*TINY, "source=file", f"source.path={tmp_path / 'source.pth'}", "regularizer=l2sp", "results.dir=res")
    assert result.returncode == 0, result.stderr[-3000:]

    row = table_rows(tmp_path / "res", "demo").iloc[0]
    assert row["source"] == "file:source" and row["method"] == "L2-SP"  # a file source is named with its file


def test_file_source_without_a_path_is_one_line(cli):
    from conftest import TINY

    result = cli(*TINY, "source=file")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "safetransfer-train: error: source=file needs source.path: set source.path=/path/to/checkpoint.pth"
    )


# ---------------------------------------------------------------- source pretraining (the Stanford Dogs model)


def test_pretraining_mode_makes_a_source_that_a_following_run_loads(cli, tmp_path):
    from conftest import TINY

    made = tmp_path / "sources" / "resnet18_demo.pt"
    result = cli(*TINY, "experiment=pretrain_source", "source=scratch", f"pretrain.save_to={made}", "results.dir=res")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(made, weights_only=True)
    meta = checkpoint["safetransfer_source"]
    assert meta["backbone"] == "resnet18" and meta["dataset"] == "demo" and meta["iterations"] == 3
    assert meta["source"]["name"] == "scratch" and 0 <= meta["top1"] <= 100
    assert meta["sha256"] == checkpoint_files.state_digest(checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == set(create_backbone("resnet18").state_dict())

    loaded = local.PretrainedSource(str(made), dataset="demo").load("resnet18")
    assert_same_backbone(loaded.backbone, checkpoint["state_dict"])
    # the head it was trained with comes along: the demo target's six classes over 512 features
    assert loaded.head["weight"].shape == (6, 512) and torch.equal(loaded.head["bias"], checkpoint["head"]["bias"])
    again = cli(*TINY, "source=pretrained", "source.dataset=demo", f"source.path={made}", "results.dir=res")
    assert again.returncode == 0, again.stderr[-3000:]


def test_pretrained_source_failures(tmp_path):
    missing = local.PretrainedSource(str(tmp_path / "none.pt"), dataset="stanford_dogs", name="stanford_dogs")
    with pytest.raises(
        ConfigError, match="safetransfer-train experiment=pretrain_source target=stanford_dogs backbone=resnet18"
    ):
        missing.backbone_state("resnet18")

    state = create_backbone("resnet18").state_dict()
    meta = {"backbone": "resnet18", "dataset": "demo", "sha256": checkpoint_files.state_digest(state)}
    torch.save({"safetransfer_source": meta, "state_dict": state}, tmp_path / "ok.pt")
    with pytest.raises(ConfigError, match="not a resnet18 trained on stanford_dogs"):
        local.PretrainedSource(str(tmp_path / "ok.pt"), dataset="stanford_dogs").backbone_state("resnet18")
    state["conv1.weight"] = state["conv1.weight"] + 1e-3  # damaged after writing
    torch.save({"safetransfer_source": meta, "state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="do not match the sha256"):
        local.PretrainedSource(str(tmp_path / "bad.pt"), dataset="demo").backbone_state("resnet18")


def test_state_digest_depends_on_every_value():
    state = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    base = checkpoint_files.state_digest(state)
    assert checkpoint_files.state_digest({"b": torch.ones(2, 2), "a": torch.arange(4.0)}) == base
    assert checkpoint_files.state_digest({"a": torch.arange(4.0), "b": torch.ones(4)}) != base  # shape
    assert checkpoint_files.state_digest({"a": torch.arange(4.0).double(), "b": torch.ones(2, 2)}) != base  # dtype
    changed = {"a": torch.arange(4.0), "b": torch.ones(2, 2)}
    changed["b"][1, 1] = 1.0000001
    assert checkpoint_files.state_digest(changed) != base


# ---------------------------------------------------------------- Places365 (CSAIL checkpoints)


def write_csail(path, backbone="resnet18", seed=2):
    state = full_resnet_state(backbone, seed=seed)
    state["fc.weight"] = torch.randn(365, state["fc.weight"].shape[1])
    state["fc.bias"] = torch.randn(365)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "epoch": 90,
            "arch": backbone,
            "best_prec1": 54.74,
            "state_dict": {f"module.{k}": v for k, v in state.items()},
        },
        path,
    )
    return state


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_places365_checks_the_pinned_sha256(torch_home, monkeypatch, backbone):
    monkeypatch.setattr(downloads, "stream", lambda *a, **k: pytest.fail("must not download"))
    path = torch_home / f"{backbone}_places365.pth.tar"
    state = write_csail(path, backbone)
    digest = file_digest(path)
    assert_same_backbone(published.Places365Source(sha256={backbone: digest}).backbone_state(backbone), state)
    with pytest.raises(DownloadError, match=f"does not match the published {'0' * 64}"):
        published.Places365Source(sha256={backbone: "0" * 64}).backbone_state(backbone)


def test_places365_unpinned_logs_the_digest(torch_home, caplog):
    path = torch_home / "resnet18_places365.pth.tar"
    write_csail(path)
    with caplog.at_level("WARNING"):
        published.Places365Source().backbone_state("resnet18")
    assert f"source.sha256.resnet18={file_digest(path)}" in caplog.text


def test_places365_offline_names_url_and_path(torch_home, monkeypatch):
    def offline(url, handle, settings):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(downloads, "stream", offline)
    with pytest.raises(DownloadError) as error:
        published.Places365Source().backbone_state("resnet50")
    assert "http://places2.csail.mit.edu/models_places365/resnet50_places365.pth.tar" in str(error.value)
    assert str(torch_home / "resnet50_places365.pth.tar") in str(error.value)
    assert not (torch_home / "resnet50_places365.pth.tar").exists()


def test_feature_terms_compare_against_the_same_checkpoint(compose_cfg, tmp_path):
    from safetransfer.job.build import create_model, create_omega
    from safetransfer.training.regularizers import BindContext

    state = full_resnet_state("resnet18", seed=5)
    torch.save(state, tmp_path / "src.pth")
    cfg = compose_cfg("source=file", f"source.path={tmp_path / 'src.pth'}", "regularizer=knowdist")
    from safetransfer.common.registry import build

    loaded = build("source", cfg.source, "source").load("resnet18")
    model = create_model(cfg, 3, loaded)
    omega = create_omega(cfg)
    omega.bind(model, BindContext())
    frozen = omega.terms["knowdist"].source.state_dict()
    assert_same_backbone(frozen, state)


def test_stanford_dogs_source_from_the_pretraining_mode(cli, tmp_path):
    """The DTNH Table IV source, made on a Stanford Dogs fixture and loaded by source=stanford_dogs."""
    import fixtures
    from conftest import TINY

    fixtures.make_stanford_dogs(tmp_path / "data", classes=3, train_per_class=4, test_per_class=2)
    dogs = [f"target.root={tmp_path / 'data'}", "target.expected_classes=3", "target.expected_split=[12,6]"]
    shrink = [o for o in TINY if not o.startswith("target.")]
    made = cli(
        *shrink,
        "experiment=pretrain_source",
        "source=scratch",
        "target=stanford_dogs",
        *dogs,
        f"paths.cache_dir={tmp_path / 'cache'}",
        "results.dir=res",
    )
    assert made.returncode == 0, made.stderr[-3000:]
    checkpoint = tmp_path / "cache" / "sources" / "resnet18_stanford_dogs.pt"
    assert torch.load(checkpoint, weights_only=True)["safetransfer_source"]["dataset"] == "stanford_dogs"
    used = cli(*TINY, "source=stanford_dogs", f"paths.cache_dir={tmp_path / 'cache'}", "results.dir=res")
    assert used.returncode == 0, used.stderr[-3000:]
    assert "stanford_dogs" in (tmp_path / "res" / "demo.md").read_text()


def test_a_damaged_cached_demo_source_is_named_and_built_again(tmp_path, caplog):
    """A cut-short demo source file gave a traceback on every run and was never rebuilt: it is
    named in a warning and pretrained again (atomic.built_once, which DELTA's cache shares)."""
    source = demo.DemoSource(cache_dir=str(tmp_path), iterations=4, images_per_class=4, batch_size=8)
    first = source.backbone_state("resnet18")
    path = source.cache_path("resnet18")
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short
    with caplog.at_level("WARNING"):
        again = source.backbone_state("resnet18")
    assert f"{path} cannot be read" in caplog.text and "the demo source model is built again" in caplog.text
    assert all(torch.equal(first[k], again[k]) for k in first)  # the same seeded pretraining
    assert torch.load(path, weights_only=True)["backbone"].keys() == first.keys()


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_source_path_that_is_not_a_regular_file_says_what_it_is(tmp_path, kind):
    """A folder, a pipe or /dev/zero were reported as "no such file" (a pipe would block a read)."""
    import os

    from safetransfer.common.errors import ConfigError
    from safetransfer.sources.local import FileSource

    path = {"folder": tmp_path, "fifo": tmp_path / "pipe", "device": Path("/dev/zero")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ConfigError, match="is a folder" if kind == "folder" else "is not a regular file"):
        FileSource(path=str(path)).load("resnet18")


def test_imagenet_v2_loads_torchvisions_v2_file_checked_against_a_pinned_digest(torch_home, monkeypatch):
    """source=imagenet source.weights=IMAGENET1K_V2 on a file in the V2 structure (tests/published.py): with the
    full digest pinned (source.sha256, as a site's copy is vouched for) it loads, counters and all; one byte
    changed and it is refused."""
    import hashlib

    import published as files  # tests/published.py: the publishers' structures

    monkeypatch.setattr(downloads, "stream", lambda *a, **k: pytest.fail("a present file is not downloaded"))
    path = torch_home / files.IMAGENET_V2_FILES["resnet50"]
    state = files.torchvision_v2_checkpoint(path)
    assert len(state) == 320
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    weights = ImageNetSource(weights="IMAGENET1K_V2", sha256=digest).load("resnet50")
    assert_same_backbone(weights.backbone, state)
    assert weights.head["weight"].shape == (1000, 2048) and len(weights.classes) == 1000
    with pytest.raises(DownloadError):
        ImageNetSource(weights="IMAGENET1K_V2", sha256="0" * 64).load("resnet50")

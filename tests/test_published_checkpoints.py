"""Source checkpoints exactly as their publishers distribute them (tests/published.py says
where each structure comes from): torchvision's 2017 ImageNet ResNets and CSAIL's PyTorch 0.2
Places365 ResNets, read through every source that names them, end to end."""

import zipfile

import pytest
import torch
import torchvision

import published
from conftest import TINY, TINY_DEMO_SOURCE
from safetransfer.common import downloads
from safetransfer.common.downloads import file_digest
from safetransfer.common.errors import ConfigError
from safetransfer.sources import checkpoint_files
from safetransfer.sources.local import FileSource
from safetransfer.sources.published import ImageNetSource, Places365Source
from safetransfer.training.backbones import create_backbone


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(downloads, "stream", lambda *a, **k: pytest.fail("a present file was downloaded"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def assert_loads_as_torchvision_does(state, written, backbone):
    """Our backbone state against torchvision's own strict load of the same tensors (the reference)."""
    reference = torchvision.models.get_model(backbone, num_classes=written["fc.weight"].shape[0])
    reference.load_state_dict(written)  # strict: BatchNorm fills the missing counters itself
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert all(int(state[k]) == 0 for k in state if k.endswith("num_batches_tracked"))
    create_backbone(backbone).load_state_dict(state)  # and it fits ours, strict


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_torchvision_v1_files_load_through_source_imagenet_and_source_file(torch_home, backbone):
    path = torch_home / published.IMAGENET_V1_FILES[backbone]
    written = published.torchvision_v1_checkpoint(path, backbone)
    # the fixture is what the issue describes: zip format, Parameters, no metadata, no counters
    raw = torch.load(path, weights_only=True)
    assert zipfile.is_zipfile(path) and len(raw) == published.IMAGENET_V1_TENSORS[backbone]
    assert not hasattr(raw, "_metadata") and isinstance(raw["conv1.weight"], torch.nn.Parameter)
    assert type(raw["bn1.running_mean"]) is torch.Tensor
    state = ImageNetSource(sha256=file_digest(path)).backbone_state(backbone)
    assert_loads_as_torchvision_does(state, written, backbone)
    assert_loads_as_torchvision_does(FileSource(str(path)).backbone_state(backbone), written, backbone)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_csail_places365_files_load_through_source_places365(torch_home, backbone):
    path = torch_home / f"{backbone}_places365.pth.tar"
    written = published.csail_places365_checkpoint(path, backbone)
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert not zipfile.is_zipfile(path) and sorted(raw) == ["arch", "best_prec1", "epoch", "state_dict"]
    assert all(k.startswith("module.") for k in raw["state_dict"]) and raw["state_dict"]["module.fc.bias"].shape == (
        365,
    )
    state = Places365Source(sha256={backbone: file_digest(path)}).backbone_state(backbone)
    assert_loads_as_torchvision_does(state, written, backbone)
    assert_loads_as_torchvision_does(FileSource(str(path)).backbone_state(backbone), written, backbone)


def test_only_batchnorm_counters_may_be_missing_and_the_hint_fits_the_source(torch_home, tmp_path):
    path = torch_home / published.IMAGENET_V1_FILES["resnet18"]
    written = published.torchvision_v1_checkpoint(path, "resnet18")
    del written["layer1.0.conv1.weight"]
    torch.save(written, path)
    with pytest.raises(ConfigError, match=r"missing keys \[layer1.0.conv1.weight\]") as error:
        ImageNetSource(sha256=file_digest(path)).backbone_state("resnet18")
    assert "source.strict" not in str(error.value) and f"delete {path}" in str(error.value)
    assert "num_batches_tracked" not in str(error.value)
    with pytest.raises(ConfigError, match="set source.strict=false"):
        FileSource(str(path)).backbone_state("resnet18")
    loose = FileSource(str(path), strict=False).backbone_state("resnet18")
    assert "layer1.0.conv1.weight" not in loose and int(loose["bn1.num_batches_tracked"]) == 0


def test_an_html_page_in_place_of_a_checkpoint_is_named_as_such(tmp_path):
    page = tmp_path / "resnet18_places365.pth.tar"
    page.write_text(
        '<!DOCTYPE HTML PUBLIC "-//IETF//DTD HTML 2.0//EN">\n<html><head><title>503 Service '
        "Unavailable</title></head><body></body></html>\n"
    )
    with pytest.raises(ConfigError, match="is an HTML page, not a checkpoint") as error:
        checkpoint_files.read(page)
    assert "convert" not in str(error.value)


@pytest.mark.parametrize("source", ["imagenet", "places365", "file"])
def test_published_files_train_end_to_end(torch_home, tmp_path, train_in_process, source):
    if source == "places365":
        path = torch_home / "resnet18_places365.pth.tar"
        published.csail_places365_checkpoint(path, "resnet18")
        chosen = ["source=places365", f"source.sha256.resnet18={file_digest(path)}"]
    else:
        path = torch_home / published.IMAGENET_V1_FILES["resnet18"]
        published.torchvision_v1_checkpoint(path, "resnet18")
        chosen = (
            ["source=imagenet", f"source.sha256={file_digest(path)}"]
            if source == "imagenet"
            else ["source=file", f"source.path={path}"]
        )
    tiny = [o for o in TINY if o not in TINY_DEMO_SOURCE]
    code, out, err = train_in_process(
        *tiny, *chosen, "results.dir=res", "runtime.diagnostics_every=0", "hydra.run.dir=run"
    )
    assert code == 0, err[-3000:]
    assert (tmp_path / "run" / "seed_0" / "metrics.json").is_file()


@pytest.mark.parametrize("layout", ["imagenet", "places365"])
def test_a_source_keeps_its_own_classifier_and_class_names(torch_home, layout):
    """The source's head is kept apart from the backbone, not thrown away: torchvision's 1000-way `fc`
    with the weights' own category names (torchvision's ImageNet meta), CSAIL's 365-way `module.fc`
    (its names are a separate file, not fetched); the tensors are the file's own."""
    if layout == "imagenet":
        path = torch_home / published.IMAGENET_V1_FILES["resnet18"]
        written = published.torchvision_v1_checkpoint(path, "resnet18")
        found = ImageNetSource(sha256=file_digest(path)).load("resnet18")
        categories = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
        assert found.classes == categories and len(found.classes) == 1000 and found.classes[0] == "tench"
    else:
        path = torch_home / "resnet18_places365.pth.tar"
        written = published.csail_places365_checkpoint(path, "resnet18")
        found = Places365Source(sha256={"resnet18": file_digest(path)}).load("resnet18")
        assert found.classes is None
    assert sorted(found.head) == ["bias", "weight"]
    assert torch.equal(found.head["weight"], written["fc.weight"]) and torch.equal(
        found.head["bias"], written["fc.bias"]
    )
    assert not any(k.startswith("fc.") for k in found.backbone)
    from_file = FileSource(str(path)).load("resnet18")
    assert torch.equal(from_file.head["weight"], written["fc.weight"]) and from_file.classes is None

"""Backbones through the generic tap: torchvision's own forward with forward hooks on named
modules. Checked against a ResNet run stage by stage by hand (what the package did before),
the declared stages of each family against the models torchvision builds, and the checks
that refuse a term a backbone cannot serve, in one line."""

import pytest
import torch
import torchvision

from conftest import TINY, table_rows
from safetransfer.common.errors import ConfigError
from safetransfer.job.checks import check_config
from safetransfer.training.backbones import (
    FAMILY_STAGES,
    TransferNet,
    create_backbone,
    default_stages,
    forward_features,
)


def resnet_by_hand(backbone, images):
    """A torchvision ResNet's forward written out stage by stage."""
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
    maps = {}
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        x = maps[stage] = getattr(backbone, stage)(x)
    return maps, torch.flatten(backbone.avgpool(x), 1)


def test_the_tap_gives_a_resnet_s_stage_maps_and_pooled_features_exactly():
    torch.manual_seed(0)
    backbone = create_backbone("resnet18").double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    maps, pooled = resnet_by_hand(backbone, images)
    features = forward_features(backbone, images, ["layer1", "layer2", "layer3", "layer4", "layer4.1.conv2"])
    assert torch.equal(features.pooled, pooled) and features.pooled.shape == (2, 512)
    for stage, expected in maps.items():
        assert torch.equal(features.maps[stage], expected), stage
    assert features.maps["layer4.1.conv2"].shape == (2, 512, 1, 1)
    assert not backbone._forward_hooks and not backbone.layer4[1].conv2._forward_hooks  # hooks removed


@pytest.mark.parametrize(
    "name,features",
    [("mobilenet_v3_small", 1024), ("resnet50", 2048), ("convnext_tiny", 768)],
)
def test_any_torchvision_classifier_loses_its_last_linear_layer(name, features):
    """The last linear layer's input size is the number of pooled features (MobileNetV3-Small's
    classifier has a 576 -> 1024 layer before it, which stays part of the backbone)."""
    model = torchvision.models.get_model(name, weights=None)
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert last.in_features == features
    with torch.device("meta"):
        net = TransferNet(name, 7)
    assert net.backbone.num_features == features and net.head.in_features == features
    assert not [m for m in net.backbone.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]


def test_a_non_resnet_trains_through_the_same_step():
    torch.manual_seed(0)
    net = TransferNet("mobilenet_v3_small", 3)
    logits, features = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and features.pooled.shape == (2, 1024) and features.maps == {}
    logits.sum().backward()
    assert net.backbone.features[0][0].weight.grad is not None


@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnext50_32x4d", "wide_resnet50_2", "regnet_x_400mf", "convnext_tiny", "densenet121"],
)
def test_each_family_s_stages_are_modules_whose_maps_shrink_in_order(name):
    stages = default_stages(name)
    assert stages in FAMILY_STAGES.values()
    backbone = create_backbone(name).eval()
    assert set(stages) <= {n for n, _ in backbone.named_modules()}
    with torch.no_grad():
        maps = forward_features(backbone, torch.randn(1, 3, 64, 64), stages).maps
    sizes = [maps[stage].shape[-1] for stage in stages]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes


def test_a_family_without_declared_stages_has_none():
    assert default_stages("efficientnet_b0") == () and default_stages("vit_b_16") == ()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["backbone.name=resnet19"], "backbone.name=resnet19 is not one of torchvision's classification models"),
        (
            ["backbone.name=convnext_tiny", "regularizer=knowdist"],
            "regularizer.terms.knowdist.layers=['layer1', 'layer2', 'layer3', 'layer4']: no module layer1, layer2, "
            "layer3, layer4; its stages are features.1, features.3, features.5, features.7",
        ),
        (
            ["backbone.name=convnext_tiny", "regularizer=delta", "regularizer.terms.delta.layers=null"],
            "DELTA's channel attention ablates channels of ResNet stages",
        ),
        (
            ["backbone.name=efficientnet_b0", "regularizer=knowdist", "regularizer.terms.knowdist.layers=null"],
            "layers=[]: empty; this backbone declares no stages (ResNets do: layer1..layer4), so name its modules, "
            "e.g. features, ",
        ),
        (  # a module whose output is a vector, not a map: was an IndexError at the first step
            ["regularizer=knowdist", "regularizer.terms.knowdist.layers=[fc]"],
            "layers=['fc']: fc gives 2-D outputs, not feature maps (batch, channels, height, width)",
        ),
        (
            ["regularizer=knowdist", "regularizer.terms.knowdist.layers=['']"],
            "the backbone itself gives 2-D outputs",
        ),
        (  # a fixed input size: was "Wrong image height! Expected 224 but got 32" at the first step
            ["backbone.name=vit_b_16", "data.crop=32"],
            "backbone.name=vit_b_16 takes 224 x 224 images only, not data.crop=32: set data.crop=224",
        ),
    ],
)
def test_a_term_the_backbone_cannot_serve_is_refused_in_one_line(compose_cfg, overrides, message):
    with pytest.raises(ConfigError) as refused:
        check_config(compose_cfg(*TINY, *overrides))
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_knowdist_on_another_family_reads_its_stages_or_the_modules_named(compose_cfg):
    check_config(
        compose_cfg(
            *TINY, "backbone.name=convnext_tiny", "regularizer=knowdist", "regularizer.terms.knowdist.layers=null"
        )
    )
    check_config(
        compose_cfg(
            *TINY,
            "backbone.name=efficientnet_b0",
            "regularizer=knowdist",
            "regularizer.terms.knowdist.layers=[features.3]",
        )
    )


def test_a_job_trains_and_reports_another_backbone_by_its_torchvision_name(cli, tmp_path):

    result = cli(*TINY, "backbone.name=mobilenet_v3_small", "source=scratch", "regularizer=l2_bss", "results.dir=res")
    assert result.returncode == 0, result.stderr[-2000:]
    row = table_rows(tmp_path / "res", "demo").iloc[0]
    assert row["backbone"] == "mobilenet_v3_small" and row["method"] == "L2+BSS" and 0 <= row["mean"] <= 100


@pytest.mark.parametrize("counters", [True, False])
def test_a_torchvision_checkpoint_of_another_family_loads_without_its_classifier(tmp_path, counters):
    """torchvision's weights files (e.g. mobilenet_v3_small-047dcff4.pth) hold the classification
    model's state_dict as torchvision's model class names it, the 1000-class classifier
    (MobileNetV3-Small: `classifier.3`) included. Whether a given file keeps BatchNorm's
    num_batches_tracked counters was not checked offline (the 2017 ResNet files do not), so
    both are tried; the classifier is dropped, the rest must match."""
    from safetransfer.sources.local import FileSource

    torch.manual_seed(0)
    published = torchvision.models.get_model("mobilenet_v3_small", weights=None).state_dict()
    if not counters:
        published = {k: v for k, v in published.items() if not k.endswith("num_batches_tracked")}
    assert "classifier.3.weight" in published and published["classifier.3.weight"].shape == (1000, 1024)
    torch.save(published, tmp_path / "mobilenet_v3_small.pth")
    state = FileSource(str(tmp_path / "mobilenet_v3_small.pth")).backbone_state("mobilenet_v3_small")
    assert set(state) == set(create_backbone("mobilenet_v3_small").state_dict())
    assert "classifier.0.weight" in state and not any(k.startswith("classifier.3.") for k in state)
    assert torch.equal(state["features.0.0.weight"], published["features.0.0.weight"])


def test_the_source_head_is_kept_beside_the_new_head_frozen_or_trained():
    """TransferNet.keep_source_head: the source model's predictions are the pooled features times the
    source classifier (NumPy); frozen it is in no parameter group, trained it learns with the new head;
    a network that does not keep it has the state_dict it always had."""
    import numpy as np

    from tiny import tiny_resnet

    torch.manual_seed(0)
    model = tiny_resnet(num_classes=3)
    plain_keys = set(model.state_dict())
    head = {"weight": torch.randn(5, 4), "bias": torch.randn(5)}
    kept = model.keep_source_head(head)
    images = torch.randn(2, 3, 8, 8)
    _, features = model(images)
    expected = features.pooled.detach().numpy() @ head["weight"].numpy().T + head["bias"].numpy()
    np.testing.assert_allclose(kept(features.pooled).detach().numpy(), expected, rtol=1e-6, atol=1e-6)
    assert not any(p is kept.weight for p in model.parameter_groups()["head"]) and not kept.weight.requires_grad
    trained = model.keep_source_head(head, trainable=True)
    assert any(p is trained.weight for p in model.parameter_groups()["head"])
    assert set(model.state_dict()) == plain_keys | {"source_head.weight", "source_head.bias"}
    assert set(tiny_resnet(num_classes=3).state_dict()) == plain_keys
    with pytest.raises(ValueError, match="the source head takes 7 features, the backbone gives 4"):
        model.keep_source_head({"weight": torch.randn(5, 7), "bias": torch.randn(5)})

"""Backbones (torchvision classification models) and the transfer network: backbone w_S
plus a new head.

The names in the config (`backbone=resnet18`, `backbone.name=convnext_tiny`) are
torchvision's model names, and they are the names that appear in the results tables. Any
of torchvision's classification models can be named: its last linear layer (the source
task's classifier) is replaced by the identity, so that its own forward returns the pooled
features, and the feature maps the feature-space terms compare are taken from modules by
name, with forward hooks. ResNet-18 and ResNet-50 are the papers' backbones and the defaults.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torchvision
from torch import nn

#: the maps KnowDist and DELTA compare by default, per family (module names, shallow to deep:
#: the output of each stage, where the resolution has just been halved for the last time);
#: a backbone of another family has no default: its terms name their modules (`layers=`)
FAMILY_STAGES = {
    "resnet": ("layer1", "layer2", "layer3", "layer4"),  # also ResNeXt and Wide ResNet
    "regnet": ("trunk_output.block1", "trunk_output.block2", "trunk_output.block3", "trunk_output.block4"),
    "convnext": ("features.1", "features.3", "features.5", "features.7"),
    "densenet": ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.denseblock4"),
}
FAMILY_PREFIXES = {"resnet": "resnet", "resnext": "resnet", "wide_resnet": "resnet", "regnet_": "regnet"}
FAMILY_PREFIXES.update({"convnext_": "convnext", "densenet": "densenet"})
#: the papers' backbones (conf/backbone/)
PAPERS = ("resnet18", "resnet50")


#: `backbone.name=timm/<model>`: a timm model (huggingface/pytorch-image-models) by its architecture name
TIMM = "timm/"


def known_backbones() -> list[str]:
    """torchvision's classification models (not its detection, segmentation or video models)."""
    return torchvision.models.list_models(module=torchvision.models)


def timm_architecture(name: str) -> str | None:
    """`resnet50` of `timm/resnet50` (a tag, `timm/resnet50.a1_in1k`, names its weights: the source's), or None."""
    return name[len(TIMM) :].split(".")[0] if name.startswith(TIMM) else None


def family(name: str) -> str | None:
    """The family of a torchvision model name whose stages are declared (FAMILY_STAGES), or None."""
    return next((found for prefix, found in FAMILY_PREFIXES.items() if name.startswith(prefix)), None)


def default_stages(name: str) -> tuple[str, ...]:
    """The modules whose outputs the feature-space terms compare by default for backbone `name`."""
    return FAMILY_STAGES.get(family(name) or "", ())


def check_backbone_name(name: str) -> None:
    architecture = timm_architecture(name)
    if architecture is not None:
        import timm

        if not timm.is_model(architecture):
            close = timm.list_models(f"*{architecture[:6]}*")[:6]
            raise ValueError(
                f"backbone.name={name}: timm has no model {architecture}; e.g. "
                f"{', '.join(TIMM + m for m in close) or 'timm/resnet50'} (see timm.list_models())"
            )
        return
    if name not in known_backbones():
        raise ValueError(
            f"backbone.name={name} is not one of torchvision's classification models; e.g. "
            f"{', '.join(PAPERS)} (the papers'), convnext_tiny, efficientnet_b0: see "
            "torchvision.models.list_models(module=torchvision.models)"
        )


def create_backbone(name: str) -> nn.Module:
    """A randomly initialised torchvision classification model whose forward returns pooled
    features: its last linear layer (the classifier) replaced by the identity. The number of
    those features is its `num_features` (timm's name)."""
    check_backbone_name(name)
    if timm_architecture(name) is not None:  # timm's own classifier-free form: its forward gives pooled features
        import timm

        backbone = timm.create_model(timm_architecture(name), pretrained=False, num_classes=0)
        backbone.classifier_name = backbone.pretrained_cfg.get("classifier", "fc")
        return backbone
    backbone = torchvision.models.get_model(name, weights=None)
    where, classifier = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attribute = where.rpartition(".")
    setattr(backbone.get_submodule(parent), attribute, nn.Identity())
    backbone.num_features, backbone.classifier_name = classifier.in_features, where
    return backbone


@dataclass
class Features:
    """What one forward pass saw: the input images, the maps of the tapped modules and the pooled features;
    in a training step also the batch's labels (Co-Tuning's targets are indexed by them)."""

    images: torch.Tensor
    maps: dict[str, torch.Tensor] = field(default_factory=dict)
    pooled: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    #: in a training step whose terms read more than one view (Term.views): the other views of the batch
    views: tuple[torch.Tensor, ...] = ()
    #: in a training step whose terms keep something per training item (Term.needs_indices): the batch's items
    indices: torch.Tensor | None = None


def last_conv(stage: str, backbone: nn.Module) -> str:
    """The name of a ResNet stage's last convolution (`layer4.1.conv2` in ResNet-18,
    `layer4.2.conv3` in ResNet-50): the map the DELTA authors' released code regularizes,
    before its BatchNorm and the residual sum."""
    block = getattr(backbone, stage)[-1]
    conv = "conv3" if hasattr(block, "conv3") else "conv2"
    return f"{stage}.{len(getattr(backbone, stage)) - 1}.{conv}"


def timm_stages(backbone: nn.Module) -> tuple[str, ...]:
    """A timm model's stages for the feature-space terms: the modules of the last four entries of its own
    `feature_info` (timm's feature-extraction points, each named with its reduction; a ResNet's layer1..layer4)."""
    info = getattr(backbone, "feature_info", None) or []
    return tuple(entry["module"] for entry in list(info)[-4:])


def check_modules(backbone: nn.Module, names: Sequence[str], key: str, hint: Sequence[str] = ()) -> list[str]:
    """`names` as a list, each the name of a module of `backbone`; else a ValueError naming `key`."""
    names = [str(name) for name in names]
    known = {name for name, _ in backbone.named_modules()}
    missing = [name for name in names if name not in known]
    if missing or not names:
        shallow = [name for name, _ in backbone.named_modules() if name and name.count(".") <= 1]
        example = (
            f"its stages are {', '.join(hint)} ({key}=null takes them)"
            if hint
            else "this backbone declares no stages (ResNets do: layer1..layer4), so name its modules, e.g. "
            + ", ".join(shallow[:: max(1, len(shallow) // 8)][:8])
        )
        problem = f"no module {', '.join(missing)}" if missing else "empty"
        raise ValueError(f"{key}={names}: {problem}; {example}")
    return names


def output_ranks(backbone: nn.Module, names: Sequence[str], size: int = 224) -> dict[str, int] | None:
    """The rank of each named module's output on a batch of `size` x `size` images, from a forward
    on the meta device (no computation); None when the backbone is not on the meta device."""
    if next(backbone.parameters()).device.type != "meta":
        return None
    with torch.no_grad():
        found = forward_features(backbone, torch.empty(2, 3, size, size, device="meta"), names).maps
    return {name: found[name].dim() for name in names if isinstance(found.get(name), torch.Tensor)}


def forward_features(backbone: nn.Module, images: torch.Tensor, taps: Iterable[str] = ()) -> Features:
    """The backbone's own forward (its pooled features), keeping the outputs of the modules
    named in `taps` (e.g. `layer3`, `layer4.1.conv2`) under their names (a module called more
    than once in a forward keeps its last output)."""
    maps = {}
    handles = [
        backbone.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: maps.__setitem__(name, output)
        )
        for name in taps
    ]
    try:
        pooled = backbone(images)
    finally:
        for handle in handles:
            handle.remove()
    return Features(images, maps, torch.flatten(pooled, 1))


class TransferNet(nn.Module):
    """The target network: shared backbone (w_S, initialised from the source) and a new head.
    `backbone` is a torchvision model name, or a module whose forward returns pooled features
    and that has `num_features` (a test's tiny network); `stages` are its default maps."""

    def __init__(self, backbone: str | nn.Module, num_classes: int, stages: Sequence[str] | None = None):
        super().__init__()
        if isinstance(backbone, str):
            self.backbone_name, backbone, default = backbone, create_backbone(backbone), default_stages(backbone)
            if timm_architecture(self.backbone_name) is not None:
                default = timm_stages(backbone)
        else:
            self.backbone_name, default = type(backbone).__name__, ()
        self.backbone = backbone
        self.stages = tuple(default if stages is None else stages)
        self.head = nn.Linear(backbone.num_features, num_classes)
        #: modules of the backbone whose outputs a term reads besides the stages (added by its bind)
        self.taps: set[str] = set()
        #: modules a term added (add_trained), by attribute name -> their parameter group
        self.added: dict[str, str] = {}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Features]:
        """Logits and the features the regularizers read (the stages' maps and those the terms
        tapped, for KnowDist and DELTA; the pooled features, for BSS)."""
        features = forward_features(self.backbone, images, sorted({*self.stages, *self.taps}))
        return self.head(features.pooled), features

    def keep_source_head(
        self, head: dict[str, torch.Tensor], trainable: bool = False, group: str = "head"
    ) -> nn.Linear:
        """Keep the source task's classifier beside the new head (`source_head`: the source model's
        predictions, for the methods that read them), frozen or trained as the method asks, at the lr
        of the parameter group `group` (`head`: the new head's; `backbone`: the backbone's). A network
        without it has the state_dict it always had."""
        weight = head["weight"]
        if weight.shape[1] != self.backbone.num_features:
            raise ValueError(
                f"the source head takes {weight.shape[1]} features, the backbone gives {self.backbone.num_features}"
            )
        source_head = nn.Linear(
            weight.shape[1], weight.shape[0], device=self.head.weight.device, dtype=self.head.weight.dtype
        )
        source_head.load_state_dict(head)
        source_head.requires_grad_(trainable)
        return self.add_trained("source_head", source_head, group)

    def add_trained(self, name: str, module: nn.Module, group: str) -> nn.Module:
        """A module a method adds to the network (LwF's source classifier, Bi-Tuning's projector and key
        encoder): kept in its state_dict (so checkpointed and resumed with it), its trainable parameters
        at the lr of the parameter group `group` (`head` or `backbone`)."""
        setattr(self, name, module)
        self.added[name] = group
        return module

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {"backbone": [self.backbone], "head": [self.head]}
        for name, group in self.added.items():
            groups[group].append(getattr(self, name))
        return {
            name: [p for m in modules for p in m.parameters() if p.requires_grad] for name, modules in groups.items()
        }


@functools.lru_cache(maxsize=8)
def outline(name: str, num_classes: int = 2) -> TransferNet:
    """A TransferNet of backbone `name` for checking a config against (its module names, its
    number of features), on the meta device where the model's builder allows: no weights. Built
    once per backbone and shared (the check of each job of a sweep reads it): read it, never change it."""
    with torch.device("meta"):
        try:
            return TransferNet(name, num_classes)
        except NotImplementedError:  # a builder that computes its widths with tensors (RegNet)
            pass
    return TransferNet(name, num_classes)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Reductions of autocast's half-precision outputs are done in fp32 (fp64 stays fp64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def frozen_copy(backbone: nn.Module) -> nn.Module:
    """A copy of `backbone` that never changes: eval mode (BatchNorm uses its running
    statistics) and no gradients. The feature-space terms compare against it."""
    source = copy.deepcopy(backbone).eval()
    for p in source.parameters():
        p.requires_grad_(False)
    return source

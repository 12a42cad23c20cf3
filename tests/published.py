"""Source checkpoints written in the structures their publishers distribute, not as our own
code would write them (a `state_dict()` of today's torch passed every test while the real
files were refused). Each writer says where its structure comes from."""

from __future__ import annotations

import pickle
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

#: torchvision's IMAGENET1K_V1 file names (torchvision.models.ResNet18_Weights / ResNet50_Weights)
IMAGENET_V1_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}
#: tensors in those files: today's state_dict (122 / 320 with fc) less one num_batches_tracked per BatchNorm
IMAGENET_V1_TENSORS = {"resnet18": 102, "resnet50": 267}


def _weights(backbone: str, classes: int, seed: int) -> OrderedDict:
    """A classification ResNet's tensors with non-trivial running statistics, without the
    num_batches_tracked buffers (PyTorch 0.4.1 added them; these files are older)."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(backbone, weights=None, num_classes=classes)
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        value = value.detach().clone()
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
        state[key] = value
    return state


def torchvision_v1_checkpoint(path: Path, backbone: str, seed: int = 0) -> OrderedDict:
    """torchvision's resnet18-f37072fd.pth / resnet50-0676ba61.pth (IMAGENET1K_V1): 2017 weights
    re-saved unchanged in 2021 in torch's zip format. As issue 24 describes the published files:
    102 (ResNet-18) / 267 (ResNet-50) tensors, no num_batches_tracked, the weights and biases
    pickled as nn.Parameter objects, the running statistics as plain tensors, an OrderedDict
    without `_metadata`, the 1000-class fc included. Returns the tensors written."""
    state = _weights(backbone, 1000, seed)
    model_parameters = {k for k, _ in torchvision.models.get_model(backbone).named_parameters()}
    published = OrderedDict((k, nn.Parameter(v) if k in model_parameters else v) for k, v in state.items())
    assert not hasattr(published, "_metadata")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(published, path)
    return state


class _Storage:
    """One FloatStorage of the legacy format."""

    def __init__(self, key: str, tensor: torch.Tensor):
        self.key, self.tensor = key, tensor.detach().contiguous().float()


class _Torch02Pickler(pickle.Pickler):
    """Pickles tensors as PyTorch 0.2 did: torch._utils._rebuild_tensor(storage, offset, size,
    stride), the storage a persistent id ('storage', torch.FloatStorage, key, location, numel, None)."""

    def __init__(self, handle, storages: list[_Storage]):
        super().__init__(handle, protocol=2)
        self.storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cuda:0", obj.tensor.numel(), None)
        return None

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            storage = _Storage(str(len(self.storages)), obj)
            self.storages.append(storage)
            return torch._utils._rebuild_tensor, (storage, 0, tuple(obj.shape), tuple(storage.tensor.stride()))
        return NotImplemented


def save_torch02(obj, path: Path) -> None:
    """torch.save as PyTorch 0.2 wrote it (the legacy, non-zip format of torch/serialization.py:
    magic number, protocol 1001, system info, the pickled object, its storage keys, then each
    storage's element count and little-endian bytes), storages tagged as saved from cuda:0."""
    storages: list[_Storage] = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for header in (
            0x1950A86A20F9469CFC6C,
            1001,
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}},
        ):
            pickle.dump(header, handle, protocol=2)
        _Torch02Pickler(handle, storages).dump(obj)
        pickle.dump([s.key for s in storages], handle, protocol=2)
        for storage in storages:
            handle.write(struct.pack("<q", storage.tensor.numel()))
            handle.write(storage.tensor.numpy().astype("<f4").tobytes())


def csail_places365_checkpoint(path: Path, backbone: str, seed: int = 1) -> OrderedDict:
    """CSAIL's <backbone>_places365.pth.tar (github.com/CSAILVision/places365: trained with
    PyTorch 0.2; its run_placesCNN_basic.py reads checkpoint['state_dict'] and strips
    'module.'): the legacy serialization, a dict {"epoch", "arch", "state_dict", "best_prec1"}
    whose state_dict has DataParallel's `module.` prefix, a 365-class fc and no
    num_batches_tracked. Returns the tensors written (without the prefix)."""
    state = _weights(backbone, 365, seed)
    save_torch02(
        {
            "epoch": 90,
            "arch": backbone,
            "state_dict": OrderedDict((f"module.{k}", v) for k, v in state.items()),
            "best_prec1": np.float64(54.74).item(),
        },
        path,
    )
    return state


#: torchvision's IMAGENET1K_V2 ResNet-50 file (the "new training recipe" weights, torchvision 0.11, 2021)
IMAGENET_V2_FILES = {"resnet50": "resnet50-11ad3fa6.pth"}


def torchvision_v2_checkpoint(path: Path, backbone: str = "resnet50", seed: int = 1) -> OrderedDict:
    """torchvision's resnet50-11ad3fa6.pth (IMAGENET1K_V2): a state_dict saved by a 2021 torch in its zip
    format, the whole of today's keys (320 for ResNet-50, the num_batches_tracked counters included, as a
    model trained with torch >= 0.4.1 has them), plain tensors, the 1000-class fc included. Returns them."""
    torch.manual_seed(seed)
    model = torchvision.models.get_model(backbone, weights=None, num_classes=1000)
    state = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var")):
            value.uniform_(0.5, 1.5)
        elif key.endswith("num_batches_tracked"):
            value.fill_(600_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state

"""Reading source checkpoints safely and turning them into backbone state_dicts.

Every file is read with `torch.load(..., weights_only=True)`: a checkpoint can never
run code here. Recognised layouts:

- torchvision: a flat state_dict of a ResNet (`conv1.weight`, ..., `fc.weight`);
- CSAIL Places365: `{"epoch", "arch", "state_dict", "best_prec1"}` whose keys carry
  DataParallel's `module.` prefix;
- safetransfer's own source checkpoints: `{"safetransfer_source": metadata, "state_dict": backbone}`.

The classification head of the checkpoint (`fc.*` of a ResNet) is kept apart from the backbone: the
target gets a new head, and the source's own is there for the methods that read it.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from safetransfer.common.downloads import is_html
from safetransfer.common.errors import ConfigError, MissingData
from safetransfer.training.backbones import create_backbone, family

CONVERT_COMMAND = "safetransfer-convert-checkpoint"
#: a checkpoint may hold its weights and an optimizer's state (momentum) for them, and a little more
LIMIT_FACTOR, LIMIT_MARGIN = 3, 64 * 2**20


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted keys, dtypes, shapes and bytes of a state_dict's tensors:
    the same weights give the same digest whatever file format holds them."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def backbone_bytes(backbone: str) -> int:
    """The bytes of a backbone's state_dict (float32), from its outline on the meta device."""
    from safetransfer.training.backbones import outline

    return sum(t.numel() * t.element_size() for t in outline(backbone).backbone.state_dict().values())


def declared_bytes(path: Path) -> int | None:
    """What a checkpoint in torch's zip format declares it unpacks to (None for the legacy format)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        return sum(info.file_size for info in archive.infolist())


def read(path: Path, key: str = "source.path", backbone: str | None = None):
    """torch.load with weights_only=True, every failure turned into one line. With `backbone`,
    a file declaring far more than that backbone's weights (LIMIT_FACTOR times, plus a margin
    for an optimizer's state) is refused before anything is unpacked: a small deflated file can
    declare gigabytes."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "a folder" if path.is_dir() else "not a regular file (a pipe, a device)" if path.exists() else None
        if what is None:
            raise MissingData(f"{key}={path}: no such file")
        raise ConfigError(f"{key}={path} is {what}; give the checkpoint file itself (.pth, .pt, .pth.tar)")
    if is_html(path):
        raise ConfigError(
            f"{key}={path} is an HTML page, not a checkpoint (a server's error page saved in its "
            "place?); download the checkpoint again"
        )
    if backbone is not None:
        declared, limit = declared_bytes(path), LIMIT_FACTOR * backbone_bytes(backbone) + LIMIT_MARGIN
        if declared is not None and declared > limit:
            raise ConfigError(
                f"{key}={path} declares {declared / 2**20:.0f} MiB once unpacked, more than a backbone={backbone} "
                f"checkpoint holds (at most {limit / 2**20:.0f} MiB with an optimizer's state); it is another "
                "model's or a damaged file: point to a checkpoint of this backbone"
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = _first_line(error)
        raise ConfigError(
            f"{key}={path} holds objects that only arbitrary unpickling can read, which safetransfer refuses "
            f"(a checkpoint could run code); if you trust the file, convert it once: "
            f"{CONVERT_COMMAND} {path} {path.with_suffix('.safe.pt')} ({first})"
        ) from None
    except Exception as error:  # noqa: BLE001 (a text file gives a KeyError from the legacy loader, ...)
        first = _first_line(error)
        raise ConfigError(
            f"{key}={path} is truncated or not a PyTorch checkpoint ({first}); "
            "download it again or point to another file"
        ) from None


def backbone_state(checkpoint, *, origin: str = "checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """The checkpoint's tensors (its classifier's among them) from any recognised layout, and the layout's name."""
    if isinstance(checkpoint, dict) and "safetransfer_source" in checkpoint:
        state, layout = checkpoint["state_dict"], "safetransfer"
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        state, layout = checkpoint["state_dict"], "csail"
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state, layout = checkpoint, "torchvision"
    else:
        raise ConfigError(
            f"{origin}: not a recognised checkpoint layout (a torchvision state_dict, a CSAIL "
            "Places365 checkpoint or a safetransfer source checkpoint)"
        )
    not_tensors = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        kinds = sorted({type(state[k]).__name__ for k in not_tensors})
        raise ConfigError(
            f"{origin}: its weights hold values that are not tensors ({_few(not_tensors)}: {', '.join(kinds)}); "
            "a checkpoint's state_dict maps each name to a tensor: point to another file"
        )
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state.items()}, layout


#: the buffer BatchNorm layers gained in PyTorch 0.4.1; checkpoints older than that (torchvision's
#: IMAGENET1K_V1 ResNets, CSAIL's Places365 ResNets) do not have it
BATCH_COUNTER = "num_batches_tracked"
#: the fix a local file's source offers for keys that do not match
STRICT_HINT = "set source.strict=false to load what matches"


def match_backbone(
    state: dict[str, torch.Tensor], backbone: str, *, strict: bool, origin: str, hint: str = STRICT_HINT
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """`state` checked against `backbone`'s keys and shapes, and the source's classifier kept apart:
    (the backbone's state, the classifier's `weight` and `bias`, or None when the file has none).

    Missing BatchNorm `num_batches_tracked` counters are filled with 0, as torch's BatchNorm
    fills them when it loads a state_dict without version metadata (they only count steps
    and are not used with a momentum). Anything else missing or unexpected is refused when
    `strict`, the message ending in `hint` (the fix a source offers, or none)."""
    model = create_backbone(backbone)
    expected = model.state_dict()
    # the source task's classifier, beside the new head (`fc` of a ResNet, `classifier.2` of a ConvNeXt)
    prefix = model.classifier_name + "."
    head = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    misfit = [k for k, v in state.items() if k in expected and expected[k].shape != v.shape]
    bottleneck = any(k.endswith("conv3.weight") for k in state)
    if family(backbone) == "resnet" and bottleneck != any(k.endswith("conv3.weight") for k in expected):
        kind = "a bottleneck ResNet (ResNet-50 or deeper)" if bottleneck else "a basic-block ResNet (ResNet-18/34)"
        raise ConfigError(
            f"{origin} holds weights of {kind}, which do not fit backbone={backbone}; "
            "choose the matching backbone or another checkpoint"
        )
    if misfit:
        first = misfit[0]
        raise ConfigError(
            f"{origin}: {first} has shape {list(state[first].shape)} where backbone={backbone} has "
            f"{list(expected[first].shape)} ({len(misfit)} tensor{'s' if len(misfit) > 1 else ''} of another shape); "
            "choose the matching backbone or another checkpoint"
        )
    counters = {
        k: torch.zeros_like(expected[k])
        for k in expected
        if k not in state and k.rsplit(".", 1)[-1] == BATCH_COUNTER and k.rsplit(".", 1)[0] + ".running_mean" in state
    }
    state = {**state, **counters}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if strict and (missing or unexpected):
        raise ConfigError(
            f"{origin} does not match backbone={backbone}: missing keys {_few(missing)}, "
            f"unexpected keys {_few(unexpected)}" + (f"; {hint}" if hint else "")
        )
    return state, (head if set(head) == {"weight", "bias"} else None)


def load_backbone(
    path: Path, backbone: str, *, strict: bool = True, key: str = "source.path", hint: str = STRICT_HINT
) -> tuple[dict, str, dict | None]:
    """Read `path` safely, convert its layout and match it to `backbone`: (state, layout, source head)."""
    origin = f"{key}={path}"
    state, layout = backbone_state(read(path, key=key, backbone=backbone), origin=origin)
    matched, head = match_backbone(state, backbone, strict=strict, origin=origin, hint=hint)
    return matched, layout, head


def _few(keys: list[str], shown: int = 6) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return "[" + ", ".join(keys[:shown]) + "]" + more


def convert_main(argv: list[str] | None = None) -> None:
    """safetransfer-convert-checkpoint IN OUT: rewrite a trusted checkpoint that needs
    legacy unpickling (objects beside the tensors, or a whole pickled model saved with
    torch.save(model)) as a plain tensor state_dict that weights_only loading accepts.
    IN is unpickled in full, which can run code: convert only files you trust."""
    import argparse

    parser = argparse.ArgumentParser(prog=CONVERT_COMMAND, description=convert_main.__doc__)
    parser.add_argument("source", type=Path, help="the checkpoint you trust (it is unpickled in full: it can run code)")
    parser.add_argument("target", type=Path, help="where to write the plain state_dict")
    args = parser.parse_args(argv)
    from safetransfer.common.atomic import atomic_torch_save

    def fail(message: str):
        parser.exit(2, f"{CONVERT_COMMAND}: error: {message}\n")

    if not args.source.is_file():
        fail(f"{args.source}: no such file")
    try:
        checkpoint = torch.load(args.source, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 (whatever unpickling a foreign file raises)
        first = _first_line(error)
        fail(f"{args.source} is not a PyTorch checkpoint ({type(error).__name__}: {first})")
    if isinstance(checkpoint, torch.nn.Module):  # torch.save(model): the model's own state_dict
        checkpoint = checkpoint.state_dict()
    try:
        state, layout = backbone_state(checkpoint, origin=str(args.source))
        atomic_torch_save({k: v.clone() for k, v in state.items()}, args.target)
    except ConfigError as error:
        fail(str(error))
    except OSError as error:
        fail(f"writing {args.target} failed ({error.strerror or error})")
    print(f"{args.source} ({layout} layout, {len(state)} tensors; unpickled in full, as trusted) -> {args.target}")

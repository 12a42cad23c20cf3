"""safetransfer: run, compare and reproduce regularized fine-tuning."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"


def folder_name(path: str) -> str:
    """The name of the folder `path` points to (`target=imagefolder`'s default target.name)."""
    return Path(str(path)).expanduser().resolve().name or "root"


#: torchvision's ImageNet preprocessing: every torchvision backbone's data.* defaults (the papers')
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop": 224, "resize": 256}


def backbone_data(key: str, backbone: str, model=None):
    """data.<key>'s default (mean, std, crop, resize) for `backbone`: for a timm model (`timm/<name>`), its
    weights' pretrained config (timm's, of `source.model` where a timm source names the weights): its
    normalization, its input size as the crop, and crop / crop_pct as the resize (timm's evaluation);
    torchvision's ImageNet preprocessing otherwise. A preset or the command line that sets data.<key> wins."""
    backbone = str(backbone)
    if not backbone.startswith("timm/"):  # backbones.TIMM (the package's root imports no layer)
        return IMAGENET[key]
    import math

    import timm

    architecture = backbone[len("timm/") :].split(".")[0]
    named = str(model) if model and str(model).split(".")[0] == architecture else architecture
    try:
        config = timm.models.get_pretrained_cfg(named)
    except Exception:  # noqa: BLE001 (an unknown tag: the source refuses it in one line)
        config = None
    if config is None:
        return IMAGENET[key]
    crop = int(config.input_size[-1])
    found = {"mean": list(config.mean), "std": list(config.std), "crop": crop}
    found["resize"] = int(math.floor(crop / config.crop_pct))
    return found[key]


# registered on import of the package, so that every config composed or read anywhere resolves them
OmegaConf.register_new_resolver("safetransfer.folder_name", folder_name, replace=True)
OmegaConf.register_new_resolver("safetransfer.backbone_data", backbone_data, replace=True)

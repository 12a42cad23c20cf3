"""safetransfer: run, compare and reproduce regularized fine-tuning."""

from pathlib import Path

from omegaconf import OmegaConf

__version__ = "0.1.0"


def folder_name(path: str) -> str:
    """The name of the folder `path` points to (`target=imagefolder`'s default target.name)."""
    return Path(str(path)).expanduser().resolve().name or "root"


# registered on import of the package, so that every config composed or read anywhere resolves it
OmegaConf.register_new_resolver("safetransfer.folder_name", folder_name, replace=True)

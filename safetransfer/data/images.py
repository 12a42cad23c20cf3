"""Reading a dataset's images: a file that cannot be decoded is one line naming it."""

from __future__ import annotations

from PIL import Image
from torch.utils.data import Dataset

from safetransfer.common.errors import ConfigError

#: where datasets keep the file of each item: ours, torchvision's ImageFolder and its dataset classes
_PATH_ATTRIBUTES = ("paths", "samples", "imgs", "_image_files", "_images", "_samples")


def item_path(dataset: Dataset, index: int) -> str:
    for attribute in _PATH_ATTRIBUTES:
        items = getattr(dataset, attribute, None)
        if items is not None and len(items) > index:
            item = items[index]
            return str(item[0] if isinstance(item, (tuple, list)) else item)
    return f"item {index} of {type(dataset).__name__}"


def read_item(dataset: Dataset, index: int):
    """dataset[index], with an image that cannot be decoded reported as one line naming its file."""
    try:
        return dataset[index]
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # PIL: truncated, not an image, a broken header, more pixels declared than it opens
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(
            f"{item_path(dataset, index)} cannot be read as an image ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no detail'}); replace the file with a "
            "good copy (or download the dataset again)"
        ) from None

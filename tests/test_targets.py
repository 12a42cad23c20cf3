"""Target datasets parsed from fixtures in their official layouts: class counts, split
sizes, sampling, and the missing-data messages."""

import numpy as np
import pytest
import torch
from PIL import Image

from safetransfer.errors import ConfigError
from safetransfer.targets.cub200 import CUB200, MD5, URL

import fixtures


def test_cub200_official_split(tmp_path):
    sizes = fixtures.make_cub200(tmp_path, classes=3, train_per_class=4, test_per_class=3)
    target = CUB200(str(tmp_path), expected_classes=3, expected_split=(sizes["train"], sizes["test"]))
    target.check()
    assert target.classes == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    train, test = target.train_set(), target.test_set()
    assert (len(train), len(test)) == (12, 9)
    assert np.bincount(target.train_labels()).tolist() == [4, 4, 4]
    assert {p.name for p in train.paths}.isdisjoint({p.name for p in test.paths})
    image, label = test[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 0


def test_cub200_counts_are_checked(tmp_path):
    fixtures.make_cub200(tmp_path, classes=3)
    with pytest.raises(ConfigError, match="lists 3 classes, but cub200 has 200"):
        CUB200(str(tmp_path)).check()
    with pytest.raises(ConfigError, match="the official split has 5994 and 5794"):
        CUB200(str(tmp_path), expected_classes=3).check()


def test_cub200_missing_data_message(tmp_path):
    with pytest.raises(ConfigError) as error:
        CUB200(str(tmp_path / "data")).check()
    message = str(error.value)
    assert URL in message and MD5 in message and "CUB_200_2011/{images.txt," in message
    assert "target.download=true" in message


def test_cub200_end_to_end(cli, tmp_path):
    from conftest import TINY

    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=6, test_per_class=2)
    shrink = [o for o in TINY if not o.startswith("target.")]
    result = cli(*shrink, "target=cub200", f"target.root={tmp_path / 'data'}", "target.expected_classes=3",
                 "target.expected_split=[18,6]", "target.sampling_rate=50", "train.batch_size=4", "results.dir=res")
    assert result.returncode == 0, result.stderr[-3000:]
    import pandas as pd

    row = pd.read_csv(tmp_path / "res" / "cub200.csv").iloc[0]
    assert row["target"] == "cub200" and row["sampling_rate"] == 50

"""Training on the BSS authors' released per-class lists: matching by file name, the
pinned download, and one line for a list that does not fit the dataset."""

import hashlib

import numpy as np
import pytest

import fixtures
from conftest import TINY
from safetransfer.common.errors import ConfigError, DownloadError
from safetransfer.data import sample_lists
from safetransfer.data.targets.cub200 import CUB200
from safetransfer.data.targets.torchvision_datasets import TorchvisionTarget


def cub(tmp_path, **sampling):
    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=5, test_per_class=2)
    return CUB200(str(tmp_path / "data"), expected_classes=3, expected_split=(15, 6), **sampling)


def test_a_list_selects_exactly_its_images_whatever_its_folders(tmp_path):
    listed = [
        "train/001.Bird_0/Bird_0_0003.jpg",
        "train/001.Bird_0/Bird_0_0000.jpg",
        "train/003.Bird_2/Bird_2_0004.jpg",
    ]  # the authors' own folder names: only the file name counts
    (tmp_path / "mine.txt").write_text("\n".join(listed) + "\n\n")
    target = cub(tmp_path, sample_list=str(tmp_path / "mine.txt"), sampling_rate=15)
    indices = target.sampled_train_indices()
    names = [target.train_files()[i].rsplit("/", 1)[-1] for i in indices]
    assert sorted(names) == ["Bird_0_0000.jpg", "Bird_0_0003.jpg", "Bird_2_0004.jpg"]
    assert list(target.train_labels()[indices]) == [0, 0, 2]
    # the validation hold-out is carved from the listed images
    target.val_fraction = 0.5
    train, val = target.split_train_val()
    assert sorted(np.concatenate([train, val])) == sorted(indices)


def test_oxford_pets_list_in_the_authors_layout(tmp_path):
    fixtures.make_oxford_pets(tmp_path / "data", trainval=3, test=2)
    (tmp_path / "pets.txt").write_text("train/2/basset_hound_1.jpg\ntrain/1/Abyssinian_3.jpg\n")
    target = TorchvisionTarget(
        "oxford_pets",
        "OxfordIIITPet",
        str(tmp_path / "data"),
        {"split": "trainval"},
        {"split": "test"},
        sample_list=str(tmp_path / "pets.txt"),
    )
    indices = target.sampled_train_indices()
    assert [target.train_files()[i].rsplit("/", 1)[-1] for i in indices] == ["Abyssinian_3.jpg", "basset_hound_1.jpg"]


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ["train/001.Bird_0/Bird_0_0000.jpg", "train/001.Bird_0/Bird_0_0099.jpg"],
            "train/001.Bird_0/Bird_0_0099.jpg is not a training image of this dataset",
        ),  # a file we do not have
        (
            ["train/001.Bird_0/Bird_0_0000.jpg", "train/001.Bird_0/Bird_0_0006.jpg"],
            "train/001.Bird_0/Bird_0_0006.jpg is not a training image of this dataset",
        ),  # a test image: extra
        (
            ["train/x/Bird_0_0000.jpg", "train/x/Bird_1_0000.jpg"],
            "train/x/Bird_1_0000.jpg has label 1 here, while other images of train/x have 0",
        ),
        (["train/a/Bird_0_0000.jpg", "train/b/Bird_0_0000.jpg"], "train/b/Bird_0_0000.jpg is listed more than once"),
    ],
)
def test_a_list_that_does_not_fit_is_one_line_naming_the_file(tmp_path, lines, message):
    (tmp_path / "bad.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        cub(tmp_path, sample_list=str(tmp_path / "bad.txt")).sampled_train_indices()
    assert "\n" not in str(error.value) and "bad.txt" in str(error.value)


def test_the_bss_list_is_downloaded_once_and_checked_against_its_pin(tmp_path, monkeypatch):
    from safetransfer.common import downloads

    content = b"train/001.Bird_0/Bird_0_0001.jpg\ntrain/002.Bird_1/Bird_1_0002.jpg\n"
    requested = []

    def fake_stream(url, handle, settings):  # stands in for the network (test_fetch.py serves it for real)
        requested.append(url)
        return handle.write(content)

    monkeypatch.setattr(downloads, "stream", fake_stream)
    monkeypatch.setitem(sample_lists.BSS_SHA256, "cub200_15_train.txt", hashlib.sha256(content).hexdigest())
    target = cub(tmp_path, sample_list="bss", sampling_rate=15, sample_list_dir=str(tmp_path / "lists"))
    assert len(target.sampled_train_indices()) == 2
    assert requested == [
        "https://raw.githubusercontent.com/thuml/Batch-Spectral-Shrinkage/master/ft-datalist/cub200_15_train.txt"
    ]
    target.sampled_train_indices()
    assert len(requested) == 1  # found on disk the second time

    (tmp_path / "lists" / "cub200_15_train.txt").write_bytes(content + b"train/x/Bird_2_0000.jpg\n")  # changed
    with pytest.raises(DownloadError, match="sha256 .* does not match the published .* delete the file"):
        target.sampled_train_indices()
    assert (tmp_path / "lists" / "cub200_15_train.txt").exists()  # a copy already there is named, not deleted


def test_bss_lists_exist_only_for_their_targets_and_rates():
    with pytest.raises(ConfigError, match="not for target=caltech256_30"):
        sample_lists.bss_list_file("caltech256_30", 15)
    with pytest.raises(ConfigError, match="15, 30, 50, 100, not 20"):
        sample_lists.bss_list_file("cub200", 20)
    assert sample_lists.bss_list_file("fgvc_aircraft", 50) == "FGVCAircraft_50_train.txt"
    assert len(sample_lists.BSS_SHA256) == 20  # 5 targets x 4 rates


def test_a_missing_list_stops_the_run_before_training(cli, tmp_path):
    fixtures.make_cub200(tmp_path / "data", classes=3, train_per_class=5, test_per_class=2)
    result = cli(
        "experiment=demo",
        "hydra.mode=RUN",
        *[o for o in TINY if not o.startswith("target.")],
        "source=scratch",
        "target=cub200",
        f"target.root={tmp_path / 'data'}",
        "target.expected_classes=3",
        "target.expected_split=[15,6]",
        f"target.sample_list={tmp_path / 'none.txt'}",
    )
    assert result.returncode != 0
    assert "none.txt: cannot read it" in result.stderr and "Traceback" not in result.stderr


def test_mit_indoor_lists_name_files_by_their_class_folder_where_names_repeat(tmp_path):
    from safetransfer.data.targets.mit_indoor67 import MITIndoor67

    fixtures.make_mit_indoor67(tmp_path, classes=3, train_per_class=4, test_per_class=2)

    def target(*entries):
        (tmp_path / "list.txt").write_text("\n".join(entries) + "\n")
        return MITIndoor67(
            str(tmp_path), expected_classes=3, expected_split=(12, 6), sample_list=str(tmp_path / "list.txt")
        )

    # indoor_0323.jpg is a training file of every class: the class folder tells them apart
    chosen = target("train/scene_b/indoor_0323.jpg", "train/scene_a/img_001.jpg", "train/scene_c/indoor_0323.jpg")
    indices = chosen.sampled_train_indices()
    files = [chosen.train_files()[i].split("/")[-2:] for i in indices]
    assert sorted(files) == [["scene_a", "img_001.jpg"], ["scene_b", "indoor_0323.jpg"], ["scene_c", "indoor_0323.jpg"]]
    assert sorted(chosen.train_labels()[indices].tolist()) == [0, 1, 2]
    # an entry that stays ambiguous is refused, named; a list naming none of the shared names is unaffected
    for entry in ("indoor_0323.jpg", "train/elsewhere/indoor_0323.jpg"):
        with pytest.raises(ConfigError, match=f"{entry} is ambiguous: 3 training files end in"):
            target(entry).sampled_train_indices()
    assert len(target("train/scene_a/img_002.jpg").sampled_train_indices()) == 1


def test_a_list_that_is_not_utf8_is_one_line_naming_the_file_and_the_line(tmp_path):
    """Latin-1 bytes (an accented class name saved by an old editor) gave a UnicodeDecodeError traceback."""
    (tmp_path / "latin1.txt").write_bytes(b"train/001.Bird_0/Bird_0_0000.jpg\ntrain/caf\xe9/Bird_0_0001.jpg\n")
    with pytest.raises(ConfigError) as error:
        cub(tmp_path, sample_list=str(tmp_path / "latin1.txt")).sampled_train_indices()
    message = str(error.value)
    assert "target.sample_list" in message and "latin1.txt is not UTF-8 text: line 2" in message
    assert "\n" not in message


def test_mit_indoor_split_files_that_are_not_utf8_are_one_line(tmp_path):
    from safetransfer.data.targets.mit_indoor67 import MITIndoor67

    fixtures.make_mit_indoor67(tmp_path, classes=3, train_per_class=4, test_per_class=2)
    train_list = tmp_path / "mit_indoor67" / "TrainImages.txt"
    train_list.write_bytes(train_list.read_bytes() + b"scene_a/\xff\xfe.jpg\n")
    with pytest.raises(ConfigError, match=r"target=mit_indoor67: .*TrainImages.txt is not UTF-8 text: line 13"):
        _ = MITIndoor67(str(tmp_path), expected_classes=3).classes

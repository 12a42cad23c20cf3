"""The one hash (safetransfer/common/fingerprints.py), checked against hashlib on JSON written by hand:
the names it gives (results keys, cache files) are those the separate copies gave before."""

import hashlib

import numpy as np

from safetransfer.common.fingerprints import fingerprint
from safetransfer.data.cache import cache_key


def test_a_fingerprint_is_sha256_of_sorted_json_then_the_bytes():
    written = b'{"a": 1, "b": [1, 2], "c": "x"}'  # sort_keys, json's default separators
    assert fingerprint({"c": "x", "b": [1, 2], "a": 1}, 12) == hashlib.sha256(written).hexdigest()[:12]
    assert fingerprint({"a": 1}, 20, b"\x01\x02") == hashlib.sha256(b'{"a": 1}' + b"\x01\x02").hexdigest()[:20]
    assert fingerprint({"p": object}, 8) == hashlib.sha256(f'{{"p": "{object}"}}'.encode()).hexdigest()[:8]


def test_the_decoded_cache_keeps_its_file_names():
    indices = np.array([3, 1, 2])
    payload = b'{"geometry": {"crop": 32, "resize": 36}, "identity": {"name": "demo"}, "split": "train"}'
    expected = hashlib.sha256(payload + indices.astype(np.int64).tobytes()).hexdigest()[:24]
    assert cache_key({"name": "demo"}, "train", indices, {"resize": 36, "crop": 32}) == expected


def test_what_decides_each_identity_is_declared_once(compose_cfg):
    """Where a list is kept and whether a source may be overwritten change no result, no cached
    dataset and no cached term; the sampling changes the result but not the cached dataset."""
    from omegaconf import OmegaConf

    from safetransfer.common.fingerprints import config_key, data_identity, term_identity

    base = compose_cfg("target=cub200")
    moved = compose_cfg("target=cub200", "target.sample_list_dir=/elsewhere", "pretrain.overwrite=true")
    sampled = compose_cfg("target=cub200", "target.sampling_rate=30")
    assert config_key(moved) == config_key(base) != config_key(sampled)
    assert term_identity(moved) == term_identity(base)
    identity = lambda cfg: data_identity(OmegaConf.to_container(cfg.target, resolve=True))  # noqa: E731
    assert identity(moved) == identity(base) == identity(sampled)
    assert identity(compose_cfg("target=cub200", "target.root=/other")) != identity(base)


#: config keys, decoded-cache identities and term-cache identities computed at commit 5657c83
#: (the one-view configs with data.test_resize=shorter_side, the test transform of that time),
#: before the package's modules moved into folders (safetransfer.sources.FileSource became
#: safetransfer.sources.local.FileSource, and so on): a key that changes here means that results
#: computed before are no longer continued, paired or tabulated with new ones.
KEYS_BEFORE_THE_MOVE = {
    ("experiment=demo", "data.test_resize=shorter_side"): (
        "b0c29151be8c",
        "56371c677810a8afef4ebed0",
        "a932ab126c515854f3a5",
    ),
    # computed at c544d9f (which kept 5657c83's keys): the DELTA+BSS cell this entry held at first
    # changed its key on purpose when bss_table2 took DELTA's released-code convention
    (
        "experiment=bss_table2",
        "target=cub200",
        "method=l2_bss",
        "target.sampling_rate=30",
        "data.test_resize=shorter_side",
    ): (
        "4ab0b53a310e",
        "c17e9c8fd1a30c23ebc11044",
        "a3d640e6617da2d7cc7d",
    ),
    (
        "experiment=dtnh_table2",
        "target=mit_indoor67",
        "source=places365",
        "method=dtnh_knowdist",
        "data.test_resize=shorter_side",
    ): (
        "00c19cfc47e9",
        "a806da3d3b55d75679ff0452",
        "105160f2af9fdc1c98b9",
    ),
    ("method=from_scratch", "target=stanford_dogs", "data.test_resize=shorter_side"): (
        "1c80e5084927",
        "96ec9959b8d2feb49b79c2ef",
        "024a30f138d1975228c8",
    ),
    (
        "regularizer=l2sp",
        "source=file",
        "source.path=/tmp/x.pt",
        "target=caltech256_30",
        "data.test_resize=shorter_side",
    ): (
        "a51a3d623690",
        "68768cedf47ee279227099d0",
        "adff87f2e14e37d224eb",
    ),
}


def test_moving_a_class_inside_the_package_changes_no_key(compose_cfg):
    from omegaconf import OmegaConf

    from safetransfer.common.fingerprints import config_key, data_identity, term_identity

    for overrides, (key, data, terms) in KEYS_BEFORE_THE_MOVE.items():
        cfg = compose_cfg(*overrides, "paths.data_root=/srv/data", "paths.cache_dir=/srv/cache")
        assert config_key(cfg) == key, overrides
        assert fingerprint(data_identity(OmegaConf.to_container(cfg.target, resolve=True)), 24) == data, overrides
        assert fingerprint(term_identity(cfg), 20) == terms, overrides


def test_the_test_resize_keys_what_it_changes(compose_cfg):
    """data.test_resize changes the one-view test images, and the images DELTA's attention is
    computed from (the training images through that transform), also beside ten test crops;
    beside ten crops the test images themselves do not change, so the result's key does not."""
    from safetransfer.common.fingerprints import config_key, term_identity

    where = ("paths.data_root=/srv/data", "paths.cache_dir=/srv/cache", "target=cub200")
    for crops in ("data.test_crops=1", "data.test_crops=10"):
        square, shorter = (compose_cfg(*where, crops, f"data.test_resize={r}") for r in ("square", "shorter_side"))
        assert term_identity(square) != term_identity(shorter)
        assert (config_key(square) != config_key(shorter)) == (crops == "data.test_crops=1")
        # DELTA's numbers depend on it beside ten crops too (its attention): so does its key
        square, shorter = (
            compose_cfg(*where, crops, "method=delta", f"data.test_resize={r}") for r in ("square", "shorter_side")
        )
        assert config_key(square) != config_key(shorter)


def test_bss_table2_trains_delta_in_the_released_codes_form_under_a_new_key(compose_cfg):
    """Its DELTA cells (alpha 0.01 from the DELTA authors' run.sh) compute their code's form, so
    their key is not the one they had in the paper's form (2e0c31e15e26 at 5657c83); DELTA outside
    the preset keeps the paper's form and its key."""
    from safetransfer.common.fingerprints import config_key

    cell = ("experiment=bss_table2", "target=cub200", "target.sampling_rate=30")
    where = ("paths.data_root=/srv/data", "paths.cache_dir=/srv/cache")
    for method in ("delta", "delta_bss"):
        cfg = compose_cfg(*cell, f"method={method}", *where)
        assert cfg.regularizer.terms.delta.convention == "released_code"
    assert config_key(compose_cfg(*cell, "method=delta_bss", *where)) != "2e0c31e15e26"
    before = ("delta_convention=paper", "data.test_resize=shorter_side")  # the forms of 5657c83
    assert config_key(compose_cfg(*cell, "method=delta_bss", *before, *where)) == "2e0c31e15e26"
    plain = compose_cfg("method=delta", "target=cub200", "data.test_resize=shorter_side", *where)
    assert plain.regularizer.terms.delta.convention == "paper" and config_key(plain) == "6d6d232df1e7"


def test_every_class_a_config_names_exists_under_its_path():
    """Each `_target_` of conf/ that names one of ours, and each class KEYED_AS keeps a first
    name for, can be located (a class moved without updating KEYED_AS would fail here)."""
    from pathlib import Path

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    import safetransfer.conf
    from safetransfer.common.fingerprints import KEYED_AS

    named = set(KEYED_AS)
    for path in Path(safetransfer.conf.__path__[0]).rglob("*.yaml"):
        found = [OmegaConf.to_container(OmegaConf.load(path), resolve=False)]
        while found:
            node = found.pop()
            if isinstance(node, dict):
                target = node.get("_target_")
                if isinstance(target, str) and target.startswith("safetransfer."):
                    named.add(target)
                found.extend(node.values())
            elif isinstance(node, list):
                found.extend(node)
    assert len(named) >= 20
    for target in sorted(named):
        assert isinstance(get_class(target), type), target

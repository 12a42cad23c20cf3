"""The one hash (safetransfer/fingerprints.py), checked against hashlib on JSON written by hand:
the names it gives (results keys, cache files) are those the separate copies gave before."""

import hashlib

import numpy as np

from safetransfer.fingerprints import fingerprint
from safetransfer.targets.cache import cache_key


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

    from safetransfer.fingerprints import config_key, data_identity, term_identity

    base = compose_cfg("target=cub200")
    moved = compose_cfg("target=cub200", "target.sample_list_dir=/elsewhere", "pretrain.overwrite=true")
    sampled = compose_cfg("target=cub200", "target.sampling_rate=30")
    assert config_key(moved) == config_key(base) != config_key(sampled)
    assert term_identity(moved) == term_identity(base)
    identity = lambda cfg: data_identity(OmegaConf.to_container(cfg.target, resolve=True))  # noqa: E731
    assert identity(moved) == identity(base) == identity(sampled)
    assert identity(compose_cfg("target=cub200", "target.root=/other")) != identity(base)

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


def test_a_config_key_is_a_hash_of_names_and_values_never_of_where_a_class_lives(compose_cfg, monkeypatch):
    """The key, recomputed here with hashlib over the config's JSON without the sections that never
    change a number; the config names its classes by registered names, so no value holds a module
    path, and a class moved to another module (its __module__ changed, registered again under the
    same name) gives the same key and is the class a job builds."""
    import json

    from omegaconf import OmegaConf

    from safetransfer.common import registry
    from safetransfer.common.fingerprints import config_key
    from safetransfer.training.directions import DTNH

    cfg = compose_cfg("method=dtnh_l2sp", "target=cub200", "paths.data_root=/srv/data")
    container = OmegaConf.to_container(cfg, resolve=True)
    for section in (
        "seeds",
        "runtime",
        "results",
        "paths",
        "hydra",
        "logger",
        "search",
        "launcher",
        "delta_convention",
    ):
        container.pop(section, None)
    for section, key in (("target", "sample_list_dir"), ("pretrain", "overwrite"), ("data", "on_device")):
        container[section].pop(key, None)
    # added after results were keyed, with the value they all had: out of the key (ADDED_WITH_DEFAULT)
    assert container.pop("normalization") == {"kind": "batchnorm"}
    written = json.dumps(container, sort_keys=True).encode()
    assert config_key(cfg) == hashlib.sha256(written).hexdigest()[:12]
    assert "safetransfer." not in written.decode() and "torch.optim" not in written.decode()
    assert container["direction"]["kind"] == "dtnh" and container["regularizer"]["terms"]["l2sp"]["kind"] == "l2sp"

    before = config_key(cfg)
    moved = type("DTNH", (DTNH,), {"__module__": "safetransfer.somewhere_else"})
    monkeypatch.setitem(registry._REGISTERED["direction"], "dtnh", moved)
    assert config_key(compose_cfg("method=dtnh_l2sp", "target=cub200", "paths.data_root=/srv/data")) == before
    assert type(registry.build("direction", cfg.direction, "direction")) is moved


def test_the_test_resize_keys_what_it_changes(compose_cfg):
    """data.test_resize changes the one-view test images and the images DELTA's attention is
    computed from (the training images through that transform): the result's and the terms' keys."""
    from safetransfer.common.fingerprints import config_key, term_identity

    where = ("paths.data_root=/srv/data", "paths.cache_dir=/srv/cache", "target=cub200")
    for method in ("method=fine_tuning", "method=delta"):
        square, shorter = (compose_cfg(*where, method, f"data.test_resize={r}") for r in ("square", "shorter_side"))
        assert term_identity(square) != term_identity(shorter) and config_key(square) != config_key(shorter)


def test_bss_table2_trains_delta_in_the_released_codes_form_under_its_own_key(compose_cfg):
    """Its DELTA cells (alpha 0.01 from the DELTA authors' run.sh) compute their code's form, a key of
    their own; delta_convention is keyed where it is read, so its L2 cells keep theirs."""
    from safetransfer.common.fingerprints import config_key

    cell = ("experiment=bss_table2", "target=cub200", "target.sampling_rate=30")
    where = ("paths.data_root=/srv/data", "paths.cache_dir=/srv/cache")
    for method in ("delta", "delta_bss"):
        cfg = compose_cfg(*cell, f"method={method}", *where)
        assert cfg.regularizer.terms.delta.convention == "released_code"
        paper = compose_cfg(*cell, f"method={method}", "delta_convention=paper", *where)
        assert paper.regularizer.terms.delta.convention == "paper" and config_key(paper) != config_key(cfg)
    l2 = compose_cfg(*cell, "method=l2", *where)
    assert config_key(l2) == config_key(compose_cfg(*cell, "method=l2", "delta_convention=paper", *where))


def test_every_kind_a_config_names_is_registered_and_no_config_names_code():
    """Each node of conf/ that builds an object names a registered kind; no `_target_` is left."""
    from pathlib import Path

    from omegaconf import OmegaConf

    import safetransfer.conf
    from safetransfer.common import registry

    kinds = {"direction": "direction", "source": "source", "target": "target", "optimizer": "optimizer"}
    kinds.update(scheduler="scheduler")
    found_kinds = 0
    for path in Path(safetransfer.conf.__path__[0]).rglob("*.yaml"):
        tree = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        group = path.parent.name
        nodes = [(group, tree)]
        while nodes:
            where, node = nodes.pop()
            if isinstance(node, dict):
                assert "_target_" not in node, path
                if "kind" in node:
                    kind = "term" if "terms" in str(where) or group == "regularizer" else kinds.get(where, where)
                    assert node["kind"] in registry.known(kind), (path, node["kind"])
                    found_kinds += 1
                nodes.extend((k if k in kinds or k == "terms" else where, v) for k, v in node.items())
    assert found_kinds >= 29  # 12 targets, 7 sources, 6 terms, 2 directions, the optimizer and its schedule

"""timm backbones and timm's weights from the Hugging Face Hub (issue 38), on artifacts in their real
structure and without network.

Where the structures come from:
- the repository's files are written by timm's own exporter, `timm.models.save_for_hf` (what timm uses to
  publish `timm/<model.tag>` repositories): `model.safetensors` and `config.json` (architecture,
  num_classes, pretrained_cfg);
- the cache is laid out as huggingface_hub lays it out (its file_download.py and its cache docs):
  `models--timm--<name>/blobs/<etag>` (a git-lfs file's etag is its sha256, a git file's its git blob
  sha1), `refs/main` holding the commit, `snapshots/<commit>/<file>` relative links into blobs;
- the server answers as the Hub's `resolve` endpoint does for huggingface_hub's `get_hf_file_metadata`
  and download: HEAD and GET on `/<repo>/resolve/<revision>/<file>` with `X-Repo-Commit` and `ETag`; for a
  git-lfs file a 302 to the CDN with `X-Linked-Etag` (the sha256) and `X-Linked-Size`.
"""

import hashlib
import http.server
import json
import os
import threading

import pytest
import torch

from conftest import TINY
from safetransfer.common import downloads
from safetransfer.common.errors import ConfigError, DownloadError

MODEL, TAG = "test_resnet", "test_resnet.r160_in1k"  # timm's smallest ResNet and its published weights' tag
REPOSITORY = f"timm/{TAG}"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def git_blob_sha1(data: bytes) -> str:
    """The etag of a file stored in git (not lfs): its git blob id."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@pytest.fixture
def published(tmp_path):
    """The repository's files as timm exports them: (state_dict, {file name: bytes})."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    folder = tmp_path / "export"
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    files = {name: (folder / name).read_bytes() for name in ("model.safetensors", "config.json")}
    return model.state_dict(), files


def etag(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(data)


def lay_out_cache(cache, files: dict) -> None:
    """huggingface_hub's cache folder of the repository, at COMMIT."""
    repo = cache / f"models--{REPOSITORY.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    for name, data in files.items():
        (repo / "blobs" / etag(name, data)).write_bytes(data)
        os.symlink(f"../../blobs/{etag(name, data)}", repo / "snapshots" / COMMIT / name)


@pytest.fixture
def hub_home(tmp_path, monkeypatch):
    """huggingface_hub's cache in the test's folder (HF_HUB_CACHE as huggingface_hub reads it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, as huggingface_hub reads it (its constant is read when it is imported)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_a_timm_backbone_is_classifier_free_with_its_feature_info_stages():
    from safetransfer.training.backbones import TransferNet

    net = TransferNet(f"timm/{MODEL}", 3)
    assert net.stages == ("layer1", "layer2", "layer3", "layer4")  # timm's feature_info, the stem left out
    logits, features = net(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 3) and [features.maps[s].shape[2] for s in net.stages] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="backbone.name=timm/resnet_nope: timm has no model resnet_nope"):
        TransferNet("timm/resnet_nope", 3)


def test_deltas_ablation_runs_a_timm_resnet_as_its_own_forward_and_a_vit_is_refused_in_one_line():
    """DELTA's channel ablation continues a ResNet from a stage by hand (stem, stages, pooling): on timm's
    ResNet (act1, global_pool) that equals the model's own forward; a ViT has no such stages."""
    from safetransfer.training.backbones import TransferNet
    from safetransfer.training.regularizers.delta import DELTA, forward_from, forward_to

    net = TransferNet(f"timm/{MODEL}", 3).eval()
    images = torch.randn(2, 3, 32, 32)
    for stage in ("layer2", "layer4"):
        assert torch.allclose(
            forward_from(net.backbone, stage, forward_to(net.backbone, stage, images)), net.backbone(images), atol=1e-6
        )
    assert DELTA(alpha=0.01).check_backbone(net) == ["layer1", "layer2", "layer3", "layer4"]
    with pytest.raises(ValueError, match="DELTA's channel attention ablates channels of ResNet stages"):
        DELTA(alpha=0.01).check_backbone(TransferNet("timm/test_vit", 3))


def test_the_weights_load_offline_from_huggingface_hubs_cache_with_their_classifier_and_names(
    hub_home, offline, published
):
    from timm.data import ImageNetInfo

    from safetransfer.sources.timm_hub import TimmSource

    state, files = published
    lay_out_cache(hub_home, files)
    weights = TimmSource(model=TAG).load(f"timm/{MODEL}")
    assert set(weights.backbone) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(weights.backbone[k], state[k]) for k in weights.backbone)
    assert torch.equal(weights.head["weight"], state["fc.weight"]) and torch.equal(
        weights.head["bias"], state["fc.bias"]
    )
    assert weights.classes == list(ImageNetInfo().label_names()) and len(weights.classes) == 1000
    path = TimmSource(model=TAG).local_file(f"timm/{MODEL}")
    assert (
        path.name == "model.safetensors"
        and path.resolve().name == hashlib.sha256(files["model.safetensors"]).hexdigest()
    )
    # a folder of the files (hf download --local-dir) reads the same, without the cache
    local = TimmSource(model=TAG, path=str(path.parent)).load(f"timm/{MODEL}")
    assert all(torch.equal(local.backbone[k], weights.backbone[k]) for k in weights.backbone)


def test_a_timm_source_and_a_backbone_that_differ_are_one_line():
    from safetransfer.sources.timm_hub import TimmSource

    with pytest.raises(
        ConfigError,
        match=r"source.model=resnet50.a1_in1k is a resnet50 and backbone.name=timm/test_resnet; "
        r"set backbone.name=timm/resnet50",
    ):
        TimmSource(model="resnet50.a1_in1k").load(f"timm/{MODEL}")
    with pytest.raises(
        ConfigError, match="source=timm gives timm's weights and backbone.name=resnet18 is torchvision's"
    ):
        TimmSource(model="resnet50.a1_in1k").load("resnet18")
    with pytest.raises(
        ConfigError,
        match=r"source.model=test_resnet.nope: timm names no such weights; "
        r"its tags for test_resnet: test_resnet.r160_in1k",
    ):
        TimmSource(model="test_resnet.nope").load(f"timm/{MODEL}")


def test_training_from_the_hub_cache_offline_with_knowdist_under_dtnh(
    train_in_process, tmp_path, hub_home, offline, published
):
    """The issue's command: a timm backbone from its Hub weights, trained with no network; the run records the
    weights' file and its sha256 (the blob's name in the cache)."""
    _, files = published
    lay_out_cache(hub_home, files)
    code, out, err = train_in_process(
        *(o for o in TINY if not o.startswith("source")),
        f"backbone.name=timm/{MODEL}",
        "source=timm",
        f"source.model={TAG}",
        "method=dtnh_knowdist",
        "results.dir=res",
    )
    assert code == 0, err[-3000:]
    (metrics_path,) = tmp_path.rglob("seed_0/metrics.json")
    metrics = json.loads(metrics_path.read_text())
    assert metrics["method"] == "DTNH (KnowDist)"
    assert metrics["source_checkpoint"]["sha256"] == hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert "timm:test_resnet.r160_in1k" in (tmp_path / "res" / "demo.md").read_text()


class Hub:
    """A server on 127.0.0.1 answering as the Hub's resolve endpoint; `spoil` changes what the CDN sends."""

    def __init__(self, files: dict, spoil=None):
        self.requests, hub = [], self
        blobs = {etag(n, d): d for n, d in files.items() if n.endswith(".safetensors")}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def answer(self, body: bool):
                hub.requests.append((self.command, self.path))
                prefix = f"/{REPOSITORY}/resolve/main/"
                if self.path.startswith(prefix) and self.path[len(prefix) :] in files:
                    name = self.path[len(prefix) :]
                    data = files[name]
                    if name.endswith(".safetensors"):  # git-lfs: redirected to the CDN
                        self.send_response(302)
                        self.send_header("Location", f"{hub.cdn_url}/cdn/{etag(name, data)}")  # another origin
                        self.send_header("X-Linked-Etag", f'"{etag(name, data)}"')
                        self.send_header("X-Linked-Size", str(len(data)))
                        self.send_header("ETag", f'"{git_blob_sha1(data)}"')
                        self.send_header("X-Repo-Commit", COMMIT)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.reply(data, {"ETag": f'"{etag(name, data)}"', "X-Repo-Commit": COMMIT}, body)
                elif self.path.startswith("/cdn/") and self.path[5:] in blobs:
                    data = blobs[self.path[5:]]
                    self.reply(spoil(data) if spoil else data, {}, body)
                else:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def reply(self, data: bytes, headers: dict, body: bool):
                self.send_response(200)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802
                self.answer(body=False)

            def do_GET(self):  # noqa: N802
                self.answer(body=True)

            def log_message(self, *args):
                pass

        self.servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        self.url, self.cdn_url = (f"http://127.0.0.1:{server.server_address[1]}" for server in self.servers)
        for server in self.servers:  # the Hub, and its CDN on another port (a redirect huggingface_hub does not follow)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        for server in self.servers:
            server.shutdown()
            server.server_close()


@pytest.fixture
def hub_server():
    servers = []

    def start(files, spoil=None):
        servers.append(Hub(files, spoil))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_a_download_through_the_mirror_lands_in_the_cache_as_huggingface_hub_lays_it_out(
    hub_home, published, hub_server
):
    from safetransfer.sources.timm_hub import TimmSource

    state, files = published
    hub = hub_server(files)
    with downloads.network({"mirror": hub.url, "download_timeout_s": 5, "download_retries": 0}):
        weights = TimmSource(model=TAG).load(f"timm/{MODEL}")
    assert torch.equal(weights.head["weight"], state["fc.weight"])
    repo = hub_home / f"models--{REPOSITORY.replace('/', '--')}"
    assert (repo / "refs" / "main").read_text() == COMMIT
    sha = hashlib.sha256(files["model.safetensors"]).hexdigest()
    assert (repo / "blobs" / sha).read_bytes() == files["model.safetensors"]
    link = repo / "snapshots" / COMMIT / "model.safetensors"
    assert link.is_symlink() and link.resolve() == (repo / "blobs" / sha).resolve()
    assert ("GET", f"/cdn/{sha}") in hub.requests


@pytest.mark.parametrize(
    "spoil, problem",
    [
        (lambda data: data[:-8] + b"\x00" * 8, "is not the Hub's"),  # the same length, other bytes: a wrong checksum
        (lambda data: (b"<!DOCTYPE html><html>" + b" " * len(data))[: len(data)], "an HTML page"),
    ],
    ids=["wrong checksum", "html page"],
)
def test_a_spoiled_download_is_one_line_and_nothing_of_it_is_kept(hub_home, published, hub_server, spoil, problem):
    from safetransfer.sources.timm_hub import TimmSource

    _, files = published
    hub = hub_server(files, spoil)
    with pytest.raises(DownloadError, match=problem) as error:
        with downloads.network({"mirror": hub.url, "download_timeout_s": 5, "download_retries": 0}):
            TimmSource(model=TAG).load(f"timm/{MODEL}")
    assert "\n" not in str(error.value) and "deleted from the cache" in str(error.value)
    repo = hub_home / f"models--{REPOSITORY.replace('/', '--')}"
    assert not (repo / "snapshots" / COMMIT / "model.safetensors").exists()
    assert not (repo / "blobs" / hashlib.sha256(files["model.safetensors"]).hexdigest()).exists()


def test_safetransfer_fetch_downloads_verifies_and_reports_a_hub_source(hub_home, published, hub_server, capsys):
    from safetransfer.commands.reproduce import fetch_main

    _, files = published
    hub = hub_server(files)
    arguments = [f"backbone.name=timm/{MODEL}", "source=timm", f"source.model={TAG}", f"paths.mirror={hub.url}"]

    def fetch() -> int:
        try:
            fetch_main(arguments)
        except SystemExit as stopped:
            return stopped.code or 0
        return 0

    assert fetch() == 0
    out = capsys.readouterr().out
    assert f"downloaded and verified source=timm backbone=timm/{MODEL}: {hub_home}" in out, out
    assert "HTTP Request" not in out  # huggingface_hub's HTTP client keeps its request lines to itself
    asked = len(hub.requests)
    assert fetch() == 0  # a second run asks the server nothing: the file in the cache is checked and used
    assert f"present and verified    source=timm backbone=timm/{MODEL}" in capsys.readouterr().out
    assert len(hub.requests) == asked


def test_a_timm_backbone_takes_its_weights_preprocessing_unless_the_preset_sets_it(compose_cfg):
    """data.mean, std, crop and resize from timm's own data config of the model (resolve_model_data_config:
    its normalization, input size, and the resize its centre crop takes); torchvision's backbones keep the
    ImageNet values; a preset (the demo's 32 px) or the command line wins."""
    import math

    import timm
    from timm.data import resolve_model_data_config

    expected = resolve_model_data_config(timm.create_model(TAG, pretrained=False))
    cfg = compose_cfg(f"backbone.name=timm/{MODEL}", "source=timm", f"source.model={TAG}")
    assert list(cfg.data.mean) == list(expected["mean"]) and list(cfg.data.std) == list(expected["std"])
    assert cfg.data.crop == expected["input_size"][-1] == 160
    assert cfg.data.resize == math.floor(160 / expected["crop_pct"])
    plain = compose_cfg()
    assert (plain.data.crop, plain.data.resize, list(plain.data.std)) == (224, 256, [0.229, 0.224, 0.225])
    assert compose_cfg("experiment=demo", f"backbone.name=timm/{MODEL}").data.crop == 32
    assert compose_cfg(f"backbone.name=timm/{MODEL}", "data.crop=96").data.crop == 96


def test_torchvisions_weights_for_a_timm_backbone_are_one_line(train_in_process):
    code, out, err = train_in_process(*TINY, "backbone.name=timm/resnet50", "source=imagenet")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "source=imagenet gives torchvision's weights" in lines[0], err

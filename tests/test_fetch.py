"""The download path for real: a local HTTP server on 127.0.0.1, started by the test, serves
checkpoints, archives and lists in their publishers' structures under the official URLs'
paths (paths.mirror points every download at it), with one HTML error page, one truncated
archive and one archive with a wrong checksum. safetransfer-fetch and
`safetransfer-reproduce --fetch` download, verify and extract; a tiny job then trains on
what was fetched. The pinned digests are pointed at the fixtures' own (a fixture cannot
match the published files' digests). Nothing here reaches beyond 127.0.0.1."""

import hashlib
import http.server
import shutil
import tarfile
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision

import fixtures
import published
from conftest import TINY, TINY_DEMO_SOURCE
from safetransfer.commands import reproduce
from safetransfer.common.downloads import file_digest, mirror_url
from safetransfer.data import sample_lists
from safetransfer.data.targets import cub200, mit_indoor67, stanford_dogs

HTML = b"<!DOCTYPE html>\n<html><head><title>Service Unavailable</title></head><body>down</body></html>\n"


class Server:
    """A static file server on 127.0.0.1 (port chosen by the system) counting its requests."""

    def __init__(self, directory: Path):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def publish(site: Path, url: str, source: Path | bytes) -> Path:
    """Place `source` on the local site where the mirror of `url` serves it."""
    path = site / mirror_url(url, "").lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        shutil.copyfile(source, path)
    return path


def tar(path: Path, folder: Path, members: list[str], gzip: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gzip else "w") as archive:
        for member in members:
            archive.add(folder / member, arcname=member)
    return path


@pytest.fixture
def site(tmp_path, monkeypatch):
    """The publishers' files, served locally; the pins pointed at the fixtures' digests."""
    build, root = tmp_path / "build", tmp_path / "site"
    files = {}
    # torchvision's ResNet-18 V1 weights and CSAIL's Places365 ResNet-18; an HTML page in place of the ResNet-50
    weights = published.torchvision_v1_checkpoint(build / "resnet18-f37072fd.pth", "resnet18")
    files["imagenet"] = publish(
        root, torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url, build / "resnet18-f37072fd.pth"
    )
    published.csail_places365_checkpoint(build / "resnet18_places365.pth.tar", "resnet18")
    files["places365"] = publish(
        root,
        "http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar",
        build / "resnet18_places365.pth.tar",
    )
    publish(root, "http://places2.csail.mit.edu/models_places365/resnet50_places365.pth.tar", HTML)
    # CUB_200_2011.tgz holds CUB_200_2011/ and, beside it, attributes.txt (a stray file of the release)
    fixtures.make_cub200(build, classes=3, train_per_class=5, test_per_class=2)
    (build / "attributes.txt").write_text("1 has_bill_shape::curved_(up_or_down)\n")
    archive = tar(build / "CUB_200_2011.tgz", build, ["CUB_200_2011", "attributes.txt"])
    files["cub"] = publish(root, cub200.URL, archive)
    monkeypatch.setattr(cub200.CUB200, "archives", ((cub200.URL, f"md5:{file_digest(archive, 'md5')}"),))
    # the BSS authors' list for CUB at 15 %, in their format (train/<class folder>/<file>)
    listed = b"".join(f"train/00{c + 1}.Bird_{c}/Bird_{c}_{j:04d}.jpg\n".encode() for c in range(3) for j in (0, 2, 4))
    publish(root, sample_lists.BSS_URL.format(file="cub200_15_train.txt"), listed)
    monkeypatch.setitem(sample_lists.BSS_SHA256, "cub200_15_train.txt", hashlib.sha256(listed).hexdigest())
    # Flowers 102 through torchvision's own download code: 102flowers.tgz holds jpg/
    fixtures.make_flowers102(build)
    flowers = torchvision.datasets.Flowers102
    tar(build / "102flowers.tgz", build / "flowers-102", ["jpg"])
    digests = {}
    for key, (name, _) in flowers._file_dict.items():
        local = build / ("102flowers.tgz" if key == "image" else f"flowers-102/{name}")
        publish(root, flowers._download_url_prefix + name, local)
        digests[key] = (name, file_digest(local, "md5"))
    monkeypatch.setattr(flowers, "_file_dict", digests)
    # Stanford Dogs' images.tar with the published md5 pinned: the fixture cannot match it
    fixtures.make_stanford_dogs(build, classes=3)
    publish(root, stanford_dogs.IMAGES_URL, tar(build / "images.tar", build / "stanford_dogs", ["Images"], gzip=False))
    publish(
        root,
        stanford_dogs.LISTS_URL,
        tar(build / "lists.tar", build / "stanford_dogs", ["train_list.mat", "test_list.mat"], gzip=False),
    )
    # MIT Indoor 67's image archive cut short (its pin dropped, so that extraction meets the damage)
    fixtures.make_mit_indoor67(build, classes=3)
    whole = tar(build / "indoorCVPR_09.tar", build / "mit_indoor67", ["Images"], gzip=False).read_bytes()
    publish(root, mit_indoor67.IMAGES_URL, whole[: len(whole) // 2])
    monkeypatch.setattr(mit_indoor67.MITIndoor67, "archives", ((mit_indoor67.IMAGES_URL, None),))
    server = Server(root)
    yield server, files, weights
    server.close()


@pytest.fixture
def places(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    return {"data": tmp_path / "data", "hub": tmp_path / "torch" / "hub" / "checkpoints", "cache": tmp_path / "cache"}


def fetch(capsys, *overrides):
    try:
        reproduce.fetch_main(list(overrides))
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr().out
    return code, out


def status_of(out: str, artifact: str) -> str:
    lines = [line for line in out.splitlines() if f" {artifact}: " in line]
    assert len(lines) == 1, out
    return lines[0]


def test_fetch_downloads_verifies_extracts_then_a_job_trains_on_it(site, places, capsys, train_in_process):
    server, files, weights = site
    common = [f"paths.mirror={server.url}", f"paths.cache_dir={places['cache']}", f"target.root={places['data']}"]
    cub = [
        "target=cub200",
        "target.expected_classes=3",
        "target.expected_split=[15,6]",
        "target.sample_list=bss",
        "target.sampling_rate=15",
    ]
    imagenet = ["source=imagenet", f"source.sha256={file_digest(files['imagenet'])}"]
    code, out = fetch(capsys, *imagenet, *cub, *common)
    assert code == 0, out
    for artifact in ("source=imagenet backbone=resnet18", "target=cub200", "sample_list=bss target=cub200 rate=15"):
        assert status_of(out, artifact).startswith("downloaded and verified"), out
    assert "(9 images matched)" in out and "data: ready (3 of 3" in out
    hub_file = places["hub"] / "resnet18-f37072fd.pth"
    assert file_digest(hub_file) == file_digest(files["imagenet"])  # the weights, byte for byte
    assert (places["data"] / "CUB_200_2011" / "images.txt").is_file()  # the archive extracted into the root
    assert not (places["data"] / "CUB_200_2011" / "CUB_200_2011").exists()
    # a rerun downloads nothing that is present
    served = len(server.requests)
    code, out = fetch(capsys, *imagenet, *cub, *common)
    assert code == 0 and len(server.requests) == served
    assert all(
        status_of(out, a).startswith("present and verified")
        for a in ("source=imagenet backbone=resnet18", "target=cub200")
    )
    # a tiny job on what was fetched, with the mirror unreachable: it reads the fetched files only
    server.close()
    tiny = [o for o in TINY if not o.startswith("target.") and o not in TINY_DEMO_SOURCE]
    code, _, err = train_in_process(
        *tiny,
        *imagenet,
        *cub,
        *common,
        "train.batch_size=4",
        "results.dir=res",
        "runtime.diagnostics_every=0",
        "hydra.run.dir=run",
    )
    assert code == 0, err[-3000:]
    assert len((Path.cwd() / "run" / "sampled_train_indices.json").read_text()) > 0


def test_fetch_reports_html_pages_wrong_checksums_and_truncated_archives(site, places, capsys):
    server, files, _ = site
    common = [f"paths.mirror={server.url}", f"paths.cache_dir={places['cache']}", f"target.root={places['data']}"]
    code, out = fetch(capsys, "source=places365", "backbone=resnet50", "target=stanford_dogs", *common)
    assert code == 1
    assert "answered with an HTML page" in status_of(out, "source=places365 backbone=resnet50")
    assert not (places["hub"] / "resnet50_places365.pth.tar").exists()  # the page was deleted
    dogs = status_of(out, "target=stanford_dogs")
    assert dogs.startswith("failed") and "images.tar: md5" in dogs and "does not match the published" in dogs
    assert not (places["data"] / "stanford_dogs" / "images.tar").exists()
    code, out = fetch(capsys, "target=mit_indoor67", *common)
    line = status_of(out, "target=mit_indoor67")
    # no digest is pinned: the archive read to its end tells it is cut short, before it takes its name
    assert code == 1 and line.startswith("failed") and "the download is not whole (ReadError" in line
    assert not (places["data"] / "mit_indoor67" / "indoorCVPR_09.tar").exists()
    assert [p.name for p in (places["data"] / "mit_indoor67").iterdir() if not p.name.endswith(".lock")] == []
    # Stanford Cars cannot be downloaded: the line says how to lay it out, and the exit is non-zero
    code, out = fetch(capsys, "target=stanford_cars", *common)
    assert code == 1 and "car_ims/NNNNNN.jpg,cars_annos.mat" in status_of(out, "target=stanford_cars")
    assert status_of(out, "target=stanford_cars").startswith("cannot be downloaded")


@pytest.mark.e2e  # a table's data fetched and planned: 2.5 s
def test_reproduce_fetch_prepares_a_table_and_plan_then_says_it_is_ready(site, places, capsys):
    server, files, _ = site
    cell = [
        "target=flowers102",
        "method=fine_tuning",
        "target.expected_split=[102,102]",
        f"paths.mirror={server.url}",
        f"paths.cache_dir={places['cache']}",
        f"target.root={places['data']}",
    ]
    places365 = f"source.sha256.resnet18={file_digest(files['places365'])}"
    reproduce.main(["dtnh_table3", "--plan", *cell, places365])
    assert "data: NOT ready (0 of 2" in capsys.readouterr().out
    reproduce.main(["dtnh_table3", "--fetch", *cell, places365])  # torchvision's Flowers102 download, mirrored
    out = capsys.readouterr().out
    assert status_of(out, "target=flowers102").startswith("downloaded and verified"), out
    assert status_of(out, "source=places365 backbone=resnet18").startswith("downloaded and verified"), out
    assert (places["data"] / "flowers-102" / "jpg" / "image_00001.jpg").is_file()
    reproduce.main(["dtnh_table3", "--plan", *cell, places365])
    assert "data: ready (2 of 2 artifacts present and verified)" in capsys.readouterr().out


def test_a_source_made_by_pretraining_is_named_with_its_command_and_its_inputs_fetched(site, places, capsys):
    server, _, _ = site
    common = [f"paths.mirror={server.url}", f"paths.cache_dir={places['cache']}", f"target.root={places['data']}"]
    code, out = fetch(
        capsys,
        "source=stanford_dogs",
        "target=cub200",
        "target.expected_classes=3",
        "target.expected_split=[15,6]",
        *common,
    )
    assert code == 1
    made = status_of(out, "source=stanford_dogs backbone=resnet18")
    assert made.startswith("cannot be downloaded") and "safetransfer-train experiment=pretrain_source" in made
    # what the pretraining run reads comes first: torchvision's weights (whose published digest the fixture on
    # the local site cannot match: refused and deleted) and Stanford Dogs (its images.tar fails its md5 here)
    weights = status_of(out, "source=imagenet backbone=resnet18")
    assert weights.startswith("failed") and "does not match the published f37072fd" in weights
    assert status_of(out, "target=stanford_dogs").startswith("failed")
    assert out.index("source=imagenet backbone=resnet18") < out.index("source=stanford_dogs backbone=resnet18")
    assert status_of(out, "target=cub200").startswith("downloaded and verified")

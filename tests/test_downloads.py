"""Downloads against servers that misbehave, on 127.0.0.1: half a body under a correct Content-Length,
a declared length far beyond what comes, a drip, silence, a redirect to another port, a body cut
without a declared length; a stop in the middle; a full disk while extracting. A download is whole or
absent: nothing partial is ever left under its final name or beside it, and a rerun fetches again."""

import errno
import http.server
import io
import os
import signal
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from safetransfer.common import downloads, signals
from safetransfer.common.errors import DownloadError, StorageError

BODY = bytes(range(256)) * 4096  # 1 MiB


class Misbehaving:
    """An HTTP server on 127.0.0.1 whose answer to each path is a function of the request handler."""

    def __init__(self, answers: dict):
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server's name)
                server.requests.append(self.path)
                answers[self.path](self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def send(handler, body: bytes, declared: int | None = None, status: int = 200, drip_s: float = 0.0):
    handler.send_response(status)
    if declared is not None:
        handler.send_header("Content-Length", str(declared))
    handler.send_header("Connection", "close")
    handler.end_headers()
    for start in range(0, len(body), 1 if drip_s else len(body) or 1):
        handler.wfile.write(body[start : start + (1 if drip_s else len(body))])
        handler.wfile.flush()
        time.sleep(drip_s)
    handler.close_connection = True


def whole(handler):
    send(handler, BODY, len(BODY))


def half(handler):  # half the body under the whole body's Content-Length, then the connection closes
    send(handler, BODY[: len(BODY) // 2], len(BODY))


def silent(handler):  # accepts, reads the request, never answers
    time.sleep(30)


@pytest.fixture
def serve():
    servers = []

    def start(answers):
        servers.append(Misbehaving(answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def quick(server, **more):
    """The network settings of a test: this server as the mirror, short timeouts, quick retries."""
    settings = {"mirror": server.url, "download_timeout_s": 0.3, "download_retries": 1, "download_backoff_s": 0.05}
    return downloads.network({**settings, **more})


def left_beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock"))


@pytest.mark.parametrize(
    "answer,reason",
    [
        (half, "the body ended after 524,288 of the 1,048,576 bytes"),
        (lambda h: send(h, BODY, 50 * 10**9), "of the 50,000,000,000 bytes"),  # a declared 50 GB, 1 MiB sent
        (lambda h: send(h, BODY[:6], 100, drip_s=0.05), "the body ended after 6 of the 100 bytes"),  # a drip
        (silent, "TimeoutError"),
    ],
    ids=["half", "huge", "drip", "silent"],
)
def test_a_download_that_is_not_whole_is_not_kept_and_a_rerun_fetches_it(tmp_path, serve, answer, reason):
    """The server's declared length is checked: nothing is kept under the final name (nor beside it),
    and the same call against a good server downloads the file (nothing stale stands in its way)."""
    calls = {"n": 0}

    def bad_then(handler):
        calls["n"] += 1
        answer(handler)

    server = serve({"/models/w.bin": bad_then})
    path = tmp_path / "w.bin"
    started = time.monotonic()
    with quick(server), pytest.raises(DownloadError, match=reason) as failed:
        downloads.download("https://example.org/models/w.bin", path)
    assert time.monotonic() - started < 10 and calls["n"] == 2  # the first try and one retry
    assert f"could not download {server.url}/models/w.bin (the official https://example.org/models/w.bin" in str(
        failed.value
    )
    assert left_beside(path) == []
    good = serve({"/models/w.bin": whole})
    with quick(good):
        assert downloads.download("https://example.org/models/w.bin", path)
    assert path.read_bytes() == BODY and good.requests == ["/models/w.bin"]


def test_a_transient_failure_is_retried_and_the_second_try_is_kept(tmp_path, serve):
    answers = iter([half, whole])
    server = serve({"/w.bin": lambda handler: next(answers)(handler)})
    with quick(server):
        assert downloads.download("https://example.org/w.bin", tmp_path / "w.bin")
    assert (tmp_path / "w.bin").read_bytes() == BODY and len(server.requests) == 2


def test_a_redirect_from_the_mirror_to_another_host_is_followed_as_sent(tmp_path, serve):
    """Only the first request goes to the mirror; its redirect (a CDN, another port) is not rewritten back."""
    cdn = serve({"/blobs/w.bin": whole})

    def redirect(handler):
        handler.send_response(302)
        handler.send_header("Location", f"{cdn.url}/blobs/w.bin")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    mirror = serve({"/models/w.bin": redirect})
    with quick(mirror):
        assert downloads.download("https://download.example.org/models/w.bin", tmp_path / "w.bin")
    assert mirror.requests == ["/models/w.bin"] and cdn.requests == ["/blobs/w.bin"]
    assert (tmp_path / "w.bin").read_bytes() == BODY
    # torchvision's own downloads go through urllib's opener, which the block sets up the same way
    with quick(mirror), torch.hub.urlopen("https://download.example.org/models/w.bin") as response:
        assert response.read() == BODY
    assert mirror.requests[-1] == "/models/w.bin" and cdn.requests[-1] == "/blobs/w.bin"


def zipped_checkpoint() -> bytes:
    """A checkpoint as torch.save writes it today: a zip archive (its central directory at the end)."""
    buffer = io.BytesIO()
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3)}, buffer)
    assert zipfile.is_zipfile(io.BytesIO(buffer.getvalue()))
    return buffer.getvalue()


def test_without_a_digest_or_a_length_a_cut_checkpoint_or_archive_is_not_kept(tmp_path, serve):
    """No Content-Length (the body ends when the connection closes) and no pinned digest: the file's
    own format tells it is cut (a zip without its central directory, a tar or gzip stream cut short)."""
    import tarfile

    folder = tmp_path / "release"
    (folder / "Images").mkdir(parents=True)
    (folder / "Images" / "a.jpg").write_bytes(os.urandom(40_000))
    with tarfile.open(tmp_path / "data.tgz", "w:gz") as archive:
        archive.add(folder / "Images", arcname="Images")
    checkpoint, tgz = zipped_checkpoint(), (tmp_path / "data.tgz").read_bytes()
    server = serve(
        {
            "/w.pth": lambda h: send(h, checkpoint[: len(checkpoint) - 100]),
            "/data.tgz": lambda h: send(h, tgz[: len(tgz) // 2]),
        }
    )
    root = tmp_path / "root"
    with quick(server, download_retries=0):
        with pytest.raises(DownloadError, match="the download is not whole .*central directory"):
            downloads.download("https://example.org/w.pth", root / "w.pth")
        with pytest.raises(DownloadError, match="the download is not whole"):
            downloads.fetch_archive("https://example.org/data.tgz", root / "data", None)
    assert left_beside(root / "w.pth") == ["data"] and left_beside(root / "data" / "x") == []

    # a cut file left under the final name by an earlier version: downloaded again, whole this time
    (root / "w.pth").write_bytes(checkpoint[:1000])
    good = serve({"/w.pth": lambda h: send(h, checkpoint, len(checkpoint))})
    with quick(good):
        assert downloads.download("https://example.org/w.pth", root / "w.pth")
    assert (root / "w.pth").read_bytes() == checkpoint


def test_a_stop_ends_a_download_at_once_and_leaves_nothing(tmp_path, serve):
    """SIGTERM while the server is silent (the timeout far away): Preempted within a second, the
    temporary file removed."""
    server = serve({"/w.bin": silent})
    path = tmp_path / "w.bin"
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    with signals.StopSignals(), quick(server, download_timeout_s=60):
        timer.start()
        started = time.monotonic()
        with pytest.raises(signals.Preempted) as stopped:
            downloads.download("https://example.org/w.bin", path)
    assert time.monotonic() - started < 2.5
    assert stopped.value.signum == signal.SIGTERM and f"while downloading {server.url}/w.bin" in str(stopped.value)
    assert left_beside(path) == []


def test_a_full_disk_while_extracting_keeps_the_verified_archive_and_no_partial_member(tmp_path, serve, monkeypatch):
    import tarfile

    from torchvision.datasets import utils

    folder = tmp_path / "release" / "Images"
    folder.mkdir(parents=True)
    (folder / "a.jpg").write_bytes(b"x" * 1000)
    with tarfile.open(tmp_path / "data.tar", "w") as archive:
        archive.add(folder, arcname="Images")
    body = (tmp_path / "data.tar").read_bytes()
    server = serve({"/data.tar": lambda h: send(h, body, len(body))})

    def full_disk(source, destination):  # writes part of a member, then the disk is full
        (Path(destination) / "Images").mkdir()
        (Path(destination) / "Images" / "a.jpg").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils, "extract_archive", full_disk)
    root = tmp_path / "root"
    with quick(server), pytest.raises(StorageError, match="No space left on device.*the archive is kept"):
        downloads.fetch_archive("https://example.org/data.tar", root, None)
    assert left_beside(root / "data.tar") == ["data.tar"]  # no partial member, no staging folder
    monkeypatch.undo()
    with quick(server):
        assert not downloads.fetch_archive("https://example.org/data.tar", root, None)  # kept: not fetched again
    assert (root / "Images" / "a.jpg").read_bytes() == b"x" * 1000 and server.requests == ["/data.tar"]


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signum,entry",
    [(signal.SIGINT, "fetch"), (signal.SIGTERM, "fetch"), (signal.SIGTERM, "train")],
    ids=["fetch-SIGINT", "fetch-SIGTERM", "train-SIGTERM"],
)
def test_a_signal_during_a_download_is_one_line_and_leaves_nothing(tmp_path, serve, signum, entry):
    """The real command in a process of its own, its download stuck on a silent mirror: the signal ends
    it at once, in one line, with 128 + the signal, and no partial file is left in torch's cache.
    safetransfer-train kept downloading for 28 s after "stopping after the current step"."""
    import subprocess
    import sys

    server = serve({"/models/resnet18-f37072fd.pth": silent})
    module = {"fetch": "reproduce import fetch_main as main", "train": "train import main"}[entry]
    command = f"from safetransfer.commands.{module}; main()"
    process = subprocess.Popen(
        [sys.executable, "-c", command, "source=imagenet", "target=demo", f"paths.mirror={server.url}"],
        cwd=tmp_path,
        env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not server.requests and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert server.requests, process.communicate()
    time.sleep(0.3)
    process.send_signal(signum)
    started = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - started < 5
    lines = [line for line in err.splitlines() if line.startswith(f"safetransfer-{entry}")]
    assert process.returncode == 128 + signum and len(lines) == 1, err
    name = signal.Signals(signum).name
    assert lines[0].startswith(f"safetransfer-{entry}: stopped by {name} while downloading {server.url}/models/")
    assert "Traceback" not in err
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir() if not p.name.endswith(".lock")] == []


def test_a_digest_mismatch_names_the_setting_that_accepts_a_copy_the_user_vouches_for(tmp_path, serve):
    import hashlib

    server = serve({"/w.bin": whole})
    actual = hashlib.sha256(BODY).hexdigest()
    with quick(server), pytest.raises(DownloadError, match=f"taken with source.sha256={actual}"):
        downloads.download("https://example.org/w.bin", tmp_path / "w.bin", "sha256:" + "0" * 64, vouch="source.sha256")
    assert left_beside(tmp_path / "w.bin") == []
    (tmp_path / "w.bin").write_bytes(BODY)  # a copy placed by hand: named and left, with the same setting
    with (
        quick(server),
        pytest.raises(DownloadError, match=f"delete the file .* or accept it .* source.sha256={actual}"),
    ):
        downloads.download("https://example.org/w.bin", tmp_path / "w.bin", "sha256:" + "0" * 64, vouch="source.sha256")
    assert (tmp_path / "w.bin").exists() and server.requests == ["/w.bin"]


def test_torchvisions_own_dataset_download_is_whole_or_absent(tmp_path, serve):
    """torchvision's `download_url` (its dataset classes' download: Flowers102, Caltech-256 ...) writes
    straight under the final name; within `network` it goes through ours: a short body leaves nothing,
    a whole one is kept and its md5 checked by torchvision."""
    import hashlib

    from torchvision.datasets.utils import download_url

    cut = serve({"/102flowers.tgz": half})  # torchvision probes the URL for redirects first, then reads it
    with quick(cut), pytest.raises(DownloadError, match="the body ended after 524,288 of the 1,048,576"):
        download_url("https://example.org/102flowers.tgz", str(tmp_path))
    assert left_beside(tmp_path / "102flowers.tgz") == []
    good = serve({"/102flowers.tgz": whole})
    with quick(good):
        download_url("https://example.org/102flowers.tgz", str(tmp_path), md5=hashlib.md5(BODY).hexdigest())
    assert (tmp_path / "102flowers.tgz").read_bytes() == BODY

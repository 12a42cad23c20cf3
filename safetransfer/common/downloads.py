"""Published files: downloaded from their official URL (or a site's mirror of it), checked
against a pinned digest, and refused when a server answered with an HTML page instead.

Every download of the project goes through urllib: torch.hub's `download_url_to_file`
here, and torchvision's own dataset classes. `mirrored(base)` routes all of them to a
mirror (`paths.mirror`) by replacing the scheme and host of each official URL with
`base`, the path kept: `https://download.pytorch.org/models/resnet18-f37072fd.pth` is
fetched as `<base>/models/resnet18-f37072fd.pth`.
"""

from __future__ import annotations

import contextlib
import hashlib
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

from safetransfer.common.errors import ConfigError, DownloadError

ALGORITHMS = ("md5", "sha1", "sha256")


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_html(path: Path) -> bool:
    """Whether `path` holds an HTML page (a server's error or login page saved in place of the file)."""
    with open(path, "rb") as handle:
        head = handle.read(1024).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith(b"<") and (b"<html" in head or b"<!doctype html" in head or b"<head" in head)


def parse_checksum(checksum: str) -> tuple[str, str]:
    """("sha256", hex) of "sha256:<hex>"; a hex shorter than the algorithm's digest is a prefix
    (torchvision's weight files carry the first 8-10 hex digits of their sha256 in their name)."""
    algorithm, _, expected = checksum.partition(":")
    if algorithm not in ALGORITHMS or not expected or any(c not in "0123456789abcdef" for c in expected.lower()):
        raise ConfigError(
            f"checksum {checksum!r} is not <algorithm>:<hex digits> with an algorithm of {', '.join(ALGORITHMS)}"
        )
    return algorithm, expected.lower()


def matches(path: Path, checksum: str) -> tuple[bool, str]:
    """(whether the file matches `checksum`, its digest)."""
    algorithm, expected = parse_checksum(checksum)
    actual = file_digest(path, algorithm)
    return actual.startswith(expected), actual


def html_message(url: str, path: Path) -> str:
    return (
        f"{url} answered with an HTML page instead of the file (a known failure of servers that are down or "
        f"moved); the page was deleted from {path}; try again later, set paths.mirror to a copy, or download "
        f"the file by hand and place it at {path}"
    )


def download(url: str, path: Path, checksum: str | None = None, key: str = "") -> bool:
    """Make sure `path` holds the published file at `url`; returns whether it was downloaded now.

    A missing file is downloaded (through a temporary file, moved into place when complete).
    A file that is an HTML page is deleted and refused. With `checksum` ("sha256:<hex>", a
    prefix allowed; "md5:<hex>"; "sha1:<hex>") the file is checked: a fresh download that does
    not match is deleted, a file that was already there is named and left for the user."""
    import torch

    path = Path(path)
    downloaded = not path.exists()
    if downloaded:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as error:  # no network, a proxy, a refused connection, a moved file
            path.unlink(missing_ok=True)
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            where = f" ({key}={path.parent})" if key else ""
            raise DownloadError(
                f"could not download {url} ({type(error).__name__}: {reason}); download it by hand "
                f"and place it at {path}{where}"
            ) from None
    if is_html(path):
        path.unlink()
        raise DownloadError(html_message(url, path))
    if checksum:
        good, actual = matches(path, checksum)
        if not good:
            algorithm, expected = parse_checksum(checksum)
            if downloaded:
                path.unlink()
                raise DownloadError(
                    f"{url}: {algorithm} {actual} does not match the published {expected}; the "
                    "download is damaged or the file changed upstream (it was deleted)"
                )
            raise DownloadError(
                f"{path}: {algorithm} {actual} does not match the published {expected} of {url}; "
                "delete the file to download it again"
            )
    return downloaded


def mirror_url(url: str, base: str) -> str:
    """`url` with its scheme and host replaced by the mirror `base` (the path and query kept)."""
    parts = urllib.parse.urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return base.rstrip("/") + tail


class _MirrorHandler(urllib.request.BaseHandler):
    """Rewrites every request to an official host into a request to the mirror, before it is sent."""

    handler_order = 100  # before the HTTP(S) handlers read the request's host

    def __init__(self, base: str):
        self.base = base.rstrip("/")

    def _rewrite(self, request: urllib.request.Request) -> urllib.request.Request:
        if not request.full_url.startswith(self.base + "/"):
            request.full_url = mirror_url(request.full_url, self.base)
        return request

    http_request = https_request = _rewrite


def check_mirror(base: str | None) -> None:
    if base in (None, ""):
        return
    parts = urllib.parse.urlsplit(str(base))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"paths.mirror={base} is not an http(s) base URL; give one such as "
            "http://mirror.example.org/datasets (or null for the official hosts)"
        )


@contextlib.contextmanager
def mirrored(base: str | None) -> Iterator[None]:
    """Within it, every urllib download of this process goes to the mirror `base` (None: the
    official hosts). The opener installed before it is restored afterwards."""
    if base in (None, ""):
        yield
        return
    check_mirror(base)
    previous = urllib.request._opener  # noqa: SLF001 (install_opener offers no getter)
    urllib.request.install_opener(urllib.request.build_opener(_MirrorHandler(str(base))))
    try:
        yield
    finally:
        urllib.request.install_opener(previous)


def fetch_archive(url: str, root: Path, checksum: str | None, key: str = "target.root") -> bool:
    """Make sure `root` holds the official file at `url` (downloaded when missing), checked
    against `checksum` ("md5:<hex>", "sha1:<hex>" or "sha256:<hex>", None where no digest is
    known; see `download`), and extract it when it is an archive. Returns whether
    it was downloaded now."""
    from torchvision.datasets.utils import extract_archive

    path = Path(root) / url.rsplit("/", 1)[-1]
    downloaded = download(url, path, checksum, key=key)
    if path.name.endswith((".tar", ".tgz", ".tar.gz", ".zip")):
        try:
            extract_archive(str(path), str(root))
        except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as error:
            path.unlink()
            raise DownloadError(
                f"{path} cannot be extracted ({type(error).__name__}: {error}); the archive is "
                f"truncated or damaged and was deleted: run again to download it anew"
            ) from None
    return downloaded

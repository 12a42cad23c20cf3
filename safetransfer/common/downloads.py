"""Published files: downloaded from their official URL (or a site's mirror of it) whole or not at all,
checked against a pinned digest, and refused when a server answered with an HTML page instead.

A download streams into a temporary file beside its final name and is moved into place only when
it is whole: as long as the server's Content-Length, matching its pinned digest, and where no digest
is pinned, a whole archive (a zip's central directory, a tar read to its end). A read that waits
longer than `paths.download_timeout_s` for a byte, a connection reset, a short body and a 5xx answer
are retried `paths.download_retries` times with backoff. A stop request (Ctrl-C, SIGTERM) ends a
download at once, its temporary file removed (safetransfer.common.signals.at_once).

`network(paths)` routes every download of this process to the mirror `paths.mirror` (None: the
official hosts) by replacing the scheme and host of the official URL with the mirror's, the path
kept: `https://download.pytorch.org/models/resnet18-f37072fd.pth` is fetched as
`<mirror>/models/resnet18-f37072fd.pth`; a redirect the mirror answers with is followed as sent.
torchvision's own dataset downloads go through the same code within it (retrieve_whole).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import logging
import os
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from safetransfer.common import signals
from safetransfer.common.errors import ConfigError, DownloadError, StorageError

log = logging.getLogger(__name__)

ALGORITHMS = ("md5", "sha1", "sha256")
ARCHIVES = (".tar", ".tgz", ".tar.gz", ".zip")
CHUNK = 1 << 20


@dataclass(frozen=True)
class Network:
    """How this process downloads (`paths.mirror`, `paths.download_timeout_s`, `paths.download_retries`)."""

    mirror: str | None = None
    timeout_s: float = 30.0
    retries: int = 3
    backoff_s: float = 1.0  # the first wait before a retry; doubled each time, at most 8 s


DEFAULTS = Network()
_network: ContextVar[Network] = ContextVar("safetransfer_network", default=DEFAULTS)  # noqa: B039 (frozen)


def current_network() -> Network:
    """The download settings of the `network` block this code runs in (the defaults outside one)."""
    return _network.get()


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
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


def mismatch(path: Path, checksum: str) -> tuple[str, str, str] | None:
    """(algorithm, the file's digest, the expected one) when the file does not match `checksum`, else None."""
    algorithm, expected = parse_checksum(checksum)
    actual = file_digest(path, algorithm)
    return None if actual.startswith(expected) else (algorithm, actual, expected)


def is_archive(path: Path) -> bool:
    """Whether `path` names an archive to extract (`resnet18_places365.pth.tar` is a checkpoint)."""
    return path.name.endswith(ARCHIVES) and not path.name.endswith((".pth.tar", ".pt.tar"))


def not_whole(path: Path, name: str | None = None) -> str | None:
    """Why the file at `path` is not whole where its format can tell (a zip, torch's checkpoints
    included, without its central directory; a tar or a gzip stream cut before its end; a checkpoint
    of torch's older format that does not load), or None. `name`: the file's final name, which says
    its format (`path`'s own by default)."""
    named = Path(name or path.name)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:  # reads the central directory, at the end
                archive.infolist()
        elif named.name.endswith(".zip"):
            raise zipfile.BadZipFile("no central directory")
        elif is_archive(named):
            with tarfile.open(path) as archive:
                for _ in archive:  # read to the end: a cut gzip stream or tar raises
                    pass
        elif named.name.endswith((".pth", ".pt", ".pth.tar", ".pt.tar")):
            import torch

            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 (any failure to read it through means it is not whole)
        first = str(error).splitlines()[0].split(". ")[0] if str(error) else ""
        return f"{type(error).__name__}: {first}"
    return None


def mirror_url(url: str, base: str) -> str:
    """`url` with its scheme and host replaced by the mirror `base` (the path and query kept)."""
    parts = urllib.parse.urlsplit(url)
    tail = parts.path + (f"?{parts.query}" if parts.query else "")
    return base.rstrip("/") + tail


def requested_url(url: str) -> str:
    """The URL a download of `url` asks for: the mirror's where one is set."""
    mirror = _network.get().mirror
    return mirror_url(url, mirror) if mirror and not url.startswith(mirror.rstrip("/") + "/") else url


class _MirrorHandler(urllib.request.BaseHandler):
    """Rewrites a first request to an official host into a request to the mirror, before it is sent
    (torchvision's own downloads); a redirect (urllib marks it unverifiable) is followed as sent."""

    handler_order = 100  # before the HTTP(S) handlers read the request's host

    def _rewrite(self, request: urllib.request.Request) -> urllib.request.Request:
        if not request.unverifiable:
            request.full_url = requested_url(request.full_url)
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
def network(paths=None) -> Iterator[Network]:
    """Within it, downloads of this process follow `paths` (a config's `paths` node: mirror,
    download_timeout_s, download_retries; None: the defaults). torchvision's own downloads get the
    mirror (an opener installed for the block, the one before restored) and the timeout (the socket
    default for the block)."""
    paths = paths if paths is not None else {}
    mirror = paths.get("mirror") or None
    check_mirror(mirror)
    timeout_s, retries = float(paths.get("download_timeout_s", 30.0)), int(paths.get("download_retries", 3))
    settings = Network(mirror, timeout_s, retries, float(paths.get("download_backoff_s", 1.0)))  # backoff: tests
    from torchvision.datasets import utils as torchvision_utils

    token = _network.set(settings)
    previous_opener, previous_timeout = urllib.request._opener, socket.getdefaulttimeout()  # noqa: SLF001
    previous_retrieve = torchvision_utils._urlretrieve  # noqa: SLF001 (the one place torchvision writes a download)
    urllib.request.install_opener(urllib.request.build_opener(_MirrorHandler()))
    socket.setdefaulttimeout(settings.timeout_s)
    torchvision_utils._urlretrieve = retrieve_whole  # noqa: SLF001
    try:
        yield settings
    finally:
        _network.reset(token)
        urllib.request.install_opener(previous_opener)
        socket.setdefaulttimeout(previous_timeout)
        torchvision_utils._urlretrieve = previous_retrieve  # noqa: SLF001


def retrieve_whole(url: str, filename, chunk_size: int = CHUNK) -> None:
    """torchvision's own dataset downloads (`download_url`, which writes straight under the final name)
    through ours within `network`: the file takes its name only when whole, its md5 then checked by
    torchvision; nothing partial is left, and a stop ends it at once."""
    path = Path(filename)
    temporary = fetch_to(url, path, f"download it by hand and place it at {path}")
    os.replace(temporary, path)


def transient(error: BaseException) -> bool:
    """Whether another try may succeed: a timeout, a reset or cut connection, a short body, a 5xx or 429."""
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    if isinstance(error, urllib.error.URLError):
        return isinstance(error.reason, (TimeoutError, ConnectionError, OSError))
    return isinstance(error, (TimeoutError, ConnectionError, http.client.HTTPException, ShortBody))


class ShortBody(Exception):
    """The body ended before the length the server declared."""


def stream(url: str, handle, settings: Network) -> int:
    """Write the body at `url` into the open binary `handle`; returns its length. Raises ShortBody when
    it is shorter than the server's Content-Length, TimeoutError when no byte comes for the timeout."""
    request = urllib.request.Request(url, headers={"User-Agent": "safetransfer"})
    with urllib.request.build_opener().open(request, timeout=settings.timeout_s) as response:
        declared = response.headers.get("Content-Length")
        size = 0
        while chunk := response.read1(CHUNK):
            handle.write(chunk)
            size += len(chunk)
    if declared is not None and declared.isdigit() and size != int(declared):
        raise ShortBody(f"the body ended after {size:,} of the {int(declared):,} bytes the server declared")
    return size


def fetch_to(url: str, path: Path, what: str) -> Path:
    """`url` downloaded into a temporary file beside `path` (retried as `network` says); returns the
    temporary file, which the caller checks and moves into place. Nothing is left on failure or stop."""
    settings = _network.get()
    asked = requested_url(url)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        with signals.at_once(f"downloading {asked}"):
            for attempt in range(settings.retries + 1):
                try:
                    with open(fd, "wb", closefd=False) as handle:
                        handle.seek(0)
                        handle.truncate()
                        stream(asked, handle, settings)
                    return temporary
                except Exception as error:
                    if not transient(error) or attempt == settings.retries:
                        raise
                    wait = min(settings.backoff_s * 2**attempt, 8.0)
                    log.warning(
                        "%s: %s; trying again in %.0f s (%d of %d)", asked, error, wait, attempt + 1, settings.retries
                    )
                    time.sleep(wait)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if not isinstance(error, Exception) or isinstance(error, signals.Preempted):
            raise
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise StorageError(
                f"writing {path} failed ({error.strerror}); free space in {path.parent}", error.strerror
            ) from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        official = f" (the official {url})" if asked != url else ""
        raise DownloadError(
            f"could not download {asked}{official} ({type(error).__name__}: {reason}); {what}"
        ) from None
    finally:
        os.close(fd)


def html_message(url: str, path: Path) -> str:
    return (
        f"{url} answered with an HTML page instead of the file (a known failure of servers that are down or "
        f"moved); nothing was kept at {path}; try again later, set paths.mirror to a copy, or download "
        f"the file by hand and place it at {path}"
    )


def download(url: str, path: Path, checksum: str | None = None, key: str = "", vouch: str = "") -> bool:
    """Make sure `path` holds the published file at `url`, whole; returns whether it was downloaded now.

    A missing file is downloaded into a temporary file and moved into place once it is the length the
    server declared, not an HTML page, matches `checksum` ("sha256:<hex>", a prefix allowed; "md5:<hex>";
    "sha1:<hex>") and, without one, is a whole archive. A file already there that is an HTML page or
    not a whole archive is downloaded again; one that does not match `checksum` is named and left for
    the user (`vouch`: the setting that accepts it)."""
    from filelock import FileLock

    from safetransfer.common.atomic import remove_stale_temporaries

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # one download of a file at a time; its leftovers are no live writer's
        remove_stale_temporaries(path)
        if path.exists():
            damaged = "an HTML page" if is_html(path) else None if checksum else not_whole(path)
            if damaged is None:
                check_present(url, path, checksum, vouch)
                return False
            log.warning("%s is not whole (%s); it is downloaded again", path, damaged)
            path.unlink()
        where = f" ({key}={path.parent})" if key else ""
        temporary = fetch_to(url, path, f"download it by hand and place it at {path}{where}")
        try:
            check_fetched(requested_url(url), temporary, path, checksum, vouch)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
    return True


def check_fetched(url: str, temporary: Path, path: Path, checksum: str | None, vouch: str = "") -> None:
    """A download before it takes its final name `path`: not HTML, matching `checksum`, else whole."""
    if is_html(temporary):
        raise DownloadError(html_message(url, path))
    if checksum:
        found = mismatch(temporary, checksum)
        if found:
            algorithm, actual, expected = found
            accept = f"; a copy you vouch for (a site's own build) is taken with {vouch}={actual}" if vouch else ""
            raise DownloadError(
                f"{url}: {algorithm} {actual} does not match the published {expected}; the download is "
                f"damaged or the file changed upstream (nothing was kept){accept}"
            )
    else:
        damaged = not_whole(temporary, path.name)
        if damaged:
            raise DownloadError(f"{url}: the download is not whole ({damaged}); nothing was kept: run again")


def check_present(url: str, path: Path, checksum: str | None, vouch: str = "") -> None:
    found = mismatch(path, checksum) if checksum else None
    if found:
        algorithm, actual, expected = found
        accept = f", or accept it as it is with {vouch}={actual}" if vouch else ""
        raise DownloadError(
            f"{path}: {algorithm} {actual} does not match the published {expected} of {url}; "
            f"delete the file to download it again{accept}"
        )


def fetch_archive(url: str, root: Path, checksum: str | None, key: str = "target.root") -> bool:
    """Make sure `root` holds the official file at `url` (downloaded when missing, see `download`) and,
    when it is an archive, its extracted contents: extracted beside `root` into a temporary folder
    and moved into place whole. A full disk keeps the verified archive; a damaged one is deleted.
    Returns whether it was downloaded now."""
    from torchvision.datasets.utils import extract_archive

    root = Path(root)
    path = root / url.rsplit("/", 1)[-1]
    downloaded = download(url, path, checksum, key=key)
    if not is_archive(path):
        return downloaded
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{path.name}.", suffix=".extracting"))
    try:
        with signals.at_once(f"extracting {path}"):
            extract_archive(str(path), str(staging))
        merge_into(staging, root)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StorageError(
                f"extracting {path} failed ({error.strerror}); the archive is kept and nothing of it was "
                f"extracted: free space in {root} and run again",
                error.strerror,
            ) from None
        path.unlink(missing_ok=True)
        raise DownloadError(f"{path} cannot be extracted ({type(error).__name__}: {error}); it was deleted") from None
    except (EOFError, tarfile.TarError, zipfile.BadZipFile) as error:
        path.unlink(missing_ok=True)
        raise DownloadError(
            f"{path} cannot be extracted ({type(error).__name__}: {error}); the archive is truncated or damaged "
            "and was deleted: run again to download it anew"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return downloaded


def merge_into(source: Path, destination: Path) -> None:
    """Move everything under `source` into `destination`, entry by entry, folders merged."""
    for entry in source.iterdir():
        target = destination / entry.name
        if entry.is_dir() and target.is_dir():
            merge_into(entry, target)
        else:
            os.replace(entry, target)

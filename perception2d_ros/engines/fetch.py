"""Resumable, verified downloads of manifest models (``urllib`` only, ROS-free).

A download goes to ``FILE.part`` next to its destination; an interrupted transfer continues
from the bytes already there with an HTTP ``Range`` request (a server that ignores ``Range``
restarts it from zero). When the transfer is complete the part file is checked against the
manifest sha256 and only then renamed into place (atomic, same directory). A mismatch deletes
the part file and fails; nothing is put in place. :func:`model_store.resolve` never uses a
``.part`` file. One process at a time may download a given file (``flock`` on the part file).
"""
from __future__ import annotations

import fcntl
import http.client
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from perception2d_ros.engines import model_store as ms

CHUNK = 1 << 20
USER_AGENT = "perception2d-models/0.1 (+urllib)"
RETRYABLE_HTTP = (408, 425, 429, 500, 502, 503, 504)


class FetchError(RuntimeError):
    """A download failed (HTTP error, interrupted for good, no URL...)."""


class OfflineError(FetchError):
    """The server could not be reached at all (no network, DNS, refused)."""


class ChecksumError(FetchError):
    """The downloaded file does not match the manifest sha256 (it was deleted)."""


@dataclass
class FetchResult:
    path: Path
    sha256: str | None
    verified: bool                 # sha256 known and matched
    already_present: bool = False
    downloaded_bytes: int = 0      # bytes transferred by this call
    resumed_from: int = 0          # bytes already in FILE.part when this call started
    reconnects: int = 0


def part_path(dest: str | Path) -> Path:
    dest = Path(dest)
    return dest.with_name(dest.name + ".part")


def _offline_message(dest: Path, sha256: str | None, url: str, reason: object) -> str:
    host = urllib.parse.urlsplit(url).netloc or url
    return (f"no network: put the file at {dest} (sha256 {sha256 or 'unknown'}). "
            f"Could not reach {host} ({reason}); download {url} on a machine with network "
            "and copy it there.")


def _progress_bar(total: int | None, initial: int, label: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a runtime dependency; stay silent without it
        return None
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=label, file=sys.stderr, leave=True, dynamic_ncols=True)


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def download_verified(url: str, dest: str | Path, *, sha256: str | None,
                      size: int | None = None, label: str = "", progress: bool = True,
                      timeout: float = 30.0, retries: int = 3, backoff_s: float = 1.0,
                      allow_unverified: bool = False,
                      log: Callable[[str], None] | None = None) -> FetchResult:
    """Download ``url`` to ``dest`` through ``dest.part`` with resume, then verify and rename.

    ``retries``: reconnect attempts in a row without progress (a connection that delivered
    bytes resets the count). ``sha256`` None is refused unless ``allow_unverified`` (the file
    is then moved into place but reported unverified)."""
    dest = Path(dest)
    label = label or dest.name
    say = log or (lambda msg: print(msg, file=sys.stderr))
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise FetchError(f"{label}: only http(s) URLs are fetched, got '{url}'")
    if sha256 is None and not allow_unverified:
        raise FetchError(f"{label}: no sha256 known, refusing to download a file that cannot "
                         "be verified (use --allow-unverified to fetch it anyway; it will be "
                         "reported as unverified)")
    sha256 = sha256.lower() if sha256 else None
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = part_path(dest)
        fh = open(part, "ab")
    except OSError as exc:
        raise FetchError(f"{label}: cannot write to {dest.parent} ({exc}); choose a writable "
                         "models directory with --models-dir") from exc
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise FetchError(f"{label}: another download of {dest} is in progress "
                             f"({part} is locked)") from exc
        result = FetchResult(path=dest, sha256=None, verified=False,
                             resumed_from=os.fstat(fh.fileno()).st_size)
        try:
            _transfer(url, fh, part, dest, sha256, size, label, progress, timeout, retries,
                      backoff_s, say, result)
        except BaseException:
            # nothing arrived (offline, refused, Ctrl-C before the first byte): leave no
            # empty FILE.part behind; a part with bytes stays, to be resumed next time
            if os.fstat(fh.fileno()).st_size == 0:
                part.unlink(missing_ok=True)
            raise
        fh.flush()
        os.fsync(fh.fileno())
        got = ms.sha256_file(part)
        if sha256 is not None and got != sha256:
            part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{label}: sha256 mismatch for the download from {url}: expected {sha256}, "
                f"got {got}. The download was deleted and nothing was put in place at {dest}.")
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        result.sha256 = got
        result.verified = sha256 is not None
        return result
    finally:
        fh.close()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _transfer(url, fh, part, dest, sha256, size, label, progress, timeout, retries,
              backoff_s, say, result) -> None:
    failures = 0
    connected_once = False
    while True:
        offset = os.fstat(fh.fileno()).st_size
        if size is not None and offset > size:
            say(f"{label}: {part.name} is larger than the expected {size} bytes; restarting")
            fh.truncate(0)
            offset = 0
        if size is not None and offset == size and size > 0:
            return  # complete from an earlier run: only verification left
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        request = urllib.request.Request(url, headers=headers)
        try:
            response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and offset:
                return  # nothing left to send: the part file is complete (verify decides)
            if exc.code in RETRYABLE_HTTP and failures < retries:
                failures += 1
                say(f"{label}: HTTP {exc.code} from server; retry {failures}/{retries}")
                time.sleep(backoff_s * 2 ** (failures - 1))
                continue
            raise FetchError(f"{label}: HTTP {exc.code} {exc.reason} for {url}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, ssl.SSLError):
                raise FetchError(f"{label}: TLS error talking to {url}: {reason}") from exc
            if not connected_once:
                raise OfflineError(_offline_message(dest, sha256, url, reason)) from exc
            failures += 1
            if failures > retries:
                raise FetchError(
                    f"{label}: cannot reconnect to {url} ({reason}); {offset} bytes kept in "
                    f"{part}; run the same command again to resume") from exc
            time.sleep(backoff_s * 2 ** (failures - 1))
            continue
        connected_once = True
        with response:
            status = getattr(response, "status", 200)
            if offset and status == 206:
                start = _content_range_start(response.headers.get("Content-Range"))
                if start != offset:
                    say(f"{label}: server resumed at {start}, not {offset}; restarting")
                    response.close()
                    fh.truncate(0)
                    continue
                say(f"{label}: resuming at {offset} bytes")
            elif offset:
                say(f"{label}: server ignored the Range request; restarting from zero")
                fh.truncate(0)
                offset = 0
            length = response.headers.get("Content-Length")
            expected_total = offset + int(length) if length and length.isdigit() else None
            if size is not None and expected_total is not None and expected_total != size:
                raise FetchError(
                    f"{label}: server announces {expected_total} bytes, the manifest says "
                    f"{size}; not the expected file ({url})")
            limit = size if size is not None else expected_total
            bar = _progress_bar(limit, offset, label, progress)
            received = offset
            error: BaseException | None = None
            try:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    fh.write(chunk)
                    received += len(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
                    if limit is not None and received > limit:
                        fh.flush()
                        part.unlink(missing_ok=True)
                        raise FetchError(f"{label}: server sent more than {limit} bytes; "
                                         "download discarded")
            except (OSError, http.client.HTTPException, socket.timeout) as exc:
                error = exc
            finally:
                fh.flush()
                if bar is not None:
                    bar.close()
            result.downloaded_bytes += received - offset
            complete = error is None and (expected_total is None or received >= expected_total)
            if complete:
                return
            # interrupted: resume from what arrived
            progressed = received > offset
            failures = 0 if progressed else failures + 1
            if failures > retries:
                raise FetchError(
                    f"{label}: transfer keeps failing ({error or 'connection closed early'}); "
                    f"{received} bytes kept in {part}; run the same command again to resume")
            result.reconnects += 1
            say(f"{label}: connection lost after {received} bytes "
                f"({error or 'closed early'}); resuming")
            if not progressed:
                time.sleep(backoff_s * 2 ** (failures - 1))


def fetch_model(entry: ms.ModelEntry, directory: str | Path | None = None, *,
                url: str | None = None, progress: bool = True, timeout: float = 30.0,
                retries: int = 3, backoff_s: float = 1.0, allow_unverified: bool = False,
                log: Callable[[str], None] | None = None) -> FetchResult:
    """Fetch ``entry`` into the models directory (``url`` overrides the manifest URL)."""
    dest = ms.entry_path(entry, directory)
    if dest.is_file():
        if entry.sha256 and ms.sha256_file(dest) == entry.sha256.lower():
            return FetchResult(dest, entry.sha256.lower(), True, already_present=True)
        if not entry.sha256:
            return FetchResult(dest, ms.sha256_file(dest), False, already_present=True)
        # present but corrupt: download next to it; the verified file replaces it atomically
    source = url or entry.url
    if not source:
        how = entry.note or "no download URL is known for it"
        raise FetchError(
            f"'{entry.name}' cannot be fetched ({entry.provision}): {how} "
            f"Put the file at {dest} (sha256 {entry.sha256 or 'unknown'}).")
    return download_verified(source, dest, sha256=entry.sha256, size=entry.size,
                             label=entry.name, progress=progress, timeout=timeout,
                             retries=retries, backoff_s=backoff_s,
                             allow_unverified=allow_unverified, log=log)


__all__ = ["FetchError", "OfflineError", "ChecksumError", "FetchResult", "download_verified",
           "fetch_model", "part_path"]

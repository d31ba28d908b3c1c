#!/usr/bin/env python3
"""Download the SAM2.1 checkpoints and verify their SHA-256 digests.

Standard library only (Python 3.8 or newer), so it runs in a bare image build stage as well
as from the demo. Used by ``Dockerfile``, ``Dockerfile_M1`` and the demo.

Command line::

    download_checkpoints.py --dest DIR [--models tiny,small,base_plus,large]
                            [--base-url URL] [--timeout S] [--retries N] [--sha256 NAME=HEX]

Guarantees:

* A file appears under its final name (``sam2.1_hiera_<name>.pt``) only once its SHA-256
  equals the expected digest: bytes go to ``<final name>.part``, which is verified, then
  renamed with :func:`os.replace`.
* An interrupted transfer resumes from the ``.part`` file with an HTTP ``Range`` request; a
  server that ignores ``Range`` (answers 200) makes the download start over cleanly.
* A file already present with the right digest is not downloaded again.
* A failure (offline, HTTP error, digest mismatch) exits non-zero with a one-line message
  on stderr; a download whose digest does not match is deleted.

As a module::

    import download_checkpoints as dc
    path = dc.download("small", Path("/code/sam2/checkpoints"))   # -> Path of the verified file
    dc.SHA256["small"], dc.FILENAMES["small"], dc.SIZES["small"]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

#: Where Meta publishes the SAM2.1 checkpoints (facebookresearch/sam2, checkpoints/download_ckpts.sh).
DEFAULT_BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"

#: The four SAM2.1 model sizes, smallest first.
MODELS: Tuple[str, ...] = ("tiny", "small", "base_plus", "large")

#: Model name -> checkpoint file name.
FILENAMES: Dict[str, str] = {name: "sam2.1_hiera_%s.pt" % name for name in MODELS}

#: Model name -> SHA-256 of the official checkpoint file.
#:
#: Sources (the Git LFS pointer of each file, ``oid sha256:`` and ``size``, as shown on the
#: Hugging Face "Git LFS Details" page of the file; Meta uploaded the same files to the
#: facebook/sam2.1-hiera-* model repositories):
#:
#: * tiny: huggingface.co/facebook/sam2.1-hiera-tiny, blob main/sam2.1_hiera_tiny.pt.
#: * small: huggingface.co/facebook/sam2.1-hiera-small, blob main/sam2.1_hiera_small.pt.
#: * base_plus: the file's LFS pointer in huggingface.co/camenduru/sam2-1-hiera (commit
#:   cdd35a4, a copy of Meta's four files; its tiny and small digests equal the facebook
#:   ones above), the Hugging Face cache blob name of facebook/sam2.1-hiera-base-plus seen in
#:   public code, and public scripts that check the dl.fbaipublicfiles.com download of
#:   sam2.1_hiera_base_plus.pt against this digest and size.
#: * large: the same camenduru/sam2-1-hiera pointer; public manifests that pin
#:   facebook/sam2.1-hiera-large (revision 665f8e2a) to this digest and size; and public
#:   scripts that check the dl.fbaipublicfiles.com download against it.
#:
#: No digest here was computed from a download on this project's machines (they cannot
#: reach the file host).
SHA256: Dict[str, str] = {
    "tiny": "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69",
    "small": "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
    "base_plus": "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
    "large": "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
}

#: Model name -> size in bytes of the official file (from the same LFS pointers).
SIZES: Dict[str, int] = {
    "tiny": 156008466,
    "small": 184416285,
    "base_plus": 323606802,
    "large": 898083611,
}

#: What ``--models`` means when omitted: every model whose digest is known.
DEFAULT_MODELS: Tuple[str, ...] = tuple(name for name in MODELS if name in SHA256)

PART_SUFFIX = ".part"
CHUNK_SIZE = 1 << 20
USER_AGENT = "sam2-refine-worker-checkpoint-downloader/1"


class DownloadError(Exception):
    """A checkpoint could not be downloaded and verified. The message is one line."""


class _Interrupted(Exception):
    """The transfer stopped early; what arrived is kept in the .part file for a resume."""


Log = Callable[[str], None]


def _default_log(message: str) -> None:
    print(message, flush=True)


def sha256_of(path: Path) -> str:
    """The hex SHA-256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
            digest.update(block)
    return digest.hexdigest()


def url_for(name: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """The download URL of a model's checkpoint under ``base_url``."""
    return base_url.rstrip("/") + "/" + FILENAMES[name]


def parse_models(text: str) -> List[str]:
    """``"tiny,small"`` -> ``["tiny", "small"]``; rejects unknown or empty names.

    Raises:
        ValueError: an item is empty or not one of :data:`MODELS`.
    """
    names: List[str] = []
    for raw in text.split(","):
        name = raw.strip()
        if name not in MODELS:
            shown = repr(name) if name else "an empty name"
            raise ValueError("unknown model %s (choose from %s)" % (shown, ",".join(MODELS)))
        if name not in names:
            names.append(name)
    return names


def _normalise_digest(value: str) -> str:
    digest = value.strip().lower()
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError("not a SHA-256 hex digest: %r" % value)
    return digest


def _describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = exc.reason
        return str(reason.strerror if isinstance(reason, OSError) and reason.strerror else reason)
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(exc) or type(exc).__name__


def _url_name(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _transfer(url: str, part: Path, expected_size: Optional[int], timeout: float, log: Log) -> int:
    """One HTTP request that appends to (or restarts) ``part``.

    Returns, once the server has sent the whole body, the byte offset it resumed at (0 for a
    download from the start). Raises :class:`_Interrupted` when the body
    stops early (the bytes that arrived stay in ``part``), :class:`DownloadError` for errors a
    retry cannot fix, and ``urllib.error.URLError``/``OSError`` for network errors.
    """
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        log("  %s is larger than the expected file; starting over" % part.name)
        _remove(part)
        offset = 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = "bytes=%d-" % offset
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Nothing left past the offset: the .part is complete (verified next) or bogus
            # (the digest check then deletes it and the next try starts from zero).
            exc.close()
            return offset
        exc.close()
        raise
    with response:
        status = response.status
        if status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith("bytes %d-" % offset):
                raise DownloadError(
                    "unexpected Content-Range %r for a resume at byte %d of %s"
                    % (content_range, offset, url)
                )
            mode = "ab"
            log("  resuming %s at byte %d" % (_url_name(url), offset))
        elif status == 200:
            if offset:
                log("  server ignored the Range request; restarting %s" % _url_name(url))
            mode = "wb"
            offset = 0
        else:
            raise DownloadError("unexpected HTTP status %d for %s" % (status, url))
        length_header = response.headers.get("Content-Length")
        body_length = int(length_header) if length_header and length_header.isdigit() else None
        total = offset + body_length if body_length is not None else expected_size
        received = 0
        next_report = 0.1
        with open(part, mode) as out:
            while True:
                try:
                    block = response.read(CHUNK_SIZE)
                except (http.client.IncompleteRead, ConnectionError, socket.timeout, TimeoutError) as exc:
                    out.flush()
                    raise _Interrupted(_describe(exc)) from exc
                if not block:
                    break
                out.write(block)
                received += len(block)
                if total:
                    fraction = (offset + received) / total
                    if fraction >= next_report:
                        log("  %s: %3d%%" % (part.name[: -len(PART_SUFFIX)], int(fraction * 100)))
                        while next_report <= fraction:
                            next_report += 0.1
            out.flush()
            os.fsync(out.fileno())
        if body_length is not None and received < body_length:
            # http.client returns b"" when the peer closes before Content-Length bytes.
            raise _Interrupted("connection closed after %d of %d bytes" % (received, body_length))
        return offset


def download(
    name: str,
    dest: Path,
    base_url: str = DEFAULT_BASE_URL,
    *,
    sha256: Optional[str] = None,
    size: Optional[int] = None,
    timeout: float = 60.0,
    retries: int = 5,
    backoff: float = 2.0,
    log: Optional[Log] = None,
) -> Path:
    """Download one checkpoint into ``dest`` and verify it.

    Args:
        name: One of :data:`MODELS`.
        dest: The checkpoint directory (created if missing).
        base_url: Where the files are (a mirror, or a local server in tests).
        sha256: The expected digest; default :data:`SHA256` ``[name]``. When given, the
            official size in :data:`SIZES` is not assumed (a mirror may serve another file).
        size: The expected size in bytes, if known (default: :data:`SIZES` when ``sha256`` is
            not given). Only used to spot an oversized ``.part`` and to report progress.
        timeout: Seconds to wait for the connection and for each read.
        retries: How many more attempts after a network failure or an interrupted body; each
            resumes from the ``.part`` file.
        backoff: Seconds before the first retry, doubled for each later one.
        log: Receives progress lines (default: print to stdout).

    Returns:
        The path of the verified checkpoint.

    Raises:
        DownloadError: unknown model, no known digest, HTTP error, network failure after the
            retries, or digest mismatch (the mismatching download is deleted).
    """
    say = log or _default_log
    if name not in MODELS:
        raise DownloadError("unknown model %r (choose from %s)" % (name, ",".join(MODELS)))
    if sha256 is None:
        if name not in SHA256:
            raise DownloadError(
                "no known SHA-256 for %s: refusing to install an unverified file "
                "(pass --sha256 %s=HEX from a trusted source)" % (FILENAMES[name], name)
            )
        expected = SHA256[name]
        expected_size = SIZES.get(name) if size is None else size
    else:
        try:
            expected = _normalise_digest(sha256)
        except ValueError as exc:
            raise DownloadError(str(exc)) from exc
        expected_size = size

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / FILENAMES[name]
    part = dest / (FILENAMES[name] + PART_SUFFIX)
    url = url_for(name, base_url)

    if final.is_file():
        if sha256_of(final) == expected:
            say("%s: already present and verified, skipped" % final.name)
            return final
        # Never leave an unverified file under the final name, even one found there.
        _remove(final)
        say("%s: present but its SHA-256 does not match; deleted, downloading again" % final.name)

    say("%s: downloading %s" % (final.name, url))
    attempt = 0
    resumed = False  # some bytes of the .part came from an earlier request (Range)
    restarted = False
    while True:
        try:
            resumed = _transfer(url, part, expected_size, timeout, say) > 0 or resumed
        except urllib.error.HTTPError as exc:
            retryable = exc.code >= 500 or exc.code in (408, 429)
            if not retryable or attempt >= retries:
                raise DownloadError(
                    "cannot download %s from %s: HTTP %d %s" % (final.name, url, exc.code, exc.reason)
                ) from exc
            problem = "HTTP %d" % exc.code
        except _Interrupted as exc:
            if attempt >= retries:
                raise DownloadError(
                    "download of %s from %s interrupted (%s) after %d attempts; "
                    "run again to resume from %s" % (final.name, url, exc, attempt + 1, part.name)
                ) from exc
            problem = str(exc)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            if attempt >= retries:
                raise DownloadError(
                    "cannot download %s from %s: %s (offline, or the host is unreachable?)"
                    % (final.name, url, _describe(exc))
                ) from exc
            problem = _describe(exc)
        else:
            actual = sha256_of(part) if part.exists() else hashlib.sha256(b"").hexdigest()
            if actual == expected:
                os.replace(part, final)
                say("%s: SHA-256 verified (%s)" % (final.name, expected))
                return final
            _remove(part)
            if resumed and not restarted:
                # A stale .part (another file, a changed file) can poison a resume: start over
                # once from byte 0 before calling it a mismatch.
                restarted = True
                resumed = False
                say("  %s: SHA-256 mismatch, deleted; downloading again from the start" % final.name)
                continue
            raise DownloadError(
                "SHA-256 mismatch for %s from %s: expected %s, got %s (download deleted)"
                % (final.name, url, expected, actual)
            )
        attempt += 1
        delay = backoff * (2 ** (attempt - 1))
        say("  %s: %s; retry %d of %d in %.0f s" % (final.name, problem, attempt, retries, delay))
        time.sleep(delay)


def download_all(
    names: Iterable[str],
    dest: Path,
    base_url: str = DEFAULT_BASE_URL,
    *,
    sha256_overrides: Optional[Dict[str, str]] = None,
    **kwargs: object,
) -> List[Path]:
    """:func:`download` each name in order; stops at the first failure."""
    overrides = sha256_overrides or {}
    return [
        download(name, dest, base_url, sha256=overrides.get(name), **kwargs)  # type: ignore[arg-type]
        for name in names
    ]


def _parse_overrides(values: Sequence[str]) -> Dict[str, str]:
    overrides: Dict[str, str] = {}
    for value in values:
        name, sep, digest = value.partition("=")
        name = name.strip()
        if not sep or name not in MODELS:
            raise ValueError("--sha256 expects NAME=HEX with NAME one of %s, got %r" % (",".join(MODELS), value))
        overrides[name] = _normalise_digest(digest)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download SAM2.1 checkpoints and verify their SHA-256 digests.",
    )
    parser.add_argument("--dest", required=True, type=Path, help="directory for the .pt files")
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help="comma-separated subset of %s (default: %s)" % (",".join(MODELS), ",".join(DEFAULT_MODELS)),
    )
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="default: %(default)s")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds per connection and read (default: %(default)s)"
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="retries after a network failure (default: %(default)s)"
    )
    parser.add_argument(
        "--sha256",
        action="append",
        default=[],
        metavar="NAME=HEX",
        help="expected digest for NAME instead of the built-in one (mirrors, tests); repeatable",
    )
    parser.add_argument("--quiet", action="store_true", help="print errors only")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        names = parse_models(args.models)
        overrides = _parse_overrides(args.sha256)
    except ValueError as exc:
        parser.error(str(exc))
    if args.timeout <= 0 or args.retries < 0:
        parser.error("--timeout must be > 0 and --retries >= 0")
    log: Log = (lambda _message: None) if args.quiet else _default_log
    try:
        download_all(
            names,
            args.dest,
            args.base_url,
            sha256_overrides=overrides,
            timeout=args.timeout,
            retries=args.retries,
            log=log,
        )
    except DownloadError as exc:
        print("error: %s" % exc, file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; run again to resume", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

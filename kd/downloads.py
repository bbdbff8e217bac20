"""Archives fetched from a URL into datasets' own cache, and extracted there once and whole.

datasets' DownloadManager keeps a URL's file in its cache (`<HF_DATASETS_CACHE>/downloads`) and
extracts archives beside it (`downloads/extracted/<hash>`). Two of its habits cost a user of a
2.3 GB archive dearly, so this module guards them:

- An interrupted download starts again from zero (datasets 5.2 opens `<file>.incomplete` with
  "w+b"). Here the bytes come through huggingface_hub's `http_get`, which resumes with a Range
  request (within a run after a dropped connection, and across runs from the `.incomplete` file),
  into the very file datasets' cache looks for; `DownloadManager.download` then finds it cached.
- Any non-empty extraction folder counts as extracted, so an extraction cut short (a truncated
  archive, a killed process) would be read as the whole dataset by every later run. Here an
  extraction is marked complete only when it ends; one without the mark is redone, and one that
  fails is removed with the downloaded archive, so the next run downloads it again.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path
from urllib.parse import urlparse

import httpx
from datasets import DownloadConfig
from datasets import config as datasets_config
from datasets.utils.extract import ExtractManager
from datasets.utils.file_utils import hash_url_to_filename
from filelock import FileLock
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.file_download import http_get

from kd.errors import DataError, first_line

log = logging.getLogger(__name__)

EXTRACTED_MARK = ".kd-extracted"  # written into an extraction folder once it is whole
BROKEN_ARCHIVE = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError)


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def download_config() -> DownloadConfig:
    """Cached by URL alone, with no request to a server once the file is there: the archives this
    module serves are versioned by name (speech_commands_v0.02.tar.gz never changes)."""
    return DownloadConfig(use_etag=False)


def cached_download_path(url: str, config: DownloadConfig) -> Path:
    """Where datasets' cache keeps the file of `url` (downloaded or not)."""
    cache = Path(config.cache_dir or datasets_config.DOWNLOADED_DATASETS_PATH)
    return cache / hash_url_to_filename(url, etag=None)


def offline() -> bool:
    return bool(datasets_config.HF_HUB_OFFLINE)


def not_cached(url: str, config: DownloadConfig, what: str, why: str) -> DataError:
    """The error for an archive that is not in the cache and cannot be fetched now (`why`)."""
    return DataError(f"{what}: {url} is not in the datasets cache ({cached_download_path(url, config).parent}) and "
                     f"{why}; download it once where the network is reachable, or set {what} to a local copy "
                     "(the archive or its extracted folder)")


def check_reachable(url: str, config: DownloadConfig, what: str) -> int | None:
    """Fail at once when `url` cannot be fetched (offline mode, no network, no such file); else its
    size in bytes where the server says it. One request, no retries."""
    if offline():
        raise not_cached(url, config, what, "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    try:
        response = httpx.head(url, follow_redirects=True, timeout=10)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise not_cached(url, config, what, f"cannot be fetched ({first_line(exc)})") from None
    size = response.headers.get("content-length")
    return int(size) if size and size.isdigit() else None


def fetch(url: str, config: DownloadConfig, what: str) -> Path:
    """The file at `url` in datasets' download cache, downloaded first (resumably) when absent."""
    target = cached_download_path(url, config)
    if target.is_file():
        return target
    if offline():
        raise not_cached(url, config, what, "offline mode is on (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".incomplete")
    with FileLock(str(target) + ".lock"):
        if target.is_file():  # another process finished it while this one waited
            return target
        with open(partial, "ab") as out:
            done = out.tell()
            if done:
                log.info("resuming the download of %s at %d bytes", url, done)
            try:
                http_get(url, out, resume_size=done, displayed_filename=Path(urlparse(url).path).name or url)
            except (httpx.HTTPError, HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
                raise DataError(f"{what}: cannot download {url} ({first_line(exc)}); what arrived is kept in "
                                f"{partial} and the next run resumes from it") from None
        os.replace(partial, target)
        # datasets' own metadata beside the file, as its downloads leave it.
        target.with_name(target.name + ".json").write_text(json.dumps({"url": url, "etag": None}))
    return target


def forget_download(url: str, config: DownloadConfig) -> None:
    """Remove `url`'s file (and its metadata) from datasets' download cache."""
    target = cached_download_path(url, config)
    for path in (target, target.with_name(target.name + ".json"), target.with_name(target.name + ".incomplete")):
        path.unlink(missing_ok=True)


def extract_whole(archive: Path, config: DownloadConfig) -> Path:
    """Extract `archive` with datasets' ExtractManager into its cache, once: returns the folder.

    Raises the archive library's error (tarfile, gzip, zip) when the archive is truncated or corrupt,
    after removing what it had extracted so far."""
    manager = ExtractManager(cache_dir=config.cache_dir)
    # The folder datasets extracts this archive into (a hash of its path); a private method, but the
    # one ExtractManager.extract itself uses, so the two cannot disagree.
    output = Path(manager._get_output_path(str(archive)))
    mark = output / EXTRACTED_MARK
    if mark.is_file():
        return output
    with FileLock(str(output) + ".kd.lock"):  # datasets takes "<output>.lock" inside extract()
        if mark.is_file():
            return output
        try:
            # force_extract: a folder without the mark is what an earlier, interrupted run left.
            extracted = Path(manager.extract(str(archive), force_extract=True))
        except BROKEN_ARCHIVE:
            shutil.rmtree(output, ignore_errors=True)
            raise
        if extracted != output:
            raise DataError(f"{archive} is not an archive datasets can extract (tar, tar.gz, zip, ...)")
        mark.write_text("complete\n")
    return output

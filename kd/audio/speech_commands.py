"""Speech Commands (Warden 2018) from its official archive, as a datasets builder: `data.dataset: speech_commands`.

The Hub's google/speech_commands is a loading script, which datasets >= 4 refuses to run. The
archive it wraps, `speech_commands_v0.02.tar.gz` (2.3 GB; the one torchaudio, TFDS and Keras use),
needs no code from anyone: one folder per word, `<speaker>_nohash_<n>.wav` clips (16 kHz mono PCM,
most exactly 1 s), `validation_list.txt` and `testing_list.txt` naming the clips of those splits
(everything else trains), and `_background_noise_/` (long noise recordings, in no split and no class).

`data.data_files` says where the archive comes from: its URL (default: the official one for
`data.config_name`), a local `.tar.gz`, or an already extracted folder. A URL is downloaded
resumably into datasets' cache and extracted there once (kd/downloads.py); the builder then writes
the splits as Arrow tables of file paths into datasets' cache, so later runs read them without
listing or downloading anything. Labels are the word folders' names; the kit maps them onto a
teacher's labels by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from kd.audio.path_audio import PathAudio  # stores paths without importing torchcodec
from kd.downloads import (
    BROKEN_ARCHIVE,
    cached_download_path,
    check_reachable,
    download_config,
    extract_whole,
    fetch,
    forget_download,
    is_url,
)
from kd.errors import DataError, first_line
from kd.preflight import fmt

NAME = "speech_commands"
OFFICIAL = "https://storage.googleapis.com/download.tensorflow.org/data/speech_commands_{}.tar.gz"
VERSIONS = ("v0.01", "v0.02")  # 30 and 35 words; the same layout
DEFAULT_VERSION = "v0.02"
SPLIT_LISTS = {"validation": "validation_list.txt", "test": "testing_list.txt"}
BACKGROUND = "_background_noise_"
# Bumped when what the builder writes changes, so caches of an older layout are not reused.
BUILDER_HASH = "kd-1"


def official_url(version: str) -> str:
    return OFFICIAL.format(version)


class SpeechCommandsConfig(datasets.BuilderConfig):
    def __init__(self, source: str = "", **kwargs):
        super().__init__(**kwargs)
        self.source = source  # URL, local archive or extracted folder (absolute)


class SpeechCommands(datasets.GeneratorBasedBuilder):
    BUILDER_CONFIG_CLASS = SpeechCommandsConfig
    BUILDER_CONFIGS = [SpeechCommandsConfig(name=v, version=datasets.Version("1.0.0")) for v in VERSIONS]
    DEFAULT_CONFIG_NAME = DEFAULT_VERSION

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(
            description="Speech Commands, read from its official archive (word folders, the split lists)",
            homepage="https://arxiv.org/abs/1804.03209",
            license="CC BY 4.0",
            features=clip_features(None),
        )

    def _split_generators(self, dl_manager: datasets.DownloadManager) -> list[datasets.SplitGenerator]:
        root = self._unpacked(dl_manager)
        splits = read_splits(root, self.config.source)
        words = sorted({path.split("/")[0] for files in splits.values() for path in files})
        self.info.features = clip_features(words)  # labels from the word folders, known only now
        return [datasets.SplitGenerator(name=name, gen_kwargs={"root": str(root), "files": files})
                for name, files in splits.items()]

    def _generate_examples(self, root: str, files: list[str]):
        for rel in files:
            word, name = rel.split("/")
            speaker, _, number = Path(name).stem.partition("_nohash_")
            yield rel, {"file": rel, "audio": f"{root}/{rel}", "label": word, "speaker_id": speaker,
                        "utterance_id": int(number) if number.isdigit() else 0}

    def _unpacked(self, dl_manager: datasets.DownloadManager) -> Path:
        """The extracted archive: downloaded (a URL) and extracted (a URL or a local archive) as needed."""
        source, config = self.config.source, dl_manager.download_config
        if not is_url(source) and Path(source).is_dir():
            return folder_root(Path(source))
        if is_url(source):
            fetch(source, config, "data.data_files")  # resumable, into the file datasets' cache looks for
        archive = Path(dl_manager.download(source))  # datasets finds it cached: no request
        try:
            return folder_root(extract_whole(archive, config))
        except BROKEN_ARCHIVE as exc:
            if is_url(source):
                forget_download(source, config)
                then = f"the download ({archive}) is removed and the next run downloads it again"
            else:
                then = "replace it with a complete copy"
            raise DataError(f"data.data_files: {source} is truncated or not a valid archive ({first_line(exc)}); "
                            f"{then}") from None


def clip_features(words: list[str] | None) -> datasets.Features:
    return datasets.Features({
        "file": datasets.Value("string"),  # path inside the archive, e.g. "yes/0a7c2a8d_nohash_0.wav"
        "audio": PathAudio(),
        "label": datasets.ClassLabel(names=words) if words else datasets.Value("string"),
        "speaker_id": datasets.Value("string"),
        "utterance_id": datasets.Value("int32"),
    })


def folder_root(folder: Path) -> Path:
    """The dataset's top folder: the one holding the split lists (the archive has no wrapping folder,
    but a copy someone re-packed may have one)."""
    if (folder / SPLIT_LISTS["validation"]).is_file():
        return folder
    inner = [p for p in folder.iterdir() if p.is_dir() and (p / SPLIT_LISTS["validation"]).is_file()]
    return inner[0] if len(inner) == 1 else folder


def read_splits(root: Path, source: str) -> dict[str, list[str]]:
    """{split: sorted relative clip paths} exactly as the dataset defines them: the two lists, and
    every other clip of a word folder for train. A listed clip that is missing means an incomplete copy."""
    absent = [name for name in SPLIT_LISTS.values() if not (root / name).is_file()]
    if absent:
        raise DataError(f"data.data_files: {source} is not Speech Commands' layout (no {' or '.join(absent)} in "
                        f"{root}); give the official archive, its URL or its extracted folder")
    listed = {split: sorted({line.strip() for line in (root / name).read_text().splitlines() if line.strip()})
              for split, name in SPLIT_LISTS.items()}
    words = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))]  # not _background_noise_
    clips = {f"{w.name}/{f.name}" for w in words for f in w.iterdir() if f.suffix.lower() == ".wav"}
    missing = sorted(path for files in listed.values() for path in files if path not in clips)
    if missing:
        raise DataError(f"data.data_files: {source} lacks {len(missing)} clips its split lists name (e.g. "
                        f"{missing[0]}); the copy is incomplete, give a complete archive or folder")
    held_out = set().union(*listed.values())
    return {"train": sorted(clips - held_out), **listed}


def resolve_source(version: str | None, source: Any, data_dir: str | None = None) -> tuple[str, str]:
    """(version, source) checked: a known version, and the archive's URL (the official one by default),
    an existing local archive or an extracted folder (made absolute, so the cache key is stable)."""
    version = version or DEFAULT_VERSION
    if version not in VERSIONS:
        raise DataError(f"data.config_name: {version!r} is not a Speech Commands version; use one of "
                        f"{', '.join(VERSIONS)} (null: {DEFAULT_VERSION})")
    if data_dir is not None:
        raise DataError(f"data.data_dir: {NAME} reads data.data_files (the archive's URL, a local copy of it, or "
                        "its extracted folder); set that instead")
    if source is not None and not isinstance(source, str):
        raise DataError(f"data.data_files: {source!r} is not valid for {NAME}; give one URL or path (the archive "
                        "or its extracted folder)")
    if source is None:
        return version, official_url(version)
    if is_url(source):
        return version, source
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.data_files: {source} does not exist (give the URL of speech_commands_{version}.tar.gz, "
                        "a local copy of it, or its extracted folder)")
    return version, str(path.resolve())


def builder(version: str | None, source: Any, data_dir: str | None = None) -> SpeechCommands:
    version, source = resolve_source(version, source, data_dir)
    return SpeechCommands(config_name=version, source=source, hash=BUILDER_HASH)


def check_source(version: str | None, source: Any, data_dir: str | None = None) -> str | None:
    """Fail at once, saying what to do, when the splits are not prepared, the archive is not
    downloaded, and its URL cannot be fetched now. Returns what a first run will download, if anything."""
    prepared = builder(version, source, data_dir)
    url = prepared.config.source
    if not is_url(url) or (Path(prepared.cache_dir) / datasets.config.DATASET_INFO_FILENAME).is_file():
        return None
    config = download_config()
    if cached_download_path(url, config).is_file():
        return None
    size = check_reachable(url, config, "data.data_files")
    return (f"Speech Commands {prepared.config.name}: downloading {fmt(size) if size else 'the archive'} "
            f"from {url} into the datasets cache ({cached_download_path(url, config).parent}), once")


def load_speech_commands(version: str | None, source: Any, data_dir: str | None = None) -> datasets.DatasetDict:
    """The three splits, prepared once in datasets' cache (keyed by version and source)."""
    builder(version, source, data_dir).download_and_prepare(download_config=download_config())
    # Read through a new builder, which takes the features as written (PathAudio is stored as Audio), as
    # every later run does: the run that prepared the splits then fingerprints each step on them (label
    # mapping, decoding) as later runs will, and they find its cached results. The clips stay paths
    # (decode=False) until the kit decodes them with soundfile: no torchcodec or FFmpeg needed.
    splits = builder(version, source, data_dir).as_dataset()
    return splits.cast_column("audio", datasets.Audio(decode=False))

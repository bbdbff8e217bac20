"""The flagship's real path: configs/5gb.yaml against Speech Commands and the AST teacher as published.

Nothing here reaches the internet. A file server on 127.0.0.1 serves a miniature of the official
archive (speech_commands_v0.02.tar.gz: word folders of <speaker>_nohash_<n>.wav clips, the two
split lists, _background_noise_, LICENSE and README), and a fake Hub serves
MIT/ast-finetuned-speech-commands-v2 with its published config (tiny hidden sizes, the real
id2label in its own, non-alphabetical order) and preprocessor_config.json, in the two forms a
published model takes: safetensors on main, or pickle weights on main with the conversion bot's
safetensors on refs/pr/1. The runs are `train_kd.py --config configs/5gb.yaml` with overrides
only for the endpoints, a tiny student, the CPU and a few steps.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kd.audio.speech_commands import load_speech_commands, read_splits
from kd.config import DataConfig
from kd.data import load_raw_splits, resolve_labels
from kd.downloads import cached_download_path, download_config
from kd.errors import DataError, ModelLoadError
from kd.synthetic import AST_SPEECH_COMMANDS_LABELS, archive_folder, save_tiny_ast, write_speech_commands
from kd.teachers.loading import check_labels
from kd.teachers.remote.server import BackgroundServer

from conftest import free_port, run_cli
from published import FakeHub, FileServer, Repo

TEACHER = "MIT/ast-finetuned-speech-commands-v2"
ARCHIVE_PATH = "/data/speech_commands_v0.02.tar.gz"  # the official one: download.tensorflow.org/data/...
CONVERSION_PR = {"num": 1, "title": "Adding `safetensors` variant of this model", "author": "SFconvertbot",
                 "status": "open"}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> dict:
    """The archive's bytes and the teacher repository's files, in both published forms."""
    root = tmp_path_factory.mktemp("published")
    words = sorted(AST_SPEECH_COMMANDS_LABELS)  # the archive's folders; the teacher's order differs
    archive = archive_folder(write_speech_commands(root / "extracted", words), root / "speech_commands_v0.02.tar.gz")
    teacher = save_tiny_ast(root / "ast")
    files = {p.name: p.read_bytes() for p in teacher.iterdir()}
    pickled = io.BytesIO()
    torch.save(load_file(teacher / "model.safetensors"), pickled)
    pickle_only = {name: data for name, data in files.items() if name != "model.safetensors"}
    pickle_only["pytorch_model.bin"] = pickled.getvalue()
    return {"archive": archive.read_bytes(), "extracted": root / "extracted", "safetensors": files,
            "pickle_only": pickle_only}


def flagship(args: list[str], tmp: Path, hub_url: str, hub_cache: Path | None = None, offline: bool = False):
    """`train_kd.py --config configs/5gb.yaml <args>` with its own caches under `tmp`."""
    env = {"HF_HOME": str(tmp / "hf"), "HF_ENDPOINT": hub_url, "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_DATASETS_OFFLINE": "1" if offline else "0", "HF_HUB_DISABLE_TELEMETRY": "1"}
    if hub_cache is not None:
        env["HF_HUB_CACHE"] = str(hub_cache)
    return run_cli(["--config", "configs/5gb.yaml", *args], env=env, timeout=240)


def tiny(archive_url: str, out: Path, cpu: bool = True) -> list[str]:
    """The overrides: where the archive is, a tiny student, a few steps, outputs under `out`, and
    (`cpu`) the CPU instead of the shipped GPU settings."""
    return [f"data.data_files={archive_url}", f"run.output_dir={out}", f"distillation.cache_dir={out.parent / 'cache'}",
            "student.channels=[8,16]", "train.max_steps=3", "train.batch_size=8", "train.grad_accum=1",
            "train.eval_every=2", "data.num_workers=0", "telemetry.log_every=1"] + (
        ["run.gpu_only=false", "train.mixed_precision=no", "teacher.dtype=fp32"] if cpu else [])


def datasets_cache_files(tmp: Path) -> set[str]:
    return {str(p) for p in (tmp / "hf" / "datasets").rglob("*.arrow")}


def read_telemetry(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "telemetry.jsonl").read_text().splitlines()]


@pytest.mark.launches
def test_the_flagship_trains_from_the_published_archive_and_teacher_then_reuses_its_caches(published, tmp_path):
    hub = FakeHub(models={TEACHER: Repo({"main": published["safetensors"]})})
    files = FileServer({ARCHIVE_PATH: published["archive"]})
    with BackgroundServer(hub) as hub_url, BackgroundServer(files) as files_url:
        hub_url, archive_url = hub_url.removesuffix("/v1"), files_url.removesuffix("/v1") + ARCHIVE_PATH
        first = flagship(tiny(archive_url, tmp_path / "first"), tmp_path, hub_url)
        assert first.returncode == 0, first.stderr[-3000:]
        assert re.search(rf"Speech Commands v0\.02: downloading \d\.\d MB from {re.escape(archive_url)} into the "
                         r"datasets cache \(.+\), once", first.stdout), first.stdout
        assert files.gets(ARCHIVE_PATH) == [None]  # one whole download
        assert any(path.endswith("/model.safetensors") for path in hub.downloads())
        cached_files = datasets_cache_files(tmp_path)
        hub_downloads = len(hub.downloads())

        second = flagship(tiny(archive_url, tmp_path / "second"), tmp_path, hub_url)
        assert second.returncode == 0, second.stderr[-3000:]
        assert files.requests[2:] == []  # nothing asked of the archive's server, not even its size
        assert len(hub.downloads()) == hub_downloads  # the teacher came from the Hugging Face cache
        assert datasets_cache_files(tmp_path) == cached_files  # splits, label mapping, decoded audio: all reused
        assert "Decoding audio" not in second.stderr

    for out in (tmp_path / "first", tmp_path / "second"):
        lines = read_telemetry(out)
        assert lines[-1]["type"] == "run_end" and lines[-1]["status"] == "completed"
        evals = {line["split"]: line["metrics"] for line in lines if line["type"] == "eval"}
        assert set(evals) == {"validation", "test"} and evals["test"]["teacher_acc"] is not None
        student = out / "student"
        assert {"model.safetensors", "model.onnx", "model.int8.onnx"} <= {p.name for p in student.iterdir()}
        # The data's word folders (alphabetical) were mapped onto the teacher's labels by name: the
        # student predicts in the teacher's order.
        id2label = json.loads((student / "config.json").read_text())["id2label"]
        assert [id2label[str(i)] for i in range(35)] == AST_SPEECH_COMMANDS_LABELS
    assert read_telemetry(tmp_path / "first")[0]["config"]["data"]["dataset"] == "speech_commands"
    assert "Data: 70 training samples, 35 labels" in first.stdout


@pytest.mark.launches
@pytest.mark.cuda
def test_the_flagship_runs_on_a_gpu_as_shipped_fp16_with_the_teacher_on_it(published, tmp_path):
    """The run above with the config's own GPU settings: fp16 mixed precision, the teacher in fp16 on
    the GPU next to the student, the 5.5 GB plan. Needs no network, like the CPU run."""
    hub = FakeHub(models={TEACHER: Repo({"main": published["safetensors"]})})
    files = FileServer({ARCHIVE_PATH: published["archive"]})
    with BackgroundServer(hub) as hub_url, BackgroundServer(files) as files_url:
        hub_url, archive_url = hub_url.removesuffix("/v1"), files_url.removesuffix("/v1") + ARCHIVE_PATH
        result = flagship(tiny(archive_url, tmp_path / "gpu", cpu=False), tmp_path, hub_url)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_telemetry(tmp_path / "gpu")
    start, end = lines[0], lines[-1]
    assert start["env"]["gpu_name"] and start["env"]["mixed_precision"] == "fp16"
    assert start["soft_targets"]["source"] == "cache+teacher"  # the first epoch fills the cache from the teacher
    assert start["estimate"]["teacher_weights"] > 0  # planned on the GPU, not moved to the CPU
    assert end["status"] == "completed" and 0 < end["peak"]["allocated"] < 5.5e9
    assert (tmp_path / "gpu" / "student" / "model.onnx").is_file()
    print(f"flagship on {start['env']['gpu_name']}: peak allocated {end['peak']['allocated'] / 1e6:.1f} MB, "
          f"test {[line for line in lines if line['type'] == 'eval'][-1]['metrics']}")


@pytest.mark.launches
def test_a_pickle_only_teacher_is_refused_before_any_download_naming_the_hubs_safetensors_revision(published, tmp_path):
    hub = FakeHub(models={TEACHER: Repo({"main": published["pickle_only"],
                                         "refs/pr/1": {**published["pickle_only"], **published["safetensors"]}},
                                        pull_requests=[CONVERSION_PR])})
    files = FileServer({ARCHIVE_PATH: published["archive"]})
    with BackgroundServer(hub) as hub_url, BackgroundServer(files) as files_url:
        hub_url, archive_url = hub_url.removesuffix("/v1"), files_url.removesuffix("/v1") + ARCHIVE_PATH
        refused = flagship(tiny(archive_url, tmp_path / "run"), tmp_path, hub_url)
        assert refused.returncode == 2
        assert "Traceback" not in refused.stderr
        assert refused.stderr.strip() == (
            f"error: teacher.model: {TEACHER} at revision main has only pickle weights (pytorch_model.bin), which "
            "can execute code when loaded; only safetensors are accepted. The Hub's safetensors conversion of it "
            "is the pull request refs/pr/1: set teacher.revision: refs/pr/1")
        assert hub.downloads() == [] and files.gets(ARCHIVE_PATH) == []  # nothing was downloaded first

        converted = flagship(tiny(archive_url, tmp_path / "run") + ["teacher.revision=refs/pr/1"], tmp_path, hub_url)
        assert converted.returncode == 0, converted.stderr[-3000:]
    assert any("/resolve/" in path and path.endswith("model.safetensors") for path in hub.downloads())
    assert not any(path.endswith("pytorch_model.bin") for path in hub.downloads())
    assert read_telemetry(tmp_path / "run")[-1]["status"] == "completed"


def test_a_pickle_only_teacher_without_a_conversion_says_how_to_convert_it(published, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from kd.teachers.loading import hub_files, resolve_model_source

    hub = FakeHub(models={TEACHER: Repo({"main": published["pickle_only"]})})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_files.cache_clear()
    with BackgroundServer(hub) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url.removesuffix("/v1"))
        with pytest.raises(ModelLoadError, match=r"has only pickle weights \(pytorch_model.bin\).*, and the Hub has "
                                                 r"no safetensors conversion of it; convert it once in a trusted "
                                                 r"environment.*and set teacher.model to that folder"):
            resolve_model_source(TEACHER)
    hub_files.cache_clear()
    assert hub.downloads() == []


@pytest.mark.launches
def test_a_truncated_archive_is_named_removed_and_downloaded_again_by_the_next_run(published, tmp_path):
    hub = FakeHub(models={TEACHER: Repo({"main": published["safetensors"]})})
    whole = published["archive"]
    files = FileServer({ARCHIVE_PATH: whole[: len(whole) // 2]})
    with BackgroundServer(hub) as hub_url, BackgroundServer(files) as files_url:
        hub_url, archive_url = hub_url.removesuffix("/v1"), files_url.removesuffix("/v1") + ARCHIVE_PATH
        broken = flagship(tiny(archive_url, tmp_path / "run") + ["--preflight"], tmp_path, hub_url)
        assert broken.returncode == 2 and "Traceback" not in broken.stderr
        error = broken.stderr.strip().splitlines()
        assert len(error) == 1 and re.fullmatch(
            rf"error: data\.data_files: {re.escape(archive_url)} is truncated or not a valid archive \(.+\); the "
            rf"download \(.+\) is removed and the next run downloads it again", error[0]), error
        extracted = tmp_path / "hf" / "datasets" / "downloads" / "extracted"
        assert not [p for p in extracted.iterdir() if p.is_dir()]  # no half-extracted folder left to be read

        files.files[ARCHIVE_PATH] = whole  # the server has the whole file again
        fixed = flagship(tiny(archive_url, tmp_path / "run") + ["--preflight"], tmp_path, hub_url)
        assert fixed.returncode == 0, fixed.stderr[-3000:]
        assert files.gets(ARCHIVE_PATH) == [None, None]  # downloaded again, from the start
        assert "Data: 70 training samples, 35 labels" in fixed.stdout


@pytest.mark.launches
def test_preflight_without_network_says_everything_it_could_not_fetch(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    archive_url = closed + ARCHIVE_PATH
    unreachable = flagship(tiny(archive_url, tmp_path / "run") + ["--preflight"], tmp_path, closed)
    assert unreachable.returncode == 2 and "Traceback" not in unreachable.stderr
    lines = unreachable.stderr.strip().splitlines()
    assert lines[0] == "error: 2 things this run needs cannot be had:"
    assert re.fullmatch(rf"  - teacher\.model: {TEACHER} is not in the Hugging Face cache \(.+\) and the Hub cannot be "
                        rf"reached \(.+\); download it once .*", lines[1]), lines[1]
    assert re.fullmatch(rf"  - data\.data_files: {re.escape(archive_url)} is not in the datasets cache \(.+\) and "
                        r"cannot be fetched \(.+\); download it once where the network is reachable, or set "
                        r"data\.data_files to a local copy \(the archive or its extracted folder\)", lines[2]), lines[2]

    offline = flagship(tiny(archive_url, tmp_path / "run") + ["--preflight"], tmp_path, closed, offline=True)
    assert offline.returncode == 2
    assert "HF_HUB_OFFLINE is set" in offline.stderr and "offline mode is on" in offline.stderr


# ---------------------------------------------------------------------------------------------
# The archive builder and the Hub's answers, in-process


@pytest.fixture
def online(monkeypatch, tmp_path):
    """datasets and huggingface_hub online, with caches of this test's own (the suite runs offline)."""
    import datasets
    from huggingface_hub import constants

    for name, value in (("HF_HUB_OFFLINE", False), ("HF_DATASETS_CACHE", str(tmp_path / "datasets")),
                        ("DOWNLOADED_DATASETS_PATH", str(tmp_path / "datasets" / "downloads")),
                        ("EXTRACTED_DATASETS_PATH", str(tmp_path / "datasets" / "downloads" / "extracted"))):
        monkeypatch.setattr(datasets.config, name, value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return monkeypatch


def point_at(monkeypatch, hub_url: str) -> None:
    """What HF_ENDPOINT=<hub_url> does when set before the libraries load (they read it at import)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub_url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub_url)


def test_an_interrupted_download_resumes_where_it_stopped(published, online):
    from huggingface_hub import constants

    # huggingface_hub writes in chunks of 10 MB, so a drop loses at most the chunk in flight; with
    # 64 kB chunks the miniature archive shows it.
    online.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    whole = published["archive"]
    files = FileServer({ARCHIVE_PATH: whole})
    files.cut_after[ARCHIVE_PATH] = 1_000_000  # the connection drops after 1 MB
    with BackgroundServer(files) as url:
        archive_url = url.removesuffix("/v1") + ARCHIVE_PATH
        splits = load_speech_commands("v0.02", archive_url)
        first, resumed = files.gets(ARCHIVE_PATH)
        assert first is None and 900_000 < int(resumed.removeprefix("bytes=").removesuffix("-")) <= 1_000_000
        assert {name: len(ds) for name, ds in splits.items()} == {"train": 70, "validation": 35, "test": 35}

        # A run killed mid-download leaves `<file>.incomplete`; the next run asks only for the rest.
        other_url = archive_url + "?mirror=2"
        files.files[ARCHIVE_PATH] = whole
        partial = cached_download_path(other_url, download_config())
        partial.with_name(partial.name + ".incomplete").write_bytes(whole[:300_000])
        assert len(load_speech_commands("v0.02", other_url)["train"]) == 70
        assert files.gets(ARCHIVE_PATH)[-1] == "bytes=300000-"
        assert partial.read_bytes() == whole


def test_an_extracted_copy_or_a_local_archive_is_read_in_place_and_an_incomplete_copy_is_refused(published, online,
                                                                                                  tmp_path):
    folder = published["extracted"]
    splits = load_speech_commands(None, str(folder))
    assert splits["validation"][0]["audio"]["path"].startswith(str(folder))
    assert set(splits["train"].features["label"].names) == set(AST_SPEECH_COMMANDS_LABELS)
    assert {s["speaker_id"] for s in splits["test"]}.isdisjoint({s["speaker_id"] for s in splits["train"]})
    # _background_noise_ is in no split and no class.
    assert not any("_background_noise_" in f for ds in splits.values() for f in ds["file"])

    local = tmp_path / "copy.tar.gz"
    local.write_bytes(published["archive"][:-4000])  # a local copy that is cut short: named, and kept
    with pytest.raises(DataError, match=rf"data\.data_files: {re.escape(str(local))} is truncated or not a valid "
                                        r"archive \(.+\); replace it with a complete copy"):
        load_speech_commands(None, str(local))
    assert local.is_file()

    listed = (folder / "validation_list.txt").read_text().split()[0]
    with pytest.raises(DataError, match=rf"lacks 1 clips its split lists name \(e\.g\. {re.escape(listed)}\); the copy "
                                        "is incomplete"):
        read_splits_without(folder, listed, tmp_path / "incomplete")
    with pytest.raises(DataError, match=r"data\.config_name: 'v3' is not a Speech Commands version; use one of "
                                        r"v0\.01, v0\.02"):
        load_speech_commands("v3", str(folder))
    with pytest.raises(DataError, match=r"data\.data_dir: speech_commands reads data\.data_files"):
        load_raw_splits(DataConfig(dataset="speech_commands", data_dir=str(folder)))
    with pytest.raises(DataError, match=r"data\.revision: 'refs/convert/parquet' names a revision of a Hub dataset, "
                                        r"but data\.dataset='speech_commands' is read locally"):
        load_raw_splits(DataConfig(dataset="speech_commands", revision="refs/convert/parquet"))


def read_splits_without(folder: Path, missing: str, copy: Path) -> dict:
    import shutil

    shutil.copytree(folder, copy)
    (copy / missing).unlink()
    return read_splits(copy, str(copy))


def test_labels_are_matched_to_the_teacher_by_name_and_a_different_word_set_is_named(published, online):
    splits = dict(load_speech_commands(None, str(published["extracted"])))
    mapped, names = resolve_labels(splits, "label", [w.upper() for w in AST_SPEECH_COMMANDS_LABELS])
    assert names == [w.upper() for w in AST_SPEECH_COMMANDS_LABELS]
    for row in mapped["train"].select_columns(["file", "label"]):
        assert names[row["label"]].lower() == row["file"].split("/")[0]

    # Speech Commands v0.01 has 30 of the 35 words: against the v0.02 teacher that is named, not trained.
    v1_words = [w for w in AST_SPEECH_COMMANDS_LABELS if w not in ("backward", "follow", "forward", "learn", "visual")]
    with pytest.raises(ModelLoadError, match=r"it predicts backward, follow, forward, learn, visual that the dataset "
                                             r"lacks\. Labels are matched by name"):
        check_labels(35, AST_SPEECH_COMMANDS_LABELS, sorted(v1_words), f"teacher {TEACHER}")


@pytest.mark.parametrize("export", [True, False], ids=["with-parquet-export", "script-only"])
def test_a_hub_dataset_that_is_a_loading_script_gets_one_line_saying_what_loads(online, export):
    def script_repo(name: str) -> Repo:  # a card, the loading script named after the repository, .gitattributes
        card = b"---\nviewer: false\n---\n# A dataset\n"
        return Repo({"main": {"README.md": card, f"{name}.py": b"import datasets\n", ".gitattributes": b"*.py text\n"}},
                    converts=["refs/convert/parquet"] if export else [])

    hub = FakeHub(datasets={"google/speech_commands": script_repo("speech_commands"),
                            "someone/old_corpus": script_repo("old_corpus")})
    with BackgroundServer(hub) as url:
        point_at(online, url.removesuffix("/v1"))
        with pytest.raises(DataError) as info:
            load_raw_splits(DataConfig(dataset="google/speech_commands", config_name="v0.02"))
        text = str(info.value)
        assert "\n" not in text
        assert text.startswith("data.dataset: google/speech_commands is a loading script on the Hub "
                               "(speech_commands.py), and datasets >= 4 runs no dataset scripts; use data.dataset: "
                               "speech_commands (the kit reads its official archive); or ")
        assert ("data.revision: refs/convert/parquet (the Hub's Parquet export of it)" in text) == export
        with pytest.raises(DataError, match=r"someone/old_corpus is a loading script .* use (data\.revision: "
                                            r"refs/convert/parquet .*; or )?a local copy"):
            load_raw_splits(DataConfig(dataset="someone/old_corpus"))

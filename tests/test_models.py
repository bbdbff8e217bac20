"""Teacher loading (safetensors only, clear path errors), freezing, label checks, students, export."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from kd.config import StudentConfig
from kd.errors import ModelLoadError
from kd.export.student import load_student, save_student
from kd.students import LogMelCNN, build_student, copy_teacher_layers, student_logits, use_channels_last
from kd.teachers.loading import (
    check_label_space,
    check_labels,
    hub_files,
    load_teacher,
    resolve_model_source,
    teacher_logits,
)

from conftest import TONE_LABELS, save_tiny_wav2vec2


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".pth", ".ckpt"])
def test_pickle_files_are_refused_with_how_to_convert(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(ModelLoadError) as info:
        load_teacher(str(path), "audio")
    text = str(info.value)
    assert "pickle" in text and "safetensors" in text and "save_pretrained" in text


def test_folder_with_only_pickle_weights_is_refused(tmp_path, tiny_teacher):
    folder = tmp_path / "legacy"
    shutil.copytree(tiny_teacher, folder)
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_teacher(str(folder), "audio")


def test_a_model_folder_whose_parts_disagree_is_one_line_naming_it(tmp_path, tiny_teacher):
    """An edited config.json (weights of another shape) and a folder without its preprocessor: what
    transformers says is a report table or a paragraph about the Hub; the kit says what is wrong."""
    from kd.teachers.loading import load_processor

    edited = tmp_path / "edited"
    shutil.copytree(tiny_teacher, edited)
    config = json.loads((edited / "config.json").read_text())
    config["hidden_size"] *= 2
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=rf"^teacher.model: the weights of {edited} do not fit the architecture "
                                             "its config.json describes"):
        load_teacher(str(edited), "audio")
    cut = tmp_path / "cut"
    shutil.copytree(tiny_teacher, cut)
    (cut / "config.json").write_text((cut / "config.json").read_text()[:100])  # a copy that stopped half-way
    with pytest.raises(ModelLoadError, match=rf"^teacher.model: cannot read the model config of {cut} \(.*not a "
                                             "valid JSON file"):
        load_teacher(str(cut), "audio")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_teacher, bare)
    (bare / "preprocessor_config.json").unlink()
    with pytest.raises(ModelLoadError, match=rf"^teacher.model: {bare} has no usable preprocessor_config.json for "
                                             "its audio inputs"):
        load_processor(str(bare), "audio")


def test_missing_and_wrong_paths_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="no such folder or file"):
        resolve_model_source(str(tmp_path / "nope"))
    # A mistyped relative path is no Hub id (those are name or namespace/name): one line, no Hub request.
    with pytest.raises(ModelLoadError, match=r"^teacher.model: no such folder or file: runs/text-teachr/student "):
        resolve_model_source("runs/text-teachr/student")
    with pytest.raises(ModelLoadError, match=r"^student.config: no such folder or file: my model/v2 "):
        resolve_model_source("my model/v2", "student.config", need_weights=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_source(str(tmp_path / "empty"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a .safetensors file"):
        resolve_model_source(str(tmp_path / "notes.txt"))


class FakeHub:
    """The Hub's model-info route on 127.0.0.1, answering as huggingface.co does for a repository that
    exists, is gated, lacks a revision or is unknown; it lists the repositories asked about."""

    ANSWERS = {"org/exists": (200, None), "org/gated": (403, "GatedRepo"), "org/pinned": (404, "RevisionNotFound")}

    def __init__(self):
        self.requests = []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"].startswith("/api/models/"):
            repo = scope["path"].removeprefix("/api/models/").split("/revision/")[0]
            self.requests.append(repo)
            status, code = self.ANSWERS.get(repo, (404, "RepoNotFound"))
        else:  # huggingface_hub's other calls (it asks about agent harnesses once)
            repo, status, code = "", 404, "EntryNotFound"
        headers = [(b"content-type", b"application/json")] + ([(b"x-error-code", code.encode())] if code else [])
        body = b'{"id": "%s", "siblings": []}' % repo.encode() if status == 200 else b'{"error": "no"}'
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub pointed at a FakeHub and an empty cache of this test's own, online."""
    from huggingface_hub import constants

    from kd.teachers.remote.server import BackgroundServer

    app = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_files.cache_clear()
    with BackgroundServer(app) as url:
        monkeypatch.setattr(constants, "ENDPOINT", url.removesuffix("/v1"))
        yield app
    hub_files.cache_clear()


def test_hub_ids_that_cannot_be_fetched_fail_at_once_with_what_to_do(hub, monkeypatch):
    resolve_model_source("org/exists")  # on the Hub: left to transformers to download
    with pytest.raises(ModelLoadError, match=r"teacher.model: no model 'org/typo' on the Hub .*check the id"):
        resolve_model_source("org/typo")
    with pytest.raises(ModelLoadError, match=r"student.config: org/gated is gated on the Hub: accept its terms"):
        resolve_model_source("org/gated", "student.config")
    with pytest.raises(ModelLoadError, match=r"org/pinned has no revision 'v9' on the Hub"):
        resolve_model_source("org/pinned", revision="v9")
    assert hub.requests == ["org/exists", "org/typo", "org/gated", "org/pinned"]

    from huggingface_hub import constants

    # No network: one failed connection (no retries), and the message says how to get the model.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(ModelLoadError, match=r"org/unseen is not in the Hugging Face cache .* the Hub cannot be "
                                             r"reached .*`hf download org/unseen`\) or set teacher.model to a local"):
        resolve_model_source("org/unseen")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = re.escape(f"({constants.HF_HUB_CACHE})")
    with pytest.raises(ModelLoadError, match=rf"org/other is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE "
                                             r"is set; download it once .*\(`hf download org/other --revision v2`\)"):
        resolve_model_source("org/other", revision="v2")


def test_a_cached_hub_id_never_reaches_the_network(hub, monkeypatch):
    """What the cache holds resolves offline and online alike, without asking the Hub."""
    from huggingface_hub import constants

    hub_cache_entry(constants.HF_HUB_CACHE, "org/typo", "main")
    hub_cache_entry(constants.HF_HUB_CACHE, "org/pinned", "v9")
    assert resolve_model_source("org/typo") == ("org/typo", None)
    assert resolve_model_source("org/pinned", revision="v9") == ("org/pinned", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model_source("org/typo", "student.config", need_weights=False) == ("org/typo", None)
    assert hub.requests == []


def test_a_cached_config_without_weights_asks_the_hub_for_its_file_list(hub, monkeypatch):
    """A config alone in the cache (the preprocessing came first) says nothing of the weights: a
    teacher's are looked up on the Hub, a config-only reference (student.config) needs nothing more."""
    from huggingface_hub import constants

    hub_cache_entry(constants.HF_HUB_CACHE, "org/exists", "main", files=("config.json",))
    assert resolve_model_source("org/exists", "student.config", need_weights=False) == ("org/exists", None)
    assert hub.requests == []
    assert resolve_model_source("org/exists") == ("org/exists", None)
    assert hub.requests == ["org/exists"]


def hub_cache_entry(cache: str, repo: str, ref: str,
                    files: tuple[str, ...] = ("config.json", "model.safetensors")) -> Path:
    """A Hugging Face cache entry for `repo` at `ref` holding `files`, as a download leaves it."""
    root = Path(cache) / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text("0" * 40)
    snapshot = root / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot / files[0]


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, tiny_teacher, damage):
    folder = tmp_path / "bad"
    shutil.copytree(tiny_teacher, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelLoadError) as info:
        load_teacher(str(folder), "audio")
    assert "not a readable safetensors file" in str(info.value) and "model.safetensors" in str(info.value)


def test_single_safetensors_file_with_config_beside_it(tiny_teacher):
    model = load_teacher(str(tiny_teacher / "model.safetensors"), "audio")
    assert model.config.num_labels == len(TONE_LABELS)


def test_teacher_is_frozen_and_unchanged_by_a_student_step(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher), "audio")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = LogMelCNN(len(TONE_LABELS), n_mels=16, channels=[8, 16])
    optimizer = torch.optim.AdamW(student.parameters(), lr=0.1)
    wave = torch.randn(2, 16000)
    t_logits = teacher_logits(teacher, {"inputs": {"input_values": wave}})
    assert not t_logits.requires_grad
    loss = torch.nn.functional.kl_div(student(wave).log_softmax(-1), t_logits.softmax(-1), reduction="batchmean")
    loss.backward()
    optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())


def test_teacher_dtype_is_applied(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher), "audio", dtype="bf16")
    assert next(teacher.parameters()).dtype == torch.bfloat16
    logits = teacher_logits(teacher, {"inputs": {"input_values": torch.randn(1, 16000)}})
    assert logits.dtype == torch.bfloat16


def test_label_space_checks(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher), "audio")
    check_label_space(teacher, list(TONE_LABELS), "teacher")
    with pytest.raises(ModelLoadError, match=r"teacher and the dataset name different labels: the dataset has a, b "
                                             r"that it does not predict; it predicts high, low, mid that the dataset "
                                             r"lacks\. Labels are matched by name"):
        check_label_space(teacher, ["a", "b"], "teacher")
    with pytest.raises(ModelLoadError, match="the dataset has Drums that it does not predict; it predicts mid that "
                                             "the dataset lacks"):
        check_label_space(teacher, ["high", "low", "Drums"], "teacher")
    with pytest.raises(ModelLoadError, match="label names differ"):
        check_label_space(teacher, ["low", "mid", "high"], "teacher")
    # A model without names (transformers' LABEL_0, ...) can only be checked by count.
    check_labels(3, None, ["a", "b", "c"], "teacher")
    with pytest.raises(ModelLoadError, match="predicts 3 labels but the dataset has 2"):
        check_labels(3, None, ["a", "b"], "teacher")


def test_logmel_student_shapes_and_single_sample():
    model = LogMelCNN(10)
    assert model(torch.randn(3, 16000)).shape == (3, 10)
    model.eval()
    assert model(torch.randn(1, 16000)).shape == (1, 10)
    assert sum(p.numel() for p in model.parameters()) < 100_000


def test_channels_last_keeps_outputs():
    torch.manual_seed(0)
    model = LogMelCNN(4, n_mels=16, channels=[8, 16]).eval()
    wave = torch.randn(2, 8000)
    before = model(wave)
    assert use_channels_last(model)
    assert torch.allclose(model(wave), before, atol=1e-5)


def test_hf_student_from_teacher_layers_copies_weights(tiny_teacher):
    teacher = load_teacher(str(tiny_teacher), "audio")
    cfg = StudentConfig(type="hf", init_from_teacher=True, teacher_layers=[1, 3])
    student = build_student(cfg, "audio", list(TONE_LABELS), 16000, teacher=teacher, teacher_spec=str(tiny_teacher))
    assert student.config.num_hidden_layers == 2
    s, t = student.state_dict(), teacher.state_dict()
    key = "wav2vec2.encoder.layers.{}.attention.k_proj.weight"
    assert torch.equal(s[key.format(0)], t[key.format(1)]) and torch.equal(s[key.format(1)], t[key.format(3)])
    conv = "wav2vec2.feature_extractor.conv_layers.1.conv.weight"
    assert torch.equal(s[conv], t[conv])  # conv_layers is not mistaken for encoder layers


def test_layer_copy_refuses_incompatible_shapes(tiny_teacher, tmp_path):
    teacher = load_teacher(str(tiny_teacher), "audio")
    wide = load_teacher(str(save_tiny_wav2vec2(tmp_path / "wide", TONE_LABELS, hidden_size=48,
                                               intermediate_size=96)), "audio")
    with pytest.raises(ModelLoadError, match="shapes differ"):
        copy_teacher_layers(wide, teacher, [0, 1, 2, 3])


def test_student_config_override_typo_is_caught(tiny_teacher):
    cfg = StudentConfig(type="hf", config_overrides={"num_hiden_layers": 1})
    with pytest.raises(ModelLoadError, match="did you mean num_hidden_layers"):
        build_student(cfg, "audio", list(TONE_LABELS), 16000, teacher=None, teacher_spec=str(tiny_teacher))


def test_export_round_trip_logmel(tmp_path):
    torch.manual_seed(0)
    model = LogMelCNN(3, n_mels=16, channels=[8, 16]).eval()
    save_student(model, tmp_path / "student", ["a", "b", "c"])
    loaded, labels = load_student(tmp_path / "student")
    wave = torch.randn(2, 16000)
    assert labels == ["a", "b", "c"]
    assert torch.allclose(loaded(wave), model(wave))
    assert not list(tmp_path.glob(".student.*"))  # no temporary folder left behind


def test_an_export_gets_the_modes_the_umask_gives_not_private_ones(tmp_path):
    """safetensors writes 0600 files whatever the umask (safetensors#782), and temporary folders are
    0700: renamed into place as they are, nobody but the trainer could read the model."""
    old = os.umask(0o027)
    try:
        save_student(LogMelCNN(3, n_mels=16, channels=[8, 16]), tmp_path / "student", ["a", "b", "c"])
        save_student(LogMelCNN(3, n_mels=16, channels=[8, 16]), tmp_path / "student", ["a", "b", "c"])  # replaced
    finally:
        os.umask(old)
    folder = tmp_path / "student"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.iterdir()]}
    assert modes == {"student": 0o750, "config.json": 0o640, "model.safetensors": 0o640}


def test_export_round_trip_hf_and_replaces_atomically(tmp_path, tiny_teacher):
    model = load_teacher(str(tiny_teacher), "audio")
    target = tmp_path / "student"
    target.mkdir()
    (target / "stale.txt").write_text("old export")
    save_student(model, target, list(TONE_LABELS))
    assert not (target / "stale.txt").exists() and (target / "model.safetensors").is_file()
    loaded, labels = load_student(target)
    wave = {"input_values": torch.randn(1, 16000)}
    assert labels == list(TONE_LABELS)
    assert torch.allclose(student_logits(loaded, {"inputs": wave}, "inputs"), model(**wave).logits, atol=1e-6)


def test_failed_export_keeps_the_previous_one(tmp_path):
    target = tmp_path / "student"
    save_student(LogMelCNN(2, n_mels=16, channels=[8]), target, ["a", "b"])

    class Broken(LogMelCNN):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_student(Broken(2, n_mels=16, channels=[8]), target, ["a", "b"])
    assert load_student(target)[1] == ["a", "b"]
    assert not list(tmp_path.glob(".student.*"))


# ---------------------------------------------------------------------------------------------
# A kit-exported log-mel CNN as a teacher (teacher -> assistant -> student chains)


@pytest.fixture()
def kit_teacher(tmp_path):
    torch.manual_seed(0)
    model = LogMelCNN(len(TONE_LABELS), sample_rate=8000, n_mels=16, channels=[8, 16]).eval()
    return save_student(model, tmp_path / "kit-teacher", list(TONE_LABELS)), model


def test_kit_exported_student_loads_as_a_frozen_teacher(kit_teacher):
    folder, original = kit_teacher
    teacher = load_teacher(str(folder), "audio")
    assert isinstance(teacher, LogMelCNN) and teacher.label_names == list(TONE_LABELS)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    wave = torch.randn(3, 8000)
    logits = teacher_logits(teacher, {"waveform": wave})  # reads the waveform, needs no feature extractor
    assert not logits.requires_grad
    torch.testing.assert_close(logits, original(wave))
    half = load_teacher(str(folder), "audio", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16
    assert teacher_logits(half, {"waveform": wave}).argmax(-1).shape == (3,)


def test_kit_teacher_label_names_are_checked(kit_teacher):
    teacher = load_teacher(str(kit_teacher[0]), "audio")
    check_label_space(teacher, list(TONE_LABELS), "teacher")
    with pytest.raises(ModelLoadError, match="label names differ from the dataset's at index 0: 'high' vs 'low'"):
        check_label_space(teacher, ["low", "mid", "high"], "teacher")
    with pytest.raises(ModelLoadError, match="the dataset has a, b that it does not predict"):
        check_label_space(teacher, ["a", "b"], "teacher")


def test_kit_teacher_with_pickle_weights_is_refused(kit_teacher):
    folder = kit_teacher[0]
    torch.save(load_teacher(str(folder), "audio").state_dict(), folder / "model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as info:
        load_teacher(str(folder), "audio")
    assert "only pickle weights (model.bin)" in str(info.value) and "safetensors" in str(info.value)


def test_kit_teacher_truncated_or_for_another_modality_is_refused(kit_teacher):
    folder = kit_teacher[0]
    with pytest.raises(ModelLoadError, match="is the kit's logmel_cnn \\(audio\\), but data.modality is 'text'"):
        load_teacher(str(folder), "text")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_teacher(str(folder), "audio")


def test_exports_from_before_the_normalize_pool_and_stem_stride_keys_load_as_they_were(tmp_path):
    import json

    model = LogMelCNN(2, n_mels=16, channels=[8], normalize="batch", pool="avg").eval()
    folder = save_student(model, tmp_path / "old", ["a", "b"])
    config = json.loads((folder / "config.json").read_text())
    del config["normalize"], config["pool"], config["stem_stride"]
    (folder / "config.json").write_text(json.dumps(config))
    loaded, _ = load_student(folder)
    assert loaded.normalize == "batch" and loaded.config["pool"] == "avg" and loaded.config["stem_stride"] == 1
    wave = torch.randn(2, 16000)
    torch.testing.assert_close(loaded(wave), model(wave))


def test_stem_stride_two_halves_the_first_map_keeps_the_parameters_and_round_trips(tmp_path):
    full = LogMelCNN(3, sample_rate=8000, n_mels=16, channels=[8, 16]).eval()
    strided = LogMelCNN(3, sample_rate=8000, n_mels=16, channels=[8, 16], stem_stride=2).eval()
    assert sum(p.numel() for p in full.parameters()) == sum(p.numel() for p in strided.parameters())
    wave = torch.randn(2, 8000)
    features = full.input_norm(full.features(wave))  # (2, 1, 16, 101)
    assert full.body[:3](features).shape[-2:] == (16, 101)
    assert strided.body[:3](features).shape[-2:] == (8, 51)
    folder = save_student(strided, tmp_path / "strided", ["a", "b", "c"])
    loaded, _ = load_student(folder)
    assert loaded.config["stem_stride"] == 2
    torch.testing.assert_close(loaded(wave), strided(wave))
    with pytest.raises(ValueError, match="stem_stride one of \\(1, 2\\)"):
        LogMelCNN(3, stem_stride=4)


# ---------------------------------------------------------------------------------------------
# The log-mel front end


def test_utterance_front_end_ignores_recording_level_and_zero_padding_level():
    torch.manual_seed(0)
    model = LogMelCNN(4, sample_rate=8000, n_mels=16, channels=[8, 16]).eval()
    wave = 0.05 * torch.randn(4, 8000)
    wave[1, 3000:] = 0.0  # a short clip, zero-padded
    base = model.features(wave)
    for gain in (0.1, 10.0, 1000.0):
        torch.testing.assert_close(model.features(wave * gain), base, atol=2e-4, rtol=0)
    assert torch.isfinite(model.features(torch.zeros(1, 8000))).all()  # digital silence: no NaN
    legacy = LogMelCNN(4, sample_rate=8000, n_mels=16, channels=[8, 16], normalize="batch").eval()
    assert (legacy.features(wave * 10) - legacy.features(wave)).abs().max() > 1.0  # what it fixes


def test_teacher_with_pickle_weights_and_no_preprocessor_is_refused_for_the_pickle(tmp_path, tone_data, tiny_teacher,
                                                                                   capsys):
    """Both are wrong; the pickle is named first, since it is the graver problem (and the run stops there)."""
    from train_kd import main

    from conftest import tiny_config, write_config

    folder = tmp_path / "legacy"
    shutil.copytree(tiny_teacher, folder)
    (folder / "model.safetensors").unlink()
    (folder / "preprocessor_config.json").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    config = write_config(tmp_path / "run.yaml", tiny_config(tone_data, folder, tmp_path / "run"))
    assert main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "only pickle weights (pytorch_model.bin)" in err and "preprocessor" not in err, err
    assert not (tmp_path / "run" / "telemetry.jsonl").exists()


def test_a_models_config_tells_the_modality_its_architecture_is_for(tmp_path, tiny_teacher):
    from kd.synthetic import save_tiny_bert, save_tiny_llama, save_tiny_vit
    from kd.teachers.loading import modality_of

    assert modality_of(str(tiny_teacher), "teacher.model") == "audio"  # Wav2Vec2ForSequenceClassification
    assert modality_of(str(save_tiny_bert(tmp_path / "bert", ["a", "b"])), "teacher.model") == "text"
    assert modality_of(str(save_tiny_vit(tmp_path / "vit", ["a", "b"])), "teacher.model") == "image"
    assert modality_of(str(save_tiny_llama(tmp_path / "llama")), "teacher.model") == "causal_lm"

"""Datasets by name: audiofolder without FFmpeg, resampling, cache reuse, clear split/column errors."""

from __future__ import annotations

import csv

import pytest
import soundfile
import torch
from datasets import Dataset, DatasetDict

from kd.config import DataConfig
from kd.data import AudioCollator, load_waveform, make_loader, prepare_data
from kd.errors import DataError

from conftest import TONE_LABELS, write_tone_dataset


def audio_cfg(path, **kw) -> DataConfig:
    return DataConfig(dataset="audiofolder", data_dir=str(path), test_split="test", num_workers=0, **kw)


def test_audiofolder_is_decoded_resampled_and_fixed_length(tone_data):
    data = prepare_data(audio_cfg(tone_data, max_seconds=0.5), sampling_rate=16000)
    assert data.label_names == TONE_LABELS
    row = data.splits["train"][0]
    assert row["waveform"].shape == (8000,) and row["waveform"].dtype == torch.float32
    assert set(data.splits) == {"train", "eval", "test"}
    assert len(data.splits["train"]) == 24


def test_resampling_keeps_the_tone_frequency(tmp_path):
    import numpy as np

    rate = 8000
    t = np.arange(rate) / rate
    soundfile.write(tmp_path / "a.wav", (0.5 * np.sin(2 * np.pi * 1000 * t)).astype("float32"), rate)
    wave = torch.from_numpy(load_waveform({"path": str(tmp_path / "a.wav"), "bytes": None}, 16000, 16000))
    spectrum = torch.fft.rfft(wave).abs()
    assert int(spectrum.argmax()) == 1000  # 1 Hz bins for a 1 s clip


def test_second_preparation_reuses_the_datasets_cache(tone_data):
    cfg = audio_cfg(tone_data)
    first = prepare_data(cfg, sampling_rate=16000).splits["train"]
    second = prepare_data(cfg, sampling_rate=16000).splits["train"]
    files = [f["filename"] for f in first.cache_files]
    assert files and files == [f["filename"] for f in second.cache_files]
    assert torch.equal(first[0]["waveform"], second[0]["waveform"])


def test_missing_split_lists_what_the_dataset_has(tone_data):
    with pytest.raises(DataError) as info:
        prepare_data(audio_cfg(tone_data, eval_split="dev"), sampling_rate=16000)
    text = str(info.value)
    assert "data.eval_split='dev'" in text and "train, validation, test" in text


def test_missing_column_lists_the_columns(tone_data):
    with pytest.raises(DataError) as info:
        prepare_data(audio_cfg(tone_data, label_column="keyword"), sampling_rate=16000)
    text = str(info.value)
    assert "data.label_column='keyword'" in text and "audio, label, weight" in text


def test_missing_data_dir_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        prepare_data(audio_cfg(tmp_path / "nope"))
    with pytest.raises(DataError, match="cannot load 'no-such-org/no-such-dataset': Couldn't reach .* it is not in "
                                        "the datasets cache: load it once where the Hub is reachable"):
        prepare_data(DataConfig(dataset="no-such-org/no-such-dataset"))
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(DataError, match="not a save_to_disk dataset"):
        prepare_data(DataConfig(dataset=str(plain)))
    # A mistyped local path is no Hub name (those are name or namespace/name): one line, no Hub request.
    with pytest.raises(DataError, match=r"^data.dataset: no such folder: runs/my-data/train \(a Hub dataset is "):
        prepare_data(DataConfig(dataset="runs/my-data/train"))


def test_broken_audio_file_is_a_clear_error(tmp_path):
    root = write_tone_dataset(tmp_path / "d", {"train": 1})
    (root / "train" / "high_0.wav").write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="cannot decode audio .*high_0.wav"):
        prepare_data(DataConfig(dataset="audiofolder", data_dir=str(root), eval_split=None), sampling_rate=16000)


def test_save_to_disk_folder_with_path_column(tmp_path, tone_data):
    paths = sorted(str(p) for p in (tone_data / "train").glob("*.wav"))
    labels = [p.split("/")[-1].split("_")[0] for p in paths]
    DatasetDict({"train": Dataset.from_dict({"file": paths, "kw": labels})}).save_to_disk(tmp_path / "saved")
    cfg = DataConfig(dataset=str(tmp_path / "saved"), modality="audio", eval_split=None, input_column="file",
                     label_column="kw")
    data = prepare_data(cfg, sampling_rate=16000)
    assert data.label_names == TONE_LABELS and data.splits["train"][0]["waveform"].shape == (16000,)


def test_eval_labels_unknown_to_train_are_reported(tmp_path):
    root = write_tone_dataset(tmp_path / "d", {"train": 1, "validation": 1})
    meta = root / "validation" / "metadata.csv"
    rows = list(csv.DictReader(open(meta)))
    rows[0]["label"] = "ultrasonic"
    with open(meta, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="labels the training split lacks: ultrasonic"):
        prepare_data(DataConfig(dataset="audiofolder", data_dir=str(root)), sampling_rate=16000)


def test_collator_adds_teacher_inputs_and_weights(tone_data, tiny_teacher):
    from transformers import AutoFeatureExtractor

    extractor = AutoFeatureExtractor.from_pretrained(tiny_teacher)
    on_device = prepare_data(audio_cfg(tone_data, weight_column="weight"), extractor, 16000)
    assert on_device.features is not None and "inputs" not in on_device.collate([on_device.splits["train"][0]])
    data = prepare_data(audio_cfg(tone_data, weight_column="weight", features_on_device=False), extractor, 16000)
    assert data.features is None
    loader = make_loader(data.splits["train"], audio_cfg(tone_data), 5, collate=data.collate, shuffle=False,
                         pin_memory=False)
    batch = next(iter(loader))
    assert batch["waveform"].shape == (5, 16000) and batch["labels"].shape == (5,)
    assert batch["inputs"]["input_values"].shape == (5, 16000)
    assert batch["sample_weight"].tolist() == [1.0, 2.0, 1.0, 2.0, 1.0]
    # do_normalize: zero mean and unit variance per clip
    assert batch["inputs"]["input_values"].mean(-1).abs().max() < 1e-3


def test_loader_worker_settings():
    cfg = DataConfig(dataset="x", num_workers=2, persistent_workers=True, prefetch_factor=3, pin_memory=True)
    ds = Dataset.from_dict({"waveform": [[0.0]], "label": [0]}).with_format("torch")
    collate = AudioCollator("label", None, None, 16000)
    loader = make_loader(ds, cfg, 1, collate=collate, shuffle=True, pin_memory=True)
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 3 and loader.pin_memory
    cpu_loader = make_loader(ds, DataConfig(dataset="x", num_workers=0), 1, collate=collate, shuffle=False,
                             pin_memory=False)
    assert cpu_loader.prefetch_factor is None and not cpu_loader.persistent_workers and not cpu_loader.pin_memory


def test_the_usual_split_names_are_skipped_where_the_dataset_lacks_them_and_other_names_are_checked(tmp_path):
    """data.eval_split / data.test_split default to validation / test: a dataset without them has no
    such evaluation (build says so); a name the user chose that is absent is an error listing the splits."""
    root = write_tone_dataset(tmp_path / "d", {"train": 2})
    cfg = DataConfig(dataset="audiofolder", data_dir=str(root))
    assert (cfg.eval_split, cfg.test_split) == ("validation", "test")
    assert set(prepare_data(cfg, sampling_rate=16000).splits) == {"train"}
    with pytest.raises(DataError, match=r"split not found \(data.test_split='holdout'\); the dataset has: train"):
        prepare_data(DataConfig(dataset="audiofolder", data_dir=str(root), test_split="holdout"), sampling_rate=16000)


def test_a_tokenizer_that_does_not_know_the_text_is_refused_before_training(tmp_path):
    """A text model folder saved without its tokenizer files gets one that knows the special tokens
    only: every word becomes [UNK] and training would end at chance without a word. Refused, naming it."""
    from transformers import BertTokenizer

    from kd.synthetic import save_tiny_bert, write_sentiment_csv

    data = write_sentiment_csv(tmp_path / "text")
    cfg = DataConfig(dataset="csv", data_files={"train": str(data / "train.csv"),
                                                "validation": str(data / "validation.csv")},
                     modality="text", input_column="text")
    good = save_tiny_bert(tmp_path / "bert", ["neg", "pos"])
    tokenizer = BertTokenizer.from_pretrained(good)
    assert set(prepare_data(cfg, tokenizer).splits) == {"train", "eval"}
    blank = BertTokenizer(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])})
    blank.save_pretrained(tmp_path / "blank")
    blank = BertTokenizer.from_pretrained(tmp_path / "blank")
    with pytest.raises(DataError, match=rf"the tokenizer of {tmp_path / 'blank'} turns 100% of the first 24 training "
                                        r"texts' tokens into \[UNK\] \(its vocabulary has 5 entries\): it does not "
                                        r"cover this text"):
        prepare_data(cfg, blank)


def text_cfg(**files) -> DataConfig:
    return DataConfig(dataset="csv", data_files=files, modality="text", input_column="text", eval_split=None)


def test_broken_table_files_name_the_file_and_what_is_wrong(tmp_path):
    """A missing, empty or header-only file, and JSON that does not parse: one line each, naming the file
    and the reader's own reason (not datasets' "An error occurred while generating the dataset")."""
    with pytest.raises(DataError, match=rf"^data.data_files: no such file: {tmp_path / 'nope.csv'}$"):
        prepare_data(text_cfg(train=str(tmp_path / "nope.csv")))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"cannot load 'csv' from data.data_files=.*empty.csv'\}: No columns to parse"):
        prepare_data(text_cfg(train=str(tmp_path / "empty.csv")))
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match=r"header.csv'\}: its train split has no rows$"):
        prepare_data(text_cfg(train=str(tmp_path / "header.csv")))
    (tmp_path / "blank.csv").write_text("text,label\ngood film,pos\n,neg\n")
    with pytest.raises(DataError, match=r"split 'train': 1 of 2 rows have no value in data.input_column='text'"):
        prepare_data(text_cfg(train=str(tmp_path / "blank.csv")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot load 'json' from .*bad.json: JSON parse error"):
        prepare_data(DataConfig(dataset="json", data_files=str(tmp_path / "bad.json"), modality="text",
                                input_column="text", eval_split=None))


def test_rows_without_a_label_and_listed_audio_that_is_gone_are_named(tmp_path):
    root = write_tone_dataset(tmp_path / "d", {"train": 2})
    meta = root / "train" / "metadata.csv"
    lines = meta.read_text().splitlines()
    meta.write_text("\n".join([lines[0], lines[1].split(",")[0] + ",,1.0", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=r"split 'train': 1 of 6 rows have no value in data.label_column='label'"):
        prepare_data(audio_cfg(root, eval_split=None), sampling_rate=16000)
    meta.write_text("\n".join(lines) + "\n")
    (root / "train" / "high_0.wav").unlink()
    with pytest.raises(DataError, match=r"audio file .*high_0.wav is listed in the dataset but does not exist"):
        prepare_data(audio_cfg(root, eval_split=None), sampling_rate=16000)


def test_a_hidden_test_split_is_left_out_by_default_and_refused_by_name(tmp_path):
    """Benchmarks (GLUE, SuperGLUE) publish their test split with every label -1: scoring on it would
    be scoring against no answers. The default test_split skips it; naming it is an error."""
    from datasets import ClassLabel, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    texts = ["good film", "bad film", "great", "awful"]
    DatasetDict({
        "train": Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0]}, features=features),
        "validation": Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0]}, features=features),
        "test": Dataset.from_dict({"text": texts, "label": [-1] * 4}, features=features),
    }).save_to_disk(tmp_path / "glue_like")
    from transformers import BertTokenizer

    from kd.synthetic import save_tiny_bert

    tokenizer = BertTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert", ["neg", "pos"]))
    cfg = DataConfig(dataset=str(tmp_path / "glue_like"), modality="text", input_column="text")
    assert set(prepare_data(cfg, tokenizer).splits) == {"train", "eval"}
    with pytest.raises(DataError, match=r"split 'test' \(data.eval_split\) has no labels \(every label is -1"):
        prepare_data(DataConfig(dataset=str(tmp_path / "glue_like"), modality="text", input_column="text",
                                eval_split="test", test_split=None), tokenizer)


def test_an_image_that_does_not_decode_is_named_also_from_a_loader_worker(tmp_path):
    """Images decode when a batch is built; a corrupt one is one line naming its file, also when a
    DataLoader worker (which re-raises with its own traceback in the message) hits it."""
    from transformers import ViTImageProcessor

    from kd.demo.image_data import build_image_dataset

    root = build_image_dataset(tmp_path / "shapes", {"train": 2})
    broken = sorted((root / "train").rglob("*.png"))[0]
    broken.write_bytes(b"not an image")
    data = prepare_data(DataConfig(dataset="imagefolder", data_dir=str(root)),
                        ViTImageProcessor(size={"height": 16, "width": 16}))
    train = data.splits["train"]
    with pytest.raises(DataError, match=rf"^cannot decode image {broken}: cannot identify image file"):
        data.collate([train[i] for i in range(len(train))])
    loader = make_loader(train, DataConfig(dataset="imagefolder", num_workers=1), 64, collate=data.collate,
                         shuffle=False, pin_memory=False)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert str(info.value) == f"cannot decode image {broken}: cannot identify image file '{broken}'"

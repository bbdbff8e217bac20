"""Tiny synthetic datasets and models, made on the spot: for tests, benchmarks and smoke runs.

Nothing here downloads anything: the tone dataset is generated sine waves, and the wav2vec2 teacher
is built from a config with random weights and saved as safetensors, like a real teacher folder.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

TONE_LABELS = ["high", "low", "mid"]  # sorted: string labels become a ClassLabel in sorted order
TONE_HZ = {"low": 300.0, "mid": 800.0, "high": 2000.0}


def write_tone_dataset(root: Path, per_class: dict[str, int], rate: int = 8000, seed: int = 0) -> Path:
    """An audiofolder of 1 s sine tones (one frequency per class) with noise, string labels in metadata.csv."""
    rng = np.random.default_rng(seed)
    t = np.arange(rate) / rate
    for split, n in per_class.items():
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for label, hz in TONE_HZ.items():
            for i in range(n):
                phase = rng.uniform(0, 2 * np.pi)
                wave = 0.5 * np.sin(2 * np.pi * hz * rng.uniform(0.95, 1.05) * t + phase)
                wave += 0.05 * rng.standard_normal(rate)
                name = f"{label}_{i}.wav"
                soundfile.write(folder / name, wave.astype(np.float32), rate)
                rows.append({"file_name": name, "label": label, "weight": 1.0 + (i % 2)})
        with open(folder / "metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "label", "weight"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def save_tiny_wav2vec2(path: Path, labels: list[str], seed: int = 0, **overrides: Any) -> Path:
    """A randomly initialised wav2vec2 classifier small enough to run in milliseconds on a CPU."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForSequenceClassification

    torch.manual_seed(seed)
    settings = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                    conv_dim=(16, 16, 16), conv_kernel=(10, 4, 4), conv_stride=(10, 4, 4),
                    num_feat_extract_layers=3, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                    classifier_proj_size=16, num_labels=len(labels), id2label=dict(enumerate(labels)),
                    label2id={n: i for i, n in enumerate(labels)}, mask_time_prob=0.0)
    settings.update(overrides)
    model = Wav2Vec2ForSequenceClassification(Wav2Vec2Config(**settings))
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True, return_attention_mask=False).save_pretrained(path)
    return path


SENTIMENT_WORDS = {"pos": ["good", "great", "fine", "lovely"], "neg": ["bad", "awful", "poor", "dull"]}
FILLER_WORDS = ["the", "movie", "film", "was", "a", "really", "plot", "acting"]


def write_sentiment_csv(folder: Path, per_class: int = 12, seed: int = 0) -> Path:
    """train.csv / validation.csv of short sentences whose label is decided by one sentiment word."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("validation", max(2, per_class // 3))):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            for label, words in SENTIMENT_WORDS.items():
                for _ in range(n):
                    filler = list(rng.choice(FILLER_WORDS, size=int(rng.integers(2, 6))))
                    filler.insert(int(rng.integers(0, len(filler) + 1)), str(rng.choice(words)))
                    writer.writerow([" ".join(filler), label])
    return folder


def save_tiny_bert(path: Path, labels: list[str], seed: int = 0) -> Path:
    """A random-weight BERT classifier with a word-level vocabulary covering the sentiment data."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(seed)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + FILLER_WORDS + sum(SENTIMENT_WORDS.values(), [])
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_color_images(root: Path, per_class: int = 6, size: int = 32, seed: int = 0) -> Path:
    """An imagefolder (train/validation, one folder per class) of noisy red and blue squares."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colors = {"blue": (40, 60, 200), "red": (200, 50, 40)}
    for split, n in (("train", per_class), ("validation", max(2, per_class // 2))):
        for label, rgb in colors.items():
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def save_tiny_vit(path: Path, labels: list[str], size: int = 32, seed: int = 0) -> Path:
    """A random-weight ViT image classifier with its image processor."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(image_size=size, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    ViTForImageClassification(config).save_pretrained(path)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path


def write_keyword_noise_dataset(root: Path, labels: list[str], per_class: int, rate: int = 16000,
                                seconds: float = 1.0, seed: int = 0) -> Path:
    """A one-split (train) audiofolder of noisy chirps, one pitch per label, as WAV files.

    Only the shapes and the decoding work matter (benchmarks of the flagship architecture): the
    files are 16-bit WAV at `rate`, decoded by the kit exactly as real recordings are.
    """
    rng = np.random.default_rng(seed)
    n = int(rate * seconds)
    t = np.arange(n) / rate
    folder = root / "train"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, label in enumerate(labels):
        for i in range(per_class):
            hz = 200.0 * 2 ** (k / 8)  # a distinct pitch per label
            wave = 0.3 * np.sin(2 * np.pi * hz * t * rng.uniform(0.97, 1.03)) + 0.05 * rng.standard_normal(n)
            name = f"{label}_{i}.wav"
            soundfile.write(folder / name, wave.astype(np.float32), rate, subtype="PCM_16")
            rows.append({"file_name": name, "label": label})
    with open(folder / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file_name", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def save_random_ast(path: Path, labels: list[str], seed: int = 0) -> Path:
    """configs/5gb.yaml's teacher architecture (AST for Speech Commands v2) with random weights.

    The Hub model MIT/ast-finetuned-speech-commands-v2 uses 128 mel bins over 128 frames (1 s at
    16 kHz, padded): 86M parameters, 146 tokens per clip. Same shapes and cost, no download.
    """
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification

    torch.manual_seed(seed)
    config = ASTConfig(max_length=128, num_mel_bins=128, num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)})
    ASTForAudioClassification(config).save_pretrained(path)
    ASTFeatureExtractor(max_length=128, num_mel_bins=128, sampling_rate=16000, mean=-6.845978,
                        std=5.5654526).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# The flagship's published artefacts, reproduced small: the Speech Commands archive and the AST teacher

# MIT/ast-finetuned-speech-commands-v2's id2label, in its order: the AST recipe's
# speechcommands_class_labels_indices.csv, which the Hub conversion took via huggingface/label-files
# (speech-commands-v2-id2label.json). Not alphabetical: labels must be matched by name.
AST_SPEECH_COMMANDS_LABELS = [
    "backward", "follow", "five", "bed", "zero", "on", "learn", "two", "house", "tree", "dog", "stop", "seven",
    "eight", "down", "six", "forward", "cat", "right", "visual", "four", "wow", "no", "nine", "off", "three",
    "left", "marvin", "yes", "up", "sheila", "happy", "bird", "go", "one",
]
# The published preprocessor_config.json of that model (ASTFeatureExtractor, Speech Commands statistics).
AST_SPEECH_COMMANDS_PREPROCESSOR = {
    "do_normalize": True, "feature_extractor_type": "ASTFeatureExtractor", "feature_size": 1, "max_length": 128,
    "mean": -6.845978, "num_mel_bins": 128, "padding_side": "right", "padding_value": 0.0,
    "return_attention_mask": False, "sampling_rate": 16000, "std": 5.5654526,
}
BACKGROUND_NOISES = ["doing_the_dishes", "dude_miaowing", "exercise_bike", "pink_noise", "running_tap", "white_noise"]


def write_speech_commands(root: Path, words: list[str], speakers: dict[str, int] | None = None,
                          seed: int = 0) -> Path:
    """Speech Commands' extracted layout in miniature: one folder per word of `<speaker>_nohash_<n>.wav`
    clips (16 kHz, 16-bit mono, most 1 s, some shorter), validation_list.txt and testing_list.txt (the
    held-out speakers' clips), _background_noise_/ with its README and long noise recordings, and the
    LICENSE and README.md at the top. Each word is a chirp of its own pitch, so it can be learnt.

    `speakers`: clips per split, as {"train": n, "validation": n, "test": n} speakers per word."""
    speakers = speakers or {"train": 2, "validation": 1, "test": 1}
    rng = np.random.default_rng(seed)
    rate = 16000
    lists: dict[str, list[str]] = {"validation": [], "test": []}
    speaker_ids = {split: [f"{rng.integers(16**8):08x}" for _ in range(n)] for split, n in speakers.items()}
    for k, word in enumerate(words):
        (root / word).mkdir(parents=True, exist_ok=True)
        hz = 250.0 * 2 ** (k / 9)
        for split, ids in speaker_ids.items():
            for j, speaker in enumerate(ids):
                n = rate if (k + j) % 4 else int(rate * 0.8)  # a few clips shorter than a second
                t = np.arange(n) / rate
                wave = 0.3 * np.sin(2 * np.pi * hz * t * rng.uniform(0.97, 1.03)) + 0.03 * rng.standard_normal(n)
                name = f"{word}/{speaker}_nohash_{j % 2}.wav"
                soundfile.write(root / name, wave.astype(np.float32), rate, subtype="PCM_16")
                if split in lists:
                    lists[split].append(name)
    (root / "validation_list.txt").write_text("".join(f"{name}\n" for name in sorted(lists["validation"])))
    (root / "testing_list.txt").write_text("".join(f"{name}\n" for name in sorted(lists["test"])))
    noise = root / "_background_noise_"
    noise.mkdir(exist_ok=True)
    (noise / "README.md").write_text("Longer recordings of noise, not spoken words.\n")
    for name in BACKGROUND_NOISES:
        soundfile.write(noise / f"{name}.wav", (0.1 * rng.standard_normal(3 * rate)).astype(np.float32), rate,
                        subtype="PCM_16")
    (root / "LICENSE").write_text("Creative Commons BY 4.0\n")
    (root / "README.md").write_text("Speech Commands Data Set (miniature, synthetic)\n")
    return root


def archive_folder(folder: Path, archive: Path) -> Path:
    """`folder`'s contents as a .tar.gz with the official archive's member names (./yes/..., ./LICENSE)."""
    import tarfile

    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=".")
    return archive


def save_tiny_ast(path: Path, labels: list[str] | None = None, seed: int = 0) -> Path:
    """MIT/ast-finetuned-speech-commands-v2 in miniature: its published config.json (architecture,
    128 mel bins over 128 frames, strides 10, the real id2label) with tiny hidden sizes, random
    weights, and its published preprocessor_config.json."""
    import json

    import torch
    from transformers import ASTConfig, ASTForAudioClassification

    labels = labels or AST_SPEECH_COMMANDS_LABELS
    torch.manual_seed(seed)
    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_length=128, num_mel_bins=128, frequency_stride=10, time_stride=10, patch_size=16,
                       hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, qkv_bias=True,
                       num_labels=len(labels), id2label=dict(enumerate(labels)),
                       label2id={n: i for i, n in enumerate(labels)}, architectures=["ASTForAudioClassification"])
    ASTForAudioClassification(config).save_pretrained(path)
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(AST_SPEECH_COMMANDS_PREPROCESSOR, indent=2))
    return path


# ---------------------------------------------------------------------------------------------
# Causal language models

LM_SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a student"]
LM_VERBS = ["sees", "likes", "finds", "follows", "helps", "calls"]
LM_OBJECTS = ["the ball", "a tree", "the house", "the river", "a book", "the garden"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
LM_SPECIAL = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def lm_sentences(n: int, seed: int = 0) -> list[str]:
    """Short subject-verb-object sentences: a grammar small models learn in a few hundred steps."""
    rng = np.random.default_rng(seed)
    return [f"{rng.choice(LM_SUBJECTS)} {rng.choice(LM_VERBS)} {rng.choice(LM_OBJECTS)}." for _ in range(n)]


def write_lm_dataset(folder: Path, shape: str = "text", sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """train.jsonl / validation.jsonl (/ test.jsonl) in one of the three causal_lm shapes (kd/lm/data.py)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    for k, (split, n) in enumerate((sizes or {"train": 48, "validation": 12}).items()):
        rows = []
        for i, sentence in enumerate(lm_sentences(n, seed + k)):
            subject, rest = sentence.split(" ", 2)[:2], sentence.split(" ", 2)[2]
            prompt = " ".join(subject)
            if shape == "text":
                rows.append({"text": sentence})
            elif shape == "prompt_completion":
                rows.append({"prompt": f"{prompt} ", "completion": rest})
            else:
                rows.append({"messages": [{"role": "user", "content": f"finish: {prompt}"},
                                          {"role": "assistant", "content": rest}]})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def save_tiny_tokenizer(path: Path, seed: int = 0, vocab_size: int = 120) -> Any:
    """A byte-level BPE tokenizer trained on the tiny LM grammar, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LM_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(lm_sentences(400, seed) + ["finish: "], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def save_tiny_llama(path: Path, seed: int = 0, layers: int = 4, hidden: int = 32, tokenizer_seed: int = 0,
                    vocab_size: int = 300, padding: int = 0) -> Path:
    """A random-weight Llama causal LM (milliseconds per step on a CPU) with the tiny BPE tokenizer.
    `padding`: logit rows past the tokenizer's length, as published models pad theirs (Qwen2.5)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = save_tiny_tokenizer(path, tokenizer_seed, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer) + padding, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    return path

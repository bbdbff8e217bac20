"""A text-classification example made offline: short sentences on four topics, in train/validation/test
CSV files, and the starting point of a teacher (a BERT config and a tokenizer trained on the text).

A text model folder needs its tokenizer: a config alone gets one that knows only the special tokens,
and every word becomes [UNK] (the kit refuses such a tokenizer before training). So the starting
folder holds a WordPiece tokenizer trained on the training sentences with the `tokenizers` library,
saved with transformers, beside a BertConfig whose `architectures` names the task.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TOPICS = {
    "food": ["bread", "cheese", "soup", "apple", "dinner", "kitchen", "recipe", "spicy", "baked", "sweet"],
    "sport": ["match", "goal", "team", "coach", "race", "stadium", "score", "runner", "league", "trophy"],
    "travel": ["train", "flight", "hotel", "ticket", "beach", "luggage", "airport", "journey", "map", "border"],
    "weather": ["rain", "storm", "sunny", "cloud", "wind", "snow", "forecast", "cold", "warm", "thunder"],
}
FILLER = ["the", "a", "was", "is", "very", "we", "they", "today", "after", "before", "really", "quite", "our",
          "this", "that", "and", "then", "again", "not", "so"]
SPLITS = {"train": 150, "validation": 40, "test": 60}  # sentences per topic
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def sentence(rng: np.random.Generator, topic: str) -> str:
    """6 to 11 words: filler, two or three words of the topic and, one time in four, one of another."""
    words = list(rng.choice(FILLER, size=int(rng.integers(4, 8))))
    words += list(rng.choice(TOPICS[topic], size=int(rng.integers(2, 4))))
    if rng.random() < 0.25:
        other = str(rng.choice([t for t in TOPICS if t != topic]))
        words.append(str(rng.choice(TOPICS[other])))
    rng.shuffle(words)
    return " ".join(words)


def build_text_dataset(root: str | Path, per_topic: dict[str, int] | None = None, seed: int = 0) -> Path:
    """`root`/{train,validation,test}.csv (columns text, label) and `root`/bert-start (config + tokenizer)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    texts = []
    for split, n in (per_topic or SPLITS).items():
        rows = [(sentence(rng, topic), topic) for topic in TOPICS for _ in range(n)]
        rng.shuffle(rows)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        if split == "train":
            texts = [text for text, _ in rows]
    save_bert_start(root / "bert-start", texts, sorted(TOPICS))
    return root


def save_bert_start(folder: Path, texts: list[str], labels: list[str]) -> Path:
    """A BERT classifier's config (4 layers of 128) and a WordPiece tokenizer trained on `texts`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, PreTrainedTokenizerFast

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=1000, special_tokens=SPECIAL))
    wordpiece.post_processor = processors.TemplateProcessing(  # [CLS] text [SEP], as BERT takes its inputs
        single="[CLS] $A [SEP]", special_tokens=[(t, wordpiece.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                        cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
                        architectures=["BertForSequenceClassification"])
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

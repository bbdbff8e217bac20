"""The demo teacher's architecture: a small wav2vec2 classifier, trained from scratch on raw audio.

Written as a model folder (config.json + preprocessor_config.json) that `student.config` points at,
so the teacher is trained by train_kd.py itself with distillation off.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor


def write_teacher_architecture(folder: str | Path, sample_rate: int = 8000) -> Path:
    folder = Path(folder)
    config = Wav2Vec2Config(
        # Convolutional feature encoder: 5 layers, total stride 160 -> 50 frames per second at 8 kHz.
        conv_dim=(32, 64, 64, 96, 96), conv_kernel=(10, 8, 4, 4, 4), conv_stride=(5, 4, 2, 2, 2),
        num_feat_extract_layers=5, feat_extract_norm="layer", conv_bias=True,
        # Transformer: 4 layers of width 96 over those frames.
        hidden_size=96, num_hidden_layers=4, num_attention_heads=4, intermediate_size=192,
        num_conv_pos_embeddings=32, num_conv_pos_embedding_groups=8, do_stable_layer_norm=True,
        hidden_dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, feat_proj_dropout=0.1,
        layerdrop=0.0, mask_time_prob=0.05, mask_time_length=5, classifier_proj_size=96,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=sample_rate, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder

"""Convert a GGUF language model into a safetensors model folder the kit can use as a teacher.

    python -m kd.lm.convert_gguf path/to/model.gguf models/smollm2-135m            # fp32 weights
    python -m kd.lm.convert_gguf path/to/model.gguf models/smollm2-135m --dtype bf16

GGUF files (llama.cpp's format) are how many small LMs are shipped. Like safetensors they hold
tensors and metadata, no code; transformers reads them (with the `gguf` package) and dequantises
the weights. This is the only place the kit accepts GGUF: the teacher loader stays safetensors-only,
so a run never dequantises (about 50 s for a 135M model on two CPU cores) and the converted folder
is checked like any other teacher. The folder is written atomically (complete or absent).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from kd.errors import KDError, ModelLoadError, first_line

DTYPES = ("fp32", "bf16", "fp16")


def convert(gguf_path: str | Path, out_dir: str | Path, dtype: str = "fp32") -> dict[str, object]:
    """Dequantise `gguf_path` into `out_dir` (config.json, model.safetensors, tokenizer files).

    Returns what was written: architecture, parameters, vocabulary size, seconds taken."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.atomic import atomic_folder

    src = Path(gguf_path).expanduser()
    if not src.is_file():
        raise ModelLoadError(f"{src}: no such file (expected a .gguf model file)")
    if src.suffix.lower() != ".gguf":
        raise ModelLoadError(f"{src}: not a .gguf file; only GGUF is converted here (safetensors folders are "
                             "used as they are)")
    if importlib.util.find_spec("gguf") is None:
        raise KDError("reading GGUF needs the gguf package: pip install gguf (or pip install 'kd-kit[llm]')")
    if dtype not in DTYPES:
        raise KDError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    started = time.perf_counter()
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelLoadError(f"{src}: cannot read it as a causal language model ({first_line(exc)}); transformers "
                             "reads GGUF for the architectures listed in its GGUF documentation") from None
    fixed = repair_special_tokens(tokenizer, src)
    # The weights are dequantised now: the folder must not claim a GGUF quantisation it no longer has.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
    return {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
            "vocab_size": model.config.vocab_size, "dtype": dtype, "seconds": time.perf_counter() - started,
            "special_tokens_fixed": fixed}


GGUF_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                "pad_token": "padding_token_id"}


def repair_special_tokens(tokenizer, gguf_path: Path) -> list[str]:
    """Set the tokenizer's special tokens to the ids the GGUF metadata names.

    transformers 5.17 reads SmolLM2's GGUF tokenizer with eos = '<|im_start|>' (id 1) although the
    file says eos_token_id 2 ('<|im_end|>'): every sample would then end with the wrong token and
    generation would not stop. Returns what was changed, as "eos_token: '<|im_start|>' -> '<|im_end|>'"."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    changed = []
    for attr, key in GGUF_SPECIAL.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(field.contents()))
        if token is not None and getattr(tokenizer, attr) != token:
            changed.append(f"{attr}: {getattr(tokenizer, attr)!r} -> {token!r}")
            setattr(tokenizer, attr, token)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.lm.convert_gguf", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("gguf_file", help="the .gguf file to convert")
    parser.add_argument("out_dir", help="the model folder to write (replaced atomically if it exists)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="weight dtype of the folder (default fp32)")
    args = parser.parse_args(argv)
    try:
        print(f"Dequantising {args.gguf_file} (this reads every tensor; a 135M model takes under a minute on a CPU)")
        info = convert(args.gguf_file, args.out_dir, args.dtype)
    except KDError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for change in info["special_tokens_fixed"]:
        print(f"Tokenizer special token set from the GGUF metadata: {change}")
    print(f"Wrote {args.out_dir}: {info['architecture']}, {info['parameters'] / 1e6:.1f}M parameters, vocabulary "
          f"{info['vocab_size']}, {info['dtype']}, in {info['seconds']:.0f} s. Use it as teacher.model: {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Causal-LM distillation end to end: data shapes and masks, a real run through the CLI with its
telemetry read back, the saved student generating, the vocabulary check, and GGUF conversion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import load_dataset

from kd.config import DataConfig
from kd.errors import DataError
from kd.lm.data import IGNORE, LMCollator, prepare_lm_splits
from kd.synthetic import save_tiny_llama, write_lm_dataset
from kd.telemetry import read_events

from conftest import accelerate_launch, once_more_if_hung, run_cli, write_config


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def lm_config(data_dir: Path, teacher: Path | None, out: Path, **sections) -> dict:
    cfg = {
        "run": {"name": "tiny-lm", "output_dir": str(out), "seed": 0},
        "data": {"dataset": "json", "data_dir": str(data_dir), "modality": "causal_lm", "input_column": "text",
                 "eval_split": "validation", "max_length": 48, "num_workers": 0},
        "teacher": {"model": str(teacher) if teacher else None},
        "student": {"type": "hf", "init_from_teacher": teacher is not None,
                    "teacher_layers": [0, 2] if teacher else None},
        "distillation": {"enabled": teacher is not None, "alpha": 0.5, "temperature": 2.0},
        "train": {"batch_size": 4, "epochs": None, "max_steps": 4, "lr": 0.01, "eval_every": 2},
        "telemetry": {"log_every": 1, "warmup_steps": 0},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def prepared(tmp_path: Path, shape: str, tokenizer, **data) -> list[dict]:
    folder = write_lm_dataset(tmp_path / shape, shape, {"train": 6})
    cfg = DataConfig(dataset="json", modality="causal_lm", input_column="text", **data)
    ds = load_dataset("json", data_dir=str(folder))["train"]
    return list(prepare_lm_splits({"train": ds}, cfg, tokenizer)["train"])


@pytest.mark.parametrize("shape,learnt_starts", [("text", " "), ("prompt_completion", " "), ("messages", "")])
def test_loss_covers_only_completion_and_assistant_tokens(tmp_path, tokenizer, shape, learnt_starts):
    rows = prepared(tmp_path, shape, tokenizer, max_length=64)
    batch = LMCollator(tokenizer.pad_token_id)(rows[:2])
    ids, labels = batch["inputs"]["input_ids"], batch["labels"]
    assert torch.equal(labels[:, :-1][labels[:, :-1] != IGNORE], ids[:, 1:][labels[:, :-1] != IGNORE])  # shifted
    learnt = tokenizer.decode([t for t in labels[0].tolist() if t != IGNORE])
    text = tokenizer.decode(ids[0][batch["inputs"]["attention_mask"][0].bool()])
    verb_object = text.split("<|assistant|>")[-1] if shape == "messages" else text.split(" ", 2)[-1]
    assert learnt.endswith(tokenizer.eos_token)
    if shape == "text":  # every token after the first (nothing predicts the first)
        assert learnt == text[len(tokenizer.decode(ids[0][:1])):]
    else:  # the prompt / user turn never counts
        assert learnt.startswith(learnt_starts + verb_object.split()[0].strip())
        assert "finish" not in learnt and "<|user|>" not in learnt
    # Padding never counts: the shorter row's padded tail is IGNORE.
    pad = batch["inputs"]["attention_mask"] == 0
    assert (labels[pad] == IGNORE).all()


def test_truncation_and_packing(tmp_path, tokenizer):
    rows = prepared(tmp_path, "text", tokenizer, max_length=5)
    assert max(len(r["input_ids"]) for r in rows) == 5
    full = prepared(tmp_path, "text", tokenizer, max_length=64)
    packed = prepared(tmp_path, "text", tokenizer, max_length=16, packing=True)
    assert all(len(r["input_ids"]) == 16 for r in packed[:-1]) and len(packed[-1]["input_ids"]) <= 16
    flat = [t for r in packed for t in r["input_ids"]]
    assert flat == [t for r in full for t in r["input_ids"]]  # nothing lost or reordered
    assert [m for r in packed for m in r["loss_mask"]] == [m for r in full for m in r["loss_mask"]]


def test_unknown_shape_and_missing_chat_template_are_clear_errors(tmp_path, tokenizer):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    ds = load_dataset("json", data_dir=str(folder))["train"]
    cfg = DataConfig(dataset="json", modality="causal_lm", input_column="text")
    with pytest.raises(DataError, match="'messages' column.*prompt.*completion.*data.input_column.*body"):
        prepare_lm_splits({"train": ds}, cfg, tokenizer)
    chat = load_dataset("json", data_dir=str(write_lm_dataset(tmp_path / "chat", "messages", {"train": 2})))["train"]
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(DataError, match="chat template"):
            prepare_lm_splits({"train": chat}, cfg, tokenizer)
    finally:
        tokenizer.chat_template = template


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, tiny_llama):
    """A JSD distillation of the tiny Llama into a 2-layer student (from teacher layers 0 and 2) on
    prompt/completion data, under `accelerate launch`."""
    tmp = tmp_path_factory.mktemp("lmrun")
    data = write_lm_dataset(tmp / "data", "prompt_completion", {"train": 24, "validation": 8})
    cfg = lm_config(data, tiny_llama, tmp / "run", distillation={"divergence": "jsd", "jsd_beta": 0.3},
                    memory={"loss_chunk": 7}, export={"onnx": True, "check_samples": 4})
    result = run_cli(["--config", str(write_config(tmp / "c.yaml", cfg))], launcher=accelerate_launch(1))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "run", result


@pytest.mark.launches
def test_lm_run_telemetry_has_tokens_per_second_and_perplexity(lm_run):
    run_dir, result = lm_run
    events = read_events(run_dir / "telemetry.jsonl")
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    for e in steps:
        assert e["loss"]["total"] == pytest.approx(0.5 * e["loss"]["ce"] + 0.5 * e["loss"]["kd"], rel=1e-4)
        assert e["loss"]["kd"] > 0
        assert e["rate"]["tokens_per_s"] > e["rate"]["samples_per_s"] > 0
    evals = [e for e in events if e["type"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4]
    m = evals[-1]["metrics"]
    assert m["perplexity"] == pytest.approx(torch.tensor(m["ce"]).exp().item(), rel=1e-5)
    assert m["teacher_perplexity"] > 1 and 0 <= m["agreement"] <= 1 and m["tokens"] > 0
    assert m["loss"] > 0.5 * m["ce"]  # (1 - alpha) * CE plus a positive divergence part
    start = events[0]
    assert start["params"]["student"] < start["params"]["teacher"]
    assert start["estimate"]["logits"] > 0  # the LM estimate counts logits and the chunked loss


@pytest.mark.launches
def test_lm_student_saves_with_tokenizer_and_generates(lm_run, tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = lm_run[0] / "student"
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.get_vocab() == tokenizer.get_vocab() and model.config.num_hidden_layers == 2
    prompt = tok("the cat ", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]

    # export.onnx: (input_ids, attention_mask) -> logits at every position, dynamic batch and length
    from kd.export.detect import ort_session
    from kd.export.onnx import ATOL

    batch = tok(["the cat sat on", "a dog"], return_tensors="pt", padding=True)
    sess = ort_session(folder / "model.onnx")
    got = sess.run(["logits"], {k: v.numpy() for k, v in batch.items() if k in ("input_ids", "attention_mask")})[0]
    with torch.no_grad():
        want = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.numpy()
    real = batch["attention_mask"].bool().numpy()
    assert abs(got - want)[real].max() <= ATOL


@pytest.mark.launches
def test_monitor_once_shows_tokens_per_second_and_perplexity(lm_run):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "monitor_tui.py"), str(lm_run[0]), "--once"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "tokens/s" in out.stdout and "perplexity" in out.stdout and "(teacher " in out.stdout


@pytest.mark.launches
def test_ce_only_baseline_from_the_teacher_config(tmp_path, tiny_llama):
    """No teacher: the student is built from a config folder and trained on next-token CE alone."""
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 12, "validation": 4})
    cfg = lm_config(data, None, tmp_path / "run", student={"config": str(tiny_llama),
                                                           "config_overrides": {"num_hidden_layers": 1}})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run" / "telemetry.jsonl")
    steps = [e for e in events if e["type"] == "step"]
    assert all(e["loss"]["kd"] == 0 and e["loss"]["total"] == pytest.approx(e["loss"]["ce"]) for e in steps)
    final = [e for e in events if e["type"] == "eval"][-1]["metrics"]
    assert final["teacher_perplexity"] is None and final["perplexity"] > 1


@pytest.mark.launches
def test_different_vocabularies_are_refused_before_training(tmp_path, tiny_llama):
    other = save_tiny_llama(tmp_path / "other", tokenizer_seed=1, vocab_size=280)
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 8, "validation": 4})
    cfg = lm_config(data, tiny_llama, tmp_path / "run", student={"init_from_teacher": False, "teacher_layers": None,
                                                                 "config": str(other)})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert str(tiny_llama) in line and str(other) in line
    assert "vocabulary size 300 vs 280" in line and "first differing token ids" in line
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "telemetry.jsonl").exists()


@pytest.mark.launches
def test_a_pair_whose_logits_are_padded_differently_trains_on_the_shared_tokenizer(tmp_path):
    # As Qwen2.5-7B (152,064 logits) and 0.5B (151,936) share one tokenizer of 151,665 entries.
    teacher = save_tiny_llama(tmp_path / "teacher", padding=7)  # 307 logits, 300 tokens
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 8, "validation": 4})
    cfg = lm_config(data, teacher, tmp_path / "run", student={
        "init_from_teacher": False, "teacher_layers": None, "config": str(teacher),
        "config_overrides": {"vocab_size": 303, "num_hidden_layers": 1}})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Teacher logits cut to the tokenizer's 300 ids (config.vocab_size 307" in result.stdout
    assert "Student logits cut to the tokenizer's 300 ids (config.vocab_size 303" in result.stdout
    final = [e for e in read_events(tmp_path / "run" / "telemetry.jsonl") if e["type"] == "eval"][-1]["metrics"]
    assert final["teacher_perplexity"] > 1 and 0 <= final["agreement"] <= 1


def test_logits_are_cut_to_the_tokenizer_and_a_narrower_model_is_refused(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from kd.errors import ModelLoadError
    from kd.lm.vocabulary import check_shared_vocabulary, cut_to_tokenizer

    model = AutoModelForCausalLM.from_pretrained(save_tiny_llama(tmp_path / "padded", padding=5))
    ids = torch.tensor([[5, 6, 7]])
    full = model(input_ids=ids).logits
    assert full.shape[-1] == 305 and cut_to_tokenizer(model, 300)
    cut = model(input_ids=ids).logits
    assert cut.shape[-1] == 300 and torch.equal(cut, full[..., :300])
    assert not cut_to_tokenizer(model, 305)  # nothing past the tokenizer: no hook
    check_shared_vocabulary(tokenizer, None, teacher_width=307, student_width=300, teacher_name="t", student_name="s")
    with pytest.raises(ModelLoadError, match=r"student s has logits over 290 token ids .* the shared tokenizer has "
                                             r"300: tokens past 290 would have no logit"):
        check_shared_vocabulary(tokenizer, None, teacher_width=300, student_width=290, teacher_name="t",
                                student_name="s")


def write_gguf_from_hf(folder: Path, out: Path, eos_token_id: int | None = None) -> Path:
    """A GGUF file as llama.cpp's converter writes one (F32 tensors, q/k rows permuted, a gpt2 BPE
    tokenizer in the metadata) from a transformers Llama folder."""
    import gguf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    c = model.config
    tok = json.loads((folder / "tokenizer.json").read_text())
    specials = {t["content"]: t["id"] for t in tok["added_tokens"]}
    by_id = {i: t for t, i in {**tok["model"]["vocab"], **specials}.items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id if eos_token_id is None else eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}

    def permute(x, heads):  # llama.cpp's q/k row order; transformers undoes it when it reads GGUF
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        for gguf_name, hf_name in names.items():
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", sd[f"{p}{hf_name}.weight"])
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_converts_to_a_safetensors_teacher_with_the_same_outputs(tmp_path, tiny_llama):
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kd.lm.convert_gguf import main
    from kd.teachers.loading import load_teacher

    end = AutoTokenizer.from_pretrained(tiny_llama).convert_tokens_to_ids("<|end|>")
    gguf_file = write_gguf_from_hf(tiny_llama, tmp_path / "tiny.gguf", eos_token_id=end)
    assert main([str(gguf_file), str(tmp_path / "converted")]) == 0
    assert (tmp_path / "converted" / "model.safetensors").is_file()
    teacher = load_teacher(str(tmp_path / "converted"), "causal_lm")  # the safetensors-only loader accepts it
    original = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tmp_path / "converted")
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(tiny_llama).get_vocab()
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == end  # the special tokens the GGUF file names
    x = tok("the cat sees a tree.", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(teacher(**x).logits, original(**x).logits, atol=1e-5)


def test_gguf_is_accepted_only_by_the_converter(tmp_path, tiny_llama, capsys):
    from kd.errors import ModelLoadError
    from kd.lm.convert_gguf import main
    from kd.teachers.loading import load_teacher

    assert main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    assert "no such file" in capsys.readouterr().err
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"x")
    assert main([str(bogus), str(tmp_path / "out")]) == 2
    assert "not a .gguf file" in capsys.readouterr().err and not (tmp_path / "out").exists()
    gguf_only = tmp_path / "gguf_only"
    gguf_only.mkdir()
    (gguf_only / "config.json").write_text((tiny_llama / "config.json").read_text())
    (gguf_only / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_teacher(str(gguf_only), "causal_lm")


@pytest.mark.launches
def test_two_cpu_processes_train_and_evaluate_a_language_model(tmp_path, tiny_llama):
    """DDP over two CPU processes (gloo): sharded rows, tokens/s summed over processes, eval rows
    gathered once each, one telemetry file, one saved student; on-policy batches (each process
    samples its own rows) mixed with off-policy ones."""
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 16, "validation": 6})

    def attempt(n):  # a hung launch is retried once (conftest.once_more_if_hung)
        cfg = lm_config(data, tiny_llama, tmp_path / f"run{n}",
                        train={"max_steps": 2, "eval_every": 2, "batch_size": 2},
                        distillation={"on_policy": {"share": 0.5, "max_new_tokens": 6, "prompt_tokens": 4}},
                        telemetry={"log_every": 1, "warmup_steps": 0}, run={"seed": 2})
        return run_cli(["--config", str(write_config(tmp_path / f"c{n}.yaml", cfg))], launcher=accelerate_launch(2),
                       env={"ACCELERATE_USE_CPU": "true"}, timeout=150)

    n, result = once_more_if_hung(attempt)
    run = tmp_path / f"run{n}"
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(run / "telemetry.jsonl")
    assert [e["type"] for e in events].count("run_start") == 1
    assert events[0]["env"]["world_size"] == 2
    steps = [e for e in events if e["type"] == "step"]
    assert [e["samples"] for e in steps] == [4, 8]
    assert sorted(e["on_policy"]["share"] for e in steps) == [0.0, 1.0]  # seed 2: one step of each kind
    sampled = next(e for e in steps if e["on_policy"]["share"])
    assert sampled["loss"]["ce"] is None and sampled["on_policy"]["generated_tokens"] > 0
    final = [e for e in events if e["type"] == "eval"][-1]
    assert final["samples"] == 6  # every validation row once, none duplicated by the uneven shard
    assert (run / "student" / "model.safetensors").is_file()


@pytest.mark.parametrize("change,fragment", [
    ({"data": {"modality": "audio"}, "distillation": {"divergence": "jsd"}},
     "distillation.divergence: 'jsd' is for causal_lm"),
    ({"distillation": {"teacher_cache": "require"}}, "set distillation.cache_top_k"),
    ({"distillation": {"jsd_beta": 1.5}}, "distillation.jsd_beta"),
    ({"memory": {"loss_chunk": 0}}, "memory.loss_chunk"),
])
def test_language_model_config_errors(tmp_path, tiny_llama, change, fragment):
    from kd.config import config_from_dict
    from kd.errors import ConfigError

    cfg = lm_config(tmp_path, tiny_llama, tmp_path / "run")
    for section, values in change.items():
        cfg.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        config_from_dict(cfg)


@pytest.mark.launches
def test_out_of_memory_in_the_loss_shrinks_the_micro_batch_and_names_lm_settings(tmp_path, tiny_llama):
    data = write_lm_dataset(tmp_path / "data", "text", {"train": 16, "validation": 4})
    cfg = lm_config(data, tiny_llama, tmp_path / "run", train={"max_steps": 3, "eval_every": 3})
    result = run_cli(["--config", str(write_config(tmp_path / "c.yaml", cfg))],
                     env={"KD_FAULT_OOM_AT_STEP": "2", "KD_FAULT_OOM_PHASE": "backward"})
    assert result.returncode == 0, result.stderr[-3000:]
    events = read_events(tmp_path / "run" / "telemetry.jsonl")
    oom = next(e for e in events if e["type"] == "oom")
    assert oom["action"] == "shrink" and (oom["new_micro_batch"], oom["new_grad_accum"]) == (2, 2)
    assert any("data.max_length" in a for a in oom["advice"]) and any("memory.loss_chunk" in a for a in oom["advice"])
    assert [e["samples"] for e in events if e["type"] == "step"] == [4, 8, 12]  # the step retried whole


@pytest.mark.parametrize("name,kind,detail", [("ddp_2gpu", "MULTI_GPU", None), ("deepspeed_zero2", "DEEPSPEED", 2),
                                              ("deepspeed_zero3", "DEEPSPEED", 3), ("fsdp2", "FSDP", 2)])
def test_shipped_accelerate_configs_are_read_by_accelerate(name, kind, detail):
    """configs/accelerate/*.yaml load with Accelerate's own reader (which refuses unknown keys) as the
    kind their names say. (Accelerate runs FSDP on GPUs only, so FSDP2 itself is checked on a GPU.)"""
    from accelerate.commands.config.config_args import load_config_from_file

    from conftest import ROOT

    cfg = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == kind
    if kind == "DEEPSPEED":
        assert cfg.deepspeed_config["zero_stage"] == detail
        assert cfg.deepspeed_config["offload_optimizer_device"] == "cpu"
    if kind == "FSDP":
        assert cfg.fsdp_config["fsdp_version"] == detail


def test_token_cache_stores_top_k_at_learnt_positions_only(tmp_path):
    from kd.teachers.store import CacheError, TokenCache

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50)
    labels = torch.tensor([[IGNORE, 3, 4, IGNORE, IGNORE], [1, 2, 3, 4, IGNORE]])
    cache = TokenCache(tmp_path, {"teacher": "lm"}, 50, dtype="fp32", top_k=8)
    split = cache.register_split("train", "fp", 2)
    assert cache.put(split, [0, 1], logits, labels) == 2
    rows = cache.get(split, [0, 1])
    assert rows[0][0].shape == (2, 8) and rows[1][0].shape == (4, 8)  # prompt/padding positions not stored
    top = logits[0, 1:3].log_softmax(-1).topk(8)
    assert (rows[0][0] == top.indices.numpy()).all() and torch.allclose(torch.from_numpy(rows[0][1]), top.values)
    with pytest.raises(CacheError, match="top_k"):
        TokenCache(tmp_path, {"teacher": "x"}, 50, dtype="fp32", top_k=None)
    import sqlite3

    with sqlite3.connect(cache.path) as db:
        db.execute("UPDATE logits SET data = substr(data, 1, 20) WHERE idx = 1")
    with pytest.raises(CacheError, match="does not match its 4 positions"):
        cache.get(split, [1])


def test_top_k_teacher_in_evaluation_with_k_equal_to_vocabulary_is_exact():
    from kd.lm.losses import TopK, token_eval_sums

    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    labels = torch.tensor([[1, 2, IGNORE, 3], [IGNORE, 0, 8, 5]])
    full = token_eval_sums(student, teacher, labels, kind="jsd", beta=0.5,
                           temperature=1.0)  # top-k tempering is exact at T = 1
    top = teacher.log_softmax(-1).topk(9)
    as_top_k = token_eval_sums(student, TopK(top.indices, top.values), labels, kind="jsd", beta=0.5, temperature=1.0)
    for name in full:
        assert torch.allclose(full[name], as_top_k[name], atol=1e-5), name


@pytest.mark.launches
def test_cached_top_k_teacher_trains_like_its_first_epoch_and_require_needs_no_teacher(tmp_path, tiny_llama):
    """distillation.cache_top_k: epoch 1 stores the teacher's top k per learnt token (and fills the
    eval split), epoch 2 trains from the cache; a `require` run after --precompute-teacher never
    loads the teacher and gives the same losses."""
    data = write_lm_dataset(tmp_path / "data", "prompt_completion", {"train": 16, "validation": 4})
    base = {"teacher_cache": "auto", "cache_top_k": 16, "cache_dir": str(tmp_path / "cache")}
    losses = {}
    for name, mode in (("auto", "auto"), ("require", "require")):
        cfg = lm_config(data, tiny_llama, tmp_path / name, distillation={**base, "teacher_cache": mode},
                        student={"init_from_teacher": False, "teacher_layers": None,
                                 "config_overrides": {"num_hidden_layers": 1}},
                        train={"max_steps": 8, "eval_every": 8})
        config = write_config(tmp_path / f"{name}.yaml", cfg)
        if mode == "require":
            pre = run_cli(["--config", str(config), "--precompute-teacher"])
            assert pre.returncode == 0 and "0 soft targets computed" in pre.stdout, pre.stderr[-2000:]
        result = run_cli(["--config", str(config)])
        assert result.returncode == 0, result.stderr[-3000:]
        events = read_events(tmp_path / name / "telemetry.jsonl")
        losses[name] = [e["loss"]["total"] for e in events if e["type"] == "step"]
        steps = [e for e in events if e["type"] == "step"]
        assert steps[-1]["cache"]["source"] == "cache" and steps[-1]["cache"]["covered"]["train"] == [16, 16]
        if mode == "require":
            assert events[0]["params"]["teacher"] is None
    assert losses["require"] == pytest.approx(losses["auto"], rel=1e-5)

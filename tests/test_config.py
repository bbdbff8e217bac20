"""Config: every shipped YAML validates, bad values give one clear line each, overrides, round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from kd.config import SECTIONS, Config, config_from_dict, load_config, save_config
from kd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))
MINIMAL = {"data": {"dataset": "audiofolder", "data_dir": "x"}, "teacher": {"model": "t"}}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def with_(section: str, **values) -> dict:
    raw = {k: dict(v) for k, v in MINIMAL.items()}
    raw.setdefault(section, {}).update(values)
    return raw


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert {"demo.yaml", "demo_teacher.yaml", "demo_baseline.yaml", "5gb.yaml", "4gb_teacher_cpu.yaml"} <= names


def _flat(section: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in section.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("kd, baseline", [("demo", "demo_baseline"), ("real_speech_kd", "real_speech_baseline"),
                                          ("text_kd", "text_baseline"), ("image_kd", "image_baseline")])
def test_each_baseline_differs_from_its_kd_run_by_the_teacher_alone(kd, baseline):
    """The gain a demo or the FSDD bench reports is the teacher's: same data, student, augmentation
    (views included) and schedule; only the run's name, the teacher, the KD settings and the export."""
    with_kd, without = (_flat(dataclasses.asdict(load_config(ROOT / "configs" / f"{n}.yaml"))) for n in (kd, baseline))
    differ = {key for key in with_kd if with_kd[key] != without[key]}
    assert differ <= {"run.name", "teacher.model", "export.onnx", "export.int8"} | {
        k for k in with_kd if k.startswith("distillation.")}, sorted(differ)
    assert without["distillation.enabled"] is False and with_kd["distillation.enabled"] is True


def test_the_real_speech_recipe_is_shipped_where_users_copy_it():
    """The students of the flagship, the demo and the real-speech example share the recipe measured
    on FSDD (bench/RESULTS.md): strided stem, T 1 / alpha 1, augmentation in cacheable views."""
    for name in ("5gb", "demo", "real_speech_kd"):
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        recipe = (cfg.student.stem_stride, cfg.distillation.alpha, cfg.distillation.temperature,
                  cfg.distillation.alpha_schedule, cfg.augment.enabled, cfg.augment.views > 0,
                  cfg.distillation.teacher_cache)
        assert recipe == (2, 1.0, 1.0, "constant", True, True, "auto"), name


def test_demo_config_lists_every_key():
    """configs/demo.yaml is the reference: every key the kit knows appears there, with its comment."""
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for section, cls in SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - set(raw.get(section) or {})
        assert not missing, f"configs/demo.yaml lacks {section}.{sorted(missing)}"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_key_is_commented(path):
    """Each key line carries a comment saying what it does (and what it costs)."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # blank, comment, or a section header
        assert "#" in line, f"{path.name}:{number} has no comment: {line!r}"


@pytest.mark.parametrize(
    ("section", "values", "key", "fragment"),
    [
        ("distillation", {"alpha": 1.5}, "distillation.alpha", "must be in [0, 1]"),
        ("distillation", {"alpha": -0.1}, "distillation.alpha", "must be in [0, 1]"),
        ("distillation", {"temperature": 0}, "distillation.temperature", "must be > 0"),
        ("train", {"batch_size": 0}, "train.batch_size", ">= 1"),
        ("train", {"grad_accum": 0}, "train.grad_accum", ">= 1"),
        ("train", {"mixed_precision": "fp8"}, "train.mixed_precision", "'no', 'fp16', 'bf16'"),
        ("train", {"lr": "fast"}, "train.lr", "expected a finite number"),
        # YAML's .inf and .nan are floats that pass every `> 0` check: refused by type
        ("train", {"lr": float("inf")}, "train.lr", "inf is not valid; expected a finite number"),
        ("memory", {"vram_budget_gb": float("inf")}, "memory.vram_budget_gb", "expected a finite number"),
        ("distillation", {"alpha": float("nan")}, "distillation.alpha", "nan is not valid"),
        ("distillation", {"temperature": 10 ** 400}, "distillation.temperature", "expected a finite number"),
        ("train", {"batch_size": 2.5}, "train.batch_size", "expected an integer"),
        ("train", {"batch_size": True}, "train.batch_size", "expected an integer"),
        ("train", {"epochs": None, "max_steps": None}, "train.epochs", "max_steps"),
        ("teacher", {"dtype": "int8"}, "teacher.dtype", "'fp32', 'fp16', 'bf16'"),
        ("teacher", {"device": "tpu"}, "teacher.device", "'auto', 'cuda', 'cpu'"),
        ("memory", {"vram_budget_gb": 0}, "memory.vram_budget_gb", "> 0"),
        ("run", {"name": "a b/c"}, "run.name", "letters, digits"),
        ("data", {"modality": "video"}, "data.modality", "'audio', 'text', 'image'"),
        ("student", {"channels": [16, "x"]}, "student.channels", "a list of an integer"),
        ("telemetry", {"report_to": ["slack"]}, "telemetry.report_to", "'tensorboard'"),
        ("student", {"normalize": "global"}, "student.normalize", "'utterance', 'batch'"),
        ("student", {"pool": "max"}, "student.pool", "'time_max', 'avg'"),
        ("student", {"stem_stride": 3}, "student.stem_stride", "one of 1, 2"),
        ("student", {"stem_stride": True}, "student.stem_stride", "one of 1, 2"),
        ("augment", {"speed": 1.5}, "augment.speed", "must be in [0, 1)"),
        ("augment", {"noise_snr_db": [30, 10]}, "augment.noise_snr_db", "low <= high"),
        ("augment", {"noise_snr_db": [10]}, "augment.noise_snr_db", "[low, high]"),
        ("augment", {"noise_prob": 2}, "augment.noise_prob", "must be in [0, 1]"),
        ("augment", {"time_masks": -1}, "augment.time_masks", ">= 0"),
        ("augment", {"mixup_alpha": -0.2}, "augment.mixup_alpha", "0 turns it off"),
    ],
)
def test_bad_value_names_key_value_and_what_is_allowed(section, values, key, fragment):
    problems = problems_of(with_(section, **values))
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}:")
    assert fragment in problems[0]


def test_missing_teacher_when_distilling():
    problems = problems_of({"data": {"dataset": "x"}})
    assert problems == [p for p in problems if p.startswith("teacher.model:")] and "required" in problems[0]


def test_logmel_student_needs_audio():
    problems = problems_of(with_("data", modality="text"))
    assert any(p.startswith("student.type:") and "audio" in p for p in problems)


def test_augmentation_needs_audio():
    raw = with_("data", modality="text")
    raw["student"], raw["augment"] = {"type": "hf"}, {"enabled": True}
    problems = problems_of(raw)
    assert problems == ["augment.enabled: True is not allowed; waveform augmentation needs audio data, but "
                        "data.modality is 'text'"]


def test_unknown_keys_suggest_the_closest_name():
    problems = problems_of({**MINIMAL, "trian": {}, "distillation": {"temprature": 2}})
    assert "trian: unknown key; did you mean train?" in problems
    assert "distillation.temprature: unknown key; did you mean distillation.temperature?" in problems


def test_every_problem_is_reported_at_once():
    raw = with_("train", batch_size=0, lr="x")
    raw["distillation"] = {"alpha": 2, "temperature": -1, "bogus": 1}
    problems = problems_of(raw)
    keys = {p.split(":")[0] for p in problems}
    assert keys == {"train.batch_size", "train.lr", "distillation.alpha", "distillation.temperature",
                    "distillation.bogus"}
    message = str(ConfigError(problems))
    assert message.startswith("5 config errors")


def test_overrides_are_typed_and_validated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["train.batch_size=8", "distillation.alpha=0.7", "student.channels=[8, 16]",
                             "train.max_steps=3", "student.config_overrides.num_hidden_layers=2",
                             "train.mixed_precision=no"])  # YAML reads a bare `no` as false
    assert cfg.train.mixed_precision == "no"
    assert cfg.train.batch_size == 8 and cfg.distillation.alpha == 0.7 and cfg.student.channels == [8, 16]
    assert cfg.student.config_overrides == {"num_hidden_layers": 2}
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.batch_size=0", "train.bath_size=4", "nodot=1"])
    problems = info.value.problems
    assert any(p.startswith("override 'nodot=1'") and "e.g. train.batch_size=8" in p for p in problems)
    assert any(p.startswith("train.batch_size:") for p in problems)
    assert any(p.startswith("train.bath_size:") and "did you mean train.batch_size" in p for p in problems)


def test_override_errors_after_file_errors_are_all_reported(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.batch_size=0", "train.bath_size=4"])
    assert {p.split(":")[0] for p in info.value.problems} == {"train.batch_size", "train.bath_size"}


def test_yaml_python_tags_are_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in str(info.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(path)


def test_output_dir_defaults_to_runs_name():
    cfg = config_from_dict(with_("run", name="abc"))
    assert cfg.output_dir == Path("runs/abc")


REMOTE = {"data": {"dataset": "json", "data_dir": "x", "modality": "causal_lm", "max_length": 256},
          "student": {"type": "hf"},
          "teacher": {"model": "t", "endpoint": {"url": "http://127.0.0.1:8000/v1", "model": "m"}}}


@pytest.mark.parametrize(
    ("endpoint", "data", "key", "fragment"),
    [
        ({"url": "127.0.0.1:8000"}, {}, "teacher.endpoint.url", "with its scheme"),
        ({"top_k": 50}, {}, "teacher.endpoint.top_k", "at most 20"),
        ({"min_top_k": 30}, {}, "teacher.endpoint.min_top_k", "[1, top_k=20]"),
        ({"api_key_env": "sk-abc123"}, {}, "teacher.endpoint.api_key_env", "NAME of an environment variable"),
        ({"mode": "rewrite"}, {}, "teacher.endpoint.mode", "'score', 'generate'"),
        ({"api": "chat"}, {}, "teacher.endpoint.api", "'completions' in score mode"),
        ({"mode": "generate", "max_new_tokens": 255}, {}, "teacher.endpoint.max_new_tokens",
         "below data.max_length - 1"),
        ({"mode": "generate", "temperature": 3}, {}, "teacher.endpoint.temperature", "must be in [0, 2]"),
        ({"mode": "generate"}, {"packing": True}, "teacher.endpoint.mode", "data.packing: false"),
        ({"precision": "brain float 16"}, {}, "teacher.endpoint.precision", "e.g. bf16, fp32 or awq-int4"),
        ({"outage_wait_s": -5}, {}, "teacher.endpoint.outage_wait_s", "must be >= 0 seconds"),
    ],
)
def test_bad_remote_teacher_values_name_the_key(endpoint, data, key, fragment):
    raw = {"data": {**REMOTE["data"], **data}, "student": REMOTE["student"],
           "teacher": {"model": "t", "endpoint": {**REMOTE["teacher"]["endpoint"], **endpoint}}}
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{key}:") and fragment in problems[0], problems[0]


def test_the_readmes_configs_are_complete_and_valid():
    """The README's "distil your own teacher" configs, one per modality, validate as they are written."""
    import re

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    configs = [config_from_dict(yaml.safe_load(block)) for block in blocks]
    assert sorted(cfg.data.modality for cfg in configs) == ["audio", "causal_lm", "image", "text"]
    assert all(cfg.distillation.enabled and cfg.teacher.model for cfg in configs)


def test_demo_config_says_where_it_differs_from_the_kits_defaults():
    """configs/demo.yaml is the reference users copy: a value other than the code's default says so at
    the start of its comment ("[default: X]"), and one that is the default claims nothing."""
    import re

    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    section = subsection = None
    for line in (ROOT / "configs" / "demo.yaml").read_text().splitlines():
        if re.match(r"^[a-z_]+:", line):
            section = line.split(":")[0]
        key = re.match(r"^  ([a-z_0-9]+):", line)
        nested = re.match(r"^    ([a-z_0-9]+):", line)  # a key of a section inside a section
        if key:
            subsection = key.group(1)
        if nested and section in SECTIONS:
            value = raw[section][subsection][nested.group(1)]
            default = getattr(getattr(SECTIONS[section](), subsection), nested.group(1))
        elif not key or section not in SECTIONS or (section, key.group(1)) == ("teacher", "endpoint"):
            continue
        else:
            value, default = raw[section][key.group(1)], getattr(SECTIONS[section](), key.group(1))
            if dataclasses.is_dataclass(default):
                continue  # its keys are checked one by one
        comment = line.partition("# ")[2]
        if value == default:
            assert "[default:" not in comment, line
        else:
            shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
            assert comment.startswith(f"[default: {shown}] "), line


def test_the_modality_and_input_column_are_told_from_the_config_where_it_is_unambiguous():
    from kd.config import DataConfig

    assert (DataConfig(dataset="imagefolder").modality, DataConfig(dataset="imagefolder").input_column) == \
        ("image", "image")
    assert DataConfig(dataset="audiofolder").input_column == "audio"
    assert DataConfig(dataset="speech_commands").modality == "audio"
    csv = DataConfig(dataset="csv")
    assert (csv.modality, csv.input_column) == (None, None)  # told later, by the models
    assert DataConfig(dataset="csv", modality="text").input_column == "text"
    remote = config_from_dict({**REMOTE, "data": {"dataset": "json", "data_dir": "x"}})
    assert (remote.data.modality, remote.data.input_column) == ("causal_lm", "text")
    assert config_from_dict({"data": {"dataset": "json", "data_dir": "x"}, "teacher": {"model": "t"},
                             "student": {"type": "hf"}, "distillation": {"divergence": "jsd"}}).data.modality == \
        "causal_lm"
    # An explicit modality that contradicts what else the config says is still an error.
    assert any("logmel_cnn takes audio" in p for p in problems_of(with_("data", modality="text")))


def test_a_modality_nothing_tells_is_one_error_naming_the_key():
    from kd.build import settle_modality

    cfg = config_from_dict({"data": {"dataset": "csv", "data_files": "x.csv"}, "distillation": {"enabled": False}})
    assert cfg.data.modality is None
    with pytest.raises(ConfigError, match=r"data.modality: not set, and data.dataset \('csv'\) does not tell it, and "
                                          r"no model is named; set data.modality: audio, text, image or causal_lm"):
        settle_modality(cfg, print)

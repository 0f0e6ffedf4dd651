"""Config loading and validation: no model, no GPU."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import save_file

import train_qlora_qwen3vl as tq
from curriculum import config
from curriculum.adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from curriculum.config import StageConfig, load_config
from curriculum.errors import ConfigError
from curriculum.stage_folder import STAGE_METRICS
from curriculum.typed_yaml import apply_overrides, parse_args


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


MINIMAL = "output_dir: {out}\ntrain_file: {train}\nbatch_size: 2\n"  # a number: batch_size: auto needs a GPU


@pytest.fixture
def minimal(tmp_path):
    return MINIMAL.format(out=tmp_path / "out", train=REPO / "data/stage1/train.jsonl")


@pytest.mark.parametrize("path", sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml")
                                         if p.parent.name != "accelerate"))
def test_every_shipped_config_loads(path):
    cfg = load_config(REPO / path)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert cfg.quantization.quant_type == "nf4"
    assert (cfg.stage == 1) == (cfg.prev_checkpoint is None)


@pytest.mark.parametrize("name, kind, processes", [("single_gpu", "NO", 1), ("ddp", "MULTI_GPU", 2),
                                                   ("fsdp_qlora", "FSDP", 2)])
def test_shipped_accelerate_configs_load_in_accelerate(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / f"configs/accelerate/{name}.yaml"))
    assert config.distributed_type.name == kind and config.num_processes == processes
    assert config.mixed_precision == "no"  # the trainer sets bf16 itself; accelerate's would wrap the model twice
    if kind == "FSDP":  # the settings FSDP-QLoRA needs: one dtype per flat parameter, the adapter saved whole
        assert config.fsdp_config["fsdp_use_orig_params"] is False
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_exp4_learning_rates_fall_by_stage():
    lrs = [load_config(REPO / f"configs/exp4_stage{s}.yaml").lr for s in (1, 2, 3)]
    assert lrs == [5e-5, 3.5e-5, 2.5e-5]


def test_defaults(tmp_path, minimal):
    cfg = load_config(write(tmp_path, minimal))
    assert cfg.model_name_or_path == "Qwen/Qwen3-VL-8B-Instruct"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 8, 0.05)
    assert cfg.quantization.double_quant and cfg.quantization.compute_dtype == "bfloat16"
    assert cfg.optimizer_state == "fresh"


def test_unknown_key_names_the_closest(tmp_path, minimal):
    with pytest.raises(ConfigError, match=r"unknown key 'eval_step' \(did you mean 'eval_steps'\?\)"):
        load_config(write(tmp_path, minimal + "eval_step: 1\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'lora.size' \(valid keys: r, alpha, dropout"):
        load_config(write(tmp_path, minimal + "lora:\n  size: 8\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'lora.alhpa' \(did you mean 'alpha'\?\)"):
        load_config(write(tmp_path, minimal + "lora:\n  alhpa: 8\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'max_pixel' \(did you mean 'max_pixels'\?\)"):
        load_config(write(tmp_path, minimal + "max_pixel: 100\n"))


def test_other_tools_names_are_answered_with_this_tools_name(tmp_path, minimal):
    """Users arrive with Hugging Face's names; the nearest spelling (`learning_rate` -> 'logging_steps') misleads."""
    hf_names = ("learning_rate: 1e-3\nnum_train_epochs: 2\nper_device_train_batch_size: 4\n"
                "gradient_accumulation_steps: 2\nlora_r: 8\nlora_alpha: 16\nlora:\n  lora_dropout: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, minimal + hf_names))
    text = str(err.value)
    for theirs, ours in (("learning_rate", "lr"), ("num_train_epochs", "epochs"),
                         ("per_device_train_batch_size", "batch_size"), ("gradient_accumulation_steps", "grad_accum"),
                         ("lora_r", "lora.r"), ("lora_alpha", "lora.alpha"), ("lora.lora_dropout", "lora.dropout")):
        assert f"unknown key '{theirs}': this tool calls it '{ours}'" in text
    assert "did you mean" not in text


def test_a_problem_given_with_set_is_reported_as_the_command_lines(tmp_path, minimal):
    path = write(tmp_path, minimal + "eval_step: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["max_step=5", "lr=abc", "lora.r=8"])
    assert str(err.value).splitlines() == [
        f"{path}:", "  - unknown key 'eval_step' (did you mean 'eval_steps'?)",
        "the command line:", "  - --set max_step=5: unknown key 'max_step' (did you mean 'max_steps'?)",
        "  - --set lr=abc: expected float, got str 'abc'"]
    with pytest.raises(ConfigError) as err:  # a whole section given on the command line
        load_config(write(tmp_path, minimal), ["lora={r: x}"])
    assert str(err.value).splitlines() == ["the command line:", "  - --set lora={r: x}: expected int, got str 'x'"]


def test_wrong_types_are_named(tmp_path, minimal):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, minimal + "lr: fast\nbatch_size: 2.5\nquantization:\n  quant_type: int8\n"))
    text = str(err.value)
    assert "lr: expected float, got str 'fast'" in text
    assert "batch_size: expected int" in text
    assert "quantization.quant_type: 'int8' is not one of 'nf4', 'fp4'" in text


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'train_file'"):
        load_config(write(tmp_path, "output_dir: x\n"))


def test_yaml_syntax_error_names_file_and_line(tmp_path, minimal):
    path = write(tmp_path, minimal + "lora:\n  r: 4\n bad_indent: [\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+:\d+: YAML syntax error"):
        load_config(path)


def test_yaml_is_loaded_safely(tmp_path, minimal):
    path = write(tmp_path, minimal + "lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(path)


def test_overrides_apply_typed_values(tmp_path, minimal):
    assert load_config(write(tmp_path, minimal + "lr: 2e-5\n")).lr == 2e-5  # YAML 1.1 reads 2e-5 as a string
    cfg = load_config(write(tmp_path, minimal), ["lr=1e-4", "lora.r=8", "eval_file=null", "stage=2"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.lora.r == 8 and cfg.lora.alpha == 8
    assert cfg.eval_file is None and cfg.stage == 2
    with pytest.raises(ConfigError, match="unknown key 'lora.rr'"):
        load_config(write(tmp_path, minimal), ["lora.rr=8"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides({}, ["lr"])


def test_parse_args_rejects_other_flags():
    assert parse_args(["c.yaml", "--set", "lr=1", "--set=lora.r=2", "--check"]) == ("c.yaml", ["lr=1", "lora.r=2"],
                                                                                        True)
    with pytest.raises(ConfigError, match="unexpected argument '--lr'"):
        parse_args(["c.yaml", "--lr", "1"])
    with pytest.raises(ConfigError, match="usage"):
        parse_args([])


def test_validate_reports_every_problem_at_once(tmp_path):
    cfg = load_config(write(tmp_path, "output_dir: o\ntrain_file: missing.jsonl\nlr: 0\nlora:\n  r: 0\n"
                                         "stage: 2\nmin_pixels: 10\nmax_pixels: 5\n"))
    with pytest.raises(ConfigError) as err:
        tq.validate_config(cfg)
    text = str(err.value)
    for expected in ("lr must be > 0", "lora.r must be > 0", "train_file: file not found: missing.jsonl",
                     "stage 2 needs prev_checkpoint", "min_pixels (10) must not exceed max_pixels (5)"):
        assert expected in text


def test_batch_size_auto_is_a_problem_for_training_without_a_gpu_and_a_note_for_check(tmp_path, minimal, monkeypatch,
                                                                                      capsys):
    """Both sides of the GPU question, whichever machine runs the test: gpu_available where config looks it up."""
    cfg = load_config(write(tmp_path, minimal), ["batch_size=auto"])
    no_gpu = ("batch_size: auto measures GPU memory to choose the batch, and there is no GPU here; set batch_size to a "
              "number")
    monkeypatch.setattr(config, "gpu_available", lambda: False)
    with pytest.raises(ConfigError, match=re.escape(no_gpu)):
        tq.validate_config(cfg)
    tq.validate_config(cfg, training=False)  # --check: the data can be checked without a GPU
    assert f"Note: {no_gpu} to train on this machine" in capsys.readouterr().out
    monkeypatch.setattr(config, "gpu_available", lambda: True)
    tq.validate_config(cfg)
    tq.validate_config(cfg, training=False)
    assert "batch_size: auto" not in capsys.readouterr().out


def fake_adapter(path: Path, r=4, alpha=8, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps({"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
                                                   "target_modules": list(targets)}))
    # tensors that fit the config (validate_config holds the two against each other), one layer's worth
    tensors = {f"base_model.model.model.language_model.layers.0.self_attn.{t}.{part}.weight": np.zeros(shape, "float32")
               for t in targets for part, shape in (("lora_A", (r, 8)), ("lora_B", (8, r)))}
    save_file(tensors, str(path / ADAPTER_WEIGHTS))
    return path


def stage2_config(tmp_path, prev: Path, extra: str = "") -> StageConfig:
    text = MINIMAL.format(out=tmp_path / "stage2", train=REPO / "data/stage2/train.jsonl")
    return load_config(write(tmp_path, text + f"stage: 2\nprev_checkpoint: {prev}\n" + extra))


def test_prev_checkpoint_with_other_lora_config_is_refused(tmp_path):
    prev = fake_adapter(tmp_path / "stage1", r=8, targets=("q_proj", "v_proj"))
    with pytest.raises(ConfigError) as err:
        tq.validate_config(stage2_config(tmp_path, prev))
    assert "lora.r: the YAML says 4, the saved adapter has 8" in str(err.value)
    assert "lora.target_modules" in str(err.value)


def test_prev_checkpoint_whose_config_does_not_fit_its_tensors_is_refused(tmp_path):
    prev = fake_adapter(tmp_path / "stage1", r=4)
    (prev / ADAPTER_CONFIG).write_text(json.dumps({"r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                                                   "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}))
    cfg = stage2_config(tmp_path, prev, "lora:\n  r: 8\n  alpha: 16\n")  # the YAML agrees with the edited config
    with pytest.raises(ConfigError, match=f"prev_checkpoint: {prev}: adapter_config.json says r=8, the tensors "
                                             "have rank 4"):
        tq.validate_config(cfg)
    (prev / ADAPTER_CONFIG).write_text('{"r": 8,')
    with pytest.raises(ConfigError, match=f"prev_checkpoint: {prev}: adapter_config.json is not valid JSON"):
        tq.validate_config(cfg)


def test_prev_checkpoint_with_matching_config_passes(tmp_path):
    tq.validate_config(stage2_config(tmp_path, fake_adapter(tmp_path / "stage1")))


def test_prev_checkpoint_with_two_adapters_is_refused(tmp_path):
    prev = fake_adapter(tmp_path / "stage1")
    fake_adapter(prev / "second")
    with pytest.raises(ConfigError, match="more than one adapter"):
        tq.validate_config(stage2_config(tmp_path, prev))


def test_prev_checkpoint_problems(tmp_path):
    with pytest.raises(ConfigError, match="directory not found"):
        tq.validate_config(stage2_config(tmp_path, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no LoRA adapter"):
        tq.validate_config(stage2_config(tmp_path, tmp_path / "empty"))
    same = fake_adapter(tmp_path / "stage2")
    with pytest.raises(ConfigError, match="output_dir must differ from prev_checkpoint"):
        tq.validate_config(stage2_config(tmp_path, same))
    with pytest.raises(ConfigError, match="has no optimizer_moments.safetensors"):
        tq.validate_config(stage2_config(tmp_path, fake_adapter(tmp_path / "s1"), "optimizer_state: resume\n"))


def test_stage1_with_prev_checkpoint_is_refused(tmp_path, minimal):
    cfg = load_config(write(tmp_path, minimal + f"prev_checkpoint: {fake_adapter(tmp_path / 'a')}\n"))
    with pytest.raises(ConfigError, match="stage 1 makes a new adapter.*continue_at_stage_1: true"):
        tq.validate_config(cfg)
    cfg.continue_at_stage_1 = True  # forced: accepted (test_curriculum checks it then continues that adapter)
    tq.validate_config(cfg)


def test_finished_stage_is_not_overwritten(tmp_path, minimal):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / STAGE_METRICS).write_text("{}")
    cfg = load_config(write(tmp_path, minimal))
    with pytest.raises(ConfigError, match="already holds a finished stage"):
        tq.validate_config(cfg)
    cfg.overwrite = True
    tq.validate_config(cfg)


def test_main_prints_config_errors_without_traceback(tmp_path, minimal, capsys):
    assert tq.main([str(write(tmp_path, minimal + "lr: -1\n"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config problems:") and "lr must be > 0" in err
    assert "Traceback" not in err


def checkpoint_with_custom_code(tmp_path, tiny_model_path, model_type=None) -> Path:
    """The tiny model, plus an `auto_map` to Python code that leaves a mark when it runs."""
    import shutil

    d = tmp_path / "custom"
    shutil.copytree(tiny_model_path, d)
    config = json.loads((d / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_code.Cfg", "AutoModelForImageTextToText": "custom_code.Model"}
    config["model_type"] = model_type or config["model_type"]
    (d / "config.json").write_text(json.dumps(config))
    (d / "custom_code.py").write_text(f"open({str(d / 'RAN')!r}, 'w').close()\n"
                                      "from transformers import Qwen3VLConfig as Cfg\n"
                                      "from transformers import Qwen3VLForConditionalGeneration as Model\n")
    return d


def test_model_code_runs_only_with_trust_remote_code(tmp_path, tiny_model_path):
    d = checkpoint_with_custom_code(tmp_path, tiny_model_path)
    cfg = StageConfig(output_dir="o", train_file="t", model_name_or_path=str(d))
    assert cfg.trust_remote_code is False
    tq.load_quantized_base(str(d), cfg)  # a known model type: the built-in class, the shipped code ignored
    assert not (d / "RAN").exists()
    cfg.trust_remote_code = True
    tq.load_quantized_base(str(d), cfg)
    assert (d / "RAN").exists()  # the key is what decides


def test_checkpoint_that_needs_its_code_is_a_config_error(tmp_path, tiny_model_path):
    d = checkpoint_with_custom_code(tmp_path, tiny_model_path, model_type="someone_elses_vl")
    cfg = StageConfig(output_dir="o", train_file="t", model_name_or_path=str(d))
    with pytest.raises(ConfigError, match="ships its own Python code, which is not run unless trust_remote_code"):
        tq.load_quantized_base(str(d), cfg)
    assert not (d / "RAN").exists()


def test_streamed_layers_is_a_share_or_the_plan_s(tmp_path, minimal):
    from curriculum.config import checkpointing_problems, effective_batch_problems, fsdp_problems

    def config(**keys):
        return StageConfig(output_dir="o", train_file="t", **keys)

    assert checkpointing_problems(config(streamed_layers=0.5)) == []
    assert checkpointing_problems(config(streamed_layers=1.5)) == ["streamed_layers must be in [0, 1], got 1.5"]
    assert effective_batch_problems(config(effective_batch=8, streamed_layers="auto"), 1) == []
    assert checkpointing_problems(config(effective_batch=8, streamed_layers="auto")) == []
    assert effective_batch_problems(config(effective_batch=8, streamed_layers=0.5), 1) == [
        "streamed_layers: 0.5 is chosen by the plan when effective_batch is set; use auto (the plan tries streamed "
        "layers) or 0"]
    assert effective_batch_problems(config(streamed_layers="auto"), 1) == [
        "streamed_layers: auto is tried by the plan of effective_batch, which is not set; set effective_batch, or "
        "streamed_layers to a share in [0, 1]"]
    for streamed in (0.5, "auto"):
        assert [p for p in fsdp_problems(config(effective_batch=8, streamed_layers=streamed), fsdp=True)
                if p.startswith("streamed_layers: not tried under FSDP")]
    assert effective_batch_problems(config(effective_batch=8), 1) == []
    assert load_config(write(tmp_path, minimal + "streamed_layers: auto\n")).streamed_layers == "auto"
    assert load_config(write(tmp_path, minimal + "streamed_layers: 0.25\n")).streamed_layers == 0.25

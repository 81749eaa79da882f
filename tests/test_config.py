"""Recipe configs refuse values that would train wrongly or fail late, naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtaffect.train.config import ConfigError, load_config

EMOTINET = Path(__file__).resolve().parents[1] / "configs" / "emotinet.yaml"


def _config(tmp_path: Path, old: str, new: str) -> Path:
    text = EMOTINET.read_text()
    assert old in text
    path = tmp_path / "c.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("epochs: 20", "epochs: true", r"trainer.epochs must be a number, got True"),
        ("epochs: 20", "epochs: 1.0e+20", r"trainer.epochs must be an integer"),
        ("epochs: 20", "epochs: 100000000000000000000", r"trainer.epochs must be in 1..100000"),
        ("patience: 5", "patience: yes", r"trainer.patience must be a number"),
        ("batch_size: 1024", "batch_size: 1024\n  memory_limit_gb: -2", r"data.memory_limit_gb must be >= 0"),
        (
            "weights: {au: 1.0, expr: 1.0, va: 1.0}",
            "weights: {au: 0, expr: 0.0, va: 0}",
            r"loss.weights are all 0",
        ),
        (
            "weights: {au: 1.0, expr: 1.0, va: 1.0}",
            "weights: {au: -1, expr: 1, va: 1}",
            r"loss.weights.au must",
        ),
        ("au_hidden: 128", "au_hidden: -5", r"model.hparams.au_hidden must be >= 0"),
        ("dropout: 0.0", "dropout: 1.5", r"model.hparams.dropout is a dropout rate"),
        ("accelerator: auto", "accelerator: tpu", r"trainer.accelerator must be one of auto, cpu, gpu"),
        ("devices: 1", "devices: 0", r"trainer.devices must be a count >= 1"),
        ("seed: 0", "seed: -1", r"trainer.seed must be in 0..4294967295"),
        ("lr: 0.003", "lr: .inf", r"optim.lr must be a finite number"),
    ],
)
def test_lax_values_are_refused_naming_file_and_key(tmp_path, old, new, message):
    path = _config(tmp_path, old, new)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_config(path)


def test_good_values_still_load(tmp_path):
    cfg = load_config(_config(tmp_path, "devices: 1", "devices: '0,1'"))
    assert cfg.trainer.devices == "0,1"
    cfg = load_config(EMOTINET, ["trainer.devices=-1", "loss.weights.au=0", "trainer.accelerator=cpu"])
    assert cfg.trainer.devices == -1 and cfg.loss.weights["au"] == 0


def test_a_binary_file_is_named(tmp_path):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ConfigError, match=rf"^{path}:\d+: a binary file .*expected a recipe config"):
        load_config(path)
    path.write_bytes(b"model: {recipe: emotinet}\ntrainer: {epochs: \xff}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: not UTF-8 text"):
        load_config(path)


@pytest.mark.parametrize("top", ["- emotinet\n- 3\n", "just a word\n", "42\n"])
def test_overrides_on_a_file_that_is_not_a_mapping(tmp_path, top):
    path = tmp_path / "c.yaml"
    path.write_text(top)
    with pytest.raises(ConfigError, match=rf"^{path}: a recipe config is a mapping of sections"):
        load_config(path, ["trainer.epochs=2"])


def test_override_into_a_scalar_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {recipe: emotinet}\ntrainer: 5\n")
    with pytest.raises(ConfigError, match=r"trainer is 5, not a mapping"):
        load_config(path, ["trainer.epochs=2"])


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  recipe: emotinet\ntrainer: {epochs: [1, 2}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: not valid YAML"):
        load_config(path)


PUBLISHED = EMOTINET.parent / "progressive_published.yaml"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.tasks=[au, arousal]"], r"trainer.tasks must list distinct tasks"),
        (["trainer.tasks=[]"], r"trainer.tasks is empty"),
        (["trainer.select=[au, au]"], r"trainer.select must list distinct tasks"),
        (["loss.va_weights={valence: -1}"], r"loss.va_weights maps valence"),
        (["data.window_edge=wrap"], r"data.window_edge must be one of pad, shift"),
        (["pipeline.combine.au=nothing"], r"pipeline.combine.au names 'nothing'"),
        (["pipeline.enhanced.au.model.hparams.variant=frozen"], r"pipeline.enhanced.au: an enhanced model"),
        (["pipeline.task_models={au: {}}"], r"enhanced.au: fuses the features of task model\(s\) \['expr'"),
        (["pipeline.enhanced.va.data.window=0"], r"enhanced.va: data.window and data.stride must be >= 1"),
        (["pipeline.export.threads=4"], r"unknown key\(s\) \['threads'\] in pipeline.export"),
        (["optim.schedule=linear"], r"optim.schedule must be one of cosine, constant, warmup_constant, got"),
        (["optim.decay_all=maybe"], r"optim.decay_all must be true or false"),
        (["trainer.checkpoint_per_task=1"], r"trainer.checkpoint_per_task must be true or false"),
        (["augment.per_frame=yes please"], r"augment.per_frame must be true or false"),
        (["trainer.select=[au, dominance]"], r"trainer.select must list distinct tasks among .*, arousal"),
        (["trainer.tasks=[valence]"], r"trainer.tasks must list distinct tasks among au, expr, va, got"),
        (["optim.shedule=constant"], r"unknown key 'shedule' in section 'optim'; valid keys: .*'schedule'"),
        (["trainer.checkpoint_per_task=true"], r"checkpoint_per_task applies to one training, not a pipe"),
        (["pipeline.enhanced.va.trainer.checkpoint_per_task=true"], r"enhanced.va: .*checkpoint_per_task"),
    ],
)
def test_the_published_pipeline_config_is_checked_step_by_step(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PUBLISHED, overrides)


def test_the_published_pipeline_config_sets_the_published_values():
    from mtaffect.train.config import combine_map, pipeline_configs

    cfg = load_config(PUBLISHED, ["pipeline.enhanced.va.data.window=12"])  # a step is overridden in depth
    steps = pipeline_configs(cfg)
    assert set(steps) == {"task_au", "task_expr", "task_va", "enhanced_au", "enhanced_expr", "enhanced_va",
                          "enhanced_all"}  # fmt: skip
    for s in steps.values():
        assert s.optim.lr == s.backbone.lr == 1e-5 and s.optim.weight_decay == s.backbone.weight_decay == 0.05
        assert not s.loss.expr_class_weights and not s.loss.au_pos_weight and s.augment.preset == "liu2024"
        assert s.backbone.mode == "finetune" and s.model.hparams["variant"] == "published"
    task = steps["task_expr"]
    assert task.trainer.tasks == ["expr"] and task.model.hparams["fusion_tasks"] == []
    expr, va = steps["enhanced_expr"], steps["enhanced_va"]
    assert expr.data.window == 5 and expr.loss.weights == {"au": 1.0, "expr": 1.0, "va": 1.0}
    assert expr.loss.va_weights == {"valence": 1.0, "arousal": 0.0}
    assert expr.trainer.select == ["au", "expr", "valence"]
    assert va.data.window == 12 and va.model.hparams["temporal"] == "lstm" and va.trainer.tasks == ["va"]
    au = steps["enhanced_au"]
    assert au.model.hparams["temporal"] == "none" and au.trainer.tasks == ["au", "va"]
    assert combine_map(cfg) == {"au": "au", "expr": "expr", "va": "va"}
    import yaml

    from mtaffect.train.config import config_from_dict

    raw = yaml.safe_load(PUBLISHED.read_text())
    raw.pop("backbone")
    raw.pop("augment")
    with pytest.raises(ConfigError, match="a pipeline fine-tunes task models from images"):
        config_from_dict(raw)

"""Recipe configs refuse values that would train wrongly or fail late, naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mtaffect.train.config import ConfigError, load_config

EMOTINET = Path(__file__).resolve().parents[1] / "configs" / "emotinet.yaml"


def _config(tmp_path: Path, key: str, value: str) -> Path:
    """emotinet.yaml with ``key`` (``section.key``, ``model.hparams.name``) set to ``value`` (YAML text)."""
    raw = yaml.safe_load(EMOTINET.read_text())
    *parents, last = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("trainer.epochs", "true", r"trainer.epochs must be an integer, got True"),
        ("trainer.epochs", "1.0e+20", r"trainer.epochs must be an integer"),
        ("trainer.epochs", "100000000000000000000", r"trainer.epochs must be in 1..100000"),
        ("trainer.patience", "yes", r"trainer.patience must be an integer, got True"),
        ("data.memory_limit_gb", "-2", r"data.memory_limit_gb must be >= 0"),
        ("loss.weights", "{au: 0, expr: 0.0, va: 0}", r"loss.weights are all 0"),
        ("loss.weights", "{au: -1, expr: 1, va: 1}", r"loss.weights.au must be >= 0, got -1"),
        (
            "loss.weights",
            "{valence: 1}",
            r"loss.weights has unknown key\(s\) \['valence'\]; valid keys: au, expr, va",
        ),
        ("model.hparams.au_hidden", "-5", r"model.hparams.au_hidden must be >= 0"),
        ("model.hparams.dropout", "1.5", r"model.hparams.dropout is a dropout rate"),
        (
            "trainer.accelerator",
            "tpu",
            r"trainer.accelerator must be one of auto, cpu, gpu, cuda, mps, got 'tpu'",
        ),
        ("trainer.devices", "0", r"trainer.devices must be a count >= 1"),
        ("trainer.seed", "-1", r"trainer.seed must be in 0..4294967295"),
        ("optim.lr", ".inf", r"optim.lr must be a finite number"),
        # the messages list every value the field accepts (they are generated from the same declaration)
        (
            "trainer.precision",
            "64",
            r"trainer.precision must be one of auto, 32-true, 32, bf16-mixed, 16-mixed, got 64",
        ),
        (
            "trainer.strategy",
            "fsdp",
            r"trainer.strategy must be one of auto, ddp, ddp_spawn, ddp_find_unused_pa",
        ),
        ("data.in_memory", "1", r"data.in_memory must be one of auto, true, false, got 1"),
        ("stages.expr", "{epochs: 0}", r"stages.expr.epochs must be in 1..100000, got 0"),
        (
            "stages.expr",
            "{epoch: 2}",
            r"unknown key\(s\) \['epoch'\] in stages.expr; valid keys: .*did you mean 'epoch' -> 'epochs'",
        ),
        (
            "optim.shedule",
            "constant",
            r"unknown key\(s\) \['shedule'\] in section 'optim'; .*did you mean 'shedule' -> 'schedule'",
        ),
        (
            "trainers.epochs",
            "3",
            r"unknown key\(s\) \['trainers'\] in the config; valid sections: .*"
            r"did you mean 'trainers' -> 'trainer'",
        ),
        (
            "backbone.kwargs",
            "{pooling: mean}",
            r"unknown key\(s\) \['kwargs'\] in section 'backbone'; .*'kwargs' was renamed to 'options'",
        ),
        (
            "pipeline.task_model",
            "{}",
            r"unknown key.*in section 'pipeline'; .*'task_model' was renamed to 'task_defaults'",
        ),
        ("trainer", "5", r"section 'trainer' must be a mapping, got int"),
    ],
)
def test_lax_values_are_refused_naming_file_and_key(tmp_path, key, value, message):
    path = _config(tmp_path, key, value)
    with pytest.raises(ConfigError, match=rf"^{path}: {message}"):
        load_config(path)


def test_good_values_still_load(tmp_path):
    cfg = load_config(_config(tmp_path, "trainer.devices", "'0,1'"))
    assert cfg.trainer.devices == "0,1"
    cfg = load_config(EMOTINET, ["trainer.devices=-1", "loss.weights.au=0", "trainer.accelerator=cpu"])
    assert cfg.trainer.devices == -1 and cfg.loss.weights == {"au": 0, "expr": 1.0, "va": 1.0}
    cfg = load_config(_config(tmp_path, "optim.lr", "'1e-3'"))  # YAML 1.1 reads 1e-3 as a string
    assert cfg.optim.lr == 0.001 and cfg.stage("expr").epochs is None


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
        (["loss.va_weights={valence: -1}"], r"loss.va_weights.valence must be >= 0, got -1"),
        (["data.window_edge=wrap"], r"data.window_edge must be one of pad, shift"),
        (["pipeline.combine.au=nothing"], r"pipeline.combine.au names 'nothing'"),
        (["pipeline.enhanced.au.model.hparams.variant=frozen"], r"pipeline.enhanced.au: an enhanced model"),
        (["pipeline.task_models={au: {}}"], r"enhanced.au: fuses the features of task model\(s\) \['expr'"),
        (["pipeline.enhanced.va.data.window=0"], r"enhanced.va: data.window must be >= 1, got 0"),
        (["pipeline.export.threads=4"], r"pipeline.export has unknown key\(s\) \['threads'\]; valid"),
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
    from mtaffect.train.pipeline_steps import check_pipeline

    with pytest.raises(ConfigError, match=message):
        check_pipeline(load_config(PUBLISHED, overrides))


def test_the_published_pipeline_config_sets_the_published_values():
    from mtaffect.train.pipeline_steps import combine_map, pipeline_configs

    cfg = load_config(PUBLISHED, ["pipeline.enhanced.va.data.window=12"])  # a step is overridden in depth
    steps = pipeline_configs(cfg)
    assert set(steps) == {
        "task_au",
        "task_expr",
        "task_va",
        "enhanced_au",
        "enhanced_expr",
        "enhanced_va",
        "enhanced_all",
    }
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
    from mtaffect.train.pipeline_steps import pipeline_configs

    with pytest.raises(ConfigError, match="a pipeline fine-tunes task models from images"):
        pipeline_configs(config_from_dict(raw))


CONFIGS = sorted(EMOTINET.parent.glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_to_dict_round_trips_every_setting(path):
    """A run's config.yaml (``to_dict``) rebuilds the same config, defaults included, and so does every
    pipeline step's; the YAML text round-trips too (what --resume compares)."""
    from mtaffect.train.config import config_from_dict
    from mtaffect.train.pipeline_steps import pipeline_configs

    cfg = load_config(path)
    saved = yaml.safe_load(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    assert config_from_dict(saved, cfg.source) == cfg
    assert list(saved) == [
        "model",
        "data",
        "optim",
        "loss",
        "trainer",
        "stages",
        "search",
        "backbone",
        "augment",
        "pipeline",
    ]
    assert saved["trainer"]["tasks"] == ["au", "expr", "va"] and "window_edge" in saved["data"]
    for step in pipeline_configs(cfg).values() if cfg.pipeline.enabled else ():
        assert config_from_dict(step.to_dict(), step.source) == step


@pytest.mark.parametrize("path", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_shipped_configs_list_only_what_differs_from_the_defaults(path):
    from mtaffect.train.config import TrainConfig

    defaults = TrainConfig().to_dict()
    raw = yaml.safe_load(path.read_text())
    same = [
        f"{section}.{key}"
        for section, values in raw.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if defaults.get(section, {}).get(key, object()) == value
    ]
    assert same == []


def test_assigning_a_bad_value_in_code_is_refused():
    cfg = load_config(EMOTINET)
    with pytest.raises(ValueError, match="must be >= 1"):
        cfg.data.batch_size = 0
    copy = cfg.copy()
    copy.model.hparams["dropout"] = 0.2
    assert "dropout" not in cfg.model.hparams  # a deep copy


def test_the_docs_schema_table_is_generated_from_the_schema():
    """docs/formats.md shows exactly the table the models generate (scripts/gen_config_docs.py)."""
    from mtaffect.train.config import schema_table

    text = (EMOTINET.parents[1] / "docs" / "formats.md").read_text()
    start = "<!-- config-schema:start (generated by scripts/gen_config_docs.py; do not edit) -->\n"
    block = text.split(start, 1)[1].split("<!-- config-schema:end -->", 1)[0]
    assert block == schema_table(), "run: python scripts/gen_config_docs.py"
    precision = "| `trainer.precision` | choice | `auto` | auto \\| 32-true \\| 32 \\| bf16-mixed \\| 16"
    assert precision in block

"""Config loading: strict keys, types and ranges, overrides, presets."""

from __future__ import annotations

from pathlib import Path

import pytest

from knet.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", [ROOT / "params.yaml", *PRESETS], ids=lambda p: p.name)
def test_shipped_params_files_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg  # round trip through plain data


def test_presets_exist_for_the_three_tasks():
    tasks = {load_config(p).model.task for p in PRESETS}
    assert tasks == {"panoptic", "instance", "semantic"}


def test_coco_panoptic_preset_has_the_papers_values():
    cfg = load_config(ROOT / "configs/coco-panoptic-r50.yaml")
    m = cfg.model
    assert (m.backbone.depth, m.channels, m.num_kernels, m.num_stages) == (50, 256, 100, 3)
    assert (m.num_heads, m.ffn_channels, m.num_groups, m.kernel_init_std) == (8, 2048, 32, 1.0)
    assert (m.backbone.frozen_stages, m.backbone.norm_eval) == (1, True)
    p = m.postprocess
    # max_per_image unset = one result per thing kernel (100), as the official test_cfg
    assert (p.max_per_image, p.instance_score_threshold, p.overlap_threshold) == (None, 0.3, 0.6)
    assert (m.kernel_updater, m.kernel_interaction, m.positional_encoding) == (
        "adaptive",
        True,
        "sine",
    )
    o = cfg.optim
    assert (o.lr, o.weight_decay, o.backbone_lr_mult, o.clip_grad_norm) == (1e-4, 0.05, 0.25, 1.0)
    assert (o.warmup_iters, o.lr_steps, cfg.train.epochs) == (1000, (8, 11), 12)
    loss = cfg.loss
    assert (loss.cls_weight, loss.mask_weight, loss.dice_weight, loss.rank_weight) == (
        2.0,
        1.0,
        4.0,
        0.1,
    )


def test_unknown_key_names_the_dotted_path_and_suggests(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model:\n  num_stagse: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "model.num_stagse is not a known key; did you mean model.num_stages?" in message
    assert str(path) in message


def test_unknown_nested_and_section_keys():
    with pytest.raises(
        ConfigError,
        match=r"model\.backbone\.dept is not a known key; did you mean "
        r"model\.backbone\.depth\?",
    ):
        load_config(None, ["model.backbone.dept=50"])
    with pytest.raises(ConfigError, match="modle is not a known key; did you mean model"):
        load_config(None, ["modle.num_stages=2"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.num_stages=three", r"model\.num_stages must be int, got str"),
        ("model.num_stages=2.5", r"model\.num_stages must be int, got float"),
        ("model.num_stages=true", r"model\.num_stages must be int, got bool"),
        ("model.normalize_group_features=1", r"model\.normalize_group_features must be bool"),
        ("model.task=depth", r"model\.task must be one of panoptic, instance, semantic"),
        ("model.num_kernels=0", r"model\.num_kernels must be between 1 and 300"),
        ("model.num_kernels=301", r"model\.num_kernels must be between 1 and 300"),
        ("model.num_stages=7", r"model\.num_stages must be between 1 and 6"),
        ("model.backbone.depth=152", r"model\.backbone\.depth must be one of 18, 34, 50, 101"),
        ("data.min_size=[96,abc]", r"data\.min_size\[1\] must be int"),
        ("model.backbone=3", r"model\.backbone must be a mapping"),
        ("data.synth.thing_colors=grey", r"data\.synth\.thing_colors must be one of class"),
        # Every number is bounded and finite (issue 18): these ran silently before.
        ("optim.weight_decay=-0.05", r"optim\.weight_decay must be between 0\.0 and 10\.0"),
        ("loss.cls_weight=.nan", r"loss\.cls_weight must be a finite number"),
        ("loss.dice_weight=-4", r"loss\.dice_weight must be between 0\.0 and 1000\.0"),
        ("optim.lr=.inf", r"optim\.lr must be a finite number"),
        ("optim.lr=nan", r"optim\.lr must be a finite number"),
        ("data.test_size=0", r"data\.test_size must be between 16 and 100000"),
        ("data.min_size=[0]", r"data\.min_size\[0\] must be between 16 and 100000"),
        ("optim.lr_gamma=2", r"optim\.lr_gamma must be between 0\.0 and 1\.0"),
        ("train.seed=-1", r"train\.seed must be between 0 and"),
        ("registry.min_improvement=-100", r"registry\.min_improvement must be between 0\.0"),
        ("registry.metric=seconds", r"registry\.metric must be a quality metric \(pq, "),
    ],
)
def test_wrong_types_and_ranges_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_overrides_parse_yaml_values():
    cfg = load_config(
        None,
        [
            "model.num_stages=4",
            "data.min_size=[96, 128]",
            "optim.lr=1e-3",
            "model.backbone.weights=/tmp/r50.pth",
            "train.amp=false",
        ],
    )
    assert cfg.model.num_stages == 4
    assert cfg.data.min_size == (96, 128)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.backbone.weights == "/tmp/r50.pth"
    assert cfg.train.amp is False


def test_int_is_accepted_for_float_and_scalar_for_tuple():
    cfg = load_config(None, ["optim.lr=1", "data.min_size=512"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.data.min_size == (512,)


def test_bad_override_syntax_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(None, ["model.num_stages"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ConfigError, match=r"empty.yaml is empty"):
        load_config(empty)  # not the built-in COCO R-50 defaults, unannounced
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(listy)


def test_config_is_frozen_and_digest_tracks_values():
    a = load_config(None)
    b = load_config(None, ["model.num_stages=4"])
    with pytest.raises(AttributeError):
        a.model.num_stages = 5  # type: ignore[misc]
    assert a.digest() == load_config(None).digest()
    assert a.digest() != b.digest()


def test_min_workers_must_fit_in_num_workers():
    with pytest.raises(ConfigError, match=r"train.min_workers \(3\) must not exceed"):
        load_config(None, ["train.num_workers=2", "train.min_workers=3"])
    with pytest.raises(ConfigError, match="train.placement_retries"):
        load_config(None, ["train.placement_retries=-2"])


def test_tune_storage_must_be_a_file_system_path():
    with pytest.raises(ConfigError, match=r"tune.storage_path must be .* not 's3://b/tune'"):
        load_config(None, ["tune.storage_path=s3://b/tune"])
    assert load_config(None, ["train.storage_path=s3://b/ray"]).train.storage_path == "s3://b/ray"

"""Option handling: both spellings, --no- forms, config files, wrong-stage/ignored/unsupported flags."""

from __future__ import annotations

import logging

import pytest
import typer
from cogfun.common.options import add_stage_command
from cogfun.common.stage_flags import foreign_flags
from cogfun.precompute.config import PrecomputeConfig
from cogfun.train.config import TrainConfig
from typer.testing import CliRunner


@pytest.fixture()
def app_and_seen():
    seen: list = []
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    add_stage_command(
        app, "train", TrainConfig, seen.append, help="train", foreign=foreign_flags("train")
    )
    add_stage_command(
        app,
        "precompute",
        PrecomputeConfig,
        seen.append,
        help="pre",
        foreign=foreign_flags("precompute"),
    )
    return app, seen


def test_defaults_are_the_recommended_command(app_and_seen):
    app, seen = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train"])
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert (cfg.train_batch_size, cfg.learning_rate, cfg.lr_warmup_steps, cfg.max_grad_norm) == (
        4,
        2e-5,
        100,
        0.05,
    )
    assert cfg.use_came and cfg.gradient_checkpointing and cfg.mixed_precision == "bf16"
    assert cfg.trainable_modules == ["."] and cfg.resume_from_checkpoint == "latest"


def test_both_spellings_and_no_forms(app_and_seen):
    app, seen = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        app,
        [
            "train",
            "--train_batch_size",
            "7",
            "--learning-rate=1e-4",
            "--no_use_came",
            "--no-gradient-checkpointing",
            "--train_mode",
            "normal",
        ],
    )
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert (
        cfg.train_batch_size,
        cfg.learning_rate,
        cfg.use_came,
        cfg.gradient_checkpointing,
        cfg.mode,
    ) == (7, 1e-4, False, False, "normal")
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        app,
        ["precompute", "--train_data_dir", "d", "--no_random_frame_crop", "--vae-mini-batch", "4"],
    )
    assert res.exit_code == 0, res.output
    assert (
        str(seen[1].data) == "d"
        and seen[1].random_frame_crop is False
        and seen[1].vae_mini_batch == 4
    )
    assert str(seen[1].meta_path()) == "d/metadata.json"


def test_config_file_then_flags_override(app_and_seen, tmp_path):
    app, seen = app_and_seen
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train_batch_size: 2\nlearning-rate: 0.001\nuse_came: false\n")
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["train", "--config", str(cfg_file), "--train-batch-size", "3"]
    )
    assert res.exit_code == 0, res.output
    assert (seen[0].train_batch_size, seen[0].learning_rate, seen[0].use_came) == (3, 0.001, False)
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense_key = 1\n")
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code != 0 and "nonsense_key" in res.output


def test_wrong_stage_flag_names_the_right_stage(app_and_seen):
    app, _ = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--image_sample_size", "512"])
    assert res.exit_code == 2
    assert "cogfun precompute" in res.output and "image-sample-size" in res.output
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["precompute", "--data", "d", "--train_batch_size", "4"]
    )
    assert res.exit_code == 2 and "cogfun train" in res.output


def test_ignored_flags_warn_and_unsupported_refused(app_and_seen, caplog):
    app, seen = app_and_seen
    with caplog.at_level(logging.WARNING, logger="cogfun"):
        res = CliRunner(env={"COLUMNS": "300"}).invoke(
            app, ["train", "--low_vram", "--noise_offset", "0.1", "--train_batch_size", "5"]
        )
    assert res.exit_code == 0, res.output
    assert seen[0].train_batch_size == 5
    assert "does nothing" in caplog.text and "noise-offset" in caplog.text
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--validation_prompts", "a cat"])
    assert res.exit_code == 2 and "not supported yet" in res.output


def test_bad_choice_names_the_option(app_and_seen):
    app, _ = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--mixed_precision", "fp8"])
    assert res.exit_code == 2 and "mixed-precision" in res.output and "bf16" in res.output

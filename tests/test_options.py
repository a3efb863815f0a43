"""Option handling: both spellings, --no- forms, config files, wrong-stage/ignored/unsupported flags."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from cogfun.app.stage_command import add_stage_command
from cogfun.train.config import TrainConfig
from typer.testing import CliRunner


def test_defaults_are_the_recommended_command(app_and_seen):
    app, seen = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train"])
    assert res.exit_code == 0, res.output
    cfg, store_options = seen[0]
    assert store_options == {}  # no store to build: train reads --latents as it is
    # Read at run time: the model's mode, the store's tiling; transformer/ saved as bf16.
    assert (cfg.mode, cfg.auto_tile_batch_size, cfg.save_dtype) == (None, None, "bf16")
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
    cfg = seen[0][0]
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
    cfg = seen[0][0]
    assert (cfg.train_batch_size, cfg.learning_rate, cfg.use_came) == (3, 0.001, False)
    bad = tmp_path / "bad.toml"
    bad.write_text("nonsense_key = 1\n")
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code != 0 and "nonsense_key" in res.output


def test_wrong_stage_flag_names_the_right_stage(app_and_seen):
    app, _ = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--out", "s.zarr"])
    assert res.exit_code == 2
    assert "--out: it is `cogfun precompute`'s store path" in res.output
    assert "store named by --latents" in res.output
    res = CliRunner(env={"COLUMNS": "300"}).invoke(
        app, ["precompute", "--data", "d", "--train_batch_size", "4"]
    )
    assert res.exit_code == 2
    assert "--train-batch-size: it is an option of `cogfun train`" in res.output


def test_every_misplaced_flag_is_named_in_one_message(app_and_seen, tmp_path):
    app, seen = app_and_seen
    runner = CliRunner(env={"COLUMNS": "300"})
    args = ["precompute", "--data", "d", "--train_batch_size", "4", "--learning-rate=1e-4"]
    args += ["--use_ema", "--vae_path", "v.safetensors", "--no_such_flag", "3", "--seed", "1"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and not seen
    assert res.output.count("Error:") == 1
    assert "`cogfun precompute` does not take 5 of the flags given:" in res.output
    lines = [line.strip() for line in res.output.splitlines()]
    for flag in ("--train-batch-size", "--learning-rate", "--use-ema"):
        assert f"{flag}: it is an option of `cogfun train`, not `cogfun precompute`" in lines
    assert "--vae-path: not supported yet" in lines
    assert "--no_such_flag: no such option" in lines
    # Config-file keys count too, in the same message as the command line's.
    cfg_file = tmp_path / "t.yaml"
    cfg_file.write_text("out: s.zarr\nhub_token: x\nbogus_key: 1\nlearning_rate: 0.1\n")
    res = runner.invoke(app, ["train", "--config", str(cfg_file), "--push_to_hub", "--nope"])
    assert res.exit_code == 2 and not seen
    assert "`cogfun train` does not take 5 of the flags given:" in res.output
    for where in (f"{cfg_file}: out", f"{cfg_file}: hub_token", f"{cfg_file}: bogus_key"):
        assert where in res.output
    assert "--push-to-hub: not supported yet" in res.output
    assert "--nope: no such option" in res.output


def test_train_takes_the_store_options_of_precompute(app_and_seen):
    app, seen = app_and_seen
    args = ["train", "--train_data_dir", "d", "--train_data_meta", "d/m.json"]
    args += ["--image_sample_size=512", "--random_hw_adapt", "--no-enable-bucket"]
    args += ["--vae_mini_batch", "2", "--train_mode", "inpaint", "--seed", "7"]
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg, store_options = seen[0]
    assert (cfg.mode, cfg.seed) == ("inpaint", 7)
    assert store_options == {
        "data": Path("d"),
        "meta": Path("d/m.json"),
        "image_sample_size": 512,
        "random_hw_adapt": True,
        "enable_bucket": False,
        "vae_mini_batch": 2,
    }


def test_a_config_file_holds_every_option_required_ones_included(app_and_seen, tmp_path):
    app, seen = app_and_seen
    runner = CliRunner(env={"COLUMNS": "300"})
    res = runner.invoke(app, ["precompute"])
    assert res.exit_code == 2 and "Missing option '--data'" in res.output
    run_file = tmp_path / "run.yaml"
    run_file.write_text("data: clips\ntrain_data_meta: clips/meta.csv\nvideo_sample_size: 128\n")
    res = runner.invoke(app, ["precompute", "--config", str(run_file)])
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert (cfg.data, cfg.meta, cfg.video_sample_size) == (
        Path("clips"),
        Path("clips/meta.csv"),
        128,
    )
    assert cfg.mode == "inpaint"  # no transformer config in the (absent) default model folder
    toml = tmp_path / "run.toml"
    toml.write_text('latents = "s.zarr"\ntrain_data_dir = "clips"\ntoken_sample_size = 256\n')
    res = runner.invoke(app, ["train", "--config", str(toml), "--token_sample_size", "320"])
    assert res.exit_code == 0, res.output
    cfg, store_options = seen[1]
    assert cfg.latents == [Path("s.zarr")]
    assert store_options == {"data": Path("clips"), "token_sample_size": 320}


def test_ignored_flags_warn_and_unsupported_refused(app_and_seen, caplog):
    app, seen = app_and_seen
    with caplog.at_level(logging.WARNING, logger="cogfun"):
        res = CliRunner(env={"COLUMNS": "300"}).invoke(
            app, ["train", "--low_vram", "--noise_offset", "0.1", "--train_batch_size", "5"]
        )
    assert res.exit_code == 0, res.output
    assert seen[0][0].train_batch_size == 5
    assert "does nothing" in caplog.text and "noise-offset" in caplog.text
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--vae_path", "v.safetensors"])
    assert res.exit_code == 2 and "not supported yet" in res.output


def test_bad_choice_names_the_option(app_and_seen):
    app, _ = app_and_seen
    res = CliRunner(env={"COLUMNS": "300"}).invoke(app, ["train", "--mixed_precision", "fp8"])
    assert res.exit_code == 2 and "mixed-precision" in res.output and "bf16" in res.output


def test_list_flags_take_several_values_after_one_flag_as_the_original():
    """The original declares these with nargs="+": `--trainable_modules a b` is two substrings."""
    seen: list = []
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    add_stage_command(app, "train", TrainConfig, seen.append, help="t", foreign={})
    args = ["train", "--trainable_modules", "attn1", "norm1", "--seed", "3"]
    args += ["--trainable_modules_low_learning_rate", "proj_out", "time_embedding"]
    args += ["--validation_prompts", "a cat on a sofa", "a dog", "--validation-steps", "7"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    cfg = seen[0]
    assert cfg.trainable_modules == ["attn1", "norm1"]
    assert cfg.trainable_modules_low_learning_rate == ["proj_out", "time_embedding"]
    assert cfg.validation_prompts == ["a cat on a sofa", "a dog"]
    assert (cfg.seed, cfg.validation_steps) == (3, 7)

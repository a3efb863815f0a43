"""Training pieces on their own: clipping schedule, LR warmup, parameter groups, tiling, per-step
seeds, checkpoint naming/pruning/resume lookup, metrics truncation and the no-unpickling loader."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from cogfun.train import distributed, optim
from cogfun.train.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    find_resume,
    prune,
    remove_stale,
)
from cogfun.train.loop import step_seed, tile_batch
from cogfun.train.metrics import read_metrics, truncate_metrics


def test_linear_decay_and_adaptive_clip_follow_the_original():
    # 0.25 at step 0, linearly to 0.05 at 1000, then 0.05 (max_grad_norm 0.05 x ratio 5).
    assert optim.linear_decay(0.25, 0.05, 1000, 0) == 0.25
    assert optim.linear_decay(0.25, 0.05, 1000, 500) == pytest.approx(0.15)
    assert optim.linear_decay(0.25, 0.05, 1000, 1000) == 0.05
    assert optim.linear_decay(0.25, 0.05, 1000, 5000) == 0.05
    kw = dict(max_grad_norm=0.05, initial_ratio=5, abnormal_start=1000)
    assert optim.adaptive_clip_norm(10.0, 0, **kw) == 0.25  # abnormal but before the start
    assert optim.adaptive_clip_norm(10.0, 1000, **kw) == 0.05  # step must be > start
    assert optim.adaptive_clip_norm(0.2, 1001, **kw) == 0.05  # ratio 4 <= 5: base
    assert optim.adaptive_clip_norm(0.3, 1001, **kw) == pytest.approx(0.05 / 6)  # ratio 6
    assert optim.adaptive_clip_norm(100.0, 1001, **kw) == pytest.approx(0.05 / 10)  # capped at 10
    assert optim.clip_schedule("auto", deepspeed=False) == "adaptive"
    assert optim.clip_schedule("auto", deepspeed=True) == "fixed"
    assert optim.clip_norm_for("fixed", 100.0, 5, **kw) == 0.05


def test_clip_gradients_clips_to_the_asked_norm_and_returns_the_norm_before():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    acc = Accelerator()
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.tensor([3.0, 0.0, 0.0])
    params[1].grad = torch.tensor([0.0, 4.0, 0.0, 0.0])  # total norm 5
    asked = []
    norm = distributed.clip_gradients(acc, params, lambda n: asked.append(n) or 0.5)
    assert norm == pytest.approx(5.0) and asked == [pytest.approx(5.0)]
    total = torch.cat([p.grad for p in params]).norm()
    assert total.item() == pytest.approx(0.5, rel=1e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_warmup_is_counted_in_optimizer_steps(world):
    """accelerate steps the schedule `world` times per optimizer step; lengths are scaled to match."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
    sched = optim.make_lr_scheduler(
        "constant_with_warmup", opt, warmup_steps=100, total_steps=1000, num_processes=world
    )
    for k in range(1, 151):
        opt.step()
        for _ in range(world):  # what AcceleratedScheduler.step does per optimizer step
            sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(min(1.0, k / 100) * 2e-5)


def test_trainable_and_low_lr_groups_by_substring():
    net = torch.nn.ModuleDict(
        {
            "transformer_blocks": torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)]),
            "norm_out": torch.nn.LayerNorm(2),
            "proj_out": torch.nn.Linear(2, 2),
        }
    )
    groups = optim.select_trainable(net, ["transformer_blocks.0"], ["norm_out"], lr=1e-4)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    assert sorted(names[id(p)] for p in groups[0]["params"]) == [
        "transformer_blocks.0.bias",
        "transformer_blocks.0.weight",
    ]
    assert sorted(names[id(p)] for p in groups[1]["params"]) == ["norm_out.bias", "norm_out.weight"]
    trainable = sorted(n for n, p in net.named_parameters() if p.requires_grad)
    assert trainable == sorted(names[id(p)] for g in groups for p in g["params"])
    # "." matches everything: one group; trainable_modules win over the low-lr list.
    everything = optim.select_trainable(net, ["."], ["norm_out"], lr=1e-4)
    assert len(everything) == 1 and len(everything[0]["params"]) == 8
    with pytest.raises(optim.TrainableModulesError, match="match no parameter"):
        optim.select_trainable(net, ["nothing_like_this"], [], lr=1e-4)


def test_came_and_adamw_settings():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    came = optim.make_optimizer(
        [{"params": p}], use_came=True, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.03, eps=1e-10
    )
    assert type(came).__name__ == "CAME"
    assert came.defaults["betas"] == (0.9, 0.999, 0.9999) and came.defaults["eps"] == (1e-30, 1e-16)
    assert came.defaults["weight_decay"] == 0.0  # the original does not pass it to CAME
    adamw = optim.make_optimizer(
        [{"params": p}], use_came=False, lr=1e-3, betas=(0.8, 0.99), weight_decay=0.03, eps=1e-10
    )
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.defaults["betas"], adamw.defaults["weight_decay"], adamw.defaults["eps"]) == (
        (0.8, 0.99),
        0.03,
        1e-10,
    )


class _Bucket:
    def __init__(self, frames, height, width):
        self.frames, self.height, self.width = frames, height, width


class _Store:
    def __init__(self, settings):
        self.settings = settings
        self.buckets = {
            "v49_256": _Bucket(49, 256, 256),  # 3,211,264 pixels: the x2 limit itself (>=)
            "v49_128": _Bucket(49, 128, 128),  # 802,816: the x4 limit itself
            "v49_512": _Bucket(49, 512, 512),
            "i1024": _Bucket(1, 1024, 1024),
            "i816": _Bucket(1, 816, 816),
        }


def test_batch_tiling_follows_the_store_unless_told():
    from cogfun.train.config import TrainConfig
    from cogfun.train.resolve import tile_factors

    token_buckets = _Store({"training_with_video_token_length": True})
    cfg, tiles = tile_factors(TrainConfig(), token_buckets)
    assert cfg.auto_tile_batch_size is True  # resolved: recorded in the checkpoint's config
    assert tiles == {"v49_256": 2, "v49_128": 4, "v49_512": 1, "i1024": 2, "i816": 4}
    cfg, tiles = tile_factors(TrainConfig(auto_tile_batch_size=False), token_buckets)
    assert cfg.auto_tile_batch_size is False and set(tiles.values()) == {1}
    plain = _Store({"training_with_video_token_length": False})
    cfg, tiles = tile_factors(TrainConfig(), plain)
    assert cfg.auto_tile_batch_size is False and set(tiles.values()) == {1}
    cfg, tiles = tile_factors(TrainConfig(auto_tile_batch_size=True), plain)
    assert tiles["v49_128"] == 4 and tiles["v49_512"] == 1
    # The limits scale with the store's frame count and token size, as the original's do: at
    # token size 128 a 49-frame 128x128 clip is past both (50,176 and 200,704 pixels).
    small = _Store({"training_with_video_token_length": True, "token_sample_size": 128})
    _, tiles = tile_factors(TrainConfig(), small)
    assert tiles["v49_128"] == 1 and tiles["i816"] == 1
    assert tile_factors(TrainConfig(), _Store({}))[0].auto_tile_batch_size is False


def test_store_options_without_data_are_refused_naming_each(tmp_path):
    from cogfun.app.store_build import check_store_options
    from cogfun.train.preflight import TrainRefused

    check_store_options({}, tmp_path)  # nothing to build: the store at --latents as it is
    with pytest.raises(TrainRefused) as err:
        check_store_options({"video_sample_stride": 2, "image_sample_size": 512}, tmp_path)
    assert str(err.value).startswith(
        "--image-sample-size, --video-sample-stride set how a store is built, which needs --data"
    )


def test_tiling_repeats_the_batch_in_order():
    raw = {"latents": torch.arange(2)[:, None], "slots": [3, 7], "bucket": "b"}
    tiled = tile_batch(raw, 2)
    assert tiled["latents"][:, 0].tolist() == [0, 1, 0, 1]
    assert tiled["slots"] == [3, 7, 3, 7] and tiled["bucket"] == "b"
    assert tile_batch(raw, 1) is raw


def test_mode_defaults_to_the_model_and_widening_is_announced(caplog, tmp_path):
    from cogfun.train.config import TrainConfig
    from cogfun.train.preflight import TrainRefused
    from cogfun.train.resolve import resolve_mode

    inp, t2v = {"in_channels": 33, "out_channels": 16}, {"in_channels": 16, "out_channels": 16}
    with caplog.at_level("INFO", logger="cogfun.train.resolve"):
        assert resolve_mode(TrainConfig(), inp, tmp_path).mode == "inpaint"
        assert resolve_mode(TrainConfig(), t2v, tmp_path).mode == "normal"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "--mode normal: the model's transformer takes 16 input channels" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="cogfun.train.resolve"):
        assert resolve_mode(TrainConfig(mode="inpaint"), t2v, tmp_path).mode == "inpaint"
        assert resolve_mode(TrainConfig(mode="normal"), inp, tmp_path).mode == "normal"
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(
        f"--mode inpaint widens the transformer of {tmp_path} from 16 to 33 input channels"
    )
    with pytest.raises(TrainRefused, match="control training is not supported"):
        resolve_mode(TrainConfig(), {"in_channels": 32, "out_channels": 16}, tmp_path)


def test_step_seeds_differ_by_rank_step_and_micro_step():
    seeds = {step_seed(42, r, s, m) for r in range(2) for s in range(50) for m in range(2)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(42, 0, 3, 0) == step_seed(42, 0, 3, 0) != step_seed(43, 0, 3, 0)


def _fake_checkpoint(root, name, complete=True):
    path = root / name
    path.mkdir()
    if complete:
        (path / "trainer_state.json").write_text("{}")
    return path


def test_only_complete_checkpoints_count_and_latest_is_the_highest(tmp_path):
    assert find_resume(tmp_path / "missing", "latest") is None  # fresh start
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9"):
        _fake_checkpoint(tmp_path, name)
    _fake_checkpoint(tmp_path, ".tmp-checkpoint-12")  # a crash mid-save
    _fake_checkpoint(tmp_path, "checkpoint-11", complete=False)
    _fake_checkpoint(tmp_path, "checkpoint-x")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 9, 10]
    assert find_resume(tmp_path, "latest") == tmp_path / "checkpoint-10"  # 10 > 9 numerically
    assert find_resume(tmp_path, "none") is None and find_resume(tmp_path, None) is None
    assert find_resume(tmp_path, "checkpoint-2") == tmp_path / "checkpoint-2"
    assert find_resume(tmp_path, str(tmp_path / "checkpoint-9")) == tmp_path / "checkpoint-9"
    with pytest.raises(CheckpointError, match="not a complete cogfun checkpoint"):
        find_resume(tmp_path, "checkpoint-11")
    # A kill between the two renames of a re-save of step 7: the set-aside copy is all there is.
    _fake_checkpoint(tmp_path, ".old-checkpoint-7")
    _fake_checkpoint(tmp_path, ".old-checkpoint-9")  # step 9 was re-saved: the old copy goes
    remove_stale(tmp_path)
    assert not (tmp_path / ".tmp-checkpoint-12").exists()
    assert not (tmp_path / ".old-checkpoint-9").exists()
    assert not (tmp_path / ".old-checkpoint-7").exists()
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [2, 7, 9, 10]
    shutil.rmtree(tmp_path / "checkpoint-7")
    prune(tmp_path, 2)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [9, 10]


def test_metrics_truncation_keeps_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [json.dumps({"step": s, "loss": float(s)}) for s in range(1, 6)]
    path.write_text("\n".join(rows) + '\n{"step": 6, "lo')  # torn last line (kill -9)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5]
    assert truncate_metrics(path, 3) == 3
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    assert path.read_text().endswith("\n")
    assert truncate_metrics(path, 0) == 0 and path.read_text() == ""


class _Planted:
    """Unpickling this runs code: it must never happen when loading a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_safe_loading_never_runs_a_planted_pickle(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "optimizer.bin"
    torch.save({"state": _Planted(marker)}, path)
    with distributed.safe_loading(), pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=False)  # what DeepSpeed asks for
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored afterwards
    torch.save({"w": torch.ones(2), "step": 3}, path)
    with distributed.safe_loading():
        assert torch.load(path, weights_only=False)["step"] == 3

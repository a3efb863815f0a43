"""Several stores in one run (`cogfun train --latents A.zarr B.zarr:2`): the options, what an epoch
visits from each store, the checks (each store against the model, the stores against each other),
exact resume over the mix, and one store giving exactly the run it always gave."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer
from train_support import make_store, metrics, run_in_process, transformer_only_model
from typer.testing import CliRunner

SHA_B, SHA_C = "b" * 64, "c" * 64  # VAE identities recorded in the stores (the model has no VAE)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny_model_dir):
    """Store A, store B (same layout, another fingerprint) and the tiny transformer."""
    root = tmp_path_factory.getbasetemp()
    a, b = make_store(root), make_store(root, vae_sha256=SHA_B)
    return a, b, transformer_only_model(root, tiny_model_dir)


def test_latents_takes_several_stores_with_weights_on_the_command_line_and_in_files(tmp_path):
    from cogfun.app.stage_command import add_stage_command
    from cogfun.train.config import TrainConfig
    from cogfun.train.stores import StoreSpec, parse_latents

    seen: list = []
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    add_stage_command(app, "train", TrainConfig, seen.append, help="t", foreign={})
    yaml = tmp_path / "run.yaml"
    yaml.write_text("latents: [x.zarr, y.zarr:4]\nseed: 5\n")
    runs = [
        ["train", "--latents", "A.zarr", "B.zarr:2", "--seed", "3"],
        ["train", "--latents", "A.zarr", "--latents=B.zarr:2", "--seed", "3"],
        ["train", "--config", str(yaml)],
        ["train"],
    ]
    for args in runs:
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
    assert [cfg.latents for cfg in seen] == [
        [Path("A.zarr"), Path("B.zarr:2")],
        [Path("A.zarr"), Path("B.zarr:2")],
        [Path("x.zarr"), Path("y.zarr:4")],
        [Path("latents.zarr")],
    ]
    assert seen[0].seed == 3 and seen[2].seed == 5
    assert TrainConfig(latents=Path("one.zarr")).latents == [Path("one.zarr")]
    assert parse_latents(seen[0].latents) == [
        StoreSpec(Path("A.zarr"), 1),
        StoreSpec(Path("B.zarr"), 2),
    ]
    # A colon that is not followed by a number is part of the path.
    assert parse_latents([Path("runs:v2/s.zarr")]) == [StoreSpec(Path("runs:v2/s.zarr"), 1)]


@pytest.mark.parametrize(
    "given,message",
    [
        (["a.zarr:0"], "--latents a.zarr:0: the weight after ':' is how many times each sample"),
        (["a.zarr:1.5"], "a whole number >= 1 (got '1.5')"),
        (["a.zarr:-2"], "a whole number >= 1 (got '-2')"),
        (["a.zarr", "./a.zarr:3"], "--latents names the store a.zarr twice (as a.zarr too)"),
    ],
)
def test_bad_weights_and_repeated_stores_are_refused(given, message):
    from cogfun.train.preflight import TrainRefused
    from cogfun.train.stores import parse_latents

    with pytest.raises(TrainRefused) as err:
        parse_latents([Path(g) for g in given])
    assert message in str(err.value)


@pytest.mark.parametrize(
    "backend,workers",
    [("threads", 0), ("threads", 2), pytest.param("processes", 2, marks=pytest.mark.slow)],
)
def test_an_epoch_visits_each_store_weight_times_in_batches_of_one_store(shared, backend, workers):
    from cogfun.common.store import open_store
    from cogfun.train.data import make_dataloader

    a, b, _ = shared
    loader, sampler = make_dataloader(
        [(a, 1), (b, 2)], 2, workers, seed=7, rank=0, world=1, backend=backend
    )
    # A: buckets of 6 and 4 samples (3 + 2 batches of 2); B twice over: 12 and 8 (6 + 4).
    assert (len(sampler), sampler.num_samples) == (15, 30)
    batches = list(loader)
    assert len(batches) == 15
    assert Counter(x["store"] for x in batches) == {0: 5, 1: 10}
    seen = Counter()
    for x in batches:
        bucket, slots = x["bucket"], x["slots"]
        seen.update((x["store"], bucket, s) for s in slots)
        assert x["latents"].shape[0] == len(slots) == 2
        # Each sample is read from its own store (B holds A's bytes here: they share the seed).
        reader = open_store((a, b)[x["store"]])
        assert torch.equal(x["latents"], reader.read_batch(bucket, slots)["latents"])
    expect = {
        (i, name, int(s)): weight
        for i, (path, weight) in enumerate([(a, 1), (b, 2)])
        for name, info in open_store(path).buckets.items()
        for s in info.slots
    }
    assert dict(seen) == expect
    # The order is a function of the seed: the next pass over epoch 0 is the same.
    sampler.set_epoch(0)
    assert [(x["store"], x["bucket"], x["slots"]) for x in loader] == [
        (x["store"], x["bucket"], x["slots"]) for x in batches
    ]


def test_one_store_gives_the_batches_and_losses_it_gave_before(shared, tmp_path, monkeypatch):
    """The loader of one store is built as before several stores were possible: the bucket names as
    keys, the done slots once each. A run on a loader built that way (here, by hand) and a run on
    today's have the same losses and gradient norms, step for step."""
    from cogfun.common.store import open_store
    from cogfun.train import data
    from cogfun.train.threaded import ThreadLoader

    a, _, model = shared
    reader = open_store(a)
    legacy = data.BucketBatchSampler(
        {name: info.slots for name, info in reader.buckets.items()}, 2, seed=42
    )
    _, sampler = data.make_dataloader(a, 2, 0, seed=42, rank=0, world=1)
    for epoch in range(3):
        assert sampler.epoch_batches(epoch) == legacy.epoch_batches(epoch)

    def legacy_loader(stores, batch_size, workers, seed, rank, world, **kw):
        ((path, weight),) = stores
        assert weight == 1
        dataset = data.StoreBatchDataset(path)
        keys = {name: info.slots for name, info in open_store(path).buckets.items()}
        batches = data.BucketBatchSampler(keys, batch_size, seed, world, rank)
        return ThreadLoader(dataset, batches, 0, 0), batches

    kw = dict(latents=a, model=model, max_train_steps=6)  # 6 steps: into the second epoch
    run_in_process(output_dir=tmp_path / "now", **kw)
    monkeypatch.setattr(data, "make_dataloader", legacy_loader)
    run_in_process(output_dir=tmp_path / "before", **kw)
    now, before = metrics(tmp_path / "now"), metrics(tmp_path / "before")
    assert [r["epoch"] for r in now] == [0, 0, 0, 0, 0, 1]
    assert [(r["loss"], r["grad_norm"]) for r in now] == [
        (r["loss"], r["grad_norm"]) for r in before
    ]


def test_a_two_store_run_resumes_exactly(shared, tmp_path):
    a, b, model = shared
    # Batches of 6: A gives 2 batches an epoch (6, 4), B twice over 4 (6, 6, 6, 2); the run
    # crosses into the second epoch after step 6, the resumed half starts at step 6.
    kw = dict(latents=[a, Path(f"{b}:2")], model=model, checkpointing_steps=5, train_batch_size=6)
    run_in_process(output_dir=tmp_path / "straight", max_train_steps=7, **kw)
    run_in_process(output_dir=tmp_path / "split", max_train_steps=5, **kw)
    run_in_process(output_dir=tmp_path / "split", max_train_steps=7, **kw)
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 8))
    assert [r["epoch"] for r in split] == [0] * 6 + [1]
    assert sorted(r["samples"] for r in split[:6]) == [2, 4, 6, 6, 6, 6]  # 30: 10 + 2 x 10
    for key in ("loss", "grad_norm", "lr", "epoch", "samples"):
        assert [r[key] for r in straight] == [r[key] for r in split], key
    state = json.loads((tmp_path / "split/checkpoint-7/trainer_state.json").read_text())
    assert state["sampler"]["num_samples"] == 30  # 10 + 2 x 10
    assert [(m["path"], m["weight"]) for m in state["stores"]] == [(str(a), 1), (str(b), 2)]
    assert state["config"]["latents"] == [str(a), f"{b}:2"]


def test_resuming_with_other_weights_is_refused(shared, tmp_path):
    from cogfun.train.checkpoint import CheckpointError

    a, b, model = shared
    out = tmp_path / "o"
    run_in_process(latents=[a, b], model=model, output_dir=out, max_train_steps=1)
    with pytest.raises(CheckpointError) as err:
        run_in_process(latents=[a, Path(f"{b}:3")], model=model, output_dir=out, max_train_steps=2)
    assert f"was trained on --latents {a}:1 {b}:1; this run gives {a}:1 {b}:3" in str(err.value)


def test_a_checkpoint_of_one_store_resumes_without_a_changed_option_warning(caplog):
    """Checkpoints written when --latents took one store hold it as a string."""
    from cogfun.train.setup import warn_config_changes

    with caplog.at_level("WARNING", logger="cogfun.train.setup"):
        warn_config_changes({"latents": "a.zarr"}, {"latents": ["a.zarr"]}, Path("ckpt"))
        assert not caplog.records
        warn_config_changes({"latents": "a.zarr"}, {"latents": ["b.zarr"]}, Path("ckpt"))
    assert "latents: ['a.zarr'] -> ['b.zarr']" in caplog.text


def test_each_store_is_checked_against_the_model(shared, tmp_path):
    from cogfun.train.preflight import TrainRefused

    a, _, model = shared
    no_masks = make_store(tmp_path, masks=False)
    with pytest.raises(TrainRefused) as err:
        run_in_process(latents=[a, no_masks], model=model, output_dir=tmp_path / "o")
    assert str(err.value).startswith(f"store {no_masks} does not fit {model}: it holds no inpaint")
    assert not (tmp_path / "o").exists()  # refused before anything was built


def test_stores_that_cannot_share_a_run_are_refused_naming_both(shared, tmp_path):
    from cogfun.train.preflight import TrainRefused

    a, b, model = shared
    c = make_store(tmp_path, vae_sha256=SHA_C)
    with pytest.raises(TrainRefused) as err:
        run_in_process(latents=[a, b, c], model=model, output_dir=tmp_path / "o")
    assert str(err.value) == (
        f"--latents: the stores {b} and {c} cannot train together: vae sha256 "
        f"{SHA_B[:12]}... vs {SHA_C[:12]}..."
    )
    assert not (tmp_path / "o").exists()


def _fake_store(path, empty=0.0, scaling=1.15, **layout):
    base = dict(
        latent_channels=16, latent_format="moments", masks_per_sample=2, text_len=8, text_dim=4
    )
    return SimpleNamespace(
        path=Path(path),
        layout=SimpleNamespace(**{**base, **layout}),
        scaling_factor=scaling,
        settings={},
        caption_embedding=lambda i: torch.full((8, 4), empty),
    )


@pytest.mark.parametrize(
    "other,reason",
    [
        (dict(latent_channels=32), "latent channels 16 vs 32"),
        (dict(latent_format="sample"), "latent format 'moments' vs 'sample'"),
        (dict(masks_per_sample=4), "masks per sample 2 vs 4"),
        (dict(text_len=16, text_dim=8), "text len 8 vs 16; text dim 4 vs 8"),
        (dict(scaling=0.7), "VAE scaling factor 1.15 vs 0.7"),
        (
            dict(empty=1.0),
            "the empty caption's embedding differs (another text encoder or tokenizer?)",
        ),
    ],
)
def test_what_a_batch_needs_must_agree(other, reason):
    from cogfun.train.preflight import TrainRefused
    from cogfun.train.stores import check_stores_agree

    same = [_fake_store("a.zarr"), _fake_store("b.zarr")]
    check_stores_agree(same)  # nothing differs
    with pytest.raises(TrainRefused) as err:
        check_stores_agree([*same, _fake_store("c.zarr", **other)])
    assert (
        str(err.value) == f"--latents: the stores a.zarr and c.zarr cannot train together: {reason}"
    )


def test_data_builds_one_store_only(tmp_path):
    from cogfun.app.store_build import check_store_options
    from cogfun.train.preflight import TrainRefused

    check_store_options({"data": tmp_path}, [tmp_path / "s.zarr"])  # one store: built as before
    with pytest.raises(TrainRefused) as err:
        check_store_options({"data": tmp_path}, [tmp_path / "a.zarr", tmp_path / "b.zarr:2"])
    assert str(err.value).startswith(
        f"--data builds one store, at --latents; 2 were given ({tmp_path}/a.zarr {tmp_path}/b.zarr:2)"
    )

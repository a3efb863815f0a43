"""Stores on object stores from the command line: a store URL survives option parsing (precompute
--out, train --latents, inspect STORE), URLs no store can live at and bad --storage-options are
refused naming the option, storage options are applied in the stage's process and never recorded,
training outputs stay local, and what precompute keeps beside or inside a store (header probes,
validation prompts) goes to the object store. Quick: no model runs (moto's S3 server on
127.0.0.1)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from cogfun.app import cli
from cogfun.common.decode import MediaInfo
from cogfun.common.store.location import location
from cogfun.precompute.config import PrecomputeConfig
from cogfun.train.config import TrainConfig
from typer.testing import CliRunner

URL = "s3://b/p/x.zarr"
SECRET = "do-not-record-me"
runner = CliRunner(env={"COLUMNS": "300"})
# The module (the package exports a function of the same name).
location_module = importlib.import_module("cogfun.common.store.location")


@pytest.fixture()
def defaults(monkeypatch):
    """The process's default storage options, restored after the test."""
    monkeypatch.setattr(location_module, "_default_options", {})
    return location_module


def test_store_urls_survive_option_parsing(app_and_seen, tmp_path):
    app, seen = app_and_seen
    res = runner.invoke(app, ["precompute", "--data", "d", "--out", URL + "/"])
    assert res.exit_code == 0, res.output
    assert seen[-1].out == URL and isinstance(seen[-1].out, str)
    assert seen[-1].data == Path("d")  # local paths are Paths, as before
    res = runner.invoke(app, ["train", "--latents", URL, "gs://c/y.zarr:3", "local.zarr:2"])
    assert res.exit_code == 0, res.output
    cfg = seen[-1][0]
    assert cfg.latents == [URL, "gs://c/y.zarr:3", Path("local.zarr:2")]
    from cogfun.train.stores import StoreSpec, parse_latents

    specs = parse_latents(cfg.latents)
    assert specs == [
        StoreSpec(URL, 1),
        StoreSpec("gs://c/y.zarr", 3),
        StoreSpec(Path("local.zarr"), 2),
    ]
    # A config file carries URLs (and storage options as a mapping) the same way.
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"out: {URL}\nstorage_options:\n  region: eu-west-1\n")
    res = runner.invoke(app, ["precompute", "--data", "d", "--config", str(cfg_file)])
    assert res.exit_code == 0, res.output
    assert seen[-1].out == URL and json.loads(seen[-1].storage_options) == {"region": "eu-west-1"}
    # Training with --data builds its store at the --latents URL.
    res = runner.invoke(app, ["train", "--latents", URL, "--data", "d"])
    assert res.exit_code == 0, res.output
    from cogfun.app.store_build import store_config

    cfg, values = seen[-1]
    assert store_config(cfg, values).out == URL


def test_inspect_takes_a_url(monkeypatch, defaults):
    calls = []
    monkeypatch.setattr(
        "cogfun.precompute.inspect.inspect_store",
        lambda path, **kw: calls.append((path, kw, dict(defaults._default_options))) or 0,
    )
    opts = json.dumps({"region": "us-east-1", "secret_access_key": SECRET})
    res = runner.invoke(cli.app, ["inspect", URL, "--json", "--storage-options", opts])
    assert res.exit_code == 0, res.output
    assert calls == [(URL, {"as_json": True, "verify": False}, json.loads(opts))]
    res = runner.invoke(cli.app, ["inspect", "some/local.zarr"])
    assert res.exit_code == 0 and calls[-1][0] == Path("some/local.zarr")


@pytest.mark.parametrize(
    "args, message",
    [
        (["precompute", "--data", "d", "--out", "ftp://b/x.zarr"], "--out ftp://b/x.zarr: unsupported URL scheme 'ftp'"),
        (["precompute", "--data", "d", "--out", "s3://bucket"], "--out s3://bucket: a store cannot be a bucket's root"),
        (["train", "--latents", "a.zarr", "s3://bucket/"], "--latents s3://bucket/: a store cannot be a bucket's root"),
        (["train", "--output_dir", "s3://b/out"], "--output-dir s3://b/out: training outputs (checkpoints, logs"),
        (["precompute", "--data", "s3://b/data"], "--data s3://b/data: a local path is needed here"),
        (["precompute", "--data", "d", "--storage-options", "{bad"], "--storage-options: not valid JSON"),
        (["train", "--storage_options", "[1, 2]"], "--storage-options: expected a JSON object, got list"),
    ],
)  # fmt: skip
def test_urls_and_storage_options_refused_naming_the_option(app_and_seen, args, message):
    app, seen = app_and_seen
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and not seen, res.output
    assert message in res.output


def test_inspect_refuses_a_bucket_root_and_bad_options():
    res = runner.invoke(cli.app, ["inspect", "s3://bucket"])
    assert (
        res.exit_code == 2 and "STORE s3://bucket: a store cannot be a bucket's root" in res.output
    )
    res = runner.invoke(cli.app, ["inspect", URL, "--storage-options", "3"])
    assert res.exit_code == 2 and "--storage-options: expected a JSON object, got int" in res.output


def test_train_refuses_output_dir_and_latents_urls_in_the_python_api():
    from cogfun.train.preflight import TrainRefused, check_config
    from cogfun.train.stores import parse_latents

    with pytest.raises(TrainRefused, match="--output-dir s3://b/o: training outputs"):
        check_config(TrainConfig(output_dir="s3://b/o"))
    with pytest.raises(TrainRefused, match="--latents s3://b: a store cannot be a bucket's root"):
        parse_latents(["s3://b:2"])
    with pytest.raises(TrainRefused, match="names the store s3://b/x twice"):
        parse_latents(["s3://b/x", "s3://b/x/:2"])


def test_precompute_refuses_a_bucket_root_in_the_python_api(tmp_path):
    from cogfun.precompute.run import OptionError, check_options

    with pytest.raises(OptionError, match="--out gs://b: a store cannot be a bucket's root"):
        check_options(PrecomputeConfig(data=tmp_path, out="gs://b"))
    with pytest.raises(OptionError, match="--out http://host/x.zarr: unsupported URL scheme"):
        check_options(PrecomputeConfig(data=tmp_path, out="http://host/x.zarr"))


def test_storage_options_are_never_recorded(tmp_path):
    from cogfun.precompute.ranks import Ranks
    from cogfun.precompute.store_setup import store_attrs
    from cogfun.train.checkpoint import resolved_config

    (tmp_path / "metadata.json").write_text("[]")
    options = json.dumps({"secret_access_key": SECRET})
    cfg = PrecomputeConfig(data=tmp_path, out=URL, storage_options=options)
    attrs = store_attrs(cfg, Ranks(0, 1, torch.device("cpu"), False), threads=1)
    assert attrs["config"]["out"] == URL and "storage_options" not in attrs["config"]
    assert SECRET not in json.dumps(attrs) and SECRET not in repr(cfg)
    plain = store_attrs(PrecomputeConfig(data=tmp_path, out=URL), Ranks(0, 1, torch.device("cpu"), False), 1)  # fmt: skip
    assert attrs == plain
    train = TrainConfig(latents=[URL], storage_options=options)
    saved = resolved_config(train)
    assert saved["latents"] == [URL] and "storage_options" not in saved
    assert SECRET not in json.dumps(saved) and SECRET not in repr(train)


def test_each_stage_applies_its_storage_options(monkeypatch, defaults, tmp_path, caplog):
    """Through the real CLI: the stage's process opens store URLs with --storage-options (each
    process `accelerate launch` starts runs this same path)."""
    from cogfun.precompute import run as precompute_run
    from cogfun.precompute.store_setup import SetupAborted
    from cogfun.train import run as train_run
    from cogfun.train.preflight import TrainRefused

    seen = []

    def stop(error: type[Exception]):
        def at_setup(cfg, *args):
            store = cfg.out if isinstance(cfg, PrecomputeConfig) else cfg.latents[0]
            seen.append((store, location(store).fs.options))
            raise error("stopped here")

        return at_setup

    monkeypatch.setattr(precompute_run, "_setup", stop(SetupAborted))
    monkeypatch.setattr(train_run, "setup", stop(TrainRefused))
    opts = {"endpoint": "http://127.0.0.1:9", "region": "r1"}
    args = ["--storage-options", json.dumps(opts), "--progress", "none"]
    res = runner.invoke(cli.app, ["precompute", "--data", str(tmp_path), "--out", URL, *args])
    assert res.exit_code == 2 and "precompute aborted: stopped here" in caplog.text
    assert seen[-1] == (URL, opts)
    res = runner.invoke(cli.app, ["train", "--latents", "s3://b/q.zarr", *args])
    assert res.exit_code == 2 and "cogfun train: stopped here" in res.output
    assert seen[-1] == ("s3://b/q.zarr", opts)


def test_cache_dir_is_trains_store_cache(app_and_seen, tmp_path, caplog):
    from cogfun.train.stores import parse_latents, store_cache

    app, seen = app_and_seen
    res = runner.invoke(
        app, ["train", "--latents", URL, "--cache-dir", "c", "--cache-max-gb", "1.5"]
    )
    assert res.exit_code == 0 and "does nothing" not in res.output, res.output
    cfg = seen[-1][0]
    assert store_cache(cfg, parse_latents(cfg.latents)) == {
        "cache_dir": Path("c"),
        "cache_max_bytes": 1_500_000_000,
    }
    local = TrainConfig(latents=[tmp_path / "a.zarr"], cache_dir=tmp_path / "c")
    with caplog.at_level("INFO"):
        assert store_cache(local, parse_latents(local.latents)) == {}
    assert "--cache-dir" in caplog.text and "every store is local" in caplog.text


def test_probe_folder_on_an_object_store(s3_server, s3_bucket, tmp_path):
    """Header probes beside an S3 store: two ranks write their shares, both read both, prune keeps
    the current process count's files."""
    from cogfun.precompute.headers import gather_probes, probe_dir, probe_share, prune
    from cogfun.precompute.metadata import Row
    from cogfun.precompute.plan import probe_rows

    rows = []
    for i in range(4):
        path = tmp_path / f"{i}.mp4"
        path.write_bytes(b"x" * (i + 1))
        rows.append(Row(i, f"{i}.mp4", path, f"caption {i}", "video"))

    def prober(path: Path, kind: str) -> MediaInfo:
        return MediaInfo(64, 96, 20 + int(path.stem))

    store = location(f"s3://{s3_bucket}/runs/x.zarr", s3_server.options())
    folder = probe_dir(store)
    assert str(folder) == f"s3://{s3_bucket}/runs/.x.zarr.probes"
    counts = [probe_share(rows, r, 2, folder, 7, prober) for r in range(2)]
    assert [(c.share, c.probed) for c in counts] == [(2, 2), (2, 2)]
    assert gather_probes(rows, 2, folder, 7) == probe_rows(rows, prober=prober)
    again = probe_share(rows, 0, 1, folder, 8, prober)  # one process now: all from the cache
    assert (again.share, again.probed, again.cached) == (4, 0, 4)
    prune(folder, 1)
    assert sorted(folder.listdir()) == ["rank0-of-1.json"]


def test_validation_prompts_inside_an_object_store(s3_server, s3_bucket, tmp_path, defaults):
    from cogfun.common import sample_store as ss
    from cogfun.common.sample_inputs import load_prompt_embeds
    from cogfun.train.validation import prompts_source

    defaults.set_default_options(s3_server.options())  # as `cogfun train --storage-options` does
    url = f"s3://{s3_bucket}/x.zarr"
    store = location(url)
    embeds, negative = torch.randn(2, 6, 4), torch.randn(1, 6, 4)
    assert not ss.is_current(store, ["a", "b"], "sha", 6)
    written = ss.write_store_prompts(store, ["a", "b"], embeds, negative, "sha")
    assert str(written) == f"{url}/{ss.STORE_FILE}"
    assert ss.is_current(url, ["a", "b"], "sha", 6)
    assert not ss.is_current(url, ["a", "b"], "other-sha", 6)
    assert ss.find_store_prompts([tmp_path / "none.zarr", url]) == written
    # `cogfun train --validation-prompts store`: read like any embeddings file, from a local copy.
    cfg = TrainConfig(latents=[tmp_path / "none.zarr", url], validation_prompts=["store"])
    copy = prompts_source(cfg, tmp_path / "out" / "validation")
    assert copy == tmp_path / "out" / "validation" / ss.STORE_FILE
    loaded = load_prompt_embeds(copy)
    assert loaded.prompts == ["a", "b"] and loaded.negative_prompt == ss.NEGATIVE_PROMPT
    assert torch.equal(loaded.embeds, embeds) and torch.equal(loaded.negative_embeds, negative)


def test_a_dataset_of_an_s3_store_carries_its_options_and_cache(
    s3_server, s3_bucket, tmp_path, defaults
):
    """What a DataLoader worker process gets (a copy made the way pickling makes it) reopens the
    store with its storage options, whatever the process's defaults, and reads through the
    --cache-dir cache."""
    import copy

    from cogfun.train.data import StoreBatchDataset
    from train_support import make_store

    local = location(make_store(tmp_path))
    store = location(f"s3://{s3_bucket}/copy.zarr", s3_server.options())
    for key, _ in local.walk():
        (store / key).write((local / key).read())
    cache = {"cache_dir": tmp_path / "cache", "cache_max_bytes": None}
    twin = copy.deepcopy(StoreBatchDataset(store, cache=cache))
    assert twin.store_path.fs.options == s3_server.options() and twin.cache == cache
    batch = twin[("f5_h8_w8", [0, 1])]
    ref = StoreBatchDataset(local.path)[("f5_h8_w8", [0, 1])]
    assert torch.equal(batch["latents"], ref["latents"])
    assert torch.equal(batch["caption_embeds"], ref["caption_embeds"])
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # the reads were kept


def test_inspect_a_missing_store_on_s3(s3_server, s3_bucket, defaults):
    url = f"s3://{s3_bucket}/missing.zarr"
    opts = json.dumps(s3_server.options(retries=1))
    res = runner.invoke(cli.app, ["inspect", url, "--storage-options", opts])
    assert res.exit_code == 2, res.output
    assert f"{url}/zarr.json" in res.output and "not a cogfun store" in res.output
    assert "Traceback" not in res.output

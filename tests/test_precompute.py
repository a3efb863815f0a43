"""`cogfun precompute` end to end on the tiny model and generated media (in-process, one thread)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cogfun.app.cli import app
from cogfun.common.buckets import resize_cover_crop
from cogfun.common.decode import MediaInfo, read_video_frames
from cogfun.common.masks import mask_to_latent, random_mask
from cogfun.common.models import load_vae
from cogfun.common.store import open_store
from cogfun.precompute import plan as plan_module
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.media import make_sample_dataset, write_video
from typer.testing import CliRunner

# Small sizes keep every encode in milliseconds; one thread and inline decoding keep runs cheap.
OPTS = dict(
    image_sample_size=128,
    video_sample_size=64,
    token_sample_size=64,
    video_sample_n_frames=9,
    threads=1,
    decode_workers=0,
    progress="log",
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pc") / "data"
    make_sample_dataset(root, n_videos=4, n_images=3, seed=0)
    return root


@pytest.fixture(scope="module")
def inpaint_store(dataset, tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pc_out") / "latents.zarr"
    assert run(PrecomputeConfig(data=dataset, model=tiny_model_dir, out=out, **OPTS)) == 0
    return out


def _cfg(dataset, model, out, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(data=dataset, model=model, out=out, **{**OPTS, **kw})


def test_stored_shapes_masks_and_captions(inpaint_store, dataset):
    r = open_store(inpaint_store)
    meta = json.loads((dataset / "metadata.json").read_text())
    assert sum(len(i.slots) for i in r.buckets.values()) == len(meta) == 7
    assert r.layout.masks_per_sample == 4 and r.layout.latent_format == "moments"
    assert r.scaling_factor == pytest.approx(1.15258426)
    texts = r.caption_texts()
    shared: dict = {}
    assert texts[0] == "" and sorted(texts[1:]) == sorted({m["text"] for m in meta})
    for name, info in r.buckets.items():
        f_lat, c, h, w = info.latent_shape
        assert name == f"f{f_lat}_h{h}_w{w}" and c == 16
        assert (f_lat, h, w) == ((info.frames - 1) // 4 + 1, info.height // 8, info.width // 8)
        for slot in info.slots:
            s = r.read_sample(name, slot)
            assert s["latents"].shape == (f_lat, 32, h, w) and s["latents"].dtype == torch.bfloat16
            assert s["masks"].shape == (4, f_lat, 1, h, w)
            assert s["masked_latents"].shape == (4, f_lat, 32, h, w)
            assert s["all_masked"].shape == (4,)
            m8 = s["masks"].float() * 8  # resize_mask values are multiples of 1/8 in [0, 1]
            assert torch.equal(m8, m8.round()) and m8.min() >= 0 and m8.max() <= 8
            prov = r.provenance(name, slot)
            for k in range(4):
                # The pixel mask again, from the provenance's seed: drawn at the clip length, cut.
                shape = (prov["clip_frames"], 3, info.height, info.width)
                rng = np.random.default_rng(prov["mask_seeds"][k])
                pixel_mask = random_mask(shape, rng)[0][: info.frames]
                assert bool(s["all_masked"][k]) == bool(pixel_mask.all())
                assert torch.equal(s["masks"][k, :, 0].float(), mask_to_latent(pixel_mask)[:, 0])
                if s["all_masked"][k]:  # nothing known; the bucket's shared latent
                    assert s["masks"][k].abs().sum() == 0
                    assert torch.equal(
                        s["masked_latents"][k], shared.setdefault(name, s["masked_latents"][k])
                    )
                elif not pixel_mask.any():  # nothing masked (type 3 on a short clip, ...)
                    assert torch.equal(s["masked_latents"][k], s["latents"])
                else:
                    assert not torch.equal(s["masked_latents"][k], s["latents"])
            assert r.caption_embedding(s["caption"]).shape == (226, 32)
            assert prov["file"] in {m["file_path"] for m in meta}
            assert texts[s["caption"]] == next(
                m["text"] for m in meta if m["file_path"] == prov["file"]
            )
    assert r.failures() == []


def test_latents_equal_a_direct_vae_encode(inpaint_store, dataset, tiny_model_dir):
    """One video sample re-derived by hand from its provenance: decode, crop, encode."""
    r = open_store(inpaint_store)
    name, slot = next((n, int(s)) for n, i in r.buckets.items() if i.frames > 1 for s in i.slots)
    prov, info = r.provenance(name, slot), r.buckets[name]
    frames = read_video_frames(dataset / prov["file"], prov["frames"], 128)
    pixels = resize_cover_crop(frames, info.height, info.width)  # (F, 3, H, W)
    torch.set_num_threads(1)
    vae = load_vae(tiny_model_dir)
    with torch.no_grad():
        params = vae.encode(pixels.permute(1, 0, 2, 3)[None]).latent_dist.parameters
    expected = params[0].permute(1, 0, 2, 3).to(torch.bfloat16)  # (F_lat, 2C, h, w)
    assert torch.equal(r.read_sample(name, slot)["latents"], expected)


def test_resume_skips_done_and_refuses_other_settings(
    inpaint_store, dataset, tiny_model_dir, capsys
):
    before = open_store(inpaint_store).digest()
    capsys.readouterr()
    assert run(_cfg(dataset, tiny_model_dir, inpaint_store)) == 0
    err = capsys.readouterr().err
    assert "stored 0 samples in 0 chunks, 0 failed, 7 already done" in err
    assert open_store(inpaint_store).digest() == before
    assert "torch threads" not in err
    # Another thread count resumes (nothing changes the fingerprint), with a warning: samples
    # written now may differ bitwise from the recorded count's.
    assert run(_cfg(dataset, tiny_model_dir, inpaint_store, threads=2)) == 0
    err = capsys.readouterr().err
    assert "started with 1 torch threads per process and this run uses 2" in err
    assert "--threads 1" in err and open_store(inpaint_store).digest() == before
    assert run(_cfg(dataset, tiny_model_dir, inpaint_store, seed=1, vae_mini_batch=2)) == 2
    err = capsys.readouterr().err
    assert (
        "different settings" in err and "seed: 42 -> 1" in err and "vae_mini_batch: 1 -> 2" in err
    )
    assert open_store(inpaint_store).digest() == before


def test_normal_mode_sample_format_via_cli(dataset, tiny_model_dir, inpaint_store, tmp_path):
    """The real CLI with the original's spellings; normal mode stores no masks, the same buckets."""
    out = tmp_path / "normal.zarr"
    args = ["precompute", "--train_data_dir", str(dataset), "--pretrained_model_name_or_path"]
    args += [str(tiny_model_dir), "--out", str(out), "--train_mode", "normal"]
    args += ["--latent-format", "sample", "--image_sample_size", "128", "--video-sample-size", "64"]
    args += ["--token-sample-size", "64", "--video-sample-n-frames", "9", "--threads", "1"]
    args += ["--decode-workers", "0", "--progress", "none"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    r, inpaint = open_store(out), open_store(inpaint_store)
    assert r.layout.masks_per_sample == 0 and r.layout.latent_format == "sample"
    assert list(r.buckets) == list(inpaint.buckets)  # same seed: same clips and sizes
    for name, info in r.buckets.items():
        s = r.read_sample(name, int(info.slots[0]))
        assert s["masks"] is None and s["masked_latents"] is None and s["all_masked"] is None
        f_lat, _, h, w = info.latent_shape
        assert s["latents"].shape == (f_lat, 16, h, w)
        # One posterior draw: near the mean, not equal to it.
        mean = inpaint.read_sample(name, int(info.slots[0]))["latents"][:, :16]
        assert not torch.equal(s["latents"], mean)
    assert not (out / "buckets" / name / "masks").exists()


def _bad_dataset(root: Path) -> Path:
    make_sample_dataset(root, n_videos=2, n_images=1, seed=3)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video")
    good = (root / "videos" / "video_000.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    write_video(root / "short.mp4", 2, 64, 64)  # 2 frames, stride 3: not one clip
    meta = json.loads((root / "metadata.json").read_text())
    meta += [
        {"file_path": "missing.mp4", "text": "gone", "type": "video"},
        {"file_path": "empty.mp4", "text": "empty", "type": "video"},
        {"file_path": "text.mp4", "text": "text", "type": "video"},
        {"file_path": "truncated.mp4", "text": "cut", "type": "video"},
        {"file_path": "garbage.png", "text": "noise", "type": "image"},
        {"file_path": "short.mp4", "text": "short", "type": "video"},
        {"file_path": "videos/video_001.mp4", "text": None, "type": "video"},
    ]
    (root / "metadata.json").write_text(json.dumps(meta))
    return root / "metadata.json"


def test_bad_inputs_are_recorded_and_the_run_goes_on(tmp_path, tiny_model_dir, capsys):
    _bad_dataset(tmp_path / "data")
    out = tmp_path / "s.zarr"
    assert run(_cfg(tmp_path / "data", tiny_model_dir, out, vae_mini_batch=2)) == 0
    r = open_store(out)
    assert sum(len(i.slots) for i in r.buckets.values()) == 3
    reasons = {f["file"]: f["reason"] for f in r.failures()}
    assert set(reasons) == {
        "missing.mp4", "empty.mp4", "text.mp4", "truncated.mp4", "garbage.png", "short.mp4",
        "videos/video_001.mp4",
    }  # fmt: skip
    assert "file not found" in reasons["missing.mp4"] and "missing.mp4" in reasons["missing.mp4"]
    assert "empty" in reasons["empty.mp4"]
    assert "too short" in reasons["short.mp4"]
    assert "field 'text' is null" in reasons["videos/video_001.mp4"]
    for file in ("text.mp4", "truncated.mp4", "garbage.png"):
        assert file in reasons[file]
    assert "failed 7" in capsys.readouterr().err


def test_short_decode_fails_one_sample_of_its_chunk(tmp_path, tiny_model_dir, monkeypatch):
    """A header that promises more frames than decode: that sample fails at encode time with a
    reason naming the file; the other sample of its VAE chunk is still stored."""
    root = tmp_path / "data"
    for i in range(2):
        write_video(root / f"v{i}.mp4", 40, 64, 64, seed=i)
    rows = [{"file_path": f"v{i}.mp4", "text": f"clip {i}", "type": "video"} for i in range(2)]
    (root / "metadata.json").write_text(json.dumps(rows))
    real = plan_module.probe

    def lying_probe(path, kind):
        info = real(path, kind)
        return MediaInfo(info.height, info.width, 1000) if path.name == "v1.mp4" else info

    monkeypatch.setattr(plan_module, "probe", lying_probe)
    opts = dict(random_hw_adapt=False, random_frame_crop=False, vae_mini_batch=2)
    out = tmp_path / "s.zarr"
    assert run(_cfg(root, tiny_model_dir, out, **opts)) == 0
    r = open_store(out)
    assert [(n, len(i.slots)) for n, i in r.buckets.items()] == [("f3_h8_w8", 1)]
    (failure,) = r.failures()
    assert failure["file"] == "v1.mp4" and "v1.mp4" in failure["reason"]
    assert "frame" in failure["reason"]


def test_exit_codes_when_nothing_or_malformed(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / "metadata.json").write_text(json.dumps([{"file_path": "nope.mp4", "text": "x"}]))
    assert run(_cfg(root, tiny_model_dir, tmp_path / "a.zarr")) == 1
    assert "holds no sample" in capsys.readouterr().err
    (root / "metadata.json").write_text("[{not json")
    assert run(_cfg(root, tiny_model_dir, tmp_path / "b.zarr")) == 2
    err = capsys.readouterr().err
    assert "metadata.json: line 1" in err and not (tmp_path / "b.zarr").exists()
    (root / "metadata.json").write_text("[]")
    assert run(_cfg(root, tmp_path / "no_model", tmp_path / "c.zarr")) == 2
    assert "no_model" in capsys.readouterr().err
    assert run(_cfg(root, tiny_model_dir, tmp_path / "d.zarr", vae_mini_batch=0)) == 2
    assert "--vae-mini-batch must be >= 1" in capsys.readouterr().err
    assert run(_cfg(root, tiny_model_dir, tmp_path / "d.zarr", masks_per_sample=0)) == 2
    assert "--masks-per-sample must be >= 1 in inpaint mode" in capsys.readouterr().err


def test_decode_workers_give_the_same_bytes(dataset, tiny_model_dir, inpaint_store, tmp_path):
    out = tmp_path / "w.zarr"
    assert run(_cfg(dataset, tiny_model_dir, out, decode_workers=2)) == 0
    assert open_store(out).digest() == open_store(inpaint_store).digest()
    assert np.array_equal(
        open_store(out).read_sample(*_first(out))["latents"].view(torch.int16).numpy(),
        open_store(inpaint_store).read_sample(*_first(out))["latents"].view(torch.int16).numpy(),
    )


def _first(store: Path) -> tuple[str, int]:
    r = open_store(store)
    name = next(iter(r.buckets))
    return name, int(r.buckets[name].slots[0])

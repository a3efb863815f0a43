"""The bad-input corpus: every kind in ONE precompute run, mixed with good samples. Each bad
sample is recorded with a reason naming its file or row, every good one is stored, and what the
original trains on (rotated, variable frame rate, 10-bit, tiny, 10:1) is stored, not rejected.
File-level metadata errors abort before any encoding, naming the line."""

from __future__ import annotations

import fractions
import json
import os
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from cogfun.common.store import open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.metadata import read_metadata
from cogfun.precompute.plan import content_keys, probe_key
from cogfun.precompute.run import run
from cogfun.testing.media import make_sample_dataset, write_image, write_video
from cogfun.testing.runs import OPTS

CORPUS_OPTS = {**OPTS, "variants_per_sample": 1, "masks_per_sample": 1}


@dataclass(frozen=True)
class Kind:
    """One kind of input: its metadata rows, and whether the original would train on it."""

    name: str
    rows: list[dict]
    stored: bool  # True: every row is stored; False: every row fails with a reason naming it
    says: str = ""  # a phrase the failure reason must hold (besides the file or row)


def _vfr_video(path: Path, frames: int = 30, size: int = 64) -> Path:
    """Variable frame rate: frame durations cycle through 20, 100 and 40 ms."""
    tb = fractions.Fraction(1, 1000)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options={"x264-params": "asm=0"})
        stream.width = stream.height = size
        stream.pix_fmt, stream.codec_context.time_base, stream.time_base = "yuv420p", tb, tb
        t = 0
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), i * 8, np.uint8), "rgb24")
            frame.pts, frame.time_base = t, tb
            t += (20, 100, 40)[i % 3]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), "fltp", "mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


NON_UTF8_NAME = b"clip_caf\xe9.mp4"  # Latin-1 bytes: not a UTF-8 file name


def bad_input_corpus(root: Path) -> tuple[Path, list[Kind]]:
    """Files and metadata rows of every bad-input kind, mixed with good samples, in one
    metadata.json under `root`; returns it and the kinds (good samples are kind "good")."""
    meta = make_sample_dataset(root, n_videos=2, n_images=2, seed=21)
    good = json.loads(meta.read_text())
    d = root / "bad"
    d.mkdir()

    def video(name: str, frames: int, h: int = 64, w: int = 64, **kw) -> str:
        write_video(d / name, frames, h, w, seed=len(name), **kw)
        return f"bad/{name}"

    def image(name: str, mode: str, h: int = 48, w: int = 64) -> str:
        write_image(d / name, h, w, mode=mode, seed=len(name))
        return f"bad/{name}"

    def v(path: str, text: str = "a clip") -> dict:
        return {"file_path": path, "text": text, "type": "video"}

    def i(path: str, text: str = "a still") -> dict:
        return {"file_path": path, "text": text, "type": "image"}

    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("this is not a video\n")
    clip = (root / good[0]["file_path"]).read_bytes()
    (d / "truncated.mp4").write_bytes(clip[: len(clip) // 3])
    write_image(d / "full.jpg", 64, 64, seed=3)
    jpeg = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "folder.mp4").mkdir()
    write_video(d / "latin1.tmp.mp4", 20, 64, 64, seed=9)
    os.rename(bytes(d / "latin1.tmp.mp4"), bytes(d) + b"/" + NON_UTF8_NAME)
    non_utf8 = "bad/" + os.fsdecode(NON_UTF8_NAME)  # a lone surrogate, as os.listdir gives it
    cam = video("rotated.mp4", 20, 64, 96, rotation=90)
    _audio_only(d / "audio.mp4")
    _vfr_video(d / "vfr.mp4")
    kinds = [
        Kind("good", good, True),
        Kind("missing file", [v("bad/missing.mp4")], False, "file not found"),
        Kind("zero bytes", [v("bad/empty.mp4")], False, "empty"),
        Kind("truncated mp4", [v("bad/truncated.mp4")], False),
        Kind("text file named .mp4", [v("bad/text.mp4")], False),
        Kind("mp4 without a video stream", [v("bad/audio.mp4")], False, "no video stream"),
        Kind("1-frame video", [v(video("one_frame.mp4", 1))], False, "too short"),
        Kind("video shorter than one clip", [v(video("short.mp4", 16))], True),
        Kind("variable frame rate", [v("bad/vfr.mp4")], True),
        Kind("rotated (display matrix)", [v(cam)], True),
        Kind("10-bit video", [v(video("ten_bit.mp4", 20, pix_fmt="yuv420p10le"))], True),
        Kind("huge aspect ratio 10:1", [v(video("wide.mp4", 20, 32, 320))], True),
        Kind("tiny video 16x16", [v(video("tiny.mp4", 20, 16, 16))], True),
        Kind("grayscale image", [i(image("gray.png", "L"))], True),
        Kind("RGBA image", [i(image("rgba.png", "RGBA"))], True),
        Kind("palette image", [i(image("palette.png", "P"))], True),
        Kind("CMYK image", [i(image("cmyk.jpg", "CMYK"))], True),
        Kind("16-bit image", [i(image("deep.png", "I;16"))], True),
        Kind("truncated JPEG", [i("bad/truncated.jpg")], False, "cannot decode image"),
        Kind("caption empty", [i(image("c_empty.png", "RGB"), "")], True),
        Kind(
            "caption null",
            [{**i(image("c_null.png", "RGB")), "text": None}],
            False,
            "'text' is null",
        ),
        Kind(
            "caption not a string",
            [{**i(image("c_num.png", "RGB")), "text": 12345}],
            False,
            "must be a string",
        ),
        Kind(
            "caption very long", [i(image("c_long.png", "RGB"), "a very long caption " * 600)], True
        ),
        Kind(
            "caption non-ASCII", [i(image("c_utf.png", "RGB"), "猫が走る — café, naïve 🎬")], True
        ),
        Kind("duplicate rows", [i(image("dup.png", "RGB"), "twice")] * 2, True),
        Kind(
            "row missing file_path",
            [{"text": "no file", "type": "image"}],
            False,
            "'file_path' is missing",
        ),
        Kind("row not an object", [["bad/dup.png", "a list"]], False, "expected an object"),
        Kind("unknown media type", [{**i("bad/dup.png"), "type": "audio"}], False, "'type'"),
        Kind("folder named .mp4", [v("bad/folder.mp4")], False, "not a regular file"),
        Kind("video listed as an image", [i(cam)], False, "not a readable image"),
        Kind("non-UTF-8 file name", [v(non_utf8)], False, "not a valid UTF-8 file name"),
        Kind(
            "caption with a lone surrogate",
            [i("bad/dup.png", "broken \ud800 escape")],
            False,
            "not valid Unicode",
        ),
    ]
    rows = [row for kind in kinds for row in kind.rows]
    # ensure_ascii keeps the non-UTF-8 name as a \\udce9 escape, as json.dump of os.listdir does.
    meta.write_text(json.dumps(rows, ensure_ascii=True), encoding="utf-8")
    return meta, kinds


def kind_rows(kinds: list[Kind]) -> dict[str, list[int]]:
    """Kind name -> its metadata row indices."""
    out, n = {}, 0
    for kind in kinds:
        out[kind.name] = list(range(n, n + len(kind.rows)))
        n += len(kind.rows)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("corpus")
    meta, kinds = bad_input_corpus(root / "data")
    out = root / "s.zarr"
    code = run(PrecomputeConfig(data=root / "data", model=tiny_model_dir, out=out, **CORPUS_OPTS))
    reader = open_store(out)
    # Samples are keyed by content: the row a sample came from is the row with its key.
    rows = read_metadata(meta, root / "data")
    stamps = {}
    for r in rows:
        if r.path.is_file():
            st = r.path.stat()
            stamps[probe_key(r)] = (st.st_size, st.st_mtime_ns)
    row_of = {key: r.index for (key, _, _), r in zip(content_keys(rows, stamps), rows, strict=True)}
    stored: dict[int, list[tuple[str, int]]] = {}
    for name, info in reader.buckets.items():
        for slot in info.slots:
            key = reader.provenance(name, int(slot))["key"].rsplit(".v", 1)[0]
            stored.setdefault(row_of[key], []).append((name, slot))
    failed: dict[int, list[dict]] = {}
    for f in reader.failures():
        failed.setdefault(f["row"], []).append(f)
    return code, reader, kinds, kind_rows(kinds), stored, failed


def test_corpus_has_at_least_twenty_bad_kinds_and_the_run_succeeds(corpus):
    code, reader, kinds, _, stored, failed = corpus
    assert code == 0 and reader.status == "complete"
    assert len([k for k in kinds if k.name != "good"]) >= 20
    assert reader.verify() == []
    rows = sum(len(k.rows) for k in kinds)
    assert len(stored) + len(failed) == rows  # every row accounted for, none both
    assert not set(stored) & set(failed)


KIND_NAMES = [
    "good",
    "missing file",
    "zero bytes",
    "truncated mp4",
    "text file named .mp4",
    "mp4 without a video stream",
    "1-frame video",
    "video shorter than one clip",
    "variable frame rate",
    "rotated (display matrix)",
    "10-bit video",
    "huge aspect ratio 10:1",
    "tiny video 16x16",
    "grayscale image",
    "RGBA image",
    "palette image",
    "CMYK image",
    "16-bit image",
    "truncated JPEG",
    "caption empty",
    "caption null",
    "caption not a string",
    "caption very long",
    "caption non-ASCII",
    "duplicate rows",
    "row missing file_path",
    "row not an object",
    "unknown media type",
    "folder named .mp4",
    "video listed as an image",
    "non-UTF-8 file name",
    "caption with a lone surrogate",
]


@pytest.mark.parametrize("name", KIND_NAMES)
def test_each_kind_is_stored_or_recorded_with_a_reason(corpus, name):
    _, reader, kinds, rows, stored, failed = corpus
    kind = next(k for k in kinds if k.name == name)
    for row, raw in zip(rows[name], kind.rows, strict=True):
        if kind.stored:
            assert row in stored and row not in failed, (name, row, failed.get(row))
            for bucket, slot in stored[row]:
                sample = reader.read_sample(bucket, int(slot))  # checksum verified
                assert torch.isfinite(sample["latents"].float()).all()
                text = reader.caption_texts()[sample["caption"]]
                assert text == raw["text"]
                assert reader.caption_embedding(sample["caption"]).shape == (226, 32)
            continue
        assert row not in stored, (name, row)
        (failure,) = failed[row]
        reason = failure["reason"]
        file = raw.get("file_path") if isinstance(raw, dict) else None
        names_it = f"row {row}" in reason or (bool(file) and Path(file).name in reason)
        assert names_it, reason
        assert kind.says in reason, reason


def test_what_the_original_accepts_keeps_its_shape(corpus):
    _, reader, _, rows, stored, _ = corpus
    prov = {
        name: reader.provenance(*stored[rows[name][0]][0])
        for name in rows
        if name != "good" and rows[name][0] in stored
    }
    # A 64x96 clip turned a quarter by its display matrix is a portrait 96x64 source.
    assert prov["rotated (display matrix)"]["source_hw"] == [96, 64]
    bucket = stored[rows["rotated (display matrix)"][0]][0][0]
    assert reader.buckets[bucket].height > reader.buckets[bucket].width
    assert prov["huge aspect ratio 10:1"]["source_hw"] == [32, 320]
    wide = reader.buckets[stored[rows["huge aspect ratio 10:1"][0]][0][0]]
    assert wide.width >= 4 * wide.height  # the table's widest ratio (1:4)
    assert prov["tiny video 16x16"]["source_hw"] == [16, 16]
    # 16 frames at stride 3 (9 wanted): 5 frames, a 4k+1 count, not refused.
    short = prov["video shorter than one clip"]
    start = short["frames"][0]
    assert short["frames"] == [start + 3 * k for k in range(5)] and short["clip_frames"] == 5
    assert max(prov["variable frame rate"]["frames"]) < 30
    assert len(stored[rows["duplicate rows"][0]] + stored[rows["duplicate rows"][1]]) == 2


METADATA_FILES = {
    "invalid JSON": ("metadata.json", '[{"file_path": "a.png", "text": "x"},\n {oops}]', "line 2"),
    "JSON not a list": ("metadata.json", '{"file_path": "a.png", "text": "x"}', "line 1"),
    "invalid JSON Lines": (
        "metadata.jsonl",
        '{"file_path": "a.png", "text": "x"}\n\n{"file_path": \n',
        "line 3",
    ),
    "CSV without file_path": ("metadata.csv", "path,text\na.png,x\n", "line 1"),
    "CSV unclosed quote": (
        "metadata.csv",
        'file_path,text\na.png,x\nb.png,"never closed\nc.png,y\n',
        "line 3",
    ),
    "not UTF-8": ("metadata.json", b'[{"file_path": "a.png",\n "text": "caf\xe9"}]', "line 2"),
}


@pytest.mark.parametrize("case", list(METADATA_FILES))
def test_a_malformed_metadata_file_aborts_naming_the_line(case, tmp_path, tiny_model_dir, capsys):
    name, content, line = METADATA_FILES[case]
    data = tmp_path / "data"
    data.mkdir()
    meta = data / name
    meta.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "s.zarr"
    cfg = PrecomputeConfig(data=data, meta=meta, model=tiny_model_dir, out=out, **CORPUS_OPTS)
    assert run(cfg) == 2
    err = capsys.readouterr().err
    assert f"{meta}: {line}" in err, err
    assert not out.exists()  # aborted before any store was made


def test_failures_round_trip_through_inspect_json(corpus):
    """Reasons (with escaped non-UTF-8 names) survive `cogfun inspect --json`."""
    from cogfun.testing.runs import inspect_json

    _, reader, _, rows, _, failed = corpus
    code, data, _ = inspect_json(reader.path)
    assert code == 0
    reasons = {f["row"]: f["reason"] for f in data["failed"]}
    assert reasons == {row: fs[0]["reason"] for row, fs in failed.items()}
    assert "clip_caf\\xe9.mp4" in reasons[rows["non-UTF-8 file name"][0]]
    json.dumps(data, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere

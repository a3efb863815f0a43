"""Metadata reading: formats, defaults, paths, video_repeat order, bad files and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cogfun.precompute.metadata import MetadataError, Row, read_metadata
from cogfun.testing.media import make_sample_dataset

ROWS = [
    {"file_path": "v/a.mp4", "text": "a cat", "type": "video"},
    {"file_path": "i/b.png", "text": "a dog", "type": "image"},
    {"file_path": "v/c.mp4", "text": "", "type": "video", "width": 640, "height": 360},
    {"file_path": "i/d.jpg", "text": "no type"},
]


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def _write_json(path: Path, rows) -> Path:
    return _write(path, json.dumps(rows))


def _write_jsonl(path: Path, rows) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _write_csv(path: Path, rows) -> Path:
    lines = ["file_path,text,type,width,height"]
    for r in rows:
        cells = [
            r["file_path"],
            r["text"],
            r.get("type", ""),
            r.get("width", ""),
            r.get("height", ""),
        ]
        lines.append(",".join(str(c) for c in cells))
    return _write(path, "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name, writer", [("m.json", _write_json), ("m.jsonl", _write_jsonl), ("m.csv", _write_csv)]
)
def test_formats_read_the_same_rows(tmp_path, name, writer):
    meta = writer(tmp_path / name, ROWS)
    rows = read_metadata(meta, tmp_path / "data", video_repeat=0)
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert [r.file_path for r in rows] == ["v/a.mp4", "i/b.png", "v/c.mp4", "i/d.jpg"]
    assert [r.path for r in rows] == [tmp_path / "data" / r["file_path"] for r in ROWS]
    assert [r.text for r in rows] == ["a cat", "a dog", "", "no type"]
    assert [r.type for r in rows] == ["video", "image", "video", "image"]  # missing type = image
    assert [(r.width, r.height) for r in rows] == [(None, None)] * 2 + [(640, 360)] + [(None, None)]
    assert all(r.error is None and r.repeat == 0 for r in rows)
    if name == "m.json":
        assert rows[0].line is None
    else:
        assert [r.line for r in rows] == ([1, 2, 3, 4] if name == "m.jsonl" else [2, 3, 4, 5])


def test_reads_sample_dataset(tmp_path):
    meta = make_sample_dataset(tmp_path, n_videos=2, n_images=2, fmt="csv")
    rows = read_metadata(meta, tmp_path)
    assert [r.type for r in rows] == ["image", "image", "video", "video"]
    assert all(r.path.is_file() and r.error is None for r in rows)


def test_absolute_path_wins_and_empty_root(tmp_path):
    absolute = str(tmp_path / "abs.mp4")
    meta = _write_json(tmp_path / "m.json", [{"file_path": absolute, "text": "x"}, ROWS[1]])
    rows = read_metadata(meta, tmp_path / "data")
    assert rows[0].path == Path(absolute)
    assert read_metadata(meta, "")[1].path == Path("i/b.png")


def test_video_repeat_order(tmp_path):
    meta = _write_json(tmp_path / "m.json", ROWS)
    as_is = read_metadata(meta, tmp_path, video_repeat=0)
    assert [(r.index, r.repeat) for r in as_is] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    once = read_metadata(meta, tmp_path, video_repeat=1)
    assert [(r.index, r.repeat) for r in once] == [(1, 0), (3, 0), (0, 0), (2, 0)]
    thrice = read_metadata(meta, tmp_path, video_repeat=3)
    expected = [(1, 0), (3, 0)] + [(i, k) for k in range(3) for i in (0, 2)]
    assert [(r.index, r.repeat) for r in thrice] == expected
    assert len({r.key for r in thrice}) == len(thrice)  # copies stay distinct
    assert thrice[2].key == "row0" and thrice[4].key == "row0.r1"
    with pytest.raises(ValueError, match="video_repeat must be >= 0"):
        read_metadata(meta, tmp_path, video_repeat=-1)


def test_duplicates_and_empty_caption_are_kept(tmp_path):
    row = {"file_path": "a.png", "text": ""}
    rows = read_metadata(_write_json(tmp_path / "m.json", [row, row]), tmp_path)
    assert [(r.index, r.text, r.error) for r in rows] == [(0, "", None), (1, "", None)]


def test_csv_sizes_bom_quoting_and_crlf(tmp_path):
    text = '\ufefffile_path,text,type,width,height\r\na.mp4,"hello, world",video, 64 ,48\r\n'
    text += 'b.png,"two\nlines",,,\r\n'
    rows = read_metadata(_write(tmp_path / "m.csv", text), tmp_path, video_repeat=0)
    assert rows[0] == Row(0, "a.mp4", tmp_path / "a.mp4", "hello, world", "video", 64, 48, line=2)
    assert (rows[1].text, rows[1].type, rows[1].width, rows[1].line) == (
        "two\nlines",
        "image",
        None,
        4,
    )


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "m.json",
            '[{"file_path": "a", "text": "x"},\n {"file_path": "b" "text": "y"}]',
            r"m\.json: line 2 column 20: invalid JSON: Expecting ','",
        ),
        (
            "m.json",
            '{"file_path": "a", "text": "x"}\n{"file_path": "b", "text": "y"}\n',
            r"m\.json: line 2 column 1: invalid JSON: Extra data; .*name the file \.jsonl",
        ),
        ("m.json", "", r"m\.json: line 1 column 1: invalid JSON"),
        (
            "m.json",
            '{"rows": []}',
            r"m\.json: line 1: expected a JSON list of rows, got a JSON object",
        ),
        (
            "m.jsonl",
            '{"file_path": "a", "text": "x"}\n\n{"file_path": oops}\n',
            r"m\.jsonl: line 3 column 15: invalid JSON",
        ),
        (
            "m.csv",
            "path,caption\na.mp4,x\n",
            r"m\.csv: line 1: CSV header lacks column\(s\) file_path, text \(found: 'path', 'caption'\)",
        ),
        (
            "m.csv",
            "file_path,type\na.mp4,video\n",
            r"m\.csv: line 1: CSV header lacks column\(s\) text",
        ),
        ("m.csv", "", r"m\.csv: line 1: empty CSV file"),
        ("m.yaml", "- a\n", r"m\.yaml: unknown metadata format '\.yaml'"),
    ],
)
def test_malformed_file_raises(tmp_path, name, content, expected):
    meta = _write(tmp_path / name, content)
    with pytest.raises(MetadataError, match=expected):
        read_metadata(meta, tmp_path)


def test_missing_and_non_utf8_file(tmp_path):
    with pytest.raises(MetadataError, match=r"nope\.json: metadata file not found"):
        read_metadata(tmp_path / "nope.json", tmp_path)
    meta = _write(tmp_path / "m.csv", b"file_path,text\na.png,ok\nb.png,caf\xe9\n")
    with pytest.raises(MetadataError, match=r"m\.csv: line 3: not valid UTF-8"):
        read_metadata(meta, tmp_path)


@pytest.mark.parametrize(
    "row, expected",
    [
        (["a.png", "x"], "row 1: expected an object with file_path and text, got a list"),
        ({"text": "x"}, "row 1: field 'file_path' is missing"),
        ({"file_path": "", "text": "x"}, "row 1: field 'file_path' is empty"),
        ({"file_path": 7, "text": "x"}, "row 1: field 'file_path' must be a string, got a number"),
        ({"file_path": "a.png"}, "row 1: field 'text' is missing"),
        ({"file_path": "a.png", "text": None}, "row 1: field 'text' is null"),
        ({"file_path": "a.png", "text": ["x"]}, "row 1: field 'text' must be a string, got a list"),
        ({"file_path": "a", "text": "x", "type": "movie"}, "row 1: field 'type' must be 'video' or 'image', got 'movie'"),
        ({"file_path": "a", "text": "x", "width": 64.5}, "row 1: field 'width' must be a positive integer, got 64.5"),
        ({"file_path": "a", "text": "x", "height": "tall"}, "row 1: field 'height' must be a positive integer, got 'tall'"),
        ({"file_path": "a", "text": "x", "width": 0}, "row 1: field 'width' must be a positive integer, got 0"),
        ({"file_path": "a", "text": "x", "width": True}, "row 1: field 'width' must be a positive integer, got True"),
        ({"text": None}, "row 1: field 'file_path' is missing; field 'text' is null"),
    ],
)  # fmt: skip
def test_malformed_row_sets_error(tmp_path, row, expected):
    good = {"file_path": "ok.mp4", "text": "fine", "type": "video"}
    meta = _write_json(tmp_path / "m.json", [good, row])
    rows = read_metadata(meta, tmp_path, video_repeat=2)
    bad = [r for r in rows if r.error is not None]
    assert len(bad) == 1 and bad[0].index == 1
    assert bad[0].error == f"{meta}: {expected}"
    # error rows appear once; good video rows still get repeated
    assert [(r.index, r.repeat) for r in rows] == [(1, 0), (0, 0), (0, 1)]


def test_malformed_rows_in_jsonl_and_csv_name_the_line(tmp_path):
    jsonl = _write(tmp_path / "m.jsonl", '{"file_path": "a", "text": "x"}\n\n"just a string"\n')
    rows = read_metadata(jsonl, tmp_path)
    assert (
        rows[1].error
        == f"{jsonl}: row 1 (line 3): expected an object with file_path and text, got a string"
    )

    text = (
        "file_path,text,type\na.mp4,a cat, walking,video\nb.mp4\nc.mp4,ok,Video\nd.mp4,fine,video\n"
    )
    rows = read_metadata(_write(tmp_path / "m.csv", text), tmp_path, video_repeat=0)
    assert "row 0 (line 2): 1 field(s) more than the header" in rows[0].error
    assert "row 1 (line 3): fewer fields than the header" in rows[1].error
    assert "row 2 (line 4): field 'type' must be 'video' or 'image', got 'Video'" in rows[2].error
    assert rows[3].error is None and rows[3].type == "video"

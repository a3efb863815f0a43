"""Read the dataset's metadata (annotation) file into rows, as CogVideoX-Fun / VideoX-Fun read it.

Formats, chosen by suffix:
- `.json`: a JSON list of objects;
- `.jsonl` / `.ndjson`: one JSON object per line (blank lines skipped);
- `.csv`: `csv.DictReader`, every value a string, header must name `file_path` and `text`.

Fields: `file_path` (required), `text` (required caption; `""` is valid), `type` (`"video"` or
`"image"`; missing, null or empty means image, as in the original), optional `width`/`height`
(positive integers, also as CSV strings) that let the planner skip opening the file. Extra fields are
ignored. Paths join onto `data_root` unless absolute (`os.path.join` semantics).

Errors come in two kinds:
- a malformed FILE (missing, not UTF-8, unparseable JSON, not a list, CSV header without
  `file_path`/`text`, unknown suffix) raises `MetadataError` naming the file and line;
- a malformed ROW returns a `Row` whose `error` names the file, the row and the field; the caller
  records it as a failure and goes on.

Row numbers: `Row.index` is the 0-based position of the row among the file's rows (JSON list index,
the n-th non-blank JSONL line, the n-th CSV record); messages say "row N" with that number and, for
JSONL and CSV, "line L" with the 1-based line in the file.

Order and `video_repeat` (VideoX-Fun `ImageVideoDataset.__init__`): with `video_repeat == 0` the
rows keep file order; with `video_repeat = N >= 1` all non-video rows come first (file order), then
the video rows N times over (`for r in range(N): for each video row`), each copy carrying
`repeat = r` so copies stay distinct. Rows with an error appear once, among the non-video rows.
Duplicate rows (same path and caption) are kept: the original trains on each of them.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

JSON_SUFFIXES = (".json",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)
REQUIRED_FIELDS = ("file_path", "text")
MEDIA_TYPES = ("video", "image")


class MetadataError(Exception):
    """The metadata file as a whole cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    """One metadata row (one copy of it when `video_repeat` > 1)."""

    index: int  # 0-based position among the file's rows
    file_path: str  # as written in the metadata
    path: Path  # file_path joined onto data_root (absolute file_path wins)
    text: str | None  # caption; None only on rows with an error
    type: Literal["video", "image"]
    width: int | None = None
    height: int | None = None
    error: str | None = None  # why the row cannot be used (names file, row and field)
    repeat: int = 0  # copy number under video_repeat (0 for non-video rows)
    line: int | None = None  # 1-based line in the file (JSONL and CSV)

    @property
    def key(self) -> str:
        """A stable id for this row copy, e.g. for failure records: "row7" or "row7.r2"."""
        return f"row{self.index}" if self.repeat == 0 else f"row{self.index}.r{self.repeat}"


def read_metadata(meta_path: str | Path, data_root: str | Path, video_repeat: int = 1) -> list[Row]:
    """Read every row of `meta_path`, expanded by `video_repeat` (see the module docstring)."""
    meta_path = Path(meta_path)
    if video_repeat < 0:
        raise ValueError(f"video_repeat must be >= 0, got {video_repeat}")
    records = _load_records(meta_path)
    rows = [
        _parse_row(meta_path, Path(data_root), i, line, obj)
        for i, (line, obj) in enumerate(records)
    ]
    if video_repeat == 0:
        return rows
    videos = [r for r in rows if r.type == "video" and r.error is None]
    others = [r for r in rows if not (r.type == "video" and r.error is None)]
    return others + [replace(r, repeat=k) for k in range(video_repeat) for r in videos]


def _load_records(path: Path) -> list[tuple[int | None, Any]]:
    """(line, raw row) for every row of the file; raises MetadataError for a malformed file."""
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + JSONL_SUFFIXES + CSV_SUFFIXES:
        raise MetadataError(
            f"{path}: unknown metadata format {suffix or '(no suffix)'!r}; "
            "expected .json (a list), .jsonl (one object per line) or .csv"
        )
    text = _read_text(path)
    if suffix in JSON_SUFFIXES:
        return _load_json(path, text)
    if suffix in JSONL_SUFFIXES:
        return _load_jsonl(path, text)
    return _load_csv(path, text)


def _read_text(path: Path) -> str:
    if not path.exists():
        raise MetadataError(f"{path}: metadata file not found")
    if not path.is_file():
        raise MetadataError(f"{path}: metadata path is not a file")
    data = path.read_bytes()
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark, which would
        # otherwise become part of the first CSV column name.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MetadataError(
            f"{path}: line {line}: not valid UTF-8 (byte {e.start}: {e.reason})"
        ) from None


def _load_json(path: Path, text: str) -> list[tuple[int | None, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg.startswith("Extra data"):
            hint = "; one JSON object per line is JSON Lines: name the file .jsonl"
        raise MetadataError(
            f"{path}: line {e.lineno} column {e.colno}: invalid JSON: {e.msg}{hint}"
        ) from None
    if not isinstance(data, list):
        raise MetadataError(
            f"{path}: line 1: expected a JSON list of rows, got a JSON {_json_type(data)}"
        )
    return [(None, obj) for obj in data]


def _load_jsonl(path: Path, text: str) -> list[tuple[int | None, Any]]:
    records: list[tuple[int | None, Any]] = []
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings.
    for lineno, raw in enumerate(text.split("\n"), start=1):
        raw = raw.rstrip("\r")
        if not raw.strip():
            continue
        try:
            records.append((lineno, json.loads(raw)))
        except json.JSONDecodeError as e:
            raise MetadataError(
                f"{path}: line {lineno} column {e.colno}: invalid JSON: {e.msg}"
            ) from None
    return records


def _load_csv(path: Path, text: str) -> list[tuple[int | None, Any]]:
    # strict: an unclosed quote is an error, not a caption that swallows the rest of the file.
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    ended = 0  # the line the last good record (or the header) ended on
    try:
        header = reader.fieldnames
        ended = reader.line_num
        if header is None:
            raise MetadataError(
                f"{path}: line 1: empty CSV file, expected a header with file_path,text"
            )
        missing = [f for f in REQUIRED_FIELDS if f not in header]
        if missing:
            found = ", ".join(repr(h) for h in header)
            raise MetadataError(
                f"{path}: line 1: CSV header lacks column(s) {', '.join(missing)} (found: {found})"
            )
        # reader.line_num is the line a record ends on (a quoted caption may span lines).
        records: list[tuple[int | None, Any]] = []
        for record in reader:
            ended = reader.line_num
            records.append((ended, _check_csv_width(record)))
        return records
    except csv.Error as e:  # the bad record starts on the line after the last good one
        hint = " (a quote that is never closed?)" if "end of data" in str(e) else ""
        raise MetadataError(f"{path}: line {ended + 1}: invalid CSV: {e}{hint}") from None


# Key under which _check_csv_width leaves a record-shape problem for _parse_row (not a str, so it
# cannot clash with a column name).
_CSV_PROBLEM = ("csv", "problem")


def _check_csv_width(record: dict) -> dict:
    """Flag CSV records with more or fewer fields than the header (DictReader pads/collects them)."""
    extra = record.pop(None, None)  # DictReader's key for fields beyond the header
    if extra is not None:
        record[_CSV_PROBLEM] = (
            f"{len(extra)} field(s) more than the header (an unquoted comma in the caption?)"
        )
    elif any(v is None for v in record.values()):  # DictReader's filler for missing fields
        record[_CSV_PROBLEM] = "fewer fields than the header"
    return record


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")


def _parse_row(meta_path: Path, data_root: Path, index: int, line: int | None, obj: Any) -> Row:
    """Validate one raw row; problems go into Row.error rather than raising."""
    where = f"{meta_path}: row {index}" + (f" (line {line})" if line is not None else "")
    if not isinstance(obj, dict):
        error = f"{where}: expected an object with file_path and text, got a {_json_type(obj)}"
        return Row(index, "", data_root, None, "image", error=error, line=line)

    problems: list[str] = []
    if _CSV_PROBLEM in obj:
        problems.append(obj[_CSV_PROBLEM])

    file_path = obj.get("file_path")
    if "file_path" not in obj or file_path is None:
        problems.append("field 'file_path' is missing")
        file_path = ""
    elif not isinstance(file_path, str):
        problems.append(f"field 'file_path' must be a string, got a {_json_type(file_path)}")
        file_path = ""
    elif not file_path.strip():
        problems.append("field 'file_path' is empty")
    elif not _is_unicode(file_path):
        # A non-UTF-8 name on disk (json.dump of os.listdir writes it as a lone surrogate): no
        # video reader opens it, and it cannot be stored as UTF-8 text. Shown with its bytes.
        file_path = _printable(file_path)
        problems.append(f"field 'file_path' '{file_path}' is not a valid UTF-8 file name")

    text = obj.get("text")
    if "text" not in obj:
        problems.append("field 'text' is missing")
    elif text is None:
        problems.append("field 'text' is null")
    elif not isinstance(text, str):
        problems.append(f"field 'text' must be a string, got a {_json_type(text)}")
        text = None
    elif not _is_unicode(text):
        shown = _printable(text)[:60]
        problems.append(f"field 'text' '{shown}' is not valid Unicode (a lone surrogate escape)")
        text = None

    media_type = obj.get("type")
    if media_type is None or media_type == "":
        media_type = "image"  # the original's default: data.get('type', 'image')
    elif media_type not in MEDIA_TYPES:
        problems.append(f"field 'type' must be 'video' or 'image', got {media_type!r}")
        media_type = "image"

    width = _parse_size(obj, "width", problems)
    height = _parse_size(obj, "height", problems)

    error = f"{where}: " + "; ".join(problems) if problems else None
    path = data_root / file_path if file_path else data_root
    return Row(index, file_path, path, text, media_type, width, height, error, line=line)


def _is_unicode(value: str) -> bool:
    """False for strings holding lone surrogates (JSON allows `\\udce9` escapes; UTF-8 does not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(value: str) -> str:
    """`value` with lone surrogates shown as escapes: the raw byte (`\\xe9`) for the ones
    os.fsdecode makes of a non-UTF-8 name, else the code point (`\\ud800`)."""
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_size(obj: dict, field: str, problems: list[str]) -> int | None:
    """A positive int from an int, an integral float or a decimal string; None when absent/empty."""
    value = obj.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    size: int | None = None
    if isinstance(value, bool):
        size = None
    elif isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and value.strip().isdecimal():
        size = int(value.strip())
    if size is None or size <= 0:
        problems.append(f"field '{field}' must be a positive integer, got {value!r}")
        return None
    return size

"""Safety: nothing in a store is unpickled or executed. Pickles whose `__reduce__` would create a
marker file are planted in the store folder, beside its arrays, as a chunk, as probes.json, as
zarr v2 metadata and as a pickle codec; opening, reading, `cogfun inspect --verify`, resuming
precompute and loading a model folder never create the marker. A static scan of cogfun's code
finds no unpickling call."""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
from cogfun.common.store import StoreError, open_store
from cogfun.precompute.config import PrecomputeConfig
from cogfun.precompute.run import run
from cogfun.testing.runs import OPTS, fault_dataset, inspect_json

PACKAGE = Path(__file__).resolve().parent.parent


class Planted:
    """Unpickling this runs os.system: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> tuple[Path, Path, str]:
    root = tmp_path_factory.mktemp("safety")
    data = fault_dataset(root / "data")
    out = root / "s.zarr"
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=out, **OPTS)) == 0
    return out, data, open_store(out).digest()


def _plant_beside(store: Path, payload: bytes) -> list[Path]:
    """Pickles where a naive loader would look, none replacing a store file."""
    bucket = next(p for p in (store / "buckets").iterdir() if p.is_dir())
    targets = [
        store / "state.pkl",
        store / "latents.pt",
        store / "index.npy",
        store / "failures" / "x.pkl",
        bucket / "extra.pt",
        bucket / "latents" / "c.0.0.0.0.0.pkl",
        store / "captions" / "emb.pt",
    ]
    for t in targets:
        t.write_bytes(payload)
    # zarr v2 metadata (what zarr would open with a pickle codec if it looked for v2 first)
    v2 = {
        "zarr_format": 2,
        "shape": [1],
        "chunks": [1],
        "dtype": "|O",
        "compressor": None,
        "fill_value": None,
        "filters": [{"id": "pickle"}],
        "order": "C",
    }
    (store / ".zgroup").write_text('{"zarr_format": 2}')
    (bucket / "provenance" / ".zarray").write_text(json.dumps(v2))
    (bucket / "provenance" / "0").write_bytes(payload)
    return targets


def _use_everything(store: Path) -> dict:
    reader = open_store(store)
    for name, info in reader.buckets.items():
        reader.read_batch(name, info.slots)
        for slot in info.slots:
            reader.provenance(name, int(slot))
    reader.caption_texts()
    reader.failures()
    code, summary, err = inspect_json(store, "--verify")
    assert code == 0, err
    return summary


@pytest.mark.filterwarnings("ignore:Both zarr.json")
def test_planted_pickles_beside_the_store_are_never_loaded(store, tmp_path, tiny_model_dir):
    ref, data, digest = store
    case = Path(shutil.copytree(ref, tmp_path / "s.zarr"))
    marker = tmp_path / "PWNED"
    payload = pickle.dumps(Planted(marker))
    pickle.loads(payload)  # the control: unpickling it does run code
    assert marker.exists()
    marker.unlink()
    _plant_beside(case, payload)
    (case / "probes.json").write_bytes(payload)  # precompute's header cache, read on resume
    summary = _use_everything(case)
    assert summary["digest"] == digest and summary["intact"] is True
    # Resuming precompute reads probes.json, the flags and the failures: still nothing loaded.
    assert run(PrecomputeConfig(data=data, model=tiny_model_dir, out=case, **OPTS)) == 0
    assert open_store(case).digest() == digest
    assert not marker.exists()


def test_a_pickle_in_place_of_a_chunk_is_damage_not_code(store, tmp_path):
    ref, _, _ = store
    case = Path(shutil.copytree(ref, tmp_path / "s.zarr"))
    marker = tmp_path / "PWNED"
    bucket = next(iter(open_store(case).buckets))
    chunk = next((case / "buckets" / bucket / "latents").glob("c.*"))
    chunk.write_bytes(pickle.dumps(Planted(marker)))
    code, data, _ = inspect_json(case, "--verify")
    assert code == 1 and (bucket, int(chunk.name.split(".")[1])) in {
        (d["bucket"], d["slot"]) for d in data["damaged"]
    }
    assert not marker.exists()


@pytest.mark.parametrize("codec", ["numcodecs.pickle", "pickle"])
def test_a_pickle_codec_in_array_metadata_is_refused(store, tmp_path, codec):
    ref, _, _ = store
    case = Path(shutil.copytree(ref, tmp_path / "s.zarr"))
    marker = tmp_path / "PWNED"
    bucket = next(iter(open_store(case).buckets))
    folder = case / "buckets" / bucket / "provenance"
    meta = json.loads((folder / "zarr.json").read_text())
    meta["codecs"] = [{"name": codec, "configuration": {}}]
    (folder / "zarr.json").write_text(json.dumps(meta))
    for chunk in (p for p in folder.rglob("*") if p.is_file() and p.name != "zarr.json"):
        chunk.write_bytes(pickle.dumps(Planted(marker)))
    code, data, err = inspect_json(case, "--verify")
    assert code != 0
    with pytest.raises(StoreError):
        open_store(case).provenance(bucket, 0)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_model_folder_with_pickled_weights_is_not_unpickled(tiny_model_dir, tmp_path):
    from cogfun.common.models import load_vae

    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    marker = tmp_path / "PWNED"
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(Exception):  # noqa: B017 - refused by whichever layer sees it first
        load_vae(model)
    assert not marker.exists()


UNSAFE = {  # call -> the keyword that makes it safe (None: never safe)
    "pickle.load": None,
    "pickle.loads": None,
    "marshal.load": None,
    "marshal.loads": None,
    "dill.load": None,
    "joblib.load": None,
    "shelve.open": None,
    "eval": None,
    "exec": None,
    "torch.load": "weights_only",
    "yaml.load": "Loader",
}


def _call_name(node: ast.Call) -> str:
    f = node.func
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return ""


def test_no_unpickling_call_in_cogfun():
    found = []
    for folder in ("common", "precompute", "train", "config"):
        for file in sorted((PACKAGE / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(file.read_text(), str(file))):
                if not isinstance(node, ast.Call):
                    continue
                name = _call_name(node)
                if name in ("np.load", "numpy.load"):
                    unsafe = any(k.arg == "allow_pickle" for k in node.keywords)
                elif name in UNSAFE:
                    safe_kw = UNSAFE[name]
                    kws = {k.arg: k.value for k in node.keywords}
                    unsafe = safe_kw is None or not (
                        safe_kw in kws
                        and (
                            safe_kw != "weights_only"
                            or getattr(kws[safe_kw], "value", None) is True
                        )
                        and (safe_kw != "Loader" or "Safe" in ast.unparse(kws[safe_kw]))
                    )
                else:
                    continue
                if unsafe:
                    found.append(f"{file.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)}")
    assert found == []

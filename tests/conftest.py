"""Shared fixtures. Everything runs offline on CPU with tiny models and generated media."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("COLUMNS", "300")  # rich wraps error boxes at the terminal width

# Outputs of the original CogVideoX-Fun code (see tests/golden/README.md), copied into the repo.
GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    return GOLDEN


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny 2b-inp model folder shared by the whole session (read-only for tests)."""
    from cogfun.testing.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model", variant="2b-inp", seed=0)


@pytest.fixture
def t5_builds(monkeypatch):
    """Every T5EncoderModel constructed in this process (tests assert how many)."""
    import transformers

    built: list[str] = []
    init = transformers.T5EncoderModel.__init__

    def spy(self, *args, **kwargs):
        built.append(type(self).__name__)
        init(self, *args, **kwargs)

    monkeypatch.setattr(transformers.T5EncoderModel, "__init__", spy)
    return built


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, started once for the session (cogfun.testing.s3)."""
    from cogfun.testing.s3 import S3Server

    server = S3Server().start()
    yield server
    server.close()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh bucket on the session's S3 server; the server is running when the test starts."""
    if not s3_server.running:
        s3_server.start()
    return s3_server.make_bucket()


@pytest.fixture()
def app_and_seen():
    """Both stage commands, recording what they were called with instead of running."""
    import typer
    from cogfun.app.stage_command import add_stage_command
    from cogfun.app.stage_flags import TRAIN_STORE_SKIP, foreign_flags
    from cogfun.precompute.config import PrecomputeConfig
    from cogfun.train.config import TrainConfig

    seen: list = []
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test root"""

    add_stage_command(
        app, "train", TrainConfig, lambda cfg, store: seen.append((cfg, store)), help="train",
        foreign=foreign_flags("train"), extra_cls=PrecomputeConfig, extra_skip=TRAIN_STORE_SKIP,
    )  # fmt: skip
    add_stage_command(
        app, "precompute", PrecomputeConfig, seen.append, help="pre",
        foreign=foreign_flags("precompute"),
    )  # fmt: skip
    return app, seen

"""Real tokenizer folders: a sentencepiece `spiece.model` laid out as t5-v1_1-xxl ships it.

A small unigram model is trained here, so the test needs no download, and cogfun's loader must give
sentencepiece's own ids plus EOS, padded/truncated to 226 as the original's scripts/train.py.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from cogfun.common.models import ModelFolderError, encode_prompts, load_tokenizer

sentencepiece = pytest.importorskip("sentencepiece")

SUBJECTS = ["a man", "a woman", "the dog", "a small cat", "two children", "an old fisherman",
            "the red car", "a flock of birds", "a golden retriever", "the yellow taxi",
            "three horses", "a young dancer"]  # fmt: skip
ACTIONS = ["is walking", "runs quickly", "sleeps quietly", "plays happily", "drives slowly",
           "is swimming", "looks around", "jumps over a fence", "climbs a wooden ladder",
           "waves at the camera", "eats breakfast"]  # fmt: skip
PLACES = ["in the park", "on the beach at sunset", "through a busy city street",
          "near the mountain lake", "under heavy rain", "inside a cozy kitchen",
          "across the snowy field", "beside the river", "during a thunderstorm",
          "in slow motion, cinematic lighting"]  # fmt: skip
EXTRA_IDS = 3  # the real folder has 100 sentinel tokens; a few keep the same layout


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> tuple[Path, object]:
    """(model folder with only tokenizer/, sentencepiece processor of its spiece.model)."""
    corpus = [f"{s} {a} {p}." for s, a, p in itertools.product(SUBJECTS, ACTIONS, PLACES)]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=100,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    root = tmp_path_factory.mktemp("spm") / "model"
    folder = root / "tokenizer"
    folder.mkdir(parents=True)
    (folder / "spiece.model").write_bytes(buffer.getvalue())
    sentinels = [f"<extra_id_{i}>" for i in range(EXTRA_IDS)]
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**specials, "additional_special_tokens": sentinels})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                **specials,
                "additional_special_tokens": sentinels,
                "extra_ids": EXTRA_IDS,
                "legacy": True,
                "model_max_length": 226,
                "sp_model_kwargs": {},
                "tokenizer_class": "T5Tokenizer",
            }
        )
    )
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    assert processor.get_piece_size() == 100
    return root, processor


@pytest.fixture(scope="module")
def tokenizer(spm_model):
    return load_tokenizer(spm_model[0])


class _RecordingEncoder(torch.nn.Module):
    """Stands in for T5: records what it is called with and returns the ids as a (B, L, 1) state."""

    device = torch.device("cpu")

    def forward(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs
        return (args[0].float().unsqueeze(-1),)


def _encode_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    encoder = _RecordingEncoder()
    out = encode_prompts(tokenizer, encoder, texts)
    assert encoder.kwargs == {}  # input_ids only: no attention mask reaches T5
    return out[..., 0].long()  # (B, 226)


def test_ids_are_sentencepiece_ids_plus_eos(tokenizer, spm_model):
    _, processor = spm_model
    for text in ["a man is walking in the park.", "the dog plays on the beach at sunset",
                 "two children climbs a wooden ladder during a thunderstorm"]:  # fmt: skip
        expected = processor.encode(text)
        assert tokenizer(text).input_ids == [*expected, 1]
        assert 2 not in expected  # in-vocabulary text: no unk
        assert len(set(expected)) > 3


def test_padded_to_226_with_eos(tokenizer, spm_model):
    _, processor = spm_model
    text = "a young dancer waves at the camera"
    ids = _encode_ids(tokenizer, [text])[0]
    n = len(processor.encode(text))
    assert ids.shape == (226,)
    assert ids[:n].tolist() == processor.encode(text)
    assert ids[n].item() == 1
    assert (ids[n + 1 :] == 0).all()


def test_long_caption_truncated_with_eos_last(tokenizer, spm_model):
    _, processor = spm_model
    triples = itertools.islice(itertools.product(SUBJECTS, ACTIONS, PLACES), 0, 400, 13)
    text = " ".join(f"{s} {a} {p}." for s, a, p in triples)
    full = processor.encode(text)
    assert len(full) > 300
    ids = _encode_ids(tokenizer, [text])[0]
    assert ids.shape == (226,)
    assert ids[:225].tolist() == full[:225]
    assert ids[225].item() == 1


def test_empty_caption_is_eos_then_pads(tokenizer):
    ids = _encode_ids(tokenizer, ["", "a man"])
    assert ids[0].tolist() == [1] + [0] * 225
    assert ids[1, :3].tolist() != [1, 0, 0]


def test_sentinel_tokens_follow_the_vocab(tokenizer):
    # The real layout: sentinels after the sentencepiece vocab, <extra_id_0> last.
    assert len(tokenizer) == 100 + EXTRA_IDS
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == 100 + EXTRA_IDS - 1


def test_a_tokenizer_that_ignores_spiece_model_is_refused(spm_model, monkeypatch):
    """transformers 5 trap: T5Tokenizer(vocab_file=...) silently drops the file (all unk)."""
    import transformers

    root, _ = spm_model
    broken = transformers.T5Tokenizer(vocab_file=str(root / "tokenizer" / "spiece.model"))
    assert set(broken("the dog").input_ids) <= {1, 2, 3}  # unk, the word marker, EOS
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: broken)
    )
    with pytest.raises(ModelFolderError, match="unk") as err:
        load_tokenizer(root)
    assert str(root / "tokenizer") in str(err.value)


def test_a_tokenizer_that_disagrees_with_spiece_model_is_refused(spm_model, monkeypatch):
    import transformers

    root, _ = spm_model
    words = "a man is walking his dog in the park on sunny day".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"▁{w}", -1.0) for w in words]
    other = transformers.T5Tokenizer(vocab=vocab, extra_ids=0)
    monkeypatch.setattr(
        transformers.AutoTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: other)
    )
    with pytest.raises(ModelFolderError, match="sentencepiece model was not used"):
        load_tokenizer(root)

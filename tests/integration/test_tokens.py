"""Prepared token files: the same tokens, vocabulary and provenance as encoding the text in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from nextchar.training import tokens  # noqa: E402
from nextchar.training.config import TrainConfig  # noqa: E402
from nextchar.training.corpora import CorpusError  # noqa: E402
from nextchar.training.tokens import open_corpus, open_prepared, prepare  # noqa: E402
from nextchar.training.train import train  # noqa: E402

TEXT = "Ő’er the ramparts — we watch’d\nand the rocket’s red glare ÿ\n" * 40


def test_prepare_matches_in_memory_encoding_across_chunk_boundaries(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "anthem.txt"
    src.write_bytes(b"\xef\xbb\xbf" + TEXT.encode("utf-8"))  # a BOM, and multi-byte characters
    monkeypatch.setattr(tokens, "CHUNK_BYTES", 7)  # chunks end inside characters
    p, m = prepare(src, tmp_path / "prep"), open_corpus(str(src))
    assert isinstance(p.tokens, np.memmap) and p.tokens.dtype == np.uint16
    assert p.vocab == m.vocab == sorted(set(TEXT)) and np.array_equal(p.tokens, m.tokens)
    assert p.info() == m.info() and p.info()["chars"] == len(TEXT)
    assert json.loads((tmp_path / "prep" / "meta.json").read_text())["dtype"] == "uint16"


def test_large_vocabularies_use_uint32(tmp_path: Path) -> None:
    src = tmp_path / "cjk.txt"
    src.write_text("".join(chr(c) for c in range(0x4E00, 0x4E00 + 70_000) if not 0xD800 <= c < 0xE000),
                   encoding="utf-8")
    assert prepare(src, tmp_path / "p").tokens.dtype == np.uint32


def test_bad_inputs_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"abc\xffdef")
    with pytest.raises(CorpusError, match=r"not UTF-8: invalid byte 0xff at byte offset 3"):
        prepare(bad, tmp_path / "p")
    with pytest.raises(CorpusError, match=r"without meta\.json"):
        open_prepared(tmp_path)


def test_training_from_a_prepared_corpus_equals_training_from_the_file(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    src = tmp_path / "anthem.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare(src, tmp_path / "prep")
    runs = []
    for name, corpus in (("file", src), ("prep", tmp_path / "prep")):
        config = TrainConfig(corpus=str(corpus), hidden_size=16, embedding_dim=4, batch_size=4, seq_len=16,
                             max_steps=20, eval_every=10, patience=0, sample_chars=0, schedule="constant")
        runs.append(train(config, tmp_path / name, progress=False, log=lambda _: None).metrics)
    strip = [[{k: v for k, v in r.items() if k not in ("chars_per_s", "elapsed_s")} for r in m] for m in runs]
    assert strip[0] == strip[1]

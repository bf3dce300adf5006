"""Token corpora: a text encoded in memory, or a prepared memory-mapped token file (`nextchar prepare`)."""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nextchar.training.corpora import CorpusError, build_vocab, load_corpus

FORMAT = "nextchar.tokens.v1"
META, TOKENS = "meta.json", "tokens.bin"
CHUNK_BYTES = 1 << 22  # prepare reads 4 MiB at a time, so its memory does not grow with the corpus
_UNICODE = 0x110000
_BOM = codecs.BOM_UTF8


@dataclass(frozen=True)
class TokenCorpus:
    """A corpus as token ids into `vocab` (sorted distinct characters), identified by its text's sha256."""

    name: str
    sha256: str
    num_bytes: int
    vocab: list[str]
    tokens: np.ndarray  # uint16/uint32[chars]; a read-only np.memmap for a prepared corpus

    def info(self) -> dict:
        return {"name": self.name, "sha256": self.sha256, "bytes": self.num_bytes, "chars": len(self.tokens)}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def _codes(text: str) -> np.ndarray:
    """text -> uint32[len(text)] Unicode code points (vectorised; no per-character Python)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _lookup(vocab: list[str]) -> np.ndarray:
    """code point -> token id table for `vocab`."""
    lut = np.zeros(max(ord(c) for c in vocab) + 1, dtype=np.uint32)
    lut[[ord(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint32)
    return lut


def open_corpus(name_or_path: str) -> TokenCorpus:
    """A prepared directory (memory-mapped), else a built-in corpus or UTF-8 file encoded in memory."""
    path = Path(name_or_path)
    if path.is_dir():
        return open_prepared(path)
    corpus = load_corpus(name_or_path)
    vocab = build_vocab(corpus.text)
    tokens = _lookup(vocab)[_codes(corpus.text)].astype(token_dtype(len(vocab))) if corpus.text else \
        np.zeros(0, token_dtype(2))
    return TokenCorpus(corpus.name, corpus.sha256, corpus.num_bytes, vocab, tokens)


def open_prepared(directory: Path) -> TokenCorpus:
    meta_path = directory / META
    if not meta_path.is_file():
        raise CorpusError(f"{str(directory)!r} is a directory without {META}; "
                          "make one with `nextchar prepare`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise CorpusError(f"{str(meta_path)!r} is not a {FORMAT} file")
    dtype = np.dtype(meta["dtype"])
    size = (directory / TOKENS).stat().st_size
    if size != meta["chars"] * dtype.itemsize:
        raise CorpusError(f"{str(directory / TOKENS)!r} has {size} bytes; {META} says "
                          f"{meta['chars']} {dtype.name} tokens")
    tokens = np.memmap(directory / TOKENS, dtype=dtype, mode="r", shape=(meta["chars"],)) if size else \
        np.zeros(0, dtype)
    return TokenCorpus(meta["name"], meta["sha256"], meta["bytes"], list(meta["vocab"]), tokens)


def _texts(source: Path):
    """The file's text in chunks, decoded incrementally (a chunk may end inside a character)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with source.open("rb") as f:
        while data := f.read(CHUNK_BYTES):
            if offset == 0 and data.startswith(_BOM):
                data = data[len(_BOM):]  # an encoding marker, not a character (as load_corpus)
                offset = len(_BOM)
            try:
                yield data, decoder.decode(data)
            except UnicodeDecodeError as e:
                raise CorpusError(f"corpus {str(source)!r} is not UTF-8: invalid byte 0x{data[e.start]:02x} "
                                  f"at byte offset {offset + e.start}") from None
            offset += len(data)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise CorpusError(f"corpus {str(source)!r} is not UTF-8: it ends inside a character") from None


def prepare(source: Path, out: Path) -> TokenCorpus:
    """Encode the UTF-8 file `source` into `out`/tokens.bin + meta.json in two streaming passes.

    Pass one counts code points (the vocabulary) and hashes the text; pass two writes token ids. Memory
    stays at a few chunks whatever the corpus size. meta.json is written last: its presence means done.
    """
    if not source.is_file():
        raise CorpusError(f"corpus {str(source)!r} is not a file")
    counts = np.zeros(_UNICODE, dtype=np.int64)
    digest, num_bytes = hashlib.sha256(), 0
    for data, text in _texts(source):
        digest.update(data)
        num_bytes += len(data)
        counts += np.bincount(_codes(text), minlength=_UNICODE)
    vocab = [chr(c) for c in np.flatnonzero(counts)]  # code point order == build_vocab's sorted order
    if len(vocab) < 2:
        raise CorpusError(f"corpus {str(source)!r} has {len(vocab)} distinct characters; a model needs 2")
    dtype, lut = token_dtype(len(vocab)), _lookup(vocab)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).unlink(missing_ok=True)
    with (out / TOKENS).open("wb") as f:
        for _, text in _texts(source):
            f.write(lut[_codes(text)].astype(dtype).tobytes())
    meta = {"format": FORMAT, "name": source.name, "sha256": digest.hexdigest(), "bytes": num_bytes,
            "chars": int(counts.sum()), "dtype": dtype.name, "vocab": vocab}
    tmp = out / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, out / META)
    return open_prepared(out)

"""Training text, tokenizers and batches for ``gradproj train``.

The default corpus needs no download: the ``.py`` sources of the Python standard library of the running
interpreter, read in sorted path order. Any corpus is tokenized into one stream of token ids (documents
separated by an end-of-text token) and split into train and validation by interleaved blocks: the stream
is cut into blocks of up to 64 Ki tokens and every k-th block (k = round(1 / val_fraction)) is held out.

Batches are a pure function of ``(seed, step, micro-step)``: window starts are drawn from a generator
seeded with those numbers, so a resumed run sees exactly the batches of an uninterrupted one, and a
run over several processes sees the batches of a single process with the same global batch.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("gradproj")

#: suffixes read when ``--data`` names a directory
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl", ".json")
EOT = "<|endoftext|>"
_BLOCK = 65536


# --------------------------------------------------------------------------------------------- sources
def stdlib_files(root: str | os.PathLike | None = None) -> list[Path]:
    """The ``.py`` files of the standard library (no site-packages), sorted by their relative path."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rel: list[str] = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__")]
        base = Path(directory).relative_to(root)
        rel.extend((base / f).as_posix() for f in files if f.endswith(".py"))
    return [root / r for r in sorted(rel)]


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def _jsonl_texts(path: Path, text_key: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(f"{path}:{lineno}: expected an object with a {text_key!r} field (set --text-key)")
            yield str(record[text_key])


def _expand(spec: str) -> list[Path]:
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
        return sorted(found, key=lambda p: p.relative_to(path).as_posix())
    if path.is_file():
        return [path]
    matches = sorted(glob.glob(spec, recursive=True))
    return [Path(m) for m in matches if Path(m).is_file()]


def iter_documents(data: list[str] | None, text_key: str = "text", max_bytes: int | None = None) -> Iterator[str]:
    """Documents of a corpus, in a deterministic order, stopping once ``max_bytes`` of text were read.

    ``data`` is ``None`` (the standard library's sources) or a list of: text files, ``.jsonl`` files (one
    JSON object per line, text under ``text_key``), directories, glob patterns, or ``hf:NAME[:CONFIG]``
    for a dataset of the ``datasets`` library (needs the network or a local cache). The last document is
    cut so that exactly ``max_bytes`` bytes of UTF-8 are read (fewer when a character would be split).
    """
    total = 0

    def sources() -> Iterator[str]:
        if not data:
            for path in stdlib_files():
                yield _read_text(path)
            return
        for spec in data:
            if spec.startswith("hf:"):
                yield from _hf_texts(spec[3:], text_key)
                continue
            paths = _expand(spec)
            if not paths:
                raise ValueError(f"--data {spec!r}: no such file, directory or glob match")
            for path in paths:
                if path.suffix == ".jsonl":
                    yield from _jsonl_texts(path, text_key)
                else:
                    yield _read_text(path)

    for text in sources():
        if not text:
            continue
        raw = text.encode("utf-8")
        if max_bytes is not None and total + len(raw) >= max_bytes:
            yield raw[: max_bytes - total].decode("utf-8", errors="ignore")
            return
        yield text
        total += len(raw)


def _hf_texts(name: str, text_key: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover
        raise ImportError("--data hf:... needs the datasets package: pip install 'gradproj[hf]'") from err
    dataset, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(dataset, config or None, split="train", streaming=True)
    except Exception as err:  # network off, unknown name, ...
        raise ValueError(
            f"--data hf:{name}: could not load the dataset ({type(err).__name__}: {err}). "
            "Without network access use local text / jsonl files instead."
        ) from None
    for record in ds:
        if text_key not in record:
            raise ValueError(
                f"--data hf:{name}: records have no {text_key!r} field (set --text-key); fields: {sorted(record)}"
            )
        yield str(record[text_key])


# ------------------------------------------------------------------------------------------ tokenizers
class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, byte 0 (NUL) separates documents. Needs no training."""

    kind = "byte"
    vocab_size = 256
    eot_id = 0

    def encode_corpus(self, docs: Iterable[str]) -> torch.Tensor:
        parts = [np.frombuffer(d.encode("utf-8") + b"\x00", dtype=np.uint8) for d in docs]
        if not parts:
            return torch.empty(0, dtype=torch.uint8)
        return torch.from_numpy(np.concatenate(parts))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A byte-level BPE trained locally with the ``tokenizers`` library on the training corpus."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.eot_id = tokenizer.token_to_id(EOT)

    @classmethod
    def train(cls, docs: list[str], vocab_size: int, max_train_bytes: int = 8_000_000) -> BPETokenizer:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as err:  # pragma: no cover
            raise ImportError("--tokenizer bpe needs the tokenizers package: pip install tokenizers") from err
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        sample, size = [], 0
        for d in docs:
            sample.append(d)
            size += len(d)
            if size >= max_train_bytes:
                break
        tok.train_from_iterator(sample, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | os.PathLike) -> None:
        self.tok.save(str(path))

    def encode_corpus(self, docs: Iterable[str]) -> torch.Tensor:
        ids: list[int] = []
        batch: list[str] = []

        def flush():
            for enc in self.tok.encode_batch(batch):
                ids.extend(enc.ids)
                ids.append(self.eot_id)
            batch.clear()

        for d in docs:
            batch.append(d)
            if len(batch) >= 256:
                flush()
        flush()
        dtype = torch.int16 if self.vocab_size <= 32767 else torch.int32
        return torch.tensor(ids, dtype=dtype)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


# ------------------------------------------------------------------------------------------- the data
@dataclass
class TokenData:
    """A tokenized corpus split into train and validation streams."""

    train: torch.Tensor
    val: torch.Tensor
    vocab_size: int
    tokenizer: object

    def describe(self) -> str:
        return f"{len(self.train):,} train / {len(self.val):,} validation tokens, vocabulary {self.vocab_size}"


def split_stream(tokens: torch.Tensor, val_fraction: float, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved block split: every k-th block of the stream is validation (k = round(1 / val_fraction))."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction = {val_fraction} must be in (0, 1)")
    period = max(2, round(1.0 / val_fraction))
    need = seq_len + 1
    block = min(_BLOCK, len(tokens) // (2 * period))
    if block < need:
        raise ValueError(
            f"the corpus has {len(tokens):,} tokens, too few for a train/validation split with windows of "
            f"{need} tokens; give more data (or a larger --max-bytes) or a shorter --seq-len"
        )
    n_blocks = len(tokens) // block
    blocks = tokens[: n_blocks * block].view(n_blocks, block)
    is_val = torch.arange(n_blocks) % period == period - 1
    train = torch.cat([blocks[~is_val].reshape(-1), tokens[n_blocks * block :]])
    val = blocks[is_val].reshape(-1)
    return train, val


def load_data(
    data: list[str] | None = None,
    *,
    seq_len: int,
    tokenizer: str = "byte",
    vocab_size: int = 4096,
    val_fraction: float = 0.05,
    max_bytes: int | None = None,
    text_key: str = "text",
    tokenizer_path: str | os.PathLike | None = None,
) -> TokenData:
    """Read, tokenize and split a corpus (see :func:`iter_documents` for ``data``).

    ``tokenizer`` is ``"byte"`` or ``"bpe"`` (trained on the corpus with ``vocab_size`` entries, or loaded
    from ``tokenizer_path`` when that file exists, so a resumed run uses the very same tokenizer).
    """
    docs: Iterable[str] = iter_documents(data, text_key=text_key, max_bytes=max_bytes)
    tok: ByteTokenizer | BPETokenizer
    if tokenizer == "byte":
        tok = ByteTokenizer()
    elif tokenizer == "bpe":
        docs = list(docs)
        if tokenizer_path is not None and Path(tokenizer_path).exists():
            tok = BPETokenizer.load(tokenizer_path)
        else:
            tok = BPETokenizer.train(docs, vocab_size)
            if tokenizer_path is not None:
                tok.save(tokenizer_path)
    else:
        raise ValueError(f"tokenizer = {tokenizer!r}; use 'byte' or 'bpe'")
    tokens = tok.encode_corpus(docs)
    train, val = split_stream(tokens, val_fraction, seq_len)
    return TokenData(train=train, val=val, vocab_size=tok.vocab_size, tokenizer=tok)


def _generator(seed: int, step: int, micro: int) -> torch.Generator:
    # a fixed, collision-free mix of the three numbers (all < 2**20 in practice)
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + micro)


class BatchStream:
    """Random windows of ``seq_len`` tokens; the batch of (step, micro) depends on nothing else.

    Every rank draws the global batch (``batch_size * world_size`` windows) and keeps its own slice, so N
    processes together see the same windows as one process with an N times larger batch.
    """

    def __init__(
        self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        if len(tokens) < seq_len + 1:
            raise ValueError(f"the training stream has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size

    def batch(self, step: int, micro: int = 0) -> torch.Tensor:
        g = _generator(self.seed, step, micro)
        n = self.batch_size * self.world_size
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (n,), generator=g)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return torch.stack([self.tokens[s : s + self.seq_len] for s in mine.tolist()]).long()


def eval_windows(tokens: torch.Tensor, n_windows: int, seq_len: int) -> torch.Tensor:
    """``n_windows`` windows evenly spread over the validation stream (the same every evaluation)."""
    last = len(tokens) - seq_len
    if last < 0:
        raise ValueError(f"the validation stream has {len(tokens)} tokens, fewer than one window of {seq_len}")
    starts = torch.linspace(0, last, n_windows).long().unique()
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]).long()

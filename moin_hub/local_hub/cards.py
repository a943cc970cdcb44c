"""Repo cards in the local Hub: README.md front matter, checked like the Hub's ``validate-yaml``, and tags.

A commit whose README.md metadata the Hub would refuse is refused here too (:func:`validate_card_metadata`),
and repos are listed under the tags the Hub derives from their cards (:func:`derive_tags`).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_YAML_BLOCK = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _check_type(meta: dict, name: str, kind: str) -> list[str]:
    """One message if ``meta[name]`` is present and not of ``kind`` ("str", "list", "str|list", "bool")."""
    if name not in meta or meta[name] is None:
        return []
    value = meta[name]
    ok = {
        "str": isinstance(value, str),
        "list": _is_str_list(value),
        "str|list": isinstance(value, str) or _is_str_list(value),
        "bool": isinstance(value, bool),
    }[kind]
    wanted = {
        "str": "a string",
        "list": "a list of strings",
        "str|list": "a string or a list of strings",
        "bool": "a boolean",
    }[kind]
    return [] if ok else [f'"{name}" must be {wanted}, got {value!r}']


def _check_model_index(value: Any) -> list[str]:
    """Check ``model-index`` the way the Hub does: names, tasks, datasets and metrics in place."""
    if not isinstance(value, list):
        return [f'"model-index" must be a list of mappings, got {value!r}']
    errors = []
    for i, model in enumerate(value):
        where = f'"model-index"[{i}]'
        if not isinstance(model, dict):
            errors.append(f"{where} must be a mapping, got {model!r}")
            continue
        if not isinstance(model.get("name"), str):
            errors.append(f"{where}.name must be a string, got {model.get('name')!r}")
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be a list, got {results!r}")
            continue
        for j, result in enumerate(results):
            errors += _check_eval_result(result, f"{where}.results[{j}]")
    return errors


def _check_eval_result(result: Any, where: str) -> list[str]:
    if not isinstance(result, dict):
        return [f"{where} must be a mapping, got {result!r}"]
    errors = []
    task = result.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
        errors.append(f"{where}.task must be a mapping with a string 'type', got {task!r}")
    dataset = result.get("dataset")
    if not isinstance(dataset, dict) or not all(isinstance(dataset.get(k), str) for k in ("type", "name")):
        errors.append(f"{where}.dataset must be a mapping with string 'type' and 'name', got {dataset!r}")
    metrics = result.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        errors.append(f"{where}.metrics must be a non-empty list, got {metrics!r}")
    else:
        for k, metric in enumerate(metrics):
            if (
                not isinstance(metric, dict)
                or not isinstance(metric.get("type"), str)
                or "value" not in metric
            ):
                errors.append(f"{where}.metrics[{k}] must be a mapping with a string 'type' and a 'value'")
    return errors


def _check_configs(value: Any) -> list[str]:
    """Check a dataset card's ``configs``: config names and ``data_files`` (str, list, or split mappings)."""
    if not isinstance(value, list):
        return [f'"configs" must be a list of mappings, got {value!r}']
    errors = []
    for i, config in enumerate(value):
        where = f'"configs"[{i}]'
        if not isinstance(config, dict):
            errors.append(f"{where} must be a mapping, got {config!r}")
            continue
        if not isinstance(config.get("config_name"), str):
            errors.append(f"{where}.config_name must be a string, got {config.get('config_name')!r}")
        errors += [f"{where}.{e}" for e in _check_type(config, "default", "bool")]
        data_files = config.get("data_files")
        if data_files is None or isinstance(data_files, str) or _is_str_list(data_files):
            continue
        splits_ok = isinstance(data_files, list) and all(
            isinstance(split, dict)
            and isinstance(split.get("split"), str)
            and (isinstance(split.get("path"), str) or _is_str_list(split.get("path")))
            for split in data_files
        )
        if not splits_ok:
            errors.append(
                f"{where}.data_files must be a string, a list of strings, or a list of "
                f"{{split, path}} mappings, got {data_files!r}"
            )
    return errors


def parse_front_matter(content: str) -> dict[str, Any]:
    """The YAML metadata block at the top of a README.md, as a dict (``{}`` when there is none).

    Raises:
        ValueError: the block is not valid YAML or not a mapping.
    """
    match = _YAML_BLOCK.search(content)
    if match is None:
        return {}
    try:
        meta = yaml.safe_load(match.group(2))
    except yaml.YAMLError as exc:
        raise ValueError(f"Invalid YAML in README.md front matter: {exc}".replace("\n", " ")) from None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise ValueError(f"README.md front matter must be a YAML mapping, got {type(meta).__name__}")
    return meta


def validate_card_metadata(content: str, repo_type: str = "model") -> list[str]:
    """Check a README.md's metadata like the Hub's ``/api/validate-yaml``; return one message per problem.

    Known fields must have the Hub's types: ``tags`` a list of strings; ``license``, ``library_name``,
    ``pipeline_tag`` strings (a dataset's ``license`` may be a list); ``base_model``, ``datasets``,
    ``language``, ``metrics`` a string or a list of strings; ``model-index`` a list of models with
    results; ``configs`` a list of dataset configs. Unknown fields are accepted.

    Example:
        >>> validate_card_metadata("---\\ntags: oops\\n---\\n")
        ['"tags" must be a list of strings, got \\'oops\\'']
    """
    try:
        meta = parse_front_matter(content)
    except ValueError as exc:
        return [str(exc)]
    kinds = {
        "tags": "list",
        "library_name": "str",
        "pipeline_tag": "str",
        "license": "str" if repo_type == "model" else "str|list",
        "license_name": "str",
        "license_link": "str",
        "pretty_name": "str",
        "base_model": "str|list",
        "datasets": "str|list",
        "language": "str|list",
        "metrics": "str|list",
        "task_categories": "str|list",
        "size_categories": "str|list",
    }
    errors = [message for name, kind in kinds.items() for message in _check_type(meta, name, kind)]
    if "model-index" in meta:
        errors += _check_model_index(meta["model-index"])
    if "configs" in meta:
        errors += _check_configs(meta["configs"])
    return errors


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def derive_tags(meta: dict[str, Any], repo_type: str) -> list[str]:
    """Repo tags as the Hub derives them from card metadata, without duplicates.

    Example:
        >>> derive_tags({"tags": ["lora"], "library_name": "peft", "license": "mit", "base_model": "a/b"}, "model")
        ['lora', 'peft', 'base_model:a/b', 'license:mit']
    """
    tags = _as_list(meta.get("tags"))
    if repo_type == "model":
        tags += _as_list(meta.get("library_name")) + _as_list(meta.get("pipeline_tag"))
        tags += [f"base_model:{m}" for m in _as_list(meta.get("base_model"))]
        tags += [f"dataset:{d}" for d in _as_list(meta.get("datasets"))]
        tags += _as_list(meta.get("language"))
    else:
        for name in ("task_categories", "size_categories", "language"):
            tags += [f"{name}:{v}" for v in _as_list(meta.get(name))]
    tags += [f"license:{lic}" for lic in _as_list(meta.get("license"))]
    return list(dict.fromkeys(tags))

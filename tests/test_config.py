"""Config dataclasses, validators, errors and the public API surface: no Hub needed."""

from __future__ import annotations

import json

import numpy as np
import pytest

import moin_hub
from moin_hub import errors
from moin_hub._validators import validate_query, validate_relative_path, validate_repo_id, validate_vector
from moin_hub.hub.config import (
    EmbedderSpec,
    ExpertMetadata,
    ExpertRecord,
    FileDigest,
    PinnedModel,
    RegistryManifest,
)
from moin_hub.hub.registry import experts_from_parquet, experts_to_parquet

SHA = "a" * 40


def _record(**overrides) -> ExpertRecord:
    values = dict(expert_id="cooking", repo_id="org/cooking", revision=SHA, centroid=(0.6, 0.8),
                  keywords=("bread",), files=(FileDigest("adapter_config.json", "b" * 64, 10),))
    values.update(overrides)
    return ExpertRecord(**values)


def test_public_api_is_exactly_all():
    assert sorted(moin_hub.__all__) == sorted(set(moin_hub.__all__))
    for name in moin_hub.__all__:
        assert getattr(moin_hub, name) is not None, name
    public = {n for n in dir(moin_hub) if not n.startswith("_")} | {"__version__"}
    assert public == set(moin_hub.__all__)


def test_errors_subclass_matching_builtins_and_carry_fields():
    err = errors.ExpertNotFoundError("org/x", registry_id="org/reg", revision=SHA)
    assert isinstance(err, LookupError) and isinstance(err, errors.MoinHubError)
    assert (err.expert, err.registry_id, err.revision) == ("org/x", "org/reg", SHA)
    mismatch = errors.BaseModelMismatchError(expected="org/base", actual="other/base", repo_id="org/x")
    assert isinstance(mismatch, ValueError) and isinstance(mismatch, errors.IncompatibleExpertError)
    assert "other/base" in str(mismatch) and "org/base" in str(mismatch)
    integrity = errors.IntegrityError(repo_id="org/x", revision=SHA, path="a.safetensors", expected="1" * 64,
                                      actual="2" * 64)
    assert "\n" not in str(integrity) and integrity.path == "a.safetensors"
    assert isinstance(errors.EmptyQueryError(), ValueError)


def test_manifest_round_trip_and_checks():
    manifest = RegistryManifest(base_model=PinnedModel("org/base", SHA),
                                embedder=EmbedderSpec("org/emb", "b" * 40, dim=384))
    data = json.loads(json.dumps(manifest.to_dict()))
    assert RegistryManifest.from_dict(data) == manifest
    assert data["format_version"] == 2 and data["created_by"].startswith("moin-hub ")
    with pytest.raises(ValueError, match="format_version"):
        RegistryManifest.from_dict({**data, "format_version": 99})
    with pytest.raises(ValueError, match="unknown field"):
        RegistryManifest.from_dict({**data, "surprise": 1})
    with pytest.raises(ValueError, match="revision"):
        PinnedModel("org/base", "main")
    with pytest.raises(ValueError, match="embedder.dim"):
        EmbedderSpec("org/emb", SHA, dim=0)


def test_expert_metadata_checks_name_the_field():
    with pytest.raises(ValueError, match="expert_id"):
        ExpertMetadata(expert_id="../etc")
    with pytest.raises(ValueError, match="n_docs"):
        ExpertMetadata(expert_id="ok", n_docs=-1)
    with pytest.raises(ValueError, match="perplexity"):
        ExpertMetadata(expert_id="ok", perplexity=float("nan"))


def test_validators():
    assert validate_repo_id("org/name") == "org/name"
    for bad in ("", "no-namespace", "a/b/c", "org/na me", "../x"):
        with pytest.raises(ValueError):
            validate_repo_id(bad)
    with pytest.raises(errors.EmptyQueryError):
        validate_query("   \n ")
    assert validate_query("  hi ") == "hi"
    with pytest.raises(ValueError, match="limit"):
        validate_query("x" * 200_000)
    for bad in ("/etc/passwd", "a/../b", "a\\b", "a\x00b", ""):
        with pytest.raises(errors.UnsafeFileError):
            validate_relative_path(bad)
    assert validate_vector([1, 2, 3], dim=3).dtype == np.float32
    with pytest.raises(errors.EmbedderMismatchError):
        validate_vector([1, 2, 3], dim=4)
    with pytest.raises(ValueError, match="finite"):
        validate_vector([1, float("inf")])
    with pytest.raises(ValueError, match="zeros"):
        validate_vector([0.0, 0.0])


def test_experts_parquet_round_trip_and_bad_rows():
    records = [_record(), _record(expert_id="football", repo_id="org/football", centroid=(0.0, 1.0))]
    data = experts_to_parquet(records)
    assert experts_from_parquet(data, registry_id="org/reg", dim=2) == records
    assert experts_from_parquet(experts_to_parquet([]), registry_id="org/reg", dim=2) == []
    with pytest.raises(errors.InvalidRegistryError, match="dimension"):
        experts_from_parquet(data, registry_id="org/reg", dim=3)
    with pytest.raises(errors.InvalidRegistryError, match="duplicate"):
        experts_from_parquet(experts_to_parquet([records[0], records[0]]), registry_id="org/reg", dim=2)
    with pytest.raises(errors.InvalidRegistryError, match="parquet"):
        experts_from_parquet(b"not parquet", registry_id="org/reg", dim=2)
    with pytest.raises(errors.InvalidRegistryError, match="finite"):
        experts_from_parquet(experts_to_parquet([_record(centroid=(float("nan"), 1.0))]), registry_id="r/r", dim=2)

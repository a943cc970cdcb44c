"""Registry rows as parquet: the Arrow schema of a registry shard, and checked reading and writing.

Format v1 keeps every row in ``experts.parquet``; format v2 spreads the same rows over the shards under
``data/`` (see :mod:`moin_hub.hub.shards`). Both use :data:`EXPERTS_SCHEMA`.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .._validators import validate_vector
from ..errors import InvalidRegistryError
from .config import EXPERTS_FILENAME, ExpertRecord

#: Arrow schema of registry rows (``experts.parquet`` in v1, every shard under ``data/`` in v2).
EXPERTS_SCHEMA = pa.schema([
    pa.field("expert_id", pa.string(), nullable=False),
    pa.field("repo_id", pa.string(), nullable=False),
    pa.field("revision", pa.string(), nullable=False),
    pa.field("centroid", pa.list_(pa.float32()), nullable=False),
    pa.field("keywords", pa.list_(pa.string())),
    pa.field("n_docs", pa.int64()),
    pa.field("n_tokens", pa.int64()),
    pa.field("perplexity", pa.float64()),
    pa.field("base_perplexity", pa.float64()),
    pa.field("lora_rank", pa.int32()),
    pa.field("lora_alpha", pa.float64()),
    pa.field("target_modules", pa.list_(pa.string())),
    pa.field("adapter_bytes", pa.int64()),
    pa.field("files", pa.list_(pa.struct([
        pa.field("path", pa.string()), pa.field("sha256", pa.string()), pa.field("size", pa.int64()),
    ]))),
    pa.field("title", pa.string()),
    pa.field("created_at", pa.string()),
    pa.field("created_by", pa.string()),
    pa.field("sim_mean", pa.float64()),
    pa.field("sim_std", pa.float64()),
])


def conform(table: pa.Table) -> pa.Table:
    """``table`` with :data:`EXPERTS_SCHEMA`'s columns in order; columns an older writer lacked are nulls."""
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in EXPERTS_SCHEMA]
    return pa.Table.from_arrays(columns, schema=EXPERTS_SCHEMA)

def experts_to_parquet(records: list[ExpertRecord]) -> bytes:
    """Serialise registry rows to parquet bytes with :data:`EXPERTS_SCHEMA`."""
    return table_to_parquet(experts_table(records))


def experts_table(records: list[ExpertRecord]) -> pa.Table:
    """Registry rows as an Arrow table with :data:`EXPERTS_SCHEMA`."""
    return pa.Table.from_pylist([record.to_dict() for record in records], schema=EXPERTS_SCHEMA)


def table_to_parquet(table: pa.Table) -> bytes:
    """Parquet bytes (zstd) of a table of registry rows."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def experts_from_parquet(data: bytes | str | Path, *, registry_id: str, dim: int) -> list[ExpertRecord]:
    """Parse and check ``experts.parquet``: every row a valid record, centroids of dimension ``dim``.

    Raises:
        InvalidRegistryError: naming the row and the problem (missing column, bad value, duplicate id).
    """
    return experts_from_table(read_parquet(data, registry_id=registry_id), registry_id=registry_id, dim=dim)


def read_parquet(data: bytes | str | Path, *, registry_id: str, name: str = EXPERTS_FILENAME) -> pa.Table:
    """A parquet file (bytes or path) as a table.

    Raises:
        InvalidRegistryError: the data is not readable parquet.
    """
    try:
        source = pa.BufferReader(data) if isinstance(data, bytes) else str(data)
        return pq.read_table(source)
    except (pa.ArrowException, OSError) as err:
        raise InvalidRegistryError(registry_id, f"{name} is not readable parquet: {err}") from None


def experts_from_table(table: pa.Table, *, registry_id: str, dim: int) -> list[ExpertRecord]:
    """Check and parse a table of registry rows (see :func:`experts_from_parquet`)."""
    missing = [name for name in ("expert_id", "repo_id", "revision", "centroid") if name not in table.column_names]
    if missing:
        raise InvalidRegistryError(registry_id, f"{EXPERTS_FILENAME} lacks column(s) {missing}")
    known = set(EXPERTS_SCHEMA.names)
    records: list[ExpertRecord] = []
    seen_ids: set[str] = set()
    seen_repos: set[str] = set()
    for index, row in enumerate(table.to_pylist()):
        fields = {key: value for key, value in row.items() if key in known and value is not None}
        try:
            record = ExpertRecord.from_dict(fields)
            validate_vector(record.centroid, dim=dim, field=f"centroid of {record.expert_id!r}")
        except (ValueError, TypeError) as err:
            raise InvalidRegistryError(registry_id, f"row {index}: {err}") from None
        if record.expert_id in seen_ids or record.repo_id in seen_repos:
            raise InvalidRegistryError(registry_id, f"row {index}: duplicate expert {record.expert_id!r}")
        seen_ids.add(record.expert_id)
        seen_repos.add(record.repo_id)
        records.append(record)
    return records

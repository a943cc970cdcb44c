"""The Hub side of moin-hub: experts and registries as Hub repos, and everything that reads or writes them.

Owns:

- ``client``: the one place that turns ``endpoint`` / ``token`` into Hub client calls; ``retry``: jittered
  back-off over transient Hub failures;
- ``config``: the records and file names of the formats (registry manifest, expert rows, expert metadata);
  ``expert``: the expert folder (what training writes and ``push`` takes); ``cards``: model and dataset
  cards from the templates in ``cards/``;
- ``registry`` (the registry dataset, conflict-safe updates), ``rows`` (its rows as parquet), ``shards``
  (format v2: sharded rows, one delta shard per push), ``compaction`` (compact / migrate), ``cells`` and
  ``partial`` (k-means cells and the cold route that fetches only the probed ones), ``rebuild`` (rows from
  the expert cards), ``calibration`` (the default routing threshold), ``registry_plots`` (plots in its card),
  ``push`` (an expert as its own repo, then its row), ``pull`` (download at the pinned commit, verified),
  ``loading`` (base model and PEFT adapters, loaded safely), ``embed`` (the pinned embedder),
  ``router`` (query -> nearest centroids, faiss index) and ``mixing`` (routing modes: how much of each
  routed expert a query gets, and making that mixture the active PEFT adapter);
- ``assets``: the bundled base model and embedder, published to a Hub for offline work.

``mixing`` lives here rather than in :mod:`moin_hub.serving` because both the pipeline (``evaluate`` scores
each routing mode) and serving use it, and neither may import the other.

May import: :mod:`moin_hub.errors`, :mod:`moin_hub._validators`, :mod:`moin_hub._version` and itself; never
:mod:`moin_hub.pipeline`, :mod:`moin_hub.serving`, :mod:`moin_hub.local_hub` or :mod:`moin_hub.cli`
(``tests/test_layout.py`` checks it). The modules here are internal: the public names are re-exported by
:mod:`moin_hub`.
"""

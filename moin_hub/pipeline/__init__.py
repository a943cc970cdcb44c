"""The MoIN pipeline: from a corpus to trained, scored experts in one workspace folder.

Owns:

- ``corpus``: documents (the user's files and datasets) and token blocks; ``brown``: the Brown Corpus;
- ``cluster``: embed, cluster, name and score the topics; ``topics``: the saved :class:`TopicModel`;
- ``jobs``: what training takes (``TrainConfig``, ``TopicJob``); ``train``: one LoRA per topic, in
  processes or on Ray, and the dense baseline;
- ``evaluate``: perplexity of base, routed, oracle, dense and each routing mode; ``plots``: its PNGs;
  ``report``: the report as a table for people;
- ``workspace``: the workspace folder and its files; ``steps``: cluster -> train -> evaluate -> push-all
  over that folder; ``io``: JSON written atomically;
- ``demo``: the whole job end to end, offline (``moin-hub demo``).

May import: :mod:`moin_hub.hub`, :mod:`moin_hub.errors`, :mod:`moin_hub._validators`,
:mod:`moin_hub._version` and itself; :mod:`moin_hub.local_hub` only from ``demo`` (it starts a local Hub,
which depends on nothing here). Never :mod:`moin_hub.serving` (what both need, such as ``mixing`` and
``loading``, is in :mod:`moin_hub.hub`) nor :mod:`moin_hub.cli`. The modules here are internal and may
change.
"""

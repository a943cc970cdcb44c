"""Serving: one base model, many experts, answering requests routed by their content.

Owns:

- ``engine``: :class:`~moin_hub.serving.engine.ExpertEngine` (public as :class:`moin_hub.ExpertEngine`): the
  registry, the router, one base model and an LRU of PEFT adapters, batched generation;
- ``lora_batch``: rows of one batch with different experts, through gathered batched LoRA matmuls;
- ``server``: ``moin-hub serve``, the OpenAI-compatible HTTP server;
- ``ray_serve``: the same experts multiplexed over Ray Serve replicas;
- ``space``: the Space's engine (route, generate side by side, score), and ``space_app``: its Gradio UI.

Public entry points (kept stable, documented in README): ``moin_hub.serving.space_app.build_app`` and
``env_threshold`` (imported by ``spaces/moin-router/app.py``), and ``moin_hub.serving.ray_serve:app_builder``
/ ``build_app`` (``serve run``). Everything else here is internal and may change.

May import: :mod:`moin_hub.hub`, :mod:`moin_hub.errors`, :mod:`moin_hub._validators`,
:mod:`moin_hub._version` and itself. Never :mod:`moin_hub.pipeline` (what both need, such as ``mixing`` and
``loading``, is in :mod:`moin_hub.hub`), :mod:`moin_hub.local_hub` or :mod:`moin_hub.cli`.
"""

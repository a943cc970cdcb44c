"""Serving: one base model, many experts, answering requests routed by their content.

Owns:

- ``engine``: :class:`~moin_hub.serving.engine.ExpertEngine` (public as :class:`moin_hub.ExpertEngine`):
  registry, router, one base model and its adapters; ``cache``: the adapter LRU and its eviction policy;
  ``generation``: batched generation (each row its own expert, streaming, stop strings);
  ``lora_batch``: rows with different experts through gathered batched LoRA matmuls;
- ``server``: ``moin-hub serve``, the OpenAI-compatible HTTP app; ``engine_backend``: its default backend
  (generation on the engine); ``openai_api``: its request models, model names and errors; ``batching``: the
  request batcher; ``metrics``: ``/metrics``;
- ``vllm_backend``: ``moin-hub serve --backend vllm`` (the routed experts loaded into vLLM servers, requests
  forwarded there); ``upstreams``: those servers, which adapters each holds, affinity and unloads;
- ``ray_serve``: the same experts multiplexed over Ray Serve replicas;
- ``vllm_resolver``: the vLLM LoRA resolver plugin (a plain vLLM server serves registry experts by name,
  verified); ``mixture_adapter``: a mixture merged once into a cached LoRA folder a vLLM server can load;
- ``space``: the Space's engine (route, generate side by side, score), and ``space_app``: its Gradio UI.

Public entry points (stable, documented in README): ``moin_hub.serving.space_app.build_app`` and
``env_threshold`` (imported by ``spaces/moin-router/app.py``), and ``moin_hub.serving.ray_serve:app_builder``
and ``build_app`` (``serve run``), and ``moin_hub.serving.vllm_resolver:register`` (vLLM's
``vllm.general_plugins`` entry point, declared in ``pyproject.toml``). Everything else here is internal and
may change.

May import: :mod:`moin_hub.hub`, :mod:`moin_hub.errors`, :mod:`moin_hub._validators`,
:mod:`moin_hub._version` and itself. Never :mod:`moin_hub.pipeline` (what both need, such as ``mixing``
and ``loading``, is in :mod:`moin_hub.hub`), :mod:`moin_hub.local_hub` or :mod:`moin_hub.cli`.
"""

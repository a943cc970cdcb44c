"""The Gradio app of the MoIN router Space: Route, Generate, Browse and About tabs over a :class:`SpaceEngine`.

Every handler turns bad input and known errors into a message shown in the app (never a traceback), and
each event has an ``api_name``, so ``gradio_client`` can drive the app as the browser does::

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    status, table = client.predict("How long should bread rise?", 3, api_name="/route")

Gradio's analytics are switched off before gradio is imported: the app never phones home.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from ..errors import MoinHubError
from .space import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    SpaceEngine,
    SpaceRoute,
    TokenScores,
    centroid_map,
)

logger = logging.getLogger(__name__)

ROUTE_HEADERS = ["rank", "expert", "similarity", "score", "match", "keywords", "card"]
BROWSE_HEADERS = ["expert", "keywords", "docs", "tokens", "base ppl", "expert ppl", "change %", "size kB",
                  "LoRA", "commit", "card"]
SCORE_HEADERS = ["position", "token", "base nll", "expert nll", "expert - base"]
BAR_WIDTH = 20
NO_TEXT = "(no text: the model ended its answer at once)"

ABOUT = """
## What is MoIN?

**Mixture of Introvert Experts** ([arXiv 2410.09687](https://arxiv.org/abs/2410.09687)) upcycles a
language model with many small experts that never talk to each other: a corpus is split into semantic
topics, one LoRA adapter is trained per topic on the frozen base model, and at inference each *whole
query* is routed to the nearest topic centroid (cosine similarity of a sentence embedding). Only that
expert runs; there is no learned gate and no token-level mixing.

moin-hub puts such experts on the Hugging Face Hub: each expert is
its own model repo (PEFT adapter + centroid + model card), and a **registry** dataset ties centroids to
expert repos pinned at commit shas, with the sha256 of every file. This Space routes your query, pulls
only the chosen adapter at its pinned commit, verifies every hash, and runs it on one shared base model.
Loaded adapters stay cached (LRU), so switching experts never reloads the base model.

## Push an expert into this registry

```bash
pip install "moin-hub[space]"
# an expert folder: adapter_config.json, adapter_model.safetensors, centroid.safetensors, moin_expert.json
moin-hub push-expert experts/topic-03 --registry {registry} --repo-id YOUR_ORG/moin-topic-03
# or make experts from a corpus: cluster -> train -> evaluate -> push-all
moin-hub push-all work --registry {registry} --namespace YOUR_ORG
```

Then press **Refresh** in the Browse tab. Run this Space yourself:

```bash
moin-hub space --registry {registry}            # http://127.0.0.1:7860
```

## This Space

| Setting | Value |
|---|---|
| Registry | [`{registry}`]({endpoint}/datasets/{registry}) @ `{revision}` ({n_experts} experts) |
| Base model | `{base_model}` |
| Embedder | `{embedder}` @ `{embedder_revision}` ({dim}-d, cosine) |
| No-match threshold | {threshold} falls back to the base model |
| Adapter cache | {cache_size} adapters (LRU) |
| Limits | {max_chars:,} characters of input, {max_tokens} new tokens |
"""


def _disable_gradio_analytics() -> None:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def _message(err: BaseException) -> str:
    """One line for people; the traceback of an unexpected error goes to the log only."""
    if isinstance(err, (MoinHubError, ValueError, LookupError)):
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"⚠️ {text}"
    logger.exception("unexpected error in the Space", exc_info=err)
    return f"⚠️ Something went wrong ({type(err).__name__}); the error is in the Space's log."


def bar(similarity: float, width: int = BAR_WIDTH) -> str:
    """A text bar for a similarity in [0, 1] (negative values show as empty)."""
    filled = round(max(0.0, min(1.0, similarity)) * width)
    return "█" * filled + "░" * (width - filled)


def _link(engine: SpaceEngine, repo_id: str) -> str:
    return f"[{repo_id}]({engine.endpoint}/{repo_id})"


def route_rows(engine: SpaceEngine, route: SpaceRoute) -> list[list[Any]]:
    """Table rows of a route: rank, expert, similarity, calibrated score (None without statistics), bar,
    keywords, card link."""
    return [[r.rank + 1, r.expert.expert_id, round(r.similarity, 4),
             None if r.score is None else round(r.score, 3), bar(r.similarity),
             ", ".join(r.expert.keywords[:6]), _link(engine, r.expert.repo_id)] for r in route.routes]


def threshold_text(engine: SpaceEngine) -> str:
    """The threshold in force, in words: on calibrated scores (where rows have statistics) or on the cosine."""
    if not engine.threshold_calibrated:
        return f"similarity < {engine.threshold:.2f} (cosine; the registry has no calibrated threshold)"
    origin = "set here" if engine._threshold is not None else "the registry's, from `registry calibrate`"
    return (f"score < {engine.threshold:+.2f} ({origin}): the z-score of the cosine against the expert's own "
            "documents, or the cosine where its row has no statistics")


def _closeness(route: SpaceRoute) -> str:
    """How the best route compares with the threshold: its calibrated score, or its cosine."""
    best = route.best
    if route.on_score:
        return f"score {best.score:+.2f}, similarity {best.similarity:.3f}"
    return f"similarity {best.similarity:.3f}"


def route_status(engine: SpaceEngine, route: SpaceRoute) -> str:
    """The chosen expert (or the fallback), its card link and the routing latency, as markdown."""
    best = route.best
    latency = (f"routing took **{route.latency_ms:.1f} ms** (embed {route.result.embed_ms:.1f} ms, "
               f"search {route.result.search_ms:.2f} ms)")
    if route.matched:
        record = best.expert
        title = f" — {record.title}" if record.title else ""
        return (f"→ **{record.expert_id}**{title} ({_closeness(route)})  \n"
                f"Card: [{record.repo_id}]({engine.expert_url(record)}) @ `{record.revision[:12]}`  \n{latency}")
    instead = ("the base model" if route.fallback is None else
               f"the registry's fallback expert **{route.fallback.expert_id}** (trained on every topic)")
    return (f"**No expert matches this query well**: the nearest, `{best.expert.expert_id}`, has "
            f"{_closeness(route)}, below the threshold {route.threshold:+.2f}. Generation falls back to "
            f"{instead}.  \n"
            f"{latency}")


def browse_rows(engine: SpaceEngine) -> list[list[Any]]:
    """One row per expert of the registry, sorted by expert id."""
    rows = []
    for record in sorted(engine.registry, key=lambda r: r.expert_id):
        change = None
        if record.perplexity is not None and record.base_perplexity:
            change = round(100.0 * (record.perplexity / record.base_perplexity - 1.0), 1)
        rows.append([
            record.expert_id, ", ".join(record.keywords[:6]), record.n_docs, record.n_tokens,
            None if record.base_perplexity is None else round(record.base_perplexity, 2),
            None if record.perplexity is None else round(record.perplexity, 2), change,
            round(record.adapter_bytes / 1000, 1), f"r={record.lora_rank}, α={record.lora_alpha:g}",
            record.revision[:12], _link(engine, record.repo_id),
        ])
    return rows


def map_points(engine: SpaceEngine) -> list[dict[str, Any]]:
    """The 2-D map of the registry's centroids (PCA), one point per expert."""
    coords = centroid_map(engine.registry.centroids())
    return [{"x": float(x), "y": float(y), "expert": r.expert_id, "keywords": ", ".join(r.keywords[:4]),
             "docs": r.n_docs} for (x, y), r in zip(coords, engine.registry.experts, strict=True)]


def score_rows(scores: TokenScores) -> list[list[Any]]:
    return [[i + 1, token, round(b, 3), round(e, 3), round(e - b, 3)]
            for i, (token, b, e) in enumerate(zip(scores.tokens, scores.base_nll, scores.expert_nll, strict=True))]


def score_highlights(scores: TokenScores) -> list[tuple[str, float]]:
    """Tokens coloured by how much better (positive) or worse (negative) the expert predicts them."""
    return [(token, max(-1.0, min(1.0, (b - e) / 2.0)))
            for token, b, e in zip(scores.tokens, scores.base_nll, scores.expert_nll, strict=True)]


def score_summary(scores: TokenScores) -> str:
    base, expert = scores.base_ppl, scores.expert_ppl
    note = "" if scores.route.matched else (
        f" (below the threshold {scores.route.threshold:+.2f}: the router would answer with the base model)")
    cut = "  \nOnly the first tokens were scored (the text is longer than the limit)." if scores.truncated else ""
    return (f"Perplexity of your text over {len(scores.tokens)} tokens: **base {base:.2f}** vs "
            f"**expert `{scores.expert_id}` {expert:.2f}** ({100 * (expert / base - 1):+.1f}%); nearest expert by "
            f"{_closeness(scores.route)}{note}.{cut}")


def about_markdown(engine: SpaceEngine) -> str:
    registry = engine.registry
    embedder = registry.manifest.embedder
    base = engine.base_model_label or f"{engine.base_model.repo_id}@{engine.base_model.revision[:12]}"
    return ABOUT.format(registry=registry.registry_id, endpoint=engine.endpoint, revision=registry.revision[:12],
                        n_experts=len(registry), base_model=base, embedder=embedder.repo_id,
                        embedder_revision=embedder.revision[:12], dim=embedder.dim, threshold=threshold_text(engine),
                        cache_size=engine.cache_info()["capacity"], max_chars=engine.max_input_chars,
                        max_tokens=engine.max_new_tokens_limit)


def build_app(engine: SpaceEngine | str, **engine_kwargs: Any) -> Any:
    """The Gradio app (a ``gr.Blocks``) of the MoIN router Space.

    Args:
        engine: a :class:`SpaceEngine`, or a registry id to build one from ``engine_kwargs``
            (``endpoint``, ``token``, ``base_model``, ``threshold``, ``cache_size`` ...).

    Returns:
        The ``gr.Blocks``; call ``.launch()`` on it. Events (for ``gradio_client``): ``/route``
        (query, k), ``/generate`` (prompt, max_new_tokens, chat), ``/score`` (text), ``/browse`` ().

    Example:
        >>> build_app("acme/moin-registry", threshold=0.15).launch()  # doctest: +SKIP
    """
    _disable_gradio_analytics()
    import gradio as gr
    import pandas as pd

    if not isinstance(engine, SpaceEngine):
        engine = SpaceEngine(engine, **engine_kwargs)
    registry_id = engine.registry.registry_id

    def empty(headers: list[str]) -> pd.DataFrame:
        return pd.DataFrame([], columns=headers)

    def on_route(query: str, k: float) -> tuple[str, pd.DataFrame]:
        try:
            route = engine.route(query, k=max(1, int(k or 3)))
        except Exception as err:  # noqa: BLE001 - every error becomes a message in the app
            return _message(err), empty(ROUTE_HEADERS)
        return route_status(engine, route), pd.DataFrame(route_rows(engine, route), columns=ROUTE_HEADERS)

    def on_generate(prompt: str, max_new_tokens: float, chat: bool = True) -> Iterator[tuple[str, str, str]]:
        try:
            route = engine.route(prompt)
            status = route_status(engine, route)
            yield status, "", ""
            for step in engine.generate(prompt, max_new_tokens=max_new_tokens, route=route, chat=bool(chat)):
                if step.done:
                    yield status, step.base or NO_TEXT, step.expert or NO_TEXT
                else:
                    yield status, step.base, step.expert
        except Exception as err:  # noqa: BLE001
            yield _message(err), "", ""

    def on_score(text: str) -> tuple[str, list[tuple[str, float]], pd.DataFrame]:
        try:
            scores = engine.score(text)
        except Exception as err:  # noqa: BLE001
            return _message(err), [], empty(SCORE_HEADERS)
        return score_summary(scores), score_highlights(scores), pd.DataFrame(score_rows(scores), columns=SCORE_HEADERS)

    def on_browse() -> tuple[str, pd.DataFrame, pd.DataFrame, str]:
        try:
            moved = engine.refresh()
        except Exception as err:  # noqa: BLE001 - keep serving the registry we have
            note = f"  \n{_message(err)} (showing the registry as loaded before)"
        else:
            note = "  \nThe registry moved: new experts are routed now." if moved else ""
        registry = engine.registry
        rows = browse_rows(engine)
        summary = (f"**{len(registry)} experts** in [`{registry.registry_id}`]({registry.url}) @ "
                   f"`{registry.revision[:12]}`. Click a column header to sort.{note}")
        points = pd.DataFrame(map_points(engine), columns=["x", "y", "expert", "keywords", "docs"])
        return summary, pd.DataFrame(rows, columns=BROWSE_HEADERS), points, about_markdown(engine)

    with gr.Blocks(title=f"MoIN router · {registry_id}", analytics_enabled=False) as app:
        gr.Markdown(f"# MoIN router · `{registry_id}`\nRoute a query to its topic expert (a LoRA adapter on "
                    f"`{engine.base_model.repo_id}`), compare it with the base model, browse the registry.")
        with gr.Tab("Route", id="route"):
            with gr.Row():
                query = gr.Textbox(label="Query", placeholder="Ask something…", lines=2, scale=4,
                                   max_length=engine.max_input_chars, elem_id="route-query")
                with gr.Column(scale=1, min_width=160):
                    k = gr.Slider(1, 10, value=3, step=1, label="top-k experts", elem_id="route-k")
                    route_button = gr.Button("Route", variant="primary", elem_id="route-button")
            route_md = gr.Markdown(elem_id="route-status")
            route_table = gr.Dataframe(headers=ROUTE_HEADERS, datatype=["number", "str", "number", "number", "str",
                                                                        "str", "markdown"],
                                       interactive=False, label="Nearest experts", elem_id="route-table")
            examples = engine.example_queries()
            if examples:  # the start of a sample document of the registry's largest experts
                gr.Examples([[text] for text in examples], inputs=[query], label="Examples from the registry")
            route_button.click(on_route, [query, k], [route_md, route_table], api_name="route")
            query.submit(on_route, [query, k], [route_md, route_table], api_visibility="private")
        with gr.Tab("Generate", id="generate"):
            prompt = gr.Textbox(label="Your text (a prompt to continue, or a text to score)", lines=3,
                                max_length=engine.max_input_chars, elem_id="generate-prompt")
            with gr.Row():
                chat = gr.Checkbox(value=engine.has_chat_template, interactive=engine.has_chat_template,
                                   label="Chat template (answer as an assistant; off: continue the text)",
                                   elem_id="generate-chat")
                max_tokens = gr.Slider(1, engine.max_new_tokens_limit,
                                       value=min(DEFAULT_MAX_NEW_TOKENS, engine.max_new_tokens_limit), step=1,
                                       label="max new tokens", elem_id="generate-max-tokens")
                generate_button = gr.Button("Generate", variant="primary", elem_id="generate-button")
                score_button = gr.Button("Score my text", elem_id="score-button")
            generate_md = gr.Markdown(elem_id="generate-status")
            with gr.Row():
                base_out = gr.Textbox(label="Base model", lines=8, interactive=False, elem_id="generate-base")
                expert_out = gr.Textbox(label="Routed expert (base model when none matches)", lines=8,
                                        interactive=False, elem_id="generate-expert")
            score_md = gr.Markdown(elem_id="score-status")
            score_text = gr.HighlightedText(label="Tokens the expert predicts better (+) or worse (−) than the base",
                                            elem_id="score-tokens")
            score_table = gr.Dataframe(headers=SCORE_HEADERS, interactive=False, label="Per-token NLL (nats)",
                                       elem_id="score-table")
            generate_button.click(on_generate, [prompt, max_tokens, chat], [generate_md, base_out, expert_out],
                                  api_name="generate")
            score_button.click(on_score, [prompt], [score_md, score_text, score_table], api_name="score")
        with gr.Tab("Browse", id="browse"):
            with gr.Row():
                browse_md = gr.Markdown(elem_id="browse-status")
                refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="browse-refresh")
            browse_table = gr.Dataframe(headers=BROWSE_HEADERS,
                                        datatype=["str", "str", "number", "number", "number", "number", "number",
                                                  "number", "str", "str", "markdown"],
                                        interactive=False, label="Experts", elem_id="browse-table")
            browse_map = gr.ScatterPlot(x="x", y="y", color="expert", tooltip=["expert", "keywords", "docs"],
                                        title="Topic centroids (PCA of the embeddings)", x_title="PC 1",
                                        y_title="PC 2", label="2-D map of the experts", elem_id="browse-map")
        with gr.Tab("About", id="about"):
            about_md = gr.Markdown(about_markdown(engine), elem_id="about")
        refresh.click(on_browse, None, [browse_md, browse_table, browse_map, about_md], api_name="browse")
        app.load(on_browse, None, [browse_md, browse_table, browse_map, about_md], api_visibility="private")
    app.queue(default_concurrency_limit=2)
    app.moin_engine = engine  # for callers that launch the app and want to inspect the engine
    return app


def launch(engine: SpaceEngine, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = True) -> Any:
    """Build the app and serve it; returns the Blocks (with ``prevent_thread_lock``, while it runs).

    Args:
        engine: the Space engine.
        host / port: where to listen (keep it on loopback unless you mean to expose it).
        share: ask Gradio for a public share link (off by default; it contacts Gradio's servers).
        prevent_thread_lock: return at once (tests), instead of blocking until Ctrl-C.
        quiet: do not print Gradio's banner.
    """
    app = build_app(engine)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
               quiet=quiet, show_error=False, footer_links=["api"])
    return app


def env_threshold(value: str | None) -> float | None:
    """``MOIN_THRESHOLD`` as a float, or None when unset (the registry's calibrated default applies, else
    :data:`~moin_hub.serving.space.DEFAULT_THRESHOLD` on the cosine).

    Raises:
        ValueError: the value is not a finite number.
    """
    if value is None or not value.strip():
        return None
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"MOIN_THRESHOLD must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise ValueError(f"MOIN_THRESHOLD must be a finite number, got {value!r}.")
    return number


__all__ = ["DEFAULT_CACHE_SIZE", "build_app", "env_threshold", "launch"]

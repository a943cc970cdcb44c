"""`moin-hub serve`: an OpenAI-compatible server that routes each request to its topic expert."""

from __future__ import annotations

import re

import click

from ._common import endpoint_option, examples, registry_option, token_option

#: vLLM's defaults of --max-loras and --max-lora-rank (here so that --help does not import the serving stack).
VLLM_DEFAULT_MAX_LORAS = 1
VLLM_DEFAULT_MAX_LORA_RANK = 16
#: Options that only moin-hub's own engine uses.
_ENGINE_ONLY = ("cache_size", "cache_bytes", "pins", "prefetch", "base_model", "device", "batch_window_ms")
_VLLM_ONLY = ("upstreams", "upstream_max_loras", "upstream_max_lora_rank", "mixture_dir", "upstream_timeout",
              "upstream_api_key")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class ByteSize(click.ParamType):
    """``512MB``, ``1.5GiB`` or a plain number of bytes."""

    name = "SIZE"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else ""
        if not match or unit not in _UNITS or float(match.group(1)) <= 0:
            self.fail(f"{value!r} is not a size such as 512MB, 2GiB or 1000000.", param, ctx)
        return int(float(match.group(1)) * _UNITS[unit])


@click.command(
    "serve",
    epilog=examples(
        "moin-hub serve --registry acme/moin-registry --port 8000",
        "moin-hub serve --registry acme/moin-registry --mode adaptive --cache-size 16 --pin topic-03",
        "moin-hub serve --registry moin-demo/brown-experts --endpoint http://127.0.0.1:8080 --prefetch 1",
        "moin-hub serve --registry acme/moin-registry --backend vllm --upstream http://127.0.0.1:8001 "
        "--upstream-max-loras 4",
        "moin-hub serve --registry acme/moin-registry --backend vllm "
        "--upstream http://gpu1:8001,http://gpu2:8001 --upstream-max-loras 8",
        "curl localhost:8000/v1/completions -H 'Content-Type: application/json' "
        "-d '{\"model\": \"moin:auto\", \"prompt\": \"The jury said\", \"max_tokens\": 32}'",
        "python -c \"from openai import OpenAI; print(OpenAI(base_url='http://localhost:8000/v1', api_key='-')"
        ".completions.create(model='moin:auto', prompt='The jury said').choices[0].text)\"",
    ),
)
@registry_option
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@endpoint_option
@token_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--mode", type=click.Choice(["top1", "topk", "adaptive"]), default="top1", show_default=True,
              help="How `moin:auto` routes: the nearest expert (MoIN), a softmax-weighted merge of the k nearest, "
                   "or as few experts as carry --mass of the probability.")
@click.option("-k", "--k", "k", default=3, show_default=True, type=click.IntRange(1, 64),
              help="The most experts mixed (topk, adaptive).")
@click.option("--mass", default=0.8, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True),
              help="adaptive: the probability mass the chosen experts must carry.")
@click.option("--temperature", "mix_temperature", default=0.05, show_default=True,
              type=click.FloatRange(0.0, min_open=True), help="Softmax temperature over the similarities.")
@click.option("--threshold", default=None, type=float,
              help="Below this best score a routed request gets the base model: the calibrated z-score where the "
                   "expert's row has similarity statistics, else the cosine. Default: the registry's calibrated "
                   "default_threshold; without one, always an expert.")
@click.option("--cache-size", default=8, show_default=True, type=click.IntRange(1),
              help="Expert adapters kept loaded on the one base model (LRU).")
@click.option("--cache-bytes", default=None, type=ByteSize(),
              help="Also cap the loaded adapters' weights, e.g. 512MB (default: no byte cap).")
@click.option("--pin", "pins", multiple=True, metavar="EXPERT",
              help="Load this expert (id or repo id) at start and never evict it. Repeatable.")
@click.option("--prefetch", default=0, show_default=True, type=click.IntRange(0, 16),
              help="Runner-up experts of each route to fetch in the background (downloaded; loaded while the "
                   "cache has room).")
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256),
              help="Most requests in one batch (they may be for different experts).")
@click.option("--batch-window-ms", default=5.0, show_default=True, type=click.FloatRange(0, 1000),
              help="How long to wait for more requests before running a batch that is not full (right after a "
                   "batch, also 5% of its run time, for the clients it answered).")
@click.option("--max-tokens", "max_tokens_limit", default=512, show_default=True, type=click.IntRange(1, 32768),
              help="The largest max_tokens a request may ask for.")
@click.option("--base-model", default=None, metavar="ORG/NAME[@REV]",
              help="Serve the experts on this base model instead of the registry's (same architecture), "
                   "or on a local folder.")
@click.option("--device", default=None, help="torch device (default: cuda if available, else cpu).")
@click.option("--refresh-seconds", default=60.0, show_default=True, type=click.FloatRange(0),
              help="Follow the registry's head this often, so newly pushed experts are served (0: never; "
                   "with --revision the registry never moves).")
@click.option("--api-key", default=None, envvar="MOIN_API_KEY", show_envvar=True,
              help="Require `Authorization: Bearer <key>` on /v1/* (never printed).")
@click.option("--backend", type=click.Choice(["engine", "vllm"]), default="engine", show_default=True,
              help="Who generates: moin-hub's own engine (one base model in this process), or vLLM servers "
                   "(--upstream) into which the routed experts are loaded as LoRA adapters.")
@click.option("--upstream", "upstreams", multiple=True, metavar="URL[,URL...]",
              help="vllm: the vLLM OpenAI servers (started with --enable-lora and "
                   "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, on this machine or one that sees its files). "
                   "Repeatable or comma-separated.")
@click.option("--upstream-max-loras", default=VLLM_DEFAULT_MAX_LORAS, show_default=True, type=click.IntRange(1),
              help="vllm: adapters each upstream holds at once; give the upstreams' --max-loras. The least "
                   "recently used idle adapter is unloaded to make room.")
@click.option("--upstream-max-lora-rank", default=VLLM_DEFAULT_MAX_LORA_RANK, show_default=True,
              type=click.IntRange(1),
              help="vllm: the upstreams' --max-lora-rank. A topk/adaptive mixture is merged into one LoRA whose rank "
                   "is its experts' ranks summed; one over this is refused (400).")
@click.option("--mixture-dir", default=None, type=click.Path(file_okay=False),
              help="vllm: where merged mixtures are kept, once each; the upstreams read them there "
                   "(default: the moin-hub cache's vllm-mixtures).")
@click.option("--upstream-timeout", default=300.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="vllm: seconds to wait for an upstream's answer (and for room for an adapter).")
@click.option("--upstream-api-key", default=None, envvar="MOIN_UPSTREAM_API_KEY", show_envvar=True,
              help="vllm: the upstreams' --api-key (never printed).")
@click.pass_context
def command(ctx: click.Context, registry: str, revision: str | None, endpoint: str | None, token: str | None,
            host: str, port: int, mode: str, k: int, mass: float, mix_temperature: float, threshold: float | None,
            cache_size: int, cache_bytes: int | None, pins: tuple[str, ...], prefetch: int, max_batch_size: int,
            batch_window_ms: float, max_tokens_limit: int, base_model: str | None, device: str | None,
            refresh_seconds: float, api_key: str | None, backend: str, upstreams: tuple[str, ...],
            upstream_max_loras: int, upstream_max_lora_rank: int, mixture_dir: str | None, upstream_timeout: float,
            upstream_api_key: str | None) -> None:
    """Serve the registry's experts over an OpenAI-compatible HTTP API.

    \b
    POST /v1/completions, /v1/chat/completions   model "moin:auto" routes by content;
        "moin:top1|topk|adaptive" picks the mode, "moin:base" uses no expert,
        an expert id or repo id forces that expert; "stream": true streams (SSE)
    POST /v1/route      routing only
    GET  /v1/experts    registered experts and which are loaded
    GET  /v1/models     the model names, OpenAI style
    GET  /metrics       Prometheus: cache hits, loads, route latency, tokens/s
    GET  /health

    One base model stays in memory; experts are pulled at their pinned commit, verified,
    and switched as PEFT adapters. Requests for the same expert are batched together.

    \b
    --backend vllm: the same API in front of vLLM servers. Each routed expert is pulled and
    verified here, loaded once into an upstream (POST /v1/load_lora_adapter), and the request
    is forwarded with that adapter; requests go where their adapter is loaded.
    """
    import uvicorn

    from ..serving.engine import ExpertEngine
    from ..serving.server import ServeConfig, create_app

    _check_backend_options(ctx, backend, upstreams)
    config = ServeConfig(mode=mode, k=k, temperature=mix_temperature, mass=mass, threshold=threshold,
                         max_batch_size=max_batch_size, batch_window_ms=batch_window_ms,
                         max_tokens_limit=max_tokens_limit, api_key=api_key, refresh_seconds=refresh_seconds)
    if backend == "vllm":
        from ..serving.vllm_backend import VllmBackend, VllmConfig

        vllm_config = VllmConfig(upstreams=tuple(u for value in upstreams for u in value.split(",")),
                                 max_loras=upstream_max_loras, timeout=upstream_timeout, api_key=upstream_api_key,
                                 max_lora_rank=upstream_max_lora_rank, mixture_dir=mixture_dir)
        engine = ExpertEngine(registry, revision=revision, endpoint=endpoint, token=token)
        click.echo(f"Registry {engine.registry.registry_id}@{engine.registry.revision[:12]} "
                   f"({len(engine.registry)} experts) on {engine.endpoint}")
        click.echo("Loading the embedder (the base model runs on the upstreams) ...")
        _ = engine.router.embedder
        click.echo(f"Forwarding to vLLM at {', '.join(vllm_config.upstreams)} "
                   f"(at most {upstream_max_loras} adapter(s) each)")
        click.echo(f"Serving on http://{host}:{port}/v1 (mode {mode}; OpenAI-compatible; Ctrl-C to stop)")
        app = create_app(engine, config, backend=VllmBackend(engine, vllm_config))
        uvicorn.run(app, host=host, port=port, log_level="info")
        return
    engine = ExpertEngine(registry, revision=revision, endpoint=endpoint, token=token, base_model=base_model,
                          cache_size=cache_size, cache_bytes=cache_bytes, prefetch=prefetch, device=device)
    click.echo(f"Registry {engine.registry.registry_id}@{engine.registry.revision[:12]} "
               f"({len(engine.registry)} experts) on {engine.endpoint}")
    click.echo("Loading the embedder and the base model ...")
    engine.warm_up()
    for expert in pins:
        slot = engine.pin(expert)
        click.echo(f"Pinned {slot.expert_id} ({slot.key[0]}@{slot.key[1][:12]})")
    click.echo(f"Serving on http://{host}:{port}/v1 (mode {mode}; OpenAI-compatible; Ctrl-C to stop)")
    uvicorn.run(create_app(engine, config), host=host, port=port, log_level="info")


def _check_backend_options(ctx: click.Context, backend: str, upstreams: tuple[str, ...]) -> None:
    """Refuse options the chosen backend would ignore, and a vLLM backend without upstreams."""
    def given(name: str) -> bool:  # on the command line: an environment variable set for the other is fine
        return ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    def flag(name: str) -> str:
        return "--pin" if name == "pins" else "--upstream" if name == "upstreams" else f"--{name.replace('_', '-')}"

    if backend == "vllm":
        ignored = [flag(n) for n in _ENGINE_ONLY if given(n)]
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)}: only for --backend engine (vLLM holds the base model "
                                   "and its adapters; see --upstream-max-loras).")
        if not upstreams:
            raise click.UsageError("--backend vllm needs --upstream URL (a vLLM OpenAI server).")
    else:
        ignored = [flag(n) for n in _VLLM_ONLY if given(n)]
        if ignored:
            raise click.UsageError(f"{', '.join(ignored)}: only for --backend vllm.")

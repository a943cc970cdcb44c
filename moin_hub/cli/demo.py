"""`moin-hub demo`: the MoIN job end to end, offline, on the bundled defaults."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import emit, examples, format_option


@click.command("demo", epilog=examples("moin-hub demo --out demo-out", "moin-hub demo --out demo-out --k 6 --dense"))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"), show_default=True,
              help="Folder for the local Hub's data and the workspace (a rerun reuses both).")
@click.option("--max-files", type=click.IntRange(4, 500), default=60, show_default=True,
              help="Brown files used, balanced over the genre groups.")
@click.option("--k", type=click.IntRange(2), default=6, show_default=True, help="Topics, hence experts.")
@click.option("--tokens-per-expert", type=click.IntRange(512), default=20_480, show_default=True,
              help="Training tokens per topic (total = k x this, the seed's share included).")
@click.option("--seed-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.75, show_default=True,
              help="Share of the total spent first on one shared seed LoRA (branch-train); 0: plain MoIN.")
@click.option("--workers", type=click.IntRange(1), default=2, show_default=True, help="Experts trained at once.")
@click.option("--dense", is_flag=True, help="Also train and score the dense baseline (doubles the training time).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="Port of the local Hub (0: any free port).")
@format_option
def command(out: Path, max_files: int, k: int, tokens_per_expert: int, seed_fraction: float, workers: int, dense: bool,
            port: int, output_format: str) -> None:
    """Run the whole job offline: local Hub, cluster, train, evaluate, push, routed pulls.

    \b
    Starts a local Hub server, publishes the bundled base model (SmolLM2-135M-Instruct,
    dequantized from the packaged Q4_1 GGUF) and embedder (all-MiniLM-L6-v2) to it, clusters a
    slice of the Brown Corpus, trains one shared seed LoRA and branches one expert per topic from
    it, scores them on held-out files, pushes them into a registry, and routes example queries
    to their experts. The defaults finish in about 15 minutes on 2 CPU cores.
    """
    from ..pipeline.demo import DemoConfig, run_demo

    config = DemoConfig(max_files=max_files, k=k, tokens_per_expert=tokens_per_expert, seed_fraction=seed_fraction,
                        workers=workers, dense=dense, port=port)
    text = output_format == "text"
    summary = run_demo(out, config, echo=click.echo if text else (lambda _: None), progress=text)
    if not text:
        emit(output_format, summary, "")

"""`moin-hub register`: register a PEFT LoRA adapter already on the Hub (bring your own adapter)."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import emit, examples, hub_options, registry_option


@click.command(
    "register",
    epilog=examples(
        "moin-hub register someone/lora-sailing --registry acme/moin-registry --examples sailing.txt",
        "moin-hub register someone/lora-law --registry acme/moin-registry --examples law.jsonl --format json",
    ),
)
@click.argument("repo_id")
@registry_option
@click.option("--examples", "examples_file", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Texts of the adapter's subject: one per line, or JSON lines with a \"text\" field (.jsonl).")
@click.option("--expert-id", default=None, help="Id in the registry (default: the repo's name).")
@click.option("--revision", default=None, help="The adapter repo's revision to pin (default: its head).")
@click.option("--heldout-fraction", default=0.25, show_default=True, type=click.FloatRange(0, 0.5),
              help="Share of the examples held out for base vs adapter perplexity (0: none).")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8), help="Tokens per perplexity block.")
@hub_options
def command(repo_id: str, registry: str, examples_file: Path, expert_id: str | None, revision: str | None,
            heldout_fraction: float, seq_len: int, endpoint: str | None, token: str | None,
            output_format: str) -> None:
    """Register a LoRA adapter on the Hub, made for the registry's base model, pinned at its commit.

    \b
    No write access to the adapter's repo is needed. The centroid is the mean embedding of the
    example texts (the registry's embedder), their cosines give the similarity statistics, and
    the base model and the adapter are scored on held-out examples. Checked as a push is: base
    model (and commit), safetensors only, no pickle, a LoRA (rank and target modules reported).
    """
    from ..pipeline.register import read_examples, register_adapter

    result = register_adapter(repo_id, registry=registry, examples=read_examples(examples_file), expert_id=expert_id,
                              revision=revision, heldout_fraction=heldout_fraction, seq_len=seq_len,
                              endpoint=endpoint, token=token)

    def text() -> str:
        ppl = (f"perplexity {result.base_perplexity:.2f} (base) -> {result.perplexity:.2f} on {result.n_heldout} "
               "held-out example(s)" if result.perplexity is not None and result.base_perplexity is not None
               else "no perplexity measured")
        return (f"Registered {result.repo_id}@{result.revision[:12]} as {result.expert_id} in {result.registry_id} "
                f"(registry @{result.registry_revision[:12]})\n  LoRA rank {result.lora_rank} on "
                f"{', '.join(result.target_modules) or '?'}; {ppl}")

    emit(output_format, result.to_dict(), text)

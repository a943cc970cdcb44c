"""`moin-hub registry show`: what a registry holds."""

from __future__ import annotations

import click

from ._common import emit, examples, hub_options, registry_option


@click.group("registry")
def command() -> None:
    """Inspect and maintain registries (show, verify, compact, migrate)."""


@command.command("show", epilog=examples("moin-hub registry show --registry acme/moin-registry --format json"))
@registry_option
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def show(registry: str, revision: str | None, endpoint: str | None, token: str | None, output_format: str) -> None:
    """List the experts of a registry with their keywords and perplexities."""
    from ..hub.registry import Registry

    reg = Registry.load(registry, revision=revision, endpoint=endpoint, token=token)
    data = {
        "registry": reg.registry_id, "revision": reg.revision, "manifest": reg.manifest.to_dict(),
        "experts": [{k: v for k, v in r.to_dict().items() if k != "centroid"} for r in reg],
    }

    def text() -> str:
        lines = [f"{reg.registry_id}@{reg.revision[:12]}: {len(reg)} expert(s), base "
                 f"{reg.manifest.base_model.repo_id}, embedder {reg.manifest.embedder.repo_id}"]
        for r in reg:
            ppl = (f"ppl {r.base_perplexity:.2f} -> {r.perplexity:.2f}"
                   if r.perplexity is not None and r.base_perplexity is not None else "ppl n/a")
            lines.append(f"  {r.expert_id:<20} {r.repo_id:<40} {ppl:<22} {', '.join(r.keywords[:5])}")
        return "\n".join(lines)

    emit(output_format, data, text)


@command.command("verify", epilog=examples("moin-hub registry verify --registry acme/moin-registry"))
@registry_option
@click.option("--revision", default=None, help="Registry revision (default: head of main).")
@hub_options
def verify(registry: str, revision: str | None, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Check every expert of a registry as `pull` would (exit code 1 if any is broken).

    \b
    For each row: its pinned commit exists, its repo holds no pickle, every file matches the
    recorded sha256, and its adapter names the registry's base model. Files go to the HF cache.
    """
    import sys

    from ..hub.pull import verify_registry
    from ..hub.registry import Registry

    report = verify_registry(Registry.load(registry, revision=revision, endpoint=endpoint, token=token),
                             token=token)

    def text() -> str:
        lines = [f"{report.registry_id}@{report.revision[:12]}: {report.checked} expert(s) checked, "
                 f"{len(report.problems)} problem(s)"]
        lines += [f"  {expert_id}: {reason}" for expert_id, reason in report.problems.items()]
        return "\n".join(lines)

    emit(output_format, report.to_dict(), text)
    if not report.ok:
        sys.exit(1)


def _rewrite_text(result, verb: str) -> str:  # noqa: ANN001
    if not result.committed:
        return f"{result.registry_id}@{result.revision[:12]}: nothing to {verb} ({result.n_experts} expert(s))"
    return (f"{result.registry_id}@{result.revision[:12]}: {result.n_experts} expert(s) in {result.n_cells} "
            f"shard(s), format v{result.format_version}")


@command.command("compact", epilog=examples("moin-hub registry compact --registry acme/moin-registry"))
@registry_option
@hub_options
def compact(registry: str, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Fold the shards pushed since the last compaction back into k-means cells (one commit).

    \b
    Rewrites every row (an O(n) step, so that pushes stay O(1)), the ids file, the coarse routing
    file (cell centroids; registries of 2,048 experts or more) and the card. Safe while others push:
    the commit is made on the head it read, and recomputed if the head moved.
    """
    from ..hub.compaction import compact_registry

    result = compact_registry(registry, endpoint=endpoint, token=token)
    emit(output_format, result.to_dict(), lambda: _rewrite_text(result, "compact"))


@command.command("migrate", epilog=examples("moin-hub registry migrate --registry acme/old-registry"))
@registry_option
@hub_options
def migrate(registry: str, endpoint: str | None, token: str | None, output_format: str) -> None:
    """Upgrade a format v1 registry (one experts.parquet) to the sharded format v2 (one commit)."""
    from ..hub.compaction import migrate_registry

    result = migrate_registry(registry, endpoint=endpoint, token=token)
    emit(output_format, result.to_dict(), lambda: _rewrite_text(result, "migrate"))


@command.command("rebuild", epilog=examples(
    "moin-hub registry rebuild --registry acme/moin-registry",
    "moin-hub registry rebuild --registry acme/moin-registry --write --format json"))
@registry_option
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Download every file of each expert and compare its sha256 with its card's.")
@click.option("--write", is_flag=True, help="Replace the registry's rows by the rebuilt ones (one commit).")
@hub_options
def rebuild(registry: str, verify: bool, write: bool, endpoint: str | None, token: str | None,
            output_format: str) -> None:
    """Rebuild a registry's rows from the expert cards on the Hub tagged for it.

    \b
    Each expert card carries all its row needs (full centroid, embedder pin, perplexities in
    model-index, file digests); the row pins the repo's head commit. Cards for another registry,
    base model or embedder, or whose files do not match, are refused and listed. Without --write,
    compares the rebuilt rows with the registry's (exit code 1 if they differ).
    """
    import sys

    from ..hub.rebuild import rebuild_registry
    from ..hub.registry import Registry

    report = rebuild_registry(registry, verify=verify, write=write, endpoint=endpoint, token=token,
                              progress=output_format == "text")
    current = None if write else Registry.load(registry, endpoint=endpoint, token=token)
    same = current is None or list(current.experts) == report.rows
    data = {**report.to_dict(), "same_as_registry": same if current is not None else None}

    def text() -> str:
        lines = [f"{registry}: {len(report.rows)} expert(s) rebuilt from their cards, {len(report.problems)} refused"]
        lines += [f"  refused {repo}: {reason}" for repo, reason in report.problems.items()]
        if write:
            lines.append(f"written at {report.written_revision}")
        else:
            lines.append("same rows as the registry" if same else "the registry's rows differ (pass --write to replace them)")
        return "\n".join(lines)

    emit(output_format, data, text)
    if not same:
        sys.exit(1)


def _lines(path: str) -> list[str]:
    from pathlib import Path

    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


@command.command("calibrate", epilog=examples(
    "moin-hub registry calibrate --registry acme/moin-registry --queries heldout.txt --off-topic off.txt",
    "moin-hub registry calibrate --registry acme/moin-registry --queries q.txt --off-topic o.txt --write"))
@registry_option
@click.option("--queries", "queries_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out on-topic queries, one per line.")
@click.option("--off-topic", "off_topic_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Off-topic prompts (greetings, other subjects), one per line.")
@click.option("--write", is_flag=True, help="Record the threshold as the registry's default_threshold (one commit).")
@hub_options
def calibrate(registry: str, queries_file: str, off_topic_file: str, write: bool, endpoint: str | None,
              token: str | None, output_format: str) -> None:
    """Set the routing threshold on calibrated scores from on-topic queries vs off-topic prompts.

    \b
    Each query's best route is scored as a z-score of its cosine against the expert's own
    documents (sim_mean, sim_std in its row). The threshold that best separates the two sets
    (the largest smaller-of kept on-topic and rejected off-topic) is printed, and with --write
    stored in moin_registry.json; `route` then uses it when no --threshold is given.
    """
    from ..hub.calibration import calibrate_registry

    report = calibrate_registry(registry, _lines(queries_file), _lines(off_topic_file), write=write,
                                endpoint=endpoint, token=token)

    def text() -> str:
        where = f"; written at {report.written_revision[:12]}" if report.written_revision else " (not written)"
        return (f"{registry}: threshold {report.threshold:+.3f} keeps {report.kept:.1%} of {report.n_on_topic} "
                f"on-topic queries and rejects {report.rejected:.1%} of {report.n_off_topic} off-topic{where}")

    emit(output_format, report.to_dict(), text)

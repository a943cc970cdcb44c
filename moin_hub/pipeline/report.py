"""The evaluation report (``report.json`` of ``moin-hub evaluate``) as a table for people."""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_modes(report: dict[str, Any]) -> list[str]:
    """One line per routing mode of the report's overall scores (none if no mode was scored)."""
    overall = report["perplexity"]["overall"]
    modes = overall.get("modes", {})
    base = (modes.get("base") or {}).get("ppl")  # the base model on the same tokens as the modes
    lines = []
    for mode, m in modes.items():
        vs_base = f" (x{m['ppl'] / base:.3f} of base)" if m["ppl"] and base else ""
        extra = f", {m['base_only']:.0%} to the base" if m.get("base_only") else ""
        lines.append(f"Mode {mode:<9} ppl {_fmt(m['ppl'])}{vs_base}  {_fmt(m['mean_experts'])} experts/document, "
                     f"{m['mixtures']} distinct mixture(s){extra}, {m['tokens']} tokens")
    return lines


def format_report(report: dict[str, Any]) -> str:
    """The evaluation report as a table for people."""
    lines = [f"{'topic':<12}{'base':>9}{'routed':>9}{'oracle':>9}{'dense':>9}{'routed->own':>13}"]
    rows = {**report["perplexity"]["topics"], "overall": report["perplexity"]["overall"]}
    for topic, s in rows.items():
        own = s.get("routed_to_own")
        lines.append(f"{topic:<12}{_fmt(s['base_ppl']):>9}{_fmt(s['routed_ppl']):>9}{_fmt(s['oracle_ppl']):>9}"
                     f"{_fmt(s['dense_ppl']):>9}{_fmt(own):>13}")
    lines.extend(format_modes(report))
    routing = report["routing"]
    lines.append(f"Routing accuracy: topic {_fmt(routing['topic_accuracy'], 3)}, "
                 f"label {_fmt(routing['label_accuracy'], 3)} over {routing['documents']} held-out queries")
    targets = report["targets"]
    goals = ", ".join(f"{name} {_fmt(value, 3)} ({'met' if met else 'not met' if met is not None else 'n/a'})"
                      for (name, value), met in zip(targets["measured"].items(), targets["met"].values(), strict=True))
    lines.append(f"Targets: {goals}")
    for path in report.get("plots", []):
        lines.append(f"Plot: {path}")
    return "\n".join(lines)

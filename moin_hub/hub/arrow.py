"""Token-level mixing of registry experts with no trained router: Arrow, with optional adaptive gating.

Arrow (Ostapenko et al. 2024, arXiv 2405.11157; PEFT's ``ArrowConfig``) routes every token in every LoRA
layer on its own. Each expert ``e`` of a layer gets a prototype ``v_e``: the top right singular vector of its
update ``dW_e = B_e A_e``. A token's input ``x`` to the layer is scored against each prototype, ``|x . v_e|``
(the sign of a singular vector means nothing); its ``top_k`` experts are kept and their scores go through a
softmax with ``temperature``; the layer adds ``sum_e c_e * scaling_e * B_e A_e x``. The experts need no
training data and no router: only their weights. That is what "mixture without router training" means.

Adaptive gating (Li et al. 2023, arXiv 2310.07188): with ``gap``, a token takes the experts after its
first only when the gate is unsure, i.e. when ``p1 - p2 < gap`` between its two best softmax weights. A
token with a clear winner runs one expert, so the mean experts per token drops where routing is easy.

Compared with PEFT's implementation (which :func:`arrow_lora` matches, see ``tests/test_arrow.py``):

- prototypes are exact (an SVD of the small ``r x in`` matrix ``R A`` after a QR of ``B``), not 15 power
  iterations from a random start;
- only the selected experts run on a token (one masked pass per expert), not every expert on every token;
- the experts stay ordinary adapters (``moin__<id>`` slots) of one PEFT model, so the same loaded experts
  serve ``top1``, weighted mixtures and Arrow; :func:`arrow_lora` adds the updates in forward hooks while the
  model runs its base path, as :mod:`moin_hub.serving.lora_batch` does for mixed batches.

Example:
    >>> with arrow_lora(peft_model, ["moin__topic-00", "moin__topic-01"], ArrowSpec(top_k=2)):  # doctest: +SKIP
    ...     logits = peft_model(input_ids=ids).logits
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._validators import validate_positive_int


@dataclass(frozen=True)
class ArrowSpec:
    """How Arrow mixes experts per token. The defaults are PEFT's ``ArrowConfig`` defaults."""

    top_k: int = field(default=3, metadata={"help": "Experts a token may take in each layer."})
    temperature: float = field(default=1.0, metadata={"help": "Softmax temperature over the kept |x . v_e|."})
    gap: float | None = field(
        default=None, metadata={"help": "Adaptive gating: take more than the best expert only where p1 - p2 < gap "
                                        "(None: always top_k)."})

    def __post_init__(self) -> None:
        validate_positive_int(self.top_k, field="top_k")
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature!r}.")
        if self.gap is not None and not (isinstance(self.gap, int | float) and 0 < self.gap <= 1):
            raise ValueError(f"gap must be in (0, 1] or None, got {self.gap!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "temperature": self.temperature, "gap": self.gap}


def prototype(lora_a: Any, lora_b: Any) -> Any:
    """The top right singular vector (float32, ``[in_features]``) of ``B @ A`` without forming it.

    ``B = Q R`` (QR, ``Q`` with orthonormal columns), so ``B A = Q (R A)`` has the right singular vectors of
    the ``r x in`` matrix ``R A``.
    """
    import torch

    a, b = lora_a.detach().float(), lora_b.detach().float()
    _, r = torch.linalg.qr(b)
    _, _, vh = torch.linalg.svd(r @ a, full_matrices=False)
    return vh[0]


@dataclass
class ArrowStats:
    """What Arrow did while a :func:`arrow_lora` block ran: token-layer decisions and experts they took."""

    decisions: int = 0
    experts: int = 0

    @property
    def mean_experts(self) -> float | None:
        """Mean experts per token and layer (``None`` before any token)."""
        return self.experts / self.decisions if self.decisions else None


def _lora_linears(model: Any) -> list[Any]:
    from peft.tuners.lora.layer import Linear

    return [m for m in model.modules() if isinstance(m, Linear)]


def _gate(scores: Any, spec: ArrowSpec) -> Any:
    """``[tokens, experts]`` weights from ``[tokens, experts]`` scores: top-k softmax, then the adaptive gate."""
    import torch

    k = min(spec.top_k, scores.shape[1])
    top, index = torch.topk(scores, k, dim=1)
    probs = torch.softmax(top / spec.temperature, dim=1)
    if spec.gap is not None and k > 1:
        sure = (probs[:, 0] - probs[:, 1]) >= spec.gap
        probs = torch.where(sure[:, None], torch.nn.functional.one_hot(torch.zeros_like(index[:, 0]), k).to(probs),
                            probs)
    return torch.zeros_like(scores).scatter_(1, index, probs)


@contextlib.contextmanager
def arrow_lora(model: Any, adapters: Sequence[str], spec: ArrowSpec | None = None,
               stats: ArrowStats | None = None) -> Iterator[Any]:
    """Run ``model`` (a PeftModel holding ``adapters``) with Arrow's per-token mixture of those adapters.

    Each LoRA linear layer holding some of ``adapters`` routes each token among the ones it holds; the base
    path runs with adapters disabled and forward hooks add the mixed update.

    Args:
        model: a PeftModel with the adapters loaded (plain LoRA on linear layers).
        adapters: the adapter names to mix (at least one).
        spec: top-k, temperature and adaptive gap (default :class:`ArrowSpec`).
        stats: if given, filled with the number of token-layer decisions and experts taken.

    Raises:
        ValueError: no adapters, an adapter not loaded, or no LoRA linear layer holding them.
    """
    import torch

    spec = spec or ArrowSpec()
    names = list(dict.fromkeys(adapters))
    if not names:
        raise ValueError("arrow_lora needs at least one adapter.")
    missing = [n for n in names if n not in model.peft_config]
    if missing:
        raise ValueError(f"adapters not loaded: {missing}")
    handles = []
    try:
        for module in _lora_linears(model):
            held = [n for n in names if n in module.lora_A]
            if not held:
                continue
            a = [module.lora_A[n].weight for n in held]
            b = [module.lora_B[n].weight * module.scaling[n] for n in held]
            protos = torch.stack([prototype(x, y) for x, y in zip(a, b, strict=True)]).to(a[0].dtype)

            def add_update(_module: Any, args: tuple, output: Any, a: list = a, b: list = b, protos: Any = protos) -> Any:
                x = args[0]
                flat = x.to(a[0].dtype).reshape(-1, x.shape[-1])
                weights = _gate((flat @ protos.T).abs(), spec)
                if stats is not None:
                    stats.decisions += flat.shape[0]
                    stats.experts += int((weights > 0).sum())
                update = torch.zeros((flat.shape[0], output.shape[-1]), dtype=flat.dtype, device=flat.device)
                for e in range(len(a)):
                    rows = weights[:, e].nonzero(as_tuple=True)[0]
                    if rows.numel():
                        delta = (flat[rows] @ a[e].T) @ b[e].T
                        update.index_add_(0, rows, (delta * weights[rows, e, None]).to(update.dtype))
                return output + update.reshape(output.shape).to(output.dtype)

            handles.append(module.register_forward_hook(add_update))
        if not handles:
            raise ValueError(f"no LoRA linear layer holds any of {names}.")
        with model.disable_adapter():  # every LoRA layer returns its base layer's output; the hooks add the rest
            yield model
    finally:
        for handle in handles:
            handle.remove()

"""Scoring a causal LM on text: token blocks, summed next-token NLL, perplexity, bf16 autocast.

Texts become token blocks the same way for training and evaluation (:func:`build_blocks`): each text
is tokenized without special tokens, followed by EOS, all are concatenated, and the stream is cut into
full ``seq_len`` blocks (the tail shorter than a block is dropped). Perplexity is ``exp`` of the
token-weighted mean next-token NLL over those blocks, so numbers from different calls and different
adapters on the same texts are directly comparable. :func:`texts_nlls` scores each text on its own
instead (no text dropped or joined), which the routing modes use so that every mode scores the same tokens.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

BF16 = bool | str  # True, False or "auto"


def cpu_has_fast_bf16() -> bool:
    """True if this CPU has oneDNN bf16 kernels (AVX-512 BW/VL/DQ, AMX, or ARM bf16).

    Without them (e.g. an AVX2-only x86 CPU) bf16 matmuls fall back to a slow path: measured on the
    2-core AVX2 build machine, a bf16 matmul was ~30x slower than fp32, so autocast would slow training down.
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private API moved, or a build without oneDNN
        return False


def resolve_bf16(bf16: BF16, device: torch.device | str) -> bool:
    """Decide whether to run under ``torch.autocast(dtype=bfloat16)``.

    Args:
        bf16: ``True``, ``False`` or ``"auto"``. ``"auto"`` means yes on a CPU with fast bf16 kernels
            (:func:`cpu_has_fast_bf16`; there autocast made LoRA training ~2.5x faster than fp32) and on
            CUDA devices that support bf16; no elsewhere.
        device: where the model runs.

    Returns:
        Whether to autocast to bf16.

    Raises:
        ValueError: ``bf16`` is not one of the three values.
    """
    if isinstance(bf16, bool):
        return bf16
    if bf16 != "auto":
        raise ValueError(f"bf16 must be True, False or 'auto', got {bf16!r}.")
    kind = torch.device(device).type
    if kind == "cpu":
        return cpu_has_fast_bf16()
    return kind == "cuda" and torch.cuda.is_bf16_supported()


def autocast(device: torch.device | str, enabled: bool) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to bf16 on ``device`` when ``enabled``, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter."""
    return next(model.parameters()).device


def build_blocks(tokenizer: Any, texts: Sequence[str], seq_len: int) -> torch.Tensor:
    """Tokenize ``texts``, append EOS to each, concatenate, and cut into full ``seq_len`` blocks.

    Args:
        tokenizer: a Hugging Face tokenizer with an ``eos_token_id``.
        texts: the documents, in order.
        seq_len: tokens per block.

    Returns:
        A ``LongTensor[n_blocks, seq_len]``; ``n_blocks`` may be 0 if the texts are shorter than a block.

    Raises:
        ValueError: the tokenizer has no EOS token, or ``seq_len`` < 2.

    Example:
        >>> build_blocks(tok, ["one text", "another text"], seq_len=4).shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token_id; texts cannot be separated in a block stream.")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}.")
    stream: list[int] = []
    if texts:
        encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def blocks_nll(model: torch.nn.Module, blocks: torch.Tensor, *, batch_size: int = 8,
               bf16: BF16 = "auto") -> tuple[float, int]:
    """Summed next-token NLL of ``model`` over ``blocks``, and the number of predicted tokens.

    Each block predicts its tokens 2..seq_len from the ones before, so it counts ``seq_len - 1`` tokens.
    The model is put in eval mode for the call and given back in the mode it had.

    Returns:
        ``(sum_nll, n_tokens)``; ``(0.0, 0)`` for no blocks.
    """
    if blocks.shape[0] == 0:
        return 0.0, 0
    total = 0.0
    with _scoring(model, bf16) as device:
        for batch in blocks.split(batch_size):
            batch = batch.to(device)
            logits = model(input_ids=batch).logits
            for row, ids in zip(logits, batch, strict=True):  # one row at a time: the fp32 copy stays small
                total += F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum").item()
    return total, blocks.shape[0] * (blocks.shape[1] - 1)


@contextlib.contextmanager
def _scoring(model: torch.nn.Module, bf16: BF16) -> Iterator[torch.device]:
    """``model`` in eval mode, gradients off, bf16 autocast as asked; yields its device and gives the model
    back in the mode it had."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, resolve_bf16(bf16, device)):
            yield device
    finally:
        model.train(was_training)


def perplexity(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256,
               batch_size: int = 8, bf16: BF16 = "auto", max_tokens: int | None = None) -> tuple[float, int]:
    """Perplexity of ``model`` on ``texts``: ``exp`` of the token-weighted mean NLL over full blocks.

    Deterministic: no sampling, no dropout (eval mode), gradients off.

    Args:
        model: a causal LM (plain or ``PeftModel``), on any device.
        tokenizer: its tokenizer.
        texts: the documents; see :func:`build_blocks`.
        seq_len: tokens per block (use the training ``seq_len`` to compare with training).
        batch_size: blocks per forward pass.
        bf16: autocast to bf16 (``True`` / ``False`` / ``"auto"``, see :func:`resolve_bf16`).
        max_tokens: evaluate only the first ``ceil(max_tokens / seq_len)`` blocks.

    Returns:
        ``(ppl, n_tokens)``: the perplexity and the number of predicted tokens behind it.

    Raises:
        ValueError: the texts hold fewer tokens than one block.

    Example:
        >>> ppl, n = perplexity(model, tokenizer, ["Some held-out text ..."], seq_len=128)  # doctest: +SKIP
    """
    blocks = build_blocks(tokenizer, texts, seq_len)
    if max_tokens is not None:
        blocks = blocks[: max(1, math.ceil(max_tokens / seq_len))]
    if blocks.shape[0] == 0:
        raise ValueError(f"The texts hold fewer tokens than one block of seq_len={seq_len}; "
                         "give more text or a shorter seq_len.")
    nll, n_tokens = blocks_nll(model, blocks, batch_size=batch_size, bf16=bf16)
    return math.exp(nll / n_tokens), n_tokens


def texts_nlls(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256,
               batch_size: int = 8, bf16: BF16 = "auto") -> list[tuple[float, int]]:
    """Next-token NLL of each text on its own (its tokens and EOS, the first ``seq_len`` of them).

    Unlike :func:`build_blocks`, no text is dropped or joined to another: the same text gives the same
    predicted tokens whatever it is grouped with, so scores of different groupings compare exactly.

    Returns:
        ``[(sum_nll, n_tokens), ...]``, one per text (``(0.0, 0)`` for a text of fewer than 2 tokens).
    """
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    rows = [(ids + [tokenizer.eos_token_id])[:seq_len] for ids in encoded]
    scored = [i for i, ids in enumerate(rows) if len(ids) >= 2]
    out = [(0.0, 0)] * len(rows)
    with _scoring(model, bf16) as device:
        for start in range(0, len(scored), batch_size):
            chunk = [rows[i] for i in scored[start:start + batch_size]]
            width = max(len(ids) for ids in chunk)
            batch = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, ids in enumerate(chunk):  # right padding: positions after a text are masked out
                batch[i, :len(ids)] = torch.tensor(ids)
                mask[i, :len(ids)] = 1
            logits = model(input_ids=batch.to(device), attention_mask=mask.to(device)).logits
            for index, row, ids in zip(scored[start:start + batch_size], logits, chunk, strict=True):
                target = torch.tensor(ids[1:], device=device)
                out[index] = (F.cross_entropy(row[: len(ids) - 1].float(), target, reduction="sum").item(),
                              len(ids) - 1)
    return out


def texts_nll(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *, seq_len: int = 256,
              batch_size: int = 8, bf16: BF16 = "auto") -> tuple[float, int]:
    """Summed NLL and predicted tokens of :func:`texts_nlls` over ``texts``."""
    nlls = texts_nlls(model, tokenizer, texts, seq_len=seq_len, batch_size=batch_size, bf16=bf16)
    return sum(n for n, _ in nlls), sum(t for _, t in nlls)

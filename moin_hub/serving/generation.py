"""Batched generation on the engine's one base model: many prompts, each with its own expert, in one batch.

:class:`BatchedGeneration` (inherited by :class:`~moin_hub.serving.engine.ExpertEngine`) encodes prompts and
runs ``generate`` on one padded batch whose rows may use different experts; :func:`_streaming_kwargs` gives
each row its own streaming and stopping, :func:`truncate_at_stop` cuts a text at its first stop string, and
:class:`Completion` is one row's output.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..hub.mixing import Mixture


@dataclass(frozen=True)
class Completion:
    """The output of one prompt of a batch: new token ids, their text, why it stopped."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


def _streaming_kwargs(on_tokens: Sequence[Callable[[int], None] | None],
                      cancels: Sequence[threading.Event | None], limits: Sequence[int], width: int,
                      eos: int | None) -> dict[str, Any]:
    """``generate`` kwargs for per-row streaming and stopping.

    Row ``i`` gets each new token passed to ``on_tokens[i]`` (until its EOS or its own token limit), and stops
    (HF pads it from then on) once ``cancels[i]`` is set or it has ``limits[i]`` new tokens, so rows with
    different limits, streamed or not, share one batch and the batch ends when every row has.
    """
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    kwargs: dict[str, Any] = {}
    if any(callback is not None for callback in on_tokens):
        class RowStreamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False
                self.sent = [0] * len(on_tokens)
                self.ended = [callback is None for callback in on_tokens]

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate's first put is the prompt
                    self.prompt_seen = True
                    return
                for row, token in enumerate(value.reshape(-1).tolist()):
                    if self.ended[row]:
                        continue
                    on_tokens[row](int(token))
                    self.sent[row] += 1
                    self.ended[row] = token == eos or self.sent[row] >= limits[row]

            def end(self) -> None:
                pass

        kwargs["streamer"] = RowStreamer()

    class RowDone(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            new = input_ids.shape[1] - width
            done = [new >= limit or (cancel is not None and cancel.is_set())
                    for limit, cancel in zip(limits, cancels, strict=True)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    kwargs["stopping_criteria"] = StoppingCriteriaList([RowDone()])
    return kwargs


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` cut before the first occurrence of any stop string; True if one was found.

    Example:
        >>> truncate_at_stop("a cat. A dog.", ["."])
        ('a cat', True)
    """
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class BatchedGeneration:
    """The generation methods of :class:`~moin_hub.serving.engine.ExpertEngine`, which inherits them.

    They use the engine's base model and tokenizer (``_load_base``, ``tokenizer``, ``max_context``,
    ``has_chat_template``), its adapters (``hold``, ``using_mixture``, ``_peft`` under ``_lock``) and its
    ``stats``.
    """

    def encode(self, text: str, *, reserve: int = 0) -> list[int]:
        """Token ids of a plain-text prompt, keeping the last tokens that leave ``reserve`` for new ones."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return ids[-max(1, self.max_context() - reserve):]

    def encode_chat(self, messages: Sequence[Mapping[str, str]], *, reserve: int = 0) -> list[int]:
        """Token ids of a chat (``[{"role", "content"}]``) with the tokenizer's chat template and the generation
        prompt; a tokenizer without a template gets the contents joined by newlines."""
        tokenizer = self.tokenizer
        if self.has_chat_template:
            text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                                 add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
        return ids[-max(1, self.max_context() - reserve):]

    @contextlib.contextmanager
    def _using_rows(self, mixtures: Sequence[Mixture]) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The model and the forward kwargs for a batch whose rows may use different experts.

        Rows that share one mixture run with it active. Rows of different single experts (or the base model)
        run in ONE batch: the base model's matmuls are shared, and each row gets its own expert's LoRA update
        through gathered batched matmuls (:func:`moin_hub.serving.lora_batch.per_row_lora`), or, for adapters that
        are not plain linear LoRA, PEFT's per-row ``adapter_names``. Mixtures of several experts cannot be
        mixed with other rows.
        """
        from .lora_batch import per_row_lora, supports

        keys = {(m.experts, tuple(round(w, 6) for w in m.weights)) for m in mixtures}
        if len(keys) == 1:
            with self.using_mixture(mixtures[0]) as model:
                yield model, {}
            return
        if any(len(m.experts) > 1 for m in mixtures):
            raise ValueError("Rows with different mixtures of several experts cannot share a batch.")
        experts = sorted({m.experts[0] for m in mixtures if m.experts})
        with self.hold(experts) as slots, self._lock:
            names = dict(zip(experts, (s.name for s in slots), strict=True))
            rows = [names[m.experts[0]] if m.experts else None for m in mixtures]
            if supports(self._peft, list(names.values())):
                with per_row_lora(self._peft, rows) as model:
                    yield model, {}
                return
            self._peft.set_adapter(slots[0].name, inference_mode=True)  # any: adapter_names decides per row
            yield self._peft, {"adapter_names": [r if r is not None else "__base__" for r in rows]}

    def generate_batch(self, prompts: Sequence[Sequence[int]], mixture: Mixture | Sequence[Mixture], *,
                       max_new_tokens: Sequence[int], temperature: float = 0.0, top_p: float = 1.0,
                       stop: Sequence[Sequence[str]] | None = None, seed: int | None = None,
                       on_token: Sequence[Callable[[int], None] | None] | None = None,
                       cancel: Sequence[threading.Event | None] | None = None) -> list[Completion]:
        """Generate for a batch of prompts in one padded forward batch on the one base model.

        Args:
            prompts: token ids of each prompt (left-padded together).
            mixture: the experts (and weights) of the whole batch, or one :class:`Mixture` per prompt. Rows may
                use different single experts or the base model (empty mixture) in one batch (gathered LoRA
                matmuls per row); a mixture of several experts is shared by every row of its batch.
            max_new_tokens: per prompt; the batch runs to the largest and each output is cut to its own.
            temperature: 0 decodes greedily; above 0 samples (with ``top_p``).
            stop: per prompt, strings that end its text (cut before the first one; ``finish_reason`` "stop").
            seed: seeds torch's generator for sampling (reproducible outputs).
            on_token: per prompt, None or a function called with each new token id as it is generated
                (streaming; up to the prompt's EOS or its own ``max_new_tokens``).
            cancel: per prompt, None or an event: once set, that prompt stops after its current token (a stop
                string seen while streaming, or a client gone); the others go on.

        Returns:
            One :class:`Completion` per prompt, in order.

        Raises:
            ValueError: lengths differ, or rows mix different multi-expert mixtures.
        """
        import torch

        if not prompts:
            return []
        mixtures = [mixture] * len(prompts) if isinstance(mixture, Mixture) else list(mixture)
        if len(max_new_tokens) != len(prompts) or len(mixtures) != len(prompts):
            raise ValueError("max_new_tokens and mixtures need one value per prompt.")
        on_token = list(on_token) if on_token is not None else [None] * len(prompts)
        cancel = list(cancel) if cancel is not None else [None] * len(prompts)
        if len(on_token) != len(prompts) or len(cancel) != len(prompts):
            raise ValueError("on_token and cancel need one value (or None) per prompt.")
        stop = stop or [()] * len(prompts)
        model, tokenizer = self._load_base()
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, ids in enumerate(prompts):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(ids):] = torch.tensor(list(ids), dtype=torch.long)
            attention[row, width - len(ids):] = 1
        n_new = max(max_new_tokens)
        extra_kwargs = _streaming_kwargs(on_token, cancel, list(max_new_tokens), width, tokenizer.eos_token_id)
        sampling = {"do_sample": True, "temperature": float(temperature), "top_p": float(top_p), "top_k": 0} \
            if temperature > 0 else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        start = time.perf_counter()
        with self._using_rows(mixtures) as (active, extra), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(seed)
            out = active.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                  max_new_tokens=n_new, pad_token_id=pad, eos_token_id=eos, **sampling, **extra,
                                  **extra_kwargs)
        seconds = time.perf_counter() - start
        results = []
        for row, (limit, stops) in enumerate(zip(max_new_tokens, stop, strict=True)):
            new = out[row, width:].tolist()[:limit]
            finish = "length"
            if eos in new:
                new, finish = new[: new.index(eos)], "stop"
            text = tokenizer.decode(new, skip_special_tokens=True)
            text, stopped = truncate_at_stop(text, stops)
            results.append(Completion(text, tuple(new), len(prompts[row]), "stop" if stopped else finish))
        self.stats.add(batches=1, batched_requests=len(prompts), generation_seconds=seconds,
                       generated_tokens=sum(len(c.token_ids) for c in results),
                       prompt_tokens=sum(len(p) for p in prompts))
        return results

"""Load the registry's base model (pinned, safetensors only) with a pulled expert applied through PEFT.

:func:`load_base` loads any base model from a folder or a Hub repo the same safe way (training, evaluation and
a server's ``--base-model`` folder use it).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import MoinHubError
from .client import resolve_endpoint
from .config import ADAPTER_WEIGHTS_FILENAME, PinnedModel
from .embed import download_model_dir
from .pull import PullResult

#: PEFT adapter names are prefixed so that no adapter name is a substring of a module name
#: (peft's hotswap matches keys by substring; see OFFLINE_ASSETS.md).
ADAPTER_PREFIX = "moin__"


def adapter_name(expert_id: str) -> str:
    """The PEFT adapter name of an expert: ``moin__<expert_id>`` with dots replaced (PEFT forbids them)."""
    return ADAPTER_PREFIX + expert_id.replace(".", "_")


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence one known deprecation warning: peft 0.21 calls transformers 5's ``is_gradient_checkpointing``
    (renamed ``is_activation_checkpointing``) on every adapter load. Nothing else is filtered."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@functools.lru_cache(maxsize=2)
def _base_dir(endpoint: str, repo_id: str, revision: str, token: str | bool | None) -> Path:
    return download_model_dir(repo_id, revision, endpoint=endpoint, token=token)


def load_base_model(base: PinnedModel, *, endpoint: str | None = None, token: str | bool | None = None,
                    dtype: Any = None, device: str | None = None) -> tuple[Any, Any]:
    """Download (once) and load a pinned base model and its tokenizer: safetensors only, no remote code.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _base_dir(resolve_endpoint(endpoint), base.repo_id, base.revision, token)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, use_safetensors=True,
                                                 trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if device:
        model.to(device)
    return model.eval(), tokenizer


def load_base(model_dir_or_repo: str | Path, revision: str | None = None,
              dtype: Any = None) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a local folder or a Hub repo: safetensors only, no remote code.

    Args:
        model_dir_or_repo: a folder with ``config.json`` + ``*.safetensors``, or a Hub model id.
        revision: a Hub revision (ignored for local folders).
        dtype: parameter dtype (default ``torch.float32``).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        OSError: the folder or repo has no safetensors weights (pickled weights are never loaded).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(model_dir_or_repo)
    model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=dtype or torch.float32,
                                                 use_safetensors=True, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
    return model.eval(), tokenizer


def check_adapter_effective(model: Any, name: str, weights_path: Path, repo_id: str) -> None:
    """Refuse an adapter that would silently not be what it claims.

    PEFT builds LoRA layers from the adapter's config and then loads the weights file into them, only
    warning about keys that match no layer: an adapter whose config targets no module of this base, or
    whose tensors are named for another architecture, then runs with PEFT's own initialisation (often the
    plain base model, ``lora_B`` being zero). Every LoRA tensor of the loaded adapter must come from the file.

    Raises:
        MoinHubError: no LoRA layer was created, or some of its tensors are not in the weights file.
    """
    from peft import get_peft_model_state_dict
    from safetensors import safe_open

    # save_embedding_layers=False: "auto" would look the base model's config up on the Hub at every load
    expected = set(get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False))
    if not expected:
        raise MoinHubError(f"Expert {repo_id!r} matches no module of the base model; "
                           "it would act as the plain base model.")
    with safe_open(str(weights_path), framework="np") as handle:
        stored = set(handle.keys())
    missing = expected - stored
    if missing:
        what = (f"none of its {len(expected)} LoRA tensors is" if missing == expected
                else f"{len(missing)} of its {len(expected)} LoRA tensors are not")
        raise MoinHubError(f"Expert {repo_id!r}: {what} in its weights file (e.g. {sorted(missing)[0]!r}); they "
                           "would keep PEFT's initial values, so the expert would not be what was trained.")


def load_expert(pulled: PullResult, *, base_model: Any = None, tokenizer: Any = None, dtype: Any = None,
                device: str | None = None, return_tokenizer: bool = False) -> Any:
    """The registry's base model with the pulled expert applied (a ``peft.PeftModel``).

    Args:
        pulled: the result of :func:`moin_hub.pull`.
        base_model: an already loaded base model to wrap (default: download the registry's pinned base).
        tokenizer: its tokenizer, returned as is when ``return_tokenizer``.
        dtype / device: for a base model loaded here.
        return_tokenizer: return ``(model, tokenizer)`` instead of the model.

    Raises:
        MoinHubError: the adapter matches no module of the base model (it would silently act as the base).

    Example:
        >>> model, tok = load_expert(pull("a question", registry="acme/reg"), return_tokenizer=True)  # doctest: +SKIP
    """
    from peft import PeftModel

    registry = pulled.registry
    if base_model is None:
        base_model, tokenizer = load_base_model(registry.manifest.base_model, endpoint=registry.endpoint,
                                                token=registry.token, dtype=dtype, device=device)
    name = adapter_name(pulled.expert.expert_id)
    with quiet_peft():
        model = PeftModel.from_pretrained(base_model, str(pulled.path), adapter_name=name, is_trainable=False,
                                          use_safetensors=True)
    check_adapter_effective(model, name, pulled.path / ADAPTER_WEIGHTS_FILENAME, pulled.expert.repo_id)
    model.eval()
    return (model, tokenizer) if return_tokenizer else model

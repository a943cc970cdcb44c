"""Train MoIN experts: one small LoRA adapter per topic on a frozen base LM, each on its own.

Experts never communicate ("introvert"): each job loads the base model, adds a fresh LoRA, trains on
its topic's text only and writes its folder. So jobs run in any order, in any number of processes or
machines, and a crashed run resumes by skipping the experts already on disk.

An expert folder (what :func:`moin_hub.push_expert` consumes)::

    <out>/<expert_id>/
      adapter_config.json, adapter_model.safetensors   PEFT LoRA (base_model_name_or_path = base Hub id,
                                                       revision = its pinned commit)
      centroid.safetensors                             tensor "centroid", float32[dim]
      moin_expert.json                                 ExpertMetadata (written last: marks "finished")
      training.json                                    TrainConfig + what was measured

Example:
    >>> job = TopicJob("cooking", texts=cooking_docs, centroid=centroid, eval_texts=held_out)  # doctest: +SKIP
    >>> train_expert("models/smollm2", job, "experts", TrainConfig(tokens_per_expert=50_000),
    ...              base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_revision=sha)  # doctest: +SKIP
    PosixPath('experts/cooking')
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .._validators import validate_commit_sha, validate_positive_int, validate_repo_id
from .._version import __version__
from ..errors import ExpertTrainingError, InvalidExpertError
from ..hub.client import sha256_file
from ..hub.config import ADAPTER_WEIGHTS_FILENAME, EXPERT_METADATA_FILENAME, ExpertMetadata, utc_now
from ..hub.expert import write_centroid
from ..hub.loading import load_base, quiet_peft
from .io import write_json
from .jobs import Phase, TopicJob, TrainConfig, plan_budget, scratch_phase
from .scoring import autocast, build_blocks, perplexity, resolve_bf16

logger = logging.getLogger(__name__)

TRAINING_FILENAME = "training.json"
EXECUTORS = ("local", "ray")

#: A local model folder / Hub id, or a picklable callable returning ``(model, tokenizer)``.
BaseSource = str | os.PathLike | Callable[[], tuple[Any, Any]]


# --------------------------------------------------------------------------------------------- folders


def is_finished(expert_dir: str | Path) -> bool:
    """True if ``expert_dir`` is a finished expert (it holds ``moin_expert.json``, written last)."""
    return (Path(expert_dir) / EXPERT_METADATA_FILENAME).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _remove_stale_tmp(out_dir: Path, expert_id: str) -> None:
    """Remove ``.<id>.tmp-<pid>`` folders left by runs that were killed (their process is gone)."""
    for tmp in out_dir.glob(f".{expert_id}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing %s, left by a killed run", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _torch_threads(n_threads: int | None) -> Iterator[None]:
    """Use ``n_threads`` torch threads inside the block (no change for ``None``)."""
    if n_threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# -------------------------------------------------------------------------------------------- training


def _load_base(source: BaseSource, base_revision: str) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a loader callable, a local folder, or a Hub id (at ``base_revision``)."""
    if callable(source):
        return source()
    local = Path(source).is_dir()
    return load_base(source, revision=None if local else base_revision)


def _add_lora(model: Any, config: TrainConfig, base_model_id: str, base_revision: str) -> Any:
    """Freeze ``model`` and wrap it with a fresh LoRA whose config names the base's Hub id and commit."""
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=config.peft_target_modules, bias="none", task_type="CAUSAL_LM")
    with quiet_peft():
        peft_model = get_peft_model(model, lora)
    saved = peft_model.peft_config["default"]
    saved.base_model_name_or_path = base_model_id  # not the local folder it was loaded from
    saved.revision = base_revision
    saved.target_modules = _short_names(peft_model, saved.target_modules)
    return peft_model


def _short_names(model: Any, targets: Any) -> Any:
    """The adapted modules as their last name (``{"q_proj", "down_proj", ...}``, what a card, a registry row
    and a hot-swap compare), where those names select exactly the same modules as ``targets`` (PEFT
    resolves ``"all-linear"`` to one full path per layer); else ``targets`` unchanged."""
    adapted = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    short = {name.rsplit(".", 1)[-1] for name in adapted}
    matched = {name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in short}
    return short if matched == adapted else targets


def _start_from(model: Any, seed_dir: Path) -> str:
    """Copy the seed's LoRA weights (``<seed_dir>/adapter_model.safetensors``) into ``model``'s fresh LoRA.

    Returns:
        The sha256 of the seed's weights file (recorded with each expert branched from it).

    Raises:
        InvalidExpertError: the seed is missing, or its tensors do not match the new LoRA's names and shapes
            (another rank, alpha or set of target modules).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = seed_dir / ADAPTER_WEIGHTS_FILENAME
    if not is_finished(seed_dir) or not weights.is_file():
        raise InvalidExpertError(str(seed_dir), "is not a finished seed adapter; train the seed first")
    state = load_file(str(weights))
    own = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would look the base up on a Hub
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    wanted = {k: tuple(v.shape) for k, v in own.items()}
    if shapes != wanted:
        differ = sorted(set(shapes.items()) ^ set(wanted.items()))[:3]
        raise InvalidExpertError(str(seed_dir), "its LoRA tensors differ from this run's (rank, alpha or target "
                                                f"modules changed?), e.g. {differ}")
    set_peft_model_state_dict(model, state)
    return sha256_file(weights)


def _lr_factor(step: int, *, warmup: int, total: int, schedule: str) -> float:
    """Learning-rate multiplier at ``step``: linear warmup, then cosine / linear decay to 0, or constant."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _batches(blocks: torch.Tensor, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless full batches of blocks: each epoch visits every block once, in a seeded random order."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    while True:
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(blocks.shape[0], generator=generator)])
        yield blocks[order[:batch_size]]
        order = order[batch_size:]


def _train_step(model: Any, batch: torch.Tensor, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, grad_clip: float | None, bf16: bool) -> float:
    """One AdamW step on ``batch`` (labels = inputs; the model shifts them); returns the loss."""
    with autocast(batch.device, bf16):
        loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(optimizer.param_groups[0]["params"], grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _fit(model: Any, blocks: torch.Tensor, config: TrainConfig, phase: Phase, *, bf16: bool, desc: str,
         progress: bool) -> dict[str, Any]:
    """Train the LoRA weights of ``model`` for ``phase.steps`` steps; return what was measured."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = phase.steps
    factor = functools.partial(_lr_factor, warmup=phase.warmup, total=steps, schedule=phase.schedule)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    batches = _batches(blocks, config.batch_size, config.seed)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    with tqdm(total=steps * config.tokens_per_step, unit="tok", unit_scale=True, desc=desc,
              disable=not progress, leave=False) as bar:
        for _ in range(steps):
            batch = next(batches).to(device)
            losses.append(_train_step(model, batch, optimizer, scheduler, config.grad_clip, bf16))
            bar.update(batch.numel())
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    model.eval()
    tail = losses[-min(10, len(losses)):]
    return {
        "phase": phase.to_dict(), "steps": steps, "tokens": steps * config.tokens_per_step, "seconds": round(seconds, 3),
        "tokens_per_second": round(steps * config.tokens_per_step / seconds, 1),
        "initial_loss": losses[0], "final_loss": sum(tail) / len(tail), "losses": losses,
    }


def _held_out(model: Any, tokenizer: Any, job: TopicJob, config: TrainConfig) -> dict[str, Any]:
    """Perplexity of the expert and of the plain base on the job's held-out texts (empty if none)."""
    if not job.eval_texts:
        return {}
    if build_blocks(tokenizer, job.eval_texts, config.seq_len).shape[0] == 0:
        logger.warning("expert %s: its held-out texts are shorter than one %d-token block; perplexity not measured",
                       job.expert_id, config.seq_len)
        return {}
    kw = {"seq_len": config.seq_len, "batch_size": config.eval_batch_size, "bf16": config.bf16,
          "max_tokens": config.eval_max_tokens}
    start = time.perf_counter()
    ppl, n_tokens = perplexity(model, tokenizer, job.eval_texts, **kw)
    with model.disable_adapter():
        base_ppl, _ = perplexity(model, tokenizer, job.eval_texts, **kw)
    return {"perplexity": ppl, "base_perplexity": base_ppl, "eval_tokens": n_tokens,
            "eval_seconds": round(time.perf_counter() - start, 3)}


def _versions() -> dict[str, str]:
    import peft
    import transformers

    return {"moin_hub": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def _write_expert(folder: Path, model: Any, job: TopicJob, config: TrainConfig, measured: dict[str, Any]) -> None:
    """Write the expert's files into ``folder``; ``moin_expert.json`` last (it marks the folder finished)."""
    for lora in model.peft_config.values():  # PEFT keeps them as a set, saved in hash order: same bytes every run
        if isinstance(lora.target_modules, set):
            lora.target_modules = sorted(lora.target_modules)
    # save_embedding_layers=False: the vocabulary is never resized, and "auto" would look the base up on the Hub
    model.save_pretrained(str(folder), safe_serialization=True, save_embedding_layers=False)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's stub card; push writes the real one
    write_centroid(folder / "centroid.safetensors", job.centroid)
    write_json(folder / TRAINING_FILENAME, {"expert_id": job.expert_id, "config": config.to_dict(), **measured,
                                              "created_at": utc_now(), "versions": _versions()})
    held_out = {k: measured[k] for k in ("perplexity", "base_perplexity", "eval_tokens") if k in measured}
    metadata = ExpertMetadata(expert_id=job.expert_id, keywords=job.keywords, n_docs=len(job.texts),
                              n_tokens=measured["tokens"], samples=job.samples, title=job.title,
                              sim_mean=job.sim_mean, sim_std=job.sim_std, **held_out)
    write_json(folder / EXPERT_METADATA_FILENAME, metadata.to_dict())


def _train_into(folder: Path, source: BaseSource, job: TopicJob, config: TrainConfig, phase: Phase, *,
                base_model_id: str, base_revision: str, init_from: Path | None, progress: bool) -> None:
    """Load the base, train the job's LoRA (from ``init_from``'s weights if given), measure it, and write the
    expert into ``folder``."""
    model, tokenizer = _load_base(source, base_revision)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = resolve_bf16(config.bf16, device)
    blocks = build_blocks(tokenizer, job.texts, config.seq_len)
    if blocks.shape[0] == 0:
        raise ValueError(f"job {job.expert_id!r}: its texts hold fewer tokens than one block "
                         f"(seq_len={config.seq_len}); give more text or a shorter seq_len.")
    torch.manual_seed(config.seed)
    model = _add_lora(model, config, base_model_id, base_revision)
    branched = {"seed": {"path": str(init_from), "sha256": _start_from(model, init_from)}} if init_from else {}
    model = model.to(device)
    measured = _fit(model, blocks, config, phase, bf16=bf16, desc=job.expert_id, progress=progress)
    measured.update(branched)
    measured.update(_held_out(model, tokenizer, job, config))
    measured.update(base_model=base_model_id, base_revision=base_revision, device=str(device), bf16=bf16,
                    torch_threads=torch.get_num_threads(), topic_blocks=blocks.shape[0],
                    topic_tokens=blocks.numel(), epochs=round(measured["tokens"] / blocks.numel(), 3))
    _write_expert(folder, model, job, config, measured)


def train_expert(base_model_dir_or_loader: BaseSource, job: TopicJob, out_dir: str | Path,
                 config: TrainConfig | None = None, *, base_model_id: str, base_revision: str,
                 phase: Phase | None = None, init_from: str | Path | None = None, progress: bool = True) -> Path:
    """Train one expert and write its folder ``<out_dir>/<job.expert_id>``; skip it if already finished.

    The base model is loaded (safetensors only, no remote code) and frozen; a fresh LoRA is trained with
    AdamW on ``config.seq_len`` blocks of the topic's texts until the token budget is spent. Files are
    written to ``<out_dir>/.<id>.tmp-<pid>`` and moved into place with one ``os.replace``, so a crash
    never leaves a half expert, and a finished expert (its folder holds ``moin_expert.json``) is never
    retrained: the call returns at once.

    Args:
        base_model_dir_or_loader: a local model folder, a Hub model id (loaded at ``base_revision``), or a
            callable returning ``(model, tokenizer)`` (it must be picklable to run in worker processes).
        job: the topic to train on.
        out_dir: parent folder of the expert folders.
        config: training settings (default :class:`TrainConfig`).
        base_model_id: the base model's Hub id, written as ``base_model_name_or_path`` of the adapter.
        base_revision: the base's pinned 40-hex commit, written as the adapter's ``revision``.
        phase: the steps and learning-rate schedule (default: ``config.steps`` steps, warmup, then
            ``config.schedule``); see :meth:`Budget.expert_phase`.
        init_from: a finished seed folder whose LoRA weights the expert starts from (branch-train); its
            sha256 is recorded in ``training.json``. Default: a fresh LoRA.
        progress: show a tqdm bar (tokens/s, loss).

    Returns:
        The expert folder.

    Raises:
        ValueError: a bad id/sha, or texts shorter than one block.
        InvalidExpertError: ``<out_dir>/<id>`` exists but is not a finished expert (it is left alone).
        Any error of loading or training; the temporary folder is removed first.

    Example:
        >>> train_expert("models/smollm2", job, "experts", base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...              base_revision="12fd25f77366fa6b3b4b768ec3050bf629380bac")  # doctest: +SKIP
    """
    validate_repo_id(base_model_id, field="base_model_id", namespaced=False)
    validate_commit_sha(base_revision, field="base_revision")
    config = config or TrainConfig()
    phase = phase or scratch_phase(config)
    out_dir = Path(out_dir)
    final = out_dir / job.expert_id
    if is_finished(final):
        logger.info("expert %s is already trained in %s; skipping", job.expert_id, final)
        return final
    if final.exists():
        raise InvalidExpertError(str(final), "exists but is not a finished expert (no moin_expert.json); "
                                             "remove it to train this expert")
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out_dir, job.expert_id)
    tmp = out_dir / f".{job.expert_id}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with _torch_threads(config.torch_threads):
            _train_into(tmp, base_model_dir_or_loader, job, config, phase, base_model_id=base_model_id,
                        base_revision=base_revision, init_from=Path(init_from) if init_from else None,
                        progress=progress)
        _move_into_place(tmp, final)
    finally:  # after a crash (or losing a race), the temporary folder goes; after success it is gone already
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """``os.replace(tmp, final)``, accepting that another run finished the same expert meanwhile."""
    try:
        os.replace(tmp, final)
    except OSError:
        if not is_finished(final):
            raise
        logger.info("another run finished %s meanwhile; keeping its folder", final)


# ------------------------------------------------------------------------------------------ many experts


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _failure(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _run_in_process(jobs: Sequence[TopicJob], kwargs: dict[str, Any]) -> dict[str, str]:
    failures = {}
    for job in jobs:
        try:
            train_expert(job=job, **kwargs)
        except Exception as err:  # noqa: BLE001 - one failure must not stop the others
            logger.error("expert %s failed: %s", job.expert_id, _failure(err))
            failures[job.expert_id] = _failure(err)
    return failures


def _run_processes(jobs: Sequence[TopicJob], kwargs: dict[str, Any], workers: int) -> dict[str, str]:
    failures = {}
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(train_expert, job=job, **kwargs): job.expert_id for job in jobs}
        for future in concurrent.futures.as_completed(futures):
            err = future.exception()
            if err is not None:
                logger.error("expert %s failed: %s", futures[future], _failure(err))
                failures[futures[future]] = _failure(err)
    return failures


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError("executor='ray' needs Ray, an optional extra: pip install 'moin-hub[ray]'") from None
    return ray


def _run_ray(jobs: Sequence[TopicJob], kwargs: dict[str, Any], threads: int) -> dict[str, str]:
    """One Ray task per expert, ``num_cpus=threads`` each; joins the running cluster (``$RAY_ADDRESS``, or one
    already initialised in this process) or starts a local one (no dashboard)."""
    ray = _import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    try:
        remote = ray.remote(num_cpus=threads)(train_expert)
        refs = {job.expert_id: remote.remote(job=job, **kwargs) for job in jobs}
        failures = {}
        for expert_id, ref in refs.items():
            try:
                ray.get(ref)
            except Exception as err:  # noqa: BLE001 - collected, raised together below
                failures[expert_id] = _failure(getattr(err, "cause", None) or err)
        return failures
    finally:
        if started:
            ray.shutdown()


def train_experts(jobs: Sequence[TopicJob], out_dir: str | Path, config: TrainConfig | None = None, *,
                  base_model_dir_or_loader: BaseSource, base_model_id: str, base_revision: str,
                  workers: int = 1, executor: str = "local", phase: Phase | None = None,
                  init_from: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Train many experts independently (no communication between them), in parallel processes.

    Finished experts on disk are skipped, so rerunning after a crash trains only what is missing. One
    failure does not stop the others: all jobs run, and the failures are raised together at the end.

    Args:
        jobs: one :class:`TopicJob` per expert (ids must be unique).
        out_dir: parent folder of the expert folders.
        config: training settings, the same for every expert. ``torch_threads=None`` gives each
            expert ``max(1, cores // workers)`` threads.
        base_model_dir_or_loader / base_model_id / base_revision / progress: as in :func:`train_expert`.
        workers: experts trained at once. ``executor="local"``: ``1`` trains in this process, one after
            the other; more starts that many spawned worker processes. With Ray, it only sets the
            threads (and ``num_cpus``) of each task; the cluster decides how many run at once.
        executor: ``"local"`` (``ProcessPoolExecutor`` with the ``spawn`` start method) or ``"ray"`` (one
            ``ray.remote`` task per expert; joins a running cluster, else starts a local one).
        phase / init_from: as in :func:`train_expert`, the same for every expert (branch-train: the seed
            folder and :meth:`Budget.expert_phase`; on a multi-node Ray cluster the seed folder, like
            ``out_dir``, must be on storage every node sees).

    Returns:
        The expert folders, in the order of ``jobs``.

    Raises:
        ExpertTrainingError: some experts failed (its ``failures`` maps ids to errors; the others are on disk).
        ImportError: ``executor="ray"`` without Ray installed.
        ValueError: bad ``workers`` / ``executor``, duplicate expert ids, bad base id or sha.

    Example:
        >>> train_experts(jobs, "experts", TrainConfig(), workers=2, base_model_dir_or_loader="models/smollm2",
        ...               base_model_id="HuggingFaceTB/SmolLM2-135M-Instruct", base_revision=sha)  # doctest: +SKIP
    """
    validate_positive_int(workers, field="workers")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}.")
    if executor == "ray":
        _import_ray()
    ids = [job.expert_id for job in jobs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"jobs: expert ids must be unique; repeated: {duplicates}.")
    validate_repo_id(base_model_id, field="base_model_id", namespaced=False)
    validate_commit_sha(base_revision, field="base_revision")
    config = config or TrainConfig()
    threads = config.torch_threads or max(1, available_cores() // workers)
    out_dir = Path(out_dir)
    kwargs = {"base_model_dir_or_loader": base_model_dir_or_loader, "out_dir": out_dir,
              "config": dataclasses.replace(config, torch_threads=threads), "base_model_id": base_model_id,
              "base_revision": base_revision, "phase": phase, "init_from": init_from, "progress": progress}
    pending = [job for job in jobs if not is_finished(out_dir / job.expert_id)]
    if not pending:
        failures = {}
    elif executor == "ray":
        failures = _run_ray(pending, kwargs, threads)
    elif workers == 1 or len(pending) == 1:
        failures = _run_in_process(pending, kwargs)
    else:
        failures = _run_processes(pending, kwargs, min(workers, len(pending)))
    if failures:
        finished = [out_dir / i for i in ids if i not in failures and is_finished(out_dir / i)]
        raise ExpertTrainingError(failures, finished=finished)
    return [out_dir / i for i in ids]


def _all_topics_job(jobs: Sequence[TopicJob], expert_id: str, title: str) -> TopicJob:
    """One job over every topic's texts: centroid = the normalised mean of the topics' centroids, held-out
    texts = all topics' ``eval_texts``. The texts are put in an order that does not depend on how the corpus
    was clustered (sorted by a hash), so any clustering of the same corpus gives the same job."""
    if not jobs:
        raise ValueError(f"jobs is empty: {expert_id!r} needs the topics' texts.")
    dims = {job.centroid.shape[0] for job in jobs}
    if len(dims) > 1:
        raise ValueError(f"jobs have centroids of different dimensions {sorted(dims)}.")
    centroid = np.mean([job.centroid / np.linalg.norm(job.centroid) for job in jobs], axis=0)
    texts = sorted((t for job in jobs for t in job.texts), key=lambda t: hashlib.sha256(t.encode()).digest())
    eval_texts = [t for job in jobs for t in job.eval_texts or []]
    return TopicJob(expert_id, texts=texts, centroid=centroid / np.linalg.norm(centroid),
                    samples=[job.samples[0] for job in jobs if job.samples][:5], title=title,
                    eval_texts=eval_texts or None)


def train_dense(base_model_dir_or_loader: BaseSource, jobs: Sequence[TopicJob], out_dir: str | Path,
                config: TrainConfig | None = None, *, base_model_id: str, base_revision: str,
                expert_id: str = "dense", progress: bool = True) -> Path:
    """The dense baseline: ONE LoRA on all topics' texts, with the experts' TOTAL token budget.

    Same config as the experts (rank, modules, learning rate, schedule), but ``len(jobs)`` times the steps
    of one expert (:attr:`Budget.dense_steps`), so it sees as many tokens as all experts together (and, with
    ``seed_fraction``, as the seed and the experts together). Its folder has the expert layout (see
    :func:`_all_topics_job`).

    Args:
        base_model_dir_or_loader / out_dir / base_model_id / base_revision / progress: as in
            :func:`train_expert`.
        jobs: the experts' jobs.
        config: the experts' config.
        expert_id: folder name of the baseline.

    Returns:
        The baseline's folder ``<out_dir>/<expert_id>``.

    Raises:
        ValueError: no jobs, or centroids of different dimensions.
    """
    config = config or TrainConfig()
    job = _all_topics_job(jobs, expert_id, f"Dense baseline: one LoRA on all {len(jobs)} topics")
    return train_expert(base_model_dir_or_loader, job, out_dir, config, base_model_id=base_model_id,
                        base_revision=base_revision, phase=plan_budget(config, len(jobs)).dense_phase(config),
                        progress=progress)


def train_seed(base_model_dir_or_loader: BaseSource, jobs: Sequence[TopicJob], out_dir: str | Path,
               config: TrainConfig, *, base_model_id: str, base_revision: str, expert_id: str = "seed",
               progress: bool = True) -> Path:
    """Branch-train's shared seed: ONE LoRA on all topics' texts with ``config.seed_fraction`` of the total
    budget (:attr:`Budget.seed_steps`), which every expert then starts from (:func:`train_experts` with
    ``init_from``). Warmup, then a constant learning rate: the experts' branches do the decay.

    Its folder has the expert layout, so it can be pushed and served like any expert (e.g. as a registry's
    fallback for queries that match no topic). Finished seeds are never retrained.

    Args:
        as in :func:`train_dense`.

    Returns:
        The seed's folder ``<out_dir>/<expert_id>``.

    Raises:
        ValueError: ``config.seed_fraction`` is 0, no jobs, or centroids of different dimensions.
    """
    phase = plan_budget(config, len(jobs)).seed_phase(config)
    if phase is None:
        raise ValueError("config.seed_fraction is 0: there is no seed to train.")
    job = _all_topics_job(jobs, expert_id, f"Shared seed of {len(jobs)} topic experts")
    return train_expert(base_model_dir_or_loader, job, out_dir, config, base_model_id=base_model_id,
                        base_revision=base_revision, phase=phase, progress=progress)

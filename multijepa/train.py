"""The trainer: AdamW, schedules, AMP, gradient accumulation, checkpoints, resume, torchrun/DDP.

``pretrain(recipe)`` is what ``multijepa pretrain recipe.yaml`` runs. Under ``torchrun`` each
process trains on its own share of every batch; rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from multijepa.checkpoint import keep_copy, load_checkpoint, save_checkpoint
from multijepa.core.jepa import JEPA, Backbone, Predictor, cosine_schedule
from multijepa.core.losses import feature_health
from multijepa.datasets.files import resolve_recipe
from multijepa.datasets.mixed import Mixed, build_train_loader
from multijepa.errors import DataError, RecipeError, TrainingError
from multijepa.modalities import MODALITIES
from multijepa.recipe import Recipe, recipe_from_dict, recipe_to_dict, save_recipe, saved_modalities
from multijepa.runlog import RunLog

# Recipe sections that fix the model's shape: a checkpoint only resumes under the same ones. The
# sections of the modalities it reads (image, audio) are checked too; other modalities' are not.
ARCHITECTURE_SECTIONS = ("modality", "model")


def build_model(recipe: Recipe) -> JEPA:
    """The JEPA for a recipe: a tokenizer per source's modality under the shared encoder and
    predictor, each source's loss weight and target normalisation.

    >>> from multijepa.recipe import Recipe
    >>> type(build_model(Recipe())).__name__
    'JEPA'
    """
    m = recipe.model
    sections = {s.modality: recipe.section(s.modality) for s in recipe.all_sources}
    specs = {name: MODALITIES[name] for name in sections}
    for spec in specs.values():
        spec.check_installed()  # a missing extra (torchaudio, open3d) is named before anything is built
    context = Backbone({name: specs[name].tokenizer(cfg, m.dim) for name, cfg in sections.items()}, m,
                       {name: specs[name].pos_embed(cfg, m.dim) for name, cfg in sections.items()})
    predictor = Predictor(m, {name: specs[name].pos_embed(cfg, m.predictor_dim) for name, cfg in sections.items()})
    return JEPA(context, predictor, recipe.loss, {s.modality: s.loss_weight for s in recipe.all_sources},
                {name: recipe.source(name).loss.target_norm for name in sections})


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``train.device`` (``auto``: this rank's GPU, else the CPU); the CPU gets :func:`keep_freed_memory`."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"train.device={name} but no CUDA device is visible; use train.device=cpu")
    device = torch.device(name)
    if device.type == "cpu":
        keep_freed_memory()
    return device


_MALLOC_TUNED: list = []


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse: by default it serves blocks over 128 KiB-32 MiB
    from a fresh ``mmap`` and unmaps them when freed, so each step page-faults its activations in again
    (with this the image recipe's step ran 1.27x faster; docs/results.md, "the allocator"). mmap threshold
    1 GiB, trim threshold 2 GiB: the process keeps its peak heap, as PyTorch's CUDA allocator does. Once
    per process; True where it applied (not glibc, or ``MULTIJEPA_MALLOC=system``: nothing changes)."""
    if not _MALLOC_TUNED:
        _MALLOC_TUNED.append(False)
        if os.environ.get("MULTIJEPA_MALLOC", "") != "system" and sys.platform.startswith("linux"):
            import ctypes
            mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # musl's is a stub that returns 0
            m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h; the values are C ints
            _MALLOC_TUNED[0] = bool(mallopt and mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 2**31 - 1))
    return _MALLOC_TUNED[0]


def native_bf16(device: torch.device) -> Optional[str]:
    """What gives ``device`` native bf16 matrix products (a CUDA GPU that supports bf16, or a CPU with
    AMX-BF16 or AVX512-BF16 instructions), or None where bf16 would be emulated and slow."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device) if torch.cuda.is_bf16_supported() else None
    if device.type != "cpu":
        return None
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # torch >= 2.6
    found = [name for name in ("amx_bf16", "avx512_bf16") if capabilities.get(name)]
    return f"the CPU has {found[0]}" if found else None


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``("bf16" | "fp32", why)`` for ``train.precision`` (or ``--precision``) on ``device``: ``auto``
    is bf16 where :func:`native_bf16` finds the hardware for it, fp32 elsewhere."""
    if precision not in ("auto", "fp32", "bf16"):
        raise RecipeError(f"precision {precision!r}: use auto, fp32 or bf16")
    why = native_bf16(device)
    if precision == "bf16" and not why:
        return "bf16", f"as set, though {device.type} has no native bf16 matrix products: expect it slower than fp32"
    if precision != "auto":
        return precision, "as set"
    return ("bf16", f"auto: {why}") if why else ("fp32", f"auto: no native bf16 matrix products on {device.type}")


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision: bf16 matrix products (weights, optimizer state
    and the loss stay float32), or nothing for fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def compile_transformers(model: JEPA) -> None:
    """``train.compile``: torch.compile the encoders' and the predictor's transformers, in place (so
    parameter names, and checkpoints, stay those of the eager model), for any sequence length."""
    for transformer in (model.context.encoder, model.target.encoder, model.predictor.transformer):
        transformer.compile(dynamic=True)


def param_groups(model: JEPA, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only; biases, norms and the mask token are not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class _StopRequest:
    """Turns SIGTERM/SIGINT into a flag so the loop can checkpoint before exiting."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_resumable(saved: dict, recipe: Recipe, path: Path) -> None:
    now = recipe_to_dict(recipe)
    try:  # through the schema, so a checkpoint written before a key was added compares with its default
        saved = recipe_to_dict(recipe_from_dict(saved, f"{path} (its saved recipe)"))
    except RecipeError as e:
        raise TrainingError(f"{e}; this checkpoint cannot be resumed here: use another run.dir, or "
                            f"run.resume=false to start over") from None
    trained = saved_modalities(saved)
    if trained != list(recipe.modalities):
        raise TrainingError(f"{path}: this checkpoint was trained on the sources {trained}, not "
                            f"{list(recipe.modalities)}; use another run.dir, or run.resume=false to start over")
    for section in ARCHITECTURE_SECTIONS + recipe.modalities:
        if saved.get(section) != now[section]:
            raise TrainingError(f"{path}: this checkpoint was trained with a different '{section}' section ("
                                f"{saved.get(section)} vs {now[section]}); use another run.dir, or run.resume=false to start over")


@contextlib.contextmanager
def run_lock(run_dir: Path, enabled: bool = True):
    """Hold ``run_dir/.lock`` for the block, so two processes never write one run folder at once.

    The lock is a POSIX record lock (``lockf``), which the kernel drops when its process ends, however
    it ends, and which forked DataLoader workers do not inherit (an ``flock`` would stay held by a
    killed run's orphaned workers): a killed run leaves nothing stuck. The file names its holder
    (pid, host, command) for the refusal.
    """
    if not enabled or fcntl is None:  # fcntl is POSIX-only: on Windows runs are not locked
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # EACCES or EAGAIN: held by another process
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            raise TrainingError(f"{run_dir} is in use by {holder}; wait for that run to finish or stop it, "
                                f"or give this one another run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} "
                      f"({' '.join(sys.argv)[:200]})\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _all_finite(tensors) -> torch.Tensor:
    """One bool on the tensors' device: every floating-point value of ``tensors`` is finite."""
    return torch.stack([torch.isfinite(t).all() for t in tensors if t.is_floating_point()]).all()


def pretrain(recipe: Recipe, data: Optional[Mixed] = None) -> Path:
    """Train a JEPA as the recipe says; resumes from ``run.dir/last.pt`` when present.

    Args:
        recipe: what to train and how; its data section (or its sources) says where samples are.
        data: sources to train on instead (``multijepa.datasets.Mixed``): their paths, tensors and
            weights replace the recipe's; loss weights and masks stay the recipe's.

    Returns:
        The run folder, holding ``last.pt``, ``recipe.yaml`` and ``metrics.jsonl``.

    >>> from multijepa import load_recipe, pretrain
    >>> run = pretrain(load_recipe("recipes/image.yaml", ["data.path=photos/"]))  # doctest: +SKIP
    """
    if not isinstance(recipe, Recipe):  # a world-model recipe: its trainer sits above this module
        raise TrainingError(f"pretrain takes a JEPA recipe, got a {type(recipe).__name__}; train a world-model "
                            f"recipe with multijepa.worldmodel.train_world_model (the CLI's pretrain does both)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(recipe.train.device, local_rank)
    distributed = world > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        with run_lock(Path(recipe.run.dir), rank == 0):
            return _train(recipe, device, rank, world, data)
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(recipe: Recipe, device: torch.device, rank: int, world: int, data: Optional[Mixed]) -> Path:
    tensors = None
    if data is not None:
        recipe, tensors = data.apply_to(recipe), data.tensors()
    recipe = resolve_recipe(recipe)  # settings taken from the data (timeseries.length: 0) are fixed here
    t, o = recipe.train, recipe.optim
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    run_dir = Path(recipe.run.dir)
    ckpt_path = run_dir / "last.pt"
    main = rank == 0
    torch.manual_seed(t.seed)
    model = build_model(recipe).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas,
                                  fused=device.type in ("cpu", "cuda"))  # one kernel for every parameter
    step = saved_step = 0
    if recipe.run.resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        _check_resumable(state["recipe"], recipe, ckpt_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = saved_step = int(state["step"])
        torch.set_rng_state(state["rng"]["torch"])
        model.sigreg_draws = int(state["rng"].get("sigreg_draws", 0))
        if device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    if step >= t.steps:
        if main:
            print(f"{ckpt_path} is already at step {step} >= train.steps={t.steps}; raise train.steps to "
                  f"train on", file=sys.stderr)
        return run_dir
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, run_dir / "recipe.yaml")
    # A mixed batch may lack a modality (data.mix: weights), leaving its tokenizer without gradients.
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=len(recipe.modalities) > 1) if world > 1 else model
    if t.compile:
        compile_transformers(model)
    precision, why = resolve_precision(t.precision, device)
    mixed_precision = autocast(precision, device)
    loader = build_train_loader(recipe, step * o.accum_steps, rank, world, tensors)
    log = RunLog(run_dir, recipe, step, _startup_line(recipe, model, device, precision, why, step,
                                                      loader.dataset.describe())) if main else None
    tally = {"bad": 0, "seen": 0}
    batches = _decodable(iter(loader), recipe, tally)
    interval_loss = torch.zeros((), device=device)
    finite_since_saved = torch.ones((), dtype=torch.bool, device=device)  # every loss since the last checkpoint
    interval_parts = torch.zeros(3, device=device)  # prediction, regularizer, padding waste
    per_modality: dict[str, list] = {}  # modality -> [summed prediction loss, micro-batches]
    interval_steps, interval_samples, t_last = 0, 0, time.perf_counter()
    interval_wait = 0.0  # seconds spent waiting for the loader
    pooled = None
    progress = _progress(main and t.progress, t.steps, step)

    with _StopRequest() as stop, log or contextlib.nullcontext():  # closes the loggers however the run ends
        while step < t.steps:
            lr = cosine_schedule(step, t.steps, o.lr, o.min_lr, o.warmup_steps)
            wd = cosine_schedule(step, t.steps, o.weight_decay, o.weight_decay_end)
            momentum = cosine_schedule(step, t.steps, recipe.ema.momentum_start, recipe.ema.momentum_end)
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group["weight_decay"] > 0:
                    group["weight_decay"] = wd
            for micro in range(o.accum_steps):
                waited = time.perf_counter()
                batch = next(batches)
                interval_wait += time.perf_counter() - waited
                parts = {m: {k: part[k].to(device, non_blocking=True) if part[k] is not None else None
                             for k in ("input", "context_idx", "target_idx", "valid")}
                         for m, part in batch.items()}
                sync = contextlib.nullcontext() if world == 1 or micro == o.accum_steps - 1 else net.no_sync()
                with sync:
                    with mixed_precision:
                        out = net(parts)
                    (out["loss"] / o.accum_steps).backward()
                interval_loss += out["loss"].detach() / o.accum_steps
                finite_since_saved &= torch.isfinite(out["loss"].detach())
                interval_parts += torch.stack([out["prediction"], out["regularizer"],
                                               out["padding_waste"].to(device)]) / o.accum_steps
                for m in parts:
                    acc = per_modality.setdefault(m, [torch.zeros((), device=device), 0])
                    acc[0] += out[f"prediction/{m}"]
                    acc[1] += 1
                interval_samples += sum(p["input"].shape[0] for p in parts.values()) * world
                pooled = out["target_pooled"]
            if o.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.update_target(momentum)
            step += 1
            interval_steps += 1
            progress.update(1)
            if step % t.log_every == 0 or step == t.steps or stop.requested:
                loss = interval_loss.item() / interval_steps  # the one host sync per logging interval
                if not math.isfinite(loss):
                    raise _diverged(f"the loss became {loss} by step {step}", ckpt_path, saved_step, o.lr)
                now = time.perf_counter()
                record = {"step": step, "loss": loss,
                          "loss_prediction": interval_parts[0].item() / interval_steps,
                          "loss_regularizer": interval_parts[1].item() / interval_steps,
                          "padding_waste": interval_parts[2].item() / interval_steps,
                          "lr": lr, "weight_decay": wd, "ema_momentum": momentum,
                          "samples_per_s": interval_samples / (now - t_last),
                          "data_wait": interval_wait / (now - t_last),  # share of the time spent waiting for data
                          "bad_files": tally["bad"] + (log.bad_files_before if log else 0)}
                if len(recipe.modalities) > 1:
                    record.update({f"loss_prediction_{m}": total.item() / n for m, (total, n) in per_modality.items()})
                record.update({k: v.item() for k, v in feature_health(pooled).items()})
                if main:
                    _log(record, log, progress, recipe)
                interval_loss.zero_()
                interval_parts.zero_()
                per_modality.clear()
                interval_steps, interval_samples, t_last, interval_wait = 0, 0, now, 0.0
            keep = t.keep_every > 0 and step % t.keep_every == 0
            if main and (step % t.checkpoint_every == 0 or keep or step == t.steps or stop.requested):
                # Only finite weights after finite losses are saved: one host sync per checkpoint.
                if not (finite_since_saved & _all_finite(model.state_dict().values())).item():
                    raise _diverged(f"the loss or the weights became NaN or infinite between steps {saved_step} and "
                                    f"{step}", ckpt_path, saved_step, o.lr)
                rng = {"torch": torch.get_rng_state(), "sigreg_draws": model.sigreg_draws}  # SIGReg's directions
                rng |= {"cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {}
                save_checkpoint({"step": step, "recipe": recipe_to_dict(recipe), "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "rng": rng}, ckpt_path)
                saved_step = step
                if keep:
                    keep_copy(ckpt_path, run_dir / f"step_{step:07d}.pt")
            if stop.requested:
                progress.close()
                if main:
                    print(f"\nstopped at step {step}; checkpoint saved to {ckpt_path}. "
                          f"Run the same command to resume.", file=sys.stderr)
                raise KeyboardInterrupt
    progress.close()
    return run_dir


def _startup_line(recipe: Recipe, model: JEPA, device: torch.device, precision: str, why: str, step: int,
                  data: str) -> str:
    """The run's first log line: what runs where, in which precision, on how many parameters."""
    def millions(module: torch.nn.Module) -> str:
        return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f} M"

    where = f"{device}" + (f", {torch.get_num_threads()} threads" if device.type == "cpu" else "")
    start = f"resuming from step {step}" if step else "from step 0"
    return (f"pretrain {'+'.join(recipe.modalities)} on {where}, {precision} ({why})"
            f"{', compiled' if recipe.train.compile else ''}; encoder {millions(model.context)}"
            f" and predictor {millions(model.predictor)} parameters; {recipe.train.steps} steps of "
            f"{recipe.data.batch_size} from {data}, {start}, into {recipe.run.dir}")


def _diverged(what: str, ckpt_path: Path, saved_step: int, lr: float) -> TrainingError:
    kept = (f"The last good checkpoint, {ckpt_path}, holds step {saved_step} and was kept (a new run resumes "
            f"from it)" if ckpt_path.exists() else "No checkpoint was written")
    return TrainingError(f"{what}: training diverged. {kept}; lower optim.lr (now {lr}), lengthen "
                         f"optim.warmup_steps or set optim.grad_clip, and run again")


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="pretrain",
                mininterval=1.0)


def _decodable(batches, recipe: Recipe, tally: dict):
    """Yield the sub-batches ({modality: sub-batch}) of the batches that hold inputs, counting files
    that failed to decode in ``tally``.

    Stops the run with a report when the failed share passes ``data.max_bad_fraction``.
    """
    for batch in batches:
        tally["bad"] += len(batch["bad"])
        tally["seen"] += batch["count"]
        for message in batch["bad"]:
            warnings.warn(f"skipped data that could not be read: {message}", stacklevel=2)
        bad, seen = tally["bad"], tally["seen"]
        if bad and seen >= recipe.data.bad_check_after and bad / seen > recipe.data.max_bad_fraction:
            raise DataError(
                f"{recipe.data.path or 'the sources'}: {bad} of {seen} files read so far failed to decode "
                f"({bad / seen:.1%} > data.max_bad_fraction={recipe.data.max_bad_fraction}); "
                f"the warnings above name them: fix or remove them, or raise data.max_bad_fraction")
        if batch["parts"]:
            yield batch["parts"]


def _log(record: dict, log: RunLog, progress, recipe: Recipe) -> None:
    log.write(record)
    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                         erank=f"{record['target_erank']:.1f}", refresh=False)
    if record["target_std"] < recipe.train.collapse_std or record["target_erank"] < recipe.train.collapse_erank:
        warnings.warn(
            f"step {record['step']}: target representations look collapsed (std {record['target_std']:.4f}, "
            f"effective rank {record['target_erank']:.2f}); try loss.regularizer=sigreg, a lower optim.lr "
            f"or a higher ema.momentum_start", stacklevel=2)

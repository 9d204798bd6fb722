"""The training loop behind ``gradproj train`` and ``gradproj compare``.

One function, :func:`train`, runs a configuration and returns its results. With an output directory it
writes ``config.json``, ``metrics.jsonl`` (one JSON object per logged step), ``loss.png``, ``summary.json``
and checkpoints ``checkpoints/step_NNNNNNN.pt`` holding model, optimizer, scheduler and RNG states (tensors
and plain values only: they load with ``torch.load(weights_only=True)``). :func:`train` with ``resume``
continues from the newest checkpoint of a directory and reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..memory import optimizer_state_bytes
from .data import BatchStream, ByteTokenizer, eval_windows, load_data
from .models import build_model, get_shape
from .optimizers import OptimizerChoice, build_optimizer, check_optimizer, installed
from .runtime import PARALLEL, DistributedRuntime, Runtime, launched_by_torchrun, make_runtime, resolve_device

log = logging.getLogger("gradproj")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULES = ("cosine", "linear", "constant")
DEFAULT_BPE_VOCAB = 4096
#: metrics that differ between otherwise identical runs (wall-clock), left out when runs are compared
TIMING_KEYS = ("tokens_per_s", "step_time_s", "elapsed_s")
#: what may differ when a run is resumed (everything else must match the saved configuration)
RESUMABLE = ("stop_at", "save_every", "keep_checkpoints", "device", "parallel")


@dataclass
class TrainConfig:
    """A complete description of a run (saved as ``config.json``)."""

    model: str = "tiny"
    optimizer: OptimizerChoice = field(default_factory=OptimizerChoice)
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    schedule: str = "cosine"
    warmup: float = 0.1  # a fraction of the steps when < 1, else a number of steps
    min_lr_ratio: float = 0.1
    clip: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    parallel: str = "auto"  # auto (DDP under torchrun, else one process), none, ddp, fsdp
    data: list[str] | None = None
    text_key: str = "text"
    tokenizer: str = "byte"
    vocab_size: int | None = None  # the tokenizer's: 256 for bytes; for BPE the size to train (None: 4096)
    val_fraction: float = 0.05
    max_bytes: int | None = None
    log_every: int = 1
    eval_every: int = 50
    eval_batches: int = 8
    save_every: int = 1000
    keep_checkpoints: int = 2
    stop_at: int | None = None

    # ---------------------------------------------------------------------------------------- checks
    def validate(self) -> None:
        get_shape(self.model)
        for name in (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "log_every",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} must be a positive integer")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule = {self.schedule!r}; use one of {', '.join(SCHEDULES)}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"parallel = {self.parallel!r}; use one of {', '.join(PARALLEL)}")
        if self.tokenizer not in ("byte", "bpe"):
            raise ValueError(f"tokenizer = {self.tokenizer!r}; use 'byte' or 'bpe'")
        if self.tokenizer == "byte" and self.vocab_size not in (None, ByteTokenizer.vocab_size):
            raise ValueError(
                f"vocab_size = {self.vocab_size}: the byte tokenizer's vocabulary is {ByteTokenizer.vocab_size}; "
                "--vocab-size sets the size of a BPE vocabulary (--tokenizer bpe)"
            )
        if self.vocab_size is not None and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            raise ValueError(f"vocab_size = {self.vocab_size!r} must be a positive integer")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.warmup < 0:
            raise ValueError(f"warmup = {self.warmup} must be >= 0 (a fraction of the steps, or a step count)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        if self.clip < 0:
            raise ValueError(f"clip = {self.clip} must be >= 0 (0 disables clipping)")
        if self.stop_at is not None and not 0 < self.stop_at <= self.steps:
            raise ValueError(f"stop_at = {self.stop_at} must be in [1, steps = {self.steps}]")
        if self.optimizer.layerwise and self.clip > 0:
            raise ValueError(
                "--layerwise steps each weight during backward, before the global gradient norm --clip needs "
                "exists; clip each weight's gradient instead with --optimizer-option max_grad_norm=VALUE"
            )

    def vocabulary(self) -> int:
        """The vocabulary the run's model has (for BPE: the size asked for; a small corpus may give fewer)."""
        if self.tokenizer == "byte":
            return ByteTokenizer.vocab_size
        return self.vocab_size if self.vocab_size is not None else DEFAULT_BPE_VOCAB

    def resolved(self) -> TrainConfig:
        """A copy with every default that depends on other settings written out: the vocabulary, and the
        optimizer's lr, rank and scale (what ``config.json`` stores)."""
        return replace(
            self, vocab_size=self.vocabulary(), optimizer=self.optimizer.resolved(get_shape(self.model).hidden)
        )

    def warmup_steps(self) -> int:
        return round(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warm-up reaching the peak at
        the last warm-up step, then cosine / linear decay reaching ``min_lr_ratio`` at the last step
        (GaLore's recipe: 10 % warm-up, cosine to 10 %)."""
        warm = self.warmup_steps()
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, self.steps - 1 - warm))
        decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1.0 - progress
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * decay

    # -------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        d = dict(d)
        opt = OptimizerChoice(**d.pop("optimizer", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        if d.get("tokenizer", "byte") == "byte":
            d["vocab_size"] = ByteTokenizer.vocab_size  # earlier versions stored the unused BPE default here
        return cls(optimizer=opt, **d)


# ------------------------------------------------------------------------------------------- results
@dataclass
class RunResult:
    config: dict[str, Any]
    steps_done: int
    final_train_loss: float  # mean of the last min(10, steps) logged training losses
    final_val_loss: float | None
    final_val_ppl: float | None
    mean_step_time_s: float  # over the steps after the first of each invocation, all invocations of the run
    tokens_per_s: float
    optimizer_state_bytes: int
    optimizer_state_parts: dict[str, int]
    peak_memory_bytes: int
    peak_memory_kind: str
    n_params: int
    history: list[dict[str, Any]] = field(repr=False, default_factory=list)
    #: optimizer steps this call trained (0: the run was already complete; its summary.json was left as it was)
    steps_trained: int = field(default=0, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("history")
        d.pop("steps_trained")
        return d


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM stopped a run at a step boundary; ``checkpoint`` holds that step (None: not saved)."""

    def __init__(self, step: int, checkpoint: Path | None, out_dir: Path | None):
        where = f"; checkpoint {checkpoint}" if checkpoint is not None else " (nothing saved: no output directory)"
        super().__init__(f"interrupted after step {step}{where}")
        self.step, self.checkpoint, self.out_dir = step, checkpoint, out_dir


class _StopOnSignal:
    """While active and ``armed`` (during the training steps), SIGINT and SIGTERM ask the loop to stop at the
    next step boundary; a second one, or one before the first step (reading data), stops at once with
    KeyboardInterrupt. Does nothing outside the main thread, where handlers cannot be set."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False
        self.armed = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested or not self.armed:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("gradproj: %s: stopping after the current step", signal.Signals(signum).name)

    def __enter__(self) -> _StopOnSignal:
        if self.enabled:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, truncated to a checkpoint's step on resume."""

    def __init__(self, path: Path | None, keep_until: int | None = None):
        self.path, self.records = path, []
        if path is not None and keep_until is not None and path.exists():
            with open(path) as fh:
                self.records = [r for r in map(json.loads, fh) if r["step"] <= keep_until]
        if path is not None:
            with open(path, "w") as fh:
                for r in self.records:
                    fh.write(json.dumps(r) + "\n")

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------------------- the loop
def train(
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    runtime: Runtime | None = None,
    progress: bool = True,
    report: Callable[[str], None] | None = None,
    label: str | None = None,
    checkpoints: bool = True,
    stop_on_signal: bool = False,
    where: str = "",
) -> RunResult:
    """Train a LLaMA model as ``config`` describes and return the results.

    Args:
        config: the run; ignored with ``resume`` (the saved configuration is used).
        out_dir: where files go (``None``: nothing is written). Defaults to ``resume`` when resuming.
        resume: a directory of an earlier run; continues from its newest checkpoint.
        overrides: with ``resume``, new values for the fields in :data:`RESUMABLE`.
        runtime: device and process layout (default: :func:`~gradproj.train.runtime.make_runtime` of
            ``config.device`` / ``config.parallel``: DDP or FSDP2 under torchrun, else one process).
        progress: show a tqdm bar. ``report``: called with one line per evaluation (default: logging).
        label: the run's name on the progress bar and plot. ``checkpoints``: write checkpoints to ``out_dir``.
        stop_on_signal: on SIGINT / SIGTERM, finish the current step, save a checkpoint of it (with
            ``out_dir`` and ``checkpoints``) and raise :class:`TrainingInterrupted` (for the command; a
            library caller keeps Python's default handling).
        where: prefixed to the message of a configuration error (the command passes the flag or spec).

    Every check (configuration, packages, the optimizer built on a stand-in of the model) runs before
    anything is read or written. Resuming a run that already reached its last step trains nothing and
    leaves its files as they were (the result then carries the saved summary, ``steps_trained == 0``).
    """
    say = report or log.info
    ckpt_path = None
    if resume is not None:
        resume = Path(resume)
        config = load_config(resume)
        config.stop_at = None  # a stop of the earlier invocation is not a property of the run
        for key, value in (overrides or {}).items():
            if key not in RESUMABLE:
                raise ValueError(f"cannot change {key!r} when resuming (only {', '.join(RESUMABLE)})")
            setattr(config, key, value)
        ckpt_path = latest_checkpoint(resume)
        if ckpt_path is None:
            raise ValueError(f"--resume {resume}: no checkpoint in {resume / 'checkpoints'}")
        out_dir = out_dir if out_dir is not None else resume
    config = preflight(config or TrainConfig(), where)
    if resume is not None and ckpt_path is not None and checkpoint_step(ckpt_path) >= (config.stop_at or config.steps):
        return _finished(resume, ckpt_path, config, say)
    own_runtime = runtime is None
    runtime = runtime or make_runtime(config.device, config.parallel)
    try:
        with _StopOnSignal(stop_on_signal) as stop:
            return _train(config, out_dir, resume, ckpt_path, runtime, progress, say, label, checkpoints, stop)
    finally:
        if own_runtime:
            runtime.close()


def missing_packages(config: TrainConfig) -> list[str]:
    """What ``config`` needs that is not installed, as ``package (what for)``; nothing is imported."""
    need = {"transformers": "the LLaMA model"}
    if config.tokenizer == "bpe":
        need["tokenizers"] = "--tokenizer bpe"
    if any(str(d).startswith("hf:") for d in config.data or ()):
        need["datasets"] = "--data hf:..."
    return [f"{pkg} ({why})" for pkg, why in need.items() if not installed(pkg)]


def preflight(config: TrainConfig, where: str = "") -> TrainConfig:
    """Every check of a run before any work: the configuration, the packages it needs, and the optimizer
    built on a meta-device stand-in of the model. Returns the configuration with its defaults resolved;
    errors of the optimizer are prefixed with ``where`` (the flag or the spec of a ``compare`` run)."""
    config.validate()
    if launched_by_torchrun() and config.parallel != "none":  # refused before the process group starts
        _refuse_distributed(config)
    missing = missing_packages(config)
    if missing:
        raise ImportError(
            f"the run needs {', '.join(missing)}, not installed here: pip install "
            + " ".join(m.split()[0] for m in missing)
        )
    device = resolve_device(config.device)
    prefix = f"{where}: " if where else ""
    try:
        check_optimizer(  # as given, so that a setting the optimizer ignores is reported (once: here)
            config.optimizer,
            get_shape(config.model),
            config.vocabulary(),
            seed=config.seed,
            accumulation_steps=config.grad_accum,
            dtype=DTYPES[config.dtype],
            device=device,
        )
        return config.resolved()
    except (ValueError, TypeError) as err:
        raise type(err)(f"{prefix}{err}") from None


def _refuse_distributed(config: TrainConfig) -> None:
    """What a run over several processes (DDP / FSDP2) cannot do."""
    if config.optimizer.layerwise:
        raise ValueError(
            "--layerwise steps each weight inside backward, before DDP / FSDP2 have reduced its gradient "
            "across processes; train without --layerwise under torchrun"
        )
    if config.optimizer.sampler is not None:
        raise ValueError(
            f"--sampler {config.optimizer.sampler} switches which blocks train while the model is wrapped for "
            "DDP / FSDP2, which fixes the trained parameters when it wraps; use --sampler in one process"
        )


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint, from its name (``step_NNNNNNN.pt`` or ``step_NNNNNNN/``)."""
    return int(Path(path).name[5:].split(".")[0])


def _finished(resume: Path, ckpt_path: Path, config: TrainConfig, say) -> RunResult:
    """The result of a run that is already at its last step: its saved summary, nothing rewritten."""
    step = checkpoint_step(ckpt_path)
    log.info(
        "gradproj: %s is at step %d of %d: nothing to train; its files are left as they are", resume, step, config.steps
    )
    summary_path = resume / "summary.json"
    if not summary_path.exists():
        raise ValueError(
            f"--resume {resume}: its newest checkpoint is of step {step}, the last one, but summary.json is "
            "missing; nothing is left to train"
        )
    saved = json.loads(summary_path.read_text())
    metrics = resume / "metrics.jsonl"
    history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    known = {f.name for f in fields(RunResult)} - {"history", "steps_trained"}
    return RunResult(**{k: v for k, v in saved.items() if k in known}, history=history, steps_trained=0)


def _train(
    config: TrainConfig,
    out_dir,
    resume,
    ckpt_path,
    runtime: Runtime,
    progress: bool,
    say,
    label,
    checkpoints,
    stop: _StopOnSignal,
) -> RunResult:
    if isinstance(runtime, DistributedRuntime):
        _refuse_distributed(config)
    if not runtime.is_main:  # one process reports for all

        def say(_line: str) -> None:
            pass

    device, dtype = runtime.device, DTYPES[config.dtype]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and checkpoints and (out != resume) and latest_checkpoint(out) is not None:
        raise ValueError(
            f"{out} already holds checkpoints of a run; continue it with --resume {out}, "
            "or choose another --out (or delete the directory)"
        )
    if out is not None and runtime.is_main:
        (out / "checkpoints" if checkpoints else out).mkdir(parents=True, exist_ok=True)
    if not installed("matplotlib") and out is not None:
        say("matplotlib is not installed: no loss plot will be written (pip install matplotlib)")

    data = load_data(
        config.data,
        seq_len=config.seq_len,
        tokenizer=config.tokenizer,
        vocab_size=config.vocabulary(),
        val_fraction=config.val_fraction,
        max_bytes=config.max_bytes,
        text_key=config.text_key,
        tokenizer_path=(out / "tokenizer.json") if out is not None and config.tokenizer == "bpe" else None,
    )
    say(f"data: {data.describe()}")
    config.vocab_size = data.vocab_size  # a BPE trained on a small corpus may have fewer entries than asked
    if out is not None and runtime.is_main:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    shape = get_shape(config.model)
    model = build_model(config.model, data.vocab_size, config.seq_len, seed=config.seed, dtype=dtype, device=device)
    n_params = sum(p.numel() for p in model.parameters())
    model = runtime.wrap_model(model)
    optimizer = build_optimizer(
        runtime.unwrap_model(model),
        config.optimizer,
        shape.hidden,
        seed=config.seed,
        accumulation_steps=config.grad_accum,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: config.lr_factor(s))

    start = 0
    # time and peak memory of the run so far (earlier invocations, from the checkpoint)
    timing = {"timed_steps": 0, "timed_s": 0.0, "peak_memory_bytes": 0}
    if ckpt_path is not None:
        start, saved_timing = _load_checkpoint(runtime, ckpt_path, runtime.unwrap_model(model), optimizer, scheduler)
        timing.update(saved_timing)
        say(f"resumed from {ckpt_path} at step {start}")
    metrics = MetricsLog(out / "metrics.jsonl" if out is not None and runtime.is_main else None, keep_until=start)
    end = config.stop_at or config.steps

    stream = BatchStream(data.train, config.batch_size, config.seq_len, config.seed, runtime.rank, runtime.world_size)
    # the same windows as one process with a world_size times larger batch, split between the ranks
    val_x = _shard(
        eval_windows(data.val, config.eval_batches * config.batch_size * runtime.world_size, config.seq_len), runtime
    )
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * runtime.world_size

    runtime.reset_peak_memory()
    bar = tqdm(
        total=config.steps,
        initial=start,
        desc=label or config.optimizer.name,
        disable=not (progress and runtime.is_main),
        dynamic_ncols=True,
    )
    step_times: list[float] = []
    last_val: dict[str, float] = {}
    saved_at = None

    def timing_now() -> dict[str, Any]:
        peak = max(timing["peak_memory_bytes"], runtime.peak_memory()[0])
        return {
            "timed_steps": timing["timed_steps"] + len(step_times),
            "timed_s": timing["timed_s"] + sum(step_times),
            "peak_memory_bytes": peak,
        }

    def save(step: int) -> Path:
        assert out is not None  # checkpoints are written only with an output directory
        return save_checkpoint(
            out, step, runtime.unwrap_model(model), optimizer, scheduler, config, runtime, timing=timing_now()
        )

    t_run = time.perf_counter()
    stop.armed = True
    try:
        for step in range(start + 1, end + 1):
            t0 = time.perf_counter()
            model.train()
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                x = stream.batch(step, micro).to(device)
                with runtime.accumulate(model, sync=micro == config.grad_accum - 1):
                    loss = model(input_ids=x, labels=x).loss / config.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            if config.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            if step > start + 1:
                step_times.append(dt)
            train_loss = runtime.reduce_mean(loss_sum)
            if not math.isfinite(train_loss):
                raise FloatingPointError(
                    f"training loss is {train_loss} at step {step}; lower the learning rate or enable --clip"
                )

            record: dict[str, Any] = {}
            if step % config.eval_every == 0 or step == config.steps:
                val_loss = evaluate(model, val_x, config.batch_size, runtime)
                last_val = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
                record.update(last_val)
                say(
                    f"step {step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"val ppl {last_val['val_ppl']:.2f}"
                )
            if step % config.log_every == 0 or record or step == end:
                record = {
                    "step": step,
                    "loss": train_loss,
                    "lr": lr,
                    "tokens": step * tokens_per_step,
                    "step_time_s": dt,
                    "tokens_per_s": tokens_per_step / dt,
                    **record,
                }
                metrics.append(record)
            bar.update(1)
            bar.set_postfix(
                loss=f"{train_loss:.3f}",
                tok_s=f"{tokens_per_step / dt:,.0f}",
                **({"val": f"{last_val['val_loss']:.3f}"} if last_val else {}),
            )
            saved_at = None
            if checkpoints and out is not None and (step % config.save_every == 0 or step == end):
                saved_at = save(step)
            # every process stops at the same step (a signal may reach the ranks of a job at different steps)
            requested = stop.requested if runtime.world_size == 1 else runtime.reduce_mean(float(stop.requested)) > 0
            if requested and step < end:
                if saved_at is None and checkpoints and out is not None:
                    saved_at = save(step)
                raise TrainingInterrupted(step, saved_at, out)
    finally:
        stop.armed = False
        bar.close()
    elapsed = time.perf_counter() - t_run

    totals = timing_now()
    peak, kind = totals["peak_memory_bytes"], runtime.peak_memory()[1]
    state = optimizer_state_bytes(optimizer)
    history = metrics.records
    val_records = [r for r in history if "val_loss" in r]
    last = [r["loss"] for r in history[-10:]]
    n_timed = totals["timed_steps"]
    mean_dt = totals["timed_s"] / n_timed if n_timed else elapsed
    result = RunResult(
        config=config.to_dict(),
        steps_done=end,
        final_train_loss=sum(last) / len(last) if last else float("nan"),
        final_val_loss=val_records[-1]["val_loss"] if val_records else None,
        final_val_ppl=val_records[-1]["val_ppl"] if val_records else None,
        mean_step_time_s=mean_dt,
        tokens_per_s=tokens_per_step / mean_dt if mean_dt > 0 else float("nan"),
        optimizer_state_bytes=state["total"],
        optimizer_state_parts={k: v for k, v in state.items() if k != "total"},
        peak_memory_bytes=peak,
        peak_memory_kind=kind,
        n_params=n_params,
        history=history,
        steps_trained=end - start,
    )
    if out is not None and runtime.is_main:
        (out / "summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
        if history:
            from .plots import try_plot_losses

            try_plot_losses(
                {label or config.optimizer.name: history},
                out / "loss.png",
                title=f"{config.model}, {config.optimizer.name}",
            )
    return result


def _shard(x: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    return x[runtime.rank :: runtime.world_size] if runtime.world_size > 1 else x


@torch.no_grad()
def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, runtime: Runtime) -> float:
    """Mean next-token loss over fixed validation windows (mean over batches, then over processes)."""
    model.eval()
    losses = []
    for i in range(0, len(windows), batch_size):
        x = windows[i : i + batch_size].to(runtime.device)
        losses.append(model(input_ids=x, labels=x).loss.float().item())
    model.train()
    return runtime.reduce_mean(sum(losses) / len(losses))


# ------------------------------------------------------------------------------------- checkpoints
def checkpoint_dir(out: Path) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Checkpoints of a run, oldest first: ``step_NNNNNNN.pt`` files and ``step_NNNNNNN/`` directories
    (``torch.distributed.checkpoint``, written under FSDP2)."""
    found = [
        p
        for p in checkpoint_dir(Path(out)).glob("step_*")
        if (p.is_file() and p.suffix == ".pt") or (p.is_dir() and (p / "extra.pt").is_file())
    ]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


def load_config(out: str | Path) -> TrainConfig:
    path = Path(out) / "config.json"
    if not path.exists():
        raise ValueError(f"{out} has no config.json; is it the --out directory of a gradproj train run?")
    return TrainConfig.from_dict(json.loads(path.read_text()))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    out: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    config: TrainConfig,
    runtime: Runtime,
    timing: dict[str, Any] | None = None,
) -> Path:
    """Write the checkpoint of ``step`` (layout: :mod:`gradproj.train.runtime`) and keep the newest
    ``config.keep_checkpoints``. ``timing``: the run's timed steps, their seconds and its peak memory so far,
    so a resumed run's summary covers every invocation."""
    path = checkpoint_dir(out) / runtime.checkpoint_name(step)
    extra = {"step": step, "scheduler": scheduler.state_dict(), "rng": _rng_state(), "config": config.to_dict()}
    if timing is not None:
        extra["timing"] = timing
    runtime.save_checkpoint(path, model, optimizer, extra)
    for old in list_checkpoints(out)[: -config.keep_checkpoints]:
        runtime.remove_checkpoint(old)
    return path


def _load_checkpoint(runtime: Runtime, path: Path, model, optimizer, scheduler) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint; returns its step and the run's timing so far (empty for older checkpoints)."""
    ckpt = runtime.load_checkpoint(path, model, optimizer)
    scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"]["torch"].cpu())
    if "cuda" in ckpt["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["rng"]["cuda"]])
    return int(ckpt["step"]), dict(ckpt.get("timing") or {})

"""The one training loop every stage runs on.

A stage hands the engine its modules, their optimizers, one or more `Update`s (a loss and the optimizer it
steps) and a source of micro-batches. The engine does the rest, the same way for every stage: Accelerate
(DDP or DeepSpeed), mixed precision, gradient accumulation and clipping, skipped non-finite steps, EMA, the
learning rate as a function of kimg, periodic hooks (evaluation, sample grids), metrics, a progress report,
checkpoints, resume and preemption. It writes where it is told (EnginePaths); the stage that runs it exports
its model and marks itself finished.

Progress is counted in images seen (nimg), so schedules mean the same for any world size. The learning rate
is computed from nimg and written into the optimizer; no scheduler is prepared (Accelerate would step a
prepared scheduler once per process).

No host synchronisation in the steady state of a step: losses, the non-finite-step counters and the stop
flag stay on the device and are read at log, checkpoint and stop-check boundaries. A non-finite step is
skipped on the device by fused optimizers (their `found_inf` input, the mechanism torch's GradScaler uses);
other optimizers fall back to one host read of the gradient norm per step.
"""
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from shards.errors import ModelError
from trainer.accelerator import claim, is_deepspeed
from trainer.checkpoint import Checkpointer
from trainer.ema import ema_beta, make_ema, update_ema
from trainer.preemption import EXIT_PREEMPTED, StopRequest
from trainer.progress import Progress, say
from trainer.spec import TrainSpec

# With several processes, whether to stop is agreed by an all-reduce; doing it every step would put a host
# sync into every step, so it is done every STOP_CHECK_STEPS steps (seconds, next to SLURM's minutes of lead).
STOP_CHECK_STEPS = 8


class Preempted(SystemExit):
    """Raised after the stop checkpoint; exits with 75 (requeue) or 130 (Ctrl-C)."""

    def __init__(self, code: int = EXIT_PREEMPTED):
        super().__init__(code)


@dataclass
class Update:
    """One optimizer step of `module` per iteration: `loss(modules, micro_batch, step)` -> scalar.

    `modules` holds the module being stepped as the engine prepared it (DDP/DeepSpeed wrapper) and every
    other module unwrapped with its parameters frozen (requires_grad False) for the duration, so a loss can
    run another network (a frozen score network, a generator under no_grad) without giving it gradients.
    takes_batch: False for an update that draws its own inputs (a generator step): it gets None and takes
        nothing from the data stream.
    every: run only at steps divisible by it (lazy regularisation: an R1 step every 16 iterations).
    lr_scale: multiplies the engine's learning rate for this update (a score network stepping faster than a
        generator).
    double_backward: the loss differentiates through a gradient (R1). torch.compile does not support that, so
        under train.compile the module this update trains is left uncompiled.
    """
    optimizer: str
    module: str
    loss: Callable[[dict, Any, int], torch.Tensor]
    lr_scale: float = 1.0
    takes_batch: bool = True
    every: int = 1
    double_backward: bool = False
    name: str = ""  # how metrics name its loss when there are several updates (default: the module's name)

    def runs_before(self, step: int) -> int:
        """How many times this update ran in steps 0 .. step-1."""
        return math.ceil(step / self.every)


class EnginePaths(NamedTuple):
    """Where a training run writes: its checkpoints directory and its metrics file (JSON lines)."""
    checkpoints: Path
    metrics: Path


@dataclass
class Hook:
    """`fn(engine) -> dict | None` every `every_kimg` (and at the end); a dict is logged as metrics.
    Every rank calls it, so a hook may spread work over ranks and use collectives."""
    every_kimg: float
    fn: Callable[["Engine"], dict | None]


def adam(params, lr: float, betas, eps: float) -> torch.optim.Adam:
    """Adam as every stage builds it: fused, so that a non-finite step is skipped on the device (found_inf)
    instead of by a host read of the gradient norm every step."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(float(b) for b in betas), eps=eps, fused=True)


def lr_at(spec: TrainSpec, nimg: int) -> float:
    if spec.lr_rampup_kimg > 0:
        return spec.lr * min(nimg / (spec.lr_rampup_kimg * 1000), 1.0)
    return spec.lr


class Engine:
    def __init__(self, accelerator, spec: TrainSpec, paths: EnginePaths, *, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], updates: list[Update],
                 batches: Callable[[int], Iterator], ema: tuple[str, ...] = (), hooks: tuple[Hook, ...] = (),
                 until: Callable[["Engine"], str | None] | None = None,
                 log: Callable[[str], None] | None = None, trackers: tuple = ()):
        if spec.batch % (accelerator.num_processes * spec.accum):
            raise ModelError(f"train.batch={spec.batch} is not divisible by processes "
                             f"({accelerator.num_processes}) x train.accum ({spec.accum})")
        self.acc = accelerator
        self.spec = spec
        self.paths = paths
        self.updates = updates
        self.batches = batches
        self.hooks = hooks
        # Early stopping: `until(engine)` says why the run ends before total_kimg, or None. It is asked after a
        # resume and after every step's hooks, without a collective: it must answer alike on every rank, and be a
        # function of the step and of what the hooks have kept, so that a resumed run stops where an
        # uninterrupted one did.
        self.until = until
        self.stopped_early = False
        self.trackers = trackers  # Accelerate trackers (TensorBoard, W&B) of the main process: metrics.jsonl's rows
        self.log = log or (say if accelerator.is_main_process else (lambda message: None))
        self.deepspeed = is_deepspeed(accelerator)
        claim(accelerator, spec, modules, optimizers)
        if spec.channels_last:
            for module in modules.values():
                module.to(memory_format=torch.channels_last)
        names, objs = list(modules) + list(optimizers), list(modules.values()) + list(optimizers.values())
        prepared = dict(zip(names, accelerator.prepare(*objs)))
        self.modules = {k: prepared[k] for k in modules}
        self.optimizers = {k: prepared[k] for k in optimizers}
        # After prepare, so that the averages live where the prepared modules do (the GPU); uncompiled, as
        # they are only evaluated and saved.
        self.ema = {name: make_ema(self.unwrap(name)) for name in ema}
        if spec.compile:
            self._compile([name for name in modules if not any(u.double_backward and u.module == name
                                                                for u in updates)])
        self.checkpointer = Checkpointer(paths.checkpoints, accelerator, spec.keep_checkpoints, self.log)
        self.nimg = 0
        self.step = 0
        # Non-finite steps: all of them, and the current run of consecutive ones (device tensors, read at
        # log and checkpoint time).
        self._skipped = torch.zeros((), device=accelerator.device)
        self._nonfinite_run = torch.zeros((), device=accelerator.device)
        self._seconds_before = 0.0  # wall time of earlier sessions of this stage
        self._session_start = time.time()

    def unwrap(self, name: str) -> nn.Module:
        # keep_torch_compile=False: with it, Accelerate re-points the compiled wrapper at the bare module,
        # which would silently take DDP out of the compiled training module
        return self.acc.unwrap_model(self.modules[name], keep_torch_compile=False)

    def _compile(self, names: list[str]) -> None:
        """torch.compile the prepared modules `names`; the others are named in the log."""
        for name in names:
            if self.deepspeed:
                self.modules[name].compile()  # DeepSpeed's engine compiles its module inside its own hooks
            else:
                # The DDP wrapper, not the module inside it: compiled around DDP, the graph is split at the
                # gradient buckets so that their all-reduce overlaps the backward pass.
                self.modules[name] = torch.compile(self.modules[name])
        skipped = [name for name in self.modules if name not in names]
        if skipped:
            self.log(f"train.compile: {', '.join(skipped)} not compiled (trained through a double backward, "
                     "which torch.compile does not support)")

    @property
    def kimg(self) -> float:
        return self.nimg / 1000

    @property
    def total_nimg(self) -> int:
        return int(round(self.spec.total_kimg * 1000))

    @property
    def seconds(self) -> float:
        """Wall time this stage has run, over all its sessions."""
        return self._seconds_before + time.time() - self._session_start

    @property
    def skipped(self) -> int:
        return int(self._skipped.item())

    def stream_position(self) -> int:
        """Micro-batches this rank has taken from its stream: the data position a checkpoint records."""
        return sum(u.runs_before(self.step) for u in self.updates if u.takes_batch) * self.spec.accum

    def state(self) -> dict:
        return {"step": self.step, "nimg": self.nimg, "skipped_steps": self.skipped,
                "nonfinite_run": int(self._nonfinite_run.item()), "seconds": round(self.seconds, 3),
                "stream_batches": self.stream_position()}

    def resume(self) -> bool:
        """Restore the checkpoint train.resume names: the newest usable one (latest), none, or a path."""
        if self.spec.resume == "none":
            return False
        keys = tuple(self.state())
        state = (self.checkpointer.load_latest(self.ema, keys) if self.spec.resume == "latest"
                 else self.checkpointer.load(Path(self.spec.resume), self.ema, keys))
        if state is None:
            return False
        self.step, self.nimg = state["step"], state["nimg"]
        self._skipped.fill_(state["skipped_steps"])
        self._nonfinite_run.fill_(state["nonfinite_run"])
        self._seconds_before, self._session_start = state["seconds"], time.time()
        if self.acc.is_main_process:
            self._truncate_metrics()
        return True

    def run(self) -> None:
        """Train to total_kimg (or until `until` is met), resuming first if a checkpoint exists; every rank returns
        together. Raises
        Preempted after a checkpoint when SIGTERM/SIGUSR1 (or Ctrl-C) arrived."""
        self.resume()
        self.stopped_early = self._met_until()  # a run resumed from the checkpoint where it stopped ends at once
        stop = StopRequest()
        progress = Progress(self.total_nimg, self.nimg, self.paths.metrics.parent.name,
                            enabled=self.acc.is_main_process)
        try:
            self._loop(stop, progress)
        finally:
            progress.close()  # also on errors, so the message starts on a line of its own
            stop.restore()
            for tracker in self.trackers:
                tracker.finish()
        self.acc.wait_for_everyone()

    def summary(self) -> dict:
        """What a finished run did, for its stage's done.json."""
        return {"kimg": self.kimg, "steps": self.step, "skipped_steps": self.skipped, "seconds": round(self.seconds, 1),
                **({"stopped_early": self.stopped_early} if self.until is not None else {})}

    def _loop(self, stop: StopRequest, progress: Progress) -> None:
        spec = self.spec
        stream = self.batches(self.stream_position())
        window = self._new_window()
        due = {name: self._next_due(every) for name, every in self._periodic().items()}
        while self.nimg < self.total_nimg and not self.stopped_early:
            if self._should_stop(stop):
                self.log(f"stop requested (signal {stop.signum or 'on another rank'}); "
                         f"checkpointing at step {self.step}")
                if not self.checkpointer.has(self.step):
                    self.checkpointer.save(self.step, self.state(), self.ema)
                raise Preempted(stop.exit_code)
            window["loss"] += self._train_step(stream)
            window["runs"] += torch.tensor([float(self.step % u.every == 0) for u in self.updates])
            self.step += 1
            self.nimg += spec.batch
            progress.advance(self.nimg)
            finished = self.nimg >= self.total_nimg
            if self.nimg >= due["log"] or finished:
                progress.log(self.nimg, self._log_window(window))
            paused = time.perf_counter()
            self._run_due(due, finished)
            window["t"] += time.perf_counter() - paused  # hooks and checkpoints do not count against images/s

    def _should_stop(self, stop: StopRequest) -> bool:
        """Whether every rank stops here; one signalled rank is enough. One process reads its own flag;
        several agree by an all-reduce every STOP_CHECK_STEPS steps (Accelerate's trigger)."""
        if self.acc.num_processes == 1:
            return stop.requested
        if self.step % STOP_CHECK_STEPS:
            return False
        if stop.requested:
            self.acc.set_trigger()
        return self.acc.check_trigger()

    def _run_due(self, due: dict, finished: bool) -> None:
        """Hooks, then the checkpoint, whichever are due (all of them at the end, or when `until` is met)."""
        for i, hook in enumerate(self.hooks):
            if self.nimg >= due[f"hook{i}"] or finished:
                metrics = hook.fn(self)
                if metrics:
                    self.write_metrics(metrics)
        self.stopped_early = not finished and self._met_until()
        if self.nimg >= due["checkpoint"] or finished or self.stopped_early:
            self._check_nonfinite()
            self.checkpointer.save(self.step, self.state(), self.ema)
        for name, every in self._periodic().items():
            if self.nimg >= due[name]:
                due[name] = self._next_due(every)

    def _met_until(self) -> bool:
        """Whether `until` ends the run now (logged with its reason)."""
        reason = None if self.until is None else self.until(self)
        if reason is not None:
            self.log(f"stopping at {self.kimg:g} of {self.spec.total_kimg:g} kimg: {reason}")
        return reason is not None

    def _periodic(self) -> dict[str, float]:
        every = {"log": self.spec.log_every_kimg, "checkpoint": self.spec.checkpoint_every_kimg}
        every.update({f"hook{i}": h.every_kimg for i, h in enumerate(self.hooks)})
        return every

    def _next_due(self, every_kimg: float) -> float:
        """The next multiple of every_kimg after now (never, for 0)."""
        if every_kimg <= 0:
            return math.inf
        every = every_kimg * 1000
        return (math.floor(self.nimg / every) + 1) * every

    def _train_step(self, stream: Iterator) -> torch.Tensor:
        """One iteration: each due Update does `accum` micro-batches and one optimizer step. Returns the
        updates' losses [len(updates)] on the device (0 for an update that did not run)."""
        lr = lr_at(self.spec, self.nimg)
        losses = torch.zeros(len(self.updates), device=self.acc.device)
        for index, update in enumerate(self.updates):
            if self.step % update.every:
                continue
            module, opt = self.modules[update.module], self.optimizers[update.optimizer]
            for group in opt.param_groups:
                group["lr"] = lr * update.lr_scale
            with self._only_trains(update.module) as modules:
                for _ in range(self.spec.accum):
                    batch = self._to_memory_format(next(stream)) if update.takes_batch else None
                    with self.acc.accumulate(module):
                        loss = update.loss(modules, batch, self.step)
                        self.acc.backward(loss)
                        losses[index] += loss.detach().float() / self.spec.accum
                        if self.acc.sync_gradients:
                            self._clip_and_step(module, opt)
                        opt.zero_grad(set_to_none=True)
        beta = ema_beta(self.spec.batch, self.nimg, self.spec.ema_halflife_kimg, self.spec.ema_rampup_ratio)
        for name, ema in self.ema.items():
            update_ema(ema, self.unwrap(name), beta)
        return losses

    @contextmanager
    def _only_trains(self, name: str):
        """The modules a loss sees: `name` as prepared, the others unwrapped and frozen."""
        frozen = {other: [p.requires_grad for p in self.unwrap(other).parameters()]
                  for other in self.modules if other != name}
        for other in frozen:
            self.unwrap(other).requires_grad_(False)
        try:
            yield {other: self.modules[other] if other == name else self.unwrap(other) for other in self.modules}
        finally:
            for other, flags in frozen.items():
                for p, flag in zip(self.unwrap(other).parameters(), flags):
                    p.requires_grad_(flag)

    def _to_memory_format(self, batch):
        if self.spec.channels_last and isinstance(batch, torch.Tensor) and batch.dim() == 4:
            return batch.contiguous(memory_format=torch.channels_last)
        return batch

    def _clip_and_step(self, module: nn.Module, opt) -> None:
        """Clip, then step unless the gradients are not finite.

        Under fp16 the dynamic loss scaler decides (it skips the step and lowers the scale). Under DeepSpeed,
        `acc.backward` has already clipped (config "gradient_clipping") and stepped at this accumulation
        boundary; ZeRO skips a step whose gradient norm is NaN/Inf and says so in `step_was_skipped`; we
        count it. Otherwise a fused optimizer skips on the device through `found_inf`; any other optimizer
        costs one host read of the norm."""
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else math.inf
        norm = self.acc.clip_grad_norm_(module.parameters(), max_norm)
        nonfinite = torch.zeros((), device=self.acc.device) if norm is None else \
            (~torch.isfinite(torch.as_tensor(norm, device=self.acc.device))).float()
        if self.deepspeed:
            # not finite yet not skipped: bf16 without check_grad_overflow applied it; count it anyway,
            # so that max_nonfinite_steps still stops a run that has gone bad
            if opt.step_was_skipped:
                nonfinite = torch.ones((), device=self.acc.device)
        elif self.acc.scaler is not None:
            opt.step()
            nonfinite = torch.tensor(float(opt.step_was_skipped), device=self.acc.device)
        else:
            inner = getattr(opt, "optimizer", opt)
            if inner.defaults.get("fused"):
                inner.grad_scale, inner.found_inf = None, nonfinite
                try:
                    opt.step()
                finally:
                    del inner.grad_scale, inner.found_inf
            elif not nonfinite.item():
                opt.step()
        self._skipped += nonfinite
        self._nonfinite_run = (self._nonfinite_run + nonfinite) * nonfinite

    def _check_nonfinite(self) -> None:
        run = int(self._nonfinite_run.item())
        if run >= self.spec.max_nonfinite_steps:
            raise ModelError(f"{run} steps in a row had non-finite gradients at {self.kimg:.1f} kimg; "
                             "lower train.lr or use precision=bf16")

    def _new_window(self) -> dict:
        return {"loss": torch.zeros(len(self.updates), device=self.acc.device), "runs": torch.zeros(len(self.updates)),
                "t": time.perf_counter(), "nimg": self.nimg}

    def _log_window(self, window: dict) -> dict:
        """Write the window's metrics (one host sync) and start a new window; returns what was logged. The
        loss is the sum of the updates' mean losses (each averaged over the steps it ran)."""
        self._check_nonfinite()
        mean = (self.acc.reduce(window["loss"], reduction="mean").cpu() / window["runs"].clamp(min=1)).tolist()
        metrics = {"loss": sum(mean), "lr": lr_at(self.spec, self.nimg),
                   "images_per_s": (self.nimg - window["nimg"]) / max(time.perf_counter() - window["t"], 1e-9),
                   "skipped_steps": self.skipped}
        if len(mean) > 1:
            metrics.update({f"loss_{u.name or u.module}": v for u, v in zip(self.updates, mean)})
        self.write_metrics(metrics)
        window.update(self._new_window())
        return metrics

    def write_metrics(self, metrics: dict) -> None:
        if not self.acc.is_main_process:
            return
        row = {"step": self.step, "kimg": round(self.kimg, 3), **metrics, "time": time.time()}
        self.paths.metrics.parent.mkdir(parents=True, exist_ok=True)
        with open(self.paths.metrics, "a") as f:
            f.write(json.dumps(row) + "\n")
        for tracker in self.trackers:
            tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)

    def _truncate_metrics(self) -> None:
        """Drop rows logged after the checkpoint we resumed from: they will be logged again."""
        path = self.paths.metrics
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(r + "\n" for r in rows))

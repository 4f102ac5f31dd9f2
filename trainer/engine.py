"""The one training loop every stage runs on.

A stage hands the engine its modules, their optimizers, one or more `Update`s (a loss and the
optimizer it steps) and a source of micro-batches. The engine does the rest, the same way for every
stage: Accelerate (DDP or DeepSpeed), mixed precision, gradient accumulation and clipping, skipped
non-finite steps, EMA, the learning rate as a function of kimg, periodic hooks (evaluation, sample
grids), metrics.jsonl, a progress bar, checkpoints, resume and preemption.

Progress is counted in images seen (nimg), so schedules mean the same for any world size. The
learning rate is computed from nimg and written into the optimizer; no scheduler is prepared
(Accelerate would step a prepared scheduler once per process).
"""
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from trainer.checkpoint import Checkpointer
from trainer.ema import ema_beta, make_ema, update_ema
from trainer.preemption import EXIT_PREEMPTED, StopRequest
from trainer.spec import TrainSpec


class TrainingError(Exception):
    """Training cannot go on (e.g. gradients non-finite step after step)."""


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; exits the process with EXIT_PREEMPTED."""

    def __init__(self):
        super().__init__(EXIT_PREEMPTED)


@dataclass
class Update:
    """One optimizer step per iteration: `loss(modules, micro_batch)` -> scalar, stepping `optimizer`
    over the parameters of `module` (both names of the engine's dicts)."""
    optimizer: str
    module: str
    loss: Callable[[dict, Any], torch.Tensor]
    # Multiplies the engine's learning rate for this update (a score network stepping faster than a
    # generator). Every Update takes its own `accum` micro-batches from the stream, in order.
    lr_scale: float = 1.0


@dataclass
class Hook:
    """`fn(engine) -> dict | None` every `every_kimg` (and at the end); a dict is logged as metrics.
    Every rank calls it, so a hook may spread work over ranks and use collectives."""
    every_kimg: float
    fn: Callable[["Engine"], dict | None]


def lr_at(spec: TrainSpec, nimg: int) -> float:
    if spec.lr_rampup_kimg > 0:
        return spec.lr * min(nimg / (spec.lr_rampup_kimg * 1000), 1.0)
    return spec.lr


class Engine:
    def __init__(self, accelerator, spec: TrainSpec, stage_dir: Path, *, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], updates: list[Update],
                 batches: Callable[[int], Iterator], ema: tuple[str, ...] = (), hooks: tuple[Hook, ...] = (),
                 log: Callable[[str], None] | None = None):
        if spec.batch % (accelerator.num_processes * spec.accum):
            raise TrainingError(f"train.batch={spec.batch} is not divisible by processes "
                                f"({accelerator.num_processes}) x train.accum ({spec.accum})")
        self.acc = accelerator
        self.spec = spec
        self.dir = Path(stage_dir)
        self.updates = updates
        self.batches = batches
        self.hooks = hooks
        self.log = log or (lambda msg: accelerator.print(msg))
        self.deepspeed = _is_deepspeed(accelerator)
        if self.deepspeed:
            _fill_deepspeed_config(accelerator, spec, modules, optimizers)
        self.ema = {name: make_ema(modules[name]) for name in ema}
        names, objs = list(modules) + list(optimizers), list(modules.values()) + list(optimizers.values())
        prepared = dict(zip(names, accelerator.prepare(*objs)))
        self.modules = {k: prepared[k] for k in modules}
        self.optimizers = {k: prepared[k] for k in optimizers}
        self.checkpointer = Checkpointer(self.dir / "checkpoints", accelerator, spec.keep_checkpoints, self.log)
        self.nimg = 0
        self.step = 0
        self.skipped = 0
        self.nonfinite_run = 0
        self._seconds_before = 0.0  # wall time of earlier sessions of this stage
        self._session_start = time.time()

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

    def state(self) -> dict:
        return {"step": self.step, "nimg": self.nimg, "skipped_steps": self.skipped,
                "nonfinite_run": self.nonfinite_run, "seconds": round(self.seconds, 3),
                # The data position: micro-batches this rank has taken from its stream.
                "stream_batches": self.step * self.spec.accum * len(self.updates)}

    def resume(self) -> bool:
        state = self.checkpointer.load_latest(self.ema)
        if state is None:
            return False
        self.step, self.nimg = state["step"], state["nimg"]
        self.skipped, self.nonfinite_run = state["skipped_steps"], state["nonfinite_run"]
        self._seconds_before, self._session_start = state["seconds"], time.time()
        if self.acc.is_main_process:
            self._truncate_metrics()
        return True

    def run(self) -> None:
        """Train to total_kimg, resuming first if a checkpoint exists. Raises Preempted after a
        checkpoint when SIGTERM/SIGUSR1 arrived."""
        self.resume()
        stop = StopRequest()
        bar = tqdm(total=self.total_nimg, initial=self.nimg, unit="img", unit_scale=True, smoothing=0.1,
                   disable=not self.acc.is_main_process, desc=self.dir.name, dynamic_ncols=True)
        try:
            self._loop(stop, bar)
        finally:
            bar.close()  # also on errors, so the message starts on a line of its own
            stop.restore()

    def _loop(self, stop: StopRequest, bar: tqdm) -> None:
        spec, acc = self.spec, self.acc
        stream = self.batches(self.step * spec.accum * len(self.updates))
        window = {"loss": 0.0, "n": 0, "t": time.perf_counter(), "nimg": self.nimg}
        due = {name: self._next_due(every) for name, every in self._periodic().items()}
        while self.nimg < self.total_nimg:
            if stop.requested:
                acc.set_trigger()
            if acc.check_trigger():  # every rank stops at the same step, even if one was signalled
                self.log(f"stop requested (signal {stop.signum}); checkpointing at step {self.step}")
                self.checkpointer.save(self.step, self.state(), self.ema)
                raise Preempted()
            window["loss"] = window["loss"] + sum(self._train_step(stream))
            window["n"] += 1
            self.step += 1
            self.nimg += spec.batch
            bar.update(spec.batch)
            finished = self.nimg >= self.total_nimg
            if self.nimg >= due["log"] or finished:
                bar.set_postfix(loss=f"{self._log_window(window):.4f}")
            paused = time.perf_counter()
            self._run_due(due, finished)
            window["t"] += time.perf_counter() - paused  # hooks and checkpoints do not count against images/s

    def _run_due(self, due: dict, finished: bool) -> None:
        """Hooks, then the checkpoint, whichever are due (all of them at the end)."""
        for i, hook in enumerate(self.hooks):
            if self.nimg >= due[f"hook{i}"] or finished:
                metrics = hook.fn(self)
                if metrics:
                    self.write_metrics(metrics)
        if self.nimg >= due["checkpoint"] or finished:
            self.checkpointer.save(self.step, self.state(), self.ema)
        for name, every in self._periodic().items():
            if self.nimg >= due[name]:
                due[name] = self._next_due(every)

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

    def _train_step(self, stream: Iterator) -> list[torch.Tensor]:
        """One iteration: each Update does `accum` micro-batches and one optimizer step. Losses stay
        on the device (no host sync per step); they are read at log time."""
        lr = lr_at(self.spec, self.nimg)
        losses = []
        for update in self.updates:
            module, opt = self.modules[update.module], self.optimizers[update.optimizer]
            for group in opt.param_groups:
                group["lr"] = lr * update.lr_scale
            total = torch.zeros((), device=self.acc.device)
            for _ in range(self.spec.accum):
                batch = next(stream)
                with self.acc.accumulate(module):
                    loss = update.loss(self.modules, batch)
                    self.acc.backward(loss)
                    total += loss.detach().float() / self.spec.accum
                    if self.acc.sync_gradients:
                        self._clip_and_step(module, opt)
                    opt.zero_grad(set_to_none=True)
            losses.append(total)
        beta = ema_beta(self.spec.batch, self.nimg, self.spec.ema_halflife_kimg, self.spec.ema_rampup_ratio)
        for name, ema in self.ema.items():
            update_ema(ema, self.acc.unwrap_model(self.modules[name]), beta)
        return losses

    def _clip_and_step(self, module: nn.Module, opt) -> None:
        """Clip, then step unless the gradients are not finite. Under fp16 the dynamic loss scaler
        decides (it skips the step and lowers the scale); otherwise we skip here and count it.

        Under DeepSpeed, `acc.backward` has already clipped (config "gradient_clipping") and stepped at
        this accumulation boundary; ZeRO skips a step whose gradient norm is NaN/Inf (fp32, fp16, and
        bf16 with "check_grad_overflow") and says so in `step_was_skipped`; we only count it. The norm
        `clip_grad_norm_` returns there is DeepSpeed's, of the step just taken (inf when skipped)."""
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else math.inf
        norm = self.acc.clip_grad_norm_(module.parameters(), max_norm)
        finite = norm is None or bool(torch.isfinite(torch.as_tensor(norm)))
        if self.deepspeed:
            # not finite yet not skipped: bf16 without check_grad_overflow applied it; count it anyway,
            # so that max_nonfinite_steps still stops a run that has gone bad
            skipped = opt.step_was_skipped or not finite
        elif self.acc.scaler is not None:
            opt.step()
            skipped = opt.step_was_skipped
        else:
            if finite:
                opt.step()
            skipped = not finite
        if skipped:
            self.skipped += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.spec.max_nonfinite_steps:
                raise TrainingError(f"{self.nonfinite_run} steps in a row had non-finite gradients at "
                                    f"{self.kimg:.1f} kimg; lower train.lr or use precision=bf16")
        else:
            self.nonfinite_run = 0

    def _log_window(self, window: dict) -> float:
        acc = self.acc
        mean_loss = torch.as_tensor(window["loss"], device=acc.device, dtype=torch.float32) / max(window["n"], 1)
        mean_loss = acc.reduce(mean_loss, reduction="mean").item()
        now = time.perf_counter()
        rate = (self.nimg - window["nimg"]) / max(now - window["t"], 1e-9)
        self.write_metrics({"loss": mean_loss, "lr": lr_at(self.spec, self.nimg), "images_per_s": rate,
                            "skipped_steps": self.skipped})
        window.update(loss=0.0, n=0, t=now, nimg=self.nimg)
        return mean_loss

    def write_metrics(self, metrics: dict) -> None:
        if not self.acc.is_main_process:
            return
        row = {"step": self.step, "kimg": round(self.kimg, 3), **metrics, "time": time.time()}
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_metrics(self) -> None:
        """Drop rows logged after the checkpoint we resumed from: they will be logged again."""
        path = self.dir / "metrics.jsonl"
        if path.exists():
            rows = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(r + "\n" for r in rows))


def _deepspeed_launch() -> bool:
    """Started by `accelerate launch` with a DeepSpeed config (distributed_type: DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def _is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fill_deepspeed_config(accelerator, spec: TrainSpec, modules: dict, optimizers: dict) -> None:
    """Fill the DeepSpeed config's "auto" batch sizes, clipping and autocast from the run config, before
    prepare.

    No DataLoader goes through prepare(), so Accelerate cannot infer the micro-batch; and it would turn
    "gradient_clipping": "auto" into 1.0 where train.grad_clip=0 means no clipping under DDP. A value
    the JSON fixes that disagrees with the run config is an error rather than a silently different run."""
    if len(modules) != 1 or len(optimizers) != 1:
        # Accelerate wraps one model with one optimizer per DeepSpeed engine, and backward() steps only
        # the engine prepared last; several models need several DeepSpeed plugins (not supported here).
        raise TrainingError(f"DeepSpeed: the engine supports one module and one optimizer, got modules "
                            f"{list(modules)} and optimizers {list(optimizers)}")
    plugin = accelerator.state.deepspeed_plugin
    if spec.precision == "fp16" and plugin.get_value("torch_autocast.enabled") == "auto":
        raise TrainingError("train.precision=fp16 under DeepSpeed ZeRO: torch autocast there has no loss "
                            "scaler; use train.precision=bf16")
    values = {"train_micro_batch_size_per_gpu": spec.batch // (accelerator.num_processes * spec.accum),
              "train_batch_size": spec.batch, "gradient_accumulation_steps": spec.accum,
              "gradient_clipping": float(spec.grad_clip) if spec.grad_clip > 0 else 0.0,
              # fp32 weights and bf16 autocast, as under DDP (configs/accelerate/deepspeed_zero2.yaml)
              "torch_autocast.enabled": spec.precision == "bf16", "torch_autocast.dtype": "bfloat16"}
    mismatches = []
    for key, value in values.items():
        plugin.fill_match(key, mismatches, must_match=True, **{key: value})
    if mismatches:
        raise TrainingError("the DeepSpeed config disagrees with the run config (set these to \"auto\"):\n"
                            + "\n".join(mismatches))


def make_accelerator(spec: TrainSpec, timeout_minutes: int = 60, ddp_because: str = ""):
    """The Accelerator every stage trains with. The process group timeout is explicit and long, so
    that ranks waiting at a collective while others evaluate or checkpoint do not time out. Whether
    it is DDP or DeepSpeed comes from `accelerate launch --config_file ...`; a stage that cannot run
    under DeepSpeed passes `ddp_because` (why) and gets DDP on the same processes, with a message.

    Without GPUs: DDP needs `cpu=True` (gloo). Under DeepSpeed, `cpu=True` would make Accelerate
    silently ignore DeepSpeed and train with DDP, so there it is `cpu=False` with the gloo backend
    named explicitly (Accelerate would otherwise find no backend and run each rank alone)."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if _deepspeed_launch() and ddp_because:
        # The launcher only sets environment variables (torchrun's ranks and rendezvous are the same
        # for DDP); Accelerate reads this one to decide, when the first Accelerator is created.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"scorefuse: DeepSpeed is not used here ({ddp_because}); training with DDP on the same "
                  f"{os.environ.get('WORLD_SIZE', '1')} processes", file=sys.stderr, flush=True)
    if _deepspeed_launch():
        import importlib.util
        if importlib.util.find_spec("transformers") is None:
            # Accelerate's DeepSpeedPlugin imports transformers' HfDeepSpeedConfig even for ZeRO-1/2
            # (a bare PackageNotFoundError otherwise)
            raise TrainingError("DeepSpeed through Accelerate needs the `transformers` package: "
                                "pip install transformers")
    no_gpu = not torch.cuda.is_available()
    deepspeed_on_cpu = no_gpu and _deepspeed_launch()
    init = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes),
                                  **({"backend": "gloo"} if deepspeed_on_cpu else {}))
    return Accelerator(mixed_precision=spec.precision, gradient_accumulation_steps=spec.accum,
                       cpu=no_gpu and not deepspeed_on_cpu, kwargs_handlers=[init])

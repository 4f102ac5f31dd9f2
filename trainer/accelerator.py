"""The Accelerator every stage runs on, and how one training run takes it over.

A stage builds one Accelerator (it decides the device and the process group), but may train several models
on it one after another: the fuse stage trains the paper's SGD fit, the router and the baselines. Accelerate
keeps state across those runs that would leak from one into the next: `save_state` writes every model ever
prepared (so a baseline's checkpoint would hold the SGD fit too, and a fresh process could never load it),
the gradient-accumulation count is the Accelerator's, not the run's, and DeepSpeed's "auto" values are filled
into the shared plugin's config in place (so the next run's batch size reads as a mismatch). `claim` gives
each run a clean Accelerator before it prepares anything.
"""
import copy
import os
import sys

import torch

from shards.errors import ModelError
from trainer.spec import TrainSpec


def deepspeed_launch() -> bool:
    """Started by `accelerate launch` with a DeepSpeed config (distributed_type: DEEPSPEED)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def is_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def claim(accelerator, spec: TrainSpec, modules: dict, optimizers: dict) -> None:
    """Make `accelerator` this training run's alone, before it prepares `modules` and `optimizers`: forget
    what earlier runs prepared, accumulate spec.accum micro-batches, and (DeepSpeed) start from the config
    as it was read, then fill its "auto" values from `spec`."""
    accelerator.free_memory()
    accelerator.gradient_accumulation_steps = spec.accum
    if is_deepspeed(accelerator):
        plugin = accelerator.state.deepspeed_plugin
        if not hasattr(plugin, "pristine_config"):
            plugin.pristine_config = copy.deepcopy(plugin.deepspeed_config)
        # hf_ds_config.config and deepspeed_config are one dict: Accelerate fills it through either name
        plugin.hf_ds_config.config = plugin.deepspeed_config = copy.deepcopy(plugin.pristine_config)
        _fill_deepspeed_config(accelerator, spec, modules, optimizers)


def _fill_deepspeed_config(accelerator, spec: TrainSpec, modules: dict, optimizers: dict) -> None:
    """Fill the DeepSpeed config's "auto" batch sizes, clipping and autocast from the run config, before
    prepare.

    No DataLoader goes through prepare(), so Accelerate cannot infer the micro-batch; and it would turn
    "gradient_clipping": "auto" into 1.0 where train.grad_clip=0 means no clipping under DDP. A value
    the JSON fixes that disagrees with the run config is an error rather than a silently different run."""
    if len(modules) != 1 or len(optimizers) != 1:
        # Accelerate wraps one model with one optimizer per DeepSpeed engine, and backward() steps only
        # the engine prepared last; several models need several DeepSpeed plugins (not supported here).
        raise ModelError(f"DeepSpeed: the engine supports one module and one optimizer, got modules "
                         f"{list(modules)} and optimizers {list(optimizers)}")
    plugin = accelerator.state.deepspeed_plugin
    if spec.precision == "fp16" and plugin.get_value("torch_autocast.enabled") == "auto":
        raise ModelError("train.precision=fp16 under DeepSpeed ZeRO: torch autocast there has no loss "
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
        raise ModelError("the DeepSpeed config disagrees with the run config (set these to \"auto\"):\n"
                         + "\n".join(mismatches))


def use_deterministic_algorithms() -> None:
    """Bit-identical reruns and resumes on a GPU (train.deterministic): deterministic kernels only (torch
    raises where an op has none), cuDNN without autotuning, and cuBLAS with a fixed workspace, which must be
    set before its first use (the stage calls this before any CUDA work). bench/gpu_check.py measures the
    cost. On the CPU training is deterministic without it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


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

    if deepspeed_launch() and ddp_because:
        # The launcher only sets environment variables (torchrun's ranks and rendezvous are the same
        # for DDP); Accelerate reads this one to decide, when the first Accelerator is created.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"scorefuse: DeepSpeed is not used here ({ddp_because}); training with DDP on the same "
                  f"{os.environ.get('WORLD_SIZE', '1')} processes", file=sys.stderr, flush=True)
    if deepspeed_launch():
        import importlib.util
        if importlib.util.find_spec("transformers") is None:
            # Accelerate's DeepSpeedPlugin imports transformers' HfDeepSpeedConfig even for ZeRO-1/2
            # (a bare PackageNotFoundError otherwise)
            raise ModelError("DeepSpeed through Accelerate needs the `transformers` package: "
                             "pip install transformers")
    if spec.deterministic:
        use_deterministic_algorithms()
    else:
        # Autotuning pays for itself after a few steps of fixed-shape batches, which every stage has.
        torch.backends.cudnn.benchmark = spec.cudnn_benchmark
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("no", spec.precision) and int(os.environ.get("RANK", "0")) == 0:
        # "no" is also what `accelerate launch` sets when it was not asked, so only an explicit choice is named
        print(f"scorefuse: warning: accelerate launch --mixed_precision {launcher} is not used: train.precision="
              f"{spec.precision} decides (set train.precision={launcher} to train in {launcher})",
              file=sys.stderr, flush=True)
    no_gpu = not torch.cuda.is_available()
    deepspeed_on_cpu = no_gpu and deepspeed_launch()
    init = InitProcessGroupKwargs(timeout=timedelta(minutes=timeout_minutes),
                                  **({"backend": "gloo"} if deepspeed_on_cpu else {}))
    return Accelerator(mixed_precision=spec.precision, gradient_accumulation_steps=spec.accum,
                       cpu=no_gpu and not deepspeed_on_cpu, kwargs_handlers=[init])

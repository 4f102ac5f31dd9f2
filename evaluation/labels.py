"""The model labels: what the report, the measurements file, the catalogue (stages/catalogue.py),
`scorefuse sample model=`, the sweep and the benches call each model, spelled here and nowhere else.

    aux/<name>                         an auxiliary (auxiliary(name))
    fused-exact, fused-sgd             ScoreFusion's barycenter, lambda by the exact and the paper's SGD fit
    fused-mixture                      mixture fusion (trainer/mixture.py)
    fused-hybrid                       an ablation: the mixture's weights above fuse.hybrid_sigma, lambda below
    fused-uniform                      a control: the barycenter with lambda = 1/K, plain ensembling of the
                                       auxiliaries' denoisers (with the best single auxiliary, the other control)
    target-scratch, target-finetune,   the baselines fusion is compared with
    checkpoint-merge
    seed-ensemble                      a control: the best trained auxiliary and copies of it trained with other
                                       seeds, averaged uniformly (ensembling without other populations)
    distill                            the one-step generator

and the labels of the report's two floors, real data in the place of samples.
"""
from trainer.spec import BASELINES

# A baseline's label is its name in the config (fuse.baselines) and its directory (baselines/<b>/): the
# config schema, a floor below this one, owns the names, so they are taken from it rather than spelled again.
TARGET_SCRATCH, TARGET_FINETUNE, CHECKPOINT_MERGE, SEED_ENSEMBLE = BASELINES

DISTILL = "distill"
HALVES = "real: held-out half vs half"
TARGET_AS_SAMPLES = "real: target images as samples"


def fused(fit: str) -> str:
    """The fused model of a fit: exact | sgd (fuse.method, the barycenter's lambda) | mixture (as
    distill.teacher_fit names them) | uniform (lambda = 1/K, fitted to nothing)."""
    return f"fused-{fit}"


def auxiliary(name: str) -> str:
    """The auxiliary trained on population `name`."""
    return f"aux/{name}"


FUSED_EXACT, FUSED_SGD, FUSED_MIXTURE = FUSED = tuple(fused(fit) for fit in ("exact", "sgd", "mixture"))
FUSED_UNIFORM = fused("uniform")
FUSED_HYBRID = fused("hybrid")

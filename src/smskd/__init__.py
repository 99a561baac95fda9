"""smskd: sequential multi-stage knowledge distillation for PyTorch.

from smskd import Stage, run_stages
stages = [Stage(methods=["kd"], epochs=10), Stage(methods=["fitnets"], epochs=10)]
result = run_stages(student, teacher, stages, train_loader, test_loader)
"""

from smskd.config import MethodSpec, ReferenceConfig, RunConfig, Stage, load_config
from smskd.errors import UserError
from smskd.experiment import distill, evaluate_checkpoint, train_teacher
from smskd.methods.base import DistillMethod, Outputs
from smskd.methods.registry import register_method
from smskd.models.taps import FeatureTaps, ModelLayout
from smskd.train.stages import RunResult, run_stages
from smskd.version import __version__

__all__ = [
    "DistillMethod",
    "FeatureTaps",
    "MethodSpec",
    "ModelLayout",
    "Outputs",
    "ReferenceConfig",
    "RunConfig",
    "RunResult",
    "Stage",
    "UserError",
    "__version__",
    "distill",
    "evaluate_checkpoint",
    "load_config",
    "register_method",
    "run_stages",
    "train_teacher",
]

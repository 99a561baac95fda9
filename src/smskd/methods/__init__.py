"""KD methods, one file each; :mod:`smskd.methods.registry` maps names to classes."""

from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.fitnets import FitNets
from smskd.methods.kd import KD
from smskd.methods.rkd import RKD

__all__ = ["KD", "RKD", "DistillMethod", "FitNets", "Outputs", "StageContext"]

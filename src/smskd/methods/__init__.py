"""KD methods, one file each; :mod:`smskd.methods.registry` maps names to classes."""

from smskd.methods.at import AT
from smskd.methods.base import DistillMethod, Outputs, StageContext
from smskd.methods.cc import CC
from smskd.methods.crd import CRD
from smskd.methods.dist import DIST
from smskd.methods.dkd import DKD
from smskd.methods.fitnets import FitNets
from smskd.methods.ft import FT
from smskd.methods.kd import KD
from smskd.methods.lskd import LSKD
from smskd.methods.nst import NST
from smskd.methods.pkt import PKT
from smskd.methods.reviewkd import ReviewKD
from smskd.methods.rkd import RKD
from smskd.methods.sp import SP
from smskd.methods.vid import VID

__all__ = [
    "AT",
    "CC",
    "CRD",
    "DIST",
    "DKD",
    "FT",
    "KD",
    "LSKD",
    "NST",
    "PKT",
    "RKD",
    "SP",
    "VID",
    "DistillMethod",
    "FitNets",
    "Outputs",
    "ReviewKD",
    "StageContext",
]

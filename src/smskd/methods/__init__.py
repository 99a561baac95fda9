"""KD methods, one file each; :mod:`smskd.methods.registry` maps names to classes.

Each method's module registers its class (``@register_method``) when imported; the
imports below are the one list of built-in methods.
"""

from smskd.methods.base import DistillMethod, Outputs, StageContext

# isort: off
# By family (response, feature, relation): the order of registration is the order
# `smskd methods`, the docs and error messages list the methods in.
from smskd.methods.kd import KD
from smskd.methods.dkd import DKD
from smskd.methods.dist import DIST
from smskd.methods.lskd import LSKD
from smskd.methods.lm_kd import LMKD
from smskd.methods.fitnets import FitNets
from smskd.methods.at import AT
from smskd.methods.nst import NST
from smskd.methods.vid import VID
from smskd.methods.ft import FT
from smskd.methods.reviewkd import ReviewKD
from smskd.methods.lm_hidden import LMHidden
from smskd.methods.lm_attention import LMAttention
from smskd.methods.rkd import RKD
from smskd.methods.sp import SP
from smskd.methods.pkt import PKT
from smskd.methods.cc import CC
from smskd.methods.crd import CRD
# isort: on

__all__ = [
    "AT",
    "CC",
    "CRD",
    "DIST",
    "DKD",
    "FT",
    "KD",
    "LMKD",
    "LSKD",
    "NST",
    "PKT",
    "RKD",
    "SP",
    "VID",
    "DistillMethod",
    "FitNets",
    "LMAttention",
    "LMHidden",
    "Outputs",
    "ReviewKD",
    "StageContext",
]

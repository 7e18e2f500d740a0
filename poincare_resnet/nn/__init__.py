"""Poincaré layers named like ``torch.nn``'s.

Contract: every module takes and returns **tangent vectors at the origin** of the ball, along the
channel axis (dim 1) for image maps and the last axis for vectors, as the paper's network does
(SPEC §5). Ball points are formed only inside a layer, where its formula needs them.
"""

from .activation import TangentReLU
from .batchnorm import PoincareBatchNorm2d
from .conv import PoincareConv2d
from .curvature import Curvature, as_curvature
from .init import INITS, beta_concat_scale, compensated_gain, init_poincare_weight
from .linear import PoincareLinear, PoincareMLR
from .pooling import PoincareGlobalAvgPool2d
from .recompute import conv_norm, fc_recompute_enabled, set_fc_recompute
from .residual import PoincareResidual

__all__ = [
    "Curvature",
    "as_curvature",
    "INITS",
    "beta_concat_scale",
    "compensated_gain",
    "init_poincare_weight",
    "PoincareLinear",
    "PoincareMLR",
    "PoincareConv2d",
    "PoincareBatchNorm2d",
    "TangentReLU",
    "PoincareGlobalAvgPool2d",
    "PoincareResidual",
    "conv_norm",
    "fc_recompute_enabled",
    "set_fc_recompute",
]

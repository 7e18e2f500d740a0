"""poincare-resnet: fully hyperbolic residual networks for vision on the Poincaré ball."""

__version__ = "0.1.0"

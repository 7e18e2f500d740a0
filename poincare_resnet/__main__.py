"""``python -m poincare_resnet`` (also the entry point for ``torchrun -m poincare_resnet``)."""

import sys

from .cli import main

sys.exit(main())

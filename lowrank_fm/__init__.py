"""lowrank-fm: make a trained CNN faster and smaller by low-rank approximation of its layers, without
retraining, from a small calibration set.

    from lowrank_fm import approximate
    new_model, report = approximate(model, calibration_loader, energy=0.95)
"""

from .api import approximate
from .config import ApproxConfig
from .finetune import finetune
from .methods import list_methods
from .serialize import load_approximated, save_approximated

__version__ = "0.1.0"
__all__ = ["approximate", "ApproxConfig", "finetune", "list_methods", "load_approximated", "save_approximated", "__version__"]

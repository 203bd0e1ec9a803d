"""Networks, one paper per subpackage, built by name through the registry.

Importing this package imports every model subpackage so that they register themselves.
"""

from training.models.registry import (ModelInput, create_model, is_registered, list_models,
                                      model_input, register_model)

# Imported for their registration side effect.
from training.models import ststnet  # noqa: E402,F401
from training.models import mcnet  # noqa: E402,F401
from training.models import ms3d_resnet50  # noqa: E402,F401
from training.models import mjfn  # noqa: E402,F401
from training.models import ahmsa  # noqa: E402,F401

__all__ = ["ModelInput", "create_model", "is_registered", "list_models", "model_input",
           "register_model"]

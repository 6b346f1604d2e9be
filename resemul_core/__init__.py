"""resemul_core: sample-level CNNs for music auto-tagging (Kim, Lee & Nam, ICASSP 2018).

The twelve model variants are listed in :data:`VARIANTS` and built with :func:`build_model`.
"""

from .model import (
    VARIANTS,
    ModelConfig,
    SampleCNN,
    build_model,
    count_parameters,
    model_config,
    variant_table,
)

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "ModelConfig",
    "SampleCNN",
    "build_model",
    "count_parameters",
    "model_config",
    "variant_table",
    "__version__",
]

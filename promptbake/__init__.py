"""promptbake: bake a system prompt into a model's weights with on-policy context distillation."""

__version__ = "0.1.0"

from .config import DistillConfig  # noqa: E402  (light: no torch)
from .errors import PromptbakeError  # noqa: E402


def distill(cfg: DistillConfig, console=None):
    """Run a bake; see `promptbake.bake.distill`. Imported lazily to keep `import promptbake` light."""
    from .bake import distill as _distill

    return _distill(cfg, console)


__all__ = ["DistillConfig", "PromptbakeError", "distill", "__version__"]

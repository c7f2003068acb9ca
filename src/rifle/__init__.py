"""rifle: RIFLE (ICML 2020) and the fine-tuning methods it is compared against."""
from .core import Rifle, find_head

__version__ = "0.1.0"
__all__ = ["Rifle", "find_head", "load", "__version__"]


def __getattr__(name: str):
    # `rifle.load` imports the model/trainer stack (timm, ...) only when first used
    if name == "load":
        from .inference import load
        return load
    raise AttributeError(f"module 'rifle' has no attribute {name!r}")

"""rifle: RIFLE (ICML 2020) and the fine-tuning methods it is compared against.

Paper: Li, Xiong, An, Xu, Dou, "RIFLE: Backpropagation in Depth for Deep Transfer Learning through
Re-Initializing the Fully-connected LayEr", ICML 2020, arXiv 2007.03349.
"""

from .core import Rifle, find_head

__version__ = "0.1.0"
# `load` is not in __all__: `from rifle import *` would import the model/trainer stack (timm, ...)
__all__ = ["Rifle", "find_head", "__version__"]


def __getattr__(name: str):
    # `rifle.load` imports the model/trainer stack (timm, ...) only when first used
    if name == "load":
        from .inference import load

        return load
    raise AttributeError(f"module 'rifle' has no attribute {name!r}")

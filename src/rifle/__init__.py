"""rifle: RIFLE (ICML 2020) and the fine-tuning methods it is compared against."""
from .core import Rifle, find_head

__version__ = "0.1.0"
__all__ = ["Rifle", "find_head", "__version__"]

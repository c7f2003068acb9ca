"""Fine-tuning methods behind one protocol (see :mod:`rifle.methods.base`), one file each."""
from .base import Method, RunContext, create, register, registry

__all__ = ["Method", "RunContext", "create", "register", "registry"]

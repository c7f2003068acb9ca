"""Fine-tuning methods behind one protocol (see :mod:`rifle.methods.base`), one file each.

Every module here registers a method, except ``base`` (the protocol) and the ``_``-prefixed ones, which
``_load_all`` skips: itself and the support code methods share (``_penalties``: L2-SP/DELTA parameter
utilities; ``_feature_taps``, ``_channel_attention``: DELTA's parts).
"""

from .base import Method, RunContext, create, register, registry

__all__ = ["Method", "RunContext", "create", "register", "registry"]

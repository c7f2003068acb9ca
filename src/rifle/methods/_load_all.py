"""Import every method module so that its ``@register`` line runs (used by ``registry()``)."""
from . import rifle  # noqa: F401

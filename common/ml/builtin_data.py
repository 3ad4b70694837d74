"""The built-in datasets by name, and the kind of family each trains (no torch here)."""

from __future__ import annotations

BUILTINS = {"python-docs": "text", "digits": "image"}

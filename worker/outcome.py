"""Stops that are not errors, raised by job bodies and mapped to transitions in tasks.py."""

from __future__ import annotations


class ShutdownRequested(Exception):
    """The worker is shutting down: the job checkpointed and goes back to the queue."""


class StopForTimeout(Exception):
    """The job ran past spec.timeout_s (after checkpointing)."""

"""Placeholder replaced by the reference-model work."""

from __future__ import annotations


def train_command() -> None:
    """Train the reference model."""

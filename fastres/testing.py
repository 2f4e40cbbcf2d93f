"""Helpers for tests of fastres and of code built on it."""

from __future__ import annotations

from .launchers.core import count_launches

__all__ = ["count_launches"]

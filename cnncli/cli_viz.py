"""Placeholder: commands registered on cnncli.cli.app."""

from __future__ import annotations

"""Shared pytest setup: make the repository importable as ``mirrorfs`` and ``tests.util``."""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    # Whatever pytest's import mode or working directory, tests import the checkout.
    sys.path.insert(0, REPO)

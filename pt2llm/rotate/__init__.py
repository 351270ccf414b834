"""Hadamard rotations (incoherence processing, QuaRot-style, computationally invariant).

hadamard  orthogonal matrices of any width: Paley / Sylvester / random factors, fast transform
online    the run-time input transform (down_proj) and the record that rebuilds it on load
fold      the float-model transform: norm folding, residual / value-head / down_proj rotation
folder    a rotated float model on disk (`pt2llm rotate`)
"""
from .fold import RotationError, rotate_model

METHODS = ("none", "hadamard")

__all__ = ["METHODS", "RotationError", "rotate_model"]

"""Argument checks shared by flowkern's public functions: each error names the argument."""

import numbers

import torch


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def check_token_tensor(name: str, value) -> None:
    """`value` must be a 2-D integer tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a (B, T) tensor of token ids, got {describe(value)}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be a (B, T) tensor of token ids, got {describe(value)}")
    if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_number(name: str, value, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (abs(value) < float("inf")) \
            or (positive and not value > 0):
        expected = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")

"""Input checks shared by the algorithms: shapes, masks and finiteness, with errors that name the tensor."""

from __future__ import annotations

import torch

from megatron_archer.nonfinite import NonFiniteError


def require_finite(name: str, tensor: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise NonFiniteError (a ValueError) naming ``tensor`` if it holds NaN or +-inf where
    ``mask`` is true (everywhere without one).

    Padding outside the response mask may hold anything (e.g. -inf log-probs) and is not checked.
    """
    values = tensor.detach() if mask is None else tensor.detach()[mask]
    if not bool(torch.isfinite(values).all()):
        bad = int((~torch.isfinite(values)).sum())
        raise NonFiniteError(
            name, f"{name} has {bad} non-finite value(s) (NaN or inf) at valid positions")


def require_response_mask(response_mask: torch.Tensor) -> None:
    """The response mask is a bool [B, T] tensor: True on response tokens that enter the loss."""
    if response_mask.dtype != torch.bool or response_mask.dim() != 2:
        raise ValueError(
            f"response_mask must be a bool tensor of shape [B, T], got {response_mask.dtype} "
            f"of shape {tuple(response_mask.shape)}"
        )


def require_token_tensor(name: str, tensor: torch.Tensor, response_mask: torch.Tensor) -> None:
    """A per-token tensor has the mask's [B, T] shape and finite values on valid tokens."""
    if tensor.shape != response_mask.shape:
        raise ValueError(
            f"{name} must have the response mask's shape {tuple(response_mask.shape)}, "
            f"got {tuple(tensor.shape)}"
        )
    require_finite(name, tensor, response_mask)

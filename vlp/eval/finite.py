"""Refuse to score non-finite embeddings: a diverged model must fail validation, not score 100%."""

import torch


def require_finite(**tensors: torch.Tensor) -> None:
    """Raises FloatingPointError naming the first (N, D) tensor that holds NaN or inf.

    Every comparison with NaN is false, so unchecked NaN features would rank each match first.
    """
    for name, tensor in tensors.items():
        bad_rows = (~torch.isfinite(tensor)).flatten(1).any(dim=1)  # (N,)
        if bad_rows.any():
            raise FloatingPointError(f"{name} hold NaN or inf in {int(bad_rows.sum())} of {len(tensor)} rows: "
                                     "the model has diverged; refusing to score it")

"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020, Eq. 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Naive NT-Xent over the full 2N x 2N similarity matrix (the oracle for faster forms).

    z1, z2: [N, D] projections of the two views. Returns the mean over the 2N anchors of
    -sim(z_i, z_p(i))/tau + logsumexp_{k != i} sim(z_i, z_k)/tau, with cosine similarity.
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)  # [2N, D]
    n = z1.shape[0]
    logits = z @ z.T / temperature  # [2N, 2N]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # [2N]
    return F.cross_entropy(logits, positive)

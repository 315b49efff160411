"""Online causal Kalman filter over token log-ratios (KPO, arXiv 2602.10609, spec section 2).

Placeholder: a correct T-step loop, vectorised over the batch. Replaced by the fast scan.
"""

import torch
from torch import Tensor


@torch.no_grad()
def causal_kalman_filter(
    log_ratio: Tensor, mask: Tensor, q: float, v: float, p0: float = 0.0, x0: float = 0.0
) -> Tensor:
    """Filtered log-ratio rho (B, T); masked positions are skipped and output 0. No gradient flows."""
    z = log_ratio.detach()
    mask = mask.bool()
    B, T = z.shape
    rho = torch.full((B,), float(x0), dtype=torch.float64, device=z.device)
    P = torch.full((B,), float(p0), dtype=torch.float64, device=z.device)
    out = torch.zeros(B, T, dtype=torch.float64, device=z.device)
    for t in range(T):
        m = mask[:, t]
        p_pred = P + q
        k = p_pred / (p_pred + v)
        new_rho = rho + k * (z[:, t].double() - rho)
        rho = torch.where(m, new_rho, rho)
        P = torch.where(m, (1 - k) * p_pred, P)
        out[:, t] = torch.where(m, rho, torch.zeros_like(rho))
    return out.to(z.dtype)

"""The picture the paper explains itself with: raw vs Kalman-filtered token ratios along one response."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures go to TensorBoard or PNG files, never a window
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def ratio_figure(raw_log_ratio: Tensor, filtered_log_ratio: Tensor) -> plt.Figure:
    """Token importance ratios of one response (its valid tokens in order), raw and filtered."""
    fig, ax = plt.subplots(figsize=(7, 3))
    t = range(1, raw_log_ratio.numel() + 1)
    ax.plot(t, raw_log_ratio.exp().cpu().numpy(), lw=0.8, label="raw ratio")
    ax.plot(t, filtered_log_ratio.exp().cpu().numpy(), lw=1.6, label="Kalman-filtered ratio")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("response token")
    ax.set_ylabel("pi / pi_old")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig

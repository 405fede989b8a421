"""The real/bogus network, the input normalisation, and calibration by temperature.

A compact VGG-like CNN in the spirit of ZTF's braai (Duev et al. 2019): two 3×3
convolutions per stage, three stages, global pooling and a small dense head, about
0.1–0.3 M parameters depending on ``width``. It reads the three 63×63 cutouts
(science, reference, difference) as channels and returns one logit; a temperature
fitted on validation data turns logits into calibrated probabilities.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from torch import nn

__all__ = [
    "ModelConfig",
    "RealBogusNet",
    "fit_temperature",
    "normalise_triplets",
    "pick_device",
    "seed_everything",
]


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network.

    Attributes
    ----------
    width : int
        Channels of the first stage (doubled at each of the three stages).
    dense : int
        Units of the hidden dense layer.
    dropout : float
        Dropout before the output, 0–0.9.
    """

    width: int = 16
    dense: int = 64
    dropout: float = 0.3

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 256:
            raise ValueError(f"width must be 1-256, got {self.width}")
        if not 1 <= self.dense <= 4096:
            raise ValueError(f"dense must be 1-4096, got {self.dense}")
        if not 0.0 <= self.dropout < 0.9:
            raise ValueError(f"dropout must be in [0, 0.9), got {self.dropout}")

    def to_dict(self) -> dict[str, float]:
        """Plain-dict form (for logging and for saving with the weights)."""
        return asdict(self)


class RealBogusNet(nn.Module):
    """CNN on (n, 3, 63, 63) normalised triplets; returns (n,) logits of "real"."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        w = self.config.width

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(3, w), stage(w, 2 * w), stage(2 * w, 4 * w))
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4 * w, self.config.dense),
            nn.ReLU(inplace=True),
            nn.Dropout(self.config.dropout),
            nn.Linear(self.config.dense, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (n,)."""
        return self.head(self.features(x)).squeeze(1)


def normalise_triplets(triplets: np.ndarray, clip: float = 50.0) -> np.ndarray:
    """Put every cutout on a common scale: (x − median) / robust σ, then asinh.

    Each of the three stamps of a candidate is scaled by its own noise (MAD), so a
    survey's flux units, sky level and epoch depth do not matter; the asinh keeps bright
    cores from dominating. Masked pixels (0 in the preprocessed images) and NaN are 0.

    Parameters
    ----------
    triplets : ndarray, shape (n, 3, h, w)
    clip : float
        Limit in σ before the asinh.

    Returns
    -------
    ndarray of float32, same shape
    """
    x = np.nan_to_num(np.asarray(triplets, dtype=np.float32), nan=0.0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"triplets must have shape (n, 3, h, w), got {x.shape}")
    flat = x.reshape(x.shape[0], 3, -1)
    median = np.median(flat, axis=2, keepdims=True)
    mad = np.median(np.abs(flat - median), axis=2, keepdims=True)
    sigma = 1.4826 * mad
    # A flat (masked or empty) stamp has no noise estimate: use its spread instead.
    fallback = flat.std(axis=2, keepdims=True)
    sigma = np.where(sigma > 0, sigma, np.where(fallback > 0, fallback, 1.0))
    scaled = np.clip((flat - median) / sigma, -clip, clip)
    return np.arcsinh(scaled / 3.0).astype(np.float32).reshape(x.shape)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, and ask cuDNN for deterministic convolutions.

    (Not ``torch.use_deterministic_algorithms``: it is process-wide and would change
    the differencing code's GPU kernels too.)
    """
    random.seed(seed)
    np.random.seed(seed)  # third-party code may draw from the global state
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def pick_device(preferred: str | None = None) -> torch.device:
    """``preferred`` if given, else CUDA when present, else the CPU."""
    if preferred:
        return torch.device(preferred)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising the NLL of sigmoid(logits / T) (Guo et al. 2017).

    Returns 1.0 when a single class is present (nothing to calibrate against).
    """
    z = np.asarray(logits, dtype=float).ravel()
    y = np.asarray(labels).ravel().astype(float)
    if y.min() == y.max():
        return 1.0

    def nll(log_t: float) -> float:
        s = z / np.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))

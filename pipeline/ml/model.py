"""The real/bogus network, the input normalisation, and calibration by temperature.

A compact VGG-like CNN in the spirit of ZTF's braai (Duev et al. 2019): two 3×3
convolutions per stage, three stages, and a small dense head over the last feature map
(which keeps where a feature lies: the candidate is at the centre), about 0.1–0.3 M
parameters depending on ``width``. It reads the 63×63 cutouts (science, reference,
difference, and the mask: which pixels were lost or repaired) as channels and returns one
logit; a temperature fitted on validation data turns logits into calibrated
probabilities.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "HEADS",
    "MASK_LEVEL",
    "STAMP",
    "ModelConfig",
    "RealBogusNet",
    "fit_temperature",
    "fold_batchnorm",
    "normalise_triplets",
    "pick_device",
    "seed_everything",
]


#: Heads of the network (``ModelConfig.head``).
HEADS = ("flatten", "pool")
#: Side of the stamps the network reads (the ``flatten`` head is sized for it).
STAMP = 63
#: Value of a masked pixel in the normalised mask stamp (unmasked: 0), on the scale of
#: the image stamps after their asinh (a 2 there is a ~10σ pixel).
MASK_LEVEL = 2.0


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the network.

    Attributes
    ----------
    width : int
        Channels of the first stage (doubled at each of the three stages). 8 scores
        2,370-2,560 triplets/s on 2 AVX2-only CPU cores; 16 is about 2.5× slower.
    dense : int
        Units of the hidden dense layer.
    dropout : float
        Dropout before the output, 0–0.9.
    head : str
        ``flatten``: the dense layer sees every position of the last feature map, so it
        knows what lies at the centre (the candidate) and what around it (neighbours,
        hosts, trails), as braai's does; ``pool``: global average pooling (where
        features sit is lost; fewer parameters).
    orient : bool
        Show fading candidates as brightening ones (``normalise_triplets(orient=True)``):
        what appeared in the science image and what vanished from the reference are one
        pattern to learn, and the (rarer) fading transients share the brightening ones'
        examples. Models saved before this setting existed load with it off.
    mask : bool
        Also read the mask stamp (``cutout_triplets(..., mask=)``) as a fourth channel:
        repaired cosmic rays and bad columns look like sky in the images, and were most
        of the bogus candidates scored real without it. Models saved before this
        setting existed load with it off (and read the first three stamps only).
    """

    width: int = 8
    dense: int = 64
    dropout: float = 0.3
    head: str = "flatten"
    orient: bool = True
    mask: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.width <= 256:
            raise ValueError(f"width must be 1-256, got {self.width}")
        if not 1 <= self.dense <= 4096:
            raise ValueError(f"dense must be 1-4096, got {self.dense}")
        if not 0.0 <= self.dropout < 0.9:
            raise ValueError(f"dropout must be in [0, 0.9), got {self.dropout}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")

    @property
    def channels(self) -> int:
        """Stamps per candidate the network reads: science, reference, difference (mask)."""
        return 4 if self.mask else 3

    def to_dict(self) -> dict[str, float]:
        """Plain-dict form (for logging and for saving with the weights)."""
        return asdict(self)


_LANES = 8  # float32 lanes of an AVX2 vector


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that trains in NCHW where channels_last is slow.

    Torch's CPU batch norm on a channels_last tensor vectorises along the channels, so
    a channel count that is not a multiple of the vector width (8 float32 lanes on
    AVX2) runs partly scalar and parallelises poorly. In training such a layer copies
    its input to NCHW, normalises it there and copies the result back: the same
    parameters, running statistics and state dict, the same result to float rounding.
    A training step (batch 64, channels_last, 2 AVX2 cores, best/median of 26, freed
    memory kept as ``train_model`` keeps it) took 46/58 ms against 82/92 for width 4
    (4, 8 and 16 channels) and 72/91 against 113/129 for width 6 with 2 threads; with one
    thread, 64/90 against 80/110 (width 4) and 113/152 against 119/159 (width 6). In
    eval mode, on a GPU, for an NCHW input or a multiple of 8 channels it is the parent
    (eval was slower copied: 871 against 627 ms a batch of 512 for width 6).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Batch-normalised ``x``, in ``x``'s memory format."""
        if (
            self.training
            and self.num_features % _LANES
            and x.device.type == "cpu"
            and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)
        ):
            out = super().forward(x.contiguous())
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


class RealBogusNet(nn.Module):
    """CNN on (n, 3 or 4, 63, 63) normalised stamps; returns (n,) logits of "real"."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        w = self.config.width

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1),
                BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.Conv2d(c_out, c_out, 3, padding=1),
                BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(
            stage(self.config.channels, w), stage(w, 2 * w), stage(2 * w, 4 * w)
        )
        if self.config.head == "flatten":
            side = STAMP // 8  # three 2× poolings
            reduce, inputs = nn.Identity(), 4 * w * side * side
        else:
            reduce, inputs = nn.AdaptiveAvgPool2d(1), 4 * w
        self.head = nn.Sequential(
            reduce,
            nn.Flatten(),
            nn.Linear(inputs, self.config.dense),
            nn.ReLU(inplace=True),
            nn.Dropout(self.config.dropout),
            nn.Linear(self.config.dense, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (n,)."""
        return self.head(self.features(x)).squeeze(1)


_NORMALISE_CHUNK = 1 << 18  # values per piece of normalise_triplets (a 1 MB float32 block)


def normalise_triplets(
    triplets: np.ndarray, clip: float = 1000.0, *, orient: bool = False
) -> np.ndarray:
    """Put every cutout on the scale of its own noise: (x − median) / robust σ, then asinh.

    Each of the three stamps of a candidate is scaled by its own noise (MAD), so a
    survey's flux units, sky level and epoch depth do not matter and a pixel's value is
    its significance; the asinh (linear within ±3σ, logarithmic beyond) keeps bright cores
    from dominating while still telling a 20σ peak from a 2000σ one. The median and MAD
    come from every other pixel in both directions (a quarter of the stamp: 4× faster,
    a few per cent noisier).

    Masked pixels (0 in the preprocessed images, as are pixels beyond the image edge) and
    NaN take no part in the median and MAD and are 0 in the result: a stamp half covered
    by a saturated star's mask keeps the noise scale of its unmasked half (counting the
    zeros shrank the MAD: pure noise read 2σ a third masked, 10σ just under half).

    A fourth (mask) stamp is not scaled: its masked pixels (and NaN, beyond the image)
    become :data:`MASK_LEVEL`, the others 0.

    Parameters
    ----------
    triplets : ndarray, shape (n, 3, h, w) or (n, 4, h, w)
        Science, reference and difference stamps, the candidate at the centre, and
        optionally the mask stamp.
    clip : float
        Limit in σ before the asinh.
    orient : bool
        Show every candidate as a brightening: where the difference stamp's centre is
        negative (a source that faded), swap the science and reference stamps and negate
        the difference, so one network sees new and vanished sources alike.

    Returns
    -------
    ndarray of float32, same shape
    """
    stamps = np.asarray(triplets)
    if stamps.ndim != 4 or stamps.shape[1] not in (3, 4):
        raise ValueError(f"stamps must have shape (n, 3, h, w) or (n, 4, h, w), got {stamps.shape}")
    out = np.empty(stamps.shape, dtype=np.float32)
    # A few candidates at a time, so the dozen passes below read and write the CPU's
    # cache, not memory: a batch of 256 took 55-72 ms in one go, 34-51 ms in ~1 MB pieces.
    step = max(1, _NORMALISE_CHUNK // max(int(np.prod(stamps.shape[1:], dtype=np.int64)), 1))
    for start in range(0, len(stamps), step):
        _normalise_into(stamps[start : start + step], out[start : start + step], clip, orient)
    return out


def _normalise_into(stamps: np.ndarray, out: np.ndarray, clip: float, orient: bool) -> None:
    """``normalise_triplets`` of a few candidates, written into ``out`` (float32, same shape)."""
    x = out[:, :3]  # the image stamps, scaled in place
    x[...] = stamps[:, :3]
    invalid = ~np.isfinite(x)
    invalid |= x == 0
    np.copyto(x, np.float32(0.0), where=invalid)
    sample = x[:, :, ::2, ::2].reshape(x.shape[0], 3, -1)
    kept = ~invalid[:, :, ::2, ::2].reshape(sample.shape)
    median = _median_last(sample, kept)
    sigma = 1.4826 * _median_last(np.abs(sample - median[..., None]), kept)
    flat = ~(sigma > 0)
    if flat.any():  # a flat or mostly masked stamp has no MAD: use its spread, else 1
        rows, keep = sample[flat], kept[flat]
        count = np.maximum(keep.sum(axis=1), 1)
        mean = (rows * keep).sum(axis=1) / count
        spread = np.sqrt((((rows - mean[:, None]) * keep) ** 2).sum(axis=1) / count)
        sigma[flat] = np.where(spread > 0, spread, 1.0)
    x -= median[..., None, None]
    x *= (1.0 / (3.0 * sigma))[..., None, None].astype(np.float32)
    np.copyto(x, np.float32(0.0), where=invalid)
    np.clip(x, -clip / 3.0, clip / 3.0, out=x)
    _arcsinh_inplace(x)
    if stamps.shape[1] == 4:  # NaN != 0: masked too
        np.multiply(stamps[:, 3] != 0, np.float32(MASK_LEVEL), out=out[:, 3])
    if orient:
        _orient(out)


def _arcsinh_inplace(x: np.ndarray) -> None:
    """In place: asinh of a float32 array (or view), as sign(x)·log(|x| + √(x² + 1)).

    NumPy's own ``arcsinh`` is vectorised only where its SIMD maths library is (AVX-512
    CPUs); on an AVX2-only CPU it took 70 ms for a batch of 256 triplets, more than the
    rest of the normalisation and than the network, where this takes 16 ms. The absolute
    error stays under 4e-7 over the clipped range (NumPy's float32 ``arcsinh``: 2e-7).
    Two temporaries of ``x``'s size: ``normalise_triplets`` hands it cache-sized pieces.
    """
    a = np.abs(x)
    s = np.multiply(a, a)
    s += 1.0
    np.sqrt(s, out=s)
    s += a
    np.log(s, out=s)
    np.copysign(s, x, out=x)


def fold_batchnorm(net: RealBogusNet) -> RealBogusNet:
    """An inference copy of ``net`` with each BatchNorm folded into the convolution before it.

    In eval mode a BatchNorm is a fixed affine map per channel, so it becomes part of the
    preceding convolution's weights and bias: the same logits to float rounding, and the
    BatchNorms' share of the network's CPU time (22% on 2 cores) gone. Each convolution
    and the ReLU after it then become one :class:`ConvReLU`, one oneDNN call on a CPU.
    ``net`` itself is left as it is; the copy is in eval mode, on ``net``'s device.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    def fold(stage: nn.Sequential) -> nn.Sequential:
        kept: list[nn.Module] = []
        for layer in stage:
            if isinstance(layer, nn.BatchNorm2d) and kept and isinstance(kept[-1], nn.Conv2d):
                kept[-1] = fuse_conv_bn_eval(kept[-1], layer)
            elif isinstance(layer, nn.ReLU) and kept and isinstance(kept[-1], nn.Conv2d):
                kept[-1] = ConvReLU(kept[-1])
            else:
                kept.append(layer)
        return nn.Sequential(*kept)

    folded = copy.deepcopy(net).eval()
    folded.features = nn.Sequential(*(fold(stage) for stage in folded.features))
    return folded


class ConvReLU(nn.Module):
    """A convolution followed by a ReLU, for inference.

    On a CPU, in float32 with gradients off, both run as one oneDNN convolution with the
    ReLU as its post-op (the operator torch's own compiler emits for this pattern): the
    ReLU's separate pass over the output is gone, 13-16% of each convolution's time on
    2 AVX2 cores, and the result is the same to the bit. Anywhere else (a GPU, autograd, a
    torch built without oneDNN) it is the two layers one after the other.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(conv(x))."""
        conv = self.conv
        fused = _conv_relu_op()
        if (
            fused is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_grad_enabled()
            and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple)
        ):
            geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
            return fused(x, conv.weight, conv.bias, *geometry, "relu", [None], "")
        return torch.relu(conv(x))


@functools.cache
def _conv_relu_op() -> Callable[..., torch.Tensor] | None:
    """The fused convolution + pointwise operator of oneDNN, or None where torch lacks it."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):
        return None


def _orient(x: np.ndarray) -> None:
    """In place: candidates whose difference centre is negative become positive ones."""
    h, w = x.shape[2:]
    core = x[:, 2, h // 2 - 2 : h // 2 + 3, w // 2 - 2 : w // 2 + 3].sum(axis=(1, 2))
    fading = np.flatnonzero(core < 0)
    if fading.size:
        science = x[fading, 0]  # a copy: fancy indexing
        x[fading, 0] = x[fading, 1]
        x[fading, 1] = science
        x[fading, 2] *= -1.0


def _median_last(a: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Median over the last axis of the ``valid`` entries (0 where there are none).

    By a full sort with the invalid entries pushed to the end: NumPy's vectorised sort
    of a thousand floats per row beats the selection that ``np.median`` runs (768 rows
    of 1024: 1.6 against 9 ms), which made the medians most of the normalisation's cost
    at inference.
    """
    ordered = np.where(valid, a, np.inf)
    ordered.sort(axis=-1)
    k = valid.sum(axis=-1)
    lo = np.maximum((k - 1) // 2, 0)[..., None]
    hi = np.minimum(k // 2, a.shape[-1] - 1)[..., None]
    mid = (np.take_along_axis(ordered, lo, -1) + np.take_along_axis(ordered, hi, -1))[..., 0]
    return np.where(k > 0, mid / a.dtype.type(2), a.dtype.type(0))


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


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads in this process, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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

    from scipy.optimize import minimize_scalar

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))

"""Training the real/bogus network: early stopping on validation, then calibration.

No tracking or tuning code here: ``on_epoch`` hands each epoch's metrics to whoever
watches (MLflow logging, an Optuna pruner), and the result carries everything needed
to save, evaluate and compare the model.
"""

from __future__ import annotations

import copy
import io
import math
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.ml.data import CandidateDataset
from pipeline.ml.heap import keep_freed_memory
from pipeline.ml.metrics import binary_nll, roc_auc
from pipeline.ml.model import (
    ModelConfig,
    RealBogusNet,
    fit_temperature,
    fold_batchnorm,
    normalise_triplets,
    pick_device,
    seed_everything,
    torch_threads,
)

__all__ = [
    "TrainConfig",
    "TrainedModel",
    "TrainingInputs",
    "load_model",
    "predict_logits",
    "train_model",
    "training_inputs",
]

EpochCallback = Callable[[int, Mapping[str, float]], None]
_SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes
    ----------
    epochs : int
        Most epochs; training stops earlier after ``patience`` epochs without a better
        one, and the best epoch's weights are kept (then calibrated with a temperature).
        An epoch is better when its validation ROC AUC beats the best one's by more than
        ``min_delta``, or comes within ``min_delta`` of it with a lower validation loss.
    patience : int
        Epochs without a better one before stopping. The default, 30, is the default
        ``epochs`` (raise it with ``epochs`` to keep training to the end): the cosine
        schedule's best epochs come once the learning rate has annealed,
        and a patience of 8 stopped one seed at epoch 14 (best 6) with 1.4% false
        positives at 1% missed where running all 30 epochs gave 0.7% (best 18). Lower it
        for the constant schedule or a quick look.
    min_delta : float
        Validation AUC changes this small are noise (a few hundred bogus candidates:
        0.9991-0.9997 from one epoch to the next while the loss kept falling); without
        it, an early lucky epoch stopped training before the learning rate annealed.
    batch_size, learning_rate, weight_decay : training hyper-parameters (AdamW).
    seed : int
        Seeds the initial weights, the batch order and the flips.
    augment : bool
        A random flip and quarter turn per candidate, all three stamps alike (the sky has
        no preferred orientation).
    schedule : str
        ``cosine``: the learning rate warms up linearly over the first epoch, then decays
        along a half cosine to zero at ``epochs``; ``constant``: no schedule.
    device : str, optional
        ``cpu``, ``cuda``...; default CUDA when present.
    model : ModelConfig
    """

    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 30
    min_delta: float = 5e-4
    seed: int = 0
    augment: bool = True
    schedule: str = "cosine"
    device: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.min_delta < 1:
            raise ValueError(f"min_delta must be in [0, 1), got {self.min_delta}")
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build from a flat dict (model keys ``width``, ``dense``, ``dropout`` included).

        Raises
        ------
        ValueError
            Naming any key that is not a setting.
        """
        if not isinstance(values, Mapping):
            raise ValueError(
                f"training settings must be a mapping of setting -> value, got {values!r}"
            )
        model_keys = set(ModelConfig.__dataclass_fields__)
        own_keys = set(cls.__dataclass_fields__) - {"model"}
        unknown = set(values) - model_keys - own_keys
        if unknown:
            raise ValueError(
                f"unknown training setting(s) {sorted(unknown)}; "
                f"known: {sorted(own_keys | model_keys)}"
            )
        model = ModelConfig(**{k: v for k, v in values.items() if k in model_keys})
        return cls(**{k: v for k, v in values.items() if k in own_keys}, model=model)

    def to_dict(self) -> dict[str, Any]:
        """Flat dict form (inverse of ``from_dict``)."""
        own = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "model"}
        return {**own, **self.model.to_dict()}


@dataclass
class TrainedModel:
    """A trained, calibrated network and how it got there.

    Attributes
    ----------
    net : RealBogusNet
        In eval mode, on the CPU.
    temperature : float
        Divides the logits before the sigmoid.
    config : TrainConfig
    history : list of dict
        Per epoch: ``epoch``, ``train_loss``, ``val_loss``, ``val_auc``, ``seconds``.
    best_epoch : int
    dataset_id : str
    """

    net: RealBogusNet
    temperature: float
    config: TrainConfig
    history: list[dict[str, float]]
    best_epoch: int
    dataset_id: str

    def predict_proba(self, triplets: np.ndarray) -> np.ndarray:
        """Calibrated probability that each candidate is real.

        ``triplets`` as :func:`pipeline.science.cutouts.cutout_triplets` cuts them, with the
        mask stamp when the model reads it (``config.model.mask``); a model without it
        ignores a mask stamp it is given.
        """
        logits = predict_logits(self.net, triplets)
        return _expit(logits / self.temperature)

    def save(self, path: str | Path) -> Path:
        """Write weights, settings and calibration to one file (``torch.save``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(
            {
                "state_dict": self.net.state_dict(),
                "temperature": self.temperature,
                "config": self.config.to_dict(),
                "history": self.history,
                "best_epoch": self.best_epoch,
                "dataset_id": self.dataset_id,
            },
            buffer,
        )
        tmp = path.with_name(f".{path.name}.part")
        tmp.write_bytes(buffer.getvalue())
        tmp.replace(path)
        return path


def load_model(path: str | Path) -> TrainedModel:
    """Read a model written by ``TrainedModel.save``."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    # Models saved before the head was a setting pooled globally; before orientation was
    # a setting, none was oriented; before the mask stamp, none read it.
    config = TrainConfig.from_dict(
        {"head": "pool", "orient": False, "mask": False, **state["config"]}
    )
    net = RealBogusNet(config.model)
    net.load_state_dict(state["state_dict"])
    net.eval()
    return TrainedModel(
        net=net,
        temperature=float(state["temperature"]),
        config=config,
        history=list(state["history"]),
        best_epoch=int(state["best_epoch"]),
        dataset_id=str(state["dataset_id"]),
    )


_CPU_SCORING = threading.Lock()  # predict_logits on a CPU: one call at a time


def predict_logits(
    net: RealBogusNet, triplets: np.ndarray, batch_size: int | None = None
) -> np.ndarray:
    """Raw logits for raw (un-normalised) triplets, in eval mode on the net's device.

    The network is a copy of ``net`` with its BatchNorms folded into the convolutions
    (``fold_batchnorm``), fed in ``channels_last`` layout, the fast one for CPU and GPU
    convolutions. The copy costs about 10 ms a call: score a night's candidates in one
    call, not one at a time.

    On a CPU the batches (64 triplets by default) are shared among as many worker threads
    as torch has threads, each normalising its batch and scoring it with one torch thread
    of its own; NumPy and torch release the GIL, so no worker waits on another. For the
    call torch is set to one thread (restored after; calls from several threads take
    turns), which other threads of the process using torch at the same time would see.
    On 2 cores this scored 1.6× as many triplets a second as one torch call on 2 threads
    with the next batch normalised alongside: those three threads on two cores fought,
    and OpenMP's spinning threads took the normaliser's core. On a GPU one thread
    normalises the next batch (256 by default) while the device scores this one.

    From the first call on, the process keeps memory it frees for reuse
    (``pipeline.ml.heap.keep_freed_memory``): scoring ran about a fifth faster.

    Parameters
    ----------
    net : RealBogusNet
        The trained network (left as it is).
    triplets : ndarray, shape (n, 3 or 4, 63, 63)
        Raw stamps, as ``cutout_triplets`` cuts them.
    batch_size : int, optional
        Triplets per batch; on a CPU at most an equal share per worker.

    Returns
    -------
    ndarray of float32, shape (n,)
    """
    triplets = _channels_for(net.config, triplets, "scored")
    keep_freed_memory()
    if len(triplets) == 0:
        return np.zeros(0, dtype=np.float32)
    device = next(net.parameters()).device
    folded = fold_batchnorm(net).to(memory_format=torch.channels_last)

    def prepared(start: int, size: int) -> np.ndarray:
        return normalise_triplets(triplets[start : start + size], orient=net.config.orient)

    def scored(x: np.ndarray) -> torch.Tensor:
        with torch.inference_mode():  # thread-local: entered in the thread that scores
            batch = torch.from_numpy(x).to(device).contiguous(memory_format=torch.channels_last)
            return folded(batch).float().cpu()

    if device.type == "cpu":
        with _CPU_SCORING:  # one call at a time sets and restores torch's threads
            workers = torch.get_num_threads()
            size = max(1, min(batch_size or 64, math.ceil(len(triplets) / workers)))
            starts = range(0, len(triplets), size)
            with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
                out = list(pool.map(lambda start: scored(prepared(start, size)), starts))
        return torch.cat(out).numpy()
    size = max(1, batch_size or 256)
    out = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepared, 0, size)
        for start in range(0, len(triplets), size):
            x = pending.result()
            if start + size < len(triplets):
                pending = pool.submit(prepared, start + size, size)
            out.append(scored(x))
    return torch.cat(out).numpy()


def _channels_for(model: ModelConfig, stamps: np.ndarray, what: str) -> np.ndarray:
    """The stamps the network reads (a view): the first three, or all four with the mask.

    Raises
    ------
    ValueError
        If the network reads the mask stamp and ``stamps`` has none.
    """
    have = stamps.shape[1] if np.ndim(stamps) == 4 else 0
    if have < model.channels:
        raise ValueError(
            f"the model reads {model.channels} stamps per candidate (science, reference, "
            f"difference and mask) but the candidates {what} have {have}: cut them with "
            "cutout_triplets(..., mask=pair.mask), or rebuild the dataset, or train with "
            "mask=false"
        )
    return stamps[:, : model.channels]


def _logits(net: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits for already normalised triplets."""
    device = next(net.parameters()).device
    net.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(x[start : start + batch_size]).to(device)
            out.append(net(batch.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


@dataclass(frozen=True)
class TrainingInputs:
    """A dataset's normalised training and validation stamps, as one kind of network reads them.

    Normalising is part of every training run (2.9-3.4 s per 6,400 candidates on one
    core, measured); a search trains many networks on the same dataset and makes these
    once per process (``training_inputs``), then hands them to each ``train_model``.

    Attributes
    ----------
    dataset_id, channels, orient
        What they were made from and for (``ModelConfig.channels`` and ``orient``).
    x_train, x_val : ndarray
        (n, channels, 63, 63) float32, from ``normalise_triplets``; not to be modified.
    """

    dataset_id: str
    channels: int
    orient: bool
    x_train: np.ndarray
    x_val: np.ndarray

    def suit(self, data: CandidateDataset, model: ModelConfig) -> bool:
        """Whether these are ``training_inputs(data, model)``."""
        return (self.dataset_id, self.channels, self.orient) == (
            data.dataset_id,
            model.channels,
            model.orient,
        )


def training_inputs(data: CandidateDataset, model: ModelConfig) -> TrainingInputs:
    """Normalise the train and validation stamps of ``data`` for networks like ``model``.

    Raises
    ------
    ValueError
        If the model reads the mask stamp and the dataset has none.
    """
    _channels_for(model, data.triplets, f"of dataset {data.dataset_id}")
    channels, orient = model.channels, model.orient
    train, val = data.mask("train"), data.mask("validation")
    return TrainingInputs(
        dataset_id=data.dataset_id,
        channels=channels,
        orient=orient,
        x_train=normalise_triplets(data.triplets[train, :channels], orient=orient),
        x_val=normalise_triplets(data.triplets[val, :channels], orient=orient),
    )


def train_model(
    data: CandidateDataset,
    config: TrainConfig | None = None,
    *,
    on_epoch: EpochCallback | None = None,
    initial: TrainedModel | None = None,
    inputs: TrainingInputs | None = None,
) -> TrainedModel:
    """Train on the ``train`` split, stop early on ``validation``, calibrate on it.

    From the first call on, the process keeps memory it frees for reuse
    (``pipeline.ml.heap.keep_freed_memory``): each step's buffers are not mapped and
    zeroed afresh, which took a fifth to a third of a step on 2 CPU cores.

    Parameters
    ----------
    data : CandidateDataset
        Must hold both classes in its train and validation splits.
    config : TrainConfig
    on_epoch : callable, optional
        ``on_epoch(epoch, metrics)`` after each epoch (may raise to stop, e.g. an
        Optuna pruner).
    initial : TrainedModel, optional
        Fine-tune: start from this model's weights instead of a fresh initialisation.
        Its architecture (``width``, ``dense``) must match ``config.model``.
    inputs : TrainingInputs, optional
        ``training_inputs(data, config.model)`` made earlier (a search reuses them
        across its trials); default: normalised here.

    Raises
    ------
    ValueError
        If a split is empty or holds a single class, ``initial`` has another
        architecture, the model reads the mask stamp and the dataset has none, or
        ``inputs`` were made from another dataset or for another network input.
    """
    config = config or TrainConfig()
    keep_freed_memory()  # a step's buffers are reused, not mapped afresh (heap.py)
    # the splits' labels only: a subset() would copy every stamp of the split as well
    labels_train, y_val = data.label[data.mask("train")], data.label[data.mask("validation")]
    for name, labels in (("train", labels_train), ("validation", y_val)):
        if len(labels) == 0 or labels.min() == labels.max():
            raise ValueError(
                f"dataset {data.dataset_id}: the {name} split needs real and bogus "
                f"candidates (it has {int(labels.sum())} real of {len(labels)})"
            )
    seed_everything(config.seed)
    device = pick_device(config.device)
    net = RealBogusNet(config.model)
    if initial is not None:
        ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in initial.net.state_dict().items()}
        if ours != theirs:
            raise ValueError(
                "cannot fine-tune: the starting model has architecture "
                f"{initial.config.model.to_dict()}, the settings ask for "
                f"{config.model.to_dict()}; train from scratch or use the same shape"
            )
        net.load_state_dict(initial.net.state_dict())
    net = net.to(device).to(memory_format=torch.channels_last)
    if inputs is None:
        inputs = training_inputs(data, config.model)  # once, not per epoch
    if not inputs.suit(data, config.model):
        raise ValueError(
            f"the training inputs were made from dataset {inputs.dataset_id} for "
            f"{inputs.channels} stamps (orient={inputs.orient}), but this run trains on "
            f"{data.dataset_id} with {config.model.channels} stamps "
            f"(orient={config.model.orient}): make them with training_inputs(data, config.model)"
        )
    x_train, x_val = torch.from_numpy(inputs.x_train), inputs.x_val
    y_train = torch.from_numpy(labels_train.astype(np.float32))
    positives = float(y_train.sum())
    # Real candidates are the minority: weight them so both classes count equally.
    pos_weight = torch.tensor((len(y_train) - positives) / positives, device=device)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimiser = torch.optim.AdamW(
        net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    steps = -(-len(x_train) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimiser, _schedule(config.schedule, steps, steps * config.epochs)
    )

    history: list[dict[str, float]] = []
    best = ((-np.inf, np.inf), 0, copy.deepcopy(net.state_dict()))
    for epoch in range(1, config.epochs + 1):
        began = time.perf_counter()
        net.train()
        total = 0.0
        order = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            index = order[start : start + config.batch_size]
            xb = x_train[index]
            if config.augment:
                xb = _augment(xb, generator)
            xb = xb.to(device).contiguous(memory_format=torch.channels_last)
            yb = y_train[index].to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            optimiser.step()
            scheduler.step()
            total += float(loss.detach()) * len(index)
        logits = _logits(net, x_val)
        val_loss = binary_nll(_expit(logits), y_val)
        val_auc = roc_auc(logits, y_val)
        metrics = {
            "train_loss": total / len(order),
            "val_loss": val_loss,
            "val_auc": val_auc,
            "seconds": time.perf_counter() - began,
        }
        history.append({"epoch": epoch, **metrics})
        # the epoch that separates the validation images' classes best is kept (its
        # probabilities are calibrated afterwards): the validation loss alone also
        # charges overconfidence, which temperature scaling removes, and on a few images
        # it kept the first, worst-separating epoch while the ranking kept improving;
        # AUCs within min_delta of each other go to the lower loss
        if _better((val_auc, val_loss), best[0], config.min_delta):
            best = ((val_auc, val_loss), epoch, copy.deepcopy(net.state_dict()))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if epoch - best[1] >= config.patience:
            break

    net.load_state_dict(best[2])
    net = net.to("cpu").to(memory_format=torch.contiguous_format).eval()
    temperature = fit_temperature(_logits(net, x_val), y_val)
    return TrainedModel(
        net=net,
        temperature=temperature,
        config=config,
        history=history,
        best_epoch=best[1],
        dataset_id=data.dataset_id,
    )


def _better(new: tuple[float, float], best: tuple[float, float], min_delta: float) -> bool:
    """Whether (AUC, loss) ``new`` beats ``best``.

    It does with an AUC higher by more than ``min_delta``, or with one within
    ``min_delta`` of it and a lower loss.
    """
    (auc, loss), (best_auc, best_loss) = new, best
    if auc > best_auc + min_delta:
        return True
    return auc >= best_auc - min_delta and loss < best_loss


def _schedule(name: str, warmup: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor per optimiser step."""
    if name == "constant":
        return lambda step: 1.0

    def cosine(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return cosine


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random element of the square's symmetry group per candidate (stamps alike)."""
    which = torch.randint(0, 8, (len(x),), generator=generator)
    out = torch.empty_like(x)
    for code in range(8):
        index = torch.nonzero(which == code).squeeze(1)
        if len(index) == 0:
            continue
        part = x[index]
        if code % 4:
            part = torch.rot90(part, code % 4, dims=(2, 3))
        if code >= 4:
            part = torch.flip(part, dims=(3,))
        out[index] = part
    return out


def _expit(x: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + e^-x), without overflow for large |x|."""
    return np.exp(-np.logaddexp(0.0, -x))

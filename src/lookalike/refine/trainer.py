"""The refinement loop: trunk blocks + (embedding layer) + dropout + a linear classifier over the attributes.

AdamW (or the tutorial's SGD with momentum), weight decay, a per-epoch learning-rate schedule, seeded, on a CUDA GPU with mixed
precision when there is one, else on the CPU. The inputs are either images (full mode) or cached activations
of the frozen blocks (cached mode); the loop is the same.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ..backbones.heads import Head
from ..config import RefineConfig
from ..errors import LookalikeError
from ..progress import tqdm
from .augment import ViewMaker
from .cached import ActivationCache


class Views(Protocol):
    """Where a minibatch of inputs comes from: `train` gives `n` different random views per item, `eval` the centre view."""

    def train(self, items: Sequence[int], epoch: int, rng: np.random.Generator, n: int = 1) -> list[torch.Tensor]: ...

    def eval(self, items: Sequence[int]) -> torch.Tensor: ...


class Objective(Protocol):
    """Turns the descriptors of `views` views per item into (loss, attribute logits of the first view); see objectives.py."""

    views: int

    def __call__(self, head: Head, descriptors: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def centre_view_batches(views: Views, items: Sequence[int], size: int = 64) -> Iterator[tuple[list[int], torch.Tensor]]:
    """`items`' centre views, `size` at a time, each batch with its items."""
    for start in range(0, len(items), size):
        batch = [int(i) for i in items[start : start + size]]
        yield batch, views.eval(batch)


class CachedViews:
    """Activations of the frozen blocks read from the cache: view 0 (centre) or one of views 1..n at random."""

    def __init__(self, cache: ActivationCache, digests: Sequence[str], n_views: int):
        self.cache, self.digests, self.n_views = cache, list(digests), n_views

    def train(self, items, epoch, rng, n=1):
        first = rng.integers(0, self.n_views + 1, size=len(items))
        # a second view differs from the first whenever the cache holds more than one
        picks = [first] + [(first + rng.integers(1, self.n_views + 1, size=len(items))) % (self.n_views + 1) if self.n_views else first for _ in range(n - 1)]
        return [torch.from_numpy(self.cache.get_many([(self.digests[i], int(v)) for i, v in zip(items, p)])) for p in picks]

    def eval(self, items):
        return torch.from_numpy(self.cache.get_many([(self.digests[i], 0) for i in items]))


class SubsetViews:
    """Some of another Views' items, renumbered 0 .. len(items) - 1 (to train on part of a split)."""

    def __init__(self, views: Views, items: Sequence[int]):
        self.views, self.items = views, [int(i) for i in items]

    def train(self, items, epoch, rng, n=1):
        return self.views.train([self.items[i] for i in items], epoch, rng, n)

    def eval(self, items):
        return self.views.eval([self.items[i] for i in items])


class OnlineViews:
    """Images decoded and augmented afresh for every epoch (full mode), a few threads at a time."""

    def __init__(self, maker: ViewMaker, paths: Sequence[str], digests: Sequence[str], workers: int | None = None):
        self.maker, self.paths, self.digests = maker, list(paths), list(digests)
        self.pool = ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))

    def _load(self, items, views) -> torch.Tensor:
        def one(args):
            i, v = args
            return self.maker.views(self.paths[i], self.digests[i], [v])[0]

        return torch.from_numpy(np.stack(list(self.pool.map(one, zip(items, views)))))

    def train(self, items, epoch, rng, n=1):
        # a fresh view number per epoch and image keeps the augmentation repeatable without a shared RNG
        return [self._load(items, [1 + epoch * 1_000_003 + int(rng.integers(1_000_000)) for _ in items]) for _ in range(n)]

    def eval(self, items):
        return self._load(items, [0] * len(items))

    def close(self) -> None:
        self.pool.shutdown()


class RefineNet(nn.Module):
    """frozen part (no gradient) -> trained part -> descriptor -> head (standardise, dropout, projection)."""

    def __init__(self, frozen: nn.Module, trained: nn.Module, head: Head):
        super().__init__()
        self.frozen, self.trained, self.head = frozen, trained, head

    def train(self, mode: bool = True) -> "RefineNet":
        super().train(mode)
        self.frozen.eval()
        return self

    def descriptor(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.trained(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the attributes."""
        return self.head.logits(self.descriptor(x))


def learning_rate(schedule: Sequence[tuple[int, float]], epoch: int) -> float:
    """The rate for 0-based `epoch` from [(n_epochs, rate), ...]; the last rate holds after the list ends."""
    if not schedule:
        raise LookalikeError("refine.lr_schedule is empty; give pairs [epochs, rate], e.g. [[20, 0.01], [20, 0.001], [5, 0.0001]]")
    seen = 0
    for n, rate in schedule:
        seen += n
        if epoch < seen:
            return rate
    return schedule[-1][1]


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe_device(device: torch.device, mixed: bool) -> str:
    if device.type == "cuda":
        precision = f"mixed precision ({_amp_dtype(device)})".replace("torch.", "") if mixed else "float32"
        return f"GPU {torch.cuda.get_device_name(device)} ({precision})"
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'' if threads == 1 else 's'}, float32; no CUDA GPU found)"


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def epoch_order(labels: np.ndarray, balance: bool, cap: int, rng: np.random.Generator) -> np.ndarray:
    """This epoch's training items: shuffled; smaller attributes duplicated up to the largest when balancing; at most `cap`."""
    if balance:
        classes, counts = np.unique(labels, return_counts=True)
        target = counts.max()
        parts = []
        for c in classes:
            members = np.flatnonzero(labels == c)
            reps = [rng.permutation(members) for _ in range(target // len(members))]
            reps.append(rng.choice(members, size=target % len(members), replace=False))
            parts.append(np.concatenate(reps))
        order = np.concatenate(parts)
    else:
        order = np.arange(len(labels))
    order = rng.permutation(order)
    return order[:cap] if cap else order


class Refiner:
    """Fits a RefineNet to attribute labels; follows the scikit-learn estimator contract.

    Learned attributes: `net_` (the trained network), `classes_`, `history_` (one dict per epoch with the
    learning rate, training loss and the classification error of every monitored part), `device_`.
    With `standardize`, the head's shift and scale are first set from the training images' descriptors.
    """

    def __init__(
        self, config: RefineConfig, objective: Objective, seed: int = 0, standardize: bool = True, progress: bool = True, log: Callable[[str], None] = print
    ):
        self.config = config
        self.objective = objective
        self.seed = seed
        self.standardize = standardize
        self.progress = progress
        self.log = log

    def fit(
        self,
        net: RefineNet,
        train: Views,
        labels: Sequence[str],
        monitor: dict[str, tuple[Views, Sequence[str]]] | None = None,
    ) -> "Refiner":
        """Train `net` on `train` (one item per label); `monitor` parts are only measured, never trained on or chosen by."""
        cfg = self.config
        torch.manual_seed(self.seed)
        net.head.reset_parameters()  # its first weights come from this seed, not from whatever ran before
        rng = np.random.default_rng(self.seed)
        self.classes_ = list(net.head.classes)
        index = {c: i for i, c in enumerate(self.classes_)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise LookalikeError(f"training labels {unknown} are not among the classifier's attributes {self.classes_}")
        y = np.array([index[c] for c in labels])
        self.device_ = pick_device()
        mixed = cfg.mixed_precision and self.device_.type == "cuda"
        self.log(f"refining on {describe_device(self.device_, mixed)}")
        net.to(self.device_)
        for p in net.frozen.parameters():
            p.requires_grad_(False)
        amp = torch.autocast("cuda", dtype=_amp_dtype(self.device_)) if mixed else nullcontext()
        if self.standardize:
            self._standardize(net, train, len(y), amp)
        groups = [{"params": list(net.head.parameters()), "lr_scale": cfg.new_layer_lr_multiplier}]
        pretrained = list(net.trained.parameters())
        if pretrained:
            groups.append({"params": pretrained, "lr_scale": 1.0})
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.AdamW(groups, lr=0.0, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=mixed and _amp_dtype(self.device_) == torch.float16)
        monitor = {name: (views, np.array([index.get(c, -1) for c in lab])) for name, (views, lab) in (monitor or {}).items()}
        self.history_: list[dict] = []
        for epoch in range(cfg.epochs):
            start = time.perf_counter()
            lr = learning_rate(cfg.lr_schedule, epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr * g["lr_scale"]
            net.train()
            order = epoch_order(y, cfg.balance, cfg.max_images_per_epoch, rng)
            total_loss, wrong, seen = 0.0, 0, 0
            batches = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
            if len(batches) > 1 and len(batches[-1]) == 1:
                batches[-2] = np.concatenate(batches[-2:])
                batches.pop()
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", leave=False, disable=not self.progress)
            for items in bar:
                xs = [x.to(self.device_, non_blocking=True) for x in train.train(items, epoch, rng, self.objective.views)]
                target = torch.from_numpy(y[items]).to(self.device_)
                with amp:
                    loss, logits = self.objective(net.head, [net.descriptor(x) for x in xs], target)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                total_loss += float(loss.detach()) * len(items)
                wrong += int((logits.argmax(1) != target).sum())
                seen += len(items)
            entry = {"epoch": epoch + 1, "lr": lr, "train_loss": total_loss / seen, "train_error": wrong / seen}
            for name, (views, target) in monitor.items():
                entry[f"{name}_error"] = self._error(net, views, target, amp)
            entry["seconds"] = round(time.perf_counter() - start, 2)
            self.history_.append(entry)
            self.log(
                f"epoch {epoch + 1}/{cfg.epochs}: lr {lr:g}, loss {entry['train_loss']:.3f}, train error {entry['train_error']:.1%}"
                + "".join(f", {name} error {entry[f'{name}_error']:.1%}" for name in monitor)
                + f" ({entry['seconds']:.0f}s)"
            )
        net.eval()
        self.net_ = net.cpu()
        return self

    def _standardize(self, net: RefineNet, views: Views, n: int, amp) -> None:
        """Set the head's shift and scale from the training images' centre views, as the pretrained blocks see them."""
        net.eval()
        with torch.inference_mode(), amp:
            descriptors = [net.descriptor(batch.to(self.device_)).float() for _, batch in centre_view_batches(views, range(n))]
        net.head.standardize(torch.cat(descriptors))

    def _error(self, net: RefineNet, views: Views, target: np.ndarray, amp) -> float:
        """Classification error on centre views, in eval mode (no dropout, running batch-norm statistics)."""
        if len(target) == 0:
            return float("nan")
        net.eval()
        wrong = 0
        with torch.inference_mode(), amp:
            for items, batch in centre_view_batches(views, range(len(target))):
                pred = net(batch.to(self.device_)).argmax(1).cpu().numpy()
                wrong += int((pred != target[items]).sum())
        return wrong / len(target)


"""Neural Cleanse (Wang et al., "Neural Cleanse: Identifying and Mitigating Backdoor Attacks
in Neural Networks", IEEE S&P 2019): is a model backdoored, and by what trigger?

Threat model: the defender holds the model and a few clean labelled images, not the poisoned
training set. For every class ``t`` the smallest trigger that sends clean images to ``t`` is
reverse-engineered: a mask ``m`` (H x W, in [0, 1]) and a pattern ``p`` (C x H x W, in
[0, 1]) that minimise ``CE(f((1 - m) * x + m * p), t) + cost * |m|_1``. A backdoor target
needs a much smaller mask than the other classes (its trigger is a shortcut), so the L1
norms of the masks are compared with the median absolute deviation (MAD): a class whose
norm lies below the median with an anomaly index ``|l1 - median| / (1.4826 * MAD)`` above 2
(the paper's threshold) is flagged.

redblue adds a second rule, because the MAD test has a ceiling: a class with a trigger of
size 0 reaches the index ``median / (1.4826 * MAD)`` and no more. When the clean classes'
trigger sizes are spread widely (on MNIST the clean classes need 35 to 100 pixels), that
ceiling was 1.79-2.30 on redblue's 5-epoch poisoned models and the paper's rule could mostly
not flag their target, however small its trigger: the default backdoor's target needs 3
pixels against a median of 52.8 and reaches 1.69. So a class whose mask norm is under
``size_ratio`` (0.25) of the median norm is also flagged. The measured margins are in
``docs/backdoor.md``.

Restoring a flagged class's trigger: with ``smoothness`` > 0 the regulariser is
``|m|_1 + smoothness * TV(m)``, the mask's total variation added as TABOR does (Guo et al.,
"TABOR: A Highly Accurate Approach to Inspecting and Restoring Trojan Backdoors in AI
Systems", 2019), so a compact trigger is preferred to scattered pixels. redblue's audit judges
every class with the paper's objective (``smoothness=0``) and then restores only the flagged
classes' triggers this way, for the repair: on a weakly planted backdoor (1% poison) the
paper's reversed trigger mixed a few pixels at the patch with one pixel of a natural 7 and
faint strokes, and unlearning it left an ASR of 4.27%; the restored, compact trigger took it
to 0.2%. With the TV term for *every* class the clean classes' norms bunch up and the MAD test
flagged clean models' easiest classes more often (docs/backdoor.md), so the norms compared
stay the paper's.

All classes are optimised at once (each from ``restarts`` starts), as one batch of
``classes x restarts x batch_size`` stamped images per step on the model's device, with the paper's adaptive cost: raised by 1.5 after
``patience`` epochs whose attack success rate reaches ``target_asr``, lowered by 1.5**1.5
after ``patience`` epochs that miss it. The mask and pattern at the end of an epoch whose
attack success rate reached ``target_asr`` are a candidate; the trigger kept for a class is its
smallest candidate that also sends at least ``target_asr`` of *all* the given images of the
other classes to it (the success rate recorded is that check's). A batch of 16 images that all
flip is luck, not a trigger: kept from such a batch, as the first version did, the triggers of
redblue's MNIST models flipped 96-99% of the images. The run stops early when no class's kept
trigger has shrunk by 1% for ``early_stop`` epochs.

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x, y = torch.rand(12, 1, 4, 4), torch.arange(12) % 3
    >>> result = neural_cleanse(model, x, y, epochs=2, steps_per_epoch=2, batch_size=4)
    >>> len(result.l1), result.masks.shape, result.patterns.shape
    (3, torch.Size([3, 4, 4]), torch.Size([3, 1, 4, 4]))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from redblue.errors import ConfigError
from redblue.train import channels_last, prepare_model
from redblue.validate import check_float, check_int

MAD_CONSISTENCY = 1.4826
"""Makes the MAD a consistent estimator of the standard deviation (normal data)."""
ANOMALY_THRESHOLD = 2.0
"""The paper's threshold: an anomaly index above 2 flags a class (95% confidence)."""
SIZE_RATIO = 0.25
"""redblue's second rule: a mask norm under this share of the median norm flags a class."""
ALGORITHM = "neural-cleanse/3"
"""Part of every cache key of a Neural Cleanse result: a revision of the optimisation that
changes its results makes the results cached by an earlier one miss (2: a smaller mask is kept
only after a check on all the images; 3: the run uses a channels_last copy of the model, whose
floats differ in the last bits)."""
MIN_NORMS = 3
"""Neither rule flags anything with fewer finite mask norms than this: a median of two means little."""


@dataclass
class CleanseResult:
    """Reversed triggers of every class, their mask norms and which classes are flagged."""

    masks: torch.Tensor  # (K, H, W) in [0, 1]: the smallest mask found per class
    patterns: torch.Tensor  # (K, C, H, W) in [0, 1]
    l1: list[float]  # |mask|_1 per class (inf where no candidate passed the check on all the images)
    attack_success_rate: list[float]  # of each class's best trigger, on all the given images of other classes
    anomaly_index: list[float]
    flagged: list[int]  # see flag_classes
    threshold: float = ANOMALY_THRESHOLD
    size_ratio: float = SIZE_RATIO
    epochs: int = 0
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)


def statistical_median(values: torch.Tensor) -> torch.Tensor:
    """The median as statistics defines it (the mean of the two middle values of an even
    count, as numpy's); ``torch.median`` returns the lower one."""
    return torch.quantile(values, 0.5)


def finite_norms(l1: torch.Tensor) -> torch.Tensor:
    """The finite mask norms (a class with no trigger has norm inf), in float64."""
    return l1[torch.isfinite(l1)].double()


def _median_and_scale(l1: torch.Tensor) -> tuple[float, float] | None:
    """The median of the finite norms and ``1.4826 * MAD`` (None when no norm is finite)."""
    finite = finite_norms(l1)
    if finite.numel() == 0:
        return None
    median = statistical_median(finite)
    return float(median), float(MAD_CONSISTENCY * statistical_median((finite - median).abs()))


def anomaly_indices(l1: torch.Tensor) -> torch.Tensor:
    """``|l1 - median| / (1.4826 * MAD)`` per class (0 where the MAD is 0).

    Example:
        >>> [round(v, 2) for v in anomaly_indices(torch.tensor([10.0, 11.0, 9.0, 10.5, 2.0])).tolist()]
        [0.0, 0.67, 0.67, 0.34, 5.4]
    """
    stats = _median_and_scale(l1)
    if stats is None or stats[1] == 0.0:
        return torch.zeros_like(l1)
    median, scale = stats
    return torch.where(torch.isfinite(l1), ((l1.double() - median).abs() / scale).to(l1.dtype), torch.zeros_like(l1))


def max_anomaly_index(l1: torch.Tensor) -> float | None:
    """The ceiling of the MAD test: the index a class would reach with a trigger of size 0,
    ``median / (1.4826 * MAD)`` (None when the MAD is 0 or no norm is finite). At or below the
    threshold, the paper's rule cannot flag any class.

    Example:
        >>> round(max_anomaly_index(torch.tensor([30.0, 40.0, 50.0, 60.0, 70.0, 3.0])), 2)
        2.02
    """
    stats = _median_and_scale(l1)
    return None if stats is None or stats[1] == 0.0 else stats[0] / stats[1]


def size_ratios(l1: torch.Tensor) -> torch.Tensor:
    """Each class's mask norm over the median norm of the finite ones (inf stays inf; NaN
    when that median is 0, where no ratio means anything).

    Example:
        >>> size_ratios(torch.tensor([10.0, 20.0, 2.0], dtype=torch.float64)).tolist()
        [1.0, 2.0, 0.2]
    """
    stats = _median_and_scale(l1)
    if stats is None or stats[0] == 0.0:
        return torch.where(torch.isfinite(l1), torch.full_like(l1, float("nan")), l1)
    return l1 / stats[0]


@dataclass(frozen=True)
class Assessment:
    """Both flagging rules applied to a set of mask norms, each statistic computed once."""

    anomaly_index: torch.Tensor  # per class, see anomaly_indices
    size_ratio: torch.Tensor  # per class, see size_ratios
    flagged_by: list[list[str]]  # per class, see flag_reasons
    max_index: float | None  # see max_anomaly_index

    @property
    def flagged(self) -> list[int]:
        return [k for k, why in enumerate(self.flagged_by) if why]


def assess(l1: torch.Tensor, threshold: float = ANOMALY_THRESHOLD, size_ratio: float = SIZE_RATIO) -> Assessment:
    """The anomaly indices, size ratios, MAD ceiling and flagging reasons of the norms ``l1``."""
    index, ratio = anomaly_indices(l1), size_ratios(l1)
    reasons: list[list[str]] = [[] for _ in range(l1.numel())]
    if int(torch.isfinite(l1).sum()) >= MIN_NORMS:
        for k in range(l1.numel()):
            if bool(ratio[k] < 1) and float(index[k]) > threshold:
                reasons[k].append("anomaly-index")
            if bool(ratio[k] < size_ratio):
                reasons[k].append("size-ratio")
    return Assessment(index, ratio, reasons, max_anomaly_index(l1))


def flag_reasons(l1: torch.Tensor, threshold: float = ANOMALY_THRESHOLD, size_ratio: float = SIZE_RATIO) -> list[list[str]]:
    """Why each class is flagged: ``"anomaly-index"`` (below the median norm, index above
    ``threshold``: the paper's rule) and/or ``"size-ratio"`` (norm under ``size_ratio`` of the
    median: redblue's rule; 0 turns it off). An empty list: not flagged. With fewer than
    ``MIN_NORMS`` finite norms nothing is flagged.

    Example:
        >>> flag_reasons(torch.tensor([30.0, 40.0, 50.0, 60.0, 70.0, 3.0]))
        [[], [], [], [], [], ['size-ratio']]
    """
    return assess(l1, threshold, size_ratio).flagged_by


def flag_classes(l1: torch.Tensor, threshold: float = ANOMALY_THRESHOLD, size_ratio: float = SIZE_RATIO) -> list[int]:
    """Classes flagged by either rule of :func:`flag_reasons`."""
    return assess(l1, threshold, size_ratio).flagged


def total_variation(masks: torch.Tensor) -> torch.Tensor:
    """The anisotropic total variation of each mask (..., H, W): the sum of the absolute
    differences between neighbouring pixels, down and across. Inside the image an isolated pixel of 1 costs 4,
    a 2 x 2 block 8 (2 per unit of mask), a 4 x 4 block 16 (1 per unit).

    Example:
        >>> m = torch.zeros(2, 4, 4); m[0, 1, 1] = 1; m[1, 1:3, 1:3] = 1
        >>> total_variation(m).tolist()
        [4.0, 8.0]
    """
    down = (masks[..., 1:, :] - masks[..., :-1, :]).abs().flatten(-2).sum(-1)
    across = (masks[..., :, 1:] - masks[..., :, :-1]).abs().flatten(-2).sum(-1)
    return down + across


def regulariser(masks: torch.Tensor, smoothness: float) -> torch.Tensor:
    """What the adaptive cost multiplies, one value per mask (K, H, W): ``|m|_1``, plus
    ``smoothness * TV(m)`` when ``smoothness`` > 0.

    Example:
        >>> m = torch.zeros(2, 3, 3); m[0, 1, 1] = 1; m[1] = 0.5
        >>> regulariser(m, 0.0).tolist(), regulariser(m, 1.0).tolist()
        ([1.0, 4.5], [5.0, 4.5])
    """
    l1 = masks.flatten(1).sum(1)
    return l1 + smoothness * total_variation(masks) if smoothness else l1


def judging_copy(model: nn.Module, probe: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` for the optimisation: eval mode, weights frozen, in channels_last
    memory format. The caller's model is not touched (its mode, ``requires_grad`` and layout
    stay as they were). On this project's 2-core CPU a step of redblue's CNN took 24-26 ms on
    such a copy against 35-54 ms on the model as loaded, whose first convolution's output (one
    input channel) stays NCHW, where max-pooling is several times slower. A model that fails
    on ``probe`` in that layout (a user's ``.view`` after a convolution) keeps the default
    layout (:func:`redblue.train.prepare_model`)."""
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return prepare_model(net, None, probe)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """``(1 - mask) * x + mask * pattern``: images (N, C, H, W), mask (H, W), pattern (C, H, W)."""
    return (1 - mask) * x + mask * pattern


def hits(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, target: int,
         index: torch.Tensor | None = None, chunk: int = 1024, max_misses: int | None = None) -> torch.Tensor:  # fmt: skip
    """Whether the trigger ``(mask, pattern)`` sends each image of ``x`` (or of ``x[index]``,
    in that order, gathered a chunk at a time) to ``target`` (``model`` in eval mode; no
    gradient). With ``max_misses``, the images after the chunk whose misses pass it are not
    looked at: the result is that much shorter."""
    n = int(x.shape[0]) if index is None else int(index.numel())
    parts, misses = [], 0
    with torch.no_grad():
        for i in range(0, n, chunk):
            part = x[i : i + chunk] if index is None else x[index[i : i + chunk]]
            parts.append(model(channels_last(stamp(part, mask, pattern))).argmax(1) == target)
            misses += int((~parts[-1]).sum())
            if max_misses is not None and misses > max_misses:
                break
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=x.device)


def success_rate(model: nn.Module, x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor, target: int,
                 index: torch.Tensor | None = None, chunk: int = 1024) -> float:  # fmt: skip
    """The share of the images ``x`` (or of ``x[index]``) that the trigger ``(mask, pattern)``
    sends to ``target`` (see :func:`hits`)."""
    n = int(x.shape[0]) if index is None else int(index.numel())
    return int(hits(model, x, mask, pattern, target, index, chunk).sum()) / max(n, 1)


def allowed_misses(n: int, target_asr: float) -> int:
    """The most of ``n`` images a trigger may miss with its success rate ``(n - misses) / n``
    still at least ``target_asr`` (the same float comparison as the check's).

    Example:
        >>> allowed_misses(900, 0.99), allowed_misses(100, 0.99), allowed_misses(5, 1.0)
        (9, 1, 0)
    """
    if n == 0:
        return 0
    misses = min(n, int(n * (1 - target_asr)) + 1)
    while misses > 0 and (n - misses) / n < target_asr:
        misses -= 1
    return misses


class _Triggers:
    """Each class's candidate triggers and its checked best.

    A candidate is the mask and pattern at the end of an epoch whose attack success rate
    reached ``target_asr``. The trigger kept for a class is its smallest candidate that also
    sends at least ``target_asr`` of *all* its images (those of the other classes) to it. The
    check costs a forward pass over them, so it runs every ``SETTLE_EVERY`` epochs, before the
    run stops and at the end, from the smallest candidate up: of the candidates offered, the
    same one is kept as if each were checked as it came, for a fraction of the passes (a class
    holds at most ``SETTLE_EVERY`` candidates per start at a time). A check looks first at the
    images the class's last check found unmoved and gives up once more images stay unmoved than
    ``target_asr`` allows: a failing candidate usually fails on them, in the first chunk, and
    the verdict and a passing candidate's rate are those of the full check.
    """

    SETTLE_EVERY = 3
    CHUNK = 128  # images per forward pass of a check (on a CPU, faster per image than 1,024)

    def __init__(self, model: nn.Module, images: torch.Tensor, pools: list[torch.Tensor], target_asr: float) -> None:
        k, (_, c, h, w) = len(pools), images.shape
        self.model, self.images, self.pools, self.target_asr = model, images, pools, target_asr
        self.l1 = torch.full((k,), float("inf"))
        self.asr = torch.zeros(k)
        self.mask = torch.zeros((k, h, w), device=images.device)
        self.pattern = torch.zeros((k, c, h, w), device=images.device)
        self.candidates: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(k)]
        self.order = [p.to(images.device) for p in pools]  # per class, its pool, the last check's misses first

    def offer(self, t: int, l1: float, mask: torch.Tensor, pattern: torch.Tensor) -> None:
        """A candidate for class ``t`` (kept only if smaller than its checked trigger)."""
        if l1 < float(self.l1[t]):
            self.candidates[t].append((l1, mask.clone(), pattern.clone()))

    def settle(self, t: int) -> None:
        """Check class ``t``'s candidates, smallest first, until one reaches ``target_asr``."""
        n = int(self.pools[t].numel())
        allowed = allowed_misses(n, self.target_asr)
        for l1, mask, pattern in sorted(self.candidates[t], key=lambda item: item[0]):
            order = self.order[t]
            moved = hits(self.model, self.images, mask, pattern, t, order, self.CHUNK, max_misses=allowed)
            seen = order[: moved.numel()]
            self.order[t] = torch.cat([seen[~moved], seen[moved], order[moved.numel() :]])
            if moved.numel() == n > 0 and (rate := int(moved.sum()) / n) >= self.target_asr:
                self.l1[t], self.asr[t], self.mask[t], self.pattern[t] = l1, rate, mask, pattern
                break
        self.candidates[t] = []  # failed, or larger than the one kept

    def settle_all(self, active: list[int] | None = None) -> bool:
        """Settle every class of ``active`` (default all); True when each has a trigger."""
        active = list(range(len(self.pools))) if active is None else active
        for t in active:
            self.settle(t)
        return bool(torch.isfinite(self.l1[active]).all())


def neural_cleanse(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    classes: int | None = None,
    epochs: int = 70,
    steps_per_epoch: int = 30,
    batch_size: int = 16,
    lr: float = 0.1,
    init_cost: float = 1e-3,
    target_asr: float = 0.99,
    patience: int = 2,
    early_stop: int = 6,
    seed: int = 0,
    size_ratio: float = SIZE_RATIO,
    smoothness: float = 0.0,
    restarts: int = 1,
    reverse: Sequence[int] | None = None,
    exclude: torch.Tensor | None = None,
    progress: bool = False,
) -> CleanseResult:
    """Reverse-engineer a trigger for every class and flag the anomalous ones.

    Args:
        model: pixels in [0, 1] in, logits out; not touched: the run uses a frozen
            channels_last copy in eval mode (:func:`judging_copy`).
        x, y: clean images (N, C, H, W), uint8 or float in [0, 1], and their labels, on the
            device to use. Images already of class ``t`` are not used for ``t``'s trigger.
        classes: number of classes (default: the model's output size).
        epochs, steps_per_epoch, batch_size: the optimisation budget; ``batch_size`` images
            per class per step.
        lr: Adam's step size on the masks' and patterns' tanh parameters.
        init_cost, target_asr, patience, early_stop: the adaptive cost (see the module docstring).
        seed: seeds the initialisation and the batches.
        size_ratio: redblue's second flagging rule (see :func:`flag_reasons`; 0 turns it off).
        smoothness: the weight of each mask's :func:`total_variation` in the regulariser the
            adaptive cost multiplies, ``|m|_1 + smoothness * TV(m)`` (0: the paper's L1 alone;
            see the module docstring). The norms compared and recorded are L1 either way.
        restarts: independent starts per class, optimised side by side in the same batches;
            a class keeps its smallest checked trigger over all of them.
        reverse: the classes whose triggers are reverse-engineered (default all); the others
            get none (norm inf), and the result flags nothing (anomaly indices 0): the norms
            of some classes judge nothing. Used to restore the triggers of flagged classes.
        exclude: pixels (H, W, bool) no mask may use: the masks are held at 0 there. Used to
            find a class's further triggers once its smallest is known (see
            ``redblue.stages.backdoor_audit.more_triggers``).

    Returns:
        A :class:`CleanseResult`.
    """
    check_int("epochs", epochs, 1)
    check_int("steps_per_epoch", steps_per_epoch, 1)
    check_int("batch_size", batch_size, 1)
    check_int("patience", patience, 1)
    check_int("early_stop", early_stop, 1)
    check_int("restarts", restarts, 1, 100)
    check_float("lr", lr, 0.0, None, low_open=True)
    check_float("init_cost", init_cost, 0.0, None, low_open=True)
    check_float("target_asr", target_asr, 0.0, 1.0, low_open=True)
    check_float("size_ratio", size_ratio, 0.0, 1.0, high_open=True)
    check_float("smoothness", smoothness, 0.0, None)
    if x.dim() != 4 or y.shape[0] != x.shape[0] or x.shape[0] == 0:
        raise ConfigError(f"neural cleanse: images of shape {tuple(x.shape)} and {tuple(y.shape)} labels; expected (N, C, H, W) and N")
    start = time.perf_counter()
    device = x.device
    images = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    net = judging_copy(model, images[:2])
    with torch.no_grad():
        k = int(classes or net(images[:1]).shape[1])
    _, c, h, w = images.shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    active = list(range(k)) if reverse is None else sorted({int(t) for t in reverse})
    if not active or any(not 0 <= t < k for t in active):
        raise ConfigError(f"neural cleanse: classes to reverse {list(reverse or [])}; expected some of 0..{k - 1}")
    if exclude is not None and (exclude.shape != (h, w) or exclude.dtype != torch.bool):
        raise ConfigError(f"neural cleanse: exclude is {exclude.dtype} {tuple(exclude.shape)}; expected bool ({h}, {w})")
    usable = torch.ones((h, w), device=device) if exclude is None else (~exclude).float().to(device)
    rows = restarts * len(active)  # row r optimises a trigger for class active[r % len(active)], from its own start
    mask_raw = (torch.rand((rows, 1, h, w), generator=generator) * 0.2 - 4.0).to(device).requires_grad_(True)  # near 0
    pattern_raw = (torch.rand((rows, c, h, w), generator=generator) * 2 - 1).to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([mask_raw, pattern_raw], lr=lr, betas=(0.5, 0.9))
    cost = torch.full((rows,), init_cost, device=device)
    up = torch.zeros(rows, dtype=torch.long, device=device)
    down = torch.zeros(rows, dtype=torch.long, device=device)
    stale = 0
    # for each class, the images of the other classes (a trigger must move them to it)
    pools = [torch.nonzero(y != t).squeeze(1) for t in range(k)]
    if any(pools[t].numel() == 0 for t in active):
        raise ConfigError("neural cleanse: every class needs clean images of other classes to move")
    best = _Triggers(net, images, pools, target_asr)
    previous = best.l1.clone()
    row_class = [active[r % len(active)] for r in range(rows)]
    row_pools = [pools[t] for t in row_class]
    targets = torch.tensor(row_class, device=device).repeat_interleave(batch_size)
    epochs_run = 0

    def decoded() -> tuple[torch.Tensor, torch.Tensor]:
        """The masks (rows, 1, H, W; 0 on excluded pixels) and patterns, in [0, 1]."""
        return (torch.tanh(mask_raw) + 1) / 2 * usable, (torch.tanh(pattern_raw) + 1) / 2

    bar = tqdm(range(epochs), desc="neural cleanse", disable=not progress, leave=False)
    for epoch in bar:
        epochs_run = epoch + 1
        epoch_hits = torch.zeros(rows, device=device)
        for _ in range(steps_per_epoch):
            picks = torch.stack([pool[torch.randint(pool.numel(), (batch_size,), generator=generator).to(pool.device)]
                                 for pool in row_pools])  # fmt: skip
            batch = images[picks.reshape(-1)].view(rows, batch_size, c, h, w)
            mask, pattern = decoded()
            stamped = (1 - mask[:, None]) * batch + mask[:, None] * pattern[:, None]
            logits = net(channels_last(stamped.reshape(rows * batch_size, c, h, w)))
            ce = F.cross_entropy(logits, targets, reduction="none").view(rows, batch_size).mean(1)
            loss = (ce + cost * regulariser(mask[:, 0], smoothness)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                epoch_hits += (logits.argmax(1) == targets).view(rows, batch_size).float().mean(1)
        asr = epoch_hits / steps_per_epoch
        with torch.no_grad():
            mask, pattern = decoded()
            l1 = mask.flatten(1).sum(1)
            reached = asr >= target_asr
            for r in torch.nonzero(reached).flatten().tolist():
                best.offer(row_class[r], float(l1[r]), mask[r, 0], pattern[r])
            up = torch.where(reached, up + 1, torch.zeros_like(up))
            down = torch.where(reached, torch.zeros_like(down), down + 1)
            raise_cost = up >= patience
            lower_cost = down >= patience
            cost = torch.where(raise_cost, cost * 1.5, cost)
            cost = torch.where(lower_cost, cost / 1.5**1.5, cost)
            up = torch.where(raise_cost, torch.zeros_like(up), up)
            down = torch.where(lower_cost, torch.zeros_like(down), down)
        if epochs_run % best.SETTLE_EVERY == 0 or stale + 1 >= early_stop:
            best.settle_all(active)  # and always before a stop, so no pending candidate is ignored
        # stale: no class's trigger shrank by 1% this epoch (and every class has one)
        now, before = best.l1[active], previous[active]
        stale = stale + 1 if bool(torch.isfinite(now).all() & (now >= before * 0.99).all()) else 0
        previous = best.l1.clone()
        bar.set_postfix(min_l1=f"{float(now.min()):.1f}")
        if stale >= early_stop:
            break
    best.settle_all(active)
    l1_cpu = best.l1.clone()
    # the norms of some classes judge nothing: with reverse, no class is flagged and no index given
    verdict = assess(l1_cpu if reverse is None else torch.full_like(l1_cpu, math.inf), size_ratio=size_ratio)
    return CleanseResult(
        masks=best.mask.detach().cpu(), patterns=best.pattern.detach().cpu(),
        l1=[float(v) for v in l1_cpu], attack_success_rate=[float(v) for v in best.asr],
        anomaly_index=[float(v) for v in verdict.anomaly_index], flagged=verdict.flagged, size_ratio=size_ratio,
        epochs=epochs_run, seconds=time.perf_counter() - start,
        params={"epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size, "lr": lr,
                "init_cost": init_cost, "target_asr": target_asr, "patience": patience, "early_stop": early_stop,
                "seed": seed, "smoothness": smoothness, "restarts": restarts, "n_images": int(x.shape[0]),
                **({} if reverse is None else {"reverse": active}),
                **({} if exclude is None else {"excluded_pixels": int(exclude.sum())})},
    )  # fmt: skip

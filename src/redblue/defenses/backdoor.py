"""Backdoor detection in the training set (pure: activations in, flagged indices out).

Two detectors work on the penultimate-layer activations of the (possibly poisoned) model,
one class (training label) at a time:

* **Activation clustering** (Chen et al., "Detecting Backdoor Attacks on Deep Neural
  Networks by Activation Clustering", 2018): reduce to 10 dimensions (PCA, or FastICA as
  in the paper), split into 2 clusters with k-means, and flag the smaller cluster when it is
  small enough (``max_share``) *and* the split is real (silhouette ≥ ``min_silhouette``).
* **Spectral signatures** (Tran, Li and Madry, "Spectral Signatures in Backdoor Attacks",
  NeurIPS 2018): score each example by its squared projection on the top singular vector
  of the class's centred representations; flag the ``factor`` × ``expected_share`` highest
  scores of each class.

Threat model: the defender holds the (poisoned) training set and the model trained on it,
but not the trigger, the target or the poison indices. The backdoor-defence stage
(:mod:`redblue.stages.backdoor`) scores the detection against the true poison indices
(precision, recall), retrains on the rest and measures clean accuracy / ASR / RA again.

scikit-learn does the PCA / FastICA / k-means / silhouette of activation clustering; torch
does everything else (activations, the SVD of spectral signatures).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from redblue.config import BackdoorDefenseConfig
from redblue.data import to_float
from redblue.errors import ConfigError
from redblue.train import channels_last, check_layout
from redblue.utils import eval_mode

METHODS = ("ac", "spectral")


@dataclass
class Detection:
    """What a detector flagged: sorted training indices, and per-class details."""

    method: str
    flagged: torch.Tensor  # int64 indices into the training set, sorted
    per_class: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@torch.no_grad()
def penultimate_activations(
    model: nn.Module, x: torch.Tensor, *, batch_size: int = 512, progress: bool = False
) -> torch.Tensor:
    """The input of the model's last ``nn.Linear`` (its last hidden representation).

    Args:
        model: a classifier whose final layer is an ``nn.Linear`` (all registry models).
        x: images (N, C, H, W), uint8 or float in [0, 1], on the model's device.
        batch_size: images per forward pass.
        progress: show a progress bar (images done and rate).

    Returns:
        float32 activations (N, D) on ``x.device``, computed in eval mode (the mode the
        model had is restored).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("backdoor defence: the model has no nn.Linear layer to read features from")
    model = check_layout(model, x)
    head = linears[-1]
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0].detach().float().flatten(1))

    handle = head.register_forward_pre_hook(hook)
    bar = tqdm(total=int(x.shape[0]), desc="activations", unit="img", disable=None if progress else True, leave=False)
    try:
        with eval_mode(model):
            for start in range(0, x.shape[0], batch_size):
                xb = x[start : start + batch_size]
                model(channels_last(to_float(xb) if xb.dtype == torch.uint8 else xb))
                bar.update(int(xb.shape[0]))
    finally:
        handle.remove()
        bar.close()
    if not captured:
        return torch.empty(0, head.in_features, device=x.device)
    return torch.cat(captured)


def _reduce(features: np.ndarray, n_components: int, reduce: str, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA, FastICA

    k = max(1, min(n_components, features.shape[0], features.shape[1]))
    if reduce == "ica":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FastICA convergence chatter on easy data
            ica = FastICA(n_components=k, max_iter=1000, tol=0.005, random_state=seed,
                          whiten="unit-variance")
            return np.asarray(ica.fit_transform(features))
    return np.asarray(PCA(n_components=k, random_state=seed).fit_transform(features))


ANALYSES = ("reclassify", "size", "silhouette")


def activation_clustering(
    activations: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int = 10,
    n_components: int = 10,
    reduce: str = "pca",
    analysis: str = "reclassify",
    max_share: float = 0.5,
    min_silhouette: float = 0.15,
    reclass_threshold: float = 0.25,
    seed: int = 0,
    silhouette_sample: int = 3000,
) -> Detection:
    """Activation clustering (Chen et al. 2018): per class, split the reduced activations
    into two k-means clusters and flag the smaller one when the analysis calls it poison.

    Threat model: poisoned training examples carry a trigger the model has learnt, so inside
    their (target) label they form a cluster of their own, made of other classes' images.

    Analyses of the smaller cluster S of class c (it must also hold ≤ ``max_share`` of c):

    * ``reclassify`` (default): a cheap form of the paper's exclusionary reclassification.
      A nearest-centroid classifier on the full activations, with class c's centroid taken
      from the *other* cluster, labels the members of S; S is poison when fewer than
      ``reclass_threshold`` of them land in c (poison is made of other digits; a clean
      sub-mode of c still looks like c).
    * ``size``: always poison (with ``max_share=0.5`` this is ART's ``smaller``).
    * ``silhouette``: poison when the 2-means silhouette score is ≥ ``min_silhouette``.

    Args:
        activations: (N, D) penultimate activations of the training set (any device).
        labels: (N,) training labels as the model was trained on them (poisoned labels).
        num_classes: number of classes.
        n_components: dimensions kept by the reduction (10 in the paper).
        reduce: ``pca`` (default: deterministic and fast) or ``ica`` (FastICA, the paper's).
        analysis: ``reclassify``, ``size`` or ``silhouette`` (above).
        max_share: largest share of its class S may hold (default 0.5: at 10 % all-to-one
            poisoning the poison is ~46 % of the target class, above the paper's 35 %).
        min_silhouette: threshold of the ``silhouette`` analysis.
        reclass_threshold: threshold of the ``reclassify`` analysis, in [0, 1].
        seed: seed of the reduction, k-means and the silhouette sample.
        silhouette_sample: examples per class used for the (reported) silhouette score.

    Returns:
        A :class:`Detection` with the flagged indices and, per class, the cluster sizes,
        the smaller cluster's share, the silhouette score, the share of S reclassified into
        its own class, and whether S was flagged.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(300, 16, generator=g)
        >>> y = torch.arange(300) % 2  # two classes, centred at 0 and at +6 on feature 1
        >>> a[:, 1] += 6.0 * y
        >>> a[:40:2, 1] += 6.0  # 20 class-0 examples that look like class 1 ...
        >>> a[:40:2, 2] += 3.0  # ... plus a trigger feature
        >>> det = activation_clustering(a, y, num_classes=2)
        >>> det.flagged.tolist() == list(range(0, 40, 2))
        True
    """
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from threadpoolctl import threadpool_limits

    if reduce not in ("pca", "ica"):
        raise ConfigError(f"--reduce {reduce!r}: expected pca or ica")
    if analysis not in ANALYSES:
        raise ConfigError(f"--analysis {analysis!r}: expected one of {', '.join(ANALYSES)}")
    start = time.perf_counter()
    acts = activations.detach().float().cpu()
    feats = acts.numpy()
    y = labels.detach().cpu()
    counts = torch.bincount(y, minlength=num_classes)[:num_classes]
    sums = torch.zeros(num_classes, acts.shape[1]).index_add_(0, y, acts)
    flagged: list[torch.Tensor] = []
    per_class: list[dict[str, Any]] = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        n = int(idx.numel())
        row: dict[str, Any] = {"class": c, "n": n, "cluster_sizes": [], "smaller_share": None,
                               "silhouette": None, "reclassified_own": None,
                               "suspicious": False, "flagged": 0}
        if n < 4:
            per_class.append(row)
            continue
        # One BLAS/OpenMP thread for scikit-learn: beside torch's OpenMP runtime its threads
        # spin against each other (measured: k-means 300x slower on 2 busy cores).
        with threadpool_limits(limits=1):
            reduced = _reduce(feats[idx.numpy()], n_components, reduce, seed)
            assign = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(reduced)
            sizes = np.bincount(assign, minlength=2)
            silhouette = None
            if sizes.min() > 0:
                silhouette = float(
                    silhouette_score(reduced, assign, sample_size=min(silhouette_sample, n),
                                     random_state=seed)
                )
        smaller = int(np.argmin(sizes))
        share = float(sizes[smaller] / n)
        in_smaller = torch.from_numpy(assign == smaller)
        reclassified_own = None
        if sizes.min() > 0:
            rest = acts[idx[~in_smaller]]
            members = acts[idx[in_smaller]]
            valid = counts > 0
            centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
            centroids[c] = rest.mean(0)
            distances = torch.cdist(members, centroids)
            distances[:, ~valid] = float("inf")
            reclassified_own = float((distances.argmin(1) == c).float().mean())
        if analysis == "size":
            suspicious = silhouette is not None
        elif analysis == "silhouette":
            suspicious = silhouette is not None and silhouette >= min_silhouette
        else:
            suspicious = reclassified_own is not None and reclassified_own < reclass_threshold
        suspicious = suspicious and share <= max_share
        if suspicious:
            flagged.append(idx[in_smaller])
        row.update(cluster_sizes=[int(s) for s in sizes], smaller_share=share,
                   silhouette=silhouette, reclassified_own=reclassified_own,
                   suspicious=suspicious, flagged=int(sizes[smaller]) if suspicious else 0)
        per_class.append(row)
    out = torch.cat(flagged).sort().values if flagged else torch.empty(0, dtype=torch.long)
    return Detection(
        method="ac",
        flagged=out,
        per_class=per_class,
        params={"n_components": n_components, "reduce": reduce, "analysis": analysis,
                "max_share": max_share, "min_silhouette": min_silhouette,
                "reclass_threshold": reclass_threshold, "seed": seed},
        seconds=time.perf_counter() - start,
    )


def spectral_signatures(
    activations: torch.Tensor,
    labels: torch.Tensor,
    *,
    expected_share: float,
    factor: float = 1.5,
    num_classes: int = 10,
) -> Detection:
    """Spectral signatures (Tran et al. 2018): per class, flag the ``round(factor ×
    expected_share × n_class)`` examples with the largest squared projection on the top
    singular vector of the centred representations.

    Threat model: as for activation clustering; the defender only guesses how much of a
    class may be poisoned (``expected_share``, the paper's ε).

    Args:
        activations: (N, D) penultimate activations of the training set (any device).
        labels: (N,) training labels as the model was trained on them.
        expected_share: expected poisoned share of a class, in [0, 1].
        factor: how many times that share to remove (1.5 in the paper).
        num_classes: number of classes.

    Returns:
        A :class:`Detection`; per class the number flagged and the score threshold.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(200, 16, generator=g)
        >>> a[:20, 0] += 10.0  # 20 examples shifted along one direction
        >>> det = spectral_signatures(a, torch.zeros(200, dtype=torch.long), expected_share=0.1,
        ...                           num_classes=1)
        >>> len(det.flagged), set(range(20)) <= set(det.flagged.tolist())
        (30, True)
    """
    if not 0.0 <= expected_share <= 1.0:
        raise ConfigError(f"--expected-share {expected_share:g}: must be in [0, 1]")
    start = time.perf_counter()
    feats = activations.detach().float()
    y = labels.detach().to(feats.device)
    flagged: list[torch.Tensor] = []
    per_class: list[dict[str, Any]] = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        n = int(idx.numel())
        k = min(n, round(factor * expected_share * n))
        row: dict[str, Any] = {"class": c, "n": n, "flagged": 0, "score_threshold": None}
        if n >= 2 and k > 0:
            centred = feats[idx] - feats[idx].mean(0, keepdim=True)
            _, _, vh = torch.linalg.svd(centred, full_matrices=False)
            scores = (centred @ vh[0]) ** 2
            top = torch.topk(scores, k)
            flagged.append(idx[top.indices].cpu())
            row.update(flagged=k, score_threshold=float(top.values[-1]))
        per_class.append(row)
    out = torch.cat(flagged).sort().values if flagged else torch.empty(0, dtype=torch.long)
    return Detection(
        method="spectral",
        flagged=out,
        per_class=per_class,
        params={"expected_share": expected_share, "factor": factor},
        seconds=time.perf_counter() - start,
    )


def detect(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: BackdoorDefenseConfig,
    *,
    expected_share: float,
    num_classes: int = 10,
    progress: bool = False,
) -> Detection:
    """Run the detector ``cfg.method`` on training images ``x`` with (poisoned) labels ``y``."""
    start = time.perf_counter()
    feats = penultimate_activations(model, x, progress=progress)
    if cfg.method == "ac":
        det = activation_clustering(
            feats, y, num_classes=num_classes, n_components=cfg.n_components, reduce=cfg.reduce,
            analysis=cfg.analysis, max_share=cfg.max_share, min_silhouette=cfg.min_silhouette,
            reclass_threshold=cfg.reclass_threshold, seed=cfg.detection_seed,
        )
    else:
        det = spectral_signatures(feats, y, expected_share=expected_share,
                                  factor=cfg.spectral_factor, num_classes=num_classes)
    det.seconds = time.perf_counter() - start
    return det


__all__ = [
    "ANALYSES",
    "METHODS",
    "Detection",
    "activation_clustering",
    "detect",
    "penultimate_activations",
    "spectral_signatures",
]

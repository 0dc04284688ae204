"""Which visual part a lookalike embedding keeps, chosen from the user's own training photos.

The learned visual part (a projection of the texture statistics) keeps patterns apart that the attributes
never named, but on photos of objects it does not say which object is shown, and the attribute part scatters
an unseen class over the trained ones (docs/refine.md, "On another kind of collection"). The pretrained
visual part keeps the backbone's pooled features and shrinks the attribute part where the members doubt; on
patterns it gives the attribute ranking away. So the data decides:

each training attribute in turn (at most `MAX_HELD_OUT`, drawn with the seed) is held out, a head is trained
on the others for a few epochs, and the held-out attribute's training photos look for their nearest
neighbour among the training photos, once with the learned embedding's two parts and once with the
pretrained pooled features. The pretrained visual part is chosen only when the learned one finds a photo of
the same attribute less often by more than `MARGIN` on average, and clearly so: a sign test on the photos
only one of the two finds (p < `SIGNIFICANCE`), since a few photos per attribute decide nothing.

With two attributes, holding one out leaves a single one, and a head trained on one attribute learns no
attribute part, so nothing would meet the held-out photos the way a trained model's attribute part meets an
unseen attribute. The remaining attribute's photos are then split into `PSEUDO_ATTRIBUTES` groups by k-means
on the descriptor (the learned parts' own input, so the split favours them if anything), and the head is
trained on those groups.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from scipy.stats import binomtest
from sklearn.cluster import KMeans

from ..config import RefineConfig
from .trainer import RefineNet, Refiner, SubsetViews, Views, centre_view_batches

MAX_HELD_OUT = 4
CHECK_EPOCHS = 20
MARGIN = 0.05
SIGNIFICANCE = 0.05
MAX_CATALOG = 3000
MAX_QUERIES = 500
#: Groups a lone remaining attribute is split into, so that a check head of a two-attribute collection learns an attribute part.
PSEUDO_ATTRIBUTES = 2


def nearest_neighbour_hits(vectors: torch.Tensor, labels: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each of `queries` (row numbers): whether its nearest other row (squared L2) has the same label."""
    distances = torch.cdist(vectors[queries], vectors).square()
    distances[torch.arange(len(queries)), torch.from_numpy(queries)] = float("inf")
    return labels[distances.argmin(1).numpy()] == labels[queries]


def choose_visual_part(
    make_net: Callable[[list[str]], RefineNet],
    views: Views,
    labels: Sequence[str],
    config: RefineConfig,
    objective,
    seed: int,
    visual_weight: float,
    pretrained: Callable[[], torch.Tensor],
    standardize: bool = True,
) -> dict:
    """The held-out check; returns {"chosen": "learned" | "pretrained", "held_out": per attribute figures, "reason"}.

    `make_net(classes)` gives a fresh network for those attributes; `pretrained()` the pretrained backbone's
    unit pooled features of the training photos, in their order (asked for only when the check runs).
    """
    labels = np.asarray(labels)
    attributes = sorted(set(labels.tolist()))
    counts = {a: int(np.sum(labels == a)) for a in attributes}
    # a held-out attribute needs 2 photos to find each other; with 2 attributes the other one is split into groups
    others_needed = 2 * PSEUDO_ATTRIBUTES if len(attributes) == 2 else 1
    candidates = [a for a in attributes if counts[a] >= 2 and len(labels) - counts[a] >= others_needed]
    if len(attributes) < 2 or not candidates:
        return {
            "chosen": "learned", "held_out": {},
            "reason": f"the check needs 2 or more attributes, one with 2 or more training photos and the others with {2 * PSEUDO_ATTRIBUTES} or more",
        }
    rng = np.random.default_rng(seed)
    held_out = sorted(rng.choice(candidates, size=min(MAX_HELD_OUT, len(candidates)), replace=False).tolist())
    catalog = rng.choice(len(labels), size=min(MAX_CATALOG, len(labels)), replace=False)
    # up to MAX_QUERIES photos of each held-out attribute join the sample, so small attributes keep their queries
    for attribute in held_out:
        members = np.flatnonzero(labels == attribute)
        catalog = np.union1d(catalog, rng.choice(members, size=min(MAX_QUERIES, len(members)), replace=False))
    check_config = config.model_copy(update={"epochs": min(config.epochs, CHECK_EPOCHS)})
    reference = pretrained()[torch.from_numpy(catalog)]
    figures, learned_only, pretrained_only = {}, 0, 0
    for attribute in held_out:
        keep = np.flatnonzero(labels != attribute)
        taught = labels[keep] if len(attributes) > 2 else _pseudo_attributes(make_net, views, keep, seed)
        net = make_net(sorted(set(taught.tolist())))
        refiner = Refiner(check_config, objective, seed=seed, standardize=standardize, progress=False, log=lambda _: None)
        refiner.fit(net, SubsetViews(views, keep), taught.tolist())
        queries = np.flatnonzero(labels[catalog] == attribute)
        learned = nearest_neighbour_hits(_learned_vectors(net, views, catalog, visual_weight), labels[catalog], queries)
        pretrained_hits = nearest_neighbour_hits(reference, labels[catalog], queries)
        figures[attribute] = {"photos": len(queries), "learned": float(learned.mean()), "pretrained": float(pretrained_hits.mean())}
        learned_only += int(np.sum(learned & ~pretrained_hits))
        pretrained_only += int(np.sum(pretrained_hits & ~learned))
    gap = float(np.mean([f["learned"] - f["pretrained"] for f in figures.values()]))
    p_value = sign_test(learned_only, pretrained_only)
    chosen, verdict = decide(gap, p_value)
    reason = (
        f"held out {', '.join(held_out)} in turn"
        + ("" if len(attributes) > 2 else f" (the other one split into {PSEUDO_ATTRIBUTES} groups to train on)")
        + ": the learned visual part finds a same-attribute nearest neighbour "
        f"{abs(gap):.1%} {'less' if gap < 0 else 'more'} often than the pretrained backbone "
        f"({pretrained_only} photos only the pretrained one finds, {learned_only} only the learned one, p = {p_value:.2g})"
        + verdict
    )
    return {
        "chosen": chosen, "held_out": figures, "mean_gap": gap, "unclear": chosen == "learned" and bool(verdict),
        "only_learned": learned_only, "only_pretrained": pretrained_only, "p_value": p_value, "reason": reason,
    }


def decide(gap: float, p_value: float) -> tuple[str, str]:
    """The visual part to keep, and what the check's figures say about that choice (the end of its reason).

    A gap past the margin that the sign test cannot tell from chance keeps the learned part, and says so: on
    a few photos per attribute that is where a collection of other kinds of photos (objects next to patterns)
    lands, and only the user knows whether the catalog will hold such photos. The learned part comes with a
    verdict only then, so that verdict is what marks a check unclear.
    """
    if gap >= -MARGIN:
        return "learned", ""
    if p_value < SIGNIFICANCE:
        return "pretrained", f": more than {MARGIN:.0%} less, and clearly so"
    return "learned", (
        f": more than {MARGIN:.0%} less, but on too few photos to tell from chance (p ≥ {SIGNIFICANCE:g}), so the learned part is kept; "
        'if the catalog will hold kinds of photos the attributes do not cover, compare with refine.visual_part = "pretrained"'
    )


def sign_test(learned_only: int, pretrained_only: int) -> float:
    """One-sided p-value that the pretrained part finds more photos: of the photos only one of the two finds,
    each would be the pretrained one's half the time were both equally good."""
    n = learned_only + pretrained_only
    return float(binomtest(pretrained_only, n, alternative="greater").pvalue) if n else 1.0


def _pseudo_attributes(make_net: Callable[[list[str]], RefineNet], views: Views, items: np.ndarray, seed: int) -> np.ndarray:
    """`items` in `PSEUDO_ATTRIBUTES` groups: k-means on their centre-view descriptors, standardised as a head's input is."""
    net = make_net(["all"]).eval()
    with torch.inference_mode():
        rows = torch.cat([net.descriptor(batch) for _, batch in centre_view_batches(views, items)])
    head = net.head.standardize(rows)
    with torch.inference_mode():
        standardized = head.standardized(rows).double().numpy()
    groups = KMeans(PSEUDO_ATTRIBUTES, n_init=4, random_state=seed).fit_predict(standardized)
    return np.array([f"group {g + 1}" for g in groups])


def _learned_vectors(net: RefineNet, views: Views, items: np.ndarray, visual_weight: float) -> torch.Tensor:
    """[attribute part, sqrt(visual_weight) * visual part] of `items`' centre views: the learned distance, roughly."""
    net.eval()
    out = []
    with torch.inference_mode():
        for _, batch in centre_view_batches(views, items):
            attribute, visual = net.head.parts(net.descriptor(batch))
            out.append(torch.cat([attribute, visual_weight**0.5 * visual], 1))
    return torch.cat(out)

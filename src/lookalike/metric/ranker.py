"""The learned weighted L2 distance: a linear SVM on squared differences, Platt-calibrated into probabilities."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC
from sklearn.utils.multiclass import check_classification_targets, type_of_target
from sklearn.utils.validation import check_is_fitted, validate_data

from ..errors import InvalidInputError, LookalikeError
from ..fileio import write_json

FORMAT = "lookalike.weighted_l2/1"


def weighted_l2_distance(q, X, weights) -> np.ndarray:
    """-w . (q - x)^2 from query q (d,) to each row of X (n, d), in float64: 0 for the same vector, lower = more alike.

    The SVM's bias is left out (it shifts every distance alike) and goes into the probability instead.
    """
    diff = np.asarray(X, dtype=np.float64) - np.asarray(q, dtype=np.float64)
    return -((diff * diff) @ weights)


def platt_probability(scores, a: float, b: float) -> np.ndarray:
    """Platt scaling: P(same attribute) = sigmoid(a * score + b), with score = -distance."""
    return expit(a * np.asarray(scores, dtype=np.float64) + b)


class WeightedL2Ranker(ClassifierMixin, BaseEstimator):
    """Says whether two images share an attribute, from X = (u - v)^2 of their unit embeddings.

    decision_function(X) = w . X + b is high for alike pairs, so the learned distance between u and v
    is -w . (u - v)^2 (the bias is the same for every pair), a weighted squared L2 with weights -w >= 0. Platt scaling maps that score to P(same attribute), fit on held-out pairs
    with negatives weighted as if `platt_negative_ratio` times as numerous as positives.

    With `visual_dims`, the last that many coordinates (the visual part of a lookalike embedding) are kept
    out of the SVM, which would trade them away for attribute accuracy; they share one distance weight,
    `visual_weight` times the mean magnitude of the SVM's weights, so they order photos within an attribute.
    """

    def __init__(
        self,
        C: float = 0.1,
        class_weight: str | None = "balanced",
        max_iter: int = 10000,
        platt_negative_ratio: float = 10.0,
        visual_dims: int = 0,
        visual_weight: float = 0.5,
    ):
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.platt_negative_ratio = platt_negative_ratio
        self.visual_dims = visual_dims
        self.visual_weight = visual_weight

    def fit(self, X, y, X_calibration=None, y_calibration=None):
        """Fit the SVM on (X, y); calibrate on (X_calibration, y_calibration), else on the training pairs."""
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)
        if len(np.unique(y)) < 2:
            raise InvalidInputError("training pairs need both positive and negative examples; only one class was found")
        target = type_of_target(y)
        if target != "binary":
            raise InvalidInputError(f"Only binary classification is supported: a pair is alike (1) or not (0), but the target is {target}")
        learned = X.shape[1] - self.visual_dims
        if learned < 1:
            raise LookalikeError(f"visual_dims = {self.visual_dims} leaves none of the {X.shape[1]} pair features to learn from")
        svm = LinearSVC(C=self.C, class_weight=None if self.class_weight in (None, "none") else self.class_weight, max_iter=self.max_iter, dual="auto")
        svm.fit(X[:, :learned], y)
        self.classes_ = svm.classes_
        # a weight above 0 would make two images more alike the more they differ there: not a distance, so 0
        # (rare and small: 1 of 128 on fashionTexture), which keeps every learned distance >= 0
        w = np.minimum(svm.coef_[0].astype(np.float64), 0.0)
        # negative SVM weights mean "alike when this difference is small": the visual part gets that sign
        visual = -self.visual_weight * float(np.abs(w).mean())
        self.weights_ = np.concatenate([w, np.full(self.visual_dims, visual)])
        # the SVM set its bias without the visual part; that part's mean over the training pairs goes into it, so
        # the margin (predict) stays where the SVM put it, on average (distances, hence rankings, have no bias)
        self.bias_ = float(svm.intercept_[0]) - visual * float(X[:, learned:].sum(1).mean())
        self.n_iter_ = int(svm.n_iter_)
        if X_calibration is None:
            X_calibration, y_calibration = X, y
        self.calibrate(X_calibration, y_calibration)
        return self

    def calibrate(self, X, y):
        """Platt scaling: P(same) = sigmoid(a * score + b), with a forced positive so it is monotone.

        The fit is to Platt's targets, (N+ + 1) / (N+ + 2) for an alike pair and 1 / (N- + 2) for an unalike one
        (N: the weighted counts), not to 1 and 0: a few hundred pairs cannot show that a probability is 1, and on
        pairs the scores separate the plain fit's slope has no finite optimum (its answer, P = 1.0 exactly, would
        depend on where the scores happen to lie). The scores are standardised for the fit, so neither the SVM's
        bias nor its scale moves a probability.
        """
        scores = self.decision_function(X)
        centre, scale = float(scores.mean()), float(scores.std()) or 1.0
        z = ((scores - centre) / scale).reshape(-1, 1)
        y = np.asarray(y) == self.classes_[1]
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        if n_pos == 0 or n_neg == 0:
            raise LookalikeError("calibration pairs need both positive and negative examples")
        weight = np.where(y, 1.0, self.platt_negative_ratio * n_pos / n_neg)
        target = np.where(y, (n_pos + 1) / (n_pos + 2), 1 / (self.platt_negative_ratio * n_pos + 2))
        # a logistic fit to soft targets: each pair counts as alike with weight target and as unalike with 1 - target
        both = np.r_[np.ones(len(y)), np.zeros(len(y))]
        lr = LogisticRegression(C=1e6, max_iter=1000).fit(np.vstack([z, z]), both, sample_weight=np.r_[weight * target, weight * (1 - target)])
        # back from standardised scores: sigmoid(c * (s - centre) / scale + i) = sigmoid(a * s + b)
        self.platt_a_ = max(float(lr.coef_[0, 0]) / scale, 1e-6)
        self.platt_b_ = float(lr.intercept_[0]) - self.platt_a_ * centre
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "weights_")
        return validate_data(self, X, dtype=np.float64, reset=False) @ self.weights_ + self.bias_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = False  # it tells alike pairs from unalike ones
        return tags

    def predict(self, X) -> np.ndarray:
        """The SVM's side of the margin (not P(same) > 0.5: calibration weights negatives as in a real catalog)."""
        check_is_fitted(self, "weights_")
        return self.classes_[(self.decision_function(X) > 0).astype(int)]

    def predict_proba(self, X) -> np.ndarray:
        p = self.probability_from_score(self.decision_function(X))
        return np.column_stack([1 - p, p])

    def probability_from_score(self, scores) -> np.ndarray:
        check_is_fitted(self, "platt_a_")
        return platt_probability(scores, self.platt_a_, self.platt_b_)

    def distance(self, q, X) -> np.ndarray:
        """Learned distance from query q (d,) to each row of X (n, d): >= 0, 0 for the same vector, lower = more alike."""
        return weighted_l2_distance(q, X, self.weights_)

    def probability(self, distances) -> np.ndarray:
        """Calibrated P(same attribute) for learned distances (their SVM score is bias - distance)."""
        return self.probability_from_score(self.bias_ - np.asarray(distances, dtype=np.float64))

    def to_dict(self) -> dict:
        check_is_fitted(self, ["weights_", "platt_a_"])
        return {
            "format": FORMAT,
            "params": self.get_params(),
            "weights": self.weights_.tolist(),
            "bias": self.bias_,
            "platt_a": self.platt_a_,
            "platt_b": self.platt_b_,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "WeightedL2Ranker":
        if d.get("format") != FORMAT:
            raise LookalikeError(f"not a lookalike weighted-L2 model (format {d.get('format')!r}, expected {FORMAT})")
        ranker = cls(**d["params"])
        ranker.weights_ = np.asarray(d["weights"], dtype=np.float64)
        ranker.bias_ = float(d["bias"])
        ranker.platt_a_ = float(d["platt_a"])
        ranker.platt_b_ = float(d["platt_b"])
        ranker.classes_ = np.array([0, 1])
        ranker.n_features_in_ = ranker.weights_.size
        return ranker

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WeightedL2Ranker":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except FileNotFoundError:
            raise LookalikeError(f"{path} not found; run `lookalike train-metric` first") from None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LookalikeError(f"{path} is not a valid lookalike model file ({e})") from None

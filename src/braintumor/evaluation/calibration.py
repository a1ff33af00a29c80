"""Confidence people can act on: temperature scaling and the refer-to-a-radiologist threshold.

Temperature scaling (Guo et al. 2017) divides the logits by one number T fitted on held-out data
by minimising the negative log-likelihood; it changes no prediction, only how sure the model
says it is. The uncertainty threshold is read off a coverage-versus-accuracy curve: predictions
whose calibrated confidence falls below it are flagged ``uncertain``.
"""

from __future__ import annotations

import numpy as np
import torch


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 that minimises the NLL of softmax(logits / T) on (logits, labels)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits_t / log_t.exp(), labels_t)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> dict[str, np.ndarray]:
    """For every threshold t (each observed confidence): the share of predictions kept
    (confidence >= t) and their accuracy. Sorted by threshold, ascending."""
    order = np.argsort(confidence)
    sorted_confidence, sorted_correct = confidence[order], correct[order].astype(float)
    n = len(confidence)
    kept = n - np.arange(n)  # thresholding at sorted_confidence[i] keeps items i..n-1
    accuracy = np.cumsum(sorted_correct[::-1])[::-1] / kept
    return {"threshold": sorted_confidence, "coverage": kept / n, "accuracy": accuracy}


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_accuracy: float) -> float:
    """The lowest threshold whose kept predictions reach ``target_accuracy`` (most coverage);
    1.0 if none does."""
    curve = coverage_curve(confidence, correct)
    reaching = np.flatnonzero(curve["accuracy"] >= target_accuracy)
    return float(curve["threshold"][reaching[0]]) if len(reaching) else 1.0

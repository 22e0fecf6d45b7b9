"""Request-level calibration: both guard thresholds chosen together, on whole requests.

A benign request is blocked if its prefill score crosses the prefill threshold *or* any of
its streamed tokens' smoothed scores crosses the stream threshold. Setting each probe's
threshold at a per-probe FPR lets the two compound (and a long answer has many tokens to
trip on), so the thresholds are chosen jointly for a target share of benign *requests*
blocked, and the stream score is smoothed by an exponential moving average so that one noisy
token cannot stop an answer. All choices are made on dev requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


EMA_ALPHAS: tuple[float, ...] = (1.0, 0.5, 0.3, 0.2, 0.1)  # 1.0: no smoothing


def ema(scores: np.ndarray, alpha: float) -> np.ndarray:
    """Exponential moving average `m_t = alpha * s_t + (1 - alpha) * m_{t-1}`, `m_0 = s_0`."""
    out = np.empty(len(scores), dtype=np.float64)
    level = 0.0
    for t, score in enumerate(np.asarray(scores, dtype=np.float64)):
        level = score if t == 0 else alpha * score + (1.0 - alpha) * level
        out[t] = level
    return out


def stream_maxima(streams: Sequence[np.ndarray], alpha: float) -> np.ndarray:
    """Per request, the largest smoothed stream score (-inf for a request with no token)."""
    return np.array([ema(s, alpha).max() if len(s) else -np.inf for s in streams])


@dataclass(frozen=True)
class RequestThresholds:
    prefill: float
    stream: float
    ema_alpha: float
    dev_benign_blocked: float  # share of benign dev requests blocked at either stage
    dev_harmful_blocked: float
    dev_prefill_benign_blocked: float


def threshold_flagging(scores: np.ndarray, count: int) -> float:
    """The smallest threshold that flags (score >= threshold) at most `count` of `scores`."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if count >= len(ordered):
        return 0.0
    return float(min(1.0, np.nextafter(ordered[count], np.inf)))


def _blocked(prefill: np.ndarray, stream_max: np.ndarray, t_prefill: float, t_stream: float) -> np.ndarray:
    return (prefill >= t_prefill) | (stream_max >= t_stream)


def choose_thresholds(
    benign_prefill: np.ndarray, benign_streams: Sequence[np.ndarray],
    harmful_prefill: np.ndarray, harmful_streams: Sequence[np.ndarray],
    target: float, alphas: Sequence[float] = EMA_ALPHAS,
) -> RequestThresholds:
    """The (prefill, stream, alpha) triple that blocks the most harmful dev requests while
    blocking at most `target` of benign dev requests (prefill and stream together).

    For each alpha and each candidate prefill threshold (the benign prefill scores' own
    cut points), the stream threshold takes what is left of the benign budget.
    """
    benign_prefill = np.asarray(benign_prefill, dtype=np.float64)
    harmful_prefill = np.asarray(harmful_prefill, dtype=np.float64)
    n_benign = len(benign_prefill)
    budget = int(np.floor(target * n_benign))
    best: tuple[float, float, float, float, float] | None = None  # (tpr, -benign, t_p, t_s, alpha)
    for alpha in alphas:
        benign_max, harmful_max = stream_maxima(benign_streams, alpha), stream_maxima(harmful_streams, alpha)
        for allowed in range(budget + 1):
            t_prefill = threshold_flagging(benign_prefill, allowed)
            passed = benign_prefill < t_prefill
            left = budget - int((~passed).sum())
            if left < 0:
                continue
            t_stream = threshold_flagging(benign_max[passed], left)
            tpr = float(_blocked(harmful_prefill, harmful_max, t_prefill, t_stream).mean())
            fpr = float(_blocked(benign_prefill, benign_max, t_prefill, t_stream).mean())
            key = (tpr, -fpr, t_prefill, t_stream, alpha)
            if best is None or key[:2] > best[:2]:
                best = key
    assert best is not None
    tpr, neg_fpr, t_prefill, t_stream, alpha = best
    return RequestThresholds(t_prefill, t_stream, alpha, -neg_fpr, tpr, float((benign_prefill >= t_prefill).mean()))


def request_outcomes(prefill: np.ndarray, streams: Sequence[np.ndarray], t_prefill: float, t_stream: float,
                     ema_alpha: float) -> dict[str, np.ndarray]:
    """Per request: blocked at all, and at which stage ('prefill', 'stream' or '')."""
    prefill = np.asarray(prefill, dtype=np.float64)
    stream_max = stream_maxima(streams, ema_alpha)
    at_prefill = prefill >= t_prefill
    at_stream = ~at_prefill & (stream_max >= t_stream)
    stage = np.where(at_prefill, "prefill", np.where(at_stream, "stream", ""))
    return {"blocked": at_prefill | at_stream, "stage": stage}


def tpr_at_request_fpr(benign_prefill: np.ndarray, benign_streams: Sequence[np.ndarray], harmful_prefill: np.ndarray,
                       harmful_streams: Sequence[np.ndarray], fprs: Sequence[float] = (0.01, 0.05),
                       alphas: Sequence[float] = EMA_ALPHAS) -> dict[str, float]:
    """Best harmful-blocked rate at each request-level benign rate (the calibration curve's points)."""
    return {f"tpr_at_{round(100 * f)}pct": choose_thresholds(benign_prefill, benign_streams, harmful_prefill,
                                                              harmful_streams, f, alphas).dev_harmful_blocked
            for f in fprs}

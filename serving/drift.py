"""Two-sample drift tests between a reference window and the latest window of answers.

Query embeddings: a nearest-neighbour novelty test with permutations. Drift in a support
system is mostly new kinds of questions arriving beside the usual ones: a cluster of queries
in a region the reference never visited. A kernel MMD compares whole distributions, and a 20 %
cluster is diluted by the spread of in-domain questions (bench/drift_bench.py measures both on
the same windows); a domain classifier needs training and a held-out split the windows of one
store rarely fill. The similarity of each new query to its nearest reference query sees every
novel one, and the permutation p-value holds its false alarm rate under "no drift". Scores
(top-1, top-1 minus top-2): Kolmogorov-Smirnov, with the population stability index as the
effect size people know. Abstain rate: Fisher's exact test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PSI_BINS = 10


@dataclass
class TestResult:
    name: str  # query_embedding | top1_score | top_gap | abstain_rate
    statistic: float  # nearest-reference similarity, KS D, or the abstain-rate difference
    p_value: float
    reference: float | None = None  # a summary of each window (mean score, abstain rate)
    current: float | None = None
    psi: float | None = None

    def to_json(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
        # p-values to 4 significant digits: a strong drift's 3e-12 must not read as 0
        return {"test": self.name, "statistic": r(self.statistic), "p_value": float(f"{self.p_value:.4g}"),
                "reference": r(self.reference), "current": r(self.current), "psi": r(self.psi)}


def novelty_test(reference: np.ndarray, current: np.ndarray, permutations: int, seed: int = 0) -> TestResult:
    """How far the current queries lie from the reference ones: the mean, over current queries,
    of the cosine similarity to their nearest reference query (rows are normalised vectors).
    The p-value comes from permuting which rows are reference and which current."""
    pooled = np.concatenate([reference, current]).astype(np.float32)
    similarity = pooled @ pooled.T
    n, rng = len(reference), np.random.default_rng(seed)

    def nearest(order: np.ndarray) -> float:
        return float(similarity[np.ix_(order[n:], order[:n])].max(axis=1).mean())

    observed = nearest(np.arange(len(pooled)))
    null = np.array([nearest(rng.permutation(len(pooled))) for _ in range(permutations)])
    p_value = (1 + int(np.sum(null <= observed + 1e-9))) / (1 + permutations)
    return TestResult("query_embedding", observed, p_value, float(np.mean(null)), observed)


def ks_test(name: str, reference: np.ndarray, current: np.ndarray) -> TestResult:
    from scipy.stats import ks_2samp

    result = ks_2samp(reference, current)
    return TestResult(name, float(result.statistic), float(result.pvalue), float(np.mean(reference)),
                      float(np.mean(current)), psi(reference, current))


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """Population stability index over the reference's deciles (> 0.25 is read as a large shift)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1) / len(reference)
    cur = np.bincount(np.searchsorted(edges, current, side="right"), minlength=len(edges) + 1) / len(current)
    ref, cur = np.clip(ref, 1e-4, None), np.clip(cur, 1e-4, None)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def rate_test(name: str, reference: np.ndarray, current: np.ndarray) -> TestResult:
    from scipy.stats import fisher_exact

    a, b = int(reference.sum()), int(current.sum())
    _, p_value = fisher_exact([[a, len(reference) - a], [b, len(current) - b]])
    ref_rate, cur_rate = a / len(reference), b / len(current)
    return TestResult(name, cur_rate - ref_rate, float(p_value), ref_rate, cur_rate)

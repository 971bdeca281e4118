"""Evaluation metrics of the Flower paper (arXiv 2503.07377, Sec. 4.1).

Accuracy, one target per row, top-K ranked titles:
  HR@K = [target in top K],  NDCG@K = 1 / log2(rank + 2) if the target is at rank < K (0-based)
Fairness over popularity groups g (flowkern.data.Task.popularity_groups):
  dis(g) = p_rec(g) − p_train(g), p_rec(g) = share of all top-K recommendations in group g
  DGU@K = max_g dis(g) − min_g dis(g),  MGU@K = mean_g |dis(g)|
Diversity over every recommended title, words = whitespace-separated:
  H = entropy (log2) of the word counts,  TTR = distinct words / words
Distribution fitting (history-free), natural log, eps added to every probability:
  KL(p‖q) = Σ p log(p / q),  JS = ½ KL(p‖m) + ½ KL(q‖m), m = (p + q) / 2
"""

from collections import Counter

import numpy as np

EPSILON = 1e-6


def accuracy(ranked_titles, target_titles, ks=(5, 10)) -> dict:
    """Mean HR@K and NDCG@K; titles are compared as strings, so items sharing a title count as one."""
    out = {}
    for k in ks:
        hits, gains = [], []
        for ranked, target in zip(ranked_titles, target_titles):
            rank = ranked[:k].index(target) if target in ranked[:k] else None
            hits.append(rank is not None)
            gains.append(0.0 if rank is None else 1.0 / np.log2(rank + 2))
        out[f"HR@{k}"], out[f"NDCG@{k}"] = float(np.mean(hits)), float(np.mean(gains))
    return out


def fairness(ranked_groups, p_train, k=10) -> dict:
    """DGU@K and MGU@K from each row's recommended items' popularity groups."""
    recommended = np.concatenate([np.asarray(groups[:k], dtype=int) for groups in ranked_groups])
    p_rec = np.bincount(recommended, minlength=len(p_train)) / max(len(recommended), 1)
    dis = p_rec - np.asarray(p_train)
    return {f"DGU@{k}": float(dis.max() - dis.min()), f"MGU@{k}": float(np.abs(dis).mean()),
            "p_rec": p_rec.tolist()}


def diversity(ranked_titles) -> dict:
    words = Counter(word for ranked in ranked_titles for title in ranked for word in title.split())
    total = sum(words.values())
    if total == 0:
        return {"H": 0.0, "TTR": 0.0}
    p = np.array(list(words.values())) / total
    return {"H": float(-(p * np.log2(p)).sum()), "TTR": len(words) / total}


def divergences(target, model) -> dict:
    """KL(target‖model), KL(model‖target) and JS between two distributions over the same
    items (counts or probabilities; eps added to every probability)."""
    p, q = _normalise(target), _normalise(model)
    m = (p + q) / 2
    return {"KL(target||model)": _kl(p, q), "KL(model||target)": _kl(q, p), "JS": 0.5 * _kl(p, m) + 0.5 * _kl(q, m)}


def _normalise(weights):
    weights = np.asarray(weights, dtype=np.float64)
    p = weights / weights.sum() + EPSILON
    return p / p.sum()


def _kl(p, q):
    return float((p * np.log(p / q)).sum())

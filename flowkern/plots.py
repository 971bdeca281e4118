"""The trainer's plots (PNG, matplotlib without a display)."""

import numpy as np


def popularity_shares(path, p_train, p_before, p_after):
    """Share of recommendations per popularity group (0 = most popular) against the share of
    training interactions, before and after training."""
    plt = _pyplot()
    groups = np.arange(len(p_train))
    series = [("training interactions", p_train), ("recommended, before", p_before), ("recommended, after", p_after)]
    series = [(label, values) for label, values in series if values is not None]
    width = 0.8 / len(series)
    figure, axes = plt.subplots(figsize=(7, 4))
    for i, (label, values) in enumerate(series):
        axes.bar(groups + (i - (len(series) - 1) / 2) * width, values, width, label=label)
    axes.set(xlabel="popularity group (0 = most popular)", ylabel="share", xticks=groups,
             title="Recommendations per popularity group (top-10)")
    axes.legend()
    _save(figure, path)


def title_frequencies(path, target, before, after, sampled_counts):
    """Target share of every title (sorted by it) against the model's exact probability
    before and after training, and the share among the evaluation samples."""
    plt = _pyplot()
    order = np.argsort(-np.asarray(target))
    figure, axes = plt.subplots(figsize=(8, 4))
    axes.plot(np.asarray(target)[order], "k-", label="target (interaction counts)", linewidth=2)
    if before is not None:
        axes.plot(np.asarray(before)[order], label="model before (exact)", alpha=0.8)
    axes.plot(np.asarray(after)[order], label="model after (exact)", alpha=0.8)
    if sampled_counts.sum() > 0:
        axes.plot((sampled_counts / sampled_counts.sum())[order], ".", label="model after (samples)", alpha=0.6)
    axes.set(xlabel="title, by target popularity", ylabel="probability", title="History-free distribution fitting")
    axes.legend()
    _save(figure, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)

"""The release's charts, one PNG per figure.

Figures are built with matplotlib's object API (Figure + Agg canvas), never pyplot, so rendering
needs no display, touches no global backend state and leaves no figure open. Each function takes
plain data and a path: a file path, or a directory that then receives the standard file name.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from qsae.analysis.features import HEALTHY_RANGE

VARIANCE_EXPLAINED_PNG = "01_variance_explained.png"
FIRE_RATES_PNG = "02_fire_rates.png"
FEATURE_AUROC_PNG = "03_feature_auroc.png"
TRAINING_CURVES_PNG = "04_training_curves.png"
FEATURE_HEALTH_PNG = "05_feature_health.png"
HEALTH_CLASSES = ("dead", "rare", "healthy", "dense")
_DPI = 120


def _target(path: str | Path, default_name: str) -> Path:
    path = Path(path)
    return path / default_name if path.is_dir() else path


def _save(fig: Figure, path: str | Path, default_name: str) -> Path:
    target = _target(path, default_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(target, dpi=_DPI, format="png")
    return target


def _layers(by_layer: dict) -> list[int]:
    if not by_layer:
        raise ValueError("chart data has no layers")
    return sorted(by_layer)


def plot_variance_explained(ve_by_layer: dict[int, tuple[float, float, float]], path: str | Path) -> Path:
    """Bars of pooled variance explained per layer, with their (ci_low, ci_high) as error bars. A
    percentile bootstrap interval over a few questions may leave out the value itself: it is drawn
    as it is."""
    layers = _layers(ve_by_layer)
    value, low, high = (np.array([ve_by_layer[layer][i] for layer in layers]) for i in range(3))
    if (low > high).any():
        raise ValueError("each interval must have ci_low <= ci_high")
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    ax.bar(x, value, color="tab:blue")
    ax.errorbar(x, (low + high) / 2, yerr=(high - low) / 2, fmt="none", ecolor="black", capsize=6)
    for xi, v in zip(x, value):
        ax.annotate(f"{v:.3f}", (xi, v), xytext=(8, 4), textcoords="offset points")
    ax.set_xticks(x, [f"L{layer}" for layer in layers])
    ax.set_ylim(min(0.0, float(low.min())), 1.0)
    ax.set_ylabel("variance explained")
    ax.set_title("1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² on held-out tokens", fontsize=9)
    return _save(fig, path, VARIANCE_EXPLAINED_PNG)


def plot_fire_rates(fire_rate_by_layer: dict[int, np.ndarray], path: str | Path) -> Path:
    """Log-x histogram of the nonzero fire rates per layer, healthy band shaded, dead count in the legend."""
    layers = _layers(fire_rate_by_layer)
    rates = {layer: np.asarray(fire_rate_by_layer[layer], dtype=np.float64) for layer in layers}
    nonzero = np.concatenate([r[r > 0] for r in rates.values()])
    # Start the axis a decade below the healthy band at least, so the band always shows.
    smallest = min(nonzero.min(initial=1.0), HEALTHY_RANGE[0] / 10)
    bins = np.logspace(np.log10(smallest), 0, 50)
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    low, high = HEALTHY_RANGE
    ax.axvspan(low, high, color="tab:green", alpha=0.15, label=f"healthy [{low:.1%}, {high:.0%}]")
    for layer in layers:
        r = rates[layer]
        ax.hist(r[r > 0], bins=bins, histtype="step", linewidth=1.5, label=f"L{layer} (dead: {int((r == 0).sum())})")
    ax.set_xscale("log")
    ax.set_xlabel("fire rate (fraction of tokens)")
    ax.set_ylabel("features")
    ax.legend(fontsize=8)
    return _save(fig, path, FIRE_RATES_PNG)


def plot_auroc(distance_by_layer: dict[int, tuple[np.ndarray, float] | None], path: str | Path) -> Path:
    """Histogram of every feature's rollout-level AUROC minus its null centre, one panel per layer, with
    the chance band (± the 95th percentile of the largest such distance under permuted labels) shaded;
    None marks a layer where it could not be computed."""
    layers = _layers(distance_by_layer)
    fig = Figure(figsize=(4 * len(layers), 3.5))
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers):
        ax.set_title(f"L{layer}")
        ax.set_xlabel("rollout-level AUROC − null centre")
        if distance_by_layer[layer] is None:
            ax.text(0.5, 0.5, "not computable", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        distance, band = distance_by_layer[layer]
        ax.axvspan(-band, band, color="tab:gray", alpha=0.2, label="chance band (95%)")
        ax.hist(np.asarray(distance), bins=50, color="tab:purple")
        ax.axvline(0.0, color="black", linestyle="--", linewidth=1)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("features")
    fig.tight_layout()
    return _save(fig, path, FEATURE_AUROC_PNG)


def plot_training(
    history_by_layer: dict[int, dict], path: str | Path, revive_every_epochs: int | None = None
) -> Path:
    """Per-epoch loss and train FVU per layer; revival events that revived features are marked.

    A history holds "loss" and "fvu" (one value per epoch) and, optionally, "revived_per_event"
    (features revived at each event). Event i happened after epoch (i + 1) * revive_every_epochs;
    without revive_every_epochs no events are marked.
    """
    layers = _layers(history_by_layer)
    fig = Figure(figsize=(10, 4))
    loss_ax, fvu_ax = fig.subplots(1, 2)
    for layer in layers:
        history = history_by_layer[layer]
        epochs = np.arange(1, len(history["loss"]) + 1)
        loss_ax.plot(epochs, history["loss"], marker=".", label=f"L{layer}")
        (line,) = fvu_ax.plot(epochs, history["fvu"], marker=".", label=f"L{layer}")
        if revive_every_epochs is None:
            continue
        for event, revived in enumerate(history.get("revived_per_event", []), start=1):
            epoch = event * revive_every_epochs
            if revived and epoch <= len(history["fvu"]):  # an event that revived nothing is not drawn
                fvu_ax.scatter(epoch, history["fvu"][epoch - 1], marker="v", s=60, color=line.get_color(), zorder=3)
                fvu_ax.annotate(f"{revived} revived", (epoch, history["fvu"][epoch - 1]),
                                xytext=(4, 6), textcoords="offset points", fontsize=7)
    loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="reconstruction loss", title="training loss")
    fvu_ax.set(xlabel="epoch", ylabel="fraction of variance unexplained", title="train FVU (▼ revival)")
    for ax in (loss_ax, fvu_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, TRAINING_CURVES_PNG)


def plot_feature_health(health_by_layer: dict[int, dict], path: str | Path) -> Path:
    """Stacked bars per layer of dead / rare / healthy / dense feature counts."""
    layers = _layers(health_by_layer)
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    x = np.arange(len(layers))
    bottom = np.zeros(len(layers))
    colors = {"dead": "tab:gray", "rare": "tab:orange", "healthy": "tab:green", "dense": "tab:red"}
    for cls in HEALTH_CLASSES:
        counts = np.array([health_by_layer[layer][cls] for layer in layers], dtype=np.float64)
        ax.bar(x, counts, bottom=bottom, color=colors[cls], label=cls)
        bottom += counts
    ax.set_xticks(x, [f"L{layer}" for layer in layers])
    ax.set_ylabel("features")
    low, high = HEALTHY_RANGE
    ax.set_title(f"feature health (healthy: fire rate in [{low:.1%}, {high:.0%}])", fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return _save(fig, path, FEATURE_HEALTH_PNG)


CAUSAL_PNG = "06_causal.png"
CAUSAL_COLORS = {"feature": "tab:orange", "random": "tab:gray", "dom": "tab:blue"}


def plot_causal(arms_by_layer: dict[int, list[dict]], path: str | Path) -> Path:
    """Per layer, each intervention's change in held-out accuracy against the un-intervened run, with
    its paired interval (no whisker where there is none, no bar where no question was scored by both);
    coloured by group."""
    layers = _layers(arms_by_layer)
    height = max(2.5, 0.3 * max(len(arms) for arms in arms_by_layer.values()) + 1.2)
    fig = Figure(figsize=(7, height * len(layers)))
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(len(layers), 1, i + 1)
        arms = arms_by_layer[layer]
        y = np.arange(len(arms))[::-1]
        change = np.array([np.nan if a["accuracy_change"] is None else a["accuracy_change"] for a in arms])
        ax.barh(y, change, color=[CAUSAL_COLORS[a["group"]] for a in arms])
        for yi, a in zip(y, arms):
            if a["accuracy_change_ci"] is not None:
                low, high = a["accuracy_change_ci"]
                ax.plot([low, high], [yi, yi], color="black", linewidth=1)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks(y, [a["name"].split(" ", 1)[1] for a in arms], fontsize=7)
        ax.set_xlabel("accuracy change vs. no intervention")
        ax.set_title(f"layer {layer}: feature (orange), fire-rate-matched random (gray), difference of means (blue)",
                     fontsize=8)
    fig.tight_layout()
    return _save(fig, path, CAUSAL_PNG)


FRONTIER_METRICS = (("fvu", "FVU (held-out rows)"), ("delta_ce", "ΔCE, nats/token"), ("kl", "KL(clean ‖ spliced), nats"))


def frontier_png(layer: int) -> str:
    return f"07_frontier_layer{layer}.png"


def plot_frontier(points: list[dict], path: str | Path) -> Path:
    """One layer's SAEs (frontier points): each metric against L0, one line per width, the selected SAE
    ringed; intervals as whiskers where there are some, a metric's panel left empty where none has it."""
    widths = sorted({p["n_features"] for p in points})
    fig = Figure(figsize=(4 * len(FRONTIER_METRICS), 3.6))
    for i, (metric, label) in enumerate(FRONTIER_METRICS):
        ax = fig.add_subplot(1, len(FRONTIER_METRICS), i + 1)
        for n in widths:
            line = sorted((p for p in points if p["n_features"] == n and p[metric] is not None), key=lambda p: p["l0"])
            if not line:
                continue
            l0, value = np.array([p["l0"] for p in line]), np.array([p[metric] for p in line])
            (drawn,) = ax.plot(l0, value, marker="o", label=f"n = {n}")
            for p in line:
                if p[f"{metric}_ci"] is not None:
                    ax.plot([p["l0"]] * 2, p[f"{metric}_ci"], color=drawn.get_color(), linewidth=1)
                if p["selected"]:
                    ax.plot([p["l0"]], [p[metric]], marker="o", markersize=12, fillstyle="none", color="black")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"layer {points[0]['layer']}: reconstruction and fidelity against sparsity (ringed: the selected SAE)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, path, frontier_png(points[0]["layer"]))

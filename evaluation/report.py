"""The comparison's outputs: results.json (every number and every answer's provenance id),
report.md (tables and a one-paragraph verdict) and chart.png (modes x metrics, and freshness)."""

from __future__ import annotations

import json
from pathlib import Path

from evaluation.compare import MODES

_METRICS = (("exact_match", "EM"), ("f1", "F1"), ("citation_correct", "citations"), ("abstain_rate", "abstain"))
_PHASES = (("before", "before"), ("after_update", "after the store update"), ("after_retrain", "after retraining"))


def write_report(out: Path, results: dict) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"results": out / "results.json", "report": out / "report.md", "chart": out / "chart.png"}
    paths["results"].write_text(json.dumps(results, indent=2, sort_keys=True))
    paths["report"].write_text(markdown(results))
    chart(results, paths["chart"])
    return paths


def verdict(results: dict) -> str:
    """One paragraph a person can act on, from the numbers alone."""
    m, n = results["modes"], results["questions"]
    em = {mode: m[mode]["exact_match"] for mode in MODES if mode in m}
    diff = results["differences"]
    parts = [f"On {n} held-out questions, the base model alone answered {em['base']:.0%} exactly "
             f"(abstaining on {m['base']['abstain_rate']:.0%}); with retrieval {em['rag']:.0%} "
             f"({_ci(diff['rag - base']['exact_match'])}), citing a passage that holds the answer "
             f"{m['rag']['citation_correct']:.0%} of the time; the fine-tuned adapter alone {em['ft']:.0%} "
             f"({_ci(diff['ft - base']['exact_match'])}); both together {em['hybrid']:.0%} "
             f"({_ci(diff['hybrid - rag']['exact_match'])} vs retrieval)."]
    fresh = results.get("freshness")
    if fresh and "after_update" in fresh:
        after = fresh["after_update"]
        parts.append(f"After {len(fresh['facts'])} facts changed in the store, retrieval followed at once "
                     f"(rag {after['rag']['exact_match']:.0%}, hybrid {after['hybrid']['exact_match']:.0%} on the "
                     f"new answers) while the adapter alone still answered {after['ft']['exact_match']:.0%}")
        if "after_retrain" in fresh:
            parts[-1] += f", and {fresh['after_retrain']['ft']['exact_match']:.0%} only after retraining."
        else:
            parts[-1] += "."
    parts.append("Fetch what changes; tune what stays (tone, format, skills): "
                 + ("retrieval carries the facts here." if em["rag"] >= em["ft"] else
                    "the adapter carries these facts, but only until they change."))
    return " ".join(parts)


def _ci(interval: dict) -> str:
    low, high = interval["ci95"]
    return f"{interval['difference']:+.2f}, 95% CI [{low:+.2f}, {high:+.2f}]"


def markdown(results: dict) -> str:
    m = results["modes"]
    lines = ["# Tune or fetch? base vs RAG vs fine-tuned vs hybrid", "",
             f"Knowledge store `{results['versions']['kb']}`, adapter `{results['versions']['adapter']}`, "
             f"base model `{results['versions']['base_model']}`; {results['questions']} held-out questions, "
             f"greedy answers of at most {results['settings']['max_tokens']} tokens, top_k "
             f"{results['settings']['top_k']}.", "", "## Verdict", "", verdict(results), "",
             "## Generation", "", "| mode | EM | F1 | citations correct | abstain rate | latency p50 (ms) | tokens |",
             "|---|---|---|---|---|---|---|"]
    for mode in MODES:
        r = m[mode]
        cite = "-" if r["citation_correct"] is None else f"{r['citation_correct']:.2f}"
        lines.append(f"| {mode} | {r['exact_match']:.2f} | {r['f1']:.2f} | {cite} | {r['abstain_rate']:.2f} | "
                     f"{r['latency_p50_ms']:.0f} | {r['completion_tokens']:.1f} |")
    lines += ["", "Differences (paired bootstrap over questions, 95% intervals):", "",
              "| difference | EM | F1 |", "|---|---|---|"]
    for pair, d in results["differences"].items():
        lines.append(f"| {pair} | {_ci(d['exact_match'])} | {_ci(d['f1'])} |")
    r = results["retrieval"]
    lines += ["", "## Retrieval", "", "| " + " | ".join(k for k in r if k != "k") + " |",
              "|" + "---|" * (len(r) - 1), "| " + " | ".join(f"{v:.3f}" for k, v in r.items() if k != "k") + " |"]
    fresh = results.get("freshness")
    if fresh and "after_update" in fresh:
        lines += ["", "## Freshness", "",
                  f"{len(fresh['facts'])} facts changed in a new store version "
                  f"(v{fresh['store_versions']['original']} -> v{fresh['store_versions']['updated']}; rolled back "
                  f"afterwards: {'yes' if fresh['store_restored'] else 'NO'}); the adapter retrained on them: "
                  f"`{fresh.get('retrained_adapter', '-')}`. Exact match on the changed facts:", "",
                  "| mode | " + " | ".join(label for key, label in _PHASES if key in fresh) + " |",
                  "|---|" + "---|" * sum(key in fresh for key, _ in _PHASES)]
        for mode in MODES:
            cells = [f"{fresh[key][mode]['exact_match']:.2f}" for key, _ in _PHASES if key in fresh]
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    lines += ["", "Every answer, with its provenance id (`tunefetch provenance show ID`), is in results.json.", ""]
    return "\n".join(lines)


def chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fresh = results.get("freshness") or {}
    phases = [(key, label) for key, label in _PHASES if key in fresh]
    fig, axes = plt.subplots(1, 2 if phases else 1, figsize=(12 if phases else 7, 4.5), squeeze=False)
    colors = {"base": "#9e9e9e", "rag": "#1f77b4", "ft": "#ff7f0e", "hybrid": "#2ca02c"}
    ax = axes[0][0]
    width = 0.2
    for i, mode in enumerate(MODES):
        values = [results["modes"][mode][key] or 0.0 for key, _ in _METRICS]
        positions = [j + (i - 1.5) * width for j in range(len(_METRICS))]
        ax.bar(positions, values, width, label=mode, color=colors[mode])
    ax.set_xticks(range(len(_METRICS)), [label for _, label in _METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{results['questions']} held-out questions")
    ax.legend(loc="upper right", fontsize=8)
    if phases:
        ax = axes[0][1]
        for i, mode in enumerate(MODES):
            values = [fresh[key][mode]["exact_match"] for key, _ in phases]
            ax.bar([j + (i - 1.5) * width for j in range(len(phases))], values, width, label=mode, color=colors[mode])
        ax.set_xticks(range(len(phases)), [label for _, label in phases])
        ax.set_ylim(0, 1.05)
        ax.set_title(f"exact match on {len(fresh['facts'])} changed facts")
    fig.suptitle("tune or fetch? exact match, F1, citation correctness, abstentions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

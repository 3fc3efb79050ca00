"""`runs/demo/report.md`: what each stage of the demo did, with its numbers read from the files it wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SECTIONS = ("Summary", "Corpus", "The model's paralinguistic tower", "Data generation", "SFT", "Learning controls",
            "GRPO", "DPO", "Evaluation", "Ambiguity", "Plots", "Reproduce")


def _save(fig, path: Path) -> Path:
    """Lay out, write and close a report figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _series(log: list[dict], *keys: str) -> tuple[str | None, list[tuple[int, float]]]:
    """The first of ``keys`` present in the trainer log, as (step, value) points."""
    for key in keys:
        points = [(int(e.get("step", i)), float(e[key])) for i, e in enumerate(log) if key in e]
        if points:
            return key, points
    return None, []


def _start_end(points: list[tuple[int, float]], fraction: float = 0.25) -> tuple[float | None, float | None]:
    """Means of the first and last quarter of the logged values: single RL steps on a few prompts are noisy (one
    GRPO step's reward swings by +-0.5 here), so comparing the first and last step alone can show the opposite trend."""
    if not points:
        return None, None
    values = [v for _, v in points]
    w = max(1, int(len(values) * fraction))
    return sum(values[:w]) / w, sum(values[-w:]) / w


def _spread(points: list[tuple[int, float]], fraction: float = 0.25) -> tuple[float | None, float | None]:
    """Standard deviations of the first and last quarter of the logged values (the step-to-step noise)."""
    if not points:
        return None, None
    values = [v for _, v in points]
    w = max(1, int(len(values) * fraction))

    def std(xs: list[float]) -> float:
        mean = sum(xs) / len(xs)
        return (sum((x - mean) ** 2 for x in xs) / len(xs)) ** 0.5

    return std(values[:w]), std(values[-w:])


def rise_in_standard_errors(points: list[tuple[int, float]], fraction: float = 0.25) -> float | None:
    """The end-minus-start rise of the quarter means over the standard error of that difference (Welch's t): how far
    the rise stands out of the step-to-step noise. Steps are treated as independent draws (each is a fresh batch of
    prompts); None with fewer than 2 values per quarter or no noise at all."""
    values = [v for _, v in points]
    w = max(1, int(len(values) * fraction))
    if w < 2:
        return None
    start, end = _start_end(points, fraction)
    spread = _spread(points, fraction)
    se = ((spread[0] ** 2 + spread[1] ** 2) / (w - 1)) ** 0.5  # sample variances (n - 1), over w values each
    return (end - start) / se if se > 0 else None


def switch_step(log: list[dict]) -> int | None:
    """The first logged step at which the progressive schedule had switched the reasoning reward on."""
    return next((step for step, value in _series(log, "reasoning/active")[1] if value >= 0.5), None)


def plot_reasoning_switch(log: list[dict], path: Path) -> Path | None:
    """The trust weight of the reasoning reward per step, with the step where the schedule switched it on."""
    _, trust = _series(log, "reasoning/trust")
    if not trust:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.plot([s for s, _ in trust], [v for _, v in trust], marker=".", label="trust weight (mean over the batch)")
    _, reasoning = _series(log, "rewards/reasoning/mean")
    if reasoning:
        ax.plot([s for s, _ in reasoning], [v for _, v in reasoning], marker=".", label="reasoning reward (mean)")
    step = switch_step(log)
    if step is not None:
        ax.axvline(step, color="tab:red", linestyle="--", label=f"switched on at step {step}")
    ax.set_xlabel("GRPO step")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Trust-weighted reasoning reward")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training(curves: dict[str, tuple[str | None, list]], path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(title, key, pts) for title, (key, pts) in curves.items() if pts]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (title, key, pts) in zip(axes, panels):
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker=".")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _strategy_rows(report: dict) -> list[list[str]]:
    rows = []
    for name, s in report["strategies"].items():
        m = s["metrics"]
        cls, dist = m.get("classification", {}), m.get("distribution", {})
        reasoning = m.get("reasoning", {})
        rows.append([name, _fmt(cls.get("accuracy")), _fmt(cls.get("balanced_accuracy")), _fmt(cls.get("macro_f1")),
                     _fmt(dist.get("js_divergence")), _fmt(reasoning.get("format_validity")),
                     _fmt(s["tokens"]["completion_per_item"], 1), _fmt(s["tokens"]["requests_per_item"], 1),
                     str(len(s["failures"]))])
    return rows


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def write_report(ctx) -> Path:
    out: Path = ctx.out
    stages = {p.stem: json.loads(p.read_text()) for p in (out / ".stages").glob("*.json")}
    corpus, data = stages["corpus"], stages["datagen"]
    sft, grpo, dpo = stages["sft"], stages["grpo"], stages["dpo"]
    evals = {name: json.loads(Path(stages["evaluate"][name]).read_text()) for name in ("sft", "grpo", "dpo")}
    plots_dir = out / "plots"
    plots_dir.mkdir(exist_ok=True)

    sft_key, sft_pts = _series(sft["log"], "loss")
    grpo_key, grpo_pts = _series(grpo["log"], "reward", "rewards/mean")
    dpo_key, dpo_pts = _series(dpo["log"], "rewards/margins")
    training_plot = plot_training({"SFT loss": (sft_key, sft_pts), "GRPO mean reward": (grpo_key, grpo_pts),
                                   "DPO chosen - rejected margin": (dpo_key, dpo_pts)}, plots_dir / "training.png")
    reasoning_plot = plot_reasoning_switch(grpo["log"], plots_dir / "grpo_reasoning.png")
    final = evals["dpo"]
    copied = []
    for rel in final.get("plots", []):
        src = out / "eval" / "dpo" / rel
        if src.exists():
            dst = plots_dir / src.name
            shutil.copyfile(src, dst)
            copied.append(dst)

    sft_results = sft["results"]
    acc_audio, acc_silence = sft_results.get("label_accuracy"), sft_results.get("label_accuracy_silence")

    def cot(name: str) -> dict:
        strategies = evals[name]["strategies"]
        return strategies.get("cot_greedy") or next(iter(strategies.values()))

    grpo_start, grpo_end = _start_end(grpo_pts)
    dpo_start, dpo_end = _start_end(dpo_pts)
    lines = ["# emoreason demo report", "",
             "Every number below was read from the files this run wrote under "
             f"`{out}`; stage logs are in `logs/`.", "", "## Summary", ""]
    lines += [f"- SFT, held-out speakers, 4 classes (chance 0.25): label accuracy **{_fmt(acc_audio)}** with the "
              f"audio, {_fmt(acc_silence)} with silence in its place; on unseen voices x unseen sentences "
              f"{_fmt(sft.get('controls', {}).get('audio'))} (controls below).",
              f"- GRPO mean reward: {_fmt(grpo_start)} at the start -> {_fmt(grpo_end)} at the end (means of the first "
              "and last quarter of the logged steps; spreads in the GRPO section).",
              f"- DPO chosen-minus-rejected margin: {_fmt(dpo_start)} -> {_fmt(dpo_end)}.",
              f"- Served final model, greedy chain of thought: accuracy "
              f"{_fmt(cot('dpo')['metrics'].get('classification', {}).get('accuracy'))}, JS divergence to the "
              f"annotators {_fmt(cot('dpo')['metrics'].get('distribution', {}).get('js_divergence'))}.",
              "", "Stage times (s): " + ", ".join(f"{k} {_fmt(v.get('seconds'), 0)}" for k, v in stages.items()
                                                 if isinstance(v, dict) and "seconds" in v), ""]

    lines += ["## Corpus", "",
              f"{corpus['clips']} espeak-ng clips from {corpus['speakers']} speakers "
              f"(splits by speaker: {corpus['splits']}); emotion carried by prosody only: every speaker says each "
              f"of its sentences ({corpus.get('sentences', 'n/a')} in all) in every emotion, and "
              f"{corpus.get('unseen_sentence_test_clips', 'n/a')} test clips use sentences no training clip uses; "
              f"{corpus['ambiguous']} clips rendered between two emotions with split annotator votes.", ""]

    lines += _tower_warmup_section(stages.get("base"))
    lines += ["## Data generation", ""]
    lines.append(f"- `template` teacher (every clip): `{json.dumps(_compact_summary(data['template']))}`")
    lines += [""] + _self_teacher_section(stages.get("warmup"), stages.get("self-teacher"))
    lines += ["## SFT", "",
              f"Loss {_fmt(_start_end(sft_pts)[0])} -> {_fmt(_start_end(sft_pts)[1])} over {len(sft_pts)} logged "
              f"steps. Label accuracy on held-out speakers: {_fmt(acc_audio)} with audio, {_fmt(acc_silence)} "
              "with silence (the model uses the audio, not the transcript).", ""]
    controls = sft.get("controls") or {}
    lines += ["## Learning controls", "",
              "Does the label come from the voice? The SFT checkpoint on the "
              f"{controls.get('clips', 'n/a')} test clips whose speaker AND sentence never occur in training, 4 "
              "classes (chance 0.25), scored by comparing the likelihoods of the four label answers:", ""]
    lines += _table(["condition", "label accuracy", "what it shows"], [
        ["audio", _fmt(controls.get("audio")), "the clips themselves"],
        ["swapped audio", _fmt(controls.get("swapped_audio")),
         f"each clip given another clip's audio with a different label; the answer follows the donor's label "
         f"{_fmt(controls.get('swapped_follows_donor'))} of the time"],
        ["silence", _fmt(controls.get("silence")), "one fixed-length silence for every clip"],
        ["transcript only", _fmt(controls.get("transcript_only")),
         "a words-only classifier trained on the training transcripts (no model): the words carry nothing"],
    ]) + ["", "Reproduce: `pytest -m slow tests/test_sft_learning.py -s` (the label-only tiny recipe, same controls).",
          ""]
    grpo_spread = _spread(grpo_pts)
    switch = grpo.get("reasoning_switch") or {}
    switched = switch_step(grpo["log"])
    rise_se = rise_in_standard_errors(grpo_pts)
    lines += ["## GRPO", "", f"Mean reward ({grpo_key or 'not logged'}): start {_fmt(grpo_start)} "
              f"(spread {_fmt(grpo_spread[0])}), end {_fmt(grpo_end)} (spread {_fmt(grpo_spread[1])}) over "
              f"{len(grpo_pts)} logged steps (means and standard deviations of the first and last quarter); the rise is "
              f"**{_fmt(rise_se)} standard errors** of the difference of the two means (Welch; 2 or more stands out of "
              "the step-to-step noise).", "",
              f"Reasoning reward: judge `{switch.get('judge', 'n/a')}`, weighted per group by the trust weight and "
              f"switched on once the moving average of the batch accuracy reached {_fmt(switch.get('threshold'))}: "
              + (f"**switched on at step {switched}**." if switched is not None
                 else "**it never switched on** (the policy's accuracy stayed below the threshold)."), ""]
    reward_parts = sorted({k for e in grpo["log"] for k in e if k.startswith("rewards/") and k.endswith("/mean")})
    if reward_parts:
        rows = []
        for key in reward_parts:
            s, e = _start_end(_series(grpo["log"], key)[1])
            rows.append([key.split("/")[1], _fmt(s), _fmt(e)])
        lines += _table(["reward", "start", "end"], rows) + [""]
    lines += ["## DPO", "", f"Margin ({dpo_key or 'not logged'}): start {_fmt(dpo_start)}, end {_fmt(dpo_end)} over "
              f"{len(dpo_pts)} logged steps.", ""]

    lines += ["## Evaluation", "", "What each training stage changed (served checkpoint, greedy chain of thought, "
              "held-out speakers; brackets: 95% bootstrap intervals over the clips):", ""]
    rows = []
    for name in ("sft", "grpo", "dpo"):
        s = cot(name)
        rows.append([name, _with_interval(s, "classification", "accuracy"),
                     _with_interval(s, "classification", "balanced_accuracy"),
                     _with_interval(s, "distribution", "js_divergence"),
                     _with_interval(s, "reasoning", "format_validity"),
                     _with_interval(s, "reasoning", "cue_hallucination_rate"),
                     str(next(iter(s.get("intervals", {}).values()), {}).get("n", evals[name].get("items")))])
    lines += _table(["checkpoint", "WA", "UA", "JS div", "format validity", "cue hallucination", "n"], rows) + [""]
    lines += checkpoint_comparison({name: Path(stages["evaluate"][name]).parent for name in ("sft", "grpo", "dpo")},
                                   out / "compare", relative_to=out)
    lines += ["Test-time-scaling strategies on the final checkpoint, against tokens spent:", ""]
    lines += _table(["strategy", "WA", "UA", "macro F1", "JS div", "format validity", "tokens/item",
                     "requests/item", "failed"], _strategy_rows(final)) + [""]

    lines += ["## Ambiguity", "", "Final checkpoint, by entropy of the annotator distribution:", ""]
    rows = []
    for name, s in final["strategies"].items():
        amb = s["metrics"].get("ambiguity")
        if not amb:
            continue
        for b in amb["bin_order"]:
            g = amb["by_group"][b]
            rows.append([name, b, str(g["count"]), _fmt(g.get("accuracy")), _fmt(g.get("js_divergence"))])
    lines += (_table(["strategy", "ambiguity bin", "n", "accuracy", "JS div"], rows) if rows
              else ["(no ambiguity breakdown in the evaluation report)"]) + [""]

    lines += ["## Plots", ""]
    if training_plot:
        lines.append(f"![training](plots/{training_plot.name})")
    if reasoning_plot:
        lines.append(f"![reasoning switch](plots/{reasoning_plot.name})")
    lines += [f"![{p.stem}](plots/{p.name})" for p in copied] + [""]
    lines += ["## Reproduce", "", "```bash", "make demo            # or: emoreason demo --out runs/demo",
              "emoreason demo --force sft   # redo SFT and every stage after it", "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _with_interval(strategy: dict, group: str, key: str) -> str:
    value = strategy["metrics"].get(group, {}).get(key)
    interval = strategy.get("intervals", {}).get(f"{group}.{key}")
    if interval is None or interval.get("low") is None:
        return _fmt(value)
    return f"{_fmt(value)} [{interval['low']:.3f}, {interval['high']:.3f}]"


# The checkpoint chain the demo trains, and the metrics its comparison reports.
CHAIN = (("sft", "grpo"), ("grpo", "dpo"), ("sft", "dpo"))
COMPARED = ("classification.accuracy", "classification.balanced_accuracy", "distribution.js_divergence",
            "reasoning.format_validity", "reasoning.cue_hallucination_rate")


def checkpoint_comparison(eval_dirs: dict[str, Path], out: Path, relative_to: Path | None = None,
                          strategy: str = "cot_greedy") -> list[str]:
    """`emoreason report compare` along SFT -> GRPO -> DPO (and SFT -> DPO): each pair's page under ``out`` and
    report lines with the paired differences, their 95% intervals and tests, and the flipped clips."""
    from ..eval.compare import CompareError, difference_rows, write_compare

    lines = [f"Paired differences along the chain ({strategy}, the same clips; B - A with a 95% paired-bootstrap "
             "interval; p: McNemar for accuracy, the paired bootstrap otherwise). A difference whose interval "
             "holds 0 is not shown to be one by these clips:", ""]
    rows, pages = [], []
    for a, b in CHAIN:
        try:
            result = write_compare(eval_dirs[a], eval_dirs[b], out / f"{a}-{b}", labels=(a.upper(), b.upper()))
        except CompareError as err:
            lines += [f"- {a} -> {b}: no comparison ({err})"]
            continue
        if strategy not in result["strategies"]:
            continue
        flips = result["strategies"][strategy]["flips"]
        for row in difference_rows({"strategies": {strategy: result["strategies"][strategy]}}, COMPARED):
            rows.append([f"{a} -> {b}"] + row[1:])
        page = Path(result["files"]["html"])
        pages.append(f"- {a} -> {b}: {len(flips['right_to_wrong'])} clip(s) right -> wrong, "
                     f"{len(flips['wrong_to_right'])} wrong -> right; browse them: "
                     f"`{page.relative_to(relative_to) if relative_to else page}`")
    if rows:
        lines += _table(["pair", "metric", "A", "B", "B - A", "95% interval", "p", "test"], rows) + [""]
    return lines + pages + ["", "Each run's clips, one row each (audio, annotators' and model's distributions, the "
                                "rationale's cue claims checked against the measurements): `eval/<checkpoint>/"
                                "report.html`.", ""]


def _tower_warmup_section(base: dict | None) -> list[str]:
    """What the tower's prosody warm-up is and why it exists, with its loss."""
    tower = (base or {}).get("tower_warmup")
    if not tower:
        return ["(no tower warm-up in this run: the paralinguistic tower is random)", ""]
    return ["## The model's paralinguistic tower", "",
            "Real recipes use a pretrained WavLM, whose frozen states carry pitch, loudness and tempo. The demo's "
            "WavLM is a random tiny network, which keeps little of that, so before anything else it gets a short, "
            f"label-free **prosody warm-up** (`emoreason warmup-tower`): {tower.get('epochs')} epochs regressing, "
            "from its states, the frame-level pitch, voicing and energy and the clip-level measures the data generator "
            f"describes clips with, on the {tower.get('clips')} training clips only (no emotion labels; held-out "
            f"voices never heard). Loss {_fmt(tower.get('first_epoch_loss'))} -> {_fmt(tower.get('last_epoch_loss'))} "
            f"in {_fmt(tower.get('seconds'), 0)} s. The towers are frozen from then on, as a pretrained WavLM is.", ""]


def _self_teacher_section(warmup: dict | None, self_teacher: dict | None) -> list[str]:
    """What the warm-up is, and what the backbone wrote as the `self` teacher: kept/rejected by reason, examples."""
    if not warmup or not self_teacher:
        return ["(no warm-up / self-teacher stage in this run)", ""]
    summary = self_teacher["summary"]
    rejections = summary.get("rejections_by_reason", {})
    samples = self_teacher.get("samples") or 0
    judged = sum(rejections.values()) + summary.get("kept", 0)
    lines = ["### The backbone as its own teacher (`self`)", "",
             "A real backbone (an instruct LLM) can follow the rationale prompt; the demo's backbone is a random tiny "
             "LLM, which cannot write a single well-formed rationale (before the warm-up every sample failed the "
             "format filter). So the demo first gives it a short **text warm-up**: "
             f"{warmup.get('epochs', 'n/a')} epochs of text-only fine-tuning of the LLM (the towers and projector "
             "untouched) on the template teacher's (prompt -> kept rationale) chats of the **train split only** "
             "(`data/teacher_chats.jsonl`, `emoreason train warmup`; test-split chats are refused). Warm-up loss "
             f"{_fmt(warmup.get('results', {}).get('train_loss'))} (mean over the run). The warmed-up backbone then "
             "writes rationales from each training clip's text description, and they pass the same filters as any "
             "teacher's:", ""]
    lines += _table(["clips", "samples written", "samples judged", "clips kept", "kept rate (clips)",
                     "rejections by reason"],
                    [[str(summary.get("inputs")), str(samples), str(judged), str(summary.get("kept")),
                      _fmt(summary.get("kept", 0) / summary["inputs"] if summary.get("inputs") else None),
                      ", ".join(f"{k} {v}" for k, v in rejections.items()) or "none"]])
    lines += ["", f"SFT trains on {self_teacher.get('self_written_in_sft', 0)} self-written rationales; the "
              "template's rationales fill the other clips (`data-self/sft-records.jsonl`). SFT starts from the "
              "warmed-up backbone.", "", "Kept rationales, verbatim:", ""]
    lines += ["```text\n" + text.strip() + "\n```" for text in self_teacher.get("kept_examples", [])] or ["(none)"]
    rejected = self_teacher.get("rejected_examples") or []
    if rejected:
        lines += ["", "Rejected, with the filter's reason:", ""]
        lines += [f"- `{r['reason']}` ({r['detail']}):\n\n```text\n{(r['text'] or '').strip()}\n```"
                  for r in rejected]
    return lines + [""]


def _compact_summary(summary: dict) -> dict:
    keep = ("inputs", "kept", "dropped", "bad_audio", "rejections_by_reason", "dropped_by_reason", "pairs",
            "pair_negatives_by_kind", "elapsed_seconds")
    compact = {k: summary[k] for k in keep if k in summary}
    return compact or summary

"""promote: does tonight's candidate beat the model in service? Record the decision in the registry.

The gate, on the same evaluation under identical flags:
- the target task's metric must beat the base model and the champion (the adapter in service,
  re-scored tonight as `evaluate[champion]`) by strictly more than `promote.min_delta` (default
  0.005; `min_delta_vs_champion` overrides it for the champion, a negative value being an opt-in
  tolerance): a tie is no evidence, so it keeps the model in service ("no better than the champion");
- no guard task may drop by more than `max_guard_drop` against the champion (against base on the
  first night, when there is no champion: the gate says so);
- the general-text loss (evaluate.forgetting) may rise by at most `max_forgetting` over base's;
- a paired McNemar test on per-item correctness of the target task (candidate vs champion, or vs
  base on the first night) reports whether the difference is significant; with
  `require_significance` the gate demands it.

Every decision is appended to the pipeline's registry (`{artifact_root}/registry/{name}/history.jsonl`);
the champion is derived from that history (`registry/{name}/champion.json`, mirrored to
`latest.json`; synthtune.registry). The summary says what the decision did to the model in service
(`outcome`): a first champion, a new one, the same one, one promoted again, or nothing; a verdict
reused from an earlier run says "unchanged: X is still the champion". Either way the
comparison (base, champion, tuned, deltas, stderrs), a bar chart and the items that flipped are
written next to the verdict.

Run as: synthtune promote configs/demo.yaml
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from synthtune import cards, slices
from synthtune.configs import FORGETTING, PromoteConfig
from synthtune.keys import key_payload, stage_key
from synthtune.registry import Registry, adapter_path
from synthtune.store import ArtifactRef, ArtifactStore, Staging, current_run_id, produce

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig

__all__ = ["PromoteConfig", "comparison", "decide", "key", "mcnemar", "run"]

STAGE = "promote"
log = logging.getLogger("synthtune.promote")
DATA_STAGES = ("template", "filter", "generate")
VERSION = "3"


def key(cfg: PipelineConfig, upstream: dict[str, str]) -> str:
    """The gate's settings and the digests of what it compares: the base, tuned and champion
    evaluations and the candidate's train output."""
    return stage_key(STAGE, VERSION, {"promote": key_payload(cfg.promote)}, upstream)


def _r(value, digits: int = 4):
    """A score rounded to what it means (4 decimals; a stderr to 3); large values (perplexities) kept as they are."""
    if not isinstance(value, float) or abs(value) >= 1e4:
        return value
    return round(value, digits)


def comparison(base: dict, tuned: dict, champion: dict | None = None) -> list[dict]:
    """One row per task and metric: base, champion, tuned, deltas, and the stderrs."""
    champion = champion or {}
    rows = []
    for task in sorted(set(base) | set(tuned)):
        for metric in sorted(set(base.get(task, {})) | set(tuned.get(task, {}))):
            if metric.endswith("_stderr"):
                continue
            b, t = base.get(task, {}).get(metric), tuned.get(task, {}).get(metric)
            c = champion.get(task, {}).get(metric)
            # the columns people compare first (base, champion, tuned, the deltas), the stderrs after them
            row = {"task": task, "metric": metric, "base": _r(b)}
            if champion:
                row["champion"] = _r(c)
            row.update(tuned=_r(t), delta=None if b is None or t is None else _r(t - b))
            if champion:
                row["delta_vs_champion"] = None if c is None or t is None else _r(t - c)
            row.update(base_stderr=_r(base.get(task, {}).get(f"{metric}_stderr"), 3),
                       tuned_stderr=_r(tuned.get(task, {}).get(f"{metric}_stderr"), 3))
            if champion:
                row["champion_stderr"] = _r(champion.get(task, {}).get(f"{metric}_stderr"), 3)
            rows.append(row)
    return rows


def mcnemar(tuned_right: dict[int, bool], other_right: dict[int, bool]) -> tuple[int, int, float]:
    """Exact paired McNemar test over the items both were scored on: (right only for tuned, right
    only for the other, two-sided p-value)."""
    common = set(tuned_right) & set(other_right)
    b = sum(tuned_right[i] and not other_right[i] for i in common)
    c = sum(other_right[i] and not tuned_right[i] for i in common)
    return b, c, slices.mcnemar(b, c)


def decide(pc: PromoteConfig, base: dict, tuned: dict, champion: dict | None = None, champion_key: str | None = None,
           paired: tuple[int, int, float] | None = None, in_service: str | None = None,
           sliced: list[dict] | None = None) -> tuple[bool, list[str]]:
    """(promote?, one line per rule with the numbers). `paired` is the McNemar result vs the reference;
    `in_service` names the champion when it is not re-scored because it is tonight's candidate; `sliced`
    is the per-slice table (synthtune.slices) vs the reference."""
    lines, ok = [], True
    if champion is None:
        lines.append(f"{in_service} is already the champion: nothing else to compare with, the gate is vs base only"
                     if in_service else "no champion yet: the gate is vs base only")

    def rule(role: str, task: str, ref_name: str, ref: dict, needs: str, passes) -> None:
        nonlocal ok
        r, t = ref.get(task, {}).get(pc.metric), tuned.get(task, {}).get(pc.metric)
        if r is None or t is None:
            ok = False
            lines.append(f"{role} {task}/{pc.metric}: missing ({ref_name}={r}, tuned={t}) FAILED")
            return
        passed = passes(t - r)
        verdict = "ok" if passed else "FAILED"
        if not passed and role == "target":
            who = "base" if ref_name == "base" else "the champion"
            verdict += f": {'worse than' if t < r else 'no better than'} {who}"
        lines.append(f"{role} {task}/{pc.metric}: tuned {t:.4f} vs {ref_name} {r:.4f} ({t - r:+.4f}; {needs}) {verdict}")
        ok = ok and passed

    # strictly more than the margin: a tie (or a gain within it) is no evidence, the model in service stays
    rule("target", pc.target_task, "base", base, f"needs > {pc.min_delta:+.4f}", lambda d: d > pc.min_delta)
    champ = f"champion {champion_key}" if champion_key else "champion"
    if champion is not None:
        rule("target", pc.target_task, champ, champion, f"needs > {pc.champion_delta:+.4f}",
             lambda d: d > pc.champion_delta)
    ref_name, ref = (champ, champion) if champion is not None else ("base", base)
    for g in pc.guard_tasks:
        rule("guard", g, ref_name, ref, f"may drop at most {pc.max_guard_drop:.4f}", lambda d: -d <= pc.max_guard_drop)
    if sliced:
        worse = slices.regressions(sliced, pc.significance_level)
        for r in worse:
            lines.append(f"slice {r['task']}/{r['slice']}: tuned {r['tuned']:.4f} vs {ref_name} {r['reference']:.4f} "
                         f"({r['delta']:+.4f}; {r['reference_only']} items right only for {ref_name}, "
                         f"{r['tuned_only']} only for tuned; p = {r['p']:.3g}, {r['p_holm']:.3g} after Holm over "
                         f"{len(sliced)} slices) FAILED: significant regression")
        if not worse:
            lines.append(f"slices: {len(sliced)} slices of {', '.join(sorted({r['task'] for r in sliced}))}, no "
                         f"significant regression vs {ref_name} after Holm (smallest adjusted p = "
                         f"{min(r['p_holm'] for r in sliced):.3g}) ok")
        ok = ok and not worse
    if (forgot := forgetting_line(pc, base, tuned, champion)) is not None:
        line, passed = forgot
        lines.append(line)
        ok = ok and passed
    if paired is not None:
        b, c, p = paired
        significant = p < pc.significance_level
        line = (f"paired McNemar on {pc.target_task}: {b} items right only for tuned, {c} only for {ref_name}, "
                f"p = {p:.3g} ({'significant' if significant else 'not significant'} at {pc.significance_level})")
        if pc.require_significance:
            line += " ok" if significant else " FAILED (promote.require_significance)"
            ok = ok and significant
        lines.append(line)
    return ok, lines


def forgetting(base: dict, tuned: dict, champion: dict | None) -> dict | None:
    """The general-text loss of base, champion and tuned, and tuned's rise over base (None: not measured)."""
    b, t = base.get(FORGETTING, {}).get("loss"), tuned.get(FORGETTING, {}).get("loss")
    if b is None or t is None:
        return None
    return {"base": b, "champion": (champion or {}).get(FORGETTING, {}).get("loss"), "tuned": t,
            "rise": round((t - b) / b, 4) if b > 0 else None}


def forgetting_line(pc: PromoteConfig, base: dict, tuned: dict, champion: dict | None) -> tuple[str, bool] | None:
    """The general-text loss (evaluate.forgetting) of tuned against base, the champion's alongside: its
    relative rise over base may be at most promote.max_forgetting. None when it was not measured."""
    b, t = base.get(FORGETTING, {}).get("loss"), tuned.get(FORGETTING, {}).get("loss")
    if b is None and t is None:
        return None
    if b is None or t is None or b <= 0:
        return f"forgetting: general-text loss missing (base={b}, tuned={t}) FAILED", False
    rise = (t - b) / b
    c = (champion or {}).get(FORGETTING, {}).get("loss")
    champ = f"; champion {c:.4f}" if c is not None else ""
    if pc.max_forgetting is None:
        return f"forgetting: general-text loss tuned {t:.4f} vs base {b:.4f} ({rise:+.1%}{champ}; not gated)", True
    passed = rise <= pc.max_forgetting
    return (f"forgetting: general-text loss tuned {t:.4f} vs base {b:.4f} ({rise:+.1%}{champ}; may rise at most "
            f"{pc.max_forgetting:.1%}) {'ok' if passed else 'FAILED: forgot too much'}"), passed


def correct(path: Path, metric: str) -> dict[int, bool]:
    """doc_id -> scored right? from an lm-eval samples file (nothing when the file is missing)."""
    return {i: bool(row[metric]) for i, row in slices.read_samples(path).items() if metric in row}


def _answer(sample: dict) -> str | None:
    """What the model answered on a multiple-choice item: the choice it scored highest."""
    doc, resps = sample.get("doc") or {}, sample.get("filtered_resps") or []
    choices = doc.get("choices")
    try:
        lls = [r[0] if isinstance(r, list | tuple) else r for r in resps]
        if isinstance(choices, list) and len(lls) == len(choices):
            return str(choices[max(range(len(lls)), key=lambda i: float(lls[i]))])
    except (TypeError, ValueError):
        pass
    return None


def flip_rows(base_dir: Path, tuned_dir: Path, metric: str) -> dict[str, list[dict]]:
    """Per task scored on both sides, the items that flipped between base and tuned (one reading of the
    samples for `flips` and `flipped_items`): which way, the item's label, id and question, and what
    base and tuned answered (multiple choice: the choice each scored highest)."""
    out: dict[str, list[dict]] = {}
    for path in sorted(base_dir.glob("samples_*.jsonl")):
        task, other = path.stem.removeprefix("samples_"), tuned_dir / path.name
        if not other.exists():
            continue
        base, tuned = slices.read_samples(path), slices.read_samples(other)
        out[task] = []
        for i in sorted(set(base) & set(tuned)):
            b, t = base[i], tuned[i]
            if metric not in b or metric not in t or bool(b[metric]) == bool(t[metric]):
                continue
            doc = b.get("doc") or {}
            out[task].append({
                "direction": "wrong_to_right" if t[metric] else "right_to_wrong", "item": str(doc.get("id", i)),
                "label": str(doc.get("id") or doc.get("question") or i)[:120],
                "question": str(doc.get("question") or doc.get("prompt") or doc.get("text") or "")[:200],
                "base": _answer(b), "tuned": _answer(t)})
    return out


def flips(rows: dict[str, list[dict]]) -> dict[str, dict[str, list[str]]]:
    """Per task, the labels of the items that went right->wrong and wrong->right."""
    return {task: {way: [r["label"] for r in flipped if r["direction"] == way]
                   for way in ("right_to_wrong", "wrong_to_right")} for task, flipped in rows.items()}


def flipped_items(rows: dict[str, list[dict]], most: int = 50) -> list[dict]:
    """The flips for people (the eval-flips artifact): task, which way, item, question, both answers."""
    return [{"task": task, **{k: r[k] for k in ("direction", "item", "question", "base", "tuned")}}
            for task, flipped in rows.items() for r in flipped][:most]


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r["base"] is not None and r["tuned"] is not None]
    sides = [("base", "#8c8c8c")] + ([("champion", "#dd8452")] if any("champion" in r for r in rows) else []) + [
        ("tuned", "#4c72b0")]
    width = 0.8 / len(sides)
    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(4, 1.8 * len(rows) + 1), 3.4))
    for n, (side, color) in enumerate(sides):
        ax.bar(x + (n - (len(sides) - 1) / 2) * width, [r.get(side) or 0 for r in rows], width, label=side, color=color,
               yerr=[r.get(f"{side}_stderr") or 0 for r in rows], capsize=3)
    ax.set_xticks(x, labels)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def data_keys(store: ArtifactStore, train: ArtifactRef) -> dict[str, str]:
    """The data stage keys behind an adapter (template, filter, generate), from the manifests."""
    return store.lineage("train", train.key, DATA_STAGES)


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef], output_key: str | None = None,
        rebuild: bool = False) -> ArtifactRef:
    """Decide on upstream['tuned'] (the adapter of upstream['train']) against upstream['base'] and, when
    there is one, upstream['champion'] (the champion's evaluation under the same flags); the decision
    goes to the registry."""
    base, tuned, train = upstream["base"], upstream["tuned"], upstream["train"]
    champion_eval = upstream.get("champion")
    pc = cfg.promote
    ups = {name: ref.key for name, ref in upstream.items()}
    k = output_key or key(cfg, {name: ref.digest for name, ref in upstream.items()})
    registry = Registry(store, cfg.name)

    def build(staging: Staging) -> None:
        backends = {role: ref.summary.get("backend", "hf") for role, ref in
                    (("base", base), ("tuned", tuned), ("champion", champion_eval)) if ref is not None}
        if len(set(backends.values())) > 1:
            raise ValueError("refusing to compare scores from different evaluate backends ("
                             + ", ".join(f"{r} {b}" for r, b in backends.items()) + "): rerun them on one backend")
        b, t = base.summary["scores"], tuned.summary["scores"]
        c = champion_eval.summary["scores"] if champion_eval else None
        champion_key = champion_eval.summary.get("adapter_key") if champion_eval else None
        reference = champion_eval or base
        with store.local_copy(tuned) as tuned_dir, store.local_copy(reference) as ref_dir, \
                store.local_copy(base) as base_dir:
            samples = f"samples_{pc.target_task}.jsonl"
            paired = mcnemar(correct(tuned_dir / samples, pc.metric), correct(ref_dir / samples, pc.metric))
            flipped_by_task = flip_rows(base_dir, tuned_dir, pc.metric)
            sliced = slices.table([pc.target_task, *pc.guard_tasks], tuned_dir, ref_dir, pc.metric,
                                  cfg.evaluate.slice_field)
        flipped, forgot = flips(flipped_by_task), forgetting(b, t, c)
        serving = registry.champion()
        in_service = serving["train_key"] if serving and serving["train_key"] == train.key else None
        promoted, reasons = decide(pc, b, t, c, champion_key, paired, in_service, sliced)
        rows = comparison(b, t, c)
        chart(rows, staging.path / "comparison.png", f"{cfg.name}: base vs champion vs tuned" if c else
              f"{cfg.name}: base vs tuned")
        adapter = store.uri(train.stage, train.key, "adapter")
        if promoted and not store.fs.exists(store.path(train.stage, train.key, "adapter")):
            raise FileNotFoundError(f"refusing to promote {train.key}: its adapter is missing at {adapter}; rerun train")
        event = {"id": k, "run_id": current_run_id(), "student": cfg.student, "train_key": train.key,
                 "adapter": adapter_path(train.key), "data_keys": data_keys(store, train),
                 "config_sha256": config_sha256(cfg), "config": cfg.model_dump(mode="json") if promoted else None,
                 "scores": t, "base_scores": b, "champion_scores": c, "champion_train_key": champion_key,
                 "promoted": promoted, "reasons": reasons, "p_value": paired[2],
                 "forgetting": forgot, "worst_slice": sliced[0] if sliced else None}
        _, before, after = registry.decide(event)
        result = outcome(registry, train.key, promoted, before, after)
        verdict = {"promoted": promoted, "outcome": result, "reasons": reasons, "comparison": rows, "flips": flipped,
                   "flipped_items": flipped_items(flipped_by_task),
                   "adapter": adapter_path(train.key),
                   "train_key": train.key, "base_eval": base.key, "tuned_eval": tuned.key,
                   "champion_eval": champion_eval.key if champion_eval else None, "champion_train_key": champion_key,
                   "mcnemar": {"tuned_only": paired[0], "reference_only": paired[1], "p_value": paired[2]},
                   "slices": sliced, "forgetting": forgot}
        (staging.path / "verdict.json").write_text(json.dumps(verdict, indent=2))
        _complete_card(store, train, cfg.name, rows, promoted, reasons)
        staging.metrics.update(slices=sliced, forgetting=forgot, promoted=promoted, outcome=result,
                               in_service=after and after["train_key"],
                               reasons=reasons, comparison=rows, champion_train_key=champion_key, p_value=paired[2],
                               train_key=train.key,
                               flips={task: {k_: len(v) for k_, v in f.items()} for task, f in flipped.items()})

    ref = produce(store, STAGE, k, ups, key_payload(cfg.promote), build, rebuild)
    if ref.reused:  # nothing was decided now: say what is in service, not what was decided back then
        serving = registry.champion()
        now_in = serving["train_key"] if serving else None
        ref = ref.model_copy(update={"summary": {
            **ref.summary, "in_service": now_in,
            "outcome": f"unchanged: {now_in} is still the champion" if now_in else "unchanged: no champion yet"}})
    return ref


def outcome(registry: Registry, candidate: str, promoted: bool, before: dict | None, after: dict | None) -> str:
    """What the decision did to the model in service, in words: a first champion, a new one, the same
    one again, one promoted again after a rollback, or nothing."""
    was = before and before["train_key"]
    if not promoted:
        return f"NOT promoted: {was} stays in service" if was else "NOT promoted: there is still no champion"
    if was == candidate:
        return f"{candidate} is already the champion: it stays in service"
    history = registry.history()
    at = next((n for n, e in enumerate(history) if e.get("id") == (after or {}).get("event_id")), len(history))
    earlier = [e for e in history[:at] if e.get("event") == "decision" and e.get("promoted") and e["train_key"] == candidate]
    if not was:
        return f"PROMOTED: {candidate} is the first champion"
    if earlier:
        return f"PROMOTED again: {candidate} replaces {was} (it was the champion before, from {earlier[0].get('time')})"
    return f"PROMOTED: {candidate} replaces {was}"


def _complete_card(store: ArtifactStore, train: ArtifactRef, name: str, rows: list[dict], promoted: bool,
                   reasons: list[str]) -> None:
    """The adapter's model card gains its evaluation table and verdict."""
    rel = "adapter/README.md"
    try:
        card = store.fs.cat_file(store.path(train.stage, train.key, rel)).decode()
        store.annotate(train.stage, train.key, rel, cards.with_evaluation(card, name, rows, promoted, reasons))
    except (FileNotFoundError, ValueError, AttributeError) as e:  # a card another version wrote: leave it
        log.warning("model card of %s not completed: %s", train.key, e)


def config_sha256(cfg: PipelineConfig) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode()).hexdigest()

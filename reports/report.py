"""The sweep report: one offline HTML file (plotly.js embedded) and a CSV of every trial.

Built from the Optuna study (history, importances, parallel coordinates, T x alpha contour, per-epoch
curves) and from MLflow (the teacher, the sweep's plain student, the best students: validation and
evaluation accuracy, size, latency, Pareto front; the distillation gain with its interval). Written to ``report.output_dir`` and logged on the
sweep's parent run under ``report/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from optuna import visualization as vis
from optuna.trial import FrozenTrial, TrialState

from kdlib import registry, tracking
from kdlib.config import ExperimentConfig
from kdlib.data import load_split
from kdlib.errors import KDError
from kdlib.inference import batch1_times, footprint, load_backend, sentence_stream
from kdlib.registry import EVAL_METRIC, METRIC
from search.baseline import GAIN
from search.study import EVAL_ATTR, MODEL_ATTR, ROOT_ATTR, RUN_ATTR, STUDY_TAG, load_study

ARTIFACT_DIR = "report"
CONTOUR = ("distill.temperature", "distill.alpha")
LATENCY_ROUNDS = 5


@dataclass(frozen=True)
class ModelRow:
    model: str  # "teacher", "plain student", "trial 3"
    model_uri: str
    run_id: str
    val_accuracy: float
    eval_accuracy: float | None  # None for a run made before evaluation was scored separately
    parameters: int
    size_mb: float
    latency_ms: float | None  # batch-1 p50; None when report.latency_calls is 0


@dataclass(frozen=True)
class Report:
    study_name: str
    sweep_run_id: str
    html: Path
    csv: Path
    figures: dict[str, go.Figure]
    table: pd.DataFrame


def _done(study: optuna.Study, state: TrialState) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(state,))


def _best(study: optuna.Study, k: int) -> list[FrozenTrial]:
    return sorted(_done(study, TrialState.COMPLETE), key=lambda t: t.value, reverse=True)[:k]


def _plain_student(cfg: ExperimentConfig, study_name: str):
    """This sweep's plain student, else the newest student trained on hard labels only (distill.alpha = 0), or None."""
    finished = "attributes.status = 'FINISHED'"
    ours = tracking.find_runs(
        cfg.name, f"{finished} and tags.`{tracking.ROLE_TAG}` = '{registry.Role.PLAIN_STUDENT}' and tags.`{STUDY_TAG}` = '{study_name}'"
    )
    if ours:
        return ours[0]
    runs = tracking.find_runs(cfg.name, f"{finished} and params.`distill.alpha` LIKE '0%'")
    roles = (registry.Role.STUDENT, registry.Role.PLAIN_STUDENT)
    plain = (r for r in runs if r.data.tags.get(tracking.ROLE_TAG) in roles and float(r.data.params["distill.alpha"]) == 0.0)
    return next(plain, None)


def _candidates(cfg: ExperimentConfig, study: optuna.Study) -> list[tuple[str, str, str, float, float | None]]:
    """(label, model URI, run id, validation accuracy, evaluation accuracy) of the teacher, the plain student and the best trials."""
    out = []
    teacher = registry.champion(registry.teacher_model_name(cfg))
    if teacher is not None:
        metrics = tracking.get_run(teacher.run_id).data.metrics
        out.append(("teacher", f"models:/{teacher.name}/{teacher.version}", teacher.run_id, metrics[METRIC], metrics.get(EVAL_METRIC)))
    plain = _plain_student(cfg, study.study_name)
    if plain is not None:
        metrics = plain.data.metrics
        out.append(("plain student", f"runs:/{plain.info.run_id}/{tracking.MODEL}", plain.info.run_id, metrics[METRIC], metrics.get(EVAL_METRIC)))
    for trial in _best(study, cfg.report.top_k):
        out.append((f"trial {trial.number}", trial.user_attrs[MODEL_ATTR], trial.user_attrs[RUN_ATTR], trial.value, trial.user_attrs.get(EVAL_ATTR)))
    return out


def model_rows(cfg: ExperimentConfig, study: optuna.Study) -> list[ModelRow]:
    """Size and batch-1 latency (PyTorch fp32, p50) of each candidate, measured now on the eval split.

    The models take turns in rounds, so a slow spell of the host slows them all alike rather than
    deciding which one looks faster.
    """
    pick = sentence_stream(load_split(cfg.data, cfg.data.eval_split, cfg.data.max_eval_examples).texts)
    calls = cfg.report.latency_calls
    with contextlib.ExitStack() as folders:
        loaded = []
        for label, uri, run_id, val_accuracy, eval_accuracy in _candidates(cfg, study):
            source = registry.fetch_model(uri, folders.enter_context(tempfile.TemporaryDirectory(prefix="kd-report-")))
            backend = load_backend(source, "fp32", threads=cfg.evaluate.threads or 0)
            loaded.append((ModelRow(label, uri, run_id, val_accuracy, eval_accuracy, *footprint(source, backend), latency_ms=None), backend))
        times = {row.model: [] for row, _ in loaded}
        if calls:
            for _, backend in loaded:
                batch1_times(backend, pick, 0, cfg.evaluate.warmup)
            per_round = -(-calls // LATENCY_ROUNDS)
            for round_ in range(LATENCY_ROUNDS):
                for row, backend in loaded:
                    times[row.model] += batch1_times(backend, pick, round_ * per_round, per_round)
    return [dataclasses.replace(row, latency_ms=1e3 * float(np.median(times[row.model])) if calls else None) for row, _ in loaded]


def pareto(rows: list[ModelRow]) -> set[str]:
    """Models no other model beats on both validation accuracy (higher) and latency (lower).

    Validation, not evaluation: the front is a choice, and choices are made on validation only.
    """
    timed = sorted((r for r in rows if r.latency_ms is not None), key=lambda r: (r.latency_ms, -r.val_accuracy))
    front, best = set(), float("-inf")
    for row in timed:
        if row.val_accuracy > best:
            front.add(row.model)
            best = row.val_accuracy
    return front


def models_table(rows: list[ModelRow], study: optuna.Study) -> pd.DataFrame:
    front = pareto(rows)
    params = {f"trial {t.number}": t.params for t in study.trials}
    return pd.DataFrame(
        [
            {
                "model": r.model,
                METRIC: round(r.val_accuracy, 4),
                EVAL_METRIC: None if r.eval_accuracy is None else round(r.eval_accuracy, 4),
                registry.GAP: None if r.eval_accuracy is None else round(r.val_accuracy - r.eval_accuracy, 4),
                "parameters_M": round(r.parameters / 1e6, 2),
                "size_MB": round(r.size_mb, 1),
                "latency_batch1_p50_ms": None if r.latency_ms is None else round(r.latency_ms, 2),
                "pareto_front": r.model in front,
                "settings": ", ".join(f"{k.split('.')[-1]}={v:.4g}" for k, v in params.get(r.model, {}).items()),
                "model_uri": r.model_uri,
                "run_id": r.run_id,
            }
            for r in rows
        ]
    )


def epoch_curves(study: optuna.Study, k: int) -> go.Figure:
    """Validation accuracy per epoch: the k best finished trials, and every pruned trial (dashed, x at the cut)."""
    fig = go.Figure()
    for trial in _best(study, k):
        steps = sorted(trial.intermediate_values)
        fig.add_scatter(x=steps, y=[trial.intermediate_values[s] for s in steps], mode="lines+markers", name=f"trial {trial.number}")
    for trial in _done(study, TrialState.PRUNED):
        steps = sorted(trial.intermediate_values)
        fig.add_scatter(
            x=steps,
            y=[trial.intermediate_values[s] for s in steps],
            mode="lines+markers",
            name=f"trial {trial.number} (pruned)",
            line={"dash": "dash", "color": "grey"},
            marker={"symbol": ["circle"] * (len(steps) - 1) + ["x"], "size": 10},
        )
    fig.update_layout(title=f"Validation accuracy per epoch: best {k} trials and pruned trials", xaxis_title="epoch", yaxis_title=METRIC)
    return fig


def latency_scatter(table: pd.DataFrame) -> go.Figure:
    timed = table.dropna(subset=["latency_batch1_p50_ms"])
    fig = go.Figure()
    fig.add_scatter(
        x=timed["latency_batch1_p50_ms"],
        y=timed[METRIC],
        mode="markers+text",
        text=timed["model"],
        textposition="top center",
        marker={"size": 12, "color": ["crimson" if p else "steelblue" for p in timed["pareto_front"]]},
        name="models",
    )
    front = timed[timed["pareto_front"]].sort_values("latency_batch1_p50_ms")
    fig.add_scatter(x=front["latency_batch1_p50_ms"], y=front[METRIC], mode="lines", line={"color": "crimson", "dash": "dot"}, name="Pareto front")
    fig.update_layout(title="Validation accuracy versus batch-1 latency (PyTorch fp32, p50)", xaxis_title="latency (ms)", yaxis_title=METRIC)
    return fig


def study_figures(study: optuna.Study, k: int) -> dict[str, go.Figure]:
    """Optuna's own plots; those that need more finished trials than the study has are left out."""
    searched = sorted({name for t in study.trials for name in t.params})
    makers = {
        "history": lambda: vis.plot_optimization_history(study),
        "importances": lambda: vis.plot_param_importances(study),
        "parallel": lambda: vis.plot_parallel_coordinate(study, params=searched),
        "contour": lambda: vis.plot_contour(study, params=list(CONTOUR)) if set(CONTOUR) <= set(searched) else vis.plot_slice(study),
    }
    figures = {}
    enough = len(_done(study, TrialState.COMPLETE)) >= 2
    for key, make in makers.items():
        if key == "history" or enough:
            figures[key] = make()
    figures["curves"] = epoch_curves(study, k)
    return figures


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    frame = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "intermediate_values", "duration"))
    return frame.rename(columns={"value": METRIC})


# Shown in the page if any script fails, so a broken report never looks like an empty one.
ERROR_HOOK = """<script>
window.addEventListener('error', function (e) {
  var box = document.getElementById('kd-errors');
  box.hidden = false;
  box.insertAdjacentHTML('beforeend', '<li class="kd-error">' + String(e.message).replace(/</g, '&lt;') + '</li>');
});
</script>"""

STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 0.9rem; display: block; overflow-x: auto; } td, th { border: 1px solid #ccc; padding: 0.3rem 0.6rem; }
#kd-errors { color: #b00; border: 2px solid #b00; padding: 0.5rem 2rem; }
</style>"""

SECTIONS = {
    "history": "Optimisation history",
    "importances": "Parameter importances (fANOVA)",
    "parallel": "Parallel coordinates: settings against validation accuracy",
    "contour": "Temperature x alpha",
    "curves": "Per-epoch validation accuracy",
    "gain": "Does distillation pay? Teacher, plain student and best student on validation and evaluation",
    "models": "Teacher, plain student and best students: accuracy versus latency",
}


def sweep_gain(cfg: ExperimentConfig, study_name: str) -> dict[str, float] | None:
    """The distillation gain the sweep logged (the newest, if it was resumed), or None."""
    runs = tracking.find_runs(
        cfg.name, f"tags.`{tracking.ROLE_TAG}` = '{registry.Role.SWEEP}' and tags.`{STUDY_TAG}` = '{study_name}' and metrics.`{GAIN}` > -2"
    )
    return dict(runs[0].data.metrics) if runs else None


def gain_text(gain: dict[str, float] | None) -> str:
    if gain is None:
        return "<p>No plain student yet: the sweep trains one when it ends (unless search.plain_baseline is false).</p>"
    return (
        f"<p id='gain-summary'>Distillation gain on the evaluation split, which no choice looked at: <b>{100 * gain[GAIN]:+.2f} points</b> "
        f"(95% paired-bootstrap interval {100 * gain[f'{GAIN}_low']:+.2f} to {100 * gain[f'{GAIN}_high']:+.2f}; "
        f"exact McNemar p = {gain[f'{GAIN}_p_value']:.3f}), best trial against its plain twin "
        f"(alpha 0, no transfer set, its other settings).</p>"
    )


def gain_figure(table: pd.DataFrame) -> go.Figure:
    """Validation and evaluation accuracy of the teacher, the plain student and the best trial, side by side."""
    trials = table[table["model"].str.startswith("trial ")]
    shown = pd.concat([table[table["model"].isin(["teacher", "plain student"])], trials.head(1)])
    fig = go.Figure()
    for column, name in ((METRIC, "validation (used to choose)"), (EVAL_METRIC, "evaluation (never used to choose)")):
        fig.add_bar(x=shown["model"], y=shown[column], name=name, text=shown[column], textposition="outside")
    low = min(v for v in shown[[METRIC, EVAL_METRIC]].to_numpy().ravel() if v == v)  # NaN != NaN
    fig.update_layout(
        barmode="group", yaxis={"range": [max(0.0, low - 0.05), 1.0], "title": "accuracy"}, title="Teacher, plain student, best student"
    )
    return fig


def render_html(title: str, summary: str, figures: dict[str, go.Figure], table: pd.DataFrame, texts: dict[str, str] | None = None) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>", STYLE, ERROR_HOOK, "</head><body>"]
    parts += [f"<h1>{html.escape(title)}</h1>", "<ul id='kd-errors' hidden></ul>", summary]
    embedded = False
    for key, heading in SECTIONS.items():
        parts.append(f"<section id='{key}'><h2>{heading}</h2>")
        parts.append((texts or {}).get(key, ""))
        if key == "models":
            parts.append(table.to_html(index=False, table_id="models-table", na_rep="-"))
        if key in figures:
            # plotly.js is embedded once, with the first figure; the page needs no network.
            parts.append(figures[key].to_html(full_html=False, include_plotlyjs=not embedded, div_id=f"fig-{key}"))
            embedded = True
        elif key not in ("models", "gain"):
            parts.append("<p>Needs at least two finished trials.</p>")
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(study: optuna.Study, url: str, champion: str) -> str:
    counts = {state.name.lower(): len(_done(study, state)) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    best = _best(study, 1)
    if best:
        evaluated = best[0].user_attrs.get(EVAL_ATTR)
        shown = f", {EVAL_METRIC} {evaluated:.4f} (gap {best[0].value - evaluated:+.4f})" if evaluated is not None else ""
        best_text = f"best trial {best[0].number}: {METRIC} {best[0].value:.4f}{shown} with {best[0].params}"
    else:
        best_text = "no finished trial yet"
    return (
        f"<p>Study <b>{html.escape(study.study_name)}</b> in {html.escape(url)}: {counts['complete']} finished, "
        f"{counts['pruned']} pruned, {counts['fail']} failed trials; {html.escape(best_text)}. Champion student: {html.escape(champion)}.</p>"
    )


def _output_dir(cfg: ExperimentConfig) -> Path:
    """The report's folder, made and checked writable before any work: a KDError naming report.output_dir if not."""
    out = Path(cfg.report.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out):
            pass
    except OSError as exc:
        raise KDError(
            f"report.output_dir = {str(out)!r} is not a writable folder ({exc.strerror}); expected a folder the report can be written to"
        ) from None
    return out


def build_report(cfg: ExperimentConfig) -> Report:
    study, url = load_study(cfg)
    out = _output_dir(cfg)
    sweep_run_id = study.user_attrs.get(ROOT_ATTR)
    if not sweep_run_id:
        raise KDError(f"report: study {study.study_name!r} has no sweep run recorded; run the sweep through `mlflow run . -e sweep`")
    rows = model_rows(cfg, study)
    table = models_table(rows, study)
    figures = study_figures(study, cfg.report.top_k)
    if table["latency_batch1_p50_ms"].notna().any():
        figures["models"] = latency_scatter(table)
    gain = sweep_gain(cfg, study.study_name)
    if gain is not None:
        figures["gain"] = gain_figure(table)
    version = registry.champion(registry.student_model_name(cfg))
    champion = f"{version.name} version {version.version}" if version else "none registered"
    page = render_html(f"Sweep report: {cfg.name}", _summary(study, url, champion), figures, table, {"gain": gain_text(gain)})

    html_path, csv_path = out / f"{study.study_name}.html", out / f"{study.study_name}.csv"
    html_path.write_text(page, encoding="utf-8")
    trials_frame(study).to_csv(csv_path, index=False)
    tracking.log_files_to(sweep_run_id, [html_path, csv_path], ARTIFACT_DIR)
    return Report(study.study_name, sweep_run_id, html_path, csv_path, figures, table)

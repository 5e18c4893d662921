"""The run folder's README.md: a Hugging Face style model card written from the run's own files.

Everything in the card is read from `config.json`, `train_summary.json`, `calibration.json` and `metrics.json`,
so the card never claims more than the run recorded. Missing files give an explicit "not available" line, and
`library_name: timm` is claimed only when the run holds timm-loadable backbone weights.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from medvit._io import atomic_write_bytes
from medvit.runs import CALIBRATION, CARD, CARD_NOTES, CONFIG, METRICS, SUMMARY, TIMM_BACKBONE, WEIGHTS

_log = logging.getLogger(__name__)

NOTES = CARD_NOTES
_SMALL_DATA = 5000  # below this many training images a model is called a demonstration model


def _read(run_dir: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / name).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _fmt(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _front_matter(timm_loadable: bool) -> str:
    tags = ["medical-imaging", "chest-x-ray", "multi-label-classification", "vision-transformer", "medvit"]
    lines = ["---", *(["library_name: timm"] if timm_loadable else []), "pipeline_tag: image-classification",
             "license: other", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["metrics:", "- roc_auc", "- expected_calibration_error", "---", ""]
    return "\n".join(lines)


def _initialisation(mcfg: dict[str, Any], start: dict[str, Any] | None) -> str:
    """Where training started, as recorded in config.json (file, SHA-256, tensors loaded)."""
    if start:
        return (f"from the weights in `{Path(start['file']).name}` ({start['source']}, sha256 `{start['sha256']}`, "
                f"{start['loaded']} backbone tensors loaded)")
    if mcfg.get("pretrained"):
        return "from pretrained weights (the run predates recording which file)"
    return "from random initialisation (no pretraining)"


def _details(cfg: dict[str, Any], model: dict[str, Any], pre: dict[str, Any], findings: list[str],
             timm_loadable: bool, start: dict[str, Any] | None = None) -> list[str]:
    mcfg = cfg.get("model", {})
    pretrained = _initialisation(mcfg, start)
    return [
        "## Model details",
        "",
        f"- **Architecture:** {model.get('source', 'timm')} `{model.get('name')}` with "
        f"{json.dumps(model.get('model_kwargs') or {})}, "
        f"{model.get('head', 'linear')} head, {len(findings)} sigmoid outputs (multi-label).",
        f"- **Initialisation:** trained {pretrained}; "
        f"{mcfg.get('freeze_blocks', 0)} leading blocks frozen during training.",
        f"- **Input:** {pre.get('input_size')} (grey radiograph replicated to 3 channels), "
        f"mean {pre.get('mean')}, std {pre.get('std')}, {pre.get('interpolation')} resize "
        f"{'(area filter when shrinking) ' if pre.get('antialias') else ''}with letterbox padding.",
        f"- **Outputs:** one probability per finding: {', '.join(findings)}.",
        f"- **Files:** `{CONFIG}` (architecture, findings, preprocessing), `{WEIGHTS}` (weights), "
        + (f"`{TIMM_BACKBONE}` (the backbone alone, under timm's key names), " if timm_loadable else "")
        + f"`{CALIBRATION}` (per-finding calibrators and thresholds), `{METRICS}` (evaluation).",
        "",
    ]


def _training(cfg: dict[str, Any], summary: dict[str, Any] | None) -> list[str]:
    data, train = cfg.get("data", {}), cfg.get("train", {})
    lines = ["## Training data", ""]
    lines.append(
        f"- **Labels:** `{Path(str(data.get('labels_csv', 'n/a'))).name}`, split policy "
        f"`{data.get('split', {}).get('policy', 'n/a')}` (patient-wise: no patient is in two splits)."
    )
    if summary:
        lines.append(
            f"- **Images:** {summary['train_images']} training images of {summary['train_patients']} patients; "
            f"{summary['val_images']} validation images of {summary['val_patients']} patients "
            + ("(used to report the per-epoch AUROC only: the last epoch was kept)."
               if summary.get("select") == "last" else "(used for early stopping and checkpoint selection).")
        )
        weights = {"ema": "EMA", "raw": "raw"}.get(summary.get("weights", ""), "unknown")
        lines.append(
            f"- **Procedure:** {summary.get('epochs_run')} epochs (kept epoch {summary.get('saved_epoch')}, "
            f"{weights} weights), batch {train.get('batch_size')}, peak lr {train.get('lr')}, "
            f"loss `{train.get('loss', {}).get('name')}` with pos_weight={train.get('loss', {}).get('pos_weight')}, "
            f"{summary.get('train_seconds')} s on {summary.get('device')} ({summary.get('precision')})."
        )
        if summary.get("complete") is False:
            resume = summary.get("resume", "medvit train --resume RUN_DIR")
            lines.append(f"- **Incomplete run:** {summary.get('epochs_run')} of {summary.get('epochs_planned')} "
                         f"planned epochs; continue it with `{resume}`.")
    else:
        lines.append(f"- {SUMMARY} is not available: image and patient counts are unknown.")
    lines += [
        "- NIH ChestX-ray14 labels are text-mined from reports (expected accuracy above 90% per the authors, "
        "known to be noisy); prevalences in curated subsets differ from clinical practice.",
        "",
    ]
    return lines


def _evaluation(metrics: dict[str, Any] | None) -> list[str]:
    lines = ["## Evaluation", ""]
    if not metrics:
        return [*lines, "Not evaluated yet: run `medvit evaluate --run RUN_DIR ... --out RUN_DIR`.", ""]
    ev = metrics.get("evaluation", {})
    lines.append(
        f"On {metrics['n_images']} images of {metrics.get('n_patients', 'n/a')} patients "
        f"({ev.get('description', 'labelled set')}). AUROC with patient-level bootstrap 95% CI; ECE with 15 "
        "equal-width bins, before and after calibration; sensitivity/specificity at the stored threshold."
    )
    lines += [
        "",
        "| Finding | positives | AUROC [95% CI] | ECE before | ECE after | threshold | sens | spec |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in metrics["findings"].items():
        ci = m.get("auroc_ci")
        auroc = _fmt(m["auroc"]) + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        if m["auroc"] is None:
            auroc += f" ({m.get('reason', 'undefined')})"
        lines.append(
            f"| {name} | {m['n_pos']} | {auroc} | {_fmt(m['ece_uncalibrated'])} | {_fmt(m['ece'])} | "
            f"{_fmt(m['threshold'])} | {_fmt(m.get('sensitivity'), 2)} | {_fmt(m.get('specificity'), 2)} |"
        )
    ci = metrics.get("mean_auroc_ci")
    lines += [
        "",
        f"**Mean over the {metrics.get('n_findings_in_means', 'n/a')} findings with a defined AUROC:** "
        f"AUROC {_fmt(metrics['mean_auroc'])}"
        + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        + f", ECE {_fmt(metrics['mean_ece_uncalibrated'])} before and {_fmt(metrics['mean_ece'])} after calibration.",
        "",
    ]
    return lines + _engines(metrics)


def _engines(metrics: dict[str, Any]) -> list[str]:
    """The served engine beside eager fp32: what a clinician is shown may come from a faster engine."""
    engines, served = metrics.get("engines"), metrics.get("served_engine")
    if not engines or served not in engines:
        return ["The inference engine served by the app was not measured in this evaluation.", ""]
    lines = [
        "### Served engine",
        "",
        f"`medvit predict` and the review app serve the `{served}` engine on the machine that ran this evaluation "
        f"({metrics.get('served_engine_chosen_by', 'n/a')}). Its results on the same images, beside eager fp32 "
        "(`torch`):",
        "",
        "| Engine | mean AUROC | difference to fp32 | max abs. probability difference (uncalibrated / calibrated) "
        "| flags changed |",
        "|---|---|---|---|---|",
    ]
    for name, e in engines.items():
        delta = e.get("mean_auroc_minus_fp32")
        lines.append(
            f"| {name}{' (served)' if name == served else ''} | {_fmt(e.get('mean_auroc'))} | "
            f"{'n/a' if delta is None else f'{delta:+.4f}'} | {_fmt(e.get('max_abs_dp_uncalibrated'), 4)} / "
            f"{_fmt(e.get('max_abs_dp'), 4)} | {e.get('flags_changed')} of {e.get('n_outputs')} |"
        )
    return [*lines, ""]


def _calibration(cal: dict[str, Any] | None) -> list[str]:
    lines = ["## Calibration", ""]
    if not cal:
        return [*lines, "Not calibrated: probabilities are the raw sigmoid outputs, thresholds 0.5.", ""]
    fitted = cal.get("fitted_on", {})
    rule = cal.get("threshold_rule")
    target = f" (target {cal['target_sensitivity']})" if rule == "sensitivity" else ""
    lines.append(
        f"Per-finding `{cal.get('chosen', cal.get('method'))}` calibrators fitted on {fitted.get('n_images')} images "
        f"of {fitted.get('n_patients')} patients (split `{fitted.get('split', 'n/a')}`), chosen by patient-grouped "
        f"{cal.get('selection', {}).get('folds')}-fold cross-validated NLL. Operating thresholds: `{rule}`{target}; "
        "a finding is flagged when its calibrated probability is at least its threshold."
    )
    cv = cal.get("selection", {}).get("cv_nll_per_label") or {}
    if cv:
        lines += ["", "| candidate | CV NLL per label |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(cv.items(), key=lambda kv: kv[1])]
    return [*lines, ""]


def _timm_usage(model: dict[str, Any]) -> list[str]:
    """How to load the backbone with timm alone; the head and calibration need medvit."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in (model.get("model_kwargs") or {}).items())
    return [
        f"The backbone alone loads into timm (pooled features; the {model.get('head', 'linear')} head and the "
        "calibration need medvit):",
        "",
        "```python",
        "import timm",
        "from safetensors.torch import load_file",
        "",
        f"backbone = timm.create_model({model.get('name')!r}, num_classes=0" + (f", {kwargs}" if kwargs else "") + ")",
        f"backbone.load_state_dict(load_file({TIMM_BACKBONE!r}))",
        "```",
        "",
    ]


def render_model_card(run_dir: str | os.PathLike, notes: str | None = None) -> str:
    """The model card text for a run folder; `notes` (markdown, default: run_dir/card_notes.md) is added
    under "About this model"."""
    run_dir = Path(run_dir)
    if notes is None and (run_dir / NOTES).is_file():
        notes = (run_dir / NOTES).read_text()
    meta = _read(run_dir, CONFIG) or {}
    cfg, findings = meta.get("config", {}), list(meta.get("findings", []))
    summary = _read(run_dir, SUMMARY)
    n_train = (summary or {}).get("train_images")
    title = f"medvit {run_dir.resolve().name}: {meta.get('model', {}).get('name', 'model')}"
    timm_loadable = (run_dir / TIMM_BACKBONE).is_file()
    lines = [_front_matter(timm_loadable), f"# {title}", ""]
    lines += [
        "> **Not a diagnostic device.** This model is for research, education and demonstration only. It has not "
        "been cleared or approved by any regulator, has not been clinically validated, and must not be used to "
        "diagnose, treat or triage patients. Every output must be reviewed by a qualified clinician.",
        "",
    ]
    if n_train is not None and n_train < _SMALL_DATA:
        lines += [
            f"> **Demonstration model.** Trained on only {n_train} images"
            + ("" if cfg.get("model", {}).get("pretrained") else " without pretrained weights")
            + ", it is far below a model fine-tuned from pretrained weights on the full NIH ChestX-ray14 dataset "
            "(112,120 images). Use it to try the software, not to judge what such models can do.",
            "",
        ]
    if notes:
        lines += ["## About this model", "", notes.strip(), ""]
    lines += [
        "## Intended use",
        "",
        "- **Intended:** research on chest X-ray classification and calibration; demonstrating the medvit "
        "review workflow (calibrated per-finding probabilities with saliency overlays, reviewed by a clinician).",
        "- **Users:** researchers and engineers; clinicians evaluating the software, never as the sole reader.",
        "- **Out of scope:** clinical diagnosis or triage; lateral views, CT, MR or non-chest images; paediatric "
        "patients; populations, scanners or label definitions unlike the training data; any use without "
        "local validation.",
        "",
    ]
    lines += _details(cfg, meta.get("model", {}), meta.get("preprocessing", {}), findings, timm_loadable,
                      meta.get("starting_weights"))
    lines += _training(cfg, summary)
    lines += _evaluation(_read(run_dir, METRICS))
    lines += _calibration(_read(run_dir, CALIBRATION))
    lines += [
        "## Limitations",
        "",
        "- Labels are noisy and text-mined; AUROC on such labels under- or over-states agreement with radiologists.",
        "- Calibration holds only for data like the calibration set: a new site, scanner or prevalence needs "
        "recalibration (`medvit calibrate --labels CSV --images DIR`).",
        "- Confidence intervals are wide for rare findings; findings with no positive evaluation images have no AUROC.",
        "",
        "## How to use",
        "",
        "```bash",
        f"medvit predict --run {run_dir} image.dcm           # per finding: raw and calibrated probability, flag",
        f"medvit evaluate --run {run_dir} --labels labels.csv --images images/ --out eval/",
        "```",
        "",
        *(_timm_usage(meta.get("model", {})) if timm_loadable else []),
        "## Citation",
        "",
        "Data: NIH Clinical Center, ChestX-ray14. Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: "
        "Hospital-scale Chest X-ray Database and Benchmarks on Weakly-Supervised Classification and Localization "
        "of Common Thorax Diseases. IEEE CVPR 2017, pp. 3462-3471.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str | os.PathLike, notes: str | None = None) -> Path:
    """Write run_dir/README.md atomically and return its path."""
    path = Path(run_dir) / CARD
    atomic_write_bytes(path, render_model_card(run_dir, notes).encode())
    _log.info("model card written to %s", path)
    return path

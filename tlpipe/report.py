"""One page on a run: data, validation, the curve, the shipped model, the gate, lineage.

The page is built once as a list of sections and rendered twice: self-contained HTML (the
curve PNG inlined) for people, Markdown for the Prefect artifact.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tlpipe.params import InputParams, Params, stage_dir
from tlpipe.setting import report_sections, spec

# Where `tlpipe report` and the flow write the page.
REPORT = Path("outputs/report.html")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    """A PNG: a file of the outputs, or `data` made for the page (then `path` is None)."""

    path: Path | None
    alt: str
    data: bytes | None = None

    def png(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()


Block = str | Table | Image


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def pct(x: float) -> str:
    return f"{x:.2%}"


def build(params: Params, root: Path = Path(".")) -> list[Section]:
    """The report's sections from the outputs under `root`; missing stages say so."""
    out = root / "outputs"
    sections = [
        _data(params, root),
        _validation(out),
        *_evaluation(params, out),
        _promotion(out),
        _lineage(params, root),
    ]
    return [s for s in sections if s.blocks]


def _data(params: Params, root: Path) -> Section:
    setting = report_sections(params.setting)
    section = Section("Data", setting.inputs(params))
    prepare = root / stage_dir("prepare")
    if not prepare.is_dir():
        section.blocks.append("prepare has not run.")
        return section
    summary = read_json(prepare / "summary.json")
    files = [list(row) for row in _input_files(summary)]
    if files:
        section.blocks.append(Table(["input", "file", "SHA-256"], files))
    aside = [
        [
            name,
            str(entry["rows"]),
            str(sum(entry["quarantined"].values())),
            ", ".join(f"{k}: {v}" for k, v in entry["quarantined"].items()),
        ]
        for name, entry in summary.get("inputs", {}).items()
        if entry and entry.get("quarantined")
    ]
    if aside:
        section.blocks.append(
            "Rows that broke a row rule were set aside (`validate.rows: quarantine`), each with its rule, "
            "in `outputs/prepare/quarantine.parquet`; the raw files are unchanged."
        )
        section.blocks.append(Table(["input", "rows read", "quarantined", "by rule"], aside))
    section.blocks += setting.counts(params, summary)
    return section


def _input_files(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(input, file, SHA-256) of every file prepare read, from its summary.json."""
    return [
        (name, path, digest)
        for name, entry in summary.get("inputs", {}).items()
        if entry
        for path, digest in entry["files"].items()
    ]


def describe_input(inp: InputParams) -> str:
    """One line on an input: its path(s), pin and row selection."""
    path = inp.path if isinstance(inp.path, str) else ", ".join(f"{k}: {v}" for k, v in inp.path.items())
    line = f"`{path}` (SHA-256 `{inp.sha256 or 'not pinned'}`)"
    if inp.select is not None:
        which = "does not match" if inp.select.invert else "matches"
        line += f", the rows whose {inp.select.column} {which} `{inp.select.pattern}`"
    return line


def _validation(out: Path) -> Section:
    section = Section("Validation")
    report = read_json(out / "validate" / "report.json")
    if not report:
        section.blocks.append("validate has not run.")
        return section
    failed = [
        [f"{split}.{name}", c["expectation"], f"{c['unexpected_count']} of {c['element_count']}"]
        for split, checks in report["checks"].items()
        for name, c in checks.items()
        if not c["success"]
    ]
    verdict = "passed" if report["success"] else "FAILED"
    section.blocks.append(
        f"Great Expectations: {verdict}, {report['expectations'] - report['failed']} of "
        f"{report['expectations']} expectations met."
    )
    if failed:
        section.blocks.append(Table(["check", "expectation", "bad rows"], failed))
    return section


class ClassifierSections:
    """The report sections every classification setting shares (a setting's `REPORT`
    subclasses it): the inputs and their label sets, rows per split and class, the shipped
    model's scores, confusion and per-class table, the supervised source model, the
    forgetting probe and the model card. A subclass names its reference, says what its
    classifier is (`kind`), and adds its own notes on the shipped model and the source."""

    reference_name: str
    reference_note: str
    # How the model card names the model ("Text classifier"), a model built from nothing
    # ("a new encoder") and the source in the split counts ("Source corpus").
    kind: str
    new_model: str
    source_name: str = "Source"

    def inputs(self, params: Params) -> list[Block]:
        data = params.data
        blocks: list[Block] = [f"Target: {describe_input(data.target)}; labels {', '.join(data.labels)}."]
        if data.source is None:
            blocks.append("Source: none (the checkpoint is fine-tuned as it is; no source-side checks).")
        else:
            own = data.source_labels
            labels = f"labels {', '.join(own)}" if own else "no labels"
            blocks.append(f"Source ({data.source_kind}, {labels}): {describe_input(data.source)}.")
        return blocks

    def counts(self, params: Params, summary: dict[str, Any]) -> list[Block]:
        """Rows per split and class, then the source's size."""
        data, counts = params.data, summary.get("counts", {})
        rows = [
            [split, str(sum(counts[split].values())), *(str(counts[split].get(c, 0)) for c in data.labels)]
            for split in ("train", "val", "test", "pool")
            if split in counts
        ]
        blocks: list[Block] = [Table(["target split", "rows", *data.labels], rows)]
        source = counts.get("source")
        if data.source is not None and source is not None:
            line = f"{self.source_name}: {sum(source.values())} rows"
            if data.source_labels:
                line += " (" + ", ".join(f"{k}: {v}" for k, v in source.items()) + ")"
            blocks.append(line + ".")
        return blocks

    def shipped_notes(self, params: Params, metrics: dict[str, Any], out: Path) -> list[Block]:
        """What the setting adds under the shipped model's scores (none by default)."""
        return []

    def shipped(self, params: Params, metrics: dict[str, Any], out: Path) -> Section:
        labels, sm = params.data.labels, metrics["shipped"]
        section = Section("Shipped model")
        section.blocks.append(f"Test accuracy {sm['accuracy']:.4f}, macro-F1 {sm['macro_f1']:.4f}.")
        section.blocks += self.shipped_notes(params, metrics, out)
        section.blocks.append(
            Table(
                ["actual \\ predicted", *labels],
                [[labels[i], *(str(v) for v in row)] for i, row in enumerate(sm["confusion"])],
            )
        )
        section.blocks.append(
            Table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    [c, f"{v['precision']:.4f}", f"{v['recall']:.4f}", f"{v['f1']:.4f}", str(v["support"])]
                    for c, v in sm["per_class"].items()
                ],
            )
        )
        return section

    def source_model(self, params: Params, out: Path) -> str:
        pre, m = params.pretrain, read_json(out / "pretrain" / "metrics.json")
        start = f"`{pre.init_from}`" if pre.init_from else self.new_model
        if not m:
            return "Source model: pretrain has not run."
        if m.get("source") == "none":
            return f"Source model: {start}, as it is (no source)."
        if not m.get("steps"):
            return f"Source model: {start}, as it is (no pretraining steps)."
        steps = f"{m['steps']} steps of {m['objective']} pretraining"
        text = f"Source model: {start}, then {steps} on the source rows"
        if m.get("source_accuracy") is not None:
            return text + f"; held-out source accuracy {m['source_accuracy']:.4f}."
        return text + self.source_note(m)

    def source_note(self, m: dict[str, Any]) -> str:
        """How an unsupervised source model scored on held-out source rows (pretrain's metrics)."""
        return "."

    def forgetting_rows(self, f: dict[str, Any]) -> list[list[str]]:
        """The forgetting table's rows: the linear probe on the source labels."""
        if f.get("probe_accuracy_before") is None:
            return []
        before, after = f["probe_accuracy_before"], f["probe_accuracy_after"]
        return [["linear-probe accuracy on source labels", f"{before:.4f}", f"{after:.4f}"]]

    def forgetting(self, f: dict[str, Any]) -> Section:
        section = Section("Forgetting (source task)")
        rows = self.forgetting_rows(f)
        if rows:
            section.blocks.append(Table(["measure", "source model", "after fine-tuning"], rows))
        elif f.get("source") == "none":
            section.blocks.append("No source: there is no source task to forget.")
        else:
            section.blocks.append(self.nothing_forgotten)
        return section

    # Why there is nothing to measure when a source exists but the table is empty.
    nothing_forgotten = "The source has no labels: nothing to measure."

    def card(self, params: Params, metrics: dict[str, Any]) -> tuple[str, str]:
        """The model card's opening line and its line on the shipped model."""
        shipped = metrics["shipped"]
        what = (
            f"{self.kind} over [{', '.join(params.data.labels)}], "
            f"fine-tuned from `{params.pretrain.init_from or self.new_model}` "
            f"on {metrics['train_rows']} labelled target rows."
        )
        return (
            what,
            f"This model: test accuracy {shipped['accuracy']:.4f}, macro-F1 {shipped['macro_f1']:.4f}.",
        )


def _evaluation(params: Params, out: Path) -> list[Section]:
    m = read_json(out / "evaluate" / "metrics.json")
    if not m:
        return [Section("Evaluation", ["evaluate has not run."])]
    setting = report_sections(params.setting)
    curve = Section("Data-efficiency curve")
    g = m["gate"]
    primary = m["metric"]
    names = {key: metric.label for key, metric in spec(params.setting).metrics.items()}
    unit = spec(params.setting).size_unit
    baseline = m["baseline"]
    curve.blocks.append(
        f"Test {names[primary]} (the primary metric, `evaluate.metric`) of transfer and of the "
        f"from-scratch control, mean ± std over {g['seeds']} seeds at each training size; the gain is "
        f"paired by seed, with its {g['confidence']:.0%} interval. The {baseline['predictor']} scores "
        f"{baseline['scores'][primary]:.4f} on the {m['test_rows']} test rows. Each metric has its table."
    )
    reference = "reference" in m["curve"][0]
    for metric in sorted(names, key=lambda k: k != primary):
        rows = []
        for e in m["curve"]:
            t, s, d = e["transfer"][metric], e["scratch"][metric], e["gain"][metric]
            rows.append(
                [
                    str(e.get("units", e["rows"])),
                    f"{t['mean']:.4f} ± {t['std']:.4f}",
                    f"{s['mean']:.4f} ± {s['std']:.4f}",
                    f"{d['mean']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]",
                ]
            )
            if reference:
                r = e["reference"][metric]
                rows[-1].append(f"{r['mean']:.4f} ± {r['std']:.4f}")
        header = [f"{unit} ({names[metric]})", "transfer", "scratch", "gain [interval]"]
        curve.blocks.append(Table(header + [f"reference ({setting.reference_name})"] * reference, rows))
    if reference:
        curve.blocks.append(setting.reference_note)
    png = out / "evaluate" / "curve.png"
    if png.is_file():
        curve.blocks.append(Image(png, "data-efficiency curve"))

    gate = Section("Negative-transfer gate")
    verdict = "passed" if g["passed"] else "FAILED: nothing is promoted"
    gate.blocks.append(
        f"At {g.get('units', g['rows'])} training {unit}, test {names[primary]}: "
        f"transfer {g['transfer']:.4f} vs scratch "
        f"{g['scratch']:.4f}, gain {g['gain']:+.4f}, interval [{g['ci_low']:+.4f}, "
        f"{g['ci_high']:+.4f}]; the lower end must exceed {g['min_gain']:+.4f}: {verdict}."
    )

    shipped = setting.shipped(params, m, out)

    strategy = Section("Strategy")
    strategy.blocks.append(setting.source_model(params, out))
    strategy.blocks.append(Table(["setting", "value"], [[k, str(v)] for k, v in m["strategy"].items()]))
    scratch = m["scratch"]
    model = scratch["model"] or "the transfer model's architecture"
    strategy.blocks.append(
        f"Scratch control: model {model}, learning rate {scratch['lr']:g}, on transfer's budget."
    )
    tuned = scratch["tuned"]
    if tuned["grid"]:
        strategy.blocks.append(
            f"It was tuned once, before the curve: each cell of the grid below trained on {tuned['rows']} "
            f"rows (seed {tuned['seed']}) and was judged on the validation split ({tuned['on']}); the "
            "best cell trains every scratch run of the curve."
        )
        strategy.blocks.append(
            Table(
                ["learning rate", "model", *(f"val {label}" for label in names.values())],
                [
                    [
                        f"{c['lr']:g}",
                        str(c["model"] or "as transfer"),
                        *(f"{c[f'val_{key}']:.4f}" for key in names),
                    ]
                    for c in tuned["grid"]
                ],
            )
        )

    return [curve, gate, shipped, strategy, setting.forgetting(m["forgetting"])]


def _promotion(out: Path) -> Section:
    """publish's promotion gates (gates.json): each gate's verdict and figures, and where
    production stands."""
    section = Section("Promotion")
    g = read_json(out / "publish" / "gates.json")
    if not g:
        return section
    production = g["production"]
    if g["held"]:
        verdict = (
            f"**Production was not moved**: it stays on {production['after'] or 'nothing'}; "
            f"version {g['version']} is published and named `candidate`."
        )
    elif production["after"] == g["version"]:
        moved = "moved to" if production["moved"] else "already named"
        verdict = f"Production {moved} version {g['version']}: every gate passed."
    else:
        verdict = (
            f"Every gate passed; publish.promote is false, so production stays on "
            f"{production['after'] or 'nothing'} until `tlpipe promote {g['version']}`."
        )
    section.blocks.append(verdict)
    rows = [[x["name"], "passed" if x["passed"] else "FAILED", x["detail"]] for x in g["gates"]]
    section.blocks.append(Table(["gate", "result", "figures"], rows))
    # A reason beyond the gates: production moved by someone else while this run checked.
    named = tuple(f"{x['name']} gate:" for x in g["gates"])
    section.blocks.extend(h for h in g["held"] if not h.startswith(named))
    return section


def _lineage(params: Params, root: Path) -> Section:
    section = Section("Lineage")
    lock_path = root / "dvc.lock"
    stages = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}) if lock_path.is_file() else {}
    summary = read_json(root / stage_dir("prepare") / "summary.json")
    rows = [[f"data ({name})", path, digest] for name, path, digest in _input_files(summary)] or [
        ["data", "prepare has not run", ""]
    ]
    for stage in ("prepare", "pretrain", "finetune", "export"):
        for o in stages.get(stage, {}).get("outs", []):
            rows.append([stage, o["path"], o.get("md5", "")])
    release = read_json(root / "outputs" / "publish" / "release.json")
    if release:
        rows.append(["publish", release.get("uri", ""), release.get("version", "")])
    section.blocks.append(Table(["step", "artifact", "hash / version"], rows))
    if not stages:
        section.blocks.append("No dvc.lock yet: hashes appear once the stages are committed.")
    return section


def to_markdown(sections: list[Section], title: str) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Table):
                lines.append("| " + " | ".join(b.header) + " |")
                lines.append("|" + "---|" * len(b.header))
                lines += ["| " + " | ".join(r) + " |" for r in b.rows]
            elif isinstance(b, Image):
                lines.append(f"({b.alt}: `{b.path}`)" if b.path else f"({b.alt}: in the HTML report)")
            else:
                lines.append(b)
            lines.append("")
    return "\n".join(lines)


def to_html(sections: list[Section], title: str) -> str:
    """One self-contained page: inline CSS, images as data URIs, nothing fetched."""
    esc = html.escape
    body = [f"<h1>{esc(title)}</h1>"]
    for s in sections:
        body.append(f"<h2>{esc(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Table):
                head = "".join(f"<th>{esc(h)}</th>" for h in b.header)
                rows = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif isinstance(b, Image):
                data = base64.b64encode(b.png()).decode()
                body.append(f'<img alt="{esc(b.alt)}" src="data:image/png;base64,{data}">')
            else:
                body.append(f"<p>{_inline_code(esc(b))}</p>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ccc;padding:.25rem .6rem;"
        "text-align:left}th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}"
    )
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _inline_code(text: str) -> str:
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def write_report(params: Params, out_path: Path, root: Path = Path(".")) -> tuple[Path, str]:
    """Write the HTML page to `out_path`; return it and the Markdown of the same content."""
    title = f"tlpipe report: {params.publish.model_name}"
    sections = build(params, root)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.write_text(to_html(sections, title))
    tmp.replace(out_path)
    return out_path, to_markdown(sections, title)

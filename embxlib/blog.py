"""Render blog notebooks (nbs/blog_*.ipynb) to markdown posts: blog/<slug>/index.md.

A post is a notebook executed with papermill (kernel python3, cwd the repository root) into build/blog/, then
converted with nbconvert's MarkdownExporter:
- cells tagged `parameters` or `injected-parameters` are removed entirely;
- code cells show their output only, unless tagged `show` (then their input is shown too);
- image outputs and stderr are dropped: a post saves its figures itself under images/<slug>/<stable-name>.png
  (see `figure`) and shows them with a markdown link, so the post references stable files, never
  nbconvert's output_N.png.
The result is deterministic: same inputs, same bytes (PNGs are written without a Software/date stamp).

    python -m embxlib.blog nbs/blog_x0.ipynb
    python -m embxlib.blog --all
"""

from __future__ import annotations

import argparse
import ast
import html
import math
import sys
import time
from pathlib import Path

import nbformat

from . import ROOT
REMOVED_TAGS = {"parameters", "injected-parameters"}
SHOW_TAG = "show"
_HIDE_INPUT = "embxlib-hide-input"


def default_slug(notebook) -> str:
    """The notebook's name without `.ipynb` and without a `blog_` prefix (nbs/blog_x0.ipynb -> x0)."""
    stem = Path(notebook).stem
    return stem[len("blog_"):] if stem.startswith("blog_") else stem


def work_from_root() -> None:
    """A post's notebook opened in JupyterLab runs in nbs/: move to the repository root, where blog.render runs it,
    so that its relative paths (inputs, images/) mean the same. Anywhere else it does nothing."""
    import os

    if Path.cwd().resolve() == (ROOT / "nbs").resolve():
        os.chdir(ROOT)


def figure(fig, slug: str, name: str, alt: str = "", root=None):
    """Save fig as images/<slug>/<name>.png (under root, default the cwd) and return the markdown that shows it
    from blog/<slug>/index.md. Display the returned object (last expression of a cell, or IPython display)."""
    from IPython.display import Markdown

    from embxlib import plots

    name = name if name.endswith(".png") else name + ".png"
    plots.save(fig, Path(root or ".") / "images" / slug / name)
    return Markdown(f"![{alt or name[:-4]}](../../images/{slug}/{name})")


def md_text(value) -> str:
    """A name from a run folder, a log or a sweep file (a variant, a run, a label) as literal text in a post's
    markdown: HTML escaped (markdown passes raw HTML through), and the characters that would start a link, code or
    a table cell escaped. The names our runs use (x01-ve2, extra_embeds1_s0) come out unchanged."""
    text = html.escape(str(value), quote=False)
    for c in "\\`[]|":
        text = text.replace(c, "\\" + c)
    return text


def span(numbers) -> str:
    """Integers as ranges for a sentence: [2, 3, 4, 5, 8, 14, 15] -> '2-5, 8 and 14-15'."""
    groups: list[list[int]] = []
    for n in sorted(set(int(v) for v in numbers)):
        if groups and n == groups[-1][-1] + 1:
            groups[-1].append(n)
        else:
            groups.append([n])
    parts = [f"{g[0]}-{g[-1]}" if len(g) > 1 else str(g[0]) for g in groups]
    return " and ".join([", ".join(parts[:-1]), parts[-1]]) if len(parts) > 1 else "".join(parts)


def runs_per_variant(val) -> str:
    """'x00: 2 runs, x01: 5 runs, x03: 1 run': how many runs each variant of a validation table averages."""
    counts = val.groupby("variant", sort=False)["run"].nunique()
    return ", ".join(f"{md_text(v)}: {n} run{'s' if n != 1 else ''}" for v, n in counts.items())


def data_end(val, x: str = "train_time_s", step: int = 10) -> int:
    """The end of the data in x, rounded up to a multiple of step: the right edge of a zoom that shows it all."""
    values = val[x].astype(float)
    return int(math.ceil(float(values[values.abs() != float("inf")].max()) / step) * step)  # (a non-finite clock: left out)


def final_table(final) -> str:
    """stats.final_stats as a markdown table for a post: runs, mean and SD of the final loss (the ddof the table was
    computed with, named in the header), mean time, the record t-test's one-sided p and Welch's one-sided p against
    the baseline ('-' where there is none)."""
    def p(v):
        return "-" if v != v else f"{v:.1e}" if v < 0.01 else f"{v:.3f}"
    ddof = int(final["std_ddof"].iloc[0]) if "std_ddof" in final else 0
    head = (f"| variant | runs | final loss, mean | SD (ddof = {ddof}) | time (s), mean | p, one-sided (mean < target) "
            "| p, Welch one-sided (variant < baseline) |")
    lines = [head, "|:--|--:|--:|--:|--:|--:|--:|"]
    for r in final.itertuples():
        lines.append(f"| {md_text(r.variant)} | {r.n} | {r.loss_mean:.4f} | {r.loss_std:.4f} | {r.time_s_mean:.1f} | "
                     f"{p(r.p_value)} | {p(getattr(r, 'welch_p_vs_baseline', float('nan')))} |")
    return "\n".join(lines)


def _arm_frames(val, selections, baseline, span_fn):
    # the runs of each selection, the baseline's labelled by its seeds where the selections' baseline runs differ
    # (a variant with 3 seeds is drawn against the baseline over those 3, never over the baseline's 12)
    import pandas as pd
    base_runs = set(val.loc[val["variant"] == baseline, "run"])
    base_sets = {tuple(sorted(r for r in sel.runs if r in base_runs)) for sel in selections}
    frames, labels = [], []
    for sel in selections:
        part = sel.frame(val)
        label = baseline
        if len(base_sets) > 1:
            label = f"{baseline}, seeds {span_fn(sel.seeds)}" if sel.design == "paired" else f"{baseline} ({sel.variant})"
            part = part.assign(variant=part["variant"].where(part["variant"] != baseline, label))
        labels.append(label)
        frames.append(part)
    df = pd.concat(frames, ignore_index=True).drop_duplicates(subset=["run", "variant", "step"])
    order = list(dict.fromkeys(labels + [s.variant for s in selections]))
    return df.assign(_o=df["variant"].map(order.index)).sort_values(["_o", "run", "step"]).drop(columns="_o")


def comparison(val, variants, baseline: str, slug: str, prefix: str, band: str = "std", zoom_from=None,
               alpha: float = 0.05, root=None, refs: dict | None = None, table: bool = True, selections=None,
               time_selections=None, diff_selections=None):
    """A post section comparing variants with a baseline, computed from the validation table `val`, drawing the
    runs each comparison tests: selections ({variant: stats.Selection}, default stats.select_runs(val, variant,
    baseline): every run) for the per-step figures, time_selections (default: the same) for the per-time figure.
    Figures, saved as images/<slug>/<prefix>-*.png: the mean curves per step from `zoom_from` on (the whole range
    without it; the validation points marked), the per-seed paired differences per step with their 95% CI (for
    paired selections: what the paired test compares), and the mean curves per training time; each followed by
    a caption naming the runs drawn and those left out. With table=True, the final-loss table with two-sided Welch
    tests (stats.compare_to_baseline), each followed by what it shows at level `alpha`, its 95% confidence
    interval and, for an estimate clear of its noise, the runs per arm that would show a difference that size
    (stats.seeds_needed); for one inside its noise, the difference these runs would detect. refs ({label: loss})
    are drawn as reference lines in the full-range figures. diff_selections: the paired comparisons whose per-seed
    differences the difference figure draws (default: the paired ones of `selections`; a post whose tests compare
    other pairs than variant vs baseline passes those). table=False: the figures only, for a post that tests
    its whole family at once (stats.family, family_table). Returns the Markdown to display."""
    import pandas as pd
    from IPython.display import Markdown

    from embxlib import plots, stats

    others = [v for v in variants if v != baseline]
    selections = dict(selections or {})
    for v in others:
        if v not in selections:
            selections[v] = stats.select_runs(val, v, baseline)
    time_selections = {**selections, **(time_selections or {})}
    sels = [selections[v] for v in others]
    tsels = [time_selections[v] for v in others]
    df = _arm_frames(val, sels, baseline, span)
    last = int(df["step"].max())

    def caption(chosen):
        return "*Runs drawn, as tested: " + "; ".join(md_text(sel.caption(span)) for sel in chosen) + ".*"

    parts = []
    if zoom_from is not None:
        parts.append(figure(plots.plot_val_loss(df, x="step", xlim=(zoom_from, last), average=True, band=band), slug,
                            f"{prefix}-step-{zoom_from}-{last}.png", f"{prefix}: steps {zoom_from}-{last}", root).data)
    else:
        parts.append(figure(plots.plot_val_loss(df, x="step", average=True, band=band, refs=refs), slug,
                            f"{prefix}-step.png", f"{prefix}: validation loss per step", root).data)
    paired = [sel for sel in (diff_selections if diff_selections is not None else sels) if sel.design == "paired"]
    if paired:
        parts.append(figure(plots.plot_paired_differences(val, paired, x="step", xlim=(
            zoom_from, last) if zoom_from is not None else None), slug, f"{prefix}-step-diff.png",
            f"{prefix}: paired differences per step", root).data)
    parts.append(caption(sels if diff_selections is None else list(dict.fromkeys(sels + list(diff_selections)))))
    tdf = _arm_frames(val, tsels, baseline, span)
    parts.append(figure(plots.plot_val_loss(tdf, x="train_time_s", average=True, band=band, refs=refs), slug,
                        f"{prefix}-time.png", f"{prefix}: validation loss per training time", root).data)
    if [t.runs for t in tsels] != [s.runs for s in sels]:
        parts.append(caption(tsels))
    if not table:
        return Markdown("\n\n".join(parts))
    table = stats.compare_to_baseline(df, baseline, [baseline] + others)
    cols = [c for c in ("variant", "n", "loss_mean", "loss_std", "diff", "ci_low", "ci_high", "p_two_sided",
                        "seeds_needed", "ms_per_step", "step_time_ratio") if c in table]
    shown = table[cols].assign(variant=table["variant"].map(md_text))
    if "seeds_needed" in shown:  # post-hoc power on an estimate inside its noise is no plan
        shown["seeds_needed"] = shown["seeds_needed"].where(table.get("plan", True) == True)  # noqa: E712
    parts.append(shown.to_markdown(index=False, floatfmt=".4g"))
    lines = []
    for row in table.itertuples():
        if row.variant == baseline or pd.isna(getattr(row, "p_two_sided", None)):
            continue
        ci = f"mean difference {row.diff:+.4f}, 95% CI [{row.ci_low:+.4f}, {row.ci_high:+.4f}]"
        if row.p_two_sided < alpha:
            verdict = f"final loss {'lower' if row.diff < 0 else 'higher'} than {md_text(baseline)} ({ci}; p = {row.p_two_sided:.2g})"
        else:
            verdict = f"no difference from {md_text(baseline)} shown ({ci}; p = {row.p_two_sided:.2f})"
        verdict += _need_text(row, "runs per arm", alpha)
        lines.append(f"- **{md_text(row.variant)}** ({row.n} runs vs {table['n'].iloc[0]}): {verdict}.")
    parts.append("\n".join(lines))
    return Markdown("\n\n".join(parts))


def _need_text(row, unit: str, alpha: float) -> str:
    # seeds needed only for an estimate clear of its noise (a plan); for one inside it, what these runs could show
    if getattr(row, "plan", True) and math.isfinite(row.seeds_needed):
        return (f"; a difference this size would need about {int(row.seeds_needed)} {unit} to show at p < {alpha} "
                f"with 80% power")
    detectable = getattr(row, "detectable", float("nan"))
    if detectable == detectable:
        return (f"; the estimate is inside its own noise, so no count of seeds follows from it: these runs would "
                f"show a difference of {detectable:.4f} or more with 80% power at p < {alpha}")
    return ""


def pval(p: float) -> str:
    """A p-value for a sentence or a table: two significant digits (scientific below 0.001), '-' for none."""
    return "-" if p != p else f"{p:.1e}" if p < 0.001 else f"{p:.2g}" if p < 0.1 else f"{p:.2f}"


def effect_text(row, unit: str = "") -> str:
    """'-0.0394, 95% CI [-0.0529, -0.0260] (paired over 12 seeds; p = 4.6e-05, Holm-adjusted over 7: 3.2e-04)'
    from a row of stats.family."""
    design = (f"paired over {row.n_pairs} seeds" if row.design == "paired"
              else f"Welch, {row.n_variant} runs vs {row.n_baseline}")
    m = getattr(row, "m", 1)
    holm = f", Holm-adjusted over {int(m)}: {pval(row.p_holm)}" if m == m and m > 1 else ""
    return (f"{row.diff:+.4f}{unit}, 95% CI [{row.ci_low:+.4f}, {row.ci_high:+.4f}] ({design}; "
            f"p = {pval(row.p_value)}{holm})")


def verdict(row, what: str, alpha: float = 0.05, measure: str = "final loss") -> str:
    """What one comparison of a stats.family table supports at family-wise level alpha (Holm): a direction only
    where the adjusted p is below alpha; otherwise what the interval allows and, for the design used, how many
    seeds a difference of this size would need (at alpha before correction, 80% power), or, for an estimate
    inside its own noise (its CI holds zero), the difference these seeds would detect."""
    text = effect_text(row)
    if row.reject_holm:
        return f"{what} {'lowers' if row.diff < 0 else 'raises'} the {measure}: {text}"
    unit = "seeds (pairs)" if row.design == "paired" else "runs per arm"
    need = _need_text(row, unit, alpha)
    if row.p_value < alpha:
        return (f"{what}: not shown once the family is corrected: {text}; uncorrected it would read as "
                f"{'lower' if row.diff < 0 else 'higher'}{need}")
    return f"{what}: no difference shown: {text}{need}"


def family_table(table) -> str:
    """A stats.family table as markdown: every comparison of the post with its design, effect and 95% CI, t, df,
    raw and Holm-adjusted p, the correlation of the pairs, the seeds a difference that size would need (only for
    an estimate clear of its noise: post-hoc power on noise is no plan) and the difference these runs detect with
    80% power."""
    head = ("| comparison | design | n | difference | 95% CI | t | df | p (raw) | p (Holm) | pair correlation "
            "| seeds needed | detectable |")
    lines = [head, "|:--|:--|--:|--:|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for r in table.itertuples():
        n = f"{r.n_pairs} pairs" if r.design == "paired" else f"{r.n_variant} vs {r.n_baseline}"
        corr = "-" if r.corr != r.corr else f"{r.corr:.2f}"
        plan = getattr(r, "plan", True)
        need = ("-" if not math.isfinite(r.seeds_needed) else str(int(r.seeds_needed)) if plan
                else "- (in noise)")
        det = getattr(r, "detectable", float("nan"))
        det = "-" if det != det else f"{det:.4f}"
        label = getattr(r, "label", f"{r.variant} vs {r.baseline}")
        lines.append(f"| {md_text(label)} | {r.design} | {n} | {r.diff:+.4f} | [{r.ci_low:+.4f}, {r.ci_high:+.4f}] | "
                     f"{r.t_stat:.2f} | {r.df:.1f} | {pval(r.p_value)} | {pval(r.p_holm)} | {corr} | {need} | {det} |")
    return "\n".join(lines)


def _clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Drop parameter cells, mark code inputs hidden unless tagged show, keep only text-like outputs, and strip
    every execution timestamp and volatile metadata."""
    cells = []
    for cell in nb.cells:
        tags = set(cell.metadata.get("tags", []))
        if tags & REMOVED_TAGS:
            continue
        cell.metadata = {"tags": sorted(tags)} if tags else {}
        if cell.cell_type == "code":
            if SHOW_TAG not in tags:
                cell.metadata["tags"] = sorted(tags | {_HIDE_INPUT})
            cell.execution_count = None
            outputs = []
            for out in cell.outputs:
                if out.output_type == "stream":
                    if out.name == "stderr":
                        continue
                elif out.output_type in ("display_data", "execute_result"):
                    data = {k: v for k, v in out.data.items() if not k.startswith("image/")}
                    if not data or set(data) == {"text/plain"} and str(data["text/plain"]).startswith("<Figure"):
                        continue
                    out.data = data
                    out.metadata = {}
                    if "execution_count" in out:
                        out.execution_count = None
                outputs.append(out)
            cell.outputs = outputs
        cells.append(cell)
    nb.cells = cells
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ("kernelspec", "language_info")}
    return nb


def to_markdown(nb: nbformat.NotebookNode) -> str:
    """The cleaned notebook as markdown (no images written: they are dropped by _clean)."""
    from nbconvert import MarkdownExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.remove_input_tags = {_HIDE_INPUT}
    config.TagRemovePreprocessor.enabled = True
    exporter = MarkdownExporter(config=config)
    exporter.register_preprocessor(TagRemovePreprocessor(config=config), enabled=True)
    body, _ = exporter.from_notebook_node(_clean(nb))
    lines = [line.rstrip() for line in body.strip().split("\n")]
    text, blank = [], False
    for line in lines:  # hidden cells leave runs of blank lines: keep at most one
        if line == "" and blank:
            continue
        text.append(line)
        blank = line == ""
    return "\n".join(text) + "\n"


def render(notebook, slug: str | None = None, parameters: dict | None = None, root=None) -> Path:
    """Execute notebook with papermill (cwd root) into build/blog/<slug>.ipynb, render blog/<slug>/index.md.

    root: the folder holding blog/, images/ and build/ (default: the repository root). The notebook gets the
    parameter `slug` besides the given ones. Returns the path of index.md.
    """
    import papermill as pm

    notebook = Path(notebook).resolve()
    root = Path(root).resolve() if root is not None else ROOT
    slug = slug or default_slug(notebook)
    built = root / "build" / "blog" / f"{slug}.ipynb"
    built.parent.mkdir(parents=True, exist_ok=True)
    pm.execute_notebook(str(notebook), str(built), parameters={**(parameters or {}), "slug": slug},
                        kernel_name="python3", cwd=str(root), progress_bar=False, log_output=False)
    nb = nbformat.read(built, as_version=4)
    out = root / "blog" / slug / "index.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    text = to_markdown(nb)
    if not out.exists() or out.read_text(encoding="utf-8") != text:
        out.write_text(text, encoding="utf-8")
    return out


def _parameter(text: str):
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected name=value, got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return name.strip(), value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embxlib.blog", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", help="blog notebooks to render")
    parser.add_argument("--all", action="store_true", help="render every nbs/blog_*.ipynb")
    parser.add_argument("--slug", help="output name (one notebook only); default: notebook name without blog_")
    parser.add_argument("-p", "--parameter", action="append", type=_parameter, default=[],
                        help="notebook parameter name=value (a Python literal, else a string); repeatable")
    args = parser.parse_args(argv)
    notebooks = [Path(n) for n in args.notebooks]
    if args.all:
        notebooks += sorted((ROOT / "nbs").glob("blog_*.ipynb"))
    if not notebooks:
        parser.error("name a notebook or pass --all")
    if args.slug and len(notebooks) > 1:
        parser.error("--slug needs exactly one notebook")
    for nb in notebooks:
        start = time.perf_counter()
        out = render(nb, slug=args.slug, parameters=dict(args.parameter))
        print(f"{nb} -> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} "
              f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

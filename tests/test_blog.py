"""embxlib.blog renders a small post: parameters removed, hidden code hidden, shown code shown, every image
referenced exists, and a second render gives the same bytes."""
import re

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from embxlib import blog

HIDDEN = "SECRET_HIDDEN_CODE = 41"
SHOWN = "shown_value = 6 * 7"


def fixture_notebook(path):
    params = new_code_cell('slug = "demo"\nmessage = "PARAMETER_SENTINEL"')
    params.metadata["tags"] = ["parameters"]
    shown = new_code_cell(f"{SHOWN}\nprint('answer', shown_value)")
    shown.metadata["tags"] = ["show"]
    nb = new_notebook(cells=[
        new_markdown_cell("# Demo post\n\nSome text."),
        params,
        new_code_cell(
            f"{HIDDEN}\n"
            "from IPython.display import Markdown, display\n"
            "from matplotlib.figure import Figure\n"
            "from embxlib import plots\n"
            "fig = Figure(figsize=(3, 2))\n"
            "fig.add_subplot().plot([0, 1, 2], [2, 0, 1])\n"
            "plots.save(fig, f'images/{slug}/line.png')\n"
            "display(Markdown(f'![a line](../../images/{slug}/line.png)'))\n"
            "from embxlib import blog\n"
            "blog.figure(fig, slug, 'line-again', 'the line again')"),
        shown,
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, path)
    return path


def rendered_files(root):
    return {p.relative_to(root): p.read_bytes() for d in ("blog", "images") for p in sorted((root / d).rglob("*"))
            if p.is_file()}


def test_render_fixture_post(tmp_path):
    nb = fixture_notebook(tmp_path / "blog_demo.ipynb")
    out = blog.render(nb, root=tmp_path)
    assert out == tmp_path / "blog" / "demo" / "index.md"
    text = out.read_text()
    assert "# Demo post" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) == 2
    for image in images:
        assert (out.parent / image).resolve().is_file(), image
    assert "output_" not in text and "data:image" not in text
    assert "PARAMETER_SENTINEL" not in text and "slug =" not in text
    assert HIDDEN not in text and "plots.save" not in text
    assert SHOWN in text and "answer 42" in text

    first = rendered_files(tmp_path)
    blog.render(nb, root=tmp_path)
    assert rendered_files(tmp_path) == first


def test_default_slug():
    assert blog.default_slug("nbs/blog_x0.ipynb") == "x0"
    assert blog.default_slug("nbs/post.ipynb") == "post"


def test_comparison_section(tmp_path):
    """Three seeds of a baseline and two variants: one clearly lower, one the same up to noise."""
    import numpy as np
    import pandas as pd
    rows = []
    finals = {"base": [3.00, 3.01, 2.99], "better": [2.80, 2.81, 2.79], "same": [3.005, 2.995, 3.01]}
    for variant, ends in finals.items():
        for seed, end in enumerate(ends):
            for step in (0, 50, 100):
                loss = 10.0 if step == 0 else end + (0.5 if step == 50 else 0.0)
                rows.append(dict(run=f"{variant}-s{seed}", variant=variant, step=step,
                                 train_time_s=step * (1.2 if variant == "better" else 1.0), val_loss=loss))
    val = pd.DataFrame(rows)
    md = blog.comparison(val, ["better", "same"], "base", "demo", "cmp", zoom_from=50, root=tmp_path,
                         refs={"bigram": 3.5}).data
    for name in ("cmp-step-50-100.png", "cmp-time.png"):  # the zoom replaces the full-range step figure
        assert (tmp_path / "images" / "demo" / name).is_file() and f"images/demo/{name}" in md
    assert not (tmp_path / "images" / "demo" / "cmp-step.png").exists()
    assert "*Runs drawn, as tested: better vs base: all runs of both arms (6)" in md
    from scipy import stats as st
    ci = st.ttest_ind(finals["better"], finals["base"], equal_var=False).confidence_interval(0.95)
    assert f"**better** (3 runs vs 3): final loss lower than base (mean difference -0.2000, 95% CI [{ci.low:+.4f}, " in md
    assert "**same** (3 runs vs 3): no difference from base shown (mean difference +0.0033" in md
    # the estimate +0.0033 is inside its noise (CI holds 0): no seed count is printed as a plan for it, but the
    # difference these 3 + 3 runs detect: d = 3.07 for n = 3 per arm (TTestIndPower), times the pooled SD 0.0089
    assert "would need 113 runs per arm" not in md and "inside its own noise" in md
    from statsmodels.stats.power import TTestIndPower
    sd = np.sqrt((np.var(finals["same"], ddof=1) + np.var(finals["base"], ddof=1)) / 2)
    assert f"difference of {TTestIndPower().solve_power(nobs1=3, alpha=0.05, power=0.8) * sd:.4f} or more" in md
    table_line = next(line for line in md.splitlines() if line.startswith("| better"))
    assert "1.2" in table_line  # 1.2x the baseline's ms per step
    assert np.isclose(float(table_line.split("|")[5]), np.mean(finals["better"]) - np.mean(finals["base"]))
    from embxlib import plots
    assert set(plots.figure_runs(tmp_path / "images" / "demo" / "cmp-time.png")) == set(val["run"])


def test_comparison_draws_the_runs_its_test_uses(tmp_path):
    """A variant with 3 of the baseline's 6 seeds is drawn against the baseline over those 3; a run its test leaves
    out (a stalled clock) is left out of the per-time figure with its partner, and the captions say so."""
    import numpy as np
    import pandas as pd
    from embxlib import plots, stats
    rows, sources = [], []
    for variant, seeds in (("base", range(6)), ("new", range(3))):
        for seed in seeds:
            src = f"{variant}{seed}"
            sources.append((src, seed))
            for step in (0, 50, 100, 150):
                loss = 6.0 - 0.01 * step - (0.05 if variant == "new" else 0) - 0.02 * seed
                rows.append(dict(run=src, source=src, variant=variant, step=step, val_loss=loss,
                                 train_time_s=step * (5.0 if src == "base0" and step == 150 else 1.0)))
    val = pd.DataFrame(rows)
    seeds = pd.DataFrame(sources, columns=["source", "seed"])
    sel = stats.select_runs(val, "new", "base", seeds)
    assert sel.design == "paired" and sel.seeds == (0, 1, 2) and set(sel.runs) == {"new0", "new1", "new2", "base0",
                                                                                    "base1", "base2"}
    stalled = stats.clock_stalls(val, factor=1.5)
    assert list(stalled.loc[stalled["stalled"], "run"]) == ["base0"]
    timed = stats.select_runs(val, "new", "base", seeds, exclude={"base0": "stalled clock"})
    assert timed.seeds == (1, 2) or timed.design == "Welch"
    timed = stats.select_runs(val, "new", "base", seeds, exclude={"base0": "stalled clock"}, min_pairs=2)
    assert timed.seeds == (1, 2) and dict(timed.left_out)["new0"].startswith("the other arm's run of its seed")
    md = blog.comparison(val, ["new"], "base", "demo", "sel", zoom_from=50, root=tmp_path,
                         selections={"new": sel}, time_selections={"new": timed}).data
    images = tmp_path / "images" / "demo"
    assert set(plots.figure_runs(images / "sel-step-50-150.png")) == set(sel.runs)
    assert set(plots.figure_runs(images / "sel-step-diff.png")) == set(sel.runs)
    assert set(plots.figure_runs(images / "sel-time.png")) == set(timed.runs)  # base0 and its partner left out
    assert "both arms over seeds 0-2; left out: 3 runs (no run of the other arm at its seed)" in md
    assert "both arms over seeds 1-2; left out: 1 run (stalled clock)" in md
    d = plots.paired_differences(val, sel, "step")
    assert np.allclose(d["diff"], -0.05)


def test_span_runs_per_variant_data_end():
    import pandas as pd
    assert blog.span([15, 14, 2, 3, 4, 5, 8]) == "2-5, 8 and 14-15" and blog.span([8]) == "8"
    assert blog.span([1, 3]) == "1 and 3" and blog.span([14, 15]) == "14-15"
    val = pd.DataFrame({"run": ["a", "b", "c"], "variant": ["x01", "x01", "x00"], "step": [1, 2, 3],
                        "train_time_s": [10.0, 1446.5, 20.0]})
    assert blog.runs_per_variant(val) == "x01: 2 runs, x00: 1 run"
    assert blog.data_end(val) == 1450 and blog.data_end(val, "step", 1) == 3


def test_final_table_for_a_post():
    import pandas as pd
    final = pd.DataFrame({"variant": ["x00", "x01"], "n": [5, 5], "loss_mean": [2.91952, 2.91656],
                          "loss_std": [0.00104, 0.00044], "time_s_mean": [1472.35, 1486.91],
                          "p_value": [0.204866, 4.97268e-05], "welch_p_vs_baseline": [float("nan"), 0.00135]})
    lines = blog.final_table(final).splitlines()
    assert "SD (ddof = 0)" in lines[0] and "Welch one-sided" in lines[0]  # no std_ddof column: numpy's default
    assert "SD (ddof = 1)" in blog.final_table(final.assign(std_ddof=1)).splitlines()[0]
    assert lines[2] == "| x00 | 5 | 2.9195 | 0.0010 | 1472.3 | 0.205 | - |"
    assert lines[3] == "| x01 | 5 | 2.9166 | 0.0004 | 1486.9 | 5.0e-05 | 1.4e-03 |"


def test_verdicts_claim_only_what_holm_keeps():
    import numpy as np
    import pandas as pd
    import pytest
    from scipy import stats as st
    from embxlib import stats
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 0.05, 6)
    table = pd.DataFrame({"run": [f"{v}{i}" for v in "bcd" for i in range(6)], "variant": [v for v in "bcd" for _ in range(6)],
                          "seed": list(range(6)) * 3,
                          "val_loss": np.concatenate([base, base - 0.1 + rng.normal(0, 0.005, 6),
                                                      base - 0.01 + rng.normal(0, 0.005, 6)])})
    fam = stats.family(table, [("c", "b"), ("d", "b")])
    raw = [st.ttest_rel(table.val_loss[6:12], table.val_loss[:6]).pvalue, st.ttest_rel(table.val_loss[12:], table.val_loss[:6]).pvalue]
    assert fam["p_value"].tolist() == pytest.approx(raw)
    assert fam["p_holm"].tolist() == pytest.approx([min(1, 2 * min(raw)), max(2 * min(raw), max(raw))])
    c, d = fam.itertuples()
    assert blog.verdict(c, "c").startswith("c lowers the final loss: -0.")
    assert "paired over 6 seeds" in blog.verdict(c, "c") and "Holm-adjusted over 2" in blog.verdict(c, "c")
    # a fabricated borderline row: raw p below alpha, Holm above: no direction claimed
    border = d._replace(p_value=0.03, p_holm=0.06, reject_holm=False)
    text = blog.verdict(border, "d")
    assert "not shown once the family is corrected" in text and "lowers" not in text
    lines = blog.family_table(fam).splitlines()
    assert len(lines) == 4 and "| c vs b | paired | 6 pairs |" in lines[2]


# --- the committed posts ---------------------------------------------------------------------------------

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from conftest import ROOT  # noqa: E402

POSTS = ["x0", "value_embeddings", "cpu_scale"]
UNITS = r"(?:s|sec|seconds?|min|minutes?|runs?|times|steps?|tokens|%)\b"


@pytest.mark.parametrize("slug", POSTS)
def test_post_text_types_no_result_by_hand(slug):
    """Numbers that come from data (losses, times, counts of runs, top-k) are computed in code cells: the
    markdown cells of the post's notebook hold none (links, code and layer names of the setups aside)."""
    nb = nbformat.read(ROOT / "nbs" / f"blog_{slug}.ipynb", 4)
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        text = re.sub(r"`[^`]*`|\]\([^)]*\)|Apache-2\.0", "", cell.source)
        assert not re.search(r"\d+\.\d+", text), cell.source
        assert not re.search(rf"\b\d+(?:-\d+)? ?{UNITS}|top-\d+", text), cell.source


@pytest.mark.parametrize("slug", POSTS)
def test_one_images_folder_per_post_holding_exactly_its_figures(slug):
    post = (ROOT / "blog" / slug / "index.md").read_text()
    linked = {Path(p).name for p in re.findall(rf"\]\(\.\./\.\./images/{slug}/([^)]+)\)", post)}
    assert linked and linked == {p.name for p in (ROOT / "images" / slug).iterdir()}
    assert not re.search(r"\]\(\.\./\.\./images/(?!%s/)" % slug, post)  # no figure of another folder
    assert {p.name for p in (ROOT / "images").iterdir()} == {p.name for p in (ROOT / "blog").iterdir()}


@pytest.mark.slow
def test_committed_posts_are_what_their_notebooks_render(tmp_path):
    """Rendering the posts again from their notebooks and the published data gives the committed files, byte for
    byte: the text, numbers and figures are up to date and the rendering is deterministic."""
    for inputs in ("published", "runs", "data"):  # the published runs, the committed CPU runs, the corpus
        (tmp_path / inputs).symlink_to(ROOT / inputs)
    for slug in POSTS:
        blog.render(ROOT / "nbs" / f"blog_{slug}.ipynb", root=tmp_path)
        assert (tmp_path / "blog" / slug / "index.md").read_bytes() == (ROOT / "blog" / slug / "index.md").read_bytes()
        rendered = {p.name: p.read_bytes() for p in (tmp_path / "images" / slug).iterdir()}
        assert rendered == {p.name: p.read_bytes() for p in (ROOT / "images" / slug).iterdir()}, slug


def test_a_post_notebook_opened_in_nbs_works_from_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT / "nbs")
    blog.work_from_root()
    assert Path.cwd() == ROOT
    monkeypatch.chdir(ROOT / "tests")  # anywhere else (e.g. blog.render's own root): left alone
    blog.work_from_root()
    assert Path.cwd() == ROOT / "tests"


def test_cpu_scale_figures_draw_the_runs_their_tests_compare():
    """The figures of the cpu_scale post record the runs they draw (plots.figure_runs): a per-time figure of the
    study draws no run whose stalled clock its test leaves out, and a figure of a variant run on fewer seeds than
    the baseline draws the baseline over the variant's seeds only, never averaging in runs its paired test does
    not compare. Fails when a figure averages a run its test excluded."""
    import warnings

    import nbformat as nbf

    from embxlib import plots, runs, stats
    params = {}
    exec(nbf.read(ROOT / "nbs" / "blog_cpu_scale.ipynb", 4).cells[0].source, {}, params)
    images = ROOT / "images" / "cpu_scale"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = {"first": params["inputs"], "study": params["study_inputs"]}
        data = {k: (runs.load_runs(v), runs.run_settings(v)) for k, v in groups.items()}
    study_val = data["study"][0]
    stalled = set(stats.clock_stalls(study_val, factor=params["stall_factor"]).query("stalled")["run"])
    assert stalled, "the study has the stalled run its per-time tests leave out"
    for name in ("bigram-time.png", "ve-gates-time.png"):
        drawn = set(plots.figure_runs(images / name))
        assert drawn and not drawn & stalled, name

    def arms(which, drawn):
        val, settings = data[which]
        info = val[val["run"].isin(drawn)].groupby("run")[["variant", "source"]].first()
        info["seed"] = info["source"].map(settings.set_index("source")["seed"])
        return info.groupby("variant")["seed"].apply(set)

    checked = 0
    for png in sorted(images.glob("*.png")):
        drawn = plots.figure_runs(png)
        if drawn is None:  # every loss figure names its runs; only the lambda figures do not
            assert png.name.startswith("x01-lambdas"), png.name
            continue
        which = "study" if png.name.startswith(("bigram", "ve-gates")) else "first"
        seeds = arms(which, set(drawn))
        base = params["baseline"] if params["baseline"] in seeds else "x01-ve2"  # token lambdas on x01: x01's
        others = [v for v in seeds.index if v != base]
        if base in seeds and others:
            variant_seeds = set().union(*(seeds[v] for v in others))
            assert seeds[base] <= variant_seeds, (png.name, seeds.to_dict())
            checked += 1
    assert checked >= 5

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
    md = blog.comparison(val, ["better", "same"], "base", "demo", "cmp", zoom_from=50, root=tmp_path).data
    for name in ("cmp-step.png", "cmp-step-50-100.png", "cmp-time.png"):
        assert (tmp_path / "images" / "demo" / name).is_file() and f"images/demo/{name}" in md
    assert "**better** (3 runs): final loss lower than base" in md
    assert "**same** (3 runs): no difference from base shown" in md
    table_line = next(line for line in md.splitlines() if line.startswith("| better"))
    assert "1.2" in table_line  # 1.2x the baseline's ms per step
    assert np.isclose(float(table_line.split("|")[5]), np.mean(finals["better"]) - np.mean(finals["base"]))

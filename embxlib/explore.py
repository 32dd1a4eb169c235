"""Interactive figures for JupyterLab: an explorer over loaded runs and a live view of running runs or sweeps.

    ex = explore(val, train=runs.load_train_loss(inputs), lam=lam)         # a cell's last line shows it
    view = watch("runs/sweep")                                              # returns at once, follows the runs

Both draw with matplotlib on an ipympl canvas (the `widget` backend's canvas, made for our Figure without pyplot)
and ipywidgets controls; no JavaScript of our own. Without a frontend (papermill, tests) the same objects work on a
plain canvas: the controls are widgets whose values can be set from Python, and `save` writes the static PNG.

Explorer: variants on/off (a checkbox each), x axis step or training time, a range slider for the window (the
y range follows what is visible), validation and training loss (training loss with an optional exponential
smoothing, debiased as TensorBoard's), a readout of the point nearest the mouse (variant, run, step, time, loss),
a status line (what is shown, the axis limits), and, with lambdas, the per-layer view: every run's own line (signs
differ between seeds at tiny scale, so no mean is drawn over them) at the step the step slider picks.

LiveView: an Explorer whose tables are re-read from the run folders every `every` seconds by a background thread
(the kernel stays free, also while another cell trains), drawn as lines are written, stopping by itself when every
run found has ended (summary.json finished, failed or stopped, or its run.lock names a process of this machine that
is gone: "running, its process is gone") and no launcher or sweep holds a lock. Its figure is
an Image widget the thread fills (no mouse readout there; `explore` on the finished runs has it).
"""
from __future__ import annotations

import html
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from . import plots, runs
from .runfolder import RUN_LOCK, SWEEP_LOCK, lock_info, process_alive
from .stats import is_mixing_stream

X_AXES = {"step": "step", "time": "train_time_s"}
ENDED = ("finished", "failed", "stopped")


def _canvas(fig: Figure):
    """An ipympl canvas (a widget) for fig when ipympl is there, else matplotlib's default (Agg) canvas."""
    try:
        from ipympl.backend_nbagg import Canvas, FigureManager
    except ImportError:  # pragma: no cover - ipympl is a dependency
        return None
    canvas = Canvas(fig)
    with warnings.catch_warnings():  # ipympl's toolbar passes traitlets an argument it deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        FigureManager(canvas, 0)
    canvas.header_visible = False
    canvas.toolbar_position = "right"
    return canvas


def _ready(canvas) -> None:
    """Give an ipympl canvas shown inside other widgets its first image and size, as displaying it alone would
    (its _repr_mimebundle_ sets them): without them the frontend draws a 0x0 canvas from a broken image."""
    if canvas is not None and hasattr(canvas, "_repr_mimebundle_"):
        canvas._repr_mimebundle_()


def _plain(name) -> str:
    """A name from a run folder as literal text in a matplotlib label: a `$` would start mathtext (a name such as
    `$\\foo$` made drawing raise)."""
    return str(name).replace("$", "\\$")


def smooth(values: np.ndarray, weight: float) -> np.ndarray:
    """Exponential moving average with TensorBoard's debiasing: weight 0 is the raw curve, 0.9 a strong smoothing;
    NaN values are skipped."""
    values = np.asarray(values, dtype=float)
    if weight <= 0 or len(values) == 0:
        return values
    out = np.empty_like(values)
    last, n = 0.0, 0
    for i, v in enumerate(values):
        if np.isfinite(v):
            last, n = last * weight + (1 - weight) * v, n + 1
        out[i] = last / (1 - weight ** n) if n else np.nan
    return out


class Explorer:
    """Loss curves of loaded runs with controls; see the module docstring. Display it (a cell's last line)."""

    def __init__(self, val: pd.DataFrame, train: pd.DataFrame | None = None, lam: pd.DataFrame | None = None,
                 x: str = "step", smoothing: float = 0.6, title: str | None = None):
        import ipywidgets as w

        self.title = title
        self.fig = Figure(figsize=(9, 4.8), layout="constrained")
        self.ax = self.fig.add_subplot()
        self.canvas = self._make_canvas()
        self.lines: list[dict] = []  # one per (run, kind): line, variant, run, kind, step, time, loss
        self.variant_boxes: dict[str, w.Checkbox] = {}
        self.variant_box = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.x_axis = w.ToggleButtons(options=list(X_AXES), value="time" if x == "train_time_s" else x,
                                      description="x axis")
        self.window = w.FloatRangeSlider(description="window", min=0.0, max=1.0, value=(0.0, 1.0), step=1.0,
                                         continuous_update=False, readout_format=".0f",
                                         layout=w.Layout(width="70%"))
        self.show_val = w.Checkbox(value=True, description="validation loss")
        self.show_train = w.Checkbox(value=True, description="train loss")
        self.smoothing = w.FloatSlider(description="smoothing", min=0.0, max=0.99, step=0.01, value=smoothing,
                                       continuous_update=False)
        self.readout = w.HTML("point at a curve to read its variant, run, step, time and loss")
        self.status = w.HTML()
        self._full_window = True  # the window spans the data: it follows new data (live view)
        self._updating = False
        self._set_tables(val, train)
        for control in (self.show_val, self.show_train, self.smoothing):
            control.observe(lambda change: self.update(), "value")
        self.x_axis.observe(self._on_x_axis, "value")
        self.window.observe(self._on_window, "value")
        self.fig.canvas.mpl_connect("motion_notify_event", self._on_move)
        self.lambdas = LambdaView(lam) if lam is not None and not lam.empty and any(
            is_mixing_stream(s) for s in pd.unique(lam["stream"])) else None
        controls = [self.variant_box, w.HBox([self.x_axis, self.show_val, self.show_train]),
                    w.HBox([self.window, self.smoothing])]
        self.widget = w.VBox(controls + [self._figure_widget(), self.readout, self.status]
                             + ([self.lambdas.widget] if self.lambdas else []))
        self._reset_window()
        self.update()
        _ready(self.canvas)

    def _make_canvas(self):
        return _canvas(self.fig)

    def _figure_widget(self):
        import ipywidgets as w
        return self.canvas if self.canvas is not None else w.Output()

    # --- data ---------------------------------------------------------------------------------------------

    def _set_tables(self, val: pd.DataFrame, train: pd.DataFrame | None) -> None:
        import ipywidgets as w

        val = val if val is not None else pd.DataFrame(columns=runs.VAL_COLUMNS)
        train = train if train is not None else pd.DataFrame(columns=runs.TRAIN_COLUMNS)
        self.val, self.train = val, train
        variants = list(dict.fromkeys(list(pd.unique(val["variant"])) + list(pd.unique(train["variant"]))))
        for variant in variants:
            if variant not in self.variant_boxes:
                box = w.Checkbox(value=True, description=str(variant), indent=False,
                                 layout=w.Layout(width="auto", margin="0 12px 0 0"))
                box.observe(lambda change: self.update(), "value")
                self.variant_boxes[variant] = box
        self.variant_box.children = tuple(self.variant_boxes.values())
        self.colors = plots.palette(self.variant_boxes)
        for line in self.lines:
            line["line"].remove()
        self.lines = []
        for kind, table, column in (("train", train, "train_loss"), ("val", val, "val_loss")):
            for (variant, run), group in table.groupby(["variant", "run"], sort=False):
                group = group.sort_values("step", kind="stable")
                style = dict(linewidth=0.8, alpha=0.45) if kind == "train" else dict(linewidth=1.6, marker=".",
                                                                                  markersize=4)
                (line,) = self.ax.plot([], [], color=self.colors[variant], **style)
                self.lines.append(dict(line=line, variant=variant, run=run, kind=kind,
                                       step=group["step"].to_numpy(dtype=float),
                                       time=group["train_time_s"].to_numpy(dtype=float),
                                       loss=group[column].to_numpy(dtype=float)))

    def set_data(self, val: pd.DataFrame, train: pd.DataFrame | None = None) -> None:
        """New tables (e.g. re-read while runs train); the controls keep their settings, a window that spanned
        the data keeps spanning it."""
        self._set_tables(val, train)
        if self._full_window:
            self._reset_window()
        self.update()

    def _x_name(self) -> str:
        return "step" if self.x_axis.value == "step" else "time"

    def _x_range(self) -> tuple[float, float]:
        xs = [x[np.isfinite(x)] for x in (line[self._x_name()] for line in self.lines)]  # (runs.load_runs warns)
        xs = [x for x in xs if len(x)]
        if not xs:
            return 0.0, 1.0
        lo, hi = float(min(x.min() for x in xs)), float(max(x.max() for x in xs))
        return lo, max(hi, lo + 1.0)

    def _reset_window(self) -> None:
        lo, hi = self._x_range()
        self._updating = True
        try:
            self.window.min, self.window.max = min(lo, self.window.min), max(hi, self.window.max)
            self.window.min, self.window.max = lo, hi
            self.window.step = 1.0 if self.x_axis.value == "step" else max((hi - lo) / 500, 0.01)
            self.window.readout_format = ".0f" if self.x_axis.value == "step" else ".1f"
            self.window.value = (lo, hi)
        finally:
            self._updating = False
        self._full_window = True

    def _on_x_axis(self, change) -> None:
        self._reset_window()
        self.update()

    def _on_window(self, change) -> None:
        if self._updating:
            return
        self._full_window = tuple(change["new"]) == (self.window.min, self.window.max)
        self.update()

    # --- drawing ------------------------------------------------------------------------------------------

    def visible_lines(self) -> list[dict]:
        return [line for line in self.lines if line["line"].get_visible()]

    def update(self) -> None:
        """Redraw from the controls' values."""
        x_name = self._x_name()
        lo, hi = self.window.value
        visible_y = []
        for line in self.lines:
            on = self.variant_boxes[line["variant"]].value and (
                self.show_val.value if line["kind"] == "val" else self.show_train.value)
            y = smooth(line["loss"], self.smoothing.value) if line["kind"] == "train" else line["loss"]
            line["shown_loss"] = y
            line["line"].set_data(line[x_name], y)
            line["line"].set_visible(bool(on))
            if on:
                inside = (line[x_name] >= lo) & (line[x_name] <= hi)
                visible_y.append(y[inside])
        self.ax.set_xlim(lo, hi)
        plots.fit_y(self.ax, visible_y)
        self.ax.set_xlabel(plots.AXIS_LABELS[X_AXES[x_name]])
        self.ax.set_ylabel("loss")
        self.ax.set_title(self.title or "loss: validation (points) and training (thin"
                          + (f", smoothed {self.smoothing.value:.2f})" if self.smoothing.value else ")"))
        self.ax.grid(alpha=0.3)
        self._legend()
        self._write_status()
        self.draw()

    def _legend(self) -> None:
        from matplotlib.lines import Line2D
        shown = [v for v, box in self.variant_boxes.items() if box.value]
        counts = {v: len({l["run"] for l in self.lines if l["variant"] == v}) for v in shown}
        handles = [Line2D([], [], color=self.colors[v]) for v in shown]
        labels = [f"{_plain(v)} ({counts[v]} run{'s' if counts[v] != 1 else ''})" for v in shown]
        if self.ax.get_legend() is not None:
            self.ax.get_legend().remove()
        if handles:
            self.ax.legend(handles, labels, fontsize="small", loc="upper right")

    def _write_status(self) -> None:
        visible = self.visible_lines()
        variants = sorted({l["variant"] for l in visible}, key=list(self.variant_boxes).index)
        (x0, x1), (y0, y1) = self.ax.get_xlim(), self.ax.get_ylim()
        self.status.value = (f"<span class='embx-status'>shown: {len(visible)} curves of "
                             f"{len({l['run'] for l in visible})} runs, variants "
                             f"{html.escape(', '.join(map(str, variants))) or 'none'}; "
                             f"x {x0:.6g} to {x1:.6g}, y {y0:.4f} to {y1:.4f}</span>")

    def draw(self) -> None:
        # draw(), not draw_idle(): draw_idle waits for the frontend to ask, through the kernel's main thread,
        # which a training cell keeps busy; draw() renders here and pushes the image (ipympl) at once
        self.fig.canvas.draw()

    def nearest(self, x_px: float, y_px: float, max_px: float = 20.0) -> dict | None:
        """The visible data point nearest the display position (pixels), within max_px: variant, run, kind, step,
        train_time_s, loss; None when no curve is that close."""
        best, best_d = None, max_px
        to_px = self.ax.transData.transform
        for line in self.visible_lines():
            xs, ys = line[self._x_name()], line["shown_loss"]
            if not len(xs):
                continue
            px = to_px(np.column_stack([xs, ys]))
            d = np.hypot(px[:, 0] - x_px, px[:, 1] - y_px)
            d[~np.isfinite(d)] = np.inf
            i = int(np.argmin(d))
            if d[i] < best_d:
                best_d = d[i]
                best = dict(variant=line["variant"], run=line["run"], kind=line["kind"], step=int(line["step"][i]),
                            train_time_s=float(line["time"][i]), loss=float(ys[i]))
        return best

    def _on_move(self, event) -> None:
        if event.inaxes is not self.ax:
            return
        point = self.nearest(event.x, event.y)
        if point is not None:
            self.readout.value = self.describe(point)

    @staticmethod
    def describe(point: dict) -> str:
        kind = "validation" if point["kind"] == "val" else "train (smoothed as shown)"
        return (f"<b>{html.escape(str(point['variant']))}</b> · run {html.escape(str(point['run']))} · {kind} loss "
                f"<b>{point['loss']:.4f}</b> · step {point['step']} · {point['train_time_s']:.1f} s")

    # --- output -------------------------------------------------------------------------------------------

    def save(self, path) -> Path:
        """The figure as it is now, as a static PNG (plots.save)."""
        return plots.save(self.fig, path)

    def _ipython_display_(self):
        from IPython.display import display
        display(self.widget)


class LambdaView:
    """Per-layer lambdas of the mixing streams (x, x00, x01, ...): one line per run and stream at the step the
    slider picks (each run's last logged step at or before it), for the variant the dropdown picks."""

    def __init__(self, lam: pd.DataFrame):
        import ipywidgets as w

        self.lam = lam[lam["stream"].map(is_mixing_stream)]
        variants = list(pd.unique(self.lam["variant"]))
        self.fig = Figure(figsize=(9, 4), layout="constrained")
        self.ax = self.fig.add_subplot()
        self.canvas = _canvas(self.fig)
        self.variant = w.Dropdown(options=variants, value=variants[-1], description="lambdas of")
        steps = sorted(pd.unique(self.lam["step"]))
        self.step = w.SelectionSlider(options=[int(s) for s in steps], value=int(steps[-1]), description="step",
                                      continuous_update=False, layout=w.Layout(width="60%"))
        self.variant.observe(lambda change: self.update(), "value")
        self.step.observe(lambda change: self.update(), "value")
        self.widget = w.VBox([w.HBox([self.variant, self.step])]
                             + ([self.canvas] if self.canvas is not None else []))
        self.update()
        _ready(self.canvas)

    def update(self) -> None:
        self.ax.clear()
        data = self.lam[(self.lam["variant"] == self.variant.value) & (self.lam["step"] <= self.step.value)]
        last = data.groupby("run")["step"].transform("max")
        plots.plot_layer_lambdas_runs(data[data["step"] == last], ax=self.ax,
                                      title=f"{_plain(self.variant.value)}: lambdas per layer at step {self.step.value}, "
                                            f"one line per run ({data['run'].nunique()} runs)")
        self.fig.canvas.draw()


def explore(val: pd.DataFrame, train: pd.DataFrame | None = None, lam: pd.DataFrame | None = None,
            x: str = "step", smoothing: float = 0.6, title: str | None = None) -> Explorer:
    """An interactive explorer over load_runs' table (with load_train_loss's and load_lambdas' if given)."""
    return Explorer(val, train=train, lam=lam, x=x, smoothing=smoothing, title=title)


# --- live view ---------------------------------------------------------------------------------------------


def _run_folders(paths) -> list[Path]:
    return [p for p in runs._expand(paths) if p.is_dir()] if paths else []


def _held(folder: Path, name: str) -> bool:
    info = lock_info(folder, name)
    return bool(info.get("pid")) and process_alive(info["pid"])


GONE = "its process is gone"


def _holder_gone(folder: Path) -> bool:
    """The run's lock names a process of this machine that no longer runs: a trainer killed (SIGKILL, the OOM
    killer) before it could record its end. A lock of another machine (a SLURM node) cannot be checked from here."""
    import socket
    info = lock_info(folder, RUN_LOCK) if (folder / RUN_LOCK).is_file() else {}
    return (bool(info.get("pid")) and info.get("host", socket.gethostname()) == socket.gethostname()
            and not process_alive(info["pid"]))


class LiveView(Explorer):
    """An Explorer over run folders that re-reads them every `every` seconds in a background thread; see
    the module docstring. stop() ends it early; join() waits for it to end; `ended` tells whether it has."""

    def __init__(self, paths, every: float = 2.0, timeout: float | None = None, x: str = "step",
                 smoothing: float = 0.6, title: str | None = None):
        self.paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        self.every, self.timeout = every, timeout
        self.updates = 0  # how many times new lines were drawn
        self.ended = threading.Event()
        self._stop = threading.Event()
        runs._QUIET.on = True
        try:
            tables = self._read()
        finally:
            runs._QUIET.on = False
        super().__init__(*tables, x=x, smoothing=smoothing, title=title or "live: " + _plain(", ".join(
            map(str, self.paths))))
        runs._QUIET.on = True
        try:
            self.state = self._state()
        finally:
            runs._QUIET.on = False
        self._write_status()
        self.readout.value = "live view: the mouse readout is in explore.explore (e.g. over these runs once they end)"
        self.thread = threading.Thread(target=self._loop, name="embxlib-live-view", daemon=True)
        self.thread.start()

    def _read(self):
        val = runs.load_runs(self.paths, require=False, pool=True)
        train = runs.load_train_loss(self.paths)
        return val, train

    def _state(self) -> dict:
        folders = [f for f in _run_folders(self.paths) if (f / "config.json").is_file()]
        status = {}
        for f in folders:
            summary = runs.read_json_file(f / "summary.json") if (f / "summary.json").exists() else {}
            status[f.name] = str(summary.get("status", "starting"))
            if status[f.name] not in ENDED and _holder_gone(f):
                status[f.name] += ", " + GONE  # it ends here, as a run that stopped

        locked = any(_held(Path(runs.from_root(p)), SWEEP_LOCK) for p in self.paths if Path(runs.from_root(p)).is_dir())
        locked = locked or any(_held(f, RUN_LOCK) for f in folders)
        return dict(status=status, locked=locked, done=bool(status) and not locked
                    and all(s in ENDED or s.endswith(GONE) for s in status.values()))

    def _loop(self) -> None:
        runs._QUIET.on = True  # this thread only: runs being written give missing files and torn lines
        start = time.time()
        seen = None
        try:
            while not self._stop.is_set():
                state = self._state()  # before reading: lines written up to the end are in this read
                val, train = self._read()
                key = (len(val), len(train))
                if key != seen:
                    seen = key
                    self.set_data(val, train)
                    self.updates += 1
                self.state = state
                self._write_status()
                if state["done"] or (self.timeout is not None and time.time() - start > self.timeout):
                    break
                self._stop.wait(self.every)
        finally:
            self.ended.set()
            self._write_status()

    def _write_status(self) -> None:
        super()._write_status()
        state = getattr(self, "state", None)
        if state is None:
            return
        counts: dict[str, int] = {}
        for s in state["status"].values():
            counts[s] = counts.get(s, 0) + 1
        runs_text = html.escape(", ".join(f"{n} {s}" for s, n in counts.items())) or "no run folder yet"
        end = "ended" if self.ended.is_set() else f"watching every {self.every:g} s"
        self.status.value += f"<br><span class='embx-live'>live view: {runs_text}; {end}</span>"

    def _make_canvas(self):
        return None  # matplotlib's own (Agg) canvas: the image goes to the frontend as an Image widget's value

    def _figure_widget(self):
        import ipywidgets as w
        # an Image widget, not an ipympl canvas: a widget's value reaches the page from this thread while another
        # cell keeps the kernel busy, whereas ipympl's canvas waits for its handshake with the kernel's main thread
        self.image = w.Image(format="png")
        return self.image

    def draw(self) -> None:
        import io
        buf = io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=100)
        if hasattr(self, "image"):
            self.image.value = buf.getvalue()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the view has ended (the runs ended, or stop/timeout); True when it has."""
        return self.ended.wait(timeout)


def watch(paths, every: float = 2.0, timeout: float | None = None, x: str = "step", smoothing: float = 0.6,
          title: str | None = None) -> LiveView:
    """Follow run folders, or a sweep's folder, as they train: returns at once (display it: a cell's last line),
    re-reads every `every` seconds, and stops by itself when the runs have ended."""
    return LiveView(paths, every=every, timeout=timeout, x=x, smoothing=smoothing, title=title)

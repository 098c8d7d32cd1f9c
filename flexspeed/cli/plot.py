"""``flexspeed plot``: the loss and learning-rate curves of a ``csv_monitor`` run, as a PNG.

RUN_DIR is the directory the CSV monitor wrote (``<output_path>/<job_name>``), or its
``output_path`` when that holds a single job. The x axis is the global sample count, as the
monitor records it. Needs matplotlib (``pip install matplotlib``); it draws with the Agg
backend, so no display is needed.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from flexspeed.runtime.monitor import csv_file_name

__all__ = ["add_parser", "run", "read_scalar", "find_run_dir", "plot_run"]

LOSS = "Train/Samples/train_loss"
LR = "Train/Samples/lr"

_EPILOG = """\
examples:
  flexspeed plot runs/csv/my_job                 # writes runs/csv/my_job/curves.png
  flexspeed plot runs/csv --out loss.png --smooth 20

the config that produces RUN_DIR:
  "csv_monitor": {"enabled": true, "output_path": "runs/csv", "job_name": "my_job"}
"""


def read_scalar(run_dir: str, name: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one scalar (e.g. ``"Train/Samples/train_loss"``) from its CSV file."""
    path = os.path.join(run_dir, csv_file_name(name))
    steps: list[int] = []
    values: list[float] = []
    with open(path, newline="") as f:
        rows = csv.reader(f)
        next(rows, None)  # header: step,<name>
        for row in rows:
            if len(row) >= 2:
                steps.append(int(float(row[0])))
                values.append(float(row[1]))
    return steps, values


def find_run_dir(path: str) -> str:
    """``path`` if it holds the loss CSV, else its single subdirectory that does.

    Raises:
        FileNotFoundError: no run there, or several (then it lists them).
    """
    loss_file = csv_file_name(LOSS)
    if os.path.isfile(os.path.join(path, loss_file)):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path!r} does not exist; pass the csv_monitor directory <output_path>/<job_name>")
    runs = sorted(d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, loss_file)))
    if len(runs) == 1:
        return os.path.join(path, runs[0])
    if runs:
        raise FileNotFoundError(f"{path!r} holds several runs ({', '.join(runs)}); pass one of them")
    raise FileNotFoundError(f"no {loss_file} in {path!r} or its subdirectories; enable csv_monitor in the config "
                            "and pass <output_path>/<job_name>")


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_run(run_dir: str, out: str | None = None, title: str | None = None, smooth: int = 1) -> str:
    """Draw loss (and lr, when recorded) against samples; return the PNG's path.

    Args:
        run_dir: the CSV monitor directory (see :func:`find_run_dir`).
        out: output file (default ``<run_dir>/curves.png``).
        title: figure title (default: the run directory's name).
        smooth: moving-average window over the loss (1 = raw).
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("flexspeed plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = find_run_dir(run_dir)
    steps, loss = read_scalar(run_dir, LOSS)
    has_lr = os.path.isfile(os.path.join(run_dir, csv_file_name(LR)))
    fig, axes = plt.subplots(2 if has_lr else 1, 1, figsize=(7, 6 if has_lr else 3.5), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, color="tab:blue", alpha=0.35 if smooth > 1 else 1.0, linewidth=1, label="train loss")
    if smooth > 1:
        ax.plot(steps, _smooth(loss, smooth), color="tab:blue", linewidth=2, label=f"moving average ({smooth})")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_lr:
        lr_steps, lr = read_scalar(run_dir, LR)
        axes[1][0].plot(lr_steps, lr, color="tab:orange")
        axes[1][0].set_ylabel("learning rate")
        axes[1][0].grid(alpha=0.3)
    axes[-1][0].set_xlabel("samples")
    fig.suptitle(title or os.path.basename(os.path.normpath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Draw the train loss and learning rate that csv_monitor recorded, against the\n"
                                   "number of samples, into a PNG (matplotlib, no display needed).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="csv_monitor directory: <output_path>/<job_name>")
    p.add_argument("--out", "-o", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    p.add_argument("--smooth", type=int, default=1, metavar="N", help="moving average over N points (default 1: raw)")
    p.add_argument("--title", default=None, help="figure title (default: the run's name)")
    return p


def run(args: argparse.Namespace) -> int:
    try:
        path = plot_run(args.run_dir, args.out, title=args.title, smooth=args.smooth)
    except (FileNotFoundError, ImportError, ValueError) as e:
        print(f"flexspeed plot: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    return 0

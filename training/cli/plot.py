"""``vstar plot``: the training curves of SFT / RL runs as one PNG (``training.evaluation.curve_plot`` does the work).

``vstar.py`` calls ``register_plot``; matplotlib and TensorBoard's
reader are imported inside the handler so ``vstar --help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from training.cli.options import png_file


def register_plot(app: typer.Typer) -> None:
    @app.command()
    def plot(
        runs: Annotated[
            list[Path],
            typer.Argument(help="SFT / RL runs: checkpoint folders (their <out>.tb is read) or TensorBoard folders."),
        ],
        out: Annotated[Path, typer.Option("--out", help="PNG to write.", callback=png_file)],
        smoothing: Annotated[
            float, typer.Option("--smoothing", min=0.0, max=0.99, help="TensorBoard's smoothing of per-step curves.")
        ] = 0.6,
    ) -> None:
        """Training curves of runs as one PNG: loss, lr, held-out HR@10 / NDCG@10; RL reward std, reachability..."""
        from training.evaluation.curve_plot import plot_runs

        typer.echo(f"wrote {plot_runs(runs, out, smoothing)}")

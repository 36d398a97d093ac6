"""``vstar bench decode``, ``vstar bench ved`` and ``vstar bench catalog``: the decoders' and the catalog's
benchmarks (``training.bench``), each printing its figures and ratios against the reference measured in the
same run.

As every training-side handler (``training.cli.commands``): options are checked, and a checkpoint by its
manifest, before torch is imported; heavy imports stay inside the handlers so ``vstar --help`` is instant.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from models.sid_catalog import MAX_CODES  # torch-free, as every import here
from training.cli.options import DeviceOpt, demo_policy, int_list, require_checkpoint, writable_file, write_json


def register_bench(bench: typer.Typer) -> None:
    @bench.command(name="decode")
    def bench_decode(
        checkpoint: Annotated[
            Path | None,
            typer.Option(
                "--checkpoint", help="Checkpoint folder (default: a fresh tiny model on a synthetic catalog)."
            ),
        ] = None,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write {rows: [...]} here.", callback=writable_file)
        ] = None,
        beams: Annotated[str, typer.Option("--beams", help="Comma list of K.")] = "10,50",
        batches: Annotated[str, typer.Option("--batches", help="Comma list of batch sizes.")] = "1,32",
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed calls per cell (after a warm-up).")] = 10,
        device: DeviceOpt = "cpu",
    ) -> None:
        """Time our beam search, HF generate (reference) and the bare forward passes (floor)."""
        grid = int_list(beams, "--beams"), int_list(batches, "--batches")
        if min(grid[0]) < 2:  # the reference, HF generate, has no beam search of one beam (it is greedy search)
            raise typer.BadParameter(f"--beams {min(grid[0])}: the reference, HF generate, needs K >= 2")
        if checkpoint is not None:
            require_checkpoint(checkpoint)
        from models.checkpoint import load_checkpoint
        from training.bench.decode_bench import format_table, run_decode_bench

        policy = load_checkpoint(checkpoint, device).policy if checkpoint else demo_policy(device)
        sids = len(policy.catalog.sids)
        if max(grid[0]) > sids:  # a beam wider than the catalog ranks beams that do not exist
            raise typer.BadParameter(
                f"--beams {max(grid[0])} is more than the {sids} SIDs of the catalog; give at most {sids}"
            )
        result = run_decode_bench(policy, *grid, repeats=repeats)
        typer.echo(format_table(result), err=True)
        write_json(json_out, result)

    @bench.command(name="ved")
    def bench_ved(
        checkpoint: Annotated[
            Path | None,
            typer.Option(
                "--checkpoint",
                help="Checkpoint folder: its policy, VED settings and value head (a fresh head when it has none); "
                "default: a fresh tiny model on a synthetic catalog.",
            ),
        ] = None,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write {rows: [...]} here.", callback=writable_file)
        ] = None,
        num_candidates: Annotated[
            str, typer.Option("--num-candidates", help="Comma list of G, the SIDs VED returns.")
        ] = "10,16",
        batches: Annotated[str, typer.Option("--batches", help="Comma list of batch sizes.")] = "1,32",
        budget: Annotated[
            int | None,
            typer.Option(
                "--budget",
                min=1,
                help="Backbone tokens per prompt for both (default: the checkpoint's, else VED's own per G).",
            ),
        ] = None,
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed calls per cell (after a warm-up).")] = 10,
        device: DeviceOpt = "cpu",
    ) -> None:
        """Time VED against beam search of the width its token budget pays for."""
        gs, grid = int_list(num_candidates, "--num-candidates"), int_list(batches, "--batches")
        if checkpoint is not None:
            require_checkpoint(checkpoint)
        from models.checkpoint import load_checkpoint
        from models.value_head import load_value_head, value_head_for
        from models.ved_config import VEDConfig, budget_problem, checkpoint_ved_config
        from training.bench.ved_bench import format_table, run_ved_bench

        ckpt = load_checkpoint(checkpoint, device) if checkpoint else None
        policy = ckpt.policy if ckpt else demo_policy(device)
        head = load_value_head(ckpt, device, required=False) if ckpt else None
        if head is None:
            why = "the checkpoint has none" if ckpt else "no checkpoint given"
            typer.echo(f"note: a fresh value head ({why}): the search's cost, not a trained model's trees", err=True)
            head = value_head_for(policy)
        base = checkpoint_ved_config(ckpt, max(gs), budget, explore_slots=0) if ckpt else VEDConfig(budget=budget)
        sids = len(policy.catalog.sids)
        if max(gs) > sids:
            raise typer.BadParameter(
                f"--num-candidates {max(gs)} is more than the {sids} SIDs of the catalog; give at most {sids}"
            )
        for g in gs:
            problem = budget_problem(replace(base, num_candidates=g), policy.trie.depth, budget)
            if problem is not None:
                raise typer.BadParameter(problem)
        result = run_ved_bench(policy, head.to(policy.device), base, gs, grid, repeats=repeats)
        typer.echo(format_table(result), err=True)
        write_json(json_out, result)

    @bench.command(name="catalog")
    def bench_catalog(
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Write {rows: [...]} here.", callback=writable_file)
        ] = None,
        sids: Annotated[str, typer.Option("--sids", help="Comma list of catalog sizes (distinct SIDs).")] = (
            "10000,100000"
        ),
        batches: Annotated[str, typer.Option("--batches", help="Comma list of batch sizes.")] = "1,32",
        codebook: Annotated[
            int, typer.Option("--codebook", min=2, max=MAX_CODES, help="Codes per SID level (3 levels).")
        ] = 256,
        repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed calls per cell (after a warm-up).")] = 5,
        device: DeviceOpt = "cpu",
    ) -> None:
        """Trie memory, trie build, fusion bonus (against the trie-wide pass) and fused beam search per catalog size."""
        sizes, grid = int_list(sids, "--sids"), int_list(batches, "--batches")
        if max(sizes) > codebook**3:
            raise typer.BadParameter(
                f"--sids {max(sizes)} is more than the {codebook**3} distinct SIDs of {codebook} codes per level"
            )
        if min(sizes) < 10:  # beam search of width 10 ranks beams that exist
            raise typer.BadParameter(f"--sids {min(sizes)}: give at least 10 SIDs")
        from training.bench.catalog_bench import format_table, run_catalog_bench

        result = run_catalog_bench(sizes, grid, codebook, repeats, device=device)
        typer.echo(format_table(result), err=True)
        write_json(json_out, result)

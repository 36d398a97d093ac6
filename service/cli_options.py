"""What the service's commands share: the checkpoint option, the ``--device`` and ``--json`` checks, and the
service's settings read from the environment (``service.cli``: serve and bench serve; ``service.offline_cli``:
recommend and load-histories). Heavy imports stay inside the functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from models.output_path import output_file_problem

if TYPE_CHECKING:
    from service.settings import Settings

CheckpointOpt = Annotated[Path, typer.Option("--checkpoint", help="Checkpoint folder to serve.")]


def require_checkpoint(path: Path) -> None:
    """A folder with a manifest, checked before a server starts (after the other options' own checks)."""
    if not (path / "manifest.json").exists():
        raise typer.BadParameter(f"{path} is not a checkpoint folder (no manifest.json)")


def device_callback(value: str | None) -> str | None:
    """Typer callback of an optional ``--device`` (None: the settings' ``VSTAR_DEVICE``): one this machine has,
    checked as the training commands check theirs (``training.cli.options.device_name``)."""
    from training.cli.options import device_name

    return None if value is None else device_name(value)


def output_file_callback(path: Path | None) -> Path | None:
    """Typer callback of ``--json``: a path that can take the file, checked before the benchmark runs."""
    problem = None if path is None else output_file_problem(path)
    if problem is not None:
        raise typer.BadParameter(problem)
    return path


def _variable(loc: tuple[int | str, ...]) -> str:
    """``"VSTAR_MAX_K: "`` for a setting's error location, the environment variable it is read from; ``""`` for
    an error of several settings (their names are in its message)."""
    if not loc:
        return ""
    field = str(loc[0]).lower()  # redis_url's error is located at the alias it was read from (REDIS_URL)
    return (
        "REDIS_URL (or VSTAR_REDIS_URL)" if field.removeprefix("vstar_") == "redis_url" else f"VSTAR_{field.upper()}"
    ) + ": "


def settings_from_env(**overrides: Any) -> Settings:
    """The service's settings from the environment, ``overrides`` (options already checked) in their place;
    a bad one is one line naming its variable, never its value: it may be a password or a key."""
    from pydantic import ValidationError

    from service.errors import validation_reason
    from service.settings import Settings

    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = "; ".join(
            f"{_variable(err['loc'])}{validation_reason(err)}"
            for err in e.errors(include_url=False, include_input=False)
        )
        raise typer.BadParameter(f"bad VSTAR_* settings in the environment: {problems}") from None

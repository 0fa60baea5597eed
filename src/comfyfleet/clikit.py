"""What every command shares: the consoles, error handling, and running a coroutine.

A user's mistake (a bad fleet file or manifest, a missing key) ends in one red
line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from comfyfleet.errors import ComfyfleetError, ConfigError

P = ParamSpec("P")
T = TypeVar("T")

console = Console()
err_console = Console(stderr=True)


def exit_code_for(error: ComfyfleetError) -> int:
    """2 for a user's configuration mistake, 1 for everything else."""
    return 2 if isinstance(error, ConfigError) else 1


def friendly(func: Callable[P, T]) -> Callable[P, T]:
    """Turn comfyfleet errors into one red line on stderr and an exit status."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return func(*args, **kwargs)
        except ComfyfleetError as error:
            err_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(exit_code_for(error)) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)

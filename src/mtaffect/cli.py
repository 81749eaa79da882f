"""Command-line interface (typer)."""

import typer

app = typer.Typer(help="mtaffect: multi-task facial affect analysis", no_args_is_help=True)

"""The `parafold` command line: parse, call, print. Work lives in the modules it calls."""

from __future__ import annotations

import logging

import typer

app = typer.Typer(
    name="parafold",
    help="High-throughput AlphaFold2: CPU searches and GPU inference, split, overlapped, cached.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging.")) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# Each stage registers its commands below, in its own section. Keep imports of heavy modules
# (jax, alphafold.model) inside the command functions so `parafold --help` stays fast.

# --- search stage (features, databases, testdata) ---

# --- GPU stage (predict, params) ---

# --- run, status, demo ---

# --- report ---


if __name__ == "__main__":
    app()

"""``llmq prices``: the price each endpoint's models are counted at, and its source.

The decision the worker logs at start-up (:mod:`workers.prices`): the prices
set in the configuration, else the genai-prices catalogue bundled with this
install (never fetched), else 0 with a warning. It reads the configuration
only: no broker, no network.

Exit status: 0, or 1 when some model has no price (each is named on stderr).
"""

from __future__ import annotations

import sys

import click

from schemas.settings import ConfigError, load_settings
from workers.price_catalogue import bundled
from workers.prices import FIELDS, PriceBook

__all__ = ["prices_command"]


@click.command("prices")
@click.option("--config", type=click.Path(dir_okay=False), envvar="LLMQ_CONFIG")
def prices_command(config: str | None) -> None:
    """Show the USD per million tokens counted for each endpoint's models, and why."""
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    book = PriceBook(settings, bundled())
    click.echo("endpoint/model\t" + "\t".join(f.replace("_", " ") for f in FIELDS) + "\tsource")
    unpriced = 0
    for price in book:
        for above, rates in price.levels:
            name = f"{price.endpoint}/{price.model}" + (f" (> {above} tok)" if above else "")
            values = "\t".join(f"{getattr(rates, f):g}" for f in FIELDS)
            click.echo(f"{name}\t{values}\t{price.source}")
        if price.warning:
            unpriced += 1
            click.echo(price.warning, err=True)
    if unpriced:
        sys.exit(1)

"""The `vqa2` command. Thin: parse options, call library functions, format results.

Heavy imports (torch, transformers, bitsandbytes, peft) happen inside commands, never at module
level, so `vqa2 --help` and `vqa2 --version` answer instantly.
"""

import sys

import click

from vqa2cli import __version__
from vqa2cli.errors import SetupError, Vqa2Error


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vqa2")
def cli():
    """Tell how good a video looks, and why, with the VQA² model.

    \b
    Examples:
      vqa2 score clip.mp4
      vqa2 score videos/ --recursive --json > scores.json
      vqa2 ask clip.mp4 "Is there stuttering?"
    """


def main():
    """Console entry point; a command may return an int to set the exit code (1: some inputs failed)."""
    try:
        exit_code = cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as exit_:
        sys.exit(exit_.exit_code)
    except SetupError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except Vqa2Error as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(1)
    sys.exit(exit_code if isinstance(exit_code, int) else 0)

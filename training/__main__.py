"""`python -m training {train,evaluate,pack}`: the training commands without the rest of the service."""

import typer

from training.cli import evaluate_command, pack_command, train_command

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False)
app.command("train")(train_command)
app.command("evaluate")(evaluate_command)
app.command("pack")(pack_command)

if __name__ == "__main__":
    app()

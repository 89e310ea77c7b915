"""``python -m worker``: the same CLI as the ``quota-ledger`` console script."""

from worker.cli import app

app(prog_name="quota-ledger")

"""``python -m reid_ssl.cli ...`` (what ``torchrun -m reid_ssl.cli`` runs)."""

from reid_ssl.cli.main import entry

entry()

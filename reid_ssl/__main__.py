"""``python -m reid_ssl ...``: the ``reid_ssl`` command (the same entry as ``python -m reid_ssl.cli``)."""

from reid_ssl.cli.main import entry

if __name__ == "__main__":
    entry()

"""A registry entry is the only thing a new plug-in needs: config validation and ``--help`` read every registry.

For each registry: every registered name is accepted where it is used, nothing else is, and ``--help`` lists
exactly the registered names; an entry registered at run time appears in both without any other change.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from reid_ssl.cli.main import build_parser
from reid_ssl.config import ConfigError, load_config
from reid_ssl.data.datasets import CLASSIFICATION_DATASETS, DATASETS, REID_DATASETS, SSL_SOURCES, DatasetSpec
from reid_ssl.errors import UnknownNameError
from reid_ssl.export import EXPORT_FORMATS
from reid_ssl.losses import LOSSES
from reid_ssl.models import BACKBONES
from reid_ssl.optim import OPTIMIZERS
from reid_ssl.registry import Registry

CONFIG_KEYS: list[tuple[Registry[Any], str, Any]] = [
    (BACKBONES, "model.backbone", lambda spec: True),
    (LOSSES, "loss.name", lambda cls: True),
    (OPTIMIZERS, "optim.name", lambda fn: True),
    (DATASETS, "data.source", lambda spec: spec.ssl is not None or spec.stream),
]


def _help(*command: str) -> str:
    """A command's --help text, wrapped wide (argparse wraps at the terminal width, and may break at hyphens)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command[0]]
    for name in command[1:]:
        sub = next(a for a in sub._actions if getattr(a, "choices", None) and name in a.choices).choices[name]
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"
    try:
        return sub.format_help()
    finally:
        os.environ.pop("COLUMNS") if old is None else os.environ.__setitem__("COLUMNS", old)


def _overrides(key: str, name: str) -> list[str]:
    extra = {"loss.name=simclr": ["model.target=shared"], "data.source=list": ["data.list_file=x.txt"]}
    return [f"{key}={name}", *extra.get(f"{key}={name}", [])]


@pytest.mark.parametrize(("registry", "key", "applies"), CONFIG_KEYS, ids=[k for _, k, _ in CONFIG_KEYS])
def test_config_accepts_exactly_the_registered_names(registry: Registry[Any], key: str, applies: Any) -> None:
    names = [n for n, obj in registry.items() if applies(obj)]
    assert names
    for name in names:
        assert getattr(getattr(load_config(None, _overrides(key, name)), key.split(".")[0]), key.split(".")[1]) == name
    with pytest.raises(ConfigError, match=re.escape(str(names))):
        load_config(None, [f"{key}=not_a_registered_name"])


def test_help_lists_exactly_the_registered_names() -> None:
    eval_help = _help("eval")
    listed = re.search(r"one of: ([\w, -]+?) \(default", " ".join(eval_help.split())).group(1).split(", ")
    assert listed == [*REID_DATASETS(), *CLASSIFICATION_DATASETS()]
    finetune_help = " ".join(_help("finetune").split())
    assert re.search(r"one of: ([\w, -]+?) --root", finetune_help).group(1).split(", ") == list(REID_DATASETS())
    export_help = " ".join(_help("export").split())
    assert (
        all(f"{name}:" in export_help for name in EXPORT_FORMATS)
        and "{" + ",".join(EXPORT_FORMATS) + "}" in export_help
    )


def test_a_new_entry_needs_nothing_else(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Register a dataset and a loss at run time: the config, the CLI choices and --help know them at once."""
    spec = DatasetSpec("a test layout", reid=lambda root, **o: None, ssl=lambda root, data: [])
    monkeypatch.setitem(DATASETS._entries, "my-cameras", spec)
    monkeypatch.setitem(DATASETS._help, "my-cameras", spec.description)
    monkeypatch.setitem(LOSSES._entries, "my_loss", LOSSES["byol"])
    monkeypatch.setitem(LOSSES._help, "my_loss", "a test loss")
    assert "my-cameras" in SSL_SOURCES() and "my-cameras" in REID_DATASETS()
    assert load_config(None, ["data.source=my-cameras", "loss.name=my_loss"]).loss.name == "my_loss"
    assert "my-cameras" in " ".join(_help("eval").split())
    args = build_parser().parse_args(["eval", "--dataset", "my-cameras", "--checkpoint", str(tmp_path / "c.pt")])
    assert args.dataset == "my-cameras"


def test_unknown_names_list_the_choices() -> None:
    for registry in (BACKBONES, LOSSES, OPTIMIZERS, DATASETS, EXPORT_FORMATS):
        with pytest.raises(UnknownNameError, match=re.escape(str(list(registry)))):
            registry["no such thing"]
    with pytest.raises(ValueError, match="registered twice"):
        LOSSES.register("byol", LOSSES["byol"])

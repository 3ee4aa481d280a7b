"""torchreid interop: import it quietly, and serve reid_ssl's dataset lists as torchreid image datasets.

PyPI ``torchreid`` 0.2.5 repackages deep-person-reid's library (upstream 1.4.0) under ``torchreid.reid.*``,
declares no dependencies and has no Cython evaluator. Use attribute access only
(``torchreid.metrics.evaluate_rank``): ``from torchreid.utils import X`` fails on 0.2.5.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from reid_ssl.data.datasets import REID_DATASETS, load_split
from reid_ssl.data.reid import SYSU_DISTRACTOR_PID, ReidSplit, relabel
from reid_ssl.errors import UnknownNameError
from reid_ssl.images import open_rgb


def import_torchreid() -> ModuleType:
    """``import torchreid`` (PyPI 0.2.5), without its "Cython evaluation unavailable" warning.

    Use attribute access only (``torchreid.metrics.evaluate_rank``): ``from torchreid.utils import X`` fails
    on 0.2.5.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Cython evaluation.*")
        try:
            import torchreid
        except ImportError as e:
            raise ImportError(
                f"torchreid cannot be imported ({e}); PyPI torchreid 0.2.5 declares no "
                "dependencies: install scipy, gdown, opencv-python-headless and tensorboard"
            ) from e
    return torchreid


def torchreid_dataset_class(name: str, split: ReidSplit | None = None, **options: Any) -> type:
    """A ``torchreid.data.ImageDataset`` subclass that reads ``name`` with :func:`load_split`.

    With ``split`` the class serves those lists whatever root torchreid passes. Train pids are relabelled to
    0..N-1. A dataset without a train list (SYSU-30k) gets a one-image stub, because torchreid's ``Dataset``
    indexes ``train[0]``; training on it is meaningless. Images are opened with
    :func:`reid_ssl.images.open_rgb`, which raises on a corrupt file (torchreid's ``read_image`` retries
    forever).
    """
    if name not in REID_DATASETS():
        raise UnknownNameError(f"unknown re-ID dataset {name!r}; choose one of {list(REID_DATASETS())}")
    torchreid = import_torchreid()
    base: type[Any] = torchreid.data.ImageDataset
    fixed = dict(options)

    def __init__(self: Any, root: str = "", **kwargs: Any) -> None:
        opts = dict(fixed)
        for key, ours in (("cuhk03_labeled", "labeled"), ("cuhk03_classic_split", "classic"), ("split_id", "split_id")):
            value = kwargs.pop(key, None)
            if name == "cuhk03" and value is not None and ours not in fixed:
                opts[ours] = value
        data = split if split is not None else load_split(name, root or None, **opts)
        train = relabel(data.train) or [(data.query[0][0], 0, data.query[0][2])]
        self.reid_ssl_split = data
        base.__init__(self, train, data.query, data.gallery, **kwargs)

    def __getitem__(self: Any, index: int) -> dict[str, Any]:
        img_path, pid, camid, dsetid = self.data[index]
        img = open_rgb(img_path)
        if self.transform is not None:
            img = self._transform_image(self.transform, self.k_tfm, img)
        return {"img": img, "pid": pid, "camid": camid, "impath": img_path, "dsetid": dsetid}

    cls_name = "ReidSsl" + "".join(part.capitalize() for part in re.split(r"[^a-zA-Z0-9]", name) if part)
    return type(
        cls_name,
        (base,),
        {
            "__init__": __init__,
            "__getitem__": __getitem__,
            "_junk_pids": [SYSU_DISTRACTOR_PID] if name == "sysu30k" else [0, -1],
        },
    )


def register_torchreid_datasets(names: Sequence[str] = ("sysu30k", "pets09"), prefix: str = "") -> list[str]:
    """Register datasets with ``torchreid.data.register_image_dataset`` under ``prefix + name``.

    Safe to call twice (a name torchreid already knows is left as it is). Returns the registered names.
    """
    torchreid = import_torchreid()
    registered = []
    for name in names:
        key = prefix + name
        try:
            torchreid.data.register_image_dataset(key, torchreid_dataset_class(name))
        except ValueError as e:
            if "already" not in str(e).lower() and "exist" not in str(e).lower():
                raise
        registered.append(key)
    return registered

"""Market-1501-style file names: the one parser and the one writer.

Market-1501, DukeMTMC-reID and the splits reid_ssl writes (PETS09, ``prepare video``) name each crop
``<pid>_c<camera>[s<sequence>]_[f]<frame>[_<n>].jpg``, e.g. ``0002_c1s1_000451_03.jpg`` (Market) or
``0005_c2_f0046182.jpg`` (Duke). pid ``-1`` marks junk images (dropped from galleries, as torchreid does),
pid ``0`` distractors (kept as ordinary wrong matches).

**Camera ids are 0-based everywhere in reid_ssl**: ``camid = <camera in the file name> - 1``, torchreid's
convention. Evaluation, the index sidecar, ``index search --exclude-camid``, the app's camera filter and every
JSON output use this one number; file name ``..._c1...`` is camid 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

JUNK_PID = -1
DISTRACTOR_PID = 0

_NAME = re.compile(r"^(-?\d+)_c(\d+)(?:s(\d+))?(?:_f?(\d+))?")


@dataclass(frozen=True)
class MarketName:
    """What a Market-style file name says about its image."""

    pid: int
    camid: int  # 0-based: the file name's camera number minus 1
    frame: int | None = None
    sequence: int | None = None


def parse_market_name(name: str | Path) -> MarketName | None:
    """``0002_c1s1_000451_03.jpg`` -> ``MarketName(pid=2, camid=0, frame=451, sequence=1)``.

    Only the start of the name must match (torchreid reads names the same way); a folder part is ignored.
    Returns ``None`` for names that do not start with ``<pid>_c<camera>`` or whose camera is 0.
    """
    m = _NAME.match(Path(name).name)
    if m is None or int(m.group(2)) < 1:
        return None
    frame = int(m.group(4)) if m.group(4) is not None else None
    sequence = int(m.group(3)) if m.group(3) is not None else None
    return MarketName(int(m.group(1)), int(m.group(2)) - 1, frame, sequence)


def market_name(pid: int, camid: int, frame: int, sequence: int = 1, n: int = 0, ext: str = ".jpg") -> str:
    """The Market-1501 file name of a crop: ``market_name(2, 0, 451) == "0002_c1s1_000451_00.jpg"``.

    Args:
        camid: 0-based camera id (written as ``c<camid + 1>``).
    """
    if camid < 0 or pid < JUNK_PID:
        raise ValueError(f"need camid >= 0 and pid >= -1, got pid {pid}, camid {camid}")
    return f"{pid:04d}_c{camid + 1}s{sequence}_{frame:06d}_{n:02d}{ext}"

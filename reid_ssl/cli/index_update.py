"""`reid_ssl index add|remove|calibrate`: change an index in place, under its writer lock.

Each action loads the newest generation, changes it and publishes the next one; ids of the other items never
change. ``add`` embeds without holding the lock (the app may be adding too) and skips files already indexed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from reid_ssl.cli.common import (
    add_batch_size_option,
    add_device_option,
    add_index_option,
    add_json_option,
    add_parser,
    print_json,
    print_problems,
    print_table,
    wrap,
)
from reid_ssl.console import show_progress
from reid_ssl.errors import InputError, MissingFileError
from reid_ssl.index.sidecar import display_path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``index add``, ``index remove`` and ``index calibrate``."""
    a = add_parser(
        sub,
        "add",
        "embed more images and add them to an index",
        wrap(
            "Embed image files and folders (recursively) with the index's own embedder and add them under the "
            "index's writer lock. Files whose path is already indexed are skipped (--allow-duplicates adds them "
            "again); unreadable images are listed and left out."
        ),
        "examples:\n  reid_ssl index add new_crops/\n  reid_ssl index add --index IDX a.jpg b.jpg --json",
    )
    a.add_argument("paths", nargs="+", help="image files and/or folders (recursive)")
    add_index_option(a)
    a.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    add_batch_size_option(a)
    add_device_option(a)
    a.add_argument("--allow-duplicates", action="store_true", help="add files whose path is already indexed")
    add_json_option(a)
    a.set_defaults(handler=run_add)

    r = add_parser(
        sub,
        "remove",
        "remove items by id or by path prefix (ids of the rest never change)",
        wrap(
            "Remove gallery items by their ids (as search and info print them) or every item whose file lies "
            "under a folder. The other items keep their ids."
        ),
        "examples:\n  reid_ssl index remove --ids 3 17\n  reid_ssl index remove --index IDX --path-prefix old_crops/",
    )
    add_index_option(r)
    r.add_argument("--ids", type=int, nargs="*", default=[], help="item ids to remove (as search and info print them)")
    r.add_argument("--path-prefix", help="remove every item whose file lies under this path")
    add_json_option(r)
    r.set_defaults(handler=run_remove)

    c = add_parser(
        sub,
        "calibrate",
        "(re)calibrate the 'no match' threshold from labelled data",
        wrap(
            "Calibrate the top-1 score below which search says that nobody in the gallery matches: from a folder "
            "of Market-named query images, or by leaving each labelled gallery identity out in turn."
        ),
        "examples:\n  reid_ssl index calibrate\n  reid_ssl index calibrate --index IDX --queries market/query",
    )
    add_index_option(c)
    c.add_argument("--queries", help="folder of Market-named query images; default: leave-one-out on the gallery")
    c.add_argument("--checkpoint", help="default: the checkpoint that built the index")
    add_device_option(c)
    add_json_option(c)
    c.set_defaults(handler=run_calibrate)


def run_add(args: argparse.Namespace) -> int:
    import numpy as np

    from reid_ssl.images import image_crop_problem
    from reid_ssl.index import GalleryIndex, path_items
    from reid_ssl.index.manifest import load_recorded_embedder

    source = path_items(args.paths)
    items, skipped = source.items, list(source.skipped)
    shapes = [image_crop_problem(it.path) for it in items]  # the app's rule for a gallery upload
    skipped += [(it.path, reason) for it, reason in zip(items, shapes, strict=True) if reason]
    items = [it for it, reason in zip(items, shapes, strict=True) if not reason]
    snapshot = GalleryIndex.load(args.index)  # embed without holding the writer lock (the app may be adding too)
    embedder = load_recorded_embedder(snapshot.manifest, snapshot.path, args.checkpoint, args.device)
    if not args.allow_duplicates:
        dup = snapshot.duplicates([it.path for it in items])
        skipped += [(it.path, "already indexed") for it, d in zip(items, dup, strict=True) if d]
        items = [it for it, d in zip(items, dup, strict=True) if not d]
    progress = show_progress(json=args.json)
    res = embedder.embed_images([it.path for it in items], batch_size=args.batch_size, progress=progress)
    failures = [(items[i].path, reason) for i, reason in res.failures]
    with GalleryIndex.open_for_update(args.index) as idx:  # lock, newest generation, add, save
        idx.check_embedder(embedder)
        ok = [items[i] for i in res.ok]
        fresh = np.ones(len(ok), bool)
        if not args.allow_duplicates and idx.generation != snapshot.generation:  # someone added meanwhile
            fresh = ~np.array(idx.duplicates([it.path for it in ok]), bool)
            skipped += [(it.path, "already indexed") for it, f in zip(ok, fresh, strict=True) if not f]
        ids = idx.add(res.features[fresh], [it for it, f in zip(ok, fresh, strict=True) if f])
        if len(ids):
            idx.add_roots(*source.roots)
        ntotal = idx.ntotal
    result = {
        "index": args.index,
        "added": len(ids),
        "ids": ids.tolist(),
        "ntotal": ntotal,
        "failures": failures,
        "skipped": skipped,
    }
    if args.json:
        print_json(result)
    else:
        rows = [("index", display_path(args.index)), ("added", len(ids)), ("unreadable", len(failures))]
        print_table([*rows, ("skipped", len(skipped)), ("items now", ntotal)], title="index add")
        print_problems(failures + skipped)
    _check_added(len(ids), failures, skipped, args.paths, listed=not args.json)
    return 0


def _check_added(added: int, failures: list, skipped: list, paths: list[str], listed: bool) -> None:
    """Nothing to complain about when something was added or everything given is already in the index.

    Raises:
        InputError: nothing readable was given (only unreadable images, no image files, or empty folders): bad
            input, exit code 2; the message names the paths and a first problem.
    """
    if added or any(reason == "already indexed" for _, reason in skipped):
        return
    problems = failures + skipped
    why = "only unreadable images" if failures else "no image files" if skipped else "no images (empty folders?)"
    detail = (
        f" ({'listed above' if listed else f'{display_path(problems[0][0])}: {problems[0][1]}'})" if problems else ""
    )
    raise InputError(f"nothing added: {', '.join(paths)} held {why}{detail}")


def run_remove(args: argparse.Namespace) -> int:
    from reid_ssl.index import GalleryIndex

    if not args.ids and not args.path_prefix:
        raise InputError("nothing to remove: give --ids and/or --path-prefix")
    with GalleryIndex.open_for_update(args.index) as idx:
        missing = sorted(set(args.ids) - set(idx.ids.tolist()))
        under = idx.ids_under(args.path_prefix) if args.path_prefix else []
        if not under and len(missing) == len(set(args.ids)):  # nothing of what was asked exists: bad input
            asked = (
                [f"--ids {' '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}"] if missing else []
            )
            asked += [f"--path-prefix {args.path_prefix} (no indexed path under it)"] if args.path_prefix else []
            raise InputError(
                f"nothing removed: {' and '.join(asked)} not in {args.index}; `reid_ssl index search` or the app "
                "shows the ids"
            )
        ids = list(args.ids) + under
        removed = idx.remove(ids)
        ntotal = idx.ntotal
    result = {
        "index": args.index, "requested": len(set(ids)), "removed": removed, "not_found": missing, "ntotal": ntotal,
    }  # fmt: skip
    if args.json:
        print_json(result)
    else:
        rows = [("index", display_path(args.index)), ("removed", removed), ("not found", len(missing))]
        print_table([*rows, ("items now", ntotal)], title="index remove")
    if missing:
        print(
            f"reid_ssl index remove: note: {len(missing)} of the --ids are not in the index: "
            f"{' '.join(map(str, missing[:10]))}{' ...' if len(missing) > 10 else ''}",
            file=sys.stderr,
        )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from reid_ssl.index import GalleryIndex, folder_items
    from reid_ssl.index.manifest import load_recorded_embedder

    with GalleryIndex.open_for_update(args.index) as idx:
        if args.queries:
            qdir = Path(args.queries)
            if not qdir.is_dir():
                raise MissingFileError(f"query folder not found: {qdir}")
            queries, _ = folder_items(qdir, False, "query")
            if not queries:
                raise InputError(f"no image files under {qdir}")
            embedder = load_recorded_embedder(idx.manifest, idx.path, args.checkpoint, args.device)
            res = embedder.embed_images([q.path for q in queries], progress=show_progress(json=args.json))
            cal = idx.calibrate(res.features, [queries[i] for i in res.ok])
        else:
            cal = idx.calibrate()
    if args.json:
        print_json(cal)
    else:
        print_table([(k, v) for k, v in cal.items()], title="no-match threshold")
    return 0

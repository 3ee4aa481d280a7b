"""``reid_ssl k-rule``: the paper's Bernoulli rule for the rank of the negative deputy."""

from __future__ import annotations

import argparse

from reid_ssl.cli.common import add_json_option, add_parser, open_unit_float, print_json
from reid_ssl.errors import InputError

MAX_TABLE_ROWS = 1000

DESCRIPTION = """\
For X ~ Binomial(negatives, 1/classes) same-identity "negatives" in a batch, print P(X < k): the probability
that the negative ranked k by similarity belongs to another identity (docs/method.md, "Choosing k")."""


def register(sub: argparse._SubParsersAction) -> None:
    k = add_parser(sub, "k-rule", "Bernoulli rule: is the rank-k negative a true negative?", DESCRIPTION)
    k.add_argument("--negatives", type=int, required=True, help="negatives per anchor (batch size - 1)")
    k.add_argument("--classes", type=int, required=True, help="number of classes / identities in the data")
    k.add_argument("--max-k", type=int, default=10, help=f"largest k to print (default 10, at most {MAX_TABLE_ROWS})")
    k.add_argument("--confidence", type=open_unit_float, default=0.99, help="report the smallest k reaching this")
    add_json_option(k, "the table and the smallest k")
    k.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reid_ssl.losses import prob_rank_k_true_negative, smallest_safe_k

    if args.negatives < 1 or args.classes < 1 or args.max_k < 1 or not 0 < args.confidence < 1:
        raise InputError("--negatives, --classes and --max-k must be >= 1 and 0 < --confidence < 1")
    if args.max_k > MAX_TABLE_ROWS:
        raise InputError(
            f"--max-k {args.max_k}: the table prints at most {MAX_TABLE_ROWS} rows (the smallest safe k is "
            "computed whatever its size)"
        )
    n, c = args.negatives, args.classes
    table = [{"k": k, "p_true_negative": prob_rank_k_true_negative(n, c, k)} for k in range(1, min(args.max_k, n) + 1)]
    k = smallest_safe_k(n, c, args.confidence)
    reached = prob_rank_k_true_negative(n, c, k) >= args.confidence
    result = {
        "negatives": n,
        "classes": c,
        "expected_false_negatives": n / c,
        "table": table,
        "smallest_k": k if reached else None,  # None: no rank up to the last negative is safe enough
        "confidence": args.confidence,
    }
    if args.json:
        print_json(result)
        return 0
    print(f"negatives per anchor N-1 = {n}, classes C = {c}, expected same-class negatives = {n / c:.3f}")
    print("   k   P(rank-k negative is a true negative)")
    for row in table:
        print(f"{row['k']:>4}   {row['p_true_negative']:.3f}")
    if reached:
        print(f"smallest k with P >= {args.confidence}: {k}")
    else:
        print(f"no k up to {n} reaches P >= {args.confidence} (with {c} class(es) most negatives share the anchor's)")
    return 0

"""Pre-ranking from an export: the user tower runs once, candidates are scored from the item index.

    python infer.py --run_dir runs/RUN --user_id 1 --top_k 10              # the whole catalogue
    python infer.py --run_dir runs/RUN --user_id 1 --candidates 1,2,3,999999
    python infer.py --export_dir serving/ --user_id 77777 --user_features gender=F,age=25,occupation=4

Unknown users and movies take the out-of-vocabulary path (id 0, prior statistics) instead of failing;
an empty candidate list gives an empty result. The scoring itself is scorer.Scorer (usable from Python).
"latency_ms" tells the cold first call (allocations, first kernel runs) apart from the warm median of
--warm_calls repeats of the same request, which is what a running service (serve.py) pays.
"""
import json
import statistics
import sys
from pathlib import Path

from model_config import Parser
from scorer import Scorer
from util import UserError, run_cli


def item_or_user_id(text):
    """An id from the command line: integers stay integers; text ids (Amazon's reviewerID, asin) stay text."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def parse_features(text):
    if not text:
        return None
    try:
        return dict(item.split("=", 1) for item in text.split(",") if item)
    except ValueError:
        raise UserError(f"--user_features expects name=value pairs separated by commas, got {text!r}") from None


def main(argv=None):
    parser = Parser(prog="infer.py", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run_dir", help="a run whose export is in RUN/export (python export.py --run_dir RUN)")
    where.add_argument("--export_dir", help="an export folder (python export.py --output_dir DIR)")
    parser.add_argument("--user_id", required=True,
                        help="user id: an integer, or the text id of data sets that have them (unknown ids are allowed)")
    parser.add_argument("--top_k", type=int, default=10, help="how many items to return")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated item ids to score (default: the whole catalogue; '' for none)")
    parser.add_argument("--user_features", default="", help="raw features of an unknown user: gender=F,age=25,...")
    parser.add_argument("--warm_calls", type=int, default=20, help="repeats of the request for the warm latency")
    parser.add_argument("--user_tower", default="auto", choices=Scorer.USER_TOWERS,
                        help="auto: ONNX Runtime on user_tower.onnx when exported, else the MINDIR")
    parser.add_argument("--nprobe", type=int, default=0,
                        help="whole catalogue: 0 scores every item exactly; N > 0 only the items of the user's N best "
                             "cells of an inverted file (large catalogues; docs/serving.md)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads that score the catalogue with the MaxSim kernel (default 0: every core)")
    args = parser.parse_args(argv)
    if args.top_k <= 0:
        parser.error("--top_k must be positive")
    if args.warm_calls < 0:
        parser.error("--warm_calls must be 0 or more")
    if args.threads < 0:
        parser.error("--threads must be 0 (every core) or positive")
    candidates = None
    if args.candidates is not None:
        candidates = [item_or_user_id(x) for x in args.candidates.split(",") if x.strip()]
    scorer = Scorer(Path(args.export_dir) if args.export_dir else Path(args.run_dir) / "export",
                    user_tower=args.user_tower, nprobe=args.nprobe, threads=args.threads)
    if scorer.item_names is None and any(isinstance(c, str) for c in candidates or []):
        parser.error(f"--candidates expects comma-separated integers (this data set's item ids are integers), "
                     f"got {args.candidates!r}")
    request = (item_or_user_id(args.user_id), candidates, args.top_k, parse_features(args.user_features))
    result = scorer.recommend(*request)
    cold = result.pop("milliseconds", None)
    warm = [scorer.recommend(*request).get("milliseconds", 0.0) for _ in range(args.warm_calls)]
    result["latency_ms"] = {"cold_first_call": cold, "warm_median": round(statistics.median(warm), 3) if warm else None,
                            "warm_calls": len(warm), "user_tower": scorer.backend, "threads": scorer.threads}
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    run_cli(main)

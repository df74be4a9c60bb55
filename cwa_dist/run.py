"""Command line: python -m cwa_dist.run --model MODEL [options]."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
import typing
from collections.abc import Callable

from cwa_dist.analysis.metrics import METRICS
from cwa_dist.analysis.perturb import MODES
from cwa_dist.config import SECTION_TITLES, RunConfig
from cwa_dist.errors import UsageError
from cwa_dist.settings import leaves


def build_parser() -> argparse.ArgumentParser:
    """Every setting of RunConfig becomes a flag, in its section, with its docstring as help."""
    p = argparse.ArgumentParser(
        prog="python -m cwa_dist.run",
        description="Rank the weights of a causal language model by gradient-based sensitivity, "
        "then perturb the top-K against random and magnitude controls and measure perplexity.",
    )
    groups = {}
    listed = {"metrics": METRICS.names(), "perturbation_mode": MODES.names()}
    for leaf in leaves(RunConfig):
        title = SECTION_TITLES.get(leaf.section, leaf.section)
        group = groups.get(title) or groups.setdefault(title, p.add_argument_group(title))
        help_text = leaf.doc.replace("%", "%%")
        choices = listed.get(leaf.flat) or leaf.choices
        if choices:
            help_text += f" One of: {', '.join(choices)}."
        if leaf.hint is bool:
            group.add_argument(leaf.flag, dest=leaf.flat, action="store_true", help=help_text)
            continue
        args = typing.get_args(leaf.hint)
        many = typing.get_origin(leaf.hint) is tuple
        kind = args[0] if many else next((a for a in args if a is not type(None)), leaf.hint)
        if leaf.choices:
            kind = str
        required = leaf.default is dataclasses.MISSING
        default = None if required else (list(leaf.default) if many else leaf.default)
        group.add_argument(
            leaf.flag, dest=leaf.flat, type=kind, default=default, required=required,
            nargs="+" if many else None, metavar=leaf.flat.upper().removesuffix("S") if many else None,
            help=help_text + (" (default: %(default)s)" if default is not None else ""),
        )
    return p


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    values = {leaf.flat: getattr(ns, leaf.flat) for leaf in leaves(RunConfig)}
    return RunConfig.of(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def quiet_libraries(verbose: bool) -> None:
    """Hub downloads and tokenizers print through their own loggers; unless asked, keep them quiet,
    so an error is one clear line."""
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def report_errors(work: Callable[[], None], verbose: bool) -> int:
    """Run `work`; turn what it raises into one line on stderr and an exit code (2: bad input)."""
    try:
        work()
        return 0
    except UsageError as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {type(e).__name__}: {e} (run with --verbose for the traceback)", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    quiet_libraries(ns.verbose)

    def work() -> None:
        from cwa_dist import pipeline  # heavy imports (ray, transformers) after argument parsing

        pipeline.run(config_from_args(ns))

    return report_errors(work, ns.verbose)


if __name__ == "__main__":
    sys.exit(main())

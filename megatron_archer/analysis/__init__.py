"""Token entropy analysis (docs/numerics.md §6): the measurements both papers report, as a report directory.

Modules: ``stats`` (pure statistics: distribution, token table, top-rho overlap, change per
percentile bin), ``responses`` (generate / save / read the responses measured), ``collect``
(per-token entropy with the actor's vocab-parallel op), ``report`` (PNG, HTML, tables, JSON),
``sweep`` (entropy-aware decoding evaluation), ``config`` (``AnalysisConfig``), ``analyze`` (the
pipeline, ``analyze_entropy``) and ``cli`` (the ``analyze-entropy`` subcommand,
``register(subparsers)``). Names below load their module on first use, so the CLI's
``import megatron_archer.analysis.cli`` stays light.
"""

import importlib

_EXPORTS = {
    "AnalysisConfig": "config",
    "analyze_entropy": "analyze",
    "collect_entropy": "collect",
    "load_runner": "collect",
    "model_parallel_groups": "collect",
    "Response": "responses",
    "generate_responses": "responses",
    "read_responses": "responses",
    "write_responses": "responses",
    "TokenStat": "stats",
    "binned_change": "stats",
    "distribution_summary": "stats",
    "percentile_bins": "stats",
    "token_entropy_table": "stats",
    "top_overlap": "stats",
    "top_positions": "stats",
    "parse_setting": "sweep",
    "run_sweep": "sweep",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)

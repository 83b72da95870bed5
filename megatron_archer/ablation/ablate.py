"""``ablate``: prepare once, run every variant x seed not yet finished, write the report.

Order: ``prepare`` (warm start and its entropy report), then per seed the warm start's
evaluation and each variant's run (``runs.run``), then ``report.write_report`` over every finished
run. Interrupting and rerunning continues where it stopped; ``report_only`` writes the report of
what has finished without running anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from megatron_archer.ablation.config import WARM_START, AblationConfig
from megatron_archer.ablation.plan import Layout, run_specs
from megatron_archer.ablation.prepare import prepare, prepare_fingerprint
from megatron_archer.ablation.records import read_record
from megatron_archer.ablation.report import markdown_table, write_report
from megatron_archer.ablation.runs import SUMMARY, run, run_fingerprint


def ablate(config: AblationConfig, report_only: bool = False) -> dict:
    """Run (or, with ``report_only``, only collect) the ablation; returns the report summary
    with ``ran``: the runs done by this call, and ``reused``: those found finished."""
    import torch

    torch.set_num_threads(config.threads or max(os.cpu_count() or 1, 1))
    layout = Layout(Path(config.out))
    start = time.perf_counter()
    specs = run_specs(config)
    prepared = prepare_fingerprint(config)
    if not report_only:
        prepare(config)
    summaries: dict[str, dict[int, dict]] = {WARM_START: {}}
    summaries.update({v.name: {} for v in config.variants})
    ran, reused, missing = [], [], []
    for number, spec in enumerate(specs, 1):
        name = f"{spec.variant}/seed_{spec.seed}"
        if report_only:
            summary = read_record(spec.run_dir / SUMMARY, run_fingerprint(config, spec, prepared),
                                  f"run {name}")
            if summary is None:
                missing.append(name)
                continue
            reused.append(name)
        else:
            print(f"[ablate] run {number}/{len(specs)}: {name}", flush=True)
            summary, fresh = run(config, spec, prepared)
            (ran if fresh else reused).append(name)
        summaries[spec.variant][spec.seed] = summary
    summaries = {v: s for v, s in summaries.items() if s}
    report = {}
    if summaries:
        report = write_report(layout.report, summaries, config.eval.k, config.entropy.rho,
                              config.seeds, missing, config.claims)
    if report:
        print(markdown_table(report["table"], config.eval.k, config.entropy.rho), flush=True)
    print(f"[ablate] {len(ran)} runs done now, {len(reused)} found finished, {len(missing)} "
          f"missing; {time.perf_counter() - start:.0f}s; report in {layout.report}", flush=True)
    return {**report, "ran": ran, "reused": reused}

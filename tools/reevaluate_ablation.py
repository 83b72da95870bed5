"""Re-evaluate an ablation's finished runs on more held-out problems, then give its claims again.

    python tools/reevaluate_ablation.py CONFIG --problems N [--seeds 0,1] [--variants a,b]
                                        [--out DIR]

An ablation's held-out avg@k on ``task.eval_problems`` problems carries sampling noise that can
exceed the differences it compares (docs/toy_sweep.md). This evaluates the warm start and every
finished run's final checkpoint (``<out>/runs/<variant>/seed_<s>/final``) on the first N problems
of the task's held-out stream (its first ``task.eval_problems`` are the prepared ``eval.jsonl``)
with the ablation's own evaluation of each seed (``ablation.plan.evaluation_config``), so with
N = ``task.eval_problems`` it reproduces the runs' summaries exactly. Nothing is retrained.
Results: ``DIR/<variant>/seed_<s>.json``, each with the content fingerprint of the checkpoint it
evaluated (kept: a rerun evaluates only what is missing, or made from a checkpoint that has since
changed, as when a run is retrained into the same ``out``), then the
claims of the config on them (``claims.claim_verdicts``): ``DIR/README.md`` (the table in
points) and ``DIR/claims.md`` / ``claims.csv``.
DIR defaults to ``<out>_eval<N>``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from megatron_archer.ablation.claims import claim_verdicts
from megatron_archer.ablation.config import WARM_START, load_ablation_config
from megatron_archer.ablation.plan import Layout, evaluation_config
from megatron_archer.ablation.report import claims_markdown, write_claims
from megatron_archer.data.stepwise_arithmetic import stepwise_problems, write_stepwise_jsonl
from megatron_archer.trainer.evaluate import evaluate
from megatron_archer.trainer.sources import fingerprint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the ablation YAML whose runs finished")
    parser.add_argument("--problems", type=int, required=True, help="held-out problems")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the config's)")
    parser.add_argument("--variants", help="comma-separated variants (default: all)")
    parser.add_argument("--out", type=Path, help="results directory (default <out>_eval<N>)")
    args = parser.parse_args(argv)
    config = load_ablation_config(args.config)
    if args.problems < 1:
        parser.error(f"--problems must be at least 1; got {args.problems}")
    seeds = config.seeds if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    names = [v.name for v in config.variants]
    variants = names if args.variants is None else args.variants.split(",")
    unknown = sorted(set(variants) - set(names))
    if unknown:
        parser.error(f"--variants: no variant {', '.join(unknown)} in {args.config}")
    out = args.out or Path(f"{config.out}_eval{args.problems}")
    layout = Layout(Path(config.out))
    task = config.task
    problems = out / "eval.jsonl"
    if problems.exists():  # the results beside it were made on it: never mix two sizes
        found = len(problems.read_text().splitlines())
        if found != args.problems:
            parser.error(f"{problems} holds {found} problems, not {args.problems}: choose "
                         f"another --out")
    else:
        write_stepwise_jsonl(problems, stepwise_problems(
            args.problems, "eval", task.seed, task.min_operations, task.max_operations,
            task.max_operand, task.eval_fraction))
    for seed in seeds:
        evaluation = evaluation_config(config, seed)
        evaluation = replace(evaluation, data=replace(evaluation.data, path=str(problems)))
        for variant in [WARM_START, *variants]:
            target = out / variant / f"seed_{seed}.json"
            model = (layout.warm_start if variant == WARM_START
                     else layout.run_dir(variant, seed) / "final")
            if not (model / "config.json").exists():
                continue
            made_from = fingerprint(model)
            if target.exists():
                if json.loads(target.read_text()).get("model_fingerprint") == made_from:
                    continue
                print(f"{target}: its checkpoint {model} changed since; evaluating again")
            result = evaluate(evaluation, k=config.eval.k, model_path=str(model))
            result["model_fingerprint"] = made_from
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(result) + "\n")
            print(f"{variant} seed {seed}: {json.dumps(result)}", flush=True)
    metric = f"avg@{config.eval.k}"
    values = {v: {seed: json.loads(path.read_text())[metric] for seed in sorted(config.seeds)
                  if (path := out / v / f"seed_{seed}.json").exists()}
              for v in [WARM_START, *names]}
    rows = claim_verdicts(config.claims, values)
    write_claims(rows, out / "claims")
    (out / "README.md").write_text(
        f"# Claims on {args.problems} held-out problems\n\n`python tools/reevaluate_ablation.py "
        f"{args.config} --problems {args.problems}`: the finished runs of `{config.out}`, "
        f"re-evaluated (points of {metric}, paired by seed).\n\n"
        f"{claims_markdown(rows, config.eval.k)}\n", encoding="utf-8")
    print(claims_markdown(rows, config.eval.k))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

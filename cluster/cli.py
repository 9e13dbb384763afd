"""`distill`: one CLI, a subcommand per stage and `run` for all.

    distill run configs/default.yaml [key=value ...]
    distill extract|probe|baseline|train|report CONFIG [key=value ...]
    distill bench CONFIG [key=value ...]     the matrix of `bench.*` (datasets x sources x fractions x seeds)
    distill show-config CONFIG [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cluster import runtime  # sets Ray's environment before ray is imported
from engine.config import ConfigError, config_hash, load, to_dict
from engine.models import ModelError
from engine.store import StoreError
from engine.tasks import DataError

STAGES = ("extract", "probe", "baseline", "train", "report", "run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description="Probe-based knowledge distillation on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in (*STAGES, "bench", "show-config"):
        s = sub.add_parser(name)
        s.add_argument("config", help="YAML config, e.g. configs/default.yaml")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. student.epochs=1")
    return p


def execute(command: str, cfg) -> dict | None:
    from cluster import pipeline

    if command == "bench":
        from cluster.bench import dataset_config, run_bench

        for dataset in cfg.bench.datasets:  # every dataset's data, model and store, before Ray starts
            pipeline.Run(dataset_config(cfg, dataset)).check_inputs()
        runtime.init(cfg.ray)
        try:
            return run_bench(cfg)
        finally:
            runtime.shutdown()
    run = pipeline.Run(cfg)
    t0 = time.perf_counter()
    run.check_inputs()  # bad data, model or layers fail here, before Ray starts or anything is written
    runtime.init(cfg.ray)
    try:
        if command in ("extract", "run"):
            pipeline.extract(run)
        if command == "extract":
            return None
        probe_meta = None
        letter_table = cfg.prompt.mode == "letter" and cfg.baseline.enabled and bool(cfg.baseline.formats)
        if command in ("probe", "train", "report", "run") or (command == "baseline" and letter_table):
            probe_meta, probe_arrays = pipeline.probe(run)  # the letter-mode brittleness table scores the probe
        if command in ("baseline", "report", "run"):
            base = pipeline.baseline(run, probe_meta)
        if command in ("train", "report", "run"):
            students = pipeline.train(run, probe_arrays)
        if command in ("report", "run"):
            results = pipeline.report(run, probe_meta, base, students)
            print(f"[distill] {command} finished in {time.perf_counter() - t0:.0f}s; report in {cfg.out_dir}/report.md")
            return results
        return None
    finally:
        runtime.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
        if args.command == "show-config":
            print(json.dumps({"config_hash": config_hash(cfg), **to_dict(cfg)}, indent=2))
            return 0
        print(f"[distill] {args.command} {args.config} (config {config_hash(cfg)}) -> {cfg.out_dir}", flush=True)
        execute(args.command, cfg)
    except (ConfigError, DataError, ModelError, StoreError) as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The sweep command (``clbench`` with no sub-command): plan, then run here or on SLURM, then
print the sweep's table and write the report."""
from __future__ import annotations

import argparse
import os
import time

from clbench import record
from clbench.report.aggregate import quick_table
from clbench.report.command import write_report
from clbench.slurm import launcher
from clbench.sweep import PlannedRun, plan_from_args, run_local


def print_plan(runs: list[PlannedRun]) -> None:
    for r in runs:
        c = r.config
        t = c.train
        state = "done" if r.done else "todo"
        batch = f"{t.batch_size}" if t.micro_batch_size is None else f"{t.batch_size}(micro {t.micro_batch_size})"
        schedule = t.schedule + (f"(lag {t.schedule_offset})" if t.schedule_offset else "")
        test_order = f" test_order={c.data.test_order}" if c.data.test_order != "dataset" else ""
        print(f"{state:5s} {r.key:48s} backbone={c.backbone.name} epochs={t.epochs} bs={batch} "
              f"{t.optimizer} lr={t.lr:g} {schedule} drop_last={t.drop_last}{test_order} method={c.method_args}")
    todo = sum(not r.done for r in runs)
    print(f"{len(runs)} runs planned, {len(runs) - todo} already done, {todo} to run")


def main(args: argparse.Namespace) -> int:
    runs, out = plan_from_args(args)
    if args.dry_run:
        print_plan(runs)
        return 0
    if args.force:  # start every run afresh; a finished result is kept beside it as .json.prev
        for r in runs:
            if r.result_path.exists():
                os.replace(r.result_path, r.result_path.with_name(r.result_path.name + ".prev"))
            record.checkpoint_path(out, r.key).unlink(missing_ok=True)  # else it would resume
            r.done = False
    todo = [r for r in runs if not r.done]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to run "
          f"-> {out.resolve()}", flush=True)
    start = time.time()
    if args.launcher == "local":
        failures = run_local(todo, out, progress=not args.no_progress)
    else:
        failures = launcher.launch(todo, args, out)
        if failures is None:  # submitted or emitted without waiting
            return 0
    print(f"\nsweep finished in {time.time() - start:.0f}s; its runs:")
    print(quick_table(out, only={str(r.result_path) for r in runs}))
    print(f"\nresult files: {(out / 'runs').resolve()}")
    if failures:
        print(f"\n{len(failures)} run(s) failed: " + ", ".join(r.key for r, _ in failures))
        return 1
    write_report(out)
    return 0

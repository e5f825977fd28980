"""``python -m reports report|sweep|main --experiment FILE [...]``: the sweep report, alone or after a sweep.

``sweep`` and ``main`` run search's jobs and then the report, so every sweep ends with one; they live
here because reports is the top of the data flow (search never imports reports).
"""

from __future__ import annotations

import sys

from kdlib.cli import run
from kdlib.config import ExperimentConfig
from search.__main__ import JOBS as SEARCH_JOBS
from search.__main__ import SEARCH

REPORT = {"output_dir": "report.output_dir", "top_k": "report.top_k"}


def _report(cfg: ExperimentConfig) -> None:
    from reports.report import build_report

    report = build_report(cfg)
    print(f"report: {report.html.resolve()} (open it in a browser; it needs no network) and {report.csv.resolve()}")
    print(f"logged on the sweep run {report.sweep_run_id} under report/")


def _then_report(job):
    def both(cfg: ExperimentConfig) -> None:
        job(cfg)
        _report(cfg)

    return both


JOBS = {"report": _report, "sweep": _then_report(SEARCH_JOBS["sweep"]), "main": _then_report(SEARCH_JOBS["main"])}
ALIASES = dict.fromkeys(JOBS, {**SEARCH, **REPORT})

if __name__ == "__main__":
    sys.exit(run("python -m reports", JOBS, sys.argv[1:], ALIASES))

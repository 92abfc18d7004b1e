"""`medgemma batch`: a folder of scans → one record per (unit, question), written as it goes, resumable.

    walk (inputs.walk) → units → prepare → local (worker process) | remote (a server) → records → report
"""

from __future__ import annotations

from medgemma_cli.batch.run import BatchSummary, ClassifyOptions, ServerOptions, run_batch

__all__ = ["BatchSummary", "ClassifyOptions", "ServerOptions", "run_batch"]

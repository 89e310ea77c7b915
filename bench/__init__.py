"""quota-ledger benchmarks (issue #5): ``python -m bench [--only S …] [--scale F]``.

See docs/performance.md for the scenarios, their baselines and targets. Modules:
``bench.env`` (fresh databases, a private Redis index, started processes, machine info),
``bench.data`` (event streams and bulk-loaded real ledgers), ``bench.scenarios`` and
``bench.celery_scenarios`` (the measurements), ``bench.cli`` (table and results.json).
"""

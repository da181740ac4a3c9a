"""The benchmarks: accuracy and speed grids, calibration throughput, plots, the README's generated tables
and the provenance written on every results row.

The library never imports this subpackage; the command line (lazily), ``scripts/`` and the tests do. Its
modules: :mod:`~lowrank_fm.bench.benchmark` (accuracy grid), :mod:`~lowrank_fm.bench.speed_benchmark`
(measured speed), :mod:`~lowrank_fm.bench.throughput` (calibration throughput), :mod:`~lowrank_fm.bench.plots`,
:mod:`~lowrank_fm.bench.readme` and :mod:`~lowrank_fm.bench.provenance`.
"""

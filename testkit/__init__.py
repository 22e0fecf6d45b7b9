"""Support code shared by the tests and the benchmarks: tiny random checkpoints, planted bundles, app fixtures.

Not installed with the package; importable from the repository root, where pytest and
`python -m bench.*` run.
"""

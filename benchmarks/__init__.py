"""Benchmarks and diagnostics, run by hand from the repository root: `python -m benchmarks.<name> --help`.

A folder of the repository, not part of the installed package: nothing in pipeline/ or stages/ imports
it, and it imports nothing from stages/. What the modules need beyond the project's dependencies is
the `bench` extra (`pip install -e '.[bench]'`); a module whose name starts with `_` is a shared helper.
"""

"""chunkstitch benchmarks: ``python -m benchmarks <name>`` (or ``./dev bench <name>``).

Every benchmark measures chunkstitch next to a baseline in the same run on the same
machine and reports ratios; figures are copied into the README by hand.
"""

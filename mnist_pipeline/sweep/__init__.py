"""mnist-sweep: a parameter sweep on a Ray cluster, every trial a DVC experiment.

space (the `-S` grammar → Ray Tune domains, the checks before any trial) · trial (one trial on a
worker: clone, `dvc exp run`, push) · driver (the command: checks, Ray Tune, the report).
"""

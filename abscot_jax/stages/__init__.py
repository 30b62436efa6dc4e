"""The stages of a run: plain functions that read their inputs from the run directory and write
their outputs there, each run in its own process by the ledger (abscot_jax/rounds.py says which
stages exist, in what order, and which files each reads and writes):

    python -m abscot_jax.stages RUN_DIR KEY

Each takes the run's context (stages/context.py) and the arguments the ledger gives it, and
returns what state.json records for it.
"""

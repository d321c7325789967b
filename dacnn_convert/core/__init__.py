"""The conversion core: fx graph analysis, the plan (data), closed-form fits, anchored layers, applying a plan.

Imports nothing from io/, train/, the applications or the CLI (tests/test_layering.py).
"""

"""The pure core: desired-state model, stack spec, planner, routing, lint, labels, hashing.

No I/O and no adapter imports (enforced by import-linter in ``scripts/check``): everything here
is a function of its arguments, and every port the outer layers implement is declared in
``agent.core.ports``.
"""

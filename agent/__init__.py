"""llm-fleet-agent: a pull-based deployment agent for a self-hosted LLM fleet.

Layers (inner to outer; an inner layer never imports an outer one):

- core, pure: ``errors``, ``yamlsrc``, ``model``, ``roles``, ``render``, ``stack``,
  ``routing``, ``lint``, ``spechash``, ``observed``, ``plan``
- adapters (the only modules that talk to the outside world): ``secrets`` (files, env,
  age), later ``docker`` / ``git`` / ``http``
- surface: ``cli``
"""

__version__ = "0.1.0"

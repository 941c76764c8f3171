"""Run by Python at the start of every process in the LiteLLM container, before any thread.

Written by llm-agent next to the proxy config (``config/sitecustomize.py``, mode 0644) and found
through ``PYTHONPATH=/app/config`` (litellm.env).

Why: LiteLLM 1.108.7's gunicorn arbiter (``--run_gunicorn``) starts a thread,
``litellm-orphan-query-engine-reaper``, whose first scan of /proc opens files with
``encoding="ascii"`` and so imports the ``encodings.ascii`` codec, and forks its worker at the
same moment. A worker forked while that import holds the module's lock inherits the lock held
by a thread that does not exist in it, and its startup deadlocks for good in tzlocal's
``open(..., encoding="ascii")`` (py-spy: ``_ModuleLock.acquire`` under
``proxy_startup_event``); the container never becomes healthy. Measured here: 4 of 14 first
starts froze. The codec imported here, before any thread exists, leaves the scan nothing to
import.

Keep this file free of template syntax: the role renders it byte for byte.
"""

import encodings.ascii  # noqa: F401

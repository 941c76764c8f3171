"""Label names the agent puts on everything it creates (contract section 4).

The Docker Compose set makes ``docker compose ls / ps / logs`` work on our stacks; the
``io.llm-agent.*`` set marks ownership (containers without it are never touched) and records
what was applied, so the planner can diff against it without re-reading any file.
"""

from __future__ import annotations

OWNER = "io.llm-agent.owner"
OWNER_VALUE = "llm-agent"
HOST = "io.llm-agent.host"
COMMIT = "io.llm-agent.commit"
SPEC_HASH = "io.llm-agent.spec-hash"  # service spec + image id
FILES_HASH = "io.llm-agent.files-hash"  # contents of the stack files the service mounts
FIELDS = "io.llm-agent.fields"  # JSON {field: short hash}: names what changed
FILES = "io.llm-agent.files"  # JSON {path: short hash}: names which file changed

PROJECT = "com.docker.compose.project"
SERVICE = "com.docker.compose.service"
NUMBER = "com.docker.compose.container-number"
ONEOFF = "com.docker.compose.oneoff"
CONFIG_HASH = "com.docker.compose.config-hash"
IMAGE = "com.docker.compose.image"
NETWORK = "com.docker.compose.network"
VOLUME = "com.docker.compose.volume"
VERSION = "com.docker.compose.version"
WORKING_DIR = "com.docker.compose.project.working_dir"
CONFIG_FILES = "com.docker.compose.project.config_files"  # the rendered compose.yaml in the stack dir

#: The rendered compose file, as the executor writes it into the stack dir.
COMPOSE_FILE = "compose.yaml"

#: The Compose version our labels claim (what ``docker compose`` checks the labels against).
COMPOSE_VERSION = "2.40.0"


def scoped(project: str, name: str) -> str:
    """Engine name of a project's network or volume, as compose names them: ``<project>_<name>``."""
    return f"{project}_{name}"

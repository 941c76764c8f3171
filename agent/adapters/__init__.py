"""Adapters: the only modules that talk to the outside world (Docker, git, secrets, systemd,
the file system). Each maps its library's exceptions onto ``agent.core.errors`` at its edge."""

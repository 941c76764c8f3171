"""Public fakes of the agent's ports, for fast tests with no Docker, no git and no sleeps."""

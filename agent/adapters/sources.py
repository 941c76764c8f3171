"""Desired-state sources (the ``DesiredSource`` port): a git remote, or a plain directory."""

from __future__ import annotations

from pathlib import Path

from agent.adapters.gitsource import GitSource, SourceError, redact, tree_commit
from agent.core.ports import Checkout


class DirectorySource:
    """A plain directory, read as it is (local runs, the shipped example)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = str(path)

    def current(self, last_good: str | None) -> Checkout:
        return Checkout(tree_commit(self.path), self.path)

    def snapshot_of(self, commit: str) -> Path | None:
        return None  # a directory changes in place: there is no older version to go back to


class GitDesiredSource:
    """A git remote: forced fetch of the branch, snapshot of the exact commit."""

    def __init__(self, git: GitSource) -> None:
        self.git = git
        self.description = f"{redact(git.url)}#{git.branch}"

    def snapshot_of(self, commit: str) -> Path | None:
        return self.git.snapshot(commit).path

    def current(self, last_good: str | None) -> Checkout:
        """The branch head and its snapshot; the last good commit while the remote cannot be
        fetched (with the reason as ``problem``)."""
        try:
            sha = self.git.fetch()
        except SourceError as exc:
            if last_good is None:
                raise
            # The remote is unreachable: stay on (and keep healing) the last good commit.
            return Checkout(last_good, self.git.snapshot(last_good).path, str(exc))
        try:
            snap = self.git.snapshot(sha)
        except SourceError as exc:  # an unsigned head, or one that cannot be exported
            if last_good is None or last_good == sha:
                raise
            # Refused: stay on (and keep healing) the last good commit; report why.
            return Checkout(last_good, self.git.snapshot(last_good).path, f"commit {sha[:12]} refused: {exc}")
        if last_good:
            self.git.prune({sha, last_good})
        return Checkout(sha, snap.path)

"""Profiles on disk: one JSON file per key hash, written atomically (temporary file, fsync, rename), so a failed
or interrupted profile leaves no half-written table behind."""

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class ProfileStore:
    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def path(self, key: dict) -> Path:
        return self.directory / f"profile-{key_hash(key)}.json"

    def load(self, key: dict) -> dict | None:
        """The stored profile of exactly this key, or None (a file whose key differs is never reused)."""
        path = self.path(key)
        if not path.exists():
            return None
        profile = json.loads(path.read_text())
        if profile.get("key") != key:
            logger.warning("%s holds another key; ignoring it", path)
            return None
        return profile

    def save(self, profile: dict) -> Path:
        path = self.path(profile["key"])
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".profile-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(profile, out, indent=1)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

"""What makes a run reproducible: git commit, package versions, host; atomic JSON writes."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any


PACKAGES = ("torch", "torchaudio", "lightning", "hydra-core", "wandb", "numpy", "asrbench")


def git_commit(repo: Path | None = None) -> str:
    """Commit of the asrbench checkout (suffix `-dirty` with uncommitted changes), or `unknown`."""
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def host() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "node": platform.node(), "cpus": os.cpu_count()}
    try:
        import torch  # runinfo is imported by light tools; torch loads only when a host is described

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except Exception:  # pragma: no cover - informational only
        pass
    return info


def umask() -> int:
    """This process's umask (read by setting and restoring it): the mode a plain open() would give a new file."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON through a temporary file in the same directory, flushed to disk, and a rename: a reader,
    a kill or a full disk finds the previous complete file or the new one, never half of one, and no
    temporary file is left. A disk fault (full, read-only) is an OSError naming `path`, not the temporary
    file, which the command line prints as one line (asrbench.apps.output_error)."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # else a crash soon after the rename can leave an empty file behind the name
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp's 0600 would hide results.json from the run's group
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if err.errno is None:
            raise
        raise OSError(err.errno, err.strerror or os.strerror(err.errno), str(path)) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)

"""Reading training checkpoints safely: tensors and plain containers only, never arbitrary objects."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from insitu.errors import ConfigError


def check_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load ``path`` with ``weights_only=True`` on the CPU; a damaged or foreign file is a `ConfigError`.

    Resuming calls this first, so a tampered or truncated ``last.ckpt`` is reported by name with
    what to do, instead of as a deep unpickling traceback.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Checkpoint {path} does not exist; run without --resume to start afresh.")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ConfigError(_unreadable(path, "it asks to load objects other than tensors and plain values")) from None
    except (zipfile.BadZipFile, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError, KeyError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        detail = f": {first[:200]}" if first and "weights_only" not in first else ""
        raise ConfigError(_unreadable(path, f"{type(exc).__name__}{detail}")) from None
    if not isinstance(state, dict) or "global_step" not in state or "state_dict" not in state:
        raise ConfigError(_unreadable(path, "it holds no global_step/state_dict"))
    return state


def _unreadable(path: Path, why: str) -> str:
    # never suggest weights_only=False: that would execute whatever the file's pickle asks for
    return (
        f"Checkpoint {path} is not a readable insitu checkpoint ({why}). It may be truncated or altered; "
        "only tensors and plain values are ever loaded from it. Delete it and resume from an earlier "
        "checkpoint, or start the run again with --overwrite."
    )

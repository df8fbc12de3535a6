"""The weights this project ships, found inside the installed package.

``weights/`` of the repository is installed as the package data ``namm_transfer.weights`` (pyproject.toml maps
it as it maps ``adapters/`` and ``evals/``), so a wheel, a normal install and an editable install all find the
same files, from any working folder. Every program asks for its defaults here, by name:

* ``"namm"``: the NAMM evolved by ``python -m namm_transfer.evolve`` (``namm.safetensors`` + ``namm.json``);
* ``"dt/<env>-<quality>"``: a Decision Transformer trained by ``python -m namm_transfer.rl.train``;
* ``"video"``: the trained parts of the embedded video model.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

PACKAGE = "namm_transfer.weights"


class ShippedWeightsError(ValueError):
    """The asked-for shipped weights are not part of this installation."""


def shipped_root() -> Path:
    """The installed ``namm_transfer/weights`` folder."""
    return Path(str(files(PACKAGE)))


def shipped_names() -> list[str]:
    """Every name :func:`shipped_weights` accepts: the folders under the root that hold files (not code)."""
    root = shipped_root()
    return sorted(
        folder.relative_to(root).as_posix()
        for folder in root.rglob("*")
        if folder.is_dir() and folder.name != "__pycache__" and any(f.is_file() for f in folder.iterdir())
    )


def shipped_weights(name: str) -> Path:
    """The folder of the shipped weights ``name`` (e.g. ``"namm"``, ``"dt/hopper-medium"``, ``"video"``).

    Raises ShippedWeightsError naming what is shipped when ``name`` is not.
    """
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") for part in parts):
        raise ShippedWeightsError(f"shipped weights name {name!r} must be a relative name like 'namm' or 'dt/hopper-medium'")
    folder = shipped_root().joinpath(*parts)
    if not folder.is_dir():
        raise ShippedWeightsError(
            f"no shipped weights {name!r} in {shipped_root()}; shipped: {', '.join(shipped_names()) or 'none'}"
        )
    return folder

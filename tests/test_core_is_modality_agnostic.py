"""The NAMM core (namm_transfer/namm/) must never import transformers (ARCHITECTURE.md, "Layers")."""

import subprocess
import sys
from pathlib import Path

import namm_transfer.namm

CORE = Path(namm_transfer.namm.__file__).parent

CHECK = """
import importlib, sys
offenders = []
for name in sys.argv[1:]:
    importlib.import_module(name)
    if "transformers" in sys.modules:
        offenders.append(name)
        break
print(",".join(offenders))
"""


def test_every_core_module_imports_without_transformers():
    modules = sorted(f"namm_transfer.namm.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__")
    assert {"namm_transfer.namm.features", "namm_transfer.namm.policy"} <= set(modules)
    result = subprocess.run(
        [sys.executable, "-c", CHECK, *modules], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "", f"imports transformers: {result.stdout.strip()}"

"""Self-registering packages (`dqo_jax.methods`, `dqo_jax.families`, `dqo_jax.tasks`): every module
of the package declares one object under a known name, and the package's registry is those
objects by name, found by importing the modules."""

from __future__ import annotations

import importlib
import pkgutil


def discover(package: str, path, attr: str) -> dict:
  """{obj.name: obj} for `module.<attr>` of every module of `package` (whose `__path__` is
  `path`), in module-name order; RuntimeError when two modules declare one name."""
  found = {}
  for info in sorted(pkgutil.iter_modules(path), key=lambda m: m.name):
    obj = getattr(importlib.import_module(f"{package}.{info.name}"), attr)
    if obj.name in found:
      raise RuntimeError(f"two modules of {package} declare {obj.name!r}")
    found[obj.name] = obj
  return found

"""The methods, one module each, and the registry that `config.method` keys.

  detcon.py     DetCon-B, DetCon-S, BYOL, SimCLR: masks from the data
  odin.py       Odin: masks discovered by τ (continuous, or cached per copy
                period with odin_cache.py)
  r2o.py        R2O: masks from k-means over region features, K on a
                region-to-object curriculum
  hiergroup.py  hierarchical grouping: pixel pairs from region trees
  discovered.py what every discovered-mask method shares (Odin, R2O)
  base.py       the hooks the one train step (step.py) and train.py call

A method is a `base.Method` subclass. `get(config)` returns the one that
config.method names, bound to the config; the train step, train.py, the
input pipeline and the AOT tool call its hooks and never name a method.
Adding a method is one module, one config file (configs/<method>.py, which
also holds the defaults of the method's config section) and one line in
_MODULES (or `register(cls)` at run time, as tests/methods/test_methods.py does).

This file imports no method module (nor JAX) until a method is asked for:
config files and the command line's early checks stay framework-free.
"""

from __future__ import annotations

import importlib

# config.method -> the module defining its Method class (imported on use).
_MODULES = {
    "detcon_b": "detcon", "detcon_s": "detcon", "byol": "detcon",
    "simclr": "detcon", "odin": "odin", "r2o": "r2o",
    "hiergroup": "hiergroup",
}
_REGISTERED: dict[str, type] = {}


def names() -> tuple[str, ...]:
  """Every config.method value there is a method for."""
  return tuple(sorted({*_MODULES, *_REGISTERED}))


def register(cls: type) -> type:
  """Registers a Method subclass under each of its `names` (a decorator)."""
  for name in cls.names:
    _REGISTERED[name] = cls
  return cls


def method_class(name: str) -> type:
  """The Method subclass of config.method `name`."""
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _MODULES:
    from odin_jax.config_check import ConfigError  # pylint: disable=g-import-not-at-top
    raise ConfigError(f"config.method={name!r}; choose one of {names()} "
                      "(each has a configs/<method>.py).")
  module = importlib.import_module(f"odin_jax.methods.{_MODULES[name]}")
  for cls in vars(module).values():
    if isinstance(cls, type) and name in getattr(cls, "names", ()):
      return cls
  raise LookupError(f"odin_jax.methods.{_MODULES[name]} defines no Method "
                    f"named {name!r}.")


def get(config, *, total_steps: int | None = None,
        steps_per_epoch: int | None = None):
  """The Method config.method names, bound to `config`.

  total_steps / steps_per_epoch: the run's length, for the methods whose
  schedules need it (Odin's λ_τ copies, R2O's K); step.build passes them.
  """
  return method_class(config.method)(config, total_steps=total_steps,
                                     steps_per_epoch=steps_per_epoch)


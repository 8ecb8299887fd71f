"""The command line's help text and one-line errors (odin_jax/main.py).

Pure Python (absl, ml_collections, the standard library): everything here
runs before JAX, Flax or TensorFlow load, so a mistyped field or a refused
value ends the process in a fraction of a second with one line on stderr,
instead of a long traceback after the frameworks have started.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
import sys
from typing import Iterable, NoReturn, Sequence

# Exit status of a command line that cannot run (argparse's convention);
# failures during a run exit 1 (failure.py).
USAGE_EXIT = 2

CONFIGS_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
# Config files that define no method.
_NOT_METHODS = ("__init__.py", "common.py")
# `--config.a.b=v`, `--config.a.b v` and `--noconfig.a.b` (a boolean).
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\s]+)")


def fail(message: str) -> NoReturn:
  """Prints `error: <message>` as one line on stderr and exits USAGE_EXIT."""
  sys.stderr.write(f"error: {' '.join(str(message).split())}\n")
  sys.stderr.flush()
  sys.exit(USAGE_EXIT)


def last_line(error) -> str:
  """The last non-empty line of an error's message: the cause, when the
  message carries a traceback (absl wraps a config file's exception so)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[-1].strip() if lines else repr(error)


def config_fields(config, prefix: str = "") -> list[str]:
  """Every dotted field name of a ConfigDict, sections included, e.g.

  ['batch_size', 'model', 'model.depth', ...]; the names that
  `--config.<name>=...` accepts (up to list indices).
  """
  names = []
  for key, value in config.items():
    name = prefix + key
    names.append(name)
    if hasattr(value, "items"):   # a nested ConfigDict: its fields too
      names.extend(config_fields(value, name + "."))
  return names


def overrides(argv: Sequence[str]) -> list[str]:
  """The field names of the `--config.<name>` overrides in argv, in order."""
  return [m.group(1) for m in map(_OVERRIDE.match, argv) if m]


def config_spec(argv: Sequence[str]) -> str | None:
  """The value of `--config=<file>[:<preset>]` (or `--config <file>`)."""
  for i, arg in enumerate(argv):
    m = re.match(r"^--?config=(.+)$", arg)
    if m:
      return m.group(1)
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def load_config(spec: str):
  """configs/<method>.py[:<arg>] -> its get_config(<arg>), without the
  command line's overrides (ml_collections' config_flags parses those from
  sys.argv while it loads the file, so its value is None when one fails)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_odin_cli_config",
                                                       path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def unknown_field_message(argv: Sequence[str], config) -> str | None:
  """`unknown config field 'model.dpeth' (did you mean 'model.depth'?)` for
  the first override that names no field of `config`; None if all do."""
  known = config_fields(config)
  known_set = set(known)
  for name in overrides(argv):
    # 'a.b[0]' (a list element) is checked by its field, 'a.b'.
    if name.split("[")[0] in known_set:
      continue
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = (" (did you mean " + " or ".join(repr(c) for c in close) + "?)"
            if close else "; see the fields of the config file")
    return f"unknown config field {name!r}{hint}"
  return None


def _docstring_line(path: str) -> str:
  """The head of a Python file's module docstring: its first paragraph up to
  the first sentence end, dash or parenthesis ('' if it has none)."""
  with open(path, encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  paragraph = " ".join(doc.strip().split("\n\n")[0].split())
  return re.split(r"\s[—(]|[.;](?:\s|$)", paragraph)[0]


def _literal(path: str, name: str):
  """The literal value assigned to module-level `name` in a Python file,
  read without importing it (configs/ need not be on sys.path)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Name) and t.id == name for t in node.targets):
      return ast.literal_eval(node.value)
  raise KeyError(f"{name} is not assigned in {path}")


def methods(configs_dir: str = CONFIGS_DIR) -> list[tuple[str, str]]:
  """(method, one-line description) for each configs/<method>.py."""
  return [(f[:-3], _docstring_line(os.path.join(configs_dir, f)))
          for f in sorted(os.listdir(configs_dir))
          if f.endswith(".py") and f not in _NOT_METHODS]


def _listed(words: Iterable[str], indent: str = "  ") -> str:
  """One indented line: the words separated by commas."""
  return indent + ", ".join(words)


def help_epilog(configs_dir: str = CONFIGS_DIR) -> str:
  """The methods and presets, appended to main's docstring for `--help`."""
  if not os.path.isdir(configs_dir):
    return f"\n(The config files are not in {configs_dir}.)\n"
  common = os.path.join(configs_dir, "common.py")
  lines = ["", "Methods (--config=configs/<method>.py):"]
  width = max(len(m) for m, _ in methods(configs_dir))
  lines += [f"  {m:<{width}}  {doc}" for m, doc in methods(configs_dir)]
  lines += ["", "Presets (--config=configs/<method>.py:<preset>):",
            _listed(_literal(common, "PRESETS")),
            "Backbone presets, alone or before a preset (:vit_s16, "
            ":vit_b16_coco; 'vit' / 'swin' alone at demo / test scale: "
            ":vit_demo):",
            _listed(_literal(common, "BACKBONE_PRESETS")),
            "", "An unknown field or a refused value stops at once with one "
            "line naming the field (exit status 2).", ""]
  # absl's usage() %-formats the docstring with the program name.
  return "\n".join(lines).replace("%", "%%")

"""What a compiled step moves and stores, read from its optimized HLO text.

`compiled.as_text()` of a jitted function is one device's program after
SPMD partitioning: every shape in it is per device (per chip on TPU). This
module parses it without XLA's Python bindings (they change between
versions) into:

  collective_bytes(text)   bytes each collective kind moves per step
  largest_values(text, n)  the n largest values the program materializes,
                           with the JAX op that made each (what to shrink)

An instruction line looks like (TPU prints operands by name only, CPU with
their shapes; layouts may carry tiling such as {1,0:T(8,128)}):

  %all-gather.5 = bf16[256,512]{1,0:T(8,128)} all-gather(%convert), ...,
      metadata={op_name="jit(f)/sharding_constraint" ...}
"""

from __future__ import annotations

import dataclasses
import re

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")

# Bytes per element of each HLO primitive type (s4/u4 pack two per byte).
_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1,
    "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "token": 0}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|"
                     r"false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Values that are not new buffers: arguments, views and tuple plumbing.
_NOT_BUFFERS = {"parameter", "get-tuple-element", "tuple", "bitcast",
                "constant", "after-all", "partition-id", "replica-id"}


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One HLO instruction: its result shapes, opcode and operand names."""
  name: str
  shapes: tuple[tuple[str, tuple[int, ...]], ...]   # (dtype, dims) each
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  computation: str


def shapes_bytes(shapes) -> int:
  """Total bytes of (dtype, dims) arrays; unknown dtypes count 4 bytes."""
  total = 0.0
  for dtype, dims in shapes:
    n = 1
    for d in dims:
      n *= d
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return int(total)


def _split_shape(rest: str) -> tuple[str, str]:
  """'(a, b) op(...)...' or 'f32[2]{0} op(...)' -> (shape text, the rest)."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  # An array shape: up to the first space outside its layout braces.
  depth = 0
  for i, ch in enumerate(rest):
    depth += ch in "{["
    depth -= ch in "}]"
    if ch == " " and depth == 0:
      return rest[:i], rest[i + 1:].lstrip()
  return rest, ""


def _parse_instruction(line: str, computation: str) -> Instruction | None:
  head = _HEAD.match(line)
  if head is None:
    return None
  shape_text, rest = _split_shape(line[head.end():])
  op = re.match(r"([a-z][\w\-]*)\(", rest)
  if op is None:
    return None
  depth, end = 0, len(rest)
  for i in range(op.end() - 1, len(rest)):
    depth += rest[i] == "("
    depth -= rest[i] == ")"
    if depth == 0:
      end = i
      break
  operand_text = rest[op.end():end]
  shapes = tuple((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d))
                 for m in _ARRAY.finditer(shape_text))
  return Instruction(
      name=head.group(1), shapes=shapes, opcode=op.group(1),
      operands=tuple(re.findall(r"%([\w.\-]+)", operand_text)),
      attributes=rest[end + 1:], computation=computation)


def _callees(attributes: str) -> list[str]:
  """Names of the computations an instruction calls (fusion bodies,
  reducers, loop bodies and conditions, branches)."""
  names = _CALLEE.findall(attributes)
  for group in _BRANCHES.findall(attributes):
    names += re.findall(r"%?([\w.\-]+)", group)
  return names


def parse(text: str) -> tuple[list[Instruction], str]:
  """HLO module text -> (all instructions in order, the ENTRY computation).

  Computation headers start at column 0 and end with '{'; instructions are
  indented.
  """
  instructions, computation, entry = [], "", ""
  for line in text.splitlines():
    if not line.startswith(" "):
      header = _COMPUTATION.match(line)
      if header is not None and not line.startswith("HloModule"):
        computation = header.group(2)
        entry = computation if header.group(1) else entry
      continue
    inst = _parse_instruction(line, computation)
    if inst is not None:
      instructions.append(inst)
  return instructions, entry


def _executions(instructions: list[Instruction], entry: str) -> dict:
  """How often each computation runs per call of the program.

  ENTRY runs once; a while body or condition runs `known_trip_count` times
  per run of its caller (1 when XLA did not record a trip count); any other
  called computation (fusion, reducer, branch) once per run of its caller.
  """
  calls: dict[str, list[tuple[str, int]]] = {}
  for inst in instructions:
    trips = _TRIP_COUNT.search(inst.attributes)
    n = int(trips.group(1)) if trips and inst.opcode == "while" else 1
    for callee in _callees(inst.attributes):
      calls.setdefault(callee, []).append((inst.computation, n))
  memo = {entry: 1}

  def runs(name: str, seen=()) -> int:
    if name not in memo:
      memo[name] = sum(runs(caller, seen + (name,)) * n
                       for caller, n in calls.get(name, ())
                       if caller not in seen)
    return memo[name]

  return {inst.computation: runs(inst.computation) for inst in instructions}


def _collective_kind(opcode: str) -> str | None:
  base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
  return base if base in COLLECTIVES else None


def collective_bytes(text: str) -> dict[str, int]:
  """Bytes each collective kind moves in one run of the program (per device).

  Each collective counts the larger of its input and its output: the whole
  gathered array for an all-gather, the whole array before scattering for a
  reduce-scatter, the array for an all-reduce, all-to-all or permute.
  Asynchronous pairs count once (the -start; the -done only waits); a
  -start's result tuple repeats its operands (and may add u32 scalars as
  context), which are left out. Collectives inside a loop count once per
  iteration when XLA recorded the trip count (e.g. micro-batches).
  Returns {kind: bytes} for every kind in COLLECTIVES (0 when absent).
  """
  instructions, entry = parse(text)
  sizes = {i.name: i.shapes for i in instructions}
  runs = _executions(instructions, entry)
  totals = dict.fromkeys(COLLECTIVES, 0)
  for inst in instructions:
    kind = _collective_kind(inst.opcode)
    if kind is None:
      continue
    operand_shapes = [s for name in inst.operands for s in sizes.get(name, ())]
    moved = max(shapes_bytes(operand_shapes),
                shapes_bytes(_own_result(inst, operand_shapes)))
    totals[kind] += moved * runs.get(inst.computation, 1)
  return totals


def _own_result(inst: Instruction, operand_shapes: list) -> list:
  """The shapes an instruction creates: an async -start's result tuple
  without the copies of its operands and its u32[] context scalars."""
  result = list(inst.shapes)
  if not inst.opcode.endswith("-start"):
    return result
  n = len(operand_shapes)
  if result[:n] == operand_shapes and len(result) > n:
    result = result[n:]
  return [s for s in result if s[1]] or result


def largest_values(text: str, n: int = 5) -> list[dict]:
  """The n largest values the program stores, largest first.

  Only instructions of computations that are not fused into another (a
  fusion's inner values never reach memory), and not arguments, constants
  or views. Each: {'bytes', 'opcode', 'shape', 'op_name'}, op_name being
  the JAX operation that produced it (from the HLO metadata), so a user can
  tell which layer or loss term holds the memory. XLA's buffer assignment
  reuses memory between values, so these are the biggest candidates, not
  a sum that adds up to the temporaries.
  """
  instructions, _ = parse(text)
  sizes = {i.name: i.shapes for i in instructions}
  fused = set()
  for inst in instructions:
    if inst.opcode == "fusion" or inst.opcode.startswith("async"):
      fused.update(_callees(inst.attributes))
  rows = []
  for inst in instructions:
    if inst.computation in fused or inst.opcode in _NOT_BUFFERS or \
        inst.opcode.endswith("-done"):
      continue
    op_name = _OP_NAME.search(inst.attributes)
    own = _own_result(inst, [s for name in inst.operands
                             for s in sizes.get(name, ())])
    rows.append({
        "bytes": shapes_bytes(own), "opcode": inst.opcode,
        "shape": ", ".join(f"{d}[{','.join(map(str, s))}]" for d, s in own),
        "op_name": op_name.group(1) if op_name else ""})
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:n]
